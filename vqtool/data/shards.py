"""The on-disk shard format: plain webdataset tars of `KEY.png` (+ `KEY.cls`, an ASCII class index).

Tars are written deterministically (fixed member order, mtime 0, no owner names), so the same inputs
and seed give byte-identical shards and the same manifest sha256. Reading goes through an index of
byte offsets, so a loader can skip samples without decoding (or even reading) them.
"""

from __future__ import annotations

import contextlib
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
        self._path: Path | None = None
        self._hash = None
        self._bytes = 0
        self._in_shard = 0
        self.count = 0

    def _open_next(self) -> None:
        self._close_current()
        name = shard_name(self.split, len(self.entries))
        self._path = self.folder / name
        self._file = open(self._path, "wb")
        self._hash = hashlib.sha256()
        self._bytes = 0
        self.entries.append({"name": name, "samples": 0, "sha256": "", "bytes": 0})
        self._in_shard = 0

    def _emit(self, data: bytes) -> None:
        with self._naming():
            self._file.write(data)
        self._hash.update(data)
        self._bytes += len(data)

    @contextlib.contextmanager
    def _naming(self):
        # A write() that fails (a full disk) raises an OSError without a file name; give it the shard's.
        try:
            yield
        except OSError as exc:
            if exc.filename is None:
                exc.filename = str(self._path)
            raise

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
        with self._naming():
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


class BrokenArchive(ValueError):
    """A tar that is cut off or damaged part-way: `members` are the ones before the break, intact.

    `truncated` tells a cut (the file ends inside a header or a member, or without tar's end marker)
    from a damaged header in the middle of the file.
    """

    def __init__(self, members: list[tuple[str, int, int, bytes]], what: str, truncated: bool = True):
        self.members = members
        self.truncated = truncated
        super().__init__(f"{what} ({len(members)} complete member(s) before it)")


def scan_members(path: Path, foreign: bool = False) -> list[tuple[str, int, int, bytes]]:
    """(name, data offset, size, data when at most 32 bytes) of every regular file in a tar.

    A tar cut inside a header or a member raises BrokenArchive instead of ending quietly early.
    `foreign` is for archives vqtool did not write (prepare's sources): every header's checksum is
    verified too, and a file that stops at a header boundary without tar's end-of-archive blocks (a
    download cut at a round size ends like that) is a BrokenArchive as well. Shards need neither:
    their manifest holds their sha256, and the checksums would double the time to index them.
    """
    members = _scan_headers(path, foreign)
    return _scan_with_tarfile(path, foreign) if members is None else members


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


_HIGH_BYTES = bytes(range(128, 256))


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _octal(header[148:156])
    except ValueError:
        return False
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    if stored == unsigned:
        return True
    # Some old writers summed signed bytes: each byte of 128 and above then counts 256 less.
    high = len(blanked) - len(blanked.translate(None, _HIGH_BYTES))
    return stored == unsigned - 256 * high


def _scan_headers(path: Path, foreign: bool = False) -> list[tuple[str, int, int, bytes]] | None:
    """(name, data offset, size, data if tiny) of every regular member, reading headers only.

    Returns None for archives that use pax or GNU long-name headers; the caller then uses tarfile.
    """
    members: list[tuple[str, int, int, bytes]] = []
    size_on_disk = path.stat().st_size
    with open(path, "rb") as f:
        pos = 0
        while True:
            f.seek(pos)
            header = f.read(512)
            if not header:
                if foreign and pos > 0:
                    raise BrokenArchive(members, f"the file ends at byte {pos} without tar's end-of-archive "
                                                 "marker; it may be cut off")
                break
            if len(header) < 512:
                raise BrokenArchive(members, f"the file ends inside a tar header (byte {pos} of {size_on_disk})")
            if header == bytes(512):
                break
            if foreign and not _checksum_ok(header):
                if pos == 0:
                    raise ValueError("not a tar archive (bad header checksum)")
                raise BrokenArchive(members, f"damaged tar header at byte {pos}", truncated=False)
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
                raise BrokenArchive(members, f"member {name!r} is cut off: its data runs past the end of the file")
            if kind in (b"0", b"\0", b"7"):
                tiny = f.read(size) if size <= 32 else b""
                members.append((name, data_at, size, tiny))
            pos = data_at + (size + 511) // 512 * 512
    return members


def _scan_with_tarfile(path: Path, foreign: bool = False) -> list[tuple[str, int, int, bytes]]:
    members: list[tuple[str, int, int, bytes]] = []
    size_on_disk = path.stat().st_size
    with tarfile.open(path, "r:") as tar:
        while True:
            try:
                m = tar.next()
            except tarfile.ReadError as exc:  # raised when the previous member's data is cut off
                raise BrokenArchive(members, f"the archive is cut off ({exc})") from None
            if m is None:
                break
            if m.isfile():
                if m.offset_data + m.size > size_on_disk:
                    raise BrokenArchive(members, f"member {m.name!r} is cut off: its data runs past the end "
                                                 "of the file")
                tiny = tar.extractfile(m).read() if m.size <= 32 else b""
                members.append((m.name, m.offset_data, m.size, tiny))
        end = tar.offset
    # tarfile stops without a word at a short or damaged header (it checks the checksums itself):
    # look at what is there.
    with open(path, "rb") as f:
        f.seek(end)
        block = f.read(512)
    if not block and foreign and end > 0:
        raise BrokenArchive(members, f"the file ends at byte {end} without tar's end-of-archive marker; "
                                     "it may be cut off")
    if 0 < len(block) < 512:
        raise BrokenArchive(members, f"the file ends inside a tar header (byte {end} of {size_on_disk})")
    if block and block != bytes(512):
        raise BrokenArchive(members, f"damaged tar header at byte {end}", truncated=False)
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
