"""Sample quality of the unmasking orders: `--order random` against `--order halton`, both schedules.

For every (schedule, order, steps, seed) it runs `vqtool sample` (n images) and scores the samples with
`vqtool eval --fake` against the run's train images: FID, KID and PRDC. Without pretrained Inception
weights (none offline here) pass `--random-features`: Inception-v3 with random weights
(vqtool.eval.features.write_random_weights) at feature layer 192. Those numbers compare settings with
each other only; they are not comparable to published FIDs. The real features are cached after the
first eval. Prints one line per setting: the metrics of every seed and their mean.

    python benchmarks/unmasking_orders.py RUN --random-features                  # docs/sample.md's table
    python benchmarks/unmasking_orders.py RUN --steps 8 --seeds 0 1 2 --feature-weights INCEPTION.pth
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = [("random", "random"), ("random", "halton"), ("confidence", "random"), ("confidence", "halton")]


def vqtool(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-m", "vqtool", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"vqtool {args[0]} failed:\n{done.stdout}{done.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder with prior.safetensors, vq.safetensors and shards/")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=500, help="samples per setting and seed")
    parser.add_argument("--n-real", type=int, default=1000)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--out", type=Path, default=None, help="samples folder (default: RUN/orders)")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--feature-weights", type=Path, help="Inception-v3 weights (torch-fidelity's file)")
    weights.add_argument("--random-features", action="store_true", help="random Inception weights, layer 192")
    args = parser.parse_args()

    out = args.out or args.run / "orders"
    out.mkdir(parents=True, exist_ok=True)
    layer: list[str] = []
    if args.random_features:
        from vqtool.eval.features import write_random_weights

        weights_path = out / "inception-random.pth"
        if not weights_path.exists():
            write_random_weights(weights_path, seed=0)
        layer = ["--feature-layer", "192"]
    else:
        weights_path = args.feature_weights
    for steps in args.steps:
        for schedule, order in SETTINGS:
            scores = []
            for seed in args.seeds:
                name = f"{schedule}-{order}-{steps}-s{seed}"
                vqtool("sample", "--run", str(args.run), "--n", str(args.n), "--steps", str(steps), "--temperature",
                       str(args.temperature), "--schedule", schedule, "--order", order, "--batch-size", "100",
                       "--seed", str(seed), "--device", "cpu", "--out", str(out / name), "--overwrite")
                vqtool("eval", "--run", str(args.run), "--fake", str(out / name), "--metrics", "fid,kid,prdc",
                       "--n", str(args.n), "--n-real", str(args.n_real), "--real", "train", "--feature-weights",
                       str(weights_path), *layer, "--no-download", "--name", f"orders-{name}", "--device", "cpu",
                       "--overwrite")
                scores.append(json.loads((args.run / "eval" / f"orders-{name}.json").read_text())["metrics"])
            fid = [s["fid"] for s in scores]
            kid = [1000 * s["kid_mean"] for s in scores]
            print(f"{schedule:10s} {order:7s} {steps:3d} steps  FID {' '.join(f'{v:.2f}' for v in fid)} "
                  f"(mean {statistics.mean(fid):.2f})  KID×1000 {' '.join(f'{v:.1f}' for v in kid)} "
                  f"(mean {statistics.mean(kid):.1f})  recall {statistics.mean(s['recall'] for s in scores):.3f}  "
                  f"coverage {statistics.mean(s['coverage'] for s in scores):.3f}", flush=True)


if __name__ == "__main__":
    main()
