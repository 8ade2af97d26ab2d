"""Anticipation measures as plain NumPy functions (DESIGN §5).

Scores are (N, C) arrays (higher is better), labels (N,) integer class ids. Rankings sort by
descending score with ties broken by the lower class id, so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(N, k) class ids of the k best scores of each row, best first (ties: lower id first)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(N,) booleans: is the label among the k best scores of its row."""
    return (top_k(scores, k) == np.asarray(labels)[:, None]).any(axis=1)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among their k best scores (0.0 for no rows)."""
    if len(labels) == 0:
        return 0.0
    return float(topk_hits(scores, labels, k).mean())


def mean_topk_recall(
    scores: np.ndarray, labels: np.ndarray, k: int = 5, classes: Sequence[int] | None = None
) -> float:
    """Mean over classes of the top-k recall of that class's rows.

    As in the published code, the mean runs over the classes that occur in `labels`
    (restricted to `classes` when given); classes without any row are left out, not counted as 0.
    """
    labels = np.asarray(labels)
    present = np.unique(labels)
    if classes is not None:
        present = np.intersect1d(present, np.asarray(classes))
    if len(present) == 0:
        return 0.0
    hits = topk_hits(scores, labels, k)
    return float(np.mean([hits[labels == c].mean() for c in present]))
