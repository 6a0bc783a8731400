"""The absorbing-diffusion objective: forward process, losses on masked positions only, the ELBO against a
closed-form answer, and per-image likelihoods through dataset_nll."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vqtool.errors import VqtoolError
from vqtool.prior.absorbing import AbsorbingObjective
from vqtool.prior.objectives import make_objective
from vqtool.prior.transformer import Transformer, TransformerConfig

LN2 = math.log(2.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_model(n_classes: int = 0, vocab: int = 16, grid=(4, 4), seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=vocab, grid=grid, n_layer=2, n_head=2, n_embd=16,
                                         n_classes=n_classes))


class Oracle(torch.nn.Module):
    """The ideal denoiser of a product distribution: each position's true marginal, whatever it sees."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.logp = probs.log()
        n, v = probs.shape
        self.cfg = SimpleNamespace(mask_id=v, causal=False)

    def forward(self, idx, labels=None, where=None):
        logits = self.logp.expand(idx.shape[0], *self.logp.shape)
        return logits[where] if where is not None else logits


def product_distribution(n: int = 4, v: int = 3, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    probs = torch.rand(n, v, generator=g, dtype=torch.float64) + 0.2
    return probs / probs.sum(1, keepdim=True)


def all_grids(n: int, v: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(v), repeat=n)), dtype=torch.long)


