"""Training stages end to end on the golden data: run directories, checkpoints, resume, errors."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import sfr.train.loop as loop_module
import sfr.train.stages as stages_module
from sfr.checkpoint import load_checkpoint, read_metadata, save_checkpoint, split_prefix
from sfr.config import BranchRunConfig, build_config
from sfr.data.synthetic import SyntheticSpec, write_synthetic
from sfr.errors import RunError, TrainingError
from sfr.models import matmul
from sfr.train.loop import EpochDone, Trainer
from sfr.train.rundir import RunDir
from sfr.train.stages import train_branch_stage

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SLUG = "rgb-a0.25-enc6-ant8"
TIMES_6_8 = ("2", "1.75", "1.5", "1.25", "1", "0.75", "0.5", "0.25")


def branch_config(overrides: dict[str, Any] | None = None) -> BranchRunConfig:
    """A tiny rgb branch on the golden data (16-d features, 24 actions), alpha 0.25, 6 + 8 steps."""
    tree = {
        "data": {"dataset": "ek55", "feature_dims": {"rgb": 16, "flow": 16, "obj": 12}},
        "branch": {
            "modality": "rgb",
            "alpha": 0.25,
            "s_enc": 6,
            "s_ant": 8,
            "hidden": 8,
            "dropout": 0.5,
        },
        "optim": {"lr": 0.1, "momentum": 0.9, "batch_size": 16, "epochs": 1},
        "run": {"seed": 0, "device": "cpu"},
    }
    return build_config(BranchRunConfig, tree, overrides or {})


def small_grid(overrides: dict[str, Any] | None = None) -> BranchRunConfig:
    """Same branch on a shorter grid (2 + 4 steps) for the tests that train several times."""
    return branch_config({"branch.s_enc": 2, "branch.s_ant": 4, **(overrides or {})})


def run_root(runs: Path, config: BranchRunConfig, stage: str) -> Path:
    return runs / "ek55" / config.branch.slug / stage


def metrics_lines(root: Path) -> list[dict[str, Any]]:
    lines = (root / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"tensor {key} differs"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


class RecordingTrainer(Trainer):
    """A Trainer that records the weights of its model when `fit` starts."""

    seen: ClassVar[list[tuple[bool, dict[str, torch.Tensor]]]] = []

    def fit(self, resume: bool):  # type: ignore[override]
        module = self.task.module
        weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        RecordingTrainer.seen.append((module.sequence_completion, weights))
        return super().fit(resume)


# --------------------------------------------------------------------------------------------
# pre-training then fine-tuning: the run directory layout and what the checkpoints say


def test_pretrain_then_finetune_write_complete_run_dirs(
    golden_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "RUNS"
    config = branch_config({"optim.epochs": 2})
    RecordingTrainer.seen = []
    monkeypatch.setattr(stages_module, "Trainer", RecordingTrainer)

    results = {
        stage: train_branch_stage(config, stage, golden_data, runs, source="cfg.toml")
        for stage in ("pretrain", "finetune")
    }

    resolved = config.model_dump(mode="json")
    for stage, result in results.items():
        root = runs / "ek55" / SLUG / stage
        assert Path(result.run_dir) == root
        assert sorted(p.name for p in root.iterdir()) == [
            "best.safetensors",
            "config.json",
            "last.safetensors",
            "metrics.jsonl",
            "status.json",
        ]
        assert json.loads((root / "config.json").read_text()) == resolved
        status = json.loads((root / "status.json").read_text())
        assert status["state"] == "finished"
        assert status["epoch"] == 2  # epochs are numbered from 1 in the files
        assert status["best_epoch"] == result.best_epoch + 1

        records = metrics_lines(root)
        assert [r["epoch"] for r in records] == [1, 2]
        best_so_far = -math.inf
        for record in records:
            for key in ("epoch", "train_loss", "val_loss", "selection", "best", "is_best"):
                assert key in record
            for seconds in TIMES_6_8:
                assert 0 <= record[f"top1@{seconds}"] <= record[f"top5@{seconds}"] <= 100
            assert 0 <= record["mt5r@1"] <= 100
            assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0
            assert math.isfinite(record["val_loss"]) and record["val_loss"] > 0
            # default selection: top-5 action accuracy at 1 s
            assert record["selection"] == record["top5@1"]
            assert record["is_best"] == (record["selection"] > best_so_far)
            best_so_far = max(best_so_far, record["selection"])
            assert record["best"] == best_so_far
        best_record = records[result.best_epoch]
        assert result.best == best_record["selection"] == status["best"]
        assert result.metrics == {k: v for k, v in best_record.items() if "@" in k}

        meta = read_metadata(root / "best.safetensors")
        assert meta["kind"] == "branch"
        assert meta["stage"] == stage
        assert meta["config"] == resolved
        assert meta["epoch"] == result.best_epoch + 1 == status["best_epoch"]  # from 1, as files
        assert meta["metrics"] == result.metrics
        assert meta["model"] == {"feat_dim": 16, "hidden": 8, "num_classes": 24}
        last_meta = read_metadata(root / "last.safetensors")
        assert last_meta["epoch"] == 2 == status["epoch"] == records[-1]["epoch"]
        assert last_meta["best_epoch"] == result.best_epoch + 1
        if result.best_epoch == 1:  # the best epoch is the last one: same weights
            best_tensors = load_file(str(root / "best.safetensors"))
            last_tensors = split_prefix(load_file(str(root / "last.safetensors")), "model")
            assert_same_tensors(best_tensors, last_tensors)

    # the fine-tuning model starts from exactly the pre-training's best weights
    (pre_seqcomp, _), (fine_seqcomp, fine_init) = RecordingTrainer.seen
    assert pre_seqcomp is True and fine_seqcomp is False
    pre_best = load_file(str(runs / "ek55" / SLUG / "pretrain" / "best.safetensors"))
    assert_same_tensors(fine_init, pre_best)


def test_finetune_with_negligible_lr_keeps_the_pretrained_weights(
    golden_data: Path, tmp_path: Path
) -> None:
    """Black-box check of the initialisation: an lr of 1e-30 leaves the weights unchanged."""
    runs = tmp_path / "runs"
    pre = small_grid()
    train_branch_stage(pre, "pretrain", golden_data, runs)
    fine = small_grid({"optim.lr": 1e-30})
    train_branch_stage(fine, "finetune", golden_data, runs)
    pre_best = load_file(str(run_root(runs, pre, "pretrain") / "best.safetensors"))
    fine_best = load_file(str(run_root(runs, fine, "finetune") / "best.safetensors"))
    assert sorted(pre_best) == sorted(fine_best)
    for key in pre_best:
        torch.testing.assert_close(fine_best[key], pre_best[key], rtol=0, atol=1e-12)


def test_finetune_without_pretraining_names_the_command_to_run(
    golden_data: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    config = small_grid()
    with pytest.raises(RunError) as caught:
        train_branch_stage(config, "finetune", golden_data, runs, source="my/branch.toml")
    error = caught.value
    assert "pretrain" in error.message and "best.safetensors" in error.message
    assert error.hint is not None
    assert f"sfr train-branch --config my/branch.toml --data {golden_data} --runs {runs}" in (
        error.hint
    )
    assert not run_root(runs, config, "finetune").exists()


def test_finetune_refuses_a_pretraining_of_another_size(golden_data: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    train_branch_stage(small_grid(), "pretrain", golden_data, runs)
    bigger = small_grid({"branch.hidden": 12})
    with pytest.raises(RunError) as caught:
        train_branch_stage(bigger, "finetune", golden_data, runs)
    text = str(caught.value)
    assert "model.hidden: saved 8, needed 12" in text
    assert str(run_root(runs, bigger, "pretrain") / "best.safetensors") in text


# --------------------------------------------------------------------------------------------
# resume, force, refusal


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_resume_continues_bit_for_bit(golden_data: Path, tmp_path: Path, stage: str) -> None:
    """4 epochs straight == 2 epochs, then --resume with 4 epochs (dropout on, momentum on)."""
    straight_runs, resumed_runs = tmp_path / "straight", tmp_path / "resumed"
    four, two = small_grid({"optim.epochs": 4}), small_grid({"optim.epochs": 2})
    if stage == "finetune":
        for runs in (straight_runs, resumed_runs):
            torch.manual_seed(11)
            train_branch_stage(two, "pretrain", golden_data, runs)

    # The same global RNG state before each fresh start, so that only resuming is compared.
    torch.manual_seed(5)
    straight = train_branch_stage(four, stage, golden_data, straight_runs)
    torch.manual_seed(5)
    train_branch_stage(two, stage, golden_data, resumed_runs)
    assert [r["epoch"] for r in metrics_lines(run_root(resumed_runs, two, stage))] == [1, 2]
    torch.manual_seed(123)  # the resumed run must restore its own RNG state, not use this one
    resumed = train_branch_stage(four, stage, golden_data, resumed_runs, resume=True)

    a, b = run_root(straight_runs, four, stage), run_root(resumed_runs, four, stage)
    for name in ("best.safetensors", "last.safetensors"):
        assert_same_tensors(load_file(str(a / name)), load_file(str(b / name)))
    assert metrics_lines(a) == metrics_lines(b)
    assert [r["epoch"] for r in metrics_lines(b)] == [1, 2, 3, 4]
    assert (resumed.best_epoch, resumed.best) == (straight.best_epoch, straight.best)
    assert json.loads((b / "status.json").read_text())["state"] == "finished"
    assert read_metadata(b / "last.safetensors")["epoch"] == 4
    # the saved config is the one the run now has (4 epochs)
    assert json.loads((b / "config.json").read_text())["optim"]["epochs"] == 4


def test_finished_run_is_refused_without_force_or_resume(golden_data: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = small_grid()
    train_branch_stage(config, "pretrain", golden_data, runs)
    root = run_root(runs, config, "pretrain")
    before = (root / "best.safetensors").read_bytes()

    with pytest.raises(RunError) as caught:
        train_branch_stage(config, "pretrain", golden_data, runs)
    text = str(caught.value)
    assert str(root) in text and "finished run" in text
    assert "--force" in text and "--resume" in text
    assert (root / "best.safetensors").read_bytes() == before

    # --force deletes what sfr wrote (never a file it did not write) and trains from scratch
    (root / "stray.txt").write_text("left by hand")
    (root / ".last.safetensors.x1y2.tmp").write_bytes(b"torn")
    result = train_branch_stage(config, "pretrain", golden_data, runs, force=True)
    assert (root / "stray.txt").read_text() == "left by hand"
    assert not (root / ".last.safetensors.x1y2.tmp").exists()
    assert [r["epoch"] for r in metrics_lines(root)] == [1]
    assert result.best_epoch == 0
    assert json.loads((root / "status.json").read_text())["state"] == "finished"


def test_resume_with_a_changed_setting_names_the_field(golden_data: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = small_grid()
    train_branch_stage(config, "pretrain", golden_data, runs)
    saved = (run_root(runs, config, "pretrain") / "config.json").read_text()

    changed = small_grid({"branch.hidden": 12, "optim.epochs": 3})
    with pytest.raises(RunError) as caught:
        train_branch_stage(changed, "pretrain", golden_data, runs, resume=True)
    assert "branch.hidden" in caught.value.message
    assert "optim.epochs" not in caught.value.message  # epochs may change on resume
    assert "--force" in (caught.value.hint or "")

    with pytest.raises(RunError) as caught:
        train_branch_stage(
            small_grid({"optim.lr": 0.5, "branch.dropout": 0.25}),
            "pretrain",
            golden_data,
            runs,
            resume=True,
        )
    assert "branch.dropout" in caught.value.message and "optim.lr" in caught.value.message
    # a refused resume leaves the run as it was
    assert (run_root(runs, config, "pretrain") / "config.json").read_text() == saved


# --------------------------------------------------------------------------------------------
# failures in the middle of training


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(
    golden_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs"
    config = small_grid({"optim.epochs": 3})
    root = run_root(runs, config, "pretrain")
    real_loss = loop_module.anticipation_loss
    saved: dict[str, bytes] = {}

    def poison_after_first_epoch(event: object) -> None:
        if isinstance(event, EpochDone) and event.epoch == 0:
            saved["best"] = (root / "best.safetensors").read_bytes()
            saved["last"] = (root / "last.safetensors").read_bytes()

    def loss(
        scores: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        value = real_loss(scores, labels, weight)
        if saved and torch.is_grad_enabled():  # training batches of epoch 1 onwards
            return value * float("nan")
        return value

    monkeypatch.setattr(loop_module, "anticipation_loss", loss)
    with pytest.raises(TrainingError) as caught:
        train_branch_stage(config, "pretrain", golden_data, runs, progress=poison_after_first_epoch)
    assert "nan" in caught.value.message and "epoch 2" in caught.value.message  # 1-based
    assert "--lr" in (caught.value.hint or "") and str(root) in (caught.value.hint or "")
    assert (caught.value.hint or "").index("input features") < caught.value.hint.index("--lr")

    assert (root / "best.safetensors").read_bytes() == saved["best"]
    assert (root / "last.safetensors").read_bytes() == saved["last"]
    assert read_metadata(root / "last.safetensors")["epoch"] == 1
    assert [r["epoch"] for r in metrics_lines(root)] == [1]
    assert json.loads((root / "status.json").read_text())["state"] == "interrupted"
    assert leftovers(root) == []

    # the interrupted run is refused without --resume, and --resume finishes it
    monkeypatch.setattr(loop_module, "anticipation_loss", real_loss)
    with pytest.raises(RunError, match="interrupted run"):
        train_branch_stage(config, "pretrain", golden_data, runs)
    result = train_branch_stage(config, "pretrain", golden_data, runs, resume=True)
    assert [r["epoch"] for r in metrics_lines(root)] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) for r in result.history)


def test_huge_learning_rate_raises_training_error(golden_data: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = small_grid({"optim.lr": 1e38, "optim.epochs": 2})
    with pytest.raises(TrainingError) as caught:
        train_branch_stage(config, "pretrain", golden_data, runs)
    assert "The training loss became" in caught.value.message
    assert any(word in caught.value.message for word in ("nan", "inf"))
    root = run_root(runs, config, "pretrain")
    # it failed during the first epoch: no checkpoint was ever written, nothing torn is left
    assert not (root / "last.safetensors").exists()
    assert not (root / "best.safetensors").exists()
    assert leftovers(root) == []
    assert json.loads((root / "status.json").read_text())["state"] == "interrupted"


@pytest.mark.parametrize(
    "failure",
    [OSError(28, "No space left on device"), SafetensorError("No space left"), KeyboardInterrupt()],
)
def test_checkpoint_write_is_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    path = tmp_path / "ckpt" / "best.safetensors"
    old = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_checkpoint(path, old, {"epoch": 1})
    before = path.read_bytes()
    listed: list[list[str]] = []

    def broken_save(tensors: dict[str, torch.Tensor], metadata: Any = None) -> bytes:
        listed.append(sorted(p.name for p in path.parent.iterdir()))
        raise failure

    monkeypatch.setattr(safetensors.torch, "save", broken_save)
    expected = KeyboardInterrupt if isinstance(failure, KeyboardInterrupt) else RunError
    with pytest.raises(expected) as caught:  # a full disk is a message naming the file
        save_checkpoint(path, {"w": torch.zeros(2, 3)}, {"epoch": 2})
    if expected is RunError:
        assert str(path) in caught.value.message and "No space left" in caught.value.message
    # it writes to a temp file beside the checkpoint, not to the checkpoint itself
    assert len(listed) == 1 and len(listed[0]) == 2 and listed[0][1] == "best.safetensors"
    assert re.fullmatch(r"\.best\.safetensors\.\w+\.tmp", listed[0][0])
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.safetensors"]
    tensors, meta = load_checkpoint(path)
    assert meta == {"epoch": 1, "epoch_base": 1}
    assert torch.equal(tensors["w"], old["w"])

    monkeypatch.undo()
    save_checkpoint(path, {"w": torch.ones(2, 3)}, {"epoch": 3})
    tensors, meta = load_checkpoint(path)
    assert meta == {"epoch": 3, "epoch_base": 1} and torch.equal(tensors["w"], torch.ones(2, 3))


# A process killed (SIGKILL) in the middle of a checkpoint write. The library's own file writer
# (`serialize_file`, behind `save_file`) is replaced by one that does what it does first, a
# temp file `.tmpXXXXXX` beside the target, then dies; the in-memory serialiser (`save`) lists
# the folder, prints it and dies.
_KILLED_WRITE = """
import json, os, signal, sys, tempfile
from pathlib import Path
import safetensors.torch, torch
from sfr.checkpoint import save_checkpoint

