"""`sfr demo` on a tiny plan: synthetic data, then the Architecture 2 pipeline, and its table."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import sfr.cli.demo
from sfr.checkpoint import read_metadata
from sfr.cli.common import TrainingView
from sfr.cli.demo import demo_table, headline
from sfr.data.annotations import read_segments
from sfr.data.synthetic import SyntheticSpec
from sfr.errors import DataError, RunError, SfrError
from sfr.train.demo import DemoDataReady, DemoPlan, DemoResult, demo_config, run_demo
from sfr.train.fusion import FusionPlan
from sfr.train.loop import EpochDone, FitResult, StageStarted
from sfr.train.pipeline import PipelineResult, StepStarted, pipeline_steps

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# alpha 0.25: branches on 3 + 4 steps, fusion fed 2 + 4; alpha 0.5: 1 + 2 steps
BRANCH_DIRS = {
    "rgb@0.25": "rgb-a0.25-enc3-ant4",
    "flow@0.25": "flow-a0.25-enc3-ant4",
    "rgb@0.5": "rgb-a0.5-enc1-ant2",
    "flow@0.5": "flow-a0.5-enc1-ant2",
}
FUSION_DIR = "arch2-rgb+flow-a0.25-enc2-ant4+a0.5-enc1-ant2"
UNITS = [("rgb+flow@0.25", 1), ("rgb+flow@0.5", 1), ("rgb+flow@0.25+0.5", 2)]
ROWS = [*BRANCH_DIRS, "L1 rgb+flow@0.25", "L1 rgb+flow@0.5", "L2 rgb+flow@0.25+0.5"]
CELL = re.compile(r"\d+\.\d/\d+\.\d")


def tiny_plan(spec: SyntheticSpec, **changes: object) -> DemoPlan:
    fields = {
        "spec": spec,
        "rates": ((0.25, 3, 4, 2), (0.5, 1, 2, 1)),
        "modalities": ("rgb", "flow"),
        "hidden": 8,
        "dropout": 0.5,
        "branch_epochs": 1,
        "fusion_epochs": 2,
        "batch_size": 8,
        "lr": 0.1,
        "seed": 3,
        **changes,
    }
    return DemoPlan(**fields)  # type: ignore[arg-type]


def render(table: object) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def table_rows(text: str) -> dict[str, list[str]]:
    """Rows of a results table: model name -> its `top-1/top-5` cells."""
    rows = {}
    for line in text.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) >= 2 and all(CELL.fullmatch(part) for part in parts[1:]):
            rows[parts[0]] = parts[1:]
    return rows


def time_columns(text: str) -> list[str]:
    header = next(line for line in text.splitlines() if "model (L = fusion level)" in line)
    return re.findall(r"τ=([\d.]+)s", header)


def step_roots(runs: Path) -> dict[tuple[str, str], Path]:
    roots = {}
    for label, folder in BRANCH_DIRS.items():
        for stage in ("pretrain", "finetune"):
            roots[(label, stage)] = runs / "synthetic" / folder / stage
    for label, _ in UNITS:
        roots[(label, "fusion")] = runs / "synthetic" / FUSION_DIR / label
    return roots


@pytest.fixture(scope="module")
def demo_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_spec: SyntheticSpec, module_torch_thread: None
):
    """One tiny demo run shared by the tests of this module: (out, plan, result, events)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    plan = tiny_plan(tiny_spec)
    events: list[object] = []
    result = run_demo(out, plan, progress=events.append)
    return out, plan, result, events


