"""The `sfr` console tool as a user calls it: results tables, run paths, and clean user errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import lmdb
import pytest
import torch
from clitools import assert_user_error, registered_commands

from sfr.cli.common import USER_ERROR_EXIT
from sfr.data.annotations import read_segments
from sfr.data.store import frame_key
from sfr.data.timegrid import TimeGrid
from sfr.train import stages

pytestmark = pytest.mark.usefixtures("single_torch_thread")

USER_ERROR = USER_ERROR_EXIT
TABLE_ROW = re.compile(
    r"^[^\w\n]*(\d+(?:\.\d+)?)[^\w\n]+(\d+\.\d\d)[^\w\n]+(\d+\.\d\d)[^\w\n]*$", re.M
)

CONFIG_TOML = """\
# a tiny rgb branch for the golden data
[data]
dataset = "ek55"
feature_dims = {{ rgb = 16, flow = 16, obj = 12 }}

[branch]
modality = "rgb"
alpha = 0.25
s_enc = 2
s_ant = 4
hidden = 8
dropout = 0.5
{branch_extra}
[optim]
lr = 0.1
batch_size = 16
epochs = 1

[run]
seed = 0
device = "cpu"
"""


def write_config(folder: Path, branch_extra: str = "", name: str = "branch.toml") -> Path:
    path = folder / name
    path.write_text(CONFIG_TOML.format(branch_extra=branch_extra), encoding="utf-8")
    return path


def preset_args(presets_dir: Path) -> list[str]:
    """The published EK55 rgb preset, shrunk and adapted to the golden data."""
    return [
        "--config", str(presets_dir / "ek55" / "rgb_a0.25.toml"),
        "--hidden", "8", "--epochs", "1", "--batch-size", "16", "--dropout", "0.5",
        "--set", "data.feature_dims.rgb=16", "--set", "data.num_classes=24",
        "--device", "cpu",
    ]  # fmt: skip


def table_rows(output: str) -> list[tuple[str, str, str]]:
    """(τ, top-1, top-5) of every row of the results table in `output`."""
    return TABLE_ROW.findall(output)


def best_record(root: Path) -> dict:
    status = json.loads((root / "status.json").read_text())
    lines = (root / "metrics.jsonl").read_text().splitlines()
    return next(r for r in map(json.loads, lines) if r["epoch"] == status["best_epoch"])


# --------------------------------------------------------------------------------------------
# successful runs


def test_help_lists_the_commands(cli) -> None:
    code, output, _ = cli("--help")
    assert code == 0
    for command in ("demo", "synth", "train-branch", "finetune"):
        assert re.search(rf"^\W*{command}\b", output, re.M), f"{command} missing:\n{output}"


def test_train_branch_then_finetune_with_the_published_preset(
    cli, golden_data: Path, presets_dir: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    common = [*preset_args(presets_dir), "--data", str(golden_data), "--runs", str(runs)]
    times = ["2", "1.75", "1.5", "1.25", "1", "0.75", "0.5", "0.25"]
    for command, stage in (("train-branch", "pretrain"), ("finetune", "finetune")):
        code, output, error = cli(command, *common)
        assert code == 0, f"{output}\n{error!r}"
        root = runs / "ek55" / "rgb-a0.25-enc6-ant8" / stage
        assert f"{stage} rgb-a0.25-enc6-ant8" in output
        assert str(root) in output
        assert "τ (s)" in output and "action top-5 %" in output
        rows = table_rows(output)
        assert [row[0] for row in rows] == times
        record = best_record(root)
        for seconds, top1, top5 in rows:
            assert top1 == f"{record[f'top1@{seconds}']:.2f}"
            assert top5 == f"{record[f'top5@{seconds}']:.2f}"
        assert f"top5@1s = {record['selection']:.2f}" in output
        assert json.loads((root / "status.json").read_text())["state"] == "finished"
        saved = json.loads((root / "config.json").read_text())
        assert saved["branch"]["hidden"] == 8 and saved["data"]["num_classes"] == 24


def test_named_overrides_change_the_run_dir_and_resume_extends_a_run(
    cli, golden_data: Path, presets_dir: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    common = [*preset_args(presets_dir), "--data", str(golden_data), "--runs", str(runs)]
    rate = ["--alpha", "0.5", "--s-enc", "6", "--s-ant", "4"]
    code, output, error = cli("train-branch", *common, *rate)
    assert code == 0, f"{output}\n{error!r}"
    root = runs / "ek55" / "rgb-a0.5-enc6-ant4" / "pretrain"
    assert str(root) in output
    assert [row[0] for row in table_rows(output)] == ["2", "1.5", "1", "0.5"]
    saved = json.loads((root / "config.json").read_text())
    assert (saved["branch"]["alpha"], saved["branch"]["s_enc"], saved["branch"]["s_ant"]) == (
        0.5,
        6,
        4,
    )
    assert not (runs / "ek55" / "rgb-a0.25-enc6-ant8").exists()

    # --resume may raise --epochs
    code, output, error = cli("train-branch", *common, *rate, "--epochs", "2", "--resume")
    assert code == 0, f"{output}\n{error!r}"
    assert "resuming" in output
    lines = (root / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]

    # fewer --epochs than the run has: refused before any file is touched (issue 11)
    files = {path.name: path.read_bytes() for path in root.iterdir()}
    code, output, error = cli("train-branch", *common, *rate, "--epochs", "1", "--resume")
    assert_user_error(code, output, error, "already has 2 epochs", "--epochs 2 or more")
    assert {path.name: path.read_bytes() for path in root.iterdir()} == files
    # as many: nothing to train, said so (not "resuming at epoch 3")
    code, output, error = cli("train-branch", *common, *rate, "--epochs", "2", "--resume")
    assert code == 0, f"{output}\n{error!r}"
    assert "is already finished" in output and "resuming" not in output
    assert json.loads((root / "status.json").read_text())["epoch"] == 2

    code, output, error = cli("finetune", *common, *rate)
    assert code == 0, f"{output}\n{error!r}"
    assert str(runs / "ek55" / "rgb-a0.5-enc6-ant4" / "finetune") in output


def test_the_start_of_a_run_says_how_its_batches_are_read(
    cli, golden_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default (data.preload = "auto") a small table is preloaded and gathered without the
    asked --workers; where it would take over half the available memory, the run streams from
    LMDB and says why, once; --no-preload streams without that note."""
    from sfr.data import dataset

    args = ["--config", write_config(tmp_path), "--data", golden_data, "--runs", tmp_path / "r"]
    saved = tmp_path / "r" / "ek55" / "rgb-a0.25-enc2-ant4" / "pretrain" / "config.json"
    code, output, error = cli("train-branch", *args, "--workers", "2")
    assert code == 0, f"{output}\n{error!r}"
    assert re.search(
        r"^  data: preloaded table in memory \([\d.]+ KiB, data\.preload = \"auto\"\), batches "
        r"gathered in the training process \(--workers is not used for it\)$",
        output,
        re.M,
    ), output
    assert json.loads(saved.read_text())["data"]["preload"] == "auto"
    monkeypatch.setattr(dataset, "available_memory", lambda: 80 << 10)
    code, output, error = cli("train-branch", *args, "--force")
    assert code == 0, f"{output}\n{error!r}"
    lines = [line for line in output.splitlines() if "data:" in line]
    assert len(lines) == 1 and re.fullmatch(
        r"  data: read from the LMDB stores as training goes, in the training process "
        r"\(--workers 0\): preloading needs [\d.]+ KiB, more than half of the 80\.0 KiB "
        r'available, so data\.preload = "auto" does not preload \(--preload or --set '
        r"data\.preload=true forces it\)",
        lines[0],
    ), lines
    code, output, error = cli("train-branch", *args, "--force", "--no-preload")
    assert code == 0, f"{output}\n{error!r}"
    lines = [line for line in output.splitlines() if "data:" in line]
    assert lines == [
        "  data: read from the LMDB stores as training goes, in the training process (--workers 0)"
    ]
    assert json.loads(saved.read_text())["data"]["preload"] is False


