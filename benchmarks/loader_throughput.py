"""How fast ShardLoader decodes training batches, per worker, and how many workers feed a GPU trainer.

For each image size (default 32, 64 and 256 px) a shards folder of synthetic shapes is written with
`vqtool prepare`'s code, then read as train-vq reads it (endless, shuffled, flipped, batch 16) with 0
workers (decoding in this process) and with DataLoader worker processes. Reported per size:

  images/s     wall clock, after the first batch (worker start-up left out)
  ms CPU/image this process's CPU time per image with 0 workers: the cost of one image to one core,
               the steadier number on a shared machine (wall time also counts waiting for a busy core)
  per worker   1000 / (ms CPU/image): what one worker process on a core of its own delivers

and the workers a trainer consuming TARGET images/s needs: ceil(TARGET / per worker), at the size the
target is for. TARGET comes from --target, or from the VQGAN measurement of benchmarks/gpu_check.py
(--gpu-check gpu.json: images/s of the 256-px recipe's training step on that GPU). The PNGs here are
synthetic shapes; prepared photos are larger files and decode more slowly (bytes/image is printed so
the two can be compared).

    python benchmarks/loader_throughput.py
    python benchmarks/loader_throughput.py --target 60 --target-size 256
    python benchmarks/loader_throughput.py --gpu-check gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vqtool.data.loader import ShardLoader  # noqa: E402
from vqtool.data.prepare import PrepareSettings, prepare_synthetic  # noqa: E402


def shards(folder: Path, size: int, count: int) -> tuple[Path, float]:
    """A shards folder of `count` synthetic images at `size` px, and its PNG bytes per image."""
    out = folder / f"shards-{size}"
    prepare_synthetic(out, "shapes", count, PrepareSettings(size=size, val_fraction=0.0, shard_size=64, workers=1),
                      seed=0, show_progress=False)
    png = sum(p.stat().st_size for p in out.glob("*.tar"))
    return out, png / count


def measure(folder: Path, batch: int, workers: int, batches: int) -> tuple[float, float]:
    """(images/s wall, CPU seconds per image of this process) over `batches` batches after the first."""
    loader = ShardLoader(folder, "train", batch_size=batch, flip=True, infinite=True, num_workers=workers)
    stream = iter(loader)
    next(stream)  # worker start-up and the first shard index
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(stream)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del stream
    n = batches * batch
    return n / wall, cpu / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 256])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to time.")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=20, help="Timed batches per measurement.")
    ap.add_argument("--target", type=float, help="Images/s the trainer consumes (e.g. a GPU's VQGAN step).")
    ap.add_argument("--target-size", type=int, default=256, help="Image size --target is for.")
    ap.add_argument("--gpu-check", type=Path, help="gpu_check.py --json output: its VQGAN images/s is the target.")
    args = ap.parse_args()
    target, target_size, source = args.target, args.target_size, "--target"
    if args.gpu_check:
        vqgan = json.loads(args.gpu_check.read_text())["vqgan"]
        target, source = float(vqgan["images_per_s"]), f"{args.gpu_check} ({vqgan['recipe']})"
        target_size = 256 if "256" in vqgan["recipe"] else 32

    rows = []
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        for size in args.sizes:
            count = max(args.batch * (args.batches + 2), 256)  # an epoch longer than the timed part
            folder, png_bytes = shards(Path(tmp), size, count)
            timings = {w: measure(folder, args.batch, w, args.batches) for w in args.workers}
            cpu_per_image = timings[0][1] if 0 in timings else min(t[1] for t in timings.values())
            rows.append((size, png_bytes, timings, cpu_per_image))

    print(f"batch {args.batch}, flip on, {args.batches} timed batches per measurement\n")
    workers = "".join(f" images/s, {w} worker{'s' if w != 1 else ''} |" for w in args.workers)
    print(f"| size | bytes/image |{workers} ms CPU/image | per worker (images/s) |")
    print("|---|---|" + "---|" * len(args.workers) + "---|---|")
    for size, png_bytes, timings, cpu_per_image in rows:
        rates = "".join(f" {timings[w][0]:,.0f} |" for w in args.workers)
        print(f"| {size} px | {png_bytes / 1024:.1f} kB |{rates} {1000 * cpu_per_image:.2f} | "
              f"{1 / cpu_per_image:,.0f} |")
    if target:
        for size, _, _, cpu_per_image in rows:
            if size == target_size:
                needed = math.ceil(target * cpu_per_image)
                print(f"\nTo feed {target:,.1f} images/s of {size} px ({source}): {needed} worker(s) "
                      f"(train_vq.num_workers), each on a core of its own.")


if __name__ == "__main__":
    main()
