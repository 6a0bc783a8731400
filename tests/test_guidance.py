"""Classifier-free guidance: the mixed logits, both priors, the schedules, cond_drop in training, the CLI."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from PIL import Image
from test_samplers import RECORDED, hexes
from test_sampling import V, tiny_model, tiny_prior, write_tiny_run
from test_train_prior import make_latents, records, run_paths, small, strip_time
from typer.testing import CliRunner

from vqtool.artifacts import file_sha256, load_artifact, read_metadata, save_artifact
from vqtool.cli import app
from vqtool.errors import VqtoolError
from vqtool.prior.autoregressive import sample_autoregressive
from vqtool.prior.guidance import Guidance, GuidedPredictor
from vqtool.prior.logits import Draw
from vqtool.prior.sample import (
    SampleSettings,
    TransformerPredictor,
    default_labels,
    make_predictor,
    make_sampler,
    resolve_class,
    sample_tokens,
)
from vqtool.prior.schedules import make_schedule, reveal
from vqtool.prior.train import PriorTrainTask, check_config, drop_labels, train_prior
from vqtool.prior.windows import WindowPredictor
from vqtool.samples import load_samples

LABELS = torch.tensor([0, 2, 1])
NONE = torch.full((3,), -1)


def masked_tokens(n: int, n_tokens: int, seed: int = 1) -> torch.Tensor:
    """Random grids with about half the positions MASK."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (n, n_tokens), generator=g)
    return tokens.masked_fill(torch.rand(n, n_tokens, generator=g) < 0.5, V)


def some_positions(n: int, n_tokens: int, k: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n_tokens, generator=g)[:k] for _ in range(n)])


# --------------------------------------------------------------------------------------------------
# Guidance 0 is the unguided sampler


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_zero_guidance_draws_the_tokens_recorded_before_guidance_existed(case):
    prior_kw, settings, n, _, want = RECORDED[case]
    settings = SampleSettings(**settings, guidance=0.0, guidance_schedule="linear")
    assert make_sampler(settings, tiny_prior(**prior_kw)).guidance is None
    assert hexes(sample_tokens(tiny_prior(**prior_kw), n, settings)) == want


def test_sample_tokens_with_guidance_runs_the_guided_predictor():
    prior = tiny_prior(n_classes=3)
    settings = SampleSettings(steps=5, guidance=2.0, seed=3)
    got = sample_tokens(prior, 3, settings, LABELS)
    guided = GuidedPredictor(TransformerPredictor(prior.model, torch.cat([LABELS, NONE])), Guidance(2.0))
    with torch.inference_mode():
        want = reveal(guided, torch.full((3, 16), V), V, make_schedule("random"), 5, Draw(),
                      torch.Generator().manual_seed(3))
    assert torch.equal(got.reshape(3, -1), want)
    assert not torch.equal(got, sample_tokens(prior, 3, SampleSettings(steps=5, seed=3), LABELS))


# --------------------------------------------------------------------------------------------------
# The guided logits are uncond + (1 + S)(cond − uncond) of two separate forwards


@pytest.mark.parametrize("k", [3, 12])  # partial last layer, full trunk
def test_guided_logits_of_the_absorbing_prior_equal_two_separate_forwards(k):
    model = tiny_model(n_classes=3)
    tokens, positions = masked_tokens(3, 16), some_positions(3, 16, k)
    with torch.no_grad():
        got = make_predictor(model, LABELS, (4, 4), guidance=Guidance(1.5))(tokens, positions)
        cond = TransformerPredictor(model, LABELS)(tokens, positions)
        uncond = TransformerPredictor(model, NONE)(tokens, positions)
    torch.testing.assert_close(got, uncond + 2.5 * (cond - uncond), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, cond, atol=1e-2)


@pytest.mark.parametrize("stride", [1, 3])
def test_guided_window_mixture_equals_two_separate_window_mixtures(stride):
    model = tiny_model(n_classes=3)
    shape = (6, 5)
    tokens, positions = masked_tokens(3, 30), some_positions(3, 30, 9)
    with torch.no_grad():
        got = make_predictor(model, LABELS, shape, stride, Guidance(2.0))(tokens, positions)
        cond = WindowPredictor(TransformerPredictor(model, LABELS), shape, (4, 4), stride)(tokens, positions)
        uncond = WindowPredictor(TransformerPredictor(model, NONE), shape, (4, 4), stride)(tokens, positions)
    torch.testing.assert_close(got, uncond + 3.0 * (cond - uncond), atol=1e-4, rtol=1e-4)


