"""Whether a planned stage is up to date, must run, or can resume from its checkpoint.

A stage is up to date when
  * its output exists and is the very file this pipeline wrote there (sha256 recorded in the ledger);
  * the output's provenance `parents` hashes equal the current sha256 of the stage's inputs (and so do
    the input hashes the ledger recorded, for inputs an artifact cannot name, like a source folder);
  * the settings recorded for that output equal the settings now requested.
Otherwise it runs again. A new output has a new hash, so every stage downstream becomes out of date in
turn. A training stage stopped by Ctrl-C (or killed) resumes from its checkpoint when rerun with the
same settings and inputs, or when only its stopping limits changed; any other stage starts again. An
output the ledger does not know (made by hand, or changed since) is never replaced silently: that
needs `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from vqtool.artifacts import file_sha256, read_metadata
from vqtool.data.manifest import MANIFEST_NAME, manifest_sha256
from vqtool.errors import VqtoolError
from vqtool.pipeline.step import Step

# The stage whose output an input role names, for "missing input" messages.
_MADE_BY = {"dataset": "prepare", "real_dataset": "prepare", "train_dataset": "prepare", "vq": "train-vq",
            "latents": "encode", "prior": "train-prior", "fake_samples": "sample"}


def input_hash(path: Path) -> str:
    """sha256 of an input: a file's bytes, a shards folder's manifest, or a source folder's listing."""
    if path.is_dir():
        if (path / MANIFEST_NAME).exists():
            return manifest_sha256(path)
        return folder_fingerprint(path)
    return file_sha256(path)


def folder_fingerprint(folder: Path) -> str:
    """sha256 of every file's relative path, size and modification time (not its bytes: a 50k-image
    folder is listed in a second but would take minutes to read)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            st = (Path(root) / name).stat()
            h.update(f"{(Path(root) / name).relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "listing:" + h.hexdigest()


def current_inputs(step: Step) -> dict[str, str]:
    hashes = {}
    for role, path in step.inputs().items():
        path = Path(path)
        if not path.exists():
            maker = _MADE_BY.get(role)
            hint = (f"it is made by the {maker} stage: add it to the recipe's stages" if maker
                    else f"check the {step.stage} section of the recipe")
            raise VqtoolError(f"{path}: missing ({step.stage} needs it as {role}); {hint}")
        hashes[role] = input_hash(path)
    return hashes


def _parents_of(output: Path) -> dict[str, str]:
    if output.suffix != ".safetensors":
        return {}
    return read_metadata(output).parents


def owned(entry: dict[str, Any] | None, output: Path) -> bool:
    """Whether the existing `output` is the pipeline's own: the file it recorded, or written by an
    attempt of this stage that never finished (a Ctrl-C or kill during the stage)."""
    if entry is None:
        return False
    if entry.get("output") == file_sha256(output):
        return True
    return entry.get("status") != "done" and output.stat().st_mtime >= float(entry.get("started", 0)) - 1


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        out: list[str] = []
        for k in keys:
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _checkpoint_step(step: Step, entry: dict[str, Any]) -> int | None:
    """The step of the stage's checkpoint when it belongs to the recorded attempt, else None."""
    ckpt = step.checkpoint
    if ckpt is None or not ckpt.exists() or ckpt.stat().st_mtime < float(entry.get("started", 0)):
        return None  # no checkpoint, or one left by an earlier attempt with other settings or inputs
    return int(read_metadata(ckpt).extra.get("step", 0))


def _continuable(step: Step, old: dict[str, Any], new: dict[str, Any], at: int) -> bool:
    """Whether training on from a checkpoint at step `at` under `new` settings ends where a fresh run would:
    only the stopping limits changed and the checkpoint is not past the new max_steps."""
    if step.limits is None:
        return False
    changed = _changed_keys(old, new)
    if not set(changed) <= set(step.limits):
        return False
    max_steps = _dotted(new, step.limits[0])
    return max_steps is None or at <= int(max_steps)


def _dotted(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def decide(step: Step, entry: dict[str, Any] | None, hashes: dict[str, str], overwrite: bool) -> tuple[str, str]:
    """('skip' | 'run' | 'resume', why) for a planned step whose inputs hash to `hashes`."""
    settings = json.loads(json.dumps(step.settings))
    out = step.output
    if entry is not None and entry.get("inputs") == hashes and (not out.exists() or owned(entry, out)):
        at = _checkpoint_step(step, entry)
        old = entry.get("settings") or {}
        if at is not None and entry.get("status") != "done" and (
                old == settings or _continuable(step, old, settings, at)):
            return "resume", f"resuming the {entry.get('status')} run from its checkpoint at step {at}"
        if at is not None and entry.get("status") == "done" and old != settings and out.exists() and (
                _continuable(step, old, settings, at)):
            changed = ", ".join(_changed_keys(old, settings))
            return "resume", f"{changed} changed: continuing from the checkpoint at step {at}"
    if not out.exists():
        if entry is None:
            return "run", "new"
        return "run", "output missing" if entry.get("status") == "done" else (
            f"the last run did not finish ({entry.get('status')})")
    if not owned(entry, out):
        if not overwrite:
            raise VqtoolError(f"{out}: exists but was not made by this pipeline (or was changed since); pass "
                              f"--overwrite to replace it, or use another --run folder")
        return "run", "replacing an output this pipeline did not make"
    if entry.get("status") != "done":
        return "run", f"the last run did not finish ({entry.get('status')})"
    if entry.get("settings") != settings:
        changed = _changed_keys(entry.get("settings"), settings)
        return "run", "settings changed: " + ", ".join(changed[:6]) + (" …" if len(changed) > 6 else "")
    if entry.get("inputs") != hashes:
        changed = sorted(k for k in set(hashes) | set(entry.get("inputs") or {})
                         if hashes.get(k) != (entry.get("inputs") or {}).get(k))
        return "run", "input changed: " + ", ".join(changed)
    parents = _parents_of(out)
    stale = sorted(role for role, sha in hashes.items() if role in parents and parents[role] != sha)
    if stale:
        return "run", "made from other inputs: " + ", ".join(stale)
    return "skip", ""
