"""`vqtool export`: a vqtool VQ artifact → a diffusers VQModel folder (vqtool.interop.export)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from vqtool.cli import options, stage_command
from vqtool.console import console, summary_table


@stage_command("export")
def export_command(
    vq: Path = typer.Argument(..., help="The vq-model artifact to export (e.g. RUN/vq.safetensors)."),
    out: Path = typer.Option(..., "--out", help="Folder to write: config.json, diffusion_pytorch_model.safetensors, "
                                                "README.md."),
    fmt: str = typer.Option("diffusers", "--format", help="Output format: diffusers (a VQModel folder)."),
    weights: str = typer.Option("ema", "--weights", help="Which weights to export: ema or model (raw)."),
    overwrite: bool = options.Overwrite,
) -> None:
    """Export a VQ model as a diffusers VQModel folder, with a model card.

    `diffusers.VQModel.from_pretrained(OUT)` loads it and gives the same code indices and decoded images.
    `vqtool import OUT` reads it back. Settings a VQModel cannot express are refused in one line.
    """
    from vqtool.interop.export import export_vq

    result = export_vq(vq, out, fmt=fmt, weights=weights, overwrite=overwrite)
    c = result.config
    rows = [("source", f"{result.source} (sha256 {result.source_sha256[:12]}…)"),
            ("format", f"diffusers VQModel: {len(c['block_out_channels'])} levels {c['block_out_channels']}, "
                       f"layers_per_block {c['layers_per_block']}, norm_num_groups {c['norm_num_groups']}"),
            ("codebook", f"{c['num_vq_embeddings']} codes × {c['vq_embed_dim'] or c['latent_channels']} dims"),
            ("parameters", f"{result.parameters:,}")]
    rows += [("wrote", str(path)) for path in result.files]
    console.print(summary_table("export", rows))
    for note in result.notes:
        console.print(f"[dim]{escape(note)}[/dim]")
