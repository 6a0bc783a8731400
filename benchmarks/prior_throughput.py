"""Absorbing-prior training throughput as a fraction of this machine's fp32 matmul peak, plus sampling speed.

The `bench` config of issue 4: 8 layers, width 256, 8 heads, 16×16 tokens, 1024 codes, batch 16,
randomly initialised (speed does not depend on the weights). A training step is counted as
6·P·tokens (P = matmul parameters, output head included) plus the attention matmuls, 3 × 4·L²·d per
layer and sequence: about 187 GFLOP. The fraction of peak is measured in the same process: in each
round every path's training steps are followed at once by the same number of FLOPs as 2048² fp32
matmuls, and the ratio of the two times is that round's fraction, so a busy machine slows both alike.
Medians over rounds are printed, in wall-clock time and in CPU time (which leaves out the time spent
waiting for a core that other jobs hold: on a shared machine the steadier number).

Training paths, back to back:
  reference  logits at every position, CE over the masked ones, torch's default AdamW (the official
             code's way of computing the loss)
  vqtool     the `train-prior` step itself (PriorTrainTask.train_step): logits only at masked
             positions, fused AdamW, gradient clipping, EMA update, batch sampling included
  compiled   the same with the transformer blocks under torch.compile (--compile; compiles first)

Then `sample --steps 50` on 16 images through vqtool.prior.sample.sample_tokens (images/s).

    python benchmarks/prior_throughput.py                   # threads: torch's default, then 1
    python benchmarks/prior_throughput.py --threads 2 --compile
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vqtool.latents import Latents, Split
from vqtool.prior.absorbing import AbsorbingObjective
from vqtool.prior.train import PriorTrainTask, TrainPriorConfig
from vqtool.prior.transformer import Transformer, TransformerConfig


class Clock:
    """Wall time and this process's CPU time (all its threads) since creation."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def matmul_seconds(gflop: float, n: int = 2048) -> tuple[float, float]:
    """(wall, CPU) seconds this machine takes right now for `gflop` of n×n fp32 matmuls: the peak's time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count = max(1, round(gflop * 1e9 / (2 * n**3)))
    clock = Clock()
    for _ in range(count):
        a @ b
    wall, cpu = clock.read()
    scale = gflop * 1e9 / (2 * n**3 * count)
    return wall * scale, cpu * scale


def matmul_peak(n: int = 2048) -> float:
    """fp32 GFLOP/s of n×n matmuls (wall clock), timed over about 20 GFLOP."""
    return 20 / matmul_seconds(20, n)[0]


def step_flops(cfg: TransformerConfig, batch: int) -> float:
    L = cfg.n_tokens + (1 if cfg.has_prefix else 0)
    tokens = batch * cfg.n_tokens
    attention = 3 * 4 * L * L * cfg.n_embd * cfg.n_layer * batch
    return 6 * cfg.matmul_params() * tokens + attention


def synthetic_latents(codes: int, grid: tuple[int, int], n: int, seed: int) -> Latents:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, codes, (n, *grid), generator=g)
    return Latents(splits={"train": Split(tokens)}, codebook_size=codes, latent_shape=grid, image_size=0)


class ReferenceStep:
    """The official code's loss computation: full logits, masked CE via ignore_index; default AdamW."""

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor, batch: int, T: int, seed: int):
        self.model, self.tokens, self.batch = model, tokens.reshape(tokens.shape[0], -1), batch
        self.objective = AbsorbingObjective(T=T)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> None:
        idx = torch.randint(0, self.tokens.shape[0], (self.batch,), generator=self.generator)
        x0 = self.tokens[idx]
        t = self.objective.sample_t(self.batch, self.generator)
        mask = self.objective.mask_for(t, x0.shape[1], self.generator)
        logits = self.model(x0.masked_fill(mask, self.model.cfg.mask_id))
        ce = F.cross_entropy(logits.permute(0, 2, 1), x0.masked_fill(~mask, -1), ignore_index=-1, reduction="none")
        loss = (ce.sum(1) * (1 - t / self.objective.T)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()


def time_training(paths: list[tuple[str, Callable[[], object]]], flops: float, rounds: int,
                  steps: int) -> dict[str, dict[str, list[float]]]:
    """Rounds of: for each path, `steps` training steps, then the same FLOPs as 2048² matmuls at once.

    A round's fraction of peak is matmul time / step time, in wall-clock and in CPU time. Paths and
    matmuls alternate, so a change in the machine's load hits them alike. CPU time leaves out the time
    the process waits for a core that other jobs hold (with several threads it includes their spinning).
    """
    for _, step in paths:
        step()  # warm-up (first-call allocations, compilation)
    out = {name: {"wall": [], "cpu": [], "fraction_wall": [], "fraction_cpu": []} for name, _ in paths}
    for _ in range(rounds):
        for name, step in paths:
            clock = Clock()
            for _ in range(steps):
                step()
            wall, cpu = (t / steps for t in clock.read())
            peak_wall, peak_cpu = matmul_seconds(flops / 1e9)
            rec = out[name]
            rec["wall"].append(wall)
            rec["cpu"].append(cpu)
            rec["fraction_wall"].append(peak_wall / wall)
            rec["fraction_cpu"].append(peak_cpu / cpu)
    return out


def time_sampling(model: Transformer, cfg: TransformerConfig, n: int, steps: int,
                  seed: int) -> tuple[float, float] | None:
    """`sample --steps S` on n images through sample_tokens: (images per wall second, per CPU second)."""
    try:
        from vqtool.prior.sample import SampleSettings, sample_tokens
    except ImportError:
        return None
    from vqtool.prior.store import load_prior, save_prior

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prior.safetensors"
        state = model.state_dict()
        save_prior(path, "absorbing", cfg, AbsorbingObjective().settings(), state, state, {})
        prior = load_prior(path)
    settings = SampleSettings(steps=steps, batch_size=n, seed=seed)
    sample_tokens(prior, 2, SampleSettings(steps=2, batch_size=2, seed=seed))  # warm-up
    clock = Clock()
    sample_tokens(prior, n, settings)
    wall, cpu = clock.read()
    return n / wall, n / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--grid", type=int, nargs=2, default=(16, 16))
    parser.add_argument("--codes", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per path (best and median reported)")
    parser.add_argument("--steps", type=int, default=1, help="training steps per round")
    parser.add_argument("--threads", type=int, nargs="*", default=None,
                        help="thread counts to measure (default: torch's default, then 1)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd blocks")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference path")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--no-sample", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    default_threads = torch.get_num_threads()
    thread_counts = args.threads or sorted({default_threads, 1}, reverse=True)
    grid = tuple(args.grid)
    latents = synthetic_latents(args.codes, grid, 512, args.seed)
    base = dict(n_layer=args.layers, n_head=args.heads, n_embd=args.width, batch_size=args.batch, lr=1e-4,
                warmup_steps=0, max_steps=10**9, device="cpu", seed=args.seed)
    probe = PriorTrainTask(TrainPriorConfig(**base), latents, "0" * 64, Path("unused"), torch.device("cpu"))
    cfg = probe.model_cfg
    flops = step_flops(cfg, args.batch)
    print(f"bench config: {args.layers} layers, width {args.width}, {args.heads} heads, {grid[0]}×{grid[1]} tokens, "
          f"{args.codes} codes, batch {args.batch}; {sum(p.numel() for p in probe.model.parameters()):,} parameters, "
          f"{cfg.matmul_params():,} in matmuls; {flops / 1e9:.1f} GFLOP per training step")
    del probe

    for threads in thread_counts:
        torch.set_num_threads(threads)
        print(f"\n== {threads} thread(s); fp32 matmul peak now {matmul_peak():.1f} GFLOP/s")
        paths = []
        if not args.no_reference:
            torch.manual_seed(args.seed)
            ref_model = Transformer(cfg)
            paths.append(("reference", ReferenceStep(ref_model, latents.splits["train"].tokens, args.batch, 256,
                                                     args.seed)))
        task = PriorTrainTask(TrainPriorConfig(**base), latents, "0" * 64, Path("unused"), torch.device("cpu"))
        paths.append(("vqtool", task.train_step))
        if args.compile:
            compiled = PriorTrainTask(TrainPriorConfig(**base, compile=True), latents, "0" * 64, Path("unused"),
                                      torch.device("cpu"))
            start = time.perf_counter()
            compiled.train_step()
            print(f"   (compiling the blocks took {time.perf_counter() - start:.0f} s)")
            paths.append(("compiled", compiled.train_step))
        results = time_training(paths, flops, args.rounds, args.steps)
        med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
        for name, m in med.items():
            tokens_s = args.batch * cfg.n_tokens / m["wall"]
            print(f"   {name:9s}  {m['wall']:.2f} s/step wall, {m['cpu']:.2f} s CPU  {tokens_s:,.0f} tokens/s  "
                  f"{100 * m['fraction_wall']:.0f}% of fp32 matmul peak (wall clock), "
                  f"{100 * m['fraction_cpu']:.0f}% (CPU time)")
        if "reference" in med:
            for name in med:
                if name != "reference":
                    print(f"   {name} vs reference: {med['reference']['wall'] / med[name]['wall']:.2f}× faster per "
                          f"step (wall), {med['reference']['cpu'] / med[name]['cpu']:.2f}× (CPU time)")
        if not args.no_sample:
            rates = time_sampling(task.model, cfg, args.samples, args.sample_steps, args.seed)
            if rates is None:
                print("   sampling: vqtool.prior.sample not available")
            else:
                print(f"   sample --steps {args.sample_steps}: {rates[0]:.2f} images/s wall clock, {rates[1]:.2f} "
                      f"images per CPU second ({args.samples} images)")
        del paths, task
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
