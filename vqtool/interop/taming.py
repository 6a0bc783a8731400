"""Taming Transformers' checkpoints: the Lightning `last.ckpt` of a VQModel or a Net2NetTransformer.

The weights sit in the checkpoint's `state_dict`; the hyper-parameters in the `*-project.yaml` saved
beside it. The architecture is read off the tensors (levels, blocks, channels, attention, codebook) and
checked against the YAML where one is given; the YAML adds what tensors cannot show (the training
resolution, the head count, the start token, the conditioning).

The GPT is minGPT: one token table shared by the image codes and the conditioning token in front
(the start-of-sequence id of an unconditional model, or the class id of a class-conditional one), and
learned positions counted from that token. vqtool's transformer keeps a separate prefix table without
a position, so the prefix rows are folded in as table[id] + position[0]; token i moves to position
row i (the file's i + 1). The last token is never an input of a causal model, so when the file has no
position for it the row is zero and changes nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from vqtool.errors import VqtoolError
from vqtool.interop.convert import (
    Converted,
    Source,
    attention_resolutions,
    check_heads,
    conv_attention,
    discriminator,
    gpt_blocks,
    move,
    set_codebook,
)
from vqtool.prior.transformer import TransformerConfig
from vqtool.vq.model import VQConfig

# The VQGAN's layers outside the levels and middle blocks: named alike in Taming and in vqtool.
_SAME_NAMES = (*(f"{side}.{layer}" for side in ("encoder", "decoder") for layer in ("conv_in", "norm_out", "conv_out")),
               "quant_conv", "post_quant_conv")
VQ_TARGET = "taming.models.vqgan.VQModel"
GPT_TARGET = "taming.models.cond_transformer.Net2NetTransformer"
UNSUPPORTED_TARGETS = {
    "taming.models.vqgan.GumbelVQ": "the Gumbel quantizer",
    "taming.models.vqgan.VQSegmentationModel": "a segmentation-map VQ",
    "taming.models.vqgan.VQNoDiscModel": None,  # same network as VQModel, no discriminator
    "taming.models.vqgan.EMAVQ": "the EMA-updated quantizer",
    "taming.models.vqgan.EmbeddingEMA": "the EMA-updated quantizer",
}
UNCONDITIONAL = "__is_unconditional__"
LABELATOR = "taming.modules.util.Labelator"
SOS_PROVIDER = "taming.modules.util.SOSProvider"
IDENTITY_PERMUTER = "taming.modules.transformer.permuter.Identity"
DEFAULT_IMAGE_SIZE = 256


def is_vqmodel(state: dict) -> bool:
    return "encoder.conv_in.weight" in state and "quantize.embedding.weight" in state


def is_transformer(state: dict) -> bool:
    return "transformer.tok_emb.weight" in state


def project_params(project: dict | None, where: str, targets: tuple[str, ...]) -> dict[str, Any] | None:
    """`model.params` of a project YAML, after checking `model.target` is one vqtool reads."""
    if project is None:
        return None
    model = project.get("model") if isinstance(project, dict) else None
    if not isinstance(model, dict):
        raise VqtoolError(f"{where}: not a Taming project YAML (no `model:` section)")
    target = str(model.get("target", ""))
    refuse_target(target, where)
    if target not in targets:
        raise VqtoolError(f"{where}: model.target {target} does not match this checkpoint "
                          f"(expected {' or '.join(targets)})")
    return dict(model.get("params") or {})


def refuse_target(target: str, where: str) -> None:
    what = UNSUPPORTED_TARGETS.get(target, "")
    if what:
        raise VqtoolError(f"{where}: {target} uses {what}, which vqtool does not model; "
                          "only VQModel with the nearest-neighbour quantizer is supported")


# --------------------------------------------------------------------------------------------------
# VQModel


def _resblock(src: Source, dst: dict, s: str, d: str) -> int:
    for part in ("norm1", "conv1", "norm2", "conv2"):
        move(src, dst, f"{s}.{part}", f"{d}.{part}")
    if src.has(f"{s}.conv_shortcut.weight"):
        raise VqtoolError(f"{src.where}: 3×3 conv shortcuts (use_conv_shortcut) are not supported")
    if src.has(f"{s}.nin_shortcut.weight"):
        move(src, dst, f"{s}.nin_shortcut", f"{d}.skip")
    return int(dst[f"{d}.conv1.weight"].shape[0])


def _mid(src: Source, dst: dict, s: str, d: str) -> None:
    _resblock(src, dst, f"{s}.mid.block_1", f"{d}.mid.block1")
    conv_attention(src, dst, f"{s}.mid.attn_1", f"{d}.mid.attn")
    _resblock(src, dst, f"{s}.mid.block_2", f"{d}.mid.block2")


def _levels(src: Source, dst: dict, head: str, out: str, decoder: bool) -> dict:
    group = "up" if decoder else "down"
    levels = src.children(f"{head}.{group}")
    n = len(levels)
    if levels != list(range(n)) or n == 0:
        raise VqtoolError(f"{src.where}: {head}.{group} levels are not numbered 0..N-1")
    channels, attention, blocks = [], [], set()
    for i in levels:
        s = f"{head}.{group}.{i}"
        slot = n - 1 - i if decoder else i  # vqtool's decoder lists levels coarsest first
        n_blocks = src.children(f"{s}.block")
        n_attn = src.children(f"{s}.attn")
        if n_attn and n_attn != n_blocks:
            raise VqtoolError(f"{src.where}: attention on only some blocks of {s} is not supported")
        for j in n_blocks:
            c = _resblock(src, dst, f"{s}.block.{j}", f"{out}.levels.{slot}.blocks.{j}")
            if n_attn:
                conv_attention(src, dst, f"{s}.attn.{j}", f"{out}.levels.{slot}.attns.{j}")
        channels.append(c)
        attention.append(bool(n_attn))
        blocks.add(len(n_blocks))
        sampler = "upsample" if decoder else "downsample"
        if src.has(f"{s}.{sampler}.conv.weight"):
            move(src, dst, f"{s}.{sampler}.conv", f"{out}.{'ups' if decoder else 'downs'}.{slot}.conv")
        elif (i != 0) if decoder else (i != n - 1):
            raise VqtoolError(f"{src.where}: {s} resamples without a conv (resamp_with_conv: false), not supported")
    if len(blocks) != 1:
        raise VqtoolError(f"{src.where}: levels of {head} have different numbers of ResBlocks")
    return {"channels": channels, "attention": attention, "blocks": blocks.pop()}


def convert_vqmodel(state: dict, where: str, params: dict[str, Any] | None = None,
                    image_size: int | None = None, prefix: str = "") -> Converted:
    if any(k.startswith(f"{prefix}quantize.embed.") or k.startswith(f"{prefix}quantize.proj.") for k in state):
        raise VqtoolError(f"{where}: this VQGAN uses the Gumbel quantizer, which vqtool does not model")
    if any(k.startswith(f"{prefix}colorize") for k in state):
        raise VqtoolError(f"{where}: a segmentation-map VQ (colorize buffer), which vqtool does not model")
    src = Source(state, where, prefix=prefix)
    dst: dict[str, torch.Tensor] = {}
    for name in _SAME_NAMES:
        move(src, dst, name, name)
    enc = _levels(src, dst, "encoder", "encoder", decoder=False)
    _mid(src, dst, "encoder", "encoder")
    _mid(src, dst, "decoder", "decoder")
    dec = _levels(src, dst, "decoder", "decoder", decoder=True)
    codes = src.take("quantize.embedding.weight")
    if src.has("quantize.used"):
        raise VqtoolError(f"{where}: the quantizer remaps code indices (remap), which vqtool does not model")

    ch = int(dst["encoder.conv_in.weight"].shape[0])
    z_channels = int(dst["quant_conv.weight"].shape[1])
    if dst["encoder.conv_out.weight"].shape[0] != z_channels:
        raise VqtoolError(f"{where}: the encoder outputs {dst['encoder.conv_out.weight'].shape[0]} channels but "
                          f"quant_conv reads {z_channels} (double_z is not supported for a VQModel)")
    if dst["encoder.conv_in.weight"].shape[1] != 3 or dst["decoder.conv_out.weight"].shape[0] != 3:
        raise VqtoolError(f"{where}: only 3-channel (RGB) VQGANs are supported")
    if enc["channels"] != dec["channels"] or any(c % ch for c in enc["channels"]):
        raise VqtoolError(f"{where}: encoder and decoder levels do not mirror each other")
    if enc["attention"] != dec["attention"]:
        raise VqtoolError(f"{where}: encoder and decoder place attention differently, which vqtool cannot express")

    dd = dict((params or {}).get("ddconfig") or {})
    inferred: dict[str, str] = {}
    if image_size is None and dd.get("resolution"):
        image_size = int(dd["resolution"])
    elif image_size is None:
        image_size = DEFAULT_IMAGE_SIZE
        inferred["image_size"] = f"{image_size} (no project YAML; set --config or --image-size)"
    else:
        inferred["image_size"] = f"{image_size} (from --image-size)"
    attn_res = attention_resolutions(enc["attention"], image_size, where)
    cfg = VQConfig(resolution=image_size, ch=ch, ch_mult=[c // ch for c in enc["channels"]],
                   num_res_blocks=enc["blocks"], attn_resolutions=attn_res, z_channels=z_channels,
                   codebook_size=int(codes.shape[0]), code_dim=int(codes.shape[1]),
                   dropout=float(dd.get("dropout", 0.0)), cosine=False, kmeans_init=False, restart_threshold=0.0,
                   quant_convs=True, decoder_res_blocks=dec["blocks"], swish_before_out=True)
    if params is None:
        inferred["architecture"] = "read off the tensors (no project YAML given)"
    else:
        _check_against_yaml(cfg, params, dd, where)
    set_codebook(dst, codes)

    dropped: dict[str, str] = {}
    disc, disc_cfg = discriminator(src, "loss.discriminator")
    if src.drop("loss.perceptual_loss"):
        dropped["loss.perceptual_loss"] = "LPIPS weights; vqtool loads LPIPS itself (--perceptual-weights)"
    if src.drop("loss.logvar"):
        dropped["loss.logvar"] = "the learned log-variance of the reconstruction loss (training only)"
    src.drop("loss")  # any other loss-module state (e.g. DummyLoss holds none)
    src.finish()
    return Converted(kind="vq-model", config=cfg, state=dst, format="taming-transformers/vqgan",
                     inferred=inferred, dropped=dropped, discriminator=disc, discriminator_config=disc_cfg)


def _level_sizes(cfg: VQConfig) -> set[int]:
    return {cfg.resolution // 2**i for i in range(len(cfg.ch_mult))}


def _check_against_yaml(cfg: VQConfig, params: dict, dd: dict, where: str) -> None:
    expect = {
        "ch": dd.get("ch"), "ch_mult": list(dd["ch_mult"]) if "ch_mult" in dd else None,
        "num_res_blocks": dd.get("num_res_blocks"), "z_channels": dd.get("z_channels"),
        "codebook_size": params.get("n_embed"), "code_dim": params.get("embed_dim"),
        # Taming places attention where a level's size is listed; sizes no level has change nothing.
        "attn_resolutions": sorted({int(r) for r in dd["attn_resolutions"]} & _level_sizes(cfg), reverse=True)
        if "attn_resolutions" in dd else None,
    }
    actual = dict(vars(cfg))
    actual["attn_resolutions"] = sorted(cfg.attn_resolutions, reverse=True)
    for key, want in expect.items():
        if want is not None and actual[key] != want:
            raise VqtoolError(f"{where}: the project YAML says {key} = {want} but the weights show {actual[key]}")
    if dd.get("double_z"):
        raise VqtoolError(f"{where}: ddconfig.double_z is true, which a VQModel never uses")
    if dd.get("in_channels", 3) != 3 or dd.get("out_ch", 3) != 3:
        raise VqtoolError(f"{where}: only 3-channel (RGB) VQGANs are supported")
    if params.get("remap"):
        raise VqtoolError(f"{where}: the quantizer remaps code indices (remap), which vqtool does not model")


# --------------------------------------------------------------------------------------------------
# Net2NetTransformer


def conditioning(params: dict | None, where: str) -> tuple[int, int]:
    """(sos token id, number of classes) of a Net2NetTransformer; refuses conditioning vqtool cannot model."""
    if params is None:
        raise VqtoolError(f"{where}: a Taming transformer needs its project YAML (--config) for the conditioning "
                          "and the head count")
    permuter = (params.get("permuter_config") or {}).get("target", IDENTITY_PERMUTER)
    if permuter != IDENTITY_PERMUTER:
        raise VqtoolError(f"{where}: token order {permuter} is not supported (only the identity permuter)")
    cond = params.get("cond_stage_config")
    if cond == UNCONDITIONAL or cond is None or params.get("unconditional"):  # the latter overrides any cond stage
        return int(params.get("sos_token", 0)), 0
    target = str(cond.get("target", "")) if isinstance(cond, dict) else str(cond)
    if target == SOS_PROVIDER:
        return int((cond.get("params") or {}).get("sos_token", 0)), 0
    if target == LABELATOR:
        return 0, int((cond.get("params") or {}).get("n_classes", 1000))
    raise VqtoolError(f"{where}: conditioning on {target} (a conditional first stage) is not supported; "
                      "vqtool imports unconditional and class-conditional transformers")


def convert_transformer(state: dict, where: str, params: dict | None, grid: tuple[int, int]) -> Converted:
    sos, n_classes = conditioning(params, where)
    gpt = dict((params.get("transformer_config") or {}).get("params") or {})
    src = Source(state, where, prefix="transformer.")
    tok = src.take("tok_emb.weight")
    vocab, n_embd = int(tok.shape[0]), int(tok.shape[1])
    head = src.take("head.weight")
    if src.has("head.bias"):
        raise VqtoolError(f"{where}: a GPT head with bias is not minGPT's layout")
    if head.shape[0] != vocab:
        raise VqtoolError(f"{where}: head of {head.shape[0]} outputs for a vocabulary of {vocab}")
    pos = src.take("pos_emb")[0]
    n_tokens = grid[0] * grid[1]
    if pos.shape[0] < n_tokens:
        raise VqtoolError(f"{where}: block_size {pos.shape[0]} is too short for a {grid[0]}×{grid[1]} grid plus "
                          "the conditioning token")
    if n_classes and n_classes > vocab:
        raise VqtoolError(f"{where}: {n_classes} classes do not fit the {vocab}-entry token table they share")
    if not 0 <= sos < vocab:
        raise VqtoolError(f"{where}: sos_token {sos} is outside the {vocab}-entry token table")
    dst: dict[str, torch.Tensor] = {}
    dst["tok_emb.weight"] = torch.cat([tok, tok.new_zeros(1, n_embd)])  # vqtool's MASK row, unused when causal
    positions = tok.new_zeros(n_tokens, n_embd)
    positions[: min(n_tokens, pos.shape[0] - 1)] = pos[1:n_tokens + 1]
    dst["pos"] = positions
    if n_classes:
        # Row 0 is vqtool's unconditional start; a class-conditional Taming GPT has none, so it stays zero.
        prefix = torch.cat([tok.new_zeros(1, n_embd), tok[:n_classes] + pos[0]])
    else:
        prefix = (tok[sos] + pos[0])[None]
    dst["prefix_emb.weight"] = prefix
    n_layer = gpt_blocks(src, dst)
    move(src, dst, "ln_f", "ln_f")
    dst["lm_head.weight"] = head
    src.finish()
    heads = int(gpt.get("n_head", 8))
    check_heads(n_embd, heads, where)
    for key, value in (("n_layer", n_layer), ("n_embd", n_embd), ("vocab_size", vocab)):
        if key in gpt and int(gpt[key]) != value:
            raise VqtoolError(f"{where}: the project YAML says {key} = {gpt[key]} but the weights show {value}")
    cfg = TransformerConfig(vocab_size=vocab, grid=tuple(grid), n_layer=n_layer, n_head=heads, n_embd=n_embd,
                            causal=True, n_classes=n_classes, pos_emb="flat", gelu="exact")
    inferred = {"grid": f"{grid[0]}×{grid[1]} (the first stage's latent grid at its training resolution)"}
    extra: dict[str, Any] = {"sos_token": sos} if not n_classes else {"classes_share_token_table": True}
    return Converted(kind="prior-model", config=cfg, state=dst, format="taming-transformers/transformer",
                     inferred=inferred, dropped={"transformer.blocks.N.attn.mask": "causal mask buffers"},
                     extra=extra, prior="autoregressive", objective={})
