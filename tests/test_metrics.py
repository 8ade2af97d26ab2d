"""Metrics on small hand-computed cases (ties, classes absent from the labels, verbs no action
contains, rows forced wrong) and TtA against an independent published-style formulation."""

from __future__ import annotations

import numpy as np
import pytest

from sfr.data.annotations import ActionsTable
from sfr.eval.metrics import (
    class_mean,
    label_ranks,
    many_shot_actions,
    marginalise,
    mean_class_accuracy,
    mean_time_to_action,
    mean_topk_recall,
    softmax,
    time_to_action,
    top_k,
    topk_accuracy,
    topk_accuracy_per_time,
    topk_hits,
    verb_noun_probabilities,
)

SCORES = np.array(
    [
        [0.1, 0.5, 0.4, 0.0],  # ranking 1, 2, 0, 3
        [0.3, 0.3, 0.2, 0.2],  # ties: 0, 1, 2, 3
        [0.0, 0.1, 0.2, 0.7],  # ranking 3, 2, 1, 0
    ]
)

# Four actions: (verb, noun) = (0, 1), (2, 0), (2, 1), (3, 1). Verb 1 is in no action.
ACTIONS = ActionsTable(
    verbs=np.array([0, 2, 2, 3]), nouns=np.array([1, 0, 1, 1]), names=("a", "b", "c", "d")
)
ACTION_PROBS = np.array([0.1, 0.2, 0.3, 0.4])


# --- rankings -------------------------------------------------------------------------------


def test_top_k_breaks_ties_by_lower_class_id() -> None:
    assert top_k(SCORES, 2).tolist() == [[1, 2], [0, 1], [3, 2]]


def test_label_ranks_and_hits_with_ties() -> None:
    # row 1 ties 0 with 1 and 2 with 3: ranks are 0, 1, 2, 3 in id order
    assert label_ranks(SCORES[[1, 1, 1, 1]], np.array([0, 1, 2, 3])).tolist() == [0, 1, 2, 3]
    assert topk_hits(SCORES[[1, 1]], np.array([1, 3]), 1).tolist() == [False, False]
    assert topk_hits(SCORES[[1, 1]], np.array([1, 3]), 2).tolist() == [True, False]
    # (N, K, C) scores with (N,) labels: one rank per row and time
    stacked = np.stack([SCORES, SCORES[::-1]], axis=1)  # time 1 holds the rows reversed
    assert label_ranks(stacked, np.array([3, 1, 0])).tolist() == [[3, 0], [1, 1], [3, 2]]


def test_hits_agree_with_top_k_on_random_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(200, 7)).astype(float)  # many ties
    labels = rng.integers(0, 7, size=200)
    for k in (1, 3, 7):
        expected = (top_k(scores, k) == labels[:, None]).any(axis=1)
        assert np.array_equal(topk_hits(scores, labels, k), expected)


