"""Discovery of a user's videos and frame folders, and the EPIC frame folder reader."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sfr.errors import DataError
from sfr.features.sources import (
    FrameFolderReader,
    VideoInput,
    discover_videos,
    open_frames,
    require,
    wanted_frames,
)
from sfr.features.video import VideoFileReader
from sfr.features.video_torchcodec import TorchCodecVideoReader


def colour(frame: int) -> tuple[int, int, int]:
    """A colour per frame number, far apart from its neighbours' (JPEG keeps it within a few)."""
    return ((frame * 53) % 256, (frame * 101 + 40) % 256, (frame * 29 + 200) % 256)


def write_frames(
    folder: Path,
    numbers: range | list[int],
    *,
    pattern: str = "frame_{:010d}.jpg",
    size: tuple[int, int] = (32, 24),
    mode: str = "RGB",
) -> Path:
    """EPIC-style frame files, one solid colour each (frame number n -> colour(n))."""
    folder.mkdir(parents=True, exist_ok=True)
    for number in numbers:
        image = Image.new("RGB", size, colour(number))
        image.convert(mode).save(folder / pattern.format(number), quality=95)
    return folder


def frame_of(image: np.ndarray, count: int = 100) -> int:
    """The frame number whose colour an image shows."""
    mean = image.reshape(-1, 3).mean(axis=0)
    return min(range(1, count + 1), key=lambda n: float(np.abs(mean - colour(n)).sum()))


