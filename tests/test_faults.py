"""Fault injection: nothing a stage wrote is lost or silently changed (docs/reliability.md).

Artifacts: the same content always gives the same bytes, and files honour the umask.

Training runs:

- a resume with no steps left rewrites nothing (checkpoint, log, output: bytes and mtimes), and a missing
  output is exported again with the same bytes but for the `command` metadata;
- a run lock: a second trainer on the same run is refused in one line naming the first, a stale lock of a
  killed (kill -9) trainer is taken over, and under torchrun every rank is refused together;
- SIGTERM saves and stops like Ctrl-C, in one process and, sent to one rank only, on every rank at the
  same step; the resumed run ends bit-identical to an uninterrupted one;
- temporary files left by killed writers are removed at the start of a run;
- a NaN before the first checkpoint says there is no checkpoint to resume from.

The subprocess runs are real `vqtool train-prior` command lines. Where a run must still be training when
the test acts on it, it runs through SLOW_LAUNCHER, the same CLI with a sleep before every step.

Files and folders: file-system errors are one line, outputs are checked before the work and
replaced only when complete, prepare reports every part of a source it could not read, and
impossible options or Ctrl-C at startup never end in a traceback.

Finally, train-vq and train-prior are killed with SIGKILL at random moments, again and again, and
their resumed results equal uninterrupted runs tensor for tensor.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from test_sampling import write_tiny_run
from test_train_prior import make_latents
from typer.testing import CliRunner

from vqtool import distributed as D
from vqtool.artifacts import file_sha256, load_artifact, read_metadata, save_artifact
from vqtool.cli import app
from vqtool.data.manifest import read_manifest
from vqtool.data.prepare import PrepareSettings, _split_order, prepare_images
from vqtool.errors import Interrupted, VqtoolError
from vqtool.outputs import check_writable, matcher, os_error_message, remove_created, staged_folder
from vqtool.prior.train import PriorTrainTask, train_prior
from vqtool.runlock import RunLock, lock_path
from vqtool.runs import RunPaths
from vqtool.training import EMA, LoopSettings, remove_stale_temporaries, run_loop
from vqtool.vq.model import VQConfig
from vqtool.vq.train import TrainVQConfig, train_vq


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_same_content_always_gives_the_same_bytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(5, 3, generator=g), "a.bias": torch.arange(4), "c": torch.ones(2, 2).bool(),
               "half": torch.randn(3, generator=g).half(), "view": torch.randn(8, 8, generator=g)[2:4].t()}
    config = {"z": 1, "a": {"y": [1, 2], "b": None}, "m": "x"}
    digests = set()
    for i in range(8):
        order = list(tensors)
        random.Random(i).shuffle(order)
        shuffled_config = dict(reversed(list(config.items()))) if i % 2 else config
        path = tmp_path / f"{i}.safetensors"
        digests.add(save_artifact(path, "samples", {k: tensors[k] for k in order}, config=shuffled_config,
                                  parents={"vq": "ab" * 32, "dataset": "cd" * 32}, extra={"n": i % 1}))
        assert _sha(path) in digests  # the returned hash is the file's
    assert len(digests) == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        path = tmp_path / "a.safetensors"
        save_artifact(path, "samples", {"x": torch.zeros(2)})
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == mode


# ==================================================================================================
# Training runs: no-op resume, run locks, SIGTERM, stale temporaries, NaN advice
# ==================================================================================================


ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
STOPPED = (143,)  # the CLI's status after a clean stop on SIGTERM: 128 + 15

SLOW_LAUNCHER = """
import os, sys, time
from vqtool.prior.train import PriorTrainTask
from vqtool.cli import main

delay = float(os.environ["SLOW_STEP_SECONDS"])
real_step = PriorTrainTask.train_step

def slow_step(self):
    time.sleep(delay)
    return real_step(self)

