"""Issue 11: every wrong input a clear answer (exit 2, no traceback), every failure recoverable.

Each test names the case of the issue it turns into a check.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
from clitools import assert_user_error, registered_commands
from conftest import TrainedRuns, writable_copy

from sfr.data.presets import PUBLISHED_PRESETS as PUBLISHED
from sfr.errors import DataError
from sfr.files import json_text

pytestmark = pytest.mark.usefixtures("module_torch_thread")

Cli = Callable[..., tuple[int, str, BaseException | None]]
CPU = ("--device", "cpu")


def poison_video(store: Path, video: str, value: float = math.nan) -> int:
    """Overwrite the first element of every vector of `video` in an LMDB store with `value`."""
    env = lmdb.open(str(store))
    count = 0
    try:
        with env.begin(write=True) as txn:
            for key, raw in list(txn.cursor()):
                if key.decode().startswith(f"{video}_frame_"):
                    vector = np.frombuffer(raw, np.float32).copy()
                    vector[0] = value
                    txn.put(key, vector.tobytes())
                    count += 1
    finally:
        env.close()
    return count


# --------------------------------------------------------------------------------------------
# case 2: non-finite features and strict JSON


def test_validate_refuses_a_non_finite_feature_vector(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path
) -> None:
    data = writable_copy(trained_runs.data, tmp_path / "data")
    video = (data / "validation.csv").read_text().splitlines()[0].split(",")[1].strip()
    assert poison_video(data / "rgb", video) > 0
    code, output, error = cli("validate", trained_runs.branch("rgb@0.25"), "--data", data, *CPU)
    assert_user_error(
        code, output, error, "Feature store 'rgb'", f"'{video}_frame_", "annotation id", "NaN"
    )


def test_json_is_written_strictly() -> None:
    assert json_text({"a": [1.5]}, "x") == '{"a": [1.5]}'
    with pytest.raises(DataError, match="The submission holds NaN or infinite numbers"):
        json_text({"a": {"b": math.nan}}, "The submission")
    with pytest.raises(DataError):
        json_text([math.inf], "The submission")


def test_export_submission_refuses_non_finite_scores(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sfr.cli.export as export_module

    def nan_scores(*args: object, **kwargs: object) -> dict:
        return {"version": "0.1", "results": {"1": {"verb": {"0": math.nan}}}}

    monkeypatch.setattr(export_module, "make_submission", nan_scores)
    out = tmp_path / "sub.json"
    code, output, error = cli(
        "export", "submission", trained_runs.branch("rgb@0.25"), out,
        "--data", trained_runs.data, "--split", "validation", *CPU,
    )  # fmt: skip
    assert_user_error(code, output, error, "NaN or infinite", "nothing written")
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# case 4: EGTEA cross-split scoring; case 16: an unlabelled split is refused before inference


def test_validate_refuses_another_egtea_split_unless_forced(
    cli: Cli, trained_runs: TrainedRuns, synthetic_copy: Path, tmp_path: Path
) -> None:
    from conftest import relabel_checkpoint

    for name in ("validation1.csv", "validation2.csv"):
        (synthetic_copy / name).write_text((synthetic_copy / "validation.csv").read_text())
    best = trained_runs.branch("rgb@0.25") / "best.safetensors"
    model = relabel_checkpoint(best, tmp_path / "egtea.safetensors", "egtea")
    args = ("validate", model, "--data", synthetic_copy, *CPU)
    code, output, error = cli(*args, "--split", "validation2")
    assert_user_error(
        code, output, error, "trained on EGTEA split 1", "validation2", "--other-split"
    )
    code, output, _ = cli(*args, "--split", "validation2", "--other-split")
    assert code == 0, output
    code, output, _ = cli(*args, "--split", "validation1")
    assert code == 0, output


@pytest.mark.parametrize("split", ["validation7", "validation0", "validation3"])
def test_validate_an_egtea_split_that_does_not_exist_says_so_before_cross_split(
    cli: Cli, trained_runs: TrainedRuns, synthetic_copy: Path, tmp_path: Path, split: str
) -> None:
    """Issue 11: an unknown EGTEA split name, or one without its CSV, is named as such, not as
    scoring a split-1 model on another split's validation segments."""
    from conftest import relabel_checkpoint

    best = trained_runs.branch("rgb@0.25") / "best.safetensors"
    model = relabel_checkpoint(best, tmp_path / "egtea.safetensors", "egtea")
    code, output, error = cli("validate", model, "--data", synthetic_copy, "--split", split, *CPU)
    if split == "validation3":
        needles = [f"{synthetic_copy / 'validation3.csv'} does not exist", "sfr download"]
    else:
        needles = [f"Split '{split}' does not exist for egtea", "validation1, validation2"]
    assert_user_error(code, output, error, *needles)
    assert "--other-split" not in output


