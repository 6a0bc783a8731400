"""train-vq and encode throughput for the cifar10-32 and a 256-px recipe, beside this machine's fp32 peak.

For each recipe: a few real `VQTrainer.train_step`s (autoencoder only, then with the discriminator and
DiffAugment on), and `encode_to_tokens` over batches, on a small synthetic shards folder rendered at
the recipe's image size. FLOPs per step are counted with torch's FlopCounterMode, so the achieved
GFLOP/s can be set against a 2048² fp32 matmul measured in the same process right before each
measurement (absolute speed drifts on shared machines; the ratio is what to compare). The perceptual
loss runs with a random-weight LPIPS backbone of the recipe's architecture: same cost, no download.

    OMP_NUM_THREADS=1 python benchmarks/vq_throughput.py                 # both recipes, CPU
    python benchmarks/vq_throughput.py --recipes cifar10-32 --steps 10 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vqtool.config import load_recipe, merge
from vqtool.data.prepare import PrepareSettings, prepare_synthetic
from vqtool.device import resolve_device
from vqtool.precision import autocast, resolve_precision
from vqtool.vq.model import VQConfig
from vqtool.vq.perceptual import Perceptual, build_lpips
from vqtool.vq.train import TrainVQConfig, VQTrainer

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of n×n matmuls in `dtype` (fp32: this benchmark's reference; bf16: the GPU check's)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def timed(fn, repeats: int, device: torch.device) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def bench_recipe(name: str, batch: int | None, steps: int, device: torch.device, work: Path,
                 precision: str = "fp32") -> list[tuple]:
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    size = int(recipe["prepare"]["size"])
    vq_cfg = merge(VQConfig, recipe["vq"])
    train = dict(recipe["train_vq"])
    if batch:
        train["batch_size"] = batch
    perceptual = train.get("perceptual", "none")
    train.update(perceptual="none", shuffle_buffer=16, num_workers=0)
    cfg = merge(TrainVQConfig, train)
    vq_cfg.kmeans_init = False  # k-means is a one-off at step 1; it is not a steady-state cost
    shards = work / f"shards-{size}"
    if not shards.exists():
        prepare_synthetic(shards, "shapes", max(2 * cfg.batch_size, 8) + 4,
                          PrepareSettings(size=size, val_fraction=0.2, shard_size=64, workers=1), show_progress=False)
    task = VQTrainer(vq_cfg, cfg, shards, work / f"{name}.safetensors", work / "figures", device=device,
                     precision=precision)
    if perceptual != "none":
        task.perceptual = Perceptual(build_lpips(perceptual)).to(device)
    params = sum(p.numel() for p in task.model.parameters()) / 1e6
    rows = []

    def measure(what: str, fn, images: int) -> None:
        flops = count_flops(fn)
        before = matmul_peak(device)
        sec = timed(fn, steps, device)
        after = matmul_peak(device)
        rows.append((name, what, flops / 1e9, sec, images / sec, flops / sec / 1e9, before, after))

    for label, disc_start in (("train step, autoencoder", 10**9), ("train step, + discriminator", 0)):
        task.cfg.disc_start = disc_start
        measure(f"{label} (batch {cfg.batch_size}, perceptual {perceptual})", task.train_step, cfg.batch_size)

    model = task.eval_model
    model.load_state_dict(task.model.state_dict())
    x = torch.rand(cfg.batch_size, 3, size, size, device=device).mul(2).sub(1)
    x = x.contiguous(memory_format=task.memory_format)

    def encode():
        with torch.no_grad(), autocast(device, precision):
            model.encode_to_tokens(x)

    measure(f"encode (batch {cfg.batch_size})", encode, cfg.batch_size)
    print(f"{name}: {params:.1f}M autoencoder parameters, {size} px, latents {model.latent_shape(size)}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["cifar10-32", "ffhq-256"])
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="Batch size per recipe (default: the recipe's for 32 px, 2 for 256 px).")
    ap.add_argument("--steps", type=int, default=2, help="Timed repetitions after one warm-up.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 (vqtool.precision).")
    args = ap.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}, device: {device}, precision: {precision}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vq-bench-") as tmp:
        for i, name in enumerate(args.recipes):
            batch = args.batch[i] if args.batch and i < len(args.batch) else (None if "32" in name else 2)
            rows += bench_recipe(name, batch, args.steps, device, Path(tmp), precision)
    print("\n| recipe | measurement | GFLOP per call | s per call | images/s | achieved GFLOP/s "
          "| matmul peak before / after | % of peak |\n|---|---|---|---|---|---|---|---|")
    for name, what, gflop, sec, images, gflops, before, after in rows:
        print(f"| {name} | {what} | {gflop:.1f} | {sec:.3g} | {images:.3g} | {gflops:.1f} | "
              f"{before:.1f} / {after:.1f} | {100 * gflops / ((before + after) / 2):.0f}% |")

if __name__ == "__main__":
    main()