def exact_bits_per_token(probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log2 p(x) / N per row of x under the product distribution."""
    logp = probs.log()[torch.arange(probs.shape[0]), x]  # (R, N)
    return -logp.sum(1) / (probs.shape[0] * LN2)


# --------------------------------------------------------------------------------------------------
# Forward process


@pytest.mark.parametrize("t", [1, 5, 16, 24, 32])
def test_random_masking_rate_matches_t_over_T(t):
    obj = AbsorbingObjective(T=32)
    mask = obj.mask_for(torch.full((256,), t), 256, gen(t))
    rate = mask.float().mean().item()
    p = t / 32
    stderr = math.sqrt(p * (1 - p) / mask.numel())
    assert abs(rate - p) <= 5 * stderr + 1e-12
    if t == 32:
        assert mask.all()


def test_fixed_schedule_masks_exactly_round_t_over_T_tokens():
    obj = AbsorbingObjective(T=10, mask_schedule="fixed")
    t = torch.arange(1, 11).repeat(20)
    mask = obj.mask_for(t, 7, gen(1))
    expected = torch.round(t.double() * 7 / 10).clamp(min=1).long()
    assert torch.equal(mask.sum(1), expected)
    assert expected.min() == 1  # t = 1 rounds to 0.7 → 1; never zero masked


def test_sample_t_is_uniform_on_1_to_T():
    obj = AbsorbingObjective(T=8)
    t = obj.sample_t(40000, gen(2))
    assert t.min() == 1 and t.max() == 8
    freq = torch.bincount(t, minlength=9)[1:].double() / t.numel()
    assert torch.allclose(freq, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.01)


def test_stratified_t_covers_every_step_once_or_uniformly():
    obj = AbsorbingObjective(T=8)
    assert [int(obj.stratified_t(k, 8, 3, gen(0))[0]) for k in range(8)] == list(range(1, 9))
    # K = 3 does not divide T = 8: pooled over strata, t is still exactly uniform in distribution.
    g = gen(3)
    draws = torch.cat([obj.stratified_t(k, 3, 30000, g) for k in range(3)])
    freq = torch.bincount(draws, minlength=9)[1:].double() / draws.numel()
    assert torch.allclose(freq, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.01)
    for k in range(3):  # each draw stays in its stratum
        t = obj.stratified_t(k, 3, 1000, g)
        assert t.min() >= math.floor(k * 8 / 3) + 1 and t.max() <= math.floor((k + 1) * 8 / 3) + 1


# --------------------------------------------------------------------------------------------------
# The loss sees masked positions only


def _draw(obj, tokens, seed):
    g = gen(seed)
    t = obj.sample_t(tokens.shape[0], g)
    return t, obj.mask_for(t, tokens.shape[1], g)


@pytest.mark.parametrize("n_classes", [0, 3])
def test_loss_ignores_unmasked_positions(n_classes):
    model = tiny_model(n_classes)
    obj = AbsorbingObjective(T=8)
    tokens = torch.randint(0, 16, (6, 16), generator=gen(4))
    labels = torch.arange(6) % 3 if n_classes else None
    _, mask = _draw(obj, tokens, 5)
    assert 0 < mask.sum() < mask.numel()
    off = 1 if n_classes else 0

    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["hidden"] = output

    def rows(module, inputs):
        captured["rows"] = inputs[0].shape[0]

    h1 = model.ln_f.register_forward_hook(keep)
    h2 = model.lm_head.register_forward_pre_hook(rows)
    loss, _ = obj.loss(model, tokens, labels, gen(5))
    loss.backward()
    h1.remove()
    h2.remove()
    grad = captured["hidden"].grad  # (B, off + N, d)
    assert captured["rows"] == int(mask.sum())  # the head ran on the masked rows only
    assert torch.count_nonzero(grad[:, off:][~mask]) == 0
    assert torch.count_nonzero(grad[:, :off]) == 0
    assert torch.count_nonzero(grad[:, off:][mask]) > 0

    # Anything at the unmasked positions' outputs leaves the loss unchanged.
    def scramble(module, inputs, output):
        noisy = output.clone()
        noisy[:, off:][~mask] += 100.0 * torch.randn_like(noisy[:, off:][~mask])
        return noisy

    with torch.no_grad():
        reference, _ = obj.loss(model, tokens, labels, gen(5))
        h = model.ln_f.register_forward_hook(scramble)
        scrambled, _ = obj.loss(model, tokens, labels, gen(5))
        h.remove()
    assert torch.equal(reference, scrambled)


@pytest.mark.parametrize("loss_name", ["reweighted-elbo", "elbo", "mlm"])
@pytest.mark.parametrize("schedule", ["random", "fixed"])
def test_losses_match_full_logit_reference(loss_name, schedule):
    """The masked-only computation equals the reference way: logits everywhere, CE with ignore_index."""
    model = tiny_model()
    T, N = 8, 16
    obj = AbsorbingObjective(T=T, mask_schedule=schedule, loss=loss_name)
    tokens = torch.randint(0, 16, (6, N), generator=gen(6))
    t, mask = _draw(obj, tokens, 7)
    with torch.no_grad():
        logits = model(tokens.masked_fill(mask, 16))
        target = tokens.masked_fill(~mask, -1)
        ce = F.cross_entropy(logits.permute(0, 2, 1), target, ignore_index=-1, reduction="none").sum(1)
        got, metrics = obj.loss(model, tokens, None, gen(7))
    k = mask.sum(1).double()
    ce, tf = ce.double(), t.double()
    bound = ce * (T / tf if schedule == "random" else N / k) / (N * LN2)
    expected = {"elbo": bound, "reweighted-elbo": ce * (T - tf + 1) / T / (N * LN2), "mlm": ce / k / LN2}[loss_name]
    assert got.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert float(metrics["bpt"]) == pytest.approx(bound.mean().item(), rel=1e-5)


def test_reweighted_weight_keeps_the_fully_masked_step():
    # With T = 1 every draw is the fully masked step t = T. The paper's weight (T − t + 1)/T = 1 there,
    # so the reweighted loss equals the bound; the weight 1 − t/T would make it zero.
    model = tiny_model()
    tokens = torch.randint(0, 16, (4, 16), generator=gen(8))
    rw, metrics = AbsorbingObjective(T=1, loss="reweighted-elbo").loss(model, tokens, None, gen(9))
    elbo, _ = AbsorbingObjective(T=1, loss="elbo").loss(model, tokens, None, gen(9))
    assert rw.item() > 0
    assert rw.item() == pytest.approx(elbo.item(), rel=1e-6) == pytest.approx(float(metrics["bpt"]), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# The ELBO against closed-form answers (an oracle denoiser of a product distribution)


def test_oracle_elbo_equals_entropy_and_each_images_loglik():
    probs = product_distribution(n=4, v=3)
    N, V = probs.shape
    grids = all_grids(N, V)  # all 81 images
    p_x = probs[torch.arange(N), grids].prod(1)
    entropy = -(p_x * p_x.log2()).sum().item() / N  # bits per token
    oracle = Oracle(probs)
    obj = AbsorbingObjective(T=8)  # nll_samples None: every t once
    reps = 200
    est = obj.nll(oracle, grids.repeat(reps, 1), None, gen(9)).double().reshape(reps, -1)
    mean, se = est.mean(0), est.std(0) / math.sqrt(reps)
    exact = exact_bits_per_token(probs, grids)
    assert torch.all((mean - exact).abs() <= 5 * se + 1e-9)  # per image: E[ELBO] = −log2 p(x)/N
    weighted = (p_x * mean).sum().item()
    weighted_se = math.sqrt(((p_x * se) ** 2).sum().item())
    assert abs(weighted - entropy) <= 5 * weighted_se


@pytest.mark.parametrize("K", [1, 3])
def test_stratified_nll_is_unbiased(K):
    probs = product_distribution(n=4, v=3, seed=1)
    grids = all_grids(4, 3)
    obj = AbsorbingObjective(T=8, nll_samples=K)
    reps = 300
    est = obj.nll(Oracle(probs), grids.repeat(reps, 1), None, gen(10 + K)).double().reshape(reps, -1)
    mean, se = est.mean(0), est.std(0) / math.sqrt(reps)
    exact = exact_bits_per_token(probs, grids)
    z = ((mean - exact) / se).abs()
    assert z.max() < 5


@pytest.mark.parametrize("schedule", ["random", "fixed"])
def test_training_bpt_estimates_entropy(schedule):
    probs = product_distribution(n=5, v=4, seed=2)
    entropy = -(probs * probs.log2()).sum().item() / probs.shape[0]
    g = gen(11)
    x = torch.multinomial(probs, 20000, replacement=True, generator=g).T.contiguous()  # (B, N) ~ p
    obj = AbsorbingObjective(T=16, mask_schedule=schedule, loss="elbo")
    values = [obj.loss(Oracle(probs), chunk, None, g)[1]["bpt"] for chunk in x.split(1000)]
    mean = sum(values) / len(values)
    se = torch.tensor(values).std().item() / math.sqrt(len(values))
    assert abs(mean - entropy) <= 5 * se + 1e-6


# --------------------------------------------------------------------------------------------------
# Settings and refusals


def test_settings_round_trip_and_refusals():
    obj = AbsorbingObjective(T=64, mask_schedule="fixed", loss="mlm", nll_samples=16)
    again = make_objective("absorbing", obj.settings())
    assert again.settings() == {"T": 64, "mask_schedule": "fixed", "loss": "mlm", "nll_samples": 16}
    with pytest.raises(VqtoolError, match="--loss"):
        AbsorbingObjective(loss="l2")
    with pytest.raises(VqtoolError, match="mask_schedule"):
        AbsorbingObjective(mask_schedule="cosine")
    with pytest.raises(VqtoolError, match="nll_samples"):
        AbsorbingObjective(nll_samples=0)
    causal = Transformer(TransformerConfig(vocab_size=8, grid=(2, 2), n_layer=1, n_head=1, n_embd=8, causal=True))
    with pytest.raises(ValueError, match="bidirectional"):
        AbsorbingObjective(T=4).loss(causal, torch.zeros(2, 4, dtype=torch.long), None, gen())


@pytest.mark.parametrize("causal,n_classes", [(False, 0), (False, 3), (True, 0), (True, 3)])
def test_transformer_where_selects_the_same_logits(causal, n_classes):
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=16, grid=(3, 4), n_layer=2, n_head=2, n_embd=16,
                                          causal=causal, n_classes=n_classes)).eval()
    idx = torch.randint(0, 17, (5, 12), generator=gen(12))
    where = torch.rand(5, 12, generator=gen(13)) < 0.4
    labels = torch.arange(5) % 3 if n_classes else None
    with torch.no_grad():
        assert torch.allclose(model(idx, labels)[where], model(idx, labels, where=where), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# dataset_nll


def _saved_prior(tmp_path, n_classes=0, T=4):
    from vqtool.prior.store import load_prior, save_prior

    model = tiny_model(n_classes)
    obj = AbsorbingObjective(T=T)
    path = tmp_path / "prior.safetensors"
    save_prior(path, "absorbing", model.cfg, obj.settings(), model.state_dict(), model.state_dict(),
               {"latents": "0" * 64})
    return load_prior(path)


def test_dataset_nll_shapes_determinism_and_progress(tmp_path):
    from vqtool.prior.likelihood import dataset_nll

    prior = _saved_prior(tmp_path)
    tokens = torch.randint(0, 16, (7, 4, 4), generator=gen(14))
    calls = []
    a = dataset_nll(prior, tokens, None, 3, gen(15), lambda done, total: calls.append((done, total)))
    b = dataset_nll(prior, tokens, None, 3, gen(15))
    assert a.shape == (7,) and a.dtype == torch.float32 and torch.isfinite(a).all() and (a > 0).all()
    assert torch.equal(a, b)
    assert calls == [(3, 7), (6, 7), (7, 7)]
    # The same as calling the objective batch by batch with that generator.
    g = gen(15)
    obj = AbsorbingObjective(T=4)
    manual = torch.cat([obj.nll(prior.model, tokens[s:s + 3].reshape(-1, 16), None, g) for s in (0, 3, 6)])
    assert torch.allclose(a, manual)
    k2 = dataset_nll(prior, tokens, None, 7, gen(15), nll_samples=2)
    assert k2.shape == (7,) and not torch.equal(k2, a)


def test_dataset_nll_refuses_mismatched_input(tmp_path):
    from vqtool.prior.likelihood import dataset_nll

    prior = _saved_prior(tmp_path)
    with pytest.raises(VqtoolError, match="training grid"):
        dataset_nll(prior, torch.zeros(2, 5, 5, dtype=torch.long), None, 2, gen())
    with pytest.raises(VqtoolError, match="codebook"):
        dataset_nll(prior, torch.full((2, 4, 4), 16), None, 2, gen())
    conditional = _saved_prior(tmp_path / "c", n_classes=3)
    with pytest.raises(VqtoolError, match="class"):
        dataset_nll(conditional, torch.zeros(2, 4, 4, dtype=torch.long), None, 2, gen())
    out = dataset_nll(conditional, torch.zeros(2, 4, 4, dtype=torch.long), torch.tensor([0, 2]), 2, gen())
    assert out.shape == (2,)


def test_elbo_error_bar_shrinks_with_more_t_draws_and_matches_the_spread_over_seeds():
    """The Monte-Carlo standard error of a fixed set's mean ELBO falls as K grows, and it describes the
    real scatter of the estimate: repeated with other seeds, the estimates spread about as much."""
    from vqtool.eval.nll import SplitNll

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=16, grid=(4, 4), n_layer=1, n_head=2, n_embd=16)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 16, (24, 16))
    ses, spreads = [], []
    for K in (2, 8, 32):
        objective = AbsorbingObjective(T=32, nll_samples=K)
        means, se = [], None
        for seed in range(12):
            bits, var = objective.nll_estimate(model, tokens, None, gen(seed))
            split = SplitNll(bits.double(), var.double())
            means.append(split.mean())
            se = split.monte_carlo_se() if se is None else se
        ses.append(se)
        spreads.append(float(torch.tensor(means).std()))
    assert ses[0] > ses[1] > ses[2] > 0
    for se, spread in zip(ses, spreads, strict=True):
        # conservative, and not by much: the seeds' spread is within a factor of ~2.5 of the bar
        assert spread / 2.5 < se < 2.5 * spread
    # nll is nll_estimate's first part, and one draw leaves the variance unknown
    one = AbsorbingObjective(T=32, nll_samples=1)
    bits, var = one.nll_estimate(model, tokens, None, gen(1))
    assert torch.equal(bits, one.nll(model, tokens, None, gen(1))) and torch.isnan(var).all()
    assert SplitNll(bits.double(), var.double()).se()[1] == "images"
