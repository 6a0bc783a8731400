"""The autoregressive prior: objective, exact likelihood, KV-cache and sliding-window sampling, filtering."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vqtool.errors import VqtoolError
from vqtool.prior.autoregressive import AutoregressiveObjective, sample_autoregressive, window_start
from vqtool.prior.logits import Draw, filter_logits, sample_from_logits
from vqtool.prior.objectives import make_objective
from vqtool.prior.transformer import Transformer, TransformerConfig


def tiny(vocab: int = 5, grid: tuple[int, int] = (3, 4), n_classes: int = 0, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=vocab, grid=grid, n_layer=2, n_head=2, n_embd=16, causal=True,
                            n_classes=n_classes, **kw)
    model = Transformer(cfg).eval()
    # Larger weights than the 0.02 init, so the predictions are far from uniform and depend on context.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20.0 if p.dim() > 1 else 1.0)
    return model


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Reference samplers written the slow, obvious way


def reference_plain(model, n, labels, generator, temperature=1.0, top_k=None, top_p=None):
    """Full forward over the whole (partly unsampled) sequence for every token: causal attention
    means the logits at i only see tokens < i."""
    h, w = model.cfg.grid
    tokens = torch.zeros(n, h * w, dtype=torch.long)
    with torch.no_grad():
        for i in range(h * w):
            logits = model(tokens, labels)[:, i]
            tokens[:, i] = sample_from_logits(logits, generator, temperature, top_k, top_p)
    return tokens.view(n, h, w)


def reference_taming(model, n, H, W, generator):
    """Taming Transformers' sliding-window sampler, transcribed for an even training grid (h, w)."""
    h, w = model.cfg.grid
    idx = torch.zeros(n, H, W, dtype=torch.long)
    with torch.no_grad():
        for i in range(H):
            if i <= h // 2:
                local_i = i
            elif H - i < h // 2:
                local_i = h - (H - i)
            else:
                local_i = h // 2
            for j in range(W):
                if j <= w // 2:
                    local_j = j
                elif W - j < w // 2:
                    local_j = w - (W - j)
                else:
                    local_j = w // 2
                patch = idx[:, i - local_i:i - local_i + h, j - local_j:j - local_j + w].reshape(n, -1)
                logits = model(patch).view(n, h, w, -1)[:, local_i, local_j]
                idx[:, i, j] = sample_from_logits(logits, generator)
    return idx


# --------------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.7, top_k=3), dict(temperature=1.3, top_p=0.8)])
def test_cache_and_recompute_give_identical_tokens_and_match_reference(settings):
    model = tiny(n_classes=3)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    kw = dict(temperature=1.0, top_k=None, top_p=None) | settings
    draw = Draw(**kw)
    cached = sample_autoregressive(model, 6, None, draw, labels=labels, generator=gen(5), use_cache=True)
    recomputed = sample_autoregressive(model, 6, None, draw, labels=labels, generator=gen(5), use_cache=False)
    reference = reference_plain(model, 6, labels, gen(5), **kw)
    assert cached.shape == (6, 3, 4) and cached.dtype == torch.long
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, reference)
    assert int(cached.min()) >= 0 and int(cached.max()) < 5
    # A different seed gives different samples: the generator is really used.
    assert not torch.equal(cached, sample_autoregressive(model, 6, None, draw, labels=labels, generator=gen(6)))


def test_labels_condition_the_samples():
    model = tiny(n_classes=3)
    a = sample_autoregressive(model, 8, None, Draw(), torch.zeros(8, dtype=torch.long), gen(1))
    b = sample_autoregressive(model, 8, None, Draw(), torch.full((8,), 2), gen(1))
    assert not torch.equal(a, b)


def test_top_k_one_is_greedy_decoding():
    model = tiny()
    tokens = sample_autoregressive(model, 3, None, Draw(top_k=1), None, gen(0)).view(3, -1)
    with torch.no_grad():
        logits = model(tokens)
    assert torch.equal(logits.argmax(-1), tokens)


def test_sliding_window_on_training_grid_equals_plain_sampling():
    model = tiny(grid=(4, 4))
    for use_cache in (True, False):
        windowed = sample_autoregressive(model, 4, (4, 4), Draw(), None, gen(3), use_cache=use_cache)
        assert torch.equal(windowed, reference_plain(model, 4, None, gen(3)))


@pytest.mark.parametrize("shape", [(7, 9), (4, 10), (9, 4), (6, 5)])
def test_sliding_window_on_larger_grids_matches_taming(shape):
    model = tiny(grid=(4, 4))
    cached = sample_autoregressive(model, 3, shape, Draw(), None, gen(2), use_cache=True)
    recomputed = sample_autoregressive(model, 3, shape, Draw(), None, gen(2), use_cache=False)
    assert cached.shape == (3, *shape)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, reference_taming(model, 3, *shape, gen(2)))


