"""Planners of the chain stages, each needing the one before: prepare → train-vq → encode → train-prior → sample.

A planner checks its recipe section before anything runs and returns a Step; the stage code itself
lives with its stage (vqtool.data, vqtool.vq, vqtool.prior).
"""

from __future__ import annotations

from pathlib import Path

from vqtool.config import merge, to_dict
from vqtool.console import CallbackBar
from vqtool.data.manifest import MANIFEST_NAME
from vqtool.errors import VqtoolError
from vqtool.pipeline.step import SAMPLE_KEYS, Context, Outcome, Step, pop_keys, refuse_unknown, without


def plan_prepare(ctx: Context) -> Step:
    from vqtool.data.prepare import PrepareSettings, prepare_images, prepare_synthetic

    section = ctx.section("prepare")
    inputs = pop_keys(section, {"source": None, "synthetic": None, "count": None})
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


def plan_train_vq(ctx: Context) -> Step:
    from vqtool.vq.model import VQConfig
    from vqtool.vq.train import STAGE, TrainVQConfig, train_vq

    vq_cfg = merge(VQConfig, ctx.section("vq"), where="vq")
    cfg = merge(TrainVQConfig, ctx.section("train_vq"), where="train_vq")
    cfg.validate()
    cfg.check_loop("train_vq")
    # What changes the output; the workers, the TensorBoard twin of the log and the settings of speed
    # alone (the same training up to float rounding) do not.
    recorded = {"vq": to_dict(vq_cfg),
                "train_vq": without(to_dict(cfg), "num_workers", "tensorboard", "channels_last", "compile"),
                "seed": ctx.seed}

    def run(resume: bool) -> Outcome:
        r = train_vq(ctx.paths.root, vq_cfg, cfg, seed=ctx.seed, device=ctx.device, resume=resume,
                     overwrite=not resume, precision=ctx.precision)
        summary = (f"step {r.step} ({r.reason}), val PSNR {r.val.get('psnr', float('nan')):.2f} dB, "
                   f"codebook usage {100 * r.val.get('usage', 0):.0f}%")
        return Outcome(summary, "interrupted" if r.reason == "interrupted" else "done")

    return Step("train-vq", recorded, ctx.paths.vq, lambda: {"dataset": ctx.paths.shards}, run,
                checkpoint=ctx.paths.checkpoint(STAGE), limits=("train_vq.max_steps", "train_vq.max_minutes"))


def plan_encode(ctx: Context) -> Step:
    from vqtool.vq.encode import EncodeSettings, encode_dataset

    s = merge(EncodeSettings, ctx.section("encode"), where="encode")

    def run(resume: bool) -> Outcome:
        r = encode_dataset(ctx.paths.root, batch_size=s.batch_size, device=ctx.device, overwrite=True,
                           weights=s.weights, precision=ctx.precision, compile=s.compile)
        used = ", ".join(f"{100 * u:.0f}% ({split})" for split, u in r.usage.items())
        return Outcome(f"{r.latent_shape[0]}×{r.latent_shape[1]} tokens of {r.codebook_size} codes; "
                       f"codes used {used}")

    return Step("encode", without(to_dict(s), "compile"), ctx.paths.latents,
                lambda: {"vq": ctx.paths.vq, "dataset": ctx.paths.shards}, run)


def plan_train_prior(ctx: Context) -> Step:
    from vqtool.prior.train import STAGE, TrainPriorConfig, check_config, recorded_gelu, train_prior

    sections = (ctx.section("prior"), ctx.section("train_prior"))
    cfg = merge(TrainPriorConfig, {"seed": ctx.seed}, *sections, where="train_prior")
    cfg.device = ctx.device
    cfg.precision = ctx.precision
    cfg.threads = ctx.threads or None
    checkpoint = ctx.paths.checkpoint(STAGE)
    if not any("gelu" in (s or {}) for s in sections):
        # The default changed: a run folder's prior keeps the activation it was trained with until the
        # recipe names one, so a rerun skips or resumes it instead of training it again.
        cfg.gelu = recorded_gelu((ctx.paths.prior, "prior-model"), (checkpoint, "prior-checkpoint")) or cfg.gelu
    check_config(cfg)
    recorded = without(to_dict(cfg), "device", "precision", "threads", "tensorboard")

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


def plan_sample(ctx: Context) -> Step:
    from vqtool.prior.sample import sample_images

    section = ctx.section("sample")
    extra = pop_keys(section, SAMPLE_KEYS)
    settings = ctx.sample_settings()
    refuse_unknown(section, settings, "sample")
    recorded = {**extra, **to_dict(settings)}

    def run(resume: bool) -> Outcome:
        with CallbackBar("sampling") as bar:
            r = sample_images(ctx.paths.prior, ctx.paths.vq, ctx.paths.samples, int(extra["n"]), settings,
                              class_id=extra["class"], device=ctx.device, quantize=extra["quantize"],
                              overwrite=True, progress=bar, precision=ctx.precision)
        return Outcome(f"{len(r.images)} images, {settings.schedule} schedule, {settings.steps} steps, "
                       f"{r.images_per_second:.2f} images/s")

    return Step("sample", recorded, ctx.paths.samples_artifact,
                lambda: {"prior": ctx.paths.prior, "vq": ctx.paths.vq}, run)
