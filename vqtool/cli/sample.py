"""`vqtool sample` (images from a prior) and `vqtool inpaint` (regenerate a masked part of an image)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from vqtool.cli import options, stage_command
from vqtool.config import Part, load_recipe, stage_settings
from vqtool.console import CallbackBar, console, summary_table
from vqtool.runs import RunPaths

_Stride = typer.Option(None, "--stride", help="--shape larger than training: spacing of the windows (default 1).")
_BatchSize = typer.Option(None, "--batch-size", help="Images drawn at once (default 16).")
_Class = typer.Option(None, "--class", help="Class index or name for a class-conditional prior, or none "
                                          "(unconditional samples; default: classes cycled).")


def _settings(common, sections: tuple[str, ...], cli: dict):
    from vqtool.prior.sample import SampleSettings

    part = Part(SampleSettings, sections)
    return stage_settings((part,), load_recipe(common.config), common.set_, {part.name: cli})[part.name]


@stage_command("sample")
@options.sampling
@options.common
def sample_command(
    run: Path = options.Run,
    n: int = typer.Option(64, "--n", help="Number of images to draw."),
    shape: tuple[int, int] = typer.Option(None, "--shape", help="Token grid H W, larger than the training grid "
                                                                "(absorbing: window mixture; AR: sliding window)."),
    stride: int = _Stride,
    batch_size: int = _BatchSize,
    class_: str = _Class,
    no_cache: bool = typer.Option(False, "--no-cache", help="Autoregressive prior: recompute instead of KV cache."),
    quantize: str = options.Quantize,
    compile_: bool = typer.Option(False, "--compile", help="Absorbing prior: torch.compile the transformer "
                                                          "(compiles first; pays for many images)."),
    prior: Path = options.Prior,
    vq: Path = options.VQ,
    out: Path = typer.Option(None, "--out", help="Output folder (default: RUN/samples)."),
    sampling=None,
    common=None,
) -> None:
    """Draw images from a trained prior: PNGs, a grid and samples.safetensors in RUN/samples."""
    from vqtool.prior.sample import sample_images

    paths = RunPaths.of(run)
    cli = dict(vars(sampling), shape=shape, stride=stride, batch_size=batch_size, seed=common.seed,
               use_cache=False if no_cache else None)
    settings = _settings(common, ("sample",), cli)
    with CallbackBar("sampling") as bar:
        r = sample_images(prior or paths.prior, vq or paths.vq, out or paths.samples, n, settings, class_id=class_,
                          device=common.device, quantize=quantize, overwrite=common.overwrite, progress=bar,
                          precision=common.precision, compile=compile_)
    H, W = r.tokens.shape[1:]
    rows = [
        ("images", f"{len(r.images)} PNGs in {r.grid.parent}"),
        ("grid", r.grid),
        ("tokens", f"{r.artifact} ({len(r.tokens)} × {H}×{W})"),
        ("settings", _describe(settings, r.prior_kind, H * W) + (", int8" if quantize == "int8" else "")
                     + (", compiled" if compile_ else "")),
        ("sampling", f"{r.seconds:.1f} s, {r.images_per_second:.2f} images/s"),
        ("decoding", f"{r.decode_seconds:.1f} s"),
        ("precision", r.precision),
    ]
    console.print(summary_table("sample", [(k, escape(str(v))) for k, v in rows]))


def _describe(settings, prior_kind: str, n_tokens: int) -> str:
    guided = (f", guidance {settings.guidance:g} ({settings.guidance_schedule})" if settings.guidance > 0
              else "")
    if prior_kind == "autoregressive":
        how = "KV cache" if settings.use_cache else "full-prefix recompute"
        return (f"autoregressive, {n_tokens} tokens one at a time ({how}), temperature {settings.temperature}"
                + guided)
    return f"{settings.schedule} schedule, {settings.steps} steps, temperature {settings.temperature}" + guided


@stage_command("inpaint")
@options.sampling
@options.common
def inpaint_command(
    image: Path = typer.Argument(..., help="The image to complete (any size; centre-cropped like prepare)."),
    run: Path = options.Run,
    mask: Path = typer.Option(None, "--mask", help="PNG the size of IMAGE: white pixels are regenerated."),
    box: str = typer.Option(None, "--box", help="Region to regenerate: x0,y0,x1,y1 in IMAGE pixels (x1, y1 excluded)."),
    n: int = typer.Option(8, "--n", help="Number of completions."),
    keep_pixels: bool = typer.Option(False, "--keep-pixels", help="Paste IMAGE's pixels back outside the mask."),
    batch_size: int = _BatchSize,
    class_: str = _Class,
    quantize: str = options.Quantize,
    prior: Path = options.Prior,
    vq: Path = options.VQ,
    out: Path = typer.Option(None, "--out", help="Output folder (default: RUN/inpaint)."),
    sampling=None,
    common=None,
) -> None:
    """Regenerate the masked part of an image with an absorbing prior: n completions as PNGs."""
    from vqtool.prior.inpaint import inpaint_image, parse_box

    paths = RunPaths.of(run)
    cli = dict(vars(sampling), batch_size=batch_size, seed=common.seed)
    settings = _settings(common, ("sample", "inpaint"), cli)
    parsed_box = parse_box(box) if box is not None else None
    with CallbackBar("inpainting") as bar:
        r = inpaint_image(prior or paths.prior, vq or paths.vq, image, out or paths.inpaint, n, settings,
                          mask_path=mask, box=parsed_box, keep_pixels=keep_pixels, class_id=class_,
                          device=common.device, quantize=quantize, overwrite=common.overwrite, progress=bar,
                          precision=common.precision)
    h, w = r.tokens.shape[1:]
    rows = [
        ("masked tokens", f"{r.masked_tokens} of {h * w}"),
        ("steps run", f"{r.steps_run} (of a {settings.steps}-step schedule over the whole grid)"),
        ("original", r.original),
        ("mask overlay", r.overlay),
        ("completions", f"{len(r.completions)} PNGs in {r.grid.parent}" + (", pixels kept" if keep_pixels else "")),
        ("grid", r.grid),
        ("tokens", r.artifact),
        ("time", f"{r.seconds:.1f} s"),
        ("precision", r.precision),
    ]
    console.print(summary_table("inpaint", [(k, escape(str(v))) for k, v in rows]))
