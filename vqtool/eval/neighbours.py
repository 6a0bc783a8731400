"""Nearest training images by LPIPS, found in two steps so it scales to tens of thousands on a CPU.

1. Pre-selection: every image is average-pooled to a few pixels a side; while the training set streams
   past once, each query keeps its `candidates` nearest training images by Euclidean distance of those
   thumbnails (a running top-C). Only the candidates' full-size pixels are held in memory.
2. Re-ranking: LPIPS between each query and its candidates; the k smallest are the neighbours.

The memorisation check runs the same search for held-out (val) images. Val images are real but unseen,
so their nearest-training distances show how close a novel image usually comes to the training set.
A sample closer than the p-th percentile of those distances is "flagged"; a model that does not copy
should have about p% flagged. Many more (a one-sided binomial test) means memorisation; a sample closer
than every val image is reported as a possible copy.

Without LPIPS weights, `pixel_neighbours` runs the same search by pixel distance alone: the grid still
shows copies, but gives no verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vqtool.eval.perceptual import lpips_distance

if TYPE_CHECKING:
    from vqtool.runs import RunPaths


@dataclass
class Neighbours:
    distances: torch.Tensor  # (Q, k) LPIPS, ascending
    indices: torch.Tensor  # (Q, k) positions in the training stream
    images: torch.Tensor  # (Q, k, 3, H, W) in [-1, 1]
    train_seen: int  # training images searched


def thumbnails(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) → (N, 3·size·size) average-pooled pixels, the cheap pre-selection features."""
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def _images_of(pool: dict[int, torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """(Q, k) training indices → their images (Q, k, 3, H, W) in [-1, 1], from the pre-selection's pool."""
    return _from_uint8(torch.stack([torch.stack([pool[int(i)] for i in row]) for row in indices]))


@torch.no_grad()
def preselect(
    queries: torch.Tensor,
    train_batches: Iterable[torch.Tensor],
    candidates: int,
    thumb_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor], int]:
    """Stream the training set once; return (candidate indices (Q, C), {index: uint8 image}, images seen)."""
    q = thumbnails(queries, thumb_size)
    best_d = torch.empty(q.shape[0], 0)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.long)
    pool: dict[int, torch.Tensor] = {}
    seen = 0
    for images in train_batches:
        if images.shape[-2:] != queries.shape[-2:]:
            raise ValueError(f"training images are {tuple(images.shape[-2:])}, queries {tuple(queries.shape[-2:])}")
        d = torch.cdist(q, thumbnails(images, thumb_size))
        idx = torch.arange(seen, seen + images.shape[0]).expand(q.shape[0], -1)
        all_d, all_i = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
        keep = min(candidates, all_d.shape[1])
        best_d, order = all_d.topk(keep, dim=1, largest=False)
        best_i = all_i.gather(1, order)
        # Hold only the pixels of images some query still wants.
        wanted = set(best_i.unique().tolist())
        pool = {i: img for i, img in pool.items() if i in wanted}
        for i in wanted:
            if i >= seen and i not in pool:
                pool[i] = _to_uint8(images[i - seen])
        seen += images.shape[0]
        if on_batch is not None:
            on_batch(images.shape[0])
    return best_i, pool, seen


