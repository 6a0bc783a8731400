"""Shards → batches of float images in [-1, 1] (and int64 labels), deterministic and exactly resumable.

How a stream is planned, per epoch, without decoding anything:
  1. training (infinite) mode shuffles the shard order with a generator seeded by (seed, epoch);
  2. `split_shards` gives this rank × DataLoader worker (a "slot") a disjoint share: whole shards when
     there are at least as many shards as slots, otherwise every slots-th sample by global index;
  3. a shuffle buffer seeded by (seed, epoch, slot) reorders the share's sample references, and a
     flip bit is drawn per sample from the same generator.
Only then are the chosen PNGs read (by byte offset) and decoded. Resuming replays the plan and skips
the consumed samples without reading them, so the next batch after `load_state_dict` is exactly the
batch the original loader would have produced next.

Finite mode (validation, encode) reads the split once in manifest order, no shuffle, no flips, and
keeps the last partial batch.

For a CUDA consumer (`pin_memory=True`) every batch is handed out in page-locked memory, so that the
trainer's `.to(device, non_blocking=True)` is an asynchronous copy that overlaps with the GPU's work
instead of a synchronous one from pageable memory. benchmarks/loader_throughput.py measures how many
decode workers a GPU needs (docs/performance.md).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vqtool.data.manifest import read_manifest, shard_entries
from vqtool.data.shards import ShardIndex, index_shard
from vqtool.errors import VqtoolError

Batch = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass(frozen=True)
class _EpochPlan:
    parts: list  # ShardPart of this slot, in reading order
    ends: list[int]  # cumulative sample counts of the parts
    order: list[int]  # positions in the slot's share, in emission order
    flips: list[bool]  # per emitted sample


@dataclass(frozen=True)
class ShardPart:
    """Samples `start, start + stride, ...` (indices within the shard) of one shard file."""

    shard: str
    start: int
    stride: int

    def count(self, samples: int) -> int:
        return len(range(self.start, samples, self.stride))


def split_shards(
    shards: list[tuple[str, int]], rank: int, world_size: int, worker: int = 0, num_workers: int = 1
) -> list[ShardPart]:
    """This (rank, worker)'s disjoint share of `shards` [(name, samples), ...], in the given order.

    The shares of all world_size × num_workers slots are disjoint and together cover every sample once.
    With at least as many shards as slots, a slot takes whole shards (slot, slot + slots, ...);
    otherwise it takes every slots-th sample by global index, so nothing is dropped or duplicated.
    """
    num_workers = max(1, num_workers)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is outside {num_workers} workers")
    slots = world_size * num_workers
    slot = rank * num_workers + worker
    if len(shards) >= slots:
        return [ShardPart(name, 0, 1) for name, _ in shards[slot::slots]]
    parts = []
    first = 0  # global index of the shard's first sample
    for name, samples in shards:
        start = (slot - first) % slots
        if start < samples:
            parts.append(ShardPart(name, start, slots))
        first += samples
    return parts


def _generator(*parts: Any) -> torch.Generator:
    """An independent generator per purpose, seeded from a hash of (seed, epoch, slot, purpose)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def buffer_shuffle(items: list, buffer_size: int, generator: torch.Generator) -> list:
    """The order a streaming shuffle buffer of `buffer_size` emits `items` in (seeded, replayable)."""
    if buffer_size <= 1 or len(items) <= 1:
        return list(items)
    draws = torch.rand(len(items) + min(buffer_size, len(items)), generator=generator).tolist()
    out: list = []
    buf: list = []
    d = 0
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        j = int(draws[d] * len(buf))
        d += 1
        out.append(buf[j])
        buf[j] = item
    while buf:  # drain: emit the rest in random order
        j = int(draws[d] * len(buf))
        d += 1
        buf[j], buf[-1] = buf[-1], buf[j]
        out.append(buf.pop())
    return out


