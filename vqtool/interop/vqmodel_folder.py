"""diffusers' VQModel folders (`config.json` + `diffusion_pytorch_model.safetensors`) ↔ vqtool's VQModel.

A VQModel is Taming's VQGAN under other names: per level a `DownEncoderBlock2D` (or the `Attn…` one,
a ResBlock then an attention block, as often as `layers_per_block` says), a bottleneck `mid_block`
(ResBlock, optional attention, ResBlock), `layers_per_block + 1` ResBlocks per decoder level, 1×1 convs
around a Euclidean nearest-code lookup, and SiLU after every GroupNorm. Its attention blocks hold
q, k, v and the output projection as linear layers where vqtool has 1×1 convs (q, k, v fused).

One table of parameter names (`parameter_pairs`) drives both directions, so export and import cannot
drift apart. Reading and writing the files is done here without diffusers; the tests check the result
against diffusers' own VQModel.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vqtool.errors import VqtoolError
from vqtool.interop.convert import Converted, Source, attention_resolutions, fuse_qkv, move, set_codebook
from vqtool.vq.model import VQConfig

CLASS_NAME = "VQModel"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
PICKLED_WEIGHTS_FILE = "diffusion_pytorch_model.bin"  # folders saved before safetensors became the default
FORMAT = "diffusers/VQModel"

DOWN_BLOCKS = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}  # type → has attention
UP_BLOCKS = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}

# VQModel's constructor defaults: what a config.json that leaves a field out means.
DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 3,
    "sample_size": 32,
    "num_vq_embeddings": 256,
    "norm_num_groups": 32,
    "vq_embed_dim": None,
    "scaling_factor": 0.18215,
    "norm_type": "group",
    "mid_block_add_attention": True,
    "lookup_from_codebook": False,
    "force_upcast": False,
}
# Fields that change nothing in encoding or decoding (a latent-diffusion scale, an fp16 hint, and which
# input `decode(…, force_not_quantize=True)` takes); kept in the artifact so an export writes them back.
PASSTHROUGH = ("scaling_factor", "force_upcast", "lookup_from_codebook")
# diffusers before 0.14 named the attention layers differently; its loader still renames them.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# --------------------------------------------------------------------------------------------------
# The name table


def attention_levels(cfg: VQConfig) -> list[bool]:
    """Per level (finest first), whether its blocks have attention: vqtool places it by the level's side."""
    return [cfg.resolution // 2**i in cfg.attn_resolutions for i in range(len(cfg.ch_mult))]


def parameter_pairs(cfg: VQConfig) -> Iterator[tuple[str, str, str]]:
    """(vqtool module, VQModel module, kind) for every weight-holding module except the codebook.

    kind: "same" (weight and bias alike), "linear" (a vqtool 1×1 conv is a diffusers linear layer), or
    "qkv" (vqtool's fused q/k/v conv is diffusers' to_q, to_k, to_v)."""
    mults = [1, *cfg.ch_mult]
    levels = attention_levels(cfg)
    n = len(cfg.ch_mult)
    dec_blocks = cfg.num_res_blocks + 1 if cfg.decoder_res_blocks is None else cfg.decoder_res_blocks

    yield "encoder.conv_in", "encoder.conv_in", "same"
    for i in range(n):
        c_in, c_out = cfg.ch * mults[i], cfg.ch * mults[i + 1]
        ours, theirs = f"encoder.levels.{i}", f"encoder.down_blocks.{i}"
        yield from _level(ours, theirs, c_in, c_out, cfg.num_res_blocks, levels[i])
        if i != n - 1:
            yield f"encoder.downs.{i}.conv", f"{theirs}.downsamplers.0.conv", "same"
    yield from _mid("encoder", cfg)
    yield "encoder.norm_out", "encoder.conv_norm_out", "same"
    yield "encoder.conv_out", "encoder.conv_out", "same"
    if cfg.quant_convs:
        yield "quant_conv", "quant_conv", "same"
        yield "post_quant_conv", "post_quant_conv", "same"
    yield "decoder.conv_in", "decoder.conv_in", "same"
    yield from _mid("decoder", cfg)
    c = cfg.ch * cfg.ch_mult[-1]
    for k, i in enumerate(reversed(range(n))):  # both list the decoder's levels coarsest first
        c_out = cfg.ch * cfg.ch_mult[i]
        ours, theirs = f"decoder.levels.{k}", f"decoder.up_blocks.{k}"
        yield from _level(ours, theirs, c, c_out, dec_blocks, levels[i])
        if i != 0:
            yield f"decoder.ups.{k}.conv", f"{theirs}.upsamplers.0.conv", "same"
        c = c_out
    yield "decoder.norm_out", "decoder.conv_norm_out", "same"
    yield "decoder.conv_out", "decoder.conv_out", "same"


def _level(ours: str, theirs: str, c_in: int, c_out: int, blocks: int, attention: bool):
    for j in range(blocks):
        yield from _resblock(f"{ours}.blocks.{j}", f"{theirs}.resnets.{j}", c_in if j == 0 else c_out, c_out)
        if attention:
            yield from _attention(f"{ours}.attns.{j}", f"{theirs}.attentions.{j}")


def _mid(part: str, cfg: VQConfig):
    c = cfg.ch * cfg.ch_mult[-1]
    yield from _resblock(f"{part}.mid.block1", f"{part}.mid_block.resnets.0", c, c)
    if cfg.mid_attention:
        yield from _attention(f"{part}.mid.attn", f"{part}.mid_block.attentions.0")
    yield from _resblock(f"{part}.mid.block2", f"{part}.mid_block.resnets.1", c, c)


def _resblock(ours: str, theirs: str, c_in: int, c_out: int):
    for part in ("norm1", "conv1", "norm2", "conv2"):
        yield f"{ours}.{part}", f"{theirs}.{part}", "same"
    if c_in != c_out:
        yield f"{ours}.skip", f"{theirs}.conv_shortcut", "same"


def _attention(ours: str, theirs: str):
    yield f"{ours}.norm", f"{theirs}.group_norm", "same"
    yield f"{ours}.qkv", theirs, "qkv"
    yield f"{ours}.proj", f"{theirs}.to_out.0", "linear"


def _translate(src: Source, cfg: VQConfig, to_diffusers: bool) -> dict[str, torch.Tensor]:
    """Every module of the name table, taken from `src` under one side's names, under the other's."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, kind in parameter_pairs(cfg):
        a, b = (ours, theirs) if to_diffusers else (theirs, ours)
        if kind == "same":
            move(src, out, a, b)
        elif kind == "linear":
            weight = src.take(f"{a}.weight")
            out[f"{b}.weight"] = weight.flatten(1) if to_diffusers else weight[:, :, None, None]
            out[f"{b}.bias"] = src.take(f"{a}.bias")
        elif to_diffusers:
            weights, biases = src.take(f"{a}.weight").flatten(1).chunk(3), src.take(f"{a}.bias").chunk(3)
            for name, w, bias in zip(("to_q", "to_k", "to_v"), weights, biases, strict=True):
                out[f"{b}.{name}.weight"], out[f"{b}.{name}.bias"] = w, bias
        else:
            fuse_qkv(src, out, (f"{a}.to_q", f"{a}.to_k", f"{a}.to_v"), b)
            out[f"{b}.weight"] = out[f"{b}.weight"][:, :, None, None]
    return out


# --------------------------------------------------------------------------------------------------
# vqtool → VQModel


def diffusers_config(cfg: VQConfig, passthrough: dict[str, Any], where: str) -> dict[str, Any]:
    """The config.json of `cfg`; one line naming the setting a VQModel cannot express."""
    if not cfg.swish_before_out:
        raise VqtoolError(f"{where}: swish_before_out = false (the Unleashing Transformers layout) cannot be "
                          "exported: a VQModel always applies SiLU after the last GroupNorm")
    if cfg.decoder_res_blocks is not None and cfg.decoder_res_blocks != cfg.num_res_blocks + 1:
        raise VqtoolError(f"{where}: decoder_res_blocks = {cfg.decoder_res_blocks} cannot be exported: a VQModel's "
                          f"decoder has layers_per_block + 1 = {cfg.num_res_blocks + 1} ResBlocks per level")
    if cfg.ch_mult[0] != 1:
        raise VqtoolError(f"{where}: ch_mult {list(cfg.ch_mult)} cannot be exported: a VQModel's first level is as "
                          "wide as its input conv (ch_mult must start with 1)")
    groups = {cfg.groups(c) for c in cfg.widths()}
    if len(groups) != 1:
        raise VqtoolError(f"{where}: norm_groups cannot be exported: the GroupNorms of widths {cfg.widths()} use "
                          f"{sorted(groups)} groups, and a VQModel has one norm_num_groups for all")
    config = {"_class_name": CLASS_NAME, **DEFAULTS}
    config.update({
        "down_block_types": [_block_type(DOWN_BLOCKS, a) for a in attention_levels(cfg)],
        "up_block_types": [_block_type(UP_BLOCKS, a) for a in reversed(attention_levels(cfg))],
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels,
        "sample_size": cfg.resolution,
        "num_vq_embeddings": cfg.codebook_size,
        "norm_num_groups": groups.pop(),
        "vq_embed_dim": None if cfg.code_dim == cfg.z_channels else cfg.code_dim,  # null: as wide as the latents
        "mid_block_add_attention": cfg.mid_attention,
    })
    config.update({k: passthrough[k] for k in PASSTHROUGH if k in passthrough})
    return config


def _block_type(types: dict[str, bool], attention: bool) -> str:
    return next(name for name, has in types.items() if has == attention)


def to_diffusers(state: dict[str, torch.Tensor], cfg: VQConfig, where: str) -> dict[str, torch.Tensor]:
    """vqtool's VQModel state dict → a VQModel's, every tensor accounted for.

    With the cosine lookup the stored codes are the unit vectors the lookup compares: for unit codes the
    Euclidean nearest code (diffusers' lookup) is the one of largest cosine, and those vectors are also
    what vqtool's decoder receives. Without vqtool's 1×1 convs, identity 1×1 convs take their place."""
    src = Source(state, where)
    out = _translate(src, cfg, to_diffusers=True)
    codes = src.take("quantizer.embedding")
    out["quantize.embedding.weight"] = F.normalize(codes, dim=-1) if cfg.cosine else codes
    if not cfg.quant_convs:
        eye = torch.eye(cfg.z_channels, dtype=codes.dtype)[:, :, None, None]
        for name in ("quant_conv", "post_quant_conv"):
            out[f"{name}.weight"], out[f"{name}.bias"] = eye.clone(), codes.new_zeros(cfg.z_channels)
    src.drop("quantizer.usage")  # training statistics: dead-code restarts
    src.drop("quantizer.initialized")
    src.finish()
    return {k: v.contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# VQModel folder → vqtool


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VqtoolError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise VqtoolError(f"{path}: a diffusers config must be a JSON object")
    return config


def vq_config(config: dict[str, Any], where: str, image_size: int | None) -> tuple[VQConfig, dict[str, str]]:
    """The VQConfig a VQModel config.json describes (and what was inferred); one line naming any field
    vqtool cannot model."""
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise VqtoolError(f"{where}: _class_name is {name!r}; vqtool imports diffusers' {CLASS_NAME} only")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DEFAULTS)
    if unknown:
        raise VqtoolError(f"{where}: field {unknown[0]} is not one of VQModel's that vqtool knows")
    c = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, want in (("in_channels", 3), ("out_channels", 3), ("norm_type", "group")):
        if c[key] != want:
            raise VqtoolError(f"{where}: {key} is {c[key]!r}; vqtool models {key} {want!r} only")
    if c["act_fn"] not in ("silu", "swish"):
        raise VqtoolError(f"{where}: act_fn is {c['act_fn']!r}; vqtool's VQGAN uses SiLU (act_fn 'silu')")
    widths = _ints(c, "block_out_channels", where)
    ch = widths[0]
    if any(w % ch for w in widths):
        raise VqtoolError(f"{where}: block_out_channels {widths} are not multiples of the first, which vqtool's "
                          "channel multipliers need")
    down = _block_types(c, "down_block_types", DOWN_BLOCKS, len(widths), where)
    up = _block_types(c, "up_block_types", UP_BLOCKS, len(widths), where)
    if up != down[::-1]:
        raise VqtoolError(f"{where}: up_block_types place attention at other levels than down_block_types; vqtool's "
                          "decoder mirrors its encoder")
    for key in ("mid_block_add_attention", "force_upcast", "lookup_from_codebook"):
        if not isinstance(c[key], bool):
            raise VqtoolError(f"{where}: {key} must be true or false, not {c[key]!r}")
    if isinstance(c["scaling_factor"], bool) or not isinstance(c["scaling_factor"], (int, float)):
        raise VqtoolError(f"{where}: scaling_factor must be a number, not {c['scaling_factor']!r}")
    layers = _int(c, "layers_per_block", where)
    z = _int(c, "latent_channels", where)
    code_dim = z if c["vq_embed_dim"] is None else _int(c, "vq_embed_dim", where)
    groups = _int(c, "norm_num_groups", where)
    if any(w % groups for w in widths):
        raise VqtoolError(f"{where}: norm_num_groups {groups} does not divide block_out_channels {widths}")
    inferred: dict[str, str] = {}
    if image_size is None:
        image_size = _sample_size(c["sample_size"], where)
        inferred["image_size"] = (f"{image_size} (the folder's sample_size; diffusers does not use it, so check it "
                                  "against the model's training size or set --image-size)")
    else:
        inferred["image_size"] = f"{image_size} (from --image-size; the folder's sample_size is {c['sample_size']})"
    cfg = VQConfig(resolution=image_size, ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=layers,
                   attn_resolutions=attention_resolutions(down, image_size, where), z_channels=z,
                   codebook_size=_int(c, "num_vq_embeddings", where), code_dim=code_dim, dropout=0.0,
                   cosine=False, kmeans_init=False, restart_threshold=0.0, quant_convs=True, decoder_res_blocks=None,
                   swish_before_out=True, norm_groups=groups, mid_attention=c["mid_block_add_attention"])
    try:
        cfg.validate()
    except ValueError as exc:
        raise VqtoolError(f"{where}: {exc}") from None
    return cfg, inferred


def _int(c: dict[str, Any], key: str, where: str) -> int:
    value = c[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VqtoolError(f"{where}: {key} must be a positive integer, not {value!r}")
    return value


def _ints(c: dict[str, Any], key: str, where: str) -> list[int]:
    value = c[key]
    if not isinstance(value, list) or not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                       for v in value):
        raise VqtoolError(f"{where}: {key} must be a non-empty list of positive integers, not {value!r}")
    return value


def _block_types(c: dict[str, Any], key: str, known: dict[str, bool], levels: int, where: str) -> list[bool]:
    value = c[key]
    if not isinstance(value, list) or len(value) != levels:
        raise VqtoolError(f"{where}: {key} must list one block type for each of the {levels} block_out_channels")
    for t in value:
        if t not in known:
            raise VqtoolError(f"{where}: {key} has {t!r}; vqtool models {' and '.join(known)} only")
    return [known[t] for t in value]


def _sample_size(value: Any, where: str) -> int:
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VqtoolError(f"{where}: sample_size {value!r} is not one square image side; pass --image-size")
    return value


def read_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The folder's weights file and its tensors, read without running anything from it."""
    path = folder / WEIGHTS_FILE
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return path, load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise VqtoolError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    path = folder / PICKLED_WEIGHTS_FILE
    if path.is_file():
        from vqtool.interop.torchfile import read_torch_file

        state = read_torch_file(path)
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise VqtoolError(f"{path}: holds no state dict")
        return path, state
    if (folder / f"{WEIGHTS_FILE}.index.json").exists():
        raise VqtoolError(f"{folder}: sharded weights (…safetensors.index.json) are not supported; a VQGAN fits "
                          "one file: load and save_pretrained it once with diffusers")
    raise VqtoolError(f"{folder}: no {WEIGHTS_FILE} (or {PICKLED_WEIGHTS_FILE}) beside its config.json")


def from_diffusers(state: dict[str, torch.Tensor], cfg: VQConfig,
                   where: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """A VQModel's state dict → vqtool's names, every tensor accounted for; also a note when the weights
    were not float32 (vqtool computes in float32)."""
    dtypes = {t.dtype for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    state = {_modern_name(k): v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
             for k, v in state.items()}
    src = Source(state, where)
    dst = _translate(src, cfg, to_diffusers=False)
    set_codebook(dst, src.take("quantize.embedding.weight"))
    src.finish()
    if dtypes <= {torch.float32}:
        return dst, None
    return dst, f"{', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))} weights, converted to float32"


def _modern_name(key: str) -> str:
    head, _, tail = key.rpartition(".")
    stem, _, layer = head.rpartition(".")
    if ".attentions." in key and layer in LEGACY_ATTENTION:
        return f"{stem}.{LEGACY_ATTENTION[layer]}.{tail}"
    return key


def convert_folder(folder: Path, image_size: int | None) -> tuple[Converted, Path]:
    """A VQModel folder → a vq-model `Converted`, and the weights file it was read from."""
    where = str(folder / CONFIG_FILE)
    config = read_config(folder)
    cfg, inferred = vq_config(config, where, image_size)
    weights_path, state = read_weights(folder)
    dst, dtype_note = from_diffusers(state, cfg, str(weights_path))
    if dtype_note:
        inferred["dtype"] = dtype_note
    inferred["lookup"] = "Euclidean nearest code, as diffusers' quantizer (cosine: false)"
    passthrough = {k: config.get(k, DEFAULTS[k]) for k in PASSTHROUGH}
    return Converted(kind="vq-model", config=cfg, state=dst, format=FORMAT, inferred=inferred,
                     extra={"diffusers": passthrough}), weights_path