PriorTrainTask.train_step = slow_step
sys.argv[0] = "vqtool"
main()
"""


# --------------------------------------------------------------------------------------------------
# Helpers


def new_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    make_latents(folder / "latents.safetensors")
    return folder


def prior_args(run: Path, max_steps: int, *extra: str, eval_every: int = 50, checkpoint_every: int = 10,
               batch_size: int = 8) -> list[str]:
    args = ["train-prior", "--run", str(run), "--max-steps", str(max_steps), "--layers", "1", "--width", "16",
            "--heads", "2", "--eval-every", str(eval_every), "--device", "cpu"]
    for setting in (f"batch_size={batch_size}", "val_batches=1", "timesteps=8", "val_nll_samples=2", "log_every=1",
                    f"checkpoint_every={checkpoint_every}", "warmup_steps=5"):
        args += ["--set", setting]
    return [*args, *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start_slow(tmp_path: Path, args: list[str], name: str, seconds_per_step: float = 0.4) -> subprocess.Popen:
    launcher = tmp_path / "slow_vqtool.py"
    launcher.write_text(SLOW_LAUNCHER)
    err = open(tmp_path / f"{name}.stderr", "w")
    proc = subprocess.Popen([sys.executable, str(launcher), *args, "--threads", "1"], cwd=ROOT,
                            env={**env(), "SLOW_STEP_SECONDS": str(seconds_per_step)}, stdout=subprocess.DEVNULL,
                            stderr=err)
    proc.stderr_path = tmp_path / f"{name}.stderr"
    err.close()
    return proc


def stderr_of(proc: subprocess.Popen) -> str:
    return proc.stderr_path.read_text()


def log_records(log: Path, split: str = "train") -> list[dict]:
    out = []
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if record.get("split") == split:
                out.append(record)
    return out


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before {what}:\n{stderr_of(proc)[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def file_state(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, st.st_ino


def without_command(path: Path) -> tuple[dict, bytes]:
    """A safetensors artifact's header (metadata without `command`) and tensor bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"].pop("command")
    return header, data[8 + n:]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_artifact(path).tensors


def assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def tiny_vq() -> VQConfig:
    return VQConfig(ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=8, codebook_size=16,
                    code_dim=4, kmeans_init=True, restart_threshold=0.5, usage_decay=0.5)


def tiny_vq_train(**kw) -> TrainVQConfig:
    base = dict(batch_size=4, perceptual="none", disc_start=2, disc_layers=2, disc_ch=8, kmeans_batches=2,
                shuffle_buffer=8, log_every=1, eval_every=2, checkpoint_every=2, eval_images=8, grid_images=4,
                ema_decay=0.9)
    return TrainVQConfig(**{**base, **kw})


class ToyTask:
    """A linear regression with Adam and an EMA: a TrainTask in a few lines (as tests/test_training.py)."""

    stage = "toy"
    checkpoint_kind = "vq-checkpoint"

    def __init__(self, signal_at: int | None = None):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.ema = EMA(self.model, decay=0.9)
        self.step = 0
        self.signal_at = signal_at
        self.exported: list[int] = []

    def train_step(self) -> dict[str, float]:
        x = torch.randn(8, 4)
        loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.ema.update(self.model)
        self.step += 1
        if self.step == self.signal_at:  # twice: a repeated SIGTERM must not abort the save
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return {"loss": loss.item()}

    def evaluate(self) -> dict[str, float]:
        return {"w": float(self.ema.shadow["weight"].abs().mean())}

    def state_dict(self):
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "ema": self.ema.state_dict()}

    def load_state_dict(self, state) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.ema.load_state_dict(state["ema"])

    def resume_key(self):
        return {"width": 4}

    def export(self) -> list[Path]:
        self.exported.append(self.step)
        return []


# --------------------------------------------------------------------------------------------------
# 1. A resume with no steps left rewrites nothing


