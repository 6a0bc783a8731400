"""The sample grid's caption says where each class is, matching the labels `sample` cycles."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from vqtool.prior.sample import default_labels
from vqtool.report_html import cycled_classes_caption


def grid_columns_of_labels(n_classes: int, n: int) -> list[set[int]]:
    """The labels in each column of the grid `sample` writes: ⌈√shown⌉ images a row, the first 64 shown."""
    labels = default_labels(SimpleNamespace(cfg=SimpleNamespace(n_classes=n_classes)), n)
    shown = labels[:64].tolist()
    columns = math.ceil(math.sqrt(len(shown)))
    return [set(shown[c::columns]) for c in range(columns)]


@pytest.mark.parametrize("n_classes, n", [(8, 64), (8, 100), (4, 64), (2, 16), (8, 256)])
def test_one_class_per_column_when_the_caption_says_so(n_classes, n):
    classes = [f"c{i}" for i in range(n_classes)]
    caption = cycled_classes_caption(classes, n)
    assert caption.startswith("one class per column")
    columns = grid_columns_of_labels(n_classes, n)
    assert [next(iter(c)) for c in columns] == [i % n_classes for i in range(len(columns))]
    assert all(len(c) == 1 for c in columns)
    assert ("repeating every" in caption) == (len(columns) > n_classes)


@pytest.mark.parametrize("n_classes, n", [(8, 6), (10, 64), (3, 64), (8, 49)])
def test_classes_in_turn_when_columns_mix_classes(n_classes, n):
    caption = cycled_classes_caption([f"c{i}" for i in range(n_classes)], n)
    assert caption.startswith("classes in turn")
    assert any(len(c) > 1 for c in grid_columns_of_labels(n_classes, n))
