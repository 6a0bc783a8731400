"""Training curves, `vqtool report RUN` and `--tensorboard`: PNGs from (growing) JSONL logs, the page of any run
folder, TensorBoard event files with the log's scalars that a resume appends to, and the refusal without the package.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pipeline import TINY
from test_train_prior import make_latents, records, small
from typer.testing import CliRunner

from vqtool.cli import app
from vqtool.curves import PANEL_PX, draw_curves, draw_run_curves, layout, read_log, training_minutes
from vqtool.errors import VqtoolError

T0 = 1.7e9


def write_vq_log(path: Path, steps: int = 40, cut: bool = False) -> Path:
    """A train-vq log as the trainer writes it: train records every step, val records every 10."""
    lines = []
    for s in range(1, steps + 1):
        lines.append({"step": s, "split": "train", "time": T0 + s, "loss": 1 / s, "l1": 0.5 / s, "q_loss": 0.01,
                      "restarted": 0.0})
        if s % 10 == 0:
            lines.append({"step": s, "split": "val", "time": T0 + s + 0.5, "l1": 0.2, "psnr": 10 + s / 10,
                          "usage": s / steps, "perplexity": float(s), "images": 8.0})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if cut:
        text += '{"step": 41, "split": "train", "time": 17000'  # the trainer is halfway through this line
    path.write_text(text)
    return path


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    pytest.importorskip("tensorboard", reason="reading event files needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --------------------------------------------------------------------------------------------------
# Curves


def test_curves_of_a_vq_log_have_one_panel_per_quantity(tmp_path):
    c = draw_curves(write_vq_log(tmp_path / "train-vq.jsonl"), tmp_path / "vq.png")
    assert c.panels == ["train losses", "val PSNR (dB)", "codebook usage (val, % of codes)",
                        "codebook perplexity (val)"]  # no lr in this log: no panel for it
    assert layout(4) == (2, 2)
    assert Image.open(c.png).size == (2 * PANEL_PX[0], 2 * PANEL_PX[1])
    assert (c.records, c.last_step, c.last_time, c.minutes_axis) == (44, 40, T0 + 40.5, True)
    assert c.last_val == {"l1": 0.2, "psnr": 14.0, "usage": 1.0, "perplexity": 40.0, "images": 8.0}


def test_prior_log_with_a_cut_off_last_line_is_read_up_to_it(tmp_path):
    log = tmp_path / "train-prior.jsonl"
    rows = [{"step": s, "split": "train", "time": T0 + s, "loss": 3.0 - s / 10, "bpt": 4.0, "lr": 1e-4 * s,
             "grad_norm": 1.0} for s in range(1, 11)] + [{"step": 10, "split": "val", "time": T0 + 11, "bpt": 3.5,
                                                          "best_bpt": 3.5, "bpd": 0.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n" + '{"step": 11, "spl')
    assert len(read_log(log)) == 11
    c = draw_curves(log, tmp_path / "curves" / "train-prior.png")
    assert c.panels == ["train loss", "bits/token", "learning rate", "gradient norm (before clipping)"]
    assert Image.open(c.png).size == (2 * PANEL_PX[0], 2 * PANEL_PX[1]) and c.last_step == 10
    log.write_text('{"step": 1, "split": "tr')  # started afresh: the first line, being written
    c = draw_curves(log, tmp_path / "curves" / "train-prior.png")
    assert c.png is None and c.records == 0 and not (tmp_path / "curves" / "train-prior.png").exists()


def test_minutes_leave_pauses_between_sessions_out():
    steps = np.array([10.0, 20, 30, 40])
    times = np.array([0.0, 60, 120, 120 + 86400])  # 6 s a step, then a day's pause before step 40
    assert training_minutes(steps, times) == pytest.approx([1.0, 2.0, 3.0, 4.0], abs=1e-6)
    times = np.array([0.0, 60, 120, 900])  # 13 minutes for 10 steps: 13x slower, not yet a pause (20x)
    assert training_minutes(steps, times)[-1] == pytest.approx(1 + 900 / 60, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# vqtool report


@pytest.fixture(scope="module")
def tiny_finished_run(tmp_path_factory):
    """prepare → train-vq (with the recipe's tensorboard key) → encode → train-prior → sample, tiny."""
    from vqtool.pipeline import PipelineOptions, load_and_run, quickstart_recipe

    run = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
        board = ["train_vq.tensorboard=true"] if _has_tensorboard() else []
        logs = ["train_vq.log_every=1", "train_prior.log_every=1"]
        load_and_run(quickstart_recipe(), run, [*TINY, *logs, *board], PipelineOptions(threads=1, write_index=False),
                     stages=["prepare", "train-vq", "encode", "train-prior", "sample"])
    return run


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_report_on_a_finished_run_shows_both_trainers_curves(tiny_finished_run):
    run = tiny_finished_run
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    page = (run / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert {"curves/train-vq.png", "curves/train-prior.png", "samples/grid.png",
            "figures/reconstructions.png"} <= set(sources)
    assert all((run / s).exists() for s in sources)
    assert "index.html" in res.output and "curves/train-vq.png" in res.output
    assert "Inpainting" in res.output  # named as not made yet
    vq_curves = [c for c in draw_run_curves(run) if c.stage == "train-vq"][0]
    assert vq_curves.last_step == 4 and vq_curves.panels[:2] == ["train losses", "val PSNR (dB)"]


def test_report_on_a_run_still_training_and_with_one_stage(tiny_run):
    write_vq_log(tiny_run / "train-vq.jsonl", cut=True)  # shards prepared, train-vq halfway through a line
    res = CliRunner().invoke(app, ["report", str(tiny_run)])
    assert res.exit_code == 0, res.output
    page = (tiny_run / "index.html").read_text()
    assert '<img src="curves/train-vq.png"' in page and "44 records" in page
    assert "No samples in this run" in page and "No VQ model in this run" in page
    assert "train-prior" not in re.findall(r"<h3>([^<]+)</h3>", page)


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    runner = CliRunner()
    for folder, says in ((tmp_path, "not a vqtool run folder"), (tmp_path / "nothing", "run folder not found")):
        res = runner.invoke(app, ["report", str(folder)])
        assert res.exit_code == 2 and says in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not (tmp_path / "index.html").exists()


# --------------------------------------------------------------------------------------------------
# --tensorboard


def test_tensorboard_scalars_match_the_log_and_a_resume_appends(tmp_path):
    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package")
    run = tmp_path / "run"
    run.mkdir()
    make_latents(run / "latents.safetensors")
    common = ["train-prior", "--run", str(run), "--layers", "1", "--width", "16", "--heads", "2", "--eval-every", "2",
              "--threads", "1", "--device", "cpu", "--set", "batch_size=8", "--set", "train_prior.val_batches=1",
              "--set", "prior.timesteps=8", "--set", "log_every=1", "--set", "val_nll_samples=2", "--tensorboard"]
    runner = CliRunner()
    res = runner.invoke(app, [*common, "--max-steps", "3"])
    assert res.exit_code == 0, res.output
    folder = run / "tensorboard" / "train-prior"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    res = runner.invoke(app, [*common, "--max-steps", "5", "--resume"])
    assert res.exit_code == 0, res.output
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    scalars = tensorboard_scalars(folder)
    assert set(scalars) == {"train/loss", "train/bpt", "train/lr", "train/grad_norm", "val/bpt", "val/best_bpt",
                            "val/bpd"}
    log = run / "train-prior.jsonl"
    for split in ("train", "val"):
        for key in ("bpt", "loss", "lr", "grad_norm", "best_bpt"):
            expected = [(r["step"], r[key]) for r in records(log, split) if key in r]
            if expected:
                got = scalars[f"{split}/{key}"]
                assert [s for s, _ in got] == [s for s, _ in expected]
                assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5]
    assert [s for s, _ in scalars["val/bpt"]] == [2, 3, 4, 5]


def test_a_resume_hides_what_the_killed_session_logged_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package")
    from vqtool.tensorboard_log import TensorBoardLog

    folder = tmp_path / "tensorboard" / "train-prior"
    board = TensorBoardLog(folder, None)
    for s in range(1, 6):  # killed after step 5; its last checkpoint was at step 3
        board.write({"step": s, "split": "train", "time": T0 + s, "loss": 1.0})
    board.close()
    board = TensorBoardLog(folder, 3)
    for s in range(4, 7):
        board.write({"step": s, "split": "train", "time": T0 + 10 + s, "loss": 2.0})
    board.close()
    assert tensorboard_scalars(folder)["train/loss"] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0)]
    TensorBoardLog(folder, None).close()  # a fresh run starts the folder anew
    assert tensorboard_scalars(folder) == {}