def test_noop_resume_of_a_finished_vq_run_rewrites_nothing(tiny_shards, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    paths = RunPaths.of(run)
    first = train_vq(run, tiny_vq(), tiny_vq_train(max_steps=3), seed=1, device="cpu", shards=tiny_shards)
    assert first.reason == "max-steps"
    files = [paths.vq, paths.checkpoint("train-vq"), paths.log("train-vq")]
    before = [file_state(p) for p in files]
    lines = paths.log("train-vq").read_text().count("\n")
    capsys.readouterr()

    again = train_vq(run, tiny_vq(), tiny_vq_train(max_steps=3), seed=1, device="cpu", shards=tiny_shards,
                     resume=True)
    assert (again.step, again.reason, again.steps_this_session) == (3, "already-done", 0)
    assert [file_state(p) for p in files] == before  # bytes, mtime and inode: not even rewritten alike
    assert paths.log("train-vq").read_text().count("\n") == lines
    assert again.val == first.val  # the summary shows the last validation, read back from the log
    assert "nothing to do" in capsys.readouterr().err
    assert not lock_path(paths.checkpoint("train-vq")).exists()

    # A deleted output is exported again, with the same bytes but for the command line that made it.
    kept = tmp_path / "vq-before.safetensors"
    paths.vq.rename(kept)
    monkeypatch.setattr(sys, "argv", ["vqtool", "train-vq", "--run", str(run), "--resume"])
    again = train_vq(run, tiny_vq(), tiny_vq_train(max_steps=3), seed=1, device="cpu", shards=tiny_shards,
                     resume=True)
    assert again.reason == "already-done"
    assert without_command(paths.vq) == without_command(kept)
    assert read_metadata(paths.vq).command != read_metadata(kept).command
    assert file_state(paths.checkpoint("train-vq")) == before[1]
    assert paths.log("train-vq").read_text().count("\n") == lines


def test_noop_resume_of_a_finished_prior_run_rewrites_nothing(tmp_path, monkeypatch):
    # The validation bound falls at every evaluation, so the exported prior is the last weights' (step 6).
    monkeypatch.setattr(PriorTrainTask, "validation_bpt", lambda self, model: 10.0 - self.step)
    run = new_run(tmp_path / "run")
    paths = RunPaths.of(run)
    runner = CliRunner()
    args = prior_args(run, 6, "--threads", "1", eval_every=3, checkpoint_every=3)
    assert runner.invoke(app, args).exit_code == 0
    files = [paths.prior, paths.checkpoint("train-prior"), paths.log("train-prior")]
    before = [file_state(p) for p in files]

    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert "6 (already-done)" in res.output and "nothing to do" in res.output
    assert "4.0000 bits/token at step 6" in res.output  # the best bound, as the checkpoint recorded it
    assert [file_state(p) for p in files] == before
    assert len(log_records(paths.log("train-prior"), "val")) == 2

    kept = tmp_path / "prior-before.safetensors"
    paths.prior.rename(kept)
    monkeypatch.setattr(sys, "argv", ["vqtool", *args, "--resume"])
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert "again, which was missing" in res.output
    assert without_command(paths.prior) == without_command(kept)  # still the best-validation prior of step 6
    assert [file_state(p) for p in files[1:]] == before[1:]


# --------------------------------------------------------------------------------------------------
# 2 and 3. Run locks; SIGTERM saves, stops and resumes exactly


def test_second_trainer_is_refused_and_sigterm_saves_then_resume_is_exact(tmp_path):
    run = new_run(tmp_path / "run")
    paths = RunPaths.of(run)
    log = paths.log("train-prior")
    args = prior_args(run, 200)
    first = start_slow(tmp_path, args, "first")
    try:
        wait_until(lambda: log_records(log), first, "the first run's first step")
        holder = json.loads(lock_path(paths.checkpoint("train-prior")).read_text())
        assert holder["pid"] == first.pid and holder["host"] == HOST and "train-prior" in holder["command"]

        # --overwrite would wipe the first run's checkpoint and log: the lock stops it before it touches them.
        second = subprocess.run([sys.executable, "-m", "vqtool", *args, "--overwrite", "--threads", "1"], cwd=ROOT,
                                env=env(), capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-3000:]
        refusal = [line for line in second.stderr.splitlines() if "another" in line]
        assert len(refusal) == 1
        assert re.fullmatch(rf"error: {re.escape(str(run))}: another train-prior is running on this run \(pid "
                            rf"{first.pid} on host {re.escape(HOST)} since \d\d:\d\d:\d\d\); wait for it or stop it",
                            refusal[0]), refusal[0]
        assert first.poll() is None and log_records(log)[0]["step"] == 1  # still running, its log intact

        first.send_signal(signal.SIGTERM)
        code = first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    err = stderr_of(first)
    assert code in STOPPED, err[-3000:]
    stopped_at = read_metadata(paths.checkpoint("train-prior")).extra["step"]
    assert 0 < stopped_at < 200
    assert log_records(log)[-1]["step"] == stopped_at  # nothing trained after the checkpoint was lost
    assert f"SIGTERM: stopping after step {stopped_at}" in err
    assert f"saved a checkpoint at step {stopped_at}; continue with --resume" in err
    assert paths.prior.exists()
    assert not lock_path(paths.checkpoint("train-prior")).exists()  # released

    # The lock can be taken again, and the resumed run ends where an uninterrupted one does, bit for bit.
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--threads", "1", "--resume"])
    assert res.exit_code == 0, res.output
    assert "took over" not in res.output
    reference = new_run(tmp_path / "reference")
    res = runner.invoke(app, [*prior_args(reference, 200), "--threads", "1"])
    assert res.exit_code == 0, res.output
    ref = RunPaths.of(reference)
    assert_equal_tensors(tensors(paths.prior), tensors(ref.prior))
    assert_equal_tensors(tensors(paths.checkpoint("train-prior")), tensors(ref.checkpoint("train-prior")))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]
    assert strip(log_records(log)) == strip(log_records(ref.log("train-prior")))


