"""The train-vq / encode / reconstruct / decode commands on the synthetic dataset, for a few steps."""

import pytest
from typer.testing import CliRunner

from vqtool.cli import app
from vqtool.cli.vq import train_vq_parts
from vqtool.config import merge, split_sets
from vqtool.errors import VqtoolError
from vqtool.runs import RunPaths
from vqtool.vq.train import TrainVQConfig

TINY = ["--set", "ch=8", "--set", "ch_mult=[1,2]", "--set", "attn_resolutions=[8]", "--set", "z_channels=8",
        "--set", "codebook_size=16", "--set", "code_dim=4", "--set", "train_vq.disc_layers=2",
        "--set", "disc_ch=8", "--set", "kmeans_batches=1", "--set", "eval_images=8", "--set", "shuffle_buffer=8"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_pipeline_through_the_cli(tiny_run, tmp_path):
    paths = RunPaths.of(tiny_run)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("vq:\n  codebook_size: 32\ntrain_vq:\n  batch_size: 4\n  perceptual: none\n")
    r = invoke("train-vq", "--run", tiny_run, "--config", recipe, *TINY, "--max-steps", 2, "--disc-start", 2,
               "--eval-every", 2, "--device", "cpu", "--threads", 1)
    assert r.exit_code == 0, r.output
    assert paths.vq.exists() and "val PSNR" in r.output
    from vqtool.vq.store import load_vq

    vq = load_vq(paths.vq)
    assert vq.model.codebook_size == 16  # --set wins over the recipe
    assert vq.config["train"]["batch_size"] == 4 and vq.config["train"]["disc_start"] == 2

    r = invoke("train-vq", "--run", tiny_run, "--config", recipe, *TINY, "--max-steps", 3, "--device", "cpu",
               "--resume")
    assert r.exit_code == 0, r.output
    assert "3 (max-steps)" in r.output

    r = invoke("encode", "--run", tiny_run, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert paths.latents.exists() and "36 train, 12 val" in r.output and "images/s" in r.output
    r = invoke("encode", "--run", tiny_run, "--device", "cpu")
    assert r.exit_code == 0 and "up to date" in r.output

    figure = next(paths.figures("train-vq").glob("*.png"))
    r = invoke("reconstruct", figure, "--run", tiny_run, "--out", tmp_path / "rec", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rec" / figure.name).exists() and (tmp_path / "rec" / "comparison.png").exists()

    r = invoke("decode", "--run", tiny_run, "--limit", 3, "--out", tmp_path / "dec", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "dec").glob("val-*.png"))) == 3


def test_errors_are_one_red_line_with_exit_2(tiny_run, tmp_path):
    r = invoke("train-vq", "--run", tiny_run, "--max-steps", 1, "--set", "colour=3", "--device", "cpu")
    assert r.exit_code == 2 and "unknown setting" in r.output
    r = invoke("train-vq", "--run", tiny_run, "--device", "cpu")
    assert r.exit_code == 2 and "--max-steps" in r.output
    r = invoke("train-vq", "--run", tiny_run, "--max-steps", 1, "--perceptual", "lpips-vgg", *TINY,
               "--device", "cpu")
    assert r.exit_code == 2 and "--perceptual" in r.output and "Traceback" not in r.output
    r = invoke("encode", "--run", tmp_path / "nowhere", "--device", "cpu")
    assert r.exit_code == 2 and "train-vq" in r.output
    r = invoke("reconstruct", tmp_path / "missing.png", "--run", tiny_run, "--device", "cpu")
    assert r.exit_code == 2
    r = invoke("decode", "--run", tiny_run, "--device", "cpu")
    assert r.exit_code == 2
    for line in r.output.strip().splitlines():
        assert line.startswith("error:")


@pytest.mark.parametrize("command", ["train-vq", "encode", "reconstruct", "decode"])
def test_help(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0 and "--run" in r.output


def test_split_overrides_routes_keys():
    sets = split_sets(["ch=16", "vq.beta=0.5", "lr=1e-3", "train_vq.batch_size=8"], train_vq_parts())
    vq, train = sets["vq"], sets["train_vq"]
    assert vq == {"ch": 16, "beta": 0.5} and set(train) == {"lr", "batch_size"}
    cfg = merge(TrainVQConfig, train)
    assert cfg.lr == 1e-3 and cfg.batch_size == 8  # YAML reads 1e-3 as a string; the config takes it as a float
    with pytest.raises(VqtoolError, match="unknown setting"):
        split_sets(["vq.lr=1"], train_vq_parts())


def test_encode_command_takes_its_defaults_from_the_encode_settings(monkeypatch):
    from vqtool.vq import encode
    from vqtool.vq.encode import EncodeSettings

    seen = []

    def fake(run, vq, shards, out, **kw):
        seen.append(kw)
        raise VqtoolError("stop here")

    monkeypatch.setattr(encode, "encode_dataset", fake)
    invoke("encode", "--run", "r")
    invoke("encode", "--run", "r", "--batch-size", 3, "--weights", "model")
    default = EncodeSettings()
    assert [(kw["batch_size"], kw["weights"]) for kw in seen] == [(default.batch_size, default.weights), (3, "model")]
