"""The training loop both trainers share: steps, logs, evaluation, checkpoints, resume, Ctrl-C, NaN.

A trainer (train-vq, train-prior) implements `TrainTask`: one optimisation step, an evaluation, and
its state as a nested dict. This module owns everything around that, so the guarantees are written
once: checkpoints are atomic safetensors, resume restores model, optimizer, EMA, step, data position
and every random state, Ctrl-C finishes the current step, saves and stops, and a non-finite loss
stops the run without overwriting the last good checkpoint.

Under torchrun (several processes) every rank runs this loop in lockstep: the stop decisions (time
limit, Ctrl-C, early stop) and the logged scalars are agreed on by all ranks every step, only rank 0
writes the log, the progress bar, the checkpoint and the outputs, and the checkpoint holds each rank's
own random state (gathered from every rank). A resume with another number of processes restores what
carries over and re-derives the rest, and says so.
"""

from __future__ import annotations

import hashlib
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
from vqtool.distributed import ProcessInfo, any_across_ranks, gather_states, mean_across_ranks, process_info
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
        """Write the stage's output artifact(s); called on rank 0 when the run stops for any reason but NaN."""

    # Optional, for state that differs between the ranks of a multi-process run (e.g. a per-rank
    # augmentation generator); the loop gathers it from every rank into the checkpoint:
    #   def rank_state_dict(self) -> dict[str, Any]: ...
    #   def load_rank_state_dict(self, state: dict[str, Any] | None) -> None: ...
    # `state` is None for a rank the checkpoint did not have (resumed with more processes): re-derive it.


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


def rank_state(task: TrainTask) -> dict[str, Any]:
    """What this rank alone knows: its global random state and the task's per-rank state, if any."""
    own = task.rank_state_dict() if hasattr(task, "rank_state_dict") else {}
    return {"rng": _global_rng_state(), "task": own}


def save_checkpoint(task: TrainTask, path: Path, ranks: list[dict[str, Any]] | None = None) -> None:
    """Write the task's state; `ranks` holds every rank's `rank_state` (gathered by the loop)."""
    ranks = ranks if ranks is not None else [rank_state(task)]
    state = {"step": task.step, "task": task.state_dict(), "rng": ranks[0]["rng"], "ranks": ranks}
    tensors, skeleton = statepack.pack(state)
    save_artifact(
        path,
        task.checkpoint_kind,
        tensors,
        config=task.resume_key(),
        extra={"state": skeleton, "step": task.step, "world_size": len(ranks)},
    )


def load_checkpoint(task: TrainTask, path: Path, proc: ProcessInfo | None = None) -> int:
    """Restore `task` and this rank's random state from `path`; returns the world size that wrote it.

    Rank r restores rank r's saved state when the checkpoint has one; a rank it did not have (the run
    resumes with more processes) gets fresh streams derived from rank 0's state and its rank number.
    """
    proc = proc or process_info()
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
    ranks = state.get("ranks") or [{"rng": state["rng"], "task": None}]  # older single-process checkpoints
    if proc.rank < len(ranks):
        _set_global_rng_state(ranks[proc.rank]["rng"])
        own = ranks[proc.rank]["task"]
    else:
        _set_global_rng_state(ranks[0]["rng"])
        _reseed_global_rng(ranks[0]["rng"]["torch"], proc.rank)
        own = None
    if hasattr(task, "load_rank_state_dict") and (own or proc.rank >= len(ranks)):
        task.load_rank_state_dict(own)
    return int(art.extra.get("world_size", len(ranks)))


def _reseed_global_rng(base: torch.Tensor, rank: int) -> None:
    digest = hashlib.sha256(base.numpy().tobytes() + f"/rank{rank}".encode()).digest()
    seed = int.from_bytes(digest[:8], "little") & (2**63 - 1)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


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
        saved_world = load_checkpoint(task, checkpoint_path, proc)
        log.truncate_after(task.step)
        if proc.is_main:
            console.print(f"resumed {task.stage} from {checkpoint_path} at step {task.step}")
            if saved_world != proc.world_size:
                kept = min(saved_world, proc.world_size)
                fresh = f", ranks {kept}-{proc.world_size - 1} start fresh ones" if proc.world_size > kept else ""
                console.print(
                    f"[yellow]note:[/yellow] the checkpoint was written by {saved_world} process(es), this run has "
                    f"{proc.world_size}: ranks 0-{kept - 1} keep their own random streams{fresh}"
                )
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
        # Every rank takes part in gathering the per-rank states; rank 0 alone writes.
        ranks = gather_states(rank_state(task)) if proc.distributed else None
        if proc.is_main:
            save_checkpoint(task, checkpoint_path, ranks)

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
                # Decided together: a rank that stopped alone would leave the others waiting forever.
                out_of_time, interrupted, finished = any_across_ranks([
                    settings.max_minutes is not None and time.monotonic() - start >= 60 * settings.max_minutes,
                    stop["requested"],
                    getattr(task, "finished", False),  # optional: the task decided to stop (early stopping)
                ])
                if out_of_time:
                    reason = "max-minutes"
                    break
                if interrupted:
                    reason = "interrupted"
                    break
                if finished:
                    reason = "early-stop"
                    break
                metrics = mean_across_ranks(task.train_step())  # the global batch's numbers, on every rank
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
