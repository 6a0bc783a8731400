"""Multi-process training (CPU, gloo, 2 processes): the collectives, and for both trainers that 2 ranks ×
batch B train the same weights as 1 process × batch 2B on the same data, checkpoints gathered from every
rank, resume with another number of processes, and `torchrun -m vqtool` itself.

Two launches of 2 processes per module, to keep CI fast: `two_ranks` (torch.multiprocessing.spawn with
torchrun's environment variables on a free 127.0.0.1 port: the collectives, train-vq, and train-prior
with gradient accumulation) and `torchrun_prior` (the real `torchrun -m vqtool` command line). The
single-process references run in the test process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train_prior import make_latents

from vqtool import distributed as D
from vqtool import statepack
from vqtool.artifacts import load_artifact
from vqtool.data.loader import ShardLoader
from vqtool.errors import VqtoolError
from vqtool.prior.train import BatchSampler, TrainPriorConfig, train_prior
from vqtool.runs import RunPaths
from vqtool.vq.losses import PatchDiscriminator
from vqtool.vq.model import VQConfig, VQModel
from vqtool.vq.train import TrainVQConfig, train_vq

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-4, atol=1e-6)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Tiny problems, shared by the ranks and the references


def prior_cfg(**kw) -> TrainPriorConfig:
    base = dict(n_layer=1, n_head=2, n_embd=16, batch_size=4, timesteps=16, lr=3e-3, warmup_steps=0,
                log_every=1, eval_every=2, checkpoint_every=3, val_batches=1, val_nll_samples=2, device="cpu",
                max_steps=3)
    base.update(kw)
    return TrainPriorConfig(**base)


def run_prior(folder: Path, latents: Path, resume: bool = False, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    return train_prior(latents, prior_cfg(**kw), folder / "prior.safetensors", folder / "ck.safetensors",
                       folder / "log.jsonl", resume=resume, overwrite=not resume)


def tiny_vq(**kw) -> VQConfig:
    base = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=8, codebook_size=16,
                code_dim=4, kmeans_init=True, restart_threshold=0.5, usage_decay=0.5)
    return VQConfig(**{**base, **kw})


def run_vq(run: Path, shards, resume: bool = False, vq: VQConfig | None = None, **kw):
    # The discriminator joins at step 2; no DiffAugment (each rank augments with its own generator).
    base = dict(perceptual="none", disc_start=2, disc_layers=2, disc_ch=8, kmeans_batches=2, shuffle_buffer=8,
                diffaug=[], log_every=1, eval_every=3, checkpoint_every=3, eval_images=8, grid_images=2,
                ema_decay=0.9, max_steps=3)
    base.update(kw)
    return train_vq(run, vq or tiny_vq(), TrainVQConfig(**base), seed=1, device="cpu", shards=shards, resume=resume,
                    overwrite=not resume)


class TwoRankStream:
    """One process reading exactly what 2 ranks read: each batch is rank 0's batch, then rank 1's."""

    def __init__(self, shards, split, batch_size, **kw):
        kw.update(world_size=2)
        self.parts = [ShardLoader(shards, split, batch_size=batch_size // 2, **{**kw, "rank": r}) for r in range(2)]

    def __iter__(self):
        for (a, _), (b, _) in zip(*self.parts, strict=True):
            yield torch.cat([a, b]), None

    def state_dict(self):
        return self.parts[0].state_dict()


def checkpoint_state(path: Path) -> tuple[dict, dict]:
    art = load_artifact(path, read_kind(path))
    return statepack.unpack(art.tensors, art.extra["state"]), art.extra


def read_kind(path: Path) -> str:
    from vqtool.artifacts import read_metadata

    return read_metadata(path).kind


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype.is_floating_point:
            torch.testing.assert_close(a[k], b[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


def assert_same_adam_training(got: dict, want: dict, module: torch.nn.Module, part: str, opt: str,
                              buffers: bool = True) -> float:
    """The weights, Adam's first moments and the EMA of `part` agree; returns the share of weights compared.

    Elements whose gradient is zero in exact arithmetic (a conv bias in front of a one-channel-per-group
    GroupNorm, the key bias of attention) get float-noise gradients of 1e-9 that Adam's normalised step
    turns into ±lr moves in either setup; their first moments are compared (tiny in both), not their weights.
    (The prior's transformer has no such elements: its test compares every weight.)
    """
    names = [n for n, _ in module.named_parameters()]
    moments_got, moments_want = got[opt]["state"], want[opt]["state"]
    compared = total = 0
    ema_got, ema_want = got["ema"]["shadow"] if part == "model" else None, want["ema"]["shadow"]
    for i, name in enumerate(names):
        m_want = moments_want[i]["exp_avg"]
        torch.testing.assert_close(moments_got[i]["exp_avg"], m_want, rtol=1e-3, atol=1e-6)
        live = m_want.abs() > 1e-4  # well above the noise, so Adam's normalised steps agree too
        torch.testing.assert_close(got[part][name][live], want[part][name][live], **TOL)
        if ema_got is not None:
            torch.testing.assert_close(ema_got[name][live], ema_want[name][live], **TOL)
        compared += int(live.sum())
        total += live.numel()
    for name in set(got[part]) - set(names) if buffers else ():  # codebook usage, BatchNorm statistics
        torch.testing.assert_close(got[part][name], want[part][name], **TOL)
    return compared / total


def train_records(log: Path) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["split"] == "train"]


# --------------------------------------------------------------------------------------------------
# What each of the two ranks does


def _rank_main(rank: int, world: int, port: int, work: str, shards: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    work = Path(work)
    # One process group for everything (the stages use it and leave it open); a short timeout turns a
    # deadlock into an error instead of a hung test.
    with D.distributed_session(torch.device("cpu"), timeout_minutes=2) as proc:
        assert (proc.rank, proc.world_size) == (rank, world) and D.active()
        _check_collectives(rank, world)
        run_vq(work / "vq-2x2", shards, batch_size=2)
        run_prior(work / "prior-2x2x2", work / "latents.safetensors", batch_size=2, grad_accum=2)
        _check_forward_on_one_rank(rank)
        _check_nan_on_one_rank(rank, work)


def _check_collectives(rank: int, world: int) -> None:
    states = D.gather_states({"r": torch.full((rank + 1,), float(rank)), "name": f"rank{rank}", "n": [rank]})
    assert [s["name"] for s in states] == ["rank0", "rank1"]
    assert torch.equal(states[1]["r"], torch.ones(2)) and states[1]["n"] == [1]
    rows = D.all_gather_rows(torch.arange(rank + 2).float()[:, None])
    assert rows.flatten().tolist() == [0.0, 1.0, 0.0, 1.0, 2.0]
    assert D.any_across_ranks([rank == 1, False]) == [True, False]
    assert D.mean_across_ranks({"a": float(rank), "b": 2.0}) == {"a": 0.5, "b": 2.0}
    assert D.broadcast_object({"v": rank}) == {"v": 0}
    t = torch.full((3,), float(rank))
    assert D.broadcast_(t).tolist() == [0.0] * 3
    assert D.all_reduce_sum(torch.ones(2)).tolist() == [2.0, 2.0]
    _check_global_batchnorm(rank, world)




def _check_forward_on_one_rank(rank: int) -> None:
    """A training-mode forward of the VQ on rank 0 alone (an extra batch) runs no collective, so it cannot
    leave rank 1 waiting: the barrier after it is the next collective both ranks make."""
    model = VQModel(tiny_vq(resolution=16)).train()
    if rank == 0:
        model(torch.randn(2, 3, 16, 16))
    D.barrier()


def _check_nan_on_one_rank(rank: int, work: Path) -> None:
    """A NaN loss on rank 1 only stops both ranks at the same step, neither saving nor hanging."""
    import vqtool.prior.train as PT

    made = PT.make_objective

    def objective(kind, settings):
        inner = made(kind, settings)
        if rank == 1:
            calls = [0]
            loss = inner.loss

            def poisoned(*args, **kwargs):
                calls[0] += 1
                value, metrics = loss(*args, **kwargs)
                return (value * float("nan") if calls[0] == 3 else value), metrics  # step 2, micro-batch 1

            inner.loss = poisoned
        return inner

    PT.make_objective = objective
    try:
        with pytest.raises(VqtoolError, match="loss became nan at step 2; stopped without saving"):
            run_prior(work / "prior-nan", work / "latents.safetensors", batch_size=2, grad_accum=2, max_steps=3,
                      checkpoint_every=5)
    finally:
        PT.make_objective = made
    assert not (work / "prior-nan" / "ck.safetensors").exists()
    D.barrier()


def _check_global_batchnorm(rank: int, world: int) -> None:
    """Conv + BatchNorm on 2 ranks × 3 images = the same on 6 images in one process: output, gradients
    (after DDP-style averaging) and running statistics."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4))
    reference = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4))
    reference.load_state_dict(net.state_dict())
    x = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    target = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    D.global_batchnorm(net)
    assert isinstance(net[1], D.GlobalBatchNorm2d)
    mine = slice(3 * rank, 3 * rank + 3)
    out = net(x[mine])
    ((out - target[mine]) ** 2).mean().backward()
    full = reference(x)
    ((full - target) ** 2).mean().backward()
    torch.testing.assert_close(out, full[mine], rtol=1e-5, atol=1e-6)
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(D.all_reduce_mean(p.grad), q.grad, rtol=1e-5, atol=1e-6)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(net[1], name), getattr(reference[1], name))


