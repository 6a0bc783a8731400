"""Inference-time Linear layers through oneDNN on CPU.

torch runs an fp32 `F.linear` on CPU through its BLAS (MKL or OpenBLAS). The same product through
oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, the kernel inductor's CPU code uses) is the
same sum of products in another order (outputs agree within float rounding), and at the shapes of a
sampling step it ran as fast or faster (docs/sample.md, Speed).

`onednn_linears()` is a context in which every `F.linear` (and so every nn.Linear) that needs no
gradient, on fp32 CPU tensors, runs through oneDNN; anything else (autograd, other dtypes or devices,
quantized layers, which do not call F.linear) runs as before. `sample.in_batches`, the loop of every
sampler, opens it, so the model code stays plain torch. `VQTOOL_ONEDNN=0` in the environment keeps
it closed: how much it gains depends on the CPU (the matmuls 2.2× torch's BLAS on one AVX-512 EPYC,
the whole sampler 1.00–1.17× on another; docs/performance.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SWITCH = "VQTOOL_ONEDNN"  # "0": torch's own F.linear everywhere


def available() -> bool:
    """Whether this torch build has oneDNN and its pointwise linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    # No autograd formula for the oneDNN op: only where nothing needs a gradient.
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through oneDNN (x of any rank, fp32, on CPU)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")


class _OneDNNLinears(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _fits(x, weight, bias):
                return linear(x, weight, bias)
        return func(*args, **kwargs)


@contextlib.contextmanager
def onednn_linears(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """Within it, inference `F.linear` calls on fp32 CPU tensors run through oneDNN, when `enabled`,
    `device` (the model's) is a CPU and this torch has the op. On a GPU the mode would only add a Python
    dispatch to every op, so it is not opened."""
    if not enabled or torch.device(device).type != "cpu" or not available() or os.environ.get(SWITCH) == "0":
        yield
        return
    with _OneDNNLinears():
        yield
