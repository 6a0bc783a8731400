"""The prior's auto defaults: the rule's exact choices, explicit settings winning, the summary row, resume."""

from __future__ import annotations

import pytest
import yaml
from test_train_prior import make_latents, run_paths
from typer.testing import CliRunner

from vqtool.artifacts import read_metadata
from vqtool.prior.defaults import AUTO_KEYS, auto_prior_defaults, auto_record, auto_row, heads_for, lr_for
from vqtool.prior.store import load_prior
from vqtool.prior.train import TrainPriorConfig, train_prior

# --------------------------------------------------------------------------------------------------
# The rule


@pytest.mark.parametrize("args, values, why", [
    # Noto emoji at 64 px on 2 cores: the CPU limits the size.
    (((16, 16), 3394, 512, "cpu", 2),
     {"n_layer": 4, "n_embd": 192, "n_head": 6, "batch_size": 16, "lr": 1.3e-3, "warmup_steps": 200,
      "timesteps": 256}, "the largest prior that makes ~2,000 steps of 16 in 30 minutes"),
    # The same data on 8 cores: now the 3,394 images are the limit.
    (((16, 16), 3394, 512, "cpu", 8),
     {"n_layer": 6, "n_embd": 256, "n_head": 8, "batch_size": 16, "lr": 8.2e-4, "warmup_steps": 200,
      "timesteps": 256}, "the largest prior with ≤8 parameters per training token"),
    # CIFAR-10 at 32 px (8×8 grids) on 2 cores: the cifar10-32 recipe's size, T = the 64 tokens.
    (((8, 8), 47500, 512, "cpu", 2),
     {"n_layer": 6, "n_embd": 256, "n_head": 8, "batch_size": 16, "lr": 8.2e-4, "warmup_steps": 200,
      "timesteps": 64}, "the largest prior that makes ~2,000 steps of 16 in 30 minutes"),
    # The quickstart's 1,900 shapes: the quickstart prior's size.
    (((8, 8), 1900, 64, "cpu", 2),
     {"n_layer": 4, "n_embd": 128, "n_head": 4, "batch_size": 16, "lr": 2e-3, "warmup_steps": 200,
      "timesteps": 64}, "the largest prior with ≤8 parameters per training token"),
    # A hundred images: below every size's data limit, so the smallest.
    (((16, 16), 100, 512, "cpu", 2),
     {"n_layer": 4, "n_embd": 128, "n_head": 4, "batch_size": 16, "lr": 2e-3, "warmup_steps": 200,
      "timesteps": 256}, "the smallest prior: few training tokens"),
    # FFHQ-sized data on a GPU: the papers' 24 × 512.
    (((16, 16), 60000, 1024, "cuda", 8),
     {"n_layer": 24, "n_embd": 512, "n_head": 8, "batch_size": 32, "lr": 2e-4, "warmup_steps": 2000,
      "timesteps": 256}, None),
    (((16, 16), 3394, 512, "cuda", 8),
     {"n_layer": 6, "n_embd": 256, "n_head": 8, "batch_size": 32, "lr": 8.2e-4, "warmup_steps": 2000,
      "timesteps": 256}, "the largest prior with ≤8 parameters per training token"),
    # 32×32 grids cost 4× the tokens per step: the CPU takes the smallest size.
    (((32, 32), 60000, 1024, "cpu", 2),
     {"n_layer": 4, "n_embd": 128, "n_head": 4, "batch_size": 16, "lr": 2e-3, "warmup_steps": 200,
      "timesteps": 256}, "the largest prior that makes ~2,000 steps of 16 in 30 minutes"),
])
def test_rule_exact_choices(args, values, why):
    auto = auto_prior_defaults(*args)
    assert auto.values == values
    grid, images, _, device, cores = args
    place = f"CPU, {cores} cores" if device == "cpu" else "CUDA"
    assert auto.reasons == [place, f"{grid[0]}×{grid[1]} grid", f"{images:,} images", *([why] if why else [])]