def test_demo_writes_data_and_trains_every_stage(demo_run, tiny_spec: SyntheticSpec) -> None:
    out, _, result, events = demo_run
    assert result.data_dir == out / "data" and result.runs_dir == out / "runs"
    meta = json.loads((out / "data" / "synthetic_meta.json").read_text())
    assert meta["dims"] == {"rgb": 8, "flow": 8, "obj": 6}
    assert meta["rows"] == {"training": 24, "validation": 12}
    assert result.num_classes == tiny_spec.num_actions == 32

    train = Counter(s.action for s in read_segments(out / "data" / "training.csv"))
    frequent = {action for action, _ in train.most_common(5)}
    val = [s.action for s in read_segments(out / "data" / "validation.csv")]
    assert result.prior_top5 == pytest.approx(100 * sum(a in frequent for a in val) / len(val))

    pipeline = result.pipeline
    expected = [(b, s, 0) for b in BRANCH_DIRS for s in ("pretrain", "finetune")]
    expected += [(label, "fusion", level) for label, level in UNITS]
    assert [(s.label, s.stage, s.level) for s in pipeline.steps] == expected
    assert pipeline.times == (1.0, 0.5)
    roots = step_roots(out / "runs")
    assert sorted(pipeline.results) == sorted(roots)
    for key, root in roots.items():
        fit = pipeline.results[key]
        assert Path(fit.run_dir) == root
        assert json.loads((root / "status.json").read_text())["state"] == "finished"
        epochs = 2 if key[1] == "fusion" else 1  # fusion_epochs, branch_epochs
        assert len(fit.history) == epochs
        assert read_metadata(root / "best.safetensors")["metrics"] == fit.metrics

    # the plan's settings reach every stage
    final_root = roots[("rgb+flow@0.25+0.5", "fusion")]
    config = json.loads((final_root / "config.json").read_text())
    assert config["data"]["name"] == "synthetic" and config["data"]["preload"] is True
    assert config["run"]["seed"] == 3 and config["run"]["device"] == "cpu"
    assert config["model"]["architecture"] == "arch2" and config["model"]["hidden"] == 8
    for field in ("branch_dropout", "modality_dropout", "rate_dropout"):
        assert config["model"][field] == 0.5
    assert (config["optim"]["epochs"], config["fusion_optim"]["epochs"]) == (1, 2)
    assert config["optim"]["lr"] == config["fusion_optim"]["lr"] == 0.1
    assert config["fusion_optim"]["batch_size"] == 8
    branch = json.loads((roots[("rgb@0.25", "pretrain")] / "config.json").read_text())
    assert (branch["branch"]["s_enc"], branch["branch"]["s_ant"]) == (3, 4)
    spec = read_metadata(final_root / "best.safetensors")["model"]
    assert spec["grids"] == {
        "rgb@0.25": [0.25, 2, 4],
        "flow@0.25": [0.25, 2, 4],
        "rgb@0.5": [0.5, 1, 2],
        "flow@0.5": [0.5, 1, 2],
    }
    final = pipeline.results[("rgb+flow@0.25+0.5", "fusion")]
    assert set(final.metrics) == {"top1@1", "top5@1", "top1@0.5", "top5@0.5", "mt5r@1"}

    # progress: data first, then every step in order
    assert isinstance(events[0], DemoDataReady)
    assert events[0].summary.path == out / "data"
    steps = [e for e in events if isinstance(e, StepStarted)]
    assert [(e.index, e.total, e.step.label, e.step.stage, e.action) for e in steps] == [
        (i, 11, label, stage, "train") for i, (label, stage, _) in enumerate(expected, start=1)
    ]


def test_demo_table_shows_every_branch_and_fusion_at_the_fused_times(demo_run) -> None:
    _, _, result, _ = demo_run
    text = render(demo_table(result))
    flat = " ".join(text.split())  # title and caption wrap at the table's width
    assert "32 classes" in flat
    assert time_columns(text) == ["1", "0.5"]
    assert "τ=0.75s" not in text and "τ=0.25s" not in text
    rows = table_rows(text)
    assert list(rows) == ROWS  # fine-tuned branches only, then the fusion levels bottom-up
    for name in ROWS:
        label = name.split(" ")[-1]
        metrics = result.pipeline.results[(label, "fusion" if " " in name else "finetune")].metrics
        assert rows[name] == [
            f"{metrics[f'top1@{t}']:.1f}/{metrics[f'top5@{t}']:.1f}" for t in ("1", "0.5")
        ]
    assert f"top-5 by chance {100 * 5 / 32:.1f}%" in flat
    assert f"5 most frequent actions {result.prior_top5:.1f}%" in flat


def paper_rates_result() -> tuple[DemoResult, dict[str, float]]:
    """A made-up result of the default plan: each value encodes its row and its time."""
    plan = FusionPlan(demo_config(DemoPlan()), Path("r"))
    steps = pipeline_steps(plan)
    result = PipelineResult(plan.config.fused_times, steps=steps)
    top5_at_1 = {}
    for row, step in enumerate(steps):
        grids = [plan.streams[leaf].grid for leaf in plan.leaves(step.label)]
        times = set.intersection(*(set(grid.anticipation_times) for grid in grids))
        metrics = {}
        for t in times:
            metrics[f"top1@{t:g}"] = row + t
            metrics[f"top5@{t:g}"] = 50 + row + t
        result.results[(step.label, step.stage)] = FitResult("x", 0, 0.0, metrics)
        top5_at_1[step.label] = 50 + row + 1.0
    demo = DemoResult(Path("d"), Path("r"), num_classes=10, prior_top5=40.0, pipeline=result)
    return demo, top5_at_1


