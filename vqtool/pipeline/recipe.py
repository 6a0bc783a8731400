"""Pipeline recipes: the stage graph, which stages a recipe runs, and `--set SECTION.KEY=VALUE`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from vqtool.config import parse_overrides
from vqtool.errors import VqtoolError

STAGES = ("prepare", "train-vq", "encode", "train-prior", "sample", "inpaint", "eval", "neighbours")
CHAIN = STAGES[:5]  # each needs the one before; inpaint, eval and neighbours branch off it
SECTIONS = {
    "prepare": ("prepare",),
    "train-vq": ("vq", "train_vq"),
    "encode": ("encode",),
    "train-prior": ("prior", "train_prior"),
    "sample": ("sample",),
    "inpaint": ("inpaint",),
    "eval": ("eval",),
    "neighbours": ("neighbours",),
}
SIDE_NEEDS = {"inpaint": "train-prior", "eval": "train-prior", "neighbours": "sample"}
TOP_LEVEL = ("stages", "seed", "device", "precision", "threads")
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def quickstart_recipe() -> Path:
    """recipes/quickstart.yaml of this checkout (the package is installed editable from the repository)."""
    path = RECIPES / "quickstart.yaml"
    if not path.exists():
        raise VqtoolError(f"{path}: the quickstart recipe is missing; reinstall vqtool from its repository "
                          f"(pip install -e .) or pass --config RECIPE")
    return path


def apply_overrides(recipe: dict[str, Any], items: list[str] | None) -> dict[str, Any]:
    """`--set train_vq.max_steps=50` (SECTION.KEY=VALUE) or `--set seed=1` (a top-level key) on a copy."""
    out = copy.deepcopy(recipe)
    for key, value in parse_overrides(items).items():
        section, _, name = key.partition(".")
        if not name:
            if section not in TOP_LEVEL:
                raise VqtoolError(f"--set {key}: expected SECTION.KEY=VALUE (sections: {', '.join(_sections())}) "
                                  f"or one of {', '.join(TOP_LEVEL)}")
            out[section] = value
            continue
        if section not in _sections():
            raise VqtoolError(f"--set {key}: unknown section {section!r}; known: {', '.join(_sections())}")
        out.setdefault(section, {})
        if out[section] is None:
            out[section] = {}
        out[section][name] = value
    return out


def _sections() -> list[str]:
    return [s for stage in STAGES for s in SECTIONS[stage]]


def check_recipe(recipe: dict[str, Any], where: str = "recipe") -> None:
    unknown = sorted(set(recipe) - set(_sections()) - set(TOP_LEVEL))
    if unknown:
        raise VqtoolError(f"{where}: unknown section(s) {', '.join(unknown)}; known: "
                          f"{', '.join([*TOP_LEVEL, *_sections()])}")
    for name in _sections():
        if recipe.get(name) is not None and not isinstance(recipe[name], dict):
            raise VqtoolError(f"{where}: section {name!r} must be a mapping of settings")


def recipe_stages(recipe: dict[str, Any], where: str = "recipe") -> list[str]:
    """The recipe's `stages:` list in graph order, or the stages its sections imply.

    Implied: every chain stage from the first one with a section up to the last one needed (a side stage
    needs the chain up to train-prior, neighbours up to sample), plus the side stages with a section.
    So a recipe with prepare, vq and train_vq sections runs prepare and train-vq.
    """
    listed = recipe.get("stages")
    if listed is not None:
        if isinstance(listed, str):
            listed = [s.strip() for s in listed.split(",") if s.strip()]
        if not isinstance(listed, list) or not listed:
            raise VqtoolError(f"{where}: `stages:` must be a non-empty list of {', '.join(STAGES)}")
        unknown = [s for s in listed if s not in STAGES]
        if unknown:
            raise VqtoolError(f"{where}: unknown stage(s) {', '.join(map(str, unknown))}; known: {', '.join(STAGES)}")
        return [s for s in STAGES if s in listed]
    mentioned = [s for s in STAGES if any(sec in recipe for sec in SECTIONS[s])]
    if not mentioned:
        raise VqtoolError(f"{where}: no stages; add a `stages:` list or a section per stage "
                          f"({', '.join(_sections())})")
    chain_ends = [CHAIN.index(SIDE_NEEDS.get(s, s)) for s in mentioned]
    chain_starts = [CHAIN.index(s) for s in mentioned if s in CHAIN] or chain_ends
    first, last = min(chain_starts), max(chain_ends)
    return [s for s in STAGES if (s in CHAIN and first <= CHAIN.index(s) <= last) or s in mentioned]