def test_rule_follows_given_settings():
    # A given width sets the heads and the learning rate; a given depth the learning rate; a given batch
    # the compute estimate (batch 4 lets 2 cores afford 6 × 256 on the emoji grids).
    assert auto_prior_defaults((16, 16), 3394, 512, "cpu", 2, {"n_embd": 384}).values == {
        "n_layer": 4, "n_embd": 384, "n_head": 8, "batch_size": 16, "lr": 6.7e-4, "warmup_steps": 200,
        "timesteps": 256}
    assert auto_prior_defaults((16, 16), 3394, 512, "cpu", 2, {"n_layer": 16}).values["lr"] == 6.7e-4
    small_batch = auto_prior_defaults((16, 16), 3394, 512, "cpu", 2, {"batch_size": 4}).values
    assert (small_batch["n_layer"], small_batch["n_embd"], small_batch["batch_size"]) == (6, 256, 4)
    assert [heads_for(w) for w in (16, 64, 100, 192, 256, 512, 1024)] == [1, 2, 2, 6, 8, 8, 8]
    assert [lr_for(4, 64), lr_for(4, 128), lr_for(4, 256), lr_for(24, 512)] == [2e-3, 2e-3, 1e-3, 2e-4]


def test_record_leaves_out_given_keys_and_autoregressive_timesteps():
    rec = auto_record((16, 16), 3394, 512, "cpu", 2, "absorbing", {"n_layer": 3, "lr": 1e-4})
    assert sorted(rec["values"]) == sorted(set(AUTO_KEYS) - {"n_layer", "lr"})
    assert rec["values"]["n_embd"] == 192
    assert "timesteps" not in auto_record((16, 16), 3394, 512, "cpu", 2, "autoregressive", {})["values"]
    assert auto_record((16, 16), 3394, 512, "cpu", 2, "absorbing", dict.fromkeys(AUTO_KEYS, 1)) is None


def test_summary_row():
    rec = auto_record((16, 16), 3394, 512, "cpu", 2, "absorbing", {})
    assert auto_row(rec) == ("4 layers × 192, 6 heads, batch 16, lr 0.0013, warm-up 200, T 256 (CPU, 2 cores, "
                             "16×16 grid, 3,394 images, the largest prior that makes ~2,000 steps of 16 in 30 "
                             "minutes)")
    partial = {"values": {"n_embd": 192, "lr": 1.3e-3}, "reasons": ["CPU, 2 cores"], "resumed": True}
    assert auto_row(partial) == "192, lr 0.0013 (recorded in the checkpoint: CPU, 2 cores)"


# --------------------------------------------------------------------------------------------------
# In train-prior


def settings(**kw):
    base = dict(max_steps=2, log_every=1, eval_every=2, checkpoint_every=2, val_batches=1, val_nll_samples=2,
                device="cpu", threads=1)
    return {**base, **kw}


def test_fresh_run_fills_only_what_was_not_chosen(tmp_path, monkeypatch):
    monkeypatch.setattr("vqtool.launch.usable_cpus", lambda: 2)
    latents = make_latents(tmp_path / "latents.safetensors")  # 4×4 grids of 16 codes, 40 train images
    p = run_paths(tmp_path / "a")
    r = train_prior(latents, settings(n_layer=1, n_embd=16, lr=1e-3), **p, auto_defaults=True)
    assert r.auto["values"] == {"n_head": 1, "batch_size": 16, "warmup_steps": 200, "timesteps": 16}
    assert r.auto["reasons"][:3] == ["CPU, 2 cores", "4×4 grid", "40 images"] and not r.auto["resumed"]
    prior = load_prior(p["out"])
    model = prior.model.cfg
    assert (model.n_layer, model.n_embd, model.n_head, prior.objective["T"]) == (1, 16, 1, 16)
    # The artifact records the final values, not the built-in defaults.
    train = read_metadata(p["out"]).extra["train"]
    assert (train["n_layer"], train["n_embd"], train["lr"], train["batch_size"], train["warmup_steps"]) == (
        1, 16, 1e-3, 16, 200)
    # Without the flag (the pipeline, the Python API) nothing is filled, and the checkpoint has no record.
    q = run_paths(tmp_path / "b")
    r = train_prior(latents, settings(n_layer=1, n_embd=16, n_head=2), **q)
    assert r.auto is None and "auto" not in read_metadata(q["checkpoint"]).config
    assert read_metadata(q["out"]).extra["train"]["timesteps"] == TrainPriorConfig().timesteps