target = Path(sys.argv[1])
real_save = safetensors.torch.save

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def library_file_writer(tensors, filename, metadata=None):
    handle, name = tempfile.mkstemp(prefix=".tmp", dir=os.path.dirname(filename))
    os.write(handle, real_save({"w": torch.zeros(1000)})[:100])
    die()

def serialiser(tensors, metadata=None):
    data = real_save(tensors, metadata=metadata)
    print(json.dumps(sorted(os.listdir(target.parent))))
    die()

safetensors.torch.serialize_file = library_file_writer
safetensors.torch.save = serialiser
save_checkpoint(target, {"w": torch.ones(1000)}, {"epoch": 2})
"""


def test_a_kill_during_a_checkpoint_write_leaves_only_sfr_temp_files_removed_next_time(
    tmp_path: Path,
) -> None:
    """Nothing but sfr's temp file is created beside a checkpoint while it is written (the
    safetensors library's `save_file` makes a temp file of its own, which a kill leaves behind
    under a name sfr does not know); a kill leaves only that temp file, which the next command
    on the folder deletes."""
    root = tmp_path / "run"
    run = RunDir(root)
    run.prepare({"optim": {"epochs": 1}}, force=False, resume=False)
    save_checkpoint(run.last_path, {"w": torch.zeros(1000)}, {"epoch": 1})
    before = sorted(p.name for p in root.iterdir())
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITE, str(run.last_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    temp = re.compile(r"\.last\.safetensors\.\w+\.tmp")
    during = json.loads(done.stdout.splitlines()[-1])
    assert len(during) == len(before) + 1 and all(n in before or temp.fullmatch(n) for n in during)
    left = sorted(p.name for p in root.iterdir())
    assert len(left) == len(before) + 1 and all(n in before or temp.fullmatch(n) for n in left)
    run.prepare({"optim": {"epochs": 2}}, force=False, resume=True)
    assert sorted(p.name for p in root.iterdir()) == before
    assert read_metadata(run.last_path)["epoch"] == 1
    run.release()


# --------------------------------------------------------------------------------------------
# data loading and selection


def test_dataloader_workers_give_the_same_metrics(golden_copy: Path, tmp_path: Path) -> None:
    """num_workers=2 (run first, as from a fresh `sfr` process) == num_workers=0, streamed."""
    results = {}
    for workers in (2, 0):
        config = small_grid({"optim.epochs": 2, "data.num_workers": workers, "data.preload": False})
        runs = tmp_path / f"runs{workers}"
        torch.manual_seed(3)
        train_branch_stage(config, "pretrain", golden_copy, runs)
        root = run_root(runs, config, "pretrain")
        results[workers] = (metrics_lines(root), load_file(str(root / "last.safetensors")))
    assert results[2][0] == results[0][0]
    assert_same_tensors(results[2][1], results[0][1])


def test_dataloader_workers_after_the_main_process_read_the_store(
    golden_copy: Path, tmp_path: Path
) -> None:
    """As in a notebook: train with num_workers=0, then with num_workers=2 in the same process
    (streamed: a preloaded table needs no workers)."""
    results = {}
    for workers in (0, 2):
        config = small_grid({"data.num_workers": workers, "data.preload": False})
        runs = tmp_path / f"runs{workers}"
        torch.manual_seed(3)
        train_branch_stage(config, "pretrain", golden_copy, runs)
        results[workers] = metrics_lines(run_root(runs, config, "pretrain"))
    assert results[0] == results[2]


@pytest.mark.parametrize(("select", "select_time"), [("mt5r", 1.0), ("mt5r", 0.5), ("top5", 0.5)])
def test_selection_measure_and_time(
    golden_data: Path, tmp_path: Path, select: str, select_time: float
) -> None:
    runs = tmp_path / "runs"
    config = small_grid({"optim.epochs": 3, "run.select": select, "run.select_time": select_time})
    result = train_branch_stage(config, "pretrain", golden_data, runs)
    root = run_root(runs, config, "pretrain")
    key = f"{select}@{select_time:g}"
    records = metrics_lines(root)
    assert len(records) == 3
    for record in records:
        assert record["selection"] == record[key]
        assert f"mt5r@{select_time:g}" in record
    selections = [r["selection"] for r in records]
    best_epoch = selections.index(max(selections))  # first epoch reaching the maximum
    assert result.best_epoch == best_epoch and result.best == max(selections)
    meta = read_metadata(root / "best.safetensors")
    assert meta["epoch"] == best_epoch + 1
    assert meta["selection"] == {"measure": select, "time": select_time}
    assert meta["metrics"][key] == max(selections)


def test_training_on_the_synthetic_dataset(synthetic_data: Path, tmp_path: Path) -> None:
    """write_synthetic's output trains in both stages with its own dims and class count."""
    config = build_config(
        BranchRunConfig,
        {
            "data": {"name": "synthetic", "feature_dims": {"rgb": 8, "flow": 8, "obj": 6}},
            "branch": {"modality": "obj", "alpha": 0.25, "s_enc": 2, "s_ant": 4, "hidden": 8},
            "optim": {"batch_size": 8, "epochs": 1},
            "run": {"device": "cpu"},
        },
    )
    runs = tmp_path / "runs"
    for stage in ("pretrain", "finetune"):
        result = train_branch_stage(config, stage, synthetic_data, runs)
        assert Path(result.run_dir) == runs / "synthetic" / "obj-a0.25-enc2-ant4" / stage
        meta = read_metadata(Path(result.run_dir) / "best.safetensors")
        assert meta["model"] == {"feat_dim": 6, "hidden": 8, "num_classes": 32}


