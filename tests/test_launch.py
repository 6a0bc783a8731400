"""`--nproc-per-node N` (vqtool.launch): N ranks started by vqtool itself through torch's elastic agent.

In the test process: the ranks' command line rebuilt from the parsed options, the checks of N against the
machine (GPUs mocked), which rank a failure report names, and the ranks' error files.

Five real launches of 2 CPU processes (gloo), run at the same time because each alone leaves the cores idle
while its ranks wait for one another (`launches`):

- C  `vqtool train-vq --nproc-per-node 2`, 3 steps: the same as one process with twice the batch;
- D  `vqtool train-prior --nproc-per-node 2` with slow steps, Ctrl-C (SIGINT to the parent's process group,
     as a terminal sends it) after the first step: every rank stops at the same step and saves;
- F  D resumed with `--nproc-per-node 2`, 2 steps further, and B the same number of steps from scratch
     through torchrun, both started when D ends: the same checkpoint, prior and log, bit for bit;
- E  train-prior whose rank 1 raises at step 2: rank 0 is stopped too and the parent's error line names
     rank 1; the checkpoint of step 1 is left.

Faults and slow steps are injected into the ranks alone by a sitecustomize module on their PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import typer
import yaml
from test_distributed import (
    TwoRankStream,
    assert_same_adam_training,
    checkpoint_state,
    free_port,
    tiny_vq,
    train_records,
)
from test_faults import log_records
from test_train_prior import make_latents
from typer.testing import CliRunner

from vqtool import launch
from vqtool.artifacts import load_artifact, read_metadata
from vqtool.cli import app
from vqtool.data.loader import ShardLoader
from vqtool.errors import Interrupted, VqtoolError
from vqtool.runlock import RunLock, lock_path
from vqtool.runs import RunPaths
from vqtool.vq.losses import PatchDiscriminator
from vqtool.vq.model import VQModel
from vqtool.vq.train import TrainVQConfig, train_vq

ROOT = Path(__file__).resolve().parents[1]

# The tiny prior of tests/test_distributed.py's torchrun run: 2 ranks × batch 4 = 1 process × batch 8.
PRIOR_SETTINGS = ("n_layer=1", "n_head=2", "n_embd=16", "timesteps=16", "lr=3e-3", "warmup_steps=0", "log_every=1",
                  "eval_every=2", "checkpoint_every=3", "val_batches=1", "val_nll_samples=2")

# tests/test_distributed.py's run_vq and tiny_vq as a recipe: no DiffAugment (each rank draws its own).
VQ_RECIPE = {
    "vq": dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=8, codebook_size=16,
               code_dim=4, kmeans_init=True, restart_threshold=0.5, usage_decay=0.5),
    "train_vq": dict(perceptual="none", disc_start=2, disc_layers=2, disc_ch=8, kmeans_batches=2, shuffle_buffer=8,
                     diffaug=[], log_every=1, eval_every=3, checkpoint_every=3, eval_images=8, grid_images=2,
                     ema_decay=0.9, max_steps=3),
}

RANK_HOOK = """
import os

if "RANK" in os.environ and "HOOK_DIR" in os.environ:  # a rank, not the parent
    import time
    from pathlib import Path

    from vqtool.prior.train import PriorTrainTask

    rank = os.environ["RANK"]
    Path(os.environ["HOOK_DIR"], f"rank{rank}.pid").write_text(str(os.getpid()))
    delay = float(os.environ.get("STEP_SECONDS", "0"))
    fail_rank, fail_step = os.environ.get("FAIL_RANK"), int(os.environ.get("FAIL_STEP", "0"))
    real_step = PriorTrainTask.train_step

    def train_step(self):
        time.sleep(delay)
        if rank == fail_rank and self.step + 1 == fail_step:
            raise RuntimeError(f"injected fault at step {fail_step}")
        return real_step(self)

    PriorTrainTask.train_step = train_step
