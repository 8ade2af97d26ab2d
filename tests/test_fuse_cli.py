"""`sfr pipeline` and `sfr fuse` as a user calls them: step headers, the results table, errors.

A tiny Architecture 2 config (rgb, flow, obj at alpha 0.25 and 0.5; fused times 1 and 0.5 s)
on the session's synthetic dataset. The branch stages are trained once per module through the
core API; each test works on its own copy of them.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from clitools import assert_user_error
from safetensors.torch import load_file

from sfr.checkpoint import read_metadata
from sfr.cli.common import USER_ERROR_EXIT, TrainingView
from sfr.config import FusionRunConfig, load_config
from sfr.train.fusion import FusionPlan
from sfr.train.loop import EpochDone
from sfr.train.pipeline import run_pipeline

pytestmark = pytest.mark.usefixtures("single_torch_thread")

USER_ERROR = USER_ERROR_EXIT
RATES_TOML = """
[[model.rates]]
alpha = 0.25
s_enc = 2
s_ant = 4

[[model.rates]]
alpha = 0.5
s_enc = 1
s_ant = 2
"""
CONFIG_TOML = """\
# sfr pipeline {name} --data DATA --runs RUNS
# sfr fuse arch2 --config {name} --data DATA --runs RUNS    (fusion stages only)
#
# A tiny Architecture 2 model for the synthetic test data: rgb, flow and obj at alpha 0.25 and
# 0.5, modality attention per rate, then slow-fast attention.

[data]
name = "synthetic"
feature_dims = {{ rgb = 8, flow = 8, obj = 6 }}

[model]
architecture = "arch2"
modalities = ["rgb", "flow", "obj"]
hidden = 8
branch_dropout = 0.5
modality_dropout = 0.5
rate_dropout = 0.5
{model_extra}
{rates}
[optim]
lr = 0.1
batch_size = 8
epochs = 1

[fusion_optim]
lr = 0.1
batch_size = 8
epochs = 1

