"""VQModel shapes through every configuration path, token round trips, and config validation."""

import dataclasses

import pytest
import torch

from vqtool.vq.model import VQConfig, VQModel


def tiny(**kw) -> VQConfig:
    base = dict(resolution=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=8,
                codebook_size=16, code_dim=4)
    base.update(kw)
    return VQConfig(**base)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"ch_mult": [1]},
        {"ch_mult": [1, 1, 2], "attn_resolutions": [16, 4]},
        {"num_res_blocks": 2, "attn_resolutions": []},
        {"cosine": False},
        {"dropout": 0.1},
        {"resolution": 32, "ch_mult": [1, 2, 2, 2], "attn_resolutions": [32, 4]},
        {"code_dim": 16, "z_channels": 12, "ch": 12},
    ],
)
def test_shapes_through_config_paths(overrides):
    torch.manual_seed(0)
    cfg = tiny(**overrides)
    model = VQModel(cfg)
    s = cfg.resolution
    x = torch.rand(2, 3, s, s) * 2 - 1
    out = model(x)
    h = s // model.downsample
    assert model.downsample == 2 ** (len(cfg.ch_mult) - 1)
    assert model.latent_shape(s) == (h, h)
    assert out.recon.shape == x.shape
    assert out.indices.shape == (2, h, h) and out.indices.dtype == torch.int64
    assert out.vectors.shape == (2 * h * h, cfg.code_dim)
    assert out.q_loss.ndim == 0 and torch.isfinite(out.q_loss)
    (out.recon.abs().mean() + out.q_loss).backward()
    assert model.encoder.conv_in.weight.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantizer.embedding.grad is not None


def test_attention_placed_at_configured_resolutions():
    model = VQModel(tiny(ch_mult=[1, 1, 1], attn_resolutions=[8]))
    # levels run at 16, 8, 4: only the middle level carries attention in the encoder
    kinds = [type(level.attns[0]).__name__ for level in model.encoder.levels]
    assert kinds == ["Identity", "AttnBlock", "Identity"]
    # the decoder walks the levels in reverse (4, 8, 16)
    kinds = [type(level.attns[0]).__name__ for level in model.decoder.levels]
    assert kinds == ["Identity", "AttnBlock", "Identity"]
    assert len(model.decoder.levels[0].blocks) == 2  # num_res_blocks + 1


def test_tokens_round_trip_and_eval_mode_consistency():
    torch.manual_seed(1)
    model = VQModel(tiny()).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        tokens = model.encode_to_tokens(x)
        out = model(x)
        assert torch.equal(tokens, out.indices)
        assert tokens.min() >= 0 and tokens.max() < model.codebook_size
        images = model.decode_tokens(tokens.to(torch.uint8))
        assert images.shape == x.shape
        assert images.min() >= -1 and images.max() <= 1
        # decoding the tokens is exactly the forward pass's reconstruction (clamped)
        assert torch.allclose(images, out.recon.clamp(-1, 1), atol=1e-5)


def test_decode_tokens_rejects_bad_tokens():
    model = VQModel(tiny()).eval()
    with pytest.raises(ValueError):
        model.decode_tokens(torch.full((1, 8, 8), 16))
    with pytest.raises(TypeError):
        model.decode_tokens(torch.zeros(1, 8, 8))


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        VQModel(tiny(resolution=18, ch_mult=[1, 2, 2]))
    with pytest.raises(ValueError):
        VQModel(tiny(ch_mult=[]))
    with pytest.raises(ValueError):
        VQModel(tiny(num_res_blocks=0))
    with pytest.raises(ValueError, match="resolution"):
        VQModel(dataclasses.replace(tiny(), resolution=None))
    with pytest.raises(ValueError):
        VQModel(tiny()).latent_shape(15)
