"""What `vqtool info PATH` shows: a safetensors artifact's metadata and tensors, or a shards folder's
manifest. Returns plain rows; the CLI renders them as rich tables."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vqtool.artifacts import file_sha256, read_metadata
from vqtool.data.manifest import MANIFEST_NAME, SPLITS, read_manifest
from vqtool.errors import VqtoolError


@dataclass
class Description:
    title: str
    rows: list[tuple[str, str]]
    config: list[tuple[str, str]] = field(default_factory=list)
    tensors: list[tuple[str, str, str, str]] = field(default_factory=list)  # name, dtype, shape, elements
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # path, reason, detail


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, name + "."))
        else:
            rows.append((name, _short(value)))
    return rows


def describe_artifact(path: Path) -> Description:
    art = read_metadata(path)
    tensor_info = art.extra.pop("_tensors", {})
    size = path.stat().st_size
    rows = [
        ("kind", art.kind),
        ("format version", str(art.format_version)),
        ("vqtool version", art.vqtool_version),
        ("command", art.command or "—"),
        ("size on disk", human_bytes(size)),
        ("sha256", file_sha256(path)),
    ]
    if art.parents:
        rows += [(f"parent {role}", sha) for role, sha in sorted(art.parents.items())]
    else:
        rows.append(("parents", "none"))
    for key, value in sorted(art.extra.items()):
        if key == "state":  # a training checkpoint's JSON skeleton: long and unreadable
            rows.append(("extra state", f"training state ({len(value)} characters of JSON)"))
        elif key == "source" and isinstance(value, dict):  # an imported model: where it came from, in full
            rows += [(f"source {k}", v) for k, v in _flatten(value)]
        else:
            rows.append((f"extra {key}", _short(value)))
    tensors = []
    for name, info in sorted(tensor_info.items()):
        shape = info["shape"]
        tensors.append((name, info["dtype"], "×".join(map(str, shape)) or "scalar", f"{math.prod(shape):,}"))
    return Description(title=str(path), rows=rows, config=_flatten(art.config), tensors=tensors)


def describe_shards(folder: Path) -> Description:
    m = read_manifest(folder)
    total = 0
    missing = []
    for split in SPLITS:
        for entry in m["shard_files"][split]:
            total += entry["bytes"]
            p = folder / entry["name"]
            if not p.exists() or p.stat().st_size != entry["bytes"]:
                missing.append(entry["name"])
    classes = m["classes"]
    rows = [
        ("kind", m["kind"]),
        ("format version", str(m["format_version"])),
        ("vqtool version", str(m.get("vqtool_version", "?"))),
        ("source", str(m.get("source", "?"))),
        ("seed", str(m.get("seed", "?"))),
        ("image size", f"{m['image_size']}×{m['image_size']} RGB"),
        ("train images", f"{m['counts']['train']:,} in {len(m['shards']['train'])} shard(s)"),
        ("val images", f"{m['counts']['val']:,} in {len(m['shards']['val'])} shard(s)"),
        ("classes", f"{len(classes)}: {_short(', '.join(classes), 160)}" if classes else "unlabelled"),
        ("size on disk", human_bytes(total)),
        ("manifest sha256", file_sha256(folder / MANIFEST_NAME)),
        ("shard files", "all present" if not missing else f"MISSING or changed: {', '.join(missing[:5])}"),
    ]
    if "found" in m:
        rows.append(("files found", f"{m['found']:,} images, {m.get('ignored', 0):,} other files ignored"))
    counts = m.get("skipped_counts", {})
    rows.append(("skipped", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "none"))
    rows += [(f"setting {k}", _short(v)) for k, v in sorted(m.get("settings", {}).items())]
    skipped = [(s.get("path", "?"), s.get("reason", "?"), s.get("detail", "")) for s in m.get("skipped", [])]
    return Description(title=f"{folder} (shards)", rows=rows, skipped=skipped)


def describe(path: str | Path) -> Description:
    """Describe a .safetensors artifact, a shards folder, its manifest.json, or a run folder's shards."""
    path = Path(path)
    if not path.exists():
        raise VqtoolError(f"{path}: not found")
    if path.is_dir():
        if (path / MANIFEST_NAME).exists():
            return describe_shards(path)
        if (path / "shards" / MANIFEST_NAME).exists():
            return describe_shards(path / "shards")
        raise VqtoolError(f"{path}: a folder without manifest.json; give a shards folder or a .safetensors file")
    if path.name == MANIFEST_NAME:
        return describe_shards(path.parent)
    return describe_artifact(path)
