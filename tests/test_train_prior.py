"""train-prior: exact resume, NaN stop, best-validation export, early stopping, provenance, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vqtool.artifacts import file_sha256, load_artifact, read_metadata, save_artifact
from vqtool.errors import VqtoolError
from vqtool.latents import Latents, Split, save_latents
from vqtool.prior.store import model_config_from_record
from vqtool.prior.train import (
    BatchSampler,
    PriorTrainTask,
    TrainPriorConfig,
    check_config,
    learning_rate,
    stage_names,
    train_prior,
)

VQ_SHA = "ab" * 32


def make_latents(path: Path, labels: bool = True, n_train: int = 40, n_val: int = 12) -> Path:
    """Diagonal-stripe grids (learnable structure) of 16 codes on a 4×4 grid, with 3 classes."""
    g = torch.Generator().manual_seed(0)

    def grids(n):
        base = torch.randint(0, 16, (n, 1, 1), generator=g)
        return (base + torch.arange(4)[None, :, None] + torch.arange(4)[None, None, :]) % 16

    def split(n):
        return Split(grids(n), torch.randint(0, 3, (n,), generator=g) if labels else None)

    lat = Latents(splits={"train": split(n_train), "val": split(n_val)}, codebook_size=16, latent_shape=(4, 4),
                  image_size=16, classes=["a", "b", "c"] if labels else [])
    save_latents(path, lat, parents={"vq": VQ_SHA})
    return path


def small(**kw) -> TrainPriorConfig:
    base = dict(n_layer=1, n_head=2, n_embd=16, batch_size=8, timesteps=16, lr=3e-3, warmup_steps=2,
                log_every=1, eval_every=3, checkpoint_every=3, val_batches=1, val_nll_samples=2, device="cpu")
    base.update(kw)
    return TrainPriorConfig(**base)


def run_paths(folder: Path) -> dict[str, Path]:
    return {"out": folder / "prior.safetensors", "checkpoint": folder / "ck.safetensors",
            "log": folder / "log.jsonl"}


def records(log: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["split"] == split]


def strip_time(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in rs]


# --------------------------------------------------------------------------------------------------
# Pieces


def test_batch_sampler_epochs_resume_and_ranks():
    s = BatchSampler(10, 4, seed=3)
    first = torch.cat([s.next(), s.next()])
    assert sorted(first.tolist()) == sorted(set(first.tolist()))  # no repeats within an epoch
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.state_dict().items()}
    ahead = [s.next() for _ in range(5)]
    again = BatchSampler(10, 4, seed=99)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ahead, [again.next() for _ in range(5)], strict=True))
    # Two ranks split each global batch of the single process with batch 2×4.
    whole = BatchSampler(10, 8, seed=5)
    r0, r1 = BatchSampler(10, 4, seed=5, rank=0, world_size=2), BatchSampler(10, 4, seed=5, rank=1, world_size=2)
    for _ in range(3):
        assert torch.equal(whole.next(), torch.cat([r0.next(), r1.next()]))
    tiny = BatchSampler(3, 8, seed=0)  # a split smaller than a batch is repeated
    assert tiny.next().shape == (8,)


def test_learning_rate_warmup_and_cosine():
    cfg = small(lr=1.0, warmup_steps=4, cosine_decay=True, max_steps=14, min_lr_ratio=0.1)
    assert [learning_rate(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(cfg, 4) == pytest.approx(1.0)
    assert learning_rate(cfg, 9) == pytest.approx(0.55)
    assert learning_rate(cfg, 14) == pytest.approx(0.1)
    assert learning_rate(small(lr=1.0, warmup_steps=0), 1000) == 1.0


def test_config_refusals():
    with pytest.raises(VqtoolError, match="max-steps"):
        check_config(small())
    with pytest.raises(VqtoolError, match="loss.*absorbing"):
        check_config(small(prior="autoregressive", loss="mlm", max_steps=1))
    with pytest.raises(VqtoolError, match="multiple"):
        check_config(small(n_embd=15, max_steps=1))
    with pytest.raises(VqtoolError, match="--prior"):
        check_config(small(prior="gan", max_steps=1))
    with pytest.raises(VqtoolError, match="gelu must be exact or tanh"):
        check_config(small(gelu="relu", max_steps=1))


def test_a_model_record_without_the_gelu_setting_is_the_tanh_approximation():
    record = {"vocab_size": 16, "grid": [4, 4], "n_layer": 1, "n_head": 2, "n_embd": 16}
    assert model_config_from_record(record, "old").gelu == "tanh"  # vqtool's only GELU before the setting
    assert model_config_from_record({**record, "gelu": "exact"}, "new").gelu == "exact"
    with pytest.raises(VqtoolError, match="old: missing"):
        model_config_from_record({"n_layer": 1}, "old")


def test_class_conditioning_follows_labels_and_switch(tmp_path):
    labelled = make_latents(tmp_path / "l.safetensors")
    plain = make_latents(tmp_path / "p.safetensors", labels=False)
    from vqtool.latents import load_latents

    def n_classes(path, **kw):
        task = PriorTrainTask(small(max_steps=1, **kw), load_latents(path), "0" * 64, tmp_path / "x",
                              torch.device("cpu"))
        return task.model_cfg.n_classes

    assert n_classes(labelled) == 3
    assert n_classes(labelled, class_conditional=False) == 0
    assert n_classes(plain) == 0


def test_stage_names_keep_two_priors_apart(tmp_path):
    assert stage_names(tmp_path / "prior.safetensors", tmp_path / "prior.safetensors") == "train-prior"
    assert stage_names(tmp_path / "prior.safetensors", tmp_path / "prior-ar.safetensors") == "train-prior-ar"
    assert stage_names(tmp_path / "prior.safetensors", tmp_path / "big.safetensors") == "train-prior-big"


# --------------------------------------------------------------------------------------------------
# The run


def test_exact_resume_matches_an_uninterrupted_run(tmp_path):
    latents = make_latents(tmp_path / "latents.safetensors")
    cfg = dict(dropout=0.1, cosine_decay=True, max_steps=6)
    a = run_paths(tmp_path / "a")
    ra = train_prior(latents, small(**cfg), **a)
    b = run_paths(tmp_path / "b")
    train_prior(latents, small(**{**cfg, "max_steps": 3}), **b)
    rb = train_prior(latents, small(**cfg), **b, resume=True)
    assert ra.steps == rb.steps == 6
    assert strip_time(records(a["log"], "train")) == strip_time(records(b["log"], "train"))
    assert strip_time(records(a["log"], "val")) == strip_time(records(b["log"], "val"))
    ca, cb = load_artifact(a["checkpoint"]), load_artifact(b["checkpoint"])
    assert ca.tensors.keys() == cb.tensors.keys()
    assert all(torch.equal(ca.tensors[k], cb.tensors[k]) for k in ca.tensors)
    pa, pb = load_artifact(a["out"]), load_artifact(b["out"])
    assert all(torch.equal(pa.tensors[k], pb.tensors[k]) for k in pa.tensors)


def test_prior_is_the_best_validation_checkpoint_with_provenance(tmp_path):
    latents = make_latents(tmp_path / "latents.safetensors")
    p = run_paths(tmp_path / "r")
    r = train_prior(latents, small(max_steps=12, eval_every=1, checkpoint_every=12, lr=1e-2, ema_decay=0.5), **p)
    vals = records(p["log"], "val")
    best = min(vals, key=lambda v: v["bpt"])
    art = read_metadata(p["out"], "prior-model")
    assert art.extra["selected"] == "best-val"
    assert art.extra["step"] == best["step"] == r.best_step
    assert art.extra["val_bpt"] == pytest.approx(best["bpt"]) == pytest.approx(r.best_val_bpt)
    assert art.extra["val_bpd"] == pytest.approx(best["bpt"] * 16 / (3 * 16 * 16))
    assert art.extra["classes"] == ["a", "b", "c"]
    assert art.parents == {"latents": file_sha256(latents), "vq": VQ_SHA}
    assert art.config["prior"] == "absorbing" and art.config["model"]["n_classes"] == 3
    assert vals[-1]["bpt"] < vals[0]["bpt"]  # it learns the stripes
    assert math.isfinite(r.tokens_per_second) and r.tokens_per_second > 0
    from vqtool.prior.likelihood import dataset_nll
    from vqtool.prior.store import load_prior

    prior = load_prior(p["out"])
    val = torch.zeros(3, 4, 4, dtype=torch.long)
    assert dataset_nll(prior, val, torch.tensor([0, 1, 2]), 3, torch.Generator().manual_seed(0)).shape == (3,)


def test_early_stopping_by_validation_bound(tmp_path, monkeypatch):
    latents = make_latents(tmp_path / "latents.safetensors")
    values = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    monkeypatch.setattr(PriorTrainTask, "validation_bpt", lambda self, model: next(values))
    p = run_paths(tmp_path / "r")
    r = train_prior(latents, small(max_steps=30, eval_every=2, checkpoint_every=2, patience=2), **p)
    assert r.reason == "early-stop"
    assert r.steps == 8  # evaluations at 2, 4 (best), 6, 8: two without improvement
    assert r.best_step == 4 and r.best_val_bpt == 2.0
    assert read_metadata(p["out"]).extra["step"] == 4


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from vqtool.prior.absorbing import AbsorbingObjective

    latents = make_latents(tmp_path / "latents.safetensors")
    real = AbsorbingObjective.loss
    calls = {"n": 0}

    def flaky(self, *args):
        calls["n"] += 1
        loss, metrics = real(self, *args)
        return (loss * float("nan"), metrics) if calls["n"] == 5 else (loss, metrics)

    monkeypatch.setattr(AbsorbingObjective, "loss", flaky)
    p = run_paths(tmp_path / "r")
    with pytest.raises(VqtoolError, match="loss became nan at step 5"):
        train_prior(latents, small(max_steps=10, checkpoint_every=2, eval_every=2), **p)
    assert read_metadata(p["checkpoint"]).extra["step"] == 4
    assert read_metadata(p["out"]).extra["step"] == 4


def test_gelu_is_exact_by_default_and_a_run_resumes_with_its_own(tmp_path):
    latents = make_latents(tmp_path / "latents.safetensors")
    fresh = run_paths(tmp_path / "fresh")
    train_prior(latents, small(max_steps=3), **fresh)
    assert load_artifact(fresh["out"]).config["model"]["gelu"] == "exact"
    # A run of the tanh approximation (the default before) resumes with it without naming it, exactly.
    a, b = run_paths(tmp_path / "a"), run_paths(tmp_path / "b")
    train_prior(latents, small(gelu="tanh", max_steps=6), **a)
    train_prior(latents, small(gelu="tanh", max_steps=3), **b)
    train_prior(latents, small(max_steps=6), **b, resume=True)
    assert load_artifact(b["out"]).config["model"]["gelu"] == "tanh"
    assert strip_time(records(a["log"], "train")) == strip_time(records(b["log"], "train"))
    # Choosing the other activation on a resume is a change of model, refused.
    chosen = {**dataclasses.asdict(small(max_steps=9)), "gelu": "exact"}
    with pytest.raises(VqtoolError, match="differ from the checkpoint: model"):
        train_prior(latents, chosen, **b, resume=True)


def test_a_checkpoint_from_before_the_gelu_setting_resumes_as_tanh(tmp_path):
    latents = make_latents(tmp_path / "latents.safetensors")
    a, b = run_paths(tmp_path / "a"), run_paths(tmp_path / "b")
    train_prior(latents, small(gelu="tanh", max_steps=6), **a)
    train_prior(latents, small(gelu="tanh", max_steps=3), **b)
    # The checkpoint as vqtool wrote it before the setting existed: its model record has no gelu.
    old = load_artifact(b["checkpoint"])
    config = {**old.config, "model": {k: v for k, v in old.config["model"].items() if k != "gelu"}}
    save_artifact(b["checkpoint"], "prior-checkpoint", old.tensors, config, old.parents,
                  {k: v for k, v in old.extra.items() if not k.startswith("_")})
    train_prior(latents, small(max_steps=6), **b, resume=True)
    assert load_artifact(b["out"]).config["model"]["gelu"] == "tanh"
    assert strip_time(records(a["log"], "train")) == strip_time(records(b["log"], "train"))


def test_refuses_existing_outputs_and_changed_latents(tmp_path):
    latents = make_latents(tmp_path / "latents.safetensors")
    p = run_paths(tmp_path / "r")
    train_prior(latents, small(max_steps=3), **p)
    with pytest.raises(VqtoolError, match="--overwrite"):
        train_prior(latents, small(max_steps=3), **p)
    other = make_latents(tmp_path / "other.safetensors", n_train=44)
    with pytest.raises(VqtoolError, match="latents"):
        train_prior(other, small(max_steps=6), **p, resume=True)
    with pytest.raises(VqtoolError, match="no latents"):
        train_prior(tmp_path / "missing.safetensors", small(max_steps=3), **run_paths(tmp_path / "m"))


# --------------------------------------------------------------------------------------------------
# The command


def test_cli_trains_both_priors_into_one_run(tmp_path):
    from vqtool.cli import app
    from vqtool.prior.store import load_prior

    run = tmp_path / "run"
    run.mkdir()
    make_latents(run / "latents.safetensors")
    common = ["--run", str(run), "--max-steps", "4", "--layers", "1", "--width", "16", "--heads", "2",
              "--eval-every", "2", "--threads", "1", "--device", "cpu", "--set", "batch_size=8",
              "--set", "train_prior.val_batches=1", "--set", "prior.timesteps=8"]
    runner = CliRunner()
    res = runner.invoke(app, ["train-prior", *common, "--set", "val_nll_samples=2"])
    assert res.exit_code == 0, res.output
    prior = load_prior(run / "prior.safetensors")
    assert prior.kind == "absorbing" and prior.objective["T"] == 8
    assert prior.artifact.parents["vq"] == VQ_SHA
    assert (run / "checkpoints" / "train-prior-last.safetensors").exists()
    assert len(records(run / "train-prior.jsonl", "val")) == 2
    from vqtool.prior.sample import SampleSettings, sample_tokens

    drawn = sample_tokens(prior, 3, SampleSettings(steps=4, batch_size=3), torch.tensor([0, 1, 2]))
    assert drawn.shape == (3, 4, 4) and 0 <= int(drawn.min()) and int(drawn.max()) < 16  # no MASK left

    ar = ["train-prior", "--run", str(run), "--max-steps", "2", "--layers", "1", "--width", "16", "--heads", "2",
          "--eval-every", "2", "--threads", "1", "--device", "cpu", "--set", "batch_size=8",
          "--prior", "autoregressive", "--out", str(run / "prior-ar.safetensors")]
    res = runner.invoke(app, ar)
    assert res.exit_code == 0, res.output
    assert load_prior(run / "prior-ar.safetensors").kind == "autoregressive"
    assert (run / "checkpoints" / "train-prior-ar-last.safetensors").exists()
    assert (run / "train-prior-ar.jsonl").exists()

    res = runner.invoke(app, ["train-prior", *common])
    assert res.exit_code == 2
    assert "exists" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train-prior", *common, "--set", "n_layers=3", "--overwrite"])
    assert res.exit_code == 2 and "unknown setting" in res.output
