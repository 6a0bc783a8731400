"""`vqtool train-vq`, `encode`, `reconstruct` and `decode`: thin wrappers over vqtool.vq stage functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from vqtool.cli import options, stage_command
from vqtool.config import Part, choose, load_recipe, stage_settings
from vqtool.console import console, summary_table
from vqtool.errors import Interrupted

_WEIGHTS_HELP = "Which weights of vq.safetensors to use: ema or model (raw)."
Weights = typer.Option("ema", "--weights", help=_WEIGHTS_HELP)
VQPath = typer.Option(None, "--vq", help="VQ model to use (default: RUN/vq.safetensors).")


def train_vq_parts() -> tuple[Part, ...]:
    """train-vq's settings: the model from the recipe's `vq` section, the training from `train_vq`."""
    from vqtool.vq.model import VQConfig
    from vqtool.vq.train import TrainVQConfig

    return Part(VQConfig, ("vq",)), Part(TrainVQConfig, ("train_vq",))


def _rows(d: dict[str, Any] | None, fmt: str = "{:.4g}") -> str:
    if not d:
        return "-"
    return ", ".join(f"{k} {fmt.format(v) if isinstance(v, float) else v}" for k, v in d.items())


@stage_command("train-vq")
@options.machine
def train_vq_command(
    ctx: typer.Context,
    run: Path = options.Run,
    config: Path = options.Config,
    set_: list[str] = options.Set,
    max_steps: int = typer.Option(None, "--max-steps", help="Stop after this many optimisation steps in total."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Stop after this many minutes of training."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per process and micro-batch."),
    grad_accum: int = typer.Option(
        None, "--grad-accum", help="Micro-batches per optimisation step; a step sees batch-size × grad-accum × "
        "processes images, so raise it when there are fewer processes to keep the same run."),
    lr: float = typer.Option(None, "--lr", help="Adam learning rate of the autoencoder (and discriminator)."),
    perceptual: str = typer.Option(None, "--perceptual", help="lpips-vgg | lpips-alex | none."),
    perceptual_weights: Path = typer.Option(
        None, "--perceptual-weights",
        help="Backbone weights for --perceptual (torchvision .pth or .safetensors); default: torch hub cache."),
    disc_start: int = typer.Option(None, "--disc-start", help="Step at which the discriminator joins."),
    disc_weight_max: float = typer.Option(None, "--disc-weight-max", help="Clamp of the adaptive GAN weight."),
    eval_every: int = typer.Option(None, "--eval-every", help="Validate and write a PNG grid every N steps."),
    tensorboard: bool = options.TensorBoard,
    compile_: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the autoencoder and the "
                                  "discriminator: minutes of compilation; no faster on CPU (measured)."),
    shards: Path = typer.Option(None, "--shards", help="Shards folder (default: RUN/shards)."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN/checkpoints/train-vq-last.safetensors."),
    init: Path = typer.Option(
        None, "--init", help="Fine-tune a vq-model artifact (e.g. from `vqtool import`): a fresh run (step 0, new "
        "optimizer) starting from its ema.* weights (the ones meant for use; model.* if it has none), its "
        "discriminator when it has one, and its model settings. Only beta, dropout, kmeans_init, "
        "restart_threshold and usage_decay may differ. --resume continues such a run without it."),
    seed: int = options.Seed,
    overwrite: bool = options.Overwrite,
    nproc_per_node: int = options.NprocPerNode,
    machine=None,
) -> None:
    """Train the VQGAN codebook model on RUN/shards → RUN/vq.safetensors (EMA + raw weights, codebook stats)."""
    from vqtool.distributed import process_info
    from vqtool.finetune import init_row
    from vqtool.launch import launch_ranks
    from vqtool.vq.train import train_vq

    cli = dict(max_steps=max_steps, max_minutes=max_minutes, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
               perceptual=perceptual,
               perceptual_weights=str(perceptual_weights) if perceptual_weights else None, disc_start=disc_start,
               disc_weight_max=disc_weight_max, eval_every=eval_every, tensorboard=tensorboard, compile=compile_)
    # The settings as chosen, not yet filled with defaults: with --init they are checked against the artifact.
    chosen = choose(train_vq_parts(), load_recipe(config), set_, {"train_vq": cli})
    if nproc_per_node != 1:
        return launch_ranks(ctx, nproc_per_node, machine.device)
    r = train_vq(run, chosen["vq"], chosen["train_vq"], seed=seed, device=machine.device, resume=resume,
                 overwrite=overwrite, shards=shards, init=init, precision=machine.precision)
    rows = [
        ("output", r.output),
        *([("init", init_row(r.init, r.init_sha256))] if r.init_sha256 else []),
        ("steps", f"{r.step} ({r.reason})"),
        ("speed", f"{r.steps_per_s:.2f} steps/s on {r.device} ({r.steps_this_session} steps, {r.seconds:.0f} s)"),
        ("precision", r.precision),
        ("val PSNR", f"{r.val.get('psnr', float('nan')):.2f} dB"),
        ("val L1", f"{r.val.get('l1', float('nan')):.4f}"),
        ("codebook usage", f"{100 * r.val.get('usage', 0):.1f}% of codes, perplexity {r.val.get('perplexity', 0):.1f}"),
        ("grid", r.grid or "-"),
        ("log", Path(run) / "train-vq.jsonl"),
    ]
    if process_info().is_main:  # one table per run, not one per torchrun process
        console.print(summary_table("train-vq", [(k, escape(str(v))) for k, v in rows]))
    if r.reason == "interrupted":
        raise Interrupted(f"saved a checkpoint at step {r.step}; continue with --resume", r.stopped_by)


@stage_command("encode")
@options.machine
def encode_command(
    run: Path = options.Run,
    vq: Path = VQPath,
    shards: Path = typer.Option(None, "--shards", help="Shards folder to encode (default: RUN/shards)."),
    out: Path = typer.Option(None, "--out", help="Latents file to write (default: RUN/latents.safetensors)."),
    # Defaults: vqtool.vq.encode.EncodeSettings, shared with the pipeline's `encode:` section.
    batch_size: int = typer.Option(None, "--batch-size", help="Images per forward pass."),
    weights: str = typer.Option(None, "--weights", help=_WEIGHTS_HELP),
    compile_: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the encoder: about 1.5 "
                                  "minutes of compilation, then 1.5× faster on CPU (pays from tens of thousands of "
                                  "images)."),
    overwrite: bool = options.Overwrite,
    machine=None,
) -> None:
    """Encode the train and val shards into token grids → RUN/latents.safetensors (parents: vq, dataset)."""
    from vqtool.vq.encode import EncodeSettings, encode_dataset

    s = stage_settings((Part(EncodeSettings, ("encode",)),), {}, None,
                       {"encode": {"batch_size": batch_size, "weights": weights, "compile": compile_}})["encode"]
    r = encode_dataset(run, vq, shards, out, batch_size=s.batch_size, device=machine.device, overwrite=overwrite,
                       weights=s.weights, precision=machine.precision, compile=s.compile)
    rows = [
        ("output", r.output),
        ("status", "up to date (same VQ and data); nothing encoded" if r.reused else "encoded"),
        ("images", ", ".join(f"{n:,} {s}" for s, n in r.counts.items())),
        ("token grid", f"{r.latent_shape[0]}×{r.latent_shape[1]} of {r.codebook_size} codes"),
        ("vq sha256", r.vq_sha256[:16] + "…"),
        ("precision", r.precision),
    ]
    if not r.reused:
        rows.append(("throughput", f"{r.images_per_s:,.0f} images/s ({r.seconds:.1f} s)"))
        rows.append(("codes used", _rows({s: 100 * u for s, u in r.usage.items()}, "{:.1f}%")))
    console.print(summary_table("encode", [(k, escape(str(v))) for k, v in rows]))


@stage_command("reconstruct")
@options.machine
def reconstruct_command(
    images: list[Path] = typer.Argument(..., help="Image files or folders (searched recursively)."),
    run: Path = options.Run,
    vq: Path = VQPath,
    out: Path = typer.Option(None, "--out", help="Folder for the PNGs (default: RUN/reconstructions)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    weights: str = Weights,
    machine=None,
) -> None:
    """Images → centre-crop to the VQ's size → encode → decode → one PNG each + comparison.png."""
    from vqtool.vq.encode import reconstruct_images

    r = reconstruct_images(run, images, vq, out, batch_size=batch_size, device=machine.device, weights=weights,
                           precision=machine.precision)
    rows = [("images", r.count), ("output", r.out_dir), ("comparison", r.grid), ("mean PSNR", f"{r.psnr:.2f} dB"),
            ("precision", r.precision)]
    console.print(summary_table("reconstruct", [(k, escape(str(v))) for k, v in rows]))


@stage_command("decode")
@options.machine
def decode_command(
    source: Path = typer.Argument(
        None, help="A latents or samples artifact (default: RUN/samples/samples.safetensors, else RUN/latents)."),
    run: Path = options.Run,
    vq: Path = VQPath,
    out: Path = typer.Option(None, "--out", help="Folder for the PNGs (default: RUN/decoded)."),
    split: str = typer.Option("val", "--split", help="Which split of a latents artifact: train or val."),
    limit: int = typer.Option(64, "--limit", help="Decode at most this many grids."),
    batch_size: int = typer.Option(64, "--batch-size", help="Grids per forward pass."),
    weights: str = Weights,
    machine=None,
) -> None:
    """Token grids (latents or samples artifact) → PNG images and grid.png, checking they were made by this VQ."""
    from vqtool.vq.encode import decode_artifact

    r = decode_artifact(run, source, vq, out, split=split, limit=limit, batch_size=batch_size, device=machine.device,
                        weights=weights, precision=machine.precision)
    rows = [("source", f"{r.source} ({r.kind})"), ("images", len(r.files)), ("output", r.out_dir), ("grid", r.grid),
            ("precision", r.precision)]
    console.print(summary_table("decode", [(k, escape(str(v))) for k, v in rows]))
