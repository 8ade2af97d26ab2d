"""The benchmarks' official measures (DESIGN §5), computed from a split's predictions.

- EK55: verb/noun/action top-1 and top-5 accuracy and mean top-5 recall over many-shot classes
  at every anticipation time, and the mean time-to-action TtA(5); discarded segments excluded.
- EK100: the same three measures overall, on unseen participants and on tail classes; discarded
  segments counted as wrong.
- EGTEA Gaze+: top-1 and top-5 accuracy and mean class accuracy, per split; discarded excluded.

Values are percentages (seconds for TtA); a class-mean measure with no class present is None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfr.config import DataConfig
from sfr.data.annotations import (
    ActionsTable,
    Segment,
    check_action_ids,
    read_actions,
    read_class_list,
    read_id_list,
    read_segments,
)
from sfr.errors import ConfigError, DataError
from sfr.eval.metrics import class_mean, many_shot_actions, time_to_action
from sfr.eval.runner import TASKS, SplitPredictions
from sfr.files import missing_reason

SPLITS = {
    "ek55": ("validation", "test_seen", "test_unseen"),
    "ek100": ("validation", "test"),
    "egtea": ("validation", "validation1", "validation2", "validation3"),
}
MEASURE_NAMES = {
    "top1": "Top-1 accuracy",
    "top5": "Top-5 accuracy",
    "mt5r": "Mean top-5 recall",
    "mca": "Mean class accuracy",
}
GROUP_NAMES = {
    "overall": "All samples",
    "unseen": "Unseen participants",
    "tail": "Tail classes",
}
EK100_SUBSETS = {
    "unseen": dict.fromkeys(TASKS, "validation_unseen_participants_ids.csv"),
    "tail": {task: f"validation_tail_{task}s_ids.csv" for task in TASKS},
}
MANY_SHOT = {
    "verb": ("EPIC_many_shot_verbs.csv", "verb_class"),
    "noun": ("EPIC_many_shot_nouns.csv", "noun_class"),
}
DOWNLOAD_HINT = "Fetch the annotations with `sfr download annotations {dataset} --data {data}`."


@dataclass
class Benchmark:
    """A dataset's split with everything its official measures need."""

    dataset: str
    split: str
    csv: Path
    actions: ActionsTable
    segments: list[Segment]
    many_shot: dict[str, np.ndarray] | None = None  # EK55: task -> many-shot class ids
    subsets: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # EK100 groups

    @property
    def labelled(self) -> bool:
        return all(segment.labelled for segment in self.segments)

    @property
    def discarded_policy(self) -> str:
        return "counted as wrong" if self.dataset == "ek100" else "excluded"

    @property
    def measures(self) -> tuple[str, ...]:
        return ("top1", "top5", "mca") if self.dataset == "egtea" else ("top1", "top5", "mt5r")

    @property
    def groups(self) -> tuple[str, ...]:
        return ("overall", *self.subsets)


def split_csv(data: DataConfig, data_dir: Path, split: str) -> Path:
    """The CSV of a split of the config's dataset, or a ConfigError listing the valid names."""
    names = SPLITS[data.dataset]
    if split not in names:
        raise ConfigError(
            f"Split '{split}' does not exist for {data.dataset}.",
            f"Choose one of: {', '.join(names)}.",
        )
    if split == "validation":
        return data_dir / data.csv_name("validation")
    if data.dataset == "egtea":
        return data_dir / f"{split}.csv"
    if split == "test":
        found = [
            data_dir / n for n in ("test_timestamps.csv", "test.csv") if (data_dir / n).is_file()
        ]
        return found[0] if found else data_dir / "test_timestamps.csv"
    return data_dir / f"{split}.csv"


def existing_split_csv(data: DataConfig, data_dir: Path, split: str) -> Path:
    """`split_csv`, and a DataError naming the file when it is not in the data folder."""
    csv = split_csv(data, Path(data_dir), split)
    if not csv.is_file():
        raise DataError(
            f"The {split} split's annotation file {csv} {missing_reason(csv)}.",
            DOWNLOAD_HINT.format(dataset=data.dataset, data=data_dir),
        )
    return csv


