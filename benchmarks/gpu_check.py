"""GPU self-check: does vqtool work on this CUDA machine? One command, one table, a few minutes on one GPU.

    python benchmarks/gpu_check.py                     # on a machine with CUDA
    python benchmarks/gpu_check.py --json gpu.json     # also write the numbers (loader_throughput.py reads them)
    python benchmarks/gpu_check.py --allow-cpu         # a dry run of the check itself on CPU: fp32, tiny sizes

Each row of the table is PASS, FAIL or SKIP (with the reason); the exit status is 1 when a row fails, 2 when
there is no CUDA device (and no --allow-cpu).

stages      Every stage end to end through the `vqtool` command on synthetic 32-px shapes, on the GPU in
            `--precision auto` (bf16 where the GPU has it, else fp16): prepare, train-vq (discriminator and
            DiffAugment on for its second half), reconstruct, encode, decode, train-prior (absorbing and
            autoregressive), sample from each, inpaint, eval (recon, nll) and neighbours. Each must exit 0 and
            report the precision it ran in. neighbours is skipped without LPIPS weights (--lpips-weights).
cpu = gpu   Training steps of train-vq and of the autoregressive train-prior on CPU in fp32 and on the GPU
            in fp32 (TF32 off: NVIDIA_TF32_OVERRIDE=0) from the same seed: every logged loss must agree within
            TOLERANCE (relative). k-means, code restarts and the discriminator are off, since they branch on
            near-ties. The absorbing prior is not compared: its masks come from a generator on the device,
            and CUDA's random stream differs from the CPU's for the same seed.
several     With 2 or more GPUs: train-vq and train-prior with `--nproc-per-node 2`, then each resumed on one
GPUs        GPU with --grad-accum 2 (the same global batch).
throughput  Training steps of the prior's `bench` config (recipes/bench-prior.yaml, 16×16 tokens, 1024 codes,
            batch 16) and of the 256-px VQGAN recipe (recipes/ffhq-256.yaml, batch 4, a random-weight
            LPIPS-VGG) in auto precision, as a fraction of a bf16 matmul (8192²) measured in the same run.
            FLOPs: benchmarks/prior_throughput.py's count for the prior, torch's FlopCounterMode for the VQGAN.

The dry run (--allow-cpu) runs the same logic on CPU with fp32 everywhere, smaller step counts, the CPU
against itself in `cpu = gpu`, `--nproc-per-node 2` as CPU processes, the prior at batch 2, and the
32-px VQGAN recipe instead of the 256-px one; its numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import torch  # noqa: E402

TOLERANCE = 1e-3  # relative, per logged loss: fp32 on both sides, TF32 off


@dataclass
class Sizes:
    images: int  # synthetic 32-px shapes
    train_steps: int  # per training stage
    compare_steps: int  # cpu = gpu
    bench_steps: int  # timed steps per throughput measurement
    prior_batch: int  # of the bench config (16 is the config's)
    vqgan: tuple[str, int]  # recipe, batch


GPU = Sizes(images=512, train_steps=40, compare_steps=5, bench_steps=10, prior_batch=16, vqgan=("ffhq-256", 4))
DRY = Sizes(images=64, train_steps=2, compare_steps=2, bench_steps=1, prior_batch=2, vqgan=("cifar10-32", 2))


@dataclass
class Row:
    section: str
    check: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float


class Check:
    """The rows so far, printed as they come (a run takes minutes) and as one table at the end."""

    def __init__(self):
        self.rows: list[Row] = []
        self.numbers: dict[str, object] = {}

    def add(self, section: str, check: str, status: str, detail: str, seconds: float) -> None:
        self.rows.append(Row(section, check, status, detail, seconds))
        print(f"  {status:4}  {section} / {check}: {detail} ({seconds:.1f} s)", flush=True)

    @property
    def failed(self) -> bool:
        return any(r.status == "FAIL" for r in self.rows)

    def table(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="vqtool GPU check", title_justify="left")
        for name in ("section", "check", "status", "detail", "time"):
            table.add_column(name, justify="right" if name == "time" else "left")
        colour = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
        for r in self.rows:
            table.add_row(r.section, r.check, f"[{colour[r.status]}]{r.status}[/]", r.detail, f"{r.seconds:.0f} s")
        Console(width=160).print(table)


def vqtool(args: list, env: dict[str, str] | None = None, timeout: float = 900) -> tuple[int, str, float]:
    """Run `python -m vqtool ARGS` from this checkout; (exit status, stdout + stderr, seconds)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "vqtool", *map(str, args)], cwd=REPO, env=environment,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s", time.perf_counter() - start
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def last_line(output: str) -> str:
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or ["(no output)"])[-1][:150]


def reports(output: str, precision: str) -> bool:
    """Does a stage's summary table name the precision it ran in?"""
    return re.search(rf"precision\W+{precision}\b", output) is not None