def test_shorter_grid_is_the_top_rows_of_a_full_sample():
    model = tiny(grid=(4, 4))
    # Fewer rows consume fewer random draws, so compare greedy samples.
    full = sample_autoregressive(model, 3, None, Draw(top_k=1), None, gen(4))
    short = sample_autoregressive(model, 3, (2, 4), Draw(top_k=1), None, gen(4))
    assert short.shape == (3, 2, 4)
    assert torch.equal(short, full[:, :2])


def test_window_start_centres_and_clamps():
    assert [window_start(i, 10, 4) for i in range(10)] == [0, 0, 0, 1, 2, 3, 4, 5, 6, 6]
    assert [window_start(i, 7, 3) for i in range(7)] == [0, 0, 1, 2, 3, 4, 4]
    assert [window_start(i, 4, 4) for i in range(4)] == [0, 0, 0, 0]


def test_on_token_counts_positions_and_training_mode_is_restored():
    model = tiny()
    model.train()
    calls = []
    sample_autoregressive(model, 2, (5, 6), Draw(), None, gen(0), on_token=lambda: calls.append(1))
    assert len(calls) == 30
    assert model.training


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shape=(3, 3)), "columns"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=0), "top-k"),
        (dict(top_p=1.5), "top-p"),
        (dict(labels=torch.zeros(2, dtype=torch.long)), "unconditional"),
        (dict(n=0), "at least 1"),
    ],
)
def test_bad_requests_are_refused_in_one_line(kwargs, message):
    model = tiny()
    drawing = {k: kwargs.pop(k) for k in ("temperature", "top_k", "top_p") if k in kwargs}
    with pytest.raises(VqtoolError, match=message) as info:
        # A Draw checks its own three settings when it is made.
        args = dict(model=model, n=2, shape=None, draw=Draw(**drawing), labels=None, generator=gen(0)) | kwargs
        sample_autoregressive(**args)
    assert "\n" not in str(info.value)


def test_bidirectional_and_label_mismatches_are_refused():
    torch.manual_seed(0)
    bidirectional = Transformer(TransformerConfig(vocab_size=5, grid=(3, 4), n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(VqtoolError, match="not autoregressive"):
        sample_autoregressive(bidirectional, 2, None, Draw(), None, gen(0))
    conditional = tiny(n_classes=3)
    with pytest.raises(VqtoolError, match="labels"):
        sample_autoregressive(conditional, 2, None, Draw(), torch.tensor([0, 3]), gen(0))
    with pytest.raises(VqtoolError, match="labels"):
        sample_autoregressive(conditional, 2, None, Draw(), torch.tensor([0]), gen(0))


# --------------------------------------------------------------------------------------------------
# The transformer's incremental decoding, as the sampler uses it


def test_decode_step_logits_match_the_full_forward():
    model = tiny(n_classes=3)
    tokens = torch.randint(0, 5, (4, 12), generator=gen(1))
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        full = model(tokens, labels)  # (4, 12, 5): position i predicts token i
        positions = model.position_table()
        prefix = model.prefix_embedding(labels, 4, torch.device("cpu"))
        # One position at a time from the start token.
        cache = model.new_cache(4)
        steps = [model.decode_step(prefix, cache)]
        for t in range(11):
            steps.append(model.decode_step(model.tok_emb(tokens[:, t:t + 1]) + positions[t], cache))
        torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)
        # A first chunk (start token + 5 tokens), then one at a time.
        cache = model.new_cache(4)
        x = torch.cat([prefix, model.tok_emb(tokens[:, :5]) + positions[:5]], 1)
        torch.testing.assert_close(model.decode_step(x, cache), full[:, 5], rtol=1e-5, atol=1e-5)
        for t in range(5, 11):
            logits = model.decode_step(model.tok_emb(tokens[:, t:t + 1]) + positions[t], cache)
            torch.testing.assert_close(logits, full[:, t + 1], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Logit filtering


PROBS = torch.tensor([0.1, 0.5, 0.15, 0.25])


def kept(logits: torch.Tensor, **kw) -> list[int]:
    return torch.isfinite(filter_logits(logits, **kw)).nonzero().flatten().tolist()


def test_top_k_keeps_exactly_the_k_most_likely():
    logits = PROBS.log()
    assert kept(logits, top_k=1) == [1]
    assert kept(logits, top_k=2) == [1, 3]
    assert kept(logits, top_k=3) == [1, 2, 3]
    assert kept(logits, top_k=4) == [0, 1, 2, 3]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = PROBS.log()  # sorted: 0.5 (1), 0.25 (3), 0.15 (2), 0.1 (0); mass before each: 0, .5, .75, .9
    assert kept(logits, top_p=0.3) == [1]
    assert kept(logits, top_p=0.6) == [1, 3]
    assert kept(logits, top_p=0.8) == [1, 2, 3]
    assert kept(logits, top_p=0.95) == [0, 1, 2, 3]


def test_top_p_applies_after_top_k_and_temperature():
    logits = PROBS.log()
    # top-k 2 renormalises to (2/3, 1/3): mass before the second is 2/3 ≥ 0.6.
    assert kept(logits, top_k=2, top_p=0.6) == [1]
    # Temperature 2 flattens to ∝ sqrt(p) = (.165, .370, .203, .262): mass before token 2 is .632.
    assert kept(logits, top_p=0.65) == [1, 3]
    assert kept(logits, temperature=2.0, top_p=0.65) == [1, 2, 3]
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)


def test_filtering_works_row_by_row_and_sampling_respects_it():
    logits = torch.stack([PROBS.log(), PROBS.flip(0).log()])
    mask = torch.isfinite(filter_logits(logits, top_k=2))
    assert mask.tolist() == [[False, True, False, True], [True, False, True, False]]
    draws = sample_from_logits(logits[0].expand(4000, 4), gen(0), top_k=2)
    counts = torch.bincount(draws, minlength=4)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1].item() / 4000 - 2 / 3) < 0.03