def load_benchmark(
    data: DataConfig, data_dir: Path, split: str, num_classes: int, *, measures: bool = True
) -> Benchmark:
    """Read a split and, for labelled validation splits, the lists its measures need.

    EK55's many-shot lists and EK100's unseen-participant and tail-class id lists only select
    the segments and classes of the benchmark's measures; `measures=False` (a challenge file,
    which holds every segment's scores and no measure) does not read them. Missing lists are a
    DataError naming every missing file and the command that fetches them.
    """
    data_dir = Path(data_dir)
    csv = existing_split_csv(data, data_dir, split)
    actions = read_actions(data_dir / data.actions_csv)
    if actions.num_actions != num_classes:
        raise DataError(
            f"The model was trained with {num_classes} action classes but "
            f"{data_dir / data.actions_csv} lists {actions.num_actions}.",
            "Evaluate it on the dataset it was trained on (--data).",
        )
    segments = read_segments(csv)
    bench = Benchmark(data.dataset, split, csv, actions, segments)
    if not bench.labelled:
        return bench
    check_action_ids(segments, csv, num_classes)
    if not measures:
        return bench
    hint = DOWNLOAD_HINT.format(dataset=data.dataset, data=data_dir)
    if data.dataset == "ek55":
        _require_lists(
            data_dir,
            [name for name, _ in MANY_SHOT.values()],
            "EK55's mean top-5 recall is computed over many-shot classes",
            hint,
        )
        lists = {}
        for task, (name, column) in MANY_SHOT.items():
            lists[task] = np.array(read_class_list(data_dir / name, column), dtype=np.int64)
        lists["action"] = many_shot_actions(actions, lists["verb"], lists["noun"])
        bench.many_shot = lists
    elif data.dataset == "ek100":
        _require_lists(
            data_dir,
            list(
                dict.fromkeys(name for files in EK100_SUBSETS.values() for name in files.values())
            ),
            "EK100's validation measures on unseen participants and tail classes select "
            "their segments with these id lists",
            hint,
        )
        for group, files in EK100_SUBSETS.items():
            bench.subsets[group] = {
                task: read_id_list(data_dir / name) for task, name in files.items()
            }
    return bench


def _require_lists(data_dir: Path, names: list[str], why: str, hint: str) -> None:
    """DataError naming every file of `names` missing from `data_dir` (a folder in the place of
    one is named as such), saying `why` they are needed."""
    missing = [name for name in names if not (data_dir / name).is_file()]
    if not missing:
        return
    folders = [name for name in missing if (data_dir / name).exists()]
    found = f" ({', '.join(folders)}: a folder, not a file)" if folders else ""
    raise DataError(
        f"{data_dir} lacks {', '.join(missing)}{found}: {why}.",
        f"{hint} A challenge file (sfr export submission) does not need them.",
    )


def _percent(value: float | None) -> float | None:
    return None if value is None else round(100 * float(value), 6)


def _task_measures(
    predictions: SplitPredictions, bench: Benchmark, task: str, rows: np.ndarray
) -> dict[str, list[float | None]]:
    """One task's measures at every time over the rows selected by the boolean mask `rows`."""
    labels = predictions.labels[task][rows]
    hits = {k: predictions.hits(task, k)[rows] for k in (1, 5)}
    steps = range(len(predictions.times))
    out: dict[str, list[float | None]] = {}
    for k in (1, 5):
        out[f"top{k}"] = [_percent(hits[k][:, i].mean()) if len(labels) else None for i in steps]
    if "mt5r" in bench.measures:
        classes = bench.many_shot[task] if bench.many_shot is not None else None
        out["mt5r"] = [_percent(class_mean(hits[5][:, i], labels, classes)) for i in steps]
    if "mca" in bench.measures:
        out["mca"] = [_percent(class_mean(hits[1][:, i], labels)) for i in steps]
    return out


def score(
    predictions: SplitPredictions, bench: Benchmark, grid_task: str = "anticipation"
) -> dict[str, Any]:
    """The `samples`, `results` and `tta` parts of a report entry (schema sfr-report/1).

    Early recognition has no time to action (the published code reports none): `tta` is None.
    """
    if not bench.labelled:
        raise ConfigError(
            f"{bench.csv} has no labels: the {bench.split} split cannot be scored.",
            "Use `sfr export submission` to write a challenge file for it.",
        )
    discarded = predictions.discarded
    base = np.ones(len(discarded), bool) if bench.dataset == "ek100" else ~discarded
    ids = np.array(predictions.ids)
    results: dict[str, dict[str, Any]] = {"overall": {}}
    for task in TASKS:
        results["overall"][task] = _task_measures(predictions, bench, task, base)
    for group, per_task in bench.subsets.items():
        results[group] = {
            task: _task_measures(
                predictions, bench, task, base & np.isin(ids, sorted(per_task[task]))
            )
            for task in TASKS
        }
    tta = None
    if bench.dataset == "ek55" and grid_task == "anticipation":
        tta = {"k": 5}
        for task in TASKS:
            hits = predictions.hits(task, 5)[base]
            tta[task] = (
                round(float(time_to_action(hits, predictions.times).mean()), 6)
                if len(hits)
                else None
            )
    return {
        "samples": {
            "total": len(discarded),
            "evaluated": int(base.sum()),
            "discarded": int(discarded.sum()),
            "discarded_policy": bench.discarded_policy,
        },
        "results": results,
        "tta": tta,
    }
