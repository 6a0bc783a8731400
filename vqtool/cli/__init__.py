"""The `vqtool` command: one thin Typer command per stage (parse → call the stage function → print).

Each stage family registers its commands from its own module; `stage_command` turns a VqtoolError
or any OSError (a read-only folder, a full disk, a file in the way) into one red line and exit
status 2, a Ctrl-C into status 130 (also while the modules are still being imported), and a clean stop on
SIGTERM into 143. Under a launcher (`--nproc-per-node`, torchrun) that red line, or the exception nothing
handled, is also left in the rank's error file, for the launcher to report (vqtool.launch).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NoReturn


def _interrupted_at_startup() -> NoReturn:
    # Ctrl-C while torch is still importing: rich may not be loaded yet, so plain stderr.
    print("interrupted", file=sys.stderr)
    raise SystemExit(130)


try:
    import typer

    from vqtool.console import console
    from vqtool.errors import Interrupted, VqtoolError
    from vqtool.outputs import os_error_message
except KeyboardInterrupt:
    _interrupted_at_startup()

app = typer.Typer(
    name="vqtool",
    help="Train VQ image generators: prepare → train-vq → encode → train-prior → sample / inpaint / eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _under_launcher() -> bool:
    # Only a rank started by torchrun or --nproc-per-node has an error file; vqtool.launch imports torch.
    import os

    return "TORCHELASTIC_ERROR_FILE" in os.environ


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/bold red] {_escape(message)}", soft_wrap=True, highlight=False)
    if _under_launcher():
        from vqtool.launch import record_error

        record_error(message)


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
                raise typer.Exit(getattr(exc, "exit_status", 2)) from None
            except Interrupted as exc:
                console.print(f"[yellow]stopped:[/yellow] {_escape(str(exc))}", soft_wrap=True)
                raise typer.Exit(exc.exit_status) from None
            except KeyboardInterrupt:
                console.print("[yellow]interrupted[/yellow]")
                raise typer.Exit(130) from None
            except OSError as exc:
                fail(os_error_message(exc))
                raise typer.Exit(2) from None

        app.command(name, **kwargs)(wrapper)
        return fn

    return decorate


def _register_commands() -> None:
    # Importing a module registers its commands on `app`; each module is one stage family.
    import importlib

    for module in ("data", "vq", "prior", "sample", "evaluate", "pipeline", "interop", "export", "report"):
        importlib.import_module(f"vqtool.cli.{module}")


try:
    _register_commands()
except KeyboardInterrupt:
    _interrupted_at_startup()


def main() -> None:
    from vqtool.memory import keep_freed_memory

    keep_freed_memory()  # every stage: freed tensors stay in the heap for the next step (vqtool.memory)
    try:
        code = app()
    except KeyboardInterrupt:  # while typer builds the command, before a stage's own handling
        _interrupted_at_startup()
    except Exception as exc:
        if _under_launcher():
            from vqtool.launch import record_crash

            record_crash(exc)
        raise
    sys.exit(code)
