"""Plain dataclass configs, filled from recipe YAML sections and `--set key=value` overrides.

A recipe is one YAML file with a section per stage (`prepare`, `vq`, `train_vq`, `prior`,
`train_prior`, `sample`, ...). Unknown keys are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from vqtool.errors import VqtoolError

T = TypeVar("T")


def load_recipe(path: str | Path | None) -> dict[str, Any]:
    """The whole recipe as a dict of sections; {} when no recipe was given."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise VqtoolError(f"{path}: recipe not found")
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise VqtoolError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise VqtoolError(f"{path}: a recipe must be a mapping of sections")
    return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["lr=1e-4", "ch_mult=[1,2]"]` → {"lr": 1e-4, "ch_mult": [1, 2]} (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise VqtoolError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value, where)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is typing.Union or str(origin) == "types.UnionType":
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except (TypeError, ValueError, VqtoolError):
                continue
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string; accept it as the number it is.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise VqtoolError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and checking simple types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise VqtoolError(
            f"{where}: unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def merge(cls: type[T], *layers: dict[str, Any] | None, where: str = "config") -> T:
    """Defaults of `cls`, then each layer in order (recipe section, then command-line overrides)."""
    data: dict[str, Any] = {}
    for layer in layers:
        if layer:
            data.update({k: v for k, v in layer.items() if v is not None})
    return from_dict(cls, data, where)


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-safe dict of a dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))
