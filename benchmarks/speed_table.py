"""The speed table of issue 16: vqtool against the papers' code paths, alternating in one run.

Every path runs in a process of its own, set up as its users' would be: the papers' paths as their
scripts run (glibc's malloc as it comes), vqtool's as the `vqtool` command sets itself up
(vqtool.memory keeps freed memory in the heap). The parent sends each process in turn the word to make
`--calls` calls, round after round, and times the matmul peak itself after each, so a change of the
machine's load hits all paths alike and the paths' processes run nothing but their own work.

Rows (medians over the rounds):
  prior-train  absorbing prior train step, `bench` config (8×256, 16×16 tokens, 1024 codes, batch 16):
               the official code's loss (full logits, masked CE) and default AdamW
               (prior_throughput.ReferenceStep) on the official code's transformer
               (reference_transformer.PapersTransformer: separate q/k/v layers, explicit attention),
               then the same step on vqtool's transformer, against `PriorTrainTask.train_step`, and the
               official step once more in a process set up as vqtool's (what the setup alone is worth)
  sampling     absorbing sampling, 16 images × 50 steps, random weights: the paper's sampler (full
               forward, draw everywhere; prior_sampling.reference_sample) on the papers' transformer and
               on vqtool's, against `sample_tokens`: fp32 (with its Linear layers through oneDNN, and
               without: VQTOOL_ONEDNN=0) and `--quantize int8`
  vqgan        VQGAN generator + discriminator step at the cifar10-32 architecture with Taming's 3-layer
               discriminator (64 channels), batch 16, no perceptual loss, no DiffAugment: Taming's
               Lightning step (reference_vqgan.TamingStep) against `VQTrainer.train_step`
  encode       the cifar10-32 encoder + codebook lookup, batch 64: Taming's encoder under no_grad
               against `vqtool encode`'s TokenEncoder (eager; compiled too with --compile) and against
               the way vqtool encoded before (NCHW, no_grad)

FLOPs per call are counted with torch's FlopCounterMode (matmuls, convolutions, attention), and after
every path of every round 2048² fp32 matmuls of 20 GFLOP measure the peak: "% of peak" is the path's
own FLOP rate over that peak, in wall-clock time and in CPU time, each against the matmul's own (CPU
time leaves out the time spent waiting for a core other jobs hold: the steadier number on a shared machine).

    python benchmarks/speed_table.py --threads 1                       # every row (≈ 30 min, 2 busy cores)
    python benchmarks/speed_table.py --rows prior-train vqgan encode --rounds 4 --calls 10 --warm-up 10
    python benchmarks/speed_table.py --rows vqgan encode --rounds 7 --compile
    python benchmarks/speed_table.py --rows vqgan --sections           # where a VQGAN step's time goes
    python benchmarks/speed_table.py --rows sampling --sections        # and a sampling step's
"""

from __future__ import annotations

import argparse
import copy
import itertools
import multiprocessing
import os
import statistics
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from prior_sampling import reference_sample
from prior_throughput import Clock, ReferenceStep, matmul_peak, matmul_seconds, synthetic_latents
from reference_transformer import PapersTransformer
from reference_vqgan import NLayerDisc, TamingStep, TamingVQGAN, swish
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from vqtool.config import load_recipe, merge
from vqtool.data.prepare import PrepareSettings, prepare_synthetic
from vqtool.prior import onednn
from vqtool.prior.sample import SampleSettings, quantize_int8, sample_tokens
from vqtool.prior.store import LoadedPrior
from vqtool.prior.train import PriorTrainTask, TrainPriorConfig
from vqtool.prior.transformer import Transformer, TransformerConfig
from vqtool.vq.encode import TokenEncoder
from vqtool.vq.model import VQConfig, VQModel
from vqtool.vq.train import TrainVQConfig, VQTrainer

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ROWS = ("prior-train", "sampling", "vqgan", "encode")


