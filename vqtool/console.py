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


class CallbackBar:
    """A progress bar driven by a stage's `progress(completed, total)` callback.

    It appears at the first report, so an early error (missing file, bad option) prints alone.
    """

    def __init__(self, description: str):
        self.description = description
        self.bar: Progress | None = None
        self.task = None

    def __enter__(self) -> CallbackBar:
        return self

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False

    def __call__(self, completed: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress()
            self.bar.__enter__()
            self.task = self.bar.add_task(self.description, total=total, status="")
        self.bar.update(self.task, completed=completed, total=total)