def tiny_recipe(path: Path, steps: int) -> Path:
    # The quickstart's VQ, smaller; the discriminator and DiffAugment join halfway.
    path.write_text(f"""\
vq: {{ch: 16, ch_mult: [1, 2, 2], num_res_blocks: 1, attn_resolutions: [], z_channels: 16, codebook_size: 64,
     code_dim: 16}}
train_vq: {{batch_size: 16, lr: 1.0e-3, perceptual: none, disc_start: {max(1, steps // 2)}, disc_layers: 1,
           kmeans_batches: 2, log_every: 1, eval_every: {steps}, checkpoint_every: {steps}, eval_images: 32,
           grid_images: 4}}
""")
    return path


PRIOR = ["--layers", 2, "--width", 64, "--heads", 4, "--batch-size", 16, "--set", "warmup_steps=0",
         "--set", "val_batches=1", "--set", "val_nll_samples=2", "--set", "log_every=1"]


def write_images(folder: Path, n: int = 4) -> list[Path]:
    from PIL import Image

    from vqtool.data.synthetic import render_shape

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        array, _ = render_shape(10_000 + i, 48)
        files.append(folder / f"shape-{i}.png")
        Image.fromarray(array).save(files[-1])
    return files


# --------------------------------------------------------------------------------------------------
# 1. Every stage end to end


def check_stages(check: Check, work: Path, device: str, precision: str, sizes: Sizes, lpips: Path | None) -> Path:
    run = work / "run"
    recipe = tiny_recipe(work / "tiny.yaml", sizes.train_steps)
    images = write_images(work / "images")
    steps = sizes.train_steps
    on = ["--device", device, "--precision", "auto"]
    neighbours = ["--lpips-weights", lpips] if lpips else []
    stages = [
        ("prepare", ["prepare", "--synthetic", "shapes", "--count", sizes.images, "--size", 32, "--run", run,
                     "--workers", 2], False),
        ("train-vq", ["train-vq", "--run", run, "--config", recipe, "--max-steps", steps, *on], True),
        ("reconstruct", ["reconstruct", *images, "--run", run, *on], True),
        ("encode", ["encode", "--run", run, *on], True),
        ("decode", ["decode", "--run", run, "--limit", 8, *on], True),
        ("train-prior", ["train-prior", "--run", run, *PRIOR, "--timesteps", 32, "--max-steps", steps,
                         "--eval-every", steps, "--set", f"checkpoint_every={steps}", *on], True),
        ("train-prior (AR)", ["train-prior", "--run", run, "--prior", "autoregressive", "--out",
                              run / "prior-ar.safetensors", *PRIOR, "--max-steps", steps, "--eval-every", steps,
                              "--set", f"checkpoint_every={steps}", *on], True),
        ("sample", ["sample", "--run", run, "--n", 8, "--steps", 8, *on], True),
        ("sample (AR)", ["sample", "--run", run, "--prior", run / "prior-ar.safetensors", "--out",
                         run / "samples-ar", "--n", 4, *on], True),
        ("inpaint", ["inpaint", images[0], "--run", run, "--box", "12,12,36,36", "--n", 2, "--steps", 8, *on], True),
        ("eval", ["eval", "--run", run, "--metrics", "recon,nll", "--no-download", "--recon-n", 16, "--nll-n", 16,
                  *on], True),
        ("neighbours", ["neighbours", "--run", run, "--n", 4, "--n-val", 4, "--no-download", *neighbours, *on], True),
    ]
    for name, args, runs_a_model in stages:
        code, out, seconds = vqtool(args)
        if name == "neighbours" and code != 0 and not lpips and "weights" in out.lower():
            check.add("stages", name, "SKIP", "no LPIPS weights here; pass --lpips-weights PATH", seconds)
        elif code != 0:
            check.add("stages", name, "FAIL", f"exit {code}: {last_line(out)}", seconds)
        elif runs_a_model and not reports(out, precision):
            check.add("stages", name, "FAIL", f"its summary does not say it ran in {precision}", seconds)
        else:
            check.add("stages", name, "PASS", f"ran in {precision}" if runs_a_model else "ok", seconds)
    return run


# --------------------------------------------------------------------------------------------------
# 2. The same losses on CPU and GPU


def train_losses(log: Path) -> list[float]:
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [float(r["loss"]) for r in records if r.get("split") == "train"]


