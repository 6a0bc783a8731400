"""The train-vq stage: a VQGAN TrainTask for the shared loop, and `train_vq`, the stage function.

One step: autoencoder forward → L1 (+ LPIPS) + codebook loss (+ λ·hinge GAN loss once the
discriminator is on) → Adam step → discriminator hinge step on DiffAugmented real and reconstructed
images → dead-code restarts → EMA update. The first step of a fresh run may initialise the codebook by
k-means over a few batches of encoder outputs.

No work is done twice (docs/performance.md has the measurements): each loss is differentiated once down
to the reconstruction, λ comes from one batched gradient through the decoder's last conv
(losses.generator_gradient), and the discriminator sees real and reconstructed images in one pass.

Everything random lives in the global torch RNG (saved by the loop), in the ShardLoader (its
state_dict is the data position) and in one explicit generator for DiffAugment, k-means and restarts
(saved here), so a resumed run continues exactly.

Several processes (torchrun): each rank reads its own share of the shards (ShardLoader(rank,
world_size)); the autoencoder and the discriminator step run in DDP, the discriminator normalises with
global-batch statistics, the adaptive GAN weight uses the global gradients, usage counts are summed
over ranks, and rank 0 runs k-means and dead-code restarts on every rank's encoder outputs and
broadcasts the codebook. So N ranks × batch B train the same weights as one process whose batch is
the N ranks' batches side by side (DiffAugment apart: each rank augments with its own generator).
`grad_accum` K adds up K micro-batches per step: a step sees batch_size × K × processes images.

Fine-tuning (`init`): a fresh run (step 0, new optimizers) whose model starts from a vq-model artifact's
`ema.*` weights (`model.*` when it has none) and whose EMA starts there too. The artifact fixes the
model settings, except the few that only steer training (TUNABLE), and, when it carries a
discriminator (`disc.*`, e.g. one imported from a paper's checkpoint), the discriminator's weights and
shape. The checkpoint records the init artifact's sha256 and the settings it fixed, so `--resume`
continues such a run exactly without naming it again.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vqtool.artifacts import file_sha256, load_artifact, load_prefixed_weights, read_metadata
from vqtool.config import to_dict
from vqtool.console import console
from vqtool.data.loader import ShardLoader
from vqtool.data.manifest import manifest_sha256, read_manifest
from vqtool.device import resolve_device
from vqtool.distributed import (
    ProcessInfo,
    all_gather_rows,
    all_reduce_mean,
    all_reduce_sum,
    distributed_session,
    global_batchnorm,
    layout_change_note,
    no_sync,
    process_info,
    wrap_ddp,
)
from vqtool.errors import VqtoolError
from vqtool.finetune import chosen_settings, find_init, start_weights
from vqtool.grids import make_grid, save_png
from vqtool.precision import autocast, grad_scaler, resolve_precision, switch_note
from vqtool.runs import RunPaths
from vqtool.training import EMA, LoopResult, LoopSettings, read_scalars, run_loop, seed_global_rng
from vqtool.vq.diffaug import POLICIES, diff_augment
from vqtool.vq.losses import PatchDiscriminator, generator_gradient, hinge_d_loss, hinge_g_loss
from vqtool.vq.model import VQConfig, VQModel
from vqtool.vq.perceptual import PERCEPTUAL_CHOICES, build_perceptual
from vqtool.vq.quantize import codebook_stats
from vqtool.vq.store import config_from_dict, save_vq

STAGE = "train-vq"

# The vq settings a fine-tuning run may change: they steer training, not the shapes or the meaning of
# the weights. Every other one (the architecture, and `cosine`, which decides what a code means) comes
# from the init artifact.
TUNABLE = ("beta", "dropout", "kmeans_init", "restart_threshold", "usage_decay")
DISC_SHAPE = ("disc_ch", "disc_layers")


@dataclass
class TrainVQConfig(LoopSettings):
    batch_size: int = 32  # per process and micro-batch: a step sees batch_size × grad_accum × processes images
    grad_accum: int = 1  # micro-batches whose gradients add up to one optimisation step
    lr: float = 2e-4
    disc_lr: float | None = None  # defaults to lr
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    codebook_weight: float = 1.0
    perceptual: str = "lpips-vgg"  # lpips-vgg | lpips-alex | none
    perceptual_weight: float = 1.0
    perceptual_weights: str | None = None  # explicit backbone file; else the torch hub cache
    disc_start: int = 30001  # the step number at which the discriminator joins
    disc_weight_max: float = 1.0  # clamp of the adaptive GAN weight λ
    disc_layers: int = 3
    disc_ch: int = 64
    diffaug: list[str] = field(default_factory=lambda: list(POLICIES))  # [] turns DiffAugment off
    ema_decay: float = 0.999
    kmeans_batches: int = 4  # batches of encoder outputs for the k-means codebook init
    kmeans_iters: int = 10
    flip: bool = False
    shuffle_buffer: int = 1000
    num_workers: int = 0
    # NHWC activations. None: on CUDA only. On CPU GroupNorm's NHWC kernel is several times slower and the
    # autoencoder's step measured 1.3× (64 px) to 2× (256 px) slower in NHWC; GPUs run NHWC convolutions natively.
    channels_last: bool | None = None
    compile: bool = False  # torch.compile the autoencoder and the discriminator (minutes; no gain measured on CPU)
    eval_images: int = 1000  # validation images per evaluation (0 = the whole split)
    grid_images: int = 8

    def validate(self) -> None:
        def bad(key: str, why: str) -> VqtoolError:
            return VqtoolError(f"train_vq.{key} = {getattr(self, key)!r}: {why}")

        if self.batch_size < 1:
            raise bad("batch_size", "must be at least 1")
        if self.grad_accum < 1:
            raise bad("grad_accum", "must be at least 1")
        if self.lr <= 0 or (self.disc_lr is not None and self.disc_lr <= 0):
            raise bad("lr", "learning rates must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", "expected two Adam betas in [0, 1)")
        if self.perceptual not in PERCEPTUAL_CHOICES:
            raise bad("perceptual", f"expected one of {', '.join(PERCEPTUAL_CHOICES)}")
        unknown = [p for p in self.diffaug if p not in POLICIES]
        if unknown:
            raise bad("diffaug", f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
        if not 0 <= self.ema_decay < 1:
            raise bad("ema_decay", "must be in [0, 1)")
        if self.disc_layers < 1 or self.disc_ch < 1:
            raise bad("disc_layers", "disc_layers and disc_ch must be at least 1")
        if self.disc_weight_max < 0:
            raise bad("disc_weight_max", "must be 0 or more")
        if self.kmeans_batches < 1:
            raise bad("kmeans_batches", "must be at least 1")
        self.check_loop("train_vq", need_end=False)  # train_vq() asks for the end before loading anything


@dataclass
class VQInit:
    """The model a fine-tuning run starts from, and the settings that fixes.

    On a fresh start they are the init artifact's; on a resume, the checkpoint's, which recorded them.
    """

    sha256: str  # of the init artifact
    path: Path | None  # the init artifact, when named (a resume need not name it)
    weights: str | None  # "ema" or "model": the tensors to start from; None on a resume
    vq: VQConfig
    disc: dict[str, int] | None  # {"disc_ch", "disc_layers"} when the discriminator's shape is fixed
    source: str  # what fixed the settings, for messages

    @property
    def fresh(self) -> bool:
        return self.weights is not None


@dataclass
class TrainVQResult:
    output: Path
    step: int
    reason: str
    steps_this_session: int
    seconds: float
    val: dict[str, float]
    grid: Path | None
    device: str
    precision: str = "fp32"  # fp32 | bf16 | fp16: what this session trained in
    init: Path | None = None  # the init artifact, when it was named
    init_sha256: str | None = None  # set for every run started from an init artifact
    stopped_by: signal.Signals | None = None  # SIGINT or SIGTERM, for an interrupted run

    @property
    def steps_per_s(self) -> float:
        return self.steps_this_session / max(self.seconds, 1e-9)


class VQTrainer:
    """The TrainTask of train-vq (see vqtool.training.TrainTask)."""

    stage = STAGE
    checkpoint_kind = "vq-checkpoint"

    def __init__(
        self,
        vq_cfg: VQConfig,
        cfg: TrainVQConfig,
        shards: Path,
        output: Path,
        figures: Path,
        seed: int = 0,
        device: torch.device | None = None,
        proc: ProcessInfo | None = None,
        init: VQInit | None = None,
        precision: str = "fp32",
    ):
        cfg.validate()
        self.cfg = cfg
        self.init = init
        self.seed = seed
        self.proc = proc or ProcessInfo()
        self.device = device or torch.device("cpu")
        self.precision = precision  # resolved (vqtool.precision): fp32, bf16 or fp16
        self.shards = Path(shards)
        self.output = Path(output)
        self.figures = Path(figures)
        self.step = 0

        manifest = read_manifest(self.shards)
        self.dataset_sha = manifest_sha256(self.shards)
        image_size = int(manifest["image_size"])
        if init is not None and init.vq.resolution != image_size:
            size = init.vq.resolution
            raise VqtoolError(
                f"{init.source} is a model of {size} px images but the shards in {self.shards} are {image_size} px; "
                f"fine-tune on data prepared at {size} px (vqtool prepare --size {size})"
            )
        if vq_cfg.resolution is None:
            vq_cfg.resolution = image_size
        elif vq_cfg.resolution != image_size:
            raise VqtoolError(
                f"vq.resolution = {vq_cfg.resolution} but the shards in {self.shards} are {image_size} px; "
                f"drop the setting or prepare the data at that size"
            )
        try:
            vq_cfg.validate()
        except ValueError as exc:
            raise VqtoolError(str(exc)) from None
        need = PatchDiscriminator.min_image_size(cfg.disc_layers)
        if image_size < need:
            raise VqtoolError(
                f"train_vq.disc_layers = {cfg.disc_layers} needs images of at least {need} px (these are "
                f"{image_size}); set disc_layers={max(1, cfg.disc_layers - 1)}"
            )
        self.vq_cfg = vq_cfg
        self.image_size = image_size
        self.val_split = "val" if int(manifest["counts"].get("val", 0)) > 0 else "train"
        if self.val_split == "train" and self.proc.is_main:
            console.print(f"[yellow]note:[/yellow] {self.shards} has no val split; evaluating on train images")

        self.loader = ShardLoader(
            self.shards, "train", batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer, flip=cfg.flip,
            infinite=True, seed=seed, rank=self.proc.rank, world_size=self.proc.world_size,
            num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
        )
        self._batches = None

        # Same seed on every rank → identical initial weights without a broadcast.
        seed_global_rng(seed)
        nhwc = cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        self.memory_format = torch.channels_last if nhwc else torch.contiguous_format
        self.model = VQModel(vq_cfg).to(self.device, memory_format=self.memory_format)
        self.disc = PatchDiscriminator(cfg.disc_ch, cfg.disc_layers).to(self.device, memory_format=self.memory_format)
        if init is not None and init.fresh:
            self._start_from(init)  # before the EMA and the evaluation copy are taken of the model
        # Under DDP the discriminator's BatchNorm sees the global batch (before its optimizer takes the parameters).
        global_batchnorm(self.disc)
        self.perceptual = build_perceptual(cfg.perceptual, cfg.perceptual_weights)
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        betas = (float(cfg.betas[0]), float(cfg.betas[1]))
        # The fused kernel: one pass per tensor instead of a dozen (5× less time on CPU, measured).
        self.opt_ae = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=betas, fused=True)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=betas, fused=True)
        # What the optimisation steps call: DDP averages the gradients over the ranks during backward
        # (the modules themselves in one process). Usage is summed explicitly, so no buffer broadcasts.
        self.train_model = wrap_ddp(self.model, self.device, sync_buffers=False)
        self.disc_pair = wrap_ddp(_RealFake(self.disc), self.device, sync_buffers=False)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.eval_model = copy.deepcopy(self.model).eval()
        self.eval_model.requires_grad_(False)
        if cfg.compile:
            _compile_in_place(self.model, self.disc)
        # DiffAugment, k-means and restarts draw from here; per rank so ranks augment differently.
        self.generator = torch.Generator().manual_seed(seed * 1000 + 17 + self.proc.rank)
        self.scaler = grad_scaler(precision)
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1
        self.last_grid: Path | None = None
        self.session_start_step: int | None = None  # step at which this process started training

    # ----------------------------------------------------------------------------------------------
    # TrainTask

    def resume_key(self) -> dict[str, Any]:
        key = {
            "model": to_dict(self.vq_cfg),
            "dataset": self.dataset_sha,
            "seed": self.seed,
            "batch_size": self.cfg.batch_size,
            "disc_layers": self.cfg.disc_layers,
            "disc_ch": self.cfg.disc_ch,
        }
        if self.init is not None:  # only then: checkpoints of other runs keep the key they always had
            key["init"] = self.init.sha256
        return key

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "disc": self.disc.state_dict(),
            "opt_ae": self.opt_ae.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "ema": self.ema.state_dict(),
            "loader": self.loader.state_dict(),
            "generator": self.generator.get_state(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "precision": self.precision,
            "layout": {"world_size": self.proc.world_size, "grad_accum": self.cfg.grad_accum},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["disc"])
        self.opt_ae.load_state_dict(state["opt_ae"])
        self.opt_d.load_state_dict(state["opt_d"])
        # Learning rates may be changed on resume (e.g. lowered after a NaN): the config wins.
        # So may the implementation: checkpoints written before the fused kernel carry fused = None.
        for group in self.opt_ae.param_groups:
            group.update(lr=self.cfg.lr, fused=True, foreach=None)
        for group in self.opt_d.param_groups:
            group.update(lr=self.cfg.disc_lr or self.cfg.lr, fused=True, foreach=None)
        for opt in (self.opt_ae, self.opt_d):
            _state_like_params(opt)
        self.ema.load_state_dict(state["ema"])
        self.ema.decay = self.cfg.ema_decay
        self.loader.load_state_dict(self._rederive_position(state["loader"]))
        note = layout_change_note(self.cfg.batch_size, state.get("layout", {"world_size": 1, "grad_accum": 1}),
                                  self.proc.world_size, self.cfg.grad_accum)
        if note and self.proc.is_main:
            console.print(f"[yellow]note:[/yellow] {note}")
        self._batches = None
        self.generator.set_state(state["generator"])
        switch = switch_note(state.get("precision"), self.precision)
        if switch and self.proc.is_main:
            console.print(f"[yellow]note:[/yellow] {switch}")
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    # Per-rank state for multi-process runs: each rank augments with its own generator stream.
    def rank_state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_rank_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:  # a rank the checkpoint did not have: a fresh stream of its own
            self.generator.manual_seed(self.seed * 1000 + 17 + self.proc.rank + 7919 * self.step)
        else:
            self.generator.set_state(state["generator"])

    def _loss_scale(self) -> torch.Tensor | None:
        """The GradScaler's current factor as a tensor on the device (no host sync); None without scaling."""
        if not self.scaler.is_enabled():
            return None
        return self.scaler.scale(torch.ones((), device=self.device))

    def _next_batch(self) -> torch.Tensor:
        if self._batches is None:
            self._batches = iter(self.loader)
        images, _ = next(self._batches)
        return images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        q = self.model.quantizer
        if self.session_start_step is None:
            self.session_start_step = self.step
        if self.step == 0 and self.vq_cfg.kmeans_init and not int(q.initialized):
            self._kmeans_init()
        self.model.train()
        self.disc.train()
        disc_on = self.step + 1 >= cfg.disc_start
        accum = cfg.grad_accum
        # Under DDP the adaptive weight balances the global batch's gradients, not one rank's.
        grad_reduce = all_reduce_mean if self.proc.distributed else None
        # Averaged over the micro-batches as tensors on the device, read back once at the end of the step.
        metrics: dict[str, torch.Tensor] = {}
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (images, reconstructions) for the discriminator
        vectors: list[torch.Tensor] = []  # lookup-space encoder outputs, for restarts
        counts: list[torch.Tensor] = []  # code lookups per micro-batch, for the running usage

        self.opt_ae.zero_grad(set_to_none=True)
        for k in range(accum):
            x = self._next_batch()
            # Micro-batches before the last accumulate locally; the last one's backward averages over ranks.
            # Forward passes and losses under autocast, every backward outside it (vqtool.precision).
            with no_sync(self.train_model, skip=k < accum - 1):
                with autocast(self.device, self.precision):
                    out = self.train_model(x)
                recon = out.recon.float()
                l1 = (x - recon).abs().mean()
                rec_loss = l1
                micro: dict[str, torch.Tensor] = {}
                if self.perceptual is not None:
                    with autocast(self.device, self.precision):
                        p_loss = self.perceptual(recon, x).float()
                    rec_loss = rec_loss + cfg.perceptual_weight * p_loss
                    micro["lpips"] = p_loss
                loss = rec_loss + cfg.codebook_weight * out.q_loss
                if disc_on:
                    # Frozen: the generator's step needs the discriminator's input gradient only (a compiled
                    # discriminator would compute its weight gradients too).
                    with autocast(self.device, self.precision), _frozen(self.disc):
                        g_loss = hinge_g_loss(self.disc(diff_augment(recon, cfg.diffaug, self.generator)).float())
                    # λ and the gradient at the reconstruction in one pass over each loss; then one
                    # backward from there and from the codebook loss (vqtool.vq.losses.generator_gradient).
                    weight, recon_grad = generator_gradient(rec_loss, g_loss, recon, self.model.last_layer,
                                                            cfg.disc_weight_max, self._loss_scale(),
                                                            grad_reduce=grad_reduce)
                    loss = (loss + weight * g_loss).detach()
                    torch.autograd.backward([recon, self.scaler.scale(cfg.codebook_weight * out.q_loss / accum)],
                                            [recon_grad / accum, None])
                    micro["g_loss"] = g_loss
                    micro["disc_weight"] = weight
                else:
                    self.scaler.scale(loss / accum).backward()
            micro = {"loss": loss, "l1": l1, "q_loss": out.q_loss, **micro}
            for key, value in micro.items():
                metrics[key] = metrics.get(key, 0.0) + value.detach() / accum
            seen.append((x, recon.detach()))
            vectors.append(out.vectors)
            counts.append(q.code_counts(out.indices))
        self.scaler.step(self.opt_ae)
        # The global batch's lookups of every micro-batch, in one collective every rank makes (never in forward).
        q.update_usage(all_reduce_sum(torch.stack(counts)))

        if disc_on:
            self.opt_d.zero_grad(set_to_none=True)
            d_loss_mean = 0.0
            for k, (x, recon) in enumerate(seen):
                with no_sync(self.disc_pair, skip=k < accum - 1):
                    with autocast(self.device, self.precision):
                        real, fake = self.disc_pair(diff_augment(x, cfg.diffaug, self.generator),
                                                    diff_augment(recon, cfg.diffaug, self.generator))
                    d_loss = hinge_d_loss(real.float(), fake.float())
                    self.scaler.scale(d_loss / accum).backward()
                d_loss_mean = d_loss_mean + d_loss.detach() / accum
            self.scaler.step(self.opt_d)
            metrics["d_loss"] = d_loss_mean
        self.scaler.update()

        restarted = 0
        if self.vq_cfg.restart_threshold > 0:
            found = torch.cat(vectors) if len(vectors) > 1 else vectors[0]
            if self.proc.distributed:
                # Every rank knows the same dead codes (usage counts are summed over the ranks); rank 0
                # re-seeds them from the whole global batch, and its rows, codebook and usage become everyone's.
                if q.dead_codes(self.vq_cfg.restart_threshold).numel():
                    found = all_gather_rows(found)
                if self.proc.is_main:
                    dead = q.restart_dead(found, self.generator, self.vq_cfg.restart_threshold)
                else:
                    dead = torch.zeros(0, dtype=torch.long)
                mask = torch.zeros(q.codebook_size, dtype=torch.uint8, device=q.usage.device)
                mask[dead.to(mask.device)] = 1
                for t in (mask, q.embedding.data, q.usage):
                    dist.broadcast(t, 0)
                dead = torch.nonzero(mask).flatten()
            else:
                dead = q.restart_dead(found, self.generator, self.vq_cfg.restart_threshold)
            restarted = int(dead.numel())
            if restarted:
                self._sync_codebook_into_ema(dead)

        self.step += 1
        # EMA warm-up: short runs average over their own length rather than over 1/(1-decay) steps.
        self.ema.decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        self.ema.update(self.model)
        return {**read_scalars(metrics), "restarted": float(restarted)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Val L1, PSNR, codebook usage and perplexity of the EMA weights; writes a PNG grid."""
        model = self.eval_model
        model.load_state_dict(self.ema.shadow)
        model.eval()
        loader = ShardLoader(self.shards, self.val_split, batch_size=self.cfg.batch_size, infinite=False,
                             rank=self.proc.rank, world_size=self.proc.world_size,
                             pin_memory=self.device.type == "cuda")
        limit = self.cfg.eval_images // self.proc.world_size if self.cfg.eval_images > 0 else None
        sums = torch.zeros(3, dtype=torch.float64)  # L1 sum over images, PSNR sum, image count
        counts = torch.zeros(model.codebook_size, dtype=torch.float64)
        grid = None
        for images, _ in loader:
            if limit is not None:
                images = images[: max(0, limit - int(sums[2]))]
                if images.shape[0] == 0:
                    break
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            with autocast(self.device, self.precision):
                tokens = model.encode_to_tokens(images)
                recon = model.decode_tokens(tokens).float()
            sums += _recon_sums(images, recon)
            counts += torch.bincount(tokens.flatten().cpu(), minlength=model.codebook_size).double()
            if grid is None and self.proc.is_main:
                n = min(self.cfg.grid_images, images.shape[0])
                grid = torch.cat([images[:n].cpu(), recon[:n].cpu()])
        if self.proc.distributed:
            sums, counts = sums.to(self.device), counts.to(self.device)
            dist.all_reduce(sums)
            dist.all_reduce(counts)
            sums, counts = sums.cpu(), counts.cpu()
        n = max(1.0, float(sums[2]))
        stats = codebook_stats(counts)
        metrics = {
            "l1": float(sums[0]) / n,
            "psnr": float(sums[1]) / n,
            "usage": stats["usage"],
            "perplexity": stats["perplexity"],
            "images": float(sums[2]),
        }
        if grid is not None:
            path = self.figures / f"step-{self.step:07d}.png"
            save_png(make_grid(grid, nrow=grid.shape[0] // 2), path)
            self.last_grid = path
        self.last_eval = metrics
        self.last_eval_step = self.step
        return metrics

    def output_paths(self) -> list[Path]:
        return [self.output]

    def export(self) -> list[Path]:
        # Under DDP export runs on rank 0 alone, and evaluating takes every rank: the last evaluation's numbers.
        if self.last_eval_step != self.step and not self.proc.distributed:
            self.evaluate()
        ev = self.last_eval
        extra = {
            "image_size": self.image_size,
            "latent_shape": list(self.model.latent_shape(self.image_size)),
            "step": self.step,
            "seed": self.seed,
            "codebook": {"usage": ev.get("usage"), "perplexity": ev.get("perplexity"),
                         "split": self.val_split, "images": ev.get("images")},
            "val": {"l1": ev.get("l1"), "psnr": ev.get("psnr")},
            "precision": self.precision,  # what the last session trained in; the weights are fp32
        }
        train_config = {**to_dict(self.cfg), "seed": self.seed}
        parents = {"dataset": self.dataset_sha}
        if self.init is not None:
            parents["init"] = self.init.sha256
        save_vq(self.output, self.vq_cfg, self.ema.shadow, self.model.state_dict(), train_config,
                parents=parents, extra=extra)
        return [self.output] + ([self.last_grid] if self.last_grid else [])

    # ----------------------------------------------------------------------------------------------
    # Helpers

    def _start_from(self, init: VQInit) -> None:
        """Fine-tuning: the init artifact's weights, and its discriminator when it has one, replace the
        random initialisation."""
        art = load_artifact(init.path, "vq-model")
        disc = {k.removeprefix("disc."): v for k, v in art.tensors.items() if k.startswith("disc.")}
        load_prefixed_weights(self.model, art, init.weights)
        if disc:
            try:
                self.disc.load_state_dict(disc)
            except RuntimeError as exc:
                raise VqtoolError(
                    f"{init.path}: its discriminator does not fit disc_ch = {self.cfg.disc_ch}, disc_layers = "
                    f"{self.cfg.disc_layers} ({str(exc).splitlines()[0]})"
                ) from None
        if self.vq_cfg.kmeans_init:
            # Asked for explicitly: the first step replaces the trained codebook by k-means centres after all.
            self.model.quantizer.initialized.zero_()

    @torch.no_grad()
    def _kmeans_init(self) -> None:
        """Codebook ← k-means centres of encoder outputs over the first `kmeans_batches` batches."""
        self.model.eval()
        vectors = []
        for _ in range(self.cfg.kmeans_batches):
            x = self._next_batch()
            with autocast(self.device, self.precision):
                z = self.model.encode(x).float()
            # Every rank's rows of this batch, in rank order: rank 0 clusters the global batches.
            vectors.append(all_gather_rows(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])))
        q = self.model.quantizer
        if self.proc.is_main:
            q.init_kmeans(torch.cat(vectors), self.generator, iters=self.cfg.kmeans_iters)
        if self.proc.distributed:
            dist.broadcast(q.embedding.data, 0)
            dist.broadcast(q.usage, 0)
            q.initialized.fill_(1)
        self._sync_codebook_into_ema(None)

    def _sync_codebook_into_ema(self, rows: torch.Tensor | None) -> None:
        # Codebook jumps (k-means, restarts) are copied into the EMA at once; averaging a re-seeded code
        # with its dead predecessor would give the exported model a code no encoder output is near.
        q = self.model.quantizer
        for name, value in (("quantizer.embedding", q.embedding.data), ("quantizer.usage", q.usage),
                            ("quantizer.initialized", q.initialized)):
            target = self.ema.shadow[name]
            if rows is None or name == "quantizer.initialized":
                target.copy_(value)
            else:
                rows_dev = rows.to(target.device)
                target[rows_dev] = value[rows_dev]

    def _rederive_position(self, loader_state: dict[str, Any]) -> dict[str, Any]:
        """A data position saved by another number of processes, mapped onto this run: as many training
        images read in all, spread over this run's ranks. Their shares of the shards differ, so the
        images that follow are not the ones an uninterrupted run would have read."""
        before = int(loader_state.get("world_size", self.proc.world_size))
        if before == self.proc.world_size:
            return loader_state
        read = int(loader_state["batches"]) * int(loader_state["batch_size"]) * before
        batches = read // (self.cfg.batch_size * self.proc.world_size)
        if self.proc.is_main:
            console.print(f"[yellow]note:[/yellow] data position re-derived: {read:,} training images read by "
                          f"{before} process(es) → batch {batches:,} of each of the {self.proc.world_size} "
                          "processes' shares")
        return {**loader_state, "world_size": self.proc.world_size, "batches": batches}


class _RealFake(nn.Module):
    """The discriminator on real and on reconstructed images in one call: DDP needs one forward per backward."""

    def __init__(self, disc: nn.Module):
        super().__init__()
        self.disc = disc

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One pass over both batches (each normalised with its own statistics): the convolutions see
        # twice the batch, which runs faster than two calls.
        return self.disc(torch.cat([real, fake]), parts=2).chunk(2)


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """`module`'s parameters require no gradient inside the context (and do again after it)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _compile_in_place(model: VQModel, disc: nn.Module) -> None:
    """torch.compile the encoder, the decoder up to its last GroupNorm, and the discriminator (each compiles
    at its first call). The decoder's last norm and conv stay eager, so the adaptive weight's gradient at
    the last layer runs that conv's backward alone, not a compiled graph's whole backward."""
    dec = model.decoder
    for module in (model.encoder, dec.conv_in, dec.mid, *dec.levels, *dec.ups, disc):
        if not isinstance(module, nn.Identity):
            module.compile()


def _state_like_params(opt: torch.optim.Optimizer) -> None:
    """Give each moment tensor of `opt` its parameter's memory layout again. Checkpoints store tensors
    contiguous; the fused Adam kernel walks a parameter and its moments in memory order, so moments of a
    channels-last parameter must be channels-last too."""
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    opt.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _recon_sums(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """[sum of per-image L1, sum of per-image PSNR (dB, images in [0, 1]), count] in float64."""
    diff = (images.float() - recon.float()).flatten(1)
    l1 = diff.abs().mean(1)
    mse = (diff / 2).pow(2).mean(1).clamp(min=1e-10)  # [-1, 1] → [0, 1] scale
    psnr = -10 * torch.log10(mse)
    return torch.stack([l1.sum(), psnr.sum(), torch.tensor(float(images.shape[0]), device=l1.device)]).double().cpu()


def _recorded_init(meta, sha: str, init: Path | None) -> VQInit:
    vq = config_from_dict(meta.config["model"], where=f"{meta.path} model config")
    return VQInit(sha256=sha, path=init, weights=None, vq=vq,
                  disc={key: int(meta.config[key]) for key in DISC_SHAPE},
                  source=f"the checkpoint {meta.path} of a fine-tuning run")


def _read_init(path: Path) -> VQInit:
    meta = read_metadata(path, "vq-model")
    model = meta.config.get("model")
    if not isinstance(model, dict):
        raise VqtoolError(f"{path}: vq-model artifact without a model config")
    vq = config_from_dict(model, where=f"{path} model config")
    if vq.resolution is None:  # the image size the model was trained on: what the data must have
        if not meta.extra.get("image_size"):
            raise VqtoolError(f"{path}: records no image size (extra.image_size); cannot fine-tune from it")
        vq.resolution = int(meta.extra["image_size"])
    names = meta.extra["_tensors"]
    disc = None
    if any(name.startswith("disc.") for name in names):
        shape = meta.extra.get("discriminator")
        if not isinstance(shape, dict) or any(key not in shape for key in DISC_SHAPE):
            raise VqtoolError(f"{path}: has discriminator weights (disc.*) but no extra.discriminator "
                              "{disc_ch, disc_layers} describing them")
        disc = {key: int(shape[key]) for key in DISC_SHAPE}
    return VQInit(sha256=file_sha256(path), path=path, weights=start_weights(path, names), vq=vq, disc=disc,
                  source=f"--init {path}")


def fine_tune_settings(
    start: VQInit, vq_given: Mapping[str, Any], cfg: TrainVQConfig, train_given: Mapping[str, Any]
) -> tuple[VQConfig, TrainVQConfig]:
    """The settings of a run that starts from `start`: its model settings, with the caller's TUNABLE
    choices on a fresh start; one-line errors for chosen settings that contradict it."""
    tunable = TUNABLE if start.fresh else ()  # a resume keeps every setting of the checkpoint
    for key, value in vq_given.items():
        fixed = getattr(start.vq, key)
        if key not in tunable and value != fixed:
            raise VqtoolError(f"vq.{key} = {value!r} conflicts with {start.source} ({key} = {fixed!r}); the model "
                              "settings come from there: drop the setting")
    vq_cfg = dataclasses.replace(copy.deepcopy(start.vq), **{k: v for k, v in vq_given.items() if k in tunable})
    if start.fresh and "kmeans_init" not in vq_given:
        vq_cfg.kmeans_init = False  # k-means would throw the trained codebook away
    if start.disc is not None:
        for key in DISC_SHAPE:
            if key in train_given and train_given[key] != start.disc[key]:
                raise VqtoolError(f"train_vq.{key} = {train_given[key]!r} conflicts with {start.source} ({key} = "
                                  f"{start.disc[key]}, the shape of its discriminator): drop the setting")
        cfg = dataclasses.replace(cfg, **start.disc)
    return vq_cfg, cfg


def train_vq(
    run: str | Path,
    vq_cfg: VQConfig | Mapping[str, Any] | None = None,
    cfg: TrainVQConfig | Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    shards: str | Path | None = None,
    output: str | Path | None = None,
    init: str | Path | None = None,
    precision: str = "auto",
) -> TrainVQResult:
    """Train a VQGAN on the shards of `run` (or `shards`) and write vq.safetensors; the train-vq stage.

    `vq_cfg` and `cfg` are settings dataclasses or mappings of the settings chosen (the rest default).
    `init` fine-tunes a vq-model artifact (see the module docstring): the settings chosen must agree with
    it, except TUNABLE ones; a dataclass counts as choosing the fields that differ from the defaults.
    `precision` is auto, fp32, bf16 or fp16 (vqtool.precision).
    """
    paths = RunPaths.of(run)
    vq_cfg, vq_given = chosen_settings(VQConfig, vq_cfg, "vq")
    cfg, train_given = chosen_settings(TrainVQConfig, cfg, "train_vq")
    cfg.check_loop("train_vq")
    shards = Path(shards) if shards else paths.shards
    output = Path(output) if output else paths.vq
    checkpoint = paths.checkpoint(STAGE)
    if output.exists() and not (resume or overwrite):
        raise VqtoolError(f"{output} exists; pass --overwrite to train a new one, or --resume to continue its run")
    start_from = find_init(init, checkpoint, "vq-checkpoint", resume, _recorded_init, _read_init)
    if start_from is not None:
        if start_from.fresh and output.resolve() == start_from.path.resolve():
            raise VqtoolError(f"--init {start_from.path} is also the output; fine-tune into another run folder "
                              "so the init artifact stays")
        vq_cfg, cfg = fine_tune_settings(start_from, vq_given, cfg, train_given)
    dev = resolve_device(device)
    chosen_precision = resolve_precision(precision, dev)
    with distributed_session(dev, process_info()) as proc:
        task = VQTrainer(vq_cfg, cfg, shards, output, paths.figures(STAGE), seed=seed, device=dev, proc=proc,
                         init=start_from, precision=chosen_precision)
        start = time.monotonic()
        result: LoopResult = run_loop(task, cfg, checkpoint, paths.log(STAGE), resume=resume,
                                      overwrite=overwrite, proc=proc)
        seconds = time.monotonic() - start
    done = result.step - (task.session_start_step if task.session_start_step is not None else result.step)
    return TrainVQResult(output=output, step=result.step, reason=result.reason, steps_this_session=done,
                         seconds=seconds, val=result.last_eval or task.last_eval, grid=task.last_grid,
                         device=str(dev), precision=chosen_precision, init=start_from.path if start_from else None,
                         init_sha256=start_from.sha256 if start_from else None, stopped_by=result.stopped_by)