@pytest.fixture(scope="module")
def launches(tmp_path_factory, tiny_shards) -> dict:
    """Both 2-process launches, at the same time (each alone leaves the cores idle while its ranks wait
    for one another):

    - torch.multiprocessing.spawn of `_rank_main`: collectives, train-vq 2 × 2 images, train-prior
      2 × 2 grids × grad-accum 2;
    - `torchrun --nproc_per_node=2 -m vqtool -- train-prior --run R ...`, 2 ranks × batch 4, 3 steps.
      (The `--` keeps torchrun's own parser from taking `--run` for an abbreviation of its --run-path.)
    """
    work = tmp_path_factory.mktemp("ddp")
    make_latents(work / "latents.safetensors")
    run = tmp_path_factory.mktemp("torchrun") / "run"
    run.mkdir()
    make_latents(run / "latents.safetensors")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "vqtool", "--", "train-prior", "--run", str(run),
           "--max-steps", "3", "--batch-size", "4", "--device", "cpu"]
    for setting in ("n_layer=1", "n_head=2", "n_embd=16", "timesteps=16", "lr=3e-3", "warmup_steps=0",
                    "log_every=1", "eval_every=2", "checkpoint_every=3", "val_batches=1", "val_nll_samples=2"):
        cmd += ["--set", setting]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(run.parent / "stderr.txt", "w") as err:
        torchrun = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            mp.spawn(_rank_main, args=(2, free_port(), str(work), str(tiny_shards)), nprocs=2, join=True)
            code = torchrun.wait(timeout=600)
        finally:
            if torchrun.poll() is None:
                torchrun.kill()
    stderr = (run.parent / "stderr.txt").read_text()
    assert code == 0, stderr[-3000:]
    return {"work": work, "run": run, "stderr": stderr}


