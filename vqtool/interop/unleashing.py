"""Unleashing Transformers' checkpoints: `vqgan_ema_STEP.th` and `absorbing_ema_STEP.th`.

Both files are bare state dicts with no configuration, so the architecture is read off the tensors.
The VQGAN's encoder and generator are flat `blocks.N` lists; the kind of each entry shows in its keys
(a ResBlock has `norm1`, an attention block `q`, a resampler `conv`, a GroupNorm a 1-D `weight`, a conv
a 4-D one), and the list reads as: conv in, per level the ResBlocks (each followed by attention on
attention levels) with a resampler between levels, the bottleneck (ResBlock, attention, ResBlock),
GroupNorm, conv out. That order fixes levels, blocks per level, channel multipliers and where the
attention sits; only the image size the model was trained at is not in the file (it names the
attention resolutions and the token grid, and comes from `--image-size`).

The absorbing prior's `_denoise_fn` is a bidirectional minGPT with a MASK row in its token table,
learned 1-D positions, exact GELU and a head without bias; the head count is not in the file
(`--heads`). Its T is the length of the `Lt_history` buffer minus one.
"""

from __future__ import annotations

import math

import torch

from vqtool.errors import VqtoolError
from vqtool.interop import convert
from vqtool.interop.convert import Converted, Source
from vqtool.prior.transformer import TransformerConfig
from vqtool.vq.model import VQConfig

DEFAULT_IMAGE_SIZE = 256  # the official code's img_size default
DEFAULT_HEADS = 8  # the official code's bert_n_head default
DEFAULT_T = 256  # the official code's total_steps default


def is_vqgan(state: dict) -> bool:
    return "ae.encoder.blocks.0.weight" in state


def is_absorbing(state: dict) -> bool:
    return "_denoise_fn.tok_emb.weight" in state


def _kind(src: Source, head: str) -> str:
    names = src.names_under(head)
    if "norm1.weight" in names:
        return "res"
    if "q.weight" in names:
        return "attn"
    if "conv.weight" in names:
        return "resample"
    if names == {"weight", "bias"}:
        return "norm" if src.peek(f"{head}.weight").dim() == 1 else "conv"
    raise VqtoolError(f"{src.where}: {src.prefix}{head} is a block vqtool does not know ({', '.join(sorted(names))})")


def _levels(src: Source, head: str, body: list[int]) -> list[list[tuple[int, bool]]]:
    """Split the blocks between conv-in and bottleneck into levels: [(resblock index, attention after)]."""
    levels: list[list[tuple[int, bool]]] = [[]]
    for n in body:
        kind = _kind(src, f"{head}.{n}")
        if kind == "res":
            levels[-1].append((n, False))
        elif kind == "attn":
            if not levels[-1] or levels[-1][-1][1]:
                raise VqtoolError(f"{src.where}: attention block {head}.{n} does not follow a ResBlock")
            levels[-1][-1] = (levels[-1][-1][0], True)
        elif kind == "resample":
            levels.append([])
        else:
            raise VqtoolError(f"{src.where}: unexpected {kind} at {src.prefix}{head}.{n}")
    if any(not level for level in levels):
        raise VqtoolError(f"{src.where}: a level of {src.prefix}{head} has no ResBlock")
    return levels


def _resblock(src: Source, dst: dict, s: str, d: str) -> tuple[int, int]:
    c_in, c_out = int(src.peek(f"{s}.conv1.weight").shape[1]), int(src.peek(f"{s}.conv1.weight").shape[0])
    for part in ("norm1", "conv1", "norm2", "conv2"):
        convert.move(src, dst, f"{s}.{part}", f"{d}.{part}")
    if c_in != c_out:
        convert.move(src, dst, f"{s}.conv_out", f"{d}.skip")
    else:
        src.drop(f"{s}.conv_out")  # built by the official code but only applied when channels change
    return c_in, c_out


