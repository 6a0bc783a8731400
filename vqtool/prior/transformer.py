"""One transformer for both priors: bidirectional (absorbing diffusion) or causal (autoregressive).

The input vocabulary is the codebook plus one extra id, `vocab_size`: the [MASK] token for the
absorbing prior. The output head covers the codebook only, so MASK is never predicted. An optional
prefix position carries a class embedding (class-conditional) or, for the causal model, the learned
start token that the first image token is predicted from.

`trunk` returns final-normed hidden states and `head` turns them into logits, so a caller can compute
logits only at the positions it needs (the masked ones while training, the newly revealed ones while
sampling). `hidden_at` also runs the last block only at those positions. `KVCache` lets the causal
model add one position at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# The label of "no class": prefix row 0, the unconditional start token that classifier-free guidance's
# unconditional branch uses (and that training with cond_drop teaches a class-conditional prior).
NO_CLASS = -1


@dataclass
class TransformerConfig:
    vocab_size: int = 1024  # codebook size; input id `vocab_size` is MASK
    grid: tuple[int, int] = (16, 16)  # token grid (H, W) the model is trained on
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 256
    dropout: float = 0.0
    causal: bool = False
    n_classes: int = 0  # > 0: class-conditional through a prefix token
    pos_emb: str = "2d"  # "2d" (row + column embeddings) or "flat" (learned 1-D, as both papers' code)
    # "exact" (erf), as both papers' transformers; "tanh", the approximation vqtool used before 2026-12 (a
    # record without the setting: vqtool.prior.store.model_config_from_record). On CPU torch's tanh GELU
    # costs 2.6-7x the exact one (docs/performance.md); on a GPU both are one fused pass.
    gelu: str = "exact"

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def has_prefix(self) -> bool:
        return self.causal or self.n_classes > 0

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def matmul_params(self) -> int:
        """Parameters that take part in matmuls per token (for FLOP accounting)."""
        d = self.n_embd
        return self.n_layer * 12 * d * d + d * self.vocab_size


class KVCache:
    """Keys and values of the positions seen so far, per layer, for one-position-at-a-time decoding."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.causal = cfg.causal
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor | None, cache: KVCache | None = None, layer: int = 0,
                qkv: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over `x` (B, L, C); given `qkv`, its projections made beforehand, x is not read."""
        qkv = self.qkv(x) if qkv is None else qkv
        B, L, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.split(C, dim=2)
        q, k, v = (t.view(B, L, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        causal = self.causal
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + L] = k
            cache.v[layer][:, :, start:start + L] = v
            k = cache.k[layer][:, :, :start + L]
            v = cache.v[layer][:, :, :start + L]
            # A single new position may attend to every cached one; a first chunk needs the mask.
            causal = causal and start == 0 and L > 1
            if self.causal and start > 0 and L > 1:
                raise ValueError("with a filled cache, feed one position at a time")
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, L, C)
        return self.resid_drop(self.proj(y))

    def at(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The output (B, k, C) at `rows` (B, k) only: keys and values of every position, queries at the rows.

        Bidirectional only: a causal row would need the mask of its own place.
        """
        B, L, C = x.shape
        k = rows.shape[1]
        if isinstance(self.qkv, nn.Linear):
            # Queries at the rows only: the query third of the projection's weight on k rows, not on L.
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x.gather(1, rows.unsqueeze(-1).expand(B, k, C)), w[:C], None if b is None else b[:C])
            key, value = F.linear(x, w[C:], None if b is None else b[C:]).split(C, dim=2)
        else:  # a quantized projection (int8 sampling) is one packed matmul
            q, key, value = self.qkv(x).split(C, dim=2)
            q = q.gather(1, rows.unsqueeze(-1).expand(B, k, C))
        q, key, value = (t.reshape(B, t.shape[1], self.n_head, C // self.n_head).transpose(1, 2)
                         for t in (q, key, value))
        y = F.scaled_dot_product_attention(q, key, value, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, k, C)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(approximate="tanh" if cfg.gelu == "tanh" else "none"),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                qkv: torch.Tensor | None = None) -> torch.Tensor:
        """The block over `x`; `qkv` (B, L, 3C): `projections(x)` already made (the sampler keeps them)."""
        x = x + self.attn(self.ln1(x) if qkv is None else None, cache, layer, qkv)
        return x + self.mlp(self.ln2(x))

    def projections(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values (..., 3C) of `x` (..., C), row by row: the block's first step."""
        return self.attn.qkv(self.ln1(x))

    def at(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`forward(x)` gathered at `rows` (B, k), computing queries, projection and MLP only there."""
        x_rows = x.gather(1, rows.unsqueeze(-1).expand(*rows.shape, x.shape[-1]))
        x_rows = x_rows + self.attn.at(self.ln1(x), rows)
        return x_rows + self.mlp(self.ln2(x_rows))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.gelu not in ("tanh", "exact"):
            raise ValueError(f"gelu must be 'tanh' or 'exact', not {cfg.gelu!r}")
        d = cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size + 1, d)
        if cfg.pos_emb == "2d":
            self.row_emb = nn.Parameter(torch.zeros(cfg.grid[0], d))
            self.col_emb = nn.Parameter(torch.zeros(cfg.grid[1], d))
        elif cfg.pos_emb == "flat":
            self.pos = nn.Parameter(torch.zeros(cfg.n_tokens, d))
        else:
            raise ValueError(f"pos_emb must be '2d' or 'flat', not {cfg.pos_emb!r}")
        if cfg.has_prefix:
            # Row 0 is the unconditional start token, rows 1.. are classes.
            self.prefix_emb = nn.Embedding(1 + cfg.n_classes, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        for p in (getattr(self, "row_emb", None), getattr(self, "col_emb", None), getattr(self, "pos", None)):
            if p is not None:
                nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def position_table(self) -> torch.Tensor:
        """(n_tokens, d) positional embedding of the training grid in raster order."""
        if self.cfg.pos_emb == "2d":
            return (self.row_emb[:, None, :] + self.col_emb[None, :, :]).reshape(-1, self.cfg.n_embd)
        return self.pos

    def embed(self, idx: torch.Tensor, labels: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
        """Embeddings of `idx` (B, L) at token positions offset..offset+L-1, with the prefix in front
        when `offset == 0` and the model has one."""
        B, L = idx.shape
        x = self.tok_emb(idx) + self.position_table()[offset:offset + L]
        if self.cfg.has_prefix and offset == 0:
            x = torch.cat([self.prefix_embedding(labels, B, idx.device), x], dim=1)
        return x

    def embed_at(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings (..., d) of single `tokens` at token `positions` (same shape): rows of `embed`."""
        return self.tok_emb(tokens) + self.position_table()[positions]

    def row_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows of the hidden states that hold token `positions` (the prefix, if any, is row 0)."""
        return positions + (1 if self.cfg.has_prefix else 0)

    def prefix_embedding(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """(batch, 1, d): class c is row c + 1, so NO_CLASS (-1) and no labels are row 0."""
        if labels is None or self.cfg.n_classes == 0:
            ids = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            ids = labels.to(device=device, dtype=torch.long) + 1
        return self.prefix_emb(ids)[:, None, :]

    def trunk(self, idx: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, L', d); L' = L + 1 with a prefix (prefix first)."""
        x = self.drop(self.embed(idx, labels))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def hidden_at(self, idx: torch.Tensor, labels: torch.Tensor | None, positions: torch.Tensor,
                  body: Callable[..., torch.Tensor] | None = None, first: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, k, d) at token `positions` (B, k) of a bidirectional model.

        Equals `trunk(idx, labels)` gathered at those positions, but the last block runs its queries,
        projection and MLP only there: a sampling step of the absorbing prior needs a few positions.
        `body` stands in for `self.body` (a compiled one); `first` is passed to it.
        """
        if self.cfg.causal:
            raise ValueError("hidden_at is for the bidirectional (absorbing) transformer")
        rows = self.row_of(positions)
        x = (body or self.body)(idx, labels, first)
        if 2 * positions.shape[1] >= idx.shape[1]:
            # Most positions asked for: the whole last block is as cheap.
            hidden = self.ln_f(self.blocks[-1](x))
            return hidden.gather(1, rows.unsqueeze(-1).expand(*rows.shape, hidden.shape[-1]))
        return self.ln_f(self.blocks[-1].at(x, rows))

    def body(self, idx: torch.Tensor, labels: torch.Tensor | None = None,
             first: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, L', d) before the last block: the part of `hidden_at` that runs at every
        position, with one shape at every sampling step (what a compiled sampler compiles). `first`:
        the first block's `projections` of the embeddings, made beforehand (n_layer ≥ 2)."""
        x = self.drop(self.embed(idx, labels))
        blocks = list(self.blocks[:-1])
        if first is not None:
            x = blocks.pop(0)(x, qkv=first)
        for block in blocks:
            x = block(x)
        return x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(
        self, idx: torch.Tensor, labels: torch.Tensor | None = None, where: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, L, vocab) for every token position of `idx`.

        Bidirectional: the logits at i predict token i. Causal: the logits at i predict token i from
        the prefix and tokens < i (the input's last token only conditions nothing it predicts).
        With `where` (B, L) bool, only the selected positions get logits: (M, vocab) in row-major
        order, the same rows as `forward(idx, labels)[where]` without computing the others.
        """
        hidden = self.trunk(idx, labels)
        if self.cfg.has_prefix:
            hidden = hidden[:, :-1] if self.cfg.causal else hidden[:, 1:]
        if where is not None:
            hidden = hidden[where]
        return self.head(hidden)

    # -- incremental decoding (causal only) ---------------------------------------------------------

    def new_cache(self, batch: int, device: torch.device | None = None) -> KVCache:
        """An empty cache in the dtype attention computes keys and values in: the autocast dtype of the
        caller's region (vqtool.precision), else the parameters'. Storing bf16 keys in an fp32 cache would
        mix precisions between the cached and the recomputed path."""
        from vqtool.precision import active_dtype

        cfg = self.cfg
        p = next(self.parameters())
        device = device or p.device
        return KVCache(cfg.n_layer, batch, cfg.n_head, cfg.n_tokens + 1, cfg.n_embd // cfg.n_head,
                       device, active_dtype(torch.device(device), p.dtype))

    def decode_step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed embeddings `x` (B, L, d) at the cache's next positions; return logits of the last."""
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        cache.length += x.shape[1]
        return self.head(self.ln_f(x[:, -1]))
