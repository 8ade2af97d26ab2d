"""`sfr validate`: the benchmarks' official measures for trained models, as tables and reports."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from sfr import __version__, distributed
from sfr.cli.branch_stage import DataOpt, DeviceOpt, PrecisionOpt, WorkersOpt
from sfr.cli.common import (
    SamplingOpt,
    console,
    distributed_run,
    force_option,
    sample_bars,
    validate_errors,
)
from sfr.data.loader import resolve_precision
from sfr.data.observation import position_label
from sfr.errors import ConfigError, counted
from sfr.eval.evaluation import (
    EvaluationEvent,
    EvaluationSettings,
    ModelStarted,
    SamplesDone,
    evaluate,
    load_models,
)
from sfr.eval.plots import require_matplotlib
from sfr.eval.report import claim_report_folder, write_report
from sfr.files import check_writable_dir

TASK_NAMES = {"verb": "Verb", "noun": "Noun", "action": "Action"}


def parse_weights(weights: list[str], models: list[Path]) -> tuple[list[float], list[Path]]:
    """Weights from `--weights 0.55 0.45` or `--weights 0.55,0.45`, and the real model paths.

    Typer reads `--weights 0.55 0.45` as one weight and a trailing argument `0.45`: numbers
    among the arguments that name no file are taken as further weights.
    """
    values = [part for item in weights for part in item.split(",") if part.strip()]
    paths = []
    for path in models:
        if not path.exists() and _is_number(str(path)):
            values.append(str(path))
        else:
            paths.append(path)
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        numbers = []
    if len(numbers) != len(values) or not all(math.isfinite(w) and w >= 0 for w in numbers):
        raise ConfigError(
            f"--weights must be finite non-negative numbers, got {' '.join(values)}.",
            "Example: --weights 0.55 0.45",
        )
    return numbers, paths


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


SHORT_MEASURES = {"top1": "top-1", "top5": "top-5", "mt5r": "mT5R", "mca": "mCA"}


def measures_table(entry: dict[str, Any], group: str, doc: dict[str, Any]) -> Table:
    """One model's measures of one group: one row per anticipation time (early recognition: per
    observed ratio, as the published tables), a column per measure."""
    grid_task = doc.get("task", "anticipation")
    samples = entry["samples"]
    title = doc["group_names"][group] + (
        f" — {samples['evaluated']} of {counted(samples['total'], 'segment')}"
        f" ({samples['discarded']} discarded, {samples['discarded_policy']})"
        if group == "overall"
        else ""
    )
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1))
    table.add_column(
        "observed" if grid_task == "early_recognition" else "τ", justify="right", no_wrap=True
    )
    columns = [
        (task, measure)
        for task, measures in entry["results"][group].items()
        for measure in measures
    ]
    for task, measure in columns:
        table.add_column(f"{task}\n{SHORT_MEASURES[measure]}", justify="right", no_wrap=True)
    for step, seconds in enumerate(entry["times"]):
        values = [entry["results"][group][task][measure][step] for task, measure in columns]
        table.add_row(position_label(seconds, grid_task), *(cell(v) for v in values))
    return table


def headline_table(doc: dict[str, Any]) -> Table:
    """Models side by side on the headline measure: a row per time, a column per model."""
    head = doc["headline"]
    grid_task = doc.get("task", "anticipation")
    early = grid_task == "early_recognition"
    times = sorted({t for e in doc["models"] for t in e["times"]}, reverse=not early)
    measure = f"{TASK_NAMES[head['task']]} {doc['measure_names'][head['measure']].lower()}"
    table = Table(
        title=f"{measure} (%)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("observed" if early else "τ", justify="right", no_wrap=True)
    columns = []
    for index, entry in enumerate(doc["models"], start=1):
        table.add_column(f"[{index}]", justify="right", no_wrap=True)
        values = entry["results"][head["group"]][head["task"]][head["measure"]]
        columns.append(dict(zip(entry["times"], values, strict=True)))
    for seconds in times:
        table.add_row(
            position_label(seconds, grid_task),
            *(cell(c[seconds]) if seconds in c else "" for c in columns),
        )
    return table


class EvaluationView:
    """A progress bar per model while inference runs."""

    def __init__(self) -> None:
        self.bars = sample_bars()
        self.task: Any = None

    def __call__(self, event: EvaluationEvent) -> None:
        if isinstance(event, ModelStarted):
            if self.task is not None:
                self.bars.remove_task(self.task)
            self.task = self.bars.add_task(
                f"[{event.index + 1}/{event.total}] {event.name}", total=event.samples
            )
        elif isinstance(event, SamplesDone) and self.task is not None:
            self.bars.update(self.task, completed=event.done, total=event.total)


@validate_errors
def validate(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="Models: stage folders (…/finetune, a fusion unit), whole fusion folders "
            "(their final level) or .safetensors checkpoints/bundles."
        ),
    ],
    data: DataOpt,
    split: Annotated[
        str,
        typer.Option(
            help="The split to score: validation, or EGTEA validation1-3 (default: validation; "
            "EGTEA: the model's own validationN).",
            show_default=False,
        ),
    ] = "validation",
    other_split: Annotated[
        bool,
        typer.Option(
            "--other-split",
            help="EGTEA: score on another split's validation segments, which are training "
            "segments of the model's split.",
        ),
    ] = False,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Write report.json, report.md, report.html and plots here."),
    ] = None,
    ensemble: Annotated[
        bool,
        typer.Option(
            "--ensemble",
            help="Also score the models' ensemble (weighted mean of action probabilities, or of scores with --ensemble-of).",
        ),
    ] = False,
    weights: Annotated[
        list[str] | None,
        typer.Option(
            "--weights", help="Ensemble weights in model order: 0.55 0.45 (default: equal)."
        ),
    ] = None,
    levels: Annotated[
        bool,
        typer.Option("--levels", help="A fusion folder stands for every level, not only the last."),
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Segments per inference batch.")] = 128,
    device: Annotated[str, DeviceOpt] = "auto",
    ensemble_of: Annotated[
        str,
        typer.Option(
            "--ensemble-of",
            help="What --ensemble averages: probabilities, or scores (raw action scores, as "
            "the published early-recognition fusion of rgb/flow/obj).",
        ),
    ] = "probabilities",
    precision: Annotated[str, PrecisionOpt] = "fp32",
    workers: Annotated[int | None, WorkersOpt] = None,
    force: Annotated[
        bool,
        force_option("Replace a report in --report DIR (its report and plot files only)", False),
    ] = False,
    absent_zero: Annotated[
        bool,
        typer.Option(
            "--absent-zero",
            help="Give verbs/nouns that no action contains probability 0 (published: that of action 0).",
        ),
    ] = False,
    sampling: SamplingOpt = None,
) -> None:
    """Evaluate models with the benchmark's official measures (EK55, EK100 or EGTEA)."""
    ensemble_weights, paths = parse_weights(weights or [], models)
    if ensemble_weights and not ensemble:
        raise ConfigError("--weights is only used with --ensemble.", "Add --ensemble.")
    if report is not None:
        check_writable_dir(report, "report")
        claim_report_folder(report, force)
        require_matplotlib()  # before inference, not after it
    resolve_precision(precision, distributed.process_device(device))  # before loading anything
    if ensemble_of not in ("probabilities", "scores"):
        raise ConfigError(f"--ensemble-of {ensemble_of}: unknown.", "Pass probabilities or scores.")
    if ensemble_of != "probabilities" and not ensemble:
        raise ConfigError("--ensemble-of is only used with --ensemble.", "Add --ensemble.")
    loaded = [model.use_sampling(sampling) for model in load_models(paths, levels)]
    if ensemble and not ensemble_weights:
        ensemble_weights = [1.0] * len(loaded)
    settings = EvaluationSettings(
        batch_size=batch_size,
        device=device,
        absent="zero" if absent_zero else "action0",
        ensemble_of=ensemble_of,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        workers=workers,
        other_split=other_split,
    )
    with distributed_run(device, precision):
        _validate(loaded, data, split, ensemble, ensemble_weights, settings, report)