def test_validate_refuses_an_unlabelled_split_before_inference(
    cli: Cli, trained_runs: TrainedRuns, synthetic_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sfr.eval.evaluation as evaluation_module

    rows = [
        ",".join(r.split(",")[:4])
        for r in (synthetic_copy / "validation.csv").read_text().splitlines()
    ]
    (synthetic_copy / "test_seen.csv").write_text("\n".join(rows) + "\n")

    def no_inference(*args: object, **kwargs: object) -> None:
        raise AssertionError("inference ran")

    monkeypatch.setattr(evaluation_module, "predict_split", no_inference)
    code, output, error = cli(
        "validate", trained_runs.branch("rgb@0.25"), "--data", synthetic_copy,
        "--split", "test_seen", *CPU,
    )  # fmt: skip
    assert_user_error(code, output, error, "test_seen.csv has no labels", "sfr export submission")


# --------------------------------------------------------------------------------------------
# case 5: ensemble weights


@pytest.mark.parametrize("weights", ["nan,1", "inf,1", "-1,2", "0,0"])
def test_validate_refuses_non_finite_negative_or_zero_weights(
    cli: Cli, trained_runs: TrainedRuns, weights: str
) -> None:
    code, output, error = cli(
        "validate", trained_runs.branch("rgb@0.25"), trained_runs.branch("flow@0.25"),
        "--data", trained_runs.data, "--ensemble", "--weights", weights, *CPU,
    )  # fmt: skip
    assert_user_error(code, output, error, "weights must be finite")


def test_ensemble_api_refuses_a_nan_weight(trained_runs: TrainedRuns) -> None:
    from sfr.errors import ConfigError
    from sfr.eval.evaluation import EvaluationSettings, evaluate
    from sfr.models.trained import load_model

    models = [load_model(trained_runs.branch(x)) for x in ("rgb@0.25", "flow@0.25")]
    with pytest.raises(ConfigError, match="finite"):
        evaluate(
            models, trained_runs.data, ensemble_weights=[math.nan, 1.0],
            settings=EvaluationSettings(device="cpu"),
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# cases 6, 7, 10, 14: run folders after failures, kills and damage

BRANCH_TOML = """\
[data]
dataset = "ek55"
feature_dims = { rgb = 16, flow = 16, obj = 12 }

[branch]
modality = "rgb"
alpha = 0.25
s_enc = 2
s_ant = 4
hidden = 8
dropout = 0.5

[optim]
lr = 0.1
batch_size = 16
epochs = 1

[run]
seed = 0
device = "cpu"
"""
RUN = Path("ek55") / "rgb-a0.25-enc2-ant4" / "pretrain"


def branch_args(tmp_path: Path, data: Path, *extra: object) -> list[object]:
    config = tmp_path / "branch.toml"
    if not config.exists():
        config.write_text(BRANCH_TOML, encoding="utf-8")
    return ["train-branch", "--config", config, "--data", data, "--runs", tmp_path / "runs", *extra]


def test_a_data_check_fails_before_the_run_folder_is_touched(
    cli: Cli, golden_data: Path, tmp_path: Path
) -> None:
    """Case 6: a wrong feature dimension is found before anything is written."""
    code, output, error = cli(
        *branch_args(tmp_path, golden_data, "--set", "data.feature_dims.rgb=20")
    )
    assert_user_error(code, output, error, "dimension 16, expected 20")
    assert not (tmp_path / "runs").exists()
    code, output, _ = cli(*branch_args(tmp_path, golden_data))
    assert code == 0, output


def test_a_run_that_failed_before_its_first_checkpoint_is_simply_started_again(
    cli: Cli, golden_copy: Path, golden_data: Path, tmp_path: Path
) -> None:
    """Case 6: a key missing deep in the data stops the first epoch (read from the stores as
    training goes: preloaded, it is found before the run folder is made); the corrected data
    trains without --force or --resume (and so does --resume)."""
    from sfr.data.annotations import read_segments
    from sfr.data.store import frame_key
    from sfr.data.timegrid import TimeGrid

    last = read_segments(golden_copy / "training.csv")[-1]
    key = frame_key(last.video, int(TimeGrid(0.25, 2, 4).frames(last.start_frame)[-1])).encode()
    env = lmdb.open(str(golden_copy / "rgb"))
    with env.begin(write=True) as txn:
        assert txn.delete(key)
    env.close()
    code, output, error = cli(*branch_args(tmp_path, golden_copy, "--no-preload"))
    assert_user_error(code, output, error, "has no key")
    root = tmp_path / "runs" / RUN
    assert json.loads((root / "status.json").read_text())["state"] == "interrupted"
    # the corrected data (the complete store), a changed setting, no --force or --resume
    code, output, _ = cli(*branch_args(tmp_path, golden_data, "--set", "optim.lr=0.05"))
    assert code == 0, output
    assert json.loads((root / "status.json").read_text())["state"] == "finished"


def test_temp_files_of_killed_checkpoint_writes_are_removed_on_start_and_resume(
    cli: Cli, golden_data: Path, tmp_path: Path
) -> None:
    """Case 7."""
    code, output, _ = cli(*branch_args(tmp_path, golden_data))
    assert code == 0, output
    root = tmp_path / "runs" / RUN
    torn = root / ".last.safetensors.k1ll3d.tmp"
    torn.write_bytes(b"\0" * 100)
    code, output, _ = cli(*branch_args(tmp_path, golden_data, "--resume", "--epochs", "2"))
    assert code == 0, output
    assert not torn.exists()
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["best.safetensors", "config.json", "last.safetensors", "metrics.jsonl", "status.json"]
    )


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("status.json", "{not json", "run status"),
        ("status.json", '{"state": "exploded"}', "run status"),
        ("config.json", "[1, 2", "saved config"),
        ("metrics.jsonl", '{"epoch": 0}\n{"epo', "metrics log"),
    ],
)
def test_damaged_run_files_on_resume_are_messages(
    cli: Cli, golden_data: Path, tmp_path: Path, name: str, content: str, needle: str
) -> None:
    """Case 10: damaged JSON of a run folder; --force then starts over."""
    code, output, _ = cli(*branch_args(tmp_path, golden_data))
    assert code == 0, output
    root = tmp_path / "runs" / RUN
    (root / name).write_text(content)
    code, output, error = cli(*branch_args(tmp_path, golden_data, "--resume", "--epochs", "2"))
    assert_user_error(code, output, error, needle, str(root / name), "--force")
    code, output, _ = cli(*branch_args(tmp_path, golden_data, "--force"))
    assert code == 0, output


def test_truncated_checkpoints_are_called_damaged_with_the_way_to_remake_them(
    cli: Cli, golden_data: Path, tmp_path: Path
) -> None:
    """Issue 11: a cut-short best/last checkpoint or bundle is damaged, not "not safetensors"
    with advice to pass a run folder; each hint says how to make that file again."""
    code, output, _ = cli(*branch_args(tmp_path, golden_data))
    assert code == 0, output
    root = tmp_path / "runs" / RUN
    bundle = tmp_path / "bundle.safetensors"
    code, output, _ = cli("export", "model", root, bundle)
    assert code == 0, output
    for name in ("best.safetensors", "last.safetensors"):
        (root / name).write_bytes((root / name).read_bytes()[:5000])
    bundle.write_bytes(bundle.read_bytes()[:5000])
    damaged = "is damaged or cut short"
    code, output, error = cli("validate", root, "--data", golden_data, *CPU)
    assert_user_error(code, output, error, f"{root / 'best.safetensors'} {damaged}", "--force")
    assert "Pass a best.safetensors" not in output
    code, output, error = cli("validate", bundle, "--data", golden_data, *CPU)
    assert_user_error(code, output, error, f"{bundle} {damaged}", "Export this bundle again")
    code, output, error = cli(*branch_args(tmp_path, golden_data, "--resume", "--epochs", "2"))
    assert_user_error(
        code, output, error, f"{root / 'last.safetensors'} {damaged}", "start the stage again"
    )
    for size, what in ((0, "is empty (0 bytes)"), (7, "is not a safetensors checkpoint")):
        (root / "best.safetensors").write_bytes(b"\x00" * size)  # a run's own file, cut short
        code, output, error = cli("validate", root, "--data", golden_data, *CPU)
        assert_user_error(code, output, error, what, "it is damaged", "again with --force")
        assert "Pass a best.safetensors" not in output


