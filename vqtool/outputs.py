"""Writing a stage's outputs so that nothing is lost: check first, stage a folder, swap it in.

A stage that computes for minutes first proves it can write where its outputs go (`check_writable`),
so a read-only folder or a file in the way stops it in its first second instead of at the end. A
stage whose output is a folder of many files writes them into a staging folder beside it and renames
that into place when everything is written (`staged_folder`): a full disk or a Ctrl-C then leaves the
previous outputs as they were, and no half-written folder. `os_error_message` is the one line the CLI
prints for any OSError.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from vqtool.errors import VqtoolError


def os_error_message(exc: OSError) -> str:
    """One line for an OSError: the path(s) it concerns, then the cause and the errno name,
    e.g. 'runs/x/samples/grid.png: no space left on device (ENOSPC)'."""
    if exc.errno:
        cause = _lower_first(os.strerror(exc.errno))
        code = errno.errorcode.get(exc.errno)
        if code:
            cause += f" ({code})"
    else:  # OSErrors raised by libraries (PIL's "cannot identify image file", ...) carry no errno
        lines = str(exc).strip().splitlines()
        cause = lines[0] if lines else type(exc).__name__
    names = [_path_text(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' → '.join(names)}: {cause}" if names else cause


def _lower_first(text: str) -> str:
    # "No space left on device" → "no space …", but "I/O error" keeps its capital.
    return text[0].lower() + text[1:] if len(text) > 1 and text[1].islower() else text


def _path_text(value: object) -> str:
    return os.fsdecode(value) if isinstance(value, (str, bytes, os.PathLike)) else str(value)


# --------------------------------------------------------------------------------------------------
# Checking before computing


def check_writable(path: str | os.PathLike, folder: bool = False) -> list[Path]:
    """Prove that `path` (a file, or with `folder` a folder, that a stage will write) can be created.

    Creates the missing parent folders, then creates and removes a file in the parent. Returns the
    folders it created, outermost first, so that a stage that fails later can take them away again
    (`remove_created`). Every problem is a one-line VqtoolError naming the folder and the cause.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise VqtoolError(f"{path}: exists and is not a folder; choose another output folder")
    missing = []
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise VqtoolError(f"{parent}: is a file, not a folder, so {path} cannot be written under it")
            break
        missing.append(parent)
    created: list[Path] = []
    try:
        for parent in reversed(missing):
            parent.mkdir(exist_ok=True)
            created.append(parent)
    except OSError as exc:
        remove_created(created)
        raise VqtoolError(f"{os_error_message(exc)}; cannot create the folder for {path}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        remove_created(created)
        exc.filename, exc.filename2 = str(path.parent), None  # the probe's random name means nothing to the user
        raise VqtoolError(f"{os_error_message(exc)}; cannot write {path}") from None
    return created


def refuse_enclosing(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], option: str = "--out") -> None:
    """Refuse an output folder that holds one of the stage's inputs (`--out RUN`): replacing it as a
    whole would move the run's artifacts around under other stages."""
    out_real = Path(out).resolve()
    for item in inputs:
        item_real = Path(item).resolve()
        if item_real == out_real or out_real in item_real.parents:
            raise VqtoolError(f"{option} {out}: holds {item}, an input of this stage; give the outputs a "
                              "folder of their own")


def remove_created(folders: Iterable[Path]) -> None:
    """Remove the folders `check_writable` created, innermost first, where they are still empty."""
    for folder in reversed(list(folders)):
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (something else wrote there) or already gone: leave it


@contextlib.contextmanager
def removed_on_failure(created: Iterable[Path]) -> Iterator[None]:
    """Remove the folders `check_writable` created if the block fails: a failed stage leaves no
    empty run folder behind."""
    try:
        yield
    except BaseException:
        remove_created(created)
        raise


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Name `path` in an OSError raised while writing it: a failed write() (ENOSPC) carries no file
    name, and a failed temporary file has a random one."""
    try:
        yield
    except OSError as exc:
        exc.filename, exc.filename2 = str(path), None
        raise


# --------------------------------------------------------------------------------------------------
# A folder written all at once


def matcher(*patterns: str) -> Callable[[str], bool]:
    """`name → bool`: whether a file name matches one of the glob patterns."""
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but belongs to someone else
        return True
    return True


def _beside(out: Path, tag: str) -> Path:
    name = Path(os.path.abspath(out)).name  # `--out .` still has a name to stage beside
    return out.parent / f".{name}.{tag}-{os.getpid()}"


def tidy_after_killed_runs(out: Path, staging_tag: str = "tmp") -> None:
    """Finish what processes killed in the middle of an output swap left behind (`swap_in`).

    An `.old` folder holds the previous outputs: it goes back into place when nothing replaced it, and
    when the new folder was already in place, the files it still holds that the new one lacks (the
    user's, not yet carried over) move across before it is removed. Staging folders
    (`.NAME.<staging_tag>-PID`) of dead processes are then removed: they never hold the user's files.
    """
    name = Path(os.path.abspath(out)).name
    for tag in ("old", staging_tag):
        for leftover in out.parent.glob(f".{glob.escape(name)}.{tag}-*"):
            pid = leftover.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
                continue
            if tag == "old" and not out.exists():
                os.replace(leftover, out)
                continue
            if tag == "old":
                _carry_over(leftover, out, lambda _name: False)
            shutil.rmtree(leftover, ignore_errors=True)


def _carry_over(old: Path, new: Path, produced: Callable[[str], bool]) -> None:
    """Move every entry of `old` that the stage does not write (`produced`) and `new` lacks into `new`."""
    for entry in sorted(old.iterdir()):
        if not produced(entry.name) and not os.path.lexists(new / entry.name):
            os.replace(entry, new / entry.name)


def point_at_output(exc: OSError, staging: Path, out: Path) -> None:
    """Make an OSError about a file in `staging` name the file the user asked for in `out` instead."""
    inside = os.fspath(staging)
    for attr in ("filename", "filename2"):
        value = getattr(exc, attr)
        if not isinstance(value, (str, os.PathLike)):
            continue
        value = os.fspath(value)
        if value == inside or value.startswith(inside + os.sep):
            setattr(exc, attr, os.fspath(out) + value[len(inside):])


def swap_in(staging: Path, out: Path, produced: Callable[[str], bool]) -> None:
    """Replace folder `out` by `staging`: rename the old one aside, rename the new one in, carry over
    every entry of the old one that `produced(name)` does not claim (files other stages or the user keep
    there), remove the old one. If the renames fail, everything goes back as it was; a process killed
    in between leaves `.NAME.old-PID`, which `tidy_after_killed_runs` puts right at the next start."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = _beside(out, "old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    _carry_over(old, out, produced)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, produced: Callable[[str], bool]) -> Iterator[Path]:
    """Yield a fresh `.NAME.tmp-PID` folder beside `out` to write into; when the block ends without
    an error it replaces `out` (`swap_in`). On an error it is removed and `out` is left untouched."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VqtoolError(f"{out}: exists and is not a folder; choose another output folder")
    tidy_after_killed_runs(out)
    staging = _beside(out, "tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        yield staging
        swap_in(staging, out, produced)
    except OSError as exc:
        point_at_output(exc, staging, out)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
