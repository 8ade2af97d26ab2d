"""`sfr features`: extraction from generated frames, videos, flow frames and detections.

Vectors are checked against the published recipe written out independently here (the RU-LSTM
FEATEXT examples: pillow resize to 454x256, x255, BGR minus (104, 117, 128); flow: 5 stacked
(u, v) pairs, each x255 - 128, the first pair repeated at the start).
"""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from featuredata import (
    frame_image,
    write_detections,
    write_flow_frames,
    write_frame_folder,
    write_slowfast_checkpoint,
    write_tsn_checkpoint,
    write_video,
)
from PIL import Image

from sfr.data.provenance import read_record, write_record
from sfr.data.store import frame_key
from sfr.data.timegrid import TimeGrid
from sfr.errors import DataError, SfrError
from sfr.features.extract import FramesWritten
from sfr.features.inputs import InputOptions
from sfr.features.merge import merge_stores
from sfr.features.plan import FramePlan, parse_shard, shard_of
from sfr.features.request import FeatureRequest, run_request
from sfr.models.backbones.bninception import create_bninception


@pytest.fixture(scope="module")
def tsn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic TSN rgb and flow checkpoints in the published container."""
    folder = tmp_path_factory.mktemp("tsn")
    write_tsn_checkpoint(folder / "TSN-rgb.pth.tar", in_channels=3, seed=1)
    write_tsn_checkpoint(folder / "TSN-flow.pth.tar", in_channels=10, seed=2)
    return {"rgb": folder / "TSN-rgb.pth.tar", "flow": folder / "TSN-flow.pth.tar"}


@pytest.fixture(scope="module")
def tsn_nets(tsn: dict[str, Path]) -> dict[str, torch.nn.Module]:
    from sfr.models.backbones.bninception import load_tsn_weights

    nets = {}
    for modality, channels in (("rgb", 3), ("flow", 10)):
        net = create_bninception(in_channels=channels)
        load_tsn_weights(net, tsn[modality])
        nets[modality] = net.eval()
    return nets


def read_store(path: Path) -> dict[str, np.ndarray]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = {k.decode(): np.frombuffer(v, np.float32).copy() for k, v in txn.cursor()}
    env.close()
    return out


def published_rgb(net: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The RU-LSTM rgb recipe: PIL resize to (454, 256), /255, BGR, x255, minus mean."""
    resized = Image.fromarray(image).resize((454, 256), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(resized, np.float32) / 255.0).permute(2, 0, 1)
    x = x[[2, 1, 0]] * 255 - torch.tensor([104.0, 117.0, 128.0]).view(3, 1, 1)
    with torch.no_grad():
        return net(x[None])[0].numpy()


