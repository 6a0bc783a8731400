"""The on-disk shard format: plain webdataset tars of `KEY.png` (+ `KEY.cls`, an ASCII class index).

Tars are written deterministically (fixed member order, mtime 0, no owner names), so the same inputs
and seed give byte-identical shards and the same manifest sha256. Reading goes through an index of
byte offsets, so a loader can skip samples without decoding (or even reading) them.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqtool.artifacts import file_sha256
from vqtool.errors import VqtoolError


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample's PNG bytes live inside one shard, in file order (compact numpy columns)."""

    offsets: np.ndarray  # int64 byte offset of the PNG data
    sizes: np.ndarray  # int64 byte length of the PNG data
    labels: np.ndarray | None  # int64 class index, or None when the shard has no .cls members

    def __len__(self) -> int:
        return len(self.offsets)


class ShardWriter:
    """Writes `split-NNNNNN.tar` files of at most `shard_size` samples into `folder`."""

    def __init__(self, folder: Path, split: str, shard_size: int):
        if shard_size < 1:
            raise VqtoolError(f"--shard-size {shard_size}: must be at least 1")
        self.folder = Path(folder)
        self.split = split
        self.shard_size = shard_size
        self.entries: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        self.count = 0

    def _open_next(self) -> None:
        self._close_current()
        name = shard_name(self.split, len(self.entries))
        self._tar = tarfile.open(self.folder / name, "w", format=tarfile.USTAR_FORMAT)
        self.entries.append({"name": name, "samples": 0, "sha256": "", "bytes": 0})
        self._in_shard = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, png: bytes, label: int | None) -> None:
        if self._tar is None or self._in_shard >= self.shard_size:
            self._open_next()
        self._add(f"{key}.png", png)
        if label is not None:
            self._add(f"{key}.cls", str(int(label)).encode("ascii"))
        self._in_shard += 1
        self.entries[-1]["samples"] += 1
        self.count += 1

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        entry = self.entries[-1]
        path = self.folder / entry["name"]
        entry["bytes"] = path.stat().st_size
        entry["sha256"] = file_sha256(path)

    def close(self) -> list[dict]:
        """Finish the last shard; return [{name, samples, sha256, bytes}] for the manifest."""
        self._close_current()
        return self.entries


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _scan_headers(path: Path) -> list[tuple[str, int, int, bytes]] | None:
    """(name, data offset, size, data if tiny) of every regular member, reading headers only.

    Returns None for archives that use pax or GNU long-name headers; the caller then uses tarfile.
    """
    members = []
    size_on_disk = path.stat().st_size
    with open(path, "rb") as f:
        pos = 0
        while True:
            f.seek(pos)
            header = f.read(512)
            if len(header) < 512 or header == bytes(512):
                break
            kind = header[156:157]
            if kind in (b"x", b"g", b"L", b"K"):
                return None
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
                if prefix:
                    name = f"{prefix}/{name}"
            size = _octal(header[124:136])
            data_at = pos + 512
            if data_at + size > size_on_disk:
                raise ValueError(f"member {name!r} runs past the end of the file (truncated)")
            if kind in (b"0", b"\0", b"7"):
                tiny = f.read(size) if size <= 32 else b""
                members.append((name, data_at, size, tiny))
            pos = data_at + (size + 511) // 512 * 512
    return members


def _scan_with_tarfile(path: Path) -> list[tuple[str, int, int, bytes]]:
    members = []
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if m.isfile():
                tiny = tar.extractfile(m).read() if m.size <= 32 else b""
                members.append((m.name, m.offset_data, m.size, tiny))
    return members


def index_shard(path: Path) -> ShardIndex:
    """Every sample of one shard in file order: PNG byte ranges and class indices."""
    try:
        members = _scan_headers(path)
        if members is None:
            members = _scan_with_tarfile(path)
        samples: dict[str, dict] = {}
        for name, offset, size, tiny in members:
            base = name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            # webdataset's rule: the key is the path up to the first dot of the base name.
            stem, ext = base.split(".", 1)
            key = name[: len(name) - len(base)] + stem
            entry = samples.setdefault(key, {})
            if ext == "png":
                entry["png"] = (offset, size)
            elif ext == "cls":
                entry["cls"] = int(tiny.decode("ascii").strip())
    except (tarfile.TarError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise VqtoolError(f"{path}: unreadable shard ({exc}); rerun `vqtool prepare`") from None
    offsets, sizes, labels = [], [], []
    for key, entry in samples.items():
        if "png" not in entry:
            raise VqtoolError(f"{path}: sample {key!r} has no .png member; rerun `vqtool prepare`")
        offsets.append(entry["png"][0])
        sizes.append(entry["png"][1])
        labels.append(entry.get("cls", -1))
    has_labels = any(label >= 0 for label in labels)
    if has_labels and min(labels) < 0:
        raise VqtoolError(f"{path}: some samples have a .cls label and some do not; rerun `vqtool prepare`")
    return ShardIndex(
        np.asarray(offsets, dtype=np.int64),
        np.asarray(sizes, dtype=np.int64),
        np.asarray(labels, dtype=np.int64) if has_labels else None,
    )