def _network(src: Source, dst: dict, head: str, out: str, decoder: bool) -> dict:
    """Map one of the two block lists; returns what it shows of the architecture."""
    order = src.children(head)
    if order != list(range(len(order))) or len(order) < 7:
        raise VqtoolError(f"{src.where}: {src.prefix}{head} is not a block list vqtool knows")
    kinds = [_kind(src, f"{head}.{n}") for n in order]
    mid = order[1:4] if decoder else order[-5:-2]
    body = order[4:-2] if decoder else order[1:-5]
    if kinds[0] != "conv" or kinds[-2:] != ["norm", "conv"] or [kinds[n] for n in mid] != ["res", "attn", "res"]:
        raise VqtoolError(f"{src.where}: {src.prefix}{head} does not read conv, levels, bottleneck, norm, conv")
    levels = _levels(src, head, body)
    if decoder:
        levels = levels[::-1]  # the generator walks the levels from the coarsest; index them as the encoder does
    convert.move(src, dst, f"{head}.0", f"{out}.conv_in")
    c_in_first = int(dst[f"{out}.conv_in.weight"].shape[1])
    mults, attention, blocks = [], [], {len(level) for level in levels}
    for i, level in enumerate(levels):
        slot = len(levels) - 1 - i if decoder else i  # vqtool's decoder lists levels coarsest first
        for j, (n, attn) in enumerate(level):
            _, c_out = _resblock(src, dst, f"{head}.{n}", f"{out}.levels.{slot}.blocks.{j}")
            if attn:
                convert.conv_attention(src, dst, f"{head}.{n + 1}", f"{out}.levels.{slot}.attns.{j}")
        mults.append(c_out)
        attention.append(level[0][1])
        if any(attn != level[0][1] for _, attn in level):
            raise VqtoolError(f"{src.where}: attention on only some blocks of a level is not supported")
    resamplers = [n for n in body if kinds[n] == "resample"]
    for k, n in enumerate(resamplers):
        # Encoder: the k-th downsampler follows level k. Generator: the k-th upsampler follows level n-1-k,
        # which vqtool's decoder (coarsest level first) holds at slot k.
        convert.move(src, dst, f"{head}.{n}.conv", f"{out}.{'ups' if decoder else 'downs'}.{k}.conv")
    m0, m1, m2 = mid
    _resblock(src, dst, f"{head}.{m0}", f"{out}.mid.block1")
    convert.conv_attention(src, dst, f"{head}.{m1}", f"{out}.mid.attn")
    _resblock(src, dst, f"{head}.{m2}", f"{out}.mid.block2")
    convert.move(src, dst, f"{head}.{order[-2]}", f"{out}.norm_out")
    convert.move(src, dst, f"{head}.{order[-1]}", f"{out}.conv_out")
    if len(blocks) != 1:
        raise VqtoolError(f"{src.where}: levels of {src.prefix}{head} have different numbers of ResBlocks")
    return {"channels": mults, "attention": attention, "blocks": blocks.pop(), "in": c_in_first}