@torch.no_grad()
def rerank(
    queries: torch.Tensor,
    candidate_indices: torch.Tensor,
    pool: dict[int, torch.Tensor],
    lpips_model: torch.nn.Module,
    k: int,
    batch_size: int = 256,
    on_query: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LPIPS between each query and its candidates → the k nearest (distances (Q, k), indices (Q, k))."""
    q_count, c = candidate_indices.shape
    k = min(k, c)
    out_d, out_i = [], []
    per_chunk = max(1, batch_size // c)  # queries per LPIPS call
    for start in range(0, q_count, per_chunk):
        qs = queries[start:start + per_chunk]
        cand = candidate_indices[start:start + per_chunk]
        a = qs.unsqueeze(1).expand(-1, c, -1, -1, -1).reshape(-1, *qs.shape[1:])
        b = _from_uint8(torch.stack([pool[int(i)] for i in cand.flatten()]))
        d = lpips_distance(lpips_model, a, b, batch_size=batch_size).view(-1, c)
        top_d, order = d.topk(k, dim=1, largest=False)
        out_d.append(top_d)
        out_i.append(cand.gather(1, order))
        if on_query is not None:
            on_query(qs.shape[0])
    return torch.cat(out_d), torch.cat(out_i)


def nearest_neighbours(
    queries: torch.Tensor,
    train_batches: Iterable[torch.Tensor],
    lpips_model: torch.nn.Module,
    k: int = 8,
    candidates: int = 64,
    thumb_size: int = 8,
    batch_size: int = 256,
    on_train_batch: Callable[[int], None] | None = None,
    on_query: Callable[[int], None] | None = None,
) -> Neighbours:
    """The k nearest training images by LPIPS of every query image (Q, 3, H, W) in [-1, 1]."""
    cand, pool, seen = preselect(queries, train_batches, max(candidates, k), thumb_size, on_train_batch)
    if seen == 0:
        raise ValueError("the training set is empty")
    dist, idx = rerank(queries, cand, pool, lpips_model, k, batch_size, on_query)
    images = _images_of(pool, idx)
    return Neighbours(distances=dist, indices=idx, images=images, train_seen=seen)


@dataclass
class Verdict:
    threshold: float  # the percentile of val→train nearest distances
    percentile: float
    flagged: list[int]  # samples closer than the threshold
    fraction: float
    expected_fraction: float
    p_value: float  # one-sided binomial: P(at least this many flagged | no memorisation)
    copies: list[int]  # samples closer than every val image
    val_min: float
    verdict: str  # "memorisation", "possible copies" or "no sign of memorisation"
    message: str


def memorisation_verdict(sample_nearest: torch.Tensor, val_nearest: torch.Tensor, percentile: float = 5.0,
                         alpha: float = 0.01) -> Verdict:
    """Compare sample→train nearest distances (S,) with val→train nearest distances (V,)."""
    from scipy.stats import binomtest

    s = sample_nearest.double()
    v = val_nearest.double()
    threshold = float(torch.quantile(v, percentile / 100.0))
    flagged = [int(i) for i in torch.nonzero(s < threshold).flatten()]
    val_min = float(v.min())
    copies = [int(i) for i in torch.nonzero(s < val_min).flatten()]
    expected = percentile / 100.0
    p_value = float(binomtest(len(flagged), len(s), expected, alternative="greater").pvalue)
    frac = len(flagged) / len(s)
    summary = (f"{len(flagged)} of {len(s)} samples ({frac:.0%}) are closer to a training image than the "
               f"{percentile:g}th percentile of val images ({threshold:.4g}); expected {expected:.0%}, "
               f"binomial p = {p_value:.3g}")
    copies_text = (f"sample(s) {', '.join(map(str, copies))} are closer to a training image than every val image "
                   f"({val_min:.4g}); look at them in the grid")
    if p_value < alpha:
        verdict = "memorisation"
        message = f"memorisation: {summary}" + (f"; {copies_text}" if copies else "")
    elif copies:
        verdict = "possible copies"
        message = f"possible copies: {copies_text}. {summary}"
    else:
        verdict = "no sign of memorisation"
        message = f"no sign of memorisation: {summary}"
    return Verdict(threshold=threshold, percentile=percentile, flagged=flagged, fraction=frac,
                   expected_fraction=expected, p_value=p_value, copies=copies, val_min=val_min,
                   verdict=verdict, message=message)


def pixel_neighbours(paths: RunPaths, settings, device: str, note: str) -> dict[str, Any]:
    """Nearest training images by RMS pixel distance instead of LPIPS: eval/<name>.png, .json, .safetensors.

    The same search as `neighbour_check` (full-size thumbnails make its pre-selection the exact pixel
    ranking), so the grid still shows whether samples copy training images. There is no memorisation
    verdict: pixel distance favours blurry images, so unsharp samples would look "closer" to the
    training set than real held-out images do.

    `settings` are the neighbours stage's (vqtool.eval.stage.NeighbourSettings); `note` says why LPIPS is
    not used.
    """
    import numpy as np

    from vqtool.artifacts import atomic_write_bytes
    from vqtool.config import to_dict
    from vqtool.console import progress
    from vqtool.device import resolve_device
    from vqtool.eval.figures import neighbour_grid
    from vqtool.eval.report import write_report
    from vqtool.eval.sources import resolve_path_source, samples_source, shards_source
    from vqtool.grids import png_bytes
    from vqtool.vq.store import load_vq

    s = settings
    dev = resolve_device(device)
    vq = load_vq(Path(s.vq) if s.vq else paths.vq, dev)
    shards = Path(s.shards) if s.shards else paths.shards
    train = resolve_path_source(s.train, "--train", "train") if s.train else shards_source(shards, "train")
    if s.fake:
        fake = resolve_path_source(s.fake, "--fake", "train", train.image_size, lambda: vq, dev)
    else:
        fake = samples_source(paths.samples_artifact, vq, dev, option="neighbours")
    fake.check(s.n)
    train.check(1)
    samples = torch.cat(list(fake.batches(s.n, s.batch_size)))
    with progress() as bar:
        job = bar.add_task("pixel neighbours", total=train.available, status="")
        cand, pool, seen = preselect(samples, train.batches(train.available, s.batch_size), s.k,
                                     thumb_size=train.image_size, on_batch=lambda k: bar.advance(job, k))
    neighbours = _images_of(pool, cand)
    # RMS over pixel values in [0, 1]: 0 is identical, 1 is black against white everywhere.
    dist = ((neighbours - samples.unsqueeze(1)) / 2).pow(2).flatten(2).mean(2).sqrt()
    paths.eval.mkdir(parents=True, exist_ok=True)
    grid_path = paths.eval / f"{s.name}.png"
    atomic_write_bytes(grid_path, png_bytes(np.asarray(neighbour_grid(samples, neighbours, dist, set(), cand))))
    metrics = {"sample_nn_median": float(dist[:, 0].median()), "sample_nn_min": float(dist[:, 0].min())}
    body = {"distance": "pixel-rms", "note": note, "verdict": "unavailable (pixel distance)",
            "message": f"nearest training images of {s.n} samples by pixel distance; no memorisation verdict "
                       "without LPIPS (pixel distance favours blurry images)",
            "train_images": seen, "fake": {**fake.describe, "n": s.n}, "train": train.describe,
            "grid": str(grid_path)}
    parents = {"vq": vq.sha256, **{f"fake_{k}": v for k, v in fake.parents.items()},
               **{f"train_{k}": v for k, v in train.parents.items()}}
    return write_report(paths.eval / f"{s.name}.json", paths.eval / f"{s.name}.safetensors", metrics, body,
                        {**to_dict(s), "distance": "pixel-rms", "device": dev.type}, parents,
                        {"distances": dist, "indices": cand})
