"""`sfr validate`, `sfr export submission|model` and `sfr predict` as a user types them.

The models are the session's `trained_runs` (Architectures 2 and 1 on the tiny synthetic EK55
data). The numbers themselves are checked against hand computations in test_evaluation.py; here
the commands must print them faithfully, write their files and refuse bad input with exit 2.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from clitools import assert_user_error
from conftest import EVAL_FINAL, EVAL_UNITS, Ek100Data, TrainedRuns

import sfr.cli.validate as validate_module
from sfr import __version__
from sfr.eval.anticipate import anticipate
from sfr.eval.evaluation import EvaluationSettings, evaluate
from sfr.eval.submission import check_challenge, make_submission
from sfr.models.trained import load_model

pytestmark = pytest.mark.usefixtures("module_torch_thread")

CPU = ("--device", "cpu")
Cli = Callable[..., tuple[int, str, BaseException | None]]
ROW = re.compile(r"^\s*(\d+(?:\.\d+)?)s((?:\s+(?:\d+\.\d\d|–))+)\s*$")


@pytest.fixture
def evaluations(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every `evaluate` call `sfr validate` makes: its models, options and returned document."""
    calls: list[dict[str, Any]] = []
    real = validate_module.evaluate

    def spy(models: Any, data_dir: Any, **kwargs: Any) -> dict[str, Any]:
        doc = real(models, data_dir, **kwargs)
        calls.append({"models": list(models), "kwargs": kwargs, "doc": doc})
        return doc

    monkeypatch.setattr(validate_module, "evaluate", spy)
    return calls


def section(output: str, entry: dict[str, Any]) -> str:
    """The part of the output that one model's tables take, from its header line on."""
    start = output.index(f"{entry['name']}: {entry['description']}")
    rest = output[start + 1 :]
    ends = [i for i in (rest.find("\n\n\n"), rest.find("top-5 accuracy (%)")) if i >= 0]
    return output[start : start + 1 + min(ends)] if ends else output[start:]


def table_rows(text: str) -> dict[float, list[str]]:
    """`τ -> cells` of the first per-time table in `text`."""
    rows: dict[float, list[str]] = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            seconds = float(match.group(1))
            if seconds in rows:
                break
            rows[seconds] = match.group(2).split()
        elif rows and not line.strip():
            break
    return rows


def cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def assert_tables_print(output: str, doc: dict[str, Any]) -> None:
    """Each model's table holds its overall measures at every time, verb then noun then action."""
    for entry in doc["models"]:
        text = section(output, entry)
        samples = entry["samples"]
        assert (
            f"All samples — {samples['evaluated']} of {samples['total']} segments "
            f"({samples['discarded']} discarded, {samples['discarded_policy']})"
        ) in text
        header = next(line.split() for line in text.splitlines() if "τ" in line)
        assert header == ["τ"] + ["top-1", "top-5", "mT5R"] * 3
        tasks = next(line.split() for line in text.splitlines() if line.split()[:1] == ["verb"])
        assert tasks == ["verb"] * 3 + ["noun"] * 3 + ["action"] * 3
        results = entry["results"]["overall"]
        expected = {
            t: [cell(results[task][m][i]) for task in results for m in results[task]]
            for i, t in enumerate(entry["times"])
        }
        assert table_rows(text) == expected
        tta = entry["tta"]
        assert (
            f"Mean TtA(5): verb {tta['verb']:.2f} s, noun {tta['noun']:.2f} s, "
            f"action {tta['action']:.2f} s"
        ) in text


