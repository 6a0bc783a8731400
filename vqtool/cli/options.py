"""Options shared by several commands, declared once so their names and help agree everywhere."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import typer

Run = typer.Option(Path("runs/default"), "--run", help="Run folder: standard input and output names live here.")
Device = typer.Option("auto", "--device", help="auto, cpu or cuda.")
Precision = typer.Option("auto", "--precision", help="auto (fp32 on CPU; bf16 on GPUs that have it, else fp16), "
                                                     "fp32, bf16 or fp16 (CUDA only). Artifacts stay fp32.")
Seed = typer.Option(0, "--seed", help="Seed for every random choice of the stage.")
Config = typer.Option(None, "--config", help="Recipe YAML; its section for this stage sets the defaults.")
Set = typer.Option(None, "--set", help="Override a recipe setting: --set key=value (repeatable).")
Overwrite = typer.Option(False, "--overwrite", help="Replace existing outputs instead of refusing.")

TensorBoard = typer.Option(
    None, "--tensorboard/--no-tensorboard", help="Also write the log's scalars (and the evaluation grids) as "
    "TensorBoard events in RUN/tensorboard/STAGE; needs `pip install vqtool[tensorboard]`.")

NprocPerNode = typer.Option(
    1, "--nproc-per-node", help="Train with N processes on this machine: one per GPU, or CPU processes (gloo) "
    "without CUDA. Starts them itself (torchrun's launcher); for several nodes use torchrun.")


class OptionGroup:
    """Parameters several commands share, written once. `@group` appends them to a command's signature (typer
    reads `__signature__`) and hands their values to the command as one argument, named like the group: a
    namespace of the values, or what `make(**values)` returns."""

    def __init__(self, name: str, params: dict[str, tuple[type, Any]], make: Callable[..., Any] | None = None):
        self.name, self.params, self.make = name, params, make

    def __call__(self, fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        if self.name not in sig.parameters:
            raise TypeError(f"{fn.__name__} takes no parameter {self.name!r} for its option group")
        own = [p for p in sig.parameters.values() if p.name != self.name]
        added = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
                 for k, (kind, option) in self.params.items()]

        @functools.wraps(fn)
        def command(*args, **kwargs):
            values = {k: kwargs.pop(k) for k in self.params}
            kwargs[self.name] = self.make(**values) if self.make else SimpleNamespace(**values)
            return fn(*args, **kwargs)

        command.__signature__ = sig.replace(parameters=own + added)
        return command


# Sampling: `sample`, `inpaint`, `eval` and `neighbours` draw with the same settings (vqtool.prior.sample),
# listed under their own heading in --help.
def _draw(name: str, help: str):
    return typer.Option(None, name, help=help, rich_help_panel="Sampling")


Steps = _draw("--steps", "Unmasking steps over the whole grid (default 50; = tokens: one per step).")
Temperature = _draw("--temperature", "Softmax temperature of every draw (default 1.0).")
Schedule = _draw("--schedule", "Absorbing prior: random (the paper's, default) | confidence (MaskGIT).")
Curve = _draw("--curve", "Confidence schedule: cosine (default) | arccos.")
TopK = _draw("--top-k", "Draw only among the k most likely codes.")
TopP = _draw("--top-p", "Draw only from the smallest set of codes with this probability mass.")
Order = _draw("--order", "Which masked tokens come first: random (default) | halton (spread over the grid) | raster "
                         "(random schedule only).")
Guidance = _draw("--guidance", "Classifier-free guidance scale S (default 0: plain conditional sampling; "
                               "class-conditional priors; ~2x compute per step).")
GuidanceSchedule = _draw("--guidance-schedule", "constant (default) | linear (0 at the first step up to S at the "
                                                "last).")
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


# The draw settings of vqtool.prior.sample.SampleSettings that every sampling command takes: `vars(sampling)`.
sampling = OptionGroup("sampling", {
    "steps": (int, Steps), "temperature": (float, Temperature), "schedule": (str, Schedule), "curve": (str, Curve),
    "order": (str, Order), "top_k": (int, TopK), "top_p": (float, TopP), "guidance": (float, Guidance),
    "guidance_schedule": (str, GuidanceSchedule)})

def _with_threads(threads: int | None, **values) -> SimpleNamespace:
    apply_threads(threads)
    return SimpleNamespace(**values)


# The tail of every sampling command: how it runs and where its settings come from; --threads is applied
# before the stage starts.
common = OptionGroup("common", {
    "seed": (int, Seed), "device": (str, Device), "precision": (str, Precision), "threads": (int, Threads),
    "config": (Path, Config), "set_": (list[str], Set), "overwrite": (bool, Overwrite)}, make=_with_threads)


# Where a model stage runs: `machine.device`, `machine.precision`; --threads is applied before the stage starts.
machine = OptionGroup("machine", {"device": (str, Device), "precision": (str, Precision),
                                  "threads": (int, Threads)}, make=_with_threads)
