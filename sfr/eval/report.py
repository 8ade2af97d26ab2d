"""Evaluation reports (schema `sfr-report/1`): check a report document, then write it as JSON,
Markdown, a self-contained HTML page and PNG plots.

The evaluation builds the document; everything here is derived from the document alone, so a
saved report.json can be rendered again (`sfr report`). Both text formats are rendered from one
list of blocks (headings, facts, tables, figures), so they always say the same thing.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from sfr.data.observation import position_header, position_label
from sfr.errors import DataError, SfrError
from sfr.eval import plots
from sfr.files import (
    atomic_write,
    atomic_write_text,
    check_folder_path,
    missing_reason,
    refuse_existing,
    remove_stale_temp_files,
)

SCHEMA = "sfr-report/1"
TASKS = ("verb", "noun", "action")
DATASET_NAMES = {"ek55": "EPIC-Kitchens-55", "ek100": "EPIC-Kitchens-100", "egtea": "EGTEA Gaze+"}
PLOTS_DIR = "plots"
NULL = "–"  # an undefined value; a blank cell is a time at which a model was not evaluated
MAX_PROBLEMS = 12  # problems listed in one error message
WEIGHT_SUM_TOLERANCE = 0.01
CHECK_HINT = (
    "Reports are written by `sfr validate --report DIR`; write the report again with this "
    "version of sfr rather than editing it by hand."
)

# --------------------------------------------------------------------------------------------
# schema

Percent = Annotated[float, Field(ge=0, le=100)]
Weight = Annotated[float, Field(ge=0, le=1)]
Seconds = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    """JSON types only (no "1.5" for a number), no unknown keys, no NaN or infinity."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class Headline(_Strict):
    """The measure of the side-by-side table, as keys of the results."""

    group: str
    task: Literal["verb", "noun", "action"]
    measure: str


class Samples(_Strict):
    """Samples a model was scored on, and what became of the discarded ones."""

    total: Count
    evaluated: Count
    discarded: Count
    discarded_policy: Literal["excluded", "counted as wrong"]


class Member(_Strict):
    """A model of an ensemble and the weight of its scores."""

    name: str
    weight: float


class TimeToAction(_Strict):
    """Mean time to action TtA(k) per task, in seconds (EK55; None where undefined)."""

    k: Annotated[int, Field(ge=1)]
    verb: Annotated[float, Field(ge=0)] | None
    noun: Annotated[float, Field(ge=0)] | None
    action: Annotated[float, Field(ge=0)] | None


class AttentionUnit(_Strict):
    """Mean attention weight of each input of one fusion unit, a row per anticipation time."""

    unit: str
    fuses: Literal["modalities", "rates"]
    inputs: list[str] = Field(min_length=1)
    times: list[Seconds] = Field(min_length=1)
    weights: list[list[Weight]]


class TaskResults(_Strict):
    """measure -> one value per anticipation time (percent, None where undefined), per task."""

    verb: dict[str, list[Percent | None]]
    noun: dict[str, list[Percent | None]]
    action: dict[str, list[Percent | None]]


class ModelResults(_Strict):
    """One evaluated model: what it is, and its measures at its own anticipation times."""

    name: str = Field(min_length=1)
    source: str
    kind: Literal["branch", "fusion", "ensemble"]
    description: str
    members: list[Member]
    times: list[Seconds] = Field(min_length=1)
    samples: Samples
    results: dict[str, TaskResults] = Field(min_length=1)
    tta: TimeToAction | None
    attention: list[AttentionUnit]


class Report(_Strict):
    """A whole report document."""

    schema_: Literal["sfr-report/1"] = Field(alias="schema")
    created: str
    sfr_version: str
    dataset: Literal["ek55", "ek100", "egtea"]
    # early_recognition: every `times` list holds observed ratios of the action, ascending
    task: Literal["anticipation", "early_recognition"] = "anticipation"
    split: str
    data: str
    headline: Headline
    measure_names: dict[str, str] = Field(min_length=1)
    group_names: dict[str, str] = Field(min_length=1)
    models: list[ModelResults] = Field(min_length=1)


