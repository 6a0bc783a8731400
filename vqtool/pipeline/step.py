"""What a stage planner makes (a Step) from what it reads (a Context), and the helpers planners share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqtool.config import merge
from vqtool.errors import VqtoolError
from vqtool.runs import RunPaths

# Keys of the recipe's `sample:` section that are the sample stage's own, not sampling settings.
SAMPLE_KEYS = {"n": 64, "quantize": "none", "class": None}


@dataclass
class Outcome:
    summary: str
    reason: str = "done"  # "interrupted": a training stage stopped by Ctrl-C after saving


@dataclass
class Step:
    """One stage, planned: what it will record, where its output goes, what it reads, how to run it."""

    stage: str
    settings: dict[str, Any]  # what the output is recorded as made with (compared on reruns)
    output: Path  # the primary output: its presence and hash stand for the stage's work
    inputs: Callable[[], dict[str, Path]]  # role → file or shards folder; called when the stage's turn comes
    run: Callable[[bool], Outcome]  # run(resume) → outcome
    checkpoint: Path | None = None  # training stages: where the resumable state lives
    # Training stages: the settings keys (max_steps first) whose change alone is continued from the checkpoint.
    limits: tuple[str, ...] | None = None


@dataclass
class Context:
    """What every planner reads: the run folder, the recipe, the chosen stages and the top-level settings."""

    paths: RunPaths
    recipe: dict[str, Any]
    stages: list[str]
    seed: int
    device: str
    threads: int
    dry_run: bool = False
    precision: str = "auto"  # like the device, not a setting an output is recorded with

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.recipe.get(name) or {})

    def sample_settings(self, *sections: dict[str, Any]):
        """SampleSettings from the seed, the recipe's `sample:` section, then `sections` (e.g. inpaint's own).

        Every stage that samples (sample, inpaint, eval and neighbours without samples) draws the same way;
        keys that are not sampling settings (sample's n, quantize, class) are left out.
        """
        from vqtool.prior.sample import SampleSettings

        fields = {f.name for f in dataclasses.fields(SampleSettings)}
        layers = [{k: v for k, v in s.items() if k in fields} for s in (self.section("sample"), *sections)]
        return merge(SampleSettings, {"seed": self.seed}, *layers, where="sample")


def pop_keys(section: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Take the pipeline-level keys `defaults` out of a stage section (the rest are the stage's settings)."""
    return {k: section.pop(k, v) for k, v in defaults.items()}


def without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def refuse_unknown(section: dict[str, Any], settings, where: str) -> None:
    known = {f.name for f in dataclasses.fields(settings)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise VqtoolError(f"{where}: unknown setting(s) {', '.join(unknown)}")
