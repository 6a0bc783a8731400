"""Unmasking schedules for the absorbing prior: which masked tokens get revealed at each step.

A schedule only sees one function, `predict(tokens, positions) -> logits`: the denoiser's logits over
the codebook at the asked positions of a flattened, partly masked grid. Whether that function is one
transformer pass or a mixture of windows over a large grid (vqtool.prior.windows) is invisible here,
so every schedule works with every predictor.

A schedule is two things:
  - `masked_after(n_tokens, steps)`: how many tokens are still masked after each step, from N down to 0;
  - `step(...)`: reveal a given number of masked tokens in place.
`reveal()` drives them and can start from any partly masked state (inpainting continues the reverse
process from the step whose masked count matches).

Schedules (`SCHEDULES` maps each name to its class):
  random      the paper's: each step reveals evenly many of the still-masked tokens, drawn from the
              (temperature-scaled) prediction; revealed tokens never change. With steps = N it reveals
              exactly one token per step. Which masked tokens come first is the order's
              (vqtool.prior.orders): `random` (the paper's), `raster` (its alternative for large
              images) or `halton` (Halton-MaskGIT).
  confidence  MaskGIT: the count left masked follows a cosine (or arccos) curve; each step draws every
              masked token and keeps the most confident draws, with Gumbel noise on the confidences
              annealed linearly to zero. The order lays the noise out: `random` is MaskGIT's i.i.d.
              noise, `halton` gives the larger noise to the masked positions that come first in the
              Halton order, so early steps, where the noise dominates, spread their picks over the grid.

A new schedule is a class with `name`, `options` (the settings `make_schedule` passes it, by keyword),
`orders` (the orders it takes), `masked_after` and `step`, and one entry in `SCHEDULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from vqtool.errors import VqtoolError
from vqtool.prior.logits import Draw
from vqtool.prior.orders import ORDERS, Order, RandomOrder, make_order

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""predict(tokens (B, N) int64 with MASK ids, positions (B, k) int64) -> logits (B, k, V) float.

A predictor whose output depends on the step (the guided one, vqtool.prior.guidance) also has
`at_step(index, total)`: `reveal` calls it before each step with the step's place in the whole schedule."""

CURVES = ("cosine", "arccos")


class Schedule(Protocol):
    name: str
    options: tuple[str, ...]  # the settings make_schedule passes to the constructor
    orders: tuple[str, ...]  # the unmasking orders it takes

    def masked_after(self, n_tokens: int, steps: int) -> list[int]:
        """Tokens still masked after step 0..S: strictly decreasing from n_tokens to 0 (S ≤ n_tokens)."""

    def step(self, predict: Predict, tokens: torch.Tensor, masked: torch.Tensor, reveal: int, done: float,
             draw: Draw, generator: torch.Generator) -> None:
        """Reveal `reveal` masked tokens of every row, updating `tokens` and `masked` (B, N) in place.

        `done` is the fraction of the whole process completed after this step (1.0 at the last one).
        """


def _strictly_decreasing(counts: list[int]) -> list[int]:
    """Clamp a count curve so that every step reveals at least one token and the last leaves none."""
    steps = len(counts) - 1
    out = [counts[0]]
    for i in range(1, steps + 1):
        # At most one fewer than before, at least enough left for one token per remaining step.
        out.append(max(min(counts[i], out[-1] - 1), steps - i))
    return out


def _masked_positions(masked: torch.Tensor) -> torch.Tensor:
    """(B, m) indices of the masked positions of each row, ascending; every row must have m of them."""
    counts = masked.sum(1)
    m = int(counts[0])
    if bool((counts != m).any()):
        raise ValueError("every row must have the same number of masked tokens")
    # A stable sort puts masked (key 0) before unmasked (key 1), each group in index order.
    return torch.sort((~masked).to(torch.uint8), dim=1, stable=True).indices[:, :m]