@pytest.fixture(scope="module")
def two_ranks(launches) -> Path:
    return launches["work"]


@pytest.fixture(scope="module")
def torchrun_prior(launches) -> tuple[Path, str]:
    return launches["run"], launches["stderr"]


@pytest.fixture(scope="module")
def prior_reference(tmp_path_factory) -> Path:
    """One process × batch 8: 3 steps (checkpoint at 3), then resumed to 5."""
    folder = tmp_path_factory.mktemp("ref")
    latents = make_latents(folder / "latents.safetensors")
    run_prior(folder / "1x8", latents, batch_size=8)
    shutil.copy(folder / "1x8" / "ck.safetensors", folder / "ck3.safetensors")
    run_prior(folder / "1x8", latents, batch_size=8, max_steps=5, resume=True)
    return folder


# --------------------------------------------------------------------------------------------------
# Single-process pieces


def test_helpers_are_no_ops_in_one_process():
    assert not D.active()
    t = torch.arange(3.0)
    assert D.all_reduce_mean(t) is t and D.all_reduce_sum(t) is t and D.all_gather_rows(t) is t
    assert D.mean_across_ranks({"a": 1.5}) == {"a": 1.5}
    assert D.any_across_ranks([True, False]) == [True, False]
    assert D.gather_states({"x": 1}) == [{"x": 1}]
    assert D.broadcast_object([1, 2]) == [1, 2]
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(2))
    assert D.wrap_ddp(net, torch.device("cpu")) is net and D.unwrap(net) is net
    assert type(D.global_batchnorm(net)[0]) is torch.nn.BatchNorm2d
    with D.distributed_session(torch.device("cpu")) as proc:
        assert proc.world_size == 1 and not D.active()


