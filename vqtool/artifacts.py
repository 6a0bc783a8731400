"""Safetensors artifacts with provenance metadata, validated loading, and atomic writes.

Every file a stage writes goes through here. The `__metadata__` block of a safetensors file holds only
strings, so the structured fields are stored as JSON strings:

    kind            what the file is (see KINDS)
    format_version  integer; a reader refuses files newer than it knows
    config          JSON of the settings that made it
    parents         JSON {role: sha256} of the artifacts it was made from
    extra           JSON of anything else a stage wants to keep (statistics, class names, ...)
    vqtool_version  the package version that wrote it
    command         the command line that made it
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import struct
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vqtool import __version__
from vqtool.errors import VqtoolError

FORMAT_VERSION = 1

KINDS = (
    "dataset-manifest",
    "vq-model",
    "vq-checkpoint",
    "latents",
    "prior-model",
    "prior-checkpoint",
    "samples",
    "features",
    "eval-report",
)

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors spec's own ceiling


# --------------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    If the body raises, the temporary file is removed and any old `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); give it the mode any other new file gets under the umask,
    # so a team can read a shared run folder.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.filename is None:  # a failed write (a full disk) names no file: name the one being written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    try:  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)  # elsewhere the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform allows opening a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------------------------------
# Hashing


_hash_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, cached per (path, size, mtime) within the process."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VqtoolError(f"{path}: file not found") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def _remember_sha256(path: Path, digest: str) -> None:
    """Record the hash of a file this process just wrote, so asking for it does not read the file again."""
    st = path.stat()
    _hash_cache[(str(path.resolve()), st.st_size, st.st_mtime_ns)] = digest


def command_line() -> str:
    argv = list(sys.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


# --------------------------------------------------------------------------------------------------
# Reading and writing


@dataclass
class Artifact:
    """An artifact read from disk: its tensors and its parsed metadata."""

    path: Path
    kind: str
    format_version: int
    config: dict[str, Any]
    parents: dict[str, str]
    extra: dict[str, Any]
    vqtool_version: str
    command: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)


def save_artifact(
    path: str | os.PathLike,
    kind: str,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any] | None = None,
    parents: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write a safetensors artifact atomically and return its sha256."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    metadata = {
        "kind": kind,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config or {}, sort_keys=True),
        "parents": json.dumps(parents or {}, sort_keys=True),
        "extra": json.dumps(extra or {}, sort_keys=True),
        "vqtool_version": __version__,
        "command": command_line(),
    }
    with atomic_path(path) as tmp:
        digest = write_safetensors(tmp, tensors, metadata)
    _remember_sha256(Path(path), digest)
    return digest


_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write the safetensors format tensor by tensor, straight from each tensor's memory; return its sha256.

    Building the file in memory first (as `safetensors.torch.save` does) holds the data two or three
    times over, which a large imported checkpoint cannot afford. Names and metadata keys are sorted,
    so the same content always gives the same bytes. The hash is taken of the bytes as they are
    written, which spares reading a large file back.
    """
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer pads it
    digest = hashlib.sha256()
    # One worker hashes the chunks in order while this thread writes and syncs them (hashlib and file
    # writes both release the GIL), so a large artifact costs about the longer of the two, not their sum.
    with ThreadPoolExecutor(1) as hasher, open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            hasher.submit(digest.update, chunk)
        for name in names:
            t = tensors[name].detach()
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous().reshape(-1)
            if t.numel():
                view = memoryview(t.view(torch.uint8).numpy())
                f.write(view)
                hasher.submit(digest.update, view)
        f.flush()
        os.fsync(f.fileno())  # here, while the hash catches up; atomic_path's own fsync then finds nothing to do
    return digest.hexdigest()


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header without trusting it; return (header, file size)."""
    if not path.exists():
        raise VqtoolError(f"{path}: file not found")
    if path.is_dir():
        raise VqtoolError(f"{path}: is a folder, expected a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise VqtoolError(f"{path}: not a safetensors file (only {size} bytes; truncated or empty)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise VqtoolError(f"{path}: not a safetensors file, or truncated (header claims {n} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise VqtoolError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise VqtoolError(f"{path}: corrupt safetensors header")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise VqtoolError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if end > data_len:
            raise VqtoolError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} but the file holds {data_len}"
            )
    return header, size


def _parse_metadata(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    meta = header.get("__metadata__") or {}
    if "kind" not in meta:
        raise VqtoolError(f"{path}: a safetensors file without vqtool metadata (no 'kind')")
    try:
        version = int(meta.get("format_version", "0"))
        parsed = {
            "kind": meta["kind"],
            "format_version": version,
            "config": json.loads(meta.get("config", "{}")),
            "parents": json.loads(meta.get("parents", "{}")),
            "extra": json.loads(meta.get("extra", "{}")),
            "vqtool_version": meta.get("vqtool_version", "?"),
            "command": meta.get("command", ""),
        }
    except (ValueError, json.JSONDecodeError):
        raise VqtoolError(f"{path}: corrupt vqtool metadata") from None
    return parsed


def _check_kind(path: Path, meta: dict[str, Any], kind: str | tuple[str, ...] | None) -> None:
    if kind is not None:
        wanted = (kind,) if isinstance(kind, str) else tuple(kind)
        if meta["kind"] not in wanted:
            raise VqtoolError(
                f"{path}: is a {meta['kind']!r} artifact, expected {' or '.join(repr(w) for w in wanted)}"
            )
    if meta["format_version"] > FORMAT_VERSION:
        raise VqtoolError(
            f"{path}: format version {meta['format_version']} is newer than this vqtool reads "
            f"({FORMAT_VERSION}); upgrade vqtool"
        )


def read_metadata(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None) -> Artifact:
    """The artifact's metadata and tensor list (shapes in `extra['_tensors']`), without loading data."""
    path = Path(path)
    header, _ = _read_header(path)
    meta = _parse_metadata(path, header)
    _check_kind(path, meta, kind)
    art = Artifact(path=path, **meta)
    art.extra = dict(art.extra)
    art.extra["_tensors"] = {
        k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in header.items() if k != "__metadata__"
    }
    return art


