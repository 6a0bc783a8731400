"""What train-vq and train-prior share to start a run from an existing model artifact (`--init`).

A fine-tuning run is fresh (step 0, new optimizer) but its weights, and the settings that give them
their meaning, come from the init artifact. Its checkpoint records the init artifact's sha256, so a
resume needs no `--init` and refuses a different one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from vqtool.artifacts import Artifact, file_sha256, read_metadata
from vqtool.config import merge, to_dict
from vqtool.errors import VqtoolError

Init = TypeVar("Init")


def chosen_settings(cls: type, value: Any, where: str) -> tuple[Any, dict[str, Any]]:
    """A settings dataclass and the settings the caller chose: a mapping's keys (the CLI passes its recipe
    section, --set values and options so), or, for a dataclass, the fields that differ from the defaults."""
    if value is None:
        return cls(), {}
    if isinstance(value, cls):
        defaults, values = to_dict(cls()), to_dict(value)
        return copy.deepcopy(value), {k: getattr(value, k) for k in values if values[k] != defaults[k]}
    settings = merge(cls, value, where=where)
    return settings, {k: getattr(settings, k) for k in value}


def start_weights(path: Path, names: Iterable[str]) -> str:
    """`ema`, the weights meant for use, else `model`: the tensors a fine-tuning run starts from."""
    names = list(names)
    for prefix in ("ema", "model"):
        if any(name.startswith(f"{prefix}.") for name in names):
            return prefix
    raise VqtoolError(f"{path}: has neither ema.* nor model.* weights to start from")


def find_init(init: str | Path | None, checkpoint: Path, checkpoint_kind: str, resume: bool,
              recorded: Callable[[Artifact, str, Path | None], Init],
              read: Callable[[Path], Init]) -> Init | None:
    """What a run starts from: `read(init)` on a fresh start; on a resume, `recorded(checkpoint metadata,
    sha256, init)` built from what the checkpoint recorded (an `init` named again must be that same file)."""
    if resume and checkpoint.exists():
        meta = read_metadata(checkpoint, checkpoint_kind)
        sha = meta.config.get("init")
        named = Path(init) if init is not None else None
        if named is not None:
            if sha is None:
                raise VqtoolError(
                    f"--init {named}: the run in {checkpoint} was started without --init; drop --init to continue "
                    f"it, or drop --resume and pass --overwrite to start a new run from {named}"
                )
            if file_sha256(named) != sha:
                raise VqtoolError(
                    f"--init {named} (sha256 {file_sha256(named)[:12]}…) is not the artifact the run in {checkpoint} "
                    f"started from ({sha[:12]}…); drop --init to continue it, or drop --resume and pass --overwrite "
                    "to start anew"
                )
        return None if sha is None else recorded(meta, sha, named)
    if init is None:
        return None
    if resume:
        raise VqtoolError(f"--resume: no checkpoint at {checkpoint}; start without --resume")
    return read(Path(init))


def init_row(path: Path | None, sha256: str) -> str:
    """The `init` row of a training summary. A resumed run need not name its init artifact: the
    checkpoint's record is its sha256."""
    return f"{path} (sha256 {sha256[:12]}…)" if path else f"sha256 {sha256[:12]}… (from the checkpoint)"
