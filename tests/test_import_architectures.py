"""`vqtool import` infers architectures it has no fixture file for, and computes what the original code computes.

Each test builds a random checkpoint in one of the papers' layouts (tests/peer_layouts.py) for an architecture
other than the fixtures', imports it, loads the artifact through the notebook API and compares against the
functional re-implementation of the official forward in peer_layouts: identical code indices, decodings and
logits within 2e-4, and the inferred configuration equal to the one the file was built from. The refusals
at the end are each one line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import peer_layouts as pl
import pytest
import torch
import yaml

import vqtool
from vqtool.artifacts import file_sha256, load_artifact, read_metadata
from vqtool.errors import VqtoolError
from vqtool.interop.importer import import_checkpoint
from vqtool.vq.losses import PatchDiscriminator

TOL = 2e-4


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def assert_same_codes(ours: torch.Tensor, ref: torch.Tensor, gap: torch.Tensor) -> None:
    # A near-tie between two codes would make the comparison a coin toss rather than a test of the mapping.
    assert gap.min() > 1e-3, f"near-tie in the reference lookup (gap {gap.min():.2e}); pick another seed"
    assert ours.dtype == torch.int64 and ours.shape == ref.shape
    assert torch.equal(ours, ref), f"{(ours != ref).sum()} of {ref.numel()} code indices differ"
    assert ref.unique().numel() > 1  # the images do not all land on one code


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= tol, f"max abs difference {err:.2e} > {tol:.0e}"


def assert_decoding_informative(ref: torch.Tensor) -> None:
    # Most pixels inside the clamp, and varied: a mis-mapped tensor could not hide behind saturation.
    assert (ref.abs() < 1).float().mean() > 0.5
    assert ref.std() > 0.1


def refusal(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


def source_extra(path: Path, kind: str) -> dict:
    return read_metadata(path, kind).extra["source"]


# ------------------------------------------------------------------------------------------------ Unleashing VQGAN

UT_VQGANS = {
    "nf32-3levels-1block-attn8-disc-logsigma": pl.UTVQGAN(
        nf=32, ch_mult=[1, 1, 2], res_blocks=1, attn_resolutions=[8], img_size=16, emb_dim=16, codebook_size=48,
        disc_layers=2, ndf=16, logsigma=True, perceptual=True),
    "nf32-4levels-2blocks-attn16+8-disc3": pl.UTVQGAN(
        nf=32, ch_mult=[1, 2, 2, 4], res_blocks=2, attn_resolutions=[16, 8], img_size=32, emb_dim=32,
        codebook_size=64, disc_layers=3, ndf=8),
    "nf64-3levels-2blocks-attn4": pl.UTVQGAN(
        nf=64, ch_mult=[1, 1, 2], res_blocks=2, attn_resolutions=[4], img_size=16, emb_dim=8, codebook_size=40),
    "nf32-2levels-no-attn": pl.UTVQGAN(
        nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[], img_size=8, emb_dim=32, codebook_size=16),
    "nf32-2levels-mult2,4-attn8": pl.UTVQGAN(
        nf=32, ch_mult=[2, 4], res_blocks=1, attn_resolutions=[8], img_size=16, emb_dim=16, codebook_size=32),
}


def import_ut_vqgan(tmp_path: Path, a: pl.UTVQGAN, seed: int = 0, name: str = "vqgan") -> tuple[dict, Path]:
    sd = pl.ut_vqgan_state(a, seed)
    src = tmp_path / f"{name}_ema_100.th"
    torch.save(sd, src)
    out = tmp_path / f"{name}.safetensors"
    import_checkpoint(src, out=out, image_size=a.img_size)
    return sd, out


@pytest.mark.parametrize("name", list(UT_VQGANS))
def test_unleashing_vqgan_architecture(tmp_path, name):
    a = UT_VQGANS[name]
    sd, out = import_ut_vqgan(tmp_path, a)
    vq = vqtool.load_vq(out)

    cfg = vq.model.cfg
    assert cfg.ch == a.nf and cfg.ch_mult == a.ch_mult and cfg.resolution == a.img_size
    assert cfg.num_res_blocks == a.res_blocks and cfg.decoder_res_blocks == a.res_blocks
    assert sorted(cfg.attn_resolutions) == sorted(a.attn_resolutions)
    assert cfg.z_channels == a.emb_dim == cfg.code_dim and cfg.codebook_size == a.codebook_size
    assert not cfg.quant_convs and not cfg.swish_before_out
    assert vq.image_size == a.img_size and vq.latent_shape == (a.grid, a.grid)

    x = images(3, a.img_size, seed=1)
    with torch.no_grad():
        ref_idx, gap = pl.ut_vqgan_encode(sd, a, x)
        ref_img = pl.ut_vqgan_decode(sd, a, ref_idx).clamp(-1, 1)
    assert_same_codes(vq.encode(x), ref_idx, gap)
    assert_decoding_informative(ref_img)
    assert_close(vq.decode(ref_idx), ref_img)

    source = source_extra(out, "vq-model")
    assert source["format"] == "unleashing-transformers/vqgan"
    assert ("ae.generator.logsigma" in source["dropped"]) == a.logsigma
    assert ("perceptual" in source["dropped"]) == a.perceptual
    art = load_artifact(out, "vq-model")
    disc = {k[len("disc."):]: v for k, v in art.tensors.items() if k.startswith("disc.")}
    if not a.disc_layers:
        assert not disc and "discriminator" not in art.extra
        return
    assert art.extra["discriminator"] == {"disc_ch": a.ndf, "disc_layers": a.disc_layers}
    model = PatchDiscriminator(a.ndf, a.disc_layers)
    model.load_state_dict(disc, strict=True)
    model.eval()
    with torch.no_grad():
        assert_close(model(x), pl.patchgan_forward(sd, "disc.", x, a.disc_layers))


def test_unleashing_vqgan_comparison_is_sensitive():
    """The comparison above catches a misplaced tensor: exchanging two same-shaped convs of one generator
    ResBlock changes the reference's decoding far beyond the tolerance."""
    a = UT_VQGANS["nf64-3levels-2blocks-attn4"]
    sd = pl.ut_vqgan_state(a)
    swapped = dict(sd)
    one, two = "ae.generator.blocks.1.conv1.weight", "ae.generator.blocks.1.conv2.weight"
    assert sd[one].shape == sd[two].shape
    swapped[one], swapped[two] = sd[two], sd[one]
    idx = torch.randint(0, a.codebook_size, (2, a.grid, a.grid), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (pl.ut_vqgan_decode(sd, a, idx) - pl.ut_vqgan_decode(swapped, a, idx)).abs().max()
    assert diff > 100 * TOL


# ------------------------------------------------------------------------------------------------ Unleashing absorbing

UT_PRIORS = {
    # name: (architecture, --heads, VQGAN for --vq or None to infer a square grid from the positions)
    "1layer-2heads-grid4-inferred": (pl.UTAbsorbing(codebook_size=32, n_embd=64, n_layer=1, block_size=16, T=100),
                                     2, None),
    "3layers-4heads-block24-grid4-from-vq": (
        pl.UTAbsorbing(codebook_size=48, n_embd=64, n_layer=3, block_size=24, T=256), 4,
        "nf32-3levels-1block-attn8-disc-logsigma"),
    "2layers-8heads-grid6-inferred": (pl.UTAbsorbing(codebook_size=32, n_embd=64, n_layer=2, block_size=36, T=50),
                                      8, None),
}


@pytest.mark.parametrize("name", list(UT_PRIORS))
def test_unleashing_absorbing_architecture(tmp_path, name):
    a, heads, vq_name = UT_PRIORS[name]
    vq_path = None
    if vq_name is not None:
        _, vq_path = import_ut_vqgan(tmp_path, UT_VQGANS[vq_name], seed=3)
    sd = pl.ut_absorbing_state(a, seed=5)
    src = tmp_path / "absorbing_ema_100.th"
    torch.save(sd, src)
    out = tmp_path / "prior.safetensors"
    import_checkpoint(src, out=out, heads=heads, vq=vq_path)
    prior = vqtool.load_prior(out)

    side = UT_VQGANS[vq_name].grid if vq_name else int(a.block_size**0.5)
    assert side * side <= a.block_size and (vq_name is None or side * side < a.block_size)
    cfg = prior.model.cfg
    assert prior.kind == "absorbing" and not cfg.causal and cfg.n_classes == 0
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (a.n_layer, heads, a.n_embd)
    assert prior.grid == (side, side) and prior.codebook_size == a.codebook_size and prior.mask_id == a.codebook_size
    assert prior._loaded.objective["T"] == a.T
    parents = read_metadata(out, "prior-model").parents
    assert parents == ({"vq": file_sha256(vq_path)} if vq_path else {})

    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, a.codebook_size, (3, side, side), generator=g)
    tokens[torch.rand(tokens.shape, generator=g) < 0.4] = a.codebook_size  # MASK
    with torch.no_grad():
        ref = pl.ut_absorbing_logits(sd, tokens.reshape(3, -1), heads).reshape(3, side, side, -1)
        other = pl.ut_absorbing_logits(sd, tokens.reshape(3, -1), 1 if heads != 1 else 2).reshape(ref.shape)
    assert (ref - other).abs().max() > 100 * TOL  # the head count matters, so it is tested too
    assert_close(prior.logits(tokens), ref)


