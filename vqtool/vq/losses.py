"""The adversarial half of the VQGAN loss: PatchGAN discriminator, hinge losses, adaptive GAN weight."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """The pix2pix PatchGAN used by Taming: `n_layers` stride-2 convs, then two stride-1 convs.

    It scores overlapping patches, returning a (B, 1, h, w) map of logits.
    """

    def __init__(self, ch: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError("disc_layers must be at least 1")
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ch * prev, ch * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ch * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ch * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    @staticmethod
    def min_image_size(n_layers: int) -> int:
        # n_layers halvings, then two 4×4 stride-1 convs that each shrink the map by one.
        return 3 * 2**n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN-style initialisation, as in Taming's discriminator.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float,
    eps: float = 1e-4,
    grad_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """λ = ‖∇L_rec‖ / (‖∇L_gan‖ + eps), gradients at the decoder's last layer, clamped to [0, max_weight].

    Balances the GAN term against reconstruction (Taming eq. 7; the clamp is Unleashing's eq. 9). The
    result is detached: λ is a weight, not something to optimise. `grad_reduce` (e.g. the mean over the
    ranks of a multi-process run) turns both gradients into those of the global batch first.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    if grad_reduce is not None:
        rec_grad, gan_grad = grad_reduce(torch.stack([rec_grad, gan_grad])).unbind(0)
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
