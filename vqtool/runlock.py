"""The run lock: one training process at a time on a stage's checkpoint and log.

Two trainers on the same checkpoint would overwrite each other's checkpoint, log and output without
either noticing. A training stage therefore holds an exclusive `flock` on a lock file next to its
checkpoint (`RUN/checkpoints/train-prior.lock` beside `train-prior-last.safetensors`) for its whole run.
The operating system releases the lock whenever the holder exits, however it exits (kill -9 included),
so a lock is never left held by a dead process; the file's content, JSON {pid, host, started, command},
only names the holder in messages. A clean release removes the file; one left behind by a killed holder
is taken over, and `RunLock.took_over` says whose it was.

`flock` works across processes of one machine and, on Linux, across NFS clients (as an fcntl lock);
some other network filesystems ignore it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from vqtool.errors import VqtoolError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs go unlocked there (docs/reliability.md)
    fcntl = None

# How long a refused process waits for the holder to finish writing its JSON, to name it.
_HOLDER_READ_SECONDS = 1.0


def lock_path(checkpoint: Path) -> Path:
    """The lock file of the stage whose checkpoint is `checkpoint`: `train-prior-last.safetensors` →
    `train-prior.lock` in the same folder."""
    stem = checkpoint.name.removesuffix(".safetensors").removesuffix("-last")
    return checkpoint.with_name(f"{stem}.lock")


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock, as its lock file says."""

    pid: int
    host: str
    started: str  # ISO 8601 local time with offset
    command: str

    def where(self) -> str:
        return f"pid {self.pid} on host {self.host}"

    def since(self) -> str:
        try:
            when = datetime.fromisoformat(self.started)
        except ValueError:
            return self.started
        today = datetime.now(when.tzinfo).date()
        return when.strftime("%H:%M:%S" if when.date() == today else "%Y-%m-%d %H:%M:%S")


class RunLock:
    """An exclusive lock held through an open file descriptor; `release()` (or leaving the `with`) ends it."""

    def __init__(self, path: Path, fd: int, took_over: Holder | None):
        self.path = path
        self._fd: int | None = fd
        self.took_over = took_over  # the holder named in a lock file left by a process that died holding it

    @classmethod
    def acquire(cls, path: Path, refusal: str, command: str) -> RunLock:
        """Take the lock at `path` without waiting, or raise VqtoolError:
        `{refusal} (pid 1234 on host X since 12:03:04); wait for it or stop it`."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = cls._lock_current_file(path, refusal)
        except OSError as exc:
            raise VqtoolError(f"{path}: cannot take the run lock ({exc.strerror or exc})") from None
        previous = _read_holder(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now().astimezone().isoformat(timespec="seconds"), "command": command}
        data = (json.dumps(me) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        return cls(path, fd, previous)

    @staticmethod
    def _lock_current_file(path: Path, refusal: str) -> int:
        # A releasing holder removes the file while it still holds the lock, so a file opened just before
        # that removal can be locked afterwards although it is gone: lock again whatever `path` is now.
        for _ in range(100):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _wait_for_holder(fd)
                os.close(fd)
                who = f"{holder.where()} since {holder.since()}" if holder else "a process that has not said which"
                raise VqtoolError(f"{refusal} ({who}); wait for it or stop it") from None
            except BaseException:
                os.close(fd)
                raise
            if _is_file_at(fd, path):
                return fd
            os.close(fd)
        raise OSError(f"{path} keeps being replaced by other processes")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if _is_file_at(self._fd, self.path):  # remove it while still holding it (see _lock_current_file)
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_holder(fd: int) -> Holder | None:
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0).decode())
        return Holder(pid=int(record["pid"]), host=str(record["host"]), started=str(record.get("started", "?")),
                      command=str(record.get("command", "")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
        return None


def _wait_for_holder(fd: int) -> Holder | None:
    # The holder writes its JSON right after taking the lock; a refused process may look in between.
    deadline = time.monotonic() + _HOLDER_READ_SECONDS
    while True:
        holder = _read_holder(fd)
        if holder is not None or time.monotonic() >= deadline:
            return holder
        time.sleep(0.02)
