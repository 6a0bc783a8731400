"""The absorbing prior's transformer as Unleashing Transformers' code computes it, for the speed table.

Written here after the structure of the official `models/transformer.py` (no code taken from it):
separate key, query and value Linear layers, attention as an explicit product, softmax and product
(no fused kernel), the stacked keys and values every block makes for a cache whether or not one is
used, exact-erf GELU, a flat learned position table and logits at every position.

`PapersTransformer.from_vqtool(model)` takes the weights of a bidirectional, unconditional vqtool
`Transformer`, so the two compute the same function (tests/test_reference_transformer.py) with the
same FLOPs except attention's, and a speed ratio between them is the code's, not the model's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vqtool.prior.transformer import Transformer


class PapersAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.key, self.query, self.value, self.proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, L, self.heads, C // self.heads).transpose(1, 2)

        k, q, v = heads(self.key(x)), heads(self.query(x)), heads(self.value(x))
        torch.stack((k, v))  # the official block builds its "present" (cache) tensor on every call
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
        y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(B, L, C))


class PapersBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = PapersAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PapersTransformer(nn.Module):
    def __init__(self, codes: int, tokens: int, layers: int, heads: int, d: int):
        super().__init__()
        self.tok_emb = nn.Embedding(codes + 1, d)  # the last id is the mask
        self.pos_emb = nn.Parameter(torch.zeros(1, tokens, d))
        self.blocks = nn.Sequential(*(PapersBlock(d, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, codes, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb[:, :idx.shape[1]]
        return self.head(self.ln_f(self.blocks(x)))

    @classmethod
    def from_vqtool(cls, model: Transformer) -> PapersTransformer:
        """The same function as `model` (bidirectional, no classes), GELU aside: this one is exact
        erf, as the papers', whatever `model.cfg.gelu` says."""
        cfg = model.cfg
        if cfg.causal or cfg.n_classes:
            raise ValueError("the papers' absorbing transformer is bidirectional and unconditional")
        out = cls(cfg.vocab_size, cfg.n_tokens, cfg.n_layer, cfg.n_head, cfg.n_embd)
        out.cfg = cfg  # its shape, which the reference step and sampler read (n_tokens, mask_id)
        d = cfg.n_embd
        with torch.no_grad():
            out.tok_emb.weight.copy_(model.tok_emb.weight)
            out.pos_emb.copy_(model.position_table()[None])
            for mine, theirs in zip(out.blocks, model.blocks, strict=True):
                w, b = theirs.attn.qkv.weight, theirs.attn.qkv.bias
                for i, layer in enumerate((mine.attn.query, mine.attn.key, mine.attn.value)):
                    layer.weight.copy_(w[i * d:(i + 1) * d])
                    layer.bias.copy_(b[i * d:(i + 1) * d])
                mine.attn.proj.load_state_dict(theirs.attn.proj.state_dict())
                mine.ln1.load_state_dict(theirs.ln1.state_dict())
                mine.ln2.load_state_dict(theirs.ln2.state_dict())
                mine.mlp[0].load_state_dict(theirs.mlp[0].state_dict())
                mine.mlp[2].load_state_dict(theirs.mlp[2].state_dict())
            out.ln_f.load_state_dict(model.ln_f.state_dict())
            out.head.load_state_dict(model.lm_head.state_dict())
        return out
