"""How well the VQ reconstructs held-out images: PSNR, L1, LPIPS, reconstruction FID, codebook usage.

Everything comes from one pass over the images: encode to tokens, decode, compare. Features of the
originals come from the feature cache when they are there (they are the same as the real-set features
of an `eval --real val`), so only the reconstructions go through the extractor then.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from vqtool.eval.features import Extractor, extract_features
from vqtool.eval.perceptual import lpips_distance


@dataclass
class ReconResult:
    n: int
    psnr: float  # dB, images scaled to [0, 1]
    l1: float  # mean absolute error, images scaled to [0, 1]
    lpips: float | None
    codebook_usage: float  # fraction of codes used at least once
    codebook_perplexity: float  # exp(entropy) of code frequencies
    codes_used: int
    recon_features: torch.Tensor | None  # (n, D) when an extractor was given
    original_features: torch.Tensor | None  # (n, D) when they had to be computed here
    per_image_psnr: torch.Tensor  # (n,)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], measured on the [0, 1] scale; identical images give inf."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def codebook_stats(counts: torch.Tensor) -> tuple[float, float, int]:
    """(usage fraction, perplexity, codes used) from per-code counts (K,)."""
    total = counts.sum().item()
    used = int((counts > 0).sum())
    p = counts.double() / max(total, 1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return used / counts.numel(), math.exp(entropy), used


@torch.no_grad()
def reconstruction_metrics(
    vq,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    extractor: Extractor | None = None,
    need_original_features: bool = True,
    lpips_model: torch.nn.Module | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ReconResult:
    """Reconstruct every image of `batches` with `vq` (a LoadedVQ) and measure the differences."""
    model = vq.model
    counts = torch.zeros(model.codebook_size, dtype=torch.long)
    psnrs, l1s, lp = [], [], []
    recon_feats, orig_feats = [], []
    for images in batches:
        x = images.to(device).float()
        tokens = model.encode_to_tokens(x)
        recon = model.decode_tokens(tokens).float()
        counts += torch.bincount(tokens.flatten().cpu(), minlength=model.codebook_size)
        psnrs.append(psnr(recon, x).cpu())
        l1s.append(((recon - x).abs() / 2).flatten(1).mean(1).cpu())
        if lpips_model is not None:
            lp.append(lpips_distance(lpips_model, recon, x))
        if extractor is not None:
            recon_feats.append(extract_features(extractor, [recon]))
            if need_original_features:
                orig_feats.append(extract_features(extractor, [x]))
        if on_batch is not None:
            on_batch(images.shape[0])
    per_psnr = torch.cat(psnrs)
    usage, perplexity, used = codebook_stats(counts)
    return ReconResult(
        n=int(per_psnr.numel()),
        # The mean of per-image PSNR is the usual report; a perfect reconstruction (inf) is capped at 100 dB.
        psnr=float(per_psnr.clamp(max=100).mean()),
        l1=float(torch.cat(l1s).mean()),
        lpips=float(torch.cat(lp).mean()) if lp else None,
        codebook_usage=usage,
        codebook_perplexity=perplexity,
        codes_used=used,
        recon_features=torch.cat(recon_feats) if recon_feats else None,
        original_features=torch.cat(orig_feats) if orig_feats else None,
        per_image_psnr=per_psnr,
    )
