"""`--tensorboard`: the training loop's log records, also as TensorBoard event files.

RUN/<stage>.jsonl gets a twin folder RUN/tensorboard/<stage>: every record's scalars under `train/KEY` or
`val/KEY` at its step and wall time (the same numbers as the JSONL log), and the PNG grid an evaluation
wrote (train-vq's originals over reconstructions) under `val/grid`. A fresh run starts the folder
anew; a resume appends a new event file that hides the old one's records after the checkpoint's step
(TensorBoard's purge step), as the JSONL log drops them. The writer is torch.utils.tensorboard, which
needs the optional `tensorboard` package: asking for it without the package is refused before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vqtool.errors import VqtoolError

INSTALL = "pip install vqtool[tensorboard]"
_NOT_SCALARS = ("step", "split", "time")


def require_tensorboard() -> None:
    """Refuse --tensorboard in one line when torch.utils.tensorboard cannot be imported."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise VqtoolError(f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL}") from None


def event_folder(log_path: Path) -> Path:
    """RUN/train-prior.jsonl → RUN/tensorboard/train-prior."""
    return Path(log_path).parent / "tensorboard" / Path(log_path).stem


class TensorBoardLog:
    """Writes the loop's records to an event folder (rank 0 only: the loop creates it there alone)."""

    def __init__(self, folder: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        if resume_step is None:
            for old in self.folder.glob("events.out.tfevents.*"):
                old.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        # The resumed run's first step is resume_step + 1: records from there on, left by the session that
        # outlived its last checkpoint, are hidden.
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(str(self.folder), purge_step=purge, flush_secs=30)
        self._grid: Path | None = None

    def write(self, record: dict[str, Any], grid: Path | None = None) -> None:
        """One JSONL record's scalars, and `grid` (a PNG) when it is new since the last call."""
        step, split, when = int(record["step"]), record["split"], record.get("time")
        for key, value in record.items():
            if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{split}/{key}", float(value), step, walltime=when)
        if grid is not None and grid != self._grid and Path(grid).exists():
            import numpy as np
            from PIL import Image

            with Image.open(grid) as img:
                pixels = np.asarray(img.convert("RGB"))
            self.writer.add_image(f"{split}/grid", pixels, step, walltime=when, dataformats="HWC")
            self._grid = Path(grid)
        if split == "val":
            self.writer.flush()  # evaluations are rare: a running TensorBoard sees each one soon

    def close(self) -> None:
        self.writer.close()
