"""`train-prior`: fit a transformer prior to a latents artifact, for either prior kind.

The two priors differ only in their objective (`make_objective`): absorbing diffusion trains a
bidirectional transformer on masked grids, the autoregressive prior a causal one on next tokens.
Everything else is shared: AdamW with linear warm-up and optional cosine decay, gradient clipping,
an EMA of the weights, batches drawn from the train split by a seeded generator, a validation bound
on the val split every `eval_every` steps, and the shared loop of `vqtool.training` (exact resume,
Ctrl-C, NaN, JSONL log, progress bar).

The best validation bound so far is exported at once as the prior artifact (EMA weights), so
prior.safetensors is always the early-stopping choice; the loop's checkpoint is the latest state.

Several processes (torchrun) split every global batch: one step sees batch_size × grad_accum ×
world_size grids, drawn by one sampler and one mask generator that every rank runs identically, rank r
training on its own rows. So the batches and masks do not depend on how the work is split: N ranks ×
batch B train the same model as one process with batch N·B, or with batch B and grad_accum N, and a
checkpoint resumes exactly on another number of processes that keeps the global batch.

Classifier-free guidance (vqtool.prior.guidance) needs a prior that also predicts without a class:
with `cond_drop` p > 0, each training label of a class-conditional prior becomes NO_CLASS (prefix row 0)
with probability p, drawn per step from the seed and the step over the global batch (`drop_labels`).
The validation bound stays conditional.

Fine-tuning (`init`): a fresh run (step 0, new optimizer) whose transformer and EMA start from a
prior-model artifact's `ema.*` weights (`model.*` when it has none). The artifact fixes the prior kind,
the transformer and the objective (only `dropout` may change); the latents must be codes of the same
codebook, grid and classes, and of the same VQ when both record theirs. The checkpoint records the init
artifact's sha256 and the settings it fixed, so `--resume` continues such a run without naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqtool.artifacts import file_sha256, load_artifact, load_prefixed_weights, read_metadata
from vqtool.config import to_dict
from vqtool.console import console
from vqtool.device import resolve_device
from vqtool.distributed import (
    ProcessInfo,
    all_reduce_mean,
    all_reduce_sum,
    distributed_session,
    layout_change_note,
    no_sync,
    process_info,
    rank_seed,
    wrap_ddp,
)
from vqtool.errors import VqtoolError
from vqtool.finetune import chosen_settings, find_init, start_weights
from vqtool.latents import Latents, load_latents
from vqtool.precision import PRECISIONS, autocast, grad_scaler, resolve_precision, switch_note
from vqtool.prior.defaults import auto_record
from vqtool.prior.objectives import make_objective
from vqtool.prior.store import PRIOR_KINDS, model_config_from_record, save_prior, with_legacy_settings
from vqtool.prior.transformer import NO_CLASS, Transformer, TransformerConfig
from vqtool.training import EMA, LoopSettings, read_scalars, run_loop, seed_global_rng

STAGE = "train-prior"


@dataclass
class TrainPriorConfig(LoopSettings):
    prior: str = "absorbing"  # absorbing | autoregressive
    # model
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 256
    dropout: float = 0.0
    pos_emb: str = "2d"  # 2d | flat
    gelu: str = "exact"  # exact | tanh (the approximation; 2.6-7x slower on CPU, as fast on a GPU)
    class_conditional: bool = True  # use the latents' labels when they have them
    cond_drop: float = 0.1  # class-conditional: chance a training label becomes NO_CLASS (for guidance; 0: off)
    # objective (absorbing prior only)
    timesteps: int = 256  # T
    mask_schedule: str = "random"  # random | fixed
    loss: str = "reweighted-elbo"  # reweighted-elbo | elbo | mlm
    nll_samples: int | None = None  # K for the per-image ELBO later (None: every t once)
    # optimisation
    batch_size: int = 16  # per process and micro-step: a step sees batch_size × grad_accum × processes grids
    grad_accum: int = 1  # micro-batches whose gradients add up to one optimisation step
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 500
    cosine_decay: bool = False
    decay_steps: int | None = None  # cosine horizon; None: max_steps
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    # run (max_steps, max_minutes and the log / eval / checkpoint periods come from LoopSettings)
    val_batches: int = 8  # validation images: val_batches × global batch (or the whole val split)
    val_nll_samples: int = 8  # t draws per val image for the validation bound (absorbing)
    patience: int | None = None  # stop after this many evaluations without a better val bound
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (vqtool.precision)
    threads: int | None = None  # torch CPU threads (None: torch's default)
    compile: bool = False  # torch.compile the transformer blocks


ABSORBING_ONLY = ("timesteps", "mask_schedule", "loss", "nll_samples")
# What a fine-tuning run may change: everything else of the model and the objective comes from the init prior.
TUNABLE = ("dropout",)


def check_config(cfg: TrainPriorConfig) -> None:
    """Refuse impossible settings with one line naming the setting."""
    if cfg.prior not in PRIOR_KINDS:
        raise VqtoolError(f"--prior must be one of {', '.join(PRIOR_KINDS)} (got {cfg.prior!r})")
    if cfg.prior == "autoregressive":
        defaults = TrainPriorConfig()
        changed = [k for k in ABSORBING_ONLY if getattr(cfg, k) != getattr(defaults, k)]
        if changed:
            raise VqtoolError(f"{', '.join(changed)}: absorbing-prior settings; drop them with --prior autoregressive")
    positive = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum,
                "val_batches": cfg.val_batches, "val_nll_samples": cfg.val_nll_samples}
    for name, value in positive.items():
        if value < 1:
            raise VqtoolError(f"{name} must be at least 1 (got {value})")
    if cfg.n_embd % cfg.n_head:
        raise VqtoolError(f"n_embd ({cfg.n_embd}) must be a multiple of n_head ({cfg.n_head})")
    if cfg.gelu not in ("exact", "tanh"):
        raise VqtoolError(f"gelu must be exact or tanh (got {cfg.gelu!r})")
    if cfg.pos_emb not in ("2d", "flat"):
        raise VqtoolError(f"pos_emb must be 2d or flat (got {cfg.pos_emb!r})")
    if not 0 <= cfg.dropout < 1:
        raise VqtoolError(f"dropout must lie in [0, 1) (got {cfg.dropout})")
    if not 0 <= cfg.cond_drop < 1:
        raise VqtoolError(f"cond_drop must lie in [0, 1) (got {cfg.cond_drop})")
    if not cfg.lr > 0:
        raise VqtoolError(f"--lr must be positive (got {cfg.lr})")
    if cfg.weight_decay < 0 or cfg.warmup_steps < 0:
        raise VqtoolError("weight_decay and warmup_steps must not be negative")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise VqtoolError(f"betas must be two numbers in [0, 1) (got {cfg.betas})")
    if not 0 <= cfg.ema_decay < 1:
        raise VqtoolError(f"ema_decay must lie in [0, 1) (got {cfg.ema_decay})")
    if cfg.grad_clip is not None and cfg.grad_clip < 0:
        raise VqtoolError(f"grad_clip must be positive or null (got {cfg.grad_clip})")
    cfg.check_loop("train_prior")
    if cfg.cosine_decay and (cfg.decay_steps or cfg.max_steps) is None:
        raise VqtoolError("cosine_decay needs a horizon: set decay_steps or --max-steps")
    if cfg.patience is not None and cfg.patience < 1:
        raise VqtoolError(f"patience must be at least 1 or null (got {cfg.patience})")
    if cfg.threads is not None and cfg.threads < 1:
        raise VqtoolError(f"--threads must be at least 1 (got {cfg.threads})")
    if cfg.precision not in PRECISIONS:
        raise VqtoolError(f"--precision must be one of {', '.join(PRECISIONS)} (got {cfg.precision!r})")


def objective_settings(cfg: TrainPriorConfig) -> dict[str, Any]:
    if cfg.prior == "absorbing":
        return {"T": cfg.timesteps, "mask_schedule": cfg.mask_schedule, "loss": cfg.loss,
                "nll_samples": cfg.nll_samples}
    return {}


def model_config(cfg: TrainPriorConfig, latents: Latents) -> TransformerConfig:
    n_classes = 0
    labels = latents.splits["train"].labels
    if cfg.class_conditional and labels is not None and labels.numel():
        n_classes = max(latents.n_classes, int(labels.max()) + 1)
    return TransformerConfig(
        vocab_size=latents.codebook_size, grid=tuple(latents.latent_shape), n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, causal=cfg.prior == "autoregressive",
        n_classes=n_classes, pos_emb=cfg.pos_emb, gelu=cfg.gelu,
    )


def derived_seed(seed: int, stream: str, rank: int = 0) -> int:
    """Independent seeds for the separate random streams of one run (and of each rank)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def drop_labels(labels: torch.Tensor, p: float, seed: int, part: tuple[int, int]) -> torch.Tensor:
    """`labels` with each one replaced by NO_CLASS with probability `p` (classifier-free guidance's
    condition dropout). `labels` are rows first.. of a global batch of `total` rows (`part`); the draw
    is made for the whole global batch from `seed` alone, so it is the same for every split of the
    batch over processes and micro-batches, and a resumed run draws what the uninterrupted one did."""
    first, total = part
    generator = torch.Generator(device=labels.device).manual_seed(seed)
    drop = torch.rand(total, generator=generator, device=labels.device)[first:first + labels.shape[0]] < p
    return labels.masked_fill(drop, NO_CLASS)


