"""Nothing lost, ever: training runs under faults (issue 12).

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
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from vqtool import distributed as D
from vqtool.artifacts import load_artifact, read_metadata
from vqtool.errors import VqtoolError
from vqtool.latents import Latents, Split, save_latents
from vqtool.prior.train import PriorTrainTask, train_prior
from vqtool.runlock import RunLock, lock_path
from vqtool.runs import RunPaths
from vqtool.training import EMA, Interrupted, LoopSettings, remove_stale_temporaries, run_loop
from vqtool.vq.model import VQConfig
from vqtool.vq.train import TrainVQConfig, train_vq

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


def make_latents(path: Path) -> Path:
    """Diagonal-stripe grids of 16 codes on a 4×4 grid, 3 classes (as tests/test_train_prior.py)."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        base = torch.randint(0, 16, (n, 1, 1), generator=g)
        grids = (base + torch.arange(4)[None, :, None] + torch.arange(4)[None, None, :]) % 16
        return Split(grids, torch.randint(0, 3, (n,), generator=g))

    lat = Latents(splits={"train": split(40), "val": split(12)}, codebook_size=16, latent_shape=(4, 4),
                  image_size=16, classes=["a", "b", "c"])
    save_latents(path, lat, parents={"vq": "ab" * 32})
    return path


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
    assert runner.invoke(app(), args).exit_code == 0
    files = [paths.prior, paths.checkpoint("train-prior"), paths.log("train-prior")]
    before = [file_state(p) for p in files]

    res = runner.invoke(app(), [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert "6 (already-done)" in res.output and "nothing to do" in res.output
    assert "4.0000 bits/token at step 6" in res.output  # the best bound, as the checkpoint recorded it
    assert [file_state(p) for p in files] == before
    assert len(log_records(paths.log("train-prior"), "val")) == 2

    kept = tmp_path / "prior-before.safetensors"
    paths.prior.rename(kept)
    monkeypatch.setattr(sys, "argv", ["vqtool", *args, "--resume"])
    res = runner.invoke(app(), [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert "again, which was missing" in res.output
    assert without_command(paths.prior) == without_command(kept)  # still the best-validation prior of step 6
    assert [file_state(p) for p in files[1:]] == before[1:]


def app():
    from vqtool.cli import app as vqtool_app

    return vqtool_app


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
    res = runner.invoke(app(), [*args, "--threads", "1", "--resume"])
    assert res.exit_code == 0, res.output
    assert "took over" not in res.output
    reference = new_run(tmp_path / "reference")
    res = runner.invoke(app(), [*prior_args(reference, 200), "--threads", "1"])
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

    res = CliRunner().invoke(app(), [*args, "--max-steps", "6", "--threads", "1", "--resume"])
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