# ------------------------------------------------------------------------------------------------ Taming VQModel

TT_VQS = {
    "ch32-2levels-1block-attn16+8-disc2": (pl.TTVQ(
        ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16, 8], resolution=16, z_channels=16,
        embed_dim=8, n_embed=40, disc_layers=2, ndf=16, perceptual=True, logvar=True), "yaml"),
    "ch32-3levels-2blocks-attn16+8-disc3-placeholders": (pl.TTVQ(
        ch=32, ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[16, 8], resolution=32, z_channels=32,
        embed_dim=16, n_embed=64, disc_layers=3, ndf=8, perceptual=True), "yaml-placeholders"),
    "ch64-3levels-1block-attn4-no-yaml": (pl.TTVQ(
        ch=64, ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[4], resolution=16, z_channels=8,
        embed_dim=4, n_embed=24), "image-size"),
}


def save_lightning(path: Path, sd: dict, placeholders: bool = False) -> Path:
    if not placeholders:
        torch.save(pl.lightning_checkpoint(sd), path)
        return path
    with pl.throwaway_classes() as mod:
        # PL 1.0.8 keys callback states by the callback's class; hyper-parameters in an AttributeDict.
        callbacks = {mod.ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "last.ckpt"},
                     "instance": mod.ModelCheckpoint("val/rec_loss", "logs/last.ckpt")}
        torch.save(pl.lightning_checkpoint(sd, callbacks=callbacks, hparams=mod.AttributeDict(lr=1.0)), path)
    return path


