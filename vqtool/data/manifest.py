"""shards/manifest.json: what a prepared dataset holds, validated on read.

`prepare` writes it last, so a shards folder with a valid manifest is complete. Fields:

    kind            "dataset-manifest"
    format_version  integer; newer files are refused
    image_size      side of every (square, RGB) image
    channels        3
    counts          {"train": n, "val": n}
    shards          {"train": [file names], "val": [...]} in reading order
    shard_files     {"train": [{"name", "samples", "sha256", "bytes"}], ...}
    labelled        whether every sample has a key.cls class index
    classes         class names by index ([] when unlabelled)
    source, seed, settings, skipped [{path, reason, detail}], skipped_counts {reason: n}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vqtool.artifacts import file_sha256
from vqtool.errors import VqtoolError

MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "dataset-manifest"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")

_REQUIRED = ("kind", "format_version", "image_size", "channels", "counts", "shards", "shard_files", "classes")


def manifest_path(shards_dir: str | Path) -> Path:
    return Path(shards_dir) / MANIFEST_NAME


def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """The validated manifest of a shards folder; every problem is one VqtoolError line."""
    shards_dir = Path(shards_dir)
    path = manifest_path(shards_dir)
    if not shards_dir.exists():
        raise VqtoolError(f"{shards_dir}: shards folder not found; run `vqtool prepare` first")
    if not shards_dir.is_dir():
        raise VqtoolError(f"{shards_dir}: expected a shards folder (with manifest.json), found a file")
    if not path.exists():
        raise VqtoolError(f"{path}: missing; {shards_dir} is not a complete shards folder (rerun `vqtool prepare`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise VqtoolError(f"{path}: corrupt manifest (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise VqtoolError(f"{path}: corrupt manifest (not valid JSON: {exc.msg} at line {exc.lineno})") from None
    if not isinstance(manifest, dict):
        raise VqtoolError(f"{path}: corrupt manifest (expected a JSON object)")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise VqtoolError(f"{path}: corrupt manifest, missing field(s) {', '.join(missing)}")
    if manifest["kind"] != MANIFEST_KIND:
        raise VqtoolError(f"{path}: kind is {manifest['kind']!r}, expected {MANIFEST_KIND!r}")
    if not isinstance(manifest["format_version"], int) or manifest["format_version"] > MANIFEST_VERSION:
        raise VqtoolError(
            f"{path}: format version {manifest['format_version']} is newer than this vqtool reads "
            f"({MANIFEST_VERSION}); upgrade vqtool"
        )
    _check_shapes(path, manifest)
    return manifest


def _check_shapes(path: Path, m: dict[str, Any]) -> None:
    def bad(what: str) -> VqtoolError:
        return VqtoolError(f"{path}: corrupt manifest ({what})")

    if not isinstance(m["image_size"], int) or m["image_size"] <= 0:
        raise bad("image_size must be a positive integer")
    if m["channels"] != 3:
        raise bad(f"channels is {m['channels']}, only 3 is supported")
    if not isinstance(m["classes"], list):
        raise bad("classes must be a list")
    for split in SPLITS:
        count = m["counts"].get(split) if isinstance(m["counts"], dict) else None
        names = m["shards"].get(split) if isinstance(m["shards"], dict) else None
        files = m["shard_files"].get(split) if isinstance(m["shard_files"], dict) else None
        if not isinstance(count, int) or not isinstance(names, list) or not isinstance(files, list):
            raise bad(f"counts/shards/shard_files for {split!r} missing or malformed")
        if [f.get("name") for f in files] != names:
            raise bad(f"shard_files does not match shards for {split!r}")
        if sum(int(f.get("samples", -1)) for f in files) != count:
            raise bad(f"the {split!r} shard sample counts do not add up to counts[{split!r}]")
        for name in names:
            if "/" in name or "\\" in name or name.startswith("."):
                raise bad(f"shard name {name!r} is not a plain file name")


def manifest_sha256(shards_dir: str | Path) -> str:
    """Provenance hash of a dataset: the sha256 of its manifest.json (which holds every shard's sha256)."""
    path = manifest_path(shards_dir)
    if not path.exists():
        raise VqtoolError(f"{path}: missing; run `vqtool prepare` first")
    return file_sha256(path)


def shard_entries(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """[{name, samples, sha256, bytes}] of one split, in reading order."""
    if split not in SPLITS:
        raise VqtoolError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    return list(manifest["shard_files"][split])


def verify_shards(shards_dir: str | Path, manifest: dict[str, Any] | None = None) -> None:
    """Check every shard file exists with the size and sha256 the manifest records."""
    shards_dir = Path(shards_dir)
    manifest = manifest or read_manifest(shards_dir)
    for split in SPLITS:
        for entry in shard_entries(manifest, split):
            path = shards_dir / entry["name"]
            if not path.exists():
                raise VqtoolError(f"{path}: shard listed in the manifest is missing; rerun `vqtool prepare`")
            if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
                raise VqtoolError(f"{path}: shard does not match its sha256 in the manifest; rerun `vqtool prepare`")
