"""Report rendering: schema check, report.json/md/html and PNG plots, and `sfr report`."""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from clitools import assert_user_error

from sfr.errors import DataError, SfrError
from sfr.eval import plots
from sfr.eval.report import (
    check_report,
    render_html,
    render_markdown,
    render_plots,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EIGHT_TIMES = (2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25)
FOUR_TIMES = (2.0, 1.5, 1.0, 0.5)
EK_MEASURES = {"top1": "Top-1 accuracy", "top5": "Top-5 accuracy", "mt5r": "Mean top-5 recall"}


def ramp(start: float, step: float, n: int) -> list[float | None]:
    """n values rising by `step` (accuracy grows as the action gets closer)."""
    return [round(start + step * i, 2) for i in range(n)]


def task_results(base: float, n: int, measures: list[str]) -> dict[str, dict[str, list]]:
    """verb / noun / action results with every measure, distinct and plausible values."""
    out = {}
    for t, task in enumerate(("verb", "noun", "action")):
        out[task] = {m: ramp(base - 15 * t + 15 * k, 1.5, n) for k, m in enumerate(measures)}
    return out


def model(name: str, kind: str, times: tuple[float, ...], groups: list[str], measures: list[str],
          base: float, tta: bool = False) -> dict[str, Any]:  # fmt: skip
    n = len(times)
    return {
        "name": name,
        "source": f"runs/{name}/best.safetensors",
        "kind": kind,
        "description": f"{kind} model {name}",
        "members": [],
        "times": list(times),
        "samples": {
            "total": 120,
            "evaluated": 110,
            "discarded": 10,
            "discarded_policy": "excluded",
        },
        "results": {g: task_results(base - 5 * i, n, measures) for i, g in enumerate(groups)},
        "tta": {"k": 5, "verb": 1.21, "noun": 0.93, "action": 0.55} if tta else None,
        "attention": [],
    }


def header(dataset: str, split: str, measures: dict[str, str], groups: dict[str, str]) -> dict:
    return {
        "schema": "sfr-report/1",
        "created": "2026-11-21T10:00:00+00:00",
        "sfr_version": "0.1.0",
        "dataset": dataset,
        "split": split,
        "data": "/abs/path/to/DATA",
        "headline": {"group": "overall", "task": "action", "measure": "top5"},
        "measure_names": measures,
        "group_names": groups,
    }


def ek55_doc() -> dict[str, Any]:
    """A branch at 8 times and a fusion at 4 times with two attention units; one null value."""
    measures = list(EK_MEASURES)
    branch = model("rgb-a0.25-enc6-ant8/finetune", "branch", EIGHT_TIMES, ["overall"], measures,
                   40.0, tta=True)  # fmt: skip
    branch["results"]["overall"]["verb"]["mt5r"][0] = None
    fusion = model("fusion <script>alert(1)</script>", "fusion", FOUR_TIMES, ["overall"],
                   measures, 45.0, tta=True)  # fmt: skip
    fusion["attention"] = [
        {
            "unit": "rgb+flow+obj@0.125",
            "fuses": "modalities",
            "inputs": ["rgb@0.125", "flow@0.125", "obj@0.125"],
            "times": list(FOUR_TIMES),
            "weights": [[0.3, 0.5, 0.2], [0.35, 0.45, 0.2], [0.4, 0.4, 0.2], [0.5, 0.3, 0.2]],
        },
        {
            "unit": "rgb@0.125+rgb@0.25",
            "fuses": "rates",
            "inputs": ["rgb@0.125", "rgb@0.25"],
            "times": list(FOUR_TIMES),
            "weights": [[0.6, 0.4], [0.55, 0.45], [0.5, 0.5], [0.45, 0.55]],
        },
    ]
    doc = header("ek55", "validation", EK_MEASURES, {"overall": "All samples"})
    doc["models"] = [branch, fusion]
    return doc


def ek100_doc() -> dict[str, Any]:
    groups = {"overall": "All samples", "unseen": "Unseen participants", "tail": "Tail classes"}
    doc = header("ek100", "validation", EK_MEASURES, groups)
    ensemble = model("ensemble", "ensemble", FOUR_TIMES, list(groups), list(EK_MEASURES), 50.0)
    ensemble["members"] = [{"name": "a", "weight": 0.55}, {"name": "b", "weight": 0.45}]
    ensemble["source"] = ""  # an ensemble has no single checkpoint
    doc["models"] = [
        model("rgb", "branch", FOUR_TIMES, list(groups), list(EK_MEASURES), 45.0),
        ensemble,
    ]
    for entry in doc["models"]:  # EK100 scores discarded samples as wrong answers
        entry["samples"] = {"total": 120, "evaluated": 120, "discarded": 10,
                            "discarded_policy": "counted as wrong"}  # fmt: skip
    return doc


def egtea_doc() -> dict[str, Any]:
    measures = {"top1": "Top-1 accuracy", "top5": "Top-5 accuracy", "mca": "Mean class accuracy"}
    doc = header("egtea", "validation2", measures, {"overall": "All samples"})
    doc["models"] = [model("flow", "branch", EIGHT_TIMES, ["overall"], list(measures), 50.0)]
    return doc


@pytest.fixture(scope="module")
def ek55_files(tmp_path_factory: pytest.TempPathFactory):
    """The EK55 report written once for the module's checks."""
    return write_report(ek55_doc(), tmp_path_factory.mktemp("ek55") / "report")


@pytest.fixture
def fake_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip drawing (about 0.3 s a figure) where only the files and text matter."""
    fake = PNG_SIGNATURE + b"not drawn"
    monkeypatch.setattr(plots, "curves_png", lambda *args, **kwargs: fake)
    monkeypatch.setattr(plots, "attention_png", lambda *args, **kwargs: fake)


def markdown_row(markdown: str, label: str) -> list[str]:
    """The cells of the first Markdown table row whose label is `label`."""
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


# --------------------------------------------------------------------------------------------
# writing and rendering


def test_writes_every_file_and_json_round_trips(ek55_files) -> None:
    files = ek55_files
    for path in files.all():
        assert path.is_file(), path
    assert json.loads(files.json.read_text(encoding="utf-8")) == ek55_doc()
    names = sorted(p.name for p in files.plots)
    assert names == [
        "attention-fusion-script-alert-1-script-rgb-0.125-rgb-0.25.png",
        "attention-fusion-script-alert-1-script-rgb-flow-obj-0.125.png",
        "overall-mt5r.png",
        "overall-top1.png",
        "overall-top5.png",
    ]
    leftovers = [p for p in files.json.parent.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


def test_markdown_headline_table_uses_the_union_of_times(ek55_files) -> None:
    markdown = ek55_files.markdown.read_text(encoding="utf-8")
    headline = markdown[markdown.index("## Headline") :]
    header_line = next(line for line in headline.splitlines() if line.startswith("| Model |"))
    assert header_line.count(" s |") == 8  # 2 s ... 0.25 s
    branch = markdown_row(headline, "rgb-a0.25-enc6-ant8/finetune")
    fusion = markdown_row(headline, r"fusion \<script\>alert(1)\</script\>")
    # action top-5: base 40 - 30 (action) + 15 (second measure) = 25, +1.5 per time
    assert branch[:3] == ["25.00", "**26.50**", "28.00"]  # the only value at 1.75 s is the best
    assert branch[-1] == "**35.50**"
    # the fusion is evaluated at 2, 1.5, 1, 0.5 only: blank at 1.75, bold where it is best
    assert fusion[:3] == ["**30.00**", "", "**31.50**"]
    assert markdown_row(markdown, "Verb Mean top-5 recall")[0] == "–"
    assert "![All samples: Top-5 accuracy](plots/overall-top5.png)" in markdown
    assert "Mean time to action TtA(5):** verb 1.21 s, noun 0.93 s, action 0.55 s" in markdown


def test_markdown_attention_table(ek55_files) -> None:
    markdown = ek55_files.markdown.read_text(encoding="utf-8")
    assert "| τ (s) | rgb@0.125 | flow@0.125 | obj@0.125 |" in markdown
    assert "| 1.5 | 0.35 | 0.45 | 0.20 |" in markdown


def test_html_is_self_contained_and_escaped(ek55_files) -> None:
    page = ek55_files.html.read_text(encoding="utf-8")
    assert page.count('<img src="data:image/png;base64,') == len(ek55_files.plots)
    assert "<script" not in page
    assert "fusion &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r'(src|href)="(https?:|//)', page)
    assert '<td class="num"><strong>30.00</strong></td>' in page


def test_plots_are_pngs_and_deterministic(ek55_files, tmp_path: Path) -> None:
    from matplotlib.image import imread

    again = write_report(ek55_doc(), tmp_path / "again")
    for first, second in zip(ek55_files.plots, again.plots):
        data = first.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert data == second.read_bytes(), first.name
    height, width, _ = imread(ek55_files.plots[0]).shape
    assert (width, height) == (1500, 540)


@pytest.mark.usefixtures("fake_plots")
@pytest.mark.parametrize("make", [ek100_doc, egtea_doc])
def test_other_datasets(make, tmp_path: Path) -> None:
    doc = make()
    files = write_report(doc, tmp_path / "out")
    groups = list(doc["group_names"])
    measures = list(doc["measure_names"])
    assert {p.name for p in files.plots} == {f"{g}-{m}.png" for g in groups for m in measures}
    markdown = files.markdown.read_text(encoding="utf-8")
    for name in doc["group_names"].values():
        assert f"**{name} (%)**" in markdown
    assert "TtA" not in markdown


def test_ek100_ensemble_facts(tmp_path: Path) -> None:
    markdown = render_markdown(ek100_doc(), {})
    assert "a (weight 0.55), b (weight 0.45)" in markdown
    assert "120 of 120 evaluated, 10 discarded (counted as wrong)" in markdown
    ensemble = markdown[markdown.index("## ensemble") :]
    assert "Source" not in ensemble
    assert "![" not in markdown  # no plot paths given: no image links


def test_render_html_without_plots() -> None:
    page = render_html(egtea_doc(), {})
    assert "<img" not in page
    assert "Mean class accuracy" in page


# --------------------------------------------------------------------------------------------
# the schema check


def broken(edit) -> dict[str, Any]:
    doc = ek55_doc()
    edit(doc)
    return doc


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d["models"][1]["results"]["overall"]["verb"]["top5"].pop(),
         "models[1].results.overall.verb.top5: expected 4 values (one per time), found 3"),
        (lambda d: d["models"][0]["samples"].pop("total"), "models[0].samples.total: missing key"),
        (lambda d: d["models"][0]["results"]["overall"]["noun"]["top1"].__setitem__(2, "12"),
         "models[0].results.overall.noun.top1[2]: Input should be a valid number"),
        (lambda d: d["models"][0]["results"]["overall"]["noun"]["top1"].__setitem__(2, 130.0),
         "models[0].results.overall.noun.top1[2]: Input should be less than or equal to 100"),
        (lambda d: d["models"][1]["attention"][0]["weights"][1].__setitem__(0, 0.9),
         "models[1].attention[0].weights[1]: the weights sum to 1.5500, not 1"),
        (lambda d: d["models"][1]["attention"][1]["weights"].pop(),
         "models[1].attention[1].weights: expected 4 rows (one per time), found 3"),
        (lambda d: d["models"][0]["times"].reverse(),
         "models[0].times: must be strictly descending (largest first), found 0.5 after 0.25"),
        (lambda d: d["models"][1].__setitem__("name", d["models"][0]["name"]),
         "models[1].name: 'rgb-a0.25-enc6-ant8/finetune' is also the name of models[0]"),
        (lambda d: d["headline"].__setitem__("measure", "top3"),
         "headline.measure: 'top3' is not a key of measure_names (top1, top5, mt5r)"),
        (lambda d: d["models"][0]["results"]["overall"]["action"].pop("top5"),
         "models[0].results.overall.action.top5: missing (the headline measure)"),
        (lambda d: d["models"][0].__setitem__("colour", "red"), "models[0].colour: unknown key"),
        (lambda d: d["models"][1]["samples"].__setitem__("evaluated", 120),
         "models[1].samples: evaluated + discarded = 130, but total = 120"),
        (lambda d: d.__setitem__("dataset", "ek75"),
         "dataset: Input should be 'ek55', 'ek100' or 'egtea', found \"ek75\""),
    ],
)  # fmt: skip
def test_check_names_the_key_path(edit, needle: str) -> None:
    with pytest.raises(DataError) as caught:
        check_report(broken(edit), "r.json")
    assert f"r.json: {needle}" in str(caught.value)


def test_check_unknown_schema_and_nan() -> None:
    with pytest.raises(DataError, match="schema 'sfr-report/2'; this version of sfr reads"):
        check_report(broken(lambda d: d.__setitem__("schema", "sfr-report/2")), "r.json")
    with pytest.raises(DataError, match="no `schema` key"):
        check_report(broken(lambda d: d.pop("schema")), "r.json")
    nan = ek55_doc()
    nan["models"][0]["results"]["overall"]["verb"]["top1"][0] = float("nan")
    with pytest.raises(DataError, match=r"verb\.top1\[0\]: Input should be a finite number"):
        check_report(nan, "r.json")


def test_check_returns_plain_json_data() -> None:
    doc = ek55_doc()
    doc["models"][0]["times"] = tuple(doc["models"][0]["times"])
    checked = check_report(doc, "r.json")
    assert checked == ek55_doc()
    assert check_report(copy.deepcopy(checked), "r.json") == checked


# --------------------------------------------------------------------------------------------
# failures while writing


@pytest.mark.usefixtures("fake_plots")
def test_unwritable_out_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SfrError, match=f"report lies under the file {re.escape(str(blocker))}"):
        write_report(egtea_doc(), blocker / "report")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
@pytest.mark.usefixtures("fake_plots")
def test_read_only_out_dir(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(SfrError, match="Cannot write the report"):
            write_report(egtea_doc(), folder)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_missing_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SfrError) as caught:
        write_report(egtea_doc(), tmp_path / "out")
    assert caught.value.hint.startswith('pip install -e ".[report]"')  # the README's form
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# `sfr report`


@pytest.mark.usefixtures("fake_plots")
def test_cli_renders_again(cli, tmp_path: Path) -> None:
    source = tmp_path / "saved"
    source.mkdir()
    (source / "report.json").write_text(json.dumps(egtea_doc()), encoding="utf-8")
    code, output, _ = cli("report", source / "report.json")
    assert code == 0, output
    assert (source / "report.html").is_file()
    assert str(source / "plots" / "overall-mca.png") in output
    code, output, _ = cli("report", source / "report.json", "--out", tmp_path / "elsewhere")
    assert code == 0, output
    assert (tmp_path / "elsewhere" / "report.md").read_text(encoding="utf-8") == (
        source / "report.md"
    ).read_text(encoding="utf-8")
    code, output, _ = cli("report", source, "--out", tmp_path / "from-folder")  # the folder
    assert code == 0, output
    assert (tmp_path / "from-folder" / "report.html").is_file()


@pytest.mark.usefixtures("fake_plots")
def test_cli_report_follows_the_overwrite_rule(cli, tmp_path: Path) -> None:
    """Issue 11 cases 7 and 18: another --out holding a report is refused (exit 2, file named)
    and replaced with --force, which keeps a file of one's own; its own folder is rendered again
    without it; the temp file of a killed write of a report file goes."""
    source = tmp_path / "saved"
    source.mkdir()
    (source / "report.json").write_text(json.dumps(egtea_doc()), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "report.md").write_text("an older report")
    (elsewhere / "notes.md").write_text("mine")
    torn = elsewhere / ".report.html.k1ll3d00.tmp"
    torn.write_text("<")
    code, output, error = cli("report", source / "report.json", "--out", elsewhere)
    assert_user_error(code, output, error, f"The report {elsewhere / 'report.md'} already exists")
    assert "--force" in output
    assert not torn.exists()
    assert (elsewhere / "report.md").read_text() == "an older report"
    code, output, _ = cli("report", source / "report.json", "--out", elsewhere, "--force")
    assert code == 0, output
    assert (elsewhere / "report.md").read_text() != "an older report"
    assert (elsewhere / "notes.md").read_text() == "mine"
    for _ in range(2):  # its own folder: rendered again and again
        code, output, _ = cli("report", source / "report.json")
        assert code == 0, output


def test_cli_user_errors(cli, tmp_path: Path) -> None:
    assert_user_error(*cli("report", tmp_path / "nope.json"), "nope.json does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "sfr-report/1",', encoding="utf-8")
    assert_user_error(*cli("report", bad), f"{bad} is not valid JSON", "line 1")
    short = tmp_path / "short.json"
    short.write_text(json.dumps(broken(lambda d: d["models"][0]["times"].pop())), encoding="utf-8")
    assert_user_error(
        *cli("report", short),
        f"{short}: models[0].results.overall.verb.top1: expected 7 values (one per time), found 8",
    )


# --------------------------------------------------------------------------------------------
# issue 11 case 21: a headline table that fits the page, attention titles that name the model

SIXTEEN_TIMES = tuple(round(2.0 - 0.125 * i, 3) for i in range(16))


def test_many_times_turn_the_headline_table_to_a_row_per_time() -> None:
    doc = header("ek55", "validation", EK_MEASURES, {"overall": "All samples"})
    doc["models"] = [
        model("arch2 rgb+flow+obj@0.125+0.5", "fusion", SIXTEEN_TIMES, ["overall"],
              list(EK_MEASURES), 40.0),
        model("rgb@0.125 finetune", "branch", EIGHT_TIMES, ["overall"], list(EK_MEASURES), 30.0),
    ]  # fmt: skip
    page = render_html(doc, {})
    headline = page[page.index("Headline") : page.index("</table>")]
    assert '<th scope="col">τ</th><th scope="col">[1]</th><th scope="col">[2]</th></tr>' in headline
    assert headline.count("<tr>") == 1 + 16  # a row per time: never wider than 3 columns
    assert "[1] arch2 rgb+flow+obj@0.125+0.5; [2] rgb@0.125 finetune" in page
    # at 1.875 s only model [1] was evaluated: its value is the row's best, model [2] is blank
    row = headline[headline.index('<th scope="row">1.875 s</th>') :].split("</tr>")[0]
    assert row.count("<strong>") == 1 and row.endswith('<td class="num"></td>')


def test_attention_plots_of_two_models_carry_different_titles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = ek55_doc()
    other = copy.deepcopy(doc["models"][1])
    other["name"] = "arch2 second"  # another fusion holding units of the same labels
    doc["models"].append(other)
    titles: list[str] = []
    monkeypatch.setattr(plots, "curves_png", lambda *args, **kwargs: PNG_SIGNATURE)
    monkeypatch.setattr(
        plots, "attention_png", lambda *args, **kwargs: titles.append(args[-1]) or b""
    )
    render_plots(doc)
    assert len(titles) == 4 and len(set(titles)) == 4
    assert titles[2].startswith("arch2 second: attention in rgb+flow+obj@0.125")


def test_percentage_axes_stay_within_0_and_100() -> None:
    from sfr.eval.plots import percent_limits

    assert percent_limits(96.0, 104.0) == (96.0, 100.5)  # every value 100: no 104% on the axis
    assert percent_limits(-3.0, 40.0) == (0.0, 40.0)
    assert percent_limits(20.0, 80.0) == (20.0, 80.0)
