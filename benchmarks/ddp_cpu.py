"""CPU throughput of one process × 2 threads against 2 processes × 1 thread (torchrun, gloo), both trainers.

Both layouts train on the same global batch (one process with batch 2B, or 2 ranks with batch B each),
through the real command lines:

    python -m vqtool train-vq ...                                        OMP_NUM_THREADS=2
    torchrun --nproc_per_node=2 -m vqtool -- train-vq ...                OMP_NUM_THREADS=1 per rank

A third layout, one process × 1 thread, separates what the second core brings from what threads cost
(on a busy machine a thread that waits at every OpenMP barrier for a descheduled sibling is slow).

Models are the CPU-sized ones of recipes/cifar10-32.yaml: the VQGAN (ch 32, 8×8 tokens of 512 codes)
with the discriminator and DiffAugment on from the first step, and the absorbing prior (6 blocks of
width 256) on random 8×8 token grids. Throughput is measured from the JSONL log, between the train
records of step `--warmup` and of the last step, so start-up, k-means and the final evaluation are left
out. The layouts alternate for `--rounds` rounds and the medians are printed with their ratio: the
machine may be shared, so only ratios from one run mean much (the load average is printed too).

    PYTHONPATH=. python benchmarks/ddp_cpu.py            # synthetic 32-px shapes, 2 rounds
    PYTHONPATH=. python benchmarks/ddp_cpu.py --shards runs/cifar10/shards --steps 20 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

VQ = {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8], "z_channels": 32,
      "codebook_size": 512, "code_dim": 16, "kmeans_init": True, "restart_threshold": 0.1}
TRAIN_VQ = {"lr": 3.0e-4, "perceptual": "none", "disc_start": 1, "disc_layers": 1, "disc_ch": 32,
            "diffaug": ["color", "translation", "cutout"], "kmeans_batches": 2, "log_every": 1,
            "eval_every": 100000, "checkpoint_every": 100000, "eval_images": 16, "grid_images": 2}
PRIOR = {"n_layer": 6, "n_embd": 256, "n_head": 8}
TRAIN_PRIOR = {"timesteps": 256, "warmup_steps": 10, "log_every": 1, "eval_every": 100000,
               "checkpoint_every": 100000, "val_batches": 1, "val_nll_samples": 1}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_inputs(work: Path, shards: Path | None) -> tuple[Path, Path]:
    from vqtool.latents import Latents, Split, save_latents

    if shards is None:
        from vqtool.data.prepare import PrepareSettings, prepare_synthetic

        shards = work / "shards"
        prepare_synthetic(shards, "shapes", 2000, PrepareSettings(size=32, val_fraction=0.02, shard_size=100,
                                                                  workers=1), seed=0, show_progress=False)
    g = torch.Generator().manual_seed(0)

    def split(n):
        return Split(torch.randint(0, 512, (n, 8, 8), generator=g, dtype=torch.int16),
                     torch.randint(0, 10, (n,), generator=g))

    latents = work / "latents.safetensors"
    save_latents(latents, Latents(splits={"train": split(5000), "val": split(64)}, codebook_size=512,
                                  latent_shape=(8, 8), image_size=32, classes=[str(i) for i in range(10)]),
                 parents={"vq": "0" * 64})
    return shards, latents


def command(stage: str, run: Path, processes: int, threads: int, batch: int, steps: int, recipe: Path,
            shards: Path, latents: Path) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        cmd = [sys.executable, "-m", "vqtool"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "vqtool", "--"]
    cmd += [stage, "--run", str(run), "--config", str(recipe), "--max-steps", str(steps), "--batch-size",
            str(batch), "--device", "cpu", "--overwrite"]
    if stage == "train-vq":
        cmd += ["--shards", str(shards)]
    else:
        cmd += ["--latents", str(latents), "--threads", str(threads)]
    return cmd, env


def measure(stage: str, run: Path, processes: int, threads: int, batch: int, steps: int, warmup: int,
            **paths) -> float:
    """Images per second of the global batch between the train records of step `warmup` and the last."""
    cmd, env = command(stage, run, processes, threads, batch, steps, **paths)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    times = {}
    for line in (run / f"{stage}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train":
            times[record["step"]] = record["time"]
    return batch * processes * (steps - warmup) / (times[steps] - times[warmup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, help="Prepared 32-px shards (default: synthetic shapes).")
    parser.add_argument("--steps", type=int, default=12, help="Steps per measurement (default 12).")
    parser.add_argument("--warmup", type=int, default=2, help="Steps left out at the start (default 2).")
    parser.add_argument("--rounds", type=int, default=2, help="Alternations of the two layouts (default 2).")
    parser.add_argument("--vq-batch", type=int, default=32, help="Global train-vq batch (default 32).")
    parser.add_argument("--prior-batch", type=int, default=32, help="Global train-prior batch (default 32).")
    parser.add_argument("--only", choices=["train-vq", "train-prior"], help="Measure one trainer.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ddp-cpu-") as tmp:
        work = Path(tmp)
        shards, latents = make_inputs(work, args.shards)
        recipe = work / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"vq": VQ, "train_vq": TRAIN_VQ, "prior": PRIOR,
                                          "train_prior": TRAIN_PRIOR}))
        paths = dict(recipe=recipe, shards=shards, latents=latents)
        print(f"load average before: {os.getloadavg()[0]:.2f}  (2 cores; torch {torch.__version__})")
        stages = [args.only] if args.only else ["train-vq", "train-prior"]
        for stage in stages:
            batch = args.vq_batch if stage == "train-vq" else args.prior_batch
            layouts = [(1, 2), (2, 1), (1, 1)]  # (processes, threads each)
            rates: dict[tuple[int, int], list[float]] = {layout: [] for layout in layouts}
            for r in range(args.rounds):
                for processes, threads in layouts if r % 2 == 0 else layouts[::-1]:
                    run = work / f"{stage}-{processes}p{threads}t-{r}"
                    run.mkdir()
                    rate = measure(stage, run, processes, threads, batch // processes, args.steps, args.warmup,
                                   **paths)
                    rates[(processes, threads)].append(rate)
                    print(f"  {stage} round {r + 1}: {processes} process(es) × {threads} thread(s), "
                          f"batch {batch // processes} each: {rate:.1f} images/s", flush=True)
            med = {layout: statistics.median(v) for layout, v in rates.items()}
            print(f"{stage} (global batch {batch}, images/s): 1×2 {med[(1, 2)]:.1f}, 2×1 {med[(2, 1)]:.1f}, "
                  f"1×1 {med[(1, 1)]:.1f}; 2×1 / 1×2 = {med[(2, 1)] / med[(1, 2)]:.2f}, "
                  f"2×1 / 1×1 = {med[(2, 1)] / med[(1, 1)]:.2f}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
