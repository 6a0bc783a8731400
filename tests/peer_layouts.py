"""The two papers' published checkpoint layouts, built at random, and their original forward passes.

For tests of vqtool.interop: each `*_state` function builds a state dict in the layout the official code
saves (Unleashing Transformers' `vqgan_ema_*.th` / `absorbing_ema_*.th`, Taming Transformers' VQModel and
Net2NetTransformer `last.ckpt`) for any architecture, with every tensor random so that a tensor mapped to the
wrong place changes the outputs. The other functions recompute what the official modules compute, straight
from such a state dict with torch.nn.functional, written from the papers' code structure and independent of
vqtool's own models (nothing here imports vqtool).

Weights are drawn with a fan-in scale (std = gain / sqrt(fan_in)) so that activations stay of order one
through any depth and the decoders' outputs mostly lie inside the [-1, 1] clamp; norm weights are 1 + noise,
norm biases and conv biases noise, BatchNorm running statistics random but valid.
"""

from __future__ import annotations

import math
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
State = dict[str, Tensor]


# ------------------------------------------------------------------------------------------- random tensors


class Rand:
    """Seeded random tensors in the shapes the layers need."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=self.g) * std

    def uniform(self, *shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=self.g)

    def conv(self, sd: State, key: str, c_in: int, c_out: int, k: int, bias: bool = True, gain: float = 1.0) -> None:
        sd[f"{key}.weight"] = self.normal(c_out, c_in, k, k, std=gain / math.sqrt(c_in * k * k))
        if bias:
            sd[f"{key}.bias"] = self.normal(c_out, std=0.1)

    def linear(self, sd: State, key: str, f_in: int, f_out: int, bias: bool = True, gain: float = 1.0) -> None:
        sd[f"{key}.weight"] = self.normal(f_out, f_in, std=gain / math.sqrt(f_in))
        if bias:
            sd[f"{key}.bias"] = self.normal(f_out, std=0.1)

    def norm(self, sd: State, key: str, c: int) -> None:
        sd[f"{key}.weight"] = 1.0 + self.normal(c, std=0.15)
        sd[f"{key}.bias"] = self.normal(c, std=0.15)

    def batchnorm(self, sd: State, key: str, c: int) -> None:
        self.norm(sd, key, c)
        sd[f"{key}.running_mean"] = self.normal(c, std=0.1)
        sd[f"{key}.running_var"] = self.uniform(c, lo=0.5, hi=1.5)
        sd[f"{key}.num_batches_tracked"] = torch.tensor(1234, dtype=torch.long)


# ------------------------------------------------------------------------------------------- shared layers


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def group_norm(sd: State, key: str, x: Tensor) -> Tensor:
    return F.group_norm(x, 32, sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-6)


def conv(sd: State, key: str, x: Tensor, stride: int = 1) -> Tensor:
    w = sd[f"{key}.weight"]
    return F.conv2d(x, w, sd.get(f"{key}.bias"), stride=stride, padding=w.shape[-1] // 2)


def conv_attention(sd: State, key: str, x: Tensor) -> Tensor:
    """Both papers' AttnBlock: one head over all h*w positions, 1×1 convs q, k, v, proj_out, residual."""
    h = group_norm(sd, f"{key}.norm", x)
    q, k, v = (conv(sd, f"{key}.{n}", h) for n in ("q", "k", "v"))
    b, c, hh, ww = q.shape
    q = q.reshape(b, c, hh * ww).permute(0, 2, 1)  # b, hw, c
    k = k.reshape(b, c, hh * ww)  # b, c, hw
    weights = torch.bmm(q, k) * (int(c) ** (-0.5))  # b, hw(queries), hw(keys)
    weights = F.softmax(weights, dim=2)
    v = v.reshape(b, c, hh * ww)
    out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + conv(sd, f"{key}.proj_out", out)


def downsample(sd: State, key: str, x: Tensor) -> Tensor:
    return F.conv2d(F.pad(x, (0, 1, 0, 1)), sd[f"{key}.weight"], sd[f"{key}.bias"], stride=2, padding=0)


