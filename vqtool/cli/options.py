"""Options shared by several commands, declared once so their names and help agree everywhere."""

from __future__ import annotations

from pathlib import Path

import typer

Run = typer.Option(Path("runs/default"), "--run", help="Run folder: standard input and output names live here.")
Device = typer.Option("auto", "--device", help="auto, cpu or cuda.")
Precision = typer.Option("auto", "--precision", help="auto (fp32 on CPU; bf16 on GPUs that have it, else fp16), "
                                                     "fp32, bf16 or fp16 (CUDA only). Artifacts stay fp32.")
Seed = typer.Option(0, "--seed", help="Seed for every random choice of the stage.")
Config = typer.Option(None, "--config", help="Recipe YAML; its section for this stage sets the defaults.")
Set = typer.Option(None, "--set", help="Override a recipe setting: --set key=value (repeatable).")
Overwrite = typer.Option(False, "--overwrite", help="Replace existing outputs instead of refusing.")

NprocPerNode = typer.Option(
    1, "--nproc-per-node", help="Train with N processes on this machine: one per GPU, or CPU processes (gloo) "
    "without CUDA. Starts them itself (torchrun's launcher); for several nodes use torchrun.")

# Sampling: `sample`, `inpaint`, `eval` and `neighbours` draw with the same settings (vqtool.prior.sample).
Steps = typer.Option(None, "--steps", help="Unmasking steps over the whole grid (default 50; = tokens: one per step).")
Temperature = typer.Option(None, "--temperature", help="Softmax temperature of every draw (default 1.0).")
Schedule = typer.Option(None, "--schedule", help="Absorbing prior: random (the paper's, default) | confidence "
                                                 "(MaskGIT).")
Curve = typer.Option(None, "--curve", help="Confidence schedule: cosine (default) | arccos.")
TopK = typer.Option(None, "--top-k", help="Draw only among the k most likely codes.")
TopP = typer.Option(None, "--top-p", help="Draw only from the smallest set of codes with this probability mass.")
Order = typer.Option(None, "--order", help="Which masked tokens come first: random (default) | halton (spread "
                                          "over the grid) | raster (random schedule only).")
Guidance = typer.Option(None, "--guidance", help="Classifier-free guidance scale S (default 0: plain conditional "
                                                 "sampling; class-conditional priors; ~2x compute per step).")
GuidanceSchedule = typer.Option(None, "--guidance-schedule", help="constant (default) | linear (0 at the first "
                                                                  "step up to S at the last).")
Quantize = typer.Option("none", "--quantize", help="none | int8 (dynamic int8 Linear layers; CPU only, faster).")
Prior = typer.Option(None, "--prior", help="Prior artifact (default: RUN/prior.safetensors).")
VQ = typer.Option(None, "--vq", help="VQ artifact the prior's latents came from (default: RUN/vq.safetensors).")
Shards = typer.Option(None, "--shards", help="Shards folder (default: RUN/shards).")
Threads = typer.Option(
    None, "--threads", help="CPU threads for torch (default: torch's own). 1 is fastest on a busy shared machine.")


def apply_threads(threads: int | None) -> None:
    """--threads N: set torch's CPU threads (None or 0 keeps torch's default)."""
    from vqtool.errors import VqtoolError

    if threads is not None and threads < 0:
        raise VqtoolError(f"--threads {threads}: must be 0 (default) or more")
    if threads:
        import torch

        torch.set_num_threads(threads)
