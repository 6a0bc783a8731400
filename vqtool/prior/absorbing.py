"""Absorbing-state discrete diffusion (Unleashing Transformers): forward process, losses and ELBO.

Forward process q(x_t | x_0): at step t of T each token is replaced by [MASK] independently with
probability t/T ("random"), or exactly round(t/T·N) of the N tokens are ("fixed"). The transformer sees
x_t and predicts the original token at every masked position. Unmasked positions carry no loss, so
their logits are never computed: the head runs on the masked rows only.

The variational bound on a grid x_0 of N tokens is

    -log p(x_0) ≤ Σ_{t=1..T} (1/t) · E_{q(x_t|x_0)} [ Σ_{i masked} -log p(x_0^i | x_t) ],

so one draw t ~ U{1..T} estimates it without bias as (T/t)·CE, with CE the summed cross-entropy over
the masked tokens. Divided by N·ln 2 this is bits per token (`bpt`), logged whatever the loss is.

Losses (all per image, then averaged over the batch; all in bits):
  elbo             (T/t)·CE / (N ln 2): the bound itself.
  reweighted-elbo  ((T − t + 1)/T)·CE / (N ln 2): the paper's L_rw. The weight falls linearly from 1 at
                   t = 1 to 1/T at t = T, which down-weights the heavily masked steps the 1/t of the bound
                   makes noisy. (The official code writes the weight as 1 − t/T, which gives the fully
                   masked step t = T, the one every sample starts from, no weight at all; the paper's
                   form keeps it.)
  mlm              CE / (number masked) / ln 2: plain masked-token cross-entropy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from vqtool.errors import VqtoolError

LN2 = math.log(2.0)
LOSSES = ("reweighted-elbo", "elbo", "mlm")
MASK_SCHEDULES = ("random", "fixed")


def _config(model: torch.nn.Module):
    # A DistributedDataParallel wrapper keeps the transformer in `.module`.
    return getattr(model, "module", model).cfg


class AbsorbingObjective:
    """The absorbing-diffusion prior's objective (see the module docstring).

    `T` is the number of diffusion steps; `nll_samples` is K, the number of t values per image that
    `nll` averages over (None: every t = 1..T once, exact in t as the official code does it).
    """

    kind = "absorbing"

    def __init__(self, T: int = 256, mask_schedule: str = "random", loss: str = "reweighted-elbo",
                 nll_samples: int | None = None):
        if not isinstance(T, int) or T < 1:
            raise VqtoolError(f"prior timesteps (T) must be a positive integer (got {T!r})")
        if mask_schedule not in MASK_SCHEDULES:
            raise VqtoolError(f"mask_schedule must be one of {', '.join(MASK_SCHEDULES)} (got {mask_schedule!r})")
        if loss not in LOSSES:
            raise VqtoolError(f"--loss must be one of {', '.join(LOSSES)} (got {loss!r})")
        if nll_samples is not None and (not isinstance(nll_samples, int) or nll_samples < 1):
            raise VqtoolError(f"nll_samples must be a positive integer or null (got {nll_samples!r})")
        self.T = T
        self.mask_schedule = mask_schedule
        self.loss_name = loss
        self.nll_samples = nll_samples

    def settings(self) -> dict[str, Any]:
        return {"T": self.T, "mask_schedule": self.mask_schedule, "loss": self.loss_name,
                "nll_samples": self.nll_samples}

    # -- forward process ----------------------------------------------------------------------------

    def sample_t(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """t ~ U{1..T} per image, (B,) int64 on the generator's device."""
        return torch.randint(1, self.T + 1, (batch,), generator=generator, device=generator.device)

    def fixed_counts(self, t: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Tokens the `fixed` schedule masks at step t: round(t/T·N), at least one."""
        return torch.round(t.double() * n_tokens / self.T).long().clamp_(1, n_tokens)

    def mask_for(self, t: torch.Tensor, n_tokens: int, generator: torch.Generator,
                 schedule: str | None = None) -> torch.Tensor:
        """Which tokens q(x_t | x_0) masks, (B, N) bool on the generator's device."""
        schedule = schedule or self.mask_schedule
        t = t.to(generator.device)
        r = torch.rand((t.shape[0], n_tokens), generator=generator, device=generator.device)
        if schedule == "random":
            return r < (t.to(r.dtype) / self.T)[:, None]
        # Exactly k per row: the k positions with the smallest random keys.
        ranks = r.argsort(dim=1).argsort(dim=1)
        return ranks < self.fixed_counts(t, n_tokens)[:, None]

    def masked_cross_entropy(self, model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                             labels: torch.Tensor | None) -> torch.Tensor:
        """Summed cross-entropy (nats) over each image's masked tokens, (B,).

        The model sees x_t (masked tokens replaced by MASK) and computes logits at masked positions only.
        """
        x_t = tokens.masked_fill(mask, _config(model).mask_id)
        logits = model(x_t, labels, where=mask)  # (M, vocab), row-major over (B, N)
        ce = F.cross_entropy(logits.float(), tokens[mask], reduction="none")
        rows = torch.arange(tokens.shape[0], device=tokens.device).repeat_interleave(mask.sum(dim=1))
        return torch.zeros(tokens.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)

    # -- the Objective interface --------------------------------------------------------------------

    def loss(self, model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None,
             generator: torch.Generator,
             part: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`part=(first, total)`: `tokens` are rows first.. of a global batch of `total` rows split over
        processes or micro-batches. The noise is drawn for the whole global batch and this part's rows are
        kept, so the masks do not depend on the split (the trainer gives every part the same generator)."""
        if _config(model).causal:
            raise ValueError("the absorbing objective needs a bidirectional transformer")
        tokens = tokens.long()
        B, N = tokens.shape
        first, total = part if part is not None else (0, B)
        t = self.sample_t(total, generator)
        mask = self.mask_for(t, N, generator)
        t, mask = t[first:first + B].to(tokens.device), mask[first:first + B].to(tokens.device)
        ce = self.masked_cross_entropy(model, tokens, mask, labels)
        n_masked = mask.sum(dim=1).clamp(min=1).to(ce.dtype)
        tf = t.to(ce.dtype)
        if self.mask_schedule == "random":
            bound = ce * (self.T / tf) / (N * LN2)
        else:
            # Exactly k masked: (N/k)·CE estimates the exactly-k bound Σ_{k=1..N} (1/k)·E[CE_k] without bias
            # only when T = N (k = t then runs over 1..N evenly); for another T, k = round(t·N/T) skips or
            # repeats counts, and the figure is a weighted variant of that bound.
            bound = ce * (N / n_masked) / (N * LN2)
        if self.loss_name == "elbo":
            per_image = bound
        elif self.loss_name == "reweighted-elbo":
            per_image = ce * ((self.T - tf + 1) / self.T) / (N * LN2)
        else:  # mlm
            per_image = ce / n_masked / LN2
        # A tensor, not a float: the trainer reads a step's numbers back once, not after every micro-batch.
        return per_image.mean(), {"bpt": bound.detach().mean()}

    def stratified_t(self, k: int, K: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        """The k-th of K stratified draws of t per image, (B,): t = ⌊(k + u)·T/K⌋ + 1 with u ~ U[0, 1).

        Averaging any f(t) over k = 0..K-1 is an unbiased estimate of its mean over t ~ U{1..T}; with
        K = T it is exactly t = k + 1 (every step once).
        """
        if K == self.T:
            return torch.full((batch,), k + 1, dtype=torch.long, device=generator.device)
        u = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float64)
        return (torch.floor((k + u) * self.T / K).long() + 1).clamp_(1, self.T)

    @torch.no_grad()
    def nll(self, model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None,
            generator: torch.Generator, part: tuple[int, int] | None = None) -> torch.Tensor:
        """Per-image ELBO in bits per token, (B,): T·mean_k[(1/t_k)·CE(t_k)] / (N ln 2).

        Always the `random` forward process, for which the bound holds as written. `part` as in `loss`.
        """
        return self.nll_estimate(model, tokens, labels, generator, part)[0]

    @torch.no_grad()
    def nll_estimate(self, model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None,
                     generator: torch.Generator,
                     part: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`nll` and the Monte-Carlo variance of each image's estimate, both (B,).

        One draw per stratum leaves no within-stratum spread to measure, so the variance comes from the
        differences of neighbouring strata (the successive-difference estimator of systematic sampling):
        Var ≈ Σ_k (f_k − f_{k−1})² / (2K(K−1)). Neighbouring t have nearly equal means, so it slightly
        overstates the error rather than understating it. NaN when K = 1.
        """
        tokens = tokens.long()
        B, N = tokens.shape
        first, rows = part if part is not None else (0, B)
        K = self.nll_samples or self.T
        scale = self.T / (N * LN2)  # f_k = scale·CE(t_k)/t_k: the bound in bits per token from draw k
        total = torch.zeros(B, dtype=torch.float64, device=tokens.device)
        squared_steps = torch.zeros_like(total)
        previous = None
        for k in range(K):
            t = self.stratified_t(k, K, rows, generator)
            mask = self.mask_for(t, N, generator, schedule="random")
            t, mask = t[first:first + B], mask[first:first + B].to(tokens.device)
            f = self.masked_cross_entropy(model, tokens, mask, labels).double() / t.to(tokens.device).double()
            f = f * scale
            total += f
            if previous is not None:
                squared_steps += (f - previous) ** 2
            previous = f
        variance = squared_steps / (2 * K * (K - 1)) if K > 1 else torch.full_like(total, float("nan"))
        return (total / K).float(), variance.float()