def test_damaged_last_checkpoint_on_resume_is_a_message(
    cli: Cli, golden_data: Path, tmp_path: Path
) -> None:
    """Case 10: a last.safetensors without its RNG state, with wrong shapes, or non-JSON
    metadata."""
    import torch

    from sfr.checkpoint import METADATA_KEY, load_checkpoint, save_checkpoint

    code, output, _ = cli(*branch_args(tmp_path, golden_data))
    assert code == 0, output
    last = tmp_path / "runs" / RUN / "last.safetensors"
    tensors, meta = load_checkpoint(last)
    resume = branch_args(tmp_path, golden_data, "--resume", "--epochs", "2")

    without_rng = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    save_checkpoint(last, without_rng, meta)
    code, output, error = cli(*resume)
    assert_user_error(code, output, error, f"Cannot resume from {last}", "rng.torch", "--force")

    wrong = {k: torch.zeros(3, 3) if k.endswith("weight_ih_l0") else v for k, v in tensors.items()}
    save_checkpoint(last, wrong, meta)
    code, output, error = cli(*resume)
    assert_user_error(code, output, error, f"Cannot resume from {last}", "size mismatch")

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(last), {METADATA_KEY: "{oops"})
    code, output, error = cli(*resume)
    assert_user_error(code, output, error, f"sfr metadata of checkpoint {last}")


def test_a_checkpoint_with_wrong_shapes_is_a_message(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path
) -> None:
    """Case 10: `validate` on a checkpoint whose tensors do not fit its config."""
    import torch

    from sfr.checkpoint import load_checkpoint, save_checkpoint

    tensors, meta = load_checkpoint(trained_runs.branch("rgb@0.25") / "best.safetensors")
    name = next(k for k in tensors if k.endswith("weight") and tensors[k].dim() == 2)
    tensors[name] = torch.zeros(2, 2)
    bad = (
        save_checkpoint(tmp_path / "bad.safetensors", tensors, meta) or tmp_path / "bad.safetensors"
    )
    code, output, error = cli("validate", bad, "--data", trained_runs.data, *CPU)
    assert_user_error(code, output, error, str(bad), "do not fit", "size mismatch")


# --------------------------------------------------------------------------------------------
# case 9: output paths that are folders or files, before any work


@pytest.mark.parametrize("command", ["model", "submission"])
def test_export_to_an_existing_folder_is_refused_before_inference(
    cli: Cli,
    trained_runs: TrainedRuns,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    import sfr.cli.export as export_module

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(export_module, "load_model", no_work)
    out = tmp_path / "existing"
    out.mkdir()
    extra = (
        ["--data", trained_runs.data, "--split", "validation"] if command == "submission" else []
    )
    code, output, error = cli("export", command, trained_runs.branch("rgb@0.5"), out, *extra)
    assert_user_error(code, output, error, f"{out} is a folder")


def test_runs_pointing_at_a_file_is_a_message(cli: Cli, golden_data: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.write_text("a file")
    code, output, error = cli(*branch_args(tmp_path, golden_data))
    assert_user_error(code, output, error, f"lies under the file {runs}")
    assert runs.read_text() == "a file"


def test_a_full_disk_while_writing_a_file_is_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sfr.errors import RunError
    from sfr.files import atomic_write_text

    def full(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(RunError, match=r"out\.json could not be written: No space left"):
        atomic_write_text(tmp_path / "out.json", "{}")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# case 15: predict names an unknown video and a moment past the end; case 11: --at nan


def test_predict_an_unknown_video_says_so(cli: Cli, trained_runs: TrainedRuns) -> None:
    code, output, error = cli(
        "predict", trained_runs.fusion("arch1"), "--data", trained_runs.data,
        "--video", "P99_99", "--at", "3", *CPU,
    )  # fmt: skip
    assert_user_error(code, output, error, "Video 'P99_99' is not in the rgb feature store")
    assert "sparse" not in output and "download" not in output


def test_predict_past_the_last_frame_says_so(cli: Cli, trained_runs: TrainedRuns) -> None:
    from sfr.data.store import FeatureStore

    first, last = FeatureStore(trained_runs.data / "rgb", 8).frame_range("P01_03")
    assert 1 <= first < last
    code, output, error = cli(
        "predict", trained_runs.fusion("arch1"), "--data", trained_runs.data,
        "--video", "P01_03", "--at", f"{last / 30 + 60:g}", *CPU,
    )  # fmt: skip
    assert_user_error(code, output, error, "is past its last feature frame", f"..{last} of it")
    assert "sparse" not in output


@pytest.mark.parametrize("where", ["unknown video", "past the end", "inside a sparse store"])
def test_validate_names_a_segment_the_store_cannot_serve(
    cli: Cli, trained_runs: TrainedRuns, synthetic_copy: Path, where: str
) -> None:
    """Issue 11: a CSV row of an unknown video or past a video's end is the annotation's fault,
    named with its id and CSV line; only a frame missing inside the range hints at a sparse store."""
    from sfr.data.store import FeatureStore, frame_key
    from sfr.data.timegrid import TimeGrid

    first, last = FeatureStore(trained_runs.data / "rgb", 8).frame_range("P01_03")
    video, start = {
        "unknown video": ("P99_99", 500),
        "past the end": ("P01_03", last + 300),
        "inside a sparse store": ("P01_03", last - 30),
    }[where]
    frames = TimeGrid(0.25, 2, 4).frames(start)
    if where == "inside a sparse store":
        env = lmdb.open(str(synthetic_copy / "rgb"))
        with env.begin(write=True) as txn:
            assert txn.delete(frame_key("P01_03", int(frames[-1])).encode())
        env.close()
    csv = synthetic_copy / "validation.csv"
    rows = csv.read_text().splitlines()
    csv.write_text(
        "\n".join([*rows, f"00994, {video}, {start:010d}, {start + 100:010d}, 3, 1, 12"])
    )
    code, output, error = cli(
        "validate", trained_runs.branch("rgb@0.25"), "--data", synthetic_copy, *CPU
    )
    needed = f"needed by annotation id 994 ({csv}, line {len(rows) + 1})"
    if where == "unknown video":
        assert_user_error(
            code, output, error, "Video 'P99_99' is not in the rgb feature store", needed
        )
    elif where == "past the end":
        key = frame_key("P01_03", int(frames.min()))
        frame = f"(key '{key}') is past the last frame ({first}..{last}) of video P01_03"
        assert_user_error(code, output, error, f"Frame {int(frames.min())} {frame}", needed)
    else:
        assert_user_error(
            code, output, error, f"has no key '{frame_key('P01_03', int(frames[-1]))}'"
        )
        assert "sparse" in output
    assert ("sparse" in output) == (where == "inside a sparse store")


@pytest.mark.parametrize("at", ["nan", "inf", "-3"])
def test_predict_at_must_be_a_finite_moment(cli: Cli, trained_runs: TrainedRuns, at: str) -> None:
    code, output, error = cli(
        "predict", trained_runs.fusion("arch1"), "--data", trained_runs.data,
        "--video", "P01_03", "--at", at, *CPU,
    )  # fmt: skip
    assert_user_error(code, output, error, "--at must be a moment in seconds")


# --------------------------------------------------------------------------------------------
# case 11: damaged input files


def train_on(cli: Cli, golden_copy: Path, tmp_path: Path) -> tuple[int, str, BaseException | None]:
    return cli(*branch_args(tmp_path, golden_copy))


def test_a_csv_with_non_utf8_bytes_is_a_message(
    cli: Cli, golden_copy: Path, tmp_path: Path
) -> None:
    path = golden_copy / "training.csv"
    path.write_bytes(path.read_bytes() + b"\xff\xfe 1, P01, 3\n")
    code, output, error = train_on(cli, golden_copy, tmp_path)
    assert_user_error(code, output, error, f"{path} is not a UTF-8 text CSV")


def test_a_csv_with_a_huge_field_is_a_message(cli: Cli, golden_copy: Path, tmp_path: Path) -> None:
    path = golden_copy / "validation.csv"
    path.write_text(path.read_text() + '"' + "x" * 200_000 + '"\n')
    code, output, error = train_on(cli, golden_copy, tmp_path)
    assert_user_error(code, output, error, str(path), "not a readable CSV row", "field larger")


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ("24,take_x", "the row has 2 columns, so no 'verb'"),
        ("24,take_x,-3,1", "verb class -3 is outside 0..99999"),
        ("24,take_x,12345678901,1", "verb class 12345678901 is outside"),
    ],
)
def test_a_damaged_actions_row_is_a_message(
    cli: Cli, golden_copy: Path, tmp_path: Path, row: str, needle: str
) -> None:
    path = golden_copy / "actions.csv"
    path.write_text(path.read_text().rstrip("\n") + f"\n{row}\n")
    code, output, error = train_on(cli, golden_copy, tmp_path)
    assert_user_error(code, output, error, str(path), needle)


def test_a_binary_file_given_as_toml_is_a_message(
    cli: Cli, golden_data: Path, tmp_path: Path
) -> None:
    config = tmp_path / "model.safetensors"
    config.write_bytes(b"\x80\x00\xffbinary" * 20)
    code, output, error = cli("train-branch", "--config", config, "--data", golden_data)
    assert_user_error(code, output, error, f"{config} is not a TOML text file")


def test_folders_where_files_are_expected_are_named_as_folders(
    cli: Cli, golden_copy: Path, tmp_path: Path
) -> None:
    """Case 16: a folder is not reported as 'does not exist'."""
    code, output, error = cli("train-branch", "--config", tmp_path, "--data", golden_copy)
    assert_user_error(code, output, error, f"Config file {tmp_path} is a folder")
    csv = golden_copy / "training.csv"
    csv.unlink()
    csv.mkdir()
    code, output, error = train_on(cli, golden_copy, tmp_path)
    assert_user_error(code, output, error, f"Annotation file {csv} is a folder")


# --------------------------------------------------------------------------------------------
# case 12: config values without a sane bound; case 14: names are one folder


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("data.feature_dims.rgb=0", "data.feature_dims.rgb"),
        ("branch.hidden=100000000", "branch.hidden"),
        ("branch.s_enc=100000", "branch.s_enc"),
        ("branch.alpha=inf", "branch.alpha"),
        ("optim.weight_decay=inf", "optim.weight_decay"),
        ("data.fps=1e9", "data.fps"),
    ],
)
def test_config_values_without_a_sane_bound_are_refused_before_any_work(
    cli: Cli, golden_data: Path, tmp_path: Path, override: str, needle: str
) -> None:
    code, output, error = cli(*branch_args(tmp_path, golden_data, "--set", override))
    assert_user_error(code, output, error, needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["../../../x", "a/b", "..", "."])
