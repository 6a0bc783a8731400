"""`vqtool export --format diffusers` and `vqtool import FOLDER`, checked against diffusers' own VQModel.

Export: a vqtool VQ with random weights → a folder → `VQModel.from_pretrained` gives the same code indices
and decodes them to the same images. Import: folders that diffusers itself wrote (`save_pretrained`,
random weights, the block layouts the Hub's VQGANs use) → vqtool gives diffusers' indices and images.
Every refusal is one line naming the setting or field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vqtool.artifacts import read_metadata
from vqtool.cli import app
from vqtool.vq.model import VQConfig, VQModel
from vqtool.vq.store import load_vq, save_vq

diffusers = pytest.importorskip("diffusers", reason="diffusers (the dev extra) is needed to check against VQModel")
diffusers.utils.logging.set_verbosity_error()  # its note about the optional `accelerate` on every load
TOL = 1e-4
SIDE = 32


def run_cli(*args, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def refused(*args) -> str:
    result = run_cli(*args, ok=False)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return " ".join(result.output.split())


def images(n: int = 2, side: int = SIDE, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random weights away from the initialisation (GroupNorm affines and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def diffusers_tokens(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, _, (_, _, indices) = model.quantize(model.encode(x).latents)
    return indices


def diffusers_decode(model, tokens: torch.Tensor) -> torch.Tensor:
    """Indices → images the two ways a VQModel offers, as its lookup_from_codebook says."""
    shape = (*tokens.shape, model.config.vq_embed_dim or model.config.latent_channels)
    with torch.no_grad():
        if model.config.lookup_from_codebook:
            return model.decode(tokens.reshape(-1), force_not_quantize=True, shape=shape).sample.clamp(-1, 1)
        codes = model.quantize.get_codebook_entry(tokens.reshape(-1), shape)
        return model.decode(codes, force_not_quantize=True).sample.clamp(-1, 1)


def assert_same_model(ours: VQModel, theirs, x: torch.Tensor) -> None:
    tokens = ours.encode_to_tokens(x)
    assert tokens.unique().numel() > 1  # a test on one repeated code would prove little
    assert torch.equal(diffusers_tokens(theirs, x).reshape(tokens.shape), tokens)
    with torch.no_grad():
        decoded = ours.decode_tokens(tokens)
    assert (diffusers_decode(theirs, tokens) - decoded).abs().max() < TOL


# --------------------------------------------------------------------------------------------------
# Export

EXPORT_LAYOUTS = {
    # vqtool's defaults: cosine codebook, 1×1 quant convs, attention at the coarsest level
    "cosine-attention": dict(ch=32, ch_mult=[1, 2], attn_resolutions=[16], z_channels=16, code_dim=8),
    # Euclidean lookup, no quant convs (identity convs in the folder), no attention outside the bottleneck,
    # three levels whose widths need one explicit group count
    "euclidean-plain": dict(ch=16, ch_mult=[1, 1, 2], attn_resolutions=[], z_channels=8, code_dim=8, cosine=False,
                            quant_convs=False, norm_groups=8, num_res_blocks=2),
    # no bottleneck attention, attention at the finest level
    "no-mid-attention": dict(ch=32, ch_mult=[1, 1], attn_resolutions=[32], z_channels=8, code_dim=4,
                             mid_attention=False),
}


def make_vq(path: Path, seed: int = 0, **settings) -> VQConfig:
    torch.manual_seed(seed)
    cfg = VQConfig(resolution=SIDE, codebook_size=32, **settings)
    model = perturbed(VQModel(cfg), seed)
    extra = {"image_size": SIDE, "latent_shape": list(model.latent_shape(SIDE)), "step": 123, "seed": seed,
             "val": {"l1": 0.1, "psnr": 20.0}, "codebook": {"usage": 0.5, "perplexity": 9.0, "images": 12}}
    save_vq(path, cfg, model.state_dict(), model.state_dict(), train_config={"lr": 1e-4},
            parents={"dataset": "ab" * 32}, extra=extra)
    return cfg


@pytest.mark.parametrize("layout", list(EXPORT_LAYOUTS))
def test_an_export_loads_in_diffusers_with_the_same_indices_and_images(layout, tmp_path):
    vq, out = tmp_path / "vq.safetensors", tmp_path / "hub"
    make_vq(vq, **EXPORT_LAYOUTS[layout])
    run_cli("export", vq, "--format", "diffusers", "--out", out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    theirs = diffusers.VQModel.from_pretrained(out).eval()
    ours = load_vq(vq).model
    x = images()
    with torch.no_grad():
        assert (theirs.encode(x).latents - ours.encode(x)).abs().max() < TOL
    assert_same_model(ours, theirs, x)

    # …and back: the folder imports as a vq-model that encodes to the same tokens.
    back = tmp_path / "back.safetensors"
    run_cli("import", out, "--out", back)
    again = load_vq(back).model
    assert torch.equal(again.encode_to_tokens(x), ours.encode_to_tokens(x))
    with torch.no_grad():
        assert (again.decode_tokens(ours.encode_to_tokens(x)) - ours.decode_tokens(ours.encode_to_tokens(x))
                ).abs().max() < TOL


def test_the_model_card_says_what_made_the_model_and_how_to_load_it(tmp_path):
    vq, out = tmp_path / "vq.safetensors", tmp_path / "hub"
    make_vq(vq, **EXPORT_LAYOUTS["cosine-attention"])
    run_cli("export", vq, "--out", out)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n")
    for fact in ("32 codes × 8 dims", "16×16", "32×32 px", "cosine", "123 training steps", "PSNR 20.00 dB",
                 "50.0% of the codes used", "abababababab", "VQModel.from_pretrained", f"vqtool import {out}",
                 "vqtool encode", "train-prior", "the raw (non-EMA) weights", '"lr": 0.0001'):
        assert fact in card, fact
    made = card.split("## How it was made")[1].split("##")[0]
    assert "# wrote vq.safetensors" in made and "# wrote this folder" in made  # the two commands


def test_a_second_export_refuses_to_overwrite_unless_asked_and_keeps_other_files(tmp_path):
    vq, out = tmp_path / "vq.safetensors", tmp_path / "hub"
    make_vq(vq, **EXPORT_LAYOUTS["cosine-attention"])
    run_cli("export", vq, "--out", out)
    before = (out / "config.json").read_bytes()
    (out / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert "already exists; pass --overwrite" in refused("export", vq, "--out", out)
    run_cli("export", vq, "--out", out, "--overwrite")
    assert (out / "config.json").read_bytes() == before
    assert (out / ".gitattributes").read_text() == "*.safetensors filter=lfs\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "vq.safetensors"]  # no staging left behind
    assert "an input of this stage" in refused("export", vq, "--out", tmp_path)


@pytest.mark.parametrize("settings, field", [
    (dict(swish_before_out=False), "swish_before_out"),
    (dict(decoder_res_blocks=1), "decoder_res_blocks"),
    (dict(ch_mult=[2, 2]), "ch_mult"),
    (dict(ch=16, ch_mult=[1, 4]), "norm_groups"),  # vqtool's rule: 16 groups at width 16, 32 at 64
])
def test_settings_a_vqmodel_cannot_express_are_refused(settings, field, tmp_path):
    vq = tmp_path / "vq.safetensors"
    make_vq(vq, **{**dict(ch=32, ch_mult=[1, 2], attn_resolutions=[], z_channels=8, code_dim=8), **settings})
    message = refused("export", vq, "--out", tmp_path / "hub")
    assert field in message
    assert not (tmp_path / "hub").exists()


def test_export_and_import_run_without_diffusers(tmp_path, monkeypatch):
    vq = tmp_path / "vq.safetensors"
    make_vq(vq, **EXPORT_LAYOUTS["cosine-attention"])
    monkeypatch.setitem(sys.modules, "diffusers", None)  # any `import diffusers` now fails
    run_cli("export", vq, "--out", tmp_path / "hub")
    run_cli("import", tmp_path / "hub", "--out", tmp_path / "back.safetensors")


def test_export_refuses_other_formats_and_a_file_as_the_folder(tmp_path):
    vq = tmp_path / "vq.safetensors"
    make_vq(vq, **EXPORT_LAYOUTS["cosine-attention"])
    assert "--format 'onnx'" in refused("export", vq, "--format", "onnx", "--out", tmp_path / "hub")
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in refused("export", vq, "--out", tmp_path / "file")


def test_the_uncommon_layouts_round_trip_too(tmp_path):
    """An import of a diffusers folder exports to the same config.json and the same tensors."""
    folder = tmp_path / "theirs"
    save_diffusers(folder, IMPORT_LAYOUTS["amused-like"])
    run_cli("import", folder, "--out", tmp_path / "vq.safetensors")
    run_cli("export", tmp_path / "vq.safetensors", "--out", tmp_path / "again")
    first, second = (json.loads((f / "config.json").read_text()) for f in (folder, tmp_path / "again"))
    assert {k: v for k, v in first.items() if not k.startswith("_")} == {k: v for k, v in second.items()
                                                                       if not k.startswith("_")}
    from safetensors.torch import load_file

    a, b = (load_file(str(f / "diffusion_pytorch_model.safetensors")) for f in (folder, tmp_path / "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# Import

IMPORT_LAYOUTS = {
    # VQ-Diffusion's: attention in the last encoder level and the first decoder level, vq_embed_dim set
    "attention-at-the-bottom": dict(
        block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], layers_per_block=1, latent_channels=16,
        vq_embed_dim=8, num_vq_embeddings=32, norm_num_groups=32),
    # aMUSEd's: no attention at all (mid_block_add_attention false), vq_embed_dim null, lookup_from_codebook
    "amused-like": dict(
        block_out_channels=[16, 16, 32], down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=2, latent_channels=8, vq_embed_dim=None,
        num_vq_embeddings=32, norm_num_groups=8, mid_block_add_attention=False, lookup_from_codebook=True,
        force_upcast=True, scaling_factor=0.25),
    # the latent-diffusion VQ's: plain levels, bottleneck attention, 3 latent channels
    "ldm-like": dict(
        block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=3, num_vq_embeddings=32,
        norm_num_groups=16),
}


def save_diffusers(folder: Path, config: dict, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = perturbed(diffusers.VQModel(sample_size=SIDE, **config), seed)
    with torch.no_grad():  # codes at the scale of the encoder's outputs, so many of them are used
        model.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(seed))
    model.to(dtype).save_pretrained(folder)
    return model


@pytest.mark.parametrize("layout", list(IMPORT_LAYOUTS))
def test_a_folder_diffusers_wrote_imports_with_the_same_indices_and_images(layout, tmp_path):
    folder, vq = tmp_path / "theirs", tmp_path / "vq.safetensors"
    theirs = save_diffusers(folder, IMPORT_LAYOUTS[layout])
    run_cli("import", folder, "--out", vq)
    ours = load_vq(vq).model
    assert_same_model(ours, theirs, images())
    meta = read_metadata(vq, "vq-model")
    assert meta.extra["source"]["format"] == "diffusers/VQModel"
    assert meta.extra["latent_shape"] == list(ours.latent_shape(SIDE))
    assert meta.config["model"]["cosine"] is False and meta.config["model"]["quant_convs"] is True


def test_float16_weights_are_read_as_float32(tmp_path):
    folder, vq = tmp_path / "theirs", tmp_path / "vq.safetensors"
    save_diffusers(folder, IMPORT_LAYOUTS["ldm-like"], dtype=torch.float16)
    out = run_cli("import", folder, "--out", vq).output
    assert "float16 weights, converted to float32" in " ".join(out.split())
    theirs = diffusers.VQModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    assert_same_model(load_vq(vq).model, theirs, images())


def test_a_pickled_folder_with_the_old_attention_names_imports(tmp_path):
    """Folders saved before diffusers 0.14: diffusion_pytorch_model.bin, attention as query/key/value/proj_attn."""
    folder, vq = tmp_path / "old", tmp_path / "vq.safetensors"
    theirs = save_diffusers(folder, IMPORT_LAYOUTS["attention-at-the-bottom"])
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in theirs.state_dict().items():
        for new, legacy in old.items():
            key = key.replace(f".{new}.", f".{legacy}.")
        state[key] = value
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    run_cli("import", folder, "--out", vq)
    assert_same_model(load_vq(vq).model, diffusers.VQModel.from_pretrained(folder).eval(), images())


def test_every_stage_runs_on_an_imported_folder(tiny_run, tmp_path):
    folder = tmp_path / "theirs"
    save_diffusers(folder, IMPORT_LAYOUTS["ldm-like"])
    run_cli("import", folder, "--run", tiny_run, "--image-size", "16")  # the tiny shards' size
    assert read_metadata(tiny_run / "vq.safetensors", "vq-model").extra["latent_shape"] == [8, 8]
    run_cli("encode", "--run", tiny_run)
    run_cli("train-prior", "--run", tiny_run, "--prior", "absorbing", "--max-steps", "1", "--set", "n_layer=1",
            "--set", "n_embd=32", "--set", "n_head=2", "--set", "batch_size=4", "--device", "cpu")
    run_cli("sample", "--run", tiny_run, "--n", "2", "--steps", "2", "--batch-size", "2", "--device", "cpu")
    assert (tiny_run / "samples" / "grid.png").exists()


BASE = dict(IMPORT_LAYOUTS["attention-at-the-bottom"], _class_name="VQModel", _diffusers_version="0.42.1",
            in_channels=3, out_channels=3, act_fn="silu", sample_size=SIDE, norm_type="group",
            mid_block_add_attention=True, lookup_from_codebook=False, force_upcast=False, scaling_factor=0.18215)


@pytest.mark.parametrize("change, field", [
    (dict(norm_type="spatial"), "norm_type"),
    (dict(up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]), "up_block_types"),
    (dict(down_block_types=["DownEncoderBlock2D", "CrossAttnDownBlock2D"]), "down_block_types"),
    (dict(down_block_types=["DownEncoderBlock2D"]), "down_block_types"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(in_channels=4), "in_channels"),
    (dict(_class_name="AutoencoderKL"), "_class_name"),
    (dict(block_out_channels=[48, 64]), "block_out_channels"),
    (dict(norm_num_groups=24), "norm_num_groups"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(sample_size=[32, 16]), "sample_size"),
    (dict(attention_type="cross"), "attention_type"),
])
def test_fields_vqtool_cannot_model_are_refused_naming_the_field(change, field, tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**BASE, **change}))
    message = refused("import", folder, "--out", tmp_path / "vq.safetensors")
    assert field in message
    assert not (tmp_path / "vq.safetensors").exists()


def test_a_folder_without_its_parts_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    out = tmp_path / "vq.safetensors"
    assert "without a config.json" in refused("import", folder, "--out", out)
    (folder / "model_index.json").write_text("{}")
    (folder / "vqvae").mkdir()
    (folder / "vqvae" / "config.json").write_text(json.dumps(BASE))
    assert "pipeline folder" in refused("import", folder, "--out", out)
    assert "no diffusion_pytorch_model.safetensors" in refused("import", folder / "vqvae", "--out", out)
    (folder / "vqvae" / "config.json").write_text("{not json")
    assert "not valid JSON" in refused("import", folder / "vqvae", "--out", out)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    folder = tmp_path / "theirs"
    save_diffusers(folder, IMPORT_LAYOUTS["ldm-like"])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_vq_embeddings": 64}))
    assert "do not fit" in refused("import", folder, "--out", tmp_path / "vq.safetensors")
    (folder / "config.json").write_text(json.dumps({**config, "mid_block_add_attention": False}))
    assert "has no place in the model" in refused("import", folder, "--out", tmp_path / "vq.safetensors")


def test_options_for_checkpoints_are_refused_for_a_folder(tmp_path):
    folder = tmp_path / "theirs"
    save_diffusers(folder, IMPORT_LAYOUTS["ldm-like"])
    assert "--heads does not apply" in refused("import", folder, "--out", tmp_path / "vq.safetensors",
                                               "--heads", "4")


def test_the_two_layout_switches_build_what_they_say():
    cfg = VQConfig(resolution=SIDE, ch=16, ch_mult=[1, 2], attn_resolutions=[16], norm_groups=4, mid_attention=False)
    model = VQModel(cfg)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.num_groups for m in norms} == {4}
    assert not any(k.startswith(("encoder.mid.attn", "decoder.mid.attn")) for k in model.state_dict())
    assert any(k.startswith("encoder.levels.1.attns.0") for k in model.state_dict())
    with pytest.raises(ValueError, match="norm_groups 12 must divide"):
        VQConfig(resolution=SIDE, ch=16, ch_mult=[1, 2], norm_groups=12).validate()
    default = VQModel(VQConfig(resolution=SIDE, ch=16, ch_mult=[1, 4]))
    assert {m.num_groups for m in default.modules() if isinstance(m, torch.nn.GroupNorm)} == {16, 32}
