"""PatchGAN discriminator, hinge losses, the adaptive GAN weight, and the offline LPIPS wrapper."""

import pytest
import torch

from vqtool.errors import VqtoolError
from vqtool.vq.losses import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from vqtool.vq.model import VQConfig, VQModel
from vqtool.vq.perceptual import build_lpips, build_perceptual, hub_checkpoint_path


@pytest.mark.parametrize("n_layers,size,out", [(3, 32, 2), (2, 16, 2), (1, 16, 6), (3, 24, 1)])
def test_patch_discriminator_map_size(n_layers, size, out):
    d = PatchDiscriminator(ch=4, n_layers=n_layers)
    assert size >= PatchDiscriminator.min_image_size(n_layers)
    assert d(torch.randn(2, 3, size, size)).shape == (2, 1, out, out)


def test_hinge_losses_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] → mean 5/6; relu(1 + fake) = [0, 1, 2] → mean 1
    assert torch.isclose(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1.0)))
    assert torch.isclose(hinge_g_loss(fake), torch.tensor(1 / 3))


def test_adaptive_weight_against_hand_computation():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    a = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # ∇ rec = a, norm 5
    b = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # ∇ gan = 2 w ⊙ b, norm 4
    rec = (a * w).sum()
    gan = (b * w * w).sum()
    lam = adaptive_weight(rec, gan, w, max_weight=100.0)
    assert torch.isclose(lam, torch.tensor(5.0 / (4.0 + 1e-4)))
    assert not lam.requires_grad
    assert adaptive_weight((a * w).sum(), (b * w * w).sum(), w, max_weight=0.5) == 0.5
    # the graph survives for the real backward afterwards
    (rec + gan).backward()
    assert w.grad is not None


def test_adaptive_weight_at_decoder_last_layer_matches_separate_backward_passes():
    torch.manual_seed(0)
    model = VQModel(VQConfig(resolution=16, ch=8, ch_mult=[1, 2], attn_resolutions=[], z_channels=8,
                             codebook_size=16, code_dim=4))
    disc = PatchDiscriminator(ch=4, n_layers=2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    rec = (x - out.recon).abs().mean()
    gan = hinge_g_loss(disc(out.recon))
    lam = adaptive_weight(rec, gan, model.last_layer, max_weight=1e4)
    g_rec = torch.autograd.grad(rec, model.decoder.conv_out.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, model.decoder.conv_out.weight, retain_graph=True)[0]
    assert torch.isclose(lam, g_rec.norm() / (g_gan.norm() + 1e-4))


def test_perceptual_none_is_none():
    assert build_perceptual("none") is None
    with pytest.raises(VqtoolError, match="--perceptual"):
        build_perceptual("lpips-squeeze")


def test_missing_backbone_weights_fail_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(VqtoolError) as info:
        build_perceptual("lpips-vgg")
    msg = str(info.value)
    assert "\n" not in msg
    assert "vgg16-397923af.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "download.pytorch.org" in msg and "--perceptual-weights" in msg and "--perceptual none" in msg
    with pytest.raises(VqtoolError, match="file not found"):
        build_perceptual("lpips-alex", tmp_path / "nope.pth")


def _random_backbone_state(choice: str) -> dict:
    """A torchvision-style `features.<i>.*` state dict with random values, built without torchvision."""
    net = build_lpips(choice)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for _, block in net.net.named_children():
        for idx, layer in block.named_children():
            for pname, p in layer.named_parameters():
                state[f"features.{idx}.{pname}"] = torch.randn(p.shape, generator=gen) * 0.05
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_explicit_backbone_weights_are_loaded(tmp_path, suffix):
    state = _random_backbone_state("lpips-alex")
    path = tmp_path / f"alex{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    perc = build_perceptual("lpips-alex", path)
    assert torch.equal(perc.net.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(perc.net.net.slice5, "10").bias, state["features.10.bias"])
    assert all(not p.requires_grad for p in perc.parameters())
    perc.train()
    assert not perc.net.training
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert perc(y, y).item() == pytest.approx(0.0, abs=1e-7)
    d = perc(x, y)
    assert d.ndim == 0 and d.item() > 0
    d.backward()
    assert x.grad.abs().sum() > 0


def test_hub_cache_backbone_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path = hub_checkpoint_path("lpips-alex")
    path.parent.mkdir(parents=True)
    torch.save(_random_backbone_state("lpips-alex"), path)
    assert build_perceptual("lpips-alex") is not None


def test_wrong_backbone_file_is_refused(tmp_path):
    state = _random_backbone_state("lpips-alex")
    torch.save({k: v for k, v in state.items() if k.startswith("features.0.")}, tmp_path / "part.pth")
    with pytest.raises(VqtoolError, match="missing"):
        build_perceptual("lpips-alex", tmp_path / "part.pth")
    state["features.3.weight"] = torch.zeros(5, 5, 1, 1)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(VqtoolError, match="right backbone"):
        build_perceptual("lpips-alex", tmp_path / "shape.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(VqtoolError, match="state dict"):
        build_perceptual("lpips-alex", tmp_path / "list.pth")
