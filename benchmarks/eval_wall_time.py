"""Wall time of `vqtool eval --metrics fid,prdc --n 10000` and of `vqtool neighbours` on CIFAR-10, on this CPU.

No pretrained weights exist offline, so the networks are randomly initialised copies of the real
architectures (torch-fidelity's Inception-v3, torchvision's AlexNet for LPIPS): the cost is the same, the
numbers are not comparable to published ones. Everything runs through the real CLI, one command at a time:

  1. prepare the CIFAR-10 training tar twice: `split` (80% train / 20% val) and `all` (50,000 train);
  2. eval (with --compile): real = 10,000 images of split's train part, fake = 10,000 images of its val part,
     with a fresh feature cache (real features computed and stored), then again with the real features
     read from that cache;
  3. neighbours against all 50,000 images: 16 val images of `split` as the samples (they are in `all`,
     so each must come back at distance 0), no verdict (every real image is in that training set);
  4. neighbours on `split` with its verdict: 8 copies of its training images + 8 of its val images.

    python benchmarks/eval_wall_time.py --work /tmp/eval-bench [--n 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CIFAR = Path("/work/shared/data/cifar10-train-jpg.tar")


def vqtool(*args, log: Path) -> float:
    cmd = [sys.executable, "-m", "vqtool", *[str(a) for a in args]]
    print("$", " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd[2:]) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=f)
    seconds = time.perf_counter() - start
    print(f"  {seconds:,.1f} s", flush=True)
    return seconds


def _latest_cache(work: Path) -> Path:
    return max(work.glob("cache-*"), key=lambda p: p.stat().st_mtime)


def write_samples(shards: Path, out: Path, picks: list[tuple[str, int]]) -> None:
    """PNG copies of chosen images ((split, index) in manifest order) of a shards folder."""
    from PIL import Image

    from vqtool.data.loader import ShardLoader
    from vqtool.grids import to_uint8

    out.mkdir(parents=True, exist_ok=True)
    for split in {s for s, _ in picks}:
        wanted = {i for s, i in picks if s == split}
        seen = 0
        for images, _ in ShardLoader(shards, split, batch_size=256, infinite=False):
            for j, image in enumerate(images):
                if seen + j in wanted:
                    Image.fromarray(to_uint8(image)).save(out / f"{split}-{seen + j:05d}.png")
            seen += images.shape[0]
            if seen > max(wanted):
                break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/eval-bench"))
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--data", type=Path, default=CIFAR)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="run the extractor eagerly instead of through torch.compile")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    results: dict[str, float] = {}

    for name, val in (("split", 0.2), ("all", 0.0)):
        if not (work / name / "shards" / "manifest.json").exists():
            results[f"prepare {name}"] = vqtool("prepare", args.data, "--run", work / name, "--size", 32,
                                                "--labels", "folder", "--val-fraction", val, log=log)

    import torch
    import torchvision

    from vqtool.eval.features import write_random_weights

    inception = work / "inception-random.pth"
    if not inception.exists():
        write_random_weights(inception, seed=0)
    alexnet = work / "alexnet-random.pth"
    if not alexnet.exists():
        torch.save(torchvision.models.alexnet().features.state_dict(prefix="features."), alexnet)

    split = work / "split"
    if not args.skip_eval:
        common = ["--run", split, "--metrics", "fid,prdc", "--n", args.n, "--fake", split / "shards",
                  "--fake-split", "val", "--feature-weights", inception, "--no-download", "--overwrite",
                  "--compile" if args.compile else "--no-compile"]
        results[f"eval fid,prdc n={args.n} (real features computed and cached)"] = vqtool(
            "eval", *common, "--name", "bench-cold", "--cache-dir", work / f"cache-{time.time_ns()}", log=log)
        results[f"eval fid,prdc n={args.n} (real features from cache)"] = vqtool(
            "eval", *common, "--name", "bench-warm", "--cache-dir", _latest_cache(work), log=log)

    samples_all = work / "samples-val16"
    if not samples_all.exists():
        write_samples(split / "shards", samples_all, [("val", i) for i in range(16)])
    results["neighbours n=16 k=8 vs 50,000 train (no verdict)"] = vqtool(
        "neighbours", "--run", work / "all", "--fake", samples_all, "--n", 16, "--k", 8, "--n-val", 0,
        "--lpips-weights", alexnet, "--no-download", "--overwrite", log=log)
    found = json.loads((work / "all" / "eval" / "neighbours.json").read_text())
    at_zero = sum(s["neighbours"][0]["lpips"] < 1e-6 for s in found["samples"])

    samples_mixed = work / "samples-mixed"
    if not samples_mixed.exists():
        write_samples(split / "shards", samples_mixed, [("train", i) for i in range(8)]
                      + [("val", 100 + i) for i in range(8)])
    results["neighbours n=16 k=8 n-val=200 vs 40,000 train (with verdict)"] = vqtool(
        "neighbours", "--run", split, "--fake", samples_mixed, "--n", 16, "--k", 8, "--n-val", 200,
        "--lpips-weights", alexnet, "--no-download", "--overwrite", log=log)
    verdict = json.loads((split / "eval" / "neighbours.json").read_text())

    print()
    print(f"machine load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    print(f"torch threads: {torch.get_num_threads()}")
    for key, seconds in results.items():
        print(f"{key:<66} {seconds:>9,.1f} s")
    for report in sorted(work.glob("*/eval/*.json")):
        data = json.loads(report.read_text())
        if "cpu_seconds" in data:
            print(f"{report.relative_to(work)}: {data['seconds']:,.1f} s wall, {data['cpu_seconds']:,.1f} s CPU")
    print(f"samples found at LPIPS distance 0 among 50,000: {at_zero} of 16")
    print(f"verdict with 8 planted training copies: {verdict['verdict']} (flagged {verdict['flagged']})")
    (work / "results.json").write_text(json.dumps({"seconds": results, "at_zero": at_zero,
                                                   "verdict": verdict["message"],
                                                   "load": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