def read_report(path: Path) -> dict[str, Any]:
    """The checked document of a report.json (or of the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise DataError(
            f"Report {path} {missing_reason(path)}.",
            "Pass the report.json written by `sfr validate --report DIR` (or its folder).",
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno}).",
            CHECK_HINT,
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"Report {path} cannot be read: {error}.") from None
    return check_report(doc, str(path))


def check_report(doc: Any, source: str) -> dict[str, Any]:
    """The document as plain JSON data, once checked against schema sfr-report/1.

    Raises a DataError listing each problem as `source: key.path: what is wrong`.
    """
    data = _json_data(doc, source)
    _parse(data, source)
    return data


def _json_data(doc: Any, source: str) -> dict[str, Any]:
    """`doc` through JSON and back: tuples become lists, and what JSON cannot hold is named."""
    try:
        data = json.loads(json.dumps(doc))
    except (TypeError, ValueError) as error:
        raise DataError(f"{source}: the report is not JSON data: {error}.", CHECK_HINT) from None
    if not isinstance(data, dict):
        raise DataError(
            f"{source}: a report is a JSON object, found {type(data).__name__}.", CHECK_HINT
        )
    return data


def _typed(doc: Any) -> Report:
    """The typed report of a document given to a renderer."""
    return _parse(_json_data(doc, "report"), "report")


def _parse(data: dict[str, Any], source: str) -> Report:
    """The typed report, or a DataError naming the key path of every problem."""
    schema = data.get("schema")
    if schema != SCHEMA:
        found = "no `schema` key" if schema is None else f"schema {schema!r}"
        raise DataError(
            f"{source}: {found}; this version of sfr reads reports of schema {SCHEMA!r}.",
            "Render the report with the sfr version that wrote it, or write it again with "
            "`sfr validate --report DIR`.",
        )
    try:
        report = Report.model_validate(data)
    except ValidationError as error:
        problems = [_describe_problem(problem) for problem in error.errors()]
    else:
        problems = list(_consistency_problems(report))
    if problems:
        more = len(problems) - MAX_PROBLEMS
        lines = [f"{source}: {line}" for line in problems[:MAX_PROBLEMS]]
        if more > 0:
            lines.append(f"… and {more} more")
        raise DataError("Invalid report:\n" + "\n".join(lines), CHECK_HINT)
    return report


def _describe_problem(problem: ErrorDetails) -> str:
    """`key.path[i]: message` for one pydantic error."""
    path = ""
    for part in problem["loc"]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    message = problem["msg"]
    if problem["type"] == "missing":
        message = "missing key"
    elif problem["type"] == "extra_forbidden":
        message = "unknown key"
    elif not isinstance(problem["input"], (dict, list)):
        message = f"{message}, found {json.dumps(problem['input'])}"
    return f"{path}: {message}" if path else message


def _consistency_problems(report: Report) -> Iterator[str]:
    """What the types alone do not catch: names, lengths, orders and sums that must agree."""
    groups, measures, headline = report.group_names, report.measure_names, report.headline
    if headline.group not in groups:
        yield (
            f"headline.group: {headline.group!r} is not a key of group_names ({', '.join(groups)})"
        )
    if headline.measure not in measures:
        yield (
            f"headline.measure: {headline.measure!r} is not a key of measure_names "
            f"({', '.join(measures)})"
        )
    first_index: dict[str, int] = {}
    for i, model in enumerate(report.models):
        at = f"models[{i}]"
        if model.name in first_index:
            yield f"{at}.name: {model.name!r} is also the name of models[{first_index[model.name]}]"
        first_index.setdefault(model.name, i)
        yield from _order_problems(report, model.times, f"{at}.times")
        yield from _samples_problems(model.samples, f"{at}.samples")
        if model.kind == "ensemble" and not model.members:
            yield f"{at}.members: an ensemble needs its members"
        if model.kind != "ensemble" and model.members:
            yield f"{at}.members: only an ensemble has members, this is a {model.kind}"
        if model.kind != "fusion" and model.attention:
            yield f"{at}.attention: only a fusion model has attention, this is a {model.kind}"
        for group, tasks in model.results.items():
            if group not in groups:
                yield f"{at}.results.{group}: not a key of group_names ({', '.join(groups)})"
            for task in TASKS:
                for measure, values in getattr(tasks, task).items():
                    path = f"{at}.results.{group}.{task}.{measure}"
                    if measure not in measures:
                        yield f"{path}: not a key of measure_names ({', '.join(measures)})"
                    if len(values) != len(model.times):
                        yield (
                            f"{path}: expected {len(model.times)} values (one per time), "
                            f"found {len(values)}"
                        )
        if headline.group not in model.results:
            yield f"{at}.results.{headline.group}: missing (the group of the headline measure)"
        elif _values(model, headline.group, headline.task, headline.measure) is None:
            yield (
                f"{at}.results.{headline.group}.{headline.task}.{headline.measure}: "
                "missing (the headline measure)"
            )
        yield from _attention_problems(report, model, at)


def _samples_problems(samples: Samples, path: str) -> Iterator[str]:
    """Discarded samples are either left out of the measures or scored as wrong answers."""
    if samples.discarded > samples.total:
        yield f"{path}: {samples.discarded} discarded of only {samples.total}"
    elif samples.discarded_policy == "excluded":
        if samples.evaluated + samples.discarded != samples.total:
            yield (
                f"{path}: evaluated + discarded = {samples.evaluated + samples.discarded}, "
                f"but total = {samples.total} (discarded samples are excluded)"
            )
    elif samples.evaluated != samples.total:
        yield (
            f"{path}: evaluated = {samples.evaluated}, but total = {samples.total} "
            "(discarded samples are counted as wrong, so every sample is evaluated)"
        )


def _attention_problems(report: Report, model: ModelResults, at: str) -> Iterator[str]:
    """Attention units: unique names, one row per time, one weight per input, rows summing to 1."""
    units: set[str] = set()
    for j, unit in enumerate(model.attention):
        path = f"{at}.attention[{j}]"
        if unit.unit in units:
            yield f"{path}.unit: {unit.unit!r} appears twice in {at}.attention"
        units.add(unit.unit)
        yield from _order_problems(report, unit.times, f"{path}.times")
        if len(unit.weights) != len(unit.times):
            yield (
                f"{path}.weights: expected {len(unit.times)} rows (one per time), "
                f"found {len(unit.weights)}"
            )
        for r, row in enumerate(unit.weights):
            if len(row) != len(unit.inputs):
                yield (
                    f"{path}.weights[{r}]: expected {len(unit.inputs)} values (one per input), "
                    f"found {len(row)}"
                )
            elif abs(sum(row) - 1.0) > WEIGHT_SUM_TOLERANCE:
                yield f"{path}.weights[{r}]: the weights sum to {sum(row):.4f}, not 1"


def _order_problems(report: Report, times: Sequence[float], path: str) -> Iterator[str]:
    """Anticipation times strictly descending; observed ratios strictly ascending, at most 1."""
    if report.task == "early_recognition":
        for before, after in itertools.pairwise(times):
            if after <= before:
                yield (
                    f"{path}: observed ratios must be strictly ascending, "
                    f"found {after:g} after {before:g}"
                )
                return
        if times and times[-1] > 1:
            yield f"{path}: an observed ratio is at most 1, found {times[-1]:g}"
        return
    yield from _descending_problems(times, path)


def _descending_problems(times: Sequence[float], path: str) -> Iterator[str]:
    """Anticipation times must be strictly descending (largest first)."""
    for before, after in itertools.pairwise(times):
        if after >= before:
            yield (
                f"{path}: must be strictly descending (largest first), "
                f"found {after:g} after {before:g}"
            )
            return


# --------------------------------------------------------------------------------------------
# writing


@dataclass(frozen=True)
class ReportFiles:
    """The files a report was written to."""

    json: Path
    markdown: Path
    html: Path
    plots: tuple[Path, ...]

    def all(self) -> tuple[Path, ...]:
        """Every file written, the documents first."""
        return (self.json, self.markdown, self.html, *self.plots)


REPORT_NAMES = ("report.json", "report.md", "report.html")


def claim_report_folder(folder: Path, force: bool) -> None:
    """sfr's overwrite rule for a report folder, checked before any work: a report there
    (report.json, report.md or report.html) is replaced only with `force`, which overwrites
    those files and the plots the new report draws, nothing else. Temp files of report writes
    killed midway are deleted. Raises RunError naming the existing file.
    """
    folder = Path(folder)
    remove_stale_temp_files(folder, *REPORT_NAMES)
    remove_stale_temp_files(folder / PLOTS_DIR)
    for name in REPORT_NAMES:
        refuse_existing(folder / name, "report", force)


def write_report(doc: Any, out_dir: Path) -> ReportFiles:
    """Check the document, render everything in memory, then write each file atomically.

    Writes report.json, report.md, report.html and plots/*.png under `out_dir` (created).
    """
    out_dir = check_folder_path(Path(out_dir), "report")  # before the rendering
    data = check_report(doc, "report")
    pngs = render_plots(data)
    markdown = render_markdown(data, {name: f"{PLOTS_DIR}/{name}" for name in pngs})
    page = render_html(data, pngs)
    files = ReportFiles(
        json=out_dir / "report.json",
        markdown=out_dir / "report.md",
        html=out_dir / "report.html",
        plots=tuple(out_dir / PLOTS_DIR / name for name in pngs),
    )
    try:
        (out_dir / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
        for path, png in zip(files.plots, pngs.values()):
            atomic_write(path, lambda tmp, png=png: tmp.write_bytes(png))
        atomic_write_text(files.json, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(files.markdown, markdown)
        atomic_write_text(files.html, page)
    except OSError as error:
        raise SfrError(
            f"Cannot write the report to {out_dir}: {error.strerror or error}.",
            "Choose a folder you can write to.",
        ) from None
    return files


# --------------------------------------------------------------------------------------------
# plots


@dataclass(frozen=True)
class _MeasurePlot:
    """All models' values of one measure in one group, a panel per task."""

    name: str
    caption: str
    group: str
    measure: str


@dataclass(frozen=True)
class _AttentionPlot:
    """The attention weights of one fusion unit of one model."""

    name: str
    caption: str
    model: int
    unit: int


def render_plots(doc: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of every plot of the report, by file name (see `_plot_specs` for the names)."""
    report = _typed(doc)
    pngs = {}
    for spec in _plot_specs(report):
        if isinstance(spec, _MeasurePlot):
            pngs[spec.name] = _measure_png(report, spec)
        else:
            model = report.models[spec.model]
            unit = model.attention[spec.unit]
            # the model's name first: two models may hold units of the same label
            title = f"{model.name}: attention in {unit.unit} (fuses {unit.fuses})"
            pngs[spec.name] = plots.attention_png(
                unit.times, unit.inputs, unit.weights, title, task=report.task
            )
    return pngs


def _measure_png(report: Report, spec: _MeasurePlot) -> bytes:
    """One measure of one group: a verb, a noun and an action panel, a line per model."""
    panels = {}
    for task in TASKS:
        panels[task.capitalize()] = [
            plots.Curve(model.name, model.times, values, style=i)
            for i, model in enumerate(report.models)
            if (values := _values(model, spec.group, task, spec.measure)) is not None
        ]
    return plots.curves_png(
        panels, f"{report.measure_names[spec.measure]} (%)", spec.caption, task=report.task
    )


def _plot_specs(report: Report) -> list[_MeasurePlot | _AttentionPlot]:
    """Every plot, named `<group>-<measure>.png` and `attention-<model>-<unit>.png`."""
    names = _UniqueNames()
    specs: list[_MeasurePlot | _AttentionPlot] = []
    for group in _used_groups(report):
        for measure in _used_measures(report, group):
            specs.append(
                _MeasurePlot(
                    name=names.take(f"{_slug(group)}-{_slug(measure)}"),
                    caption=f"{report.group_names[group]}: {report.measure_names[measure]}",
                    group=group,
                    measure=measure,
                )
            )
    for i, model in enumerate(report.models):
        for j, unit in enumerate(model.attention):
            specs.append(
                _AttentionPlot(
                    name=names.take(f"attention-{_slug(model.name)}-{_slug(unit.unit)}"),
                    caption=f"{model.name}: attention of {unit.unit}",
                    model=i,
                    unit=j,
                )
            )
    return specs


@dataclass
class _UniqueNames:
    """PNG file names, suffixed -2, -3, ... where two slugs collide."""

    taken: set[str] = field(default_factory=set)

    def take(self, stem: str) -> str:
        name, n = f"{stem}.png", 1
        while name in self.taken:
            n += 1
            name = f"{stem}-{n}.png"
        self.taken.add(name)
        return name


def _slug(text: str) -> str:
    """A safe file-name part: lower-case letters, digits, dots and dashes."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower())[:60].strip("-.") or "x"


# --------------------------------------------------------------------------------------------
# the document as blocks, shared by Markdown and HTML


@dataclass(frozen=True)
class _Heading:
    """A section title (level 1 to 3)."""

    level: int
    text: str


@dataclass(frozen=True)
class _Facts:
    """`label: value` lines; values in `code` are shown as code (paths)."""

    items: list[tuple[str, str]]
    code: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Note:
    """A short explanatory paragraph."""

    text: str


@dataclass(frozen=True)
class _Table:
    """A captioned table: a label column, then value columns."""

    caption: str
    header: list[str]
    rows: list[list[str]]  # the first cell of each row is its label
    bold: frozenset[tuple[int, int]] = frozenset()  # (row, column) of cells to emphasise


@dataclass(frozen=True)
class _Figure:
    """A plot by file name, shown where its PNG is available."""

    plot: str
    caption: str


_Block = _Heading | _Facts | _Note | _Table | _Figure


def _blocks(report: Report) -> list[_Block]:
    """The report's content in reading order."""
    headline = report.headline
    headline_name = (
        f"{headline.task.capitalize()} {report.measure_names[headline.measure]}, "
        f"{report.group_names[headline.group]}"
    )
    specs = _plot_specs(report)
    blocks: list[_Block] = [
        _Heading(1, f"{_task_title(report)}: {_dataset_name(report)}, {report.split}"),
        _Facts(
            [
                ("Dataset", f"{_dataset_name(report)} ({report.dataset}), split {report.split}"),
                ("Data", report.data),
                ("Created", f"{report.created} by sfr {report.sfr_version}"),
                ("Models", str(len(report.models))),
            ],
            code=frozenset({"Data"}),
        ),
        _Heading(2, f"Headline: {headline_name}"),
        *_headline_blocks(report, headline_name),
    ]
    for group in _used_groups(report):
        blocks.append(
            _Heading(2, f"{report.group_names[group]}: models by {_position_name(report)}")
        )
        blocks += [
            _Figure(s.name, s.caption)
            for s in specs
            if isinstance(s, _MeasurePlot) and s.group == group
        ]
    attention_plots = [s for s in specs if isinstance(s, _AttentionPlot)]
    for i in range(len(report.models)):
        blocks += _model_blocks(report, i, attention_plots)
    return blocks


# More anticipation times than this (16 for a SlowFast model at alpha 0.125) make a row per
# model wider than a 1280 px page: the headline table is then turned to a row per time.
MAX_TIME_COLUMNS = 8


def _headline_blocks(report: Report, headline_name: str) -> list[_Block]:
    """The headline table and its note: a row per model, or a row per time when times are many."""
    times = {t for model in report.models for t in model.times}
    if len(times) <= MAX_TIME_COLUMNS:
        return [
            _headline_table(report, headline_name),
            _Note(
                f"Values in percent at each {_position_words(report)}; "
                f"{NULL} marks an undefined value, a blank cell a time at which the model was "
                f"not evaluated; the best value of each column is in bold."
            ),
        ]
    legend = "; ".join(f"[{i}] {m.name}" for i, m in enumerate(report.models, start=1))
    return [
        _headline_by_time(report, headline_name),
        _Note(
            f"Values in percent, a row per {_position_words(report)}, a "
            f"column per model: {legend}. {NULL} marks an undefined value, a blank cell a time "
            f"at which the model was not evaluated; the best value of each row is in bold."
        ),
    ]


def _headline_by_time(report: Report, headline_name: str) -> _Table:
    """The headline table turned: a row per time, a column per model labelled [1], [2], ..."""
    headline = report.headline
    early = report.task == "early_recognition"
    times = sorted({t for model in report.models for t in model.times}, reverse=not early)
    by_model = [
        dict(zip(m.times, _values(m, headline.group, headline.task, headline.measure) or []))
        for m in report.models
    ]
    rows, bold = [], set()
    for r, t in enumerate(times):
        values = [column.get(t) for column in by_model]
        best = max((v for v in values if v is not None), default=None)
        bold |= {(r, c + 1) for c, v in enumerate(values) if best is not None and v == best}
        rows.append([_position(report, t), *(_number(c[t]) if t in c else "" for c in by_model)])
    return _Table(
        caption=f"{headline_name} (%)",
        header=[
            "observed" if early else "τ",
            *(f"[{i}]" for i in range(1, len(report.models) + 1)),
        ],
        rows=rows,
        bold=frozenset(bold),
    )


def _headline_table(report: Report, headline_name: str) -> _Table:
    """Models side by side at the union of their times; the best value per column in bold."""
    headline = report.headline
    early = report.task == "early_recognition"
    times = sorted({t for model in report.models for t in model.times}, reverse=not early)
    columns: list[list[float | None]] = [[] for _ in times]
    rows = []
    for model in report.models:
        values = _values(model, headline.group, headline.task, headline.measure) or []
        by_time = dict(zip(model.times, values))
        row = [model.name]
        for c, t in enumerate(times):
            value = by_time.get(t)
            columns[c].append(value)
            row.append(_number(value) if t in by_time else "")
        rows.append(row)
    bold = set()
    for c, column in enumerate(columns):
        best = max((v for v in column if v is not None), default=None)
        bold |= {(r, c + 1) for r, v in enumerate(column) if best is not None and v == best}
    return _Table(
        caption=f"{headline_name} (%)",
        header=["Model", *(_position(report, t) for t in times)],
        rows=rows,
        bold=frozenset(bold),
    )


def _model_blocks(
    report: Report, index: int, attention_plots: list[_AttentionPlot]
) -> list[_Block]:
    """One model: what it is, its samples, a table per group, TtA, attention tables and plots."""
    model = report.models[index]
    samples = model.samples
    facts = [("Kind", f"{model.kind}: {model.description}" if model.description else model.kind)]
    if model.source:
        facts.append(("Source", model.source))
    if model.members:
        facts.append(
            ("Members", ", ".join(f"{m.name} (weight {m.weight:g})" for m in model.members))
        )
    facts += [
        (
            "Samples",
            f"{samples.evaluated} of {samples.total} evaluated, {samples.discarded} discarded "
            f"({samples.discarded_policy})",
        ),
        (
            _position_name(report).capitalize() + "s",
            ", ".join(_position(report, t) for t in model.times),
        ),
    ]
    if model.tta is not None:
        tta = model.tta
        facts.append(
            (
                f"Mean time to action TtA({tta.k})",
                ", ".join(
                    f"{task} {NULL if v is None else f'{v:.2f} s'}"
                    for task, v in (("verb", tta.verb), ("noun", tta.noun), ("action", tta.action))
                ),
            )
        )
    blocks: list[_Block] = [_Heading(2, model.name), _Facts(facts, code=frozenset({"Source"}))]
    for group in report.group_names:
        if group not in model.results:
            continue
        rows = [
            [f"{task.capitalize()} {report.measure_names[measure]}", *map(_number, values)]
            for task in TASKS
            for measure in report.measure_names
            if (values := getattr(model.results[group], task).get(measure)) is not None
        ]
        blocks.append(
            _Table(
                caption=f"{report.group_names[group]} (%)",
                header=["Measure", *(_position(report, t) for t in model.times)],
                rows=rows,
            )
        )
    for j, unit in enumerate(model.attention):
        blocks.append(
            _Table(
                caption=f"Attention of {unit.unit} (fuses {unit.fuses}): mean weight of each input",
                header=[position_header(report.task), *unit.inputs],
                rows=[
                    [position_label(t, report.task, unit=False), *(f"{w:.2f}" for w in row)]
                    for t, row in zip(unit.times, unit.weights)
                ],
            )
        )
        blocks += [
            _Figure(s.name, s.caption) for s in attention_plots if (s.model, s.unit) == (index, j)
        ]
    return blocks


def _task_title(report: Report) -> str:
    return (
        "Early action recognition" if report.task == "early_recognition" else "Action anticipation"
    )


def _position_name(report: Report) -> str:
    """What a column is: `anticipation time` or `observed ratio`."""
    return "observed ratio" if report.task == "early_recognition" else "anticipation time"


def _position_words(report: Report) -> str:
    if report.task == "early_recognition":
        return "observed ratio (share of the action seen, as the published early recognition)"
    return "anticipation time τ (seconds before the action)"


def _position(report: Report, value: float) -> str:
    """A column header: `1 s` or `12.5%`."""
    if report.task == "early_recognition":
        return position_label(value, report.task)
    return f"{value:g} s"


def _values(model: ModelResults, group: str, task: str, measure: str) -> list[float | None] | None:
    """A model's values of one measure, or None where it does not report it."""
    tasks = model.results.get(group)
    return None if tasks is None else getattr(tasks, task).get(measure)


def _used_groups(report: Report) -> list[str]:
    """Groups some model reports, in the order of group_names."""
    return [g for g in report.group_names if any(g in m.results for m in report.models)]


def _used_measures(report: Report, group: str) -> list[str]:
    """Measures some model reports in `group` for some task, in the order of measure_names."""
    return [
        measure
        for measure in report.measure_names
        if any(
            _values(m, group, task, measure) is not None for m in report.models for task in TASKS
        )
    ]


def _dataset_name(report: Report) -> str:
    return DATASET_NAMES[report.dataset]


def _number(value: float | None) -> str:
    return NULL if value is None else f"{value:.2f}"


# --------------------------------------------------------------------------------------------
# Markdown


def render_markdown(doc: dict[str, Any], plot_paths: Mapping[str, str]) -> str:
    """The report as Markdown; each plot named in `plot_paths` is linked to its path there."""
    report = _typed(doc)
    parts = []
    for block in _blocks(report):
        if isinstance(block, _Heading):
            parts.append(f"{'#' * block.level} {_md(block.text)}")
        elif isinstance(block, _Facts):
            parts.append(
                "\n".join(
                    f"- **{_md(label)}:** {_md_code(value) if label in block.code else _md(value)}"
                    for label, value in block.items
                )
            )
        elif isinstance(block, _Note):
            parts.append(f"*{_md(block.text)}*")
        elif isinstance(block, _Table):
            parts.append(_md_table(block))
        elif block.plot in plot_paths:
            parts.append(f"![{_md(block.caption)}]({plot_paths[block.plot]})")
    return "\n\n".join(parts) + "\n"


def _md_table(table: _Table) -> str:
    """A pipe table with its caption above; numbers right-aligned."""

    def cell(r: int, c: int, text: str) -> str:
        text = _md(text)
        return f"**{text}**" if (r, c) in table.bold and text else text

    lines = [
        f"**{_md(table.caption)}**",
        "",
        "| " + " | ".join(_md(h) for h in table.header) + " |",
        "|:--" + "|--:" * (len(table.header) - 1) + "|",
    ]
    lines += [
        "| " + " | ".join(cell(r, c, t) for c, t in enumerate(row)) + " |"
        for r, row in enumerate(table.rows)
    ]
    return "\n".join(lines)


def _md(text: str) -> str:
    """Text with Markdown's special characters escaped (names may hold `|`, `*`, `<`, ...)."""
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)


def _md_code(text: str) -> str:
    """Inline code, with a fence longer than any run of backticks inside."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"{fence}{text}{fence}"


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; color: #1b1b1b; line-height: 1.5; max-width: 72rem; margin: 2rem auto;
  padding: 0 1.5rem; }
h1 { font-size: 1.7rem; margin-bottom: 0.5rem; }
h2 { font-size: 1.3rem; margin-top: 2.5rem; border-bottom: 1px solid #ccc;
  padding-bottom: 0.2rem; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.15rem 1rem; }
dt { font-weight: 600; }
dd { margin: 0; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  font-size: 0.9em; background: #f3f3f3; padding: 0 0.25em; border-radius: 3px;
  overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.75rem 0 1.5rem; font-size: 0.92rem; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.35rem; }
tbody th { font-weight: normal; }
th, td { padding: 0.3rem 0.7rem; border-bottom: 1px solid #e2e2e2; white-space: nowrap; }
thead th { border-bottom: 2px solid #444; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:hover { background: #f7f9fc; }
p.note { color: #555; font-size: 0.9rem; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9rem; }
"""


def render_html(doc: dict[str, Any], plots: Mapping[str, bytes]) -> str:
    """The report as one self-contained page: inline CSS, plots embedded as data URIs, no script."""
    report = _typed(doc)
    title = html.escape(f"Action anticipation: {_dataset_name(report)}, {report.split}")
    body = []
    for block in _blocks(report):
        if isinstance(block, _Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, _Facts):
            items = "".join(
                f"<dt>{html.escape(label)}</dt><dd>"
                + (
                    f"<code>{html.escape(value)}</code>"
                    if label in block.code
                    else html.escape(value)
                )
                + "</dd>"
                for label, value in block.items
            )
            body.append(f"<dl>{items}</dl>")
        elif isinstance(block, _Note):
            body.append(f'<p class="note">{html.escape(block.text)}</p>')
        elif isinstance(block, _Table):
            body.append(_html_table(block))
        elif block.plot in plots:
            data = base64.b64encode(plots[block.plot]).decode("ascii")
            caption = html.escape(block.caption)
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _html_table(table: _Table) -> str:
    """A table with its caption; value cells right-aligned, emphasised cells in <strong>."""
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in table.header)
    rows = []
    for r, row in enumerate(table.rows):
        cells = [f'<th scope="row">{html.escape(row[0])}</th>']
        for c, text in enumerate(row[1:], start=1):
            text = html.escape(text)
            cells.append(
                '<td class="num">'
                + (f"<strong>{text}</strong>" if (r, c) in table.bold else text)
                + "</td>"
            )
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<div class="scroll"><table><caption>{html.escape(table.caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )
