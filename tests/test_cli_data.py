"""`vqtool prepare` and `vqtool info` through typer's CliRunner: outputs, summaries, exit codes, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqtool.artifacts import save_artifact
from vqtool.cli import app
from vqtool.data.manifest import read_manifest


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    return lines[0]


@pytest.mark.parametrize("command", ["prepare", "info"])
def test_help(runner, command):
    result = invoke(runner, command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_prepare_synthetic_then_info(runner, tmp_path):
    run = tmp_path / "run"
    result = invoke(runner, "prepare", "--synthetic", "shapes", "--count", 24, "--size", 8, "--run", run,
                    "--workers", 1, "--val-fraction", 0.25, "--seed", 3)
    assert result.exit_code == 0, result.output
    assert "18 train + 6 val" in result.output and "images/s" in result.output
    m = read_manifest(run / "shards")
    assert m["counts"] == {"train": 18, "val": 6} and m["seed"] == 3 and m["image_size"] == 8

    again = invoke(runner, "prepare", "--synthetic", "shapes", "--count", 24, "--size", 8, "--run", run)
    assert again.exit_code == 2
    assert "--overwrite" in error_line(again)

    for target in (run, run / "shards", run / "shards" / "manifest.json"):
        info = invoke(runner, "info", target)
        assert info.exit_code == 0, info.output
        assert "dataset-manifest" in info.output and "circle" in info.output and "all present" in info.output


def test_prepare_folder_summary_lists_skips(runner, tmp_path):
    src = tmp_path / "imgs"
    (src / "cats").mkdir(parents=True)
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(buf, "PNG")
        (src / "cats" / f"{i}.png").write_bytes(buf.getvalue())
    (src / "cats" / "broken.jpg").write_bytes(b"")
    out = tmp_path / "custom-shards"
    result = invoke(runner, "prepare", src, "--out", out, "--size", 8, "--labels", "folder", "--val-fraction", 0)
    assert result.exit_code == 0, result.output
    assert "skipped: empty" in result.output
    info = invoke(runner, "info", out)
    assert "broken.jpg" in info.output and "empty" in info.output


def test_prepare_reads_recipe_and_set(runner, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("prepare:\n  synthetic: shapes\n  count: 10\n  size: 12\n  workers: 1\n")
    run = tmp_path / "run"
    result = invoke(runner, "prepare", "--config", recipe, "--set", "shard_size=3", "--run", run)
    assert result.exit_code == 0, result.output
    m = read_manifest(run / "shards")
    assert m["image_size"] == 12 and sum(m["counts"].values()) == 10
    assert m["settings"]["shard_size"] == 3 and len(m["shards"]["train"]) == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare:\n  sise: 12\n")
    result = invoke(runner, "prepare", "--config", bad, "--synthetic", "shapes", "--run", tmp_path / "r2")
    assert result.exit_code == 2 and "sise" in error_line(result)


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "SRC"),
        (["--synthetic", "blobs"], "unknown"),
        (["--synthetic", "shapes", "--crop", "diagonal"], "--crop"),
        (["--synthetic", "shapes", "--background", "1,2"], "--background"),
        (["--synthetic", "shapes", "--count", "0"], "--count"),
    ],
)
def test_prepare_bad_options_are_one_line_errors(runner, tmp_path, args, fragment):
    result = invoke(runner, "prepare", *args, "--run", tmp_path / "run")
    assert result.exit_code == 2
    assert fragment in error_line(result)


def test_prepare_missing_source(runner, tmp_path):
    result = invoke(runner, "prepare", tmp_path / "nothing-here", "--run", tmp_path / "run")
    assert result.exit_code == 2 and "not found" in error_line(result)


def test_info_on_an_artifact(runner, tmp_path):
    path = tmp_path / "latents.safetensors"
    save_artifact(path, "latents", {"train.tokens": torch.zeros(5, 4, 4, dtype=torch.uint8)},
                  config={"codebook_size": 16, "latent_shape": [4, 4]}, parents={"vq": "cd" * 32},
                  extra={"classes": ["x"]})
    result = invoke(runner, "info", path)
    assert result.exit_code == 0, result.output
    for text in ("latents", "train.tokens", "U8", "5×4×4", "codebook_size", "parent vq", "size on disk"):
        assert text in result.output, text


def test_info_on_bad_paths(runner, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("definitely not safetensors, just some text in a file\n")
    result = invoke(runner, "info", junk)
    assert result.exit_code == 2 and "not a safetensors file" in error_line(result)
    result = invoke(runner, "info", tmp_path / "missing")
    assert result.exit_code == 2 and "not found" in error_line(result)
    (tmp_path / "folder").mkdir()
    result = invoke(runner, "info", tmp_path / "folder")
    assert result.exit_code == 2 and "manifest.json" in error_line(result)
