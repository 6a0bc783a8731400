"""ShardLoader: batch format, finite passes, determinism, exact resume, and the rank × worker split."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter

import pytest
import torch

from vqtool import statepack
from vqtool.data.loader import ShardLoader, ShardPart, buffer_shuffle, split_shards
from vqtool.errors import VqtoolError


def fingerprint(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def take(loader: ShardLoader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same_batches(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for (x1, y1), (x2, y2) in zip(a, b, strict=True):
        if not torch.equal(x1, x2) or (y1 is None) != (y2 is None) or (y1 is not None and not torch.equal(y1, y2)):
            return False
    return True


# --------------------------------------------------------------------------------------------------
# The split itself (no process group needed)


def expand(parts: list[ShardPart], counts: dict[str, int]) -> list[tuple[str, int]]:
    return [(p.shard, i) for p in parts for i in range(p.start, counts[p.shard], p.stride)]


@pytest.mark.parametrize(
    "sizes",
    [[10, 10, 10, 10, 3], [5], [1, 1, 1], [7, 2], [4] * 16, [1000, 1000, 17]],
)
@pytest.mark.parametrize("world,workers", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 4), (8, 1)])
def test_split_is_disjoint_and_complete(sizes, world, workers):
    shards = [(f"train-{i:06d}.tar", n) for i, n in enumerate(sizes)]
    counts = dict(shards)
    everything = [(name, i) for name, n in shards for i in range(n)]
    seen: list[tuple[str, int]] = []
    per_slot = []
    for rank, worker in itertools.product(range(world), range(workers)):
        mine = expand(split_shards(shards, rank, world, worker, workers), counts)
        per_slot.append(len(mine))
        seen += mine
    assert sorted(seen) == sorted(everything)  # complete, and no sample twice
    if len(shards) < world * workers:  # split by sample: shares differ by at most one sample
        assert max(per_slot) - min(per_slot) <= 1


def test_split_prefers_whole_shards_when_there_are_enough():
    shards = [(f"s{i}", 10) for i in range(6)]
    parts = split_shards(shards, rank=1, world_size=2, worker=1, num_workers=2)  # slot 3 of 4
    assert parts == [ShardPart("s3", 0, 1)]
    parts = split_shards(shards[:3], rank=1, world_size=2, worker=0, num_workers=2)  # slot 2 of 4, 3 shards
    assert all(p.stride == 4 for p in parts)
    assert [(p.shard, p.start) for p in parts] == [("s0", 2), ("s1", 0), ("s2", 2)]


def test_split_rejects_bad_rank_or_worker():
    with pytest.raises(ValueError):
        split_shards([("a", 1)], rank=2, world_size=2)
    with pytest.raises(ValueError):
        split_shards([("a", 1)], rank=0, world_size=1, worker=3, num_workers=2)


def test_buffer_shuffle_is_a_seeded_permutation():
    items = list(range(100))
    a = buffer_shuffle(items, 10, torch.Generator().manual_seed(1))
    b = buffer_shuffle(items, 10, torch.Generator().manual_seed(1))
    c = buffer_shuffle(items, 10, torch.Generator().manual_seed(2))
    assert sorted(a) == items and a == b and a != c and a != items
    # a buffer of 10 can move an item at most 9 places earlier
    assert all(pos >= item - 9 for pos, item in enumerate(a))
    assert buffer_shuffle(items, 1, torch.Generator()) == items


# --------------------------------------------------------------------------------------------------
# Batches


def test_finite_pass_covers_the_split_once_and_keeps_the_last_batch(tiny_shards):
    loader = ShardLoader(tiny_shards, split="train", batch_size=8, infinite=False)
    batches = list(loader)
    assert len(batches) == len(loader) == 5  # 36 = 4 × 8 + 4
    assert [x.shape[0] for x, _ in batches] == [8, 8, 8, 8, 4]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    assert y.dtype == torch.int64 and y.shape == (8,)
    assert loader.num_samples == 36 and loader.image_size == 16 and len(loader.classes) == 8
    # a second pass is identical (fixed order, no flips)
    assert same_batches(batches, list(loader))
    fps = [fingerprint(img) for x, _ in batches for img in x]
    assert len(set(fps)) == 36
    dropped = ShardLoader(tiny_shards, split="train", batch_size=8, infinite=False, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 4


def test_finite_pass_is_shared_across_ranks_without_overlap(tiny_shards):
    whole = {fingerprint(img) for x, _ in ShardLoader(tiny_shards, "val", batch_size=5, infinite=False) for img in x}
    shares = []
    for rank in range(3):
        loader = ShardLoader(tiny_shards, "val", batch_size=5, infinite=False, rank=rank, world_size=3)
        shares.append([fingerprint(img) for x, _ in loader for img in x])
    assert sorted(sum(shares, [])) == sorted(whole)
    assert [len(s) for s in shares] == [4, 4, 4]


def test_infinite_epochs_are_reshuffled_permutations(tiny_shards):
    loader = ShardLoader(tiny_shards, batch_size=4, shuffle_buffer=16, seed=3)
    finite = {fingerprint(img) for x, _ in ShardLoader(tiny_shards, batch_size=4, infinite=False) for img in x}
    batches = take(loader, 18)  # two epochs of 36
    epochs = [[fingerprint(img) for x, _ in batches[e * 9 : (e + 1) * 9] for img in x] for e in range(2)]
    for ep in epochs:
        assert sorted(ep) == sorted(finite)
    assert epochs[0] != epochs[1]


def test_same_seed_same_stream_other_seed_other_stream(tiny_shards):
    a = take(ShardLoader(tiny_shards, batch_size=6, flip=True, seed=5), 8)
    b = take(ShardLoader(tiny_shards, batch_size=6, flip=True, seed=5), 8)
    c = take(ShardLoader(tiny_shards, batch_size=6, flip=True, seed=6), 8)
    assert same_batches(a, b)
    assert not same_batches(a, c)


def test_flip_mirrors_some_images_horizontally(tiny_shards):
    originals = {fingerprint(img) for x, _ in ShardLoader(tiny_shards, batch_size=36, infinite=False) for img in x}
    x, _ = take(ShardLoader(tiny_shards, batch_size=36, flip=True, seed=1), 1)[0]
    flipped = sum(fingerprint(img) not in originals for img in x)
    assert all(fingerprint(img) in originals or fingerprint(img.flip(-1)) in originals for img in x)
    assert 5 < flipped < 31


def test_unflipped_stream_has_labels_matching_images(tiny_shards):
    label_of = {}
    for x, y in ShardLoader(tiny_shards, batch_size=36, infinite=False):
        label_of.update({fingerprint(img): int(lab) for img, lab in zip(x, y, strict=True)})
    for x, y in take(ShardLoader(tiny_shards, batch_size=7, seed=2), 6):
        assert [label_of[fingerprint(img)] for img in x] == y.tolist()


# --------------------------------------------------------------------------------------------------
# Exact resume


@pytest.mark.parametrize("consumed", [0, 3, 11])  # 11 batches of 4 crosses the first epoch boundary (9)
def test_resume_continues_with_the_exact_next_batch(tiny_shards, consumed):
    kw = dict(batch_size=4, shuffle_buffer=10, flip=True, seed=7)
    original = ShardLoader(tiny_shards, **kw)
    it = iter(original)
    for _ in range(consumed):
        next(it)
    state = original.state_dict()
    tensors, skeleton = statepack.pack(state)  # the training loop stores it in a checkpoint
    expected = [next(it) for _ in range(12)]

    resumed = ShardLoader(tiny_shards, **kw)
    resumed.load_state_dict(statepack.unpack(tensors, skeleton))
    assert same_batches(take(resumed, 12), expected)
    assert state["batches"] == consumed
    assert (state["epoch"], state["samples_in_epoch"]) == divmod(consumed * 4, 36)


def test_resume_skips_without_decoding(tiny_shards, monkeypatch):
    loader = ShardLoader(tiny_shards, batch_size=4, seed=1)
    loader.load_state_dict({"batches": 20})
    calls = []
    real = ShardLoader._decode
    monkeypatch.setattr(ShardLoader, "_decode", lambda self, *a: calls.append(1) or real(self, *a))
    take(loader, 1)
    assert len(calls) == 4


def test_resume_with_dataloader_workers(tiny_shards):
    kw = dict(batch_size=4, shuffle_buffer=8, flip=True, seed=2, num_workers=2)
    original = ShardLoader(tiny_shards, **kw)
    it = iter(original)
    first = [next(it) for _ in range(5)]
    state = original.state_dict()
    expected = [next(it) for _ in range(6)]
    del it
    resumed = ShardLoader(tiny_shards, **kw)
    resumed.load_state_dict(state)
    assert same_batches(take(resumed, 6), expected)
    # worker streams are disjoint shares: the first batches hold no image twice (flipped or not)
    canonical = {min(fingerprint(img), fingerprint(img.flip(-1))) for x, _ in first for img in x}
    assert len(canonical) == 20


def test_rank0_state_resumes_every_rank(tiny_shards):
    kw = dict(batch_size=3, shuffle_buffer=5, seed=4, world_size=2)
    rank0, rank1 = ShardLoader(tiny_shards, rank=0, **kw), ShardLoader(tiny_shards, rank=1, **kw)
    it0, it1 = iter(rank0), iter(rank1)
    for _ in range(9):  # every rank takes one batch per step
        next(it0)
        next(it1)
    expected1 = [next(it1) for _ in range(8)]
    resumed1 = ShardLoader(tiny_shards, rank=1, **kw)
    resumed1.load_state_dict(rank0.state_dict())
    assert same_batches(take(resumed1, 8), expected1)


def test_ranks_read_disjoint_shares_within_an_epoch(tiny_shards):
    kw = dict(batch_size=1, shuffle_buffer=4, seed=9, world_size=2)
    shares = []
    for rank in range(2):
        loader = ShardLoader(tiny_shards, rank=rank, **kw)
        n = loader._share_size(0, rank)
        shares.append([fingerprint(x[0]) for x, _ in take(loader, n)])
    assert not set(shares[0]) & set(shares[1])
    assert len(shares[0]) + len(shares[1]) == 36


def test_resume_refuses_a_changed_setup(tiny_shards):
    state = ShardLoader(tiny_shards, batch_size=4).state_dict()
    with pytest.raises(VqtoolError, match="batch_size"):
        ShardLoader(tiny_shards, batch_size=8).load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# Errors


def test_bad_setups_are_one_line_errors(tiny_shards, tmp_path):
    with pytest.raises(VqtoolError, match="not found"):
        ShardLoader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VqtoolError, match="manifest.json"):
        ShardLoader(tmp_path / "empty")
    with pytest.raises(VqtoolError, match="split"):
        ShardLoader(tiny_shards, split="test")
    with pytest.raises(VqtoolError, match="cannot be shared"):
        ShardLoader(tiny_shards, split="val", world_size=4, rank=0, num_workers=4)


def test_a_damaged_shard_is_reported(tiny_run):
    shard = tiny_run / "shards" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(VqtoolError, match="train-000000.tar"):
        list(ShardLoader(tiny_run / "shards", batch_size=4, infinite=False))


def test_counter_of_labels_is_balanced(tiny_shards):
    labels = Counter()
    for split in ("train", "val"):
        for _, y in ShardLoader(tiny_shards, split, batch_size=16, infinite=False):
            labels.update(y.tolist())
    assert labels == Counter({c: 6 for c in range(8)})


# --------------------------------------------------------------------------------------------------
# The shard index


def test_header_scan_matches_tarfile_and_falls_back_for_pax(tiny_shards, tmp_path):
    import io
    import tarfile

    from vqtool.data.shards import _scan_headers, _scan_with_tarfile, index_shard

    shard = tiny_shards / "train-000000.tar"
    assert _scan_headers(shard) == _scan_with_tarfile(shard)
    ours = index_shard(shard)
    pax = tmp_path / "pax.tar"
    with tarfile.open(shard) as src, tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as dst:
        for m in src:
            m.pax_headers = {"comment": "written by another tool"}
            dst.addfile(m, src.extractfile(m))
    assert _scan_headers(pax) is None
    other = index_shard(pax)
    assert len(other) == len(ours) == 8
    assert other.labels.tolist() == ours.labels.tolist() and other.sizes.tolist() == ours.sizes.tolist()
    with tarfile.open(pax) as t:
        first = t.getmembers()[0]
        assert t.extractfile(first).read() == io.BytesIO(pax.read_bytes()).getbuffer()[
            other.offsets[0] : other.offsets[0] + other.sizes[0]
        ].tobytes()


def test_planning_and_skipping_do_not_read_shards(tiny_shards):
    loader = ShardLoader(tiny_shards, batch_size=4, shuffle_buffer=3, seed=0)
    loader.load_state_dict({"batches": 8})  # 32 of 36 samples into epoch 0
    plan = loader._plan(0, 0)
    assert sorted(plan.order) == list(range(36)) and loader._index == {}
    take(loader, 1)
    assert 1 <= len(loader._index) <= 2  # only the shards holding the next four samples
