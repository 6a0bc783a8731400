"""Absorbing-prior sampling: schedules, head-only-where-needed prediction, window aggregation, the
samples artifact, AR dispatch, int8 quantization and the `sample` command end to end."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from vqtool.errors import VqtoolError
from vqtool.prior.logits import Draw
from vqtool.prior.orders import RasterOrder
from vqtool.prior.sample import (
    SampleSettings,
    TransformerPredictor,
    default_labels,
    quantize_int8,
    sample_tokens,
    total_work,
)
from vqtool.prior.schedules import ConfidenceSchedule, RandomSchedule, make_schedule, n_steps, plan, reveal
from vqtool.prior.store import LoadedPrior
from vqtool.prior.transformer import Transformer, TransformerConfig
from vqtool.prior.windows import WindowPredictor, window_offsets
from vqtool.samples import load_samples, save_samples

V = 12  # codebook size of the tiny priors


def tiny_model(grid=(4, 4), n_classes=0, causal=False, seed=0, pos_emb="2d", scale=8.0) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=V, grid=grid, n_layer=2, n_head=2, n_embd=16, n_classes=n_classes,
                            causal=causal, pos_emb=pos_emb)
    model = Transformer(cfg).eval()
    # Larger weights than the init so that predictions differ clearly between positions and contexts.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def tiny_prior(**kw) -> LoadedPrior:
    kind = "autoregressive" if kw.get("causal") else "absorbing"
    return LoadedPrior(model=tiny_model(**kw), kind=kind, objective={}, artifact=None)


class Spy:
    """Wraps a predictor and records what every call saw."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, tokens, positions):
        self.calls.append((tokens.clone(), positions.clone()))
        return self.inner(tokens, positions)


def uniform_predict(tokens, positions):
    return torch.zeros(*positions.shape, V)


# --------------------------------------------------------------------------------------------------
# Prediction at a few positions


@pytest.mark.parametrize("n_classes", [0, 3])
def test_hidden_at_equals_full_trunk(n_classes):
    model = tiny_model(n_classes=n_classes)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V + 1, (3, 16), generator=g)
    labels = torch.tensor([0, 2, 1]) if n_classes else None
    off = 1 if n_classes else 0
    with torch.no_grad():
        full = model.trunk(tokens, labels)[:, off:]
        logits = model(tokens, labels)
        for k in (1, 3, 7, 12):  # partial last layer below N/2, full trunk above
            positions = torch.stack([torch.randperm(16, generator=g)[:k] for _ in range(3)])
            got = model.hidden_at(tokens, labels, positions)
            want = full.gather(1, positions.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            head = TransformerPredictor(model, labels)(tokens, positions)
            torch.testing.assert_close(head, logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, V)),
                                       atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("n_classes", [0, 3])
