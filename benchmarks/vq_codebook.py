"""Codebook collapse: val codebook usage and perplexity with and without the quantizer's remedies.

Trains the same small VQ several times on one shards folder, changing only the quantizer remedies
(cosine lookup, k-means init, dead-code restarts), and prints val usage (fraction of codes used),
perplexity and PSNR of each run's EMA weights. The discriminator stays off so the quantizer is the only
difference. Example (CIFAR-10 prepared with `vqtool prepare ... --size 32 --run /tmp/runs/cifar10`):

    OMP_NUM_THREADS=1 python benchmarks/vq_codebook.py --shards /tmp/runs/cifar10/shards --steps 400
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from vqtool.artifacts import read_metadata
from vqtool.vq.model import VQConfig
from vqtool.vq.train import TrainVQConfig, train_vq

VARIANTS = {  # key: (description, quantizer settings)
    "plain": ("plain (euclidean, random init, no restarts)",
              dict(cosine=False, kmeans_init=False, restart_threshold=0.0)),
    "plain-256": ("plain, high-dim codes (code_dim 256)",
                  dict(cosine=False, kmeans_init=False, restart_threshold=0.0, code_dim=256)),
    "cosine": ("cosine lookup only", dict(cosine=True, kmeans_init=False, restart_threshold=0.0)),
    "kmeans-restart": ("k-means init + restarts (euclidean)",
                       dict(cosine=False, kmeans_init=True, restart_threshold=0.1)),
    "cosine-kmeans": ("cosine + k-means init", dict(cosine=True, kmeans_init=True, restart_threshold=0.0)),
    "restart": ("restarts only (euclidean)", dict(cosine=False, kmeans_init=False, restart_threshold=0.1)),
    "cosine-restart": ("cosine + restarts (default)", dict(cosine=True, kmeans_init=False, restart_threshold=0.1)),
    "all": ("cosine + k-means init + restarts", dict(cosine=True, kmeans_init=True, restart_threshold=0.1)),
}
DEFAULT = ["plain", "plain-256", "cosine", "kmeans-restart", "cosine-restart", "all"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ch", type=int, default=16)
    ap.add_argument("--codebook-size", type=int, default=512)
    ap.add_argument("--code-dim", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=None, help="Where the runs go (default: a temporary folder).")
    ap.add_argument("--json", type=Path, default=None, help="Also write the table as JSON here.")
    args = ap.parse_args()

    root = args.out or Path(tempfile.mkdtemp(prefix="vq-codebook-"))
    rows = []
    for key in args.variants:
        name, remedies = VARIANTS[key]
        base = dict(ch=args.ch, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=32,
                    codebook_size=args.codebook_size, code_dim=args.code_dim)
        vq = VQConfig(**{**base, **remedies})
        cfg = TrainVQConfig(batch_size=args.batch_size, lr=3e-4, perceptual="none", disc_start=10**9,
                            max_steps=args.steps, log_every=50, eval_every=10**9, checkpoint_every=10**9,
                            eval_images=1000, ema_decay=0.99)
        t = time.perf_counter()
        r = train_vq(root / key, vq, cfg, seed=args.seed, device="cpu", shards=args.shards, overwrite=True)
        extra = read_metadata(r.output).extra
        rows.append({"variant": name, "usage": extra["codebook"]["usage"],
                     "perplexity": extra["codebook"]["perplexity"], "psnr": extra["val"]["psnr"],
                     "seconds": time.perf_counter() - t})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\n{args.steps} steps, batch {args.batch_size}, ch {args.ch}, {args.codebook_size} codes, "
          f"val images: {int(extra['codebook']['images'])}")
    print("| variant | val usage | val perplexity | val PSNR (dB) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {100 * r['usage']:.1f}% | {r['perplexity']:.1f} | {r['psnr']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
