"""Anticipation measures as plain NumPy functions (DESIGN §5).

Conventions:

- Scores are (N, C) arrays, or (N, K, C) with one column per anticipation time (K times, in the
  order of the model's outputs: oldest, i.e. largest time, first); higher is better. Labels are
  (N,) integer class ids and index the first axis.
- Rankings sort by descending score with ties broken by the lower class id, so results are
  deterministic (the published code breaks ties by the higher id; ties are rare with real scores).
- Verb and noun probabilities follow the published RU-LSTM evaluation: softmax over the action
  scores, then the probability of a verb (noun) is the sum of those of the actions that contain it.
- Class-mean measures (mean top-k recall, mean class accuracy) average over the classes that occur
  in the labels (restricted to a given subset, e.g. many-shot classes); absent classes are left out.
- `*_hits` arrays are booleans, one per row (and time): callers can append rows that must count as
  wrong (EK100 counts discarded samples as wrong) before reducing them with `class_mean` or a mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from sfr.data.annotations import ActionsTable


def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """Float64 softmax along `axis`, shifted by the maximum so large scores do not overflow."""
    scores = np.asarray(scores, dtype=np.float64)
    exp = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return exp / exp.sum(axis=axis, keepdims=True)


def marginalise(
    action_probs: np.ndarray,
    class_of_action: np.ndarray,
    num_classes: int,
    absent: Literal["action0", "zero"] = "action0",
) -> np.ndarray:
    """(..., num_classes) probabilities of verb (noun) c: sum over the actions whose class is c.

    A class inside the table's range (id <= the largest id of the table) that no action contains
    gets the probability of action 0 with `absent="action0"` (the published code does this; its
    numbers include it) or 0 with `absent="zero"`. The published code counts classes as the
    largest id + 1, so classes past the table's range (`num_classes` larger, e.g. the 97 EK100
    verbs with a smaller custom table) never occur there: they get 0, as the official checker
    expects (each task's probabilities then sum to at most 1).
    Computed as ONE 2-D matmul (rows, A) @ (A, C): NumPy runs a batched (N, K, A) @ (A, C)
    product as K-row matmuls, about 100x slower at EK scale.
    """
    class_of_action = np.asarray(class_of_action)
    num_actions = action_probs.shape[-1]
    if class_of_action.shape != (num_actions,):
        raise ValueError(
            f"class_of_action has shape {class_of_action.shape}, expected ({num_actions},)."
        )
    if not 0 <= class_of_action.min() <= class_of_action.max() < num_classes:
        raise ValueError(f"class ids must lie in 0..{num_classes - 1}.")
    if absent not in ("action0", "zero"):
        raise ValueError(f"absent must be 'action0' or 'zero', not {absent!r}.")
    membership = np.zeros((num_actions, num_classes))  # (A, C): 1 where action a has class c
    membership[np.arange(num_actions), class_of_action] = 1.0
    if absent == "action0":
        in_table = np.arange(num_classes) <= class_of_action.max()
        membership[0, (membership.sum(axis=0) == 0) & in_table] = 1.0
    probs = np.asarray(action_probs, dtype=np.float64)
    rows = probs.reshape(-1, num_actions)  # (N·K, A): one 2-D product whatever the leading axes
    return (rows @ membership).reshape(*probs.shape[:-1], num_classes)


def verb_noun_probabilities(
    action_scores: np.ndarray,
    actions: ActionsTable,
    absent: Literal["action0", "zero"] = "action0",
) -> tuple[np.ndarray, np.ndarray]:
    """Verb and noun probabilities (..., V) and (..., Nn) from (..., A) action scores.

    Softmax over the actions, then `marginalise` with the actions table (published convention).
    """
    probs = softmax(action_scores)
    return (
        marginalise(probs, actions.verbs, actions.num_verbs, absent),
        marginalise(probs, actions.nouns, actions.num_nouns, absent),
    )


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(..., k) class ids of the k best scores along the last axis, best first (ties: lower id)."""
    order = np.argsort(-np.asarray(scores), axis=-1, kind="stable")
    return order[..., :k]


def label_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) or (N, K) 0-based rank of the label in its row of (N, C) or (N, K, C) scores.

    Rank = classes scoring higher + classes scoring the same with a lower id (the tie rule).
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    labels = labels.reshape(labels.shape + (1,) * (scores.ndim - 1 - labels.ndim))
    labels = np.broadcast_to(labels, scores.shape[:-1])
    label_scores = np.take_along_axis(scores, labels[..., None], axis=-1)
    lower_id = np.arange(scores.shape[-1]) < labels[..., None]
    return ((scores > label_scores) | ((scores == label_scores) & lower_id)).sum(axis=-1)


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(N,) or (N, K) booleans: is the label among the k best scores of its row (and time)."""
    return label_ranks(scores, labels) < k


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows of (N, C) scores whose label is among their k best (0.0 for no rows)."""
    if len(labels) == 0:
        return 0.0
    return float(topk_hits(scores, labels, k).mean())


