"""`vqtool quickstart` and `vqtool run RECIPE`: the whole pipeline, skipping stages that are up to date."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from vqtool.cli import options, stage_command
from vqtool.console import console, summary_table

if TYPE_CHECKING:
    from vqtool.pipeline import PipelineResult

_Threads = typer.Option(None, "--threads", help="torch CPU threads (0: torch's default; default: the recipe's "
                                                "`threads:`). 1 is fastest on a busy shared machine.")
_Seed = typer.Option(None, "--seed", help="Seed of every stage (default: the recipe's `seed:`, else 0).")
_Device = typer.Option(None, "--device", help="auto, cpu or cuda (default: the recipe's `device:`, else auto).")
_Precision = typer.Option(None, "--precision", help="auto, fp32, bf16 or fp16 for every stage (default: the "
                                                    "recipe's `precision:`, else auto: fp32 on CPU).")
_Overwrite = typer.Option(False, "--overwrite", help="Replace outputs this pipeline did not make (it never "
                                                     "replaces them otherwise).")
_DryRun = typer.Option(False, "--dry-run", help="Only say which stages would run and why.")
_Set = typer.Option(None, "--set", help="Override a recipe setting: --set SECTION.KEY=VALUE, e.g. "
                                         "--set train_vq.max_steps=100, or --set seed=1 (repeatable).")


def _pipeline_options(**values):
    from vqtool.pipeline import PipelineOptions

    return PipelineOptions(**values)


# How every stage of the pipeline runs: one PipelineOptions, given to both commands as `opts`.
_opts = options.OptionGroup("opts", {
    "seed": (int, _Seed), "device": (str, _Device), "precision": (str, _Precision), "threads": (int, _Threads),
    "overwrite": (bool, _Overwrite), "dry_run": (bool, _DryRun)}, make=_pipeline_options)
_Stages = typer.Option(None, "--stages", help="Run only these stages, comma-separated (e.g. sample,eval).")


@stage_command("quickstart")
@_opts
def quickstart_command(
    run: Path = typer.Option(Path("runs/quickstart"), "--run", help="Run folder for every output."),
    config: Path = typer.Option(None, "--config", help="Another recipe instead of recipes/quickstart.yaml."),
    set_: list[str] = _Set,
    opts=None,
) -> None:
    """The whole pipeline on the built-in synthetic shapes, CPU-sized (under 10 minutes on 2 cores):
    prepare → train-vq → encode → train-prior → sample → inpaint → eval → neighbours → RUN/index.html.
    Rerunning skips every stage that is up to date."""
    from vqtool.pipeline import quickstart

    _print(quickstart(run, set_, opts, recipe_path=config))


@stage_command("run")
@_opts
def run_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML: sections per stage, optional `stages:` list, "
                                            "`prepare: {source: PATH}` or `{synthetic: shapes}`."),
    run: Path = typer.Option(None, "--run", help="Run folder (default: runs/RECIPE-NAME)."),
    set_: list[str] = _Set,
    stages: str = _Stages,
    opts=None,
) -> None:
    """Run a recipe's stages in order, skipping those whose outputs are up to date (provenance hashes)."""
    from vqtool.pipeline import load_and_run

    chosen = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    _print(load_and_run(recipe, run or Path("runs") / recipe.stem, set_, opts, chosen))


def _print(result: PipelineResult) -> None:
    table = Table(title="stages", title_justify="left")
    for name in ("stage", "status", "time", "result"):
        table.add_column(name, justify="right" if name == "time" else "left")
    colours = {"ran": "cyan", "resumed": "cyan", "up to date": "green", "would run": "yellow"}
    for r in result.stages:
        status = r.status + (f" ({r.why})" if r.why and r.status != "up to date" else "")
        seconds = "-" if r.status in ("up to date", "would run") else f"{r.seconds:.0f} s"  # this invocation's
        table.add_row(r.stage, f"[{colours.get(r.status, 'white')}]{escape(status)}[/]", seconds, escape(r.summary))
    console.print(table)
    if result.index is None:
        return
    root = result.run
    where = [
        ("page", result.index),
        ("samples", root / "samples" / "grid.png"),
        ("reconstructions", root / "figures" / "reconstructions.png"),
        ("inpainting", root / "inpaint" / "grid.png"),
        ("neighbours", root / "eval" / "neighbours.png"),
        ("metrics", root / "eval" / "report.json"),
        ("models", ", ".join(str(p) for p in (root / "vq.safetensors", root / "prior.safetensors") if p.exists())),
        ("stage record", root / "pipeline.json"),
    ]
    rows = [(k, escape(str(v))) for k, v in where if v and (not isinstance(v, Path) or v.exists())]
    rows.append(("time", f"{result.seconds:.0f} s"))
    console.print(summary_table("where everything is", rows))
