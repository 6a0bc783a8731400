"""Classifier-free guidance: sample a class-conditional prior towards its class, for both priors.

A prior trained with `cond_drop` > 0 (vqtool.prior.train) has also learned to predict without a class:
its prefix row 0, asked for with label NO_CLASS. Guidance mixes the two predictions of every draw,

    logits = uncond + (1 + S) · (cond − uncond),

so S = 0 is plain conditional sampling and a larger S pushes each draw further from what the prior
expects of any class towards what it expects of this one (sharper classes, less variety). Both
branches run in one forward pass of a doubled batch: rows :B with the labels, rows B: with NO_CLASS.

The scale may change over the process (`SCHEDULES`):
  constant  S at every step.
  linear    0 at the first step up to S at the last, as MUSE-style samplers do: the early steps, which
            lay out the image, stay diverse; the late ones follow the class. The steps are those of the
            absorbing prior's whole schedule (inpainting continues it, so a small hole runs the late,
            strongly guided steps) or the autoregressive prior's grid positions in raster order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqtool.errors import VqtoolError
from vqtool.prior.schedules import Predict
from vqtool.prior.transformer import NO_CLASS


def constant_scale(scale: float, index: int, total: int) -> float:
    return scale


def linear_scale(scale: float, index: int, total: int) -> float:
    # A one-step process is its own last step.
    return scale * index / (total - 1) if total > 1 else scale


SCHEDULES = {"constant": constant_scale, "linear": linear_scale}


@dataclass(frozen=True)
class Guidance:
    """A guidance scale S and how it runs over the steps; checked when made."""

    scale: float
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise VqtoolError(f"--guidance-schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if not self.scale >= 0:
            raise VqtoolError(f"--guidance must be 0 or more (got {self.scale})")

    def at(self, index: int, total: int) -> float:
        """The scale of step `index` (0-based) of `total`."""
        return SCHEDULES[self.schedule](self.scale, index, total)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """The guided logits of one prediction, in fp32."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + (1.0 + scale) * (cond - uncond)


def both_branches(labels: torch.Tensor) -> torch.Tensor:
    """(B,) labels → (2B,): the labels, then NO_CLASS for every row (the unconditional branch)."""
    return torch.cat([labels, torch.full_like(labels, NO_CLASS)])


def check_guided_labels(labels: torch.Tensor | None) -> None:
    """Guidance steers towards a class: every row needs one."""
    if labels is None:
        raise VqtoolError("--guidance needs class labels: sample a class-conditional prior with its classes")
    if bool((labels == NO_CLASS).any()):
        raise VqtoolError("--class none with --guidance: there is no class to guide towards; drop one of them")


class GuidedPredictor:
    """A `Predict` over B rows made from `doubled`, a `Predict` over 2B rows whose labels are
    `both_branches(labels)`: one call of `doubled` gives both branches, which `guide` mixes.

    `reveal` tells it the step (`at_step`) so the scale follows the guidance schedule; without that
    it uses the full scale."""

    def __init__(self, doubled: Predict, guidance: Guidance):
        self.doubled = doubled
        self.guidance = guidance
        self.scale = guidance.scale

    def at_step(self, index: int, total: int) -> None:
        self.scale = self.guidance.at(index, total)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        logits = self.doubled(torch.cat([tokens, tokens]), torch.cat([positions, positions]))
        cond, uncond = logits.chunk(2)
        return guide(cond, uncond, self.scale)
