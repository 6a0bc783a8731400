"""`vqtool report RUN`: (re)write RUN/index.html with fresh training curves (vqtool.report_html)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from vqtool.cli import stage_command
from vqtool.console import console, summary_table


@stage_command("report")
def report_command(
    run: Path = typer.Argument(..., help="A run folder (the --run of the stages), finished or still training."),
) -> None:
    """Write RUN/index.html: the training curves from the trainers' logs (redrawn into RUN/curves/), samples,
    reconstructions, inpainting, neighbours and metrics, whichever the run has made so far."""
    from vqtool.report_html import write_report

    r = write_report(run)
    rows: list[tuple[str, str]] = [("page", str(r.path))]
    for c in r.curves:
        shown = f"{c.png} ({c.records} records to step {c.last_step})" if c.png else "no records yet"
        rows.append((f"curves {c.stage}", shown))
    rows.append(("images", ", ".join(r.images) or "none"))
    if r.missing:
        rows.append(("not made yet", ", ".join(r.missing)))
    board = Path(run) / "tensorboard"
    if board.is_dir():
        rows.append(("tensorboard", f"tensorboard --logdir {board}"))
    console.print(summary_table("report", [(k, escape(v)) for k, v in rows]))
