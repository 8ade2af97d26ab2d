"""Distributed data parallel training and evaluation: 2 CPU processes with gloo vs one process.

With dropout 0 the only randomness is the seeded shuffle, so a 2-process run must end with the
weights (1e-6) and the validation measures (exactly) of a single-process run with the same
global batch and seed. One test goes through `torchrun -m sfr` as the README shows it; the
others start the ranks themselves (tests/distributed_jobs.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed_jobs import launch
from safetensors.torch import load_file

from sfr import distributed
from sfr.checkpoint import read_metadata
from sfr.config import BranchRunConfig, load_config
from sfr.data.loader import ShardedBatchSampler
from sfr.errors import ConfigError
from sfr.train.stages import train_branch_stage

pytestmark = pytest.mark.usefixtures("module_torch_thread")

STAGE = Path("ek55") / "rgb-a0.25-enc2-ant4" / "pretrain"
CONFIG = """
[data]
dataset = "ek55"
num_classes = 24
feature_dims = { rgb = 16 }

[branch]
modality = "rgb"
alpha = 0.25
s_enc = 2
s_ant = 4
hidden = 8
dropout = 0.0

[optim]
lr = 0.1
momentum = 0.9
batch_size = 16
epochs = 2

[run]
seed = 3
device = "cpu"
"""


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "rgb_tiny.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single_run(config_path: Path, golden_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """The reference: the same 2 epochs in this one process."""
    runs = tmp_path_factory.mktemp("single") / "runs"
    train_branch_stage(load_config(BranchRunConfig, config_path), "pretrain", golden_data, runs)
    return runs / STAGE


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("model.", "optim."))}


def measures(root: Path) -> list[dict[str, Any]]:
    """Every epoch's validation measures (`top5@1`, ...), without the float losses."""
    lines = (root / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if "@" in k} for line in lines]


def assert_same_run(root: Path, reference: Path) -> None:
    """Weights and momentum equal to 1e-6, validation measures identical, epoch for epoch."""
    ours, theirs = (
        model_weights(root / "last.safetensors"),
        model_weights(reference / "last.safetensors"),
    )
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=key)
    assert measures(root) == measures(reference)
    assert len(measures(root)) == 2
    best, best_ref = (
        model_weights(root / "best.safetensors"),
        model_weights(reference / "best.safetensors"),
    )
    assert best.keys() == best_ref.keys()
    assert (
        read_metadata(root / "best.safetensors")["metrics"]
        == read_metadata(reference / "best.safetensors")["metrics"]
    )


def test_sharded_batches_are_the_single_process_batches() -> None:
    """Every global batch is split between the ranks without repeats; weights sum to the world."""
    for size, batch, world in [(37, 8, 2), (37, 8, 3), (5, 4, 4), (16, 16, 2)]:
        samplers = [
            ShardedBatchSampler(size, batch, shuffle=True, seed=7, rank=r, world_size=world)
            for r in range(world)
        ]
        single = ShardedBatchSampler(size, batch, shuffle=True, seed=7)
        for epoch in (0, 1):
            for sampler in [*samplers, single]:
                sampler.set_epoch(epoch)
            weights = [s.weights() for s in samplers]
            for index, whole in enumerate(single):
                parts = [list(s)[index] for s in samplers]
                kept = [i for r, part in enumerate(parts) if weights[r][index] > 0 for i in part]
                assert kept == whole
                assert sum(w[index] for w in weights) == pytest.approx(world)
                for r, part in enumerate(parts):  # an empty share: one sample with weight 0
                    assert len(part) == 1 if weights[r][index] == 0 else len(part) >= 1
            assert sorted(i for b in single for i in b) == list(range(size))
    first = ShardedBatchSampler(37, 8, shuffle=True, seed=7)
    orders = []
    for epoch in (0, 1):
        first.set_epoch(epoch)
        orders.append(list(first))
    assert orders[0] != orders[1]  # reshuffled every epoch


def test_torchrun_two_processes_equal_one(
    config_path: Path, golden_data: Path, single_run: Path, tmp_path: Path
) -> None:
    """`torchrun --nproc-per-node 2 -m sfr train-branch ...` as the README shows it."""
    runs = tmp_path / "runs"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(_port()), "-m", "sfr", "train-branch",
        "--config", str(config_path), "--data", str(golden_data), "--runs", str(runs),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("Validation, best epoch") == 1  # only rank 0 prints
    assert done.stdout.count("epoch   2/2") == 1
    assert_same_run(runs / STAGE, single_run)
    last = read_metadata(runs / STAGE / "last.safetensors")
    assert last["world_size"] == 2
    assert "rng.torch.rank1" in load_file(str(runs / STAGE / "last.safetensors"))