@pytest.mark.parametrize("name", list(TT_VQS))
def test_taming_vqmodel_architecture(tmp_path, name):
    a, how = TT_VQS[name]
    sd = pl.tt_vqmodel_state(a, seed=2)
    src = save_lightning(tmp_path / "last.ckpt", sd, placeholders="placeholders" in how)
    out = tmp_path / "vq.safetensors"
    if how.startswith("yaml"):
        config = write_yaml(tmp_path / "2021-01-01T00-00-00-project.yaml", pl.tt_vqmodel_project(a))
        import_checkpoint(src, out=out, config=config)
    else:
        import_checkpoint(src, out=out, image_size=a.resolution)
    vq = vqtool.load_vq(out)

    cfg = vq.model.cfg
    assert cfg.ch == a.ch and cfg.ch_mult == a.ch_mult and cfg.resolution == a.resolution
    assert cfg.num_res_blocks == a.num_res_blocks and cfg.decoder_res_blocks in (a.num_res_blocks + 1, None)
    assert sorted(cfg.attn_resolutions) == sorted(a.attn_resolutions)
    assert (cfg.z_channels, cfg.code_dim, cfg.codebook_size) == (a.z_channels, a.embed_dim, a.n_embed)
    assert cfg.z_channels != cfg.code_dim and cfg.quant_convs and cfg.swish_before_out
    assert vq.latent_shape == (a.grid, a.grid)

    x = images(2, a.resolution, seed=4)
    with torch.no_grad():
        ref_idx, gap = pl.tt_encode(sd, a, x)
        ref_img = pl.tt_decode(sd, a, ref_idx).clamp(-1, 1)
    assert_same_codes(vq.encode(x), ref_idx, gap)
    assert_decoding_informative(ref_img)
    assert_close(vq.decode(ref_idx), ref_img)

    source = source_extra(out, "vq-model")
    assert source["format"] == "taming-transformers/vqgan" and source["sha256"] == file_sha256(src)
    assert ("loss.perceptual_loss" in source["dropped"]) == a.perceptual
    assert ("loss.logvar" in source["dropped"]) == a.logvar
    art = load_artifact(out, "vq-model")
    disc = {k[len("disc."):]: v for k, v in art.tensors.items() if k.startswith("disc.")}
    if a.disc_layers:
        model = PatchDiscriminator(a.ndf, a.disc_layers)
        model.load_state_dict(disc, strict=True)
        model.eval()
        with torch.no_grad():
            assert_close(model(x), pl.patchgan_forward(sd, "loss.discriminator.", x, a.disc_layers))
    else:
        assert not disc