def test_predictor_in_chunks_and_on_alike_rows_equals_the_full_forward(n_classes):
    model = tiny_model(n_classes=n_classes)
    g = torch.Generator().manual_seed(2)
    B = 5
    labels = torch.tensor([0, 2, 1, -1, 2]) if n_classes else None
    mixed = torch.randint(0, V + 1, (B, 16), generator=g)
    alike = torch.randint(0, V + 1, (1, 16), generator=g).expand(B, -1).clone()
    same_label = torch.full((B,), 1) if n_classes else None
    for tokens, rows_labels in ((mixed, labels), (alike, labels), (alike, same_label), (torch.full((B, 16), V), None)):
        with torch.no_grad():
            logits = model(tokens, rows_labels)
        for k in (1, 3, 12):
            positions = torch.stack([torch.randperm(16, generator=g)[:k] for _ in range(B)])
            want = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, V))
            for chunk in (None, 1, 2, 5, 8):
                with torch.no_grad():
                    got = TransformerPredictor(model, rows_labels, chunk=chunk)(tokens, positions)
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("n_classes", [0, 3])
def test_predictor_kept_first_projections_follow_the_tokens(n_classes):
    """One predictor over a whole reverse process (a few tokens change per call, the kept first-block
    projections are updated there only), then over unrelated grids: always the full forward's logits."""
    model = tiny_model(n_classes=n_classes)
    g = torch.Generator().manual_seed(3)
    B = 4
    labels = torch.tensor([2, 0, -1, 1]) if n_classes else None
    predict = TransformerPredictor(model, labels, chunk=3)
    tokens = torch.full((B, 16), V)
    order = torch.stack([torch.randperm(16, generator=g) for _ in range(B)])
    states = []
    for step in range(4):
        positions = order[:, 4 * step:4 * step + 4]
        states.append((tokens.clone(), positions))
        tokens.scatter_(1, positions, torch.randint(0, V, (B, 4), generator=g))
    states += [(torch.randint(0, V + 1, (B, 16), generator=g), order[:, :2]) for _ in range(2)]
    for tokens, positions in states:
        with torch.no_grad():
            want = model(tokens, labels)
            got = predict(tokens, positions)
        torch.testing.assert_close(got, want.gather(1, positions.unsqueeze(-1).expand(-1, -1, V)),
                                   atol=1e-4, rtol=1e-5)


def test_alike_rows_run_as_one_row_and_different_labels_do_not():
    model = tiny_model(n_classes=3)
    seen = []
    hidden_at = model.hidden_at
    model.hidden_at = lambda tokens, labels, positions, *rest: seen.append(tokens.shape[0]) or hidden_at(
        tokens, labels, positions, *rest)
    tokens, positions = torch.full((4, 16), V), torch.arange(8).reshape(4, 2)
    with torch.no_grad():
        TransformerPredictor(model, torch.full((4,), 2))(tokens, positions)
        TransformerPredictor(model, torch.tensor([2, 2, 1, 2]))(tokens, positions)
        TransformerPredictor(model, torch.tensor([2, 2, 1, 2]), chunk=3)(tokens, positions)
    assert seen == [1, 4, 3, 1]


# --------------------------------------------------------------------------------------------------
# Schedules


def test_random_schedule_with_one_step_per_token_reveals_one_position_per_step():
    model = tiny_model()
    spy = Spy(TransformerPredictor(model))
    B, N = 3, 16
    start = torch.full((B, N), V, dtype=torch.long)
    out = reveal(spy, start, V, RandomSchedule(), N, Draw(), torch.Generator().manual_seed(0))
    assert len(spy.calls) == N
    seen = torch.zeros(B, N, dtype=torch.bool)
    previous = start
    for i, (tokens, positions) in enumerate(spy.calls):
        assert positions.shape == (B, 1)
        # The state before step i: i tokens revealed, earlier draws unchanged, the new position still masked.
        assert ((tokens != V).sum(1) == i).all()
        unchanged = previous != V
        assert torch.equal(tokens[unchanged], previous[unchanged])
        assert (tokens.gather(1, positions) == V).all()
        seen.scatter_(1, positions, True)
        previous = tokens
    assert seen.all()
    assert (out != V).all() and out.max() < V
    # Revealed tokens never change: the final grid agrees with every intermediate state where revealed.
    for tokens, _ in spy.calls:
        done = tokens != V
        assert torch.equal(out[done], tokens[done])


def test_raster_order_reveals_positions_in_raster_order():
    spy = Spy(uniform_predict)
    reveal(spy, torch.full((2, 16), V), V, RandomSchedule(RasterOrder()), 16, Draw(), torch.Generator().manual_seed(0))
    order = torch.cat([p for _, p in spy.calls], dim=1)
    assert torch.equal(order, torch.arange(16).expand(2, 16))
    spy = Spy(uniform_predict)
    reveal(spy, torch.full((2, 16), V), V, RandomSchedule(RasterOrder()), 4, Draw(), torch.Generator().manual_seed(0))
    assert [p.tolist()[0] for _, p in spy.calls] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