def published_flow(net: torch.nn.Module, pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The RU-LSTM flow recipe on 5 (u, v) grey pairs, oldest first."""
    planes = []
    for u, v in pairs:
        for grey in (u, v):
            resized = Image.fromarray(grey, mode="L").resize((454, 256), Image.BILINEAR)
            planes.append(torch.from_numpy(np.asarray(resized, np.float32) / 255.0) * 255 - 128)
    with torch.no_grad():
        return net(torch.stack(planes)[None])[0].numpy()


def rgb_request(tsn: dict[str, Path], videos: Path, out: Path, **changes) -> FeatureRequest:
    inputs = changes.pop("inputs", InputOptions(videos=videos))
    return FeatureRequest(
        modality="rgb",
        out=out,
        inputs=inputs,
        weights=changes.pop("weights", tsn["rgb"]),
        batch_size=changes.pop("batch_size", 4),
        workers=changes.pop("workers", 2),
        **changes,
    )


def test_rgb_from_frame_folders_follows_the_published_recipe(
    tsn, tsn_nets, tmp_path: Path, single_torch_thread
) -> None:
    videos = tmp_path / "videos"
    write_frame_folder(videos / "P01_01", 5, seed=0)
    write_frame_folder(videos / "P01_02", 3, seed=1)
    out = tmp_path / "rgb"
    result = run_request(rgb_request(tsn, videos, out))
    assert result.written == 8 and sorted(result.completed) == ["P01_01", "P01_02"]
    store = read_store(out)
    assert sorted(store) == sorted(
        [frame_key("P01_01", f) for f in range(1, 6)]
        + [frame_key("P01_02", f) for f in range(1, 4)]
    )
    for video, frame in (("P01_01", 1), ("P01_01", 5), ("P01_02", 2)):
        decoded = np.asarray(Image.open(videos / video / f"frame_{frame:010d}.jpg").convert("RGB"))
        expected = published_rgb(tsn_nets["rgb"], decoded)
        assert store[frame_key(video, frame)].shape == (1024,)
        np.testing.assert_allclose(store[frame_key(video, frame)], expected, rtol=1e-4, atol=1e-4)
    record = read_record(out)
    assert record is not None
    assert record.backbone == "tsn-bninception" and record.dim == 1024 and record.modality == "rgb"
    assert record.preprocessing["size"] == [256, 454]
    assert record.preprocessing["mean"] == [104.0, 117.0, 128.0]
    assert record.preprocessing["channels"] == "BGR"
    assert record.weights["file"] == "TSN-rgb.pth.tar" and len(record.weights["sha256"]) == 64
    assert record.layouts == ["full"]
    assert record.videos["P01_01"].complete and record.videos["P01_01"].frames == 5


def test_rerun_skips_complete_videos_and_resumes_a_killed_run(
    tsn, tmp_path: Path, single_torch_thread
) -> None:
    videos = tmp_path / "videos"
    write_frame_folder(videos / "A", 6, seed=0)
    write_frame_folder(videos / "B", 6, seed=1)
    reference = tmp_path / "reference"
    run_request(rgb_request(tsn, videos, reference, workers=1))
    expected = read_store(reference)

    out = tmp_path / "killed"
    batches = []

    def kill_after_two_batches(event) -> None:
        if isinstance(event, FramesWritten):
            batches.append(event)
            if len(batches) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_request(rgb_request(tsn, videos, out, workers=1), kill_after_two_batches)
    partial = read_store(out)
    assert len(partial) == 8  # two committed batches of 4, nothing half-written
    for key, vector in partial.items():
        np.testing.assert_array_equal(vector, expected[key])
    resumed = run_request(rgb_request(tsn, videos, out, workers=1))
    assert resumed.written == 4  # only what was missing
    final = read_store(out)
    assert final.keys() == expected.keys()
    for key, vector in final.items():
        np.testing.assert_array_equal(vector, expected[key])
    again = run_request(rgb_request(tsn, videos, out))
    assert again.written == 0 and sorted(again.skipped) == ["A", "B"]


def test_video_files_are_retimed_to_30_fps(
    tsn, tsn_nets, tmp_path: Path, single_torch_thread
) -> None:
    videos = tmp_path / "videos"
    write_video(videos / "V25.mp4", frames=10, fps=25, seed=0)  # 0.4 s → 12 frames at 30 fps
    write_video(videos / "V60.mp4", frames=12, fps=60, seed=1)  # 0.2 s → 6 frames at 30 fps
    out = tmp_path / "rgb"
    result = run_request(rgb_request(tsn, videos, out))
    assert not result.failed
    store = read_store(out)
    assert sorted(k for k in store if k.startswith("V25_")) == [
        frame_key("V25", f) for f in range(1, 13)
    ]
    assert sorted(k for k in store if k.startswith("V60_")) == [
        frame_key("V60", f) for f in range(1, 7)
    ]
    # 25 → 30 fps repeats one source frame in every 6 output frames: output frame n shows what
    # is on screen at (n - 1) / 30 s, so frames 1 and 2 (0 and 1/30 s) both show source frame 1
    # (next at 1/25 s), and frames 3..7 show source frames 2..6.
    np.testing.assert_array_equal(store[frame_key("V25", 1)], store[frame_key("V25", 2)])
    for frame in range(2, 7):
        assert not np.array_equal(
            store[frame_key("V25", frame)], store[frame_key("V25", frame + 1)]
        )
    # 60 → 30 fps keeps every second source frame: all 6 differ.
    vectors = [store[frame_key("V60", f)].tobytes() for f in range(1, 7)]
    assert len(set(vectors)) == 6


def test_sparse_layout_holds_exactly_the_frames_of_the_grids(
    tsn, tmp_path: Path, single_torch_thread
) -> None:
    videos = tmp_path / "videos"
    write_frame_folder(videos / "P01_01", 40, seed=0)
    csv = tmp_path / "training.csv"
    csv.write_text(
        "1, P01_01, 0000000030, 0000000040, 1, 2, 3\n2, P01_01, 0000000038, 0000000039, 0, 0, 0\n"
    )
    grids = (TimeGrid(0.25, 2, 1), TimeGrid(0.5, 1, 1))
    plan = FramePlan(grids=grids, starts={"P01_01": (30, 38)})
    out = tmp_path / "rgb"
    result = run_request(rgb_request(tsn, videos, out, plan=plan))
    expected = set()
    for grid in grids:
        for start in (30, 38):
            expected.update(int(f) for f in grid.frames(start))
    assert {frame_key("P01_01", f) for f in expected} == set(read_store(out))
    assert result.written == len(expected)
    assert read_record(out).layouts == ["grid 0.25:2:1", "grid 0.5:1:1"]


def test_fps_subsamples_the_full_layout(tsn, tmp_path: Path, single_torch_thread) -> None:
    videos = tmp_path / "videos"
    write_frame_folder(videos / "V", 9, seed=0)
    out = tmp_path / "rgb"
    run_request(rgb_request(tsn, videos, out, plan=FramePlan(subsample_fps=10)))
    assert sorted(read_store(out)) == [frame_key("V", f) for f in (1, 4, 7)]
    assert read_record(out).layouts == ["full@10fps"]


def test_flow_from_epic_flow_frames_stacks_five_pairs_ending_at_the_frame(
    tsn, tsn_nets, tmp_path: Path, single_torch_thread
) -> None:
    flow = tmp_path / "flow_frames"
    write_flow_frames(flow / "P01_01", 7, seed=3)
    out = tmp_path / "flow"
    request = FeatureRequest(
        modality="flow",
        out=out,
        inputs=InputOptions(flow_frames=flow),
        weights=tsn["flow"],
        batch_size=3,
    )
    result = run_request(request)
    assert result.written == 7
    store = read_store(out)

    def pair(frame: int) -> tuple[np.ndarray, np.ndarray]:
        return tuple(
            np.asarray(Image.open(flow / "P01_01" / axis / f"frame_{frame:010d}.jpg").convert("L"))
            for axis in ("u", "v")
        )

    start = published_flow(tsn_nets["flow"], [pair(1)] * 5)  # the first pair repeated
    np.testing.assert_allclose(store[frame_key("P01_01", 1)], start, rtol=1e-4, atol=1e-4)
    second = published_flow(tsn_nets["flow"], [pair(1)] * 4 + [pair(2)])
    np.testing.assert_allclose(store[frame_key("P01_01", 2)], second, rtol=1e-4, atol=1e-4)
    late = published_flow(tsn_nets["flow"], [pair(f) for f in range(3, 8)])
    np.testing.assert_allclose(store[frame_key("P01_01", 7)], late, rtol=1e-4, atol=1e-4)
    record = read_record(out)
    assert record.preprocessing["clip_frames"] == 5 and record.preprocessing["channels"] == "uv"
    assert record.preprocessing["flow"] == {"source": "flow frames", "stride": 1}


def test_flow_computed_with_tvl1_from_a_video(tsn, tmp_path: Path, single_torch_thread) -> None:
    videos = tmp_path / "videos"
    write_video(videos / "V.mp4", frames=4, fps=30)
    out = tmp_path / "flow"
    request = FeatureRequest(
        modality="flow",
        out=out,
        inputs=InputOptions(videos=videos, flow_height=32),
        weights=tsn["flow"],
    )
    result = run_request(request)
    assert result.written == 4 and not result.failed
    assert read_record(out).preprocessing["flow"]["source"].startswith("tv-l1")


def test_slowfast_clips_end_at_the_keyed_frame(tmp_path: Path, single_torch_thread) -> None:
    weights = tmp_path / "SLOWFAST_8x8_R50.pyth"
    write_slowfast_checkpoint(weights, depth=50, seed=0)
    small = {"short_side": 32, "crop": 32, "clip_frames": 8, "clip_stride": 2}
    videos = tmp_path / "videos"
    write_frame_folder(videos / "V", 20, seed=0)
    # The same video with different frames after frame 12: frames 1..12 must not change.
    changed = write_frame_folder(videos / "W", 20, seed=0)
    for frame in range(13, 21):
        Image.fromarray(frame_image(9, frame)).save(changed / f"frame_{frame:010d}.jpg", quality=95)
    out = tmp_path / "rgb"
    request = FeatureRequest(
        modality="rgb",
        out=out,
        inputs=InputOptions(videos=videos),
        backbone="slowfast-r50",
        weights=weights,
        preprocessing=small,
        plan=FramePlan(subsample_fps=5),
        batch_size=2,
    )
    result = run_request(request)
    assert not result.failed
    store = read_store(out)
    assert store[frame_key("V", 1)].shape == (2304,)
    for frame in (1, 7, 13, 19):
        assert frame_key("V", frame) in store
    for frame in (1, 7):  # clips ending at or before frame 12 read nothing after it
        np.testing.assert_array_equal(store[frame_key("V", frame)], store[frame_key("W", frame)])
    assert not np.array_equal(store[frame_key("V", 13)], store[frame_key("W", 13)])
    record = read_record(out)
    assert record.dim == 2304 and record.backbone == "slowfast-r50"
    assert record.preprocessing["clip_frames"] == 8 and record.preprocessing["short_side"] == 32


def test_objects_from_detections(tmp_path: Path) -> None:
    detections = tmp_path / "detections"
    per_frame = write_detections(detections / "P01_01.npy", frames=6, classes=12, seed=0)
    out = tmp_path / "obj"
    result = run_request(
        FeatureRequest(
            modality="obj", out=out, inputs=InputOptions(detections=detections, classes=12)
        )
    )
    assert result.written == 6
    store = read_store(out)
    for index, dets in enumerate(per_frame):
        expected = np.zeros(12, np.float32)
        for row in dets:
            expected[int(row[0])] += row[5]
        np.testing.assert_allclose(store[frame_key("P01_01", index + 1)], expected, rtol=1e-6)
    record = read_record(out)
    assert record.dim == 12 and record.backbone == "detections"
    assert record.preprocessing["class_offset"] == 0


def test_a_store_made_another_way_is_refused(tsn, tmp_path: Path, single_torch_thread) -> None:
    videos = tmp_path / "videos"
    write_frame_folder(videos / "V", 2, seed=0)
    out = tmp_path / "rgb"
    run_request(rgb_request(tsn, videos, out))
    other = tmp_path / "other.pth.tar"
    write_tsn_checkpoint(other, in_channels=3, seed=5)
    with pytest.raises(DataError, match=r"weights\.sha256"):
        run_request(rgb_request({"rgb": other}, videos, out))
    slowfast = tmp_path / "sf.pyth"
    write_slowfast_checkpoint(slowfast, seed=0)
    with pytest.raises(DataError, match="dim"):
        run_request(rgb_request(tsn, videos, out, backbone="slowfast-r50", weights=slowfast))
    foreign = tmp_path / "public"
    foreign.mkdir()
    env = lmdb.open(str(foreign))
    with env.begin(write=True) as txn:
        txn.put(b"V_frame_0000000001.jpg", np.zeros(1024, np.float32).tobytes())
    env.close()
    with pytest.raises(DataError, match="did not write"):
        run_request(rgb_request(tsn, videos, foreign))


def test_failures_are_listed_and_the_other_videos_done(
    tsn, tmp_path: Path, single_torch_thread
) -> None:
    videos = tmp_path / "videos"
    write_frame_folder(videos / "good", 2, seed=0)
    gap = write_frame_folder(videos / "gap", 4, seed=1)
    (gap / "frame_0000000003.jpg").unlink()
    (videos / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    result = run_request(rgb_request(tsn, videos, tmp_path / "rgb"))
    assert result.completed == ["good"]
    failed = dict(result.failed)
    assert set(failed) == {"gap", "broken"}
    assert "frame_0000000003.jpg" in failed["gap"]
    assert "broken.mp4" in failed["broken"]
    assert (
        not read_record(tmp_path / "rgb").videos.get("gap", None)
        or not read_record(tmp_path / "rgb").videos["gap"].complete
    )


def test_shards_merge_into_the_single_run_store(tsn, tmp_path: Path, single_torch_thread) -> None:
    videos = tmp_path / "videos"
    for index, name in enumerate(("A", "B", "C")):
        write_frame_folder(videos / name, 2, seed=index)
    single = tmp_path / "single"
    run_request(rgb_request(tsn, videos, single))
    shards = []
    for index in (1, 2):
        shard = tmp_path / f"shard{index}"
        run_request(
            rgb_request(tsn, videos, shard, inputs=InputOptions(videos=videos, shard=(index, 2)))
        )
        shards.append(shard)
    assert sorted(read_record(shards[0]).videos) == ["A", "C"]
    assert sorted(read_record(shards[1]).videos) == ["B"]
    merged = tmp_path / "merged"
    result = merge_stores(merged, shards)
    assert result.copied == 6 and result.videos == 3
    expected, got = read_store(single), read_store(merged)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(expected[key], got[key])
    again = merge_stores(merged, shards)
    assert again.copied == 0 and again.present == 6


def test_shard_parsing_and_assignment() -> None:
    assert parse_shard("2/3") == (2, 3)
    assert shard_of(list("abcdefg"), (1, 3)) == ["a", "d", "g"]
    assert shard_of(list("abcdefg"), (3, 3)) == ["c", "f"]
    for bad in ("0/3", "4/3", "1-3", "x/2"):
        with pytest.raises(Exception, match="--shard"):
            parse_shard(bad)


def test_store_json_is_valid(tsn, tmp_path: Path, single_torch_thread) -> None:
    videos = tmp_path / "videos"
    write_frame_folder(videos / "V", 1, seed=0)
    run_request(rgb_request(tsn, videos, tmp_path / "rgb"))
    document = json.loads((tmp_path / "rgb" / "sfr-features.json").read_text())
    assert document["schema"] == "sfr-features/1" and document["fps"] == 30.0


def test_a_full_disk_is_a_message_and_a_rerun_completes(
    tsn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_torch_thread
) -> None:
    from sfr.data.store import FeatureStoreWriter

    videos = tmp_path / "videos"
    write_frame_folder(videos / "V", 6, seed=0)
    out = tmp_path / "rgb"
    real_flush = FeatureStoreWriter.flush
    calls = []

    def flush_then_fill_the_disk(self) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise lmdb.DiskError("mdb_txn_commit: No space left on device")
        real_flush(self)

    monkeypatch.setattr(FeatureStoreWriter, "flush", flush_then_fill_the_disk)
    with pytest.raises(DataError, match="No space left") as info:
        run_request(rgb_request(tsn, videos, out, workers=1, batch_size=2))
    assert str(out) in str(info.value) and "run the same command again" in str(info.value)
    monkeypatch.setattr(FeatureStoreWriter, "flush", real_flush)
    kept = read_store(out)  # whole batches only (the failed one may be committed on close)
    assert len(kept) in (2, 4) and all(v.shape == (1024,) for v in kept.values())
    result = run_request(rgb_request(tsn, videos, out, workers=1, batch_size=2))
    assert result.written == 6 - len(kept) and len(read_store(out)) == 6


def test_a_video_shorter_than_one_clip_is_padded_and_said_so(
    tmp_path: Path, single_torch_thread
) -> None:
    weights = tmp_path / "sf.pyth"
    write_slowfast_checkpoint(weights, depth=50, seed=0)
    videos = tmp_path / "videos"
    write_frame_folder(videos / "short", 3, seed=0)
    result = run_request(
        FeatureRequest(
            modality="rgb",
            out=tmp_path / "rgb",
            inputs=InputOptions(videos=videos),
            backbone="slowfast-r50",
            weights=weights,
            preprocessing={"short_side": 32, "crop": 32, "clip_frames": 8, "clip_stride": 2},
        )
    )
    assert result.written == 3 and not result.failed
    assert len(result.notices) == 1
    video, message = result.notices[0]
    assert video == "short" and "shorter than one clip (15 frames)" in message


def test_sparse_runs_say_what_has_no_annotation_and_keep_full_records(
    tsn, tmp_path: Path, single_torch_thread
) -> None:
    videos = tmp_path / "videos"
    write_frame_folder(videos / "A", 4, seed=0)
    write_frame_folder(videos / "B", 4, seed=1)
    out = tmp_path / "rgb"
    run_request(rgb_request(tsn, videos, out))  # the full layout
    events = []
    plan = FramePlan(grids=(TimeGrid(0.05, 1, 1),), starts={"A": (4,), "Z": (30,)})
    result = run_request(rgb_request(tsn, videos, out, plan=plan), events.append)
    assert result.written == 0 and sorted(result.skipped) == ["A", "B"]
    record = read_record(out)
    assert record.videos["A"].layout == "full" and record.videos["A"].complete
    messages = [e.message for e in events if hasattr(e, "message")]
    assert any("1 annotated videos have no input (Z)" in m for m in messages), messages
    fresh = tmp_path / "fresh"
    result = run_request(rgb_request(tsn, videos, fresh, plan=plan))
    assert ("B", "no annotated action: nothing to extract") in result.notices
    assert "B" not in read_record(fresh).videos


def test_bad_output_and_preprocessing_are_refused_before_a_store_exists(
    tsn, tmp_path: Path
) -> None:
    from sfr.errors import ConfigError

    videos = write_frame_folder(tmp_path / "videos" / "V", 1).parent
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(SfrError, match=r"store \(--out\) folder .*afile is a file"):
        run_request(rgb_request(tsn, videos, a_file))
    with pytest.raises(SfrError, match="lies under the file"):
        run_request(rgb_request(tsn, videos, a_file / "rgb"))
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match="--crop does not apply to tsn-bninception") as info:
        run_request(rgb_request(tsn, videos, out, preprocessing={"crop": 200}))
    assert "slowfast-r50, slowfast-r101" in str(info.value)
    for changes, message in (
        ({"crop": 1000}, "--crop 1000 is larger"),
        ({"mean": (0.5, 0.5), "std": (1.0, 1.0, 1.0)}, "--mean has 2 values and --std 3"),
        ({"std": (0.0, 0.0, 0.0)}, "--std values must be above 0"),
        ({"clip_frames": 6}, "--clip-frames 6 is not a multiple of 4"),
    ):
        with pytest.raises(ConfigError, match=message):
            run_request(
                rgb_request(tsn, videos, out, backbone="slowfast-r50", preprocessing=changes)
            )
    for fps in (0.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"--source-fps .* is not a frame rate"):
            run_request(
                rgb_request(tsn, videos, out, inputs=InputOptions(videos=videos, source_fps=fps))
            )
    with pytest.raises(ConfigError, match="unknown decoder"):
        run_request(rgb_request(tsn, videos, out, inputs=InputOptions(videos=videos, backend="x")))
    plan = FramePlan(grids=(TimeGrid(0.5, 1, 1),), starts={"XX": (60,), "YY": (90,)})
    with pytest.raises(DataError, match="None of the 1 input videos has an annotated action"):
        run_request(rgb_request(tsn, videos, out, plan=plan))
    assert not out.exists()


def test_detections_and_frame_folders_at_another_rate_are_retimed(
    tsn, tmp_path: Path, single_torch_thread
) -> None:
    detections = tmp_path / "detections"
    per_frame = write_detections(detections / "V.npy", frames=12, classes=12, seed=0)  # 60 fps
    out = tmp_path / "obj"
    result = run_request(
        FeatureRequest(
            modality="obj",
            out=out,
            inputs=InputOptions(detections=detections, classes=12, source_fps=60),
        )
    )
    assert result.written == 6  # 0.2 s at 30 fps
    assert read_record(out).preprocessing["source_fps"] == 60
    store = read_store(out)
    for frame in range(1, 7):  # keyed frame n shows source frame 2n - 1
        expected = np.zeros(12, np.float32)
        for row in per_frame[2 * frame - 2]:
            expected[int(row[0])] += row[5]
        np.testing.assert_allclose(store[frame_key("V", frame)], expected, rtol=1e-6)
    videos = tmp_path / "videos"
    write_frame_folder(videos / "V", 6, seed=0)  # 60 fps frames → 3 keys
    rgb = tmp_path / "rgb"
    run_request(rgb_request(tsn, videos, rgb, inputs=InputOptions(videos=videos, source_fps=60)))
    twice = tmp_path / "rgb30"
    run_request(rgb_request(tsn, videos, twice))
    at60, at30 = read_store(rgb), read_store(twice)
    assert sorted(at60) == [frame_key("V", f) for f in (1, 2, 3)]
    for frame in (1, 2, 3):
        np.testing.assert_array_equal(
            at60[frame_key("V", frame)], at30[frame_key("V", 2 * frame - 1)]
        )


def test_merge_refuses_other_layouts_and_creates_parents(tmp_path: Path) -> None:
    detections = tmp_path / "detections"
    write_detections(detections / "A.npy", frames=40, classes=12, seed=0)
    inputs = InputOptions(detections=detections, classes=12)
    full, sparse = tmp_path / "full", tmp_path / "sparse"
    run_request(FeatureRequest(modality="obj", out=full, inputs=inputs))
    plan = FramePlan(grids=(TimeGrid(0.5, 1, 1),), starts={"A": (40,)})
    run_request(FeatureRequest(modality="obj", out=sparse, inputs=inputs, plan=plan))
    with pytest.raises(DataError, match=r"layouts grid 0\.5:1:1.*layouts full"):
        merge_stores(tmp_path / "m", [full, sparse])
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(SfrError, match=r"merged store folder .*afile is a file"):
        merge_stores(a_file, [full])
    result = merge_stores(tmp_path / "new" / "deep" / "obj", [full])
    assert result.copied == 40


def test_merge_refuses_a_shard_with_an_unfinished_video(tmp_path: Path) -> None:
    """Vectors of a video an interrupted (or failed) extraction left behind stay out of merges."""
    detections = tmp_path / "detections"
    for index, video in enumerate(("A", "B")):
        write_detections(detections / f"{video}.npy", frames=30, classes=12, seed=index)
    inputs = InputOptions(detections=detections, classes=12)
    shard = tmp_path / "shard"
    run_request(FeatureRequest(modality="obj", out=shard, inputs=inputs))
    record = read_record(shard)
    assert record is not None
    del record.videos["B"]  # as a run stopped half-way through B leaves it
    write_record(shard, record)
    with pytest.raises(DataError, match=r"1 video whose extraction did not finish \(B\)"):
        merge_stores(tmp_path / "merged", [shard])
    assert not (tmp_path / "merged" / "data.mdb").exists()


def test_frames_past_the_end_name_where_the_video_ends(tmp_path: Path) -> None:
    detections = tmp_path / "detections"
    write_detections(detections / "A.npy", frames=40, classes=12, seed=0)
    inputs = InputOptions(detections=detections, classes=12)
    plan = FramePlan(grids=(TimeGrid(0.5, 1, 1),), starts={"A": (30, 80)})
    out = tmp_path / "obj"
    result = run_request(FeatureRequest(modality="obj", out=out, inputs=inputs, plan=plan))
    ((video, message),) = result.failed
    assert video == "A"
    assert "2 of the frames the time grids read lie past the end of the video (it ends before " in (
        message
    )
    assert "frame 49, 40 frames at 30 fps); vectors were written for the other 1." in message