class RecordingDraw:
    """A Draw that keeps the logits of every autoregressive draw."""

    def __init__(self):
        self.draw = Draw()
        self.seen: list[torch.Tensor] = []

    def ids(self, logits, generator):
        self.seen.append(logits.clone())
        return self.draw.ids(logits, generator)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_guided_autoregressive_logits_equal_two_separate_forwards_with_and_without_cache(schedule):
    model = tiny_model(n_classes=3, causal=True)
    guidance = Guidance(1.5, schedule)
    drawn = {}
    for use_cache in (True, False):
        draw = RecordingDraw()
        tokens = sample_autoregressive(model, 3, None, draw, LABELS, torch.Generator().manual_seed(5),
                                       use_cache=use_cache, guidance=guidance)
        drawn[use_cache] = tokens
        with torch.no_grad():
            flat = tokens.reshape(3, -1)
            cond, uncond = model(flat, LABELS), model(flat, NONE)  # logits at i predict token i
        for i, seen in enumerate(draw.seen):
            scale = guidance.at(i, 16)
            torch.testing.assert_close(seen, uncond[:, i] + (1 + scale) * (cond[:, i] - uncond[:, i]),
                                       atol=1e-4, rtol=1e-4)
        assert len(draw.seen) == 16
    assert torch.equal(drawn[True], drawn[False])


def test_guided_autoregressive_sampling_is_the_same_with_and_without_cache_on_a_wide_grid():
    prior = tiny_prior(n_classes=3, causal=True)
    settings = dict(shape=(5, 6), guidance=2.0, guidance_schedule="linear", seed=8, batch_size=2)
    cached = sample_tokens(prior, 3, SampleSettings(**settings), LABELS)
    recomputed = sample_tokens(prior, 3, SampleSettings(**settings, use_cache=False), LABELS)
    assert cached.shape == (3, 5, 6) and torch.equal(cached, recomputed)


# --------------------------------------------------------------------------------------------------
# Schedules of the scale


def test_guidance_schedule_values():
    assert [Guidance(2.0).at(i, 5) for i in range(5)] == [2.0] * 5
    assert [Guidance(2.0, "linear").at(i, 5) for i in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert Guidance(2.0, "linear").at(0, 1) == 2.0  # a single step is the last one


class ScaleSpy(GuidedPredictor):
    def __init__(self, *args):
        super().__init__(*args)
        self.scales: list[float] = []

    def __call__(self, tokens, positions):
        self.scales.append(self.scale)
        return super().__call__(tokens, positions)


@pytest.mark.parametrize("schedule", ["random", "confidence"])
def test_reveal_tells_the_guided_predictor_its_step_of_the_whole_schedule(schedule):
    model = tiny_model(n_classes=3)
    spy = ScaleSpy(TransformerPredictor(model, torch.cat([LABELS, NONE])), Guidance(3.0, "linear"))
    with torch.no_grad():
        reveal(spy, torch.full((3, 16), V), V, make_schedule(schedule), 4, Draw(), torch.Generator().manual_seed(0))
    assert spy.scales == [0.0, 1.0, 2.0, 3.0]
    # Inpainting half the grid continues the random schedule's 16 → 12 → 8 → 4 → 0 from its third step.
    spy.scales.clear()
    start = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(1))
    start[:, :8] = V
    with torch.no_grad():
        reveal(spy, start, V, make_schedule("random"), 4, Draw(), torch.Generator().manual_seed(0))
    assert spy.scales == [2.0, 3.0]


# --------------------------------------------------------------------------------------------------
# Refusals


