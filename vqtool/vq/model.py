"""The VQGAN autoencoder of Taming Transformers: convolutional encoder, quantizer, convolutional decoder.

Encoder: conv in → per level `num_res_blocks` ResNet blocks (GroupNorm, swish), self-attention where
the feature map's side is in `attn_resolutions`, a stride-2 downsample between levels → bottleneck
(ResNet, attention, ResNet) → GroupNorm, swish, conv to `z_channels`. A 1×1 conv maps into the
`code_dim`-dimensional lookup space; another maps the codes back. The decoder mirrors the encoder with
`num_res_blocks + 1` blocks per level and nearest-neighbour upsampling.

Three switches describe the Unleashing Transformers variant of the same network, so its published
checkpoints load into this one model (vqtool/interop): no 1×1 convs around the lookup (`quant_convs`),
`num_res_blocks` decoder blocks per level (`decoder_res_blocks`), and no swish between the last
GroupNorm and the output conv (`swish_before_out`). Two more describe diffusers' VQModel folders: one
GroupNorm group count for every width (`norm_groups`) and bottlenecks without attention
(`mid_attention`). The defaults are Taming's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vqtool.precision import full_precision
from vqtool.vq.quantize import QuantizerOutput, VectorQuantizer


@dataclass
class VQConfig:
    resolution: int | None = None  # image side the attention placement is planned for (set from the data)
    ch: int = 64
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=lambda: [8])
    z_channels: int = 64
    codebook_size: int = 512
    code_dim: int = 32
    dropout: float = 0.0
    beta: float = 0.25
    quant_convs: bool = True  # 1×1 convs into and out of the lookup space (Taming); False needs code_dim == z_channels
    decoder_res_blocks: int | None = None  # blocks per decoder level; None: num_res_blocks + 1 (Taming)
    swish_before_out: bool = True  # swish after the last GroupNorm of encoder and decoder (Taming)
    norm_groups: int | None = None  # GroupNorm groups at every width; None: the largest divisor ≤ 32 of each width
    mid_attention: bool = True  # self-attention between the two bottleneck ResBlocks
    # codebook-collapse remedies (see vqtool/vq/quantize.py); defaults chosen by measurement (docs/recipes.md)
    cosine: bool = True
    kmeans_init: bool = False
    restart_threshold: float = 0.1  # restart codes used at < this × the uniform share; 0 turns restarts off
    usage_decay: float = 0.99

    def validate(self) -> None:
        if not self.ch_mult:
            raise ValueError("vq.ch_mult must list at least one level")
        if min(self.ch, self.z_channels, self.code_dim, self.num_res_blocks, *self.ch_mult) < 1:
            raise ValueError("vq.ch, vq.ch_mult, vq.num_res_blocks, vq.z_channels and vq.code_dim must be positive")
        if self.codebook_size < 2:
            raise ValueError("vq.codebook_size must be at least 2")
        if not self.quant_convs and self.code_dim != self.z_channels:
            raise ValueError("vq.quant_convs = false needs vq.code_dim equal to vq.z_channels")
        groups = self.norm_groups
        if groups is not None and (groups < 1 or any(c % groups for c in self.widths())):
            raise ValueError(f"vq.norm_groups {groups} must divide every channel width {self.widths()}")
        if self.decoder_res_blocks is not None and self.decoder_res_blocks < 1:
            raise ValueError("vq.decoder_res_blocks must be positive (or null for num_res_blocks + 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("vq.dropout must be in [0, 1)")
        if self.resolution is not None and self.resolution % (2 ** (len(self.ch_mult) - 1)):
            raise ValueError(
                f"image size {self.resolution} is not divisible by the downsampling factor "
                f"{2 ** (len(self.ch_mult) - 1)} of vq.ch_mult {self.ch_mult}"
            )

    def widths(self) -> list[int]:
        """The channel counts the network normalises: the input conv's and each level's, without repeats."""
        return sorted({self.ch, *(self.ch * m for m in self.ch_mult)})

    def groups(self, channels: int) -> int:
        return self.norm_groups if self.norm_groups is not None else _groups(channels)


def _groups(channels: int) -> int:
    # Taming uses 32 groups; tiny test models have fewer channels, so take the largest divisor ≤ 32.
    for g in range(min(32, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def norm(channels: int, groups: int | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(groups or _groups(channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0, groups: int | None = None):
        super().__init__()
        self.norm1 = norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, groups: int | None = None):
        super().__init__()
        self.norm = norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in Taming: exact halving


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The blocks of one resolution level, each followed by attention when the level asks for it."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, attention: bool, dropout: float,
                 groups: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attns = nn.ModuleList()
        for i in range(n_blocks):
            self.blocks.append(ResnetBlock(c_in if i == 0 else c_out, c_out, dropout, groups))
            self.attns.append(AttnBlock(c_out, groups) if attention else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, attn in zip(self.blocks, self.attns, strict=True):
            x = attn(block(x))
        return x


class Bottleneck(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int | None = None, attention: bool = True):
        super().__init__()
        self.block1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attn(self.block1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        res = cfg.resolution
        mults = [1, *cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, m in enumerate(cfg.ch_mult):
            self.levels.append(Level(cfg.ch * mults[i], cfg.ch * m, cfg.num_res_blocks,
                                     res in cfg.attn_resolutions, cfg.dropout, cfg.norm_groups))
            last = i == len(cfg.ch_mult) - 1
            self.downs.append(nn.Identity() if last else Downsample(cfg.ch * m))
            if not last:
                res //= 2
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid = Bottleneck(c, cfg.dropout, cfg.norm_groups, cfg.mid_attention)
        self.norm_out = norm(c, cfg.norm_groups)
        self.swish_out = cfg.swish_before_out
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in zip(self.levels, self.downs, strict=True):
            h = down(level(h))
        return self.conv_out(_out_activation(self.norm_out(self.mid(h)), self.swish_out))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        res = cfg.resolution // 2 ** (n - 1)
        c = cfg.ch * cfg.ch_mult[-1]
        blocks = cfg.num_res_blocks + 1 if cfg.decoder_res_blocks is None else cfg.decoder_res_blocks
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = Bottleneck(c, cfg.dropout, cfg.norm_groups, cfg.mid_attention)
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i in reversed(range(n)):
            c_out = cfg.ch * cfg.ch_mult[i]
            self.levels.append(Level(c, c_out, blocks, res in cfg.attn_resolutions, cfg.dropout, cfg.norm_groups))
            c = c_out
            self.ups.append(Upsample(c) if i != 0 else nn.Identity())
            if i != 0:
                res *= 2
        self.norm_out = norm(c, cfg.norm_groups)
        self.swish_out = cfg.swish_before_out
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level, up in zip(self.levels, self.ups, strict=True):
            h = up(level(h))
        return self.conv_out(_out_activation(self.norm_out(h), self.swish_out))


def _out_activation(h: torch.Tensor, swish: bool) -> torch.Tensor:
    return F.silu(h) if swish else h


@dataclass
class VQOutput:
    recon: torch.Tensor  # (B, 3, S, S), not clamped (the losses see the raw decoder output)
    q_loss: torch.Tensor
    indices: torch.Tensor  # (B, h, w)
    vectors: torch.Tensor  # lookup-space encoder outputs (detached), for dead-code restarts


class VQModel(nn.Module):
    """Encoder → 1×1 conv → quantizer → 1×1 conv → decoder (the convs optional, see VQConfig).

    No I/O; see vqtool/vq/store.py for files."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        if cfg.resolution is None:
            raise ValueError("VQConfig.resolution must be set (the training image size)")
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1) if cfg.quant_convs else nn.Identity()
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, beta=cfg.beta, cosine=cfg.cosine,
                                         usage_decay=cfg.usage_decay)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1) if cfg.quant_convs else nn.Identity()
        self.decoder = Decoder(cfg)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.cfg.ch_mult) - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int]:
        if image_size % self.downsample:
            raise ValueError(f"image size {image_size} is not divisible by the VQ's downsampling {self.downsample}")
        side = image_size // self.downsample
        return side, side

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight, where the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images → continuous pre-quantization vectors (B, code_dim, h, w)."""
        return self.quant_conv(self.encoder(x))

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(z)

    def decode_codes(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> VQOutput:
        q = self.quantizer(self.encode(x))
        return VQOutput(recon=self.decode_codes(q.z_q), q_loss=q.loss, indices=q.indices, vectors=q.vectors)

    def encode_to_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] → code indices (B, h, w) int64."""
        z = self.encode(images)
        b, d, h, w = z.shape
        with full_precision(z.device):
            flat = self.quantizer._prepare(z.float().permute(0, 2, 3, 1).reshape(-1, d))
            return self.quantizer.nearest(flat).reshape(b, h, w)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w), any integer dtype → images (B, 3, S, S) clamped to [-1, 1]."""
        if tokens.dtype.is_floating_point:
            raise TypeError("decode_tokens expects integer token indices")
        t = tokens.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.codebook_size):
            raise ValueError(f"token indices must lie in [0, {self.codebook_size})")
        return self.decode_codes(self.quantizer.embed(t)).clamp(-1, 1)