def convert_vqgan(state: dict, where: str, image_size: int | None = None) -> Converted:
    if any(k.startswith("ae.quantize.embed.") or k.startswith("ae.quantize.proj.") for k in state):
        raise VqtoolError(f"{where}: this VQGAN uses the Gumbel quantizer, which vqtool does not model; "
                          "only the nearest-neighbour quantizer is supported")
    src = Source(state, where)
    dst: dict[str, torch.Tensor] = {}
    enc = _network(src, dst, "ae.encoder.blocks", "encoder", decoder=False)
    dec = _network(src, dst, "ae.generator.blocks", "decoder", decoder=True)
    if enc["in"] != 3 or dst["decoder.conv_out.weight"].shape[0] != 3:
        raise VqtoolError(f"{where}: only 3-channel (RGB) VQGANs are supported")
    ch = int(dst["encoder.conv_in.weight"].shape[0])
    if any(c % ch for c in enc["channels"]) or enc["channels"] != dec["channels"]:
        raise VqtoolError(f"{where}: encoder and generator levels do not mirror each other")
    if enc["attention"] != dec["attention"]:
        raise VqtoolError(f"{where}: encoder and generator place attention differently, which vqtool cannot express")
    codes = src.take("ae.quantize.embedding.weight")
    emb_dim = int(dst["encoder.conv_out.weight"].shape[0])
    if codes.shape[1] != emb_dim or dec["in"] != emb_dim:
        raise VqtoolError(f"{where}: codebook width {codes.shape[1]} does not match the encoder's {emb_dim} outputs")
    inferred = {}
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZE
        inferred["image_size"] = f"{image_size} (not in the file; the official default; set --image-size)"
    else:
        inferred["image_size"] = f"{image_size} (from --image-size; not in the file)"
    attn_res = convert.attention_resolutions(enc["attention"], image_size, where)
    inferred["attn_resolutions"] = f"{attn_res} (attention levels read off the block order, sized by image_size)"
    inferred["beta"] = "0.25 (commitment weight, training only; not in the file)"
    cfg = VQConfig(resolution=image_size, ch=ch, ch_mult=[c // ch for c in enc["channels"]],
                   num_res_blocks=enc["blocks"], attn_resolutions=attn_res, z_channels=emb_dim,
                   codebook_size=int(codes.shape[0]), code_dim=emb_dim, cosine=False, kmeans_init=False,
                   restart_threshold=0.0, quant_convs=False, decoder_res_blocks=dec["blocks"],
                   swish_before_out=False)
    convert.set_codebook(dst, codes)
    dropped = {}
    if src.drop("ae.generator.logsigma"):
        dropped["ae.generator.logsigma"] = "the pixel-likelihood head fitted after training for the paper's ELBO"
    if src.drop("perceptual"):
        dropped["perceptual"] = "LPIPS weights; vqtool loads LPIPS itself (--perceptual-weights)"
    disc, disc_cfg = convert.discriminator(src, "disc")
    src.finish()
    return Converted(kind="vq-model", config=cfg, state=dst, format="unleashing-transformers/vqgan",
                     inferred=inferred, dropped=dropped, discriminator=disc, discriminator_config=disc_cfg)


def convert_absorbing(state: dict, where: str, heads: int | None = None,
                      grid: tuple[int, int] | None = None) -> Converted:
    known = ("Lt_history", "Lt_count", "loss_history", "embedding_weight")
    stray = sorted(k for k in state if not k.startswith("_denoise_fn.") and k not in known)
    if stray:
        raise VqtoolError(f"{where}: tensor {stray[0]} has no place in an absorbing prior; "
                          "this layout is not one vqtool knows")
    buffers = {k: state[k] for k in known if k in state}
    src = Source(state, where, prefix="_denoise_fn.")
    dst: dict[str, torch.Tensor] = {}
    tok = src.take("tok_emb.weight")
    n_embd = int(tok.shape[1])
    codebook = int(src.peek("head.weight").shape[0])
    if tok.shape[0] != codebook + 1:
        raise VqtoolError(f"{where}: token table of {tok.shape[0]} rows for {codebook} codes; an absorbing prior "
                          "has one extra row for MASK (an autoregressive UT prior is not supported)")
    if src.has("head.bias"):
        raise VqtoolError(f"{where}: a transformer head with bias is not the absorbing prior's layout")
    dst["tok_emb.weight"] = tok
    pos = src.take("pos_emb")[0]
    inferred = {}
    if grid is None:
        side = math.isqrt(pos.shape[0])
        if side * side != pos.shape[0]:
            raise VqtoolError(f"{where}: {pos.shape[0]} positions is not a square grid; pass --vq to give the grid")
        grid = (side, side)
        inferred["grid"] = f"{side}×{side} (square root of the {pos.shape[0]} learned positions)"
    n_tokens = grid[0] * grid[1]
    if pos.shape[0] < n_tokens:
        raise VqtoolError(f"{where}: {pos.shape[0]} learned positions cannot cover a {grid[0]}×{grid[1]} grid")
    if pos.shape[0] > n_tokens:
        inferred["positions"] = (f"the first {n_tokens} of the file's {pos.shape[0]} learned positions (the --vq "
                                 f"grid is {grid[0]}×{grid[1]}; check its image size if that is unexpected)")
    dst["pos"] = pos[:n_tokens]
    n_layer = convert.gpt_blocks(src, dst)
    convert.move(src, dst, "ln_f", "ln_f")
    dst["lm_head.weight"] = src.take("head.weight")
    src.drop("start_tok")  # only the official code's autoregressive mode reads it
    src.finish()
    if heads is None:
        heads = DEFAULT_HEADS
        inferred["n_head"] = f"{heads} (not in the file; the official default; set --heads)"
    else:
        inferred["n_head"] = f"{heads} (from --heads; not in the file)"
    convert.check_heads(n_embd, heads, where)
    T = DEFAULT_T
    if "Lt_history" in buffers:
        T = int(buffers["Lt_history"].shape[0]) - 1
        inferred["T"] = f"{T} (length of the Lt_history buffer minus one)"
    else:
        inferred["T"] = f"{T} (the official default)"
    cfg = TransformerConfig(vocab_size=codebook, grid=tuple(grid), n_layer=n_layer, n_head=heads, n_embd=n_embd,
                            causal=False, n_classes=0, pos_emb="flat", gelu="exact")
    stats = [k for k in ("Lt_history", "Lt_count", "loss_history") if k in buffers]
    dropped = {", ".join(stats): "the official trainer's statistics for sampling t"} if stats else {}
    if "embedding_weight" in buffers:
        dropped["embedding_weight"] = "a copy of the VQ codebook (checked against --vq when given)"
    conv = Converted(kind="prior-model", config=cfg, state=dst, format="unleashing-transformers/absorbing",
                     inferred=inferred, dropped=dropped, prior="absorbing",
                     objective={"T": T, "mask_schedule": "random", "loss": "reweighted-elbo", "nll_samples": None})
    if "embedding_weight" in buffers:
        conv.extra["_codebook"] = buffers["embedding_weight"]
    return conv
