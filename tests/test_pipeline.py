"""The main job end to end: `quickstart` with tiny settings, reruns, changed settings, Ctrl-C, `run RECIPE`.

The quickstart recipe itself is used, shrunk by `--set` overrides to 16 px images and models of a few
thousand parameters, so every stage runs for real in seconds. TORCH_HOME points at an empty folder, so no
pretrained weights are found (as on a fresh offline machine): eval reports the weight-free metrics and
neighbours falls back to pixel distance.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqtool.artifacts import file_sha256, load_artifact, read_metadata
from vqtool.data.manifest import manifest_sha256
from vqtool.errors import Interrupted, VqtoolError
from vqtool.pipeline import (
    STAGES,
    PipelineOptions,
    apply_overrides,
    ledger_entries,
    load_and_run,
    quickstart,
    quickstart_recipe,
    recipe_stages,
    run_pipeline,
)
from vqtool.runs import RunPaths

SIZE = 16
TINY = [
    "prepare.count=48", f"prepare.size={SIZE}", "prepare.val_fraction=0.25", "prepare.workers=1",
    "vq.ch=8", "vq.z_channels=8", "vq.code_dim=4", "vq.codebook_size=16",
    "train_vq.max_steps=4", "train_vq.batch_size=8", "train_vq.eval_every=2", "train_vq.checkpoint_every=2",
    "train_vq.kmeans_batches=1", "train_vq.eval_images=8",
    "prior.n_layer=1", "prior.n_embd=16", "prior.n_head=2", "prior.timesteps=8",
    "train_prior.max_steps=4", "train_prior.batch_size=8", "train_prior.eval_every=2",
    "train_prior.checkpoint_every=2", "train_prior.warmup_steps=1",
    "sample.n=6", "sample.steps=4", "sample.batch_size=6", "inpaint.n=2",
    "eval.recon_n=8", "eval.nll_n=6", "eval.nll_samples=2", "eval.batch_size=8",
    "neighbours.n=4", "neighbours.k=2", "neighbours.n_val=4", "neighbours.batch_size=16",
]
OPTIONS = dict(threads=1, write_index=True)


@pytest.fixture(scope="module")
def no_weights(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
        yield


@pytest.fixture(scope="module")
def quick(tmp_path_factory, no_weights):
    """A tiny quickstart run: (run folder, the first call's result)."""
    run = tmp_path_factory.mktemp("quick") / "run"
    result = quickstart(run, TINY, PipelineOptions(**OPTIONS))
    return run, result


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(run, dest)
    return dest


def test_quickstart_runs_every_stage_and_records_provenance(quick):
    run, result = quick
    assert [r.stage for r in result.stages] == list(STAGES)
    assert all(r.status == "ran" for r in result.stages), [(r.stage, r.status) for r in result.stages]
    p = RunPaths.of(run)
    dataset = manifest_sha256(p.shards)
    vq, latents, prior = file_sha256(p.vq), file_sha256(p.latents), file_sha256(p.prior)
    samples, source = file_sha256(p.samples_artifact), file_sha256(p.inpaint / "source.png")
    expected = {
        p.vq: ("vq-model", {"dataset": dataset}),
        p.latents: ("latents", {"vq": vq, "dataset": dataset}),
        p.prior: ("prior-model", {"latents": latents, "vq": vq}),
        p.samples_artifact: ("samples", {"prior": prior, "vq": vq}),
        p.inpaint / "inpaint.safetensors": ("samples", {"prior": prior, "vq": vq, "image": source}),
        p.eval / "report.safetensors": ("eval-report", {"vq": vq, "dataset": dataset, "prior": prior,
                                                        "latents": latents}),
        p.eval / "neighbours.safetensors": ("eval-report", {"vq": vq, "fake_samples": samples,
                                                            "train_dataset": dataset}),
    }
    for path, (kind, parents) in expected.items():
        meta = read_metadata(path)
        assert meta.kind == kind, path
        assert meta.parents == parents, path
    ledger = ledger_entries(run)
    assert set(ledger) == set(STAGES)
    assert all(e["status"] == "done" for e in ledger.values())
    assert ledger["train-vq"]["output"] == vq and ledger["encode"]["inputs"] == {"vq": vq, "dataset": dataset}


def test_samples_decode_to_images_of_the_data_size(quick):
    from vqtool.samples import load_samples
    from vqtool.vq.store import load_vq

    run, _ = quick
    p = RunPaths.of(run)
    samples = load_samples(p.samples_artifact)
    vq = load_vq(p.vq)
    assert samples.tokens.shape == (6, 4, 4)
    with torch.no_grad():
        images = vq.model.decode_tokens(samples.tokens)
    assert images.shape == (6, 3, SIZE, SIZE)
    pngs = sorted(p.samples.glob("sample-*.png"))
    assert len(pngs) == 6
    assert all(Image.open(f).size == (SIZE, SIZE) for f in pngs)
    completions = sorted(p.inpaint.glob("completion-*.png"))
    assert len(completions) == 2 and Image.open(completions[0]).size == (SIZE, SIZE)


def test_eval_without_weights_reports_weight_free_metrics_and_pixel_neighbours(quick):
    run, _ = quick
    report = json.loads((run / "eval" / "report.json").read_text())
    m = report["metrics"]
    assert m["recon_psnr"] > 0 and 0 < m["codebook_usage"] <= 1 and m["nll_val_bpt"] > 0
    assert m["recon_fid"] is None and "fid" not in m  # no Inception weights: FID was not requested
    assert "recon FID skipped" in report["recon"]["note"]
    neighbours = json.loads((run / "eval" / "neighbours.json").read_text())
    assert neighbours["distance"] == "pixel-rms" and "LPIPS" in neighbours["note"]
    art = load_artifact(run / "eval" / "neighbours.safetensors", "eval-report")
    d = art.tensors["distances"]
    assert d.shape == (4, 2) and bool((d[:, 0] <= d[:, 1]).all()) and bool((d >= 0).all())


def test_index_html_shows_every_part_by_relative_path(quick):
    run, result = quick
    assert result.index == run / "index.html"
    page = result.index.read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert {"samples/grid.png", "figures/reconstructions.png", "inpaint/grid.png", "eval/neighbours.png",
            "curves/train-vq.png", "curves/train-prior.png"} <= set(sources)
    for src in sources:
        assert not Path(src).is_absolute() and (run / src).exists()
    assert "Recon PSNR" in page and "NLL val" in page and "<script" not in page
    w, h = Image.open(run / "figures" / "reconstructions.png").size
    assert h > w / 8  # two rows: originals over reconstructions


def test_rerun_skips_every_stage(quick, tmp_path):
    run = _copy(quick[0], tmp_path)
    before = {f: f.stat().st_mtime_ns for f in run.rglob("*.safetensors")}
    result = quickstart(run, TINY, PipelineOptions(**OPTIONS))
    assert [r.status for r in result.stages] == ["up to date"] * len(STAGES)
    assert {f: f.stat().st_mtime_ns for f in run.rglob("*.safetensors")} == before


def test_changed_setting_reruns_that_stage_and_downstream(quick, tmp_path):
    run = _copy(quick[0], tmp_path)
    dry = quickstart(run, [*TINY, "sample.temperature=0.5"], PipelineOptions(**OPTIONS, dry_run=True))
    status = {r.stage: r.status for r in dry.stages}
    assert status == {"prepare": "up to date", "train-vq": "up to date", "encode": "up to date",
                      "train-prior": "up to date", "sample": "would run", "inpaint": "would run",
                      "eval": "up to date", "neighbours": "would run"}
    result = quickstart(run, [*TINY, "sample.temperature=0.5"], PipelineOptions(**OPTIONS))
    assert {r.stage: r.status for r in result.stages} == {**status, "sample": "ran", "inpaint": "ran",
                                                          "neighbours": "ran"}
    assert "settings changed: temperature" in next(r.why for r in result.stages if r.stage == "sample")
    assert read_metadata(run / "samples" / "samples.safetensors").config["temperature"] == 0.5


def test_a_run_folder_from_before_the_gelu_setting_keeps_its_prior(tmp_path, no_weights):
    run = tmp_path / "run"
    quickstart(run, [*TINY, "prior.gelu=tanh"], PipelineOptions(**OPTIONS))
    # The record as the pipeline wrote it before the setting existed: no gelu in the prior's settings.
    ledger = json.loads((run / "pipeline.json").read_text())
    del ledger["stages"]["train-prior"]["settings"]["gelu"]
    (run / "pipeline.json").write_text(json.dumps(ledger))
    result = quickstart(run, TINY, PipelineOptions(**OPTIONS))
    assert [r.status for r in result.stages] == ["up to date"] * len(STAGES)
    # Naming the new default in the recipe trains the prior again, with it.
    dry = quickstart(run, [*TINY, "prior.gelu=exact"], PipelineOptions(**OPTIONS, dry_run=True))
    prior = next(r for r in dry.stages if r.stage == "train-prior")
    assert prior.status == "would run" and prior.why == "settings changed: gelu"


def test_changed_input_reruns_downstream(quick, tmp_path):
    run = _copy(quick[0], tmp_path)
    result = quickstart(run, [*TINY, "train_vq.lr=0.0003"], PipelineOptions(**OPTIONS))
    status = {r.stage: r.status for r in result.stages}
    assert status == {"prepare": "up to date", **{s: "ran" for s in STAGES[1:]}}
    assert next(r.why for r in result.stages if r.stage == "encode") == "input changed: vq"


def test_more_steps_continue_from_the_checkpoint(quick, tmp_path):
    run = _copy(quick[0], tmp_path)
    result = run_pipeline(apply_overrides(_recipe(), [*TINY, "train_vq.max_steps=6"]), run,
                          PipelineOptions(**OPTIONS), stages=["prepare", "train-vq"])
    vq = next(r for r in result.stages if r.stage == "train-vq")
    assert vq.status == "resumed" and "continuing from the checkpoint at step 4" in vq.why
    assert read_metadata(run / "vq.safetensors").extra["step"] == 6


def test_ctrl_c_in_training_stops_then_rerun_resumes_exactly(quick, tmp_path, monkeypatch):
    from vqtool.vq import train as vq_train

    run = tmp_path / "run"
    recipe = apply_overrides(_recipe(), TINY)
    original = vq_train.VQTrainer.train_step

    def step_then_ctrl_c(self):
        out = original(self)
        if self.step == 2:
            signal.raise_signal(signal.SIGINT)  # the loop finishes this step, saves and stops
        return out

    monkeypatch.setattr(vq_train.VQTrainer, "train_step", step_then_ctrl_c)
    with pytest.raises(Interrupted):
        run_pipeline(recipe, run, PipelineOptions(**OPTIONS), stages=["prepare", "train-vq"])
    assert ledger_entries(run)["train-vq"]["status"] == "interrupted"
    assert read_metadata(run / "checkpoints" / "train-vq-last.safetensors").extra["step"] == 2
    monkeypatch.setattr(vq_train.VQTrainer, "train_step", original)

    result = run_pipeline(recipe, run, PipelineOptions(**OPTIONS), stages=["prepare", "train-vq"])
    assert [r.status for r in result.stages] == ["up to date", "resumed"]
    resumed = load_artifact(run / "vq.safetensors", "vq-model").tensors
    straight = load_artifact(quick[0] / "vq.safetensors", "vq-model").tensors
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_foreign_output_is_refused_unless_overwrite(quick, tmp_path):
    run = _copy(quick[0], tmp_path)
    prior = run / "prior.safetensors"
    prior.write_bytes(prior.read_bytes() + b" ")  # changed outside the pipeline
    with pytest.raises(VqtoolError, match="not made by this pipeline"):
        quickstart(run, TINY, PipelineOptions(**OPTIONS))
    result = quickstart(run, TINY, PipelineOptions(**OPTIONS, overwrite=True, dry_run=True))
    plan = {r.stage: (r.status, r.why) for r in result.stages}
    assert plan["train-vq"] == ("up to date", "")
    assert plan["train-prior"] == ("would run", "replacing an output this pipeline did not make")
    assert plan["sample"] == ("would run", "after train-prior")


def test_recipe_stages_are_listed_or_inferred():
    assert recipe_stages({"stages": ["sample", "prepare"]}) == ["prepare", "sample"]
    assert recipe_stages({"prepare": {}, "vq": {}, "train_vq": {}}) == ["prepare", "train-vq"]
    assert recipe_stages({"prior": {}, "train_prior": {}}) == ["train-prior"]
    assert recipe_stages({"train_vq": {}, "sample": {}}) == ["train-vq", "encode", "train-prior", "sample"]
    assert recipe_stages({"train_vq": {}, "neighbours": {}}) == [
        "train-vq", "encode", "train-prior", "sample", "neighbours"]
    with pytest.raises(VqtoolError, match="unknown stage"):
        recipe_stages({"stages": ["train"]})
    with pytest.raises(VqtoolError, match="no stages"):
        recipe_stages({"seed": 1})


def test_overrides_and_bad_recipes_are_one_line_errors(tmp_path):
    assert apply_overrides({"vq": {"ch": 8}}, ["vq.ch=16", "seed=3"]) == {"vq": {"ch": 16}, "seed": 3}
    with pytest.raises(VqtoolError, match="unknown section 'vqq'"):
        apply_overrides({}, ["vqq.ch=1"])
    with pytest.raises(VqtoolError, match="unknown setting"):
        run_pipeline(apply_overrides(_recipe(), ["train_vq.learning_rate=1"]), tmp_path / "r")
    with pytest.raises(VqtoolError, match="exactly one of"):
        run_pipeline({"prepare": {"size": 16}}, tmp_path / "r")
    with pytest.raises(VqtoolError, match=r"latents.safetensors: missing .*encode stage"):
        run_pipeline({"stages": ["train-prior"], "train_prior": {"max_steps": 1}}, tmp_path / "r")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_run_command_on_a_tiny_recipe(tmp_path, no_weights):
    import yaml

    from vqtool.cli import app

    recipe = tmp_path / "tiny.yaml"
    sections = {k: v for k, v in apply_overrides(_recipe(), TINY).items() if k in ("prepare", "vq", "train_vq")}
    recipe.write_text(yaml.safe_dump({"threads": 1, **sections}))
    runner = CliRunner()
    out = runner.invoke(app, ["run", str(recipe), "--run", str(tmp_path / "run")])
    assert out.exit_code == 0, out.output
    assert read_metadata(tmp_path / "run" / "vq.safetensors").kind == "vq-model"
    assert not (tmp_path / "run" / "latents.safetensors").exists()  # encode is not one of its stages
    assert "ran (new)" in out.output and (tmp_path / "run" / "index.html").exists()

    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: {synthetic: shapes}\ndecode: {}\n")
    out = runner.invoke(app, ["run", str(bad), "--run", str(tmp_path / "bad")])
    assert out.exit_code == 2 and "unknown section(s) decode" in out.output
    assert runner.invoke(app, ["quickstart", "--help"]).exit_code == 0


def test_load_and_run_reads_the_quickstart_recipe(tmp_path):
    result = load_and_run(quickstart_recipe(), tmp_path / "run", TINY, PipelineOptions(dry_run=True))
    assert [r.status for r in result.stages] == ["would run"] * len(STAGES)
    assert result.index is None and not (tmp_path / "run").exists()


def _recipe() -> dict:
    from vqtool.config import load_recipe

    return load_recipe(quickstart_recipe())


def test_weights_appearing_later_rerun_only_eval_and_neighbours(quick, tmp_path, monkeypatch):
    from vqtool.eval import features, perceptual

    run = _copy(quick[0], tmp_path)
    monkeypatch.setattr(features, "feature_weights_present", lambda name, weights, layer: True)
    monkeypatch.setattr(perceptual, "lpips_weights_present", lambda net, weights: True)
    result = quickstart(run, TINY, PipelineOptions(**OPTIONS, dry_run=True))
    why = {r.stage: r.why for r in result.stages if r.status == "would run"}
    assert set(why) == {"eval", "neighbours"}
    assert "metrics" in why["eval"] and "fake" in why["eval"] and "distance" in why["neighbours"]