# ------------------------------------------------------------------------------------------------ Taming transformer

FIRST_STAGE = pl.TTVQ(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[4], resolution=16, z_channels=16,
                      embed_dim=8, n_embed=32)
N_TOKENS = FIRST_STAGE.grid**2
TT_GPTS = {
    # name: (GPT, sos_token, n_classes, pickle placeholder objects)
    "uncond-sos5-block==N": (pl.TTGPT(vocab_size=32, block_size=N_TOKENS, n_layer=2, n_head=4, n_embd=64), 5, 0,
                             True),
    "uncond-sos3-block>N": (pl.TTGPT(vocab_size=32, block_size=N_TOKENS + 8, n_layer=1, n_head=2, n_embd=64), 3, 0,
                            False),
    "class10-block==N+1": (pl.TTGPT(vocab_size=32, block_size=N_TOKENS + 1, n_layer=2, n_head=8, n_embd=64), 0, 10,
                           False),
}


def save_transformer(tmp_path: Path, g: pl.TTGPT, sos: int = 0, n_classes: int = 0, placeholders: bool = False,
                     seed: int = 0, **project) -> tuple[dict, Path, Path]:
    sd = pl.tt_transformer_state(g, FIRST_STAGE, seed=seed)
    folder = tmp_path / "transformer"
    folder.mkdir(exist_ok=True)
    src = save_lightning(folder / "last.ckpt", sd, placeholders)
    config = write_yaml(folder / "project.yaml", pl.tt_transformer_project(g, FIRST_STAGE, sos, n_classes, **project))
    return sd, src, config


@pytest.mark.parametrize("name", list(TT_GPTS))
def test_taming_transformer_architecture(tmp_path, name):
    g, sos, n_classes, placeholders = TT_GPTS[name]
    sd, src, config = save_transformer(tmp_path, g, sos, n_classes, placeholders)
    out = tmp_path / "prior.safetensors"
    result = import_checkpoint(src, out=out, config=config)
    vq_path = tmp_path / "prior-vq.safetensors"
    assert [w.path for w in result.written] == [vq_path, out]
    vq, prior = vqtool.load_vq(vq_path), vqtool.load_prior(out)

    cfg = prior.model.cfg
    assert prior.kind == "autoregressive" and cfg.causal
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_classes) == (g.n_layer, g.n_head, g.n_embd, n_classes)
    assert prior.grid == (FIRST_STAGE.grid, FIRST_STAGE.grid) and prior.codebook_size == g.vocab_size
    assert read_metadata(out, "prior-model").parents == {"vq": file_sha256(vq_path)}
    assert vq.model.cfg.ch_mult == FIRST_STAGE.ch_mult and vq.latent_shape == prior.grid

    x = images(3, FIRST_STAGE.resolution, seed=6)
    with torch.no_grad():
        ref_idx, gap = pl.tt_encode(sd, FIRST_STAGE, x, prefix="first_stage_model.")
    assert_same_codes(vq.encode(x), ref_idx, gap)

    z = ref_idx.reshape(3, -1)
    if n_classes:
        labels = torch.tensor([0, 9, 4])
        c, ours = labels, prior.logits(ref_idx, labels=labels)
    else:
        c, ours = torch.full((3,), sos), prior.logits(ref_idx)
    with torch.no_grad():
        ref = pl.tt_transformer_logits(sd, g, z, c).reshape(3, *prior.grid, -1)
        wrong = pl.tt_transformer_logits(sd, g, z, (c + 1) % g.vocab_size).reshape(ref.shape)
    assert ref.shape == (3, *prior.grid, g.vocab_size)
    assert (ref - wrong).abs().max() > 100 * TOL  # the start / class token matters, so it is tested too
    assert_close(ours, ref)
    assert read_metadata(out, "prior-model").extra.get("sos_token") == (None if n_classes else sos)


