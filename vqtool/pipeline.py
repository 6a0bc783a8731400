"""The whole pipeline as one graph of stages, rerun only where something changed.

`vqtool quickstart` and `vqtool run RECIPE` go through `run_pipeline`: for each stage of the recipe, in
graph order (prepare → train-vq → encode → train-prior → sample → inpaint → eval → neighbours), it
decides whether the stage's output is up to date and either skips the stage or runs its stage function.

A stage is up to date when
  * its output exists and is the very file this pipeline wrote there (sha256 recorded in the ledger);
  * the output's provenance `parents` hashes equal the current sha256 of the stage's inputs (and so do
    the input hashes the ledger recorded, for inputs an artifact cannot name, like a source folder);
  * the settings recorded for that output equal the settings now requested.
Otherwise it runs again. A new output has a new hash, so every stage downstream becomes out of date in
turn. A training stage stopped by Ctrl-C (or killed) resumes from its checkpoint when rerun with the
same settings and inputs; any other stage starts again.

The ledger is RUN/pipeline.json: per stage its status (running | interrupted | failed | done), the
settings, the input hashes, the output's sha256, when it started, its wall time and a one-line summary.
An output the ledger does not know (made by hand, or changed since) is never replaced silently: that
needs `overwrite`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqtool import __version__
from vqtool.artifacts import atomic_write_json, file_sha256, read_metadata
from vqtool.config import load_recipe, merge, parse_overrides, to_dict
from vqtool.console import CallbackBar, console
from vqtool.data.manifest import MANIFEST_NAME, manifest_sha256
from vqtool.errors import Interrupted, VqtoolError
from vqtool.runs import RunPaths

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
TOP_LEVEL = ("stages", "seed", "device", "threads")
LEDGER_NAME = "pipeline.json"
LEDGER_VERSION = 1
RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# The stage whose output an input role names, for "missing input" messages.
_MADE_BY = {"dataset": "prepare", "real_dataset": "prepare", "train_dataset": "prepare", "vq": "train-vq",
            "latents": "encode", "prior": "train-prior", "fake_samples": "sample"}


@dataclass
class PipelineOptions:
    seed: int | None = None  # None: the recipe's `seed:` (else 0)
    device: str | None = None  # None: the recipe's `device:` (else auto)
    threads: int | None = None  # torch CPU threads; None: the recipe's `threads:` (else torch's default)
    overwrite: bool = False  # replace outputs this pipeline did not make
    dry_run: bool = False  # only say what would run and why
    write_index: bool = True


@dataclass
class StageReport:
    stage: str
    status: str  # "ran", "resumed", "up to date", "would run" (dry run)
    why: str  # why it ran (or "" when up to date)
    seconds: float  # wall time of this invocation's run; of the recorded run when up to date
    output: Path
    summary: str


@dataclass
class PipelineResult:
    run: Path
    stages: list[StageReport]
    index: Path | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# Recipes


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


# --------------------------------------------------------------------------------------------------
# The ledger (RUN/pipeline.json)


class Ledger:
    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.stages = dict(data["stages"])
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                raise VqtoolError(f"{path}: corrupt pipeline record; delete it and rerun with --overwrite") from None

    def get(self, stage: str) -> dict[str, Any] | None:
        return self.stages.get(stage)

    def put(self, stage: str, entry: dict[str, Any]) -> None:
        self.stages[stage] = entry
        atomic_write_json(self.path, {"format_version": LEDGER_VERSION, "vqtool_version": __version__,
                                      "stages": self.stages})


# --------------------------------------------------------------------------------------------------
# Steps: one stage, planned


@dataclass
class Outcome:
    summary: str
    reason: str = "done"  # "interrupted": a training stage stopped by Ctrl-C after saving


@dataclass
class Step:
    stage: str
    settings: dict[str, Any]  # what the output is recorded as made with (compared on reruns)
    output: Path  # the primary output: its presence and hash stand for the stage's work
    inputs: Callable[[], dict[str, Path]]  # role → file or shards folder; called when the stage's turn comes
    run: Callable[[bool], Outcome]  # run(resume) → outcome
    checkpoint: Path | None = None  # training stages: where the resumable state lives
    # Training stages: the settings keys (max_steps first) whose change alone is continued from the checkpoint.
    limits: tuple[str, ...] | None = None


@dataclass
class _Context:
    paths: RunPaths
    recipe: dict[str, Any]
    stages: list[str]
    seed: int
    device: str
    threads: int
    dry_run: bool = False

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.recipe.get(name) or {})


def _pop(section: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Take the pipeline-level keys `defaults` out of a stage section (the rest are the stage's settings)."""
    return {k: section.pop(k, v) for k, v in defaults.items()}