def test_the_default_plan_fuses_the_published_rates_at_their_common_times() -> None:
    """Paper rates 0.125 (S_ant 16, fed 12 + 16 at fusion) and 0.5 (6 + 4): τ 2, 1.5, 1, 0.5."""
    config = demo_config(DemoPlan())
    assert config.fused_times == (2.0, 1.5, 1.0, 0.5)
    assert config.model.architecture == "arch2"
    assert config.fusion_dir == "synthetic/arch2-rgb+flow+obj-a0.125-enc12-ant16+a0.5-enc6-ant4"
    plan = FusionPlan(config, Path("r"))
    assert plan.branch_dir("rgb@0.125").root == Path("r/synthetic/rgb-a0.125-enc24-ant16/finetune")
    assert [unit.label for unit in plan.units] == [
        "rgb+flow+obj@0.125",
        "rgb+flow+obj@0.5",
        "rgb+flow+obj@0.125+0.5",
    ]

    result, _ = paper_rates_result()
    text = render(demo_table(result))
    assert time_columns(text) == ["2", "1.5", "1", "0.5"]
    header = next(line for line in text.splitlines() if "model (L = fusion level)" in line)
    assert "0.75" not in header and "0.125" not in header
    rows = table_rows(text)
    for row, step in enumerate(result.pipeline.steps):
        if step.stage == "pretrain":
            continue
        name = step.label if step.level == 0 else f"L{step.level} {step.label}"
        # picked by anticipation time, whatever the position of that time on the rate's grid
        assert rows[name] == [f"{row + t:.1f}/{50 + row + t:.1f}" for t in (2, 1.5, 1, 0.5)]
    assert len(rows) == 9
    flat = " ".join(text.split())
    assert "by chance 50.0%" in flat and "actions 40.0%" in flat


def test_headline_compares_the_final_fusion_with_the_best_branch() -> None:
    result, top5_at_1 = paper_rates_result()
    line = headline(result)
    final = "rgb+flow+obj@0.125+0.5"
    best_branch = "obj@0.5"  # the last fine-tuned branch has the highest made-up values
    assert f"L2 {final}" in line and f"{top5_at_1[final]:.1f}%" in line
    assert best_branch in line and f"{top5_at_1[best_branch]:.1f}%" in line
    assert "1 s" in line