def _port() -> int:
    from distributed_jobs import free_port

    return free_port()


def test_a_killed_rank_fails_clearly_and_the_run_resumes_under_ddp(
    config_path: Path, golden_data: Path, single_run: Path, tmp_path: Path
) -> None:
    """Rank 1 dies in epoch 2: rank 0 stops with a message (no hang), epoch 1's checkpoint is
    kept; `--resume` on 2 processes finishes the run as if never interrupted, and validation
    on 2 processes reports what one process reports."""
    runs = tmp_path / "runs"
    train = {"config": str(config_path), "data": str(golden_data), "runs": str(runs)}
    codes = launch([("train", {**train, "kill_at": [1, 2]})], tmp_path / "killed")
    assert codes[1] == 3 and codes[0] is not None, codes  # nobody hangs
    (result,) = json.loads((tmp_path / "killed" / "rank0.json").read_text())
    assert result["error"] == "DistributedError", result
    assert "Training stopped at epoch 2" in result["message"]
    assert "lost contact with the other processes" in result["message"]
    assert "--resume" in result["hint"] and str(runs / STAGE) in result["hint"]
    root = runs / STAGE
    assert read_metadata(root / "last.safetensors")["epoch"] == 1
    assert json.loads((root / "status.json").read_text())["state"] == "interrupted"
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]

    report = tmp_path / "report-ddp"
    validate = ["validate", str(root), "--data", str(golden_data), "--device", "cpu",
                "--report", str(report)]  # fmt: skip
    codes = launch(
        [("train", {**train, "resume": True}), ("validate", {"args": validate})],
        tmp_path / "resumed",
    )
    assert codes == [0, 0]
    for rank in (0, 1):
        fit, checked = json.loads((tmp_path / "resumed" / f"rank{rank}.json").read_text())
        assert "error" not in fit and checked == {"exit": 0}, (fit, checked)
    assert_same_run(root, single_run)

    from sfr.cli.app import app

    reference = tmp_path / "report-single"
    app([*validate[:-1], str(reference)], standalone_mode=False)
    ours = json.loads((report / "report.json").read_text())["models"]
    theirs = json.loads((reference / "report.json").read_text())["models"]
    for entry in (*ours, *theirs):
        entry.pop("source")
    assert ours == theirs
    assert not (report / "plots").exists() or (report / "report.html").is_file()


def test_a_stalled_rank_times_out_instead_of_hanging(
    config_path: Path, golden_data: Path, tmp_path: Path
) -> None:
    """Rank 1 stops responding in epoch 2: rank 0 gives up after SFR_DIST_TIMEOUT seconds."""
    runs = tmp_path / "runs"
    train = {"config": str(config_path), "data": str(golden_data), "runs": str(runs)}
    began = time.monotonic()
    steps = [("train", {**train, "stall_at": [1, 1]})]
    codes = launch(steps, tmp_path / "out", wait_s=30, timeout_s=3, grace_s=0)
    assert codes[0] == 0 and time.monotonic() - began < 30, codes  # rank 1 is still asleep
    (result,) = json.loads((tmp_path / "out" / "rank0.json").read_text())
    assert result["error"] == "DistributedError", result
    assert "Training stopped at epoch 2" in result["message"]
    assert "SFR_DIST_TIMEOUT=3 s" in result["message"]
    assert read_metadata(runs / STAGE / "last.safetensors")["epoch"] == 1


def test_validation_measures_from_label_ranks_equal_the_metric_functions() -> None:
    """`evaluate_ranks` (what the processes gather) gives the measures of the full scores."""
    from sfr.eval.metrics import label_ranks, mean_topk_recall, topk_accuracy
    from sfr.train.loop import evaluate_ranks

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 3, 12)).round(1)  # rounded: ties between classes
    labels = rng.integers(0, 12, size=50)
    got = evaluate_ranks(label_ranks(scores, labels), labels, (2.0, 1.0, 0.5), 1.0)
    for k, t in enumerate((2.0, 1.0, 0.5)):
        assert got[f"top1@{t:g}"] == 100 * topk_accuracy(scores[:, k], labels, 1)
        assert got[f"top5@{t:g}"] == 100 * topk_accuracy(scores[:, k], labels, 5)
    assert got["mt5r@1"] == 100 * mean_topk_recall(scores[:, 1], labels, 5)


