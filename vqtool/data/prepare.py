"""The `prepare` stage: a folder or tar of images (or the built-in synthetic set) → webdataset shards.

Flow: list candidate files in sorted order (a subfolder that cannot be listed, or a tar that breaks
off part-way, is recorded as skipped like a bad file) → put them in a seeded processing order →
convert in worker processes (decode + resize is the cost) → drop exact duplicates by decoded-pixel
hash, first occurrence wins → the first good images in that order form the validation split, sized
from the number of good images, so skipped files never empty it → write shards into a staging
folder → write manifest.json last → swap the staging folder into place. Interrupted or failed runs
leave any previous shards folder untouched, and no run folder that prepare created. The output
depends only on the inputs and settings (not on the number of workers), so re-preparing the same
data gives byte-identical shards and manifest.
"""

from __future__ import annotations

import contextlib
import gzip
import multiprocessing as mp
import os
import shutil
import signal
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vqtool import __version__
from vqtool.artifacts import atomic_write_json
from vqtool.config import to_dict
from vqtool.console import progress
from vqtool.data import images
from vqtool.data.images import ConvertSettings, SkipImage
from vqtool.data.manifest import MANIFEST_KIND, MANIFEST_NAME, MANIFEST_VERSION
from vqtool.data.shards import BrokenArchive, ShardWriter, scan_members
from vqtool.data.synthetic import SYNTHETIC
from vqtool.errors import VqtoolError
from vqtool.outputs import (
    check_writable,
    naming,
    os_error_message,
    point_at_output,
    removed_on_failure,
    swap_in,
    tidy_after_killed_runs,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LABEL_MODES = ("none", "folder")

# Skip reasons of a whole source part rather than one file (next to those of vqtool.data.images):
TRUNCATED_ARCHIVE = "truncated-archive"  # the tar (or tar.gz) ends early; the members before the cut are used
CORRUPT_ARCHIVE = "corrupt-archive"  # a damaged tar header; the members before it are used


@dataclass
class PrepareSettings:
    size: int = 32
    crop: str = "center"  # center | random | none
    background: str = "white"  # white | black | R,G,B
    val_fraction: float = 0.05
    shard_size: int = 1000
    labels: str = "none"  # none | folder
    max_side: int = 10000
    workers: int = 2
    png_compression: int = 6

    def validate(self) -> None:
        if not 1 <= self.size <= 4096:
            raise VqtoolError(f"--size {self.size}: must be between 1 and 4096")
        if self.crop not in images.CROPS:
            raise VqtoolError(f"--crop {self.crop!r}: expected one of {', '.join(images.CROPS)}")
        try:
            images.parse_background(self.background)
        except ValueError as exc:
            raise VqtoolError(f"--background: {exc}") from None
        if not 0.0 <= self.val_fraction < 1.0:
            raise VqtoolError(f"--val-fraction {self.val_fraction}: must be at least 0 and below 1")
        if self.shard_size < 1:
            raise VqtoolError(f"--shard-size {self.shard_size}: must be at least 1")
        if self.labels not in LABEL_MODES:
            raise VqtoolError(f"--labels {self.labels!r}: expected one of {', '.join(LABEL_MODES)}")
        if self.max_side < 1:
            raise VqtoolError(f"--max-side {self.max_side}: must be at least 1")
        if self.workers < 1:
            raise VqtoolError(f"--workers {self.workers}: must be at least 1")
        if not 0 <= self.png_compression <= 9:
            raise VqtoolError(f"png_compression {self.png_compression}: must be 0-9")

    def convert_settings(self) -> ConvertSettings:
        return ConvertSettings(self.size, self.crop, images.parse_background(self.background), self.max_side)

    def output_settings(self) -> dict[str, Any]:
        """The settings that determine the output (not `workers`), as stored in the manifest."""
        d = to_dict(self)
        d.pop("workers")
        return d


@dataclass
class PrepareResult:
    shards_dir: Path
    counts: dict[str, int]
    found: int  # candidate image files
    ignored: int  # files without an image extension
    skipped: dict[str, int]  # reason → count
    classes: list[str]
    shard_files: int
    bytes: int
    seconds: float
    cpu_seconds: float  # this process and its (joined) workers: robust to other load on the machine
    workers: int
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.found / max(self.seconds, 1e-9)


# --------------------------------------------------------------------------------------------------
# Sources: a candidate is one image file in a folder, one member of a tar, or one synthetic index


@dataclass(frozen=True)
class Candidate:
    name: str  # path relative to the source (what the manifest lists)
    location: str  # file path, tar path, or "" for synthetic
    offset: int = -1  # byte offset inside a tar; -1 for plain files
    size: int = 0
    index: int = 0  # synthetic image index


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_tar(path: Path) -> bool:
    return path.is_file() and (path.name.lower().endswith((".tar", ".tar.gz", ".tgz")) or tarfile.is_tarfile(path))


def _list_folder(src: Path, skip: Path) -> tuple[list[Candidate], int, list[dict]]:
    """Image files under `src`, not descending into hidden folders (.git, staging) or into `skip`;
    and a skip entry for every subfolder that could not be listed (its images would be lost unseen)."""
    found, ignored, unlisted = [], 0, []
    skip = skip.resolve()

    def unreadable(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename is not None else src
        if where == src:
            raise VqtoolError(f"{src}: cannot list the source folder ({os_error_message(exc)})")
        unlisted.append({"path": f"{where.relative_to(src).as_posix()}/", "reason": images.UNREADABLE,
                         "detail": f"folder could not be listed: {os_error_message(exc).split(': ', 1)[-1]}"})

    for root, dirs, files in os.walk(src, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() != skip)
        for name in sorted(files):
            path = Path(root) / name
            rel = path.relative_to(src).as_posix()
            if _is_image_name(name):
                found.append(Candidate(rel, str(path)))
            else:
                ignored += 1
    found.sort(key=lambda c: c.name)
    return found, ignored, sorted(unlisted, key=lambda u: u["path"])


def _list_tar(tar_path: Path, shown_as: Path, cut: str | None = None) -> tuple[list[Candidate], int, list[dict]]:
    """Members of a tar (`shown_as` is the name the user gave; `cut` says the gzip stream around it
    ended early). A tar that breaks off part-way gives the members before the break and a skip entry."""
    found, ignored, problems = [], 0, []
    try:
        members = scan_members(tar_path, foreign=True)
    except BrokenArchive as broken:
        members = broken.members
        reason = TRUNCATED_ARCHIVE if broken.truncated else CORRUPT_ARCHIVE
        problems.append({"path": shown_as.name, "reason": reason,
                         "detail": f"{cut or broken}; the members after it are lost"})
    except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
        raise VqtoolError(f"{shown_as}: unreadable tar archive ({exc})") from None
    else:
        if cut:
            problems.append({"path": shown_as.name, "reason": TRUNCATED_ARCHIVE,
                             "detail": f"{cut}; the members after it are lost"})
    for name, offset, size, _ in members:
        if _is_image_name(name):
            found.append(Candidate(name, str(tar_path), offset, size))
        else:
            ignored += 1
    found.sort(key=lambda c: c.name)
    return found, ignored, problems


def _gunzip(src: Path, dest: Path) -> tuple[Path, str | None]:
    """Random access into a .tar.gz is a full decompression per read, so decompress it once. A gzip
    stream that ends early keeps what came before the cut; the second value then says so."""
    cut = None
    try:
        with gzip.open(src, "rb") as fin, open(dest, "wb") as fout:
            while True:
                try:
                    # read1: one decompression step at a time, so a cut loses nothing decoded before it
                    chunk = fin.read1(1 << 20)
                except EOFError:
                    cut = f"the gzip stream ends early (after {fout.tell():,} bytes of tar)"
                    break
                if not chunk:
                    break
                with naming(dest):
                    fout.write(chunk)
    except (gzip.BadGzipFile, zlib.error) as exc:  # other OSErrors (a full disk) are not the archive's fault
        raise VqtoolError(f"{src}: unreadable gzip archive ({exc})") from None
    return dest, cut


def list_source(src: Path, staging: Path, out: Path) -> tuple[list[Candidate], int, list[dict]]:
    """Candidates of a folder (never inside the output folder `out`) or a .tar/.tar.gz (decompressed
    into `staging`), sorted by name, the count of ignored files, and skip entries for the parts of the
    source that could not be read (an unreadable subfolder, an archive cut off part-way)."""
    if not src.exists():
        raise VqtoolError(f"{src}: source not found; give a folder or a .tar/.tar.gz of images")
    if src.is_dir():
        return _list_folder(src, out)
    if not _is_tar(src):
        raise VqtoolError(f"{src}: not a folder or a .tar/.tar.gz archive")
    with open(src, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if not gzipped:
        return _list_tar(src, src)
    tar_path, cut = _gunzip(src, staging / ".source.tar")
    return _list_tar(tar_path, src, cut)


# --------------------------------------------------------------------------------------------------
# Worker side (runs in pool processes, or in-process with one worker)

_settings: ConvertSettings | None = None
_synthetic: str | None = None
_seed = 0
_png_level = 6
_files: dict[str, Any] = {}


def _init_worker(settings: ConvertSettings, synthetic: str | None, seed: int, png_level: int, in_pool: bool) -> None:
    global _settings, _synthetic, _seed, _png_level
    _settings, _synthetic, _seed, _png_level = settings, synthetic, seed, png_level
    if in_pool:  # the parent handles Ctrl-C; workers are terminated by it
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _read(c: Candidate) -> bytes:
    try:
        if c.offset < 0:
            with open(c.location, "rb") as f:
                return f.read()
        f = _files.get(c.location)
        if f is None:
            f = _files[c.location] = open(c.location, "rb")
        f.seek(c.offset)
        return f.read(c.size)
    except OSError as exc:
        raise SkipImage(images.UNREADABLE, exc.strerror or str(exc)) from None


def _close_files() -> None:
    for f in _files.values():
        f.close()
    _files.clear()


def _work(item: tuple[int, Candidate, float]) -> tuple[int, bytes | None, str, str, str, int | None]:
    """(position, png or None, pixel hash, skip reason, skip detail, synthetic label)."""
    pos, cand, crop_offset = item
    try:
        if _synthetic is not None:
            render, _ = SYNTHETIC[_synthetic]
            array, label = render(cand.index, _settings.size, _seed)
            digest = images.pixel_hash(Image.fromarray(array))
            return pos, images.encode_png(array, _png_level), digest, "", "", label
        array, digest = images.convert_image(_read(cand), _settings, crop_offset)
        return pos, images.encode_png(array, _png_level), digest, "", "", None
    except SkipImage as skip:
        return pos, None, "", skip.reason, skip.detail, None


def _results(items: list, settings: PrepareSettings, synthetic: str | None, seed: int) -> Iterator[tuple]:
    conv = settings.convert_settings()
    if settings.workers == 1 or len(items) < 64:
        _init_worker(conv, synthetic, seed, settings.png_compression, in_pool=False)
        try:
            yield from map(_work, items)
        finally:
            _close_files()
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    chunk = max(1, min(64, len(items) // (settings.workers * 16)))
    pool = ctx.Pool(settings.workers, _init_worker, (conv, synthetic, seed, settings.png_compression, True))
    try:
        yield from pool.imap(_work, items, chunksize=chunk)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# --------------------------------------------------------------------------------------------------
# The stage


def _val_count(n: int, val_fraction: float) -> int:
    """Size of the val split of n images: at least 1 and at most n - 1 when val_fraction > 0 and n >= 2.
    It never decreases as n grows, which `_ValSpool` relies on."""
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return n_val


def _split_order(n: int, val_fraction: float, seed: int) -> tuple[list[int], int]:
    """A seeded processing order of the n candidates, and the val count if none of them is skipped."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g).tolist(), _val_count(n, val_fraction)


class _ValSpool:
    """The first good samples in processing order, kept in a file until the number of good images,
    and so the size of the val split, is known. The val split is the first `_val_count(good)` of
    them, and the rest go to train; when nothing is skipped that is exactly the first samples met.
    The spool never needs more than the val count of all candidates, a few percent of the data."""

    def __init__(self, path: Path, capacity: int):
        self.path = path
        self.capacity = capacity
        self.entries: list[tuple[int, int, int | None]] = []  # offset, size, label
        self._file = None

    def full(self) -> bool:
        return len(self.entries) >= self.capacity

    def add(self, png: bytes, label: int | None) -> None:
        if self._file is None:
            self._file = open(self.path, "w+b")
        self.entries.append((self._file.tell(), len(png), label))
        self._file.write(png)

    def drain(self) -> Iterator[tuple[bytes, int | None]]:
        """(png, label) in the order they were added; the file is removed afterwards."""
        if self._file is None:
            return
        try:
            for offset, size, label in self.entries:
                self._file.seek(offset)
                yield self._file.read(size), label
        finally:
            self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


def _crop_offset(seed: int, index: int, crop: str) -> float:
    if crop != "random":
        return 0.5
    return float(np.random.default_rng([seed & 0xFFFFFFFF, index, 0xC0]).random())


def _recorded_settings(settings: PrepareSettings, synthetic: str | None) -> dict[str, Any]:
    d = settings.output_settings()
    if synthetic:  # rendered at the final size: no crop, no transparency, labels from the generator
        for key in ("crop", "background", "max_side"):
            d.pop(key)
        d["labels"] = "shape class"
    return d


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise VqtoolError(f"{out}: exists and is not a folder; choose another --out/--run")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise VqtoolError(f"{out}: already exists; pass --overwrite to replace it")


def _run(
    out: Path,
    candidates: list[Candidate],
    ignored: int,
    labels: list[int | None],
    classes: list[str],
    pre_skipped: list[dict],
    unread: list[dict],
    settings: PrepareSettings,
    seed: int,
    source: str,
    synthetic: str | None,
    staging: Path,
    show_progress: bool,
    t0: float,
    cpu0: float,
) -> PrepareResult:
    order, val_capacity = _split_order(len(candidates), settings.val_fraction, seed)
    items = [(pos, candidates[i], _crop_offset(seed, i, settings.crop)) for pos, i in enumerate(order)]
    writers = {"val": ShardWriter(staging, "val", settings.shard_size),
               "train": ShardWriter(staging, "train", settings.shard_size)}
    # The split is chosen once the skipped files are known: chosen before, the skips could empty val.
    spool = _ValSpool(staging / ".val-spool", val_capacity)
    seen: dict[str, str] = {}
    skipped = [*unread, *pre_skipped]
    try:
        with progress(transient=not show_progress) as bar:
            task = bar.add_task("prepare", total=len(items), status="", visible=show_progress)
            done = 0
            for pos, png, digest, reason, detail, synth_label in _results(items, settings, synthetic, seed):
                cand = candidates[order[pos]]
                if png is not None and digest in seen:
                    reason, detail = images.DUPLICATE, f"same pixels as {seen[digest]}"
                if png is None or reason:
                    skipped.append({"path": cand.name, "reason": reason, "detail": detail})
                else:
                    seen[digest] = cand.name
                    label = synth_label if synthetic else labels[order[pos]]
                    if not spool.full():
                        spool.add(png, label)
                    else:
                        writers["train"].write(f"{writers['train'].count:08d}", png, label)
                done += 1
                if done % 64 == 0 or done == len(items):  # the bar redraws a few times a second anyway
                    bar.update(task, completed=done, status=f"{len(skipped)} skipped" if skipped else "")
        good = len(spool.entries) + writers["train"].count
        if good == 0:
            raise VqtoolError(f"{source}: no usable images ({len(skipped)} skipped, {ignored} ignored); "
                              "nothing written")
        n_val = _val_count(good, settings.val_fraction)
        if settings.val_fraction > 0 and not 0 < n_val < good:  # one image cannot fill both splits
            raise VqtoolError(f"{source}: only {good} usable image of {len(candidates) + len(pre_skipped)} "
                              f"({len(skipped)} skipped, {ignored} ignored), but --val-fraction "
                              f"{settings.val_fraction} (val {val_capacity} of {len(candidates)}) needs at least "
                              "2: one for val, one for train; add images or pass --val-fraction 0")
        for i, (png, label) in enumerate(spool.drain()):
            writer = writers["val"] if i < n_val else writers["train"]
            writer.write(f"{writer.count:08d}", png, label)
    finally:
        spool.close()
    entries = {split: w.close() for split, w in writers.items()}
    counts = {split: writers[split].count for split in ("train", "val")}
    reasons = Counter(s["reason"] for s in skipped)
    manifest = {
        "kind": MANIFEST_KIND,
        "format_version": MANIFEST_VERSION,
        "vqtool_version": __version__,
        "image_size": settings.size,
        "channels": 3,
        "counts": counts,
        "shards": {split: [e["name"] for e in entries[split]] for split in ("train", "val")},
        "shard_files": {split: entries[split] for split in ("train", "val")},
        "labelled": bool(classes),
        "classes": classes,
        "source": source,
        "seed": seed,
        "settings": _recorded_settings(settings, synthetic),
        "found": len(candidates) + len(pre_skipped),  # image files; `unread` are folders and archives
        "ignored": ignored,
        "skipped_counts": dict(sorted(reasons.items())),
        "skipped": skipped,
    }
    atomic_write_json(staging / MANIFEST_NAME, manifest)
    swap_in(staging, out, produced=lambda name: True)  # the shards folder is prepare's alone
    total_bytes = sum(e["bytes"] for split in entries.values() for e in split)
    return PrepareResult(
        shards_dir=out,
        counts=counts,
        found=manifest["found"],
        ignored=ignored,
        skipped=dict(reasons),
        classes=classes,
        shard_files=sum(len(v) for v in entries.values()),
        bytes=total_bytes,
        seconds=time.perf_counter() - t0,
        cpu_seconds=_cpu_seconds() - cpu0,
        workers=settings.workers,
        manifest=manifest,
    )


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _staged(out: Path) -> Path:
    """A fresh staging folder beside `out`; staging folders of killed runs (dead pids) are removed."""
    tidy_after_killed_runs(out, "staging")
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


@contextlib.contextmanager
def _writing_shards(out: Path) -> Iterator[Path]:
    """The staging folder to build the shards in. Writability is checked before any image is read;
    on failure the staging folder goes, and so do the folders created for `out` (a failed prepare
    leaves no empty run folder), and OSErrors name `out` rather than the staging folder."""
    with removed_on_failure(check_writable(out, folder=True)):
        staging = _staged(out)
        try:
            yield staging
        except OSError as exc:
            point_at_output(exc, staging, out)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def prepare_images(
    src: str | Path,
    out: str | Path,
    settings: PrepareSettings | None = None,
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool = True,
) -> PrepareResult:
    """Convert a folder or .tar/.tar.gz of images into shards + manifest.json in folder `out`."""
    settings = settings or PrepareSettings()
    settings.validate()
    src, out = Path(src), Path(out)
    _check_output(out, overwrite)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    with _writing_shards(out) as staging:
        candidates, ignored, unread = list_source(src, staging, out)
        labels: list[int | None] = [None] * len(candidates)
        classes: list[str] = []
        pre_skipped: list[dict] = []
        if settings.labels == "folder":
            kept = []
            for c in candidates:
                parent = c.name.rsplit("/", 2)[-2] if "/" in c.name else ""
                if parent:
                    kept.append((c, parent))
                else:
                    pre_skipped.append({"path": c.name, "reason": images.NO_LABEL,
                                        "detail": "--labels folder needs the image inside a class folder"})
            classes = sorted({p for _, p in kept})
            index = {name: i for i, name in enumerate(classes)}
            candidates = [c for c, _ in kept]
            labels = [index[p] for _, p in kept]
        if not candidates:
            unreadable = f"; {len(unread)} part(s) could not be read, first {unread[0]['path']} " \
                         f"({unread[0]['detail']})" if unread else ""
            raise VqtoolError(f"{src}: no image files found ({', '.join(IMAGE_EXTENSIONS)}){unreadable}")
        return _run(out, candidates, ignored, labels, classes, pre_skipped, unread, settings, seed,
                    str(src), None, staging, show_progress, t0, cpu0)


def prepare_synthetic(
    out: str | Path,
    name: str = "shapes",
    count: int = 2000,
    settings: PrepareSettings | None = None,
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool = True,
) -> PrepareResult:
    """Render `count` images of the built-in dataset `name` into shards (labels = shape class)."""
    settings = settings or PrepareSettings()
    settings.validate()
    if name not in SYNTHETIC:
        raise VqtoolError(f"--synthetic {name!r}: unknown; available: {', '.join(SYNTHETIC)}")
    if count < 1:
        raise VqtoolError(f"--count {count}: must be at least 1")
    out = Path(out)
    _check_output(out, overwrite)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    with _writing_shards(out) as staging:
        candidates = [Candidate(f"{name}/{i:08d}", "", index=i) for i in range(count)]
        classes = list(SYNTHETIC[name][1])
        return _run(out, candidates, 0, [None] * count, classes, [], [], settings, seed,
                    f"synthetic:{name}", name, staging, show_progress, t0, cpu0)
