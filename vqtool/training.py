"""The training loop both trainers share: steps, logs, evaluation, checkpoints, resume, Ctrl-C, NaN.

A trainer (train-vq, train-prior) implements `TrainTask`: one optimisation step, an evaluation, and
its state as a nested dict. This module owns everything around that, so the guarantees are written
once: checkpoints are atomic safetensors, resume restores model, optimizer, EMA, step, data position
and every random state, Ctrl-C and SIGTERM finish the current step, save and stop, a non-finite loss
stops the run without overwriting the last good checkpoint, and a resume with no steps left rewrites
nothing. One process at a time trains on a checkpoint (vqtool.runlock); it starts by removing the
temporary files that killed writers of its checkpoint, log and outputs left behind.

Under torchrun (several processes) every rank runs this loop in lockstep: the stop decisions (time
limit, Ctrl-C or SIGTERM on any rank, early stop) and the logged scalars are agreed on by all ranks every
step, only rank 0 takes the run lock and writes the log, the progress bar, the checkpoint and the
outputs, and the checkpoint holds each rank's own random state (gathered from every rank). A resume with
another number of processes restores what carries over and re-derives the rest, and says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from vqtool import statepack
from vqtool.artifacts import atomic_write_text, command_line, load_artifact, save_artifact
from vqtool.console import console, progress
from vqtool.distributed import (
    ProcessInfo,
    any_across_ranks,
    broadcast_object,
    gather_states,
    mean_across_ranks,
    process_info,
)
from vqtool.errors import VqtoolError
from vqtool.outputs import check_writable
from vqtool.runlock import RunLock, lock_path

if TYPE_CHECKING:
    from vqtool.tensorboard_log import TensorBoardLog


@dataclass
class LoopSettings:
    """When the shared loop stops, logs, validates and saves; both trainers' configs extend it, so a
    recipe's train_vq / train_prior section keeps these keys flat."""

    max_steps: int | None = None
    max_minutes: float | None = None
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 500
    tensorboard: bool = False  # also write the log's records as TensorBoard events (vqtool.tensorboard_log)

    def check_loop(self, section: str, need_end: bool = True) -> None:
        """Refuse a run without an end, or with a step count or period that cannot work, in one line."""
        if need_end and self.max_steps is None and self.max_minutes is None:
            raise VqtoolError(f"give --max-steps or --max-minutes (recipe: {section}.max_steps or "
                              f"{section}.max_minutes) so the run has an end")
        if self.max_steps is not None and self.max_steps < 0:
            raise VqtoolError(f"{section}.max_steps must not be negative (got {self.max_steps})")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise VqtoolError(f"{section}.max_minutes must be positive (got {self.max_minutes})")
        for key in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise VqtoolError(f"{section}.{key} must be at least 1 (got {getattr(self, key)})")
        if self.tensorboard:
            from vqtool.tensorboard_log import require_tensorboard

            require_tensorboard()


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
        """Write the stage's output artifact(s); called on rank 0 when the run stops for any reason but NaN,
        and on a resume with no steps left only if an artifact of `output_paths()` is missing."""

    # Optional: the artifact paths `export` writes, so that a resume with no steps left can leave them
    # alone (re-exporting only a missing one) and stale temporary files beside them can be removed:
    #   def output_paths(self) -> list[Path]: ...
    # Optional, for state that differs between the ranks of a multi-process run (e.g. a per-rank
    # augmentation generator); the loop gathers it from every rank into the checkpoint:
    #   def rank_state_dict(self) -> dict[str, Any]: ...
    #   def load_rank_state_dict(self, state: dict[str, Any] | None) -> None: ...
    # `state` is None for a rank the checkpoint did not have (resumed with more processes): re-derive it.
    # Optional, for settings added to the resume key since older checkpoints were written:
    #   def recorded_key(self, key: dict[str, Any]) -> dict[str, Any]: ...  # the key in today's terms


