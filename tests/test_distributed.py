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


def test_a_rank_that_fails_to_start_stops_rank_0_with_a_message(tmp_path: Path) -> None:
    """A setup error on one machine (its --runs folder lacks the pretrain checkpoint) gave rank 0
    a raw gloo traceback from `on_main`: now the lost-contact message and the shared-folder hint."""
    codes = launch([("start", {"missing_on": 1})], tmp_path, wait_s=30)
    assert codes == [0, 0], codes
    (result,) = json.loads((tmp_path / "rank0.json").read_text())
    assert result["error"] == "DistributedError", result
    assert result["message"].startswith("The run could not start: process rank 0 of 2 lost contact")
    assert "--data and --runs folders must be one shared file system" in result["hint"]
    (own,) = json.loads((tmp_path / "rank1.json").read_text())
    assert own["message"] == "runs/x/pretrain has no best.safetensors."


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


def torchrun_env(monkeypatch: pytest.MonkeyPatch, rank: int, world: int, local: int = 1) -> None:
    """torchrun's variables of process `rank` of `world`, `local` processes per machine."""
    values = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank % local,
              "LOCAL_WORLD_SIZE": local, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500}  # fmt: skip
    for name, value in values.items():
        monkeypatch.setenv(name, str(value))


def raise_in_command(error: BaseException, multiprocess: bool = True) -> int:
    """Run a command that raises `error` through the CLI's error rendering; its exit code."""
    import typer

    from sfr.cli.common import handles_user_errors

    @handles_user_errors("Run it again.", multiprocess=multiprocess)
    def command() -> None:
        raise error

    with pytest.raises(typer.Exit) as exit:
        command()
    return exit.value.exit_code


def test_other_ranks_report_only_their_own_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Rank 1 stays silent about errors every rank meets (rank 0 prints them) but names
    itself, once, with an error that arose in it alone, such as a missing key in its shard or
    a lost peer; the first process of a second machine reports what it met before the run
    started (its files may differ), naming the rank once."""
    from sfr.errors import DataError, DistributedError, RunError

    def marked(error: Exception, **attributes: object) -> Exception:
        for name, value in attributes.items():
            setattr(error, name, value)
        return error

    own = marked(DataError("Feature store 'rgb' has no key 'P01_01_frame_0000000042.jpg'."), rank=1)
    shared = marked(RunError("Run directory runs/x already holds a finished run."), rank=1,
                    from_main=True)  # fmt: skip
    lost = marked(DistributedError("Training stopped at epoch 2: process rank 1 of 2 lost contact."),
                  rank=1)  # fmt: skip
    config = DataError("data.num_classes is 2513 but D/actions.csv lists 40 actions.")
    join = DistributedError("Rank 1 could not join the 2-process run at 127.0.0.1:29500: refused")
    torchrun_env(monkeypatch, rank=1, world=2, local=2)  # one machine
    cases = [(config, ""), (join, ""), (shared, ""), (own, "Error: rank 1: Feature store 'rgb'"),
             (lost, "Error: Training stopped at epoch 2: process rank 1 of 2")]  # fmt: skip
    for error, printed in cases:
        assert raise_in_command(error) == 2
        output = capsys.readouterr().err
        assert (printed in output) if printed else output == "", output
        assert "rank 1: Rank 1" not in output and "rank 1: Training" not in output
    torchrun_env(monkeypatch, rank=1, world=2, local=1)  # the first process of a second machine
    for error, printed in [(config, "Error: rank 1: data.num_classes is 2513"),
                           (join, "Error: Rank 1 could not join"), (shared, "")]:  # fmt: skip
        assert raise_in_command(error) == 2
        output = capsys.readouterr().err
        assert (printed in output) if printed else output == "", output
    torchrun_env(monkeypatch, rank=0, world=2, local=1)  # rank 0 reports everything, unlabelled
    assert raise_in_command(config) == 2
    assert capsys.readouterr().err.startswith("Error: data.num_classes is 2513")


@pytest.mark.parametrize("text", ["0", "0.001", "-5", "1e13", "1e20", "inf", "nan", "abc"])
def test_a_collective_timeout_must_be_from_a_second_to_a_week(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond a week gloo overflows (1e20: OverflowError; 1e13: a negative timeout), below a
    second joining fails as if the endpoint were wrong: both are refused by name."""
    monkeypatch.setenv(distributed.TIMEOUT_ENV, text)
    expected = f"SFR_DIST_TIMEOUT is '{text}', not a number of seconds from 1 to 604800"
    with pytest.raises(ConfigError, match=expected):
        distributed.timeout()
    torchrun_env(monkeypatch, rank=0, world=2)
    with pytest.raises(ConfigError, match=expected):  # what every command checks first
        distributed.check_environment()
    for seconds in ("1", "600", "604800"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, seconds)
        assert distributed.timeout().total_seconds() == float(seconds)


