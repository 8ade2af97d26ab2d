"""Shared fixtures: golden and synthetic data folders, writable copies, and a CLI runner."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from sfr.config import PRESETS
from sfr.data.synthetic import SyntheticSpec, write_synthetic

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
GOLDEN_DATA_DIR = TESTS_DIR / "data" / "golden" / "data"
PRESETS_DIR = PRESETS  # the package data, as an installed sfr reads it

# A synthetic dataset small enough to write and train on in well under a second.
TINY_SPEC = SyntheticSpec(num_videos=2, val_videos=1, actions_per_video=12, dims=(8, 8, 6))


def writable_copy(source: Path, target: Path) -> Path:
    """Copy a data folder (the golden one is read-only) and make every copied path writable."""
    shutil.copytree(source, target)
    for root, dirs, files in os.walk(target):
        for name in [*dirs, *files]:
            path = Path(root) / name
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    Path(target).chmod(Path(target).stat().st_mode | stat.S_IWUSR)
    return Path(target)


@pytest.fixture
def single_torch_thread():
    """Run torch on one intra-op thread: the tiny models here are faster so, and on a busy
    2-core machine spinning OpenMP threads otherwise cost several times the work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def golden_data() -> Path:
    """The golden data folder (EK55 layout, rgb/flow 16-d, obj 12-d, 24 actions); do not modify."""
    assert (GOLDEN_DATA_DIR / "rgb" / "data.mdb").is_file()
    return GOLDEN_DATA_DIR


@pytest.fixture
def golden_copy(tmp_path: Path) -> Path:
    """A private, writable copy of the golden data folder."""
    return writable_copy(GOLDEN_DATA_DIR, tmp_path / "golden-copy")


@pytest.fixture(scope="session")
def tiny_spec() -> SyntheticSpec:
    return TINY_SPEC


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset written once per session by `write_synthetic`; do not modify."""
    out = tmp_path_factory.mktemp("synthetic") / "data"
    write_synthetic(out, TINY_SPEC)
    return out


@pytest.fixture(scope="session")
def presets_dir() -> Path:
    return PRESETS_DIR


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, BaseException | None]]:
    """Invoke `sfr` in-process: `cli(*args)` -> (exit code, stdout + stderr, exception).

    The consoles are made wide so that paths and messages are not wrapped.
    """
    from typer.testing import CliRunner

    from sfr.cli import common
    from sfr.cli.app import app

    for console in (common.console, common.err_console):
        monkeypatch.setattr(console, "_width", 1000, raising=False)
    runner = CliRunner()

    def invoke(*args: object) -> tuple[int, str, BaseException | None]:
        result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})
        output = result.output
        try:
            stderr = result.stderr
        except (ValueError, AttributeError):  # older Click: stderr not captured separately
            stderr = ""
        if stderr and stderr not in output:
            output += stderr
        return result.exit_code, output, result.exception

    return invoke


@pytest.fixture(scope="module")
def module_torch_thread():
    """`single_torch_thread` for the module-scoped fixtures that train a pipeline once."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def synthetic_copy(synthetic_data: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the session's synthetic dataset."""
    return writable_copy(synthetic_data, tmp_path / "synthetic-copy")


# --------------------------------------------------------------------------------------------
# trained models for the evaluation tests (test_evaluation.py, test_validate_cli.py)

EVAL_RUN_PREFIX = "synthetic"
EVAL_DIMS = {"rgb": 8, "flow": 8, "obj": 6}
EVAL_RATES = [{"alpha": 0.25, "s_enc": 2, "s_ant": 4}, {"alpha": 0.5, "s_enc": 1, "s_ant": 2}]
EVAL_GRIDS = {"0.25": "enc2-ant4", "0.5": "enc1-ant2"}
EVAL_FINAL = "rgb+flow+obj@0.25+0.5"
EVAL_UNITS = {
    "arch2": ["rgb+flow+obj@0.25", "rgb+flow+obj@0.5", EVAL_FINAL],
    "arch1": ["rgb@0.25+0.5", "flow@0.25+0.5", "obj@0.25+0.5", EVAL_FINAL],
}


def eval_fusion_config(architecture: str = "arch2"):
    """rgb, flow and obj at alpha 0.25 (2 + 4 steps) and 0.5 (1 + 2), hidden 8, 2 epochs."""
    from sfr.config import FusionRunConfig, build_config

    tree = {
        "data": {"name": EVAL_RUN_PREFIX, "feature_dims": EVAL_DIMS},
        "model": {
            "architecture": architecture,
            "rates": EVAL_RATES,
            "hidden": 8,
            "branch_dropout": 0.5,
            "modality_dropout": 0.3,
            "rate_dropout": 0.4,
        },
        "optim": {"lr": 0.1, "batch_size": 8, "epochs": 2},
        "fusion_optim": {"lr": 0.1, "batch_size": 8, "epochs": 2},
        "run": {"seed": 0, "device": "cpu"},
    }
    return build_config(FusionRunConfig, tree)