def test_only_rank_0_writes_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package")
    from test_training import ToyTask

    from vqtool.distributed import ProcessInfo
    from vqtool.training import LoopSettings, run_loop

    settings = LoopSettings(max_steps=2, log_every=1, eval_every=1, tensorboard=True)
    for rank in (1, 0):  # a two-process run's ranks, each alone here (no collectives without a process group)
        run_loop(ToyTask(), settings, tmp_path / "checkpoints" / "toy-last.safetensors", tmp_path / "toy.jsonl",
                 proc=ProcessInfo(rank=rank, world_size=2))
        if rank == 1:
            assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "toy.jsonl").exists()
    assert tensorboard_scalars(tmp_path / "tensorboard" / "toy")["train/loss"][-1][0] == 2


def test_tensorboard_of_train_vq_has_the_reconstruction_grids(tiny_finished_run):
    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_finished_run / "tensorboard" / "train-vq"))
    acc.Reload()
    assert {"train/loss", "train/l1", "val/psnr", "val/usage", "val/perplexity"} <= set(acc.Tags()["scalars"])
    grids = acc.Images("val/grid")
    assert [g.step for g in grids] == [2, 4]
    last = sorted((tiny_finished_run / "figures" / "train-vq").glob("step-*.png"))[-1]
    assert (grids[-1].width, grids[-1].height) == Image.open(last).size
    # The recipe key is not a setting of the output: a rerun without it is up to date.
    from vqtool.pipeline import ledger_entries

    assert "tensorboard" not in ledger_entries(tiny_finished_run)["train-vq"]["settings"]["train_vq"]


def test_tensorboard_without_the_package_is_refused_before_training(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    make_latents(run / "latents.safetensors")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when it is not installed
    res = CliRunner().invoke(app, ["train-prior", "--run", str(run), "--max-steps", "2", "--device", "cpu",
                                   "--tensorboard"])
    assert res.exit_code == 2, res.output
    assert "pip install vqtool[tensorboard]" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (run / "checkpoints").exists() and not (run / "train-prior.jsonl").exists()
    with pytest.raises(VqtoolError, match="tensorboard package"):
        small(max_steps=1, tensorboard=True).check_loop("train_prior")