def compare(check: Check, name: str, commands: dict[str, tuple[list, dict, Path]]) -> None:
    losses, seconds = {}, 0.0
    for side, (args, env, log) in commands.items():
        code, out, took = vqtool(args, env)
        seconds += took
        if code != 0:
            check.add("cpu = gpu", name, "FAIL", f"{side}: exit {code}: {last_line(out)}", seconds)
            return
        losses[side] = train_losses(log)
    a, b = losses.values()
    if not a or len(a) != len(b):
        check.add("cpu = gpu", name, "FAIL", f"logged {len(a)} and {len(b)} training steps", seconds)
        return
    worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))
    status = "PASS" if worst <= TOLERANCE else "FAIL"
    check.add("cpu = gpu", name, status, f"{len(a)} steps, largest relative loss difference {worst:.1e} "
              f"(tolerance {TOLERANCE:g}); last loss {a[-1]:.5f} vs {b[-1]:.5f}", seconds)
    check.numbers[f"cpu_gpu_{name}"] = worst


def check_cpu_equals_gpu(check: Check, work: Path, run: Path, device: str, sizes: Sizes) -> None:
    steps = sizes.compare_steps
    recipe = work / "tiny.yaml"
    exact = {"NVIDIA_TF32_OVERRIDE": "0"}  # fp32 matmuls and convolutions, not TF32
    sides = {"cpu": ("cpu", {}), device: (device, exact)}
    if device == "cpu":  # the dry run: the CPU against itself
        sides = {"cpu": ("cpu", {}), "cpu again": ("cpu", {})}
    vq, prior = {}, {}
    for i, (side, (dev, env)) in enumerate(sides.items()):
        folder = work / f"compare-{i}"
        vq[side] = (["train-vq", "--run", folder, "--shards", run / "shards", "--config", recipe, "--max-steps",
                     steps, "--disc-start", 10**6, "--set", "kmeans_init=false", "--set", "restart_threshold=0",
                     "--device", dev, "--precision", "fp32"], env, folder / "train-vq.jsonl")
        prior[side] = (["train-prior", "--run", folder, "--latents", run / "latents.safetensors", "--prior",
                        "autoregressive", *PRIOR, "--max-steps", steps, "--eval-every", 10**6, "--device", dev,
                        "--precision", "fp32"], env, folder / "train-prior.jsonl")
    compare(check, "train-vq", vq)
    compare(check, "train-prior (AR)", prior)


# --------------------------------------------------------------------------------------------------
# 3. Several GPUs


def check_several(check: Check, work: Path, run: Path, device: str) -> None:
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if device == "cuda" and gpus < 2:
        check.add("several GPUs", "--nproc-per-node 2", "SKIP", f"{gpus} GPU on this machine", 0.0)
        return
    code, out, seconds = vqtool(["train-vq", "--help"])
    if "--nproc-per-node" not in out:
        status = "SKIP" if device == "cpu" else "FAIL"
        check.add("several GPUs", "--nproc-per-node 2", status, "this vqtool has no --nproc-per-node", seconds)
        return
    recipe = work / "tiny.yaml"
    folder = work / "several"
    trainers = {
        "train-vq": ["train-vq", "--run", folder, "--shards", run / "shards", "--config", recipe,
                     "--set", "checkpoint_every=2", "--device", device],
        "train-prior": ["train-prior", "--run", folder, "--latents", run / "latents.safetensors", *PRIOR,
                        "--timesteps", 32, "--eval-every", 2, "--set", "checkpoint_every=2", "--device", device],
    }
    for name, args in trainers.items():
        code, out, seconds = vqtool([*args, "--max-steps", 2, "--nproc-per-node", 2])
        if code != 0:
            check.add("several GPUs", f"{name} --nproc-per-node 2", "FAIL", f"exit {code}: {last_line(out)}", seconds)
            continue
        check.add("several GPUs", f"{name} --nproc-per-node 2", "PASS", "2 processes, 2 steps", seconds)
        code, out, seconds = vqtool([*args, "--max-steps", 4, "--resume", "--grad-accum", 2])
        if code != 0:
            check.add("several GPUs", f"{name} resumed on 1", "FAIL", f"exit {code}: {last_line(out)}", seconds)
        elif "written by 2 process(es)" not in out:
            check.add("several GPUs", f"{name} resumed on 1", "FAIL", "no note of the 2-process checkpoint", seconds)
        else:
            check.add("several GPUs", f"{name} resumed on 1", "PASS", "1 process × grad-accum 2, to step 4", seconds)


# --------------------------------------------------------------------------------------------------
# 4. Throughput against a bf16 matmul


def flops(tflops: float) -> str:
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{1000 * tflops:.1f} GFLOP/s"


def matmul_tflops(device: torch.device) -> tuple[float, str]:
    """TFLOP/s of square matmuls: bf16 8192² on a GPU; fp32 1024² in the dry run (bf16 is slow on CPUs)."""
    from vq_throughput import matmul_peak

    n, dtype, repeats = (8192, torch.bfloat16, 20) if device.type == "cuda" else (1024, torch.float32, 5)
    label = f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} matmul {n}²"
    return matmul_peak(device, n, repeats, dtype) / 1e3, label


