"""`sfr features` through the command line, as a user calls it: from a folder of videos and
detection files to stores that `sfr train-branch` reads unchanged; every bad input a message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from clitools import assert_user_error
from conftest import GOLDEN_DATA_DIR
from featuredata import (
    write_detections,
    write_frame_folder,
    write_tsn_checkpoint,
    write_video,
)

from sfr.data.store import frame_key
from sfr.data.timegrid import TimeGrid


@pytest.fixture(scope="module")
def tsn_rgb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "TSN-rgb.pth.tar"
    write_tsn_checkpoint(path, in_channels=3, seed=1)
    return path


def keys(store: Path) -> list[str]:
    env = lmdb.open(str(store), readonly=True, lock=False)
    with env.begin() as txn:
        out = [k.decode() for k in txn.cursor().iternext(values=False)]
    env.close()
    return out


def test_videos_to_stores_to_a_trained_branch(
    cli, tsn_rgb: Path, tmp_path: Path, single_torch_thread
) -> None:
    """Two videos and their detections → sparse rgb and obj stores → train-branch on each."""
    videos, detections, data = tmp_path / "videos", tmp_path / "detections", tmp_path / "data"
    write_video(videos / "P01_01.mp4", frames=150, fps=30, seed=0)  # 5 s
    write_frame_folder(videos / "P01_02", 150, seed=1)
    for index, video in enumerate(("P01_01", "P01_02")):
        write_detections(detections / f"{video}.npy", frames=150, classes=12, seed=index)
    data.mkdir()
    shutil.copy(GOLDEN_DATA_DIR / "actions.csv", data / "actions.csv")
    rows = [
        (i, video, start, start + 20, i % 3, i % 4, (i * 5) % 24)
        for i, (video, start) in enumerate(
            [(v, s) for v in ("P01_01", "P01_02") for s in (40, 60, 80, 100, 120, 140)]
        )
    ]
    lines = [", ".join(f"{c:05d}" if isinstance(c, int) else c for c in row) for row in rows]
    (data / "training.csv").write_text("\n".join(lines[:8]) + "\n")
    (data / "validation.csv").write_text("\n".join(lines[8:]) + "\n")
    sparse = ["--annotations", data / "training.csv", data / "validation.csv", "--grids", "0.5:1:2"]

    code, output, error = cli(
        "features", "rgb", "--videos", videos, "--weights", tsn_rgb, "--out", data / "rgb",
        *sparse, "--batch-size", "8", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, f"{output}\n{error!r}"
    assert "✓ P01_01" in output and "✓ P01_02" in output and "vectors written" in output
    stored = set(keys(data / "rgb"))
    # grid 0.5:1:2 reads 1.5, 1.0 and 0.5 s before each start, in the sampler's float
    # arithmetic (frame 40 at 1.0 s before reads frame 9, not 10).
    grid = TimeGrid(0.5, 1, 2)
    expected = {
        frame_key(video, int(frame)) for _, video, start, *_ in rows for frame in grid.frames(start)
    }
    assert frame_key("P01_01", 9) in expected
    assert stored == expected
    code, output, error = cli(
        "features", "obj", "--detections", detections, "--classes", "12", "--out", data / "obj",
        *sparse,
    )  # fmt: skip
    assert code == 0, f"{output}\n{error!r}"
    assert set(keys(data / "obj")) == expected

    runs = tmp_path / "runs"
    for modality in ("rgb", "obj"):
        code, output, error = cli(
            "train-branch", "--config", "configs/ek55/rgb_a0.5.toml", "--set",
            f"branch.modality={modality}", "--alpha", "0.5", "--s-enc", "1", "--s-ant", "2",
            "--hidden", "8", "--epochs", "1", "--batch-size", "4", "--set", "run.select_time=0.5",
            "--set", "data.num_classes=24", "--data", data, "--runs", runs, "--device", "cpu",
        )  # fmt: skip
        assert code == 0, f"{output}\n{error!r}"
        saved = json.loads(
            (runs / "ek55" / f"{modality}-a0.5-enc1-ant2" / "pretrain" / "config.json").read_text()
        )
        # obj stores hold 12-d vectors: the dimension is read from the store's record.
        assert saved["data"]["feature_dims"] == (
            {"obj": 12} if modality == "obj" else {"rgb": 1024}
        )
    # Another grid needs other frames: the hint says how to extract them into this store.
    code, output, error = cli(
        "train-branch", "--config", "configs/ek55/rgb_a0.5.toml", "--alpha", "0.25", "--s-enc",
        "1", "--s-ant", "2", "--hidden", "8", "--epochs", "1", "--set", "run.select_time=0.5",
        "--set", "data.num_classes=24", "--data", data, "--runs", runs, "--device", "cpu",
    )  # fmt: skip
    assert_user_error(code, output, error, "extracted by sfr features for grid 0.5:1:2")
    # A video whose extraction did not finish: the hint says so, not "extract another grid".
    unfinished = tmp_path / "unfinished"
    shutil.copytree(data, unfinished, ignore=shutil.ignore_patterns("rgb"))
    record = json.loads((unfinished / "obj" / "sfr-features.json").read_text())
    del record["videos"]["P01_02"]
    (unfinished / "obj" / "sfr-features.json").write_text(json.dumps(record))
    dropped = [k for k in keys(unfinished / "obj") if k.startswith("P01_02")][:3]
    env = lmdb.open(str(unfinished / "obj"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for key in dropped:
            txn.delete(key.encode())
    env.close()
    code, output, error = cli(
        "train-branch", "--config", "configs/ek55/rgb_a0.5.toml", "--set", "branch.modality=obj",
        "--alpha", "0.5", "--s-enc", "1", "--s-ant", "2", "--hidden", "8", "--epochs", "1",
        "--set", "run.select_time=0.5", "--set", "data.num_classes=24", "--data", unfinished,
        "--runs", tmp_path / "runs2", "--device", "cpu",
    )  # fmt: skip
    assert_user_error(code, output, error, "did not finish the video P01_02")


def test_weights_by_registry_name(cli, tsn_rgb: Path, tmp_path: Path, single_torch_thread) -> None:
    videos = write_frame_folder(tmp_path / "videos" / "V", 1).parent
    runs = tmp_path / "runs"
    code, output, error = cli(
        "features", "rgb", "--videos", videos, "--weights", "tsn-rgb", "--runs", runs,
        "--out", tmp_path / "rgb",
    )  # fmt: skip
    assert_user_error(code, output, error, "tsn-rgb", "sfr download get tsn-rgb")
    (runs / "backbones").mkdir(parents=True)
    shutil.copy(tsn_rgb, runs / "backbones" / "TSN-rgb.pth.tar")
    code, output, error = cli(
        "features", "rgb", "--videos", videos, "--weights", "tsn-rgb", "--runs", runs,
        "--out", tmp_path / "rgb",
    )  # fmt: skip
    assert code == 0, f"{output}\n{error!r}"
    record = json.loads((tmp_path / "rgb" / "sfr-features.json").read_text())
    assert record["weights"]["name"] == "tsn-rgb"


def test_failures_exit_2_after_the_other_videos(
    cli, tsn_rgb: Path, tmp_path: Path, single_torch_thread
) -> None:
    videos = tmp_path / "videos"
    write_frame_folder(videos / "good", 2)
    (videos / "broken.mp4").write_bytes(b"\x00" * 2000)
    gap = write_frame_folder(videos / "gap", 3)
    (gap / "frame_0000000002.jpg").unlink()
    code, output, _ = cli(
        "features", "rgb", "--videos", videos, "--weights", tsn_rgb, "--out", tmp_path / "rgb"
    )
    assert code == 2 and "Traceback" not in output, output
    assert "✓ good" in output
    assert "Failed: broken" in output and "broken.mp4" in output
    assert "Failed: gap" in output and "frame_0000000002.jpg" in output
    assert keys(tmp_path / "rgb") == [frame_key("good", 1), frame_key("good", 2)]


@pytest.mark.parametrize(
    ("mutate", "needles"),
    [
        (lambda s: s.pop("module.base_model.inception_3a_1x1.weight"), ["missing", "inception_3a_1x1.weight"]),
        (lambda s: s.__setitem__("module.base_model.extra.weight", torch.zeros(1)), ["unexpected", "extra.weight"]),
        (lambda s: s.__setitem__("module.base_model.conv1_7x7_s2.weight", torch.zeros(64, 10, 7, 7)), ["conv1_7x7_s2.weight", "(64, 10, 7, 7)"]),
    ],
)  # fmt: skip
def test_a_checkpoint_that_does_not_fit_names_the_key(
    cli, tsn_rgb: Path, tmp_path: Path, mutate, needles
) -> None:
    container = torch.load(tsn_rgb, weights_only=True)
    mutate(container["state_dict"])
    bad = tmp_path / "bad.pth.tar"
    torch.save(container, bad)
    videos = write_frame_folder(tmp_path / "videos" / "V", 1).parent
    code, output, error = cli(
        "features", "rgb", "--videos", videos, "--weights", bad, "--out", tmp_path / "rgb"
    )
    assert_user_error(code, output, error, str(bad), *needles)
    assert not (tmp_path / "rgb" / "data.mdb").exists()


def test_bad_options_are_messages(cli, tsn_rgb: Path, tmp_path: Path) -> None:
    videos = write_frame_folder(tmp_path / "videos" / "V", 1).parent
    base = ["features", "rgb", "--videos", videos, "--weights", tsn_rgb, "--out", tmp_path / "o"]
    cases = [
        (["--grids", "0.5:6"], ["--grids", "ALPHA:S_ENC:S_ANT"]),
        (["--grids", "0.5:6:4"], ["needs the annotations", "--annotations"]),
        (["--annotations", "a.csv"], ["needs both the annotations and the grids"]),
        (["--shard", "3/2"], ["--shard", "I/N"]),
        (["--backbone", "resnet"], ["Unknown backbone 'resnet'", "tsn-bninception"]),
        (["--precision", "fp16", "--device", "cpu"], ["--precision fp16 needs a CUDA device"]),
        (["--fps", "60"], ["--fps 60"]),
        (["--video", "nope"], ["nope"]),
        (["stray"], ["Unexpected argument 'stray'"]),
        (["--mean", "abc"], ["--mean 'abc' is not comma-separated numbers"]),
        (["--source-fps", "0"], ["--source-fps 0 is not a frame rate"]),
    ]
    for extra, needles in cases:
        code, output, error = cli(*base, *extra)
        assert_user_error(code, output, error, *needles)
    code, output, error = cli(
        "features",
        "rgb",
        "--videos",
        tmp_path / "none",
        "--weights",
        tsn_rgb,
        "--out",
        tmp_path / "o",
    )
    assert_user_error(code, output, error, str(tmp_path / "none"))
    code, output, error = cli(
        "features",
        "flow",
        "--videos",
        videos,
        "--backbone",
        "slowfast-r50",
        "--weights",
        tsn_rgb,
        "--out",
        tmp_path / "o",
    )
    assert_user_error(code, output, error, "slowfast-r50 does not extract flow")
    code, output, error = cli("features", "obj", "--out", tmp_path / "o")
    assert_user_error(code, output, error, "--detections")
    code, output, error = cli("features", "rgb", "--videos", videos, "--out", tmp_path / "o")
    assert_user_error(code, output, error, "--weights", "tsn-rgb")


def test_merge_through_the_cli(cli, tmp_path: Path) -> None:
    detections = tmp_path / "detections"
    for index, video in enumerate(("A", "B", "C")):
        write_detections(detections / f"{video}.npy", frames=3, classes=352, seed=index)
    for shard in ("1/2", "2/2"):
        code, output, error = cli(
            "features", "obj", "--detections", detections, "--shard", shard,
            "--out", tmp_path / f"shard{shard[0]}",
        )  # fmt: skip
        assert code == 0, output
    code, output, error = cli(
        "features", "merge", tmp_path / "all", tmp_path / "shard1", tmp_path / "shard2"
    )
    assert code == 0, output
    assert "9 vectors copied" in output and "3 videos" in output
    assert len(keys(tmp_path / "all")) == 9
    code, output, error = cli("features", "merge", tmp_path / "all", tmp_path / "missing")
    assert_user_error(code, output, error, str(tmp_path / "missing"))
    np.testing.assert_equal(len(keys(tmp_path / "shard1")) + len(keys(tmp_path / "shard2")), 9)


def test_ctrl_c_says_what_is_kept(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sfr.cli.features as command

    def interrupted(request, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run_request", interrupted)
    detections = tmp_path / "detections"
    write_detections(detections / "V.npy", frames=2, classes=352)
    code, output, _ = cli("features", "obj", "--detections", detections, "--out", tmp_path / "o")
    assert code == 130 and "Traceback" not in output, output
    assert "Interrupted. Every committed vector is kept: run the same command again" in output


def test_stale_record_temps_go_when_a_store_is_written_again(cli, tmp_path: Path) -> None:
    """Issue 11 case 7: the temp file of a record write killed midway is removed when the
    extraction (or merge) runs again on that store; no other file is touched."""
    detections = tmp_path / "detections"
    write_detections(detections / "A.npy", frames=3, classes=352, seed=0)
    store, merged = tmp_path / "obj", tmp_path / "all"
    code, output, _ = cli("features", "obj", "--detections", detections, "--out", store)
    assert code == 0, output
    merged.mkdir()
    for folder in (store, merged):
        (folder / ".sfr-features.json.k1ll3d00.tmp").write_text("{")
        (folder / ".notes.k1ll3d00.tmp").write_text("mine")  # not a temp of this store's files
    code, output, _ = cli("features", "obj", "--detections", detections, "--out", store)
    assert code == 0, output
    code, output, _ = cli("features", "merge", merged, store)
    assert code == 0, output
    for folder in (store, merged):
        assert not (folder / ".sfr-features.json.k1ll3d00.tmp").exists()
        assert (folder / ".notes.k1ll3d00.tmp").read_text() == "mine"