def upsample(sd: State, key: str, x: Tensor) -> Tensor:
    return conv(sd, key, F.interpolate(x, scale_factor=2.0, mode="nearest"))


def nearest_code(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Both papers' lookup on z (B, D, H, W): (indices (B, H, W), the gap to the second-nearest code)."""
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
    idx = dist.argmin(1)
    two = dist.topk(2, dim=1, largest=False).values
    return idx.reshape(b, h, w), (two[:, 1] - two[:, 0]).reshape(b, h, w)


def lookup(codebook: Tensor, indices: Tensor) -> Tensor:
    """Indices (B, H, W) → codes (B, D, H, W)."""
    return codebook[indices].permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------- PatchGAN


def patchgan_state(sd: State, r: Rand, prefix: str, ndf: int, n_layers: int) -> None:
    """pix2pix NLayerDiscriminator with BatchNorm, as both papers build it: `{prefix}main.N.*`."""
    r.conv(sd, f"{prefix}main.0", 3, ndf, 4)
    idx, mult = 2, 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        r.conv(sd, f"{prefix}main.{idx}", ndf * prev, ndf * mult, 4, bias=False)
        r.batchnorm(sd, f"{prefix}main.{idx + 1}", ndf * mult)
        idx += 3
    r.conv(sd, f"{prefix}main.{idx}", ndf * mult, 1, 4)


def patchgan_forward(sd: State, prefix: str, x: Tensor, n_layers: int) -> Tensor:
    p = f"{prefix}main"
    x = F.leaky_relu(F.conv2d(x, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"], stride=2, padding=1), 0.2)
    idx = 2
    for n in range(1, n_layers + 1):
        x = F.conv2d(x, sd[f"{p}.{idx}.weight"], None, stride=2 if n < n_layers else 1, padding=1)
        bn = f"{p}.{idx + 1}"
        x = F.batch_norm(x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"],
                         training=False, eps=1e-5)
        x = F.leaky_relu(x, 0.2)
        idx += 3
    return F.conv2d(x, sd[f"{p}.{idx}.weight"], sd[f"{p}.{idx}.bias"], stride=1, padding=1)


def lpips_like_state(sd: State, r: Rand, prefix: str) -> None:
    """A few tensors where LPIPS keeps its weights (never used by the importer, only dropped)."""
    sd[f"{prefix}net.slice1.0.weight"] = r.normal(8, 3, 3, 3)
    sd[f"{prefix}net.slice1.0.bias"] = r.normal(8)
    sd[f"{prefix}lin0.model.1.weight"] = r.normal(1, 8, 1, 1)
    sd[f"{prefix}scaling_layer.shift"] = r.normal(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------- minGPT blocks


def gpt_blocks_state(sd: State, r: Rand, prefix: str, n_layer: int, d: int, block_size: int | None = None) -> None:
    """minGPT blocks `{prefix}blocks.N.*`; with block_size, the causal-mask buffer Taming's blocks carry."""
    for i in range(n_layer):
        b = f"{prefix}blocks.{i}"
        r.norm(sd, f"{b}.ln1", d)
        r.norm(sd, f"{b}.ln2", d)
        for name in ("key", "query", "value", "proj"):
            r.linear(sd, f"{b}.attn.{name}", d, d)
        if block_size is not None:
            sd[f"{b}.attn.mask"] = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        r.linear(sd, f"{b}.mlp.0", d, 4 * d)
        r.linear(sd, f"{b}.mlp.2", 4 * d, d)


def layer_norm(sd: State, key: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-5)


def linear(sd: State, key: str, x: Tensor) -> Tensor:
    return F.linear(x, sd[f"{key}.weight"], sd.get(f"{key}.bias"))


def gpt_block(sd: State, key: str, x: Tensor, n_head: int, causal: bool) -> Tensor:
    """minGPT's Block: x + attn(ln1(x)), then x + mlp(ln2(x)); exact GELU; causal with the stored mask."""
    B, T, C = x.shape
    h = layer_norm(sd, f"{key}.ln1", x)
    k = linear(sd, f"{key}.attn.key", h).view(B, T, n_head, C // n_head).transpose(1, 2)
    q = linear(sd, f"{key}.attn.query", h).view(B, T, n_head, C // n_head).transpose(1, 2)
    v = linear(sd, f"{key}.attn.value", h).view(B, T, n_head, C // n_head).transpose(1, 2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    if causal:
        mask = sd[f"{key}.attn.mask"][:, :, :T, :T]
        att = att.masked_fill(mask == 0, float("-inf"))
    att = F.softmax(att, dim=-1)
    y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
    x = x + linear(sd, f"{key}.attn.proj", y)
    h = layer_norm(sd, f"{key}.ln2", x)
    return x + linear(sd, f"{key}.mlp.2", F.gelu(linear(sd, f"{key}.mlp.0", h)))


# ------------------------------------------------------------------------------------------- Unleashing VQGAN


@dataclass
class UTVQGAN:
    """Hyper-parameters of Unleashing Transformers' VQGAN (its argparse names)."""

    nf: int = 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2])
    res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=lambda: [8])
    img_size: int = 16
    emb_dim: int = 16
    codebook_size: int = 48
    disc_layers: int = 0  # 0: no `disc.*` tensors
    ndf: int = 16
    logsigma: bool = False
    perceptual: bool = False

    @property
    def grid(self) -> int:
        return self.img_size // 2 ** (len(self.ch_mult) - 1)


def ut_encoder_plan(a: UTVQGAN) -> list[tuple]:
    """The official Encoder's `blocks` ModuleList, entry by entry: (kind, channels...)."""
    L = len(a.ch_mult)
    in_mult = [1, *a.ch_mult]
    blocks: list[tuple] = [("conv", 3, a.nf)]
    curr_res = a.img_size
    c = a.nf
    for i in range(L):
        c, c_out = a.nf * in_mult[i], a.nf * a.ch_mult[i]
        for _ in range(a.res_blocks):
            blocks.append(("res", c, c_out))
            c = c_out
            if curr_res in a.attn_resolutions:
                blocks.append(("attn", c))
        if i != L - 1:
            blocks.append(("down", c))
            curr_res //= 2
    blocks += [("res", c, c), ("attn", c), ("res", c, c), ("norm", c), ("conv", c, a.emb_dim)]
    return blocks


def ut_generator_plan(a: UTVQGAN) -> list[tuple]:
    """The official Generator's `blocks` ModuleList."""
    L = len(a.ch_mult)
    c = a.nf * a.ch_mult[-1]
    curr_res = a.img_size // 2 ** (L - 1)
    blocks: list[tuple] = [("conv", a.emb_dim, c), ("res", c, c), ("attn", c), ("res", c, c)]
    for i in reversed(range(L)):
        c_out = a.nf * a.ch_mult[i]
        for _ in range(a.res_blocks):
            blocks.append(("res", c, c_out))
            c = c_out
            if curr_res in a.attn_resolutions:
                blocks.append(("attn", c))
        if i != 0:
            blocks.append(("up", c))
            curr_res *= 2
    blocks += [("norm", c), ("conv", c, 3)]
    return blocks


def _ut_blocks_state(sd: State, r: Rand, head: str, plan: list[tuple], out_gain: float) -> None:
    for n, (kind, *ch) in enumerate(plan):
        key = f"{head}.{n}"
        if kind == "conv":
            r.conv(sd, key, ch[0], ch[1], 3, gain=out_gain if n == len(plan) - 1 else 1.0)
        elif kind == "res":
            c_in, c_out = ch
            r.norm(sd, f"{key}.norm1", c_in)
            r.conv(sd, f"{key}.conv1", c_in, c_out, 3)
            r.norm(sd, f"{key}.norm2", c_out)
            r.conv(sd, f"{key}.conv2", c_out, c_out, 3)
            r.conv(sd, f"{key}.conv_out", c_in, c_out, 1)  # built always, applied only when c_in != c_out
        elif kind == "attn":
            r.norm(sd, f"{key}.norm", ch[0])
            for name in ("q", "k", "v", "proj_out"):
                r.conv(sd, f"{key}.{name}", ch[0], ch[0], 1)
        elif kind in ("down", "up"):
            r.conv(sd, f"{key}.conv", ch[0], ch[0], 3)
        elif kind == "norm":
            r.norm(sd, key, ch[0])


def ut_vqgan_state(a: UTVQGAN, seed: int = 0) -> State:
    """A random `vqgan_ema_*.th` state dict of this architecture."""
    r = Rand(seed)
    sd: State = {}
    _ut_blocks_state(sd, r, "ae.encoder.blocks", ut_encoder_plan(a), out_gain=1.0)
    sd["ae.quantize.embedding.weight"] = r.normal(a.codebook_size, a.emb_dim)
    gen = ut_generator_plan(a)
    _ut_blocks_state(sd, r, "ae.generator.blocks", gen, out_gain=0.5)
    if a.logsigma:
        c = gen[-1][1]
        r.conv(sd, "ae.generator.logsigma.0", c, c, 3)
        r.conv(sd, "ae.generator.logsigma.2", c, 3, 1)
    if a.disc_layers:
        patchgan_state(sd, r, "disc.", a.ndf, a.disc_layers)
    if a.perceptual:
        lpips_like_state(sd, r, "perceptual.")
    return sd


def _ut_resblock(sd: State, key: str, x: Tensor) -> Tensor:
    c_in, c_out = sd[f"{key}.conv1.weight"].shape[1], sd[f"{key}.conv1.weight"].shape[0]
    h = conv(sd, f"{key}.conv1", swish(group_norm(sd, f"{key}.norm1", x)))
    h = conv(sd, f"{key}.conv2", swish(group_norm(sd, f"{key}.norm2", h)))
    return h + (conv(sd, f"{key}.conv_out", x) if c_in != c_out else x)


def _ut_run(sd: State, head: str, plan: list[tuple], x: Tensor) -> Tensor:
    for n, (kind, *_) in enumerate(plan):
        key = f"{head}.{n}"
        if kind == "conv":
            x = conv(sd, key, x)
        elif kind == "res":
            x = _ut_resblock(sd, key, x)
        elif kind == "attn":
            x = conv_attention(sd, key, x)
        elif kind == "down":
            x = downsample(sd, f"{key}.conv", x)
        elif kind == "up":
            x = upsample(sd, f"{key}.conv", x)
        elif kind == "norm":
            x = group_norm(sd, key, x)  # no swish after it in Unleashing's code
    return x


def ut_vqgan_encode(sd: State, a: UTVQGAN, images: Tensor) -> tuple[Tensor, Tensor]:
    """(code indices (B, h, w), gap to the second-nearest code) as the official `ae.encoder` + quantizer."""
    z = _ut_run(sd, "ae.encoder.blocks", ut_encoder_plan(a), images)
    return nearest_code(z, sd["ae.quantize.embedding.weight"])


def ut_vqgan_decode(sd: State, a: UTVQGAN, indices: Tensor) -> Tensor:
    """Images (unclamped) the official generator makes from code indices (B, h, w)."""
    codes = lookup(sd["ae.quantize.embedding.weight"], indices)
    return _ut_run(sd, "ae.generator.blocks", ut_generator_plan(a), codes)


def gumbel_quantizer(sd: State, a: UTVQGAN, seed: int = 1) -> State:
    """The same VQGAN with Unleashing's Gumbel quantizer keys instead of the nearest-neighbour codebook."""
    r = Rand(seed)
    out = {k: v for k, v in sd.items() if not k.startswith("ae.quantize.")}
    out["ae.quantize.proj.weight"] = r.normal(a.codebook_size, a.emb_dim, 1, 1)
    out["ae.quantize.proj.bias"] = r.normal(a.codebook_size)
    out["ae.quantize.embed.weight"] = r.normal(a.codebook_size, a.emb_dim)
    return out


# ------------------------------------------------------------------------------------------- Unleashing absorbing


@dataclass
class UTAbsorbing:
    codebook_size: int = 32
    n_embd: int = 64
    n_layer: int = 1
    block_size: int = 16
    T: int = 100  # total_steps: the loss-history buffers have T + 1 entries


def ut_absorbing_state(a: UTAbsorbing, seed: int = 0) -> State:
    """A random `absorbing_ema_*.th` state dict (the AbsorbingDiffusion module's)."""
    r = Rand(seed)
    d = a.n_embd
    sd: State = {
        "_denoise_fn.tok_emb.weight": r.normal(a.codebook_size + 1, d, std=0.5),
        "_denoise_fn.pos_emb": r.normal(1, a.block_size, d, std=0.5),
        "_denoise_fn.start_tok": r.normal(1, 1, d, std=0.5),
    }
    gpt_blocks_state(sd, r, "_denoise_fn.", a.n_layer, d)
    r.norm(sd, "_denoise_fn.ln_f", d)
    r.linear(sd, "_denoise_fn.head", d, a.codebook_size, bias=False)
    sd["Lt_history"] = r.uniform(a.T + 1, lo=0.1, hi=2.0)
    sd["Lt_count"] = torch.full((a.T + 1,), 7.0)
    sd["loss_history"] = r.uniform(a.T + 1, lo=0.1, hi=2.0)
    return sd


def ut_absorbing_logits(sd: State, idx: Tensor, n_head: int) -> Tensor:
    """The official bidirectional `_denoise_fn(idx)`: logits (B, N, K); idx may hold MASK = K."""
    p = "_denoise_fn."
    n = idx.shape[1]
    x = sd[f"{p}tok_emb.weight"][idx] + sd[f"{p}pos_emb"][:, :n, :]
    i = 0
    while f"{p}blocks.{i}.ln1.weight" in sd:
        x = gpt_block(sd, f"{p}blocks.{i}", x, n_head, causal=False)
        i += 1
    return F.linear(layer_norm(sd, f"{p}ln_f", x), sd[f"{p}head.weight"])


# ------------------------------------------------------------------------------------------- Taming VQModel


@dataclass
class TTVQ:
    """Taming's VQModel params: embed_dim, n_embed and the ddconfig."""

    ch: int = 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=lambda: [8])
    resolution: int = 16
    z_channels: int = 16
    embed_dim: int = 8
    n_embed: int = 40
    disc_layers: int = 0  # 0: no loss.discriminator (a DummyLoss first stage)
    ndf: int = 16
    perceptual: bool = False
    logvar: bool = False

    @property
    def grid(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    def ddconfig(self) -> dict[str, Any]:
        return {"double_z": False, "z_channels": self.z_channels, "resolution": self.resolution, "in_channels": 3,
                "out_ch": 3, "ch": self.ch, "ch_mult": list(self.ch_mult), "num_res_blocks": self.num_res_blocks,
                "attn_resolutions": list(self.attn_resolutions), "dropout": 0.0}

    def params(self) -> dict[str, Any]:
        if self.disc_layers:
            loss = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 10000,
                               "disc_weight": 0.8, "codebook_weight": 1.0, "disc_num_layers": self.disc_layers,
                               "disc_ndf": self.ndf}}
        else:
            loss = {"target": "taming.modules.losses.vqperceptual.DummyLoss"}
        return {"embed_dim": self.embed_dim, "n_embed": self.n_embed, "ddconfig": self.ddconfig(),
                "lossconfig": loss}


def _tt_resblock_state(sd: State, r: Rand, key: str, c_in: int, c_out: int) -> None:
    r.norm(sd, f"{key}.norm1", c_in)
    r.conv(sd, f"{key}.conv1", c_in, c_out, 3)
    r.norm(sd, f"{key}.norm2", c_out)
    r.conv(sd, f"{key}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        r.conv(sd, f"{key}.nin_shortcut", c_in, c_out, 1)


def _tt_attn_state(sd: State, r: Rand, key: str, c: int) -> None:
    r.norm(sd, f"{key}.norm", c)
    for name in ("q", "k", "v", "proj_out"):
        r.conv(sd, f"{key}.{name}", c, c, 1)


def _tt_mid_state(sd: State, r: Rand, key: str, c: int) -> None:
    _tt_resblock_state(sd, r, f"{key}.mid.block_1", c, c)
    _tt_attn_state(sd, r, f"{key}.mid.attn_1", c)
    _tt_resblock_state(sd, r, f"{key}.mid.block_2", c, c)


def tt_vqmodel_state(a: TTVQ, seed: int = 0, prefix: str = "") -> State:
    """A random Taming VQModel state dict (keys under `prefix`, e.g. `first_stage_model.`)."""
    r = Rand(seed)
    sd: State = {}
    p = prefix
    L = len(a.ch_mult)
    in_mult = [1, *a.ch_mult]
    r.conv(sd, f"{p}encoder.conv_in", 3, a.ch, 3)
    curr_res = a.resolution
    c = a.ch
    for i in range(L):
        c, c_out = a.ch * in_mult[i], a.ch * a.ch_mult[i]
        for j in range(a.num_res_blocks):
            _tt_resblock_state(sd, r, f"{p}encoder.down.{i}.block.{j}", c, c_out)
            c = c_out
            if curr_res in a.attn_resolutions:
                _tt_attn_state(sd, r, f"{p}encoder.down.{i}.attn.{j}", c)
        if i != L - 1:
            r.conv(sd, f"{p}encoder.down.{i}.downsample.conv", c, c, 3)
            curr_res //= 2
    _tt_mid_state(sd, r, f"{p}encoder", c)
    r.norm(sd, f"{p}encoder.norm_out", c)
    r.conv(sd, f"{p}encoder.conv_out", c, a.z_channels, 3)

    c = a.ch * a.ch_mult[-1]
    curr_res = a.resolution // 2 ** (L - 1)
    r.conv(sd, f"{p}decoder.conv_in", a.z_channels, c, 3)
    _tt_mid_state(sd, r, f"{p}decoder", c)
    for i in reversed(range(L)):
        c_out = a.ch * a.ch_mult[i]
        for j in range(a.num_res_blocks + 1):
            _tt_resblock_state(sd, r, f"{p}decoder.up.{i}.block.{j}", c, c_out)
            c = c_out
            if curr_res in a.attn_resolutions:
                _tt_attn_state(sd, r, f"{p}decoder.up.{i}.attn.{j}", c)
        if i != 0:
            r.conv(sd, f"{p}decoder.up.{i}.upsample.conv", c, c, 3)
            curr_res *= 2
    r.norm(sd, f"{p}decoder.norm_out", c)
    r.conv(sd, f"{p}decoder.conv_out", c, 3, 3, gain=0.5)

    if a.logvar:
        sd[f"{p}loss.logvar"] = torch.zeros(())
    if a.perceptual:
        lpips_like_state(sd, r, f"{p}loss.perceptual_loss.")
    if a.disc_layers:
        patchgan_state(sd, r, f"{p}loss.discriminator.", a.ndf, a.disc_layers)
    sd[f"{p}quantize.embedding.weight"] = r.normal(a.n_embed, a.embed_dim)
    r.conv(sd, f"{p}quant_conv", a.z_channels, a.embed_dim, 1)
    r.conv(sd, f"{p}post_quant_conv", a.embed_dim, a.z_channels, 1)
    return sd


def _tt_resblock(sd: State, key: str, x: Tensor) -> Tensor:
    h = conv(sd, f"{key}.conv1", swish(group_norm(sd, f"{key}.norm1", x)))
    h = conv(sd, f"{key}.conv2", swish(group_norm(sd, f"{key}.norm2", h)))
    if x.shape[1] != h.shape[1]:
        x = conv(sd, f"{key}.nin_shortcut", x)
    return x + h


def _tt_mid(sd: State, key: str, h: Tensor) -> Tensor:
    h = _tt_resblock(sd, f"{key}.mid.block_1", h)
    h = conv_attention(sd, f"{key}.mid.attn_1", h)
    return _tt_resblock(sd, f"{key}.mid.block_2", h)


def tt_encoder(sd: State, a: TTVQ, x: Tensor, prefix: str = "") -> Tensor:
    p = f"{prefix}encoder"
    L = len(a.ch_mult)
    h = conv(sd, f"{p}.conv_in", x)
    curr_res = a.resolution
    for i in range(L):
        for j in range(a.num_res_blocks):
            h = _tt_resblock(sd, f"{p}.down.{i}.block.{j}", h)
            if curr_res in a.attn_resolutions:
                h = conv_attention(sd, f"{p}.down.{i}.attn.{j}", h)
        if i != L - 1:
            h = downsample(sd, f"{p}.down.{i}.downsample.conv", h)
            curr_res //= 2
    h = _tt_mid(sd, p, h)
    return conv(sd, f"{p}.conv_out", swish(group_norm(sd, f"{p}.norm_out", h)))


def tt_decoder(sd: State, a: TTVQ, z: Tensor, prefix: str = "") -> Tensor:
    p = f"{prefix}decoder"
    L = len(a.ch_mult)
    h = conv(sd, f"{p}.conv_in", z)
    h = _tt_mid(sd, p, h)
    curr_res = a.resolution // 2 ** (L - 1)
    for i in reversed(range(L)):
        for j in range(a.num_res_blocks + 1):
            h = _tt_resblock(sd, f"{p}.up.{i}.block.{j}", h)
            if curr_res in a.attn_resolutions:
                h = conv_attention(sd, f"{p}.up.{i}.attn.{j}", h)
        if i != 0:
            h = upsample(sd, f"{p}.up.{i}.upsample.conv", h)
            curr_res *= 2
    return conv(sd, f"{p}.conv_out", swish(group_norm(sd, f"{p}.norm_out", h)))


def tt_encode(sd: State, a: TTVQ, images: Tensor, prefix: str = "") -> tuple[Tensor, Tensor]:
    """(code indices (B, h, w), gap to the second-nearest code): quant_conv(encoder(x)), nearest code."""
    z = conv(sd, f"{prefix}quant_conv", tt_encoder(sd, a, images, prefix))
    return nearest_code(z, sd[f"{prefix}quantize.embedding.weight"])


def tt_decode(sd: State, a: TTVQ, indices: Tensor, prefix: str = "") -> Tensor:
    codes = lookup(sd[f"{prefix}quantize.embedding.weight"], indices)
    return tt_decoder(sd, a, conv(sd, f"{prefix}post_quant_conv", codes), prefix)


def tt_vqmodel_project(a: TTVQ, target: str = "taming.models.vqgan.VQModel") -> dict[str, Any]:
    return {"model": {"base_learning_rate": 4.5e-6, "target": target, "params": a.params()},
            "data": {"target": "main.DataModuleFromConfig", "params": {"batch_size": 4, "num_workers": 2}}}


# ------------------------------------------------------------------------------------------- Taming transformer


@dataclass
class TTGPT:
    vocab_size: int
    block_size: int
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64


def tt_transformer_state(g: TTGPT, vq: TTVQ, seed: int = 0, vq_seed: int | None = None) -> State:
    """A random Net2NetTransformer state dict: its first stage under `first_stage_model.` and the GPT."""
    sd = tt_vqmodel_state(vq, seed if vq_seed is None else vq_seed, prefix="first_stage_model.")
    r = Rand(seed + 1000)
    d = g.n_embd
    sd["transformer.tok_emb.weight"] = r.normal(g.vocab_size, d, std=0.5)
    sd["transformer.pos_emb"] = r.normal(1, g.block_size, d, std=0.5)
    gpt_blocks_state(sd, r, "transformer.", g.n_layer, d, block_size=g.block_size)
    r.norm(sd, "transformer.ln_f", d)
    r.linear(sd, "transformer.head", d, g.vocab_size, bias=False)
    return sd


def tt_transformer_logits(sd: State, g: TTGPT, z_indices: Tensor, c_indices: Tensor) -> Tensor:
    """Net2NetTransformer.forward's logits (B, N, V): position i predicts z_i from c and z_<i.

    c_indices (B,) is the start token (sos_token) of an unconditional model or the class of a
    class-conditional one; the GPT sees cz[:, :-1] with cz = [c, z].
    """
    cz = torch.cat([c_indices.reshape(-1, 1), z_indices], dim=1)
    idx = cz[:, :-1]
    t = idx.shape[1]
    assert t <= g.block_size, "Cannot forward, model block size is exhausted."
    x = sd["transformer.tok_emb.weight"][idx] + sd["transformer.pos_emb"][:, :t, :]
    for i in range(g.n_layer):
        x = gpt_block(sd, f"transformer.blocks.{i}", x, g.n_head, causal=True)
    logits = F.linear(layer_norm(sd, "transformer.ln_f", x), sd["transformer.head.weight"])
    return logits[:, c_indices.reshape(-1, 1).shape[1] - 1:]


def tt_transformer_project(g: TTGPT, vq: TTVQ, sos_token: int = 0, n_classes: int = 0,
                           cond_stage_config: Any = None, permuter: str | None = None) -> dict[str, Any]:
    """The `*-project.yaml` of a Net2NetTransformer: unconditional (sos_token) or class-conditional."""
    first = {"target": "taming.models.vqgan.VQModel", "params": {**vq.params(),
             "lossconfig": {"target": "taming.modules.losses.DummyLoss"}}}
    if cond_stage_config is None:
        cond_stage_config = ({"target": "taming.modules.util.Labelator", "params": {"n_classes": n_classes}}
                             if n_classes else "__is_unconditional__")
    params: dict[str, Any] = {
        "cond_stage_key": "class_label" if n_classes else "image",
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                               "params": {"vocab_size": g.vocab_size, "block_size": g.block_size,
                                          "n_layer": g.n_layer, "n_head": g.n_head, "n_embd": g.n_embd}},
        "first_stage_config": first,
        "cond_stage_config": cond_stage_config,
    }
    if not n_classes:
        params["sos_token"] = sos_token
    if permuter is not None:
        params["permuter_config"] = {"target": permuter}
    return {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.cond_transformer.Net2NetTransformer",
                      "params": params}}


# ------------------------------------------------------------------------------------------- Lightning files


THROWAWAY_MODULE = "peer_layouts_throwaway_callbacks"


@contextmanager
def throwaway_classes():
    """A module that exists only while a checkpoint is pickled: its classes' objects reach the file by name,
    and the module is gone again before anything reads the file (as pytorch_lightning is for vqtool)."""
    mod = types.ModuleType(THROWAWAY_MODULE)
    exec(
        "class ModelCheckpoint:\n"
        "    def __init__(self, monitor, path):\n"
        "        self.monitor = monitor\n"
        "        self.best_model_path = path\n"
        "        self.best_model_score = None\n"
        "class AttributeDict(dict):\n"
        "    pass\n",
        mod.__dict__,
    )
    sys.modules[THROWAWAY_MODULE] = mod
    try:
        yield mod
    finally:
        del sys.modules[THROWAWAY_MODULE]


def lightning_checkpoint(state_dict: State, callbacks: dict | None = None, **more: Any) -> dict[str, Any]:
    """What PyTorch Lightning 1.0.8's ModelCheckpoint saves: weights plus trainer state."""
    first, r = next(iter(state_dict.values())), Rand(99)
    adam = {
        "state": {0: {"step": 10, "exp_avg": r.normal(*first.shape), "exp_avg_sq": r.uniform(*first.shape)},
                  1: {"step": 10, "exp_avg": r.normal(3), "exp_avg_sq": r.uniform(3)}},
        "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "eps": 1e-8, "weight_decay": 0, "amsgrad": False,
                          "params": [0, 1]}],
    }
    if callbacks is None:
        callbacks = {"ModelCheckpoint": {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.123),
                                         "best_model_path": "logs/checkpoints/last.ckpt"}}
    return {"epoch": 1, "global_step": 10, "pytorch-lightning_version": "1.0.8", "state_dict": state_dict,
            "callbacks": callbacks, "optimizer_states": [adam], "lr_schedulers": [], **more}
