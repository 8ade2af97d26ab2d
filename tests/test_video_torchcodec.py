"""The torchcodec backend: the same frame under every 30 fps key as the PyAV reader.

The timing (from the packets, exact) is tested everywhere; decoding with torchcodec only where
torchcodec loads (it needs FFmpeg 4-8 on the system and a release built for the installed torch).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from fractions import Fraction
from importlib.abc import MetaPathFinder
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from clitools import assert_user_error
from featuredata import write_frame_folder, write_tsn_checkpoint
from test_video import (
    code_image,
    set_rotation,
    source_index,
    write_10_bit,
    write_cut_short,
    write_trimmed,
    write_video,
)
from test_video import videos as videos  # the same test videos (a shared fixture)

from sfr.errors import DataError
from sfr.features import video_torchcodec
from sfr.features.video import VideoFileReader
from sfr.features.video_torchcodec import (
    Timeline,
    TorchCodecVideoReader,
    load_torchcodec,
    read_timeline,
)


def torchcodec_loads() -> bool:
    try:
        load_torchcodec()
    except DataError:
        return False
    return True


needs_torchcodec = pytest.mark.skipif(
    not torchcodec_loads(), reason="torchcodec is not installed or cannot load here"
)


@pytest.fixture(scope="module")
def pyav_frames(videos: dict[str, Path]) -> dict[str, dict[int, np.ndarray]]:
    return {key: dict(VideoFileReader(path, name=key).read()) for key, path in videos.items()}


KEYS = ["25", "60mkv", "ntsc", "mpeg4", "vfr", "long"]


@pytest.mark.parametrize("key", KEYS)
def test_timeline_places_the_frames_pyav_decodes(
    videos: dict[str, Path], pyav_frames: dict[str, dict[int, np.ndarray]], key: str
) -> None:
    """Without decoding, the packets' timestamps choose the source frame of every key."""
    timeline = read_timeline(videos[key])
    fps = Fraction(30)
    expected = pyav_frames[key]
    assert timeline.frame_count(fps) == len(expected)
    assert {n: timeline.source_of(n, fps) for n in expected} == {
        n: source_index(image) for n, image in expected.items()
    }


def test_timeline_arithmetic() -> None:
    ms = Fraction(1, 1000)
    timeline = Timeline(times=(Fraction(0), 40 * ms, 80 * ms), end=120 * ms, tolerance=ms / 2)
    fps = Fraction(30)
    assert timeline.frame_count(fps) == 4  # (n - 1) / 30 < 0.12: n = 1..4
    assert [timeline.source_of(n, fps) for n in (1, 2, 3, 4)] == [0, 0, 1, 2]
    on_tick = Timeline(times=(Fraction(0), Fraction(1, 30)), end=Fraction(1, 15), tolerance=ms)
    assert on_tick.frame_count(fps) == 2 and on_tick.source_of(2, fps) == 1
    late = Timeline(
        times=(Fraction(0), Fraction(1, 30) + 2 * ms), end=Fraction(1, 10), tolerance=ms
    )
    assert late.source_of(2, fps) == 0  # 2 ms late is not on time
    assert Timeline(times=(Fraction(0),), end=Fraction(0), tolerance=ms).frame_count(fps) == 0


@needs_torchcodec
@pytest.mark.parametrize("key", KEYS)
def test_full_read_equals_pyav(
    videos: dict[str, Path], pyav_frames: dict[str, dict[int, np.ndarray]], key: str
) -> None:
    reader = TorchCodecVideoReader(videos[key], name=key)
    frames = dict(reader.read())
    expected = pyav_frames[key]
    assert list(frames) == list(expected)
    assert reader.frame_count() == len(expected)
    for n, image in frames.items():
        assert image.shape == expected[n].shape and image.dtype == np.uint8
        assert source_index(image) == source_index(expected[n]), n
        assert np.abs(image.astype(int) - expected[n].astype(int)).max() <= 2, n


