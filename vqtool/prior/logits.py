"""Turning logits into a sampling distribution: temperature, top-k and nucleus (top-p) filtering.

`Draw` bundles the three settings once, checked, for both priors' samplers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqtool.errors import VqtoolError


def filter_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Scale by 1/temperature, then keep the k most likely and/or the smallest set with mass ≥ p.

    Removed entries become -inf; the last dimension is the vocabulary.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches p (the most likely one always stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """One draw per row of `logits` (..., V) → indices (...)."""
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


@dataclass(frozen=True)
class Draw:
    """How one token is drawn from a prediction: temperature, then optional top-k / nucleus filtering.

    Checked when made, so a sampler that holds one never checks the three settings again.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise VqtoolError(f"--temperature must be positive (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise VqtoolError(f"--top-k must be at least 1 (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise VqtoolError(f"--top-p must lie in (0, 1] (got {self.top_p})")

    def __call__(self, logits: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (..., V) → (drawn ids (...), log-probability of each drawn id under the filtered law)."""
        logp = filter_logits(logits.float(), self.temperature, self.top_k, self.top_p).log_softmax(-1)
        flat = logp.reshape(-1, logp.shape[-1]).exp()
        ids = torch.multinomial(flat, 1, generator=generator).reshape(logp.shape[:-1])
        return ids, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    def ids(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Only the drawn ids (...), for a sampler that needs no log-probabilities (the autoregressive one)."""
        return sample_from_logits(logits, generator, self.temperature, self.top_k, self.top_p)
