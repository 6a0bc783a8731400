"""Options shared by several commands, declared once so their names and help agree everywhere."""

from __future__ import annotations

from pathlib import Path

import typer

Run = typer.Option(Path("runs/default"), "--run", help="Run folder: standard input and output names live here.")
Device = typer.Option("auto", "--device", help="auto, cpu or cuda (fp32 on CPU; mixed precision only on CUDA).")
Seed = typer.Option(0, "--seed", help="Seed for every random choice of the stage.")
Config = typer.Option(None, "--config", help="Recipe YAML; its section for this stage sets the defaults.")
Set = typer.Option(None, "--set", help="Override a recipe setting: --set key=value (repeatable).")
Overwrite = typer.Option(False, "--overwrite", help="Replace existing outputs instead of refusing.")

NprocPerNode = typer.Option(
    1, "--nproc-per-node", help="Train with N processes on this machine: one per GPU, or CPU processes (gloo) "
    "without CUDA. Starts them itself (torchrun's launcher); for several nodes use torchrun.")
