"""One rich console and progress-bar style for every stage."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)


def progress(transient: bool = False) -> Progress:
    """A progress bar with count, elapsed time and ETA; `status` is a free text field (live losses)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=transient,
    )


def summary_table(title: str, rows: list[tuple[str, object]]) -> Table:
    """The short two-column table a stage prints at its end."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="cyan")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    return table