def _plan_prepare(ctx: _Context) -> Step:
    from vqtool.data.prepare import PrepareSettings, prepare_images, prepare_synthetic

    section = ctx.section("prepare")
    inputs = _pop(section, {"source": None, "synthetic": None, "count": None})
    settings = merge(PrepareSettings, section, where="prepare")
    settings.validate()
    source, synthetic = inputs["source"], inputs["synthetic"]
    if bool(source) == bool(synthetic):
        raise VqtoolError("prepare: give exactly one of `source: PATH` (a folder or .tar of images) or "
                          "`synthetic: shapes` in the recipe's prepare section")
    if inputs["count"] is not None and not synthetic:
        raise VqtoolError("prepare.count: only applies with `synthetic:`")
    source = Path(source).expanduser().resolve() if source else None
    count = int(inputs["count"] if inputs["count"] is not None else 2000)
    recorded = {"source": str(source) if source else None, "synthetic": synthetic,
                "count": count if synthetic else None, "seed": ctx.seed, **settings.output_settings()}

    def run(resume: bool) -> Outcome:
        if synthetic:
            r = prepare_synthetic(ctx.paths.shards, synthetic, count, settings, seed=ctx.seed, overwrite=True)
        else:
            r = prepare_images(source, ctx.paths.shards, settings, seed=ctx.seed, overwrite=True)
        skipped = sum(r.skipped.values())
        return Outcome(f"{r.counts['train']:,} train + {r.counts['val']:,} val images, "
                       f"{settings.size}×{settings.size}" + (f", {skipped} skipped" if skipped else ""))

    return Step("prepare", recorded, ctx.paths.shards / MANIFEST_NAME,
                lambda: {"source": source} if source else {}, run)


def _plan_train_vq(ctx: _Context) -> Step:
    from vqtool.vq.model import VQConfig
    from vqtool.vq.train import STAGE, TrainVQConfig, train_vq

    vq_cfg = merge(VQConfig, ctx.section("vq"), where="vq")
    cfg = merge(TrainVQConfig, ctx.section("train_vq"), where="train_vq")
    cfg.validate()
    if cfg.max_steps is None and cfg.max_minutes is None:
        raise VqtoolError("train_vq: set max_steps or max_minutes in the recipe so training has an end")
    recorded = {"vq": to_dict(vq_cfg), "train_vq": _without(to_dict(cfg), "num_workers"), "seed": ctx.seed}

    def run(resume: bool) -> Outcome:
        r = train_vq(ctx.paths.root, vq_cfg, cfg, seed=ctx.seed, device=ctx.device, resume=resume,
                     overwrite=not resume)
        summary = (f"step {r.step} ({r.reason}), val PSNR {r.val.get('psnr', float('nan')):.2f} dB, "
                   f"codebook usage {100 * r.val.get('usage', 0):.0f}%")
        return Outcome(summary, "interrupted" if r.reason == "interrupted" else "done")

    return Step("train-vq", recorded, ctx.paths.vq, lambda: {"dataset": ctx.paths.shards}, run,
                checkpoint=ctx.paths.checkpoint(STAGE), limits=("train_vq.max_steps", "train_vq.max_minutes"))


