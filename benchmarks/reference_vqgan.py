"""The VQGAN training step the way Taming Transformers' code runs it, written here for the speed table.

Structure as in the paper's code (CompVis/taming-transformers): ResNet blocks of GroupNorm(32) and
swish written as x·sigmoid(x), single-head attention with separate q/k/v 1×1 convs and two bmm,
the pix2pix PatchGAN with BatchNorm, a Euclidean nearest-code lookup, and the Lightning two-optimizer
step: for each optimizer the autoencoder forward runs again and the other optimizer's parameters stop
requiring gradients; the adaptive weight takes two extra gradients (L_rec and L_G at the decoder's last
layer, graph retained) before the backward; the discriminator sees real and reconstructed images in
two forward passes. Contiguous (NCHW) tensors, torch's default Adam. Nothing here is vqtool code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if c % 32 == 0 else c, c, eps=1e-6, affine=True)


class Res(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class Attn(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        w = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww)) * c**-0.5
        w = F.softmax(w, dim=2)
        h = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Down(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Up(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(c_in: int, c_out: int, blocks: int, attn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(blocks):
        layers.append(Res(c_in if i == 0 else c_out, c_out))
        if attn:
            layers.append(Attn(c_out))
    return layers


class TamingVQGAN(nn.Module):
    """Encoder, 1×1 conv, lookup, 1×1 conv, decoder: Taming's layout at the given sizes."""

    def __init__(self, ch: int, ch_mult: list[int], blocks: int, attn_res: list[int], z: int, codes: int,
                 dim: int, res: int):
        super().__init__()
        enc: list[nn.Module] = [nn.Conv2d(3, ch, 3, 1, 1)]
        mult = [1, *ch_mult]
        for i, m in enumerate(ch_mult):
            enc += _level(ch * mult[i], ch * m, blocks, res in attn_res)
            if i != len(ch_mult) - 1:
                enc.append(Down(ch * m))
                res //= 2
        c = ch * ch_mult[-1]
        enc += [Res(c, c), Attn(c), Res(c, c), group_norm(c)]
        self.encoder, self.enc_out = nn.Sequential(*enc), nn.Conv2d(c, z, 3, 1, 1)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(z, dim, 1), nn.Conv2d(dim, z, 1)
        self.embedding = nn.Embedding(codes, dim)
        self.embedding.weight.data.uniform_(-1.0 / codes, 1.0 / codes)
        dec: list[nn.Module] = [nn.Conv2d(z, c, 3, 1, 1), Res(c, c), Attn(c), Res(c, c)]
        for i in reversed(range(len(ch_mult))):
            dec += _level(c, ch * ch_mult[i], blocks + 1, res in attn_res)
            c = ch * ch_mult[i]
            if i != 0:
                dec.append(Up(c))
                res *= 2
        self.decoder, self.dec_norm = nn.Sequential(*dec), group_norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, 1, 1)
        self.beta = 0.25

    def forward(self, x):
        h = self.quant_conv(self.enc_out(swish(self.encoder(x))))
        z = h.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, z.shape[-1])
        e = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        z_q = self.embedding(d.argmin(1)).view(z.shape)
        q_loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        z_q = (z + (z_q - z).detach()).permute(0, 3, 1, 2).contiguous()
        return self.conv_out(swish(self.dec_norm(self.decoder(self.post_quant_conv(z_q))))), q_loss


class NLayerDisc(nn.Module):
    """pix2pix PatchGAN: conv stride 2 + LeakyReLU, then (n-1) stride-2 and one stride-1 conv+BN+LeakyReLU."""

    def __init__(self, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        m = 1
        for n in range(1, n_layers + 1):
            prev, m = m, min(2**n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * m, 4, 2 if n < n_layers else 1, 1, bias=False),
                    nn.BatchNorm2d(ndf * m), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(ndf * m, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.normal_(mod.weight, 0.0, 0.02)
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.normal_(mod.weight, 1.0, 0.02)
                nn.init.zeros_(mod.bias)

    def forward(self, x):
        return self.main(x)


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last: torch.Tensor,
                    max_weight: float) -> torch.Tensor:
    """λ as the official code computes it: two retained gradients at the last layer, their norms' ratio."""
    rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last, retain_graph=True)[0]
    return torch.clamp(torch.norm(rec_grad) / (torch.norm(gan_grad) + 1e-4), 0.0, max_weight).detach()


class TamingStep:
    """One training step, both optimizers, in the order and with the passes the official code runs."""

    def __init__(self, model: TamingVQGAN, disc: NLayerDisc, batches, lr: float = 3e-4):
        self.model, self.disc, self.batches = model, disc, batches
        self.opt_ae = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9))

    def _toggle(self, train: nn.Module, frozen: nn.Module) -> None:
        # Lightning's toggle_optimizer: only the current optimizer's parameters require gradients.
        train.requires_grad_(True)
        frozen.requires_grad_(False)

    def __call__(self) -> None:
        x = next(self.batches)
        last = self.model.conv_out.weight
        self._toggle(self.model, self.disc)
        xrec, q_loss = self.model(x)
        nll = torch.abs(x.contiguous() - xrec.contiguous()).mean()
        g_loss = -torch.mean(self.disc(xrec.contiguous()))
        d_weight = adaptive_weight(nll, g_loss, last, 1e4)
        loss = nll + d_weight * g_loss + q_loss.mean()
        self.opt_ae.zero_grad()
        loss.backward()
        self.opt_ae.step()

        self._toggle(self.disc, self.model)
        xrec, _ = self.model(x)
        logits_real = self.disc(x.contiguous().detach())
        logits_fake = self.disc(xrec.contiguous().detach())
        d_loss = 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))
        self.opt_d.zero_grad()
        d_loss.backward()
        self.opt_d.step()