class Timed:
    """One timed path of a row: a call, its FLOPs and how many images (or steps) one call makes.

    `process` is the process it runs in, set up as its users' would be: "papers" as the papers' scripts
    run (nothing changed), "vqtool" as the `vqtool` command sets itself up (vqtool.memory: freed memory
    stays in the heap). Process-wide settings cannot be undone, so each path has a process of its own.
    """

    def __init__(self, label: str, call: Callable[[], object] | None, flops: Callable[[], float] | float | None,
                 per_call: float, warm_up: bool = True, process: str = "vqtool"):
        # `flops` may be a function that counts them (running the call once): only the path's own process does.
        self.label, self.call, self.flops, self.per_call = label, call, flops, per_call
        self.warm_up = warm_up  # a first call before the rounds (compilation, allocations); minutes for sampling
        self.process = process
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.peak: list[tuple[float, float]] = []  # matmul GFLOP/s (wall, CPU) right after each round of it


if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    # vqtool's samplers run their Linear layers through this op (vqtool.prior.onednn), which torch's
    # counter does not know: the FLOPs of the same product as F.linear's.
    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _onednn_linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * w_shape[0] * w_shape[1]


def count_flops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def time_calls(p: Timed, calls: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call, over `calls` calls of the path in a row."""
    clock = Clock()
    for _ in range(calls):
        p.call()
    return tuple(t / calls for t in clock.read())


def path_worker(conn, row: str, args: argparse.Namespace, index: int) -> None:
    """The process of path `index` of the row, set up as its users' is (Timed.process): counts its FLOPs,
    warms it up, then times `--calls` calls each time the parent sends True, until it sends False. The
    other paths' processes wait meanwhile."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="speed-table-") as tmp:
            paths = build_row(row, args, Path(tmp))[2]
            p = paths[index]
            if p.process == "vqtool":
                from vqtool.memory import keep_freed_memory

                keep_freed_memory()  # before the path's first call, which makes its working set
            flops = p.flops() if callable(p.flops) else p.flops
            clock = Clock()
            if p.warm_up:
                for _ in range(args.warm_up):
                    p.call()
            conn.send((len(paths), p.label, flops, p.per_call, p.process, clock.read()[0] if p.warm_up else None))
            while conn.recv():
                conn.send(time_calls(p, args.calls))
    except Exception:
        conn.send(RuntimeError(f"path {index} of row {row}:\n{traceback.format_exc()}"))


def _answer(conn):
    """The worker's next message; its error, raised here, if it failed."""
    message = conn.recv()
    if isinstance(message, Exception):
        raise message
    return message


def time_row(row: str, args: argparse.Namespace) -> list[Timed]:
    """The row's paths timed round after round, each in a process of its own, one at a time; after each call
    this process measures the matmul peak, so the paths' processes run nothing but their own work."""
    ctx = multiprocessing.get_context("spawn")
    workers: list = []
    paths: list[Timed] = []

    def start(index: int):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=path_worker, args=(child, row, args, index), daemon=True)
        proc.start()
        child.close()  # the worker's end: if it dies, recv() here raises EOFError instead of waiting
        workers.append((parent, proc))
        count, label, flops, per_call, process, warm = _answer(parent)  # one process starts at a time
        paths.append(Timed(label, None, flops, per_call, process=process))
        if warm is not None and warm > 10:
            print(f"   ({label}: its warm-up took {warm:.0f} s)", flush=True)
        return count

    count = start(0)
    for index in range(1, count):
        start(index)
    for _ in range(args.rounds):
        for p, (conn, _) in zip(paths, workers, strict=True):
            conn.send(True)
            wall, cpu = _answer(conn)
            p.wall.append(wall)
            p.cpu.append(cpu)
            p.peak.append(tuple(20 / t for t in matmul_seconds(20)))
    for conn, proc in workers:
        conn.send(False)
        proc.join()
    return paths


# --------------------------------------------------------------------------------------------------
# The rows


def prior_config() -> TransformerConfig:
    return TransformerConfig(vocab_size=1024, grid=(16, 16), n_layer=8, n_head=8, n_embd=256)


