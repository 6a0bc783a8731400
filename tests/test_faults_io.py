"""Nothing lost, ever: file-system errors are one line, outputs are checked before the work and
replaced only when complete, prepare reports every part of a source it could not read, and
impossible options or Ctrl-C at startup never end in a traceback."""

from __future__ import annotations

import errno
import gzip
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_sampling import write_tiny_run
from typer.testing import CliRunner

from vqtool.artifacts import file_sha256, save_artifact
from vqtool.cli import app
from vqtool.data.manifest import read_manifest
from vqtool.data.prepare import PrepareSettings, _split_order, prepare_images
from vqtool.errors import VqtoolError
from vqtool.outputs import check_writable, matcher, os_error_message, remove_created, staged_folder

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ROOT_IGNORES_PERMISSIONS = "runs as root, where permission bits do not stop writes or reads"


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The one error line a failed command prints (after the progress bar, if work had started);
    asserts exit status 2 and no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert "Traceback" not in result.output
    return errors[0]


def png_bytes(seed: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def folder_state(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def sample_args(run: Path, *extra) -> list:
    return ["sample", "--run", run, "--steps", "2", "--device", "cpu", *extra]


def full_disk_after(monkeypatch, writes: int) -> None:
    """Every PNG written after the first `writes` fails with ENOSPC, as on a disk that fills up."""
    import vqtool.grids

    real = vqtool.grids.atomic_write_bytes
    count = {"n": 0}

    def write(path, data):
        count["n"] += 1
        if count["n"] > writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a failed write() carries: no name
        real(path, data)

    monkeypatch.setattr(vqtool.grids, "atomic_write_bytes", write)


# --------------------------------------------------------------------------------------------------
# A. File-system errors are one line; outputs are checked first and replaced only when complete


def test_os_error_message_names_the_path_the_cause_and_the_code():
    assert os_error_message(OSError(errno.ENOSPC, "No space left on device", "runs/x/samples/grid.png")) == \
        "runs/x/samples/grid.png: no space left on device (ENOSPC)"
    assert os_error_message(PermissionError(errno.EACCES, "Permission denied", "runs/x")) == \
        "runs/x: permission denied (EACCES)"
    assert os_error_message(NotADirectoryError(errno.ENOTDIR, "x", "runs/x/vq.safetensors/y")) == \
        "runs/x/vq.safetensors/y: not a directory (ENOTDIR)"
    assert os_error_message(OSError(errno.EXDEV, "x", "a", None, "b")) == "a → b: invalid cross-device link (EXDEV)"
    assert os_error_message(OSError(errno.EIO, "x")) == "input/output error (EIO)"
    assert os_error_message(OSError("cannot identify image file 'x.png'\nmore")) == "cannot identify image file 'x.png'"
    assert os_error_message(OSError()) == "OSError"


def test_check_writable_creates_the_folders_and_says_which(tmp_path):
    target = tmp_path / "a" / "b" / "out.safetensors"
    created = check_writable(target)
    assert created == [tmp_path / "a", tmp_path / "a" / "b"]
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
    remove_created(created)
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "vq.safetensors").write_bytes(b"x")
    with pytest.raises(VqtoolError, match=r"vq.safetensors: is a file, not a folder, so .*y/z cannot be written"):
        check_writable(tmp_path / "vq.safetensors" / "y" / "z")
    with pytest.raises(VqtoolError, match="exists and is not a folder"):
        check_writable(tmp_path / "vq.safetensors", folder=True)


def test_output_under_a_regular_file_is_one_line_before_any_work(tmp_path, monkeypatch):
    import vqtool.prior.sample

    run = tmp_path / "run"
    write_tiny_run(run)
    monkeypatch.setattr(vqtool.prior.sample, "load_pair", lambda *a: pytest.fail("loaded before checking"))
    line = error_line(invoke(*sample_args(run, "--out", run / "vq.safetensors" / "y")))
    assert f"{run / 'vq.safetensors'}: is a file, not a folder" in line
    line = error_line(invoke("inpaint", run / "vq.safetensors", "--run", run, "--box", "0,0,4,4",
                             "--out", run / "vq.safetensors" / "y", "--device", "cpu"))
    assert "is a file, not a folder" in line
    # An OSError that no stage turned into a VqtoolError is one line too (here: the folder is a file).
    (tmp_path / "eval").write_text("a file where RUN/eval should be")
    line = error_line(invoke("eval", "--run", tmp_path, "--metrics", "nll"))
    assert f"{tmp_path / 'eval'}: is a file, not a folder" in line


def test_a_raw_os_error_from_any_stage_is_one_line(tmp_path, monkeypatch):
    import vqtool.data.prepare

    def fail(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "locked"))

    monkeypatch.setattr(vqtool.data.prepare, "prepare_synthetic", fail)
    monkeypatch.setattr("vqtool.cli.data.prepare_synthetic", fail)
    line = error_line(invoke("prepare", "--synthetic", "shapes", "--run", tmp_path / "r"))
    assert line == f"error: {tmp_path / 'locked'}: permission denied (EACCES)"