[run]
seed = 0
device = "cpu"
"""
BRANCHES = ["rgb@0.25", "flow@0.25", "obj@0.25", "rgb@0.5", "flow@0.5", "obj@0.5"]
LEVEL_1 = ["rgb+flow+obj@0.25", "rgb+flow+obj@0.5"]
FINAL = "rgb+flow+obj@0.25+0.5"
ARCH2_DIR = "synthetic/arch2-rgb+flow+obj-a0.25-enc2-ant4+a0.5-enc1-ant2"
CELL = re.compile(r"\d+\.\d/\d+\.\d")


def write_config(
    folder: Path, model_extra: str = "", rates: str = RATES_TOML, name: str = "fusion.toml"
) -> Path:
    path = folder / name
    text = CONFIG_TOML.format(name=name, model_extra=model_extra, rates=rates)
    path.write_text(text, encoding="utf-8")
    return path


def branch_root(runs: Path, label: str) -> Path:
    modality, alpha = label.split("@")
    grid = {"0.25": "enc2-ant4", "0.5": "enc1-ant2"}[alpha]
    return runs / "synthetic" / f"{modality}-a{alpha}-{grid}" / "finetune"


def results_rows(output: str) -> dict[str, list[str]]:
    """Rows of the results table: model name -> its `top-1/top-5` cells."""
    rows = {}
    for line in output.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) >= 2 and all(CELL.fullmatch(part) for part in parts[1:]):
            rows[parts[0]] = parts[1:]
    return rows


def time_columns(output: str) -> list[str]:
    header = next(line for line in output.splitlines() if "model (L = fusion level)" in line)
    return re.findall(r"τ=([\d.]+)s", header)


def expected_cells(root: Path, times: list[str]) -> list[str]:
    metrics = read_metadata(root / "best.safetensors")["metrics"]
    return [f"{metrics[f'top1@{t}']:.1f}/{metrics[f'top5@{t}']:.1f}" for t in times]


def assert_in_order(output: str, needles: list[str]) -> None:
    positions = []
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
        positions.append(output.index(needle))
    assert positions == sorted(positions), needles


def hint_of(output: str) -> str:
    return output.split("Hint:", 1)[1] if "Hint:" in output else ""


@pytest.fixture(scope="module")
def trained_branches(
    tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path, module_torch_thread: None
) -> Path:
    """The branch stages of the tiny config, trained once; do not modify."""
    folder = tmp_path_factory.mktemp("fuse-cli")
    config = load_config(FusionRunConfig, write_config(folder))
    runs = folder / "runs"
    run_pipeline(FusionPlan(config, runs), synthetic_data, levels=[])
    return runs


@pytest.fixture
def runs(trained_branches: Path, tmp_path: Path) -> Path:
    """A private copy of the trained branch stages."""
    return Path(shutil.copytree(trained_branches, tmp_path / "runs"))


@pytest.fixture
def interrupt_in(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """`interrupt_in(title)`: Ctrl-C at the first epoch end of the step shown as `title`."""
    original = TrainingView.__call__

    def arm(title: str) -> None:
        def interrupting(self: TrainingView, event: object) -> None:
            original(self, event)
            if isinstance(event, EpochDone) and self.title == title:
                raise KeyboardInterrupt

        monkeypatch.setattr(TrainingView, "__call__", interrupting)

    yield arm
    monkeypatch.setattr(TrainingView, "__call__", original)


# --------------------------------------------------------------------------------------------
# successful runs


def test_help_lists_fuse_and_pipeline(cli) -> None:
    code, output, _ = cli("--help")
    assert code == 0
    for command in ("fuse", "pipeline", "demo", "train-branch", "finetune"):
        assert re.search(rf"^\W*{command}\b", output, re.M), f"{command} missing:\n{output}"
    code, output, _ = cli("fuse", "--help")
    assert code == 0 and "arch1" in output and "arch2" in output and "--stage" in output


def test_pipeline_trains_every_step_then_skips_them(
    cli, synthetic_data: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    runs = tmp_path / "runs"
    args = ["pipeline", config, "--data", synthetic_data, "--runs", runs]
    code, output, error = cli(*args)
    assert code == 0, f"{output}\n{error!r}"
    headers = [
        f"[{2 * i + j + 1}/15] {stage} {branch}"
        for i, branch in enumerate(BRANCHES)
        for j, stage in enumerate(("pretrain", "finetune"))
    ]
    headers += [f"[13/15] fusion L1 {LEVEL_1[0]}", f"[14/15] fusion L1 {LEVEL_1[1]}"]
    headers += [f"[15/15] fusion L2 {FINAL}"]
    assert_in_order(output, headers)
    assert "fused anticipation times 1, 0.5 s" in output
    assert str(runs / ARCH2_DIR) in output

    assert time_columns(output) == ["1", "0.5"]
    assert "τ=0.75s" not in output and "τ=0.25s" not in output
    rows = results_rows(output)
    names = [*BRANCHES, *(f"L1 {label}" for label in LEVEL_1), f"L2 {FINAL}"]
    assert list(rows) == names  # fine-tuned branches, then the fusion units bottom-up
    for name in names:
        level, _, label = name.rpartition(" ")
        root = runs / ARCH2_DIR / label if level else branch_root(runs, label)
        assert rows[name] == expected_cells(root, ["1", "0.5"]), name

    code, again, error = cli(*args)
    assert code == 0, f"{again}\n{error!r}"
    assert again.count("(finished, skipped)") == 15
    assert_in_order(again, [f"{header} (finished, skipped)" for header in headers])
    assert "epoch   1/1" not in again  # nothing trained
    assert results_rows(again) == rows


def test_fuse_trains_level_1_then_level_2(
    cli, runs: Path, synthetic_data: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    args = ["fuse", "arch2", "--config", config, "--data", synthetic_data, "--runs", runs]
    code, output, error = cli(*args, "--stage", "1")
    assert code == 0, f"{output}\n{error!r}"
    assert_in_order(output, [f"[1/2] fusion L1 {LEVEL_1[0]}", f"[2/2] fusion L1 {LEVEL_1[1]}"])
    assert "L2" not in output
    assert list(results_rows(output)) == [f"L1 {label}" for label in LEVEL_1]
    for label in LEVEL_1:
        status = json.loads((runs / ARCH2_DIR / label / "status.json").read_text())
        assert status["state"] == "finished"
    assert not (runs / ARCH2_DIR / FINAL).exists()

    code, output, error = cli(*args)
    assert code == 0, f"{output}\n{error!r}"
    assert_in_order(
        output,
        [
            f"[1/3] fusion L1 {LEVEL_1[0]} (finished, skipped)",
            f"[2/3] fusion L1 {LEVEL_1[1]} (finished, skipped)",
            f"[3/3] fusion L2 {FINAL}",
        ],
    )
    assert f"[3/3] fusion L2 {FINAL} (finished" not in output
    assert time_columns(output) == ["1", "0.5"]
    rows = results_rows(output)
    assert list(rows) == [*(f"L1 {label}" for label in LEVEL_1), f"L2 {FINAL}"]
    assert rows[f"L2 {FINAL}"] == expected_cells(runs / ARCH2_DIR / FINAL, ["1", "0.5"])

    code, output, error = cli(*args, "--stage", "3")
    assert_user_error(code, output, error, "--stage 3", "fusion levels 1, 2")


def test_fuse_arch1_trains_a_config_that_leaves_the_architecture_out(
    cli, runs: Path, synthetic_data: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    text = config.read_text()
    config.write_text(text.replace('architecture = "arch2"\n', ""))
    assert "architecture" not in config.read_text().split("[model]")[1].split("[optim]")[0]
    code, output, error = cli(
        "fuse", "arch1", "--config", config, "--data", synthetic_data, "--runs", runs
    )
    assert code == 0, f"{output}\n{error!r}"
    assert "arch1 over rgb, flow, obj" in output
    fusion_dirs = sorted(p.name for p in (runs / "synthetic").iterdir() if "+" in p.name)
    assert fusion_dirs == ["arch1-rgb+flow+obj-a0.25-enc2-ant4+a0.5-enc1-ant2"]
    assert_in_order(
        output,
        [
            "[1/4] fusion L1 rgb@0.25+0.5",
            "[2/4] fusion L1 flow@0.25+0.5",
            "[3/4] fusion L1 obj@0.25+0.5",
            f"[4/4] fusion L2 {FINAL}",
        ],
    )
    saved = json.loads((runs / "synthetic" / fusion_dirs[0] / FINAL / "config.json").read_text())
    assert saved["model"]["architecture"] == "arch1"


def test_fuse_with_frozen_branches(cli, runs: Path, synthetic_data: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    code, output, error = cli(
        "fuse", "arch2", "--config", config, "--data", synthetic_data, "--runs", runs,
        "--stage", "1", "--freeze-branches",
    )  # fmt: skip
    assert code == 0, f"{output}\n{error!r}"
    root = runs / ARCH2_DIR / LEVEL_1[0]
    assert json.loads((root / "config.json").read_text())["model"]["freeze_branches"] is True
    fused = load_file(str(root / "best.safetensors"))
    for index, modality in enumerate(("rgb", "flow", "obj")):
        finetuned = load_file(str(branch_root(runs, f"{modality}@0.25") / "best.safetensors"))
        for key, value in finetuned.items():
            assert torch.equal(fused[f"inputs.{index}.branch.{key}"], value), key


# --------------------------------------------------------------------------------------------
# user errors: exit code 2, a message naming the culprit, no traceback


@pytest.mark.parametrize(("argument", "declared"), [("arch1", "arch2"), ("arch2", "arch1")])
def test_fuse_refuses_an_architecture_its_config_contradicts(
    cli, synthetic_data: Path, tmp_path: Path, argument: str, declared: str
) -> None:
    """The positional architecture overrode the config's silently (an arch1 run from an arch2
    config): an explicit config is honoured or refused, naming the file and both choices."""
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('"arch2"', f'"{declared}"'))
    runs = tmp_path / "runs"
    args = ["fuse", argument, "--config", config, "--data", synthetic_data, "--runs", runs]
    code, output, error = cli(*args)
    assert_user_error(
        code, output, error, f'{config} declares architecture = "{declared}" in [model]',
        f"the command line asks for {argument} (the ARCHITECTURE argument)",
    )  # fmt: skip
    hint = hint_of(output)
    assert f"sfr fuse {declared} --config {config}" in hint
    assert f'set architecture = "{argument}" in [model] of {config}' in hint
    assert not runs.exists()  # refused before any work

    # a --set of the field is the user overriding the file on purpose, and must agree too
    code, output, error = cli(*args, "--set", f"model.architecture={declared}")
    assert_user_error(code, output, error, f"--set model.architecture={declared} contradicts")
    code, output, _ = cli(*args, "--set", f"model.architecture={argument}")
    assert "contradicts" not in output and "declares" not in output
    assert f"{argument} over rgb, flow, obj" in output  # then fails on the untrained branches


def test_fuse_without_trained_branches_says_to_run_the_pipeline(
    cli, synthetic_data: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    runs = tmp_path / "empty-runs"
    code, output, error = cli(
        "fuse", "arch2", "--config", config, "--data", synthetic_data, "--runs", runs
    )
    assert_user_error(
        code,
        output,
        error,
        "has not been trained",
        str(branch_root(runs, "rgb@0.25") / "best.safetensors"),
        f"sfr pipeline {config} --data {synthetic_data} --runs {runs}",
    )
    assert not (runs / ARCH2_DIR).exists()


TWO_RATES = """
[[model.rates]]
alpha = {a}
s_enc = 2
s_ant = {sa}