def test_run_and_data_names_are_one_folder(
    cli: Cli, golden_data: Path, tmp_path: Path, name: str
) -> None:
    for args in (("--name", name), ("--set", f"data.name={name}")):
        code, output, error = cli(*branch_args(tmp_path, golden_data, *args))
        assert_user_error(code, output, error, "must be one folder name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["branch.toml"]


# --------------------------------------------------------------------------------------------
# case 16: messages that mislead


def test_a_bad_set_override_is_blamed_on_the_override_not_the_file(
    cli: Cli, golden_data: Path, tmp_path: Path
) -> None:
    code, output, error = cli(*branch_args(tmp_path, golden_data, "--set", "optim.lrr=0.1"))
    assert_user_error(code, output, error, "command-line override: optim.lrr: unknown field")
    assert f"{tmp_path / 'branch.toml'}: optim.lrr" not in output
    (tmp_path / "branch.toml").write_text(BRANCH_TOML.replace("lr = 0.1", "lrr = 0.1"))
    code, output, error = cli(*branch_args(tmp_path, golden_data))
    assert_user_error(code, output, error, f"{tmp_path / 'branch.toml'}: optim.lrr: unknown")


def test_the_python_api_names_the_expected_input_shape(trained_runs: TrainedRuns) -> None:
    import torch

    from sfr.models.trained import load_model

    model = load_model(trained_runs.branch("rgb@0.25"))
    assert model.input_shapes() == {"rgb@0.25": (6, 8)}
    assert model({"rgb@0.25": torch.zeros(3, 6, 8)}).scores.shape[:2] == (3, 4)
    with pytest.raises(DataError, match=r"shape \(3, 5, 8\), expected \(3, 6, 8\)"):
        model({"rgb@0.25": torch.zeros(3, 5, 8)})
    with pytest.raises(DataError, match=r"shape \(3, 6, 7\), expected \(3, 6, 8\)"):
        model({"rgb@0.25": torch.zeros(3, 6, 7)})
    with pytest.raises(DataError, match=r"needs the input 'rgb@0.25' \(a \(B, 6, 8\) tensor\)"):
        model({"rgb": torch.zeros(3, 6, 8)})
    with pytest.raises(DataError, match=r"has no input 'rgb@0.5'; its inputs are rgb@0.25"):
        model({"rgb@0.25": torch.zeros(3, 6, 8), "rgb@0.5": torch.zeros(3, 6, 8)})
    with pytest.raises(DataError, match=r"input 'rgb@0\.25' is an empty batch \(B = 0\)"):
        model({"rgb@0.25": torch.zeros(0, 6, 8)})
    by_stream = model({model.streams[0]: torch.ones(3, 6, 8)}).scores  # a Stream as the key
    assert torch.equal(by_stream, model({"rgb@0.25": torch.ones(3, 6, 8)}).scores)
    with pytest.raises(DataError, match=r"keyed by stream \(rgb@0\.25\), not a key of type int"):
        model({1: torch.ones(3, 6, 8)})  # type: ignore[dict-item]
    with pytest.raises(DataError, match=r"takes a dict of .* keyed by stream .rgb@0\.25., not a"):
        model(torch.zeros(3, 6, 8))  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"input .rgb@0\.25. is torch\.int64, not a float tensor"):
        model({"rgb@0.25": torch.zeros(3, 6, 8, dtype=torch.int64)})
    double = model({"rgb@0.25": torch.ones(3, 6, 8, dtype=torch.float64)}).scores
    assert torch.equal(double, model({"rgb@0.25": torch.ones(3, 6, 8)}).scores)


