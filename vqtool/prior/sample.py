"""Drawing token grids from a prior, and the `sample` stage that decodes them into PNGs.

`make_sampler` checks SampleSettings against a prior once and builds what sampling needs from them (a
`Sampler`: the token grid, the `Draw`, the schedule). `sample_tokens` is the algorithm: the absorbing
prior runs the unmasking schedule (vqtool.prior.schedules) over a predictor, the autoregressive prior
hands each batch to vqtool.prior.autoregressive.sample_autoregressive. `sample_images` is the stage:
load the prior and the VQ, check they belong together, sample, decode, write PNGs and
samples.safetensors. With `guidance` > 0 the predictor (or the autoregressive sampler) runs a doubled
batch, the labels and NO_CLASS, and mixes the two predictions (vqtool.prior.guidance).

Speed. A sampling step of the absorbing prior needs logits only at the positions it reveals, so the
predictor runs the transformer's trunk and applies the output head at those positions only. It also
runs the last block only where it matters: the last layer's attention needs keys and values of every
position but queries, projection, MLP and final norm only at the asked positions
(`Transformer.hidden_at`). The predictor keeps the first block's projections from step to step
(`FirstProjections`), runs alike rows once and, on one CPU thread, a few images per pass. All give the
same numbers as a full forward pass within float rounding (tested). `CompiledBody` (`--compile`) runs
the transformer up to its last block through torch.compile. `quantize_int8` offers int8 dynamic
quantization of the Linear layers for CPU inference.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vqtool.console import console
from vqtool.errors import VqtoolError
from vqtool.outputs import check_writable, matcher, naming, refuse_enclosing, removed_on_failure, staged_folder
from vqtool.prior.guidance import Guidance, GuidedPredictor, both_branches, check_guided_labels
from vqtool.prior.logits import Draw
from vqtool.prior.onednn import onednn_linears
from vqtool.prior.schedules import Predict, Schedule, make_schedule, n_steps, reveal
from vqtool.prior.store import LoadedPrior
from vqtool.prior.transformer import NO_CLASS, Transformer
from vqtool.prior.windows import WindowPredictor

Progress = Callable[[int, int], None]
"""progress(completed, total) in units of predictor calls (absorbing) or grid positions (autoregressive)."""

QUANTIZE = ("none", "int8")

# Token rows per transformer pass when sampling on one CPU thread: few enough that a pass's activations stay
# in the cache (see TransformerPredictor, pass_size).
CPU_ROWS_PER_PASS = 512

# The files `sample` writes into its folder; anything else found there is kept when it is replaced.
SAMPLE_OUTPUTS = matcher("sample-*.png", "grid.png", "samples.safetensors", ".*.tmp")


@dataclass
class SampleSettings:
    steps: int = 50
    temperature: float = 1.0
    schedule: str = "random"  # random | confidence
    top_k: int | None = None
    top_p: float | None = None
    shape: tuple[int, int] | None = None  # tokens (H, W); None = the training grid
    stride: int = 1  # window aggregation on larger grids: window spacing in tokens
    order: str = "random"  # random | raster | halton: which masked tokens come first (raster: random schedule)
    batch_size: int = 16
    seed: int = 0
    use_cache: bool = True  # autoregressive prior: KV cache
    curve: str = "cosine"  # confidence schedule: cosine | arccos
    guidance: float = 0.0  # classifier-free guidance scale S (vqtool.prior.guidance); 0 = plain conditional
    guidance_schedule: str = "constant"  # constant | linear (0 at the first step up to S at the last)


# --------------------------------------------------------------------------------------------------
# Predicting at a few positions


class TransformerPredictor:
    """`predict(tokens, positions)` of an absorbing prior on its training grid, head only where asked.

    It runs in the caller's precision, as the autoregressive sampler does (the stage's autocast region,
    vqtool.precision), and hands fp32 logits to the sampler.

    Three ways to do the same work faster, each within float rounding of one pass over the whole batch:
    the first block's projections are kept from call to call (FirstProjections); `chunk` images go
    through the transformer at a time (None: all at once), so that on a CPU a pass's activations stay in
    the cache and the memory-bound LayerNorms, GELUs and bias adds run from it (pass_size); and a batch
    whose rows are all the same (an unconditional prior's all-MASK grid at the first step) runs as one
    row, the positions of every row asked of it. `body` (CompiledBody) replaces the eager body.
    """

    def __init__(self, model: Transformer, labels: torch.Tensor | None = None, chunk: int | None = None,
                 body: CompiledBody | None = None):
        self.model = model
        self.labels = labels
        self.chunk = body.batch if body is not None else chunk
        self.body = body
        self.first = FirstProjections(model, labels) if model.cfg.n_layer >= 2 else None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, k = positions.shape
        first = self.first(tokens) if self.first is not None else None
        if B > 1 and self._rows_alike(tokens):
            return self._logits(slice(0, 1), tokens, first, positions.reshape(1, B * k)).reshape(B, k, -1)
        step = self.chunk or B
        if step >= B:
            return self._logits(slice(None), tokens, first, positions)
        return torch.cat([self._logits(slice(i, i + step), tokens, first, positions[i:i + step])
                          for i in range(0, B, step)])

    def _logits(self, rows: slice, tokens: torch.Tensor, first: torch.Tensor | None,
                positions: torch.Tensor) -> torch.Tensor:
        labels = self.labels[rows] if self.labels is not None else None
        first = first[rows] if first is not None else None
        return self.model.head(self.model.hidden_at(tokens[rows], labels, positions, self.body, first)).float()

    def _rows_alike(self, tokens: torch.Tensor) -> bool:
        if self.labels is not None and bool((self.labels != self.labels[0]).any()):
            return False
        return bool((tokens == tokens[:1]).all())


class FirstProjections:
    """The first block's `projections` of a batch's token embeddings, kept from call to call: a row
    depends only on its token and position (the prefix row on the label), and a sampling step changes
    a few tokens, so only those rows are projected again."""

    def __init__(self, model: Transformer, labels: torch.Tensor | None):
        self.model = model
        self.labels = labels
        self.tokens: torch.Tensor | None = None
        self.qkv = torch.empty(0)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L', 3C) for `tokens` (B, N)."""
        m, first = self.model, self.model.blocks[0]
        if self.tokens is None or self.tokens.shape != tokens.shape:
            self.qkv = first.projections(m.embed(tokens, self.labels))
        else:
            row, col = (tokens != self.tokens).nonzero(as_tuple=True)
            if len(row):
                self.qkv[row, m.row_of(col)] = first.projections(m.embed_at(tokens[row, col], col))
        self.tokens = tokens.clone()
        return self.qkv


class CompiledBody:
    """`model.body` (the transformer up to its last block) through torch.compile with the weights frozen
    into the graph, built for one batch shape on its first call: a smaller batch is padded to it with
    copies of its last row (each row is computed on its own, so the padding changes nothing) and cut
    off after. The body is the same shape at every step, so it compiles once per sampling run."""

    def __init__(self, model: Transformer, batch: int, compiled: Callable[..., torch.Tensor] | None = None):
        self.batch = batch
        self.compiled = compiled or torch.compile(model.body, dynamic=False, options={"freezing": True})

    def __call__(self, idx: torch.Tensor, labels: torch.Tensor | None,
                 first: torch.Tensor | None = None) -> torch.Tensor:
        n = idx.shape[0]
        pad = self.batch - n
        if pad > 0:
            idx, labels, first = (torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) if t is not None else None
                                  for t in (idx, labels, first))
        return self.compiled(idx, labels, first)[:n]