def prior_train_paths(seed: int) -> list[Timed]:
    latents = synthetic_latents(1024, (16, 16), 512, seed)
    base = dict(n_layer=8, n_head=8, n_embd=256, batch_size=16, lr=1e-4, warmup_steps=0, max_steps=10**9,
                device="cpu", seed=seed)
    task = PriorTrainTask(TrainPriorConfig(**base), latents, "0" * 64, Path("unused"), torch.device("cpu"))
    torch.manual_seed(seed)
    tokens = latents.splits["train"].tokens
    papers = PapersTransformer.from_vqtool(Transformer(task.model_cfg))
    ref, ref_here = (ReferenceStep(copy.deepcopy(papers), tokens, 16, 256, seed) for _ in range(2))
    torch.manual_seed(seed)
    ref_loss = ReferenceStep(Transformer(task.model_cfg), tokens, 16, 256, seed)
    return [Timed("official code", ref, lambda: count_flops(ref), 1, process="papers"),
            Timed("its loss, vqtool's model", ref_loss, lambda: count_flops(ref_loss), 1, process="papers"),
            Timed("vqtool", task.train_step, lambda: count_flops(task.train_step), 1),
            # The papers' step with vqtool's process settings: what they alone are worth to it.
            Timed("official code in vqtool's process", ref_here, lambda: count_flops(ref_here), 1)]


def sampling_paths(seed: int, n: int, steps: int, compile: bool = False) -> list[Timed]:
    torch.manual_seed(seed)
    model = Transformer(prior_config()).eval()
    int8 = quantize_int8(model)
    settings = SampleSettings(steps=steps, batch_size=n, seed=seed)
    fp32 = LoadedPrior(model, "absorbing", {}, None)

    papers = PapersTransformer.from_vqtool(model).eval()

    def reference(k: int = n, on: torch.nn.Module = papers):
        return reference_sample(on, k, steps, 1.0, torch.Generator().manual_seed(seed))

    def reference_on_ours(k: int = n):
        return reference(k, model)

    def vqtool(k: int = n, compiled: bool = False):
        return sample_tokens(fp32, k, SampleSettings(steps=steps, batch_size=k, seed=seed), compile=compiled)

    def vqtool_blas(k: int = n):
        # The same sampler with its Linear layers left to torch (VQTOOL_ONEDNN=0): what oneDNN adds here.
        with mock.patch.dict(os.environ, {onednn.SWITCH: "0"}):
            return vqtool(k)

    def counted(sampler: Callable[[int], object]) -> Callable[[], float]:
        # FLOPs grow linearly with the batch: counted on 2 images, scaled to n. Counting runs the sampler
        # once, which also warms it up.
        return lambda: count_flops(lambda: sampler(2)) * n / 2

    paths = [Timed("official code", reference, counted(reference), n, warm_up=False, process="papers"),
             Timed("its sampler, vqtool's model", reference_on_ours, counted(reference_on_ours), n, warm_up=False,
                   process="papers"),
             Timed("vqtool fp32", vqtool, counted(vqtool), n, warm_up=False),
             Timed("vqtool fp32, BLAS linears", vqtool_blas, counted(vqtool_blas), n, warm_up=False),
             Timed("vqtool int8", lambda: sample_tokens(LoadedPrior(int8, "absorbing", {}, None), n, settings),
                   None, n, warm_up=False)]
    if compile:
        # Every sample_tokens call compiles anew (from inductor's cache after the warm-up's): its time is part
        # of the path's, as a `vqtool sample --compile` run pays it once.
        paths.append(Timed("vqtool fp32 --compile", lambda: vqtool(n, compiled=True), paths[2].flops, n))
    return paths


def cifar_configs() -> tuple[VQConfig, TrainVQConfig]:
    recipe = load_recipe(RECIPES / "cifar10-32.yaml")
    vq = merge(VQConfig, {**recipe["vq"], "kmeans_init": False})
    train = {**recipe["train_vq"], "perceptual": "none", "diffaug": [], "disc_layers": 3, "disc_ch": 64,
             "disc_start": 0, "batch_size": 16, "shuffle_buffer": 16}
    return vq, merge(TrainVQConfig, train)