class ShardLoader:
    """Iterable of batches `(images float32 (B, 3, S, S) in [-1, 1], labels int64 (B,) or None)`.

    `infinite=True` (training): endless, reshuffled every epoch, batches run across epoch boundaries,
    `state_dict()` records the position and `load_state_dict()` restores it exactly.
    `infinite=False` (validation, encode): one pass in fixed order; every `iter()` starts at the top.
    `num_workers > 0` decodes in torch DataLoader worker processes; each worker reads its own share.
    """

    def __init__(
        self,
        shards_dir: str | Path,
        split: str = "train",
        batch_size: int = 32,
        shuffle_buffer: int = 1000,
        flip: bool = False,
        infinite: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        drop_last: bool | None = None,
        pin_memory: bool = False,
    ):
        self.shards_dir = Path(shards_dir)
        self.manifest = read_manifest(self.shards_dir)
        self.split = split
        self._entries = shard_entries(self.manifest, split)
        if batch_size < 1:
            raise VqtoolError(f"batch size {batch_size}: must be at least 1")
        if num_workers < 0:
            raise VqtoolError(f"num_workers {num_workers}: must be 0 or more")
        if world_size < 1 or not 0 <= rank < world_size:
            raise VqtoolError(f"rank {rank} is outside world size {world_size}")
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.flip = flip
        self.infinite = infinite
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory  # page-locked batches, for non-blocking copies to a GPU
        self.drop_last = infinite if drop_last is None else drop_last
        self._slots_per_rank = max(1, num_workers)
        slots = world_size * self._slots_per_rank
        if self.num_samples == 0:
            raise VqtoolError(
                f"{self.shards_dir}: the {split!r} split is empty"
                + ("; prepare with --val-fraction > 0" if split == "val" else "")
            )
        if self.num_samples < slots:
            raise VqtoolError(
                f"{self.shards_dir}: {self.num_samples} {split} samples cannot be shared by "
                f"{world_size} rank(s) × {self._slots_per_rank} worker(s); use fewer workers"
            )
        self._samples = {e["name"]: int(e["samples"]) for e in self._entries}
        self._index: dict[str, ShardIndex] = {}  # built lazily, shard by shard, as samples are read
        self._batches = 0  # batches handed out so far (infinite mode): the resumable position

    # ----------------------------------------------------------------------------------------------
    # Properties

    @property
    def num_samples(self) -> int:
        """Samples in the whole split (all ranks together)."""
        return int(self.manifest["counts"][self.split])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def labelled(self) -> bool:
        return bool(self.manifest.get("labelled", bool(self.manifest["classes"])))

    # ----------------------------------------------------------------------------------------------
    # Planning (no image decoding)

    def _parts(self, epoch: int, slot: int) -> list[ShardPart]:
        shards = [(e["name"], int(e["samples"])) for e in self._entries]
        if self.infinite:
            order = torch.randperm(len(shards), generator=_generator(self.seed, epoch, "shards")).tolist()
            shards = [shards[i] for i in order]
        rank, worker = divmod(slot, self._slots_per_rank)
        return split_shards(shards, rank, self.world_size, worker, self._slots_per_rank)

    def _share_size(self, epoch: int, slot: int) -> int:
        return sum(p.count(self._samples[p.shard]) for p in self._parts(epoch, slot))

    def _shard_index(self, shard: str) -> ShardIndex:
        if shard not in self._index:
            index = index_shard(self.shards_dir / shard)
            if len(index) != self._samples[shard]:
                raise VqtoolError(
                    f"{self.shards_dir / shard}: holds {len(index)} samples, the manifest says "
                    f"{self._samples[shard]}; rerun `vqtool prepare`"
                )
            if (index.labels is not None) != self.labelled:
                raise VqtoolError(
                    f"{self.shards_dir / shard}: labels do not match the manifest; rerun `vqtool prepare`"
                )
            self._index[shard] = index
        return self._index[shard]

    def _plan(self, epoch: int, slot: int) -> _EpochPlan:
        """This slot's samples for one epoch, as positions in its share in emission order, plus flips.

        Positions are resolved to shard byte ranges only when read, so planning and skipping never
        touch the shard files."""
        parts = self._parts(epoch, slot)
        ends = list(itertools.accumulate(p.count(self._samples[p.shard]) for p in parts))
        order = list(range(ends[-1] if ends else 0))
        flips = [False] * len(order)
        if self.infinite:
            g = _generator(self.seed, epoch, slot, "samples")
            order = buffer_shuffle(order, self.shuffle_buffer, g)
            if self.flip:
                flips = (torch.rand(len(order), generator=g) < 0.5).tolist()
        return _EpochPlan(parts, ends, order, flips)

    def _locate(self, slot: int, consumed: int) -> tuple[int, int]:
        """(epoch, samples into that epoch) after `consumed` samples of this slot's endless stream."""
        epoch = 0
        constant = self.world_size * self._slots_per_rank == 1  # one slot: every epoch is the whole split
        if constant:
            return divmod(consumed, self.num_samples)
        while True:
            size = self._share_size(epoch, slot)
            if consumed < size:
                return epoch, consumed
            consumed -= size
            epoch += 1

    # ----------------------------------------------------------------------------------------------
    # Reading

    def _locate_sample(self, plan: _EpochPlan, position: int) -> tuple[str, int]:
        """(shard file, sample number inside it) of a position in the slot's share."""
        i = bisect.bisect_right(plan.ends, position)
        before = plan.ends[i - 1] if i else 0
        part = plan.parts[i]
        return part.shard, part.start + (position - before) * part.stride

    def _decode(self, files: dict[str, Any], shard: str, number: int, flip: bool) -> tuple[np.ndarray, int]:
        """The image (H, W, 3) uint8 and label (-1 when unlabelled) of sample `number` of `shard`."""
        index = self._shard_index(shard)
        f = files.get(shard)
        if f is None:
            f = files[shard] = open(self.shards_dir / shard, "rb")
        f.seek(int(index.offsets[number]))
        data = f.read(int(index.sizes[number]))
        try:
            with Image.open(io.BytesIO(data)) as im:
                array = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise VqtoolError(f"{self.shards_dir / shard}: sample #{number} is not a readable PNG ({exc})") from None
        s = self.image_size
        if array.shape != (s, s, 3):
            raise VqtoolError(
                f"{self.shards_dir / shard}: sample #{number} is {array.shape[1]}x{array.shape[0]}, "
                f"the manifest says {s}x{s}; rerun `vqtool prepare`"
            )
        label = -1 if index.labels is None else int(index.labels[number])
        return (array[:, ::-1] if flip else array), label

    def _slot_batches(self, slot: int, skip_batches: int) -> Iterator[Batch]:
        """Batches of one slot's stream, starting after `skip_batches` of its own batches."""
        if self.infinite:
            epoch, offset = self._locate(slot, skip_batches * self.batch_size)
        else:
            epoch, offset = 0, 0
        files: dict[str, Any] = {}
        images: list[np.ndarray] = []
        labels: list[int] = []
        try:
            while True:
                plan = self._plan(epoch, slot)
                for i in range(offset, len(plan.order)):
                    shard, number = self._locate_sample(plan, plan.order[i])
                    image, label = self._decode(files, shard, number, plan.flips[i])
                    images.append(image)
                    labels.append(label)
                    if len(images) == self.batch_size:
                        yield self._collate(images, labels)
                        images, labels = [], []
                offset = 0
                epoch += 1
                if not self.infinite:
                    break
            if images and not self.drop_last:
                yield self._collate(images, labels)
        finally:
            for f in files.values():
                f.close()

    def _collate(self, images: list[np.ndarray], labels: list[int]) -> Batch:
        # Channels-first while still uint8 (a quarter of the bytes to move), then the same float32
        # arithmetic as grids.from_uint8 (x / 127.5 - 1), so loaded pixels equal it bit for bit.
        # NumPy, not torch: small torch ops pay a thread-pool handshake that is slow on busy CPUs.
        x = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)).astype(np.float32)
        x /= np.float32(127.5)
        x -= np.float32(1.0)
        y = torch.tensor(labels, dtype=torch.int64) if self.labelled else None
        return torch.from_numpy(x), y

    def __iter__(self) -> Iterator[Batch]:
        start = self._batches if self.infinite else 0
        if self.num_workers == 0:
            stream = self._slot_batches(self.rank, start)
        else:
            stream = iter(
                torch.utils.data.DataLoader(
                    _WorkerStream(self, start),
                    batch_size=None,
                    num_workers=self.num_workers,
                    collate_fn=_identity,
                    prefetch_factor=2,
                )
            )
        for batch in stream:
            if self.infinite:
                self._batches += 1
            yield _pinned(batch) if self.pin_memory else batch

    def __len__(self) -> int:
        """Batches per epoch for this rank: exact in finite mode, the average in infinite mode."""
        if self.infinite:
            return max(1, self.num_samples // (self.world_size * self.batch_size))
        total = 0
        for w in range(self._slots_per_rank):
            share = self._share_size(0, self.rank * self._slots_per_rank + w)
            total += share // self.batch_size if self.drop_last else -(-share // self.batch_size)
        return total

    # ----------------------------------------------------------------------------------------------
    # Exact resume

    def state_dict(self) -> dict[str, Any]:
        """The stream position. Every rank consumes the same number of batches, so rank 0's state
        restores every rank. `epoch` and `samples_in_epoch` describe the first slot (informational)."""
        epoch, offset = self._locate(self.rank * self._slots_per_rank, self._batches * self.batch_size)
        return {
            "batches": self._batches,
            "epoch": epoch,
            "samples_in_epoch": offset,
            "seed": self.seed,
            "split": self.split,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "flip": self.flip,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "split", "batch_size", "shuffle_buffer", "flip", "world_size", "num_workers"):
            if key in state and state[key] != getattr(self, key):
                raise VqtoolError(
                    f"cannot resume the data stream: {key} was {state[key]!r} and is now {getattr(self, key)!r}; "
                    f"resume with the same {key}"
                )
        self._batches = int(state["batches"])


def _identity(batch: Batch) -> Batch:
    return batch


def _pinned(batch: Batch) -> Batch:
    # In this process rather than in DataLoader's pinning thread: one code path for any number of workers,
    # and a copy of a few MB per batch costs far less than the GPU step it feeds.
    images, labels = batch
    return images.pin_memory(), (labels.pin_memory() if labels is not None else None)


class _WorkerStream(torch.utils.data.IterableDataset):
    """One DataLoader worker's batches. The DataLoader takes batches from its workers in turn, so
    stream batch k comes from slot k mod W. A resumed DataLoader again starts with its worker 0, so
    worker i plays slot (i + start) mod W, which has delivered the batches numbered slot, slot + W, ...
    below `start`."""

    def __init__(self, loader: ShardLoader, start: int):
        self.loader = loader
        self.start = start

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        role = (worker + self.start) % workers
        done = len(range(role, self.start, workers))
        slot = self.loader.rank * self.loader._slots_per_rank + role
        return self.loader._slot_batches(slot, done)