class RandomSchedule:
    """Evenly many tokens per step, at the masked positions that come first in the order."""

    name = "random"
    options = ("order",)
    orders = ("random", "raster", "halton")

    def __init__(self, order: Order | None = None):
        self.order = order if order is not None else RandomOrder()

    def masked_after(self, n_tokens: int, steps: int) -> list[int]:
        steps = max(1, min(steps, n_tokens))
        return [n_tokens - (n_tokens * i) // steps for i in range(steps + 1)]

    def step(self, predict: Predict, tokens: torch.Tensor, masked: torch.Tensor, reveal: int, done: float,
             draw: Draw, generator: torch.Generator) -> None:
        B, N = tokens.shape
        score = self.order.keys(B, N, generator, tokens.device)
        # Unmasked positions get a score no masked one can have, so the k smallest are all masked.
        score = score.masked_fill(~masked, float("inf"))
        positions = torch.topk(score, reveal, dim=1, largest=False, sorted=True).indices
        ids, _ = draw(predict(tokens, positions), generator)
        tokens.scatter_(1, positions, ids)
        masked.scatter_(1, positions, False)


class ConfidenceSchedule:
    """MaskGIT: draw every masked token, keep the most confident ones, re-mask the rest."""

    name = "confidence"
    options = ("curve", "order")
    orders = ("random", "halton")  # raster would sweep top to bottom against the confidences

    def __init__(self, curve: str = "cosine", order: Order | None = None, noise: float = 4.5):
        if curve not in CURVES:
            raise ValueError(f"curve must be one of {', '.join(CURVES)}, not {curve!r}")
        self.curve = curve
        self.order = order if order is not None else RandomOrder()
        self.noise = noise  # Gumbel scale at the first step (MaskGIT's choice temperature)

    def fraction_masked(self, r: float) -> float:
        """The curve: fraction of tokens still masked when a fraction r of the steps is done."""
        if self.curve == "cosine":
            return math.cos(math.pi / 2 * r)
        return math.acos(r) / (math.pi / 2)

    def masked_after(self, n_tokens: int, steps: int) -> list[int]:
        steps = max(1, min(steps, n_tokens))
        raw = [math.floor(n_tokens * self.fraction_masked(i / steps) + 1e-9) for i in range(steps + 1)]
        raw[0], raw[-1] = n_tokens, 0
        return _strictly_decreasing(raw)

    def step(self, predict: Predict, tokens: torch.Tensor, masked: torch.Tensor, reveal: int, done: float,
             draw: Draw, generator: torch.Generator) -> None:
        positions = _masked_positions(masked)
        ids, logp = draw(predict(tokens, positions), generator)
        scale = self.noise * (1.0 - done)
        if scale > 0:
            u = self.order.preference(positions, tokens.shape[1], generator).clamp_(1e-20, 1.0 - 1e-7)
            logp = logp + scale * -torch.log(-torch.log(u))
        keep = torch.topk(logp, reveal, dim=1).indices
        chosen = positions.gather(1, keep)
        tokens.scatter_(1, chosen, ids.gather(1, keep))
        masked.scatter_(1, chosen, False)


SCHEDULES = {"random": RandomSchedule, "confidence": ConfidenceSchedule}


def make_schedule(name: str, order: str = "random", curve: str = "cosine",
                  grid: tuple[int, int] | None = None) -> Schedule:
    """The schedule `name` with the settings it takes, checked; `grid` is the token grid (H, W) it runs on."""
    if name not in SCHEDULES:
        raise VqtoolError(f"--schedule must be one of {', '.join(SCHEDULES)} (got {name!r})")
    if curve not in CURVES:
        raise VqtoolError(f"--curve must be one of {', '.join(CURVES)} (got {curve!r})")
    kind = SCHEDULES[name]
    if order in ORDERS and order not in kind.orders:
        takers = [n for n, k in SCHEDULES.items() if order in k.orders]
        raise VqtoolError(f"--order {order} applies to --schedule {' | '.join(takers)}; "
                          f"the {name} schedule takes {' | '.join(kind.orders)}")
    given = {"order": make_order(order, grid), "curve": curve}
    return kind(**{key: given[key] for key in kind.options})


def plan(schedule: Schedule, n_tokens: int, steps: int, n_masked: int) -> list[tuple[int, float]]:
    """(tokens to reveal, fraction done after it) for each step left, continuing a full-grid schedule
    from the step whose masked count matches `n_masked` (all of a fresh sample; fewer when inpainting)."""
    return [(count, (index + 1) / total) for index, count, total in _steps_left(schedule, n_tokens, steps, n_masked)]


def _steps_left(schedule: Schedule, n_tokens: int, steps: int, n_masked: int) -> list[tuple[int, int, int]]:
    """(index of the step in the whole schedule, tokens it reveals, steps of the whole schedule) of `plan`."""
    counts = schedule.masked_after(n_tokens, steps)
    total = len(counts) - 1
    # The latest step at which at least n_masked tokens were still masked: continue from there.
    start = max(i for i, c in enumerate(counts) if c >= n_masked)
    out, before = [], n_masked
    for i in range(start + 1, total + 1):
        out.append((i - 1, before - counts[i], total))
        before = counts[i]
    return out


def reveal(predict: Predict, tokens: torch.Tensor, mask_id: int, schedule: Schedule, steps: int, draw: Draw,
           generator: torch.Generator, on_step: Callable[[], None] | None = None,
           n_tokens: int | None = None) -> torch.Tensor:
    """Run the reverse process on `tokens` (B, N) until no MASK is left; returns the new tokens.

    Every row must hold the same number of MASK ids. `n_tokens` is the grid size the `steps` refer to
    (default N): the process continues from the step whose masked count matches.
    """
    tokens = tokens.clone()
    masked = tokens == mask_id
    per_row = masked.sum(1)
    if per_row.numel() and bool((per_row != per_row[0]).any()):
        raise ValueError("every row must have the same number of masked tokens")
    n_masked = int(per_row[0]) if per_row.numel() else 0
    at_step = getattr(predict, "at_step", None)
    for index, count, total in _steps_left(schedule, n_tokens or tokens.shape[1], steps, n_masked):
        if at_step is not None:
            at_step(index, total)
        schedule.step(predict, tokens, masked, count, (index + 1) / total, draw, generator)
        if on_step is not None:
            on_step()
    return tokens


def n_steps(schedule: Schedule, n_tokens: int, steps: int, n_masked: int | None = None) -> int:
    """How many predictor calls `reveal` will make (for progress bars)."""
    return len(plan(schedule, n_tokens, steps, n_tokens if n_masked is None else n_masked))