def test_resuming_a_finished_run_reads_no_table(
    cli, golden_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--resume of a run that has all its epochs says so without preloading first (a table
    read only to be dropped would cost minutes on EK100); more epochs preload again."""
    from sfr.data import dataset

    args = ["--config", write_config(tmp_path), "--data", golden_data, "--runs", tmp_path / "r"]
    code, output, error = cli("train-branch", *args, "--preload")
    assert code == 0, f"{output}\n{error!r}"
    reads = []
    original = dataset.AnticipationDataset._read_table_rows
    monkeypatch.setattr(
        dataset.AnticipationDataset,
        "_read_table_rows",
        lambda self, *a, **k: reads.append(1) or original(self, *a, **k),
    )
    code, output, error = cli("train-branch", *args, "--preload", "--resume")
    assert code == 0, f"{output}\n{error!r}"
    assert "is already finished" in output and "nothing to train" in output
    assert reads == []
    code, output, error = cli("train-branch", *args, "--preload", "--resume", "--epochs", "3")
    assert code == 0, f"{output}\n{error!r}"
    assert reads and "preloaded table in memory" in output


def test_a_run_made_with_the_boolean_preload_resumes_preloaded(
    cli, golden_data: Path, tmp_path: Path
) -> None:
    """A run folder written before data.preload had "auto" (config.json `"preload": false`, the
    old default) resumes with today's default, which then preloads."""
    from sfr.train.rundir import config_differences

    config = write_config(tmp_path)
    args = ["--config", config, "--data", golden_data, "--runs", tmp_path / "r"]
    root = tmp_path / "r" / "ek55" / "rgb-a0.25-enc2-ant4" / "pretrain"
    code, output, error = cli("train-branch", *args, "--set", "data.preload=false")
    assert code == 0, f"{output}\n{error!r}"
    old = json.loads((root / "config.json").read_text())
    assert old["data"]["preload"] is False  # what the bool-only versions wrote
    code, output, error = cli("train-branch", *args, "--epochs", "2", "--resume")
    assert code == 0, f"{output}\n{error!r}"
    assert f"resuming {root} at epoch 2" in output
    assert "data: preloaded table in memory" in output
    assert len((root / "metrics.jsonl").read_text().splitlines()) == 2
    now = json.loads((root / "config.json").read_text())
    assert now["data"]["preload"] == "auto" and config_differences(old, now) == []


def test_messages_count_one_epoch_in_the_singular(cli, golden_data: Path, tmp_path: Path) -> None:
    """`with 1 epoch`, `has its 1 epoch`, never `1 epochs`."""
    from sfr.errors import counted

    assert [counted(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
    assert counted(1, "process", "processes") == "1 process"
    args = ["--config", write_config(tmp_path), "--data", golden_data, "--runs", tmp_path / "r"]
    code, output, error = cli("train-branch", *args)
    assert code == 0, f"{output}\n{error!r}"
    code, output, error = cli("train-branch", *args, "--resume")
    assert code == 0, f"{output}\n{error!r}"
    assert "is already finished: it has its 1 epoch, nothing to train" in output, output
    code, output, error = cli("train-branch", *args, "--resume", "--epochs", "2")
    assert code == 0, f"{output}\n{error!r}"
    code, output, error = cli("train-branch", *args, "--resume", "--epochs", "1")
    assert_user_error(code, output, error)
    message = " ".join(output.split())
    assert "with 1 epoch (optim.epochs): the run already has 2 epochs." in message, message


def test_finished_run_needs_force_or_resume(cli, golden_data: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    runs = tmp_path / "runs"
    args = ["--config", config, "--data", golden_data, "--runs", runs]
    code, output, _ = cli("train-branch", *args)
    assert code == 0, output
    root = runs / "ek55" / "rgb-a0.25-enc2-ant4" / "pretrain"
    before = (root / "best.safetensors").read_bytes()

    code, output, error = cli("train-branch", *args)
    assert_user_error(code, output, error, str(root), "finished run", "--resume", "--force")
    assert (root / "best.safetensors").read_bytes() == before

    code, output, error = cli("train-branch", *args, "--force", "--resume")
    assert_user_error(code, output, error, "--force and --resume")
    assert (root / "best.safetensors").read_bytes() == before

    code, output, error = cli("train-branch", *args, "--resume", "--hidden", "12")
    assert_user_error(code, output, error, "branch.hidden", "--force")

    code, output, _ = cli("train-branch", *args, "--force")
    assert code == 0, output
    assert str(root) in output


TINY_FUSION = (
    '[data]\ndataset = "ek55"\nfeature_dims = { rgb = 16, flow = 16, obj = 12 }\n'
    '[model]\nmodalities = ["rgb"]\nhidden = 8\n'
    "rates = [{ alpha = 0.25, s_enc = 2, s_ant = 4 }, { alpha = 0.5, s_enc = 1, s_ant = 2 }]\n"
    "[optim]\nbatch_size = 16\nepochs = 1\n[fusion_optim]\nbatch_size = 16\nepochs = 1\n"
)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_run_folder_being_trained_is_refused_to_every_other_command(
    cli, golden_data: Path, tmp_path: Path
) -> None:
    """Two processes never train into one folder: while one holds it (here this test process,
    through the lock file) train-branch, finetune, fuse and pipeline, with or without --resume
    or --force, are refused naming the folder and the process, and write nothing. A lock file
    left by a dead process does not block; a "running" run nobody holds is not "interrupted"."""
    from sfr.train.rundir import LOCK_FILE, RunDir

    fusion = tmp_path / "fusion.toml"
    fusion.write_text(TINY_FUSION)
    runs = tmp_path / "runs"
    common = ["--data", golden_data, "--runs", runs, "--device", "cpu"]
    code, output, error = cli("pipeline", fusion, *common)
    assert code == 0, f"{output}\n{error!r}"
    branch = runs / "ek55" / "rgb-a0.25-enc2-ant4"
    unit = next(p for p in (runs / "ek55").iterdir() if p.name.startswith("arch2-"))
    unit = next(p for p in unit.iterdir() if p.is_dir())
    args = ["--config", write_config(tmp_path), *common]
    calls = [
        (branch / "pretrain", ["train-branch", *args]),
        (branch / "pretrain", ["train-branch", *args, "--resume", "--epochs", "2"]),
        (branch / "pretrain", ["train-branch", *args, "--force"]),
        (branch / "finetune", ["finetune", *args, "--force"]),
        (unit, ["fuse", "arch2", "--config", fusion, *common, "--force"]),
        (unit, ["pipeline", fusion, *common]),
        (branch / "finetune", ["pipeline", fusion, *common, "--force"]),
    ]
    for root, call in calls:
        holder = RunDir(root)
        holder.hold()
        before = snapshot(runs)
        try:
            code, output, error = cli(*call)
        finally:
            holder.release()
        assert_user_error(code, output, error, str(root), f"process {os.getpid()}", "in use")
        assert snapshot(runs) == {k: v for k, v in before.items() if LOCK_FILE not in k}, call
    # the lock file of a killed process holds nothing; a "running" run is called unfinished
    root = branch / "pretrain"
    (root / LOCK_FILE).write_text("999999999\n")
    status = json.loads((root / "status.json").read_text())
    (root / "status.json").write_text(json.dumps({**status, "state": "running"}))
    code, output, error = cli("train-branch", *args)
    assert_user_error(code, output, error, "an unfinished run, whose process was killed")
    assert "interrupted" not in output
    code, output, error = cli("train-branch", *args, "--force")
    assert code == 0, f"{output}\n{error!r}"
    assert not (root / LOCK_FILE).exists()


def test_finetune_on_a_pretraining_in_progress_or_killed_says_to_wait_or_resume(
    cli, golden_data: Path, tmp_path: Path
) -> None:
    """While train-branch holds the pretrain folder, finetune called it "interrupted before its
    last epoch" and hinted a command that the lock refuses: it now names the process training
    it and says to wait. Once that process is gone (killed: status "running"), the hint's
    command carries --resume, without which train-branch refuses the unfinished run."""
    from sfr.train.rundir import RunDir

    config = write_config(tmp_path)
    runs = tmp_path / "runs"
    args = ["--config", config, "--data", golden_data, "--runs", runs, "--device", "cpu"]
    code, output, error = cli("train-branch", *args)
    assert code == 0, f"{output}\n{error!r}"
    root = runs / "ek55" / "rgb-a0.25-enc2-ant4" / "pretrain"
    status = json.loads((root / "status.json").read_text())
    (root / "status.json").write_text(json.dumps({**status, "state": "running"}))
    holder = RunDir(root)
    holder.hold()
    try:
        code, output, error = cli("finetune", *args)
    finally:
        holder.release()
    assert_user_error(
        code, output, error, str(root), f"being trained by process {os.getpid()} now", "Wait"
    )
    assert "interrupted" not in output
    assert not (root.parent / "finetune").exists()
    code, output, error = cli("finetune", *args)  # nobody holds it: a killed run
    assert_user_error(code, output, error, "interrupted before its last epoch")
    hinted = f"sfr train-branch --config {config} --data {golden_data} --runs {runs} ... --resume"
    assert hinted in " ".join(output.split())
    code, output, error = cli("train-branch", *args, "--resume")  # as the hint says
    assert code == 0, f"{output}\n{error!r}"
    code, output, error = cli("finetune", *args)
    assert code == 0, f"{output}\n{error!r}"


def test_a_model_too_big_for_memory_is_a_message_and_leaves_no_run_folder(
    cli, golden_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: torch's allocator failing to build the model names its size and branch.hidden
    (exit 2, no traceback), and no run folder is left. The failure is simulated: building on the
    meta device (which counts the parameters) still works."""
    real = stages.create_branch

    def starved(**kwargs: object) -> object:
        if torch.get_default_device().type != "meta":
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                "memory: you tried to allocate 4297064448 bytes. Error code 12"
            )
        return real(**kwargs)

    monkeypatch.setattr(stages, "create_branch", starved)
    runs = tmp_path / "runs"
    code, output, error = cli(
        "train-branch", "--config", write_config(tmp_path), "--data", golden_data,
        "--runs", runs, "--hidden", "12",
    )  # fmt: skip
    count = sum(p.numel() for p in real(feat_dim=16, hidden=12, num_classes=24).parameters())
    assert_user_error(
        code, output, error, "Out of memory", f"{count:,} parameters", "branch.hidden", "now 12"
    )
    message = " ".join(output.split())  # as rich wraps it
    assert "allocate 4297064448 bytes" in message and "alloc_cpu" not in message
    assert not runs.exists()


def test_finetune_without_pretraining_says_how_to_create_it(
    cli, golden_data: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    runs = tmp_path / "runs"
    code, output, error = cli("finetune", "--config", config, "--data", golden_data, "--runs", runs)
    assert_user_error(
        code,
        output,
        error,
        "has not been trained",
        f"sfr train-branch --config {config} --data {golden_data} --runs {runs}",
    )
    assert not (runs / "ek55" / "rgb-a0.25-enc2-ant4" / "finetune").exists()


# --------------------------------------------------------------------------------------------
# user errors: exit code 2, a message naming the culprit, no traceback


def test_missing_data_folder(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    missing = tmp_path / "no-such-data"
    code, output, error = cli(
        "train-branch", "--config", config, "--data", missing, "--runs", tmp_path / "runs"
    )
    assert_user_error(code, output, error, f"Data folder {missing} does not exist")


def test_missing_config_file(cli, golden_data: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    code, output, error = cli("train-branch", "--config", missing, "--data", golden_data)
    assert_user_error(code, output, error, f"Config file {missing} does not exist")


def test_invalid_toml(cli, golden_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[branch\nmodality = rgb\n")
    code, output, error = cli("train-branch", "--config", config, "--data", golden_data)
    assert_user_error(code, output, error, str(config), "is not valid TOML")


@pytest.mark.parametrize("missing", ["validation.csv", "training.csv", "actions.csv"])
def test_missing_csv(cli, golden_copy: Path, tmp_path: Path, missing: str) -> None:
    (golden_copy / missing).unlink()
    config = write_config(tmp_path)
    code, output, error = cli(
        "train-branch", "--config", config, "--data", golden_copy, "--runs", tmp_path / "runs"
    )
    assert_user_error(code, output, error, str(golden_copy / missing), "does not exist")


def test_missing_feature_store(cli, golden_copy: Path, tmp_path: Path) -> None:
    for path in sorted((golden_copy / "rgb").iterdir()):
        path.unlink()
    (golden_copy / "rgb").rmdir()
    config = write_config(tmp_path)
    code, output, error = cli(
        "train-branch", "--config", config, "--data", golden_copy, "--runs", tmp_path / "runs"
    )
    assert_user_error(
        code, output, error, "Feature store 'rgb' not found", str(golden_copy / "rgb")
    )


def delete_needed_key(data: Path) -> tuple[str, str]:
    """Delete from rgb/ the newest frame read (alpha 0.25, 2 + 4 steps) by the 2nd training row."""
    segment = read_segments(data / "training.csv")[1]
    frames = TimeGrid(0.25, 2, 4).frames(segment.start_frame)
    assert frames is not None
    key = frame_key(segment.video, int(frames[-1]))
    env = lmdb.open(str(data / "rgb"))
    try:
        with env.begin(write=True) as txn:
            assert txn.delete(key.encode("utf-8"))
    finally:
        env.close()
    return key, segment.id


def test_feature_store_without_a_needed_key(cli, golden_copy: Path, tmp_path: Path) -> None:
    key, sample_id = delete_needed_key(golden_copy)
    config = write_config(tmp_path)
    code, output, error = cli(
        "train-branch", "--config", config, "--data", golden_copy, "--runs", tmp_path / "runs"
    )
    assert_user_error(
        code,
        output,
        error,
        f"no key '{key}'",
        "Feature store 'rgb'",
        str(golden_copy / "rgb"),
        f"annotation id {sample_id}",
    )


def test_missing_key_with_dataloader_workers_has_no_traceback(
    cli, golden_copy: Path, tmp_path: Path
) -> None:
    key, sample_id = delete_needed_key(golden_copy)
    config = write_config(tmp_path)
    code, output, error = cli(
        "train-branch", "--config", config, "--data", golden_copy, "--runs", tmp_path / "runs",
        "--num-workers", "1", "--no-preload",
    )  # fmt: skip
    assert code == USER_ERROR, output
    assert isinstance(error, SystemExit), repr(error)
    assert f"no key '{key}'" in output and f"annotation id {sample_id}" in output
    assert "Traceback" not in output
    assert "Hint:" in output


def test_wrong_feature_dimension(cli, golden_data: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    code, output, error = cli(
        "train-branch", "--config", config, "--data", golden_data, "--runs", tmp_path / "runs",
        "--set", "data.feature_dims.rgb=20",
    )  # fmt: skip
    assert_user_error(
        code, output, error, "Feature store 'rgb'", "dimension 16, expected 20", "data.feature_dims"
    )


def test_preload_larger_than_the_available_memory_is_refused(
    cli, golden_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sfr.data import dataset

    monkeypatch.setattr(dataset, "available_memory", lambda: 2048)
    config = write_config(tmp_path)
    code, output, error = cli(
        "train-branch", "--config", config, "--data", golden_data, "--runs", tmp_path / "runs",
        "--preload",
    )  # fmt: skip
    assert_user_error(code, output, error, "needs", "2.0 KiB available", "--no-preload")
    assert re.search(
        r"Preloading \d+ sequences needs [\d.]+ KiB of memory \(rgb \d+ vectors", output
    )
    assert not (tmp_path / "runs").exists()


def test_typo_in_config_file_names_the_field_and_the_allowed_ones(
    cli, golden_data: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, branch_extra="hiden = 3\n")
    code, output, error = cli("train-branch", "--config", config, "--data", golden_data)
    assert_user_error(code, output, error, f"{config}: branch.hiden: unknown field", "allowed:")
    allowed = output.split("allowed:", 1)[1].split(")", 1)[0]
    assert {name.strip() for name in allowed.split(",")} >= {"modality", "alpha", "hidden"}


@pytest.mark.parametrize(
    ("command", "config", "needles"),
    [
        ("train-branch", "sf_arch2", ["is a fusion config", "sfr pipeline", "sfr fuse"]),
        ("finetune", "sf_arch2", ["is a fusion config", "sfr pipeline", "sfr fuse"]),
        ("fuse", "rgb_a0.5", ["is a branch config", "sfr train-branch"]),
        ("pipeline", "rgb_a0.5", ["is a branch config", "sfr train-branch"]),
    ],
)
def test_a_config_of_the_other_kind_names_the_commands_that_take_it(
    cli, golden_data: Path, tmp_path: Path, command: str, config: str, needles: list[str]
) -> None:
    """Issue 11: a fusion config given to train-branch (or a branch config to fuse/pipeline) says
    what it is and which commands take it, not "fusion_optim: unknown field"."""
    path = Path("configs") / "ek55" / f"{config}.toml"
    target = {"fuse": ["arch2", "--config", path], "pipeline": [path]}.get(
        command, ["--config", path]
    )
    runs = tmp_path / "runs"
    code, output, error = cli(command, *target, "--data", golden_data, "--runs", runs)
    assert_user_error(code, output, error, str(path), *needles)
    assert "unknown field" not in output and not runs.exists()


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("optim.learning_rate=0.1", ["optim.learning_rate: unknown field", "lr", "momentum"]),
        ("training.epochs=3", ["training: unknown field", "data", "branch", "optim", "run"]),
        ("branch.hidden.size=3", ["branch.hidden", "not a section"]),
        ("nonsense", ["'nonsense'", "section.field=value"]),
    ],
)
def test_bad_set_override(
    cli, golden_data: Path, tmp_path: Path, override: str, needles: list[str]
) -> None:
    config = write_config(tmp_path)
    code, output, error = cli(
        "train-branch", "--config", config, "--data", golden_data, "--set", override
    )
    assert_user_error(code, output, error, *needles)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--alpha", "-0.5"], ["branch.alpha", "greater than 0"]),
        (["--s-ant", "0"], ["branch.s_ant", "greater than or equal to 1"]),
        (["--modality", "depth"], ["branch.modality", "'rgb', 'flow' or 'obj'"]),
        (["--dropout", "1"], ["branch.dropout", "less than 1"]),
        (["--select", "top3"], ["run.select", "'top5', 'mt5r' or 'top1'"]),
        (["--s-ant", "2"], ["run.select_time", "allowed: 0.5, 0.25"]),
        (["--select-time", "0.3"], ["run.select_time", "allowed: 1, 0.75, 0.5, 0.25"]),
        (["--split", "4"], ["data.split", "less than or equal to 3"]),
    ],
)
def test_invalid_values_name_the_field_and_the_allowed_values(
    cli, golden_data: Path, tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    config = write_config(tmp_path)
    code, output, error = cli(
        "train-branch", "--config", config, "--data", golden_data, "--runs", tmp_path / "r", *args
    )
    assert_user_error(code, output, error, *needles)
    if needles[0] != "run.select_time":  # a value typed on the command line is blamed on it
        assert f"command-line override: {needles[0]}" in output and str(config) not in output
    assert not (tmp_path / "r").exists()


def test_num_classes_must_match_the_actions_table(
    cli, golden_data: Path, presets_dir: Path, tmp_path: Path
) -> None:
    preset = presets_dir / "ek55" / "rgb_a0.25.toml"  # num_classes = 2513 (full EK55)
    code, output, error = cli(
        "train-branch", "--config", preset, "--data", golden_data, "--runs", tmp_path / "runs",
        "--hidden", "8", "--set", "data.feature_dims.rgb=16",
    )  # fmt: skip
    assert_user_error(
        code,
        output,
        error,
        "data.num_classes is 2513",
        str(golden_data / "actions.csv"),
        "24 actions",
    )


def test_validation_split_without_usable_rows(cli, golden_copy: Path, tmp_path: Path) -> None:
    csv = golden_copy / "validation.csv"
    first = csv.read_text().splitlines()[0]
    assert int(first.split(",")[2]) == 3  # starts at frame 3: the sampler discards it
    csv.write_text(first + "\n")
    config = write_config(tmp_path)
    code, output, error = cli(
        "train-branch", "--config", config, "--data", golden_copy, "--runs", tmp_path / "runs"
    )
    assert_user_error(code, output, error, str(csv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_user_error(cli, golden_data: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    code, output, error = cli(
        "train-branch", "--config", config, "--data", golden_data, "--runs", tmp_path / "runs",
        "--device", "cuda",
    )  # fmt: skip
    # the option as typed, and the config field it sets
    assert_user_error(code, output, error, "--device cuda (run.device): this machine has no")


# Every command with a --device option, and values each refuses the same way.
DEVICE_COMMANDS = [
    ["train-branch"], ["finetune"], ["fuse", "arch2"], ["pipeline"], ["validate"], ["predict"],
    ["export", "submission"], ["features", "rgb"], ["features", "flow"],
]  # fmt: skip
BAD_DEVICES = ["banana", "gpu", "CPU", "cuda:x", "cuda:-1", "", "cpu:0", "cuda:"]


def test_the_device_commands_are_every_command_with_a_device_option() -> None:
    with_device = [
        words
        for words, command in registered_commands()
        if any("--device" in getattr(p, "opts", ()) for p in command.params)
    ]
    assert sorted(with_device) == sorted([w for w in c if w != "arch2"] for c in DEVICE_COMMANDS)


@pytest.mark.parametrize("command", DEVICE_COMMANDS, ids=" ".join)
def test_every_command_refuses_a_bad_device_with_one_message(
    cli, golden_data: Path, tmp_path: Path, command: list[str]
) -> None:
    """One accepted set (auto, cpu, cuda, cuda:N, mps) and one message, exit 2, before any work
    (validate, predict and export submission showed torch's traceback; `cpu:0` was accepted
    by some commands and refused by others)."""
    for value in BAD_DEVICES:
        code, output, error = cli(*command, "--device", value, tmp_path / "model")
        shown = value if value else "''"
        assert_user_error(
            code, output, error, f"--device {shown}: use auto, cpu, cuda, cuda:N or mps."
        )
        assert list(tmp_path.iterdir()) == []


def test_validate_with_a_bad_device_names_it(cli, golden_data: Path, tmp_path: Path) -> None:
    """The tester's call: a real run folder and data, --device banana."""
    config = write_config(tmp_path)
    runs = tmp_path / "runs"
    code, output, error = cli(
        "train-branch", "--config", config, "--data", golden_data, "--runs", runs
    )
    assert code == 0, f"{output}\n{error!r}"
    root = runs / "ek55" / "rgb-a0.25-enc2-ant4" / "pretrain"
    for value in ("banana", "cuda:x"):
        code, output, error = cli("validate", root, "--data", golden_data, "--device", value)
        assert_user_error(code, output, error, f"--device {value}: use auto, cpu, cuda")


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("file", 'branch.toml: run.device: "cpu:0" is not a device: use auto, cpu, cuda, '),
        ("set", 'command-line override: run.device: "cpu:0" is not a device: use auto, cpu, '),
    ],
)
def test_run_device_in_a_config_follows_the_same_rule(
    cli, golden_data: Path, tmp_path: Path, where: str, needle: str
) -> None:
    config = write_config(tmp_path)
    if where == "file":
        config.write_text(config.read_text().replace('device = "cpu"', 'device = "cpu:0"'))
    extra = ["--set", "run.device=cpu:0"] if where == "set" else []
    code, output, error = cli(
        "train-branch", "--config", config, "--data", golden_data, "--runs", tmp_path / "r", *extra
    )
    assert_user_error(code, output, error, "run.device", "cuda:N or mps")
    assert needle in " ".join(output.split()), output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "command",
    [["train-branch"], ["fuse", "arch2"], ["pipeline"], ["validate"], ["features", "rgb"]],
    ids=" ".join,
)
@pytest.mark.parametrize("value", ["FP32", "fp64", ""])
def test_a_bad_precision_is_a_plain_sentence(
    cli, tmp_path: Path, command: list[str], value: str
) -> None:
    """Choices are lower case in sfr (as --modality, --select): FP32 is refused, saying so."""
    code, output, error = cli(*command, "--precision", value, tmp_path / "x")
    shown = value if value else "''"
    assert_user_error(code, output, error, f"--precision {shown}: use fp32, bf16 or fp16.")
    assert "Value error" not in output and "is not one of" not in output


def test_learning_rate_beyond_float32_is_a_user_error(
    cli, golden_data: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    code, output, error = cli(
        "train-branch", "--config", config, "--data", golden_data, "--runs", tmp_path / "runs",
        "--lr", "1e39",
    )  # fmt: skip
    assert_user_error(code, output, error)


# --------------------------------------------------------------------------------------------
# sfr synth


def test_synth_writes_a_dataset_and_refuses_to_overwrite(cli, tmp_path: Path) -> None:
    out = tmp_path / "synth"
    small = ["--videos", "1", "--val-videos", "1", "--actions-per-video", "5"]
    code, output, error = cli("synth", "--out", out, *small)
    assert code == 0, f"{output}\n{error!r}"
    assert f"Wrote {out}" in output and "5 training and 5 validation segments" in output
    for name in ("training.csv", "validation.csv", "actions.csv", "synthetic_meta.json"):
        assert (out / name).is_file(), name
    for modality in ("rgb", "flow", "obj"):
        assert (out / modality / "data.mdb").is_file()
    assert len(read_segments(out / "training.csv")) == 5
    assert len(read_segments(out / "validation.csv")) == 5
    meta = json.loads((out / "synthetic_meta.json").read_text())
    assert meta["rows"] == {"training": 5, "validation": 5}
    before = (out / "training.csv").read_bytes()

    code, output, error = cli("synth", "--out", out, *small, "--seed", "1")
    assert_user_error(code, output, error, str(out), "already holds a synthetic dataset", "--force")
    assert (out / "training.csv").read_bytes() == before

    code, output, _ = cli("synth", "--out", out, *small, "--seed", "1", "--force")
    assert code == 0, output
    assert (out / "training.csv").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # no temp folders left
    assert (out / "configs" / "sf_arch2.toml").is_file()  # presets rewritten after --force


def test_synth_refuses_a_file_and_a_bad_spec(cli, tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("mine")
    code, output, error = cli("synth", "--out", target, "--videos", "1", "--actions-per-video", "2")
    assert_user_error(code, output, error, str(target))
    assert target.read_text() == "mine"

    code, output, error = cli("synth", "--out", tmp_path / "new", "--videos", "0")
    assert_user_error(code, output, error, "Invalid synthetic dataset spec")
    assert not (tmp_path / "new").exists()


def test_every_stage_says_how_its_data_is_read(tmp_path: Path) -> None:
    """Every stage that trains says it, a branch's finetune stage too (it was left out, though
    the README says each stage does)."""
    from types import SimpleNamespace

    from sfr.cli.common import TrainingView
    from sfr.data.dataset import Preloading
    from sfr.train.loop import StageStarted

    view = TrainingView("test")
    printed: list[str] = []
    view.bars = SimpleNamespace(  # type: ignore[assignment]
        add_task=lambda *a, **k: 0,
        remove_task=lambda task: None,
        console=SimpleNamespace(print=lambda line, **k: printed.append(str(line))),
    )
    loaded = Preloading("auto", True, table_bytes=4 << 20)
    for branch, stage in (("rgb", "pretrain"), ("rgb", "finetune"), ("flow", "pretrain")):
        view(StageStarted(str(tmp_path / branch / stage), 0, 1, 8, 4, 1, loaded, 0))
    assert sum("data: preloaded table in memory (4.00 MiB" in line for line in printed) == 3


def test_the_data_line_names_what_the_command_takes_and_each_process_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The auto hint names only options the command has (fuse and pipeline: --set; the demo:
    none); under torchrun every process has its own --workers processes."""
    from sfr import distributed
    from sfr.cli.common import PRELOAD_SET, data_line
    from sfr.data.dataset import Preloading
    from sfr.train.loop import StageStarted

    def line(workers: int, forcing: str | None = PRELOAD_SET, copies: int = 1) -> str:
        preloading = Preloading("auto", False, 4 << 20, 6 << 20, copies)
        text = data_line(StageStarted("run", 0, 1, 8, 4, 1, preloading, workers), forcing)
        assert text is not None
        return text

    assert line(2).endswith("does not preload (--set data.preload=true forces it)")
    assert "--preload or" not in line(2)
    assert line(2, None).endswith('so data.preload = "auto" does not preload')
    assert ", by 2 worker processes (--workers):" in line(2)
    assert ", by 1 worker process (--workers):" in line(1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert ", by 2 worker processes in each process (--workers):" in line(2, copies=2)
    assert ", by 2 worker processes in each process (--workers):" in line(2)  # 2 machines


def test_a_pipeline_says_how_each_stage_reads_its_data(
    cli, golden_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stage of a pipeline, fine-tuning included, prints its `data:` line, whose auto
    hint names --set (pipeline has no --preload)."""
    from sfr.data import dataset

    monkeypatch.setattr(dataset, "available_memory", lambda: 80 << 10)  # auto streams
    path = tmp_path / "fusion.toml"
    path.write_text(TINY_FUSION)
    code, output, error = cli(
        "pipeline", path, "--data", golden_data, "--runs", tmp_path / "runs", "--device", "cpu"
    )  # fmt: skip
    assert code == 0, f"{output}\n{error!r}"
    steps = re.findall(r"^\[\d+/\d+\] (\S+ \S+)", output, re.M)
    lines = [line for line in output.splitlines() if line.startswith("  data: ")]
    assert any(step.startswith("finetune") for step in steps), steps
    assert len(lines) == len(steps), (steps, lines)
    streamed = [line for line in lines if "does not preload" in line]
    assert streamed and all(
        line.endswith("(--set data.preload=true forces it)") for line in streamed
    ), lines