def learning_rate(cfg: TrainPriorConfig, step: int) -> float:
    """Linear warm-up to `lr`, then constant or cosine down to `min_lr_ratio·lr` at the horizon."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if not cfg.cosine_decay:
        return cfg.lr
    horizon = cfg.decay_steps or cfg.max_steps or 1
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


class BatchSampler:
    """Epoch-shuffled batches of dataset indices. Its state (generator, permutation, cursor) is the
    data position, so a resumed run sees the same batches. Every rank draws the same permutation and
    takes its own slice of each global batch.

    With `grad_accum` K an optimisation step takes K consecutive micro-batches of batch_size ×
    world_size rows each; `next()` hands out this rank's rows of the next micro-batch. A new epoch
    starts only between steps, so the position never depends on world_size or K, only on the global
    batch (batch_size × world_size × K) and the number of steps."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1):
        if n < 1:
            raise VqtoolError("the latents' train split is empty")
        self.n = n
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.empty(0, dtype=torch.long)
        self.cursor = 0
        self.epoch = 0
        self.micro = 0  # micro-batches of the current step handed out

    def next(self) -> torch.Tensor:
        start, stop = self.next_range()
        return self.perm[start:stop]

    def next_range(self) -> tuple[int, int]:
        """This rank's rows of the next micro-batch as a range of `perm` (which may be a new epoch's)."""
        micro_rows = self.batch_size * self.world_size
        step_rows = micro_rows * self.grad_accum
        if self.micro == 0 and self.cursor + step_rows > self.perm.numel():
            # A new epoch; a split smaller than one global batch is repeated within it.
            repeats = max(1, math.ceil(step_rows / self.n))
            self.perm = torch.cat([torch.randperm(self.n, generator=self.generator) for _ in range(repeats)])
            self.cursor = 0
            self.epoch += 1
        start = self.cursor + self.micro * micro_rows + self.rank * self.batch_size
        self.micro += 1
        if self.micro == self.grad_accum:
            self.micro = 0
            self.cursor += step_rows
        return start, start + self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self.perm, "cursor": self.cursor,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].long()
        self.cursor = int(state["cursor"])
        self.epoch = int(state["epoch"])