[[model.rates]]
alpha = {b}
s_enc = 1
s_ant = {sb}
"""


@pytest.mark.parametrize("command", ["pipeline", "fuse"])
@pytest.mark.parametrize(
    ("model_extra", "rates", "extra_args", "needles"),
    [
        pytest.param(
            "",
            TWO_RATES.format(a=0.25, sa=4, b=0.375, sb=2),
            [],
            ["model.rates", "0.25 and 0.375", "not an integer"],
            id="rate-ratio",
        ),
        pytest.param(
            "",
            TWO_RATES.format(a=0.25, sa=1, b=0.5, sb=1),
            [],
            ["model.rates", "share no anticipation time", "alpha 0.25: 0.25", "alpha 0.5: 0.5"],
            id="no-common-time",
        ),
        pytest.param(
            "hiden = 8",
            RATES_TOML,
            [],
            ["model.hiden: unknown field", "allowed:"],
            id="typo",
        ),
        pytest.param(
            "",
            RATES_TOML,
            ["--set", "run.select_time=0.75"],
            ["run.select_time", "not a fused anticipation time", "allowed: 1, 0.5"],
            id="select-time",
        ),
    ],
)
def test_config_problems_name_the_field(
    cli,
    synthetic_data: Path,
    tmp_path: Path,
    command: str,
    model_extra: str,
    rates: str,
    extra_args: list[str],
    needles: list[str],
) -> None:
    config = write_config(tmp_path, model_extra=model_extra, rates=rates)
    runs = tmp_path / "runs"
    target = [config] if command == "pipeline" else ["arch2", "--config", config]
    code, output, error = cli(
        command, *target, "--data", synthetic_data, "--runs", runs, *extra_args
    )
    assert_user_error(code, output, error, str(config), *needles)
    if "allowed:" in needles and "hiden" in model_extra:
        allowed = output.split("allowed:", 1)[1].split(")", 1)[0]
        names = {name.strip() for name in allowed.split(",")}
        assert names >= {"architecture", "modalities", "rates", "hidden", "freeze_branches"}
    assert not runs.exists()


@pytest.mark.parametrize("command", ["fuse", "pipeline"])
def test_runs_naming_a_file_says_so(
    cli, synthetic_data: Path, tmp_path: Path, command: str
) -> None:
    """Issue 11: --runs naming a file is named as such, not as an untrained stage."""
    config = write_config(tmp_path)
    runs = tmp_path / "afile"
    runs.write_text("not a folder")
    target = [config] if command == "pipeline" else ["arch2", "--config", config]
    code, output, error = cli(command, *target, "--data", synthetic_data, "--runs", runs)
    assert_user_error(code, output, error, f"The runs (--runs) folder {runs} is a file")
    assert "has not been trained" not in output and runs.read_text() == "not a folder"


def test_branches_of_another_config_are_refused(
    cli, runs: Path, synthetic_data: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    code, output, error = cli(
        "fuse", "arch2", "--config", config, "--data", synthetic_data, "--runs", runs,
        "--set", "model.hidden=6",
    )  # fmt: skip
    assert_user_error(
        code,
        output,
        error,
        "model.hidden: saved 8, needed 6",
        str(branch_root(runs, "rgb@0.25") / "best.safetensors"),
    )
    assert not (runs / ARCH2_DIR).exists()
    hint = hint_of(output)  # names a command that retrains the branches
    assert "sfr pipeline" in hint or "sfr finetune" in hint, hint


def test_a_missing_modality_store_is_named(cli, synthetic_copy: Path, tmp_path: Path) -> None:
    shutil.rmtree(synthetic_copy / "obj")
    config = write_config(tmp_path)
    code, output, error = cli(
        "pipeline", config, "--data", synthetic_copy, "--runs", tmp_path / "runs"
    )
    assert_user_error(
        code, output, error, "Feature store 'obj' not found", str(synthetic_copy / "obj")
    )


def test_an_interrupted_fusion_resumes_only_with_its_saved_config(
    cli, runs: Path, synthetic_data: Path, tmp_path: Path, interrupt_in
) -> None:
    config = write_config(tmp_path)
    args = [
        "fuse", "arch2", "--config", config, "--data", synthetic_data, "--runs", runs,
        "--stage", "1", "--epochs", "2",
    ]  # fmt: skip
    interrupt_in(f"fusion {LEVEL_1[0]}")
    code, output, _ = cli(*args)
    assert code == 130, output
    assert "Interrupted." in output and "Traceback" not in output
    root = runs / ARCH2_DIR / LEVEL_1[0]
    assert json.loads((root / "status.json").read_text())["state"] == "interrupted"
    interrupt_in("no such step")

    code, output, error = cli(*args, "--lr", "0.05")
    assert_user_error(
        code, output, error, f"Cannot resume {root}", "saved config differs in fusion_optim.lr"
    )
    assert "--force" in hint_of(output)

    code, output, error = cli(*args)
    assert code == 0, f"{output}\n{error!r}"
    assert f"[1/2] fusion L1 {LEVEL_1[0]} (resuming)" in output
    assert f"resuming {root} at epoch 2" in output  # the second epoch is next
    lines = (root / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_an_interrupted_pipeline_gives_advice_that_works(
    cli, synthetic_data: Path, tmp_path: Path, interrupt_in
) -> None:
    config = write_config(tmp_path)
    args = ["pipeline", config, "--data", synthetic_data, "--runs", tmp_path / "runs"]
    interrupt_in("pretrain rgb@0.25")
    code, output, _ = cli(*args)
    assert code == 130 and "Interrupted." in output, output
    interrupt_in("no such step")
    if "--resume" in output:
        code, again, error = cli(*args, "--resume")
        assert code == 0, f"{again}\n{error!r}"