def load_artifact(
    path: str | os.PathLike,
    kind: str | tuple[str, ...] | None = None,
    device: str | torch.device = "cpu",
) -> Artifact:
    """Load an artifact, checking kind and format version; every failure is one VqtoolError line."""
    path = Path(path)
    header, _ = _read_header(path)
    meta = _parse_metadata(path, header)
    _check_kind(path, meta, kind)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types; the user gets one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VqtoolError(f"{path}: corrupt safetensors file ({first})") from None
    return Artifact(path=path, tensors=tensors, **meta)


def require_parent(child: Artifact, role: str, parent_path: str | os.PathLike) -> None:
    """Refuse to combine `child` with a `role` artifact other than the one it was made from."""
    expected = child.parents.get(role)
    if expected is None:
        return
    actual = file_sha256(parent_path)
    if actual != expected:
        raise VqtoolError(
            f"{child.path} was made from a different {role} (sha256 {expected[:12]}…) than "
            f"{parent_path} ({actual[:12]}…); rerun the stage that made {Path(child.path).name}"
        )


def load_prefixed_weights(model: torch.nn.Module, art: Artifact, prefix: str) -> None:
    """Load the artifact's `<prefix>.*` tensors into `model`; one-line errors when absent or unfit.

    Model artifacts keep several weight sets side by side (`ema.*`, `model.*`). The tensors are
    dropped from the artifact afterwards so the weights are not held twice.
    """
    head = f"{prefix}."
    state = {k[len(head):]: v for k, v in art.tensors.items() if k.startswith(head)}
    if not state:
        raise VqtoolError(f"{art.path}: has no {prefix!r} weights")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise VqtoolError(f"{art.path}: weights do not fit its config ({str(exc).splitlines()[0]})") from None
    art.tensors = {}
