"""`sfr predict`: the actions a model anticipates at one moment of one video.

The moment is treated as the start of an action: the model reads the features before it on
its own time grids and predicts, at each anticipation time τ, the action starting τ seconds later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from sfr.data.annotations import ActionsTable, Segment, read_actions, read_class_names
from sfr.data.dataset import open_stores
from sfr.errors import ConfigError, DataError, counted
from sfr.eval.runner import Member, predict_split
from sfr.models.trained import TrainedModel

CLASS_NAME_FILES = {
    "verb": ("EPIC_verb_classes.csv", "EPIC_100_verb_classes.csv", "verb_classes.csv"),
    "noun": ("EPIC_noun_classes.csv", "EPIC_100_noun_classes.csv", "noun_classes.csv"),
}


@dataclass(frozen=True)
class Candidate:
    """One anticipated action: its id, probability and names (empty when unknown)."""

    action: int
    probability: float
    verb: int
    noun: int
    action_name: str
    verb_name: str
    noun_name: str


@dataclass(frozen=True)
class Anticipation:
    """The k most probable next actions at every anticipation time before `at` seconds."""

    video: str
    at: float
    times: tuple[float, ...]
    candidates: tuple[tuple[Candidate, ...], ...]  # one tuple per time, best first
    names_from: tuple[Path, ...]
    requested: int  # the k asked for; more than the actions listed when the table has fewer


def class_names(data_dir: Path) -> tuple[dict[str, dict[int, str]], tuple[Path, ...]]:
    """Verb and noun names from the EPIC class lists in `data_dir`, when present."""
    names: dict[str, dict[int, str]] = {"verb": {}, "noun": {}}
    used = []
    for task, candidates in CLASS_NAME_FILES.items():
        for name in candidates:
            path = Path(data_dir) / name
            if path.is_file():
                names[task] = read_class_names(path)
                used.append(path)
                break
    return names, tuple(used)


def first_start(model: TrainedModel) -> int:
    """The earliest start frame at which no step of any of the model's streams is padded."""
    return max(stream.grid.first_full_start() for stream in model.streams)


def earliest_time(model: TrainedModel) -> float:
    """`first_start` in seconds, rounded up to the millisecond."""
    return math.ceil(first_start(model) / model.data.fps * 1000) / 1000


def check_video_covers(
    model: TrainedModel, data_dir: Path, video: str, at: float, start: int
) -> None:
    """Refuse a video the stores do not hold, or a moment past its last feature frame."""
    dims = {s.modality: model.data.feature_dim(s.modality) for s in model.streams}
    stores = open_stores(Path(data_dir), dims)
    for stream in model.streams:
        store = stores[stream.modality]
        frames = stream.grid.frames(start)
        held = store.frame_range(video)
        if held is None:
            raise store.video_not_held(
                video,
                "",
                "Check --video: ids are written as in the feature keys and the CSVs (P01_01).",
            )
        if frames is not None and int(frames.max()) > held[1]:
            last = held[1] / model.data.fps
            raise DataError(
                f"{video} at {at:g} s is past its last feature frame: the {store.name} store "
                f"holds frames {held[0]}..{held[1]} of it (up to {last:g} s).",
                f"Ask for a moment at or before {last:g} s.",
            )


def anticipate(
    model: TrainedModel, data_dir: Path, video: str, at: float, k: int = 5, device: str = "auto"
) -> Anticipation:
    """Top-k anticipated actions at every anticipation time, for the moment `at` of `video`.

    A `k` above the number of actions lists every action (`requested` keeps the k asked for).

    ConfigError for an early-recognition model: it observes an annotated action, not a moment.
    """
    if model.data.task == "early_recognition":
        raise ConfigError(
            f"{model.name} recognises actions early: it observes frames spread over an annotated "
            "action (its start and end), not the video before a moment.",
            "Score it with `sfr validate` or `sfr export submission`, which read the actions "
            "from the split's CSV.",
        )
    data_dir = Path(data_dir)
    if not math.isfinite(at) or at < 0:
        raise ConfigError(
            f"--at must be a moment in seconds from the start of the video, got {at:g}.",
            "Example: --at 12.5",
        )
    earliest = earliest_time(model)
    start = round(at * model.data.fps)
    if start < first_start(model):
        window = max(model.streams, key=lambda s: s.grid.offsets.max())
        raise DataError(
            f"{video} at {at:g} s is too early: {model.name} observes "
            f"{window.grid.offsets.max():g} s before the moment it predicts from "
            f"({counted(window.grid.steps, 'step')} of {window.grid.alpha:g} s on {window.key}).",
            f"Ask for a moment at or after {earliest:g} s.",
        )
    actions: ActionsTable = read_actions(data_dir / model.data.actions_csv)
    if actions.num_actions != model.num_classes:
        raise DataError(
            f"{model.name} was trained with {model.num_classes} actions but "
            f"{data_dir / model.data.actions_csv} lists {actions.num_actions}.",
            "Use the data folder the model was trained on (--data).",
        )
    check_video_covers(model, data_dir, video, at, start)
    segment = Segment(f"{video}@{at:g}", video, start, start)
    predictions = predict_split(
        [Member(model)], [segment], data_dir, actions, batch_size=1, device=device, k=k
    )
    names, used = class_names(data_dir)
    ids, probs = predictions.top_ids["action"][0], predictions.top_probs["action"][0]
    per_time = []
    for step in range(len(predictions.times)):
        row = []
        for action, probability in zip(ids[step], probs[step], strict=True):
            verb, noun = int(actions.verbs[action]), int(actions.nouns[action])
            row.append(
                Candidate(
                    int(action),
                    float(probability),
                    verb,
                    noun,
                    actions.names[action],
                    names["verb"].get(verb, ""),
                    names["noun"].get(noun, ""),
                )
            )
        per_time.append(tuple(row))
    return Anticipation(video, at, predictions.times, tuple(per_time), used, k)