@pytest.mark.parametrize("schedule", [RandomSchedule(), RandomSchedule(RasterOrder()), ConfidenceSchedule(),
                                      ConfidenceSchedule("arccos")])
@pytest.mark.parametrize("steps", [1, 3, 7, 16, 40])
def test_every_schedule_leaves_no_mask(schedule, steps):
    model = tiny_model()
    spy = Spy(TransformerPredictor(model))
    out = reveal(spy, torch.full((2, 16), V), V, schedule, steps, Draw(0.8), torch.Generator().manual_seed(3))
    assert out.shape == (2, 16)
    assert (out != V).all() and (out >= 0).all() and (out < V).all()
    assert len(spy.calls) == min(steps, 16) == n_steps(schedule, 16, steps)
    counts = [int((t == V).sum(1)[0]) for t, _ in spy.calls]
    assert counts == schedule.masked_after(16, steps)[:-1]


def test_random_schedule_counts_are_even():
    assert RandomSchedule().masked_after(16, 4) == [16, 12, 8, 4, 0]
    assert RandomSchedule().masked_after(10, 3) == [10, 7, 4, 0]
    assert RandomSchedule().masked_after(5, 50) == [5, 4, 3, 2, 1, 0]  # more steps than tokens: one per step


def test_confidence_counts_follow_cosine():
    N, S = 64, 8
    want = [math.floor(N * math.cos(math.pi / 2 * i / S)) for i in range(S + 1)]
    assert want == [64, 62, 59, 53, 45, 35, 24, 12, 0]
    assert ConfidenceSchedule("cosine").masked_after(N, S) == want
    arccos = ConfidenceSchedule("arccos").masked_after(N, S)
    assert arccos == [math.floor(N * math.acos(i / S) / (math.pi / 2) + 1e-9) for i in range(S)] + [0]
    # Observed while sampling an 8×8 grid:
    spy = Spy(uniform_predict)
    reveal(spy, torch.full((2, N), V), V, ConfidenceSchedule(), S, Draw(), torch.Generator().manual_seed(0))
    assert [int((t == V).sum(1)[0]) for t, _ in spy.calls] == want[:-1]
    # Steps that would reveal nothing are clamped so every step reveals at least one token.
    counts = ConfidenceSchedule().masked_after(16, 16)
    assert counts[0] == 16 and counts[-1] == 0 and all(a > b for a, b in zip(counts[:-1], counts[1:], strict=True))


def test_confidence_keeps_the_most_confident_draws_without_noise():
    # Position j allows codes 0..j with equal odds, so any draw there has probability 1/(j+1): the most
    # confident positions are the lowest masked ones. At done=1 there is no Gumbel noise.
    def predict(tokens, positions):
        codes = torch.arange(V)
        return torch.where(codes <= positions.unsqueeze(-1), 0.0, float("-inf"))

    tokens = torch.full((1, 10), V)
    tokens[0, 1] = 3  # already revealed: must not be picked again
    masked = tokens == V
    ConfidenceSchedule().step(predict, tokens, masked, 3, 1.0, Draw(), torch.Generator().manual_seed(0))
    assert masked[0].tolist() == [False, False, False, False] + [True] * 6
    assert tokens[0, 0] == 0 and tokens[0, 1] == 3 and tokens[0, 2] <= 2 and tokens[0, 3] <= 3
    # With full noise the choice is random: over many draws, other positions get picked too.
    picked = torch.zeros(10)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        t = torch.full((1, 10), V)
        m = t == V
        ConfidenceSchedule().step(predict, t, m, 3, 0.0, Draw(), g)
        picked += (~m[0]).float()
    assert picked[5:].sum() > 0


def test_plan_continues_from_the_matching_step():
    s = RandomSchedule()
    assert plan(s, 16, 16, 16) == [(1, (i + 1) / 16) for i in range(16)]
    assert [c for c, _ in plan(s, 16, 16, 5)] == [1] * 5
    assert [c for c, _ in plan(s, 16, 4, 6)] == [2, 4]  # 6 masked: continue from the 8-left state
    assert plan(s, 16, 4, 0) == []
    assert [c for c, _ in plan(ConfidenceSchedule(), 64, 8, 30)] == [6, 12, 12]