def _plan_encode(ctx: _Context) -> Step:
    from vqtool.vq.encode import EncodeSettings, encode_dataset

    s = merge(EncodeSettings, ctx.section("encode"), where="encode")

    def run(resume: bool) -> Outcome:
        r = encode_dataset(ctx.paths.root, batch_size=s.batch_size, device=ctx.device, overwrite=True,
                           weights=s.weights)
        used = ", ".join(f"{100 * u:.0f}% ({split})" for split, u in r.usage.items())
        return Outcome(f"{r.latent_shape[0]}×{r.latent_shape[1]} tokens of {r.codebook_size} codes; "
                       f"codes used {used}")

    return Step("encode", to_dict(s), ctx.paths.latents,
                lambda: {"vq": ctx.paths.vq, "dataset": ctx.paths.shards}, run)


def _plan_train_prior(ctx: _Context) -> Step:
    from vqtool.prior.train import STAGE, TrainPriorConfig, check_config, train_prior

    cfg = merge(TrainPriorConfig, {"seed": ctx.seed}, ctx.section("prior"), ctx.section("train_prior"),
                where="train_prior")
    cfg.device = ctx.device
    cfg.threads = ctx.threads or None
    check_config(cfg)
    recorded = _without(to_dict(cfg), "device", "threads")
    checkpoint = ctx.paths.checkpoint(STAGE)

    def run(resume: bool) -> Outcome:
        r = train_prior(ctx.paths.latents, cfg, ctx.paths.prior, checkpoint, ctx.paths.log(STAGE), resume=resume,
                        overwrite=not resume)
        best = f"best val {r.best_val_bpt:.3f} bits/token at step {r.best_step}" if r.best_val_bpt else "no val"
        return Outcome(f"{cfg.prior}, step {r.steps} ({r.reason}), {best}",
                       "interrupted" if r.reason == "interrupted" else "done")

    # A cosine schedule's horizon is max_steps itself: changing it changes every learning rate.
    limits = None if cfg.cosine_decay and cfg.decay_steps is None else ("max_steps", "max_minutes")
    return Step("train-prior", recorded, ctx.paths.prior, lambda: {"latents": ctx.paths.latents}, run,
                checkpoint=checkpoint, limits=limits)


_SAMPLE_KEYS = {"n": 64, "quantize": "none", "class": None}


def _sample_settings(ctx: _Context, *sections: dict[str, Any]):
    from vqtool.prior.sample import SampleSettings

    layers = [{k: v for k, v in s.items() if k in {f.name for f in dataclasses.fields(SampleSettings)}}
              for s in sections]
    return merge(SampleSettings, {"seed": ctx.seed}, *layers, where="sample")


def _plan_sample(ctx: _Context) -> Step:
    from vqtool.prior.sample import sample_images

    section = ctx.section("sample")
    extra = _pop(section, _SAMPLE_KEYS)
    settings = _sample_settings(ctx, section)
    _refuse_unknown(section, settings, "sample")
    recorded = {**extra, **to_dict(settings)}

    def run(resume: bool) -> Outcome:
        with CallbackBar("sampling") as bar:
            r = sample_images(ctx.paths.prior, ctx.paths.vq, ctx.paths.samples, int(extra["n"]), settings,
                              class_id=extra["class"], device=ctx.device, quantize=extra["quantize"],
                              overwrite=True, progress=bar)
        return Outcome(f"{len(r.images)} images, {settings.schedule} schedule, {settings.steps} steps, "
                       f"{r.images_per_second:.2f} images/s")

    return Step("sample", recorded, ctx.paths.samples_artifact,
                lambda: {"prior": ctx.paths.prior, "vq": ctx.paths.vq}, run)


_INPAINT_KEYS = {"image": None, "box": None, "mask": None, "n": 8, "keep_pixels": False, "class": None,
                 "quantize": "none", "val_index": 0}