# --------------------------------------------------------------------------------------------
# case 19: epochs numbered alike on screen and in the files, the best names its measure,
# status.json is strict JSON


def strict_json(text: str) -> object:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_epochs_are_numbered_from_1_on_screen_and_in_the_files(
    cli: Cli, golden_data: Path, tmp_path: Path
) -> None:
    code, output, _ = cli(*branch_args(tmp_path, golden_data, "--epochs", "2"))
    assert code == 0, output
    root = tmp_path / "runs" / RUN
    status = strict_json((root / "status.json").read_text())
    records = [strict_json(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and status["epoch"] == 2
    best = next(r for r in records if r["epoch"] == status["best_epoch"])
    assert best["selection"] == status["best"]
    assert "epoch   1/2" in output and "epoch   2/2" in output
    assert f"best epoch {status['best_epoch']} (top5@1s = {status['best']:.2f})" in output
    assert "top5@1s" in output.split("epoch   1/2", 1)[1].splitlines()[0]
    # the checkpoints number epochs as the files and the screen do
    from sfr.checkpoint import read_metadata

    last = read_metadata(root / "last.safetensors")
    assert last["epoch"] == status["epoch"] == records[-1]["epoch"] == 2
    assert last["best_epoch"] == status["best_epoch"]
    assert read_metadata(root / "best.safetensors")["epoch"] == status["best_epoch"]


def old_style_metadata(path: Path) -> None:
    """Rewrite a checkpoint's metadata as sfr before 1-based epochs wrote it (0-based, no
    marker)."""
    from safetensors.torch import load_file, save_file

    from sfr.checkpoint import EPOCH_BASE_KEY, METADATA_KEY, read_metadata

    meta = read_metadata(path)
    old = {k: v for k, v in meta.items() if k != EPOCH_BASE_KEY}
    old["epoch"] -= 1
    if "best_epoch" in old:
        old["best_epoch"] = -1 if old["best_epoch"] is None else old["best_epoch"] - 1
    save_file(load_file(str(path)), str(path), {METADATA_KEY: json.dumps(old)})


def test_a_checkpoint_of_an_older_sfr_counting_epochs_from_0_resumes_exactly(
    cli: Cli, golden_data: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from sfr.checkpoint import read_metadata

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for folder in (straight, resumed):
        folder.mkdir()
    code, output, _ = cli(*branch_args(straight, golden_data, "--epochs", "3"))
    assert code == 0, output
    code, output, _ = cli(*branch_args(resumed, golden_data, "--epochs", "2"))
    assert code == 0, output
    root = resumed / "runs" / RUN
    best_epoch = json.loads((root / "status.json").read_text())["best_epoch"]
    for name in ("best.safetensors", "last.safetensors"):
        old_style_metadata(root / name)
    assert read_metadata(root / "best.safetensors")["epoch"] == best_epoch  # read as from 1
    assert read_metadata(root / "last.safetensors")["epoch"] == 2

    code, output, _ = cli(*branch_args(resumed, golden_data, "--epochs", "3", "--resume"))
    assert code == 0, output
    assert "at epoch 3" in output and "epoch   3/3" in output and "epoch   2/3" not in output
    a = straight / "runs" / RUN
    for name in ("best.safetensors", "last.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(root / name))
        assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x), name
    assert (a / "metrics.jsonl").read_text() == (root / "metrics.jsonl").read_text()
    assert read_metadata(root / "last.safetensors") == read_metadata(a / "last.safetensors")


def test_status_before_the_first_epoch_is_strict_json(tmp_path: Path) -> None:
    from sfr.train.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.prepare({"a": 1}, force=False, resume=False)
    run.set_status("running", epoch=-1, best=-math.inf, best_epoch=-1)
    status = strict_json((tmp_path / "run" / "status.json").read_text())
    assert status == {"state": "running", "epoch": 0, "best": None, "best_epoch": None}
    run.write_metrics([{"epoch": 0, "val_loss": math.inf}])
    assert strict_json((tmp_path / "run" / "metrics.jsonl").read_text()) == {
        "epoch": 1,
        "val_loss": None,
    }
    assert run.read_metrics() == [{"epoch": 0, "val_loss": None}]


# --------------------------------------------------------------------------------------------
# case 20: the published presets run on `sfr synth` output without data overrides


def test_synth_writes_the_published_presets_set_to_its_data(cli: Cli, tmp_path: Path) -> None:
    from sfr.config import BranchRunConfig, FusionRunConfig, load_config
    from sfr.data.presets import PUBLISHED_PRESETS

    out = tmp_path / "synth"
    code, output, _ = cli("synth", "--out", out, "--videos", "2", "--val-videos", "1",
                          "--actions-per-video", "12")  # fmt: skip
    assert code == 0, output
    presets = sorted(p.name for p in (out / "configs").iterdir())
    assert "sf_arch2.toml" in presets and "rgb_a0.25.toml" in presets
    assert presets == sorted(p.name for p in PUBLISHED_PRESETS.glob("*.toml"))
    meta = json.loads((out / "synthetic_meta.json").read_text())
    fusion = load_config(FusionRunConfig, out / "configs" / "sf_arch2.toml")
    assert fusion.data.num_classes == meta["num_actions"] and fusion.data.name == "synthetic"
    assert fusion.data.feature_dims == meta["dims"]
    branch = load_config(BranchRunConfig, out / "configs" / "obj_a0.5.toml")
    published = load_config(BranchRunConfig, PUBLISHED_PRESETS / "obj_a0.5.toml")
    assert branch.branch == published.branch and branch.optim == published.optim
    assert (
        f"--config {out / 'configs' / 'obj_a0.5.toml'}"
        in (out / "configs" / "obj_a0.5.toml").read_text()
    )
    # only speed options, no data override: the preset fits the data
    code, output, _ = cli(
        "train-branch", "--config", out / "configs" / "rgb_a0.5.toml", "--data", out,
        "--runs", tmp_path / "runs", "--epochs", "1", "--hidden", "8", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, output
    assert (tmp_path / "runs" / "synthetic" / "rgb-a0.5-enc6-ant4" / "pretrain").is_dir()


def test_the_presets_are_package_data_read_through_the_installed_package() -> None:
    """Case 20: an installed wheel has the presets: they live in the `sfr` package and the
    wheel's package data lists every one of them."""
    import fnmatch
    import importlib.resources

    import sfr
    from sfr.config import (
        PRESETS,
        tomllib,  # tomli before Python 3.11
    )
    from sfr.data.presets import PUBLISHED_PRESETS

    package = Path(sfr.__file__).parent
    assert PRESETS == Path(str(importlib.resources.files("sfr") / "configs")) == package / "configs"
    assert PUBLISHED_PRESETS == PRESETS / "ek55"
    presets = [p.relative_to(package).as_posix() for p in PRESETS.rglob("*.toml")]
    assert len(presets) > 40 and "configs/ek55/sf_arch2.toml" in presets
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["sfr"]
    assert all(any(fnmatch.fnmatch(p, glob) for glob in shipped) for p in presets), shipped


def test_a_published_preset_path_works_from_any_folder(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Case 20: the README's `--config configs/ek55/...` from a folder without configs/ (an
    installed sfr) reads the shipped preset; a wrong name lists what ships."""
    from sfr.config import BranchRunConfig, load_config

    monkeypatch.chdir(tmp_path)
    config = load_config(BranchRunConfig, Path("configs/ek55/rgb_a0.5.toml"))
    assert config == load_config(BranchRunConfig, PUBLISHED / "rgb_a0.5.toml")
    mine = tmp_path / "configs" / "ek55" / "rgb_a0.5.toml"  # a file of the user's own wins
    mine.parent.mkdir(parents=True)
    mine.write_text(
        (PUBLISHED / "rgb_a0.5.toml").read_text().replace("hidden = 1024", "hidden = 64")
    )
    assert load_config(BranchRunConfig, Path("configs/ek55/rgb_a0.5.toml")).branch.hidden == 64
    code, output, error = cli(
        "train-branch", "--config", "configs/ek55/rgb_a9.toml", "--data", tmp_path
    )
    assert_user_error(
        code, output, error, "configs/ek55/rgb_a9.toml does not exist", "egtea | ek100 | ek55"
    )


# --------------------------------------------------------------------------------------------
# case 18: one overwrite rule, --force


def test_export_model_refuses_to_overwrite_without_force(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path
) -> None:
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier bundle")
    code, output, error = cli("export", "model", trained_runs.branch("rgb@0.5"), out)
    assert_user_error(code, output, error, f"The bundle {out} already exists", "--force")
    assert out.read_bytes() == b"an earlier bundle"
    code, output, _ = cli("export", "model", trained_runs.branch("rgb@0.5"), out, "--force")
    assert code == 0, output
    assert out.read_bytes() != b"an earlier bundle"


def test_export_submission_refuses_to_overwrite_before_inference(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sfr.cli.export as export_module

    monkeypatch.setattr(export_module, "load_model", lambda *a: pytest.fail("model loaded"))
    out = tmp_path / "sub.json"
    out.write_text("{}")
    code, output, error = cli(
        "export", "submission", trained_runs.branch("rgb@0.5"), out,
        "--data", trained_runs.data, "--split", "validation",
    )  # fmt: skip
    assert_user_error(code, output, error, f"The submission file {out} already exists")


def test_validate_report_refuses_to_overwrite_a_report_without_force(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path
) -> None:
    """--force replaces the report and keeps a file of one's own in its folder."""
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text("{}")
    (report / "notes.md").write_text("mine")
    args = (
        "validate", trained_runs.branch("rgb@0.5"), "--data", trained_runs.data,
        "--report", report, *CPU,
    )  # fmt: skip
    code, output, error = cli(*args)
    assert_user_error(code, output, error, f"The report {report / 'report.json'} already exists")
    code, output, _ = cli(*args, "--force")
    assert code == 0, output
    assert json.loads((report / "report.json").read_text())["models"]
    assert (report / "notes.md").read_text() == "mine"


def test_synth_force_replaces_only_a_synthetic_dataset(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    code, output, error = cli("synth", out, "--force")
    assert_user_error(code, output, error, "is not a synthetic dataset sfr wrote")
    assert (out / "thesis.tex").read_text() == "precious"


def test_export_force_replaces_the_file_and_stale_temps_of_it_go(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path
) -> None:
    """Cases 7 and 18: the temp file of a killed write of OUT goes when the command runs again
    on OUT (a temp-looking file of another name stays); --force replaces OUT."""
    out = tmp_path / "sub.json"
    out.write_text("{}")
    torn = tmp_path / ".sub.json.k1ll3d00.tmp"
    torn.write_text("{")
    other = tmp_path / ".notes.txt.k1ll3d00.tmp"
    other.write_text("mine")
    args = (
        "export", "submission", trained_runs.branch("rgb@0.5"), out,
        "--data", trained_runs.data, "--split", "validation", *CPU,
    )  # fmt: skip
    code, output, error = cli(*args)
    assert_user_error(code, output, error, f"The submission file {out} already exists", "--force")
    assert not torn.exists() and other.read_text() == "mine"
    code, output, _ = cli(*args, "--force")
    assert code == 0, output
    assert json.loads(out.read_text())["results"]


def test_synth_force_names_a_file_it_did_not_write_and_keeps_it(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "data"
    small = ("--videos", "2", "--val-videos", "1", "--actions-per-video", "12")
    code, output, _ = cli("synth", out, *small)
    assert code == 0, output
    (out / "rgb" / "notes.txt").write_text("mine")
    code, output, error = cli("synth", out, *small, "--force")
    assert_user_error(code, output, error, str(out / "rgb" / "notes.txt"), "did not write")
    assert (out / "rgb" / "notes.txt").read_text() == "mine"


def test_demo_follows_the_overwrite_rule(cli: Cli, tmp_path: Path) -> None:
    """Refused before any work: an earlier demo that cannot be continued (its data record
    damaged) without --force, and with --force a file of one's own inside its data (never
    deleted). A demo that can be continued is (test_demo.py)."""
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "data" / "synthetic_meta.json").write_text("{}")
    code, output, error = cli("demo", "--out", out)
    record = out / "data" / "synthetic_meta.json"
    assert_user_error(code, output, error, f"{record} is damaged", "--force")
    (out / "data" / "notes.txt").write_text("mine")
    code, output, error = cli("demo", "--out", out, "--force")
    assert_user_error(code, output, error, str(out / "data" / "notes.txt"), "did not write")
    assert (out / "data" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["data"]


def test_a_run_folder_follows_the_overwrite_rule(
    cli: Cli, golden_data: Path, tmp_path: Path
) -> None:
    code, output, _ = cli(*branch_args(tmp_path, golden_data))
    assert code == 0, output
    root = tmp_path / "runs" / RUN
    code, output, error = cli(*branch_args(tmp_path, golden_data))
    assert_user_error(code, output, error, f"The run folder {root} already holds a finished run")
    assert "--force" in output and "--resume" in output
    (root / "notes.txt").write_text("mine")
    code, output, _ = cli(*branch_args(tmp_path, golden_data, "--force"))
    assert code == 0, output
    assert (root / "notes.txt").read_text() == "mine"


def test_only_sfr_temp_names_are_removed(tmp_path: Path) -> None:
    """Case 7: `.NAME.<random>.tmp` files, only of the given names; nothing else."""
    from sfr.files import remove_stale_temp_files

    names = [".a.json.abc_1234.tmp", ".b.png.zz99zz99.tmp", ".a-json.tmp", "a.json.x1.tmp", "x.tmp"]
    for name in names:
        (tmp_path / name).write_text("")
    (tmp_path / ".c.json.abcd1234.tmp").mkdir()  # a folder is never a temp file of sfr's
    assert [p.name for p in remove_stale_temp_files(tmp_path, "a.json")] == [names[0]]
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [names[1]]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*names[2:], ".c.json.abcd1234.tmp"])


# --------------------------------------------------------------------------------------------
# case 17: the same names and placeholders for the same things in every command


def every_command() -> list[list[str]]:
    return [words for words, _ in registered_commands()]


def test_every_help_uses_one_placeholder_convention(cli: Cli) -> None:
    commands = every_command()
    assert len(commands) > 20
    for command in commands:
        code, output, _ = cli(*command, "--help")
        assert code == 0, (command, output)
        assert not re.search(r"<(bool|path|int|str|float|list)", output), (command, output)
        assert "{out}" not in output and "REPORT.json " not in output, (command, output)
        usage = next(line for line in output.splitlines() if "Usage:" in line)
        assert not re.search(r"[{}]", usage), (command, usage)  # MODEL, not Typer's {MODEL}


# The wording every command shares for the same option: (start of) its help.
SHARED_HELP = {
    "--seed": "Random seed.",
    "--device": "auto, cpu, cuda, cuda:N or mps.",
    "--force": "Replace ",
    "--workers": "Worker ",
    "--runs": "Runs folder",
}


def visible_options(command: Any) -> list[Any]:
    import typer

    return [p for p in command.params if isinstance(p, typer.core.TyperOption) and not p.hidden]


def test_the_same_option_has_the_same_name_and_wording_in_every_command() -> None:
    from sfr.cli.common import HIDDEN_ALIASES

    seen = dict.fromkeys(SHARED_HELP, 0)
    seen_precision = 0
    for words, command in registered_commands():
        for option in visible_options(command):
            names = option.opts + option.secondary_opts
            assert not HIDDEN_ALIASES & set(names), (words, names)  # older spellings not shown
            if any("worker" in name or "thread" in name for name in names):
                assert names == ["--workers"], (words, names)  # one name for the worker count
            for name in names:
                if name in SHARED_HELP:
                    seen[name] += 1
                    assert (option.help or "").startswith(SHARED_HELP[name]), (words, option.help)
                if name == "--precision":  # one set of choices, shown as such
                    seen_precision += 1
                    assert option.display_type_rich(None) == "fp32|bf16|fp16", words
                if name in ("--epochs", "--lr"):
                    wanted = "raining epochs" if name == "--epochs" else "SGD learning rate"
                    assert wanted in (option.help or ""), (words, name, option.help)
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        outs = [p for p in arguments if p.name.startswith("out") and not p.hidden]
        out_options = [o for o in visible_options(command) if o.opts == ["--out"]]
        for output in outs + out_options:  # every output path reads `PATH` in the help
            assert output.display_type_rich(None) == "PATH", words
        assert not (outs and out_options), words  # an output is either --out or OUT
    assert all(count >= 2 for count in seen.values()), seen  # the rules still check something
    assert seen_precision >= 5


def test_older_spellings_are_still_accepted(cli: Cli, tmp_path: Path) -> None:
    """`--num-workers` (now `--workers`) and `sfr synth OUT` (now `--out`) keep working."""
    import typer.main

    from sfr.cli.app import app

    root = typer.main.get_command(app)
    for spelling in ("--workers", "--num-workers"):
        for words in (["train-branch", "--config", "c.toml"], ["validate", "m"]):
            command = root.commands[words[0]]
            ctx = command.make_context(words[0], [*words[1:], "--data", "d", spelling, "3"])
            assert 3 in (ctx.params.get("num_workers"), ctx.params.get("workers")), words
    code, output, error = cli("synth", tmp_path / "a", "--out", tmp_path / "b")
    assert_user_error(code, output, error, "Give the output folder once", "--out")
    code, output, error = cli("synth")
    assert_user_error(code, output, error, "Give the output folder once")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_split_defaults_are_described_as_they_are(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`validate --split` and `export submission --split` state the default they apply."""
    import sfr.cli.export as export_module
    from sfr.eval.submission import challenge_split

    commands = {" ".join(words): command for words, command in registered_commands()}
    for name, default in [
        ("validate", "(default: validation; EGTEA: the model's own validationN)."),
        ("export submission", "(default: test_seen for EK55, test for EK100)."),
    ]:
        split = next(o for o in commands[name].params if o.opts == ["--split"])
        assert split.help.endswith(default), name
        assert not split.show_default or split.default is None, name  # no second [default: ]
    assert (challenge_split("ek55"), challenge_split("ek100")) == ("test_seen", "test")
    seen = []

    def fake(model: Any, data: Path, split: str, **kwargs: Any) -> dict:
        seen.append(split)
        return {"version": "0.1", "results": {}}

    monkeypatch.setattr(export_module, "make_submission", fake)
    code, output, _ = cli(
        "export", "submission", trained_runs.branch("rgb@0.25"), tmp_path / "s.json",
        "--data", trained_runs.data,
    )  # fmt: skip
    assert code == 0, output
    assert seen == ["test_seen"]  # an EK55 model


def test_version(cli: Cli) -> None:
    from sfr import __version__

    code, output, _ = cli("--version")
    assert code == 0 and output.strip() == f"sfr {__version__}"


def test_fuse_and_pipeline_take_the_same_training_options(cli: Cli) -> None:
    for command in ("fuse", "pipeline"):
        code, output, _ = cli(command, "--help")
        assert code == 0, output
        for option in ("--epochs", "--lr", "--batch-size", "--seed", "--device", "--force"):
            assert option in output, (command, option)


def test_pipeline_epochs_and_lr_set_every_stage(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sfr.cli.pipeline as pipeline_module

    seen = {}
    monkeypatch.setattr(
        pipeline_module, "run_and_report", lambda resolved, *a, **k: seen.update(c=resolved)
    )
    code, output, _ = cli(
        "pipeline", PUBLISHED / "sf_arch2.toml", "--data", tmp_path,
        "--epochs", "3", "--lr", "0.5", "--batch-size", "4", "--seed", "7",
    )  # fmt: skip
    assert code == 0, output
    config = seen["c"]
    assert config.optim.epochs == config.fusion_optim.epochs == 3
    assert config.optim.lr == config.fusion_optim.lr == 0.5
    assert config.optim.batch_size == config.fusion_optim.batch_size == 4
    assert config.run.seed == 7


def test_paths_of_the_wrong_kind_are_named_so(
    cli: Cli, tmp_path: Path, trained_runs: TrainedRuns
) -> None:
    """Case 16: a file given as --data, a folder given as a checkpoint."""
    from sfr.checkpoint import load_checkpoint
    from sfr.errors import RunError

    data = tmp_path / "data.txt"
    data.write_text("not a folder")
    code, output, error = cli(*branch_args(tmp_path, data))
    assert_user_error(code, output, error, f"Data folder {data} is a file, not a folder")
    with pytest.raises(RunError, match="is a folder, not a file"):
        load_checkpoint(tmp_path)


def test_a_binary_class_weights_file_is_a_message(tmp_path: Path) -> None:
    """Case 11, a sibling: the class weights file is read like the CSVs."""
    from sfr.data.annotations import read_class_weights

    path = tmp_path / "weights.txt"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match="is not a UTF-8 text file"):
        read_class_weights(path, 3)


def test_pipeline_takes_the_config_as_fuse_does(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sfr.cli.pipeline as pipeline_module

    seen = []
    monkeypatch.setattr(pipeline_module, "run_and_report", lambda r, *a, **k: seen.append(r))
    preset = PUBLISHED / "sf_arch2.toml"
    for args in (["--config", preset], ["-c", preset], [preset]):
        code, output, _ = cli("pipeline", *args, "--data", tmp_path)
        assert code == 0, output
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2]
    code, output, error = cli("pipeline", preset, "--config", preset, "--data", tmp_path)
    assert_user_error(code, output, error, "Give the fusion config once")
    code, output, error = cli("pipeline", "--data", tmp_path)
    assert_user_error(code, output, error, "Give the fusion config once")


def test_sigterm_stops_training_with_its_resume_advice_and_the_run_continues(
    cli: Cli, golden_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduler's (or torchrun's) SIGTERM: a message and exit 143, not a silent death; the
    same command then continues the run."""
    import os
    import signal

    from sfr.cli.common import TrainingView
    from sfr.train.loop import EpochDone

    original = TrainingView.__call__

    def terminated(self: TrainingView, event: object) -> None:
        original(self, event)
        if isinstance(event, EpochDone):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(TrainingView, "__call__", terminated)
    args = branch_args(tmp_path, golden_data, "--epochs", "2")
    code, output, _ = cli(*args)
    assert code == 128 + signal.SIGTERM, output
    assert "Stopped by SIGTERM." in output and "same command with --resume" in output
    assert "Traceback" not in output
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed afterwards
    root = next((tmp_path / "runs").rglob("status.json")).parent
    stopped = json.loads((root / "status.json").read_text())
    assert (stopped["state"], stopped["epoch"]) == ("interrupted", 1)  # not "running" (issue 11)
    monkeypatch.setattr(TrainingView, "__call__", original)
    code, output, _ = cli(*args, "--resume")  # as the advice says
    assert code == 0, output
    finished = json.loads((root / "status.json").read_text())
    assert (finished["state"], finished["epoch"]) == ("finished", 2)


def test_a_closed_stdout_stops_training_quietly_and_the_run_resumes(
    cli: Cli, golden_data: Path, tmp_path: Path
) -> None:
    """`sfr train-branch ... | head`: the reader closes the pipe after the first epoch line. The
    run stopped with rich's silent exit 1 (or a BrokenPipeError traceback); now it stops as a
    signal would: exit 141 (128 + SIGPIPE), no traceback, the resume advice on stderr, the run
    recorded as interrupted, and --resume finishes it."""
    import os
    import subprocess
    import sys

    from conftest import REPO_DIR

    args = [str(a) for a in branch_args(tmp_path, golden_data, "--epochs", "30")]
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    child = subprocess.Popen(
        [sys.executable, "-m", "sfr", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert child.stdout is not None and child.stderr is not None
    try:
        seen = [child.stdout.readline()]
        while seen[-1] and "epoch   1/30" not in seen[-1]:
            seen.append(child.stdout.readline())
        child.stdout.close()  # as `head` does once it has its lines
        stderr = child.stderr.read()
        code = child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert "epoch   1/30" in seen[-1], "".join(seen) + stderr
    assert code == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert "Output closed (broken pipe): stopped." in stderr
    assert "same command with --resume" in stderr
    status = json.loads((tmp_path / "runs" / RUN / "status.json").read_text())
    assert status["state"] == "interrupted" and 1 <= status["epoch"] < 30
    code, output, _ = cli(*args, "--resume")  # as the advice says
    assert code == 0, output
    assert f"resuming {tmp_path / 'runs' / RUN} at epoch {status['epoch'] + 1}" in output
    finished = json.loads((tmp_path / "runs" / RUN / "status.json").read_text())
    assert (finished["state"], finished["epoch"]) == ("finished", 30)


def test_supervision_levels_outside_0_to_5_are_refused(cli: Cli, tmp_path: Path) -> None:
    from sfr.errors import ConfigError
    from sfr.eval.submission import SupervisionLevels

    with pytest.raises(ConfigError, match="sls_pt is -1; supervision levels are 0 to 5"):
        SupervisionLevels(pt=-1)
    for value in ("-1", "6"):
        code, output, _ = cli(
            "export",
            "submission",
            tmp_path / "m.safetensors",
            tmp_path / "s.json",
            "--sls-tl",
            value,
        )
        assert code == 2 and "--sls-tl" in output and "Traceback" not in output, output