def test_reveal_refuses_rows_with_different_mask_counts():
    tokens = torch.full((2, 4), V)
    tokens[0, 0] = 1
    with pytest.raises(ValueError, match="same number"):
        reveal(uniform_predict, tokens, V, RandomSchedule(), 4, Draw(), torch.Generator())


def test_make_schedule_refuses_unknown_names():
    with pytest.raises(VqtoolError, match="--schedule must be one of random, confidence"):
        make_schedule("linear")
    with pytest.raises(VqtoolError, match="--order must be one of random, raster, halton"):
        make_schedule("random", order="spiral")
    with pytest.raises(ValueError):
        ConfidenceSchedule("spiral")


# --------------------------------------------------------------------------------------------------
# Window aggregation


def test_window_offsets_cover_the_edges():
    assert window_offsets(8, 4, 1) == [0, 1, 2, 3, 4]
    assert window_offsets(8, 4, 3) == [0, 3, 4]
    assert window_offsets(8, 4, 8) == [0, 4]
    assert window_offsets(4, 4, 2) == [0]
    with pytest.raises(ValueError):
        window_offsets(3, 4, 1)


@pytest.mark.parametrize("schedule", ["random", "confidence"])
def test_window_aggregation_on_training_grid_equals_plain_sampling(schedule):
    model = tiny_model()
    plain = TransformerPredictor(model)
    windows = WindowPredictor(TransformerPredictor(model), (4, 4), (4, 4), stride=1)
    sched = make_schedule(schedule)
    start = torch.full((5, 16), V)
    a = reveal(plain, start, V, sched, 6, Draw(0.9), torch.Generator().manual_seed(11))
    b = reveal(windows, start, V, sched, 6, Draw(0.9), torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    assert windows.calls == 6


@pytest.mark.parametrize("stride", [1, 2, 5])
def test_window_mixture_matches_a_direct_computation(stride):
    model = tiny_model()
    base = TransformerPredictor(model)
    H, W, h, w = 6, 7, 4, 4
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V + 1, (2, H * W), generator=g)
    positions = torch.stack([torch.randperm(H * W, generator=g)[:9] for _ in range(2)])
    got = WindowPredictor(base, (H, W), (h, w), stride)(tokens, positions)
    # Direct: for each asked position, average the softmax of every window that covers it.
    rows, cols = window_offsets(H, h, stride), window_offsets(W, w, stride)
    grid = tokens.view(2, H, W)
    with torch.no_grad():
        full = {(i, j): model(grid[:, i:i + h, j:j + w].reshape(2, -1)).softmax(-1) for i in rows for j in cols}
    for b in range(2):
        for q, p in enumerate(positions[b].tolist()):
            r, c = divmod(p, W)
            probs = [full[(i, j)][b, (r - i) * w + (c - j)] for i in rows for j in cols
                     if i <= r < i + h and j <= c < j + w]
            assert probs, "every position must be covered"
            torch.testing.assert_close(got[b, q].softmax(-1), torch.stack(probs).mean(0), atol=1e-5, rtol=1e-4)


def test_larger_shape_sampling_has_the_asked_shape_and_no_mask():
    prior = tiny_prior()
    settings = SampleSettings(steps=5, shape=(6, 5), stride=2, batch_size=2, order="raster")
    tokens = sample_tokens(prior, 3, settings)
    assert tokens.shape == (3, 6, 5) and tokens.dtype == torch.long
    assert (tokens >= 0).all() and (tokens < V).all()


# --------------------------------------------------------------------------------------------------
# sample_tokens