@pytest.mark.parametrize("command", ["train-branch", "finetune", "validate"])
def test_mixed_precision_on_the_cpu_is_refused_by_name(
    cli, command: str, config_path: Path, golden_data: Path, tmp_path: Path
) -> None:
    """bf16/fp16 need CUDA: a clear message before any work, nothing written."""
    from clitools import assert_user_error

    runs = tmp_path / "runs"
    if command == "validate":
        args = [command, str(tmp_path), "--data", str(golden_data)]
    else:
        args = [command, "--config", str(config_path), "--data", str(golden_data), "--runs", runs]
    for precision in ("bf16", "fp16"):
        code, output, error = cli(*args, "--device", "cpu", "--precision", precision)
        assert_user_error(
            code, output, error, f"--precision {precision} needs a CUDA device", "fp32"
        )
    assert not runs.exists()


def test_workers_and_precision_are_recorded_and_may_change_on_resume(
    cli, config_path: Path, golden_data: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    common = ["--config", config_path, "--data", golden_data, "--runs", runs, "--epochs", "1"]
    code, output, error = cli("train-branch", *common, "--workers", "1", "--precision", "fp32")
    assert code == 0, f"{output}\n{error!r}"
    saved = json.loads((runs / STAGE / "config.json").read_text())
    assert saved["data"]["num_workers"] == 1 and saved["run"]["precision"] == "fp32"
    code, output, error = cli(
        "train-branch", *common, "--epochs", "2", "--workers", "0", "--resume"
    )
    assert code == 0, f"{output}\n{error!r}"
    assert len(measures(runs / STAGE)) == 2


def test_whole_batches_equal_the_collated_samples(golden_data: Path) -> None:
    """`__getitems__` (what workers return) equals collating `__getitem__`'s samples, with
    several streams of one modality (gathered) and one stream per modality (read in place)."""
    from torch.utils.data import default_collate

    from sfr.data.annotations import read_segments
    from sfr.data.dataset import AnticipationDataset, Stream, open_stores
    from sfr.data.loader import collate
    from sfr.data.timegrid import TimeGrid

    segments = read_segments(golden_data / "validation.csv")
    stores = open_stores(golden_data, {"rgb": 16, "obj": 12})
    streams = [Stream("rgb", TimeGrid(0.25, 2, 4)), Stream("rgb", TimeGrid(0.5, 1, 2)),
               Stream("obj", TimeGrid(0.25, 2, 4))]  # fmt: skip
    for preload in (False, True):
        dataset = AnticipationDataset(segments, streams, stores, preload=preload)
        indices = [3, 0, 7, 7, len(dataset) - 1]
        whole = collate(dataset.__getitems__(indices))
        expected = default_collate([dataset[i] for i in indices])
        assert whole.keys() == expected.keys() and whole["id"] == expected["id"]
        for task in ("verb", "noun", "action"):
            assert torch.equal(whole[task], expected[task])
        for key in expected["features"]:
            assert torch.equal(whole["features"][key], expected["features"][key]), key


def test_other_ranks_report_only_their_own_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Rank 1 stays silent about errors every rank meets (rank 0 prints them) but names
    itself with an error that arose in it alone, such as a missing key in its shard."""
    import typer

    from sfr.cli.common import handles_user_errors
    from sfr.errors import DataError, DistributedError, RunError

    monkeypatch.setenv("RANK", "1")
    own = DataError("Feature store 'rgb' has no key 'P01_01_frame_0000000042.jpg'.")
    own.rank = 1
    shared = RunError("Run directory runs/x already holds a finished run.")
    shared.rank, shared.from_main = 1, True
    lost = DistributedError("Training stopped at epoch 2: process rank 1 of 2 lost contact.")
    for error, printed in [(DataError("before the group"), ""), (shared, ""),
                           (own, "rank 1: Feature store 'rgb'"), (lost, "rank 1: Training stopped")]:  # fmt: skip

        @handles_user_errors("")
        def command(error: Exception = error) -> None:
            raise error

        with pytest.raises(typer.Exit) as exit:
            command()
        assert exit.value.exit_code == 2
        output = capsys.readouterr().err
        assert (printed in output) if printed else output == "", output


@pytest.mark.parametrize("text", ["0", "-5", "inf", "nan", "abc"])
def test_a_collective_timeout_must_be_a_positive_number_of_seconds(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(distributed.TIMEOUT_ENV, text)
    with pytest.raises(ConfigError, match=f"SFR_DIST_TIMEOUT is '{text}', not a positive number"):
        distributed.timeout()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "600")
    assert distributed.timeout().total_seconds() == 600


def test_local_world_size_counts_only_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.local_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert distributed.local_world_size() == 4
