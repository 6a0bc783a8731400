"""One rich console and progress-bar style for every stage."""

from __future__ import annotations

import time

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


def duration(seconds: float) -> str:
    """`2 h 05 min`, `7 min 30 s`, `45 s`: a length of time as people say it."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def with_forecast(progress, tell, measure_seconds: float = 5.0, worth_telling: float = 60.0):
    """Wrap a `progress(done, total)` callback so that, once `measure_seconds` of work have been timed,
    `tell(total_seconds)` is called once with the expected length of the whole job, when it is long
    (`worth_telling` seconds or more): a long job says so before the user has waited for it."""
    first: list[tuple[float, int]] = []
    told = False

    def update(done: int, total: int) -> None:
        nonlocal told
        if progress is not None:
            progress(done, total)
        now = time.monotonic()
        if not first:
            first.append((now, done))
            return
        start, done0 = first[0]
        elapsed = now - start
        if told or elapsed < measure_seconds or done <= done0:
            return
        told = True
        per_unit = elapsed / (done - done0)
        expected = per_unit * total
        if expected >= worth_telling:
            tell(expected)

    return update