def taming_model() -> TamingVQGAN:
    return TamingVQGAN(ch=32, ch_mult=[1, 2, 2], blocks=1, attn_res=[8], z=32, codes=512, dim=16, res=32)


def vqgan_trainer(work: Path, **overrides) -> VQTrainer:
    shards = work / "shards-32"
    if not shards.exists():
        prepare_synthetic(shards, "shapes", 68, PrepareSettings(size=32, val_fraction=0.1, shard_size=64, workers=1),
                          show_progress=False)
    vq, train = cifar_configs()
    for key, value in overrides.items():
        setattr(train, key, value)
    return VQTrainer(vq, train, shards, work / "vq.safetensors", work / "figures")


def vqgan_paths(work: Path, seed: int) -> list[Timed]:
    torch.manual_seed(seed)
    batches = itertools.cycle([torch.rand(16, 3, 32, 32) * 2 - 1 for _ in range(4)])
    ref = TamingStep(taming_model(), NLayerDisc(64, 3), batches)
    task = vqgan_trainer(work)
    return [Timed("official code", ref, lambda: count_flops(ref), 1, process="papers"),
            Timed("vqtool", task.train_step, lambda: count_flops(task.train_step), 1)]


def encode_paths(seed: int, batch: int, compile: bool) -> list[Timed]:
    torch.manual_seed(seed)
    ref_model = taming_model().eval()
    vq, _ = cifar_configs()
    vq.resolution = 32
    model = VQModel(vq).eval().requires_grad_(False)
    x = torch.rand(batch, 3, 32, 32) * 2 - 1

    @torch.no_grad()
    def reference():
        # Taming's encode: encoder, quant_conv, nearest code by Euclidean distance (its forward's first half).
        h = ref_model.quant_conv(ref_model.enc_out(swish(ref_model.encoder(x))))
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        e = ref_model.embedding.weight
        return (flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()).argmin(1)

    @torch.no_grad()
    def before():
        return model.encode_to_tokens(x)  # vqtool's encode before issue 16: NCHW, no_grad

    eager = TokenEncoder(copy.deepcopy(model), torch.device("cpu"), "fp32")
    paths = [Timed("official code", reference, lambda: count_flops(reference), batch, process="papers"),
             Timed("vqtool before", before, lambda: count_flops(before), batch),
             Timed("vqtool", lambda: eager(x), lambda: count_flops(lambda: eager(x)), batch)]
    if compile:
        compiled = TokenEncoder(copy.deepcopy(model), torch.device("cpu"), "fp32", compile=True)
        paths.append(Timed("vqtool --compile", lambda: compiled(x), paths[2].flops, batch))
    return paths


# --------------------------------------------------------------------------------------------------
# Where a VQGAN step's time goes