@pytest.mark.skipif(IS_ROOT, reason=ROOT_IGNORES_PERMISSIONS)
def test_read_only_run_folder_stops_sample_before_sampling(tmp_path):
    run = tmp_path / "run"
    write_tiny_run(run)
    run.chmod(0o555)
    try:
        line = error_line(invoke(*sample_args(run, "--n", "2")))
    finally:
        run.chmod(0o755)
    assert f"{run}: permission denied (EACCES); cannot write {run / 'samples'}" in line
    assert not (run / "samples").exists()


def test_permission_denied_is_found_before_sampling(tmp_path, monkeypatch):
    # The same check as a read-only folder, injected, so that it runs as root too.
    import vqtool.outputs
    import vqtool.prior.sample

    run = tmp_path / "run"
    write_tiny_run(run)

    def denied(prefix="", dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "abc123"))

    monkeypatch.setattr(vqtool.outputs.tempfile, "mkstemp", denied)
    monkeypatch.setattr(vqtool.prior.sample, "sample_tokens", lambda *a: pytest.fail("sampled before checking"))
    line = error_line(invoke(*sample_args(run, "--n", "2", "--out", run / "new" / "samples")))
    assert line == f"error: {run / 'new'}: permission denied (EACCES); cannot write {run / 'new' / 'samples'}"
    assert not (run / "new").exists()  # the folder the check created is gone again


def test_sample_full_disk_keeps_the_old_outputs_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_tiny_run(run)
    assert invoke(*sample_args(run, "--n", "3")).exit_code == 0
    out = run / "samples"
    (out / "notes.txt").write_text("the user's own file")
    before = folder_state(out)

    full_disk_after(monkeypatch, writes=2)
    line = error_line(invoke(*sample_args(run, "--n", "6", "--seed", "1", "--overwrite")))
    assert line == f"error: {out / 'sample-0002.png'}: no space left on device (ENOSPC)"
    assert folder_state(out) == before
    assert leftovers(run) == []  # no .samples.tmp-* and no .samples.old-*

    monkeypatch.undo()
    r = invoke(*sample_args(run, "--n", "2", "--seed", "1", "--overwrite"))
    assert r.exit_code == 0, r.output
    # Replaced as a whole: the third old PNG is gone, the user's file was carried over.
    assert sorted(folder_state(out)) == ["grid.png", "notes.txt", "sample-0000.png", "sample-0001.png",
                                         "samples.safetensors"]
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert leftovers(run) == []