def _plan_inpaint(ctx: _Context) -> Step:
    from vqtool.prior.inpaint import centre_box, extract_image, inpaint_image, parse_box, read_image_size

    section = ctx.section("inpaint")
    extra = _pop(section, _INPAINT_KEYS)
    sample_section = {k: v for k, v in ctx.section("sample").items() if k not in _SAMPLE_KEYS}
    settings = _sample_settings(ctx, sample_section, section)
    _refuse_unknown(section, settings, "inpaint")
    image = Path(extra["image"]).expanduser().resolve() if extra["image"] else None
    box = parse_box(str(extra["box"])) if extra["box"] is not None else None
    mask = Path(extra["mask"]).expanduser().resolve() if extra["mask"] else None
    if box is not None and mask is not None:
        raise VqtoolError("inpaint: give `box:` or `mask:`, not both")
    if mask is not None and image is None:
        raise VqtoolError("inpaint.mask: needs `image:` too (the mask is drawn at the image's size)")
    recorded = {**extra, "image": str(image) if image else f"val image {extra['val_index']} of the run's shards",
                "mask": str(mask) if mask else None, **to_dict(settings)}
    source = ctx.paths.inpaint / "source.png"
    chosen: dict[str, Any] = {}

    def inputs() -> dict[str, Path]:
        if image is None:
            chosen["path"], chosen["label"] = extract_image(ctx.paths.shards, int(extra["val_index"]), source,
                                                            write=not ctx.dry_run)
        else:
            chosen["path"], chosen["label"] = image, None
        found = {"prior": ctx.paths.prior, "vq": ctx.paths.vq, "image": chosen["path"]}
        if mask is not None:
            found["mask"] = mask
        return found

    def run(resume: bool) -> Outcome:
        path = chosen["path"]
        class_id = extra["class"]
        if class_id is None and chosen["label"] is not None and _conditional(ctx.paths.prior):
            class_id = chosen["label"]  # complete the image as its own class
        region = box if box is not None or mask is not None else centre_box(read_image_size(path))
        with CallbackBar("inpainting") as bar:
            r = inpaint_image(ctx.paths.prior, ctx.paths.vq, path, ctx.paths.inpaint, int(extra["n"]), settings,
                              mask_path=mask, box=region, keep_pixels=bool(extra["keep_pixels"]), class_id=class_id,
                              device=ctx.device, quantize=extra["quantize"], overwrite=True, progress=bar)
        h, w = r.tokens.shape[1:]
        return Outcome(f"{len(r.completions)} completions of {path.name}, {r.masked_tokens} of {h * w} tokens "
                       f"regenerated in {r.steps_run} steps")

    return Step("inpaint", recorded, ctx.paths.inpaint / "inpaint.safetensors", inputs, run)


def _conditional(prior: Path) -> bool:
    return int(read_metadata(prior, "prior-model").config.get("model", {}).get("n_classes", 0)) > 0


def _plan_eval(ctx: _Context) -> Step:
    from vqtool.eval.features import feature_weights_present
    from vqtool.eval.stage import GENERATIVE, EvalSettings, evaluate

    section = ctx.section("eval")
    extra = _pop(section, {"optional_metrics": []})
    optional = list(extra["optional_metrics"] or [])
    if "n" not in section and section.get("fake") is None and "sample" in ctx.stages:
        section["n"] = int(ctx.section("sample").get("n", _SAMPLE_KEYS["n"]))
    settings = merge(EvalSettings, section, where="eval")
    unknown = [m for m in optional if m not in GENERATIVE]
    if unknown:
        raise VqtoolError(f"eval.optional_metrics: {', '.join(unknown)}; choose from {', '.join(GENERATIVE)} "
                          "(metrics added when the feature extractor's weights are present)")
    dropped = [m for m in optional if m not in settings.metrics]
    if dropped and feature_weights_present(settings.features, settings.feature_weights, settings.feature_layer):
        settings.metrics, dropped = [*settings.metrics, *dropped], []
    uses_samples = bool(set(settings.metrics) & set(GENERATIVE)) and settings.fake is None and (
        "sample" in ctx.stages or ctx.paths.samples_artifact.exists())
    if uses_samples:
        settings.fake = str(ctx.paths.samples_artifact)
    settings.validate()
    sample = _sample_settings(ctx, {k: v for k, v in ctx.section("sample").items() if k not in _SAMPLE_KEYS})
    samples_on_the_fly = bool(set(settings.metrics) & set(GENERATIVE)) and settings.fake is None
    recorded = {**to_dict(settings), "sample": to_dict(sample) if samples_on_the_fly else None}

    def inputs() -> dict[str, Path]:
        wants = set(settings.metrics)
        found: dict[str, Path] = {}
        if "recon" in wants:
            found.update(vq=ctx.paths.vq, dataset=ctx.paths.shards)
        if "nll" in wants:
            found.update(prior=ctx.paths.prior, latents=ctx.paths.latents)
        if wants & set(GENERATIVE):
            if settings.real in ("train", "val"):
                found["real_dataset"] = ctx.paths.shards
            if uses_samples:
                found.update(fake_samples=ctx.paths.samples_artifact, vq=ctx.paths.vq)
            elif settings.fake is None:
                found.update(prior=ctx.paths.prior, vq=ctx.paths.vq)
        return found

    def run(resume: bool) -> Outcome:
        r = evaluate(ctx.paths.root, settings, sample, device=ctx.device, seed=ctx.seed, overwrite=True)
        from vqtool.eval.report import LABELS, format_value

        shown = [f"{LABELS[k][0]} {format_value(k, v)}" for k, v in r.metrics.items()
                 if v is not None and k in ("fid", "precision", "recall", "recon_psnr", "codebook_usage",
                                            "nll_val_bpt")]
        skipped = f" ({', '.join(dropped)} left out: no {settings.features} weights)" if dropped else ""
        return Outcome((", ".join(shown) or "no metrics") + skipped)

    return Step("eval", recorded, ctx.paths.eval / f"{settings.name}.safetensors", inputs, run)