def test_resume_keeps_the_checkpoint_choice_on_another_machine(tmp_path, monkeypatch):
    latents = make_latents(tmp_path / "latents.safetensors")
    p = run_paths(tmp_path / "run")
    r = train_prior(latents, settings(n_layer=1, lr=1e-3), **p, auto_defaults=True)
    first = load_prior(p["out"]).model.cfg
    assert r.auto["values"]["n_embd"] == 128
    recorded = read_metadata(p["checkpoint"]).config["auto"]

    # Another machine would choose another size: a resume must not ask.
    def other_machine(*args, **kwargs):
        raise AssertionError("a resume consulted the auto rule")

    monkeypatch.setattr("vqtool.prior.train.auto_record", other_machine)
    r = train_prior(latents, settings(n_layer=1, lr=1e-3, max_steps=4), **p, resume=True, auto_defaults=True)
    assert r.steps == 4 and r.auto["resumed"] and r.auto["values"] == recorded["values"]
    again = load_prior(p["out"]).model.cfg
    assert (again.n_layer, again.n_embd, again.n_head) == (first.n_layer, first.n_embd, first.n_head)
    # A caller that does not ask for auto defaults resumes the same run from the record too.
    r = train_prior(latents, settings(n_layer=1, lr=1e-3, max_steps=6), **p, resume=True)
    assert r.steps == 6 and read_metadata(p["checkpoint"]).config["auto"] == recorded


def test_cli_recipe_set_and_flags_win_and_the_row_says_what_was_chosen(tmp_path, monkeypatch):
    from vqtool.cli import app

    monkeypatch.setattr("vqtool.launch.usable_cpus", lambda: 2)
    monkeypatch.setenv("COLUMNS", "250")
    run = tmp_path / "run"
    run.mkdir()
    make_latents(run / "latents.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"prior": {"n_layer": 2, "n_embd": 32}, "train_prior": {"lr": 5e-4}}))
    res = CliRunner().invoke(app, ["train-prior", "--run", str(run), "--config", str(recipe), "--max-steps", "2",
                                   "--set", "n_embd=24", "--heads", "3", "--device", "cpu", "--threads", "1",
                                   "--set", "val_batches=1", "--set", "val_nll_samples=2", "--eval-every", "2"])
    assert res.exit_code == 0, res.output
    model = load_prior(run / "prior.safetensors").model.cfg
    assert (model.n_layer, model.n_embd, model.n_head) == (2, 24, 3)
    train = read_metadata(run / "prior.safetensors").extra["train"]
    assert (train["lr"], train["batch_size"], train["warmup_steps"], train["timesteps"]) == (5e-4, 16, 200, 16)
    row = next(line for line in res.output.splitlines() if "auto defaults" in line)
    assert "batch 16, warm-up 200, T 16 (CPU, 2 cores, 4×4 grid, 40 images" in row
    assert "layers" not in row and "heads" not in row and "lr" not in row

    # Everything chosen: no row.
    every = ["--layers", "1", "--width", "16", "--heads", "2", "--batch-size", "8", "--lr", "1e-3",
             "--set", "warmup_steps=2", "--timesteps", "8"]
    res = CliRunner().invoke(app, ["train-prior", "--run", str(run), "--max-steps", "1", "--device", "cpu",
                                   "--set", "val_batches=1", "--overwrite", *every])
    assert res.exit_code == 0, res.output
    assert "auto defaults" not in res.output
    assert "auto" not in read_metadata(run / "checkpoints" / "train-prior-last.safetensors").config


def test_shipped_recipes_spell_out_every_auto_setting():
    # A recipe describes its run on any machine: none leaves a setting to the auto rule.
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe = yaml.safe_load(path.read_text())
        if "prior" not in recipe and "train_prior" not in recipe:
            continue
        chosen = {**(recipe.get("prior") or {}), **(recipe.get("train_prior") or {})}
        assert set(AUTO_KEYS) <= set(chosen), f"{path.name}: missing {sorted(set(AUTO_KEYS) - set(chosen))}"