@dataclass
class LoopResult:
    step: int
    # "max-steps", "max-minutes", "interrupted" (Ctrl-C or SIGTERM), "early-stop", or "already-done": a
    # resume with no steps left, which wrote nothing (its last_train / last_eval are the log's last records)
    reason: str
    last_train: dict[str, float]
    last_eval: dict[str, float]
    outputs: list[Path]
    stopped_by: signal.Signals | None = None  # the signal of an "interrupted" stop: SIGINT or SIGTERM


# --------------------------------------------------------------------------------------------------
# Random state of the process (the task keeps its own generators in its state_dict)


def _global_rng_state(device: torch.device) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }
    if device.type == "cuda":
        # This rank's own GPU only: another rank's generator is that rank's to save (and to initialise).
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_global_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    cuda = state.get("cuda")
    if device.type != "cuda" or cuda is None:
        return  # a CPU run leaves CUDA alone; a GPU run resuming a CPU checkpoint keeps its fresh stream
    if isinstance(cuda, list):  # older checkpoints hold every visible GPU's state: take this device's
        if (device.index or 0) >= len(cuda):
            return
        cuda = cuda[device.index or 0]
    torch.cuda.set_rng_state(cuda, device)


def _device(task: TrainTask) -> torch.device:
    # Optional on a task (the toy tasks of tests have none): the device whose random state it uses.
    return getattr(task, "device", None) or torch.device("cpu")


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------------
# Checkpoints


def rank_state(task: TrainTask) -> dict[str, Any]:
    """What this rank alone knows: its global random state and the task's per-rank state, if any."""
    own = task.rank_state_dict() if hasattr(task, "rank_state_dict") else {}
    return {"rng": _global_rng_state(_device(task)), "task": own}


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
        extra={"state": skeleton, "step": task.step, "world_size": len(ranks),
               "precision": getattr(task, "precision", None)},  # optional on a task: fp32, bf16 or fp16
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
    recorded = task.recorded_key(art.config) if hasattr(task, "recorded_key") else art.config
    if recorded != now:
        changed = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
        raise VqtoolError(
            f"{path}: cannot resume, these settings differ from the checkpoint: {', '.join(changed)}"
        )
    state = statepack.unpack(art.tensors, art.extra["state"])
    task.load_state_dict(state["task"])
    task.step = int(state["step"])
    ranks = state.get("ranks") or [{"rng": state["rng"], "task": None}]  # older single-process checkpoints
    if proc.rank < len(ranks):
        _set_global_rng_state(ranks[proc.rank]["rng"], _device(task))
        own = ranks[proc.rank]["task"]
    else:
        _set_global_rng_state(ranks[0]["rng"], _device(task))
        _reseed_global_rng(ranks[0]["rng"]["torch"], proc.rank)
        own = None
    if hasattr(task, "load_rank_state_dict") and (own or proc.rank >= len(ranks)):
        task.load_rank_state_dict(own)
    return int(art.extra.get("world_size", len(ranks)))


