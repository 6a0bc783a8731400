"""What classifier-free guidance costs: sampling time per image at guidance 0 and at guidance S, one process.

Guidance runs both branches (the class and NO_CLASS) as one forward pass of a doubled batch, so each
step does twice the work of an unguided one on a batch of the same size. This measures how much of
that shows up as time per image, for the absorbing prior (random and confidence schedules) and the
autoregressive one (KV cache), on a small randomly initialised class-conditional transformer (speed
does not depend on the weights). Rounds alternate the two scales, so load from other processes hits
both alike; the fastest round of each is reported, and the ratio is the number to read.

    python benchmarks/guidance_cost.py                   # ≈ 2-4 minutes on 2 busy cores
    python benchmarks/guidance_cost.py --rounds 1 --n 4  # a quick look
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vqtool.artifacts import Artifact
from vqtool.prior.sample import SampleSettings, sample_tokens
from vqtool.prior.store import LoadedPrior
from vqtool.prior.transformer import Transformer, TransformerConfig

SETTINGS = {
    "absorbing, random": ("absorbing", {}),
    "absorbing, confidence": ("absorbing", {"schedule": "confidence"}),
    "autoregressive, KV cache": ("autoregressive", {}),
}


def in_memory_prior(kind: str, args: argparse.Namespace) -> LoadedPrior:
    torch.manual_seed(args.seed)
    cfg = TransformerConfig(vocab_size=args.codes, grid=tuple(args.grid), n_layer=args.layers, n_head=args.heads,
                            n_embd=args.width, n_classes=args.classes, causal=kind == "autoregressive")
    # Recorded as trained with cond_drop, so sampling does not warn about an untrained unconditional branch.
    artifact = Artifact(path=Path("(in memory)"), kind="prior-model", format_version=1, config={}, parents={},
                        extra={"train": {"cond_drop": 0.1}}, vqtool_version="", command="")
    return LoadedPrior(model=Transformer(cfg).eval(), kind=kind, objective={}, artifact=artifact)


def seconds_per_image(prior: LoadedPrior, settings: SampleSettings, n: int, labels: torch.Tensor) -> float:
    start = time.perf_counter()
    sample_tokens(prior, n, settings, labels)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="images per round, drawn as one batch")
    parser.add_argument("--steps", type=int, default=50, help="absorbing prior: unmasking steps")
    parser.add_argument("--guidance", type=float, default=2.0, help="the guided scale S")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grid", type=int, nargs=2, default=(16, 16))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--codes", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; transformer: {args.layers} layers, "
          f"width {args.width}, {args.heads} heads, {args.codes} codes, {args.classes} classes, grid "
          f"{args.grid[0]}x{args.grid[1]}; {args.n} images per round, {args.steps} steps (absorbing)", flush=True)
    labels = torch.arange(args.n) % args.classes
    print(f"{'sampler':26} {'S = 0 (s/image)':>16} {f'S = {args.guidance:g} (s/image)':>18} {'ratio':>7}")
    for name, (kind, extra) in SETTINGS.items():
        prior = in_memory_prior(kind, args)
        scales = (0.0, args.guidance)
        settings = {s: SampleSettings(steps=args.steps, batch_size=args.n, guidance=s, seed=args.seed, **extra)
                    for s in scales}
        seconds_per_image(prior, settings[0.0], 2, labels[:2])  # warm-up: allocator, kernels
        best = {s: float("inf") for s in scales}
        for _ in range(args.rounds):
            for s in scales:
                best[s] = min(best[s], seconds_per_image(prior, settings[s], args.n, labels))
        plain, guided = best[0.0], best[args.guidance]
        print(f"{name:26} {plain:16.4f} {guided:18.4f} {guided / plain:7.2f}", flush=True)


if __name__ == "__main__":
    main()
