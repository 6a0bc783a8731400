"""Options shared by several commands, declared once so their names and help agree everywhere."""

from __future__ import annotations

from pathlib import Path

import typer

Run = typer.Option(Path("runs/default"), "--run", help="Run folder: standard input and output names live here.")
Device = typer.Option("auto", "--device", help="auto, cpu or cuda.")
Precision = typer.Option("auto", "--precision", help="auto (fp32 on CPU; bf16 on GPUs that have it, else fp16), "
                                                     "fp32, bf16 or fp16 (CUDA only). Artifacts stay fp32.")
Seed = typer.Option(0, "--seed", help="Seed for every random choice of the stage.")
Config = typer.Option(None, "--config", help="Recipe YAML; its section for this stage sets the defaults.")
Set = typer.Option(None, "--set", help="Override a recipe setting: --set key=value (repeatable).")
Overwrite = typer.Option(False, "--overwrite", help="Replace existing outputs instead of refusing.")

