"""The autoregressive prior (Taming Transformers' GPT): raster-order next-token prediction.

The shared transformer runs with causal attention and a learned start (or class) token in front, so
the logits at position i predict token i from the start token and tokens < i. Training minimises the
cross-entropy of every token at once; the likelihood is exact by the chain rule.

Sampling draws one token at a time in raster order. With the KV cache each new token costs one
position's forward pass; without it the whole prefix is recomputed for every token (the reference the
cache is checked against: both give the same tokens for the same generator). A grid larger than the
training grid is sampled with Taming's sliding window: every token is predicted inside a window of
the training size placed around it (clamped at the edges), from the window's own tokens at positions
relative to the window. With classifier-free guidance (vqtool.prior.guidance) the model sees every grid
twice, with its class and with NO_CLASS, as one doubled batch that shares the drawn tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vqtool.errors import VqtoolError
from vqtool.prior.guidance import Guidance, both_branches, check_guided_labels, guide
from vqtool.prior.logits import Draw
from vqtool.prior.transformer import NO_CLASS, KVCache, Transformer

LN2 = math.log(2.0)


class AutoregressiveObjective:
    """Next-token cross-entropy in raster order; `nll` is the exact negative log-likelihood."""

    kind = "autoregressive"

    def loss(
        self, model: Transformer, tokens: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross-entropy in nats over a batch (B, N); `bpt` is the same number in bits per token (a
        0-dim tensor, read back by the trainer once per step).

        The generator is unused: the objective is deterministic. The model is called through
        `__call__` so a DistributedDataParallel wrapper still synchronises gradients.
        """
        tokens = tokens.long()
        logits = model(tokens, labels)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))
        return loss, {"bpt": loss.detach() / LN2}

    @torch.no_grad()
    def nll(
        self, model: Transformer, tokens: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator
    ) -> torch.Tensor:
        """Exact −log₂ p(tokens) / N per image, (B,): the chain rule over raster order."""
        tokens = tokens.long()
        logits = model(tokens, labels).float()
        nats = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")  # (B, N)
        return nats.mean(dim=1) / LN2

    def nll_estimate(self, model: Transformer, tokens: torch.Tensor, labels: torch.Tensor | None,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`nll` and its variance, which is zero: the chain rule leaves nothing to estimate."""
        bits = self.nll(model, tokens, labels, generator)
        return bits, torch.zeros_like(bits)

    def settings(self) -> dict[str, Any]:
        return {}


# --------------------------------------------------------------------------------------------------
# Sampling


def window_start(i: int, size: int, window: int) -> int:
    """First row (or column) of the training-sized window that holds index `i` of a `size`-long axis.

    The window is centred on `i` where it fits and clamped at the edges (Taming Transformers' rule), so
    the token sits at local index window // 2 away from the edges.
    """
    return min(max(i - window // 2, 0), size - window)


def _check_request(model: Transformer, n: int, shape: tuple[int, int], labels: torch.Tensor | None) -> None:
    cfg = model.cfg
    if not cfg.causal:
        raise VqtoolError("this prior is not autoregressive (its transformer is bidirectional); "
                          "sample it with the absorbing sampler")
    if n < 1:
        raise VqtoolError(f"number of samples must be at least 1 (got {n})")
    H, W = shape
    if H < 1 or W < cfg.grid[1]:
        raise VqtoolError(f"--shape {H} {W}: an autoregressive prior needs at least 1 row and at least "
                          f"{cfg.grid[1]} columns (its training width); use a wider --shape")
    if labels is not None:
        if cfg.n_classes == 0:
            raise VqtoolError("this prior is unconditional; do not pass class labels")
        if labels.shape != (n,):
            raise VqtoolError(f"expected {n} class labels, got a tensor of shape {tuple(labels.shape)}")
        if int(labels.min()) < NO_CLASS or int(labels.max()) >= cfg.n_classes:
            raise VqtoolError(f"class labels must lie in 0..{cfg.n_classes - 1} (or {NO_CLASS}: no class)")


def sample_autoregressive(
    model: Transformer,
    n: int,
    shape: tuple[int, int] | None,
    draw: Draw,
    labels: torch.Tensor | None,
    generator: torch.Generator,
    use_cache: bool = True,
    on_token: Callable[[], None] | None = None,
    guidance: Guidance | None = None,
) -> torch.Tensor:
    """Draw `n` token grids (n, H, W) int64 on the model's device, one token at a time in raster order.

    `draw` turns each position's logits into a token (temperature, top-k, top-p). `shape` None means
    the training grid. A larger grid is sampled with the sliding window; the grid
    must be at least as wide as the training grid (it may be shorter: fewer rows is an exact prefix).
    `generator` must live on the model's device. `on_token` is called once per grid position (for all
    `n` grids at once), for a progress bar. With `use_cache=False` the whole prefix is recomputed for
    every token; it draws the same tokens as the cached path. With `guidance` each position's logits
    are guided (vqtool.prior.guidance): both branches run as one doubled batch, with one cache for it.
    """
    h, w = model.cfg.grid
    H, W = tuple(shape) if shape is not None else (h, w)
    _check_request(model, n, (H, W), labels)
    if guidance is not None:
        check_guided_labels(labels)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _sample_windows(model, n, (H, W), draw, labels, generator, use_cache, on_token, guidance)
    finally:
        model.train(was_training)


def _sample_windows(
    model: Transformer,
    n: int,
    shape: tuple[int, int],
    draw: Draw,
    labels: torch.Tensor | None,
    generator: torch.Generator,
    use_cache: bool,
    on_token: Callable[[], None] | None,
    guidance: Guidance | None = None,
) -> torch.Tensor:
    """Raster-order sampling where each token is predicted inside its window.

    On the training grid there is one window, the whole grid, and this is plain autoregressive
    sampling. The KV cache serves as long as consecutive tokens share a window and follow each other
    in the window's raster order; when the window moves, its prefix is fed afresh as one chunk.
    With guidance the model sees `branches` = 2 copies of every grid (conditional, then unconditional)
    that share the drawn tokens.
    """
    H, W = shape
    h, w = model.cfg.grid
    wh = min(H, h)  # window height (a grid shorter than training uses the top rows only)
    device = next(model.parameters()).device
    if labels is not None:
        labels = labels.to(device)
    branches = 1
    if guidance is not None:
        branches, labels = 2, both_branches(labels)
    rows = branches * n
    tokens = torch.zeros(n, H, W, dtype=torch.long, device=device)
    positions = model.position_table()  # (h * w, d), the window's raster order
    prefix = model.prefix_embedding(labels, rows, device)  # (rows, 1, d): start or class token
    cache: KVCache | None = None
    cache_at: tuple[int, int, int] | None = None  # (top, left, next window index) the cache can continue
    previous: torch.Tensor | None = None
    for i in range(H):
        top = window_start(i, H, wh)
        for j in range(W):
            left = window_start(j, W, w)
            k = (i - top) * w + (j - left)  # this token's index in its window's raster order
            if use_cache and cache_at == (top, left, k):
                # Same window, next position: feed only the token sampled last.
                x = model.tok_emb(previous)[:, None, :] + positions[k - 1]
                logits = model.decode_step(x, cache)
            else:
                context = tokens[:, top:top + wh, left:left + w].reshape(n, -1)[:, :k].repeat(branches, 1)
                if use_cache:
                    # Entries past `length` are never read, so a moved window reuses the buffers.
                    if cache is None:
                        cache = model.new_cache(rows, device)
                    cache.length = 0
                    x = torch.cat([prefix, model.tok_emb(context) + positions[:k]], dim=1)
                    logits = model.decode_step(x, cache)
                else:
                    logits = model.head(model.trunk(context, labels)[:, -1])
            logits = logits.float()
            if guidance is not None:
                cond, uncond = logits.chunk(2)
                logits = guide(cond, uncond, guidance.at(i * W + j, H * W))
            drawn = draw.ids(logits, generator)
            tokens[:, i, j] = drawn
            previous = drawn.repeat(branches)  # the next feed of every branch
            cache_at = (top, left, k + 1)
            if on_token is not None:
                on_token()
    return tokens
