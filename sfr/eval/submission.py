"""EPIC-KITCHENS action anticipation challenge files (DESIGN §5).

One entry per segment id of the split, discarded ones included (with zero scores, as the
published code): the probability of every verb and noun class and the 100 best actions as
`"verb,noun"` keys. Version 0.1 is the EK55 format (test_seen / test_unseen), 0.2 the EK100 one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sfr.data.annotations import ActionsTable
from sfr.errors import ConfigError
from sfr.eval.benchmark import load_benchmark
from sfr.eval.evaluation import check_same_dataset
from sfr.eval.runner import FullScores, Member, predict_split
from sfr.models.trained import TrainedModel

CHALLENGE_VERSIONS = {"ek55": "0.1", "ek100": "0.2"}
CHALLENGE_CLASSES = {"ek55": (125, 352), "ek100": (97, 300)}  # verbs, nouns


@dataclass(frozen=True)
class SupervisionLevels:
    """The `sls_*` fields: pre-training, training labels and training data levels (0-5)."""

    pt: int = 1
    tl: int = 4
    td: int = 3

    def __post_init__(self) -> None:
        for name in ("pt", "tl", "td"):
            level = getattr(self, name)
            if not (isinstance(level, int) and 0 <= level <= 5):
                raise ConfigError(f"sls_{name} is {level!r}; supervision levels are 0 to 5.")


def challenge_counts(dataset: str) -> tuple[int, int]:
    """Verb and noun classes a challenge file lists for `dataset`; refuses EGTEA."""
    if dataset not in CHALLENGE_CLASSES:
        raise ConfigError(
            f"{dataset} has no EPIC-KITCHENS challenge: submissions exist for ek55 and ek100.",
            "Use `sfr validate --report DIR` for EGTEA results.",
        )
    return CHALLENGE_CLASSES[dataset]


def challenge_json(
    dataset: str,
    ids: list[str],
    scores: FullScores,
    actions: ActionsTable,
    sls: SupervisionLevels = SupervisionLevels(),
) -> dict[str, Any]:
    """The challenge document for `ids` (one entry each) from the scores at one time."""
    challenge_counts(dataset)
    results: dict[str, Any] = {}
    for row, segment_id in enumerate(ids):
        action_ids = scores.action_ids[row]
        results[str(segment_id)] = {
            "verb": {str(c): float(p) for c, p in enumerate(scores.verb[row])},
            "noun": {str(c): float(p) for c, p in enumerate(scores.noun[row])},
            "action": {
                f"{actions.verbs[a]},{actions.nouns[a]}": float(p)
                for a, p in zip(action_ids, scores.action_probs[row], strict=True)
            },
        }
    return {
        "version": CHALLENGE_VERSIONS[dataset],
        "challenge": "action_anticipation",
        "sls_pt": sls.pt,
        "sls_tl": sls.tl,
        "sls_td": sls.td,
        "results": results,
    }


def check_challenge(
    document: dict[str, Any], dataset: str, ids: list[str], num_actions: int
) -> list[str]:
    """Problems of a challenge document against the format (empty when it is valid)."""
    verbs, nouns = challenge_counts(dataset)
    top = min(100, num_actions)
    problems = []
    for key in ("version", "challenge", "sls_pt", "sls_tl", "sls_td", "results"):
        if key not in document:
            problems.append(f"missing key '{key}'")
    results = document.get("results", {})
    missing = sorted(set(map(str, ids)) - set(results))
    if missing:
        problems.append(f"{len(missing)} ids missing, e.g. {missing[0]}")
    for segment_id, entry in results.items():
        if len(entry.get("verb", {})) != verbs or len(entry.get("noun", {})) != nouns:
            problems.append(f"{segment_id}: expected {verbs} verbs and {nouns} nouns")
        action = entry.get("action", {})
        if len(action) != top or not all(key.count(",") == 1 for key in action):
            problems.append(f"{segment_id}: expected {top} actions keyed 'verb,noun'")
        if problems:
            break
    return problems


# The split a challenge submission scores unless told otherwise: each benchmark's test split.
TEST_SPLITS = {"ek55": "test_seen", "ek100": "test"}


def challenge_split(dataset: str) -> str:
    """The default split of a submission for `dataset` (EK55 test_seen, EK100 test; EGTEA has no
    challenge: its own `validation`, which `challenge_counts` then refuses)."""
    return TEST_SPLITS.get(dataset, "validation")


def make_submission(
    model: TrainedModel,
    data_dir: Path,
    split: str,
    *,
    time: float = 1.0,
    sls: SupervisionLevels = SupervisionLevels(),
    batch_size: int = 128,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    ensemble: Sequence[TrainedModel] = (),
    mean_of: Literal["probabilities", "scores"] = "probabilities",
) -> dict[str, Any]:
    """The challenge document of `model` on a split, checked against the format.

    With `ensemble`, the scores are the equal-weight mean of `model` and those models, of their
    probabilities or (`mean_of="scores"`, the published early-recognition fusion) of their raw
    action scores (see `predict_split`).
    """
    verbs, nouns = challenge_counts(model.data.dataset)
    # the challenge file holds scores only: the lists that select segments for measures (EK100
    # unseen / tail ids, EK55 many-shot classes) are the evaluation server's business
    bench = load_benchmark(model.data, Path(data_dir), split, model.num_classes, measures=False)
    models = [model, *ensemble]
    check_same_dataset(models)
    predictions = predict_split(
        [Member(m) for m in models],
        bench.segments,
        Path(data_dir),
        bench.actions,
        batch_size=batch_size,
        device=device,
        full_at=time,
        num_verbs=verbs,
        num_nouns=nouns,
        progress=progress,
        mean_of=mean_of,
    )
    full = predictions.full
    if full is None:
        raise ConfigError(f"No scores were kept at {time:g} s.")
    document = challenge_json(model.data.dataset, predictions.ids, full, bench.actions, sls)
    problems = check_challenge(
        document, model.data.dataset, predictions.ids, bench.actions.num_actions
    )
    if problems:
        raise ConfigError(f"The challenge file would be invalid: {problems[0]}.")
    return document