def test_guidance_refusals():
    with pytest.raises(VqtoolError, match="--guidance must be 0 or more"):
        sample_tokens(tiny_prior(n_classes=3), 1, SampleSettings(guidance=-1.0))
    with pytest.raises(VqtoolError, match="--guidance-schedule must be one of constant, linear"):
        make_sampler(SampleSettings(guidance_schedule="cosine"), tiny_prior(n_classes=3))
    with pytest.raises(VqtoolError, match="unconditional"):
        sample_tokens(tiny_prior(), 1, SampleSettings(guidance=1.0))
    with pytest.raises(VqtoolError, match="--class none with --guidance"):
        sample_tokens(tiny_prior(n_classes=3), 3, SampleSettings(guidance=1.0), NONE)
    with pytest.raises(VqtoolError, match="--class none with --guidance"):
        sample_tokens(tiny_prior(n_classes=3, causal=True), 3, SampleSettings(guidance=1.0), NONE)


def test_class_none_samples_the_unconditional_branch():
    prior = tiny_prior(n_classes=3)
    assert resolve_class(prior, "none") == -1
    assert default_labels(prior, 3, -1).tolist() == [-1, -1, -1]
    assert default_labels(tiny_prior(), 3, -1) is None  # an unconditional prior is unconditional already
    with torch.inference_mode():
        want = reveal(TransformerPredictor(prior.model, None), torch.full((3, 16), V), V, make_schedule("random"), 4,
                      Draw(), torch.Generator().manual_seed(2))
    got = sample_tokens(prior, 3, SampleSettings(steps=4, seed=2), NONE)
    assert torch.equal(got.reshape(3, -1), want)  # NO_CLASS is prefix row 0, as no labels at all


def test_guidance_warns_about_a_prior_trained_without_cond_drop(capsys):
    sample_tokens(tiny_prior(n_classes=3), 3, SampleSettings(steps=2, guidance=1.0), LABELS)
    assert "trained without cond_drop" in capsys.readouterr().err
    sample_tokens(tiny_prior(n_classes=3), 3, SampleSettings(steps=2), LABELS)
    assert "cond_drop" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# cond_drop in training


def test_drop_labels_fraction_and_splits():
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = drop_labels(labels, 0.1, seed=7, part=(0, 20000))
    assert set(dropped.unique().tolist()) == {-1, 0}
    assert 0.09 < float((dropped == -1).double().mean()) < 0.11
    assert torch.equal(drop_labels(labels, 0.0, seed=7, part=(0, 20000)), labels)
    # Rows first.. of the global batch get the same draw whatever the split (processes, micro-batches).
    parts = [drop_labels(labels[i:i + 5000], 0.1, seed=7, part=(i, 20000)) for i in range(0, 20000, 5000)]
    assert torch.equal(torch.cat(parts), dropped)
    assert not torch.equal(drop_labels(labels, 0.1, seed=8, part=(0, 20000)), dropped)


def test_cond_drop_refusals():
    for p in (-0.1, 1.0):
        with pytest.raises(VqtoolError, match="cond_drop must lie in"):
            check_config(small(cond_drop=p, max_steps=1))


def test_training_sees_dropped_labels_and_records_cond_drop(tmp_path, monkeypatch):
    latents = make_latents(tmp_path / "latents.safetensors")
    seen = []
    loss = PriorTrainTask.train_step

    def spy(self):
        inner = self.objective.loss
        if not getattr(inner, "spied", False):
            def recording(model, tokens, labels, *args, **kw):
                seen.append(labels.clone())
                return inner(model, tokens, labels, *args, **kw)
            recording.spied = True
            self.objective.loss = recording
        return loss(self)

    monkeypatch.setattr(PriorTrainTask, "train_step", spy)
    for p in (0.5, 0.0):
        seen.clear()
        paths = run_paths(tmp_path / str(p))
        train_prior(latents, small(max_steps=4, cond_drop=p), **paths)
        labels = torch.cat(seen)
        assert labels.numel() == 32
        if p:
            assert 0 < int((labels == -1).sum()) < 32 and int(labels.max()) == 2
        else:
            assert int(labels.min()) >= 0
        assert read_metadata(paths["out"]).extra["train"]["cond_drop"] == p


