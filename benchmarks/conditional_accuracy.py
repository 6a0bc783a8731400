"""Does a class-conditional prior's sample show its class? A classifier trained on the run's real images says.

1. Trains a small CNN (seeded, one CPU thread by default, a minute or two at 32 px) on the run's real
   train images and reports its accuracy on the real val images: the ceiling. Its accuracy on the VQ
   reconstructions of the val images says what the decoder alone costs.
2. Samples `--n` images per class from RUN/prior.safetensors (through vqtool's Python API, classes in
   blocks) at every `--guidance` scale and reports the fraction the classifier assigns to the class
   that was asked for.
3. FID and KID (vqtool.eval.metrics) of the same samples against the val images, in the classifier's
   penultimate features (these compare settings of one run with each other, not with published FIDs).
   The `real train` row puts as many real train images through the same computation: the floor at
   that number of images.

Prints a markdown table; `--out FILE.json` also writes the numbers (per-class accuracies included).
Guidance > 0 needs a vqtool whose SampleSettings has `guidance` (classifier-free guidance).

    python benchmarks/conditional_accuracy.py                           # runs/quickstart, guidance 0
    python benchmarks/conditional_accuracy.py RUN --guidance 0,1,2,4 --n 32 --out RUN/conditional.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vqtool.data.loader import ShardLoader
from vqtool.errors import VqtoolError
from vqtool.eval import metrics
from vqtool.prior.sample import SampleSettings, decode, load_pair, sample_tokens
from vqtool.runs import RunPaths


class Classifier(nn.Module):
    """Three conv stages (two convs each, batch norm), global average pooling, a linear head.

    `features` is the pooled vector the head reads: the space FID and KID are computed in."""

    def __init__(self, n_classes: int, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def read_split(shards: Path, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, S, S) in [-1, 1] and labels (N,) of one split, in manifest order."""
    images, labels = [], []
    count = 0
    for x, y in ShardLoader(shards, split, batch_size=256, infinite=False):
        if y is None:
            raise VqtoolError(f"{shards}: the {split} split has no labels; this benchmark needs a labelled dataset")
        images.append(x)
        labels.append(y)
        count += len(x)
        if limit is not None and count >= limit:
            break
    return torch.cat(images)[:limit], torch.cat(labels)[:limit]


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each image with its own sigma (B,), separable, reflect-padded; sigma 0 leaves it."""
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, K)
    b, c, h, w = x.shape
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    k = kernel.repeat_interleave(c, 0)
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Flips (both axes: the shapes come in every rotation), shifts of up to `shift` pixels, and the
    degradations a VQ decoder adds: blur, colour drift and noise. Without the last three the classifier
    keys on sharp edges and misreads even the VQ's reconstructions of images it classifies right."""
    b = x.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

    x = torch.where(uniform(0, 1, 1, 1, 1) < 0.5, x.flip(3), x)
    x = torch.where(uniform(0, 1, 1, 1, 1) < 0.5, x.flip(2), x)
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
    size = x.shape[-1]
    x = padded[:, :, dy:dy + size, dx:dx + size]
    x = blur(x, uniform(0, 1.5) * (uniform(0, 1) < 0.7) * size / 32)
    x = x * uniform(0.8, 1.2, 3, 1, 1) + uniform(-0.15, 0.15, 3, 1, 1)
    x = x + uniform(0, 0.08, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, n_classes: int, epochs: int, width: int,
                     batch_size: int, seed: int) -> Classifier:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = Classifier(n_classes, width)
    steps = epochs * (len(images) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(augment(images[idx], generator)), labels[idx], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
    return model.eval()


@torch.inference_mode()
def classify(model: Classifier, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes (N,) and penultimate features (N, D)."""
    preds, feats = [], []
    for start in range(0, len(images), batch_size):
        f = model.features(images[start:start + batch_size])
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(preds), torch.cat(feats)


def score(name: str, guidance: float | None, preds: torch.Tensor, wanted: torch.Tensor, feats: torch.Tensor | None,
          real_feats: torch.Tensor, n_classes: int, seconds: float | None = None) -> dict:
    right = preds == wanted
    row = {"images": name, "guidance": guidance, "n": len(preds), "accuracy": float(right.float().mean()),
           "per_class": [float(right[wanted == c].float().mean()) for c in range(n_classes)],
           "fid": None, "kid_mean": None, "kid_std": None, "seconds": seconds}
    if feats is not None:
        row["fid"] = metrics.fid(real_feats, feats)
        row["kid_mean"], row["kid_std"] = metrics.kid(real_feats, feats)
    return row


def with_guidance(settings: SampleSettings, scale: float) -> SampleSettings:
    """The settings at guidance `scale`; 0 leaves them as they are (plain conditional sampling)."""
    if scale == 0:
        return settings
    try:
        return dataclasses.replace(settings, guidance=scale)
    except TypeError:
        sys.exit(f"--guidance {scale:g}: this vqtool's SampleSettings has no `guidance` (classifier-free guidance); "
                 "use --guidance 0")


def table(rows: list[dict], classes: list[str]) -> str:
    def num(value, fmt):
        return "–" if value is None else format(value, fmt)

    lines = ["| images | guidance | n | in requested class | FID (classifier features) | KID×1000 | s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kid = "–" if r["kid_mean"] is None else f"{1000 * r['kid_mean']:.1f} ± {1000 * r['kid_std']:.1f}"
        lines.append(f"| {r['images']} | {num(r['guidance'], 'g')} | {r['n']} | {100 * r['accuracy']:.1f}% | "
                     f"{num(r['fid'], '.2f')} | {kid} | {num(r['seconds'], '.0f')} |")
    lines.append("")
    lines.append("per class (" + ", ".join(classes) + "):")
    for r in rows:
        lines.append(f"  {r['images']:<22} " + " ".join(f"{100 * a:5.1f}" for a in r["per_class"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?", default=Path("runs/quickstart"),
                        help="run folder with shards/, vq.safetensors and a class-conditional prior.safetensors")
    parser.add_argument("--guidance", default="0", help="comma-separated guidance scales, e.g. 0,1,2,4")
    parser.add_argument("--n", type=int, default=32, help="samples per class and scale")
    parser.add_argument("--temperature", type=float, default=None, help="default: the run's sample setting, else 1")
    parser.add_argument("--steps", type=int, default=None, help="unmasking steps; default: the run's, else 50")
    parser.add_argument("--schedule", default=None, help="random | confidence; default: the run's, else random")
    parser.add_argument("--epochs", type=int, default=16, help="classifier training epochs")
    parser.add_argument("--width", type=int, default=16, help="classifier width (channels of its first stage)")
    parser.add_argument("--train-images", type=int, default=20000, help="at most this many train images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    try:
        scales = [float(v) for v in args.guidance.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--guidance {args.guidance!r}: expected comma-separated numbers, e.g. 0,1,2,4")
    if not scales:
        parser.error("--guidance: give at least one scale")
    if args.threads:
        torch.set_num_threads(args.threads)

    paths = RunPaths.of(args.run)
    try:
        run_settings = recipe_sample_settings(paths.root)
        prior, vq = load_pair(paths.prior, paths.vq, torch.device("cpu"))
        n_classes = prior.cfg.n_classes
        if n_classes == 0:
            raise VqtoolError(f"{paths.prior}: an unconditional prior; this benchmark needs a class-conditional one")
        classes = [str(c) for c in prior.artifact.extra.get("classes", [])] or [str(c) for c in range(n_classes)]
        start = time.perf_counter()
        train_x, train_y = read_split(paths.shards, "train", args.train_images)
        val_x, val_y = read_split(paths.shards, "val")
    except VqtoolError as exc:
        sys.exit(f"error: {exc}")
    settings = SampleSettings(
        steps=args.steps or run_settings.get("steps", 50),
        temperature=args.temperature if args.temperature is not None else run_settings.get("temperature", 1.0),
        schedule=args.schedule or run_settings.get("schedule", "random"),
        batch_size=64, seed=args.seed)

    classifier = train_classifier(train_x, train_y, n_classes, args.epochs, args.width, 64, args.seed)
    train_seconds = time.perf_counter() - start
    val_pred, val_feats = classify(classifier, val_x)
    rows = [score("real val (ceiling)", None, val_pred, val_y, None, val_feats, n_classes, train_seconds)]
    with torch.inference_mode():
        recon = decode(vq.model, vq.model.encode_to_tokens(val_x), 64, torch.device("cpu"))
    recon_pred, recon_feats = classify(classifier, recon)
    rows.append(score("VQ reconstructions of val", None, recon_pred, val_y, recon_feats, val_feats, n_classes))
    wanted = torch.arange(n_classes).repeat_interleave(args.n)
    floor = min(len(train_x), len(wanted))
    train_pred, train_feats = classify(classifier, train_x[:floor])
    rows.append(score("real train", None, train_pred, train_y[:floor], train_feats, val_feats, n_classes))
    print(f"classifier: {train_seconds:.0f} s ({len(train_x)} train images, {args.epochs} epochs); sampling "
          f"{len(wanted)} images per scale, {settings.steps} steps, temperature {settings.temperature:g}, "
          f"{settings.schedule} schedule", flush=True)
    for scale in scales:
        start = time.perf_counter()
        tokens = sample_tokens(prior, len(wanted), with_guidance(settings, scale), wanted)
        images = decode(vq.model, tokens, 64, torch.device("cpu"))
        seconds = time.perf_counter() - start
        preds, feats = classify(classifier, images)
        rows.append(score("samples", scale, preds, wanted, feats, val_feats, n_classes, seconds))
        print(f"guidance {scale:g}: {100 * rows[-1]['accuracy']:.1f}% in the requested class ({seconds:.0f} s)",
              flush=True)
    print()
    print(table(rows, classes))
    if args.out is not None:
        result = {"run": str(args.run), "classes": classes, "settings": dataclasses.asdict(settings),
                  "classifier": {"epochs": args.epochs, "width": args.width, "train_images": len(train_x),
                                 "val_images": len(val_x), "seed": args.seed},
                  "rows": rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def recipe_sample_settings(run: Path) -> dict:
    """The sample stage's settings the run's pipeline.json records (empty when there is none)."""
    record = run / "pipeline.json"
    if not record.exists():
        return {}
    stage = json.loads(record.read_text()).get("stages", {}).get("sample", {})
    return dict(stage.get("settings", {}))


if __name__ == "__main__":
    main()