def test_demo_again_into_the_same_folder_continues_it_or_with_force_replaces_it(
    demo_run, tmp_path: Path, tiny_spec: SyntheticSpec
) -> None:
    source, plan, first, _ = demo_run
    out = Path(shutil.copytree(source, tmp_path / "demo"))
    step_dir = step_roots(out / "runs")[("rgb+flow@0.5", "fusion")]
    (step_dir / "stray.txt").write_text("old")
    # run again, a finished demo only reports its results (as `sfr pipeline` does)
    events: list[object] = []
    kept = run_demo(out, plan, progress=events.append)
    assert [e.action for e in events if isinstance(e, StepStarted)] == ["skip"] * 11
    assert isinstance(events[0], DemoDataReady) and events[0].continued
    for key in ("rgb@0.5", "finetune"), ("rgb+flow@0.25+0.5", "fusion"):
        assert kept.pipeline.results[key].metrics == first.pipeline.results[key].metrics
    # data of another spec is not continued: one overwrite rule, --force
    other = tiny_plan(dataclasses.replace(tiny_spec, seed=1))
    with pytest.raises(RunError, match="already holds a demo made with other data settings"):
        run_demo(out, other)
    events = []
    # --force deletes only what sfr wrote: a file of one's own in the data is named, not deleted
    (out / "data" / "stray.txt").write_text("old")
    with pytest.raises(RunError, match=re.escape(str(out / "data" / "stray.txt"))):
        run_demo(out, plan, force=True)
    (out / "data" / "stray.txt").unlink()
    again = run_demo(out, plan, force=True, progress=events.append)
    assert [e.action for e in events if isinstance(e, StepStarted)] == ["train"] * 11
    assert (step_dir / "stray.txt").read_text() == "old"  # kept in a run folder
    assert sorted(p.name for p in out.iterdir()) == ["data", "runs"]
    # the same plan and seed train the same models
    for key, fit in first.pipeline.results.items():
        redone = again.pipeline.results[key]
        assert (redone.best_epoch, redone.metrics) == (fit.best_epoch, fit.metrics), key
    final = ("rgb+flow@0.25+0.5", "fusion")
    a = load_file(str(Path(first.pipeline.results[final].run_dir) / "best.safetensors"))
    b = load_file(str(Path(again.pipeline.results[final].run_dir) / "best.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_demo_cli_run_again_resumes_an_interrupted_demo(
    cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_spec: SyntheticSpec
) -> None:
    """Stopped midway, `sfr demo` said "run the same command again to continue", which then
    asked for --force (deleting the finished stages): the same command now resumes it."""
    monkeypatch.setattr(sfr.cli.demo, "DemoPlan", lambda: tiny_plan(tiny_spec))
    out = tmp_path / "demo"
    stale = out / f".data.{'0' * 32}.tmp"  # a demo killed while writing its data left this
    stale.mkdir(parents=True)
    (stale / "training.csv").write_text("half")
    final = step_roots(out / "runs")[("rgb+flow@0.25+0.5", "fusion")]
    original = TrainingView.__call__

    def interrupting(self: TrainingView, event: object) -> None:
        original(self, event)
        if isinstance(event, StageStarted):
            self.title = event.run_dir
        if isinstance(event, EpochDone) and self.title == str(final):
            raise KeyboardInterrupt  # Ctrl-C after the final fusion's first epoch

    monkeypatch.setattr(TrainingView, "__call__", interrupting)
    code, output, _ = cli("demo", "--out", out)
    assert code == 130, output
    assert "Interrupted." in output and "run the same command again" in output
    assert not stale.exists()
    assert json.loads((final / "status.json").read_text())["state"] == "interrupted"
    finished = step_roots(out / "runs")[("rgb@0.25", "finetune")] / "best.safetensors"
    before = finished.stat().st_mtime_ns

    monkeypatch.setattr(TrainingView, "__call__", original)
    code, output, error = cli("demo", "--out", out)
    assert code == 0, f"{output}\n{error!r}"
    assert f"Continuing the demo in {out}" in output
    assert output.count("(finished, skipped)") == 10
    assert "[11/11] fusion L2 rgb+flow@0.25+0.5 (resuming)" in output
    assert f"resuming {final} at epoch 2" in output
    lines = (final / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert finished.stat().st_mtime_ns == before  # finished work kept, not redone
    assert list(table_rows(output)) == ROWS


def test_demo_with_another_plan_leaves_no_runs_of_the_earlier_one(
    demo_run, tmp_path: Path, tiny_spec: SyntheticSpec
) -> None:
    source, _, _, _ = demo_run
    out = Path(shutil.copytree(source, tmp_path / "demo"))
    plan = tiny_plan(tiny_spec, modalities=("rgb", "obj"))
    result = run_demo(out, plan, force=True)
    kept = {p.name for p in (out / "runs" / "synthetic").iterdir()}
    wanted = {Path(fit.run_dir).parent.name for fit in result.pipeline.results.values()}
    assert kept == wanted


def test_demo_refuses_a_foreign_folder(tmp_path: Path, tiny_spec: SyntheticSpec) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(DataError) as caught:
        run_demo(out, tiny_plan(tiny_spec))
    assert str(out) in caught.value.message and "not empty" in caught.value.message
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "precious"


def test_demo_cli_refuses_a_foreign_folder(cli, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    code, output, error = cli("demo", "--out", out)
    assert code == 2, output
    assert isinstance(error, SystemExit)
    assert "Traceback" not in output
    assert "Error:" in output and str(out) in output and "--out" in output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_demo_with_a_damaged_data_record_names_it(demo_run, tmp_path: Path) -> None:
    source, plan, _, _ = demo_run
    out = Path(shutil.copytree(source, tmp_path / "demo"))
    record = out / "data" / "synthetic_meta.json"
    record.write_text("{")
    with pytest.raises(DataError, match=re.escape(f"{record} is damaged")) as caught:
        run_demo(out, plan)
    assert "--force" in (caught.value.hint or "")


def test_demo_refuses_a_file(tmp_path: Path, tiny_spec: SyntheticSpec) -> None:
    target = tmp_path / "file.txt"
    target.write_text("keep")
    with pytest.raises(SfrError, match=re.escape(f"The demo (--out) folder {target} is a file")):
        run_demo(target, tiny_plan(tiny_spec))
    under = target / "x"  # a path under a file was a NotADirectoryError traceback
    with pytest.raises(SfrError, match=re.escape(f"{under} lies under the file {target}")):
        run_demo(under, tiny_plan(tiny_spec))
    assert target.read_text() == "keep"


def test_demo_into_a_folder_being_trained_says_to_give_it_another_out(
    cli, demo_run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_spec: SyntheticSpec
) -> None:
    """The refusal of a run folder another process trains in said to "give it another --runs
    folder or run.name", which `sfr demo` does not take: it names --out."""
    from sfr.train.rundir import RunDir

    monkeypatch.setattr(sfr.cli.demo, "DemoPlan", lambda: tiny_plan(tiny_spec))
    source, _, _, _ = demo_run
    out = Path(shutil.copytree(source, tmp_path / "demo"))
    root = step_roots(out / "runs")[("rgb@0.25", "pretrain")]
    holder = RunDir(root)
    holder.hold()
    try:
        code, output, error = cli("demo", "--out", out)
    finally:
        holder.release()
    assert code == 2 and isinstance(error, SystemExit), output
    message = " ".join(output.split())
    assert str(root) in message and "is in use" in message
    assert "give it another --out folder." in message
    assert "--runs" not in message and "run.name" not in message
