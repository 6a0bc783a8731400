"""PatchGAN discriminator, hinge losses, the adaptive GAN weight, and the offline LPIPS wrapper."""

import pytest
import torch

from vqtool.errors import VqtoolError
from vqtool.vq.losses import PatchDiscriminator, generator_gradient, hinge_d_loss, hinge_g_loss
from vqtool.vq.model import VQConfig, VQModel
from vqtool.vq.perceptual import build_lpips, build_perceptual, hub_checkpoint_path


def adaptive_weight(rec_loss, gan_loss, last_layer, max_weight, eps=1e-4):
    """λ in its plain form, as Taming's code computes it: two gradients at the last layer, the ratio of
    their norms, clamped. The reference `generator_gradient` is checked against."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + eps)).clamp(0.0, max_weight).detach()

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


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5, atol: float = 1e-7) -> bool:
    """Equal up to float rounding: the difference is tiny next to the tensor as a whole (`atol` for
    gradients that are zero but for rounding, e.g. of a conv bias right before a GroupNorm)."""
    return float((a - b).norm()) <= tol * float(b.norm()) + atol


def _tiny_pair(seed: int = 0):
    torch.manual_seed(seed)
    model = VQModel(VQConfig(resolution=16, ch=8, ch_mult=[1, 2], attn_resolutions=[8], z_channels=8,
                             codebook_size=16, code_dim=4))
    disc = PatchDiscriminator(ch=8, n_layers=2)
    return model, disc


@pytest.mark.parametrize("scale", [None, 1024.0])
def test_generator_gradient_matches_the_plain_backward(scale):
    """λ and every autoencoder gradient equal those of backward(rec + λ·gan + q) with λ from two
    last-layer gradients (Taming's formula); the discriminator gets no gradients of its own."""
    model, disc = _tiny_pair()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    out = model(x)
    rec, gan = (x - out.recon).abs().mean(), hinge_g_loss(disc(out.recon))
    lam = adaptive_weight(rec, gan, model.last_layer, max_weight=1e4)
    (rec + lam * gan + out.q_loss).backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    disc.zero_grad(set_to_none=True)

    factor = None if scale is None else torch.tensor(scale)
    out = model(x)
    rec, gan = (x - out.recon).abs().mean(), hinge_g_loss(disc(out.recon))
    lam2, grad = generator_gradient(rec, gan, out.recon, model.last_layer, max_weight=1e4, scale=factor)
    torch.autograd.backward([out.recon, out.q_loss * (1.0 if scale is None else scale)], [grad, None])
    assert torch.allclose(lam2, lam, rtol=1e-5)
    assert not lam2.requires_grad
    for k, p in model.named_parameters():
        assert _close(p.grad / (scale or 1.0), plain[k]), k
    assert all(p.grad is None for p in disc.parameters())
    # the clamp applies as in adaptive_weight
    out = model(x)
    rec, gan = (x - out.recon).abs().mean(), hinge_g_loss(disc(out.recon))
    assert generator_gradient(rec, gan, out.recon, model.last_layer, max_weight=1e-3)[0] == pytest.approx(1e-3)


def test_discriminator_one_pass_over_two_groups_equals_two_calls():
    torch.manual_seed(0)
    one, two = PatchDiscriminator(ch=8, n_layers=2), PatchDiscriminator(ch=8, n_layers=2)
    two.load_state_dict(one.state_dict())
    real, fake = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16) + 0.5
    lr, lf = one(torch.cat([real, fake]), parts=2).chunk(2)
    hinge_d_loss(lr, lf).backward()
    r, f = two(real), two(fake)
    hinge_d_loss(r, f).backward()
    assert torch.allclose(lr, r, atol=1e-5) and torch.allclose(lf, f, atol=1e-5)
    # each group normalised with its own statistics, the running ones updated real first, then fake
    for (k, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    for (k, a), b in zip(one.named_parameters(), two.parameters(), strict=True):
        assert _close(a.grad, b.grad), k
    assert not torch.allclose(one(torch.cat([real, fake])), torch.cat([lr, lf]), atol=1e-3)  # one group differs


@pytest.mark.parametrize("size,stride,memory", [(4, 1, "contiguous_format"), (4, 1, "channels_last"),
                                                (3, 1, "contiguous_format"), (8, 2, "contiguous_format"),
                                                (16, 2, "channels_last")])
def test_small_map_conv_equals_conv2d(size, stride, memory, monkeypatch):
    from torch import nn

    from vqtool.vq import losses
    from vqtool.vq.losses import SmallMapConv2d

    monkeypatch.setattr(losses, "small_map_matmul_pays", lambda: True)  # the matmul path on any CPU
    calls = []
    unfold = torch.nn.functional.unfold
    monkeypatch.setattr(torch.nn.functional, "unfold", lambda *a, **k: calls.append(1) or unfold(*a, **k))
    torch.manual_seed(0)
    fast, plain = SmallMapConv2d(16, 24, 4, stride=stride, padding=1), nn.Conv2d(16, 24, 4, stride=stride, padding=1)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(3, 16, size, size).contiguous(memory_format=getattr(torch, memory))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fast(xa), plain(xb)
    assert ya.shape == yb.shape and torch.allclose(ya, yb, atol=1e-5)
    g = torch.randn_like(yb)
    ya.backward(g)
    yb.backward(g)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    assert torch.allclose(fast.weight.grad, plain.weight.grad, atol=1e-4)
    assert torch.allclose(fast.bias.grad, plain.bias.grad, atol=1e-4)
    out = (size + 2 - 4) // stride + 1
    assert bool(calls) == (out * out < 16)  # the matmul only for maps with fewer positions than taps
    calls.clear()
    fast.requires_grad_(False)  # a frozen weight (the generator's step) keeps oneDNN's conv
    assert torch.allclose(fast(x), yb, atol=1e-5) and not calls
    with torch.no_grad():
        fast.requires_grad_(True)
        assert torch.allclose(fast(x), yb, atol=1e-5) and not calls


def test_small_map_conv_keeps_the_conv_where_the_matmul_does_not_pay(monkeypatch):
    from vqtool.vq import losses

    calls = []
    unfold = torch.nn.functional.unfold
    monkeypatch.setattr(torch.nn.functional, "unfold", lambda *a, **k: calls.append(1) or unfold(*a, **k))
    monkeypatch.setattr(losses, "small_map_matmul_pays", lambda: False)
    conv = losses.SmallMapConv2d(16, 24, 4, stride=1, padding=1)
    conv(torch.randn(2, 16, 3, 3)).sum().backward()  # a 2×2 map: the matmul's shape, were it to pay
    assert not calls and conv.weight.grad is not None


def test_small_map_matmul_pays_only_without_avx512(monkeypatch):
    from vqtool.vq import losses

    for capability, pays in (("AVX512", False), ("AVX2", True), ("DEFAULT", True)):
        losses.small_map_matmul_pays.cache_clear()
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert losses.small_map_matmul_pays() is pays
    losses.small_map_matmul_pays.cache_clear()
