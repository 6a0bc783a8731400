"""Shared fixtures: a tiny labelled synthetic dataset as shards, prepared once per test session.

`tiny_shards`  session-scoped Path of a read-only shards folder: 48 shapes images of 16×16 px,
               36 train + 12 val, 8 classes, shard size 8 (5 train + 2 val shards). Do not write into it.
`tiny_run`     function-scoped Path of a fresh run folder whose shards/ is a copy of `tiny_shards`,
               for tests that write stage outputs next to the data (RunPaths.of(tiny_run)).

Every test, and every fixture of any scope, runs torch on one thread: the models are tiny, and on shared
busy cores a second thread only adds OpenMP hand-offs that cost more than the arithmetic. A test that
sets another thread count has it reset to one afterwards.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

TINY_COUNT = 48
TINY_SIZE = 16


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Session scope: set before module- and session-scoped fixtures (trained models, Inception) are built.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread_after_each_test(one_thread):
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    from vqtool.data.prepare import PrepareSettings, prepare_synthetic

    out = tmp_path_factory.mktemp("tiny-data") / "shards"
    settings = PrepareSettings(size=TINY_SIZE, val_fraction=0.25, shard_size=8, workers=1)
    prepare_synthetic(out, "shapes", TINY_COUNT, settings, seed=0, show_progress=False)
    return out


@pytest.fixture
def tiny_run(tiny_shards, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_shards, run / "shards")
    return run
