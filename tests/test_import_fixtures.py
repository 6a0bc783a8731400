"""`vqtool import` on checkpoints saved by the papers' official code, against that code's own outputs.

The fixtures (../shared/fixtures/peer-checkpoints, see its README) are small random-weight models in
the exact release formats with reference outputs on 6 images. Everything here runs through the CLI
and the notebook API, the way a user would.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vqtool
from vqtool.artifacts import file_sha256, read_metadata
from vqtool.cli import app

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "peer-checkpoints"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"peer checkpoints not found at {FIXTURES}")
TOL = 2e-4


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not FIXTURES.is_dir():
        pytest.skip(f"peer checkpoints not found at {FIXTURES}")
    return load_file(str(FIXTURES / "reference.safetensors"))


def run_cli(*args: str, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    """The four fixtures imported once through the CLI, into a UT run and a TT run."""
    if not FIXTURES.is_dir():
        pytest.skip(f"peer checkpoints not found at {FIXTURES}")
    root = tmp_path_factory.mktemp("imported")
    ut, tt = root / "ut", root / "tt"
    out = {"ut_vq": ut / "vq.safetensors", "ut_prior": ut / "prior.safetensors",
           "tt_vq": tt / "vq.safetensors", "tt_prior": tt / "prior.safetensors",
           "tt_vq_alone": root / "tt-vq-alone.safetensors"}
    out["ut_vq_log"] = run_cli("import", FIXTURES / "ut-vqgan_ema_100.th", "--run", ut, "--image-size", "32").output
    out["ut_prior_log"] = run_cli("import", FIXTURES / "ut-absorbing_ema_100.th", "--run", ut,
                                  "--vq", out["ut_vq"], "--heads", "4").output
    out["tt_prior_log"] = run_cli("import", FIXTURES / "tt-transformer-last.ckpt", "--config",
                                  FIXTURES / "tt-transformer-project.yaml", "--run", tt).output
    run_cli("import", FIXTURES / "tt-vqgan-last.ckpt", "--config", FIXTURES / "tt-vqgan-project.yaml",
            "--out", out["tt_vq_alone"])
    return out


@pytest.mark.parametrize("name", ["ut", "tt"])
def test_vq_codes_and_decoded_images_match_the_original_code(imported, reference, name):
    key = {"ut": "ut_vq", "tt": "tt_vq_alone"}[name]
    vq = vqtool.load_vq(imported[key])
    assert torch.equal(vq.encode(reference["images"]), reference[f"{name}_vq.indices"].long())
    decoded = vq.decode(reference[f"{name}_vq.indices"])
    expected = reference[f"{name}_vq.decoded"].clamp(-1, 1)
    assert decoded.shape == expected.shape
    assert (decoded - expected).abs().max().item() < TOL


def test_the_transformer_checkpoints_first_stage_is_the_same_vq(imported, reference):
    written = vqtool.load_vq(imported["tt_vq"])
    assert torch.equal(written.encode(reference["images"]), reference["tt_vq.indices"].long())
    alone = vqtool.load_vq(imported["tt_vq_alone"])
    for (k, a), b in zip(written.model.state_dict().items(), alone.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_absorbing_prior_logits_match(imported, reference):
    prior = vqtool.load_prior(imported["ut_prior"])
    assert prior.kind == "absorbing" and prior.mask_id == 64 and prior.grid == (8, 8)
    tokens = reference["ut_absorbing.tokens"].long()
    assert (tokens == prior.mask_id).any()
    logits = prior.logits(tokens.reshape(-1, 8, 8))
    assert logits.shape == (6, 8, 8, 64)
    assert (logits.reshape(6, 64, 64) - reference["ut_absorbing.logits"]).abs().max().item() < TOL


def test_autoregressive_logits_and_exact_nll_match(imported, reference):
    prior = vqtool.load_prior(imported["tt_prior"])
    assert prior.kind == "autoregressive"
    tokens = reference["tt_gpt.tokens"].long()
    logits = prior.logits(tokens.reshape(-1, 8, 8)).reshape(6, 64, 64)
    assert (logits - reference["tt_gpt.logits"]).abs().max().item() < TOL
    nats = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").mean(1)
    assert (nats / math.log(2) - reference["tt_gpt.nll_bits_per_token"]).abs().max().item() < TOL


def test_artifacts_record_source_and_parents(imported):
    ut_vq = read_metadata(imported["ut_vq"], "vq-model")
    source = ut_vq.extra["source"]
    assert source["format"] == "unleashing-transformers/vqgan"
    assert source["sha256"] == file_sha256(FIXTURES / "ut-vqgan_ema_100.th")
    assert "image_size" in source["inferred"]
    ut_prior = read_metadata(imported["ut_prior"], "prior-model")
    assert ut_prior.parents == {"vq": file_sha256(imported["ut_vq"])}
    assert "n_head" in ut_prior.extra["source"]["inferred"]
    tt_prior = read_metadata(imported["tt_prior"], "prior-model")
    assert tt_prior.parents == {"vq": file_sha256(imported["tt_vq"])}
    assert tt_prior.extra["source"]["format"] == "taming-transformers/transformer"
    # The imported UT VQ keeps its discriminator for fine-tuning.
    assert ut_vq.extra["discriminator"] == {"disc_ch": 16, "disc_layers": 2}
    assert any(name.startswith("disc.") for name in ut_vq.extra["_tensors"])


def test_summary_says_what_was_inferred(imported):
    log = " ".join(imported["ut_prior_log"].split())
    assert "inferred n_head" in log and "--heads" in log
    assert "unleashing-transformers/absorbing" in log
    assert "wrote the checkpoint's first-stage VQGAN" in " ".join(imported["tt_prior_log"].split())


def test_info_shows_the_source(imported):
    out = run_cli("info", imported["tt_prior"]).output
    assert "source format" in out and "source sha256" in out


def test_every_stage_runs_on_imported_models(imported, tmp_path):
    ut_run = imported["ut_vq"].parent
    run_cli("sample", "--run", ut_run, "--n", "2", "--steps", "4", "--batch-size", "2")
    assert (ut_run / "samples" / "grid.png").exists()
    run_cli("inpaint", "--run", ut_run, FIXTURES / "images" / "00.png", "--box", "8,8,24,24", "--n", "2",
            "--steps", "4")
    tt_run = imported["tt_vq"].parent
    run_cli("sample", "--run", tt_run, "--n", "2", "--batch-size", "2")
    # A user's own images, encoded with the imported VQ, then a prior trained on them.
    images = tmp_path / "mine"
    images.mkdir()
    for i in range(8):
        (images / f"{i}.png").write_bytes((FIXTURES / "images" / f"{i % 6:02d}.png").read_bytes())
    run = tmp_path / "run"
    run_cli("prepare", images, "--size", "32", "--run", run)
    run_cli("encode", "--run", run, "--vq", imported["ut_vq"])
    latents = read_metadata(run / "latents.safetensors", "latents")
    assert latents.parents["vq"] == file_sha256(imported["ut_vq"])
    run_cli("train-prior", "--run", run, "--prior", "absorbing", "--max-steps", "1", "--set", "n_layer=1",
            "--set", "batch_size=4")
    assert (run / "prior.safetensors").exists()


def test_a_transformer_import_refuses_a_vq_that_is_not_its_first_stage(imported, tmp_path):
    result = run_cli("import", FIXTURES / "tt-transformer-last.ckpt", "--config",
                     FIXTURES / "tt-transformer-project.yaml", "--out", tmp_path / "p.safetensors",
                     "--vq", imported["ut_vq"], ok=False)
    assert result.exit_code == 2
    assert "first-stage" in result.output
    assert not (tmp_path / "p.safetensors").exists()


def test_a_transformer_import_reuses_its_first_stage_when_given(imported, tmp_path):
    out = tmp_path / "p.safetensors"
    run_cli("import", FIXTURES / "tt-transformer-last.ckpt", "--config", FIXTURES / "tt-transformer-project.yaml",
            "--out", out, "--vq", imported["tt_vq_alone"])
    assert read_metadata(out, "prior-model").parents == {"vq": file_sha256(imported["tt_vq_alone"])}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]


@needs_fixtures
@pytest.mark.parametrize("args, message", [
    (["ut-absorbing_ema_100.th", "--heads", "3"], "not divisible by 3 attention heads"),
    (["tt-transformer-last.ckpt"], "project YAML"),
    (["ut-vqgan_ema_100.th", "--image-size", "30"], "not divisible"),
    (["ut-vqgan_ema_100.th", "--config", "tt-vqgan-project.yaml"], "Taming checkpoints"),
    (["tt-vqgan-last.ckpt", "--config", "tt-transformer-project.yaml"], "does not match this checkpoint"),
    (["images/00.png"], "not a torch.save zip"),
])
def test_bad_imports_fail_in_one_line(tmp_path, args, message):
    argv = [str(FIXTURES / a) if a.endswith((".th", ".ckpt", ".yaml", ".png")) else a for a in args]
    result = run_cli("import", *argv, "--out", tmp_path / "x.safetensors", ok=False)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert message in text
    assert text.startswith("error:")
    assert not (tmp_path / "x.safetensors").exists()


def test_import_refuses_to_overwrite(imported):
    result = run_cli("import", FIXTURES / "ut-vqgan_ema_100.th", "--out", imported["ut_vq"], "--image-size", "32",
                     ok=False)
    assert result.exit_code == 2 and "--overwrite" in result.output


class _RunsACommand:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.sentinel}",)


def test_import_refuses_a_checkpoint_that_would_run_code(tmp_path):
    sentinel = tmp_path / "ran"
    evil = tmp_path / "vqgan_ema_1.th"
    torch.save({"ae.encoder.blocks.0.weight": torch.zeros(1), "payload": _RunsACommand(sentinel)}, evil)
    result = run_cli("import", evil, "--out", tmp_path / "x.safetensors", ok=False)
    assert result.exit_code == 2
    assert "system" in result.output and "refusing" in result.output
    assert not sentinel.exists()
    assert not (tmp_path / "x.safetensors").exists()
