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

from vqtool.artifacts import file_sha256
from vqtool.errors import VqtoolError


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's PNG bytes live inside a shard."""

    key: str
    offset: int  # byte offset of the PNG data in the tar file
    size: int
    label: int | None


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


def index_shard(path: Path) -> list[SampleRef]:
    """Every sample of one shard in file order, with the PNG's byte range and the class index."""
    refs: list[SampleRef] = []
    pending: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                # webdataset's rule: the key is everything before the first dot of the base name.
                prefix = member.name[: len(member.name) - len(base)]
                stem, ext = base.split(".", 1)
                key = prefix + stem
                if key not in pending:
                    pending[key] = {}
                    order.append(key)
                if ext == "png":
                    pending[key]["png"] = (member.offset_data, member.size)
                elif ext == "cls":
                    pending[key]["cls"] = int(tar.extractfile(member).read().decode("ascii").strip())
    except (tarfile.TarError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise VqtoolError(f"{path}: unreadable shard ({exc}); rerun `vqtool prepare`") from None
    for key in order:
        entry = pending[key]
        if "png" not in entry:
            raise VqtoolError(f"{path}: sample {key!r} has no .png member; rerun `vqtool prepare`")
        offset, size = entry["png"]
        refs.append(SampleRef(key, offset, size, entry.get("cls")))
    return refs