def test_process_info_and_launch_errors(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    proc = D.process_info()
    assert (proc.rank, proc.world_size, proc.local_rank, proc.is_main, proc.distributed) == (3, 4, 1, False, True)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    from vqtool.errors import VqtoolError

    with pytest.raises(VqtoolError, match="MASTER_ADDR.*torchrun"):
        with D.distributed_session(torch.device("cpu")):
            pass
    assert D.rank_seed(0, "x", 1) != D.rank_seed(0, "x", 2)


def test_batch_sampler_with_accumulation_splits_the_global_batch():
    whole = BatchSampler(10, 12, seed=5)
    parts = {(r, k): None for r in range(2) for k in range(3)}
    samplers = [BatchSampler(10, 2, seed=5, rank=r, world_size=2, grad_accum=3) for r in range(2)]
    for _ in range(4):  # crosses epochs: a new permutation only between steps
        big = whole.next()
        for k in range(3):
            for r in range(2):
                parts[(r, k)] = samplers[r].next()
        # micro-batch k, rank r holds rows (k·2 + r)·2 ... of the step's global batch
        assert torch.equal(big, torch.cat([parts[(r, k)] for k in range(3) for r in range(2)]))
    assert samplers[0].state_dict()["cursor"] == whole.state_dict()["cursor"]


def test_prior_grad_accum_equals_the_large_batch(tmp_path):
    latents = make_latents(tmp_path / "latents.safetensors")
    big = run_prior(tmp_path / "big", latents, batch_size=8, max_steps=2)
    accum = run_prior(tmp_path / "accum", latents, batch_size=4, grad_accum=2, max_steps=2)
    a, _ = checkpoint_state(big.checkpoint)
    b, _ = checkpoint_state(accum.checkpoint)
    assert_same_tensors(a["task"]["model"], b["task"]["model"])
    assert [r["loss"] for r in train_records(big.log)] == pytest.approx(
        [r["loss"] for r in train_records(accum.log)], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Two ranks against one process


def test_prior_two_ranks_equal_one_process_with_twice_the_batch(torchrun_prior, prior_reference):
    run, stderr = torchrun_prior
    ddp, extra = checkpoint_state(run / "checkpoints" / "train-prior-last.safetensors")
    one, one_extra = checkpoint_state(prior_reference / "ck3.safetensors")
    assert (extra["world_size"], one_extra["world_size"], extra["step"]) == (2, 1, 3)
    assert_same_tensors(ddp["task"]["model"], one["task"]["model"])
    assert_same_tensors(ddp["task"]["ema"]["shadow"], one["task"]["ema"]["shadow"])
    # Rank 0 alone writes the log; it holds the global batch's loss and the single process's validation.
    got = [json.loads(line) for line in (run / "train-prior.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (prior_reference / "1x8" / "log.jsonl").read_text().splitlines()][:len(got)]
    assert [(r["step"], r["split"]) for r in got] == [(1, "train"), (2, "train"), (2, "val"), (3, "train"),
                                                      (3, "val")]
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for g, w in zip(got, want, strict=True):
        assert g.get("loss", 0) == pytest.approx(w.get("loss", 0), rel=1e-4)
        assert g["bpt"] == pytest.approx(w["bpt"], rel=1e-4)
    # Each rank's own random state is in the checkpoint, and they differ (dropout streams).
    assert len(ddp["ranks"]) == 2
    assert not torch.equal(ddp["ranks"][0]["rng"]["torch"], ddp["ranks"][1]["rng"]["torch"])
    assert (run / "prior.safetensors").exists()
    assert "resumed" not in stderr and stderr.count("throughput") == 1  # one summary table, from rank 0


def test_prior_two_ranks_with_grad_accum_equal_one_process(two_ranks, prior_reference):
    """2 ranks × batch 2 × grad-accum 2 (DDP no_sync micro-steps) = 1 process × batch 8."""
    ddp, _ = checkpoint_state(two_ranks / "prior-2x2x2" / "ck.safetensors")
    one, _ = checkpoint_state(prior_reference / "ck3.safetensors")
    assert_same_tensors(ddp["task"]["model"], one["task"]["model"])


def test_prior_resumes_a_two_rank_checkpoint_in_one_process(torchrun_prior, prior_reference, tmp_path, capsys):
    """2 ranks × 4 for 3 steps, then 1 process × 4 × grad-accum 2 for 2 more = 1 process × 8 for 5."""
    run, _ = torchrun_prior
    folder = tmp_path / "resumed"
    folder.mkdir()
    shutil.copy(run / "checkpoints" / "train-prior-last.safetensors", folder / "ck.safetensors")
    latents = run / "latents.safetensors"
    resumed = run_prior(folder, latents, resume=True, grad_accum=2, max_steps=5)
    err = " ".join(capsys.readouterr().err.split())
    assert "written by 2 process(es)" in err and "global batch changes" not in err
    want, _ = checkpoint_state(prior_reference / "1x8" / "ck.safetensors")
    got, extra = checkpoint_state(resumed.checkpoint)
    assert extra["world_size"] == 1 and resumed.steps == 5
    assert_same_tensors(got["task"]["model"], want["task"]["model"])
    # Without --grad-accum the global batch would change, and the run says so.
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(run / "checkpoints" / "train-prior-last.safetensors", again / "ck.safetensors")
    run_prior(again, latents, resume=True, max_steps=4)
    assert "global batch changes from 8" in " ".join(capsys.readouterr().err.split())


def test_vq_two_ranks_equal_one_process_with_twice_the_batch(two_ranks, tiny_shards, tmp_path, monkeypatch):
    """k-means, usage counts, restarts, the discriminator (global BatchNorm), the adaptive weight and the
    EMA all stay in step: 2 ranks × 2 images = 1 process × 4 images (the two ranks' batches side by side)."""
    import vqtool.vq.train as vq_train

    def loader(shards, split, batch_size, infinite=True, **kw):
        if infinite:
            return TwoRankStream(shards, split, batch_size, infinite=True, **kw)
        return ShardLoader(shards, split, batch_size=batch_size, infinite=False, **kw)

    with monkeypatch.context() as m:
        m.setattr(vq_train, "ShardLoader", loader)
        run_vq(tmp_path / "vq-1x4", tiny_shards, batch_size=4)
    ddp, extra = checkpoint_state(RunPaths.of(two_ranks / "vq-2x2").checkpoint("train-vq"))
    one, _ = checkpoint_state(RunPaths.of(tmp_path / "vq-1x4").checkpoint("train-vq"))
    assert extra["world_size"] == 2 and extra["step"] == 3
    vq = tiny_vq()
    vq.resolution = 16
    assert assert_same_adam_training(ddp["task"], one["task"], VQModel(vq), "model", "opt_ae") > 0.9
    assert assert_same_adam_training(ddp["task"], one["task"], PatchDiscriminator(8, 2), "disc", "opt_d") > 0.9
    got = train_records(RunPaths.of(two_ranks / "vq-2x2").log("train-vq"))
    want = train_records(RunPaths.of(tmp_path / "vq-1x4").log("train-vq"))
    assert sum(r["restarted"] for r in want) > 0 and "d_loss" in want[-1]  # the test covers restarts and the GAN
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in g:
            if k not in ("time", "split"):
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), k
    assert [len(r["task"]["generator"]) > 0 for r in ddp["ranks"]] == [True, True]
    assert RunPaths.of(two_ranks / "vq-2x2").vq.exists()


def test_vq_resumes_a_two_rank_checkpoint_in_one_process(two_ranks, tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_ranks / "vq-2x2", run)
    r = run_vq(run, tiny_shards, resume=True, batch_size=2, grad_accum=2, max_steps=4)
    err = " ".join(capsys.readouterr().err.split())
    assert r.step == 4 and "written by 2 process(es)" in err
    # (2 k-means batches + 3 steps) × 2 ranks × 2 images, now read as batches of 2 by one process
    assert "20 training images read by 2 process(es) → batch 10" in err
    assert "global batch" not in err


def test_vq_grad_accum_equals_the_large_batch(tiny_shards, tmp_path):
    """Without k-means, restarts and the discriminator, whose statistics are per micro-batch (as is the
    running codebook usage: updated once per micro-batch, so it is not compared)."""
    vq = tiny_vq(kmeans_init=False, restart_threshold=0.0)
    big = run_vq(tmp_path / "big", tiny_shards, batch_size=4, disc_start=100, max_steps=2, vq=vq)
    accum = run_vq(tmp_path / "accum", tiny_shards, batch_size=2, grad_accum=2, disc_start=100, max_steps=2, vq=vq)
    a, _ = checkpoint_state(RunPaths.of(tmp_path / "big").checkpoint("train-vq"))
    b, _ = checkpoint_state(RunPaths.of(tmp_path / "accum").checkpoint("train-vq"))
    assert big.step == accum.step == 2
    vq.resolution = 16
    assert assert_same_adam_training(b["task"], a["task"], VQModel(vq), "model", "opt_ae", buffers=False) > 0.9