def pass_size(model: Transformer) -> int | None:
    """Images per transformer pass of a sampling step: on a CPU running torch on one thread as many as
    keep about `CPU_ROWS_PER_PASS` token rows in flight (at least one), else the whole batch (None).

    Measured on the `bench` config, 16 images: one thread, 2 images a pass 6–10 % faster than 16; two
    threads on cores busy with other jobs, 3.6× slower (every op's thread hand-off waits for a core,
    and smaller passes make 8× as many ops)."""
    if next(model.parameters()).device.type != "cpu" or torch.get_num_threads() > 1:
        return None
    return max(1, CPU_ROWS_PER_PASS // model.cfg.n_tokens)


def make_predictor(model: Transformer, labels: torch.Tensor | None, shape: tuple[int, int],
                   stride: int = 1, guidance: Guidance | None = None, body: CompiledBody | None = None) -> Predict:
    """The plain predictor on the training grid, a window mixture on a larger `shape`; with `guidance`,
    either one over the doubled batch (labels, then NO_CLASS) inside the guided predictor, so every
    window pass serves both branches and the mixtures are guided. `body`: the compiled transformer body."""
    if guidance is not None:
        check_guided_labels(labels)
        labels = both_branches(labels)
    base: Predict = TransformerPredictor(model, labels, pass_size(model), body)
    if tuple(shape) != tuple(model.cfg.grid):
        base = WindowPredictor(base, shape, model.cfg.grid, stride)
    return GuidedPredictor(base, guidance) if guidance is not None else base


# --------------------------------------------------------------------------------------------------
# The sampler: settings checked once, and what is built from them


@dataclass(frozen=True)
class Sampler:
    """SampleSettings checked against one prior, with the pieces built from them, once per call.

    `schedule` is for the absorbing prior (the autoregressive one draws in raster order); `draw` and
    `guidance` (None: unguided) serve both; `shape` is the token grid (H, W) to fill.
    """

    settings: SampleSettings
    kind: str
    shape: tuple[int, int]
    draw: Draw
    schedule: Schedule
    guidance: Guidance | None = None

    def predictor(self, model: Transformer, labels: torch.Tensor | None, body: CompiledBody | None = None) -> Predict:
        return make_predictor(model, labels, self.shape, self.settings.stride, self.guidance, body)

    def calls(self, n_masked: int | None = None) -> int:
        """Progress units of one batch: predictor calls (absorbing; fewer when only `n_masked` of the
        grid are masked) or grid positions (autoregressive)."""
        H, W = self.shape
        if self.kind == "autoregressive":
            return H * W
        return n_steps(self.schedule, H * W, self.settings.steps, n_masked)

    def work(self, n: int, n_masked: int | None = None) -> int:
        """Progress units of `n` grids, `settings.batch_size` at a time."""
        return math.ceil(n / self.settings.batch_size) * self.calls(n_masked)


def make_sampler(settings: SampleSettings, prior: LoadedPrior, shape: tuple[int, int] | None = None) -> Sampler:
    """Refuse impossible settings with one line naming the option; build the sampler.

    `shape` overrides `settings.shape` (inpainting fills the grid of its image).
    """
    s = settings
    if s.steps < 1:
        raise VqtoolError(f"--steps must be at least 1 (got {s.steps})")
    draw = Draw(s.temperature, s.top_k, s.top_p)
    if s.stride < 1:
        raise VqtoolError(f"--stride must be at least 1 (got {s.stride})")
    if s.batch_size < 1:
        raise VqtoolError(f"--batch-size must be at least 1 (got {s.batch_size})")
    grid = tuple(prior.cfg.grid)
    asked = shape if shape is not None else s.shape
    shape = tuple(int(v) for v in asked) if asked is not None else grid
    if len(shape) != 2:
        raise VqtoolError(f"--shape takes two numbers H W (got {asked})")
    if prior.kind == "absorbing" and (shape[0] < grid[0] or shape[1] < grid[1]):
        raise VqtoolError(f"--shape {shape[0]} {shape[1]}: must be at least the training grid "
                          f"{grid[0]} {grid[1]} in both directions")
    schedule = make_schedule(s.schedule, s.order, s.curve, grid=shape)
    return Sampler(settings=s, kind=prior.kind, shape=shape, draw=draw, schedule=schedule,  # type: ignore[arg-type]
                   guidance=make_guidance(s, prior))


def make_guidance(settings: SampleSettings, prior: LoadedPrior) -> Guidance | None:
    """The checked guidance of `settings`, None when the scale is 0 (the plain, unguided path)."""
    guidance = Guidance(settings.guidance, settings.guidance_schedule)
    if guidance.scale == 0:
        return None
    if prior.cfg.n_classes == 0:
        raise VqtoolError(f"--guidance {settings.guidance}: this prior is unconditional (trained without labels); "
                          "guidance needs a class-conditional prior")
    return guidance


def check_guidance(sampler: Sampler, prior: LoadedPrior, labels: torch.Tensor | None) -> None:
    """Before guided sampling: refuse rows without a class; warn when the unconditional branch is untrained."""
    if sampler.guidance is None:
        return
    check_guided_labels(labels)
    train = (prior.artifact.extra.get("train") if prior.artifact is not None else None) or {}
    if not train.get("cond_drop"):
        console.print("[yellow]warning:[/yellow] this prior was trained without cond_drop: its unconditional "
                      "branch is untrained, so --guidance may not help", soft_wrap=True, highlight=False)


def as_sampler(settings: SampleSettings | Sampler, prior: LoadedPrior) -> Sampler:
    """A Sampler made already passes through; settings are checked and built into one."""
    return settings if isinstance(settings, Sampler) else make_sampler(settings, prior)


def resolve_class(prior: LoadedPrior, value: int | str | None) -> int | None:
    """`--class` as an index, as one of the class names the prior's artifact records, or `none`
    (NO_CLASS: the unconditional branch of a class-conditional prior)."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip()
    if text == "none":
        return NO_CLASS
    if text.lstrip("-").isdigit():
        return int(text)
    names = [str(c) for c in prior.artifact.extra.get("classes", [])]
    if text not in names:
        known = ", ".join(names[:20]) if names else "none recorded; pass the class index"
        raise VqtoolError(f"--class {text!r}: not a class of this prior (known: {known})")
    return names.index(text)


def class_request(class_id: int | None) -> int | str | None:
    """What the samples artifact records of `--class`: the index, `none`, or None (classes cycled)."""
    return "none" if class_id == NO_CLASS else class_id


def default_labels(prior: LoadedPrior, n: int, class_id: int | None = None) -> torch.Tensor | None:
    """Labels for n samples: None for an unconditional prior, else `class_id` for all or classes cycled.

    NO_CLASS asks a class-conditional prior for unconditional samples (an unconditional prior is one)."""
    n_classes = prior.cfg.n_classes
    if n_classes == 0:
        if class_id is not None and class_id != NO_CLASS:
            raise VqtoolError("--class: this prior is unconditional (trained without labels)")
        return None
    if class_id is None:
        return torch.arange(n) % n_classes
    if not NO_CLASS <= class_id < n_classes:
        raise VqtoolError(f"--class {class_id}: this prior knows classes 0..{n_classes - 1} (or none)")
    return torch.full((n,), class_id, dtype=torch.long)


def _check_labels(prior: LoadedPrior, n: int, labels: torch.Tensor | None) -> torch.Tensor | None:
    if labels is None:
        return None
    if prior.cfg.n_classes == 0:
        raise VqtoolError("--class: this prior is unconditional (trained without labels)")
    labels = labels.long().reshape(-1)
    if labels.numel() != n:
        raise VqtoolError(f"expected {n} class labels, got {labels.numel()}")
    if int(labels.min()) < NO_CLASS or int(labels.max()) >= prior.cfg.n_classes:
        raise VqtoolError(f"class labels must lie in 0..{prior.cfg.n_classes - 1} (or {NO_CLASS}: no class)")
    return labels


def total_work(prior: LoadedPrior, n: int, settings: SampleSettings | Sampler) -> int:
    """Units `sample_tokens` reports to its progress callback in all."""
    return as_sampler(settings, prior).work(n)


# --------------------------------------------------------------------------------------------------
# Sampling


def sample_tokens(prior: LoadedPrior, n: int, settings: SampleSettings | Sampler, labels: torch.Tensor | None = None,
                  progress: Progress | None = None, compile: bool = False) -> torch.Tensor:
    """Draw `n` token grids (n, H, W) int64 (on CPU) from the prior, `settings.batch_size` at a time.

    `settings` may be a Sampler made from them for this prior (it is not checked again). `labels` (n,)
    are class ids for a class-conditional prior (None: unconditional, or the prior's prefix start
    token). Randomness comes only from a generator seeded with `settings.seed`, so the same settings
    (batch size included) give the same tokens. Both priors run in the caller's precision: fp32, or
    the autocast region a stage opens (vqtool.precision); logits are sampled in fp32. With guidance
    (`settings.guidance` > 0) every label must be a class, not NO_CLASS. `compile` (absorbing prior)
    runs the transformer's body through torch.compile (CompiledBody), compiled on the first step.
    """
    if n < 1:
        raise VqtoolError(f"--n must be at least 1 (got {n})")
    sampler = as_sampler(settings, prior)
    settings = sampler.settings
    labels = _check_labels(prior, n, labels)
    check_guidance(sampler, prior, labels)
    model = prior.model
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    body = None
    if compile:
        if prior.kind != "absorbing":
            raise VqtoolError("--compile applies to the absorbing prior (this one is autoregressive)")
        rows = settings.batch_size * (2 if sampler.guidance is not None else 1)
        body = CompiledBody(model, pass_size(model) or rows)

    def draw_batch(b: int, batch_labels: torch.Tensor | None, tick: Callable[[], None]) -> torch.Tensor:
        if prior.kind == "autoregressive":
            from vqtool.prior.autoregressive import sample_autoregressive

            return sample_autoregressive(model, b, sampler.shape, sampler.draw, batch_labels, generator,
                                         use_cache=settings.use_cache, on_token=tick, guidance=sampler.guidance)
        mask_id = model.cfg.mask_id
        tokens = torch.full((b, sampler.shape[0] * sampler.shape[1]), mask_id, dtype=torch.long, device=device)
        return reveal(sampler.predictor(model, batch_labels, body), tokens, mask_id, sampler.schedule, settings.steps,
                      sampler.draw, generator, tick)

    # A compiled body gets oneDNN's linears from inductor; traced under the mode, it would not compile.
    grids = in_batches(model, n, settings.batch_size, labels, sampler.work(n), progress, draw_batch,
                       onednn=body is None)
    return grids.reshape(n, *sampler.shape).long()


def in_batches(model: Transformer, n: int, batch_size: int, labels: torch.Tensor | None, total: int,
               progress: Progress | None,
               draw_batch: Callable[[int, torch.Tensor | None, Callable[[], None]], torch.Tensor],
               onednn: bool = True) -> torch.Tensor:
    """Call `draw_batch(b, labels_of_batch, tick)` over `n` items `batch_size` at a time, in eval and
    inference mode (and with `onednn`, on a CPU, the Linear layers through oneDNN: vqtool.prior.onednn),
    reporting each tick as `progress(done, total)`; the results concatenated on CPU."""
    device = next(model.parameters()).device
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), onednn_linears(device, enabled=onednn):
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                batch_labels = labels[start:start + b].to(device) if labels is not None else None
                out.append(draw_batch(b, batch_labels, tick).reshape(b, -1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# int8 inference


def quantize_int8(model: Transformer) -> Transformer:
    """A copy of `model` whose Linear layers run as int8 dynamic-quantized matmuls (CPU only).

    Weights are quantized once, activations per batch; embeddings and norms stay fp32.
    `benchmarks/prior_sampling.py` measures the speed-up and the logit differences.
    """
    if next(model.parameters()).device.type != "cpu":
        raise VqtoolError("--quantize int8 runs on CPU only; use --device cpu or drop --quantize")
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not a dependency here.
        warnings.simplefilter("ignore")
        return quantize_dynamic(model.eval(), {torch.nn.Linear}, dtype=torch.qint8)


# --------------------------------------------------------------------------------------------------
# The stage


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (n, H, W)
    labels: torch.Tensor | None
    images: list[Path]
    grid: Path
    artifact: Path
    seconds: float  # time spent drawing tokens
    decode_seconds: float
    prior_kind: str = "absorbing"
    precision: str = "fp32"  # fp32 | bf16 | fp16: what the prior and the decoder ran in

    @property
    def images_per_second(self) -> float:
        return len(self.tokens) / max(self.seconds, 1e-9)


def load_pair(prior_path: Path, vq_path: Path, device: torch.device):
    """Load a prior and the VQ its latents came from, refusing a VQ it was not trained on."""
    from vqtool.artifacts import read_metadata, require_parent
    from vqtool.prior.store import load_prior
    from vqtool.vq.store import load_vq

    prior_path, vq_path = Path(prior_path), Path(vq_path)
    if not prior_path.exists():
        raise VqtoolError(f"{prior_path}: no prior here; run `vqtool train-prior` first (or pass --prior)")
    if not vq_path.exists():
        raise VqtoolError(f"{vq_path}: no VQ model here; pass --vq or the right --run")
    prior_meta = read_metadata(prior_path, "prior-model")
    # What is wrong with the VQ file itself (a latents file, a damaged file) comes before whose it is.
    read_metadata(vq_path, "vq-model")
    require_parent(prior_meta, "vq", vq_path)
    prior = load_prior(prior_path, device)
    vq = load_vq(vq_path, device)
    if vq.model.codebook_size != prior.cfg.vocab_size:
        raise VqtoolError(f"{vq_path}: codebook of {vq.model.codebook_size} codes, but {prior_path} was trained "
                          f"on {prior.cfg.vocab_size}; pass the VQ the prior's latents came from")
    return prior, vq


def decode(vq_model, tokens: torch.Tensor, batch_size: int, device: torch.device,
           precision: str = "fp32") -> torch.Tensor:
    """Token grids (n, h, w) → images (n, 3, S, S) in [-1, 1] (fp32) on CPU, a batch at a time."""
    from vqtool.precision import autocast

    out = []
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, len(tokens), batch_size):
            out.append(vq_model.decode_tokens(tokens[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(out)


def sample_images(
    prior_path: Path,
    vq_path: Path,
    out_dir: Path,
    n: int,
    settings: SampleSettings,
    class_id: int | str | None = None,
    device: str = "auto",
    quantize: str = "none",
    overwrite: bool = False,
    progress: Progress | None = None,
    grid_max: int = 64,
    precision: str = "auto",
    compile: bool = False,
) -> SampleResult:
    """The `sample` stage: n images from the prior through the VQ decoder, as PNGs + samples.safetensors.

    Writes out_dir/sample-NNNN.png, out_dir/grid.png (the first `grid_max` images) and
    out_dir/samples.safetensors. They are written into a staging folder beside out_dir that replaces
    it at the end, so a run that fails (a full disk, Ctrl-C) leaves the previous outputs intact.
    Files in an old out_dir that `sample` does not write are carried over. Both priors and the decoder
    run in `precision` (vqtool.precision; int8 quantization runs fp32 on CPU). `compile`: see sample_tokens.
    """
    from vqtool.device import resolve_device
    from vqtool.grids import save_grid, save_png
    from vqtool.precision import autocast, resolve_precision
    from vqtool.samples import save_samples

    out_dir = Path(out_dir)
    artifact = out_dir / "samples.safetensors"
    if n < 1:
        raise VqtoolError(f"--n must be at least 1 (got {n})")
    if artifact.exists() and not overwrite:
        raise VqtoolError(f"{artifact} exists; pass --overwrite to replace it, or choose another --out")
    if quantize not in QUANTIZE:
        raise VqtoolError(f"--quantize must be one of {', '.join(QUANTIZE)} (got {quantize!r})")
    refuse_enclosing(out_dir, (prior_path, vq_path))
    with removed_on_failure(check_writable(out_dir, folder=True)):
        dev = resolve_device(device)
        chosen = resolve_precision(precision, dev)
        prior, vq = load_pair(prior_path, vq_path, dev)
        sampler = make_sampler(settings, prior)
        if quantize == "int8":
            prior = dataclasses.replace(prior, model=quantize_int8(prior.model))
        class_id = resolve_class(prior, class_id)
        labels = default_labels(prior, n, class_id)

        start = time.perf_counter()
        with autocast(dev, chosen):
            tokens = sample_tokens(prior, n, sampler, labels, progress, compile=compile)
        seconds = time.perf_counter() - start

        digits = max(4, len(str(n - 1)))
        names = [f"sample-{i:0{digits}d}.png" for i in range(n)]
        # Everything goes into a staging folder that replaces out_dir only once it is complete.
        with staged_folder(out_dir, SAMPLE_OUTPUTS) as staging:
            shown = []
            start = time.perf_counter()
            for first in range(0, n, settings.batch_size):  # a batch at a time: memory does not grow with --n
                images = decode(vq.model, tokens[first:first + settings.batch_size], settings.batch_size, dev,
                                chosen)
                for name, image in zip(names[first:first + len(images)], images, strict=True):
                    with naming(out_dir / name):
                        save_png(image, staging / name)
                shown.extend(images[:max(0, grid_max - len(shown))])
            decode_seconds = time.perf_counter() - start
            with naming(out_dir / "grid.png"):
                save_grid(torch.stack(shown), staging / "grid.png", nrow=max(1, math.ceil(math.sqrt(len(shown)))))
            record = {**dataclasses.asdict(settings), "n": n, "prior_kind": prior.kind, "quantize": quantize,
                      "class": class_request(class_id), "device": dev.type, "precision": chosen}
            record["shape"] = list(tokens.shape[1:])
            with naming(artifact):
                save_samples(staging / artifact.name, tokens, labels, record,
                             parents={"prior": prior.artifact.sha256, "vq": vq.artifact.sha256},
                             codebook_size=prior.cfg.vocab_size,
                             extra={"seconds": seconds, "images_per_second": n / max(seconds, 1e-9),
                                    "classes": list(prior.artifact.extra.get("classes", []))})
    paths = [out_dir / name for name in names]
    return SampleResult(tokens=tokens, labels=labels, images=paths, grid=out_dir / "grid.png", artifact=artifact,
                        seconds=seconds, decode_seconds=decode_seconds, prior_kind=prior.kind, precision=chosen)