def test_resume_after_an_interrupted_run_is_exact_with_cond_drop(tmp_path, monkeypatch):
    latents = make_latents(tmp_path / "latents.safetensors")
    cfg = dict(cond_drop=0.3, dropout=0.1, max_steps=6)
    a = run_paths(tmp_path / "a")
    train_prior(latents, small(**cfg), **a)

    step = PriorTrainTask.train_step

    def interrupted_at_4(self):
        out = step(self)
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    b = run_paths(tmp_path / "b")
    with monkeypatch.context() as m:
        m.setattr(PriorTrainTask, "train_step", interrupted_at_4)
        rb = train_prior(latents, small(**cfg), **b)
    assert (rb.steps, rb.reason) == (4, "interrupted")
    with pytest.raises(VqtoolError, match="cond_drop"):
        train_prior(latents, small(**{**cfg, "cond_drop": 0.0}), **b, resume=True)
    rb = train_prior(latents, small(**cfg), **b, resume=True)
    assert rb.steps == 6
    assert strip_time(records(a["log"], "train")) == strip_time(records(b["log"], "train"))
    ca, cb = load_artifact(a["checkpoint"]), load_artifact(b["checkpoint"])
    assert ca.tensors.keys() == cb.tensors.keys()
    assert all(torch.equal(ca.tensors[k], cb.tensors[k]) for k in ca.tensors)
    # And cond_drop is part of what was trained: without it the weights differ.
    c = run_paths(tmp_path / "c")
    train_prior(latents, small(**{**cfg, "cond_drop": 0.0}), **c)
    pa, pc = load_artifact(a["out"]), load_artifact(c["out"])
    assert not all(torch.equal(pa.tensors[k], pc.tensors[k]) for k in pa.tensors)


# --------------------------------------------------------------------------------------------------
# The commands


