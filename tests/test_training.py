"""The shared training loop: exact resume, NaN stop, Ctrl-C stop, refusal to overwrite, log replay."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from vqtool.errors import VqtoolError
from vqtool.training import EMA, LoopSettings, run_loop


class ToyTask:
    """Noisy linear regression: random batches, dropout and an EMA, so every random state matters."""

    stage = "toy"
    checkpoint_kind = "vq-checkpoint"

    def __init__(self, seed: int = 0, nan_at: int | None = None, interrupt_at: int | None = None):
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.ema = EMA(self.model, decay=0.9)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.step = 0
        self.losses: list[float] = []
        self.nan_at = nan_at
        self.interrupt_at = interrupt_at
        self.exported: list[int] = []

    def train_step(self) -> dict[str, float]:
        x = torch.randn(16, 4, generator=self.gen)
        y = x.sum(1, keepdim=True)
        loss = (self.model(x) - y).pow(2).mean()  # dropout draws from the global RNG
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.ema.update(self.model)
        self.step += 1
        value = float("nan") if self.step == self.nan_at else loss.item()
        self.losses.append(value)
        if self.step == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return {"loss": value}

    def evaluate(self) -> dict[str, float]:
        return {"val": float(self.ema.shadow["0.weight"].abs().mean())}

    def state_dict(self):
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "ema": self.ema.state_dict(),
                "gen": self.gen.get_state()}

    def load_state_dict(self, state) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.ema.load_state_dict(state["ema"])
        self.gen.set_state(state["gen"])

    def resume_key(self):
        return {"width": 8}

    def export(self) -> list[Path]:
        self.exported.append(self.step)
        return []


def settings(max_steps: int) -> LoopSettings:
    return LoopSettings(max_steps=max_steps, log_every=1, eval_every=3, checkpoint_every=100)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    ckpt, log = tmp_path / "ck.safetensors", tmp_path / "log.jsonl"
    full = ToyTask()
    run_loop(full, settings(10), tmp_path / "other.safetensors", tmp_path / "other.jsonl")

    first = ToyTask()
    run_loop(first, settings(4), ckpt, log)
    torch.manual_seed(1234)  # disturb the global RNG: resume must restore it
    second = ToyTask(seed=99)  # different init: resume must overwrite everything
    result = run_loop(second, settings(10), ckpt, log, resume=True)

    assert result.step == 10
    assert first.losses + second.losses == full.losses
    for a, b in zip(full.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(full.ema.shadow["2.weight"], second.ema.shadow["2.weight"])
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, 11))


def test_resume_truncates_log_after_checkpoint(tmp_path: Path) -> None:
    ckpt, log = tmp_path / "ck.safetensors", tmp_path / "log.jsonl"
    run_loop(ToyTask(), settings(4), ckpt, log)
    with open(log, "a") as f:  # records of steps the checkpoint does not hold (a hard kill)
        f.write(json.dumps({"step": 5, "split": "train"}) + "\n" + '{"step": 6, "spl')
    run_loop(ToyTask(), settings(5), ckpt, log, resume=True)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps.count(5) == 2  # one train record and one val record, the stale one gone
    assert max(steps) == 5


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    ckpt, log = tmp_path / "ck.safetensors", tmp_path / "log.jsonl"
    run_loop(ToyTask(), LoopSettings(max_steps=3, checkpoint_every=3), ckpt, log)
    before = ckpt.read_bytes()
    task = ToyTask(nan_at=5)
    with pytest.raises(VqtoolError, match="loss became nan at step 5"):
        run_loop(task, LoopSettings(max_steps=10, checkpoint_every=1), ckpt, log, resume=True)
    # Step 4 was checkpointed; the NaN step 5 was not.
    from vqtool.artifacts import read_metadata

    assert read_metadata(ckpt).extra["step"] == 4
    assert ckpt.read_bytes() != before
    assert task.exported == []


def test_ctrl_c_saves_and_stops(tmp_path: Path) -> None:
    ckpt, log = tmp_path / "ck.safetensors", tmp_path / "log.jsonl"
    task = ToyTask(interrupt_at=3)
    result = run_loop(task, settings(50), ckpt, log)
    assert result.reason == "interrupted"
    assert result.step == 3
    assert task.exported == [3]
    resumed = ToyTask()
    run_loop(resumed, settings(6), ckpt, log, resume=True)
    assert resumed.step == 6


def test_refuses_to_overwrite_and_checks_resume_key(tmp_path: Path) -> None:
    ckpt, log = tmp_path / "ck.safetensors", tmp_path / "log.jsonl"
    run_loop(ToyTask(), settings(2), ckpt, log)
    with pytest.raises(VqtoolError, match="--resume"):
        run_loop(ToyTask(), settings(2), ckpt, log)
    run_loop(ToyTask(), settings(2), ckpt, log, overwrite=True)

    changed = ToyTask()
    changed.resume_key = lambda: {"width": 16}
    with pytest.raises(VqtoolError, match="differ from the checkpoint: width"):
        run_loop(changed, settings(4), ckpt, log, resume=True)
    with pytest.raises(VqtoolError, match="no checkpoint"):
        run_loop(ToyTask(), settings(4), tmp_path / "missing.safetensors", log, resume=True)


def test_needs_an_end(tmp_path: Path) -> None:
    with pytest.raises(VqtoolError, match="--max-steps or --max-minutes"):
        run_loop(ToyTask(), LoopSettings(), tmp_path / "c.safetensors", tmp_path / "l.jsonl")