def _validate(
    loaded: list[Any],
    data: Path,
    split: str,
    ensemble: bool,
    ensemble_weights: list[float],
    settings: EvaluationSettings,
    report: Path | None,
) -> None:
    """Score the models (every process of a torchrun run takes part), print and write (rank 0)."""
    view = EvaluationView()
    with view.bars:
        doc = evaluate(
            loaded,
            data,
            split=split,
            ensemble_weights=ensemble_weights if ensemble else None,
            settings=settings,
            sfr_version=__version__,
            progress=view,
        )
    for entry in doc["models"]:
        console.print(f"\n[bold]{entry['name']}[/]: {entry['description']}", highlight=False)
        for group in entry["results"]:
            console.print(measures_table(entry, group, doc))
        if entry["tta"]:
            tta = entry["tta"]
            console.print(
                f"Mean TtA({tta['k']}): verb {cell(tta['verb'])} s, noun {cell(tta['noun'])} s, "
                f"action {cell(tta['action'])} s\n"
            )
    if len(doc["models"]) > 1:
        console.print(headline_table(doc))
        for index, entry in enumerate(doc["models"], start=1):
            console.print(
                f"  [{index}] {entry['name']}", highlight=False, markup=False, soft_wrap=True
            )
    if report is not None and distributed.is_main():
        files = write_report(doc, report)
        console.print(f"Report written to {files.html} (and report.json, report.md, plots/).")