def test_sample_command_with_guidance_records_it(tmp_path):
    run = tmp_path / "run"
    write_tiny_run(run, n_classes=2, classes=["cat", "dog"])
    runner = CliRunner()
    base = ["sample", "--run", str(run), "--n", "3", "--steps", "4", "--batch-size", "2", "--device", "cpu"]

    r = runner.invoke(app, [*base, "--guidance", "2", "--class", "none"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "--class none" in r.output, r.output
    r = runner.invoke(app, [*base, "--guidance", "1", "--guidance-schedule", "cosine"])
    assert r.exit_code == 2 and "--guidance-schedule" in r.output, r.output

    r = runner.invoke(app, [*base, "--guidance", "1.5", "--guidance-schedule", "linear", "--class", "dog"])
    assert r.exit_code == 0, r.output
    assert "guidance 1.5 (linear)" in r.output and "trained without cond_drop" in r.output
    s = load_samples(run / "samples" / "samples.safetensors")
    assert (s.settings["guidance"], s.settings["guidance_schedule"], s.settings["class"]) == (1.5, "linear", 1)
    assert s.labels.tolist() == [1, 1, 1]

    r = runner.invoke(app, [*base, "--class", "none", "--overwrite", "--out", str(tmp_path / "none")])
    assert r.exit_code == 0, r.output
    s = load_samples(tmp_path / "none" / "samples.safetensors")
    assert s.labels.tolist() == [-1, -1, -1] and s.settings["class"] == "none" and s.settings["guidance"] == 0


def test_sample_command_guides_a_prior_trained_with_cond_drop(tmp_path):
    from vqtool.latents import Latents, Split, save_latents

    run = tmp_path / "run"
    vq_sha = write_tiny_run(run, n_classes=2)  # its VQ turns 16 px images into 8×8 grids of V codes
    g = torch.Generator().manual_seed(0)
    splits = {name: Split(torch.randint(0, V, (n, 8, 8), generator=g), torch.arange(n) % 2)
              for name, n in (("train", 16), ("val", 8))}
    save_latents(run / "latents.safetensors", Latents(splits=splits, codebook_size=V, latent_shape=(8, 8),
                                                      image_size=16, classes=["a", "b"]), parents={"vq": vq_sha})
    train_prior(run / "latents.safetensors", small(max_steps=2, eval_every=2, checkpoint_every=2),
                out=run / "prior.safetensors", checkpoint=run / "ck.safetensors", log=run / "log.jsonl",
                overwrite=True)
    assert read_metadata(run / "prior.safetensors").extra["train"]["cond_drop"] == 0.1  # the default
    r = CliRunner().invoke(app, ["sample", "--run", str(run), "--n", "2", "--steps", "3", "--device", "cpu",
                                 "--guidance", "1.5", "--guidance-schedule", "linear", "--class", "b"])
    assert r.exit_code == 0, r.output
    assert "cond_drop" not in r.output and "guidance 1.5 (linear)" in r.output
    s = load_samples(run / "samples" / "samples.safetensors")
    assert (s.settings["guidance"], s.settings["guidance_schedule"], s.settings["class"]) == (1.5, "linear", 1)


def test_sample_command_guides_an_autoregressive_prior_recorded_with_cond_drop(tmp_path):
    from vqtool.prior.store import save_prior

    run = tmp_path / "run"
    vq_sha = write_tiny_run(run, kind="autoregressive", n_classes=2)
    model = tiny_model(grid=(8, 8), n_classes=2, causal=True)
    save_prior(run / "prior.safetensors", "autoregressive", model.cfg, {}, model.state_dict(), model.state_dict(),
               parents={"latents": "0" * 64, "vq": vq_sha}, extra={"classes": [], "train": {"cond_drop": 0.1}})
    r = CliRunner().invoke(app, ["sample", "--run", str(run), "--n", "2", "--device", "cpu", "--guidance", "3"])
    assert r.exit_code == 0, r.output
    assert "cond_drop" not in r.output and "guidance 3 (constant)" in r.output
    assert load_samples(run / "samples" / "samples.safetensors").settings["guidance"] == 3.0


def test_inpaint_with_guidance_records_it(tmp_path):
    from vqtool.prior.inpaint import inpaint_image

    run = tmp_path / "run"
    write_tiny_run(run, n_classes=2)
    image = tmp_path / "image.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(image)
    settings = SampleSettings(steps=4, guidance=2.0, guidance_schedule="linear", batch_size=2)
    r = inpaint_image(run / "prior.safetensors", run / "vq.safetensors", image, tmp_path / "out", 2, settings,
                      box=(0, 0, 8, 8), class_id=1, device="cpu")
    config = read_metadata(r.artifact).config
    assert (config["guidance"], config["guidance_schedule"], config["class"]) == (2.0, "linear", 1)
    with pytest.raises(VqtoolError, match="--class none with --guidance"):
        inpaint_image(run / "prior.safetensors", run / "vq.safetensors", image, tmp_path / "out2", 2, settings,
                      box=(0, 0, 8, 8), class_id="none", device="cpu")


@pytest.mark.parametrize("command, stage", [("eval", "evaluate"), ("neighbours", "neighbour_check")])
def test_eval_and_neighbours_sample_with_the_guidance_options(tmp_path, monkeypatch, command, stage):
    import vqtool.eval.stage

    seen = {}

    def capture(run, settings, sample, **kw):
        seen["sample"] = sample
        raise VqtoolError("captured")

    monkeypatch.setattr(vqtool.eval.stage, stage, capture)
    r = CliRunner().invoke(app, [command, "--run", str(tmp_path), "--guidance", "2.5", "--guidance-schedule", "linear"])
    assert "captured" in r.output, r.output
    assert (seen["sample"].guidance, seen["sample"].guidance_schedule) == (2.5, "linear")


def test_pipeline_records_guidance_and_reruns_sample_when_it_changes(tmp_path):
    from vqtool.pipeline.freshness import decide
    from vqtool.pipeline.plan_chain import plan_sample
    from vqtool.pipeline.step import Context
    from vqtool.runs import RunPaths

    def step(**sample):
        ctx = Context(paths=RunPaths.of(tmp_path), recipe={"sample": sample}, stages=["sample"], seed=0,
                      device="cpu", threads=1)
        return plan_sample(ctx)

    old, new = step(), step(guidance=1.5, guidance_schedule="linear")
    assert (old.settings["guidance"], new.settings["guidance"], new.settings["guidance_schedule"]) == (
        0.0, 1.5, "linear")
    save_artifact(old.output, "samples", {"tokens": torch.zeros(1, 1, 1, dtype=torch.uint8)}, config={}, parents={})
    entry = {"output": file_sha256(old.output), "status": "done", "settings": old.settings, "inputs": {}}
    assert decide(old, entry, {}, overwrite=False)[0] == "skip"
    action, why = decide(new, entry, {}, overwrite=False)
    assert action == "run" and "guidance" in why and "guidance_schedule" in why
