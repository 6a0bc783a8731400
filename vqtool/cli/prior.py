"""`vqtool train-prior`: a thin wrapper over vqtool.prior.train.train_prior."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from vqtool.cli import options, stage_command
from vqtool.config import Part, choose, load_recipe
from vqtool.console import console, summary_table
from vqtool.errors import Interrupted
from vqtool.runs import RunPaths


def train_prior_parts() -> tuple[Part, ...]:
    """train-prior's settings: one config filled from the recipe's `prior` section, then `train_prior`."""
    from vqtool.prior.train import TrainPriorConfig

    return (Part(TrainPriorConfig, ("prior", "train_prior")),)


@stage_command("train-prior")
def train_prior_command(
    ctx: typer.Context,
    run: Path = options.Run,
    prior: str = typer.Option(None, "--prior", help="absorbing (diffusion, default) or autoregressive."),
    latents: Path = typer.Option(None, "--latents", help="Latents to train on (default: RUN/latents.safetensors)."),
    out: Path = typer.Option(
        None, "--out", help="Prior to write (default: RUN/prior.safetensors); another name keeps its own "
        "checkpoint and log, e.g. --out RUN/prior-ar.safetensors → checkpoints/train-prior-ar-last.safetensors."),
    config: Path = options.Config,
    set_: list[str] = options.Set,
    max_steps: int = typer.Option(None, "--max-steps", help="Stop after this many optimisation steps in total."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Stop after this many minutes of training."),
    batch_size: int = typer.Option(None, "--batch-size", help="Grids per process and micro-batch (default: auto)."),
    grad_accum: int = typer.Option(
        None, "--grad-accum", help="Micro-batches per optimisation step; a step sees batch-size × grad-accum × "
        "processes grids, so raise it when there are fewer processes to keep the same run."),
    lr: float = typer.Option(None, "--lr", help="Peak AdamW learning rate, after the linear warm-up (default: auto)."),
    loss: str = typer.Option(None, "--loss", help="Absorbing prior: reweighted-elbo (default) | elbo | mlm."),
    mask_schedule: str = typer.Option(None, "--mask-schedule", help="Absorbing prior: random (default) | fixed."),
    timesteps: int = typer.Option(
        None, "--timesteps", help="Absorbing prior: diffusion steps T (default: auto, the grid's tokens up to 256)."),
    layers: int = typer.Option(None, "--layers", help="Transformer blocks (default: auto, from the data and device)."),
    width: int = typer.Option(None, "--width", help="Transformer width, the embedding size (default: auto)."),
    heads: int = typer.Option(None, "--heads", help="Attention heads (default: auto, width / 32 up to 8)."),
    dropout: float = typer.Option(None, "--dropout", help="Dropout rate."),
    eval_every: int = typer.Option(None, "--eval-every", help="Validation bound every N steps (best one is kept)."),
    patience: int = typer.Option(None, "--patience", help="Early stop after N evaluations without improvement."),
    tensorboard: bool = options.TensorBoard,
    threads: int = options.Threads,
    compile_: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the transformer blocks."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint of this prior."),
    init: Path = typer.Option(
        None, "--init", help="Fine-tune a prior-model artifact (e.g. from `vqtool import`): a fresh run (step 0, new "
        "optimizer) starting from its ema.* weights (the ones meant for use; model.* if it has none), with its "
        "prior kind, transformer and objective; only --dropout may differ. The latents must have its codebook, "
        "grid and classes. --resume continues such a run without it."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda."),
    precision: str = typer.Option(None, "--precision", help=options.Precision.help),
    seed: int = typer.Option(None, "--seed", help="Seed for weights, batches and masks (default 0)."),
    overwrite: bool = options.Overwrite,
    nproc_per_node: int = options.NprocPerNode,
) -> None:
    """Train the transformer prior on RUN/latents.safetensors → RUN/prior.safetensors (best validation bound)."""
    from vqtool.distributed import process_info
    from vqtool.finetune import init_row
    from vqtool.launch import launch_ranks
    from vqtool.prior.defaults import auto_row
    from vqtool.prior.train import stage_names, train_prior

    cli = dict(prior=prior, max_steps=max_steps, max_minutes=max_minutes, batch_size=batch_size,
               grad_accum=grad_accum, lr=lr, loss=loss,
               mask_schedule=mask_schedule, timesteps=timesteps, n_layer=layers, n_embd=width, n_head=heads,
               dropout=dropout, eval_every=eval_every, patience=patience, threads=threads, compile=compile_,
               device=device, precision=precision, seed=seed, tensorboard=tensorboard)
    # The settings as chosen, not yet filled with defaults: with --init they are checked against the artifact.
    chosen = choose(train_prior_parts(), load_recipe(config), set_, {"train_prior": cli})["train_prior"]
    if nproc_per_node != 1:
        return launch_ranks(ctx, nproc_per_node, chosen.get("device", "auto"))
    paths = RunPaths.of(run)
    out = out or paths.prior
    stage = stage_names(paths.prior, out)
    r = train_prior(latents or paths.latents, chosen, out, paths.checkpoint(stage), paths.log(stage),
                    resume=resume, overwrite=overwrite, init=init, auto_defaults=True)
    best = "-"
    if r.best_val_bpt is not None:
        best = f"{r.best_val_bpt:.4f} bits/token at step {r.best_step}"
        if r.best_val_bpd is not None:
            best += f" ({r.best_val_bpd:.4f} bits/dim)"
    rows = [
        ("prior", f"{r.prior} ({r.kind}, {r.params:,} parameters)"),
        ("steps", f"{r.steps} ({r.reason})"),
        *([("init", init_row(r.init, r.init_sha256))] if r.init_sha256 else []),
        *([("auto defaults", auto_row(r.auto))] if r.auto and r.auto["values"] else []),
        ("best val bound", best),
        ("last train bpt", f"{r.last_train['bpt']:.4f}" if "bpt" in r.last_train else "-"),
        ("throughput", f"{r.tokens_per_second:,.0f} tokens/s in training steps"),
        ("precision", r.precision),
        ("time", f"{r.seconds:.1f} s"),
        ("checkpoint", r.checkpoint),
        ("log", r.log),
    ]
    if process_info().is_main:  # one table per run, not one per torchrun process
        console.print(summary_table("train-prior", [(k, escape(str(v))) for k, v in rows]))
    if r.reason == "interrupted":
        raise Interrupted(f"saved a checkpoint at step {r.steps}; continue with --resume", r.stopped_by)