def _plan_neighbours(ctx: _Context) -> Step:
    from vqtool.eval.neighbours import pixel_neighbours
    from vqtool.eval.perceptual import lpips_weights_present
    from vqtool.eval.stage import NeighbourSettings, neighbour_check

    section = ctx.section("neighbours")
    extra = _pop(section, {"without_lpips": "pixel"})
    if extra["without_lpips"] not in ("pixel", "skip"):
        raise VqtoolError(f"neighbours.without_lpips {extra['without_lpips']!r}: choose pixel (nearest by pixel "
                          "distance when the LPIPS weights are missing) or skip")
    settings = merge(NeighbourSettings, section, where="neighbours")
    settings.validate()
    lpips = lpips_weights_present(settings.net, settings.lpips_weights)
    distance = "lpips" if lpips else extra["without_lpips"]
    sample = _sample_settings(ctx, {k: v for k, v in ctx.section("sample").items() if k not in _SAMPLE_KEYS})
    uses_samples = settings.fake is None and ("sample" in ctx.stages or ctx.paths.samples_artifact.exists())
    recorded = {**to_dict(settings), "distance": distance,
                "sample": to_dict(sample) if settings.fake is None and not uses_samples else None}
    # A skipped check leaves a note instead of the artifact, so that it runs once the weights appear.
    name = f"{settings.name}.skipped.json" if distance == "skip" else f"{settings.name}.safetensors"
    output = ctx.paths.eval / name

    def inputs() -> dict[str, Path]:
        found = {"vq": ctx.paths.vq}
        if settings.train is None:
            found["train_dataset"] = Path(settings.shards) if settings.shards else ctx.paths.shards
        if uses_samples:
            found["fake_samples"] = ctx.paths.samples_artifact
        elif settings.fake is None:
            found["prior"] = ctx.paths.prior
        return found

    def run(resume: bool) -> Outcome:
        if distance == "skip":
            message = f"skipped: {_skip_message(settings)}"
            atomic_write_json(output, {"skipped": True, "message": message})
            return Outcome(message)
        if distance == "pixel":
            r = pixel_neighbours(ctx.paths, settings, ctx.device, note=_skip_message(settings))
            return Outcome(f"nearest training images by pixel distance (no LPIPS weights): median "
                           f"{r['metrics']['sample_nn_median']:.3f} RMS")
        r = neighbour_check(ctx.paths.root, settings, sample, device=ctx.device, overwrite=True)
        return Outcome(f"LPIPS: {r.report['verdict']}")

    return Step("neighbours", recorded, output, inputs, run)


def _skip_message(settings) -> str:
    from vqtool.eval import pretrained
    from vqtool.eval.perceptual import backbone_weights

    spec = backbone_weights(settings.net)
    return (f"LPIPS {settings.net} backbone weights missing ({pretrained.hub_checkpoints_dir() / spec.filename}, "
            f"from {spec.url}); copy them there or set neighbours.lpips_weights, then rerun")