# --------------------------------------------------------------------------------------------------
# Objective and likelihood


def test_make_objective_builds_the_autoregressive_objective():
    objective = make_objective("autoregressive", {})
    assert isinstance(objective, AutoregressiveObjective)
    assert objective.kind == "autoregressive" and objective.settings() == {}
    assert isinstance(make_objective("autoregressive", objective.settings()), AutoregressiveObjective)


def bigram_model() -> Transformer:
    """A tiny model whose prediction depends only on the previous token: blocks are the identity
    (zero output projections) and there are no positional embeddings."""
    model = tiny(vocab=4, grid=(2, 3), seed=3)
    with torch.no_grad():
        model.row_emb.zero_()
        model.col_emb.zero_()
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
            block.mlp[2].weight.zero_()
            block.mlp[2].bias.zero_()
    return model


def test_loss_equals_a_hand_computed_bigram_cross_entropy():
    model = bigram_model()
    with torch.no_grad():
        # Logits after each possible previous input: the start token, then codes 0..3.
        start = model.head(model.ln_f(model.prefix_emb.weight[0])).tolist()
        after = [model.head(model.ln_f(model.tok_emb.weight[a])).tolist() for a in range(4)]
    tokens = torch.tensor([[0, 1, 2, 3, 3, 1], [2, 2, 0, 1, 3, 0], [3, 0, 0, 0, 1, 2]])
    total, count = 0.0, 0
    for row in tokens.tolist():
        previous = start
        for token in row:
            logsumexp = math.log(sum(math.exp(v) for v in previous))
            total += logsumexp - previous[token]
            count += 1
            previous = after[token]
    hand = total / count
    loss, logs = AutoregressiveObjective().loss(model, tokens, None, gen(0))
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    assert float(logs["bpt"]) == pytest.approx(hand / math.log(2), rel=1e-5)


def test_nll_is_the_exact_chain_rule_log_probability():
    model = tiny(n_classes=3)
    tokens = torch.randint(0, 5, (3, 12), generator=gen(7))
    labels = torch.tensor([2, 0, 1])
    nll = AutoregressiveObjective().nll(model, tokens, labels, gen(0))
    assert nll.shape == (3,)
    # log p(x) = Σ_i log p(x_i | x_<i), each factor from a separate forward pass over the prefix only.
    with torch.no_grad():
        log_p = torch.zeros(3, dtype=torch.float64)
        for i in range(12):
            logits = model.head(model.trunk(tokens[:, :i], labels)[:, -1])
            log_p += logits.log_softmax(-1).gather(1, tokens[:, i:i + 1]).squeeze(1).double()
    torch.testing.assert_close(nll.double(), -log_p / 12 / math.log(2), rtol=1e-5, atol=1e-6)


def test_nll_defines_a_normalised_distribution():
    model = tiny(vocab=3, grid=(2, 2), seed=1)
    every = torch.tensor(list(itertools.product(range(3), repeat=4)))  # all 81 sequences
    nll = AutoregressiveObjective().nll(model, every, None, gen(0))
    total = torch.exp2(-nll.double() * 4).sum()
    assert total.item() == pytest.approx(1.0, abs=1e-5)


