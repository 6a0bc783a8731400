"""The `vqtool` command: one thin Typer command per stage (parse → call the stage function → print).

Each stage family registers its commands from its own module; `stage_command` turns a VqtoolError
into one red line and exit status 2, and a clean Ctrl-C stop into status 130.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import typer

from vqtool.console import console
from vqtool.errors import VqtoolError
from vqtool.training import Interrupted

app = typer.Typer(
    name="vqtool",
    help="Train VQ image generators: prepare → train-vq → encode → train-prior → sample / inpaint / eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/bold red] {_escape(message)}", soft_wrap=True, highlight=False)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def stage_command(name: str, **kwargs) -> Callable:
    """Register `fn` as `vqtool NAME`, with the project's error and interrupt handling."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except VqtoolError as exc:
                fail(str(exc))
                raise typer.Exit(2) from None
            except Interrupted as exc:
                console.print(f"[yellow]stopped:[/yellow] {_escape(str(exc))}", soft_wrap=True)
                raise typer.Exit(130) from None
            except KeyboardInterrupt:
                console.print("[yellow]interrupted[/yellow]")
                raise typer.Exit(130) from None

        app.command(name, **kwargs)(wrapper)
        return fn

    return decorate


def _register_commands() -> None:
    # Importing a module registers its commands on `app`; each module is one stage family.
    import importlib

    for module in ("data", "vq", "prior", "sample", "evaluate", "pipeline", "interop"):
        importlib.import_module(f"vqtool.cli.{module}")

_register_commands()


def main() -> None:
    sys.exit(app())
