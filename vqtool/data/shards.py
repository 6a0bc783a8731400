"""The on-disk shard format: plain webdataset tars of `KEY.png` (+ `KEY.cls`, an ASCII class index).

Tars are written deterministically (fixed member order, mtime 0, no owner names), so the same inputs
and seed give byte-identical shards and the same manifest sha256. Reading goes through an index of
byte offsets, so a loader can skip samples without decoding (or even reading) them.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


_BLOCK = 512


def ustar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header for a regular file (mode 644, owner 0, mtime 0): fixed bytes per (name, size)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"member name {name!r} is longer than 100 bytes")
    header = bytearray(_BLOCK)
    header[0 : len(raw)] = raw
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[156:157] = b"0"
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


class ShardWriter:
    """Writes `split-NNNNNN.tar` files of at most `shard_size` samples into `folder`.

    Members are written with hand-made ustar headers (this runs in the one process that collects
    every worker's output, and tarfile's per-member overhead was a measurable share of it).
    """

    def __init__(self, folder: Path, split: str, shard_size: int):
        if shard_size < 1:
            raise VqtoolError(f"--shard-size {shard_size}: must be at least 1")
        self.folder = Path(folder)
        self.split = split
        self.shard_size = shard_size
        self.entries: list[dict] = []
        self._file = None
        self._hash = None
        self._bytes = 0
        self._in_shard = 0
        self.count = 0

    def _open_next(self) -> None:
        self._close_current()
        name = shard_name(self.split, len(self.entries))
        self._file = open(self.folder / name, "wb")
        self._hash = hashlib.sha256()
        self._bytes = 0
        self.entries.append({"name": name, "samples": 0, "sha256": "", "bytes": 0})
        self._in_shard = 0

    def _emit(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._bytes += len(data)

    def _add(self, name: str, data: bytes) -> None:
        self._emit(ustar_header(name, len(data)))
        self._emit(data)
        pad = -len(data) % _BLOCK
        if pad:
            self._emit(bytes(pad))

    def write(self, key: str, png: bytes, label: int | None) -> None:
        if self._file is None or self._in_shard >= self.shard_size:
            self._open_next()
        self._add(f"{key}.png", png)
        if label is not None:
            self._add(f"{key}.cls", str(int(label)).encode("ascii"))
        self._in_shard += 1
        self.entries[-1]["samples"] += 1
        self.count += 1

    def _close_current(self) -> None:
        if self._file is None:
            return
        self._emit(bytes(2 * _BLOCK))  # end-of-archive marker
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.entries[-1]["bytes"] = self._bytes
        self.entries[-1]["sha256"] = self._hash.hexdigest()

    def close(self) -> list[dict]:
        """Finish the last shard; return [{name, samples, sha256, bytes}] for the manifest."""
        self._close_current()
        return self.entries


def scan_members(path: Path) -> list[tuple[str, int, int, bytes]]:
    """(name, data offset, size, data when at most 32 bytes) of every regular file in a tar."""
    members = _scan_headers(path)
    return _scan_with_tarfile(path) if members is None else members


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
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
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
        members = scan_members(path)
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