def topk_accuracy_per_time(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(K,) top-k accuracy at each anticipation time of (N, K, C) scores (zeros for no rows)."""
    if len(labels) == 0:
        return np.zeros(np.shape(scores)[1])
    return topk_hits(scores, labels, k).mean(axis=0)


def class_mean(
    hits: np.ndarray, labels: np.ndarray, classes: Sequence[int] | None = None
) -> float | None:
    """Mean over the classes present in `labels` of the fraction of hits among that class's rows.

    Only classes with at least one row count (restricted to `classes` when given), as in the
    published mean top-k recall; None when no class is present.
    """
    hits = np.asarray(hits, dtype=bool)
    labels = np.asarray(labels)
    present = np.unique(labels)
    if classes is not None:
        present = np.intersect1d(present, np.asarray(classes))
    if len(present) == 0:
        return None
    return float(np.mean([hits[labels == c].mean() for c in present]))


def mean_topk_recall(
    scores: np.ndarray, labels: np.ndarray, k: int = 5, classes: Sequence[int] | None = None
) -> float:
    """Mean Top-k Recall (EK55/EK100): class mean of the top-k hits; 0.0 when no class is present."""
    recall = class_mean(topk_hits(scores, labels, k), labels, classes)
    return 0.0 if recall is None else recall


def mean_class_accuracy(
    scores: np.ndarray, labels: np.ndarray, classes: Sequence[int] | None = None
) -> float | None:
    """Mean class accuracy (EGTEA Gaze+): class mean of the top-1 hits; None when no class."""
    return class_mean(topk_hits(scores, labels, 1), labels, classes)


def time_to_action(hits: np.ndarray, times: Sequence[float]) -> np.ndarray:
    """(N,) largest anticipation time at which each row is a hit, 0.0 for rows never hit.

    `times` are the K times of the columns of the (N, K) hits, largest first as the model emits
    them (e.g. 2.0 … 0.25). Published TtA: the first time from which the label is in the top-k.
    """
    hits = np.asarray(hits, dtype=bool)
    times = np.asarray(times, dtype=np.float64)
    if hits.ndim != 2 or hits.shape[1] != len(times):
        raise ValueError(f"hits has shape {hits.shape}, expected (N, {len(times)}).")
    return np.where(hits, times, 0.0).max(axis=1, initial=0.0)


def mean_time_to_action(
    scores: np.ndarray, labels: np.ndarray, times: Sequence[float], k: int = 5
) -> float:
    """Mean TtA(k) (EK55) over the rows of (N, K, C) scores, in seconds (0.0 for no rows)."""
    if len(labels) == 0:
        return 0.0
    return float(time_to_action(topk_hits(scores, labels, k), times).mean())


def many_shot_actions(
    actions: ActionsTable, many_shot_verbs: Sequence[int], many_shot_nouns: Sequence[int]
) -> np.ndarray:
    """Ids of the many-shot actions: those whose verb or noun is many-shot (published rule)."""
    return np.flatnonzero(
        np.isin(actions.verbs, many_shot_verbs) | np.isin(actions.nouns, many_shot_nouns)
    )