def test_topk_accuracy_by_hand() -> None:
    labels = np.array([2, 1, 0])
    assert topk_accuracy(SCORES, labels, 1) == 0.0
    assert topk_accuracy(SCORES, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(SCORES, labels, 4) == 1.0
    assert topk_accuracy(SCORES[:0], labels[:0], 5) == 0.0


def test_topk_accuracy_per_time_by_hand() -> None:
    stacked = np.stack([SCORES, SCORES[::-1]], axis=1)  # (3 rows, 2 times, 4 classes)
    labels = np.array([1, 0, 3])
    # time 0: top-1 are 1, 0, 3 -> all hit; time 1: top-1 are 3, 0, 1 -> only row 1 hits
    assert topk_accuracy_per_time(stacked, labels, 1) == pytest.approx([1.0, 1 / 3])
    assert topk_accuracy_per_time(stacked[:0], labels[:0], 1).tolist() == [0.0, 0.0]


# --- class means ----------------------------------------------------------------------------


def test_mean_topk_recall_averages_over_present_classes_only() -> None:
    labels = np.array([1, 1, 3])
    # class 1: row 0 hit at k=1, row 1 miss at k=1 (class 0 ranks first) -> 0.5; class 3: hit -> 1
    assert mean_topk_recall(SCORES, labels, k=1) == pytest.approx(0.75)
    # restricted to a subset that contains an absent class (2): only class 3 counts
    assert mean_topk_recall(SCORES, labels, k=1, classes=[2, 3]) == pytest.approx(1.0)
    assert mean_topk_recall(SCORES, labels, k=1, classes=[0]) == 0.0


def test_class_mean_counts_forced_wrong_rows() -> None:
    # EK100 style: three evaluated rows, then two discarded rows appended as misses
    hits = np.concatenate([[True, False, True], np.zeros(2, dtype=bool)])
    labels = np.concatenate([[0, 0, 1], [1, 2]])
    # class 0: 1/2, class 1: 1/2, class 2: 0/1
    assert class_mean(hits, labels) == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    # many-shot subset with a class (5) that no row has: ignored
    assert class_mean(hits, labels, classes=[1, 5]) == pytest.approx(0.5)
    assert class_mean(hits, labels, classes=[5]) is None
    assert class_mean(hits[:0], labels[:0]) is None


def test_mean_class_accuracy_by_hand() -> None:
    labels = np.array([1, 1, 3])  # top-1 hits: True, False (tie goes to 0), True
    assert mean_class_accuracy(SCORES, labels) == pytest.approx((0.5 + 1.0) / 2)
    assert mean_class_accuracy(SCORES, labels, classes=[1]) == pytest.approx(0.5)
    assert mean_class_accuracy(SCORES, labels, classes=[0, 2]) is None


# --- probabilities --------------------------------------------------------------------------


def test_softmax_by_hand_and_stable() -> None:
    assert softmax(np.array([0.0, np.log(3.0)])) == pytest.approx([0.25, 0.75])
    large = softmax(np.array([[1000.0, 1000.0 + np.log(3.0)]], dtype=np.float32))
    assert large.dtype == np.float64
    assert large[0] == pytest.approx([0.25, 0.75], rel=1e-4)  # float32 rounding of the input
    assert softmax(np.array([[0.0, 0.0], [0.0, np.log(3.0)]]), axis=0)[:, 1] == pytest.approx(
        [0.25, 0.75]
    )


def test_marginalise_verb_in_no_action() -> None:
    assert ACTIONS.num_verbs == 4 and ACTIONS.num_nouns == 2  # max id + 1, verb 1 included
    # verb 0 <- action 0; verb 1 <- none; verb 2 <- actions 1, 2; verb 3 <- action 3
    published = marginalise(ACTION_PROBS, ACTIONS.verbs, 4)
    assert published == pytest.approx([0.1, 0.1, 0.5, 0.4])  # verb 1 gets action 0's 0.1
    zero = marginalise(ACTION_PROBS, ACTIONS.verbs, 4, absent="zero")
    assert zero == pytest.approx([0.1, 0.0, 0.5, 0.4])
    # noun 0 <- action 1; noun 1 <- actions 0, 2, 3
    assert marginalise(ACTION_PROBS, ACTIONS.nouns, 2) == pytest.approx([0.2, 0.8])


def test_marginalise_any_leading_axes_as_rows() -> None:
    """(N, K, A) and (A,) give the sums of the actions of each class, row by row."""
    rng = np.random.default_rng(3)
    probs = rng.random((5, 3, 4))
    for absent in ("action0", "zero"):
        marginal = marginalise(probs, ACTIONS.verbs, 4, absent)
        assert marginal.shape == (5, 3, 4)
        for n in range(5):
            for k in range(3):
                row = probs[n, k]
                expected = [row[ACTIONS.verbs == v].sum() for v in range(4)]
                expected[1] = row[0] if absent == "action0" else 0.0
                assert marginal[n, k] == pytest.approx(expected)
    assert marginalise(probs[:0], ACTIONS.verbs, 4).shape == (0, 3, 4)


def test_marginalised_probabilities_sum_to_one_with_zero() -> None:
    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(size=(5, 3, 30)))
    class_of_action = rng.integers(0, 12, size=30)
    num_absent = 12 - len(np.unique(class_of_action))
    zero = marginalise(probs, class_of_action, 12, absent="zero")
    assert zero.shape == (5, 3, 12)
    assert zero.sum(axis=-1) == pytest.approx(np.ones((5, 3)))
    # the published rule adds action 0's probability once per absent class
    published = marginalise(probs, class_of_action, 12)
    assert published.sum(axis=-1) == pytest.approx(1 + num_absent * probs[..., 0])


def test_classes_past_the_table_get_zero_not_action_0() -> None:
    """Issue 11 case 3: 6 verbs asked for with a table whose largest verb id is 3."""
    published = marginalise(ACTION_PROBS, ACTIONS.verbs, 6)
    assert published == pytest.approx([0.1, 0.1, 0.5, 0.4, 0.0, 0.0])  # verb 1 inside: action 0
    assert marginalise(ACTION_PROBS, ACTIONS.verbs, 6, absent="zero") == pytest.approx(
        [0.1, 0.0, 0.5, 0.4, 0.0, 0.0]
    )
    rng = np.random.default_rng(2)
    probs = softmax(rng.normal(size=(4, 32)))
    table = np.tile([0, 1, 2, 3], 8)  # a custom 32-action table naming 4 of 97 verbs
    assert marginalise(probs, table, 97).sum(axis=-1) == pytest.approx(np.ones(4))


