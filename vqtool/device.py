"""Device and precision, decided once per stage.

fp32 everywhere on CPU: this class of CPU has no native bf16 and runs it hundreds of times slower.
Mixed precision is only offered on CUDA.
"""

from __future__ import annotations

import contextlib
import os

import torch

from vqtool.errors import VqtoolError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise VqtoolError(f"--device must be one of auto, cpu, cuda (got {name!r})")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VqtoolError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        if name == "cuda" and "LOCAL_RANK" in os.environ:
            # Under torchrun each process owns the GPU of its local rank.
            name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return torch.device(name)


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)
