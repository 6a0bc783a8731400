"""prepare: folders and tars → shards; bad inputs skipped with reasons; duplicates once; determinism."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqtool.artifacts import file_sha256
from vqtool.data.loader import ShardLoader
from vqtool.data.manifest import manifest_sha256, read_manifest, verify_shards
from vqtool.data.prepare import PrepareSettings, prepare_images, prepare_synthetic
from vqtool.data.synthetic import SHAPES, render_shape
from vqtool.errors import VqtoolError
from vqtool.grids import from_uint8


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def fingerprint(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def loaded(shards: Path, split: str = "train") -> list[tuple[torch.Tensor, int | None]]:
    out = []
    for x, y in ShardLoader(shards, split, batch_size=64, infinite=False):
        out += [(img, None if y is None else int(lab)) for img, lab in zip(x, y if y is not None else [None] * len(x),
                                                                          strict=True)]
    return out


def quiet(**kw) -> PrepareSettings:
    kw.setdefault("workers", 1)
    kw.setdefault("size", 16)
    return PrepareSettings(**kw)


# --------------------------------------------------------------------------------------------------


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """Four good images plus every kind of bad input."""
    src = tmp_path / "messy"
    (src / "sub").mkdir(parents=True)
    for i in range(4):
        (src / f"good{i}.png").write_bytes(png(noise(i)))
    (src / "empty.jpg").write_bytes(b"")
    good_png = png(noise(10, 32))
    (src / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    good_jpg = encoded(Image.fromarray(noise(11, 32)), "JPEG")
    (src / "truncated.jpg").write_bytes(good_jpg[: len(good_jpg) // 2])
    (src / "notes.jpg").write_text("not an image at all\n")
    (src / "cmyk.jpg").write_bytes(encoded(Image.new("CMYK", (20, 20), (0, 255, 0, 0)), "JPEG"))
    (src / "sub" / "grey16.png").write_bytes(encoded(Image.fromarray(np.full((16, 16), 40000, np.uint16)), "PNG"))
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0, 0, 0] * 254)
    (src / "sub" / "palette.png").write_bytes(encoded(pal, "PNG", transparency=0))
    (src / "sub" / "grey.png").write_bytes(encoded(Image.new("L", (16, 16), 77), "PNG"))
    (src / "sub" / "la.png").write_bytes(encoded(Image.new("LA", (16, 16), (90, 128)), "PNG"))
    (src / "huge.png").write_bytes(encoded(Image.new("RGB", (10001, 1)), "PNG"))
    Image.fromarray(noise(2)).save(src / "sub" / "copy-of-good2.bmp")  # same pixels as good2.png
    (src / "README.txt").write_text("ignored: no image extension")
    return src


def test_bad_inputs_are_converted_or_skipped_with_reasons(messy_folder, tmp_path):
    out = tmp_path / "shards"
    result = prepare_images(messy_folder, out, quiet(val_fraction=0.0), show_progress=False)
    m = read_manifest(out)
    # kept: 4 good + cmyk, grey16, palette, grey, la (converted) = 9; the duplicate is stored once
    assert m["counts"] == {"train": 9, "val": 0}
    assert m["skipped_counts"] == {"duplicate": 1, "empty": 1, "not-an-image": 1, "too-large": 1, "truncated": 2}
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert reasons["empty.jpg"] == "empty"
    assert reasons["notes.jpg"] == "not-an-image"
    assert reasons["huge.png"] == "too-large"
    assert reasons["truncated.png"] == reasons["truncated.jpg"] == "truncated"
    dup = [s for s in m["skipped"] if s["reason"] == "duplicate"]
    assert len(dup) == 1 and {dup[0]["path"], dup[0]["detail"].split()[-1]} == {"good2.png", "sub/copy-of-good2.bmp"}
    assert m["ignored"] == 1 and m["found"] == 15
    assert result.skipped == m["skipped_counts"] and result.counts == m["counts"]
    images = {fingerprint(img) for img, _ in loaded(out)}
    for i in range(4):  # 16 px sources at --size 16 are stored pixel for pixel
        assert fingerprint(from_uint8(noise(i))) in images
    grey = from_uint8(np.full((16, 16, 3), 77, np.uint8))
    grey16 = from_uint8(np.full((16, 16, 3), 40000 >> 8, np.uint8))
    assert fingerprint(grey) in images and fingerprint(grey16) in images
    verify_shards(out)


def test_synthetic_shards_round_trip_pixel_exact(tiny_shards):
    rendered = {}
    for i in range(48):
        array, label = render_shape(i, 16, seed=0)
        rendered[fingerprint(from_uint8(array))] = label
    got = loaded(tiny_shards, "train") + loaded(tiny_shards, "val")
    assert len(got) == 48
    assert {fingerprint(img): label for img, label in got} == rendered
    m = read_manifest(tiny_shards)
    assert m["classes"] == list(SHAPES) and m["labelled"] and m["image_size"] == 16


def test_same_seed_gives_identical_bytes_other_seed_another_split(tmp_path):
    settings = quiet(size=8, val_fraction=0.2, shard_size=16)
    a = prepare_synthetic(tmp_path / "a", count=40, settings=settings, seed=1, show_progress=False)
    b = prepare_synthetic(tmp_path / "b", count=40, settings=settings, seed=1, show_progress=False)
    c = prepare_synthetic(tmp_path / "c", count=40, settings=settings, seed=2, show_progress=False)
    assert manifest_sha256(tmp_path / "a") == manifest_sha256(tmp_path / "b")
    assert a.manifest["shard_files"] == b.manifest["shard_files"]
    assert a.counts == c.counts == {"train": 32, "val": 8}
    # seed 2 renders other images and picks another validation subset
    assert a.manifest["shard_files"]["val"][0]["sha256"] != c.manifest["shard_files"]["val"][0]["sha256"]


def test_val_split_is_deterministic_by_seed_for_a_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"{i:02d}.png").write_bytes(png(noise(i)))

    def val_set(seed: int, name: str) -> set[str]:
        out = tmp_path / name
        prepare_images(src, out, quiet(val_fraction=0.25), seed=seed, show_progress=False)
        return {fingerprint(img) for img, _ in loaded(out, "val")}

    first, again, other = val_set(3, "s1"), val_set(3, "s2"), val_set(4, "s3")
    assert len(first) == 5 and first == again and first != other


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    one = prepare_synthetic(tmp_path / "w1", count=80, settings=quiet(size=8, workers=1), show_progress=False)
    two = prepare_synthetic(tmp_path / "w2", count=80, settings=quiet(size=8, workers=2), show_progress=False)
    assert one.manifest["shard_files"] == two.manifest["shard_files"]
    assert manifest_sha256(tmp_path / "w1") == manifest_sha256(tmp_path / "w2")


def _tar_of(path: Path, members: dict[str, bytes], gz: bool) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_tar_source_with_folder_labels(tmp_path, gz):
    members = {
        "train/cat/1.png": png(noise(1)),
        "train/cat/2.png": png(noise(2)),
        "train/dog/3.png": png(noise(3)),
        "train/dog/4.jpg": b"",
        "loose.png": png(noise(5)),
        "train/dog/meta.json": b"{}",
    }
    src = _tar_of(tmp_path / ("src.tar.gz" if gz else "src.tar"), members, gz)
    out = tmp_path / "shards"
    prepare_images(src, out, quiet(labels="folder", val_fraction=0.0), show_progress=False)
    m = read_manifest(out)
    assert m["classes"] == ["cat", "dog"]
    assert m["counts"]["train"] == 3 and m["ignored"] == 1
    assert {s["path"]: s["reason"] for s in m["skipped"]} == {"loose.png": "no-label", "train/dog/4.jpg": "empty"}
    got = {fingerprint(img): label for img, label in loaded(out)}
    assert got == {fingerprint(from_uint8(noise(1))): 0, fingerprint(from_uint8(noise(2))): 0,
                   fingerprint(from_uint8(noise(3))): 1}
    assert not list(tmp_path.glob(".shards.staging-*"))  # the decompressed copy is gone too


def test_unlabelled_folder_gives_no_labels(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for i in range(3):
        (src / "a" / f"{i}.png").write_bytes(png(noise(i)))
    prepare_images(src, tmp_path / "shards", quiet(val_fraction=0.0), show_progress=False)
    x, y = next(iter(ShardLoader(tmp_path / "shards", batch_size=3, infinite=False)))
    assert x.shape == (3, 3, 16, 16) and y is None


def test_random_crop_is_seeded(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.png").write_bytes(png(np.random.default_rng(i).integers(0, 256, (16, 64, 3), dtype=np.uint8)))
    shas = []
    for name, seed in [("a", 0), ("b", 0), ("c", 5)]:
        prepare_images(src, tmp_path / name, quiet(crop="random", val_fraction=0.0), seed=seed, show_progress=False)
        shas.append({fingerprint(img) for img, _ in loaded(tmp_path / name)})
    assert shas[0] == shas[1] != shas[2]


def test_refuses_to_overwrite_and_a_failed_rerun_keeps_the_old_shards(tmp_path):
    out = tmp_path / "shards"
    prepare_synthetic(out, count=10, settings=quiet(size=8), show_progress=False)
    before = file_sha256(out / "manifest.json")
    with pytest.raises(VqtoolError, match="--overwrite"):
        prepare_synthetic(out, count=10, settings=quiet(size=8), show_progress=False)
    empty = tmp_path / "no-images"
    empty.mkdir()
    (empty / "x.txt").write_text("nothing here")
    with pytest.raises(VqtoolError, match="no image files"):
        prepare_images(empty, out, quiet(), overwrite=True, show_progress=False)
    assert file_sha256(out / "manifest.json") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-images", "shards"]  # no staging left behind
    prepare_synthetic(out, count=12, settings=quiet(size=8), overwrite=True, show_progress=False)
    assert sum(read_manifest(out)["counts"].values()) == 12


def test_all_files_unusable_is_an_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    with pytest.raises(VqtoolError, match="no usable images"):
        prepare_images(src, tmp_path / "out", quiet(), show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"crop": "square"}, "--crop"),
        ({"background": "mauve"}, "--background"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"shard_size": 0}, "--shard-size"),
        ({"labels": "file"}, "--labels"),
        ({"size": 0}, "--size"),
        ({"workers": 0}, "--workers"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, kw, match):
    with pytest.raises(VqtoolError, match=match):
        prepare_synthetic(tmp_path / "s", count=4, settings=quiet(**kw), show_progress=False)


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(VqtoolError, match="not found"):
        prepare_images(tmp_path / "nowhere", tmp_path / "s", quiet(), show_progress=False)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(VqtoolError, match="not a folder or a .tar"):
        prepare_images(tmp_path / "file.txt", tmp_path / "s", quiet(), show_progress=False)


# --------------------------------------------------------------------------------------------------
# Manifest validation


def test_manifest_validation_errors(tiny_run):
    shards = tiny_run / "shards"
    path = shards / "manifest.json"
    good = json.loads(path.read_text())
    assert manifest_sha256(shards) == file_sha256(path)

    def broken(mutate) -> str:
        m = json.loads(json.dumps(good))
        mutate(m)
        path.write_text(json.dumps(m))
        with pytest.raises(VqtoolError) as info:
            read_manifest(shards)
        message = str(info.value)
        assert "\n" not in message and str(path) in message
        return message

    assert "newer" in broken(lambda m: m.update(format_version=99))
    assert "kind" in broken(lambda m: m.update(kind="vq-model"))
    assert "missing field" in broken(lambda m: m.pop("counts"))
    assert "add up" in broken(lambda m: m["counts"].update(train=1))
    path.write_text("{not json")
    with pytest.raises(VqtoolError, match="not valid JSON"):
        read_manifest(shards)
    path.write_text(json.dumps(good))
    read_manifest(shards)
    shard = shards / good["shards"]["train"][0]
    shard.write_bytes(shard.read_bytes()[:-512] + b"\x01" * 512)
    with pytest.raises(VqtoolError, match="sha256"):
        verify_shards(shards)


def test_staging_folders_of_killed_runs_are_cleaned_up(tmp_path):
    dead = tmp_path / ".shards.staging-999999999"  # no such process
    dead.mkdir()
    (dead / "train-000000.tar").write_bytes(b"half written")
    prepare_synthetic(tmp_path / "shards", count=4, settings=quiet(size=8), show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_output_inside_the_source_folder_is_not_read_back(tmp_path):
    src = tmp_path / "project"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(png(noise(i)))
    (src / ".git").mkdir()
    (src / ".git" / "x.png").write_bytes(png(noise(9)))
    out = src / "runs" / "r" / "shards"
    prepare_images(src, out, quiet(val_fraction=0.0), show_progress=False)
    (out / "stray.png").write_bytes(png(noise(8)))  # an image inside the old output folder
    result = prepare_images(src, out, quiet(val_fraction=0.0), overwrite=True, show_progress=False)
    assert result.found == 3 and result.counts["train"] == 3


def test_two_workers_read_a_tar_like_one(tmp_path):
    members = {f"imgs/{i:03d}.png": png(noise(i, 12)) for i in range(70)}
    members["imgs/070.png"] = members["imgs/003.png"]  # a duplicate, found across worker processes
    src = _tar_of(tmp_path / "src.tar", members, gz=False)
    one = prepare_images(src, tmp_path / "w1", quiet(size=8, workers=1), show_progress=False)
    two = prepare_images(src, tmp_path / "w2", quiet(size=8, workers=2), show_progress=False)
    assert one.manifest["shard_files"] == two.manifest["shard_files"]
    assert one.skipped == two.skipped == {"duplicate": 1}
