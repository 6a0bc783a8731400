"""Autoregressive sampling: KV cache against full-prefix recompute, measured back to back in one process.

The default is the issue's setting: 16 samples of 16×16 tokens on the `bench` transformer (8 layers,
width 256, 8 heads, 1024 codes), randomly initialised (speed does not depend on the weights). Both
paths draw from the same seed, so the script also checks they give identical tokens. Absolute times
drift on shared machines; the ratio is the number to read.

    python benchmarks/ar_sampling.py                 # the issue's benchmark (the recompute takes minutes)
    python benchmarks/ar_sampling.py --shape 24 24   # sliding-window sampling of a larger grid

On oversubscribed cores (other jobs running), torch's OpenMP threads spin-wait at every one of the
cached path's many small operations; run with `--threads 1` or `OMP_WAIT_POLICY=PASSIVE` there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from vqtool.device import resolve_device
from vqtool.prior.autoregressive import sample_autoregressive
from vqtool.prior.logits import Draw
from vqtool.prior.transformer import Transformer, TransformerConfig


def timed_sample(model: Transformer, n: int, shape: tuple[int, int], use_cache: bool, seed: int,
                 device: torch.device) -> tuple[float, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = sample_autoregressive(model, n, shape, Draw(), None, generator, use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--grid", type=int, nargs=2, default=(16, 16), help="training grid of the transformer")
    parser.add_argument("--shape", type=int, nargs=2, default=None, help="grid to sample (default: --grid)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--codes", type=int, default=1024)
    parser.add_argument("--cached-repeats", type=int, default=3, help="cached runs (median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for both paths "
                        "(default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = TransformerConfig(vocab_size=args.codes, grid=tuple(args.grid), n_layer=args.layers,
                            n_head=args.heads, n_embd=args.width, causal=True)
    model = Transformer(cfg).to(device).eval()
    shape = tuple(args.shape) if args.shape else cfg.grid
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"transformer: {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, {cfg.vocab_size} codes, "
          f"grid {cfg.grid[0]}x{cfg.grid[1]}; sampling {args.samples} x {shape[0]}x{shape[1]} tokens", flush=True)

    timed_sample(model, 2, (1, shape[1]), True, args.seed, device)  # warm-up: allocator, kernels
    cached_times = []
    for _ in range(args.cached_repeats):
        seconds, cached = timed_sample(model, args.samples, shape, True, args.seed, device)
        cached_times.append(seconds)
        print(f"  cached run: {seconds:.2f} s", flush=True)
    cached_s = statistics.median(cached_times)
    print("  prefix recompute (slow) ...", flush=True)
    recompute_s, recomputed = timed_sample(model, args.samples, shape, False, args.seed, device)

    n_tokens = shape[0] * shape[1]
    same = torch.equal(cached, recomputed)
    mismatched = int((cached != recomputed).sum())
    print(f"KV cache:          {cached_s:8.2f} s  ({args.samples * n_tokens / cached_s:8.0f} tokens/s, "
          f"runs {', '.join(f'{t:.2f}' for t in cached_times)} s)")
    print(f"prefix recompute:  {recompute_s:8.2f} s  ({args.samples * n_tokens / recompute_s:8.0f} tokens/s)")
    print(f"identical tokens:  {same}" + ("" if same else f" ({mismatched} of {cached.numel()} differ)"))
    print(f"speed-up with the cache: {recompute_s / cached_s:.1f}x  (target >= 10x)")


if __name__ == "__main__":
    main()
