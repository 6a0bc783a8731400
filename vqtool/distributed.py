"""Several processes, GPUs or nodes through torchrun: process group, DDP wrapping and the collectives
the trainers need.

`torchrun --nproc_per_node=N -m vqtool train-vq ...` starts N copies of the command with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment. `process_info` reads them (a
plain `python -m vqtool` is rank 0 of 1), `distributed_session` joins and leaves the process group
(nccl on CUDA, gloo on CPU), and every helper below is a no-op in a single process, so the trainers
call them unconditionally.

Collectives must be called by every rank in the same order. The helpers move their small payloads to
the backend's device (CUDA for nccl) and back, so callers pass whatever tensors they have.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vqtool import statepack
from vqtool.errors import VqtoolError


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def process_info() -> ProcessInfo:
    """Read torchrun's environment variables; a plain `python -m vqtool` is rank 0 of 1."""
    return ProcessInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def rank_seed(seed: int, stream: str, rank: int) -> int:
    """A seed for one rank's own random stream (e.g. DiffAugment, dropout), independent across ranks."""
    digest = hashlib.sha256(f"{seed}/{stream}/rank{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def layout_change_note(batch_size: int, before: dict[str, int], world_size: int, grad_accum: int) -> str | None:
    """One line for a resume whose global batch (batch × grad-accum × processes) differs from the
    checkpoint's `before` {"world_size", "grad_accum"}; None when it is the same."""
    was = batch_size * int(before["world_size"]) * int(before["grad_accum"])
    now = batch_size * world_size * grad_accum
    if was == now:
        return None
    return (f"the global batch changes from {was} ({batch_size} × {before['grad_accum']} accumulated × "
            f"{before['world_size']} processes) to {now} ({batch_size} × {grad_accum} × {world_size}); to continue "
            "the run unchanged, choose --grad-accum so that batch × grad-accum × processes stays the same")


# --------------------------------------------------------------------------------------------------
# The process group


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def distributed_session(device: torch.device, proc: ProcessInfo | None = None,
                        timeout_minutes: float = 30.0) -> Iterator[ProcessInfo]:
    """Join torchrun's process group for the duration of a stage, if this is a multi-process run.

    nccl on CUDA, gloo on CPU. A group that already exists (a caller set it up) is used and left alone;
    one created here is destroyed on the way out, also after an error.
    """
    proc = proc or process_info()
    if proc.distributed and not dist.is_available():
        raise VqtoolError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    if not proc.distributed or dist.is_initialized():
        yield proc
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise VqtoolError(f"WORLD_SIZE={proc.world_size} but {', '.join(missing)} is not set; "
                          "start multi-process runs with torchrun (see docs/distributed.md)")
    if device.type == "cuda":
        if device.index is None or device.index >= torch.cuda.device_count():
            raise VqtoolError(f"rank {proc.rank} (local rank {proc.local_rank}) has no GPU of its own: this node "
                              f"has {torch.cuda.device_count()}; use --nproc_per_node ≤ {torch.cuda.device_count()}")
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=proc.rank, world_size=proc.world_size,
                            timeout=timedelta(minutes=timeout_minutes))
    try:
        yield proc
    finally:
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    # nccl moves CUDA tensors only; gloo is happiest with CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# DDP


