"""`vqtool import`: the papers' published checkpoints and diffusers VQModel folders → vqtool artifacts
(vqtool.interop.importer)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from vqtool.cli import options, stage_command
from vqtool.console import console, summary_table


@stage_command("import")
def import_command(
    source: Path = typer.Argument(..., help="The checkpoint: UT's vqgan_ema_STEP.th / absorbing_ema_STEP.th, "
                                            "Taming's last.ckpt, or a diffusers VQModel folder (config.json + "
                                            "weights)."),
    out: Path = typer.Option(None, "--out", help="Artifact to write (default with --run: RUN/vq.safetensors or "
                                                 "RUN/prior.safetensors)."),
    run: Path = typer.Option(None, "--run", help="Run folder to import into, under its standard names."),
    config: Path = typer.Option(None, "--config", help="Taming's *-project.yaml that came with the checkpoint."),
    vq: Path = typer.Option(None, "--vq", help="An imported VQ: the grid and codebook of a UT prior, or the VQ a "
                                               "Taming transformer's first stage must equal."),
    vq_out: Path = typer.Option(None, "--vq-out", help="Where a Taming transformer's first stage is written "
                                                       "(default: RUN/vq.safetensors, or OUT-vq.safetensors)."),
    image_size: int = typer.Option(None, "--image-size", help="Training image size, when the file does not say "
                                                              "(UT: default 256; a VQModel folder: its "
                                                              "sample_size)."),
    heads: int = typer.Option(None, "--heads", help="Attention heads of a UT prior (not in the file; default 8)."),
    overwrite: bool = options.Overwrite,
) -> None:
    """Import a published checkpoint of Unleashing or Taming Transformers, or a diffusers VQModel folder.

    The file is read without running any code from it; the architecture is read off its tensors.
    A folder's architecture comes from its config.json and is checked against its tensors.
    Afterwards every stage works on the artifact: sample, inpaint, eval, encode, train-prior.
    """
    from vqtool.interop.importer import import_checkpoint, summary_rows

    result = import_checkpoint(source, out=out, run=run, config=config, vq=vq, image_size=image_size, heads=heads,
                               vq_out=vq_out, overwrite=overwrite)
    console.print(summary_table("import", summary_rows(result)))
    for note in result.notes:
        console.print(f"[dim]{escape(note)}[/dim]")
