"""`vqtool prepare` (images → shards) and `vqtool info` (describe an artifact or a shards folder)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from vqtool.cli import options, stage_command
from vqtool.config import Part, load_recipe, stage_settings
from vqtool.console import console, summary_table
from vqtool.errors import VqtoolError
from vqtool.runs import RunPaths

if TYPE_CHECKING:
    from vqtool.data.prepare import PrepareResult

# Recipe keys of the `prepare` section that choose the input rather than a setting.
_INPUT_KEYS = ("source", "synthetic", "count")


@stage_command("prepare")
def prepare_command(
    src: Path = typer.Argument(None, help="Folder (searched recursively) or .tar/.tar.gz archive of images."),
    run: Path = options.Run,
    out: Path = typer.Option(None, "--out", help="Shards folder to write (default: RUN/shards)."),
    synthetic: str = typer.Option(None, "--synthetic", help="Use a built-in dataset instead of SRC: shapes."),
    count: int = typer.Option(None, "--count", help="Images to render with --synthetic (default 2000)."),
    size: int = typer.Option(None, "--size", help="Output side in pixels, e.g. 32, 64, 256 (default 32)."),
    crop: str = typer.Option(None, "--crop", help="center (default) | random | none (keep the aspect, pad)."),
    background: str = typer.Option(None, "--background", help="Alpha and pad colour: white (default), black, R,G,B."),
    val_fraction: float = typer.Option(None, "--val-fraction", help="Share held out for validation (0.05)."),
    shard_size: int = typer.Option(None, "--shard-size", help="Samples per shard tar (default 1000)."),
    labels: str = typer.Option(None, "--labels", help="none (default) | folder (parent folder name → class)."),
    max_side: int = typer.Option(None, "--max-side", help="Skip images with a side above this (10000)."),
    workers: int = typer.Option(None, "--workers", help="Decode processes (default 2)."),
    seed: int = options.Seed,
    config: Path = options.Config,
    set_: list[str] = options.Set,
    overwrite: bool = options.Overwrite,
) -> None:
    """Convert images (or the built-in synthetic dataset) into webdataset shards + manifest.json."""
    from vqtool.data.prepare import PrepareSettings, prepare_images, prepare_synthetic

    section = dict(load_recipe(config).get("prepare") or {})
    inputs = {k: section.pop(k) for k in _INPUT_KEYS if k in section}
    cli = dict(size=size, crop=crop, background=background, val_fraction=val_fraction, shard_size=shard_size,
               labels=labels, max_side=max_side, workers=workers)
    settings = stage_settings((Part(PrepareSettings, ("prepare",)),), {"prepare": section}, set_,
                              {"prepare": cli})["prepare"]
    synthetic = synthetic or (None if src else inputs.get("synthetic"))
    src = src or (Path(inputs["source"]) if inputs.get("source") else None)
    target = out or RunPaths.of(run).shards
    if synthetic and src:
        raise VqtoolError("give either SRC or --synthetic, not both")
    if synthetic:
        n = count if count is not None else int(inputs.get("count", 2000))
        result = prepare_synthetic(target, synthetic, n, settings, seed=seed, overwrite=overwrite)
    elif src:
        if count is not None:
            raise VqtoolError("--count only applies with --synthetic")
        result = prepare_images(src, target, settings, seed=seed, overwrite=overwrite)
    else:
        raise VqtoolError("give a SRC folder/tar of images, or --synthetic shapes")
    console.print(summary_table("prepare", [(k, escape(str(v))) for k, v in _summary_rows(result)]))


def _summary_rows(r: PrepareResult) -> list[tuple[str, object]]:
    from vqtool.data.describe import human_bytes

    rows: list[tuple[str, object]] = [
        ("source", r.manifest["source"]),
        ("output", r.shards_dir),
        ("images", f"{r.counts['train']:,} train + {r.counts['val']:,} val, "
                   f"{r.manifest['image_size']}×{r.manifest['image_size']}"),
        ("classes", f"{len(r.classes)}" if r.classes else "unlabelled"),
        ("shards", f"{r.shard_files} files, {human_bytes(r.bytes)}"),
        ("files found", f"{r.found:,}" + (f" (+{r.ignored:,} non-image files ignored)" if r.ignored else "")),
    ]
    if r.skipped:
        rows += [(f"skipped: {reason}", n) for reason, n in sorted(r.skipped.items())]
    else:
        rows.append(("skipped", 0))
    rows.append(("throughput", f"{r.images_per_s:,.0f} images/s ({r.seconds:.1f} s, {r.workers} worker(s))"))
    rows.append(("CPU time", f"{1000 * r.cpu_seconds / max(r.found, 1):.2f} ms per image (all processes)"))
    return rows


@stage_command("info")
def info_command(
    path: Path = typer.Argument(..., help="A .safetensors artifact, a shards folder, or a run folder."),
    all_skipped: bool = typer.Option(False, "--all", help="List every tensor / skipped file instead of the first few."),
) -> None:
    """Describe an artifact (kind, config, parents, tensors, size) or a shards folder (manifest summary)."""
    from vqtool.data.describe import describe

    d = describe(path)
    console.print(summary_table(escape(d.title), [(k, escape(v)) for k, v in d.rows]))
    if d.config:
        console.print(summary_table("config", [(escape(k), escape(v)) for k, v in d.config]))
    if d.tensors:
        table = Table(title="tensors", title_justify="left")
        for name in ("name", "dtype", "shape", "elements"):
            table.add_column(name, justify="right" if name == "elements" else "left")
        limit = len(d.tensors) if all_skipped else 40
        for row in d.tensors[:limit]:
            table.add_row(*(escape(c) for c in row))
        if len(d.tensors) > limit:
            table.add_row(f"… {len(d.tensors) - limit} more (--all lists them)", "", "", "")
        console.print(table)
    if d.skipped:
        table = Table(title="skipped files", title_justify="left")
        for name in ("path", "reason", "detail"):
            table.add_column(name)
        limit = len(d.skipped) if all_skipped else 20
        for row in d.skipped[:limit]:
            table.add_row(*(escape(c) for c in row))
        if len(d.skipped) > limit:
            table.add_row(f"… {len(d.skipped) - limit} more (--all lists them)", "", "")
        console.print(table)