_PLANNERS: dict[str, Callable[[_Context], Step]] = {
    "prepare": _plan_prepare,
    "train-vq": _plan_train_vq,
    "encode": _plan_encode,
    "train-prior": _plan_train_prior,
    "sample": _plan_sample,
    "inpaint": _plan_inpaint,
    "eval": _plan_eval,
    "neighbours": _plan_neighbours,
}


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _refuse_unknown(section: dict[str, Any], settings, where: str) -> None:
    known = {f.name for f in dataclasses.fields(settings)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise VqtoolError(f"{where}: unknown setting(s) {', '.join(unknown)}")


# --------------------------------------------------------------------------------------------------
# Deciding and running


def input_hash(path: Path) -> str:
    """sha256 of an input: a file's bytes, a shards folder's manifest, or a source folder's listing."""
    if path.is_dir():
        if (path / MANIFEST_NAME).exists():
            return manifest_sha256(path)
        return folder_fingerprint(path)
    return file_sha256(path)


def folder_fingerprint(folder: Path) -> str:
    """sha256 of every file's relative path, size and modification time (not its bytes: a 50k-image
    folder is listed in a second but would take minutes to read)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            st = (Path(root) / name).stat()
            h.update(f"{(Path(root) / name).relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "listing:" + h.hexdigest()


def _current_inputs(step: Step) -> dict[str, str]:
    hashes = {}
    for role, path in step.inputs().items():
        path = Path(path)
        if not path.exists():
            maker = _MADE_BY.get(role)
            hint = (f"it is made by the {maker} stage: add it to the recipe's stages" if maker
                    else f"check the {step.stage} section of the recipe")
            raise VqtoolError(f"{path}: missing ({step.stage} needs it as {role}); {hint}")
        hashes[role] = input_hash(path)
    return hashes


def _parents_of(output: Path) -> dict[str, str]:
    if output.suffix != ".safetensors":
        return {}
    return read_metadata(output).parents


def _owned(entry: dict[str, Any] | None, output: Path) -> bool:
    """Whether the existing `output` is the pipeline's own: the file it recorded, or written by an
    attempt of this stage that never finished (a Ctrl-C or kill during the stage)."""
    if entry is None:
        return False
    if entry.get("output") == file_sha256(output):
        return True
    return entry.get("status") != "done" and output.stat().st_mtime >= float(entry.get("started", 0)) - 1


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        out: list[str] = []
        for k in keys:
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _checkpoint_step(step: Step, entry: dict[str, Any]) -> int | None:
    """The step of the stage's checkpoint when it belongs to the recorded attempt, else None."""
    ckpt = step.checkpoint
    if ckpt is None or not ckpt.exists() or ckpt.stat().st_mtime < float(entry.get("started", 0)):
        return None  # no checkpoint, or one left by an earlier attempt with other settings or inputs
    return int(read_metadata(ckpt).extra.get("step", 0))


def _continuable(step: Step, old: dict[str, Any], new: dict[str, Any], at: int) -> bool:
    """Whether training on from a checkpoint at step `at` under `new` settings ends where a fresh run would:
    only the stopping limits changed and the checkpoint is not past the new max_steps."""
    if step.limits is None:
        return False
    changed = _changed_keys(old, new)
    if not set(changed) <= set(step.limits):
        return False
    max_steps = _dotted(new, step.limits[0])
    return max_steps is None or at <= int(max_steps)


def _dotted(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _decide(step: Step, entry: dict[str, Any] | None, hashes: dict[str, str], overwrite: bool) -> tuple[str, str]:
    """('skip' | 'run' | 'resume', why) for a planned step whose inputs hash to `hashes`."""
    settings = json.loads(json.dumps(step.settings))
    out = step.output
    if entry is not None and entry.get("inputs") == hashes and (not out.exists() or _owned(entry, out)):
        at = _checkpoint_step(step, entry)
        old = entry.get("settings") or {}
        if at is not None and entry.get("status") != "done" and (
                old == settings or _continuable(step, old, settings, at)):
            return "resume", f"resuming the {entry.get('status')} run from its checkpoint at step {at}"
        if at is not None and entry.get("status") == "done" and old != settings and out.exists() and (
                _continuable(step, old, settings, at)):
            changed = ", ".join(_changed_keys(old, settings))
            return "resume", f"{changed} changed: continuing from the checkpoint at step {at}"
    if not out.exists():
        if entry is None:
            return "run", "new"
        return "run", "output missing" if entry.get("status") == "done" else (
            f"the last run did not finish ({entry.get('status')})")
    if not _owned(entry, out):
        if not overwrite:
            raise VqtoolError(f"{out}: exists but was not made by this pipeline (or was changed since); pass "
                              f"--overwrite to replace it, or use another --run folder")
        return "run", "replacing an output this pipeline did not make"
    if entry.get("status") != "done":
        return "run", f"the last run did not finish ({entry.get('status')})"
    if entry.get("settings") != settings:
        changed = _changed_keys(entry.get("settings"), settings)
        return "run", "settings changed: " + ", ".join(changed[:6]) + (" …" if len(changed) > 6 else "")
    if entry.get("inputs") != hashes:
        changed = sorted(k for k in set(hashes) | set(entry.get("inputs") or {})
                         if hashes.get(k) != (entry.get("inputs") or {}).get(k))
        return "run", "input changed: " + ", ".join(changed)
    parents = _parents_of(out)
    stale = sorted(role for role, sha in hashes.items() if role in parents and parents[role] != sha)
    if stale:
        return "run", "made from other inputs: " + ", ".join(stale)
    return "skip", ""


def run_pipeline(
    recipe: dict[str, Any],
    run: str | Path,
    options: PipelineOptions | None = None,
    stages: list[str] | None = None,
    where: str = "recipe",
) -> PipelineResult:
    """Run the recipe's stages in graph order, skipping those whose outputs are up to date.

    `stages` picks a subset (default: the recipe's). A training stage stopped by Ctrl-C raises
    `Interrupted` after recording its state; rerunning the same call resumes it.
    """
    options = options or PipelineOptions()
    check_recipe(recipe, where)
    chosen = recipe_stages(recipe, where)
    if stages:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise VqtoolError(f"--stages: unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
        chosen = [s for s in STAGES if s in stages]
    seed = options.seed if options.seed is not None else int(recipe.get("seed") or 0)
    device = options.device or str(recipe.get("device") or "auto")
    threads = options.threads if options.threads is not None else int(recipe.get("threads") or 0)
    if threads < 0:
        raise VqtoolError(f"--threads {threads}: must be 0 (torch's default) or more")
    ctx = _Context(RunPaths.of(run), recipe, chosen, seed, device, threads, options.dry_run)
    steps = [_PLANNERS[name](ctx) for name in chosen]  # every setting is checked before anything runs
    ledger = Ledger(ctx.paths.root / LEDGER_NAME)

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    reports: list[StageReport] = []
    changing: dict[Path, str] = {}  # dry run: outputs that would be rewritten → by which stage
    try:
        for step in steps:
            reports.append(_run_step(step, ledger, options, changing))
    finally:
        torch.set_num_threads(previous_threads)
    result = PipelineResult(ctx.paths.root, reports, seconds=time.perf_counter() - start)
    if options.write_index and not options.dry_run:
        from vqtool.report_html import write_index

        result.index = write_index(ctx.paths.root, device=device)
    return result


def _run_step(step: Step, ledger: Ledger, options: PipelineOptions, changing: dict[Path, str]) -> StageReport:
    entry = ledger.get(step.stage)
    if options.dry_run:
        return _dry_run(step, entry, options, changing)
    hashes = _current_inputs(step)
    action, why = _decide(step, entry, hashes, options.overwrite)
    if action == "skip":
        console.print(f"[green]{step.stage}[/green]: up to date ({step.output})", highlight=False)
        return StageReport(step.stage, "up to date", "", float(entry.get("seconds", 0.0)), step.output,
                           entry.get("summary", ""))
    console.rule(f"[bold]{step.stage}[/bold]: {why}", style="cyan")
    resume = action == "resume"
    previous = entry.get("output") if entry and step.output.exists() and _owned(entry, step.output) else None
    started = float(entry["started"]) if resume else time.time()
    record = {"status": "running", "settings": step.settings, "inputs": hashes, "output": previous,
              "started": started, "seconds": float(entry.get("seconds", 0.0)) if resume else 0.0, "summary": ""}
    ledger.put(step.stage, record)
    t0 = time.perf_counter()
    try:
        outcome = step.run(resume)
    except KeyboardInterrupt:
        ledger.put(step.stage, _finish(record, step, t0, "interrupted", "stopped by Ctrl-C"))
        raise
    except VqtoolError as exc:
        ledger.put(step.stage, _finish(record, step, t0, "failed", str(exc)))
        raise
    status = "interrupted" if outcome.reason == "interrupted" else "done"
    ledger.put(step.stage, _finish(record, step, t0, status, outcome.summary))
    if status == "interrupted":
        raise Interrupted(f"{step.stage} stopped and saved its checkpoint; rerun the same command to resume it")
    return StageReport(step.stage, "resumed" if resume else "ran", why, time.perf_counter() - t0, step.output,
                       outcome.summary)


def _finish(record: dict[str, Any], step: Step, t0: float, status: str, summary: str) -> dict[str, Any]:
    done = dict(record)
    done.update(status=status, summary=summary, seconds=round(record["seconds"] + time.perf_counter() - t0, 3),
                finished=time.time())
    if step.output.exists():
        done["output"] = file_sha256(step.output)
    return done


def _dry_run(step: Step, entry: dict[str, Any] | None, options: PipelineOptions,
             changing: dict[Path, str]) -> StageReport:
    try:
        paths = {role: Path(p) for role, p in step.inputs().items()}
    except VqtoolError:  # e.g. the inpaint image comes from shards that are not prepared yet
        paths = None
    after = sorted({changing[p] for p in paths.values() if p in changing}) if paths is not None else []
    if after:
        why = "after " + ", ".join(after)
    elif paths is None or any(not p.exists() for p in paths.values()):
        why = "inputs not made yet"
    else:
        action, why = _decide(step, entry, {r: input_hash(p) for r, p in paths.items()}, options.overwrite)
        if action == "skip":
            return StageReport(step.stage, "up to date", "", float(entry.get("seconds", 0.0)), step.output,
                               entry.get("summary", ""))
    changing[step.output] = step.stage
    if step.output.name == MANIFEST_NAME:
        changing[step.output.parent] = step.stage  # later stages name the shards folder
    return StageReport(step.stage, "would run", why, 0.0, step.output, "")


def load_and_run(recipe_path: str | Path, run: str | Path, overrides: list[str] | None = None,
                 options: PipelineOptions | None = None, stages: list[str] | None = None) -> PipelineResult:
    """`vqtool run RECIPE`: read the recipe, apply `--set` overrides, run it."""
    recipe = apply_overrides(load_recipe(recipe_path), overrides)
    return run_pipeline(recipe, run, options, stages, where=str(recipe_path))


def quickstart(run: str | Path = "runs/quickstart", overrides: list[str] | None = None,
               options: PipelineOptions | None = None, recipe_path: str | Path | None = None) -> PipelineResult:
    """`vqtool quickstart`: the quickstart recipe (synthetic shapes, CPU-sized) through every stage."""
    return load_and_run(recipe_path or quickstart_recipe(), run, overrides, options)


def ledger_entries(run: str | Path) -> dict[str, dict[str, Any]]:
    """The recorded state of every stage of a run folder (empty when the pipeline never ran there)."""
    path = Path(run) / LEDGER_NAME
    return Ledger(path).stages if path.exists() else {}


__all__ = [
    "STAGES", "PipelineOptions", "PipelineResult", "StageReport", "apply_overrides", "check_recipe",
    "folder_fingerprint", "input_hash", "ledger_entries", "load_and_run",
    "quickstart", "quickstart_recipe", "recipe_stages", "run_pipeline",
]