def vqgan_sections(work: Path, rounds: int) -> None:
    """CPU time of each part of vqtool's step, next to the same parts done the plain way (Taming's):
    two retained last-layer gradients and one backward of the whole loss, two discriminator calls, torch's
    default Adam, a lerp_ per EMA tensor. Same weights and batch; medians over the rounds."""
    from collections import defaultdict

    from reference_vqgan import adaptive_weight
    from torch import nn

    from vqtool.training import EMA
    from vqtool.vq.losses import PatchDiscriminator, generator_gradient, hinge_d_loss, hinge_g_loss
    from vqtool.vq.train import _frozen

    task = vqgan_trainer(work)
    x = task._next_batch()
    fast_model, fast_disc = task.model, task.disc
    model, disc = copy.deepcopy(fast_model), PatchDiscriminator(64, 3)
    for i, layer in enumerate(disc.main):  # plain convolutions where vqtool has SmallMapConv2d
        if isinstance(layer, nn.Conv2d):
            plain = nn.Conv2d(layer.in_channels, layer.out_channels, 4, layer.stride, 1, bias=layer.bias is not None)
            disc.main[i] = plain
    disc.load_state_dict(fast_disc.state_dict())
    opts = [torch.optim.Adam(m.parameters(), 3e-4, (0.5, 0.9)) for m in (model, disc)]
    ema = EMA(model, 0.99)

    class Plain(EMA):  # the per-tensor lerp_ the EMA used before
        @torch.no_grad()
        def update(self, m):
            for k, v in m.state_dict().items():
                self.shadow[k].lerp_(v, 1 - self.decay) if v.dtype.is_floating_point else self.shadow[k].copy_(v)

    ema.__class__ = Plain
    times: dict[str, list[float]] = defaultdict(list)

    def part(name: str, fn: Callable[[], object]):
        clock = Clock()
        out = fn()
        times[name].append(clock.read()[1])
        return out

    def plain_step():
        out = part("autoencoder forward", lambda: model(x))
        l1 = (x - out.recon).abs().mean()
        g = part("discriminator forward (generator)", lambda: hinge_g_loss(disc(out.recon)))
        w = part("λ (plain: 2 retained grads; vqtool: generator_gradient)",
                 lambda: adaptive_weight(l1, g, model.last_layer, 1.0))
        opts[0].zero_grad()
        part("autoencoder backward", lambda: (l1 + out.q_loss + w * g).backward())
        part("Adam, autoencoder", opts[0].step)
        opts[1].zero_grad()
        part("discriminator step (plain: 2 calls; vqtool: 1 pass)", lambda: hinge_d_loss(
            disc(x), disc(out.recon.detach())).backward())
        part("Adam, discriminator", opts[1].step)
        part("EMA", lambda: ema.update(model))

    def fast_step():
        out = part("v autoencoder forward", lambda: fast_model(x))
        l1 = (x - out.recon).abs().mean()

        def gan():
            with _frozen(fast_disc):
                return hinge_g_loss(fast_disc(out.recon))

        g = part("v discriminator forward (generator)", gan)
        w, grad = part("v λ (plain: 2 retained grads; vqtool: generator_gradient)",
                       lambda: generator_gradient(l1, g, out.recon, fast_model.last_layer, 1.0))
        task.opt_ae.zero_grad()
        part("v autoencoder backward", lambda: torch.autograd.backward([out.recon, out.q_loss], [grad, None]))
        part("v Adam, autoencoder", task.opt_ae.step)
        task.opt_d.zero_grad()

        def disc_step():
            real, fake = fast_disc(torch.cat([x, out.recon.detach()]), parts=2).chunk(2)
            hinge_d_loss(real, fake).backward()

        part("v discriminator step (plain: 2 calls; vqtool: 1 pass)", disc_step)
        part("v Adam, discriminator", task.opt_d.step)
        part("v EMA", lambda: task.ema.update(fast_model))

    for _ in range(2):
        plain_step(), fast_step()
    times.clear()
    for _ in range(rounds):
        plain_step(), fast_step()
    med = {k: statistics.median(v) for k, v in times.items()}
    plain_total = sum(v for k, v in med.items() if not k.startswith("v "))
    fast_total = sum(v for k, v in med.items() if k.startswith("v "))
    print(f"\n== where a VQGAN step's time goes (CPU ms, medians of {rounds} rounds, {x.shape[0]} images, NCHW)")
    print("| part | plain | % | vqtool | % |\n|---|---|---|---|---|")
    for k, v in med.items():
        if k.startswith("v "):
            continue
        f = med["v " + k]
        print(f"| {k} | {1e3 * v:.0f} | {100 * v / plain_total:.0f}% | {1e3 * f:.0f} | {100 * f / fast_total:.0f}% |")
    print(f"| total | {1e3 * plain_total:.0f} | | {1e3 * fast_total:.0f} | {plain_total / fast_total:.2f}× |")


# --------------------------------------------------------------------------------------------------
# Where a sampling step's time goes

