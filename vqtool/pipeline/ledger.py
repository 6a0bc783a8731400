"""The ledger, RUN/pipeline.json: what the pipeline last did in each stage.

Per stage: its status (running | interrupted | failed | done), the settings, the input hashes, the
output's sha256, when it started, its wall time and a one-line summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vqtool import __version__
from vqtool.artifacts import atomic_write_json
from vqtool.errors import VqtoolError

LEDGER_NAME = "pipeline.json"
LEDGER_VERSION = 1


def _forget_amp(stages: dict[str, Any]) -> None:
    # train_vq.amp became the --precision option, which (like --device) is no setting an output is recorded
    # with: a record written before that still counts as up to date instead of retraining the VQ.
    entry = stages.get("train-vq")
    settings = entry.get("settings") if isinstance(entry, dict) else None
    train_vq = settings.get("train_vq") if isinstance(settings, dict) else None
    if isinstance(train_vq, dict):
        train_vq.pop("amp", None)


def _legacy_gelu(stages: dict[str, Any]) -> None:
    # The prior's GELU became a setting (exact by default) after records that have none: theirs ran tanh
    # (vqtool.prior.store.LEGACY_GELU; not imported, which would load torch for every ledger read).
    entry = stages.get("train-prior")
    settings = entry.get("settings") if isinstance(entry, dict) else None
    if isinstance(settings, dict):
        settings.setdefault("gelu", "tanh")


class Ledger:
    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.stages = dict(data["stages"])
                _forget_amp(self.stages)
                _legacy_gelu(self.stages)
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                raise VqtoolError(f"{path}: corrupt pipeline record; delete it and rerun with --overwrite") from None

    def get(self, stage: str) -> dict[str, Any] | None:
        return self.stages.get(stage)

    def put(self, stage: str, entry: dict[str, Any]) -> None:
        self.stages[stage] = entry
        atomic_write_json(self.path, {"format_version": LEDGER_VERSION, "vqtool_version": __version__,
                                      "stages": self.stages})


def ledger_entries(run: str | Path) -> dict[str, dict[str, Any]]:
    """The recorded state of every stage of a run folder (empty when the pipeline never ran there)."""
    path = Path(run) / LEDGER_NAME
    return Ledger(path).stages if path.exists() else {}
