"""`sfr validate` as a function: load models, run them over a split, score them into a report.

The report document (schema `sfr-report/1`, see the README) holds every number; tables, the
Markdown/HTML report and the plots are all rendered from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from sfr.errors import ConfigError, counted
from sfr.eval.benchmark import (
    GROUP_NAMES,
    MEASURE_NAMES,
    Benchmark,
    existing_split_csv,
    load_benchmark,
    score,
)
from sfr.eval.runner import AttentionMeans, Member, SplitPredictions, check_members, predict_split
from sfr.models.trained import TrainedModel, load_model, model_checkpoints

SCHEMA = "sfr-report/1"
HEADLINE = {"group": "overall", "task": "action", "measure": "top5"}
# Early recognition: the published code selects and reports on top-1 action accuracy.
EARLY_HEADLINE = {"group": "overall", "task": "action", "measure": "top1"}


@dataclass(frozen=True)
class ModelStarted:
    """Progress: inference of one model (or ensemble) over `samples` segments begins."""

    name: str
    index: int
    total: int
    samples: int


@dataclass(frozen=True)
class SamplesDone:
    """Progress: `done` of `total` segments of the current model have been scored."""

    done: int
    total: int


EvaluationEvent = ModelStarted | SamplesDone


@dataclass(frozen=True)
class EvaluationSettings:
    """How to run inference: batch size, device, verbs/nouns absent from every action, what
    an ensemble averages (see `predict_split`), precision and DataLoader workers (None: each
    model's data.num_workers)."""

    batch_size: int = 128
    device: str = "auto"
    absent: Literal["action0", "zero"] = "action0"
    ensemble_of: Literal["probabilities", "scores"] = "probabilities"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    workers: int | None = None
    other_split: bool = False  # EGTEA: score on a validation split of another training split


def load_models(sources: Sequence[Path], every_level: bool = False) -> list[TrainedModel]:
    """Every model the command line names (a fusion folder may stand for all its levels)."""
    return [
        load_model(path) for source in sources for path in model_checkpoints(source, every_level)
    ]


def check_same_dataset(models: Sequence[TrainedModel]) -> None:
    """Models scored together must come from the same dataset, task and actions table."""
    first = models[0]
    for model in models[1:]:
        if model.data.task != first.data.task:
            raise ConfigError(
                f"{first.name} is a {first.data.task} model but {model.name} a "
                f"{model.data.task} model: their scores are at different positions "
                "(anticipation times vs observed ratios).",
                "Validate models of one task together.",
            )
        if model.data.dataset != first.data.dataset or model.num_classes != first.num_classes:
            raise ConfigError(
                f"{first.name} was trained on {first.data.dataset} ({first.num_classes} actions) "
                f"but {model.name} on {model.data.dataset} ({model.num_classes} actions).",
                "Validate models of one dataset together.",
            )


def check_egtea_split(models: Sequence[TrainedModel], split: str, allowed: bool) -> None:
    """Refuse scoring an EGTEA model on the validation split of another of the 3 splits.

    EGTEA's splits share their videos: every segment of validation2 is in training1, so a
    split-1 model scored on validation2 is scored on its own training data.
    """
    if allowed or not split.startswith("validation") or split == "validation":
        return
    for model in models:
        trained = model.data.split
        if model.data.dataset == "egtea" and split != f"validation{trained}":
            raise ConfigError(
                f"{model.name} was trained on EGTEA split {trained} (training{trained}.csv), "
                f"whose training segments include those of {split}: its scores there would be "
                "measured on training data.",
                f"Use --split validation{trained} (the default), or pass --other-split to score "
                "it anyway.",
            )


def _attention_entry(means: AttentionMeans) -> dict[str, Any]:
    return {
        "unit": means.unit,
        "fuses": means.fuses,
        "inputs": list(means.inputs),
        "times": list(means.times),
        "weights": [[round(float(w), 6) for w in row] for row in means.weights],
    }


def model_entry(
    name: str,
    members: Sequence[Member],
    predictions: SplitPredictions,
    bench: Benchmark,
    task: str = "anticipation",
    mean_of: str = "probabilities",
) -> dict[str, Any]:
    """One model's (or ensemble's) entry of the report.

    `times` are anticipation times (s), or for early recognition the observed ratios.
    """
    single = members[0].model if len(members) == 1 else None
    total = sum(m.weight for m in members)
    return {
        "name": name,
        "source": str(single.source) if single else "",
        "kind": single.kind if single else "ensemble",
        "description": single.description
        if single
        else f"weighted mean of the action {mean_of} of "
        + ", ".join(m.model.name for m in members),
        "members": []
        if single
        else [{"name": m.model.name, "weight": round(m.weight / total, 6)} for m in members],
        "times": list(predictions.times),
        **score(predictions, bench, task),
        "attention": [_attention_entry(a) for a in predictions.attention],
    }


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name} ({n})", n + 1
    taken.add(candidate)
    return candidate


def evaluate(
    models: Sequence[TrainedModel],
    data_dir: Path,
    *,
    split: str = "validation",
    ensemble_weights: Sequence[float] | None = None,
    settings: EvaluationSettings = EvaluationSettings(),
    sfr_version: str = "",
    progress: Callable[[EvaluationEvent], None] | None = None,
) -> dict[str, Any]:
    """Score every model on a split; with `ensemble_weights`, also their weighted ensemble."""
    if not models:
        raise ConfigError("No model to validate.")
    check_same_dataset(models)
    jobs: list[tuple[str, list[Member]]] = [(m.name, [Member(m)]) for m in models]
    if ensemble_weights is not None:
        if len(ensemble_weights) != len(models):
            raise ConfigError(
                f"--weights gives {counted(len(ensemble_weights), 'weight')} for "
                f"{counted(len(models), 'model')}.",
                "Give one weight per model, in the order of the models.",
            )
        members = [Member(m, w) for m, w in zip(models, ensemble_weights, strict=True)]
        check_members(members)
        jobs.append(("ensemble", members))
    first = models[0]
    existing_split_csv(first.data, Path(data_dir), split)  # a wrong split before cross-split
    check_egtea_split(models, split, settings.other_split)
    bench = load_benchmark(first.data, Path(data_dir), split, first.num_classes)
    if not bench.labelled:  # before the inference, not after it
        raise ConfigError(
            f"{bench.csv} has no labels: the {bench.split} split cannot be scored.",
            "Use `sfr export submission` to write a challenge file for it.",
        )
    task = first.data.task
    report = progress or (lambda event: None)
    taken: set[str] = set()
    entries = []
    for index, (name, members) in enumerate(jobs):
        name = _unique(name, taken)
        report(ModelStarted(name, index, len(jobs), len(bench.segments)))
        predictions = predict_split(
            members,
            bench.segments,
            Path(data_dir),
            bench.actions,
            batch_size=settings.batch_size,
            device=settings.device,
            precision=settings.precision,
            workers=settings.workers,
            absent=settings.absent,
            mean_of=settings.ensemble_of,
            progress=lambda done, total: report(SamplesDone(done, total)),
        )
        entries.append(model_entry(name, members, predictions, bench, task, settings.ensemble_of))
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sfr_version": sfr_version,
        "dataset": bench.dataset,
        "task": task,
        "split": bench.split if bench.dataset != "egtea" else bench.csv.stem,
        "data": str(Path(data_dir).resolve()),
        "headline": dict(HEADLINE) if task == "anticipation" else dict(EARLY_HEADLINE),
        "measure_names": {m: MEASURE_NAMES[m] for m in bench.measures},
        "group_names": {g: GROUP_NAMES[g] for g in bench.groups},
        "models": entries,
    }
