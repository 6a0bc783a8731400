"""Planners of the stages that branch off the chain: inpaint and eval (after train-prior), neighbours.

Each checks its recipe section before anything runs and returns a Step; the stage code lives in
vqtool.prior.inpaint, vqtool.eval.stage and vqtool.eval.neighbours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vqtool.artifacts import atomic_write_json, read_metadata
from vqtool.config import merge, to_dict
from vqtool.console import CallbackBar
from vqtool.errors import VqtoolError
from vqtool.pipeline.step import SAMPLE_KEYS, Context, Outcome, Step, pop_keys, refuse_unknown

_INPAINT_KEYS = {"image": None, "box": None, "mask": None, "n": 8, "keep_pixels": False, "class": None,
                 "quantize": "none", "val_index": 0}


def plan_inpaint(ctx: Context) -> Step:
    from vqtool.prior.inpaint import centre_box, extract_image, inpaint_image, parse_box, read_image_size

    section = ctx.section("inpaint")
    extra = pop_keys(section, _INPAINT_KEYS)
    settings = ctx.sample_settings(section)
    refuse_unknown(section, settings, "inpaint")
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
                              device=ctx.device, quantize=extra["quantize"], overwrite=True, progress=bar,
                              precision=ctx.precision)
        h, w = r.tokens.shape[1:]
        return Outcome(f"{len(r.completions)} completions of {path.name}, {r.masked_tokens} of {h * w} tokens "
                       f"regenerated in {r.steps_run} steps")

    return Step("inpaint", recorded, ctx.paths.inpaint / "inpaint.safetensors", inputs, run)


def _conditional(prior: Path) -> bool:
    return int(read_metadata(prior, "prior-model").config.get("model", {}).get("n_classes", 0)) > 0


def plan_eval(ctx: Context) -> Step:
    from vqtool.eval.features import feature_weights_present
    from vqtool.eval.stage import GENERATIVE, EvalSettings, evaluate

    section = ctx.section("eval")
    extra = pop_keys(section, {"optional_metrics": []})
    optional = list(extra["optional_metrics"] or [])
    if "n" not in section and section.get("fake") is None and "sample" in ctx.stages:
        section["n"] = int(ctx.section("sample").get("n", SAMPLE_KEYS["n"]))
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
    sample = ctx.sample_settings()
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
        r = evaluate(ctx.paths.root, settings, sample, device=ctx.device, seed=ctx.seed, overwrite=True,
                     precision=ctx.precision)
        from vqtool.eval.report import LABELS, format_value

        shown = [f"{LABELS[k][0]} {format_value(k, v)}" for k, v in r.metrics.items()
                 if v is not None and k in ("fid", "precision", "recall", "recon_psnr", "codebook_usage",
                                            "nll_val_bpt")]
        skipped = f" ({', '.join(dropped)} left out: no {settings.features} weights)" if dropped else ""
        return Outcome((", ".join(shown) or "no metrics") + skipped)

    return Step("eval", recorded, ctx.paths.eval / f"{settings.name}.safetensors", inputs, run)


def plan_neighbours(ctx: Context) -> Step:
    from vqtool.eval.neighbours import pixel_neighbours
    from vqtool.eval.perceptual import lpips_weights_present
    from vqtool.eval.stage import NeighbourSettings, neighbour_check

    section = ctx.section("neighbours")
    extra = pop_keys(section, {"without_lpips": "pixel"})
    if extra["without_lpips"] not in ("pixel", "skip"):
        raise VqtoolError(f"neighbours.without_lpips {extra['without_lpips']!r}: choose pixel (nearest by pixel "
                          "distance when the LPIPS weights are missing) or skip")
    settings = merge(NeighbourSettings, section, where="neighbours")
    settings.validate()
    lpips = lpips_weights_present(settings.net, settings.lpips_weights)
    distance = "lpips" if lpips else extra["without_lpips"]
    sample = ctx.sample_settings()
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
        r = neighbour_check(ctx.paths.root, settings, sample, device=ctx.device, overwrite=True,
                            precision=ctx.precision)
        return Outcome(f"LPIPS: {r.report['verdict']}")

    return Step("neighbours", recorded, output, inputs, run)


def _skip_message(settings) -> str:
    from vqtool.eval import pretrained
    from vqtool.eval.perceptual import backbone_weights

    spec = backbone_weights(settings.net)
    return (f"LPIPS {settings.net} backbone weights missing ({pretrained.hub_checkpoints_dir() / spec.filename}, "
            f"from {spec.url}); copy them there or set neighbours.lpips_weights, then rerun")
