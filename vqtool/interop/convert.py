"""What both papers' layouts share on their way into vqtool's models.

A converter turns a foreign state dict into a `Converted`: the vqtool config it implies, the weights
under vqtool's parameter names, and an account of every source tensor (mapped, or dropped and why)
plus every setting that was inferred rather than read. Source tensors are popped as they are used, so
an unexpected leftover is an error, not a silent loss, and the weights are never held twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from vqtool.errors import VqtoolError


@dataclass
class Converted:
    kind: str  # "vq-model" or "prior-model"
    config: Any  # VQConfig or TransformerConfig
    state: dict[str, torch.Tensor]  # vqtool parameter names → tensors
    format: str  # e.g. "unleashing-transformers/vqgan"
    inferred: dict[str, str] = field(default_factory=dict)  # setting → where the value came from
    dropped: dict[str, str] = field(default_factory=dict)  # source key group → why it is not kept
    extra: dict[str, Any] = field(default_factory=dict)  # stored in the artifact's extra
    objective: dict[str, Any] = field(default_factory=dict)  # prior objective settings
    prior: str = ""  # "absorbing" or "autoregressive" for priors
    discriminator: dict[str, torch.Tensor] = field(default_factory=dict)  # PatchGAN weights, when present
    discriminator_config: dict[str, int] = field(default_factory=dict)  # {"disc_ch", "disc_layers"}


class Source:
    """A foreign state dict that is consumed as it is read; names in errors carry the file's prefix."""

    def __init__(self, state: dict[str, Any], where: str, prefix: str = ""):
        self.where = where
        self.prefix = prefix
        self.state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        bad = [k for k, v in self.state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise VqtoolError(f"{where}: {prefix}{bad[0]} is not a tensor")

    def has(self, key: str) -> bool:
        return key in self.state

    def peek(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise VqtoolError(f"{self.where}: expected tensor {self.prefix}{key} is missing")
        return self.state[key]

    def take(self, key: str) -> torch.Tensor:
        tensor = self.peek(key)
        del self.state[key]
        return tensor

    def children(self, head: str) -> list[int]:
        """Sorted integer indices N of keys `head.N.…`."""
        dot = f"{head}."
        found = {int(k[len(dot):].split(".", 1)[0]) for k in self.state
                 if k.startswith(dot) and k[len(dot):].split(".", 1)[0].isdigit()}
        return sorted(found)

    def names_under(self, head: str) -> set[str]:
        dot = f"{head}."
        return {k[len(dot):] for k in self.state if k.startswith(dot)}

    def drop(self, head: str) -> int:
        """Forget every tensor under `head` (or named `head`); returns how many there were."""
        keys = [k for k in self.state if k == head or k.startswith(f"{head}.")]
        for k in keys:
            del self.state[k]
        return len(keys)

    def finish(self) -> None:
        if self.state:
            left = sorted(self.state)
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise VqtoolError(f"{self.where}: tensor {self.prefix}{left[0]}{more} has no place in the model; "
                              "this layout is not one vqtool knows")


def move(src: Source, dst: dict[str, torch.Tensor], src_head: str, dst_head: str,
         names: tuple[str, ...] = ("weight", "bias")) -> None:
    for name in names:
        dst[f"{dst_head}.{name}"] = src.take(f"{src_head}.{name}")


def fuse_qkv(src: Source, dst: dict[str, torch.Tensor], heads: tuple[str, str, str], dst_head: str) -> None:
    """Separate query, key and value layers → one layer whose output is [q; k; v] (vqtool's order)."""
    for name in ("weight", "bias"):
        parts = [src.take(f"{h}.{name}") for h in heads]
        dst[f"{dst_head}.{name}"] = torch.cat(parts, dim=0)
        del parts


def conv_attention(src: Source, dst: dict[str, torch.Tensor], s: str, d: str) -> None:
    """The VQGANs' single-head attention block (norm, q, k, v, proj_out 1×1 convs) → vqtool's AttnBlock."""
    move(src, dst, f"{s}.norm", f"{d}.norm")
    fuse_qkv(src, dst, (f"{s}.q", f"{s}.k", f"{s}.v"), f"{d}.qkv")
    move(src, dst, f"{s}.proj_out", f"{d}.proj")


def set_codebook(dst: dict[str, torch.Tensor], codes: torch.Tensor) -> None:
    """The codebook, with the usage statistics a freshly loaded quantizer starts from (uniform, initialised)."""
    dst["quantizer.embedding"] = codes
    dst["quantizer.usage"] = torch.full((codes.shape[0],), 1.0 / codes.shape[0])
    dst["quantizer.initialized"] = torch.ones((), dtype=torch.uint8)


def out_channels(src: Source, key: str) -> int:
    return int(src.peek(key).shape[0])


def gpt_blocks(src: Source, dst: dict[str, torch.Tensor], head: str = "blocks") -> int:
    """minGPT-style blocks (ln1, attn.{query,key,value,proj}, ln2, mlp.{0,2}) → vqtool's; returns the count."""
    layers = src.children(head)
    if layers != list(range(len(layers))) or not layers:
        raise VqtoolError(f"{src.where}: transformer blocks are not numbered 0..N-1")
    for i in layers:
        s, d = f"{head}.{i}", f"blocks.{i}"
        move(src, dst, f"{s}.ln1", f"{d}.ln1")
        move(src, dst, f"{s}.ln2", f"{d}.ln2")
        fuse_qkv(src, dst, (f"{s}.attn.query", f"{s}.attn.key", f"{s}.attn.value"), f"{d}.attn.qkv")
        move(src, dst, f"{s}.attn.proj", f"{d}.attn.proj")
        move(src, dst, f"{s}.mlp.0", f"{d}.mlp.0")
        move(src, dst, f"{s}.mlp.2", f"{d}.mlp.2")
        src.drop(f"{s}.attn.mask")  # the causal mask buffer; vqtool's attention builds its own
    return len(layers)


def attention_resolutions(attention: list[bool], image_size: int, where: str) -> list[int]:
    """Image sides (px) of the levels that have attention, for a model trained at `image_size`; each
    level halves the side, so the size must divide by 2^(levels - 1)."""
    levels = len(attention)
    if image_size % 2 ** (levels - 1):
        raise VqtoolError(f"{where}: image size {image_size} is not divisible by the downsampling "
                          f"{2 ** (levels - 1)} of its {levels} levels")
    return [image_size // 2**i for i, has in enumerate(attention) if has]


def check_heads(n_embd: int, heads: int, where: str) -> None:
    if heads < 1 or n_embd % heads:
        raise VqtoolError(f"{where}: width {n_embd} is not divisible by {heads} attention heads; pass --heads")


def discriminator(src: Source, head: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The pix2pix PatchGAN both papers train (`main.N` convs and BatchNorms) → vqtool's, same names."""
    if not src.has(f"{head}.main.0.weight"):
        return {}, {}
    ndf = out_channels(src, f"{head}.main.0.weight")
    layers = sum(1 for k in src.names_under(f"{head}.main") if k.endswith("running_mean"))
    state = {f"main.{k}": v for k, v in ((k, src.peek(f"{head}.main.{k}")) for k in src.names_under(f"{head}.main"))}
    src.drop(head)
    return state, {"disc_ch": ndf, "disc_layers": layers}


def check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load `state` strictly; a converter bug or an unknown variant ends here in one line."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise VqtoolError(f"{where}: converted weights do not fit ({lines[min(1, len(lines) - 1)]})") from None


_INITIALISERS = ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "zeros_", "ones_", "constant_",
                 "trunc_normal_")


@contextlib.contextmanager
def without_init() -> Iterator[None]:
    """Build modules whose parameters are left uninitialised, for a model that is about to receive weights.

    torch.nn's layers initialise through `torch.nn.init` when they are built; skipping that leaves the
    freshly allocated memory untouched (and so not resident) until the real tensors replace it. (The
    meta device would do the same but loads hundreds of modules on first use, seconds of start-up.)
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)
