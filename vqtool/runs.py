"""The run-folder convention: `--run DIR` gives every stage standard input and output names.

An explicit path option on a command always wins over these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, run: str | Path) -> RunPaths:
        return cls(Path(run))

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def vq(self) -> Path:
        return self.root / "vq.safetensors"

    @property
    def latents(self) -> Path:
        return self.root / "latents.safetensors"

    @property
    def prior(self) -> Path:
        return self.root / "prior.safetensors"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def samples_artifact(self) -> Path:
        return self.samples / "samples.safetensors"

    @property
    def inpaint(self) -> Path:
        return self.root / "inpaint"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, stage: str) -> Path:
        """The latest resumable checkpoint of a training stage ('train-vq', 'train-prior')."""
        return self.checkpoints / f"{stage}-last.safetensors"

    def log(self, stage: str) -> Path:
        return self.root / f"{stage}.jsonl"

    def figures(self, stage: str) -> Path:
        """Where a training stage puts its periodic PNG grids."""
        return self.root / "figures" / stage
