"""Turn nested training state (state_dicts, optimizer state, RNG states) into flat tensors + JSON.

Checkpoints must be safetensors (never pickle), but optimizer state dicts are nested structures with
integer keys, lists and Python scalars. `pack` moves every tensor into a flat name → tensor dict and
leaves a JSON skeleton that points at them; `unpack` reverses it exactly.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch


def pack(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            name = path or "_"
            tensors[name] = x.detach().to("cpu").contiguous().clone()
            return {"__t": name}
        if isinstance(x, dict):
            # Keep key types (optimizer state is keyed by int) by storing pairs.
            return {"__d": [[k, walk(v, f"{path}/{k}" if path else str(k))] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            items = [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x)]
            return {"__l": items, "tuple": isinstance(x, tuple)}
        if isinstance(x, float) and not math.isfinite(x):
            return {"__f": repr(x)}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot pack value of type {type(x).__name__} at {path!r}")

    skeleton = walk(obj, "")
    return tensors, json.dumps(skeleton)


def unpack(tensors: dict[str, torch.Tensor], skeleton: str) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__t" in x:
                return tensors[x["__t"]]
            if "__d" in x:
                return {k: walk(v) for k, v in x["__d"]}
            if "__l" in x:
                items = [walk(v) for v in x["__l"]]
                return tuple(items) if x.get("tuple") else items
            if "__f" in x:
                return float(x["__f"])
        return x

    return walk(json.loads(skeleton))
