"""Absorbing-prior sampling speed: the reference sampler against vqtool's, back to back in one process.

The reference is the paper's sampler (Unleashing Transformers' `sample`): every step runs the whole
model, computes logits at every position, draws a token everywhere, and keeps the draws at the
positions chosen to be revealed (each masked one with probability 1/t). vqtool's sampler computes
the head only at the revealed positions and runs the last block's queries/MLP only there
(vqtool.prior.transformer.Transformer.hidden_at); `--quantize int8` also runs the Linear layers in int8.

Default: the issue's `bench` setting, 16 samples × 50 steps on 8 layers, width 256, 8 heads, 16×16
tokens, 1024 codes, randomly initialised (speed does not depend on the weights). Rounds interleave the
three samplers and the fastest round of each is reported, so load from other processes hits all of
them alike. Also reports the fp32 matmul rate measured in the same run and the int8 quality effect:
logit differences and token agreement against fp32 on the same inputs. Give `--prior PATH` to measure
quality on trained weights (random weights make near-uniform predictions, a weak test of int8).

    python benchmarks/prior_sampling.py                       # ≈ 5-10 minutes on 2 busy cores
    python benchmarks/prior_sampling.py --rounds 1 --steps 10 # a quick look
"""

from __future__ import annotations

import argparse
import time

import torch

from vqtool.prior.sample import SampleSettings, TransformerPredictor, quantize_int8, sample_tokens
from vqtool.prior.store import LoadedPrior, load_prior
from vqtool.prior.transformer import Transformer, TransformerConfig


def reference_sample(model: torch.nn.Module, n: int, steps: int, temperature: float,
                     generator: torch.Generator) -> torch.Tensor:
    """The paper's sampler: full logits and a draw at every position, every step. `model`: vqtool's
    Transformer or reference_transformer.PapersTransformer (both have `cfg` and logits at every position)."""
    cfg = model.cfg
    x = torch.full((n, cfg.n_tokens), cfg.mask_id, dtype=torch.long)
    unmasked = torch.zeros_like(x, dtype=torch.bool)
    with torch.inference_mode():
        for t in range(steps, 0, -1):
            reference_step(model, x, unmasked, t, temperature, generator)
    return x


def reference_step(model: torch.nn.Module, x: torch.Tensor, unmasked: torch.Tensor, t: int, temperature: float,
                   generator: torch.Generator) -> None:
    """One step of the paper's sampler at time t, on `x` and `unmasked` in place."""
    changes = torch.rand(x.shape, generator=generator) < 1.0 / t
    changes &= ~unmasked
    unmasked |= changes
    probs = (model(x) / temperature).softmax(-1)
    draw = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(x.shape)
    x[changes] = draw[changes]


def matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def step_gflop(cfg: TransformerConfig, n: int) -> float:
    """FLOPs of one full forward pass (the reference's sampling step): 2·params·tokens + attention."""
    L = cfg.n_tokens
    return (2 * cfg.matmul_params() * L + 4 * L * L * cfg.n_embd * cfg.n_layer) * n / 1e9


def int8_quality(fp32: Transformer, int8: Transformer, n: int, seed: int) -> dict[str, float]:
    """Logit differences and agreement on half-masked inputs (tokens drawn by the fp32 model)."""
    cfg = fp32.cfg
    prior = LoadedPrior(model=fp32, kind="absorbing", objective={}, artifact=None)
    tokens = sample_tokens(prior, n, SampleSettings(steps=8, batch_size=n, seed=seed)).reshape(n, -1)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = tokens.masked_fill(torch.rand(tokens.shape, generator=g) < 0.5, cfg.mask_id)
    positions = torch.arange(cfg.n_tokens).expand(n, -1)
    with torch.inference_mode():
        a = TransformerPredictor(fp32)(tokens, positions)
        b = TransformerPredictor(int8)(tokens, positions)
    pa, pb = a.softmax(-1), b.softmax(-1)
    return {
        "max |logit diff|": float((a - b).abs().max()),
        "mean |logit diff|": float((a - b).abs().mean()),
        "logit std": float(a.std()),
        "argmax agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "mean total variation": float(0.5 * (pa - pb).abs().sum(-1).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest of each is kept")
    parser.add_argument("--prior", default=None, help="a trained prior.safetensors instead of random weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    if args.prior:
        model = load_prior(args.prior, "cpu").model
        if model.cfg.causal:
            raise SystemExit("--prior must be an absorbing prior")
    else:
        model = Transformer(TransformerConfig(vocab_size=1024, grid=(16, 16), n_layer=8, n_head=8, n_embd=256))
    model.eval()
    q = quantize_int8(model)
    cfg = model.cfg
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; transformer {cfg.n_layer} layers, "
          f"width {cfg.n_embd}, {cfg.n_head} heads, {cfg.vocab_size} codes, grid {cfg.grid[0]}x{cfg.grid[1]}"
          f"{' (' + args.prior + ')' if args.prior else ' (random weights)'}")
    print(f"sampling {args.samples} images x {args.steps} steps, {args.rounds} interleaved round(s)")

    n, steps = args.samples, args.steps
    settings = SampleSettings(steps=steps, batch_size=n, seed=args.seed)
    runs = {
        "reference (full head, every step)": lambda: reference_sample(model, n, steps, 1.0,
                                                                      torch.Generator().manual_seed(args.seed)),
        "vqtool fp32": lambda: sample_tokens(LoadedPrior(model, "absorbing", {}, None), n, settings),
        "vqtool int8": lambda: sample_tokens(LoadedPrior(q, "absorbing", {}, None), n, settings),
    }
    best = {name: float("inf") for name in runs}
    peak = 0.0
    for _ in range(args.rounds):
        peak = max(peak, matmul_gflops())
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    peak = max(peak, matmul_gflops())

    ref = best["reference (full head, every step)"]
    ref_rate = step_gflop(cfg, n) * steps / ref
    print(f"\nfp32 matmul (1024², same run): {peak:.1f} GFLOP/s")
    print(f"{'sampler':38s} {'seconds':>8s} {'images/s':>9s} {'vs reference':>13s}")
    for name, seconds in best.items():
        print(f"{name:38s} {seconds:8.1f} {n / seconds:9.3f} {ref / seconds:12.2f}x")
    print(f"reference: {ref_rate:.1f} GFLOP/s = {100 * ref_rate / peak:.0f}% of the matmul peak "
          f"({step_gflop(cfg, n):.1f} GFLOP per step)")
    print("targets (paper's CPU): reference 0.40 images/s, goal 0.60 images/s = 1.50x the reference")

    print("\nint8 quality against fp32 (same half-masked inputs, every position):")
    for key, value in int8_quality(model, q, min(n, 8), args.seed).items():
        print(f"  {key:22s} {value:.4g}")
    a = sample_tokens(LoadedPrior(model, "absorbing", {}, None), n, settings)
    b = sample_tokens(LoadedPrior(q, "absorbing", {}, None), n, settings)
    print(f"  {'same-seed token match':22s} {float((a == b).float().mean()):.4g}  (whole samples, drawn with one seed)")


if __name__ == "__main__":
    main()
