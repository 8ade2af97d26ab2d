"""Metrics on small hand-computed cases, including ties and classes absent from the labels."""

from __future__ import annotations

import numpy as np
import pytest

from sfr.eval.metrics import mean_topk_recall, top_k, topk_accuracy

SCORES = np.array(
    [
        [0.1, 0.5, 0.4, 0.0],  # ranking 1, 2, 0, 3
        [0.3, 0.3, 0.2, 0.2],  # ties: 0, 1, 2, 3
        [0.0, 0.1, 0.2, 0.7],  # ranking 3, 2, 1, 0
    ]
)


def test_top_k_breaks_ties_by_lower_class_id() -> None:
    assert top_k(SCORES, 2).tolist() == [[1, 2], [0, 1], [3, 2]]


def test_topk_accuracy_by_hand() -> None:
    labels = np.array([2, 1, 0])
    assert topk_accuracy(SCORES, labels, 1) == 0.0
    assert topk_accuracy(SCORES, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(SCORES, labels, 4) == 1.0
    assert topk_accuracy(SCORES[:0], labels[:0], 5) == 0.0


def test_mean_topk_recall_averages_over_present_classes_only() -> None:
    labels = np.array([1, 1, 3])
    # class 1: row 0 hit at k=1, row 1 miss at k=1 (class 0 ranks first) -> 0.5; class 3: hit -> 1
    assert mean_topk_recall(SCORES, labels, k=1) == pytest.approx(0.75)
    # restricted to a subset that contains an absent class (2): only class 3 counts
    assert mean_topk_recall(SCORES, labels, k=1, classes=[2, 3]) == pytest.approx(1.0)
    assert mean_topk_recall(SCORES, labels, k=1, classes=[0]) == 0.0