def seed_global_rng(seed: int) -> None:
    """Seed torch's, Python's and NumPy's global generators: all three are saved in every checkpoint, so
    an unseeded one would make two runs of the same settings write different checkpoints."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


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
        text = self.path.read_text()
        kept = []
        for line in text.splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a hard kill
        truncated = "".join(k + "\n" for k in kept)
        if truncated != text:  # an untouched log keeps its bytes and its mtime
            atomic_write_text(self.path, truncated)

    def last(self, split: str) -> dict[str, float]:
        """The scalars of the last `split` record (without step, split and time); {} when there is none."""
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return {}
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("split") == split:
                return {k: v for k, v in record.items() if k not in ("step", "split", "time")}
        return {}

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
# The run lock, stale temporary files and stop signals


def _run_folder(checkpoint_path: Path) -> Path:
    return checkpoint_path.parent.parent if checkpoint_path.parent.name == "checkpoints" else checkpoint_path.parent


def _take_run_lock(task: TrainTask, checkpoint_path: Path, proc: ProcessInfo,
                   writes: list[Path]) -> RunLock | None:
    """Rank 0 proves it can write `writes` and takes the run lock of `checkpoint_path`; every rank learns
    whether it could, so that all of them stop together (a rank that raised alone would leave the others
    waiting in their next collective), before any of them spends time training."""
    lock, refusal = None, ""
    if proc.is_main:
        path = lock_path(checkpoint_path)
        stage = path.stem if path.stem.startswith(task.stage) else task.stage  # e.g. train-prior-ar
        try:
            for target in writes:
                check_writable(target)
            lock = RunLock.acquire(path, f"{_run_folder(checkpoint_path)}: another {stage} is running on this run",
                                   command_line())
        except VqtoolError as exc:
            refusal = str(exc)
    if proc.distributed:
        refusal = broadcast_object(refusal)
    if refusal:
        raise VqtoolError(refusal)
    return lock


# atomic_path writes `.{name}.<8 characters>.tmp` beside `name` (tempfile.mkstemp: prefix, 8 random characters
# from [a-z0-9_], suffix); a writer killed before its rename leaves it behind.
_TEMPORARY = r"[a-z0-9_]{8}\.tmp"


def remove_stale_temporaries(paths: list[Path]) -> tuple[int, int]:
    """Remove the temporary files that killed writers of `paths` left beside them; (files, bytes) removed.

    Call it only under the run lock: that no trainer of this stage is alive is what makes them stale.
    """
    files = size = 0
    for path in paths:
        pattern = re.compile(re.escape(f".{path.name}.") + _TEMPORARY)
        try:
            entries = list(path.parent.iterdir())
        except OSError:  # no such folder yet
            continue
        for entry in entries:
            if not pattern.fullmatch(entry.name):
                continue
            try:
                n = entry.stat().st_size
                entry.unlink()
            except OSError:
                continue
            files += 1
            size += n
    return files, size


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _start_under_lock(lock: RunLock, paths: list[Path]) -> None:
    """Rank 0, having just taken the lock: say whose stale lock it took over, clear dead writers' temporaries."""
    if lock.took_over is not None:
        console.print(f"[dim]took over the lock of {lock.took_over.where()}, which is no longer running[/dim]",
                      soft_wrap=True, highlight=False)
    files, size = remove_stale_temporaries(paths)
    if files:
        console.print(f"[dim]removed {files} temporary file{'s' if files > 1 else ''} ({_size(size)}) that "
                      "a killed run left unfinished[/dim]", soft_wrap=True, highlight=False)