# Profiler op names → the part of a step they are (self time; anything else counts as "other ops").
STEP_PARTS = {
    "matmuls (Linear, head)": ("aten::addmm", "aten::mm", "aten::bmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "bias and layout copies": ("aten::copy_", "aten::clone"),
    "GELU": ("aten::gelu",),
    "LayerNorm": ("aten::native_layer_norm",),
    "residual adds": ("aten::add", "aten::add_"),
    "embedding, gathers, scatters": ("aten::index_select", "aten::gather", "aten::index", "aten::index_put_",
                                     "aten::scatter_", "aten::cat", "aten::nonzero", "aten::embedding"),
    "the draw (softmax, multinomial)": ("aten::_softmax", "aten::_log_softmax", "aten::multinomial", "aten::exp",
                                        "aten::div", "aten::cumsum", "aten::uniform_", "aten::lt", "aten::topk",
                                        "aten::exponential_", "aten::argmax", "aten::aminmax"),
}


def sampling_sections(seed: int, n: int, steps: int, rounds: int) -> None:
    """CPU time of one sampling step by part (torch.profiler self times, medians over `rounds` steps), for
    the paper's step (prior_sampling.reference_step) and vqtool's (RandomSchedule.step over the predictor
    `sample_tokens` uses), both half way through a `steps`-step run; "Python and dispatch" is the step's
    time minus its ops'."""
    from collections import defaultdict

    from prior_sampling import reference_step
    from torch.profiler import ProfilerActivity, profile

    from vqtool.prior.logits import Draw
    from vqtool.prior.sample import make_predictor
    from vqtool.prior.schedules import RandomSchedule

    torch.manual_seed(seed)
    model = Transformer(prior_config()).eval()
    cfg, g = model.cfg, torch.Generator().manual_seed(seed)
    N, t = cfg.n_tokens, steps // 2
    k = N // steps
    half = torch.rand(n, N, generator=g) < 0.5
    start = torch.randint(0, cfg.vocab_size, (n, N), generator=g).masked_fill(half, cfg.mask_id)
    predictor = make_predictor(model, None, cfg.grid)
    schedule, draw = RandomSchedule(), Draw()

    def ours():
        tokens = start.clone()
        schedule.step(predictor, tokens, tokens == cfg.mask_id, k, 0.5, draw, g)

    def reference():
        reference_step(model, start.clone(), start != cfg.mask_id, t, 1.0, g)

    times: dict[str, dict[str, list[float]]] = {"official code": defaultdict(list), "vqtool": defaultdict(list)}
    with torch.inference_mode():
        for label, fn in (("official code", reference), ("vqtool", ours)) * (rounds + 1):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                clock = Clock()
                fn()
                wall = clock.read()[0]
            parts: dict[str, float] = defaultdict(float)
            for event in prof.key_averages():
                part = next((p for p, names in STEP_PARTS.items() if event.key in names), "other ops")
                parts[part] += event.self_cpu_time_total / 1e6
            parts["Python and dispatch"] = wall - sum(parts.values())
            for part, seconds in parts.items():
                times[label][part].append(seconds)
    med = {label: {p: statistics.median(v[1:]) for p, v in parts.items()} for label, parts in times.items()}
    ref, fast = med["official code"], med["vqtool"]
    total_ref, total_fast = sum(ref.values()), sum(fast.values())
    print(f"\n== where a sampling step's time goes (wall ms of one step half way, {n} images, {k} tokens revealed; "
          f"torch.profiler self times, medians of {rounds})")
    print("| part | official code | % | vqtool | % |\n|---|---|---|---|---|")
    for part in [*STEP_PARTS, "other ops", "Python and dispatch"]:
        a, b = ref.get(part, 0.0), fast.get(part, 0.0)
        print(f"| {part} | {1e3 * a:.0f} | {100 * a / total_ref:.0f}% | {1e3 * b:.0f} | {100 * b / total_fast:.0f}% |")
    print(f"| total | {1e3 * total_ref:.0f} | | {1e3 * total_fast:.0f} | {total_ref / total_fast:.2f}× |")


# --------------------------------------------------------------------------------------------------


def build_row(name: str, args: argparse.Namespace, work: Path,
              describe_only: bool = False) -> tuple[str, str, list[Timed]]:
    """(title, unit, paths) of row `name`; `describe_only` leaves the paths out (built in the workers)."""
    rows = {
        "prior-train": ("absorbing prior train step, `bench` config, batch 16",
                        lambda: prior_train_paths(args.seed), "s/step"),
        "sampling": (f"absorbing sampling, {args.samples} images × {args.sample_steps} steps",
                     lambda: sampling_paths(args.seed, args.samples, args.sample_steps, args.compile), "s"),
        "vqgan": ("VQGAN generator + discriminator step, cifar10-32, 3-layer disc, batch 16",
                  lambda: vqgan_paths(work, args.seed), "s/step"),
        "encode": (f"encode, cifar10-32 VQ, batch {args.encode_batch}",
                   lambda: encode_paths(args.seed, args.encode_batch, args.compile), "images/s"),
    }
    title, build, unit = rows[name]
    return title, unit, [] if describe_only else build()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per row (medians reported)")
    ap.add_argument("--calls", type=int, default=1,
                    help="calls of a path in a row per round (timed per call): longer runs of one process, as a "
                         "training run is")
    ap.add_argument("--warm-up", type=int, default=1,
                    help="calls of each path that warms up (training, encoding, compiled sampling) before the "
                         "rounds (glibc's malloc settles over the first ten or twenty steps of the papers' prior)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--encode-batch", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="also time the compiled encoder and sampler "
                                                           "(compiles first)")
    ap.add_argument("--sections", action="store_true", help="print where a VQGAN step's (and a sampling "
                                                            "step's) time goes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {load:.1f} at the start; "
          f"fp32 2048² matmul now {matmul_peak():.1f} GFLOP/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="speed-table-") as tmp:
        work = Path(tmp)
        for name in args.rows:
            title, unit, _ = build_row(name, args, work, describe_only=True)
            print(f"\n== {title}", flush=True)
            paths = time_row(name, args)
            for p in paths:
                peaks = " / ".join(f"{w:.0f}" for w, _ in p.peak)
                print(f"   {p.label:18s} wall {' / '.join(f'{t:.3g}' for t in p.wall)} s, CPU "
                      f"{' / '.join(f'{t:.3g}' for t in p.cpu)} s, matmul after it {peaks} GFLOP/s (wall)", flush=True)
            rows.append((title, unit, paths))
        if args.sections and "vqgan" in args.rows:
            vqgan_sections(work, max(args.rounds, 5))
        if args.sections and "sampling" in args.rows:
            sampling_sections(args.seed, args.samples, args.sample_steps, max(args.rounds, 5))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {load:.1f} at the end; medians of {args.rounds} alternating rounds of {args.calls} call(s) "
          f"per path, each path in a process of its own, after {args.warm_up} warm-up call(s)\n")
    print("| work | path | wall / CPU time | ratio (wall) | ratio (CPU time) | % of fp32 matmul peak (wall / CPU) |")
    print("|---|---|---|---|---|---|")
    for title, unit, paths in rows:
        ref = paths[0]
        for p in paths:
            wall, cpu = statistics.median(p.wall), statistics.median(p.cpu)
            shown = (f"{p.per_call / wall:.0f} / {p.per_call / cpu:.0f} images/s" if unit == "images/s"
                     else f"{wall:.3g} / {cpu:.3g} {unit}")
            ratio = statistics.median(r / t for r, t in zip(ref.wall, p.wall, strict=True))
            ratio_cpu = statistics.median(r / t for r, t in zip(ref.cpu, p.cpu, strict=True))
            if p.flops:
                frac_wall = statistics.median(p.flops / t / 1e9 / g[0] for t, g in zip(p.wall, p.peak, strict=True))
                frac_cpu = statistics.median(p.flops / t / 1e9 / g[1] for t, g in zip(p.cpu, p.peak, strict=True))
                frac = f"{100 * frac_wall:.0f}% / {100 * frac_cpu:.0f}% ({p.flops / 1e9:.3g} GFLOP)"
            else:
                frac = "— (int8)"
            print(f"| {title} | {p.label} | {shown} | {ratio:.2f}× | {ratio_cpu:.2f}× | {frac} |")


if __name__ == "__main__":
    main()
