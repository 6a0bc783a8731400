"""Running a recipe: plan every stage, then per stage in graph order skip it, run it or resume it.

A dry run plans and decides the same way but runs nothing: a stage whose inputs another stage would
rewrite first is reported as running after that one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqtool.artifacts import file_sha256
from vqtool.config import load_recipe
from vqtool.console import console
from vqtool.data.manifest import MANIFEST_NAME
from vqtool.errors import Interrupted, VqtoolError
from vqtool.pipeline.freshness import current_inputs, decide, input_hash, owned
from vqtool.pipeline.ledger import LEDGER_NAME, Ledger
from vqtool.pipeline.plan_chain import plan_encode, plan_prepare, plan_sample, plan_train_prior, plan_train_vq
from vqtool.pipeline.plan_side import plan_eval, plan_inpaint, plan_neighbours
from vqtool.pipeline.recipe import STAGES, apply_overrides, check_recipe, quickstart_recipe, recipe_stages
from vqtool.pipeline.step import Context, Step
from vqtool.precision import PRECISIONS
from vqtool.runs import RunPaths

_PLANNERS: dict[str, Callable[[Context], Step]] = {
    "prepare": plan_prepare,
    "train-vq": plan_train_vq,
    "encode": plan_encode,
    "train-prior": plan_train_prior,
    "sample": plan_sample,
    "inpaint": plan_inpaint,
    "eval": plan_eval,
    "neighbours": plan_neighbours,
}


@dataclass
class PipelineOptions:
    seed: int | None = None  # None: the recipe's `seed:` (else 0)
    device: str | None = None  # None: the recipe's `device:` (else auto)
    precision: str | None = None  # None: the recipe's `precision:` (else auto); vqtool.precision
    threads: int | None = None  # torch CPU threads; None: the recipe's `threads:` (else torch's default)
    overwrite: bool = False  # replace outputs this pipeline did not make
    dry_run: bool = False  # only say what would run and why
    write_index: bool = True


@dataclass
class StageReport:
    stage: str
    status: str  # "ran", "resumed", "up to date", "would run" (dry run)
    why: str  # why it ran (or "" when up to date)
    seconds: float  # wall time of this invocation's run; of the recorded run when up to date
    output: Path
    summary: str


@dataclass
class PipelineResult:
    run: Path
    stages: list[StageReport]
    index: Path | None = None
    seconds: float = 0.0


def run_pipeline(
    recipe: dict[str, Any],
    run: str | Path,
    options: PipelineOptions | None = None,
    stages: list[str] | None = None,
    where: str = "recipe",
) -> PipelineResult:
    """Run the recipe's stages in graph order, skipping those whose outputs are up to date.

    `stages` picks a subset (default: the recipe's). A training stage stopped by Ctrl-C raises
    `Interrupted` after recording its state; rerunning the same call resumes it.
    """
    options = options or PipelineOptions()
    check_recipe(recipe, where)
    chosen = recipe_stages(recipe, where)
    if stages:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise VqtoolError(f"--stages: unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
        chosen = [s for s in STAGES if s in stages]
    seed = options.seed if options.seed is not None else int(recipe.get("seed") or 0)
    device = options.device or str(recipe.get("device") or "auto")
    precision = options.precision or str(recipe.get("precision") or "auto")
    if precision not in PRECISIONS:
        raise VqtoolError(f"--precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    threads = options.threads if options.threads is not None else int(recipe.get("threads") or 0)
    if threads < 0:
        raise VqtoolError(f"--threads {threads}: must be 0 (torch's default) or more")
    ctx = Context(RunPaths.of(run), recipe, chosen, seed, device, threads, options.dry_run, precision)
    steps = [_PLANNERS[name](ctx) for name in chosen]  # every setting is checked before anything runs
    ledger = Ledger(ctx.paths.root / LEDGER_NAME)

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    reports: list[StageReport] = []
    changing: dict[Path, str] = {}  # dry run: outputs that would be rewritten → by which stage
    try:
        for step in steps:
            reports.append(_run_step(step, ledger, options, changing))
    finally:
        torch.set_num_threads(previous_threads)
    result = PipelineResult(ctx.paths.root, reports, seconds=time.perf_counter() - start)
    if options.write_index and not options.dry_run:
        from vqtool.report_html import write_index

        result.index = write_index(ctx.paths.root, device=device)
    return result


def _run_step(step: Step, ledger: Ledger, options: PipelineOptions, changing: dict[Path, str]) -> StageReport:
    entry = ledger.get(step.stage)
    if options.dry_run:
        return _dry_run(step, entry, options, changing)
    hashes = current_inputs(step)
    action, why = decide(step, entry, hashes, options.overwrite)
    if action == "skip":
        console.print(f"[green]{step.stage}[/green]: up to date ({step.output})", highlight=False)
        return StageReport(step.stage, "up to date", "", float(entry.get("seconds", 0.0)), step.output,
                           entry.get("summary", ""))
    console.rule(f"[bold]{step.stage}[/bold]: {why}", style="cyan")
    resume = action == "resume"
    previous = entry.get("output") if entry and step.output.exists() and owned(entry, step.output) else None
    started = float(entry["started"]) if resume else time.time()
    record = {"status": "running", "settings": step.settings, "inputs": hashes, "output": previous,
              "started": started, "seconds": float(entry.get("seconds", 0.0)) if resume else 0.0, "summary": ""}
    ledger.put(step.stage, record)
    t0 = time.perf_counter()
    try:
        outcome = step.run(resume)
    except KeyboardInterrupt:
        ledger.put(step.stage, _finish(record, step, t0, "interrupted", "stopped by Ctrl-C"))
        raise
    except VqtoolError as exc:
        ledger.put(step.stage, _finish(record, step, t0, "failed", str(exc)))
        raise
    status = "interrupted" if outcome.reason == "interrupted" else "done"
    ledger.put(step.stage, _finish(record, step, t0, status, outcome.summary))
    if status == "interrupted":
        raise Interrupted(f"{step.stage} stopped and saved its checkpoint; rerun the same command to resume it")
    return StageReport(step.stage, "resumed" if resume else "ran", why, time.perf_counter() - t0, step.output,
                       outcome.summary)


def _finish(record: dict[str, Any], step: Step, t0: float, status: str, summary: str) -> dict[str, Any]:
    done = dict(record)
    done.update(status=status, summary=summary, seconds=round(record["seconds"] + time.perf_counter() - t0, 3),
                finished=time.time())
    if step.output.exists():
        done["output"] = file_sha256(step.output)
    return done


def _dry_run(step: Step, entry: dict[str, Any] | None, options: PipelineOptions,
             changing: dict[Path, str]) -> StageReport:
    try:
        paths = {role: Path(p) for role, p in step.inputs().items()}
    except VqtoolError:  # e.g. the inpaint image comes from shards that are not prepared yet
        paths = None
    after = sorted({changing[p] for p in paths.values() if p in changing}) if paths is not None else []
    if after:
        why = "after " + ", ".join(after)
    elif paths is None or any(not p.exists() for p in paths.values()):
        why = "inputs not made yet"
    else:
        action, why = decide(step, entry, {r: input_hash(p) for r, p in paths.items()}, options.overwrite)
        if action == "skip":
            return StageReport(step.stage, "up to date", "", float(entry.get("seconds", 0.0)), step.output,
                               entry.get("summary", ""))
    changing[step.output] = step.stage
    if step.output.name == MANIFEST_NAME:
        changing[step.output.parent] = step.stage  # later stages name the shards folder
    return StageReport(step.stage, "would run", why, 0.0, step.output, "")


def load_and_run(recipe_path: str | Path, run: str | Path, overrides: list[str] | None = None,
                 options: PipelineOptions | None = None, stages: list[str] | None = None) -> PipelineResult:
    """`vqtool run RECIPE`: read the recipe, apply `--set` overrides, run it."""
    recipe = apply_overrides(load_recipe(recipe_path), overrides)
    return run_pipeline(recipe, run, options, stages, where=str(recipe_path))


def quickstart(run: str | Path = "runs/quickstart", overrides: list[str] | None = None,
               options: PipelineOptions | None = None, recipe_path: str | Path | None = None) -> PipelineResult:
    """`vqtool quickstart`: the quickstart recipe (synthetic shapes, CPU-sized) through every stage."""
    return load_and_run(recipe_path or quickstart_recipe(), run, overrides, options)
