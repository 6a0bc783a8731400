"""The adversarial half of the VQGAN loss: PatchGAN discriminator, hinge losses, adaptive GAN weight."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def small_map_matmul_pays() -> bool:
    """Whether this CPU's oneDNN is slow at the weight gradient of small maps (see SmallMapConv2d).

    Measured on two machines: on an AVX2 CPU the discriminator's step ran 1.5–1.8× faster with the
    matmul; on an AVX-512 one (an AMD EPYC) 1.24× slower (67 against 54 ms, 16 real + 16 fake 32-px
    images), its AVX-512 convolutions being fast at these shapes too. Fixed per machine, so a resumed
    run takes the path the first one took.
    """
    return torch.backends.cpu.get_cpu_capability() != "AVX512"


class SmallMapConv2d(nn.Conv2d):
    """A Conv2d that, on CPU and when its weight is being trained, computes an output map with fewer
    positions than kernel taps as one matmul over the unfolded patches (im2col), where that pays
    (`small_map_matmul_pays`: CPUs without AVX-512).

    oneDNN's AVX2 weight gradient for such shapes, e.g. the 3×3 and 2×2 maps that end the PatchGAN on
    32-px images, runs at a fraction of its usual rate; its forward and input gradient do not, so a
    frozen weight keeps the conv. The matmul is the same sum of products. Same parameters and state
    dict as nn.Conv2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw) = self.stride, self.padding
        oh, ow = (x.shape[-2] + 2 * ph - kh) // sh + 1, (x.shape[-1] + 2 * pw - kw) // sw + 1
        trained = self.weight.requires_grad and torch.is_grad_enabled()
        if (not trained or x.device.type != "cpu" or oh * ow >= kh * kw or not small_map_matmul_pays()
                or self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros"):
            return super().forward(x)
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (B, C·kh·kw, oh·ow)
        y = self.weight.reshape(self.out_channels, -1) @ cols
        if self.bias is not None:
            y = y + self.bias[:, None]
        return y.view(x.shape[0], self.out_channels, oh, ow)


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
                SmallMapConv2d(ch * prev, ch * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ch * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(SmallMapConv2d(ch * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    @staticmethod
    def min_image_size(n_layers: int) -> int:
        # n_layers halvings, then two 4×4 stride-1 convs that each shrink the map by one.
        return 3 * 2**n_layers

    def forward(self, x: torch.Tensor, parts: int = 1) -> torch.Tensor:
        """Logits of `x`; with `parts` > 1 the batch is that many equal groups (real images, then
        reconstructions) that share every convolution but are normalised each with its own batch
        statistics, in order, as separate calls would: one pass, the same numbers."""
        if parts == 1:
            return self.main(x)
        for layer in self.main:
            if isinstance(layer, (nn.BatchNorm2d, nn.SyncBatchNorm)):  # GlobalBatchNorm2d included
                x = torch.cat([layer(group) for group in x.chunk(parts)])
            else:
                x = layer(x)
        return x


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


def generator_gradient(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    output: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float,
    scale: torch.Tensor | None = None,
    eps: float = 1e-4,
    grad_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ, the gradient of rec_loss + λ·gan_loss at the decoder's `output`), for the caller to
    backpropagate from `output` into the autoencoder.

    λ = ‖∇L_rec‖ / (‖∇L_gan‖ + eps), gradients at the decoder's last layer, clamped to [0, max_weight]: it
    balances the GAN term against reconstruction (Taming eq. 7; the clamp is Unleashing's eq. 9) and is
    detached, a weight, not something to optimise. `grad_reduce` (e.g. the mean over the ranks of a
    multi-process run) turns both gradients into those of the global batch first.

    It is computed for less work than two gradients of the losses at the last layer (the plain form,
    tests/test_vq_losses.py): both losses reach the autoencoder through `output` only,
    so each is differentiated once and only down to `output` (the discriminator's backward runs once,
    and computes no gradients of its own weights), and the two last-layer gradients come from one
    batched gradient call through the conv that made `output` (`last_layer` is its weight). `scale`
    (a GradScaler's factor) multiplies both losses first, as a scaled backward would; λ is unscaled.
    """
    factor = 1.0 if scale is None else scale
    rec_out = torch.autograd.grad(rec_loss * factor, output)[0]
    gan_out = torch.autograd.grad(gan_loss * factor, output)[0]
    both = torch.autograd.grad(output, last_layer, torch.stack([rec_out, gan_out]), retain_graph=True,
                               is_grads_batched=True)[0]
    if scale is not None:
        both = both / scale
    if grad_reduce is not None:
        both = grad_reduce(both)
    rec_grad, gan_grad = both.unbind(0)
    weight = (rec_grad.float().norm() / (gan_grad.float().norm() + eps)).clamp(0.0, max_weight).detach()
    return weight, rec_out + weight.to(rec_out.dtype) * gan_out