def prior_bench(device: torch.device, precision: str, sizes: Sizes, work: Path) -> tuple[float, float]:
    """(seconds per step, FLOP per step) of the `bench` prior's training step."""
    from prior_throughput import step_flops, synthetic_latents
    from vq_throughput import sync

    from vqtool.config import load_recipe
    from vqtool.prior.train import PriorTrainTask, TrainPriorConfig

    recipe = load_recipe(REPO / "recipes" / "bench-prior.yaml")
    settings = {**recipe["prior"], **recipe["train_prior"], "batch_size": sizes.prior_batch, "warmup_steps": 0,
                "max_steps": 10**9, "device": device.type}
    latents = synthetic_latents(1024, (16, 16), 4 * sizes.prior_batch, 0)
    task = PriorTrainTask(TrainPriorConfig(**settings), latents, "0" * 64, work / "unused.safetensors", device,
                          precision=precision)
    for _ in range(2):  # warm-up: kernels, allocator, the fused AdamW
        task.train_step()
    sync(device)
    start = time.perf_counter()
    for _ in range(sizes.bench_steps):
        task.train_step()
    sync(device)
    return (time.perf_counter() - start) / sizes.bench_steps, step_flops(task.model_cfg, sizes.prior_batch)


def check_throughput(check: Check, device: torch.device, precision: str, sizes: Sizes, work: Path) -> None:
    from vq_throughput import bench_recipe

    start = time.perf_counter()
    peak, label = matmul_tflops(device)
    check.add("throughput", label, "PASS", f"{flops(peak)} (the reference)", time.perf_counter() - start)
    check.numbers["matmul_tflops"] = peak
    try:
        start = time.perf_counter()
        seconds, step_flop = prior_bench(device, precision, sizes, work)
        achieved = step_flop / seconds / 1e12
        check.add("throughput", f"prior bench, batch {sizes.prior_batch}", "PASS",
                  f"{1 / seconds:.2f} steps/s, {flops(achieved)} = {achieved / peak:.1%} of the matmul",
                  time.perf_counter() - start)
        check.numbers["prior_bench"] = {"steps_per_s": 1 / seconds, "tflops": achieved, "fraction": achieved / peak}
    except Exception as exc:  # a row, not a crash: the other measurements still count
        check.add("throughput", "prior bench", "FAIL", f"{type(exc).__name__}: {exc}"[:150],
                  time.perf_counter() - start)
    recipe, batch = sizes.vqgan
    try:
        start = time.perf_counter()
        rows = bench_recipe(recipe, batch, sizes.bench_steps, device, work, precision)
        _, what, gflop, sec, images, gflops, _, _ = rows[0]  # the autoencoder's step
        achieved = gflops / 1e3
        check.add("throughput", f"VQGAN {recipe}, batch {batch}", "PASS",
                  f"{images:.1f} images/s, {flops(achieved)} = {achieved / peak:.1%} of the matmul "
                  f"(with the discriminator: {rows[1][4]:.1f} images/s)", time.perf_counter() - start)
        check.numbers["vqgan"] = {"recipe": recipe, "batch": batch, "images_per_s": images,
                                  "images_per_s_with_discriminator": rows[1][4], "tflops": achieved,
                                  "fraction": achieved / peak}
    except Exception as exc:
        check.add("throughput", f"VQGAN {recipe}", "FAIL", f"{type(exc).__name__}: {exc}"[:150],
                  time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allow-cpu", action="store_true", help="Without CUDA: a quick dry run of the check on CPU.")
    ap.add_argument("--json", type=Path, help="Write every row and measurement here.")
    ap.add_argument("--lpips-weights", type=Path, help="torchvision AlexNet weights for the neighbours stage.")
    ap.add_argument("--keep", type=Path, help="Work in this folder and keep it (default: a temporary one).")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): run it on a machine with a GPU, "
              "or pass --allow-cpu for a dry run of the check itself", file=sys.stderr)
        return 2
    from vqtool.precision import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision("auto", device)
    sizes = GPU if device.type == "cuda" else DRY
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"vqtool GPU check on {name}: torch {torch.__version__}, precision auto = {precision}", flush=True)
    check = Check()
    check.numbers.update(device=name, precision=precision, torch=torch.__version__)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vqtool-gpu-check-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run = check_stages(check, work, device.type, precision, sizes, args.lpips_weights)
        if (run / "latents.safetensors").exists():
            check_cpu_equals_gpu(check, work, run, device.type, sizes)
            check_several(check, work, run, device.type)
        else:
            check.add("cpu = gpu", "both trainers", "SKIP", "the stages did not get as far as latents", 0.0)
        check_throughput(check, device, precision, sizes, work)
    check.table()
    print(f"{'FAILED' if check.failed else 'passed'} in {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in check.rows], **check.numbers}, indent=1))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