def touch_video(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not decoded by discovery")
    return path


# -- require and wanted frames ----------------------------------------------------------------


def test_require_names_the_package_and_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # importing it now fails as if not installed
    with pytest.raises(DataError) as caught:
        require("av")
    assert "PyAV (the `av` package)" in caught.value.message
    assert "it is not installed" in caught.value.message
    assert 'pip install -e ".[video]"' in (caught.value.hint or "")  # the README's form
    assert require("numpy") is np


def test_wanted_frames_sorts_and_deduplicates() -> None:
    assert wanted_frames(None) is None
    assert wanted_frames([5, 2, 2, 9]) == [2, 5, 9]
    assert wanted_frames([]) == []
    with pytest.raises(ValueError, match="start at 1"):
        wanted_frames([0, 3])


# -- frame folders ----------------------------------------------------------------------------


def test_frame_folder_reads_every_frame_in_order(tmp_path: Path) -> None:
    folder = write_frames(tmp_path / "P01_01", range(1, 8))
    reader = FrameFolderReader(folder, name="P01_01")
    assert reader.frame_count() == 7
    frames = list(reader.read())
    assert [n for n, _ in frames] == list(range(1, 8))
    for number, image in frames:
        assert image.shape == (24, 32, 3) and image.dtype == np.uint8
        assert image.flags.writeable  # torch.from_numpy warns about read-only arrays
        assert frame_of(image) == number


def test_frame_folder_sparse_read(tmp_path: Path) -> None:
    folder = write_frames(tmp_path / "P01_01", range(1, 8))
    reader = FrameFolderReader(folder, name="P01_01")
    full = dict(reader.read())
    sparse = list(reader.read([6, 2, 2, 9, 7]))
    assert [n for n, _ in sparse] == [2, 6, 7]  # ascending, once each, none past the end
    for number, image in sparse:
        assert np.array_equal(image, full[number])
    assert list(reader.read([])) == []


@pytest.mark.parametrize(
    "pattern", ["frame_{:05d}.png", "frame_{:d}.jpg", "img_{:05d}.jpg", "frame_{:010d}.JPG"]
)
def test_frame_folder_accepts_other_numberings(tmp_path: Path, pattern: str) -> None:
    folder = write_frames(tmp_path / "video", range(1, 4), pattern=pattern)
    frames = list(FrameFolderReader(folder, name="video").read())
    assert [frame_of(image) for _, image in frames] == [1, 2, 3]


def test_grey_frames_become_rgb(tmp_path: Path) -> None:
    folder = write_frames(tmp_path / "grey", range(1, 3), mode="L")
    (_, image), _ = FrameFolderReader(folder, name="grey").read()
    assert image.shape == (24, 32, 3)
    assert np.array_equal(image[..., 0], image[..., 2])


def test_gap_names_the_first_missing_frame(tmp_path: Path) -> None:
    folder = write_frames(tmp_path / "P01_01", [1, 2, 4, 5, 7])
    reader = FrameFolderReader(folder, name="P01_01")
    with pytest.raises(DataError) as caught:
        list(reader.read())
    assert str(folder / "frame_0000000003.jpg") in caught.value.message
    with pytest.raises(DataError, match=r"frame_0000000003\.jpg"):
        reader.frame_count()


def test_first_frame_must_be_1(tmp_path: Path) -> None:
    folder = write_frames(tmp_path / "late", range(3, 6), pattern="frame_{:05d}.jpg")
    with pytest.raises(DataError) as caught:
        list(FrameFolderReader(folder, name="late").read([4]))
    assert "frame_00001.jpg" in caught.value.message


def test_two_files_for_one_frame_are_refused(tmp_path: Path) -> None:
    folder = write_frames(tmp_path / "twice", range(1, 3))
    write_frames(folder, [2], pattern="frame_{:d}.jpg")
    with pytest.raises(DataError, match="frame 2"):
        FrameFolderReader(folder, name="twice").frame_count()


def test_corrupt_frame_names_the_file(tmp_path: Path) -> None:
    folder = write_frames(tmp_path / "P01_01", range(1, 5))
    broken = folder / "frame_0000000003.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    reader = FrameFolderReader(folder, name="P01_01")
    frames = reader.read()
    assert next(frames)[0] == 1
    assert next(frames)[0] == 2
    with pytest.raises(DataError) as caught:
        next(frames)
    assert str(broken) in caught.value.message and "frame 3" in caught.value.message


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no frame files"):
        FrameFolderReader(tmp_path / "empty", name="empty").frame_count()
    with pytest.raises(DataError, match="does not exist"):
        list(FrameFolderReader(tmp_path / "nowhere", name="x").read())


def test_folder_at_60_fps_is_retimed_to_30(tmp_path: Path) -> None:
    folder = write_frames(tmp_path / "fast", range(1, 12))  # 11 frames at 60 fps: 183 ms
    reader = FrameFolderReader(folder, name="fast", source_fps=60)
    assert reader.frame_count() == 6  # (n - 1) / 30 < 11 / 60 for n = 1..6
    assert [frame_of(image) for _, image in reader.read()] == [1, 3, 5, 7, 9, 11]
    assert [frame_of(image) for _, image in reader.read([4])] == [7]


# -- discovery --------------------------------------------------------------------------------


def test_discovers_nested_epic100_layout_and_videos(tmp_path: Path) -> None:
    root = tmp_path / "EPIC-KITCHENS"
    write_frames(root / "P01" / "rgb_frames" / "P01_01", range(1, 3))
    write_frames(root / "P01" / "rgb_frames" / "P01_02", range(1, 3))
    write_frames(root / "P02" / "rgb_frames" / "P02_01", range(1, 3))
    # flow frames beside them are not rgb videos
    write_frames(root / "P01" / "flow_frames" / "P01_01" / "u", range(1, 3), mode="L")
    write_frames(root / "P01" / "flow_frames" / "P01_01" / "v", range(1, 3), mode="L")
    touch_video(root / "mine" / "Kitchen.MP4")
    touch_video(root / "mine" / "b.webm")
    touch_video(root / "mine" / "notes.txt")
    touch_video(root / ".hidden" / "skip.mp4")

    found = discover_videos(root)
    assert [v.name for v in found] == ["Kitchen", "P01_01", "P01_02", "P02_01", "b"]
    by_name = {v.name: v for v in found}
    assert by_name["P01_01"] == VideoInput(
        "P01_01", root / "P01" / "rgb_frames" / "P01_01", "frames"
    )
    assert by_name["Kitchen"].kind == "video"
    assert by_name["Kitchen"].path == root / "mine" / "Kitchen.MP4"

    chosen = discover_videos(root, names=["P02_01", "P01_01"])
    assert [v.name for v in chosen] == ["P02_01", "P01_01"]


def test_unknown_name_lists_available(tmp_path: Path) -> None:
    write_frames(tmp_path / "P01_01", range(1, 2))
    touch_video(tmp_path / "P01_02.mp4")
    with pytest.raises(DataError) as caught:
        discover_videos(tmp_path, names=["P09_09"])
    assert "P09_09" in caught.value.message
    assert "P01_01, P01_02" in (caught.value.hint or "")


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    frames = write_frames(tmp_path / "a" / "P01_01", range(1, 2))
    video = touch_video(tmp_path / "b" / "P01_01.mp4")
    with pytest.raises(DataError) as caught:
        discover_videos(tmp_path)
    assert str(frames) in caught.value.message and str(video) in caught.value.message


def test_missing_or_empty_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        discover_videos(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="No videos found"):
        discover_videos(tmp_path / "empty")


def test_root_may_be_one_video_or_one_frame_folder(tmp_path: Path) -> None:
    video = touch_video(tmp_path / "clip.mov")
    assert discover_videos(video) == [VideoInput("clip", video, "video")]
    folder = write_frames(tmp_path / "P03_04", range(1, 3))
    assert discover_videos(folder) == [VideoInput("P03_04", folder, "frames")]
    with pytest.raises(DataError, match="not a video file"):
        discover_videos(touch_video(tmp_path / "notes.txt"))


def test_open_frames_dispatches(tmp_path: Path) -> None:
    folder = write_frames(tmp_path / "P01_01", range(1, 3))
    reader = open_frames(VideoInput("P01_01", folder, "frames"))
    assert isinstance(reader, FrameFolderReader) and reader.name == "P01_01"
    video = VideoInput("clip", touch_video(tmp_path / "clip.mp4"), "video")
    assert isinstance(open_frames(video), VideoFileReader)
    assert isinstance(open_frames(video, backend="torchcodec"), TorchCodecVideoReader)
    with pytest.raises(DataError, match="Unknown video backend"):
        open_frames(video, backend="opencv")
    with pytest.raises(ValueError, match="FlowFrameReader"):
        open_frames(VideoInput("P01_01", folder, "flow"))


def test_discovery_follows_links_once_and_stops_at_frame_folders(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_frames(root / "P01_01", range(1, 4))
    touch_video(root / "P01_01" / "inside" / "ignored.mp4")  # a frame folder is a leaf
    touch_video(root / "clips" / "c1.mkv")
    (root / "clips" / "loop").symlink_to(root, target_is_directory=True)
    (root / "dangling").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    assert [v.name for v in discover_videos(root)] == ["P01_01", "c1"]