def test_same_seed_gives_the_same_run(golden_data: Path, tmp_path: Path) -> None:
    config = small_grid()
    lasts = []
    for attempt, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)  # e.g. whatever ran before in the same process
        runs = tmp_path / f"runs{attempt}"
        train_branch_stage(config, "pretrain", golden_data, runs)
        lasts.append(load_file(str(run_root(runs, config, "pretrain") / "last.safetensors")))
    assert_same_tensors(*lasts)


def test_training_with_fewer_than_five_classes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    spec = SyntheticSpec(
        num_videos=1, val_videos=1, actions_per_video=10, dims=(8, 8, 6),
        num_verbs=2, num_nouns=2, num_actions=4,
    )  # fmt: skip
    write_synthetic(data, spec)
    config = build_config(
        BranchRunConfig,
        {
            "data": {"feature_dims": {"rgb": 8}},
            "branch": {"modality": "rgb", "alpha": 0.25, "s_enc": 2, "s_ant": 4, "hidden": 8},
            "optim": {"batch_size": 8, "epochs": 1},
            "run": {"device": "cpu"},
        },
    )
    result = train_branch_stage(config, "pretrain", data, tmp_path / "runs")
    assert result.metrics["top5@1"] == 100.0  # 4 classes: every label is in the top 5


def test_each_validation_pass_runs_with_fixed_weights(
    golden_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validation pass of every epoch prepares the recurrent weights once for the pass
    (`sfr.models.matmul.fixed_weights`), and no training step runs inside such a block."""
    config = small_grid()
    passes: list[int] = []
    train_epoch = Trainer._train_epoch

    @contextlib.contextmanager
    def recorded() -> Iterator[None]:
        passes.append(len(passes))
        with matmul.fixed_weights():
            yield

    def training(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        assert not matmul.fixed_weights_held()
        return train_epoch(self, *args, **kwargs)

    monkeypatch.setattr(loop_module, "fixed_weights", recorded)
    monkeypatch.setattr(Trainer, "_train_epoch", training)
    train_branch_stage(config, "pretrain", golden_data, tmp_path / "runs")
    assert len(passes) == config.optim.epochs
    assert not matmul.fixed_weights_held()