def test_taming_transformer_reuses_its_first_stage_given_as_vq(tmp_path):
    g = pl.TTGPT(vocab_size=32, block_size=N_TOKENS, n_layer=1, n_head=4, n_embd=64)
    sd, src, config = save_transformer(tmp_path, g, sos=5)
    # The same first stage, trained and saved on its own as a VQModel (with its loss module), imported first.
    vq_sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    disc_arch = dataclasses.replace(FIRST_STAGE, disc_layers=2)
    vq_sd.update({k: v for k, v in pl.tt_vqmodel_state(disc_arch, seed=8).items() if k.startswith("loss.")})
    vq_src = save_lightning(tmp_path / "vq-last.ckpt", vq_sd)
    vq_config = write_yaml(tmp_path / "vq-project.yaml", pl.tt_vqmodel_project(disc_arch))
    vq_path = tmp_path / "vq.safetensors"
    import_checkpoint(vq_src, out=vq_path, config=vq_config)
    before = file_sha256(vq_path)

    out = tmp_path / "prior.safetensors"
    result = import_checkpoint(src, out=out, config=config, vq=vq_path)
    assert [(w.role, w.path, w.reused) for w in result.written] == [("vq", vq_path, True), ("prior", out, False)]
    assert not (tmp_path / "prior-vq.safetensors").exists()
    assert file_sha256(vq_path) == before
    assert read_metadata(out, "prior-model").parents == {"vq": before}

    prior, vq = vqtool.load_prior(out), vqtool.load_vq(vq_path)
    x = images(2, FIRST_STAGE.resolution, seed=9)
    with torch.no_grad():
        ref_idx, gap = pl.tt_encode(sd, FIRST_STAGE, x, prefix="first_stage_model.")
        ref = pl.tt_transformer_logits(sd, g, ref_idx.reshape(2, -1), torch.full((2,), 5))
    assert_same_codes(vq.encode(x), ref_idx, gap)
    assert_close(prior.logits(ref_idx), ref.reshape(2, *prior.grid, -1))


def test_taming_transformer_refuses_another_vq(tmp_path):
    g = pl.TTGPT(vocab_size=32, block_size=N_TOKENS, n_layer=1, n_head=4, n_embd=64)
    _, src, config = save_transformer(tmp_path, g, sos=5)
    other = save_lightning(tmp_path / "other.ckpt", pl.tt_vqmodel_state(FIRST_STAGE, seed=77))
    other_config = write_yaml(tmp_path / "other.yaml", pl.tt_vqmodel_project(FIRST_STAGE))
    vq_path = tmp_path / "other.safetensors"
    import_checkpoint(other, out=vq_path, config=other_config)
    out = tmp_path / "prior.safetensors"
    with pytest.raises(VqtoolError) as e:
        import_checkpoint(src, out=out, config=config, vq=vq_path)
    assert "first-stage" in refusal(e) and str(vq_path) in str(e.value)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ refusals


def test_refuses_unleashing_gumbel_quantizer(tmp_path):
    a = UT_VQGANS["nf32-2levels-no-attn"]
    src = tmp_path / "vqgan_ema_1.th"
    torch.save(pl.gumbel_quantizer(pl.ut_vqgan_state(a), a), src)
    with pytest.raises(VqtoolError) as e:
        import_checkpoint(src, out=tmp_path / "vq.safetensors", image_size=a.img_size)
    assert "Gumbel" in refusal(e)


def test_refuses_taming_gumbel_target(tmp_path):
    a = TT_VQS["ch64-3levels-1block-attn4-no-yaml"][0]
    src = save_lightning(tmp_path / "last.ckpt", pl.tt_vqmodel_state(a))
    config = write_yaml(tmp_path / "project.yaml", pl.tt_vqmodel_project(a, target="taming.models.vqgan.GumbelVQ"))
    with pytest.raises(VqtoolError) as e:
        import_checkpoint(src, out=tmp_path / "vq.safetensors", config=config)
    msg = refusal(e)
    assert "GumbelVQ" in msg and "Gumbel quantizer" in msg