def wrap_ddp(module: nn.Module, device: torch.device, sync_buffers: bool = True) -> nn.Module:
    """`module` in DistributedDataParallel when several processes train it, else `module` itself.

    DDP averages gradients across ranks during backward (bucketed, overlapped with the computation)
    and broadcasts rank 0's parameters and buffers once at construction, so every rank starts
    identical. `sync_buffers=False`: no broadcast of rank 0's buffers before every forward (for
    modules whose buffers the caller keeps in step itself).
    """
    if not active():
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.14 renamed the per-forward buffer broadcast; older versions only know broadcast_buffers.
    name = "forward_sync_buffers"
    if name not in inspect.signature(ddp).parameters:
        name = "broadcast_buffers"
    return ddp(module, device_ids=device_ids, **{name: sync_buffers})


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def no_sync(module: nn.Module, skip: bool = True) -> contextlib.AbstractContextManager:
    """Within this context a DDP module's backward accumulates locally without averaging gradients
    (the micro-steps of gradient accumulation before the last one)."""
    if skip and isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all ranks together).

    torch's SyncBatchNorm does this on GPUs only; this one runs anywhere (used on CPU, with gloo): the
    per-channel sums go through an all-reduce whose backward all-reduces their gradients. Two passes,
    mean then variance, like F.batch_norm, for the same precision. Same parameters and buffers as
    BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = (0, 2, 3)
        n = float(all_reduce_sum(torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64)))
        mean = _SumOverRanks.apply(x.sum(dims)) / n
        centred = x - mean[None, :, None, None]
        var = _SumOverRanks.apply(centred.pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


class _SumOverRanks(torch.autograd.Function):
    """y = Σ_ranks x. Every rank's loss depends on y, so the gradient reaching x is Σ_ranks ∂L_r/∂y: the
    backward is the same all-reduce."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.detach().clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.detach().clone()
        dist.all_reduce(grad)
        return grad


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm2d of `module` normalise with global-batch statistics when several ranks
    train it (SyncBatchNorm on CUDA, GlobalBatchNorm2d elsewhere); unchanged in a single process.

    Without this each rank normalises by its own slice of the batch, and N ranks × B images would train
    a different model from one process with N·B images."""
    if not active():
        return module
    if any(p.is_cuda for p in module.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats).to(child.weight.device)
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            global_batchnorm(child)
    return module


# --------------------------------------------------------------------------------------------------
# Collectives on tensors and scalars


def _all_reduce_via(tensor: torch.Tensor, device: torch.device, op=None) -> torch.Tensor:
    moved = tensor.detach().to(device).clone()
    dist.all_reduce(moved, op=op or dist.ReduceOp.SUM)
    return moved.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks (a new tensor; the input itself in a single process)."""
    if not active():
        return tensor
    return _all_reduce_via(tensor, _comm_device())


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise mean over ranks (the input itself in a single process)."""
    if not active():
        return tensor
    return _all_reduce_via(tensor, _comm_device()) / dist.get_world_size()


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each scalar over ranks (every rank must pass the same keys in the same order). A NaN on
    any rank makes the mean NaN everywhere, so a non-finite loss stops every rank at the same step."""
    if not active() or not values:
        return values
    keys = list(values)
    t = all_reduce_mean(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def any_across_ranks(flags: Iterable[bool]) -> list[bool]:
    """For each flag: is it set on at least one rank? (Stop decisions every rank must share.)"""
    flags = [bool(f) for f in flags]
    if not active():
        return flags
    t = _all_reduce_via(torch.tensor(flags, dtype=torch.int32), _comm_device(), op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` in place with rank `src`'s values."""
    if not active():
        return tensor
    device = _comm_device()
    if tensor.device == device:
        dist.broadcast(tensor, src)
        return tensor
    moved = tensor.detach().to(device).contiguous()
    dist.broadcast(moved, src)
    tensor.copy_(moved)
    return tensor


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s JSON-serialisable value on every rank."""
    if not active():
        return value
    data = json.dumps(value).encode() if dist.get_rank() == src else b""
    return json.loads(_broadcast_bytes(data, src).decode())


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (dim 0) in rank order; ranks may hold different numbers of rows."""
    if not active():
        return tensor
    device = _comm_device()
    world = dist.get_world_size()
    rows = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(counts, rows)
    counts = [int(c) for c in counts]
    top = max(counts)
    padded = torch.zeros((top, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.detach().to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(tensor.device)


def _all_gather_bytes(data: bytes) -> list[bytes]:
    device = _comm_device()
    world = dist.get_world_size()
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [bytes(p[:s].cpu().numpy()) for p, s in zip(parts, sizes, strict=True)]


def _broadcast_bytes(data: bytes, src: int) -> bytes:
    device = _comm_device()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    buffer = torch.zeros(int(size), dtype=torch.uint8, device=device)
    if dist.get_rank() == src and data:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device))
    dist.broadcast(buffer, src)
    return bytes(buffer.cpu().numpy())


def gather_states(state: Any) -> list[Any]:
    """Every rank's nested state (tensors, dicts, lists, scalars), in rank order, on every rank.

    States travel as safetensors bytes plus a JSON skeleton (vqtool.statepack), never as pickles.
    """
    if not active():
        return [state]
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    tensors, skeleton = statepack.pack(state)
    blob = st_save(tensors, metadata={"skeleton": skeleton})
    out = []
    for data in _all_gather_bytes(blob):
        loaded = st_load(data)
        out.append(statepack.unpack(loaded, _safetensors_metadata(data)["skeleton"]))
    return out


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # The header: 8-byte little-endian length, then JSON with "__metadata__".
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n].decode())
    return header.get("__metadata__", {})
