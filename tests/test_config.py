"""The one settings layer: defaults → recipe sections → --set → flags, with one --set grammar."""

from dataclasses import dataclass

import pytest

from vqtool.config import Part, choose, stage_settings
from vqtool.errors import VqtoolError
from vqtool.prior.train import TrainPriorConfig
from vqtool.training import LoopSettings


@dataclass
class Model:
    width: int = 8
    dropout: float = 0.0


@dataclass
class Train:
    lr: float = 1e-3
    batch_size: int = 4
    grad_clip: float | None = 1.0
    dropout: float = 0.5  # also a Model setting: a bare key goes to the first part that has it


PARTS = (Part(Model, ("model",)), Part(Train, ("setup", "train")))


def test_layers_apply_in_order_and_flags_not_given_do_not_count():
    recipe = {"model": {"width": 16}, "setup": {"lr": 0.1, "batch_size": 2}, "train": {"lr": 0.2}}
    got = stage_settings(PARTS, recipe, ["batch_size=3"], {"train": {"batch_size": 5, "lr": None}})
    assert got["model"] == Model(width=16)
    assert got["train"] == Train(lr=0.2, batch_size=5)  # train section after setup; the flag beats --set


def test_set_grammar_section_key_and_bare_key():
    chosen = choose(PARTS, {}, ["dropout=0.1", "train.dropout=0.2", "setup.lr=0.5", "model.width=32"])
    assert chosen == {"model": {"dropout": 0.1, "width": 32}, "train": {"dropout": 0.2, "lr": 0.5}}


def test_unknown_set_key_is_one_error_listing_the_valid_keys():
    with pytest.raises(VqtoolError) as err:
        choose(PARTS, {}, ["widht=3"])
    message = str(err.value)
    assert "--set widht: unknown setting" in message and "\n" not in message
    assert "model: dropout, width" in message and "setup/train: batch_size, dropout, grad_clip, lr" in message
    with pytest.raises(VqtoolError, match="unknown setting"):
        choose(PARTS, {}, ["model.lr=1"])  # a real key, but not of the section named


def test_explicit_null_is_honoured_in_recipe_and_set():
    assert stage_settings(PARTS, {"train": {"grad_clip": None}}, None)["train"].grad_clip is None
    assert stage_settings(PARTS, {}, ["grad_clip=null"])["train"].grad_clip is None
    assert stage_settings(PARTS, {}, ["grad_clip=~"], {"train": {"grad_clip": None}})["train"].grad_clip is None
    with pytest.raises(VqtoolError, match="train.lr: cannot be null"):
        stage_settings(PARTS, {}, ["lr=null"])


def test_unknown_recipe_key_and_bad_section_are_errors():
    with pytest.raises(VqtoolError, match="unknown setting"):
        stage_settings(PARTS, {"model": {"depth": 3}}, None)
    with pytest.raises(VqtoolError, match="recipe section train: expected a mapping"):
        stage_settings(PARTS, {"train": [1, 2]}, None)


def test_trainer_config_is_a_loop_settings_with_flat_keys():
    parts = (Part(TrainPriorConfig, ("prior", "train_prior")),)
    cfg = stage_settings(parts, {"prior": {"n_layer": 2}, "train_prior": {"max_steps": 7, "grad_clip": None}},
                         ["checkpoint_every=3"])["train_prior"]
    assert isinstance(cfg, LoopSettings) and (cfg.max_steps, cfg.checkpoint_every, cfg.n_layer) == (7, 3, 2)
    assert cfg.grad_clip is None


@pytest.mark.parametrize("settings, message", [
    (LoopSettings(), "give --max-steps or --max-minutes"),
    (LoopSettings(max_steps=-1), "max_steps must not be negative"),
    (LoopSettings(max_minutes=0), "max_minutes must be positive"),
    (LoopSettings(max_steps=5, eval_every=0), "eval_every must be at least 1"),
])
def test_loop_settings_refuse_runs_that_cannot_work(settings, message):
    with pytest.raises(VqtoolError, match=message):
        settings.check_loop("train_prior")
    LoopSettings(max_steps=0).check_loop("train_prior")  # zero steps: a run that only saves is allowed