@pytest.mark.parametrize("project, words", [
    ({"cond_stage_config": {"target": "taming.models.vqgan.VQModel", "params": {"embed_dim": 8, "n_embed": 32}}},
     ("taming.models.vqgan.VQModel", "conditioning")),
    ({"permuter": "taming.modules.transformer.permuter.AlphaPermuter"}, ("AlphaPermuter", "permuter")),
], ids=["segmentation-conditional", "alpha-permuter"])
def test_refuses_taming_transformer_conditioning(tmp_path, project, words):
    g = pl.TTGPT(vocab_size=32, block_size=N_TOKENS + 1, n_layer=1, n_head=4, n_embd=64)
    _, src, config = save_transformer(tmp_path, g, **project)
    out = tmp_path / "prior.safetensors"
    with pytest.raises(VqtoolError) as e:
        import_checkpoint(src, out=out, config=config)
    msg = refusal(e)
    assert all(w in msg for w in words), msg
    assert "not supported" in msg
    assert not out.exists() and not (tmp_path / "prior-vq.safetensors").exists()


@pytest.mark.parametrize("heads", [3, 128])
def test_refuses_unleashing_prior_heads_not_dividing_width(tmp_path, heads):
    src = tmp_path / "absorbing_ema_1.th"
    torch.save(pl.ut_absorbing_state(pl.UTAbsorbing(n_embd=64)), src)
    with pytest.raises(VqtoolError) as e:
        import_checkpoint(src, out=tmp_path / "prior.safetensors", heads=heads)
    msg = refusal(e)
    assert "64" in msg and str(heads) in msg and "--heads" in msg


def _ut_vqgan_file() -> dict:
    return pl.ut_vqgan_state(UT_VQGANS["nf32-2levels-no-attn"])


def _tt_vq_ckpt() -> dict:
    return pl.lightning_checkpoint(pl.tt_vqmodel_state(FIRST_STAGE))


def _tt_transformer_ckpt() -> dict:
    g = pl.TTGPT(vocab_size=32, block_size=N_TOKENS, n_layer=1, n_head=4, n_embd=64)
    return pl.lightning_checkpoint(pl.tt_transformer_state(g, FIRST_STAGE))


UNKNOWN_KEYS = {
    "ut-vqgan-encoder": (_ut_vqgan_file, "ae.encoder.extra.weight"),
    "ut-vqgan-block": (_ut_vqgan_file, "ae.generator.blocks.3.extra.weight"),
    "ut-vqgan-quantizer": (_ut_vqgan_file, "ae.quantize.extra"),
    "ut-absorbing-denoise-fn": (lambda: pl.ut_absorbing_state(pl.UTAbsorbing()), "_denoise_fn.extra.weight"),
    "ut-absorbing-block": (lambda: pl.ut_absorbing_state(pl.UTAbsorbing()), "_denoise_fn.blocks.0.attn.extra.bias"),
    "tt-vq-encoder": (_tt_vq_ckpt, "encoder.extra.weight"),
    "tt-vq-level": (_tt_vq_ckpt, "decoder.up.1.extra.weight"),
    "tt-transformer-gpt": (_tt_transformer_ckpt, "transformer.extra.weight"),
    "tt-transformer-first-stage": (_tt_transformer_ckpt, "first_stage_model.encoder.extra.weight"),
}
# Tensors outside the prefixes the converters read, at the top level of the file.
UNKNOWN_KEYS.update({
    "ut-absorbing-top-level": (lambda: pl.ut_absorbing_state(pl.UTAbsorbing()), "extra.weight"),
    "tt-transformer-top-level": (_tt_transformer_ckpt, "extra.weight"),
    "tt-transformer-cond-stage": (_tt_transformer_ckpt, "cond_stage_model.embedding.weight"),
})


@pytest.mark.parametrize("name", list(UNKNOWN_KEYS))
def test_refuses_unknown_tensor(tmp_path, name):
    make, key = UNKNOWN_KEYS[name]
    obj = make()
    (obj["state_dict"] if "state_dict" in obj else obj)[key] = torch.ones(4)
    src = tmp_path / "ckpt.pt"
    torch.save(obj, src)
    kwargs: dict = {}
    if name.startswith("ut-vqgan"):
        kwargs["image_size"] = 8
    elif name.startswith("ut-absorbing"):
        kwargs["heads"] = 4
    elif name.startswith("tt-transformer"):
        g = pl.TTGPT(vocab_size=32, block_size=N_TOKENS, n_layer=1, n_head=4, n_embd=64)
        kwargs["config"] = write_yaml(tmp_path / "project.yaml", pl.tt_transformer_project(g, FIRST_STAGE, 5))
    out = tmp_path / "out.safetensors"
    with pytest.raises(VqtoolError) as e:
        import_checkpoint(src, out=out, **kwargs)
    assert key in refusal(e)
    assert not out.exists()