"""


def prior_args(run: Path, steps: int, *extra: str, batch_size: int = 4) -> list[str]:
    args = ["train-prior", "--run", str(run), "--max-steps", str(steps), "--batch-size", str(batch_size),
            "--device", "cpu", "--threads", "1"]
    for setting in PRIOR_SETTINGS:
        args += ["--set", setting]
    return [*args, *extra]


def start(cmd: list[str], folder: Path, name: str, **env: str) -> subprocess.Popen:
    """`cmd` in its own process group (as a shell runs a foreground job), stderr to folder/name.stderr."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *([env.pop("hook")] if "hook" in env
                                                                               else [])]), **env}
    environment.pop("OMP_NUM_THREADS", None)  # the launcher chooses it; torchrun sets 1
    with open(folder / f"{name}.stderr", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    proc.stderr_path = folder / f"{name}.stderr"
    return proc


def vqtool(*args: str) -> list[str]:
    return [sys.executable, "-m", "vqtool", *args]


def log_steps(log: Path) -> list[int]:
    return [r["step"] for r in log_records(log)]


def alive(pid: int) -> bool:
    # A rank is the parent's child: once the parent has exited, a rank that ended is reaped and gone.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def launches(tmp_path_factory, tiny_shards) -> dict:
    if launch.usable_cpus() < 2:
        pytest.skip("2 CPU processes need 2 CPU cores")
    work = tmp_path_factory.mktemp("launch")
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RANK_HOOK)
    runs = {}
    for name in "BDE":
        runs[name] = work / name
        runs[name].mkdir()
        make_latents(runs[name] / "latents.safetensors")
    runs["C"] = work / "C"
    recipe = work / "vq.yaml"
    recipe.write_text(yaml.safe_dump(VQ_RECIPE))
    for name in "DE":
        (work / f"hook-{name}").mkdir()

    procs = {
        "C": start(vqtool("train-vq", "--run", str(runs["C"]), "--shards", str(tiny_shards), "--config", str(recipe),
                          "--batch-size", "2", "--seed", "1", "--device", "cpu", "--threads", "1",
                          "--nproc-per-node", "2"), work, "C"),
        "D": start(vqtool(*prior_args(runs["D"], 10_000), "--nproc-per-node", "2"), work, "D", hook=str(hook),
                   HOOK_DIR=str(work / "hook-D"), STEP_SECONDS="0.3"),
        "E": start(vqtool(*prior_args(runs["E"], 10, "--set", "checkpoint_every=1"), "--nproc-per-node", "2"), work,
                   "E", hook=str(hook), HOOK_DIR=str(work / "hook-E"), FAIL_RANK="1", FAIL_STEP="2"),
    }
    stopped = None
    try:
        deadline = time.monotonic() + 900
        interrupted = False
        # Until every launch has ended and F has been started: D may be the last to end, after C and E.
        while any(p.poll() is None for p in procs.values()) or "F" not in procs:
            if not interrupted and log_steps(RunPaths.of(runs["D"]).log("train-prior")):
                os.killpg(procs["D"].pid, signal.SIGINT)  # Ctrl-C in a terminal: the foreground group
                interrupted = True
            if "F" not in procs and procs["D"].poll() is not None:
                # F: D resumed with --nproc-per-node 2 and no slow steps, 2 steps further; B: torchrun from scratch
                # to the same step. Both while C and E may still run.
                d = RunPaths.of(runs["D"])
                meta = read_metadata(d.checkpoint("train-prior")).extra
                stopped = {"step": meta["step"], "world_size": meta["world_size"],
                           "logged": log_steps(d.log("train-prior"))[-1], "prior": d.prior.exists(),
                           "lock": lock_path(d.checkpoint("train-prior")).exists()}
                resume = prior_args(runs["D"], stopped["step"] + 2, "--resume", "--nproc-per-node", "2")
                procs["F"] = start(vqtool(*resume), work, "F")
                procs["B"] = start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                    "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "vqtool", "--",
                                    *prior_args(runs["B"], stopped["step"] + 2)], work, "B")
            assert time.monotonic() < deadline, "the launches did not end in 15 minutes"
            time.sleep(0.05)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert interrupted, procs["D"].stderr_path.read_text()[-3000:]
    return {"work": work, "runs": runs, "codes": {k: p.returncode for k, p in procs.items()},
            "stderr": {k: p.stderr_path.read_text() for k, p in procs.items()}, "stopped": stopped}


def check_ok(launches: dict, name: str) -> None:
    assert launches["codes"][name] == 0, launches["stderr"][name][-3000:]


# --------------------------------------------------------------------------------------------------
# In the test process


def parsed(*args: str):
    command = typer.main.get_command(app).commands[args[0]]
    return command.make_context(args[0], list(args[1:]))


