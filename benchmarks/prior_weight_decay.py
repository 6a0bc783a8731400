"""Weight decay on the prior's position tables: vqtool's rule (every 2-D tensor decays) against keeping
the row/column (or flat) position tables out of the decay.

Trains the quickstart prior on LATENTS for --steps steps under both rules and every seed, then prints
the validation bound and the tables' norms. The second rule is put in place only inside this script.

    python benchmarks/prior_weight_decay.py RUN/latents.safetensors --steps 600 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from vqtool.prior import train
from vqtool.prior.store import load_prior

POSITION_TABLES = {"row_emb", "col_emb", "pos"}
VQTOOL_RULE = train._adamw


def tables_kept_out(params, cfg, device):
    decay = [p for n, p in params if p.dim() >= 2 and n not in POSITION_TABLES]
    keep = [p for n, p in params if p.dim() < 2 or n in POSITION_TABLES]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("latents", type=Path)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    # recipes/quickstart.yaml's prior and training settings.
    cfg = dict(prior="absorbing", n_layer=4, n_head=4, n_embd=128, timesteps=64, batch_size=16, lr=2e-3,
               warmup_steps=100, ema_decay=0.99, max_steps=args.steps, log_every=50, eval_every=args.steps,
               checkpoint_every=args.steps, val_batches=8, val_nll_samples=8, threads=1, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for rule, adamw in [("decayed", VQTOOL_RULE), ("kept-out", tables_kept_out)]:
                train._adamw = adamw
                out = Path(tmp) / f"{rule}-{seed}"
                r = train.train_prior(args.latents, {**cfg, "seed": seed}, out / "prior.safetensors",
                                      out / "checkpoint.safetensors", out / "log.jsonl")
                model = load_prior(out / "prior.safetensors", "cpu").model
                norms = {n: round(float(getattr(model, n).norm()), 4) for n in POSITION_TABLES if hasattr(model, n)}
                print(json.dumps({"tables": rule, "seed": seed, "steps": r.steps, "val_bpt": r.best_val_bpt,
                                  "norms": norms}), flush=True)
    train._adamw = VQTOOL_RULE


if __name__ == "__main__":
    main()