def _adamw(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainPriorConfig, device: torch.device):
    # Every 2-D tensor decays: the matrices, the token, prefix and position tables; biases and norms' gains do
    # not. Keeping the position tables out changed the val bound by 0.001 bits/token against 0.014 between
    # seeds (docs/train-prior.md), so the rule stays as it is and old checkpoints resume unchanged.
    decay = [p for _, p in params if p.dim() >= 2]
    keep = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    try:
        # The fused kernel is several times faster than the per-tensor loop on CPU too.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


@dataclass
class PriorInit:
    """The prior a fine-tuning run starts from, and the settings that fixes.

    On a fresh start they are the init artifact's; on a resume, the checkpoint's, which recorded them.
    """

    sha256: str  # of the init artifact
    path: Path | None  # the init artifact, when named (a resume need not name it)
    weights: str | None  # "ema" or "model": the tensors to start from; None on a resume
    kind: str  # absorbing | autoregressive
    model: TransformerConfig
    objective: dict[str, Any]
    vq: str | None  # sha256 of the VQ whose codes it was trained on, when recorded
    source: str  # what fixed the settings, for messages

    @property
    def fresh(self) -> bool:
        return self.weights is not None


class PriorTrainTask:
    """The `TrainTask` of train-prior (see vqtool.training)."""

    stage = STAGE
    checkpoint_kind = "prior-checkpoint"

    def __init__(self, cfg: TrainPriorConfig, latents: Latents, latents_sha: str, out: Path,
                 device: torch.device, proc: ProcessInfo | None = None, init: PriorInit | None = None,
                 precision: str = "fp32", auto: dict[str, Any] | None = None):
        self.cfg = cfg
        self.auto = auto  # the settings the auto rule chose (vqtool.prior.defaults), kept by every resume
        self.precision = precision  # resolved (vqtool.precision): fp32, bf16 or fp16
        self.init = init
        self.out = out
        self.device = device
        self.proc = proc or process_info()
        self.latents_sha = latents_sha
        self.parents = {"latents": latents_sha}
        vq_sha = latents.artifact.parents.get("vq") if latents.artifact is not None else None
        if vq_sha:
            self.parents["vq"] = vq_sha
        if init is not None:
            self.parents["init"] = init.sha256
        self.classes = list(latents.classes)
        self.image_size = latents.image_size
        self.step = 0
        self.finished = False
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.proc.world_size

        # A fine-tuned transformer is the init prior's, whatever the settings would build (e.g. its GELU).
        self.model_cfg = (dataclasses.replace(init.model, dropout=cfg.dropout) if init is not None
                          else model_config(cfg, latents))
        self.objective = make_objective(cfg.prior, objective_settings(cfg))
        val_settings = dict(self.objective.settings())
        if "nll_samples" in val_settings:
            val_settings["nll_samples"] = cfg.val_nll_samples
        self.val_objective = make_objective(cfg.prior, val_settings)

        train = latents.splits["train"]
        self.use_labels = self.model_cfg.n_classes > 0
        self.train_tokens = train.tokens.to(device)
        self.train_labels = train.labels.to(device) if self.use_labels else None
        self.val_tokens = self.val_labels = None
        val = latents.splits.get("val")
        if val is not None and val.tokens.shape[0] > 0:
            count = min(val.tokens.shape[0], cfg.val_batches * self.global_batch)
            self.val_tokens = val.tokens[:count]
            if self.use_labels:
                if val.labels is None:
                    raise VqtoolError(f"{latents.artifact.path if latents.artifact else 'latents'}: the train "
                                      "split has labels but the val split has none; re-encode the dataset")
                self.val_labels = val.labels[:count]

        seed_global_rng(cfg.seed)  # weight init (and, later, dropout) use the global generator
        self.model = Transformer(self.model_cfg).to(device)
        if init is not None and init.fresh:  # before the EMA and the evaluation copy are taken of the model
            load_prefixed_weights(self.model, load_artifact(init.path, "prior-model"), init.weights)
        if self.proc.rank > 0:
            torch.manual_seed(rank_seed(cfg.seed, "dropout", self.proc.rank))  # other rows, other dropout
        self.eval_model = copy.deepcopy(self.model).eval()
        self.optimizer = _adamw(list(self.model.named_parameters()), cfg, device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.scaler = grad_scaler(precision)
        self.sampler = BatchSampler(train.tokens.shape[0], cfg.batch_size, derived_seed(cfg.seed, "data"),
                                    self.proc.rank, self.proc.world_size, cfg.grad_accum)
        # The masks of a whole step are drawn on every rank alike (rank 0's stream of a single process),
        # each rank keeping its rows: the split across processes does not change them.
        self.noise = torch.Generator(device=device).manual_seed(derived_seed(cfg.seed, "noise"))
        self.best_bpt: float | None = None
        self.best_step: int | None = None
        self.evals_since_best = 0
        # This session's training throughput (not part of the state: a resumed run counts afresh).
        self.session_tokens = 0
        self.session_seconds = 0.0
        if cfg.compile:
            for block in self.model.blocks:
                block.compile()
        # The forward/backward model: DDP averages gradients over the ranks (itself in one process).
        self.train_model = wrap_ddp(self.model, device)
        self._perm: tuple[torch.Tensor, torch.Tensor] | None = None  # the sampler's permutation, on the device

    def _next_indices(self) -> torch.Tensor:
        """This rank's rows of the next micro-batch, on the device: the epoch's permutation is copied there
        once, so a micro-batch costs no host-to-device copy (which would wait for the GPU)."""
        start, stop = self.sampler.next_range()
        if self._perm is None or self._perm[0] is not self.sampler.perm:
            self._perm = (self.sampler.perm, self.sampler.perm.to(self.device))
        return self._perm[1][start:stop]

    # -- the TrainTask protocol ---------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        started = time.perf_counter()
        self.model.train()
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        accum, world, rank = cfg.grad_accum, self.proc.world_size, self.proc.rank
        step_rows = cfg.batch_size * world * accum
        split_noise = self.objective.kind == "absorbing" and step_rows > cfg.batch_size
        noise_start = self.noise.get_state() if split_noise else None
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, bpt summed over micro-batches
        for k in range(accum):
            idx = self._next_indices()
            tokens = self.train_tokens[idx].long().reshape(idx.shape[0], -1)
            labels = self.train_labels[idx] if self.use_labels else None
            if labels is not None and cfg.cond_drop > 0:
                # Seeded by the step: no state to save, and every rank draws the step's whole mask alike.
                labels = drop_labels(labels, cfg.cond_drop, derived_seed(cfg.seed, "cond_drop", self.step),
                                     ((k * world + rank) * cfg.batch_size, step_rows))
            kwargs = {}
            if split_noise:
                # Every micro-batch draws the step's masks afresh and keeps its own rows (see the module doc).
                self.noise.set_state(noise_start)
                kwargs["part"] = ((k * world + rank) * cfg.batch_size, step_rows)
            with no_sync(self.train_model, skip=k < accum - 1):
                # Forward and loss under autocast, the backward outside it (vqtool.precision).
                with autocast(self.device, self.precision):
                    loss, metrics = self.objective.loss(self.train_model, tokens, labels, self.noise, **kwargs)
                self.scaler.scale(loss / accum).backward()
            sums += torch.stack([loss.detach().double(), metrics["bpt"].double()])
            self.session_tokens += tokens.numel()
        # One collective and one read-back per step, not per micro-batch. The mean over the ranks is NaN on
        # every rank when it is on one, so all of them stop here before the optimizer step (each ran all its
        # backward passes: none is left waiting in DDP's gradient all-reduce).
        loss_value, bpt_value = (all_reduce_mean(sums) / accum).tolist()
        if not math.isfinite(loss_value):
            self.step += 1  # the step that failed, as the loop's message names it; nothing is saved after it
            return {"loss": loss_value, "bpt": bpt_value}
        out: dict[str, torch.Tensor | float] = {"loss": loss_value, "bpt": bpt_value, "lr": lr}
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            out["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        # EMA warm-up: early on the average would be mostly the random initialisation.
        self.ema.decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        self.ema.update(self.model)
        out = read_scalars(out)
        self.session_seconds += time.perf_counter() - started
        return out

    @torch.no_grad()
    def validation_bpt(self, model: torch.nn.Module) -> float:
        """Mean bound (bits/token) over the validation images, with the same masks at every call.

        The images go in chunks of one global batch; a chunk's masks come from its own seeded generator,
        drawn for all its rows, and each rank scores its rows of every chunk (in micro-batches, like
        training) before the sums are added up over the ranks. So the number does not depend on how
        many processes share the work.
        """
        B, world, rank = self.cfg.batch_size, self.proc.world_size, self.proc.rank
        sums = torch.zeros(2, dtype=torch.float64)  # bound summed over images, images
        for chunk, start in enumerate(range(0, self.val_tokens.shape[0], self.global_batch)):
            rows = min(self.global_batch, self.val_tokens.shape[0] - start)
            for k in range(self.cfg.grad_accum):
                first = (k * world + rank) * B
                if first >= rows:
                    continue
                part = slice(start + first, start + min(first + B, rows))
                tokens = self.val_tokens[part].to(self.device).long()
                tokens = tokens.reshape(tokens.shape[0], -1)
                labels = self.val_labels[part].to(self.device) if self.use_labels else None
                generator = torch.Generator(device=self.device).manual_seed(derived_seed(self.cfg.seed, "val", chunk))
                kwargs = {"part": (first, rows)} if self.val_objective.kind == "absorbing" else {}
                with autocast(self.device, self.precision):
                    bpt = self.val_objective.nll(model, tokens, labels, generator, **kwargs)
                sums += torch.tensor([float(bpt.double().sum()), tokens.shape[0]], dtype=torch.float64)
        sums = all_reduce_sum(sums)
        return float(sums[0] / sums[1])

    def evaluate(self) -> dict[str, float]:
        if self.val_tokens is None:
            return {}
        self.ema.copy_to(self.eval_model)
        self.eval_model.eval()
        bpt = self.validation_bpt(self.eval_model)  # the same number on every rank
        if self.best_bpt is None or bpt < self.best_bpt:
            self.best_bpt, self.best_step, self.evals_since_best = bpt, self.step, 0
            if self.proc.is_main:
                self._save_prior(selected="best-val")
        else:
            self.evals_since_best += 1
            if self.cfg.patience is not None and self.evals_since_best >= self.cfg.patience:
                self.finished = True
        out = {"bpt": bpt, "best_bpt": self.best_bpt}
        if self.image_size:
            out["bpd"] = bpt * self.model_cfg.n_tokens / (3 * self.image_size**2)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "noise": self.noise.get_state(),
            "best": {"bpt": self.best_bpt, "step": self.best_step, "since": self.evals_since_best},
            "finished": self.finished,
            "layout": {"world_size": self.proc.world_size, "grad_accum": self.cfg.grad_accum},
            "precision": self.precision,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        switch = switch_note(state.get("precision"), self.precision)
        if switch and self.proc.is_main:
            console.print(f"[yellow]note:[/yellow] {switch}")
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.noise.set_state(state["noise"])
        best = state["best"]
        self.best_bpt, self.best_step, self.evals_since_best = best["bpt"], best["step"], int(best["since"])
        self.finished = bool(state["finished"])
        note = layout_change_note(self.cfg.batch_size, state.get("layout", {"world_size": 1, "grad_accum": 1}),
                                  self.proc.world_size, self.cfg.grad_accum)
        if note and self.proc.is_main:
            console.print(f"[yellow]note:[/yellow] {note}")

    def resume_key(self) -> dict[str, Any]:
        key = {"prior": self.cfg.prior, "model": dataclasses.asdict(self.model_cfg),
               "objective": self.objective.settings(), "latents": self.latents_sha,
               "batch_size": self.cfg.batch_size, "seed": self.cfg.seed}
        if self.init is not None:  # only then: checkpoints of other runs keep the key they always had
            key["init"] = self.init.sha256
        if self.use_labels and self.cfg.cond_drop > 0:  # likewise: a checkpoint made before cond_drop existed
            key["cond_drop"] = self.cfg.cond_drop
        if self.auto is not None:  # likewise
            key["auto"] = self.auto
        return key

    def recorded_key(self, key: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's resume key in today's terms (its model record: store.with_legacy_settings)."""
        model = key.get("model")
        return {**key, "model": with_legacy_settings(model)} if isinstance(model, dict) else key

    def output_paths(self) -> list[Path]:
        return [self.out]

    def export(self) -> list[Path]:
        if self.best_step is not None and self.best_step == self.step and not self.out.exists():
            # The latest weights are the best ones: the very file the evaluation wrote (deleted since).
            self._save_prior(selected="best-val")
        elif self.best_step is None or not self.out.exists():
            # No validation split (or no evaluation yet): the latest weights are the prior.
            if self.best_step is not None:
                console.print(f"[yellow]note:[/yellow] {self.out} was missing: it now holds the latest weights (step "
                              f"{self.step}); those of the best validation bound (step {self.best_step}) were in the "
                              "missing file only", soft_wrap=True, highlight=False)
            self._save_prior(selected="last")
        return [self.out]

    # -----------------------------------------------------------------------------------------------

    def _save_prior(self, selected: str) -> None:
        best = selected == "best-val"
        extra = {
            "step": self.step,
            "selected": selected,
            "val_bpt": self.best_bpt if best else None,
            "val_bpd": (self.best_bpt * self.model_cfg.n_tokens / (3 * self.image_size**2)
                        if best and self.image_size else None),
            "classes": self.classes,
            "image_size": self.image_size,
            "train": to_dict(self.cfg),
            "precision": self.precision,  # what the last session trained in; the weights are fp32
        }
        save_prior(self.out, self.cfg.prior, self.model_cfg, self.objective.settings(), self.ema.shadow,
                   self.model.state_dict(), self.parents, extra)


# --------------------------------------------------------------------------------------------------
# The stage


@dataclass
class TrainPriorResult:
    steps: int
    reason: str  # max-steps | max-minutes | interrupted | early-stop | already-done (see vqtool.training.LoopResult)
    best_val_bpt: float | None
    best_val_bpd: float | None
    best_step: int | None
    last_train: dict[str, float]
    seconds: float
    tokens_per_second: float
    params: int
    prior: Path
    checkpoint: Path
    log: Path
    kind: str  # absorbing | autoregressive (an init prior's kind, when fine-tuning)
    precision: str = "fp32"  # fp32 | bf16 | fp16: what this session trained in
    init: Path | None = None  # the init artifact, when it was named
    init_sha256: str | None = None  # set for every run started from an init artifact
    stopped_by: signal.Signals | None = None  # SIGINT or SIGTERM, for an interrupted run
    # The auto settings this session used ({"values", "reasons", "resumed"}; vqtool.prior.defaults), if any.
    auto: dict[str, Any] | None = None


def stage_names(run_prior: Path, out: Path) -> str:
    """Checkpoint and log stem for a prior written to `out`: `train-prior` for the run's default
    prior.safetensors, `train-prior-<name>` otherwise, so two priors can share one run folder."""
    if Path(out).resolve() == Path(run_prior).resolve():
        return STAGE
    suffix = Path(out).stem.removeprefix("prior").lstrip("-_") or Path(out).stem
    return f"{STAGE}-{suffix}"


def _recorded_init(meta, sha: str, init: Path | None) -> PriorInit:
    return PriorInit(sha256=sha, path=init, weights=None, kind=meta.config["prior"],
                     model=model_config_from_record(meta.config.get("model"), f"{meta.path} model config"),
                     objective=dict(meta.config.get("objective") or {}), vq=None,
                     source=f"the checkpoint {meta.path} of a fine-tuning run")


def _read_init(path: Path) -> PriorInit:
    meta = read_metadata(path, "prior-model")
    kind = meta.config.get("prior")
    if kind not in PRIOR_KINDS:
        raise VqtoolError(f"{path}: unknown prior kind {kind!r}")
    return PriorInit(sha256=file_sha256(path), path=path, weights=start_weights(path, meta.extra["_tensors"]),
                     kind=kind, model=model_config_from_record(meta.config.get("model"), f"{path} model config"),
                     objective=dict(meta.config.get("objective") or {}), vq=meta.parents.get("vq"),
                     source=f"--init {path}")


def fine_tune_settings(start: PriorInit, cfg: TrainPriorConfig, given: Mapping[str, Any]) -> TrainPriorConfig:
    """The settings of a run that starts from `start`: its kind, model and objective, with the caller's
    TUNABLE choices on a fresh start; one-line errors for chosen settings that contradict it."""
    if "prior" in given and given["prior"] != start.kind:
        raise VqtoolError(f"--prior {given['prior']} conflicts with {start.source}, an {start.kind} prior; drop "
                          "--prior (the kind comes from there)")
    model = start.model
    fixed: dict[str, Any] = {"n_layer": model.n_layer, "n_head": model.n_head, "n_embd": model.n_embd,
                             "dropout": model.dropout, "pos_emb": model.pos_emb, "gelu": model.gelu,
                             "class_conditional": model.n_classes > 0}
    if start.kind == "absorbing":
        objective = start.objective
        fixed.update(timesteps=objective.get("T"), mask_schedule=objective.get("mask_schedule"),
                     loss=objective.get("loss"), nll_samples=objective.get("nll_samples"))
    else:
        absorbing = [k for k in ABSORBING_ONLY if k in given]
        if absorbing:
            raise VqtoolError(f"{', '.join(absorbing)}: absorbing-prior settings, but {start.source} is an "
                              "autoregressive prior; drop them")
    tunable = TUNABLE if start.fresh else ()  # a resume keeps every setting of the checkpoint
    for key, value in given.items():
        if key in fixed and key not in tunable and value != fixed[key]:
            raise VqtoolError(f"{key} = {value!r} conflicts with {start.source} ({key} = {fixed[key]!r}); the "
                              "model and objective come from there: drop the setting")
    fixed.update({k: given[k] for k in tunable if k in given})
    return dataclasses.replace(cfg, prior=start.kind, **fixed)


def recorded_gelu(*artifacts: tuple[Path, str]) -> str | None:
    """The GELU of the first of these (path, kind) artifacts that exists: a prior or a checkpoint."""
    for path, kind in artifacts:
        if Path(path).exists():
            meta = read_metadata(path, kind)
            return model_config_from_record(meta.config.get("model"), f"{path} model config").gelu
    return None


def _recorded_auto(checkpoint: Path) -> dict[str, Any] | None:
    """The auto settings a run's checkpoint recorded (None when it was started without them, or is missing)."""
    return read_metadata(checkpoint, "prior-checkpoint").config.get("auto") if checkpoint.exists() else None


def check_latents_fit(start: PriorInit, latents: Latents, where: Path) -> None:
    """The latents must be what the init prior models: the same codebook, grid and classes (and VQ)."""
    model = start.model
    if latents.codebook_size != model.vocab_size:
        raise VqtoolError(f"{where}: codes of a {latents.codebook_size}-code codebook, but {start.source} models "
                          f"{model.vocab_size} codes; encode the data with the VQ the prior was trained on")
    if tuple(latents.latent_shape) != tuple(model.grid):
        grid, theirs = "×".join(map(str, model.grid)), "×".join(map(str, latents.latent_shape))
        raise VqtoolError(f"{where}: {theirs} token grids, but {start.source} models {grid} grids; encode the "
                          "data with the VQ the prior was trained on")
    vq = latents.artifact.parents.get("vq") if latents.artifact is not None else None
    if start.vq and vq and start.vq != vq:
        raise VqtoolError(f"{where}: codes of another VQ (sha256 {vq[:12]}…) than the one {start.source} was "
                          f"trained on ({start.vq[:12]}…); encode the data with that VQ")
    if model.n_classes > 0:
        labels = latents.splits["train"].labels
        if labels is None or not labels.numel():
            raise VqtoolError(f"{where}: no labels, but {start.source} is conditioned on {model.n_classes} "
                              "classes; encode a labelled dataset")
        classes = max(latents.n_classes, int(labels.max()) + 1)
        if classes != model.n_classes:
            raise VqtoolError(f"{where}: {classes} classes, but {start.source} is conditioned on "
                              f"{model.n_classes}; fine-tune on latents of the same classes")


def train_prior(
    latents_path: Path,
    cfg: TrainPriorConfig | Mapping[str, Any],
    out: Path,
    checkpoint: Path,
    log: Path,
    resume: bool = False,
    overwrite: bool = False,
    init: str | Path | None = None,
    auto_defaults: bool = False,
) -> TrainPriorResult:
    """Train a prior on `latents_path`; write the best-validation prior to `out`, the latest resumable
    state to `checkpoint` and the JSONL log to `log`.

    `cfg` is a TrainPriorConfig or a mapping of the settings chosen (the rest default). `init` fine-tunes
    a prior-model artifact (see the module docstring): the settings chosen must agree with it, except
    TUNABLE ones; a TrainPriorConfig counts as choosing the fields that differ from the defaults.

    `auto_defaults` (the train-prior command's choice) fills the size and optimisation settings not chosen
    from the latents and the device (vqtool.prior.defaults) on a fresh start without `init`. A resume takes
    them from the checkpoint's record instead, whoever calls and on whatever machine. So does a resume
    with `gelu` unchosen (a TrainPriorConfig with the default "exact" counts as unchosen): the run goes
    on with the activation it was trained with.
    """
    cfg, given = chosen_settings(TrainPriorConfig, cfg, "train_prior")
    latents_path, out, checkpoint = Path(latents_path), Path(out), Path(checkpoint)
    start_from = find_init(init, checkpoint, "prior-checkpoint", resume, _recorded_init, _read_init)
    if start_from is not None:
        if start_from.fresh and out.resolve() == start_from.path.resolve():
            raise VqtoolError(f"--init {start_from.path} is also the output; write the fine-tuned prior elsewhere "
                              "(--out) so the init artifact stays")
        cfg = fine_tune_settings(start_from, cfg, given)
    if resume and start_from is None and "gelu" not in given and checkpoint.exists():
        # The default changed (exact since 2026-12): a run resumes with the activation it was trained with.
        cfg = dataclasses.replace(cfg, gelu=recorded_gelu((checkpoint, "prior-checkpoint")))
    auto = _recorded_auto(checkpoint) if resume else None
    if auto is not None:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in auto["values"].items() if k not in given})
    fresh_auto = auto_defaults and start_from is None and not resume
    if not fresh_auto:  # else once the auto settings are in: a chosen --heads 6 must fit the auto width, not 256
        check_config(cfg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if not latents_path.exists():
        raise VqtoolError(f"{latents_path}: no latents here; run `vqtool encode` first (or pass --latents)")
    if out.exists() and not resume and not overwrite:
        raise VqtoolError(f"{out} exists; pass --resume to continue its run or --overwrite to start again")
    latents = load_latents(latents_path)
    if start_from is not None:
        check_latents_fit(start_from, latents, latents_path)
    if fresh_auto:
        from vqtool.launch import usable_cpus

        auto = auto_record(tuple(latents.latent_shape), latents.splits["train"].tokens.shape[0],
                           latents.codebook_size, device.type, usable_cpus(), cfg.prior, given)
        cfg = dataclasses.replace(cfg, **(auto or {}).get("values", {}))
        check_config(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    with distributed_session(device) as proc:
        task = PriorTrainTask(cfg, latents, file_sha256(latents_path), out, device, proc, init=start_from,
                              precision=precision, auto=auto)
        if task.val_tokens is None and proc.is_main:
            console.print(f"[yellow]warning:[/yellow] {latents_path} has no val split: no validation bound, "
                          "the prior will be the last weights")
        start = time.monotonic()
        result = run_loop(task, cfg, checkpoint, Path(log), resume=resume, overwrite=overwrite, proc=proc)
        seconds = time.monotonic() - start
    bpd = None
    if task.best_bpt is not None and task.image_size:
        bpd = task.best_bpt * task.model_cfg.n_tokens / (3 * task.image_size**2)
    return TrainPriorResult(
        steps=result.step, reason=result.reason, best_val_bpt=task.best_bpt, best_val_bpd=bpd,
        best_step=task.best_step, last_train=result.last_train, seconds=seconds,
        # Every rank trains on as many tokens in the same time: the job's rate is world_size times one rank's.
        tokens_per_second=(task.session_tokens * task.proc.world_size / task.session_seconds
                           if task.session_seconds > 0 else 0.0),
        params=sum(p.numel() for p in task.model.parameters()), prior=out, checkpoint=checkpoint,
        log=Path(log), kind=cfg.prior, precision=precision, init=start_from.path if start_from else None,
        init_sha256=start_from.sha256 if start_from else None, stopped_by=result.stopped_by,
        auto=auto and {"values": {k: v for k, v in auto["values"].items() if k not in given},
                       "reasons": auto["reasons"], "resumed": resume},
    )
