"""Numerical precision, one policy for every stage that runs a model.

`--precision auto|fp32|bf16|fp16`, resolved once per stage against its device:
  auto  fp32 on CPU; on CUDA bf16 autocast where the GPU supports it, else fp16 autocast;
  fp32  no autocast;
  bf16  autocast to bfloat16, no loss scaling (bf16 has fp32's exponent range);
  fp16  autocast to float16 with a GradScaler in training (fp16 gradients underflow without one).
Mixed precision is CUDA only: the CPUs this was measured on have no native bf16 and run it hundreds of
times slower, so bf16 or fp16 with a CPU device is refused rather than quietly made slow.

Autocast computes in low precision, but parameters, optimizer states, EMA and every artifact stay
fp32. Training runs forward and loss under `autocast` and the backward outside it. Inference runs the
model under the stage's `autocast` and upcasts logits before they are sampled; the parts that need
full precision (the codebook lookup, feature extractors of metrics) opt out with `full_precision`.
"""

from __future__ import annotations

import contextlib

import torch

from vqtool.errors import VqtoolError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision a stage on `device` runs in: fp32, bf16 or fp16 (`auto` resolved)."""
    if name not in PRECISIONS:
        raise VqtoolError(f"--precision must be one of {', '.join(PRECISIONS)} (got {name!r})")
    if device.type != "cuda":
        if name in ("bf16", "fp16"):
            raise VqtoolError(f"--precision {name} is for CUDA devices; on {device.type} vqtool runs fp32 "
                              "(low-precision matmuls are hundreds of times slower on CPU): use --precision auto")
        return "fp32"
    if name == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        raise VqtoolError("--precision bf16: this GPU has no bf16 support; use --precision fp16 (or auto)")
    return name


def dtype(precision: str) -> torch.dtype:
    """The dtype that matmuls and convolutions compute in under `precision`."""
    return _DTYPES[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The region of a forward pass (and its loss) in `precision`; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise VqtoolError(f"{precision} autocast was asked for on {device.type}; mixed precision is CUDA only")
    return torch.autocast(device_type="cuda", dtype=dtype(precision))


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """A region inside an autocast one that computes in fp32 (distances, metric features)."""
    return torch.autocast(device_type=device.type, enabled=False)


def active_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype autocast gives matmul outputs on `device` right now, or `default` outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


def grad_scaler(precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 training; a disabled scaler (every call a pass-through) otherwise."""
    return torch.amp.GradScaler("cuda", enabled=precision == "fp16")


def switch_note(saved: str | None, now: str) -> str | None:
    """One line for a resume in another precision than the checkpoint's (None when it is the same or
    unknown). The weights are fp32 either way; only the loss scale starts afresh when fp16 begins."""
    if saved is None or saved == now:
        return None
    scale = "; the fp16 loss scale starts afresh" if now == "fp16" else ""
    return f"precision switches from {saved} (the checkpoint's) to {now}{scale}"
