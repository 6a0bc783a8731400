"""`vqtool eval` and `vqtool neighbours` through typer's CliRunner: outputs, recipes, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqtool.cli import app
from vqtool.eval import features
from vqtool.grids import to_uint8


@pytest.fixture(autouse=True)
def small_inputs(monkeypatch):
    """Test speed only: Inception fed 75 px instead of 299 px."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # torch-fidelity reads Inception weights only in PyTorch's own format, so this file is a torch.save.
    # One file per test session, shared by the eval test modules (it is ~100 MB).
    path = tmp_path_factory.getbasetemp() / "eval-inception-random.pth"
    return path if path.exists() else features.write_random_weights(path, seed=0)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    return lines[0]


@pytest.mark.parametrize("command", ["eval", "neighbours"])
def test_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output and "--run" in result.output


def test_eval_through_the_cli_with_a_recipe(tiny_run, weights, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("eval:\n  n: 4\n  nearest_k: 2\n  kid_subsets: 3\n  feature_layer: '64'\n")
    result = invoke("eval", "--run", tiny_run, "--config", recipe, "--fake", tiny_run / "shards",
                    "--fake-split", "val", "--feature-weights", weights, "--no-download", "--batch-size", 3)
    assert result.exit_code == 0, result.output
    assert "FID" in result.output and "Precision" in result.output and "computed" in result.output
    report = json.loads((tiny_run / "eval" / "report.json").read_text())
    assert report["settings"]["n"] == 4 and report["settings"]["nearest_k"] == 2
    assert report["fake"]["n"] == 4 and report["settings"]["feature_layer"] == "64"
    again = invoke("eval", "--run", tiny_run, "--config", recipe, "--fake", tiny_run / "shards",
                   "--fake-split", "val", "--feature-weights", weights, "--no-download", "--name", "second",
                   "--metrics", "fid")
    assert again.exit_code == 0, again.output
    assert "from cache" in again.output
    assert set(json.loads((tiny_run / "eval" / "second.json").read_text())["metrics"]) == {"fid"}


def test_eval_missing_weights_is_one_red_line_and_exit_2(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = invoke("eval", "--run", tiny_run, "--fake", tiny_run / "shards", "--n", 4, "--no-download")
    assert result.exit_code == 2
    line = error_line(result)
    assert "weights-inception-2015-12-05-6726825d.pth" in line and "--feature-weights PATH" in line


def test_eval_unknown_recipe_key_is_refused(tiny_run, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("eval:\n  nn: 4\n")
    result = invoke("eval", "--run", tiny_run, "--config", recipe)
    assert result.exit_code == 2 and "unknown setting(s) nn" in error_line(result)


def test_neighbours_through_the_cli(tiny_run, tmp_path):
    import torchvision

    from vqtool.data.loader import ShardLoader

    alexnet = tmp_path / "alexnet.pth"
    # torchvision's format, random weights; only `features.*` (the part LPIPS uses) to keep the file small.
    torch.save(torchvision.models.alexnet().features.state_dict(prefix="features."), alexnet)
    images = next(iter(ShardLoader(tiny_run / "shards", "train", batch_size=3, infinite=False)))[0]
    folder = tmp_path / "fake"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(to_uint8(image)).save(folder / f"{i}.png")
    result = invoke("neighbours", "--run", tiny_run, "--fake", folder, "--n", 3, "--k", 2, "--n-val", 8,
                    "--lpips-weights", alexnet, "--no-download")
    assert result.exit_code == 0, result.output
    # All three are copies of training images: memorisation, each sample named as a possible copy.
    assert "memorisation:" in result.output and "sample(s) 0, 1, 2 are closer" in result.output
    assert (tiny_run / "eval" / "neighbours.png").exists() and (tiny_run / "eval" / "neighbours.json").exists()


def test_neighbours_missing_lpips_weights_is_one_line(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = invoke("neighbours", "--run", tiny_run, "--net", "vgg", "--no-download")
    assert result.exit_code == 2
    line = error_line(result)
    assert "vgg16-397923af.pth" in line and "--lpips-weights PATH" in line
