"""The prior's size and optimisation when neither a recipe nor the command line chooses them.

`vqtool train-prior` without a recipe should give a first result in the time a first try gets, on the
machine it runs on. So the transformer is picked from a ladder of sizes by two limits:

* compute: on a CPU, the largest size whose step (batch 16) is estimated to take at most
  CPU_STEP_SECONDS on this many cores, so 30 minutes make about 2,000 steps; a GPU is not the limit for
  any size of the ladder;
* data: at most PARAMS_PER_TOKEN parameters per training token (images × grid tokens), so a few
  thousand images do not get a model that only memorises them.

The learning rate follows the width, the warm-up the device, and T (timesteps) is the grid's token
count up to the papers' 256. Everything here is a pure function of its arguments, so the choice is
testable and the same on every rank of a run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# (layers, width) from small to large; heads follow the width (heads_for).
LADDER: tuple[tuple[int, int], ...] = ((4, 128), (4, 192), (6, 256), (8, 384), (12, 512), (24, 512))
# fp32 training throughput of one CPU core on the prior's matrix products: the `bench` prior's ~187 GFLOP
# step takes 2-3 s on 2 cores (recipes/bench-prior.yaml).
CPU_FLOPS_PER_CORE = 35e9
CPU_STEP_SECONDS = 0.9  # 2,000 steps in 30 minutes
PARAMS_PER_TOKEN = 8  # the data limit: transformer-block parameters per training token
CPU_BATCH, CUDA_BATCH = 16, 32
MAX_TIMESTEPS = 256
# The settings the rule may choose: the rest keep TrainPriorConfig's defaults.
AUTO_KEYS = ("n_layer", "n_embd", "n_head", "batch_size", "lr", "warmup_steps", "timesteps")


@dataclass(frozen=True)
class AutoDefaults:
    """The settings chosen and why, one phrase per limit that decided."""

    values: dict[str, Any]
    reasons: list[str] = field(default_factory=list)


def heads_for(width: int) -> int:
    """Attention heads of 32 or more dimensions, at most 8, dividing the width."""
    heads = max(1, min(8, width // 32))
    while width % heads:
        heads -= 1
    return heads


def lr_for(layers: int, width: int) -> float:
    """2e-3 for 4 layers × 128 (the quickstart prior's), falling as 1/width and 1/√layers (2 significant
    digits): 1.3e-3 for 4 × 192, 8.2e-4 for 6 × 256, 2e-4 for 24 × 512; never above 2e-3."""
    return min(2e-3, float(f"{2e-3 * (128 / width) * math.sqrt(4 / layers):.2g}"))


def block_params(layers: int, width: int) -> int:
    """Parameters of the transformer blocks (attention 4·d², MLP 8·d² per layer)."""
    return 12 * layers * width * width


def step_flops(layers: int, width: int, tokens: int, codes: int, batch: int) -> float:
    """Training FLOPs of one step: forward + backward (3×) of the blocks' matrix products and attention over
    every token, and of the output head over the masked half of them on average."""
    per_token = block_params(layers, width) + 2 * layers * tokens * width + codes * width / 2
    return 6.0 * per_token * tokens * batch


def auto_prior_defaults(grid: tuple[int, int], n_images: int, n_codes: int, device_kind: str, cores: int,
                        chosen: Mapping[str, Any] | None = None) -> AutoDefaults:
    """The auto settings for grids of `grid` tokens of an `n_codes` codebook, `n_images` training grids, on a
    `device_kind` ("cpu" or "cuda") with `cores` CPU cores. `chosen` are settings given elsewhere (recipe,
    --set, flags): a given width sets the heads, a given depth and width the learning rate, a given batch the
    compute estimate."""
    chosen = chosen or {}
    tokens = grid[0] * grid[1]
    cpu = device_kind != "cuda"
    batch = int(chosen.get("batch_size") or (CPU_BATCH if cpu else CUDA_BATCH))
    by_data = max((i for i, r in enumerate(LADDER) if block_params(*r) <= PARAMS_PER_TOKEN * n_images * tokens),
                  default=0)
    by_compute = len(LADDER) - 1
    if cpu:
        budget = CPU_FLOPS_PER_CORE * max(1, cores) * CPU_STEP_SECONDS
        by_compute = max((i for i, r in enumerate(LADDER) if step_flops(*r, tokens, n_codes, batch) <= budget),
                         default=0)
    rung = LADDER[min(by_data, by_compute)]
    device = f"CPU, {cores} core{'s' if cores != 1 else ''}" if cpu else "CUDA"
    reasons = [device, f"{grid[0]}×{grid[1]} grid", f"{n_images:,} images"]
    if by_compute < by_data:
        reasons.append(f"the largest prior that makes ~2,000 steps of {batch} in 30 minutes")
    elif block_params(*rung) > PARAMS_PER_TOKEN * n_images * tokens:
        reasons.append("the smallest prior: few training tokens")
    elif by_data < len(LADDER) - 1:
        reasons.append(f"the largest prior with ≤{PARAMS_PER_TOKEN} parameters per training token")

    layers, width = int(chosen.get("n_layer") or rung[0]), int(chosen.get("n_embd") or rung[1])
    values = {
        "n_layer": layers,
        "n_embd": width,
        "n_head": heads_for(width),
        "batch_size": batch,
        "lr": lr_for(layers, width),
        "warmup_steps": 200 if cpu else 2000,
        "timesteps": min(tokens, MAX_TIMESTEPS),
    }
    return AutoDefaults(values, reasons)


def describe(values: Mapping[str, Any]) -> str:
    """`4 layers × 192, 6 heads, batch 16, lr 0.001, warm-up 200, T 256` for the auto settings present."""
    parts = []
    if "n_layer" in values or "n_embd" in values:
        parts.append(" × ".join(x for x in (f"{values['n_layer']} layers" if "n_layer" in values else "",
                                            str(values["n_embd"]) if "n_embd" in values else "") if x))
    labels = {"n_head": "{} heads", "batch_size": "batch {}", "lr": "lr {:g}", "warmup_steps": "warm-up {}",
              "timesteps": "T {}"}
    parts += [label.format(values[k]) for k, label in labels.items() if k in values]
    return ", ".join(parts)


def auto_record(grid: tuple[int, int], n_images: int, n_codes: int, device_kind: str, cores: int, prior: str,
                given: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a fresh run takes from the rule: {"values": the AUTO_KEYS not in `given`, "reasons": [...]}, or
    None when every one was given. T is an absorbing-prior setting, so an autoregressive prior keeps it out.
    The checkpoint stores the record and a resume reuses it, so the model never depends on the machine
    that continues the run."""
    auto = auto_prior_defaults(grid, n_images, n_codes, device_kind, cores, given)
    keys = [k for k in AUTO_KEYS if k not in given and (k != "timesteps" or prior == "absorbing")]
    if not keys:
        return None
    return {"values": {k: auto.values[k] for k in keys}, "reasons": auto.reasons}


def auto_row(auto: Mapping[str, Any]) -> str:
    """The summary's `auto defaults` row: what the rule chose and why (from the checkpoint on a resume)."""
    why = ", ".join(auto["reasons"])
    return f"{describe(auto['values'])} ({'recorded in the checkpoint: ' if auto.get('resumed') else ''}{why})"
