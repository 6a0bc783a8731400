"""The device a stage runs on, decided once per stage (its precision: vqtool.precision).

Under torchrun (or `--nproc-per-node`) every process owns the GPU of its LOCAL_RANK: `cuda` and `auto`
mean that GPU, and an explicit `cuda:N` that names another one is refused, since N processes told
`cuda:0` would all train on GPU 0.
"""

from __future__ import annotations

import os

import torch

from vqtool.errors import VqtoolError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise VqtoolError(f"--device must be one of auto, cpu, cuda (got {name!r})")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not name.startswith("cuda"):
        return torch.device(name)
    if not torch.cuda.is_available():
        raise VqtoolError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VqtoolError(f"--device {name}: expected cuda or cuda:N") from None
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return device
    own = int(local)
    if device.index is not None and device.index != own:
        raise VqtoolError(f"--device {name}: this process is local rank {own}, which trains on cuda:{own}; pass "
                          "--device cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", own)