def test_marginalise_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match="shape"):
        marginalise(ACTION_PROBS, ACTIONS.verbs[:3], 4)
    with pytest.raises(ValueError, match="class ids"):
        marginalise(ACTION_PROBS, ACTIONS.verbs, 3)


def test_verb_noun_probabilities_by_hand() -> None:
    scores = np.log(ACTION_PROBS) + 7.0  # softmax gives ACTION_PROBS back
    verbs, nouns = verb_noun_probabilities(scores, ACTIONS)
    assert verbs == pytest.approx([0.1, 0.1, 0.5, 0.4])
    assert nouns == pytest.approx([0.2, 0.8])
    verbs, nouns = verb_noun_probabilities(np.tile(scores, (2, 3, 1)), ACTIONS, absent="zero")
    assert verbs.shape == (2, 3, 4) and nouns.shape == (2, 3, 2)
    assert verbs[1, 2] == pytest.approx([0.1, 0.0, 0.5, 0.4])


def test_many_shot_actions_use_verb_or_noun() -> None:
    # verb 3 is many-shot -> action 3; noun 0 is many-shot -> action 1; action 2 (2, 1) neither
    assert many_shot_actions(ACTIONS, [3], [0]).tolist() == [1, 3]
    assert many_shot_actions(ACTIONS, [], [1]).tolist() == [0, 2, 3]
    assert many_shot_actions(ACTIONS, [1], []).tolist() == []


# --- time to action -------------------------------------------------------------------------

TIMES = (1.5, 1.0, 0.5, 0.25)


def test_time_to_action_by_hand() -> None:
    hits = np.array(
        [
            [False, True, False, True],  # first hit at 1.0 s (a later miss does not matter)
            [False, False, False, False],  # never -> 0
            [True, True, True, True],  # from the start -> 1.5 s
        ]
    )
    assert time_to_action(hits, TIMES).tolist() == [1.0, 0.0, 1.5]
    with pytest.raises(ValueError, match="expected"):
        time_to_action(hits[:, :3], TIMES)


def test_mean_time_to_action_by_hand() -> None:
    hit, miss, tie = [0.9, 0.1], [0.1, 0.9], [0.5, 0.5]  # label 0, top-1; a tie goes to 0
    scores = np.array(
        [
            [miss, hit, miss, hit],  # 1.0
            [miss, miss, miss, miss],  # 0.0
            [tie, miss, miss, miss],  # 1.5
        ]
    )
    labels = np.array([0, 0, 0])
    assert mean_time_to_action(scores, labels, TIMES, k=1) == pytest.approx(2.5 / 3)
    assert mean_time_to_action(scores, labels, TIMES, k=2) == pytest.approx(1.5)  # all hit
    assert mean_time_to_action(scores[:0], labels[:0], TIMES) == 0.0


def published_style_tta(
    scores: np.ndarray, labels: np.ndarray, times: tuple[float, ...], k: int
) -> np.ndarray:
    """Per-row TtA(k) the way the published code computes it, written independently."""
    num_rows, _, num_classes = scores.shape
    ranking = np.argsort(scores, axis=2)[..., ::-1]  # best class first, at every time
    at_rank = ranking == labels[:, None, None]  # [n, t, r]: the label sits at rank r at time t
    within = np.cumsum(at_rank, axis=2)  # [n, t, r]: the label is in the top r + 1
    within = np.concatenate([within, np.ones((num_rows, 1, num_classes))], axis=1)
    stamps = np.array([*times, 0.0])
    return stamps[np.argmax(within, axis=1)][:, k - 1]  # first (oldest) time with a hit


def test_time_to_action_matches_published_formulation() -> None:
    rng = np.random.default_rng(2)
    times = (2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25)
    for _ in range(30):
        num_rows, num_classes = rng.integers(1, 20), rng.integers(2, 9)
        scores = rng.normal(size=(num_rows, len(times), num_classes))  # no ties
        labels = rng.integers(0, num_classes, size=num_rows)
        for k in range(1, num_classes + 1):
            expected = published_style_tta(scores, labels, times, k)
            ours = time_to_action(topk_hits(scores, labels, k), times)
            assert ours == pytest.approx(expected)
            assert mean_time_to_action(scores, labels, times, k) == pytest.approx(expected.mean())