@contextlib.contextmanager
def _stop_signals() -> Iterator[dict[signal.Signals, bool]]:
    """While inside, Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current step; the dict
    yielded says which arrived. A second Ctrl-C aborts at once. A repeated SIGTERM changes nothing: the
    save is under way (torchrun forwards a scheduler's SIGTERM to workers that may have had it already)."""
    received = {signal.SIGINT: False, signal.SIGTERM: False}

    def on_sigint(signum, frame):
        if any(received.values()):
            raise KeyboardInterrupt
        received[signal.SIGINT] = True

    def on_sigterm(signum, frame):
        received[signal.SIGTERM] = True

    previous = {}
    try:
        for signum, handler in ((signal.SIGINT, on_sigint), (signal.SIGTERM, on_sigterm)):
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not in the main thread (e.g. inside a test runner's worker): signals act as before
        pass
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
    settings.check_loop(task.stage.replace("-", "_"))
    log = JsonlLog(log_path, enabled=proc.is_main)
    outputs = [Path(p) for p in task.output_paths()] if hasattr(task, "output_paths") else []
    lock = _take_run_lock(task, checkpoint_path, proc, [checkpoint_path, log_path, *outputs])
    board: TensorBoardLog | None = None  # the log's TensorBoard twin: rank 0, with settings.tensorboard
    try:
        if lock is not None:
            _start_under_lock(lock, [checkpoint_path, log_path, *outputs])
        if resume:
            saved_world = load_checkpoint(task, checkpoint_path, proc)
            if _no_steps_left(task, settings):
                return _already_done(task, settings, checkpoint_path, log, outputs, proc)
            log.truncate_after(task.step)
            if proc.is_main:
                console.print(f"resumed {task.stage} from {checkpoint_path} at step {task.step}")
                if saved_world != proc.world_size:
                    kept = min(saved_world, proc.world_size)
                    fresh = f", ranks {kept}-{proc.world_size - 1} start fresh ones" if proc.world_size > kept else ""
                    console.print(
                        f"[yellow]note:[/yellow] the checkpoint was written by {saved_world} process(es), this run "
                        f"has {proc.world_size}: ranks 0-{kept - 1} keep their own random streams{fresh}"
                    )
        else:
            if checkpoint_path.exists() and not overwrite:
                raise VqtoolError(
                    f"{checkpoint_path} exists; pass --resume to continue it or --overwrite to start again"
                )
            log.start_fresh()
        if settings.tensorboard and proc.is_main:
            from vqtool.tensorboard_log import TensorBoardLog, event_folder

            board = TensorBoardLog(event_folder(log_path), task.step if resume else None)
        return _train(task, settings, checkpoint_path, log, outputs, resume, proc, board)
    finally:
        if board is not None:
            board.close()
        if lock is not None:
            lock.release()


def _no_steps_left(task: TrainTask, settings: LoopSettings) -> bool:
    reached = settings.max_steps is not None and task.step >= settings.max_steps
    return reached or bool(getattr(task, "finished", False))


def _already_done(task: TrainTask, settings: LoopSettings, checkpoint_path: Path, log: JsonlLog,
                  outputs: list[Path], proc: ProcessInfo) -> LoopResult:
    """A resume with no steps left writes nothing: a fresh export would give the output a new sha256 (its
    metadata holds the command line) and cut it off from the latents or priors made from it, and another
    final evaluation would add a second record to the log. Only a missing output is exported again."""
    exported: list[Path] = []
    if proc.is_main:
        if settings.max_steps is not None and task.step >= settings.max_steps:
            where = f"is at step {task.step} and max_steps is {settings.max_steps}"
        else:
            where = f"stopped early at step {task.step}"
        console.print(f"{task.stage}: nothing to do, the run in {checkpoint_path} {where}; the checkpoint, the log "
                      "and the outputs are left as they are", soft_wrap=True, highlight=False)
        missing = [p for p in outputs if not p.exists()]
        if missing:
            exported = task.export()
            console.print(f"exported {', '.join(map(str, missing))} again, which was missing", soft_wrap=True,
                          highlight=False)
    return LoopResult(task.step, "already-done", log.last("train"), log.last("val"), exported or outputs)


def _non_finite_message(name: str, value: float, step: int, checkpoint_path: Path, saved_at: int | None,
                        checkpoint_every: int, outputs: list[Path]) -> str:
    head = f"{name} became {value} at step {step}; stopped without saving."
    if saved_at is not None:
        return (f"{head} The last good checkpoint is {checkpoint_path} (step {saved_at}): resume with --resume, "
                "perhaps with a lower --lr")
    # A fresh run that had not reached its first checkpoint: a resume would find nothing of it (or, after
    # --overwrite, the previous run's checkpoint).
    again = "start again with a lower --lr"
    if any(p.exists() for p in (checkpoint_path, *outputs)):
        again += " and --overwrite"
    return (f"{head} This run had not saved a checkpoint yet (every {checkpoint_every} steps), so there is no "
            f"checkpoint to resume from: {again}")


def _train(task: TrainTask, settings: LoopSettings, checkpoint_path: Path, log: JsonlLog, outputs: list[Path],
           resume: bool, proc: ProcessInfo, board: TensorBoardLog | None = None) -> LoopResult:
    saved_at = task.step if resume else None  # step of this run's latest checkpoint

    def record(split: str, metrics: dict[str, float]) -> None:
        entry = {"step": task.step, "split": split, "time": time.time(), **metrics}
        log.write(entry)
        if board is not None:  # an evaluation's PNG grid, when the task keeps one (train-vq's last_grid)
            board.write(entry, getattr(task, "last_grid", None) if split == "val" else None)

    def checkpoint() -> None:
        nonlocal saved_at
        # Every rank takes part in gathering the per-rank states; rank 0 alone writes.
        ranks = gather_states(rank_state(task)) if proc.distributed else None
        if proc.is_main:
            save_checkpoint(task, checkpoint_path, ranks)
        saved_at = task.step

    start = time.monotonic()
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    reason = "max-steps"
    stopped_by: signal.Signals | None = None
    with _stop_signals() as received:
        with progress() as bar:
            job = bar.add_task(task.stage, total=settings.max_steps, completed=task.step, status="",
                               visible=proc.is_main)
            while True:
                if settings.max_steps is not None and task.step >= settings.max_steps:
                    reason = "max-steps"
                    break
                # Decided together: a rank that stopped alone would leave the others waiting forever. A signal
                # that reached one rank only (a scheduler's SIGTERM, say) stops every rank after the same step.
                out_of_time, sigint, sigterm, finished = any_across_ranks([
                    settings.max_minutes is not None and time.monotonic() - start >= 60 * settings.max_minutes,
                    received[signal.SIGINT],
                    received[signal.SIGTERM],
                    getattr(task, "finished", False),  # optional: the task decided to stop (early stopping)
                ])
                if out_of_time:
                    reason = "max-minutes"
                    break
                if sigint or sigterm:
                    reason = "interrupted"
                    stopped_by = signal.SIGTERM if sigterm else signal.SIGINT
                    if proc.is_main:
                        console.print(f"{stopped_by.name}: stopping after step {task.step}, saving the checkpoint and "
                                      "the outputs")
                    break
                if finished:
                    reason = "early-stop"
                    break
                metrics = mean_across_ranks(task.train_step())  # the global batch's numbers, on every rank
                bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
                if bad:
                    name, value = next(iter(bad.items()))
                    raise VqtoolError(_non_finite_message(name, value, task.step, checkpoint_path, saved_at,
                                                          settings.checkpoint_every, outputs))
                last_train = metrics
                bar.update(job, completed=task.step, status=_fmt(metrics))
                if task.step % settings.log_every == 0:
                    record("train", metrics)
                if task.step % settings.eval_every == 0:
                    last_eval = task.evaluate()
                    record("val", last_eval)
                    if proc.is_main and last_eval:
                        console.print(f"step {task.step} val: {_fmt(last_eval)}")
                if task.step % settings.checkpoint_every == 0:
                    checkpoint()
        # Still under the signal handlers: a SIGTERM now must not kill the process halfway through the save.
        evaluated = False
        if reason != "interrupted" and (not last_eval or task.step % settings.eval_every != 0):
            last_eval = task.evaluate()
            record("val", last_eval)
            evaluated = True
        # The checkpoint of the last step is written once: when the loop wrote it already (max_steps a multiple
        # of checkpoint_every, or a stop before any step) and no evaluation changed the state since, it stands.
        if saved_at != task.step or evaluated:
            checkpoint()
        exported = task.export() if proc.is_main else []
    return LoopResult(task.step, reason, last_train, last_eval, exported, stopped_by)


# --------------------------------------------------------------------------------------------------
# EMA of weights, shared by both trainers


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        # One foreach lerp over every float tensor (the same numbers as a lerp_ per tensor, without a
        # kernel launch per tensor).
        shadow, live = [], []
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                shadow.append(self.shadow[k])
                live.append(v.detach())
            else:
                self.shadow[k].copy_(v)
        if shadow:
            torch._foreach_lerp_(shadow, live, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)


def read_scalars(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Python floats of a step's scalars, the tensors among them read back in one device-to-host copy.

    A trainer sums its micro-batches' numbers as tensors on the device and calls this once per step: a
    `float()` or `.item()` per micro-batch would make the CPU wait for the GPU at every micro-step."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    read = dict(zip(tensors, torch.stack([v.detach().double() for v in tensors.values()]).tolist(),
                    strict=True)) if tensors else {}
    return {k: float(read[k]) if k in read else float(v) for k, v in values.items()}