def test_stale_lock_of_a_killed_trainer_is_taken_over_and_its_temporaries_removed(tmp_path):
    run = new_run(tmp_path / "run")
    paths = RunPaths.of(run)
    checkpoint = paths.checkpoint("train-prior")
    args = prior_args(run, 200, checkpoint_every=2)
    killed = start_slow(tmp_path, args, "killed")
    try:
        wait_until(checkpoint.exists, killed, "the first checkpoint")
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=60) == -signal.SIGKILL
    finally:
        if killed.poll() is None:
            killed.kill()
    assert json.loads(lock_path(checkpoint).read_text())["pid"] == killed.pid  # left behind, but not held

    # What writers killed mid-write leave (the kill may have left one of its own, too) ...
    stale = [checkpoint.parent / ".train-prior-last.safetensors.ab12cd34.tmp", run / ".prior.safetensors.x_9y8z7w.tmp",
             run / ".train-prior.jsonl.qwertyui.tmp"]
    # ... and files that are not this stage's temporaries, which must stay.
    others = [checkpoint.parent / ".train-prior-ar-last.safetensors.ab12cd34.tmp",
              run / ".latents.safetensors.ab12cd34.tmp", run / ".prior.safetensors.tmp", run / "notes.tmp"]
    for i, path in enumerate(stale + others):
        path.write_bytes(b"x" * 1000 * (i + 1))
    pattern = re.compile(r"\.(train-prior-last\.safetensors|prior\.safetensors|train-prior\.jsonl)\.[a-z0-9_]{8}\.tmp")
    leftovers = [p for folder in (run, checkpoint.parent) for p in folder.iterdir() if pattern.fullmatch(p.name)]
    assert len(leftovers) >= len(stale)

    res = CliRunner().invoke(app, [*args, "--max-steps", "6", "--threads", "1", "--resume"])
    assert res.exit_code == 0, res.output
    assert f"took over the lock of pid {killed.pid} on host {HOST}, which is no longer running" in res.output
    assert f"removed {len(leftovers)} temporary files (" in res.output
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in others)
    assert read_metadata(checkpoint).extra["step"] == 6
    assert not lock_path(checkpoint).exists()


def test_run_lock_is_exclusive_released_and_taken_over_in_one_process(tmp_path):
    path = tmp_path / "checkpoints" / "train-prior.lock"
    assert lock_path(tmp_path / "checkpoints" / "train-prior-last.safetensors") == path
    assert lock_path(tmp_path / "ck.safetensors").name == "ck.lock"
    with RunLock.acquire(path, "RUN: another train-prior is running on this run", "vqtool train-prior") as held:
        assert held.took_over is None
        with pytest.raises(VqtoolError, match=rf"^RUN: another train-prior is running on this run \(pid "
                                              rf"{os.getpid()} on host {re.escape(HOST)} since [0-9:]+\); wait"):
            RunLock.acquire(path, "RUN: another train-prior is running on this run", "again")
    assert not path.exists()
    path.write_text(json.dumps({"pid": 4242, "host": "gone", "started": "2020-01-02T03:04:05+00:00", "command": "x"}))
    with RunLock.acquire(path, "refused", "vqtool train-prior") as lock:
        assert (lock.took_over.pid, lock.took_over.host) == (4242, "gone")
        assert json.loads(path.read_text())["pid"] == os.getpid()


class RefusedTask(ToyTask):
    stage = "train-prior"


