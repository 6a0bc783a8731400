"""`--nproc-per-node N`: one command starts the N ranks of a run on this machine, without torchrun.

The parent runs torch.distributed's elastic agent, the machinery behind torchrun, with a c10d rendezvous
on 127.0.0.1 and a port the operating system picks. Each rank is `python -m vqtool STAGE` with the
parent's options minus `--nproc-per-node`, in torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so it trains exactly as under torchrun: one GPU per rank (nccl) when the stage
runs on CUDA, CPU processes with gloo otherwise.

Signals. Every rank has a process group of its own, so a terminal's Ctrl-C reaches the parent only; the
agent passes it (or a SIGTERM) on once to every rank, the ranks finish their step, agree, save and exit,
and the agent kills those still alive TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (120 here).

Failures. When a rank exits non-zero the agent stops the others (SIGTERM, SIGKILL 30 s later). Each rank
leaves its one-line error in the error file the agent gives it (TORCHELASTIC_ERROR_FILE, torchelastic's
JSON), and the parent reports the rank that failed first: the others mostly fail because it did.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from vqtool.errors import Interrupted, VqtoolError

# Longer than torch's 30 s: after a Ctrl-C a rank finishes its step, then writes checkpoint and outputs.
SHUTDOWN_SECONDS = 120

# What the agent catches and passes on to the ranks (its default list); restored when it is done.
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@dataclass(frozen=True)
class Layout:
    processes: int
    device: str  # "cuda" or "cpu"
    threads: int  # CPU threads per process (OMP_NUM_THREADS) unless the user set OMP_NUM_THREADS

    def describe(self) -> str:
        if self.device == "cuda":
            return f"{self.processes} processes, one GPU each (nccl)"
        return f"{self.processes} CPU processes (gloo), {self.threads} thread{'s' if self.threads > 1 else ''} each"


class RanksFailed(VqtoolError):
    """A rank of a `--nproc-per-node` run failed; the CLI exits with that rank's status."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or a job's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def plan(processes: int, device: str) -> Layout:
    """Check `--nproc-per-node` against the machine: GPUs when the stage runs on CUDA (one per process),
    else CPU processes (at most one per core). One-line VqtoolError otherwise."""
    import torch

    from vqtool.device import resolve_device

    if processes < 1:
        raise VqtoolError(f"--nproc-per-node {processes}: must be 1 or more")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if processes > 1 and (world > 1 or "TORCHELASTIC_RUN_ID" in os.environ):
        raise VqtoolError(f"--nproc-per-node {processes}: this process is already one of {world} started by torchrun; "
                          "give the number of processes to torchrun or to vqtool, not both")
    kind = resolve_device(device).type
    if kind == "cuda":
        if processes > 1 and device.startswith("cuda:"):
            raise VqtoolError(f"--device {device} names one GPU, but each of the {processes} processes takes the GPU "
                              "of its local rank: use --device cuda")
        gpus = torch.cuda.device_count()
        if processes > gpus:
            raise VqtoolError(f"--nproc-per-node {processes}: this machine has {gpus} GPU{'s' if gpus > 1 else ''} "
                              f"and each process needs its own; use at most {gpus}, or --device cpu")
        threads = max(1, usable_cpus() // processes)
    else:
        cores = usable_cpus()
        if processes > cores:
            raise VqtoolError(f"--nproc-per-node {processes}: this process may use {cores} CPU "
                              f"core{'s' if cores > 1 else ''}, and CPU processes beyond one per core only wait for "
                              f"one another; use at most {cores}")
        threads = max(1, cores // processes)
    return Layout(processes, kind, threads)


def launch_ranks(ctx: Any, processes: int, device: str) -> None:
    """Run the command of the click context `ctx` as `processes` ranks on this machine (`--nproc-per-node`)."""
    from vqtool.console import console

    layout = plan(processes, device)
    console.print(f"[dim]{ctx.info_name}: {layout.describe()}; Ctrl-C stops them all after their current step[/dim]",
                  soft_wrap=True, highlight=False)
    launch(command_line(ctx, "nproc_per_node"), layout)


def command_line(ctx: Any, leave_out: str) -> list[str]:
    """The options of a click command as given (defaults left out), without `leave_out`: what the ranks run.

    Rebuilt from the parsed values rather than taken from sys.argv, so it is the same whether the command
    came from a shell, `python -m vqtool` or a test's CliRunner.
    """
    args: list[str] = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if param.name == leave_out or source is None or source.name == "DEFAULT":
            continue
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            args += _strings(value, param.nargs)
            continue
        name = param.opts[0]
        if param.is_flag and param.is_bool_flag:
            if value:
                args.append(name)
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
        elif param.multiple:
            for item in value:
                args += [name, *_strings(item, param.nargs)]
        else:
            args += [name, *_strings(value, param.nargs)]
    return [ctx.info_name, *args]


def _strings(value: Any, nargs: int) -> list[str]:
    return [str(v) for v in value] if nargs != 1 else [str(value)]


def launch(args: list[str], layout: Layout) -> None:
    """Run `python -m vqtool *args` as `layout.processes` ranks and wait for all of them.

    Returns when every rank exited 0. Raises Interrupted after Ctrl-C or SIGTERM (passed on to the ranks,
    which save and stop), RanksFailed naming the rank that failed first, VqtoolError if they cannot start.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    env = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(layout.threads)}
    shutdown = None if "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in os.environ else SHUTDOWN_SECONDS
    with tempfile.TemporaryDirectory(prefix="vqtool-ranks-") as logs, _quiet_agent(), _restored(env):
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=layout.processes, run_id=uuid.uuid4().hex,
                              role="default", rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                              logs_specs=DefaultLogsSpecs(log_dir=logs), shutdown_timeout=shutdown)
        try:
            elastic_launch(config, sys.executable)("-m", "vqtool", *args)
        except ChildFailedError as exc:
            raise first_failure(exc.failures, layout.processes) from None
        except SignalException as exc:
            raise Interrupted(f"{exc.sigval.name} passed on to the {layout.processes} processes; continue with "
                              "--resume", exc.sigval) from None
        except (RendezvousError, RuntimeError, ValueError, OSError) as exc:  # the rendezvous, or starting a process
            raise VqtoolError(f"could not start {layout.processes} processes: {_one_line(str(exc))}") from None


@contextlib.contextmanager
def _restored(env: dict[str, str]) -> Iterator[None]:
    """Set `env` for the ranks (they inherit the parent's environment); afterwards put back the environment
    and the signal handlers the agent replaces, for a parent that goes on (a test, the Python API)."""
    saved_env = dict(os.environ)
    saved_handlers = {s: signal.getsignal(s) for s in _FORWARDED}
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in saved_handlers.items():
            with contextlib.suppress(ValueError, TypeError):  # not the main thread / not set from Python
                signal.signal(s, handler)


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    """The agent logs every start, signal and stop; the ranks' own lines and ours say what matters. torch's
    LOGLEVEL (set by the user) keeps its logs."""
    if "LOGLEVEL" in os.environ:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.distributed.launcher")]
    saved = [(lg.propagate, lg.handlers[:]) for lg in loggers]
    for lg in loggers:
        lg.propagate = False
        lg.handlers = [logging.NullHandler()]
    try:
        yield
    finally:
        for lg, (propagate, handlers) in zip(loggers, saved, strict=True):
            lg.propagate, lg.handlers = propagate, handlers


# --------------------------------------------------------------------------------------------------
# A rank's error, from the rank to the parent


class OneLineErrors(ErrorHandler):
    """torchelastic's error file with vqtool's one-line error as its message, and the time to the
    microsecond (torchelastic's own timestamp is in whole seconds: too coarse to say which rank was first)."""

    def record_line(self, line: str, callstack: str = "") -> None:
        path = self._get_error_file_path()
        if not path:
            return
        now = time.time()
        data = {"message": {"message": line, "extraInfo": {"py_callstack": callstack, "timestamp": str(int(now)),
                                                           "time": now}}}
        with contextlib.suppress(OSError):
            with open(path, "w") as f:
                json.dump(data, f)

    def record_exception(self, e: BaseException) -> None:
        self.record_line(f"{type(e).__name__}: {_one_line(str(e))}", traceback.format_exc())


def record_error(line: str) -> None:
    """Under a launcher (`--nproc-per-node` or torchrun), leave this rank's error line where it reads it."""
    OneLineErrors().record_line(_one_line(line))


def record_crash(exc: BaseException) -> None:
    """The same for an exception nothing handled (its traceback is printed as usual)."""
    OneLineErrors().record_exception(exc)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else text.strip()


def first_failure(failures: dict[int, Any], world: int) -> RanksFailed | Interrupted:
    """The failure of the rank that failed first, as one line naming the rank; Interrupted when every rank
    that exited non-zero stopped cleanly on a signal (saved, status 130 or 143: a SIGTERM sent to one rank).

    When one rank fails, the agent's SIGTERM stops the others or they fail in their next collective, later;
    so the root cause is the earliest failure, by the time the rank recorded (to the microsecond) or, for a
    rank that left no record (killed by a signal), by when the agent saw it dead.
    """
    clean = {128 + signal.SIGINT, 128 + signal.SIGTERM}
    if all(f.exitcode in clean for f in failures.values()):
        status = max(f.exitcode for f in failures.values())
        name = signal.Signals(status - 128).name
        return Interrupted(f"the {world} processes stopped on {name}; continue with --resume", status - 128)

    def when(item: tuple[int, Any]) -> tuple[bool, float]:
        failure = item[1]
        stopped = failure.exitcode in clean or failure.exitcode in (-signal.SIGTERM, -signal.SIGINT)
        return stopped, _recorded_time(failure)

    rank, failure = min(failures.items(), key=when)
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else ""
    if failure.exitcode < 0:
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        return RanksFailed(f"rank {rank} of {world} was killed by {name}", 128 - failure.exitcode)
    if not message:
        return RanksFailed(f"rank {rank} of {world} exited with status {failure.exitcode} (its output is above)",
                           failure.exitcode)
    return RanksFailed(f"rank {rank} of {world} failed: {message}", failure.exitcode)


def _recorded_time(failure: Any) -> float:
    data = failure.error_file_data.get("message")
    if isinstance(data, dict) and isinstance(data.get("extraInfo", {}).get("time"), (int, float)):
        return float(data["extraInfo"]["time"])
    # Seen at the agent's next look (every 0.1 s) after the death, and rounded down to the second.
    return float(failure.timestamp) - 1.0
