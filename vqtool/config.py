"""Plain dataclass configs, filled from recipe YAML sections and `--set key=value` overrides.

A recipe is one YAML file with a section per stage (`prepare`, `vq`, `train_vq`, `prior`,
`train_prior`, `sample`, ...). Unknown keys are errors, so a typo never silently does nothing.

Every stage layers its settings the same way (`choose`): the dataclass defaults, then the recipe
sections of the stage in order, then `--set`, then the command's own flags. An explicit `null` in a
recipe or in `--set key=null` counts as a choice; a flag that was not given (None) does not.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
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


def _admits_none(hint: Any) -> bool:
    return hint is Any or hint is type(None) or (
        typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if not _admits_none(hint):
            raise VqtoolError(f"{where}: cannot be null")
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
    """Defaults of `cls`, then each layer in order; a None value is an explicit null and is kept."""
    data: dict[str, Any] = {}
    for layer in layers:
        data.update(layer or {})
    return from_dict(cls, data, where)


@dataclass(frozen=True)
class Part:
    """One settings dataclass of a stage, filled from these recipe sections in order (the last names it)."""

    cls: type
    sections: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.sections[-1]

    def keys(self) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(self.cls))


def split_sets(items: list[str] | None, parts: tuple[Part, ...]) -> dict[str, dict[str, Any]]:
    """`--set` items → {part name: {key: value}}. A key is SECTION.KEY with SECTION one of the parts'
    sections, or a bare KEY, which goes to the first part that has that setting."""
    out: dict[str, dict[str, Any]] = {part.name: {} for part in parts}
    for key, value in parse_overrides(items).items():
        section, _, bare = key.rpartition(".")
        part = next((p for p in parts if (section in p.sections or not section) and bare in p.keys()), None)
        if part is None:
            known = "; ".join(f"{'/'.join(p.sections)}: {', '.join(p.keys())}" for p in parts)
            raise VqtoolError(f"--set {key}: unknown setting; known settings: {known}")
        out[part.name][bare] = value
    return out


def choose(parts: tuple[Part, ...], recipe: dict[str, Any], sets: list[str] | None,
           flags: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The settings a user chose, per part, not yet filled with defaults: its recipe sections in order, then
    `--set`, then `flags[part name]` (command-line options, where None means the flag was not given)."""
    sets_by_part = split_sets(sets, parts)
    chosen: dict[str, dict[str, Any]] = {}
    for part in parts:
        values: dict[str, Any] = {}
        for section in part.sections:
            block = recipe.get(section)
            if block is not None and not isinstance(block, dict):
                raise VqtoolError(f"recipe section {section}: expected a mapping of settings, got {block!r}")
            values.update(block or {})
        values.update(sets_by_part[part.name])
        values.update({k: v for k, v in ((flags or {}).get(part.name) or {}).items() if v is not None})
        chosen[part.name] = values
    return chosen


def build(parts: tuple[Part, ...], chosen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each part's dataclass: its defaults overlaid with what `choose` returned."""
    return {part.name: from_dict(part.cls, chosen[part.name], part.name) for part in parts}


def stage_settings(parts: tuple[Part, ...], recipe: dict[str, Any], sets: list[str] | None,
                   flags: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """`build(choose(...))`: the settings dataclasses of a stage, by part name."""
    return build(parts, choose(parts, recipe, sets, flags))


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-safe dict of a dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))