def test_local_world_size_counts_only_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_torchrun_env(monkeypatch)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert distributed.local_world_size() == 1
    torchrun_env(monkeypatch, rank=5, world=8, local=4)
    assert distributed.local_world_size() == 4
    assert distributed.environment() == distributed.Launch(5, 8, 1, 4)


def clear_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*distributed.LAUNCH_ENV, "LOCAL_WORLD_SIZE", distributed.TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"RANK": "1"}, ["RANK is 1 in the environment but WORLD_SIZE is not set", "Unset RANK"]),
        ({"WORLD_SIZE": "2"}, ["WORLD_SIZE is 2 in the environment but RANK is not set"]),
        ({"RANK": "0", "WORLD_SIZE": "x"}, ["WORLD_SIZE is 'x' in the environment, not an integer"]),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, ["RANK is '-1' in the environment, not an integer >= 0"]),
        ({"RANK": "2", "WORLD_SIZE": "2"}, ["RANK is 2 but WORLD_SIZE is 2: a rank must be below"]),
        ({"RANK": "0", "WORLD_SIZE": "2"},
         ["WORLD_SIZE is 2 but LOCAL_RANK, MASTER_ADDR and MASTER_PORT are not set"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"},
         ["WORLD_SIZE is 2 but MASTER_PORT is not set"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
          "MASTER_PORT": "p"}, ["MASTER_PORT is 'p' in the environment, not an integer"]),
    ],
)  # fmt: skip
def test_a_partial_torchrun_environment_is_refused_before_anything_is_written(
    cli, env: dict[str, str], needles: list[str], config_path: Path, golden_data: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A stray RANK or a launcher that sets part of torchrun's variables: a message naming
    them, exit 2, for training (which wrote config.json, then failed with a traceback) and
    validation (which exited 0 without a report) alike, and for single-process commands."""
    from clitools import assert_user_error

    clear_torchrun_env(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runs, report, synthetic = tmp_path / "runs", tmp_path / "report", tmp_path / "synthetic"
    for args in (
        ["train-branch", "--config", config_path, "--data", golden_data, "--runs", runs],
        ["validate", tmp_path, "--data", golden_data, "--report", report],
        ["synth", "--out", synthetic],
    ):
        assert_user_error(*cli(*args), *needles)
    assert not runs.exists() and not report.exists() and not synthetic.exists()


def test_single_process_commands_are_refused_by_every_rank_under_torchrun(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`torchrun -m sfr synth|demo ...` made every rank write the same files (and one say the
    folder already holds a dataset): rank 0 refuses with a message, the others exit 2 quietly,
    nothing is written."""
    from clitools import assert_user_error

    clear_torchrun_env(monkeypatch)
    for command in (["synth", "--out", tmp_path / "s"], ["demo", "--out", tmp_path / "d"]):
        torchrun_env(monkeypatch, rank=0, world=2, local=2)
        assert_user_error(
            *cli(*command),
            "This sfr command runs as one process, but torchrun started 2 copies of it",
            "Run it without torchrun",
            "train-branch, finetune, fuse, pipeline and validate",
        )
        torchrun_env(monkeypatch, rank=1, world=2, local=2)
        code, output, _ = cli(*command)
        assert (code, output) == (2, "")
    assert not list(tmp_path.iterdir())


def kill_a_worker(monkeypatch: pytest.MonkeyPatch, view: type, when: Any) -> None:
    """Make the progress view `view` kill -9 a DataLoader worker of this process at the first
    event for which `when(event)` holds, as the kernel's out-of-memory killer would."""
    import multiprocessing
    import signal

    shown = view.__call__
    done: list[int] = []
    # children alive before the command (workers of an earlier command's loaders, not yet
    # collected) are not its workers: killing one of them stops nothing
    earlier = {child.pid for child in multiprocessing.active_children()}

    def call(self: object, event: object) -> None:
        shown(self, event)
        if not done and when(event):
            worker = next(
                child for child in multiprocessing.active_children() if child.pid not in earlier
            )
            done.append(worker.pid)
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(10)
            time.sleep(0.2)  # torch's SIGCHLD handler or its next read notices the death

    monkeypatch.setattr(view, "__call__", call)


def test_a_killed_loader_worker_stops_training_and_validation_with_a_message(
    cli, config_path: Path, golden_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of a --workers process gave a 239-line traceback and exit 1: now which process
    died, how, that epoch 1's checkpoint is kept, exit 2, status "interrupted"; --resume then
    finishes the run. The same in `validate`'s inference pass (nothing written)."""
    from clitools import assert_user_error

    from sfr.cli.common import TrainingView
    from sfr.cli.validate import EvaluationView
    from sfr.eval.evaluation import SamplesDone
    from sfr.train.loop import BatchDone

    clear_torchrun_env(monkeypatch)
    runs = tmp_path / "runs"
    train = ["train-branch", "--config", config_path, "--data", golden_data, "--runs", runs,
             "--workers", "1", "--no-preload", "--batch-size", "4"]  # fmt: skip
    with monkeypatch.context() as patch:
        kill_a_worker(patch, TrainingView, lambda e: isinstance(e, BatchDone) and e.epoch == 1)
        code, output, error = cli(*train)
    assert_user_error(
        code, output, error,
        "Training stopped at epoch 2: the DataLoader worker process",
        "(one of the --workers processes that read the batches)",
        "The checkpoints of epoch 1 are kept in", "--resume",
    )  # fmt: skip
    assert "Check the other processes" not in output  # a single process
    assert json.loads((runs / STAGE / "status.json").read_text())["state"] == "interrupted"
    code, output, error = cli(*train, "--resume")
    assert code == 0, output
    assert len(measures(runs / STAGE)) == 2

    report = tmp_path / "report"
    with monkeypatch.context() as patch:
        kill_a_worker(patch, EvaluationView, lambda e: isinstance(e, SamplesDone))
        code, output, error = cli("validate", runs / STAGE, "--data", golden_data, "--device",
                                  "cpu", "--workers", "1", "--batch-size", "2", "--report", report)  # fmt: skip
    assert_user_error(
        code, output, error, "Inference stopped: the DataLoader worker process",
        "Nothing was written: run the same command again",
    )  # fmt: skip
    assert not (report / "report.json").exists()


def test_a_worker_death_outside_the_loops_is_a_message_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """torch's SIGCHLD handler may raise a worker's death anywhere, even while a message is on
    its way out, or as SIGTERM stops the process and its workers (torchrun): the message, or
    the SIGTERM, wins; a death alone is named; any other exception stays a traceback (a bug)."""
    from sfr.errors import DistributedError

    clear_torchrun_env(monkeypatch)
    death = RuntimeError("DataLoader worker (pid 7) is killed by signal: Terminated.")
    death.__context__ = DistributedError("Training stopped at epoch 2: lost contact.", "Resume.")
    assert raise_in_command(death) == 2
    output = capsys.readouterr().err
    assert output.startswith("Error: Training stopped at epoch 2: lost contact."), output
    death.__context__ = None
    assert raise_in_command(death) == 2
    output = capsys.readouterr().err
    assert "The command stopped: the DataLoader worker process 7" in output, output
    assert "was killed by signal Terminated" in output and "Run it again." in output
    from sfr.cli.common import Terminated

    death.__context__ = Terminated()  # torchrun stopped the process and its workers
    assert raise_in_command(death) == 143
    assert capsys.readouterr().err.startswith("Stopped by SIGTERM.")
    with pytest.raises(RuntimeError, match="a bug"):
        raise_in_command(RuntimeError("a bug"))