@pytest.fixture(scope="module")
def edge_videos(videos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("edge")
    return [
        write_trimmed(videos["long"], folder / "trim.mp4", Fraction(11, 10)),  # an edit list
        set_rotation(write_video(folder / "phone.mp4", 20, 30), 90),
        write_10_bit(folder / "ten.mp4", 6),
    ]


@needs_torchcodec
def test_trimmed_rotated_and_10_bit_videos_equal_pyav(edge_videos: list[Path]) -> None:
    """Both backends show the picture `ffmpeg -i` makes: cut, upright, converted by FFmpeg."""
    for path in edge_videos:
        ours = dict(TorchCodecVideoReader(path, name=path.stem).read())
        pyav = dict(VideoFileReader(path, name=path.stem).read())
        assert list(ours) == list(pyav), path.name
        for frame, image in ours.items():
            assert np.array_equal(image, pyav[frame]), (path.name, frame)


@needs_torchcodec
def test_a_video_torchcodec_cannot_decode_points_to_the_default_backend(tmp_path: Path) -> None:
    """An AVI with packed B-frames (DivX style): torchcodec loses its last frame, PyAV reads it."""
    path = tmp_path / "divx.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.max_b_frames = 2
        for index in range(30):
            image = av.VideoFrame.from_ndarray(code_image(index), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert len(list(VideoFileReader(path, name="divx").read())) == 36
    with pytest.raises(
        DataError, match=r"torchcodec cannot decode the video .*divx\.avi"
    ) as caught:
        list(TorchCodecVideoReader(path, name="divx").read())
    assert "drop --backend torchcodec" in (caught.value.hint or "")
    assert ".cpp" not in caught.value.message and ".." not in caught.value.message


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_timeline_refuses_a_video_cut_short(tmp_path: Path, suffix: str) -> None:
    with pytest.raises(DataError, match="truncated"):
        read_timeline(write_cut_short(tmp_path / f"cut{suffix}", 0.5))


def test_timeline_of_a_trimmed_video_skips_the_discarded_frames(edge_videos: list[Path]) -> None:
    timeline = read_timeline(edge_videos[0])
    assert len(timeline.times) == 722 and timeline.times[0] == 0
    assert timeline.start == 0  # the edit list puts the first frame after the cut at 0
    assert timeline.frame_count(Fraction(30)) == 867


@needs_torchcodec
def test_sparse_reads_and_batches(
    videos: dict[str, Path],
    pyav_frames: dict[str, dict[int, np.ndarray]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(video_torchcodec, "BATCH_FRAMES", 3)  # many calls, repeats across them
    full = pyav_frames["long"]
    reader = TorchCodecVideoReader(videos["long"], name="long")
    assert len(dict(reader.read())) == 900
    rng = np.random.default_rng(0)
    for wanted in (
        [1, 5, 400, 401, 700, 899, 900, 901],
        [6, 7, 8, 9, 10, 11, 12],  # keys 6 and 7 show the same source frame
        sorted(rng.choice(np.arange(1, 950), size=40, replace=False).tolist()),
        [900, 3, 3],
    ):
        sparse = list(reader.read(wanted))
        assert [n for n, _ in sparse] == sorted({n for n in wanted if n <= 900})
        for n, image in sparse:
            assert source_index(image) == source_index(full[n]), n
    assert list(reader.read([])) == [] and list(reader.read([901])) == []


@needs_torchcodec
def test_repeated_frames_are_separate_arrays(videos: dict[str, Path]) -> None:
    (_, first), (_, second) = TorchCodecVideoReader(videos["25"], name="v25").read([7, 8])
    assert source_index(first) == 5 and np.array_equal(first, second)
    first[:] = 0
    assert second.any()


def test_damaged_and_missing_files_are_named(tmp_path: Path, videos: dict[str, Path]) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataError, match=r"broken\.mp4") as caught:
        list(TorchCodecVideoReader(broken, name="broken").read())
    assert "re-download" in (caught.value.hint or "")
    with pytest.raises(DataError, match="does not exist"):
        TorchCodecVideoReader(tmp_path / "gone.mp4", name="gone").frame_count()


REPORT = """Could not load libtorchcodec. Likely causes:
          1. FFmpeg is not properly installed in your environment.

[start of libtorchcodec loading traceback]
FFmpeg version 8:
Traceback (most recent call last):
OSError: libavutil.so.60: cannot open shared object file: No such file or directory

The above exception was the direct cause of the following exception:

OSError: Could not load this library: /x/libtorchcodec_core8.so

FFmpeg version 7:
OSError: libavutil.so.59: cannot open shared object file: No such file or directory
OSError: Could not load this library: /x/libtorchcodec_core7.so

FFmpeg version 5:
OSError: /x/libtorchcodec_core5.so: undefined symbol: _ZN3c10
[end of libtorchcodec loading traceback]."""


def test_load_failures_tell_each_ffmpeg_version_once() -> None:
    assert video_torchcodec.load_failures(RuntimeError(REPORT)) == (
        "FFmpeg 8: libavutil.so.60: cannot open shared object file: No such file or directory; "
        "FFmpeg 7: libavutil.so.59: cannot open shared object file: No such file or directory; "
        "FFmpeg 5: /x/libtorchcodec_core5.so: undefined symbol: _ZN3c10"
    )
    assert video_torchcodec.load_failures(RuntimeError("no luck.")) == "no luck"


def test_torchcodec_reason_drops_its_source_location() -> None:
    error = RuntimeError(
        "decodeAVFrame, /__w/torchcodec/src/SingleStreamDecoder.cpp:1450, Could not receive frame "
        "from decoder: Invalid data found when processing input."
    )
    assert video_torchcodec.torchcodec_reason(error) == (
        "Could not receive frame from decoder: Invalid data found when processing input"
    )


class RefusingFinder(MetaPathFinder):
    """Makes `import torchcodec` fail as torchcodec does without a system FFmpeg."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.partition(".")[0] == "torchcodec":
            raise RuntimeError("Could not load libtorchcodec. Likely causes: FFmpeg ...")
        return None


@pytest.fixture
def torchcodec_broken(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in [n for n in sys.modules if n.partition(".")[0] == "torchcodec"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [RefusingFinder(), *sys.meta_path])
    yield


def test_missing_or_unloadable_torchcodec_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, torchcodec_broken: None, videos: dict[str, Path]
) -> None:
    with pytest.raises(DataError, match=r"cannot load .*Could not load libtorchcodec") as caught:
        list(TorchCodecVideoReader(videos["25"], name="v25").read())
    assert "FFmpeg" in caught.value.message and "--backend" in (caught.value.hint or "")
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    with pytest.raises(DataError, match="not installed") as caught:
        load_torchcodec()
    assert '.[video,torchcodec]"' in (caught.value.hint or "")


def test_cli_refuses_an_unloadable_backend_before_writing(
    cli, tmp_path: Path, videos: dict[str, Path], torchcodec_broken: None
) -> None:
    write_tsn_checkpoint(tmp_path / "TSN-rgb.pth.tar", in_channels=3)
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "v25.mp4").write_bytes(videos["25"].read_bytes())
    out = tmp_path / "rgb"
    code, output, error = cli(
        "features", "rgb", "--videos", folder, "--weights", tmp_path / "TSN-rgb.pth.tar",
        "--out", out, "--backend", "torchcodec",
    )  # fmt: skip
    assert_user_error(code, output, error, "torchcodec", "cannot load")
    assert not out.exists()
    # frame folders need no video decoder: the option does not stop them
    frames = tmp_path / "frames"
    write_frame_folder(frames / "P01_01", 12)
    code, output, error = cli(
        "features", "rgb", "--videos", frames, "--weights", tmp_path / "TSN-rgb.pth.tar",
        "--out", out, "--backend", "torchcodec",
    )  # fmt: skip
    assert code == 0, output
    record = json.loads((out / "sfr-features.json").read_text())
    assert record["videos"]["P01_01"]["decoder"] is None


@needs_torchcodec
def test_cli_extracts_with_torchcodec_as_with_pyav(
    cli, tmp_path: Path, videos: dict[str, Path], single_torch_thread
) -> None:
    import lmdb

    write_tsn_checkpoint(tmp_path / "TSN-rgb.pth.tar", in_channels=3)
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "v25.mp4").write_bytes(videos["25"].read_bytes())
    stores = {}
    for backend in ("pyav", "torchcodec"):
        out = tmp_path / backend
        code, output, _ = cli(
            "features", "rgb", "--videos", folder, "--weights", tmp_path / "TSN-rgb.pth.tar",
            "--out", out, "--backend", backend, "--fps", "5",
        )  # fmt: skip
        assert code == 0, output
        record = json.loads((out / "sfr-features.json").read_text())
        assert record["videos"]["v25"]["decoder"] == backend
        env = lmdb.open(str(out), readonly=True, lock=False)
        with env.begin() as txn:
            stores[backend] = {
                k.decode(): np.frombuffer(v, np.float32).copy() for k, v in txn.cursor()
            }
        env.close()
    assert list(stores["pyav"]) == list(stores["torchcodec"]) and len(stores["pyav"]) >= 10
    for key, vector in stores["pyav"].items():
        np.testing.assert_allclose(stores["torchcodec"][key], vector, atol=0.05, rtol=0)
