"""Nearest-neighbour vector quantizer with straight-through gradients and codebook-collapse remedies.

The plain VQ-VAE quantizer tends to use a small fraction of its codebook (the Unleashing Transformers
paper reports this as severe). Three remedies are built in, each optional:

- cosine lookup: encoder outputs and codes are l2-normalised before the lookup, so the search is over
  directions on a low-dimensional sphere (Yu et al., "Vector-quantized Image Modeling with Improved
  VQGAN"); every code stays at the same scale as the inputs and cannot drift out of reach;
- k-means initialisation: codes start at k-means centres of real encoder outputs (`init_kmeans`);
- dead-code restart: a code whose running usage share falls under `threshold / K` is re-seeded with an
  encoder output of the current batch (`restart_dead`).

The k-means and restart steps draw randomness from an explicit generator passed in by the trainer.

The running usage is updated by the trainer (`update_usage`), not by `forward`: a forward runs no
collective, so a forward on some ranks only (an extra evaluation batch) cannot hang a multi-process
run. Under DDP the trainer sums each micro-batch's counts over the ranks in one explicit all-reduce per
step, so every rank holds the same usage and agrees on which codes are dead (it also gathers the
encoder outputs and broadcasts rank 0's k-means and restarts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqtool.precision import full_precision


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, D, H, W) quantized vectors with straight-through gradients
    loss: torch.Tensor  # codebook loss + beta * commitment loss
    indices: torch.Tensor  # (B, H, W) int64 code indices
    vectors: torch.Tensor  # (B*H*W, D) the lookup-space inputs, detached (for restarts)


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        beta: float = 0.25,
        cosine: bool = False,
        usage_decay: float = 0.99,
    ):
        super().__init__()
        if codebook_size < 2:
            raise ValueError("codebook_size must be at least 2")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.cosine = cosine
        self.usage_decay = usage_decay
        self.embedding = nn.Parameter(torch.empty(codebook_size, code_dim).uniform_(-1 / codebook_size,
                                                                                     1 / codebook_size))
        # Running share of the lookups each code receives (sums to 1); drives dead-code restarts.
        self.register_buffer("usage", torch.full((codebook_size,), 1.0 / codebook_size))
        # 1 once the codebook was set by k-means, so a resumed run does not initialise it again.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))

    # ----------------------------------------------------------------------------------------------
    # Lookup

    def _prepare(self, flat: torch.Tensor) -> torch.Tensor:
        return F.normalize(flat, dim=-1) if self.cosine else flat

    def codebook(self) -> torch.Tensor:
        """The codes as the lookup sees them (unit vectors in cosine mode)."""
        return self._prepare(self.embedding)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of `flat` (already in lookup space)."""
        codes = self.codebook()
        if self.cosine:
            return (flat @ codes.t()).argmax(dim=1)
        # ‖z‖² + ‖e‖² − 2 z·e in this order, as both papers' code computes it, so near-ties break the same way.
        dist = (flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1)[None, :]) - 2 * (flat @ codes.t())
        return dist.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        if d != self.code_dim:
            raise ValueError(f"quantizer expects {self.code_dim} channels, got {d}")
        # The lookup and its losses in fp32 even under autocast: distances need the precision.
        with full_precision(z.device):
            flat = self._prepare(z.float().permute(0, 2, 3, 1).reshape(-1, d))
            indices = self.nearest(flat.detach())
            q = self.codebook()[indices]
            codebook_loss = F.mse_loss(q, flat.detach())
            commitment_loss = F.mse_loss(flat, q.detach())
            loss = codebook_loss + self.beta * commitment_loss
            q_st = flat + (q - flat).detach()  # straight-through: forward uses q, gradient flows to z
        z_q = q_st.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return QuantizerOutput(z_q=z_q, loss=loss, indices=indices.reshape(b, h, w), vectors=flat.detach())

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) integer indices → (B, D, H, W) codes."""
        q = self.codebook()[indices.long()]
        return q.permute(0, 3, 1, 2).contiguous()

    # ----------------------------------------------------------------------------------------------
    # Collapse remedies

    @torch.no_grad()
    def code_counts(self, indices: torch.Tensor) -> torch.Tensor:
        """Lookups per code, (K,) float32, of a batch's `indices` (any shape)."""
        return torch.bincount(indices.flatten(), minlength=self.codebook_size).float()

    @torch.no_grad()
    def update_usage(self, counts: torch.Tensor) -> None:
        """Move the running usage towards the shares of `counts` (K,): one batch's lookups per code, the
        global batch's in a multi-process run. (K,) rows of a (M, K) tensor are applied in order."""
        for row in counts.reshape(-1, self.codebook_size):
            share = row / row.sum().clamp(min=1)
            self.usage.mul_(self.usage_decay).add_(share.to(self.usage.dtype), alpha=1 - self.usage_decay)

    @torch.no_grad()
    def init_kmeans(self, vectors: torch.Tensor, generator: torch.Generator, iters: int = 10) -> None:
        """Set the codebook to k-means centres of `vectors` (N, D), raw encoder outputs."""
        data = self._prepare(vectors.float())
        centres = kmeans(data, self.codebook_size, generator, iters=iters, spherical=self.cosine)
        self.embedding.data.copy_(centres.to(self.embedding.dtype))
        self.usage.fill_(1.0 / self.codebook_size)
        self.initialized.fill_(1)

    @torch.no_grad()
    def dead_codes(self, threshold: float) -> torch.Tensor:
        """Indices of codes whose running usage share is under `threshold` times the uniform share."""
        return torch.nonzero(self.usage < threshold / self.codebook_size).flatten()

    @torch.no_grad()
    def restart_dead(self, vectors: torch.Tensor, generator: torch.Generator, threshold: float) -> torch.Tensor:
        """Re-seed dead codes with random rows of `vectors` (lookup-space encoder outputs); return their indices."""
        dead = self.dead_codes(threshold)
        n = dead.numel()
        if n == 0 or vectors.shape[0] == 0:
            return dead[:0]
        if vectors.shape[0] >= n:
            pick = torch.randperm(vectors.shape[0], generator=generator)[:n]
        else:
            pick = torch.randint(vectors.shape[0], (n,), generator=generator)
        dead_dev = dead.to(self.embedding.device)
        self.embedding.data[dead_dev] = vectors[pick.to(vectors.device)].to(self.embedding.dtype)
        # A fresh code gets the uniform share, so it has time to attract inputs before being judged again.
        self.usage[dead_dev] = 1.0 / self.codebook_size
        return dead