def test_sample_tokens_is_seeded_and_batched():
    prior = tiny_prior()
    settings = SampleSettings(steps=4, batch_size=2, seed=7)
    a = sample_tokens(prior, 5, settings)
    b = sample_tokens(prior, 5, settings)
    c = sample_tokens(prior, 5, SampleSettings(steps=4, batch_size=2, seed=8))
    assert a.shape == (5, 4, 4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    calls = []
    sample_tokens(prior, 5, settings, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (12, 12) == (total_work(prior, 5, settings),) * 2  # 3 batches × 4 steps


def test_compiled_body_always_sees_one_batch_shape_and_samples_the_same_tokens(monkeypatch):
    """sample_tokens(compile=True) with a stand-in for torch.compile (real compilation takes a minute or more):
    every pass of every step, the padded last chunk and the one-row first step, sees the pass size."""
    import vqtool.prior.sample as sample

    monkeypatch.setattr(sample, "CPU_ROWS_PER_PASS", 32)  # 2 images of 4×4 tokens per pass
    shapes = []

    def fake_compile(fn, **options):
        assert options == {"dynamic": False, "options": {"freezing": True}}
        return lambda idx, labels, first: shapes.append(tuple(idx.shape)) or fn(idx, labels, first)

    monkeypatch.setattr(sample.torch, "compile", fake_compile)
    for kw, settings in (({}, SampleSettings(steps=4, batch_size=3, seed=1)),
                         ({"n_classes": 3}, SampleSettings(steps=3, batch_size=2, guidance=1.5, seed=2))):
        prior = tiny_prior(**kw)
        labels = torch.tensor([0, 2, 1, 1, 0]) if kw else None
        want = sample_tokens(prior, 5, settings, labels)
        shapes.clear()
        got = sample_tokens(prior, 5, settings, labels, compile=True)
        assert torch.equal(got, want)
        assert shapes and set(shapes) == {(2, 16)}  # token ids; the prefix is added inside
    with pytest.raises(VqtoolError, match="--compile applies to the absorbing prior"):
        sample_tokens(tiny_prior(causal=True), 2, SampleSettings(), compile=True)


def test_sample_tokens_with_explicit_training_shape_equals_default():
    prior = tiny_prior()
    a = sample_tokens(prior, 2, SampleSettings(steps=3))
    b = sample_tokens(prior, 2, SampleSettings(steps=3, shape=(4, 4), stride=3))
    assert torch.equal(a, b)


def test_class_conditional_labels():
    prior = tiny_prior(n_classes=3)
    assert default_labels(prior, 5).tolist() == [0, 1, 2, 0, 1]
    assert default_labels(prior, 2, 2).tolist() == [2, 2]
    with pytest.raises(VqtoolError, match="--class 3"):
        default_labels(prior, 2, 3)
    a = sample_tokens(prior, 4, SampleSettings(steps=4), labels=torch.tensor([0, 0, 0, 0]))
    b = sample_tokens(prior, 4, SampleSettings(steps=4), labels=torch.tensor([2, 2, 2, 2]))
    assert a.shape == b.shape == (4, 4, 4) and not torch.equal(a, b)
    with pytest.raises(VqtoolError, match="unconditional"):
        default_labels(tiny_prior(), 2, 1)


@pytest.mark.parametrize("settings, message", [
    (SampleSettings(shape=(3, 4)), "--shape"),
    (SampleSettings(steps=0), "--steps"),
    (SampleSettings(schedule="confidence", order="raster"), "--order"),
    (SampleSettings(schedule="cosine"), "--schedule"),
    (SampleSettings(temperature=0.0), "--temperature"),
    (SampleSettings(top_p=1.5), "--top-p"),
    (SampleSettings(stride=0), "--stride"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(VqtoolError, match=message):
        sample_tokens(tiny_prior(), 1, settings)


def test_autoregressive_prior_dispatches_to_sample_autoregressive():
    from vqtool.prior.autoregressive import sample_autoregressive

    prior = tiny_prior(causal=True)
    tokens = sample_tokens(prior, 3, SampleSettings(seed=4, temperature=0.9, batch_size=8))
    with torch.inference_mode():
        want = sample_autoregressive(prior.model, 3, None, Draw(0.9), None, torch.Generator().manual_seed(4))
    assert torch.equal(tokens, want.cpu())
    assert total_work(prior, 3, SampleSettings(batch_size=2)) == 2 * 16


def test_int8_quantization_stays_close_and_samples():
    model = tiny_model(scale=1.0)  # at the init scale; the 8× weights saturate attention and amplify rounding
    q = quantize_int8(model)
    tokens = torch.randint(0, V + 1, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        ref = TransformerPredictor(model)(tokens, positions)
        got = TransformerPredictor(q)(tokens, positions)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    assert isinstance(q.blocks[0].mlp[0], DynamicLinear) and isinstance(q.lm_head, DynamicLinear)
    assert not isinstance(model.blocks[0].mlp[0], DynamicLinear)  # the original is left alone
    prior = LoadedPrior(model=q, kind="absorbing", objective={}, artifact=None)
    out = sample_tokens(prior, 2, SampleSettings(steps=4))
    assert out.shape == (2, 4, 4) and (out < V).all()


# --------------------------------------------------------------------------------------------------
# The samples artifact


def test_samples_round_trip(tmp_path):
    tokens = torch.randint(0, 300, (5, 3, 4))
    labels = torch.tensor([0, 1, 2, 0, 1])
    sha = save_samples(tmp_path / "s.safetensors", tokens, labels, {"seed": 3, "steps": 9},
                       parents={"prior": "a" * 64, "vq": "b" * 64}, codebook_size=512)
    s = load_samples(tmp_path / "s.safetensors")
    assert torch.equal(s.tokens, tokens) and s.tokens.dtype == torch.long
    assert torch.equal(s.labels, labels)
    assert s.settings["seed"] == 3 and s.settings["n"] == 5 and s.settings["shape"] == [3, 4]
    assert s.artifact.parents == {"prior": "a" * 64, "vq": "b" * 64} and s.artifact.sha256 == sha
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert f.get_slice("tokens").get_dtype() == "I16"  # the smallest dtype for 512 codes
    save_samples(tmp_path / "u.safetensors", tokens, None, {}, parents={})
    assert load_samples(tmp_path / "u.safetensors").labels is None
    with pytest.raises(ValueError):
        save_samples(tmp_path / "bad.safetensors", tokens, labels[:2], {}, parents={})
    with pytest.raises(ValueError):
        save_samples(tmp_path / "bad.safetensors", tokens, None, {}, parents={}, codebook_size=10)


def test_load_samples_refuses_other_kinds(tmp_path):
    from vqtool.artifacts import save_artifact

    save_artifact(tmp_path / "x.safetensors", "latents", {"train.tokens": torch.zeros(1, 2, 2)})
    with pytest.raises(VqtoolError, match="expected 'samples'"):
        load_samples(tmp_path / "x.safetensors")


# --------------------------------------------------------------------------------------------------
# The command, end to end on a tiny random VQ and a tiny random prior


def write_tiny_run(run, kind="absorbing", n_classes=0, classes=None):
    """vq.safetensors (random tiny VQGAN: 16 px → 8×8 tokens) and prior.safetensors made from it."""
    import dataclasses

    from vqtool.prior.store import save_prior
    from vqtool.vq.model import VQConfig, VQModel
    from vqtool.vq.store import save_vq

    torch.manual_seed(0)
    vq_cfg = VQConfig(resolution=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=8,
                      codebook_size=V, code_dim=4)
    vq = VQModel(vq_cfg)
    vq_sha = save_vq(run / "vq.safetensors", vq_cfg, vq.state_dict(), vq.state_dict(), {}, parents={},
                     extra={"image_size": 16})
    model = tiny_model(grid=(8, 8), n_classes=n_classes, causal=kind == "autoregressive")
    save_prior(run / "prior.safetensors", kind, model.cfg, {}, model.state_dict(), model.state_dict(),
               parents={"latents": "0" * 64, "vq": vq_sha}, extra={"classes": classes or []})
    assert dataclasses.is_dataclass(model.cfg)
    return vq_sha


def test_sample_command_end_to_end(tmp_path):
    from vqtool.cli import app

    run = tmp_path / "run"
    vq_sha = write_tiny_run(run, n_classes=2, classes=["cat", "dog"])
    runner = CliRunner()
    args = ["sample", "--run", str(run), "--n", "3", "--steps", "5", "--batch-size", "2", "--device", "cpu",
            "--seed", "1", "--class", "dog", "--temperature", "0.9"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    out = run / "samples"
    assert sorted(p.name for p in out.glob("*.png")) == ["grid.png", "sample-0000.png", "sample-0001.png",
                                                         "sample-0002.png"]
    s = load_samples(out / "samples.safetensors")
    assert s.tokens.shape == (3, 8, 8) and s.labels.tolist() == [1, 1, 1]
    assert s.settings["seed"] == 1 and s.settings["steps"] == 5 and s.settings["temperature"] == 0.9
    from vqtool.artifacts import file_sha256

    assert s.artifact.parents == {"prior": file_sha256(run / "prior.safetensors"), "vq": vq_sha}
    from PIL import Image

    assert Image.open(out / "sample-0000.png").size == (16, 16)
    assert "images/s" in r.output

    # Refuses to overwrite, then overwrites; same seed → same tokens.
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--overwrite" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, [*args, "--overwrite", "--n", "2", "--out", str(tmp_path / "other")])
    assert r.exit_code == 0, r.output
    assert torch.equal(load_samples(tmp_path / "other" / "samples.safetensors").tokens, s.tokens[:2])

    # Larger-than-training shape through window aggregation, and int8.
    r = runner.invoke(app, ["sample", "--run", str(run), "--n", "1", "--steps", "4", "--shape", "10", "12",
                            "--stride", "4", "--device", "cpu", "--quantize", "int8", "--out", str(tmp_path / "big")])
    assert r.exit_code == 0, r.output
    assert load_samples(tmp_path / "big" / "samples.safetensors").tokens.shape == (1, 10, 12)
    assert Image.open(tmp_path / "big" / "sample-0000.png").size == (24, 20)


def test_sample_command_refuses_a_foreign_vq(tmp_path):
    from vqtool.cli import app

    run = tmp_path / "run"
    write_tiny_run(run)
    other = tmp_path / "other"
    write_tiny_run(other)
    # A VQ with different weights: same shapes, different file.
    from vqtool.vq.model import VQConfig, VQModel
    from vqtool.vq.store import save_vq

    torch.manual_seed(99)
    cfg = VQConfig(resolution=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=8,
                   codebook_size=V, code_dim=4)
    m = VQModel(cfg)
    save_vq(other / "vq.safetensors", cfg, m.state_dict(), m.state_dict(), {}, parents={})
    r = CliRunner().invoke(app, ["sample", "--run", str(run), "--vq", str(other / "vq.safetensors"), "--n", "1",
                                 "--device", "cpu"])
    assert r.exit_code == 2
    assert "different vq" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["sample", "--run", str(tmp_path / "nothing"), "--device", "cpu"])
    assert r.exit_code == 2 and "train-prior" in r.output
    r = CliRunner().invoke(app, ["sample", "--run", str(run), "--class", "1", "--device", "cpu"])
    assert r.exit_code == 2 and "unconditional" in r.output


def test_sample_command_autoregressive_prior(tmp_path):
    from vqtool.cli import app

    run = tmp_path / "run"
    write_tiny_run(run, kind="autoregressive")
    r = CliRunner().invoke(app, ["sample", "--run", str(run), "--n", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    s = load_samples(run / "samples" / "samples.safetensors")
    assert s.tokens.shape == (2, 8, 8) and s.settings["prior_kind"] == "autoregressive"