def test_the_ranks_get_the_options_as_given_without_nproc_per_node(tmp_path):
    given = ["train-prior", "--run", str(tmp_path), "--set", "lr=1e-3", "--nproc-per-node", "2", "--max-minutes",
             "1.5", "--no-compile", "--resume", "--set", "n_layer=2", "--seed", "3"]
    ctx = parsed(*given)
    again = launch.command_line(ctx, "nproc_per_node")
    assert again == ["train-prior", "--run", str(tmp_path), "--set", "lr=1e-3", "--set", "n_layer=2", "--max-minutes",
                     "1.5", "--no-compile", "--resume", "--seed", "3"]  # in the order the command declares them
    reparsed = parsed(*again)
    assert {k: v for k, v in reparsed.params.items() if k != "nproc_per_node"} == \
        {k: v for k, v in ctx.params.items() if k != "nproc_per_node"}
    assert reparsed.params["nproc_per_node"] == 1
    vq = launch.command_line(parsed("train-vq", "--threads", "1", "--nproc-per-node", "4", "--overwrite"),
                             "nproc_per_node")
    assert vq == ["train-vq", "--overwrite", "--threads", "1"]  # the machine options come last


def test_nproc_per_node_is_checked_against_the_machine(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(launch, "usable_cpus", lambda: 4)
    with pytest.raises(VqtoolError, match=r"^--nproc-per-node 0: must be 1 or more$"):
        launch.plan(0, "cpu")
    with pytest.raises(VqtoolError, match=r"^--nproc-per-node 5: this process may use 4 CPU cores, .* use at most 4$"):
        launch.plan(5, "cpu")
    assert launch.plan(3, "cpu") == launch.Layout(3, "cpu", 1)
    assert launch.plan(2, "cpu") == launch.Layout(2, "cpu", 2)
    assert launch.plan(2, "cpu").describe() == "2 CPU processes (gloo), 2 threads each"
    if not torch.cuda.is_available():
        with pytest.raises(VqtoolError, match="no CUDA device"):
            launch.plan(2, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert launch.plan(2, "auto") == launch.Layout(2, "cuda", 2)
    assert launch.plan(2, "auto").describe() == "2 processes, one GPU each (nccl)"
    with pytest.raises(VqtoolError, match=r"^--nproc-per-node 3: this machine has 2 GPUs and each process needs its "
                                          r"own; use at most 2, or --device cpu$"):
        launch.plan(3, "cuda")
    with pytest.raises(VqtoolError, match=r"^--device cuda:1 names one GPU, .* use --device cuda$"):
        launch.plan(2, "cuda:1")
    assert launch.plan(2, "cpu").device == "cpu"  # --device cpu on a GPU machine: CPU processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(VqtoolError, match="already one of 2 started by torchrun"):
        launch.plan(2, "cpu")
    assert launch.plan(1, "cpu").processes == 1


def test_bad_nproc_per_node_is_one_line_before_any_process_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "usable_cpus", lambda: 2)
    runner = CliRunner()
    for args, line in (
        (["train-prior", "--run", str(tmp_path), "--nproc-per-node", "-1"], "--nproc-per-node -1: must be 1 or more"),
        (["train-vq", "--run", str(tmp_path), "--device", "cpu", "--nproc-per-node", "3"],
         "--nproc-per-node 3: this process may use 2 CPU cores"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        errors = [x for x in res.output.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {line}"), res.output
    assert not (tmp_path / "checkpoints").exists()


def failure(exitcode: int, line: str | None = None, at: float | None = None, seen: int = 0) -> SimpleNamespace:
    """What the agent reports of a rank: a ProcessFailure's fields."""
    if line is None:
        return SimpleNamespace(exitcode=exitcode, message="", error_file_data={"message": "<NONE>"}, timestamp=seen)
    data = {"message": line, "extraInfo": {"py_callstack": "", "timestamp": str(int(at)), "time": at}}
    return SimpleNamespace(exitcode=exitcode, message=data, error_file_data={"message": data}, timestamp=int(at))


def test_the_report_names_the_rank_that_failed_first():
    crash = failure(1, "RuntimeError: boom", at=100.25)
    consequence = failure(1, "RuntimeError: Connection closed by peer", at=100.75)
    got = launch.first_failure({0: consequence, 1: crash}, 2)
    assert (str(got), got.exit_status) == ("rank 1 of 2 failed: RuntimeError: boom", 1)
    # Stopped by the agent's SIGTERM (no record, seen at once): not the cause, however early it was seen.
    got = launch.first_failure({0: failure(-signal.SIGTERM, seen=100), 3: crash}, 4)
    assert str(got) == "rank 3 of 4 failed: RuntimeError: boom"
    # Killed without a record (the kernel's out-of-memory killer): seen up to a poll later, rounded down.
    got = launch.first_failure({0: failure(1, "RuntimeError: Connection reset", at=100.5), 1: failure(-9, seen=101)}, 2)
    assert (str(got), got.exit_status) == ("rank 1 of 2 was killed by SIGKILL", 137)
    got = launch.first_failure({1: failure(3, seen=100)}, 2)
    assert (str(got), got.exit_status) == ("rank 1 of 2 exited with status 3 (its output is above)", 3)
    refused = failure(2, "RUN: another train-prior is running on this run (pid 1)", at=100.0)
    got = launch.first_failure({0: refused, 1: failure(2, "the same", at=100.1)}, 2)
    assert str(got).startswith("rank 0 of 2 failed: RUN: another") and got.exit_status == 2
    # Every rank stopped cleanly on a signal (a SIGTERM sent to one rank): an interruption, not a failure.
    got = launch.first_failure({0: failure(143, seen=100), 1: failure(143, seen=100)}, 2)
    assert isinstance(got, Interrupted) and got.exit_status == 143


def test_launch_turns_what_the_agent_raises_into_one_line_and_puts_back_the_parents_state(monkeypatch, tmp_path):
    """The agent itself (torch.distributed.launcher.api.elastic_launch) replaced: what each outcome becomes."""
    import torch.distributed.launcher.api as api
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from torch.distributed.elastic.rendezvous import RendezvousError

    seen = {}
    error_file = tmp_path / "error.json"
    with monkeypatch.context() as m:
        m.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        launch.record_error("RuntimeError: boom")

    def agent(config, entrypoint):
        def run(*args):
            seen.update(config=config, command=[entrypoint, *args], threads=os.environ.get("OMP_NUM_THREADS"))
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # as the agent does: its own handlers
            raise outcome

        return run

    monkeypatch.setattr(api, "elastic_launch", agent)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    handler = signal.getsignal(signal.SIGINT)
    layout = launch.Layout(2, "cpu", 3)
    outcome = SignalException("got SIGTERM", signal.SIGTERM)
    with pytest.raises(Interrupted, match="^SIGTERM passed on to the 2 processes; continue with --resume$") as info:
        launch.launch(["train-prior", "--run", "R"], layout)
    assert info.value.exit_status == 143
    assert seen["command"] == [sys.executable, "-m", "vqtool", "train-prior", "--run", "R"] and seen["threads"] == "3"
    c = seen["config"]
    assert (c.nproc_per_node, c.max_restarts, c.rdzv_backend, c.rdzv_endpoint) == (2, 0, "c10d", "127.0.0.1:0")
    assert c.shutdown_timeout == launch.SHUTDOWN_SECONDS
    assert signal.getsignal(signal.SIGINT) is handler and "OMP_NUM_THREADS" not in os.environ  # put back
    crashed = ProcessFailure(local_rank=1, pid=1, exitcode=1, error_file=str(error_file))
    outcome = ChildFailedError("python", {1: crashed})
    with pytest.raises(launch.RanksFailed, match="^rank 1 of 2 failed: RuntimeError: boom$"):
        launch.launch([], layout)
    outcome = RendezvousError("the rendezvous timed out\nafter 900 s")
    with pytest.raises(VqtoolError, match="^could not start 2 processes: the rendezvous timed out$"):
        launch.launch([], layout)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(VqtoolError):
        launch.launch([], layout)
    assert seen["threads"] == "1"  # the user's own setting is kept


def test_a_rank_leaves_its_error_line_for_the_launcher(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    launch.record_error("nowhere to go")  # not under a launcher: nothing is written
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    launch.record_error("RUN: cannot resume\n  (details)")
    data = json.loads(path.read_text())["message"]
    assert data["message"] == "RUN: cannot resume" and abs(data["extraInfo"]["time"] - time.time()) < 60
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError as exc:
        launch.record_crash(exc)
    data = json.loads(path.read_text())["message"]
    assert data["message"] == "ValueError: bad value" and "Traceback" in data["extraInfo"]["py_callstack"]
    # torchelastic's own reader finds it, as the parent does
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    seen = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(path))
    assert str(launch.first_failure({0: seen}, 1)) == "rank 0 of 1 failed: ValueError: bad value"


# --------------------------------------------------------------------------------------------------
# Real launches


@pytest.mark.slow
def test_nproc_per_node_train_vq_equals_one_process_with_twice_the_batch(launches, tiny_shards, tmp_path, monkeypatch):
    check_ok(launches, "C")
    import vqtool.vq.train as vq_train

    def loader(shards, split, batch_size, infinite=True, **kw):
        if infinite:
            return TwoRankStream(shards, split, batch_size, infinite=True, **kw)
        return ShardLoader(shards, split, batch_size=batch_size, infinite=False, **kw)

    monkeypatch.setattr(vq_train, "ShardLoader", loader)
    train_vq(tmp_path / "one", tiny_vq(), TrainVQConfig(**{**VQ_RECIPE["train_vq"], "batch_size": 4}), seed=1,
             device="cpu", shards=tiny_shards)
    ddp, extra = checkpoint_state(RunPaths.of(launches["runs"]["C"]).checkpoint("train-vq"))
    one, _ = checkpoint_state(RunPaths.of(tmp_path / "one").checkpoint("train-vq"))
    assert (extra["world_size"], extra["step"]) == (2, 3)
    vq = tiny_vq()
    vq.resolution = 16
    assert assert_same_adam_training(ddp["task"], one["task"], VQModel(vq), "model", "opt_ae") > 0.9
    assert assert_same_adam_training(ddp["task"], one["task"], PatchDiscriminator(8, 2), "disc", "opt_d") > 0.9
    got = train_records(RunPaths.of(launches["runs"]["C"]).log("train-vq"))
    want = train_records(RunPaths.of(tmp_path / "one").log("train-vq"))
    for g, w in zip(got, want, strict=True):
        for k in g:
            if k not in ("time", "split"):
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), k
    assert RunPaths.of(launches["runs"]["C"]).vq.exists()


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_the_same_step_and_saves(launches):
    err = launches["stderr"]["D"]
    assert launches["codes"]["D"] == 130, err[-3000:]
    assert f"train-prior: {launch.plan(2, 'cpu').describe()}; Ctrl-C stops them all" in err
    stopped = launches["stopped"]  # as D left it, before F resumed it
    step = stopped["step"]
    assert stopped["world_size"] == 2 and step >= 1
    assert stopped["logged"] == step  # nothing trained after the checkpoint
    assert f"SIGINT: stopping after step {step}, saving" in err
    assert err.count(f"stopped: saved a checkpoint at step {step}; continue with --resume") == 2  # both ranks
    assert err.rstrip().splitlines()[-1] == "stopped: SIGINT passed on to the 2 processes; continue with --resume"
    assert stopped["prior"] and not stopped["lock"]  # the prior exported, the run lock released
    for pid in (int((launches["work"] / "hook-D" / f"rank{r}.pid").read_text()) for r in range(2)):
        assert not alive(pid)


@pytest.mark.slow
def test_stopped_and_resumed_with_nproc_per_node_equals_torchrun_uninterrupted(launches):
    """F (D resumed) and B (torchrun, from scratch): the same checkpoint, prior and log, bit for bit."""
    check_ok(launches, "F")
    check_ok(launches, "B")
    step = launches["stopped"]["step"]
    ours, theirs = RunPaths.of(launches["runs"]["D"]), RunPaths.of(launches["runs"]["B"])
    resumed = launches["stderr"]["F"]
    assert "resumed train-prior from" in resumed and f"at step {step}" in resumed
    assert resumed.count("throughput") == 1 and "error:" not in resumed  # one summary table, from rank 0
    got, want = load_artifact(ours.checkpoint("train-prior")), load_artifact(theirs.checkpoint("train-prior"))
    assert (got.extra["world_size"], got.extra["step"]) == (2, step + 2)
    assert got.extra["state"] == want.extra["state"]  # the checkpoint's structure and scalars
    for a, b in ((got, want), (load_artifact(ours.prior), load_artifact(theirs.prior))):
        assert a.tensors.keys() == b.tensors.keys()
        for k in a.tensors:
            assert torch.equal(a.tensors[k], b.tensors[k]), k
    strip = lambda log: [{k: v for k, v in json.loads(x).items() if k != "time"} for x in log.read_text().splitlines()]
    assert strip(ours.log("train-prior")) == strip(theirs.log("train-prior"))
    assert not lock_path(ours.checkpoint("train-prior")).exists()


@pytest.mark.slow
def test_a_crashing_rank_stops_the_other_and_is_named(launches):
    run = launches["runs"]["E"]
    paths = RunPaths.of(run)
    err = launches["stderr"]["E"]
    assert launches["codes"]["E"] == 1, err[-3000:]
    assert err.rstrip().splitlines()[-1] == "error: rank 1 of 2 failed: RuntimeError: injected fault at step 2"
    assert "Traceback" in err  # the rank's own traceback is above it
    for pid in (int((launches["work"] / "hook-E" / f"rank{r}.pid").read_text()) for r in range(2)):
        assert not alive(pid)  # rank 0 was stopped too
    meta = read_metadata(paths.checkpoint("train-prior"))
    assert (meta.extra["step"], meta.extra["world_size"]) == (1, 2)  # the last checkpoint is kept
    with RunLock.acquire(lock_path(paths.checkpoint("train-prior")), "still held", "the test"):
        pass  # no rank holds the run lock any more
