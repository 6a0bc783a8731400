"""DiffAugment keeps shapes, is differentiable, reproducible from its generator, and does what it says."""

import pytest
import torch

from vqtool.vq.diffaug import POLICIES, color, cutout, diff_augment, translation


def g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", [list(POLICIES), ["color"], ["translation"], ["cutout"], []])
def test_shapes_and_gradients(policy):
    x = (torch.rand(3, 3, 16, 16) * 2 - 1).requires_grad_(True)
    y = diff_augment(x, policy, g())
    assert y.shape == x.shape
    if policy:
        (y * torch.randn_like(y)).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    else:
        assert y is x


def test_reproducible_from_generator():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.equal(diff_augment(x, POLICIES, g(5)), diff_augment(x, POLICIES, g(5)))
    assert not torch.equal(diff_augment(x, POLICIES, g(5)), diff_augment(x, POLICIES, g(6)))


def test_translation_moves_a_pixel_by_at_most_an_eighth():
    x = torch.zeros(16, 1, 16, 16)
    x[:, :, 8, 8] = 1.0
    y = translation(x, g())
    shifts = set()
    for i in range(16):
        pos = torch.nonzero(y[i, 0])
        assert pos.shape[0] == 1  # nothing lost, nothing duplicated
        dy, dx = (pos[0] - 8).tolist()
        assert abs(dy) <= 2 and abs(dx) <= 2
        shifts.add((dy, dx))
    assert len(shifts) > 1


def test_cutout_zeroes_one_half_size_square():
    x = torch.ones(8, 3, 16, 16)
    y = cutout(x, g())
    for i in range(8):
        zero = y[i, 0] == 0
        assert torch.equal(zero, (y[i] == 0).all(0))  # same square in every channel
        rows, cols = torch.nonzero(zero, as_tuple=True)
        assert 0 < zero.sum() <= 64
        assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8
        assert zero.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_color_is_per_image_affine():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    y = color(x, g())
    assert not torch.allclose(x, y)
    flat = x[0].flatten(1)  # a constant image stays constant under colour jitter
    assert flat.shape[0] == 3
    c = torch.full((1, 3, 8, 8), 0.2)
    out = color(c, g())
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))


def test_unknown_policy():
    with pytest.raises(ValueError, match="policy"):
        diff_augment(torch.zeros(1, 3, 8, 8), ["rotate"], g())
