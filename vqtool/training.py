"""The training loop both trainers share: steps, logs, evaluation, checkpoints, resume, Ctrl-C, NaN.

A trainer (train-vq, train-prior) implements `TrainTask`: one optimisation step, an evaluation, and
its state as a nested dict. This module owns everything around that, so the guarantees are written
once: checkpoints are atomic safetensors, resume restores model, optimizer, EMA, step, data position
and every random state, Ctrl-C finishes the current step, saves and stops, and a non-finite loss
stops the run without overwriting the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vqtool import statepack
from vqtool.artifacts import atomic_write_text, load_artifact, save_artifact
from vqtool.console import console, progress
from vqtool.distributed import ProcessInfo, process_info
from vqtool.errors import VqtoolError


@dataclass
class LoopSettings:
    max_steps: int | None = None
    max_minutes: float | None = None
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 500


class TrainTask(Protocol):
    stage: str  # "train-vq" or "train-prior": names the log and checkpoint files
    checkpoint_kind: str  # artifact kind of the resumable checkpoint
    step: int  # optimisation steps completed

    def train_step(self) -> dict[str, float]:
        """Run one optimisation step, advance `step`, return scalars to log."""

    def evaluate(self) -> dict[str, float]:
        """Validation metrics (and any PNG grids); called every `eval_every` steps on every rank."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: models, optimizers, EMA, data position, generators."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def resume_key(self) -> dict[str, Any]:
        """Settings that must not change across a resume (model shape, data); compared on --resume."""

    def export(self) -> list[Path]:
        """Write the stage's output artifact(s); called when the run stops for any reason but NaN."""


@dataclass
class LoopResult:
    step: int
    reason: str  # "max-steps", "max-minutes", "interrupted", "early-stop"
    last_train: dict[str, float]
    last_eval: dict[str, float]
    outputs: list[Path]


class Interrupted(Exception):
    """Raised by the CLI layer after a clean Ctrl-C stop, to exit with status 130."""


# --------------------------------------------------------------------------------------------------
# Random state of the process (the task keeps its own generators in its state_dict)


def _global_rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(task: TrainTask, path: Path) -> None:
    state = {"step": task.step, "task": task.state_dict(), "rng": _global_rng_state()}
    tensors, skeleton = statepack.pack(state)
    save_artifact(
        path,
        task.checkpoint_kind,
        tensors,
        config=task.resume_key(),
        extra={"state": skeleton, "step": task.step},
    )


def load_checkpoint(task: TrainTask, path: Path) -> None:
    if not path.exists():
        raise VqtoolError(f"--resume: no checkpoint at {path}; start without --resume")
    art = load_artifact(path, task.checkpoint_kind)
    now = json.loads(json.dumps(task.resume_key()))
    if art.config != now:
        changed = sorted(k for k in set(art.config) | set(now) if art.config.get(k) != now.get(k))
        raise VqtoolError(
            f"{path}: cannot resume, these settings differ from the checkpoint: {', '.join(changed)}"
        )
    state = statepack.unpack(art.tensors, art.extra["state"])
    task.load_state_dict(state["task"])
    task.step = int(state["step"])
    _set_global_rng_state(state["rng"])


# --------------------------------------------------------------------------------------------------
# Logs


class JsonlLog:
    """Append-only JSONL log; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a hard kill
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def start_fresh(self) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, "")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


# --------------------------------------------------------------------------------------------------
# The loop


def run_loop(
    task: TrainTask,
    settings: LoopSettings,
    checkpoint_path: Path,
    log_path: Path,
    resume: bool = False,
    overwrite: bool = False,
    proc: ProcessInfo | None = None,
) -> LoopResult:
    proc = proc or process_info()
    if settings.max_steps is None and settings.max_minutes is None:
        raise VqtoolError("give --max-steps or --max-minutes so the run has an end")
    log = JsonlLog(log_path, enabled=proc.is_main)
    if resume:
        load_checkpoint(task, checkpoint_path)
        log.truncate_after(task.step)
        if proc.is_main:
            console.print(f"resumed {task.stage} from {checkpoint_path} at step {task.step}")
    else:
        if checkpoint_path.exists() and not overwrite:
            raise VqtoolError(
                f"{checkpoint_path} exists; pass --resume to continue it or --overwrite to start again"
            )
        log.start_fresh()

    stop = {"requested": False}

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step, save, stop; second: abort
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not in the main thread (e.g. inside a test runner's worker)
        previous = None

    def checkpoint() -> None:
        state_ready = task.state_dict  # every rank may take part in gathering state
        if proc.is_main:
            save_checkpoint(task, checkpoint_path)
        else:
            state_ready()

    start = time.monotonic()
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    reason = "max-steps"
    total = settings.max_steps
    try:
        with progress() as bar:
            job = bar.add_task(task.stage, total=total, completed=task.step, status="",
                               visible=proc.is_main)
            while True:
                if settings.max_steps is not None and task.step >= settings.max_steps:
                    reason = "max-steps"
                    break
                if settings.max_minutes is not None and time.monotonic() - start >= 60 * settings.max_minutes:
                    reason = "max-minutes"
                    break
                if stop["requested"]:
                    reason = "interrupted"
                    break
                if getattr(task, "finished", False):  # optional: the task decided to stop (early stopping)
                    reason = "early-stop"
                    break
                metrics = task.train_step()
                bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
                if bad:
                    name, value = next(iter(bad.items()))
                    raise VqtoolError(
                        f"{name} became {value} at step {task.step}; stopped without saving. The last good "
                        f"checkpoint is {checkpoint_path} (resume with --resume, perhaps with a lower lr)"
                    )
                last_train = metrics
                bar.update(job, completed=task.step, status=_fmt(metrics))
                if task.step % settings.log_every == 0:
                    log.write({"step": task.step, "split": "train", "time": time.time(), **metrics})
                if task.step % settings.eval_every == 0:
                    last_eval = task.evaluate()
                    log.write({"step": task.step, "split": "val", "time": time.time(), **last_eval})
                    if proc.is_main and last_eval:
                        console.print(f"step {task.step} val: {_fmt(last_eval)}")
                if task.step % settings.checkpoint_every == 0:
                    checkpoint()
        if reason != "interrupted" and (not last_eval or task.step % settings.eval_every != 0):
            last_eval = task.evaluate()
            log.write({"step": task.step, "split": "val", "time": time.time(), **last_eval})
        checkpoint()
        outputs = task.export() if proc.is_main else []
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return LoopResult(task.step, reason, last_train, last_eval, outputs)


# --------------------------------------------------------------------------------------------------
# EMA of weights, shared by both trainers


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)