class TrainedRuns:
    """A runs folder holding Architecture 2 and Architecture 1 of `eval_fusion_config`."""

    def __init__(self, runs: Path, data: Path) -> None:
        self.runs = runs
        self.data = data

    def branch(self, label: str, stage: str | None = "finetune") -> Path:
        """`rgb@0.25` -> runs/synthetic/rgb-a0.25-enc2-ant4[/stage]."""
        modality, alpha = label.split("@")
        root = self.runs / EVAL_RUN_PREFIX / f"{modality}-a{alpha}-{EVAL_GRIDS[alpha]}"
        return root / stage if stage else root

    def fusion(self, architecture: str = "arch2") -> Path:
        """The whole fusion folder of an architecture."""
        rates = "+".join(f"a{alpha}-{grid}" for alpha, grid in EVAL_GRIDS.items())
        return self.runs / EVAL_RUN_PREFIX / f"{architecture}-rgb+flow+obj-{rates}"

    def unit(self, architecture: str, label: str) -> Path:
        """One fusion unit's run folder."""
        return self.fusion(architecture) / label


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path) -> TrainedRuns:
    """Both architectures trained once on the synthetic data, sharing their branches (12 branch
    stages, 3 + 4 fusion units); do not modify."""
    import torch

    from sfr.train.fusion import FusionPlan
    from sfr.train.pipeline import run_pipeline

    runs = tmp_path_factory.mktemp("evaluation") / "runs"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for architecture in ("arch2", "arch1"):
            run_pipeline(FusionPlan(eval_fusion_config(architecture), runs), synthetic_data)
    finally:
        torch.set_num_threads(before)
    return TrainedRuns(runs, synthetic_data)


def relabel_checkpoint(source: Path, target: Path, dataset: str) -> Path:
    """A copy of a checkpoint whose recorded config says it was trained on `dataset`."""
    from sfr.checkpoint import load_checkpoint, save_checkpoint

    tensors, metadata = load_checkpoint(source)
    metadata["config"]["data"]["dataset"] = dataset
    save_checkpoint(target, tensors, metadata)
    return target


EK100_LISTS = {
    "unseen": "validation_unseen_participants_ids.csv",
    "verb": "validation_tail_verbs_ids.csv",
    "noun": "validation_tail_nouns_ids.csv",
    "action": "validation_tail_actions_ids.csv",
}


class Ek100Data:
    """The synthetic data in the EK100 layout, its id lists and an EK100 model checkpoint."""

    def __init__(self, data: Path, model: Path, lists: dict[str, list[str]]) -> None:
        self.data = data
        self.model = model
        self.lists = lists  # "unseen", "verb", "noun", "action" -> ids of that list


@pytest.fixture(scope="session")
def ek100(trained_runs: TrainedRuns, tmp_path_factory: pytest.TempPathFactory) -> Ek100Data:
    """The synthetic data rewritten as EK100 (string ids `P01_03_0`, plain CSVs without header,
    unseen and tail id lists, no many-shot lists) and the final Architecture 2 unit relabelled
    as trained on EK100; do not modify."""
    from sfr.data.annotations import read_segments

    root = tmp_path_factory.mktemp("ek100")
    data = writable_copy(trained_runs.data, root / "data")
    for split in ("training", "validation"):
        rows, counts = [], {}
        for s in read_segments(data / f"{split}.csv"):
            index = counts[s.video] = counts.get(s.video, -1) + 1
            rows.append(
                f"{s.video}_{index},{s.video},{s.start_frame},{s.end_frame},"
                f"{s.verb},{s.noun},{s.action}\n"
            )
        (data / f"{split}.csv").write_text("".join(rows), encoding="utf-8")
    for name in ("EPIC_many_shot_verbs.csv", "EPIC_many_shot_nouns.csv"):
        (data / name).unlink()
    ids = [s.id for s in read_segments(data / "validation.csv")]
    lists = {"unseen": ids[::2], "verb": ids[1::3], "noun": ids[::3], "action": ids[2::4]}
    for key, name in EK100_LISTS.items():
        (data / name).write_text("".join(f"{i}\n" for i in lists[key]), encoding="utf-8")
    final = trained_runs.unit("arch2", EVAL_FINAL) / "best.safetensors"
    model = relabel_checkpoint(final, root / "ek100-arch2.safetensors", "ek100")
    return Ek100Data(data, model, lists)
