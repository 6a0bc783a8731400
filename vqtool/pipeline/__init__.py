"""The whole pipeline as one graph of stages, rerun only where something changed.

`vqtool quickstart` and `vqtool run RECIPE` go through `run_pipeline`: for each stage of the recipe, in
graph order (prepare → train-vq → encode → train-prior → sample → inpaint → eval → neighbours), it
decides whether the stage's output is up to date and either skips the stage or runs its stage function.

  recipe.py      the stage graph, the stages a recipe implies, `--set SECTION.KEY=VALUE`
  step.py        Step (one stage, planned) and Context (what a planner reads)
  plan_chain.py  planners of prepare, train-vq, encode, train-prior, sample
  plan_side.py   planners of inpaint, eval, neighbours
  ledger.py      RUN/pipeline.json, the record of what ran
  freshness.py   up to date, run, or resume: the decision per stage
  runner.py      run_pipeline and its dry run, load_and_run, quickstart
"""

from vqtool.pipeline.freshness import folder_fingerprint, input_hash
from vqtool.pipeline.ledger import ledger_entries
from vqtool.pipeline.recipe import STAGES, apply_overrides, check_recipe, quickstart_recipe, recipe_stages
from vqtool.pipeline.runner import (
    PipelineOptions,
    PipelineResult,
    StageReport,
    load_and_run,
    quickstart,
    run_pipeline,
)

__all__ = [
    "STAGES", "PipelineOptions", "PipelineResult", "StageReport", "apply_overrides", "check_recipe",
    "folder_fingerprint", "input_hash", "ledger_entries", "load_and_run", "quickstart", "quickstart_recipe",
    "recipe_stages", "run_pipeline",
]