def _refused_rank(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    folder = Path(folder)
    with D.distributed_session(torch.device("cpu"), timeout_minutes=1) as proc:
        try:
            run_loop(RefusedTask(), LoopSettings(max_steps=2), folder / "checkpoints" / "train-prior-last.safetensors",
                     folder / "train-prior.jsonl", proc=proc)
        except VqtoolError as exc:
            (folder / f"rank{rank}.txt").write_text(str(exc))
        D.barrier()  # both ranks are still in step after the refusal


def test_under_torchrun_every_rank_is_refused_when_rank_0_cannot_take_the_lock(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "train-prior-last.safetensors"
    with RunLock.acquire(lock_path(checkpoint), "refused", "the test"):
        mp.spawn(_refused_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{tmp_path}: another train-prior is running on this run (pid {os.getpid()} ")
    assert not checkpoint.exists() and not (tmp_path / "train-prior.jsonl").exists()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_in_process_finishes_the_step_saves_and_a_second_one_does_not_abort(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    task = ToyTask(signal_at=3)
    result = run_loop(task, LoopSettings(max_steps=50, log_every=1, eval_every=100, checkpoint_every=100),
                      tmp_path / "ck.safetensors", tmp_path / "log.jsonl")
    assert (result.step, result.reason, result.stopped_by) == (3, "interrupted", signal.SIGTERM)
    assert task.exported == [3]
    assert read_metadata(tmp_path / "ck.safetensors").extra["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives as long as the loop
    assert Interrupted("stopped", signal.SIGTERM).exit_status == 143
    assert Interrupted("stopped").exit_status == 130


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v.split(b"=", 1)[1]) for v in environ if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' processes through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    run = new_run(tmp_path / "run")
    paths = RunPaths.of(run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "--tee", "3", "-m", "vqtool", "--",
           *prior_args(run, 100_000, eval_every=100_000, checkpoint_every=100_000, batch_size=4)]
    with open(tmp_path / "torchrun.stderr", "w") as err:
        torchrun = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=err)
    torchrun.stderr_path = tmp_path / "torchrun.stderr"
    try:
        wait_until(lambda: log_records(paths.log("train-prior")), torchrun, "the first step")
        rank1 = [pid for pid in _children(torchrun.pid) if _rank_of(pid) == 1]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGTERM)  # rank 1 only: rank 0 must learn of it and stop at the same step
        code = torchrun.wait(timeout=120)
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
    out = stderr_of(torchrun)
    assert code != 0  # torchrun reports the workers' non-zero status
    meta = read_metadata(paths.checkpoint("train-prior"))
    step = meta.extra["step"]
    assert meta.extra["world_size"] == 2  # gathered from both ranks, at one step
    assert log_records(paths.log("train-prior"))[-1]["step"] == step
    assert f"[default0]:SIGTERM: stopping after step {step}," in out
    for rank in (0, 1):
        assert f"[default{rank}]:stopped: saved a checkpoint at step {step}; continue with --resume" in out, out[-3000:]
    # As soon as one worker exits non-zero torchrun sends SIGTERM to the others; one that has saved and
    # printed its line already may die of it on its way out (-15) instead of exiting 130/143 itself.
    statuses = {int(s) for s in re.findall(r"exitcode\s*:\s*(-?\d+)", out)}
    assert statuses and statuses <= {*STOPPED, -signal.SIGTERM}, out[-3000:]


# --------------------------------------------------------------------------------------------------
# 4 and 5. Stale temporaries; NaN before the first checkpoint


def test_remove_stale_temporaries_matches_only_this_stages_files(tmp_path):
    target = tmp_path / "prior.safetensors"
    (tmp_path / ".prior.safetensors.abcd_123.tmp").write_bytes(b"x" * 10)
    (tmp_path / ".prior.safetensors.bak.abcd_123.tmp").write_bytes(b"x")  # prior.safetensors.bak's
    (tmp_path / ".prior.safetensors.abcd_123.tmp.keep").write_bytes(b"x")
    assert remove_stale_temporaries([target, tmp_path / "missing" / "ck.safetensors"]) == (1, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prior.safetensors.abcd_123.tmp.keep",
                                                          ".prior.safetensors.bak.abcd_123.tmp"]


def test_nan_before_the_first_checkpoint_says_there_is_none_to_resume(tmp_path):
    latents = make_latents(tmp_path / "latents.safetensors")
    out, checkpoint, log = tmp_path / "prior.safetensors", tmp_path / "ck.safetensors", tmp_path / "log.jsonl"
    settings = dict(n_layer=1, n_head=2, n_embd=16, batch_size=8, timesteps=8, val_batches=1, val_nll_samples=2,
                    device="cpu", warmup_steps=0, log_every=1, max_steps=20)
    with pytest.raises(VqtoolError) as err:
        train_prior(latents, {**settings, "lr": 1e30, "checkpoint_every": 500, "eval_every": 500}, out, checkpoint, log)
    message = str(err.value)
    assert re.match(r"loss became nan at step \d+; stopped without saving\. This run had not saved a checkpoint yet "
                    r"\(every 500 steps\), so there is no checkpoint to resume from: start again with a lower --lr$",
                    message), message
    assert not checkpoint.exists()

    # With a checkpoint (here: of step 2, resumed) the message names it and its step.
    train_prior(latents, {**settings, "lr": 1e-3, "max_steps": 2, "checkpoint_every": 2, "eval_every": 2}, out,
                checkpoint, log, overwrite=True)
    with pytest.raises(VqtoolError, match=rf"The last good checkpoint is {re.escape(str(checkpoint))} \(step 2\): "
                                          r"resume with --resume, perhaps with a lower --lr"):
        train_prior(latents, {**settings, "lr": 1e30, "checkpoint_every": 500, "eval_every": 500}, out, checkpoint,
                    log, resume=True)


# ==================================================================================================
# Files and folders: file-system errors, outputs checked first and replaced whole, prepare's losses
# ==================================================================================================


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

    monkeypatch.setattr(vqtool.data.prepare, "prepare_synthetic", fail)  # the command imports it when it runs
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


def test_a_swap_killed_after_the_new_folder_went_in_still_keeps_the_users_files(tmp_path):
    out = tmp_path / "samples"
    out.mkdir()  # the killed process had renamed its new folder in, but not yet carried the user's file over
    (out / "sample-0000.png").write_bytes(b"killed run's png")
    old = tmp_path / ".samples.old-999999999"
    old.mkdir()
    (old / "keep.txt").write_text("previous")
    (old / "sample-0000.png").write_bytes(b"old png")
    with staged_folder(out, matcher("sample-*.png")) as staging:
        (staging / "sample-0000.png").write_bytes(b"new png")
    assert (out / "keep.txt").read_text() == "previous" and (out / "sample-0000.png").read_bytes() == b"new png"
    assert leftovers(tmp_path) == []


def test_a_full_disk_during_an_artifact_write_names_the_artifact(tmp_path, monkeypatch):
    import vqtool.artifacts

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(vqtool.artifacts, "write_safetensors", full)
    target = tmp_path / "vq.safetensors"
    with pytest.raises(OSError) as info:
        save_artifact(target, "samples", {"x": torch.zeros(1)})
    assert info.value.filename == str(target) and "ENOSPC" in os_error_message(info.value)
    assert list(tmp_path.iterdir()) == []


def test_without_flock_a_run_still_starts(tmp_path, monkeypatch):
    import vqtool.runlock

    monkeypatch.setattr(vqtool.runlock, "fcntl", None)  # as on Windows
    with RunLock.acquire(tmp_path / "train-prior.lock", "refused", "vqtool train-prior") as lock:
        assert lock.path.exists()
    assert not (tmp_path / "train-prior.lock").exists()


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


def test_prepare_refuses_one_image_that_would_all_go_to_val(tmp_path):
    src = image_folder(tmp_path / "src", good=1)
    line = error_line(invoke("prepare", src, "--run", tmp_path / "run", "--size", 8, "--workers", 1,
                             "--val-fraction", 0.6))
    assert "only 1 usable image" in line and "needs at least 2" in line
    assert not (tmp_path / "run").exists()


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
    monkeypatch.setattr("vqtool.memory.keep_freed_memory", lambda: False)  # the test process's malloc stays as it is
    with pytest.raises(SystemExit) as exited:
        vqtool.cli.main()
    assert exited.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


# --------------------------------------------------------------------------------------------------
# SIGKILL at random moments, then --resume, until the run ends; the result equals an uninterrupted run.

KILLS_PER_TRAINER = 11
VQ_ARGS = ["--max-steps", "40", "--batch-size", "4", "--perceptual", "none", "--disc-start", "6", "--threads", "1",
           "--device", "cpu", "--seed", "3", "--set", "ch=8", "--set", "ch_mult=[1,2]", "--set", "z_channels=8",
           "--set", "codebook_size=16", "--set", "code_dim=4", "--set", "attn_resolutions=[8]",
           "--set", "disc_layers=2", "--set", "disc_ch=8", "--set", "shuffle_buffer=8", "--set", "log_every=1",
           "--set", "eval_every=8", "--set", "checkpoint_every=2", "--set", "eval_images=8",
           "--set", "grid_images=4", "--set", "ema_decay=0.9", "--set", "restart_threshold=0.5"]
# Enough steps that a run lasts seconds: a kill must find it still working (a step takes milliseconds).
PRIOR_ARGS = ["--prior", "absorbing", "--max-steps", "300", "--batch-size", "8", "--threads", "1", "--device", "cpu",
              "--seed", "3", "--set", "n_layer=1", "--set", "n_head=2", "--set", "n_embd=16", "--set", "timesteps=16",
              "--set", "lr=3e-3", "--set", "warmup_steps=2", "--set", "log_every=1", "--set", "eval_every=60",
              "--set", "checkpoint_every=3", "--set", "val_batches=1", "--set", "val_nll_samples=2"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vqtool", *args]


def _steps_logged(log: Path) -> int:
    if not log.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _train_with_kills(stage: str, run: Path, args: list[str], rng: random.Random) -> int:
    """Run `stage` to completion, SIGKILLing it at a random moment after it makes progress, up to
    KILLS_PER_TRAINER times, resuming from the checkpoint each time; return the number of kills."""
    checkpoint = run / "checkpoints" / f"{stage}-last.safetensors"
    log = run / f"{stage}.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kills = 0
    for _attempt in range(60):
        resume = ["--resume"] if checkpoint.exists() else ["--overwrite"]
        proc = subprocess.Popen(_cli(stage, "--run", str(run), *args, *resume), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills < KILLS_PER_TRAINER:
            start = _steps_logged(log)
            deadline = time.monotonic() + 120
            # Wait for this process to make progress, then kill it a random moment later: before, during or
            # after a checkpoint write, in a training or an evaluation step.
            while proc.poll() is None and _steps_logged(log) <= start and time.monotonic() < deadline:
                time.sleep(0.05)
            # At most two more steps: on a fast machine 0.5 s is many steps, and the run must not end before
            # its last kill.
            until, progress = time.monotonic() + rng.uniform(0.0, 0.5), _steps_logged(log)
            while proc.poll() is None and time.monotonic() < until and _steps_logged(log) < progress + 2:
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return kills
    raise AssertionError(f"{stage} did not finish after {kills} kills")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_artifact(path).tensors


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{a.name}: {len(different)} tensors differ, e.g. {different[:3]}"


def test_training_survives_sigkill_at_random_moments(tiny_shards, tmp_path, capsys):
    rng = random.Random(20261201)
    survived, per_stage = 0, {}
    for stage, args, output in (("train-vq", VQ_ARGS, "vq.safetensors"), ("train-prior", PRIOR_ARGS,
                                                                          "prior.safetensors")):
        runs = {}
        for name in ("killed", "uninterrupted"):
            run = tmp_path / f"{stage}-{name}"
            run.mkdir()
            if stage == "train-vq":
                shutil.copytree(tiny_shards, run / "shards")
            else:
                make_latents(run / "latents.safetensors", labels=False)
            runs[name] = run
        per_stage[stage] = _train_with_kills(stage, runs["killed"], args, rng)
        survived += per_stage[stage]
        done = subprocess.run(_cli(stage, "--run", str(runs["uninterrupted"]), *args),
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        _assert_same(runs["killed"] / output, runs["uninterrupted"] / output)
        _assert_same(runs["killed"] / "checkpoints" / f"{stage}-last.safetensors",
                     runs["uninterrupted"] / "checkpoints" / f"{stage}-last.safetensors")
        leftovers = [p.name for p in (runs["killed"] / "checkpoints").iterdir() if p.name.endswith(".tmp")]
        assert not leftovers, f"temporary files left behind: {leftovers}"
    with capsys.disabled():
        print(f"\n  fault injection: {survived} SIGKILLs survived ({per_stage}), results identical to "
              "uninterrupted runs")
    assert all(kills == KILLS_PER_TRAINER for kills in per_stage.values()), per_stage