def test_loss_matches_nll_and_trains():
    model = tiny(vocab=5, grid=(2, 3), seed=2)
    objective = AutoregressiveObjective()
    tokens = torch.randint(0, 5, (8, 6), generator=gen(1))
    loss, logs = objective.loss(model, tokens, None, gen(0))
    assert float(logs["bpt"]) == pytest.approx(objective.nll(model, tokens, None, gen(0)).mean().item(), rel=1e-5)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(40):
        loss, _ = objective.loss(model, tokens, None, gen(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


# --------------------------------------------------------------------------------------------------
# End to end: `vqtool train-prior --prior autoregressive`, then the shared sampler and likelihood


def stripe_latents(path, n_train: int = 48, n_val: int = 16) -> None:
    """4×4 grids of 8 codes with token (i, j) = base + i + j (mod 8): a pattern a tiny GPT learns fast."""
    from vqtool.latents import Latents, Split, save_latents

    g = gen(0)

    def split(n):
        base = torch.randint(0, 8, (n, 1, 1), generator=g)
        grids = (base + torch.arange(4)[None, :, None] + torch.arange(4)[None, None, :]) % 8
        return Split(grids, torch.randint(0, 2, (n,), generator=g))

    latents = Latents(splits={"train": split(n_train), "val": split(n_val)}, codebook_size=8, latent_shape=(4, 4),
                      image_size=16, classes=["a", "b"])
    save_latents(path, latents, parents={"vq": "cd" * 32})


def stripe_fraction(grids: torch.Tensor) -> float:
    """Share of horizontal neighbours that follow the stripe rule (chance: 1/8)."""
    return ((grids[:, :, 1:] - grids[:, :, :-1]) % 8 == 1).float().mean().item()


def test_train_prior_cli_then_sample_and_nll(tmp_path):
    from typer.testing import CliRunner

    from vqtool.cli import app
    from vqtool.prior.likelihood import dataset_nll
    from vqtool.prior.sample import SampleSettings, sample_tokens
    from vqtool.prior.store import load_prior
    from vqtool.runs import RunPaths

    paths = RunPaths.of(tmp_path / "run")
    paths.root.mkdir(parents=True)
    stripe_latents(paths.latents)
    args = ["train-prior", "--run", str(paths.root), "--prior", "autoregressive", "--max-steps", "80",
            "--layers", "1", "--width", "32", "--heads", "2", "--batch-size", "16", "--lr", "1e-2",
            "--eval-every", "40", "--threads", "1", "--device", "cpu",
            "--set", "warmup_steps=5", "--set", "log_every=20", "--set", "checkpoint_every=40",
            "--set", "val_batches=1", "--set", "ema_decay=0.9"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    prior = load_prior(paths.prior)
    assert prior.kind == "autoregressive" and prior.cfg.causal and prior.cfg.n_classes == 2
    assert prior.objective == {}

    labels = torch.tensor([0, 1] * 6)
    settings = SampleSettings(batch_size=5, seed=3, top_k=1)
    greedy = sample_tokens(prior, 12, settings, labels)
    assert greedy.shape == (12, 4, 4) and greedy.dtype == torch.long
    assert stripe_fraction(greedy) > 0.9  # the trained prior really drives the sampler
    settings = SampleSettings(batch_size=5, seed=3)
    cached = sample_tokens(prior, 12, settings, labels)
    recomputed = sample_tokens(prior, 12, SampleSettings(batch_size=5, seed=3, use_cache=False), labels)
    assert torch.equal(cached, recomputed)
    wide = sample_tokens(prior, 4, SampleSettings(batch_size=4, seed=1, shape=(6, 9)), labels[:4])
    assert wide.shape == (4, 6, 9) and int(wide.max()) < 8

    # eval's likelihood path is the objective's exact NLL; trained, it beats the uniform 3 bits/token.
    from vqtool.latents import load_latents

    val = load_latents(paths.latents).splits["val"]
    bits = dataset_nll(prior, val.tokens.long(), val.labels, 8, gen(0))
    direct = AutoregressiveObjective().nll(prior.model, val.tokens.long().flatten(1), val.labels, gen(0))
    torch.testing.assert_close(bits.float(), direct.float())
    assert bits.mean().item() < 0.5  # the floor is 3 bits / 16 tokens for the random first token

    # The sampler's refusals reach sample_tokens' caller as one-line VqtoolErrors.
    with pytest.raises(VqtoolError, match="columns"):
        sample_tokens(prior, 2, SampleSettings(shape=(4, 2)), labels[:2])
