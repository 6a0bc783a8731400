"""artifacts.py and statepack.py: round trips, every metadata validation error, and atomic writes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as raw_save

from vqtool import __version__, artifacts, statepack
from vqtool.artifacts import (
    FORMAT_VERSION,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    load_artifact,
    read_metadata,
    require_parent,
    save_artifact,
)
from vqtool.errors import VqtoolError


@pytest.fixture
def artifact(tmp_path) -> Path:
    path = tmp_path / "vq.safetensors"
    tensors = {"w": torch.arange(12.0).reshape(3, 4), "codes": torch.tensor([1, 2], dtype=torch.int16)}
    save_artifact(path, "vq-model", tensors, config={"ch": 8, "mult": [1, 2]}, parents={"dataset": "ab" * 32},
                  extra={"classes": ["a", "b"]})
    return path


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(VqtoolError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_round_trip(artifact):
    art = load_artifact(artifact, "vq-model")
    assert torch.equal(art.tensors["w"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert art.tensors["codes"].dtype == torch.int16
    assert art.kind == "vq-model" and art.format_version == FORMAT_VERSION
    assert art.config == {"ch": 8, "mult": [1, 2]}
    assert art.parents == {"dataset": "ab" * 32}
    assert art.extra == {"classes": ["a", "b"]}
    assert art.vqtool_version == __version__ and art.command
    assert art.sha256 == file_sha256(artifact)


def test_save_returns_sha_and_views_are_saved(tmp_path):
    base = torch.arange(10.0)
    sha = save_artifact(tmp_path / "a.safetensors", "samples", {"view": base[2:5], "same": base})
    assert sha == file_sha256(tmp_path / "a.safetensors")
    assert torch.equal(load_artifact(tmp_path / "a.safetensors").tensors["view"], torch.tensor([2.0, 3.0, 4.0]))
    with pytest.raises(ValueError):
        save_artifact(tmp_path / "b.safetensors", "not-a-kind", {})


def test_read_metadata_lists_tensors_without_loading(artifact):
    meta = read_metadata(artifact, ("latents", "vq-model"))
    assert meta.tensors == {}
    assert meta.extra["_tensors"]["w"] == {"dtype": "F32", "shape": [3, 4]}


def test_wrong_kind(artifact):
    message = one_line_error(load_artifact, artifact, "prior-model")
    assert str(artifact) in message and "'vq-model'" in message and "'prior-model'" in message


def _write_raw(path: Path, metadata: dict[str, str]) -> Path:
    path.write_bytes(raw_save({"x": torch.zeros(2)}, metadata=metadata))
    return path


def test_newer_format_is_refused(tmp_path):
    path = _write_raw(tmp_path / "new.safetensors", {"kind": "latents", "format_version": str(FORMAT_VERSION + 1)})
    message = one_line_error(load_artifact, path, "latents")
    assert "newer" in message and "upgrade" in message and str(path) in message
    assert "newer" in one_line_error(read_metadata, path)


def test_truncated_file(artifact):
    data = artifact.read_bytes()
    artifact.write_bytes(data[:-10])
    assert "truncated" in one_line_error(load_artifact, artifact)
    artifact.write_bytes(data[:20])
    assert "truncated" in one_line_error(load_artifact, artifact)
    artifact.write_bytes(data[:5])
    assert "truncated or empty" in one_line_error(load_artifact, artifact)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert "not a safetensors file" in one_line_error(load_artifact, path)


def test_corrupt_header(artifact):
    data = bytearray(artifact.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + n] = b"{" * n
    artifact.write_bytes(bytes(data))
    assert "corrupt" in one_line_error(load_artifact, artifact)


def test_corrupt_tensor_entry(tmp_path):
    header = json.dumps({"__metadata__": {"kind": "latents", "format_version": "1"},
                         "x": {"dtype": "NOPE", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    assert "corrupt" in one_line_error(load_artifact, path)


def test_corrupt_metadata_json(tmp_path):
    path = _write_raw(tmp_path / "m.safetensors", {"kind": "latents", "format_version": "1", "config": "{oops"})
    assert "corrupt vqtool metadata" in one_line_error(load_artifact, path)


def test_not_a_safetensors_file(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is a text file that is long enough to have a header\n")
    assert "not a safetensors file" in one_line_error(load_artifact, text)
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    assert "not a safetensors file" in one_line_error(read_metadata, png)
    plain = _write_raw(tmp_path / "plain.safetensors", {})
    assert "without vqtool metadata" in one_line_error(load_artifact, plain)


def test_missing_file_and_folder(tmp_path):
    assert "not found" in one_line_error(load_artifact, tmp_path / "nope.safetensors")
    assert "folder" in one_line_error(load_artifact, tmp_path)


def test_require_parent(tmp_path, artifact):
    parent = tmp_path / "parent.bin"
    parent.write_bytes(b"parent v1")
    child_path = tmp_path / "child.safetensors"
    save_artifact(child_path, "latents", {}, parents={"vq": file_sha256(parent)})
    child = load_artifact(child_path)
    require_parent(child, "vq", parent)
    require_parent(child, "dataset", artifact)  # no record for this role: nothing to check
    parent.write_bytes(b"parent version 2")
    assert "different vq" in one_line_error(require_parent, child, "vq", parent)


# --------------------------------------------------------------------------------------------------
# Atomic writes


def test_failure_inside_atomic_path_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b'{"version": 2, "half')  # a partial write, then a crash
            raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failure_at_rename_keeps_the_old_artifact(tmp_path, monkeypatch):
    path = tmp_path / "prior.safetensors"
    save_artifact(path, "prior-model", {"w": torch.ones(3)})
    old_sha = file_sha256(path)

    def broken_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(artifacts.os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_artifact(path, "prior-model", {"w": torch.zeros(1000)})
    monkeypatch.undo()
    assert torch.equal(load_artifact(path, "prior-model").tensors["w"], torch.ones(3))
    assert file_sha256(path) == old_sha
    assert [p.name for p in tmp_path.iterdir()] == ["prior.safetensors"]


def test_failure_at_fsync_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    atomic_write_bytes(path, b"old contents")

    def broken_fsync(fd):
        raise OSError("simulated I/O error")

    monkeypatch.setattr(artifacts.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new contents that never land")
    monkeypatch.undo()
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_atomic_write_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "c.txt"
    atomic_write_bytes(path, b"1")
    atomic_write_bytes(path, b"22")
    assert path.read_bytes() == b"22"


def test_file_sha256_notices_changes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"one")
    first = file_sha256(path)
    path.write_bytes(b"three")
    os.utime(path, ns=(1, 1))
    assert file_sha256(path) != first
    assert "not found" in one_line_error(file_sha256, tmp_path / "missing")


# --------------------------------------------------------------------------------------------------
# statepack


def test_statepack_round_trips_optimizer_and_rng_state(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    g = torch.Generator().manual_seed(5)
    state = {
        "optimizer": opt.state_dict(),
        "generator": g.get_state(),
        "step": 7,
        "scalars": [float("inf"), float("-inf"), 0.5, None, True, "text"],
        "pair": (1, 2),
        "by_int": {0: {"x": torch.ones(2)}, 3: []},
    }
    tensors, skeleton = statepack.pack(state)
    save_artifact(tmp_path / "ckpt.safetensors", "vq-checkpoint", tensors, extra={"state": skeleton})
    art = load_artifact(tmp_path / "ckpt.safetensors", "vq-checkpoint")
    back = statepack.unpack(art.tensors, art.extra["state"])

    assert back["step"] == 7 and back["pair"] == (1, 2)
    assert back["scalars"][:2] == [float("inf"), float("-inf")] and back["scalars"][2:] == [0.5, None, True, "text"]
    assert set(back["by_int"]) == {0, 3} and torch.equal(back["by_int"][0]["x"], torch.ones(2))
    assert torch.equal(back["generator"], g.get_state())
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt2.state_dict()["state"][0][k]))
    nan = statepack.unpack(*statepack.pack({"v": float("nan")}))["v"]
    assert nan != nan


def test_statepack_refuses_unknown_types():
    with pytest.raises(TypeError, match="set"):
        statepack.pack({"bad": {1, 2}})