def headline_rows(output: str) -> dict[float, list[str]]:
    text = output[output.index("Action top-5 accuracy (%)") :]
    rows: dict[float, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^\s*(\d+(?:\.\d+)?)s((?:\s+\d+\.\d\d)+)\s*$", line)
        if match:
            rows[float(match.group(1))] = match.group(2).split()
    return rows


# --------------------------------------------------------------------------------------------
# sfr validate: tables


def test_validate_prints_the_measures_of_a_branch_at_every_time(
    cli: Cli, trained_runs: TrainedRuns, evaluations: list[dict[str, Any]]
) -> None:
    """One model prints verb/noun/action top-1, top-5 and mT5R per time and the TtA line."""
    code, output, _ = cli(
        "validate", trained_runs.branch("rgb@0.25", None), "--data", trained_runs.data, *CPU
    )
    assert code == 0, output
    (call,) = evaluations
    doc = call["doc"]
    assert [m.name for m in call["models"]] == ["rgb@0.25 finetune"]
    assert call["kwargs"]["ensemble_weights"] is None
    assert call["kwargs"]["split"] == "validation"
    assert "rgb@0.25 finetune: rgb branch, alpha 0.25 (2 + 4 steps, finetune)" in output
    assert_tables_print(output, doc)
    assert sorted(table_rows(output)) == [0.25, 0.5, 0.75, 1.0]
    assert "Action top-5 accuracy" not in output  # no side-by-side table for one model
    assert "Traceback" not in output


def test_validate_several_models_prints_them_side_by_side(
    cli: Cli, trained_runs: TrainedRuns, evaluations: list[dict[str, Any]]
) -> None:
    """Several models print their tables and a side-by-side headline table with a legend."""
    code, output, _ = cli(
        "validate",
        trained_runs.branch("flow@0.25"),
        trained_runs.fusion("arch2"),
        "--data",
        trained_runs.data,
        *CPU,
    )
    assert code == 0, output
    doc = evaluations[0]["doc"]
    assert_tables_print(output, doc)
    branch, fusion = (e["results"]["overall"]["action"]["top5"] for e in doc["models"])
    assert headline_rows(output) == {
        1.0: [f"{branch[0]:.2f}", f"{fusion[0]:.2f}"],
        0.75: [f"{branch[1]:.2f}"],
        0.5: [f"{branch[2]:.2f}", f"{fusion[1]:.2f}"],
        0.25: [f"{branch[3]:.2f}"],
    }
    assert "[1] flow@0.25 finetune" in output
    assert f"[2] arch2 {EVAL_FINAL}" in output


@pytest.mark.parametrize("architecture", ["arch2", "arch1"])
def test_validate_levels_lists_every_level_of_a_fusion_folder(
    cli: Cli, trained_runs: TrainedRuns, evaluations: list[dict[str, Any]], architecture: str
) -> None:
    """`--levels` on a fusion folder evaluates every unit; without it only the final one."""
    folder = trained_runs.fusion(architecture)
    code, output, _ = cli("validate", folder, "--levels", "--data", trained_runs.data, *CPU)
    assert code == 0, output
    names = [f"{architecture} {label}" for label in EVAL_UNITS[architecture]]
    doc = evaluations[0]["doc"]
    assert [e["name"] for e in doc["models"]] == names
    assert_tables_print(output, doc)
    for index, name in enumerate(names, start=1):
        assert f"[{index}] {name}" in output
    code, output, _ = cli("validate", folder, "--data", trained_runs.data, *CPU)
    assert code == 0, output
    assert [e["name"] for e in evaluations[1]["doc"]["models"]] == names[-1:]


def test_validate_ek100_prints_the_overall_unseen_and_tail_tables(
    cli: Cli, ek100: Ek100Data, evaluations: list[dict[str, Any]]
) -> None:
    """An EK100 model prints one table per group, discarded segments counted as wrong, no TtA."""
    code, output, _ = cli("validate", ek100.model, "--data", ek100.data, *CPU)
    assert code == 0, output
    entry = evaluations[0]["doc"]["models"][0]
    assert "All samples — 12 of 12 segments (1 discarded, counted as wrong)" in output
    for group, title in (("unseen", "Unseen participants"), ("tail", "Tail classes")):
        text = output[output.index(f"\n{title}") :]
        results = entry["results"][group]
        assert table_rows(text) == {
            t: [cell(results[task][m][i]) for task in results for m in results[task]]
            for i, t in enumerate(entry["times"])
        }
    assert "TtA" not in output


# --------------------------------------------------------------------------------------------
# sfr validate: ensembles


@pytest.mark.parametrize(
    "weights", [["--weights", "0.55", "0.45"], ["--weights", "0.55,0.45"]], ids=["words", "comma"]
)
def test_validate_ensemble_with_weights(
    cli: Cli,
    trained_runs: TrainedRuns,
    evaluations: list[dict[str, Any]],
    weights: list[str],
) -> None:
    """`--weights 0.55 0.45` and `--weights 0.55,0.45` both score the weighted ensemble."""
    a, b = trained_runs.fusion("arch2"), trained_runs.fusion("arch1")
    code, output, _ = cli(
        "validate", a, b, "--ensemble", *weights, "--data", trained_runs.data, *CPU
    )
    assert code == 0, output
    (call,) = evaluations
    assert call["kwargs"]["ensemble_weights"] == [0.55, 0.45]
    assert [m.source for m in call["models"]] == [load_model(p).source for p in (a, b)]
    doc = call["doc"]
    entry = doc["models"][2]
    assert entry["name"] == "ensemble"
    assert entry["members"] == [
        {"name": f"arch2 {EVAL_FINAL}", "weight": 0.55},
        {"name": f"arch1 {EVAL_FINAL}", "weight": 0.45},
    ]
    assert_tables_print(output, doc)
    assert "[3] ensemble" in output
    expected = evaluate(
        [load_model(a), load_model(b)],
        trained_runs.data,
        ensemble_weights=[0.55, 0.45],
        settings=EvaluationSettings(device="cpu"),
    )
    assert [e["results"] for e in doc["models"]] == [e["results"] for e in expected["models"]]


def test_validate_ensemble_weights_default_to_equal(
    cli: Cli, trained_runs: TrainedRuns, evaluations: list[dict[str, Any]]
) -> None:
    """`--ensemble` without weights weighs every model equally."""
    code, output, _ = cli(
        "validate",
        trained_runs.branch("rgb@0.5"),
        trained_runs.branch("obj@0.5"),
        "--ensemble",
        "--data",
        trained_runs.data,
        *CPU,
    )
    assert code == 0, output
    (call,) = evaluations
    assert call["kwargs"]["ensemble_weights"] == [1.0, 1.0]
    assert [m["weight"] for m in call["doc"]["models"][2]["members"]] == [0.5, 0.5]


def test_validate_weights_need_the_ensemble_flag(cli: Cli, trained_runs: TrainedRuns) -> None:
    """`--weights` without `--ensemble` is a user error that says to add it."""
    code, output, error = cli(
        "validate", trained_runs.branch("rgb@0.5"), "--weights", "1", "--data", trained_runs.data
    )
    assert_user_error(code, output, error, "--weights is only used with --ensemble", "--ensemble")


# --------------------------------------------------------------------------------------------
# sfr validate --report


def test_validate_report_writes_json_markdown_html_and_plots(
    cli: Cli, trained_runs: TrainedRuns, evaluations: list[dict[str, Any]], tmp_path: Path
) -> None:
    """`--report DIR` writes the evaluated JSON, Markdown, HTML with PNGs and attention plots."""
    out = tmp_path / "reports" / "first"
    code, output, _ = cli(
        "validate",
        trained_runs.branch("rgb@0.25"),
        trained_runs.fusion("arch2"),
        "--data",
        trained_runs.data,
        "--report",
        out,
        *CPU,
    )
    assert code == 0, output
    assert f"Report written to {out / 'report.html'}" in output
    doc = evaluations[0]["doc"]
    saved = json.loads((out / "report.json").read_text())
    assert saved == doc
    assert saved["sfr_version"] == __version__
    expected = evaluate(
        [load_model(trained_runs.branch("rgb@0.25")), load_model(trained_runs.fusion("arch2"))],
        trained_runs.data,
        settings=EvaluationSettings(device="cpu"),
        sfr_version=__version__,
    )
    assert {k: v for k, v in saved.items() if k != "created"} == {
        k: v for k, v in expected.items() if k != "created"
    }
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page
    markdown = (out / "report.md").read_text()
    assert f"arch2 {EVAL_FINAL}" in markdown and "rgb@0.25 finetune" in markdown
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert {"overall-top1.png", "overall-top5.png", "overall-mt5r.png"} <= set(plots)
    attention = [name for name in plots if name.startswith("attention-")]
    assert len(attention) == len(EVAL_UNITS["arch2"])
    for name in plots:
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_validate_unwritable_report_folder_fails_before_inference(
    cli: Cli, trained_runs: TrainedRuns, evaluations: list[dict[str, Any]], tmp_path: Path
) -> None:
    """An unwritable report folder is a user error naming it, before any inference."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    folder = blocker / "report"
    code, output, error = cli(
        "validate", trained_runs.fusion("arch2"), "--data", trained_runs.data, "--report", folder
    )
    assert_user_error(code, output, error, f"The report folder {folder} lies under the file")
    assert evaluations == []


def test_validate_report_without_matplotlib_fails_before_inference(
    cli: Cli,
    trained_runs: TrainedRuns,
    evaluations: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--report` without matplotlib says how to install it, before any inference."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, output, error = cli(
        "validate", trained_runs.fusion("arch2"), "--data", trained_runs.data,
        "--report", tmp_path / "report",
    )  # fmt: skip
    assert_user_error(code, output, error, 'pip install -e ".[report]"')
    assert evaluations == []


# --------------------------------------------------------------------------------------------
# sfr export and sfr predict


def test_export_submission_writes_the_challenge_json(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path
) -> None:
    """`sfr export submission` writes the valid challenge JSON atomically."""
    out = tmp_path / "submissions" / "validation.json"
    run = trained_runs.branch("rgb@0.25")
    code, output, _ = cli(
        "export", "submission", run, out, "--data", trained_runs.data, "--split", "validation", *CPU
    )
    assert code == 0, output
    assert f"Wrote {out}: 12 validation segments, version 0.1" in output
    assert sorted(p.name for p in out.parent.iterdir()) == ["validation.json"]
    document = json.loads(out.read_text())
    ids = [str(i) for i in range(24, 36)]
    assert list(document["results"]) == ids
    assert check_challenge(document, "ek55", ids, 32) == []
    expected = make_submission(load_model(run), trained_runs.data, "validation", device="cpu")
    assert document == expected


def test_export_submission_sls_and_time_options(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path
) -> None:
    """`--time` picks the anticipation time and `--sls-*` set the supervision levels."""
    out = tmp_path / "sub.json"
    run = trained_runs.fusion("arch1")
    code, output, _ = cli(
        "export", "submission", run, out, "--data", trained_runs.data, "--split", "validation",
        "--time", "0.5", "--sls-pt", "2", "--sls-tl", "3", "--sls-td", "1", *CPU,
    )  # fmt: skip
    assert code == 0, output
    document = json.loads(out.read_text())
    assert (document["sls_pt"], document["sls_tl"], document["sls_td"]) == (2, 3, 1)
    expected = make_submission(
        load_model(run), trained_runs.data, "validation", time=0.5, device="cpu"
    )
    assert document["results"] == expected["results"]
    at_1 = make_submission(load_model(run), trained_runs.data, "validation", device="cpu")
    assert document["results"] != at_1["results"]


def test_export_submission_unknown_split_lists_the_valid_ones(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path
) -> None:
    """`--split nonsense` is a user error listing the dataset's splits; nothing is written."""
    out = tmp_path / "sub.json"
    code, output, error = cli(
        "export", "submission", trained_runs.branch("rgb@0.25"), out,
        "--data", trained_runs.data, "--split", "nonsense",
    )  # fmt: skip
    assert_user_error(
        code,
        output,
        error,
        "Split 'nonsense' does not exist for ek55",
        "validation, test_seen, test_unseen",
    )
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_model_then_predict_prints_the_top_5_with_names(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path
) -> None:
    """`sfr predict` on an exported bundle prints the named top 5 at every time."""
    bundle = tmp_path / "bundle" / "arch2.safetensors"
    code, output, _ = cli("export", "model", trained_runs.fusion("arch2"), bundle)
    assert code == 0, output
    assert f"Wrote {bundle}" in output and "Architecture 2, whole model" in output
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["arch2.safetensors"]

    code, output, _ = cli(
        "predict", bundle, "--data", trained_runs.data, "--video", "P01_03", "--at", "20", *CPU
    )
    assert code == 0, output
    assert f"P01_03 at 20 s — arch2 {EVAL_FINAL}" in output
    result = anticipate(load_model(bundle), trained_runs.data, "P01_03", 20.0, device="cpu")
    lines = [line.strip() for line in output.splitlines() if re.search(r"\d\.\d{3}\s*$", line)]
    expected = []
    for seconds, candidates in zip(result.times, result.candidates, strict=True):
        for rank, c in enumerate(candidates, start=1):
            cells = [f"{seconds:g}s"] if rank == 1 else []
            cells += [str(rank), f"{c.action} {c.action_name}", f"{c.verb} {c.verb_name}"]
            cells += [f"{c.noun} {c.noun_name}", f"{c.probability:.3f}"]
            expected.append(cells)
    assert [re.split(r"\s{2,}", line) for line in lines] == expected
    assert len(expected) == 10 and all(c.verb_name and c.noun_name for c in result.candidates[0])
    assert "names appear when" not in output


@pytest.mark.parametrize(("top", "listed"), [(9, 9), (40, 32)])
def test_predict_top_above_the_verbs_or_actions_lists_what_exists(
    cli: Cli, trained_runs: TrainedRuns, top: int, listed: int
) -> None:
    """--top above the 8 verbs still lists 9 actions; above the 32 actions lists all 32."""
    code, output, _ = cli(
        "predict", trained_runs.branch("rgb@0.25"), "--data", trained_runs.data,
        "--video", "P01_03", "--at", "20", "--top", top, *CPU,
    )  # fmt: skip
    assert code == 0, output
    ranks = [int(m) for m in re.findall(r"^\s*(?:\d+(?:\.\d+)?s)?\s+(\d+)\s+\d+ ", output, re.M)]
    assert ranks == list(range(1, listed + 1)) * 4
    assert ("all 32 are listed" in output) == (top > 32)


def test_predict_too_early_names_the_earliest_moment(cli: Cli, trained_runs: TrainedRuns) -> None:
    """`--at` inside the model's observation window is a user error with the earliest time."""
    code, output, error = cli(
        "predict", trained_runs.fusion("arch1"), "--data", trained_runs.data,
        "--video", "P01_03", "--at", "1.2",
    )  # fmt: skip
    assert_user_error(
        code, output, error, "P01_03 at 1.2 s is too early", "observes 1.5 s", "at or after 1.534 s"
    )


# --------------------------------------------------------------------------------------------
# user errors: exit 2, a message, no traceback


def not_a_run(runs: TrainedRuns, tmp_path: Path) -> tuple[list[object], list[str]]:
    folder = runs.runs / "synthetic"
    return [folder], [str(folder), "not a finished run"]


def missing_run(runs: TrainedRuns, tmp_path: Path) -> tuple[list[object], list[str]]:
    return [tmp_path / "no-such-run"], [f"{tmp_path / 'no-such-run'} does not exist"]


def mismatched_times(runs: TrainedRuns, tmp_path: Path) -> tuple[list[object], list[str]]:
    models = [runs.branch("obj@0.25"), runs.fusion("arch2"), "--ensemble"]
    return models, [
        "different anticipation times",
        "obj@0.25 finetune at 1, 0.75, 0.5, 0.25 s",
        f"arch2 {EVAL_FINAL} at 1, 0.5 s",
    ]


@pytest.mark.parametrize("case", [missing_run, not_a_run, mismatched_times])
def test_validate_user_errors(
    cli: Cli,
    trained_runs: TrainedRuns,
    tmp_path: Path,
    evaluations: list[dict[str, Any]],
    case: Callable[[TrainedRuns, Path], tuple[list[object], list[str]]],
) -> None:
    """A missing run, a non-run folder and a mixed-times ensemble exit 2 naming the culprit."""
    arguments, needles = case(trained_runs, tmp_path)
    code, output, error = cli("validate", *arguments, "--data", trained_runs.data)
    assert_user_error(code, output, error, *needles)
    assert evaluations == []


def test_validate_and_export_refuse_a_model_with_other_classes(
    cli: Cli, trained_runs: TrainedRuns, synthetic_copy: Path, tmp_path: Path
) -> None:
    """validate, export and predict refuse another class count naming both numbers."""
    table = synthetic_copy / "actions.csv"
    table.write_text("".join(table.read_text().splitlines(keepends=True)[:-2]))  # 30 actions
    run = trained_runs.branch("rgb@0.25")
    code, output, error = cli("validate", run, "--data", synthetic_copy)
    assert_user_error(code, output, error, "trained with 32 action classes", "lists 30")
    code, output, error = cli(
        "export", "submission", run, tmp_path / "s.json", "--data", synthetic_copy,
        "--split", "validation",
    )  # fmt: skip
    assert_user_error(code, output, error, "32 action classes", "lists 30")
    code, output, error = cli(
        "predict", run, "--data", synthetic_copy, "--video", "P01_03", "--at", "9"
    )
    assert_user_error(code, output, error, "32 actions", "lists 30")


# --------------------------------------------------------------------------------------------
# known bugs


@pytest.mark.parametrize("command", ["submission", "model"])
def test_export_to_an_unwritable_path_is_a_user_error(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path, command: str
) -> None:
    """An output path that cannot be written is a user error naming it, not a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out.json"
    extra = (
        ["--data", trained_runs.data, "--split", "validation"] if command == "submission" else []
    )
    code, output, error = cli("export", command, trained_runs.branch("rgb@0.5"), out, *extra)
    assert_user_error(code, output, error, str(blocker))


def test_exported_files_get_the_permissions_of_a_normal_file(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path
) -> None:
    """A bundle and a submission are created with the mode the umask gives any new file."""
    old = os.umask(0o022)
    try:
        bundle, submission = tmp_path / "m.safetensors", tmp_path / "s.json"
        run = trained_runs.branch("rgb@0.5")
        assert cli("export", "model", run, bundle)[0] == 0
        code, output, _ = cli(
            "export", "submission", run, submission, "--data", trained_runs.data,
            "--split", "validation", *CPU,
        )  # fmt: skip
        assert code == 0, output
        normal = tmp_path / "normal.txt"
        normal.write_text("x")
    finally:
        os.umask(old)
    expected = stat.S_IMODE(normal.stat().st_mode)
    assert expected == 0o644
    assert stat.S_IMODE(bundle.stat().st_mode) == expected
    assert stat.S_IMODE(submission.stat().st_mode) == expected


def test_validate_batch_size_zero_is_a_user_error(cli: Cli, trained_runs: TrainedRuns) -> None:
    """`--batch-size 0` is refused as bad input (exit 2), not a traceback."""
    code, output, error = cli(
        "validate", trained_runs.branch("rgb@0.5"), "--data", trained_runs.data,
        "--batch-size", "0", *CPU,
    )  # fmt: skip
    assert code == 2, output
    assert "Traceback" not in output and not isinstance(error, ValueError)


def test_validate_into_a_closed_pipe_says_its_output_was_cut_off(
    cli: Cli, trained_runs: TrainedRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sfr validate ... | head -2` exits 141 as a signal would; it said "Checkpoints are
    written atomically: run the same command again to continue", but validate trains nothing:
    the advice now says the output was cut off and how to see all of it."""
    from sfr.cli import common

    def closed(*args: object, **kwargs: object) -> None:
        raise BrokenPipeError(32, "the reader of the output closed it")

    monkeypatch.setattr(common.console, "print", closed)
    code, output, _ = cli(
        "validate", trained_runs.branch("rgb@0.25", None), "--data", trained_runs.data, *CPU
    )
    assert code == common.OUTPUT_CLOSED_EXIT, output
    assert "Output closed (broken pipe): stopped." in output
    assert "output was cut off" in output and "without the pipe" in output
    assert "Checkpoints" not in output and "Traceback" not in output


def test_an_interrupted_validate_does_not_speak_of_checkpoints(
    cli: Cli, trained_runs: TrainedRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in a command that trains nothing: exit 130 and the advice to run it again,
    not the checkpoint advice of the training commands."""
    from sfr.cli import common

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(common.console, "print", interrupted)
    code, output, _ = cli(
        "validate", trained_runs.branch("rgb@0.25", None), "--data", trained_runs.data, *CPU
    )
    assert code == 130, output
    assert "Interrupted." in output and common.RESTART_ADVICE in output
    assert "Checkpoints" not in output and "Traceback" not in output