def kmeans(data: torch.Tensor, k: int, generator: torch.Generator, iters: int = 10,
           spherical: bool = False) -> torch.Tensor:
    """Lloyd's k-means on `data` (N, D) from k-means++ seeds; empty clusters are refilled with random points.

    `spherical` clusters unit vectors by cosine similarity. With fewer points than centres the extra
    centres duplicate points (training or dead-code restarts split them apart later).
    """
    n = data.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one vector")
    centres = _kmeans_pp(data, k, generator, spherical)
    for _ in range(iters):
        assign = _distances(data, centres, spherical).argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, data)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None].to(data.dtype)
        empty = torch.nonzero(~filled).flatten()
        if empty.numel():
            refill = torch.randint(n, (empty.numel(),), generator=generator).to(data.device)
            centres[empty] = data[refill]
        if spherical:
            centres = F.normalize(centres, dim=-1)
    return centres


def _distances(data: torch.Tensor, centres: torch.Tensor, spherical: bool) -> torch.Tensor:
    if spherical:
        return (1 - data @ centres.t()).clamp(min=0)
    return (data.pow(2).sum(1, keepdim=True) - 2 * data @ centres.t() + centres.pow(2).sum(1)[None]).clamp(min=0)


def _kmeans_pp(data: torch.Tensor, k: int, generator: torch.Generator, spherical: bool) -> torch.Tensor:
    """k-means++ seeding: each new centre is drawn with probability proportional to its squared distance."""
    n = data.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [data[first]]
    closest = _distances(data, data[first][None], spherical)[:, 0]
    for _ in range(1, k):
        weights = closest.double().cpu()
        if weights.sum() <= 0:  # every point already is a centre: duplicate random points
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            pick = int(torch.multinomial(weights, 1, generator=generator))
        centres.append(data[pick])
        closest = torch.minimum(closest, _distances(data, data[pick][None], spherical)[:, 0])
    return torch.stack(centres).clone()


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Usage (fraction of codes used at least once) and perplexity (exp of the usage entropy) from counts (K,)."""
    counts = counts.double()
    total = counts.sum().item()
    if total == 0:
        return {"usage": 0.0, "perplexity": 0.0}
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"usage": (counts > 0).double().mean().item(), "perplexity": math.exp(entropy)}
