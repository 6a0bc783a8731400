"""What a prior is trained on and how its likelihood is measured, behind one small interface.

Both priors share the transformer, the trainer and the evaluation; they differ only here:
`vqtool.prior.absorbing.AbsorbingObjective` and `vqtool.prior.autoregressive.AutoregressiveObjective`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from vqtool.prior.transformer import Transformer


class Objective(Protocol):
    kind: str  # "absorbing" or "autoregressive"

    def loss(
        self, model: Transformer, tokens: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss for a batch of flattened tokens (B, N) int64.

        Returns the scalar to minimise and detached 0-dim tensors to log (read back once per step, not
        per batch: that would wait for the GPU); the dict always holds `bpt`, this batch's estimate of
        the negative log-likelihood bound in bits per token, whatever the loss is.
        """

    def nll(
        self, model: Transformer, tokens: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator
    ) -> torch.Tensor:
        """Per-image negative log-likelihood (exact, or an upper bound / ELBO) in bits per token, (B,)."""

    def nll_estimate(
        self, model: Transformer, tokens: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`nll` and the variance of each image's Monte-Carlo estimate of it, both (B,) (0 when exact)."""

    def settings(self) -> dict[str, Any]:
        """JSON-safe settings, stored in the prior artifact so the objective can be rebuilt."""


def make_objective(kind: str, settings: dict[str, Any] | None = None) -> Objective:
    settings = settings or {}
    if kind == "absorbing":
        from vqtool.prior.absorbing import AbsorbingObjective

        return AbsorbingObjective(**settings)
    if kind == "autoregressive":
        from vqtool.prior.autoregressive import AutoregressiveObjective

        return AutoregressiveObjective(**settings)
    raise ValueError(f"unknown prior {kind!r}; choose absorbing or autoregressive")
