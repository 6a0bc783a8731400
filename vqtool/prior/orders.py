"""Unmasking orders: which masked positions of a token grid an absorbing-prior schedule prefers.

An order gives every position of the flattened grid a key, smaller first. A schedule uses it in its
own way (vqtool.prior.schedules):
  - the random schedule reveals the masked positions with the smallest keys;
  - the confidence schedule lays its Gumbel noise out by the order (`preference`): the earliest masked
    position gets the largest of the noise's quantiles, the latest the smallest.

Orders:
  random  fresh uniform keys at every call: a new random order per step and per image (the paper's).
  raster  row by row, left to right (the paper's alternative for large images).
  halton  the order in which the 2-D Halton sequence (bases 2 and 3) first visits each cell of the
          grid (Halton-MaskGIT, Besnier et al. 2025). A low-discrepancy sequence: every run of
          consecutive positions is spread out over the grid, so the tokens revealed together lie far
          apart. The same for every image.

`ORDERS` maps each name to its class; every class is made as `cls(grid)`.
"""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import Protocol

import torch

from vqtool.errors import VqtoolError


class Order(Protocol):
    name: str

    def keys(self, batch: int, n_tokens: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """(batch, n_tokens) float keys of every position; smaller first."""

    def preference(self, positions: torch.Tensor, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
        """(B, k) quantiles in (0, 1) for the asked positions (B, k) of n_tokens, larger for earlier ones."""


class RandomOrder:
    name = "random"

    def __init__(self, grid: tuple[int, int] | None = None):
        self.grid = grid  # not needed: every position is alike

    def keys(self, batch: int, n_tokens: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.rand((batch, n_tokens), generator=generator, device=device)

    def preference(self, positions: torch.Tensor, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
        # Independent uniform draws: MaskGIT's Gumbel noise, exactly as it was drawn before orders existed.
        return torch.rand(positions.shape, generator=generator, device=positions.device)


class _FixedOrder:
    """An order that is the same at every step and for every image; a subclass defines
    `ranks(n_tokens)`: (n_tokens,) int64, the place of every raster position in the order."""

    def keys(self, batch: int, n_tokens: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return self.ranks(n_tokens).to(device=device, dtype=torch.float32).expand(batch, n_tokens)

    def preference(self, positions: torch.Tensor, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
        # The k asked positions get the k midpoint quantiles, (k - 0.5)/k for the earliest down to 0.5/k,
        # so noise made from them follows the law of a random order's, only laid out in this order.
        place = self.ranks(n_tokens).to(positions.device)[positions].argsort(dim=1).argsort(dim=1)
        return 1.0 - (place.to(torch.float32) + 0.5) / positions.shape[1]


class RasterOrder(_FixedOrder):
    name = "raster"

    def __init__(self, grid: tuple[int, int] | None = None):
        self.grid = grid  # not needed: raster order is the index order

    def ranks(self, n_tokens: int) -> torch.Tensor:
        return torch.arange(n_tokens)


class HaltonOrder(_FixedOrder):
    name = "halton"

    def __init__(self, grid: tuple[int, int] | None = None):
        if grid is None:
            raise VqtoolError("--order halton needs the token grid (H, W) to spread the positions over")
        self.grid = (int(grid[0]), int(grid[1]))
        order = torch.tensor(halton_order(self.grid))
        self._ranks = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))

    def ranks(self, n_tokens: int) -> torch.Tensor:
        if n_tokens != self._ranks.numel():
            raise ValueError(f"the halton order was made for a {self.grid[0]}×{self.grid[1]} grid, "
                             f"not for {n_tokens} tokens")
        return self._ranks


ORDERS = {"random": RandomOrder, "raster": RasterOrder, "halton": HaltonOrder}


def make_order(name: str, grid: tuple[int, int] | None = None) -> Order:
    if name not in ORDERS:
        raise VqtoolError(f"--order must be one of {', '.join(ORDERS)} (got {name!r})")
    return ORDERS[name](grid)


# --------------------------------------------------------------------------------------------------
# The Halton sequence


def radical_inverse(i: int, base: int) -> Fraction:
    """φ_base(i), exactly: the base-`base` digits of i mirrored about the radix point (6 = 110₂ → 0.011₂)."""
    return Fraction(*_mirrored(i, base))


def _mirrored(i: int, base: int) -> tuple[int, int]:
    """(numerator, denominator) of φ_base(i), in integers: the Halton loop makes many of them."""
    num, den = 0, 1
    while i:
        i, digit = divmod(i, base)
        num, den = num * base + digit, den * base
    return num, den


@functools.lru_cache(maxsize=32)
def halton_order(grid: tuple[int, int]) -> tuple[int, ...]:
    """Every raster position of an H×W grid once, in the order the Halton points (φ₂(i), φ₃(i)),
    i = 1, 2, …, first fall into its cell: row ⌊H·φ₂(i)⌋, column ⌊W·φ₃(i)⌋. Exact integer arithmetic.

    It ends: with 2^a ≥ H and 3^b ≥ W, the points i = 1 .. 2^(a+1)·3^(b+1) put one point into every box of
    2^-(a+1) × 3^-(b+1), and every cell holds a whole such box.
    """
    H, W = grid
    if H < 1 or W < 1:
        raise ValueError(f"grid must be at least 1×1 (got {H}×{W})")
    seen = bytearray(H * W)
    order: list[int] = []
    i = 0
    while len(order) < H * W:
        i += 1
        (xn, xd), (yn, yd) = _mirrored(i, 2), _mirrored(i, 3)
        p = (xn * H // xd) * W + yn * W // yd
        if not seen[p]:
            seen[p] = 1
            order.append(p)
    return tuple(order)