def test_a_failed_first_sample_leaves_nothing(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_tiny_run(run)
    full_disk_after(monkeypatch, writes=0)
    error_line(invoke(*sample_args(run, "--n", "2", "--out", tmp_path / "fresh" / "deeper" / "samples")))
    assert not (tmp_path / "fresh").exists() and not (run / "samples").exists()
    assert leftovers(run) == [] and leftovers(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs: a real full disk. Needs the right to mount (root in a container that allows it)."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({exc})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=20)


def test_sample_on_a_really_full_disk(tmp_path, small_tmpfs):
    run = tmp_path / "run"
    write_tiny_run(run)
    out = small_tmpfs / "samples"
    assert invoke(*sample_args(run, "--n", "2", "--out", out)).exit_code == 0
    before = folder_state(out)
    # Each file takes at least one 4 KiB page: 40 PNGs cannot fit beside the old outputs.
    line = error_line(invoke(*sample_args(run, "--n", "40", "--out", out, "--overwrite")))
    assert line.startswith(f"error: {out}/") and line.endswith(": no space left on device (ENOSPC)")
    assert folder_state(out) == before
    assert leftovers(small_tmpfs) == []


def test_inpaint_full_disk_keeps_the_old_outputs_and_the_source_image(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_tiny_run(run)
    out = run / "inpaint"
    out.mkdir()
    source = out / "source.png"  # where `vqtool run` puts the image it completes
    source.write_bytes(png_bytes(0))
    args = ["inpaint", source, "--run", run, "--box", "0,0,8,8", "--steps", "4", "--device", "cpu"]
    assert invoke(*args, "--n", "3").exit_code == 0
    before = folder_state(out)

    full_disk_after(monkeypatch, writes=4)
    line = error_line(invoke(*args, "--n", "2", "--overwrite", "--seed", "5"))
    assert line == f"error: {out / 'completion-01.png'}: no space left on device (ENOSPC)"
    assert folder_state(out) == before and leftovers(run) == []

    monkeypatch.undo()
    assert invoke(*args, "--n", "2", "--overwrite", "--seed", "5").exit_code == 0
    names = sorted(folder_state(out))
    assert "completion-02.png" not in names and "completion-01.png" in names
    assert file_sha256(source) == before["source.png"]


def test_sample_refuses_an_output_folder_that_holds_its_inputs(tmp_path):
    run = tmp_path / "run"
    write_tiny_run(run)
    line = error_line(invoke(*sample_args(run, "--n", "1", "--out", run)))
    assert f"--out {run}: holds {run / 'prior.safetensors'}, an input of this stage" in line
    assert sorted(p.name for p in run.iterdir()) == ["prior.safetensors", "vq.safetensors"]


def test_staged_folder_puts_back_the_old_folder_of_a_killed_swap(tmp_path):
    out = tmp_path / "samples"
    old = tmp_path / ".samples.old-999999999"  # a process killed between its two renames
    old.mkdir()
    (old / "keep.txt").write_text("previous")
    (old / "sample-0000.png").write_bytes(b"old png")
    dead_tmp = tmp_path / ".samples.tmp-999999999"
    dead_tmp.mkdir()
    with staged_folder(out, matcher("sample-*.png")) as staging:
        (staging / "sample-0000.png").write_bytes(b"new png")
    assert (out / "keep.txt").read_text() == "previous" and (out / "sample-0000.png").read_bytes() == b"new png"
    assert leftovers(tmp_path) == []


def test_encode_checks_its_output_before_encoding(tiny_run, monkeypatch):
    import vqtool.vq.encode

    write_tiny_run(tiny_run)
    monkeypatch.setattr(vqtool.vq.encode, "_encode_splits", lambda *a: pytest.fail("encoded before checking"))
    line = error_line(invoke("encode", "--run", tiny_run, "--device", "cpu",
                             "--out", tiny_run / "vq.safetensors" / "latents.safetensors"))
    assert "is a file, not a folder" in line


# --------------------------------------------------------------------------------------------------
# B. prepare reports what it could not read, chooses val after skipping, leaves nothing when it fails


def quiet(**kw) -> PrepareSettings:
    return PrepareSettings(**{"workers": 1, "size": 8, **kw})


def image_folder(root: Path, good: int, empty: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        (root / f"good{i:02d}.png").write_bytes(png_bytes(i))
    for i in range(empty):
        (root / f"bad{i:02d}.png").write_bytes(b"")
    return root


def test_prepare_reports_an_unreadable_subfolder(tmp_path, monkeypatch):
    src = image_folder(tmp_path / "src", good=3)
    image_folder(src / "locked", good=2)
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == src / "locked":  # what a folder without read permission gives a non-root user
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = invoke("prepare", src, "--out", tmp_path / "shards", "--size", 8, "--workers", 1, "--val-fraction", 0)
    assert result.exit_code == 0, result.output
    assert "skipped: unreadable" in result.output
    m = read_manifest(tmp_path / "shards")
    assert m["counts"]["train"] == 3 and m["skipped_counts"] == {"unreadable": 1}
    assert m["skipped"] == [{"path": "locked/", "reason": "unreadable",
                             "detail": "folder could not be listed: permission denied (EACCES)"}]
    assert m["found"] == 3  # files; the folder is not one
    info = invoke("info", tmp_path / "shards")
    assert "locked/" in info.output


@pytest.mark.skipif(IS_ROOT, reason=ROOT_IGNORES_PERMISSIONS)
def test_prepare_reports_a_folder_without_read_permission(tmp_path):
    src = image_folder(tmp_path / "src", good=3)
    image_folder(src / "locked", good=2)
    (src / "locked").chmod(0)
    try:
        result = prepare_images(src, tmp_path / "shards", quiet(val_fraction=0), show_progress=False)
    finally:
        (src / "locked").chmod(0o755)
    assert result.skipped == {"unreadable": 1} and result.counts["train"] == 3


def image_tar(path: Path, n: int, fmt=tarfile.USTAR_FORMAT) -> tuple[bytes, list[int]]:
    """A tar of n PNGs; returns its bytes and the byte offset of every member's (first) header."""
    starts = []
    with tarfile.open(path, "w", format=fmt) as tar:
        for i in range(n):
            data = png_bytes(i)
            info = tarfile.TarInfo(f"imgs/{i:02d}.png")
            info.size = len(data)
            if fmt == tarfile.PAX_FORMAT:
                info.pax_headers = {"comment": "written by another tool"}
            starts.append(tar.fileobj.tell())
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes(), starts


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "pax"])
def test_prepare_reports_a_tar_cut_inside_a_header(tmp_path, fmt):
    raw, starts = image_tar(tmp_path / "full.tar", 6, fmt)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[:starts[4] + 100])  # 100 bytes into the header block of member 4
    result = prepare_images(cut, tmp_path / "shards", quiet(val_fraction=0), show_progress=False)
    m = read_manifest(tmp_path / "shards")
    assert m["counts"]["train"] == 4 and result.skipped == {"truncated-archive": 1}
    (entry,) = m["skipped"]
    assert entry["path"] == "cut.tar" and "inside a tar header" in entry["detail"]
    assert "4 complete member(s) before it" in entry["detail"] and "lost" in entry["detail"]


def test_prepare_reports_a_tar_cut_at_a_block_boundary_and_a_cut_gzip(tmp_path):
    raw, starts = image_tar(tmp_path / "full.tar", 6)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[:starts[3]])  # exactly where member 3's header would start: no end marker
    result = prepare_images(cut, tmp_path / "a", quiet(val_fraction=0), show_progress=False)
    assert result.counts["train"] == 3 and result.skipped == {"truncated-archive": 1}
    assert "end-of-archive marker" in read_manifest(tmp_path / "a")["skipped"][0]["detail"]

    gz = gzip.compress(raw)
    (tmp_path / "cut.tar.gz").write_bytes(gz[: len(gz) * 2 // 3])
    result = prepare_images(tmp_path / "cut.tar.gz", tmp_path / "b", quiet(val_fraction=0), show_progress=False)
    assert result.skipped == {"truncated-archive": 1} and 1 <= result.counts["train"] < 6
    assert "gzip stream ends early" in read_manifest(tmp_path / "b")["skipped"][0]["detail"]


def test_a_tar_with_a_damaged_header_keeps_the_members_before_it(tmp_path):
    raw, starts = image_tar(tmp_path / "full.tar", 5)
    damaged = bytearray(raw)
    damaged[starts[2] + 20:starts[2] + 40] = b"\x07" * 20  # the checksum no longer matches
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    result = prepare_images(tmp_path / "damaged.tar", tmp_path / "s", quiet(val_fraction=0), show_progress=False)
    assert result.counts["train"] == 2 and result.skipped == {"corrupt-archive": 1}


def test_val_split_is_chosen_after_the_bad_files_are_skipped(tmp_path):
    src = image_folder(tmp_path / "src", good=3, empty=17)
    names = sorted(p.name for p in src.iterdir())
    order, n_val = _split_order(len(names), 0.05, seed=0)
    assert n_val == 1 and names[order[0]].startswith("bad")  # chosen first, val would have been empty
    result = prepare_images(src, tmp_path / "shards", quiet(val_fraction=0.05), show_progress=False)
    assert result.counts == {"train": 2, "val": 1} and result.skipped == {"empty": 17}


def test_val_split_without_skips_is_as_before(tmp_path):
    src = image_folder(tmp_path / "src", good=10)
    names = sorted(p.name for p in src.iterdir())
    order, n_val = _split_order(len(names), 0.25, seed=3)
    prepare_images(src, tmp_path / "shards", quiet(val_fraction=0.25, size=16), seed=3, show_progress=False)
    from vqtool.data.loader import ShardLoader

    (val,) = [x for x, _ in ShardLoader(tmp_path / "shards", "val", batch_size=64, infinite=False)]
    expected = [np.asarray(Image.open(src / names[i])) for i in order[:n_val]]
    got = [((img.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy() for img in val]
    assert len(got) == n_val == 2 and all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_prepare_refuses_when_val_would_be_empty_and_leaves_no_run_folder(tmp_path):
    src = image_folder(tmp_path / "src", good=1, empty=3)
    run = tmp_path / "runs" / "new"
    line = error_line(invoke("prepare", src, "--run", run, "--size", 8, "--workers", 1, "--val-fraction", 0.05))
    assert "only 1 usable image of 4 (3 skipped, 0 ignored)" in line
    assert "--val-fraction 0.05 (val 1 of 4) needs at least 2" in line and "--val-fraction 0" in line
    assert not (tmp_path / "runs").exists()
    result = prepare_images(src, run / "shards", quiet(val_fraction=0), show_progress=False)
    assert result.counts == {"train": 1, "val": 0}


def test_a_failed_prepare_leaves_no_folder_but_keeps_an_existing_run(tmp_path):
    src = image_folder(tmp_path / "src", good=0, empty=2)
    error_line(invoke("prepare", src, "--run", tmp_path / "a" / "b" / "run", "--size", 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    existing = tmp_path / "existing"
    existing.mkdir()
    error_line(invoke("prepare", src, "--run", existing, "--size", 8))
    assert existing.is_dir() and list(existing.iterdir()) == []


def test_prepare_full_disk_names_the_shard_and_keeps_the_old_shards(tmp_path, monkeypatch):
    import vqtool.data.shards

    src = image_folder(tmp_path / "src", good=4)
    out = tmp_path / "run" / "shards"
    prepare_images(src, out, quiet(val_fraction=0), show_progress=False)
    before = folder_state(out)

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(vqtool.data.shards.os, "fsync", fsync)
    line = error_line(invoke("prepare", src, "--out", out, "--size", 8, "--workers", 1, "--overwrite"))
    assert line.startswith(f"error: {out}/") and line.endswith(".tar: no space left on device (ENOSPC)")
    assert folder_state(out) == before and leftovers(out.parent) == []


# --------------------------------------------------------------------------------------------------
# C. Impossible options, the wrong kind of file, Ctrl-C at startup


def test_negative_n_is_a_one_line_error(tmp_path):
    run = tmp_path / "run"
    write_tiny_run(run)
    assert error_line(invoke(*sample_args(run, "--n", "-3"))) == "error: --n must be at least 1 (got -3)"
    (tmp_path / "photo.png").write_bytes(png_bytes(0))
    line = error_line(invoke("inpaint", tmp_path / "photo.png", "--run", run, "--box", "0,0,4,4", "--n", "-2",
                             "--device", "cpu"))
    assert line == "error: --n must be at least 1 (got -2)"
    assert not (run / "samples").exists() and not (run / "inpaint").exists()


def test_sample_names_what_is_wrong_with_the_vq_file_itself(tmp_path):
    run = tmp_path / "run"
    write_tiny_run(run)
    latents = tmp_path / "latents.safetensors"
    save_artifact(latents, "latents", {"train.tokens": torch.zeros(1, 8, 8, dtype=torch.int16)})
    line = error_line(invoke(*sample_args(run, "--n", "1", "--vq", latents)))
    assert "is a 'latents' artifact, expected 'vq-model'" in line and "different vq" not in line
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(200))
    line = error_line(invoke(*sample_args(run, "--n", "1", "--vq", corrupt)))
    assert "not a safetensors file" in line and "different vq" not in line


def test_ctrl_c_while_importing_exits_130_without_a_traceback(tmp_path):
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc to see when the child has started importing torch")
    child = subprocess.Popen(
        [sys.executable, "-m", "vqtool", "info", str(tmp_path / "nothing")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
        # A shell that started pytest in the background may have left SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            try:
                if "torch" in Path(f"/proc/{child.pid}/maps").read_text():
                    break  # torch is being imported: the slow first seconds of every command
            except OSError:
                pass
            time.sleep(0.01)
        assert child.poll() is None, "the command finished before it could be interrupted"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, (out, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("interrupted"), err


def test_main_turns_a_ctrl_c_outside_any_stage_into_130(monkeypatch, capsys):
    import vqtool.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(vqtool.cli, "app", interrupted)
    with pytest.raises(SystemExit) as exited:
        vqtool.cli.main()
    assert exited.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
