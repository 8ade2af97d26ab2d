"""`sfr demo` on a tiny plan: synthetic data + both stages of a branch, and the results table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from sfr.cli.demo import results_table
from sfr.data.synthetic import SyntheticSpec
from sfr.errors import DataError
from sfr.train.checkpoint import read_metadata
from sfr.train.demo import DemoDataReady, DemoPlan, DemoResult, DemoStep, run_demo
from sfr.train.loop import FitResult

pytestmark = pytest.mark.usefixtures("single_torch_thread")

BRANCH = "rgb-a0.25-enc2-ant4"
TIMES = ("1", "0.75", "0.5", "0.25")


def tiny_plan(spec: SyntheticSpec) -> DemoPlan:
    return DemoPlan(
        spec=spec,
        rates=((0.25, 2, 4),),
        modalities=("rgb",),
        hidden=8,
        pretrain_epochs=1,
        finetune_epochs=1,
        batch_size=8,
    )


def render(table: object) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, tiny_spec: SyntheticSpec):
    """One tiny demo run shared by the tests of this module: (out, plan, result, events)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    plan = tiny_plan(tiny_spec)
    events: list[object] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the `single_torch_thread` fixture, which is function-scoped
    try:
        result = run_demo(out, plan, progress=events.append)
    finally:
        torch.set_num_threads(threads)
    return out, plan, result, events


def test_demo_writes_data_and_trains_both_stages(demo_run, tiny_spec: SyntheticSpec) -> None:
    out, _, result, events = demo_run
    assert result.data_dir == out / "data" and result.runs_dir == out / "runs"
    meta = json.loads((out / "data" / "synthetic_meta.json").read_text())
    assert meta["dims"] == {"rgb": 8, "flow": 8, "obj": 6}
    assert meta["rows"] == {"training": 24, "validation": 12}
    assert result.num_classes == tiny_spec.num_actions == 32
    assert 0 <= result.prior_top5 <= 100

    assert sorted(result.results) == [(BRANCH, "finetune"), (BRANCH, "pretrain")]
    for stage in ("pretrain", "finetune"):
        fit = result.results[(BRANCH, stage)]
        root = out / "runs" / "synthetic" / BRANCH / stage
        assert Path(fit.run_dir) == root
        assert json.loads((root / "status.json").read_text())["state"] == "finished"
        assert len(fit.history) == 1 and fit.best_epoch == 0
        assert sorted(k for k in fit.metrics if k.startswith("top5@")) == sorted(
            f"top5@{t}" for t in TIMES
        )
        meta = read_metadata(root / "best.safetensors")
        assert meta["stage"] == stage
        assert meta["model"] == {"feat_dim": 8, "hidden": 8, "num_classes": 32}
        assert meta["config"]["optim"]["epochs"] == 1

    # progress: data first, then the two stages in order
    assert isinstance(events[0], DemoDataReady)
    steps = [e for e in events if isinstance(e, DemoStep)]
    assert [(s.index, s.total, s.branch, s.stage) for s in steps] == [
        (1, 2, BRANCH, "pretrain"),
        (2, 2, BRANCH, "finetune"),
    ]


def test_results_table_shows_branches_and_common_times(demo_run) -> None:
    _, plan, result, _ = demo_run
    text = render(results_table(result, plan))
    assert "32 classes" in text
    header = next(line for line in text.splitlines() if "branch" in line)
    positions = [header.index(f"τ={t}s") for t in TIMES]
    assert positions == sorted(positions)  # oldest anticipation time first
    row = next(line for line in text.splitlines() if BRANCH in line)
    fit = result.results[(BRANCH, "finetune")]
    for t in TIMES:
        assert f"{fit.metrics[f'top1@{t}']:.1f}/{fit.metrics[f'top5@{t}']:.1f}" in row
    assert f"top-5 by chance {100 * 5 / 32:.1f}%" in text
    assert f"5 most frequent actions {result.prior_top5:.1f}%" in text
    assert text.count(BRANCH) == 1  # fine-tuned branches only


def test_results_table_keeps_only_the_times_every_rate_produces() -> None:
    """Paper rates 0.125 (S_ant 16) and 0.5 (S_ant 4): common times 2, 1.5, 1, 0.5 s."""
    plan = DemoPlan(rates=((0.125, 24, 16), (0.5, 6, 4)), modalities=("flow",))
    result = DemoResult(Path("d"), Path("r"), num_classes=10, prior_top5=40.0)
    for alpha, s_ant in ((0.125, 16), (0.5, 4)):
        times = [f"{alpha * k:g}" for k in range(1, s_ant + 1)]
        metrics = {}
        for index, t in enumerate(times):
            metrics[f"top1@{t}"] = 10.0 + index
            metrics[f"top5@{t}"] = 50.0 + index
        for stage in ("pretrain", "finetune"):
            result.results[(f"flow-a{alpha:g}", stage)] = FitResult("x", 0, 0.0, metrics)
    text = render(results_table(result, plan))
    header = next(line for line in text.splitlines() if "branch" in line)
    shown = [cell.strip() for cell in header.split("τ=")[1:]]
    assert [cell.split("s")[0] for cell in shown] == ["2", "1.5", "1", "0.5"]
    assert "0.75" not in header and "0.125" not in header
    fast = next(line for line in text.splitlines() if "flow-a0.125" in line)
    # alpha 0.125: 1 s is the 8th time (index 7) -> 17.0 / 57.0
    assert " 17.0/57.0" in fast
    slow = next(line for line in text.splitlines() if "flow-a0.5" in line)
    assert " 11.0/51.0" in slow  # alpha 0.5: 1 s is the 2nd time
    assert "by chance 50.0%" in text and "actions 40.0%" in text


def test_demo_again_into_the_same_folder_replaces_it(
    tmp_path: Path, tiny_spec: SyntheticSpec
) -> None:
    out = tmp_path / "demo"
    plan = tiny_plan(tiny_spec)
    run_demo(out, plan)
    (out / "data" / "stray.txt").write_text("old")
    (out / "runs" / "synthetic" / BRANCH / "finetune" / "stray.txt").write_text("old")
    again = run_demo(out, plan)
    assert sorted(again.results) == [(BRANCH, "finetune"), (BRANCH, "pretrain")]
    assert not (out / "data" / "stray.txt").exists()
    assert not (out / "runs" / "synthetic" / BRANCH / "finetune" / "stray.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["data", "runs"]
    assert sorted(p.name for p in (out / "runs" / "synthetic" / BRANCH).iterdir()) == [
        "finetune",
        "pretrain",
    ]


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


def test_demo_refuses_a_file(tmp_path: Path, tiny_spec: SyntheticSpec) -> None:
    target = tmp_path / "file.txt"
    target.write_text("keep")
    with pytest.raises(DataError):
        run_demo(target, tiny_plan(tiny_spec))
    assert target.read_text() == "keep"
