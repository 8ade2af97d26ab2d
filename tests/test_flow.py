"""Optical flow: published flow frame layouts, TV-L1 from rgb frames, flow images."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sfr.errors import DataError
from sfr.features.flow import (
    FlowFrameReader,
    TVL1FlowReader,
    discover_flow_videos,
    flow_to_image,
)
from sfr.features.sources import FrameFolderReader, discover_videos


def u_level(k: int) -> int:
    return 10 + 17 * k


def v_level(k: int) -> int:
    return 250 - 13 * k


def write_grey(path: Path, level: int, size: tuple[int, int] = (20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, level).save(path, quality=95)


LAYOUTS = {
    # EPIC-KITCHENS: VIDEO/u/frame_%010d.jpg and VIDEO/v/frame_%010d.jpg
    "u/v": ("u/frame_{:010d}.jpg", "v/frame_{:010d}.jpg"),
    # TSN / mmaction sub-folders
    "flow_x/flow_y": ("flow_x/x_{:05d}.jpg", "flow_y/y_{:05d}.jpg"),
    # dense_flow's own output, one folder
    "dense_flow": ("flow_x_{:05d}.jpg", "flow_y_{:05d}.jpg"),
}


def write_flow(folder: Path, layout: str, numbers: Sequence[int]) -> Path:
    """Flow frames whose flow frame k has u = u_level(k), v = v_level(k) everywhere."""
    u_pattern, v_pattern = LAYOUTS[layout]
    for k in numbers:
        write_grey(folder / u_pattern.format(k), u_level(k))
        write_grey(folder / v_pattern.format(k), v_level(k))
    return folder


def levels(image: np.ndarray) -> tuple[int, int]:
    return round(float(image[..., 0].mean())), round(float(image[..., 1].mean()))


# -- flow images ------------------------------------------------------------------------------


def test_flow_to_image_clips_and_scales() -> None:
    flow = np.array([[[0.0, -20.0], [20.0, 35.0]], [[-50.0, 10.0], [-10.0, 19.9]]])
    image = flow_to_image(flow)
    assert image.dtype == np.uint8 and image.shape == (2, 2, 2)
    # round((f + 20) * 255 / 40): 0 -> 127.5 -> 128 (half to even, as OpenCV's cvRound)
    assert image.tolist() == [[[128, 0], [255, 255]], [[0, 191], [64, 254]]]
    assert (
        flow_to_image(np.zeros((3, 4, 2)), bound=5.0).tolist() == np.full((3, 4, 2), 128).tolist()
    )
    with pytest.raises(ValueError, match=r"\(H, W, 2\)"):
        flow_to_image(np.zeros((3, 4)))


# -- published flow frames --------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reads_each_published_layout(tmp_path: Path, layout: str) -> None:
    folder = write_flow(tmp_path / "P01_01", layout, range(1, 5))
    reader = FlowFrameReader(folder, name="P01_01")
    assert reader.frame_count() == 4
    frames = list(reader.read())
    assert reader.layout == layout
    assert [n for n, _ in frames] == [1, 2, 3, 4]
    for k, image in frames:
        assert image.shape == (12, 20, 2) and image.dtype == np.uint8 and image.flags.writeable
        assert levels(image) == (u_level(k), v_level(k))


def test_stride_2_maps_rgb_frames_to_flow_frames(tmp_path: Path) -> None:
    folder = write_flow(tmp_path / "P01_01", "u/v", range(1, 4))
    reader = FlowFrameReader(folder, name="P01_01", stride=2)
    assert reader.frame_count() == 6
    got = [(n, levels(image)[0]) for n, image in reader.read()]
    # keyed frame n reads flow frame (n - 1) // 2 + 1
    assert got == [(n, u_level((n - 1) // 2 + 1)) for n in range(1, 7)]
    sparse = [(n, levels(image)[0]) for n, image in reader.read([5, 2, 7, 8])]
    assert sparse == [(2, u_level(1)), (5, u_level(3))]


def test_missing_v_file_is_named(tmp_path: Path) -> None:
    folder = write_flow(tmp_path / "P01_01", "u/v", range(1, 5))
    (folder / "v" / "frame_0000000004.jpg").unlink()
    with pytest.raises(DataError) as caught:
        list(FlowFrameReader(folder, name="P01_01").read())
    assert str(folder / "v" / "frame_0000000004.jpg") in caught.value.message


def test_gap_is_named(tmp_path: Path) -> None:
    folder = write_flow(tmp_path / "vid", "dense_flow", [1, 2, 4])
    with pytest.raises(DataError) as caught:
        FlowFrameReader(folder, name="vid").frame_count()
    assert "flow_x_00003.jpg" in caught.value.message


def test_folder_without_flow(tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no flow frames"):
        FlowFrameReader(tmp_path / "nothing", name="nothing").frame_count()


def test_discovers_flow_videos(tmp_path: Path) -> None:
    root = tmp_path / "flow"
    write_flow(root / "P01" / "flow_frames" / "P01_01", "u/v", range(1, 3))
    write_flow(root / "P01" / "flow_frames" / "P01_02", "u/v", range(1, 3))
    write_flow(root / "tsn" / "clip_a", "flow_x/flow_y", range(1, 3))
    write_flow(root / "dense" / "clip_b", "dense_flow", range(1, 3))
    found = discover_flow_videos(root)
    assert [(v.name, v.kind) for v in found] == [
        ("P01_01", "flow"),
        ("P01_02", "flow"),
        ("clip_a", "flow"),
        ("clip_b", "flow"),
    ]
    assert found[0].path == root / "P01" / "flow_frames" / "P01_01"
    assert [v.name for v in discover_flow_videos(root, names=["clip_b"])] == ["clip_b"]
    # the u and v folders are no rgb videos
    with pytest.raises(DataError, match="No videos found"):
        discover_videos(root / "P01")

    write_flow(root / "again" / "P01_01", "dense_flow", range(1, 2))
    with pytest.raises(DataError, match="Two inputs are named 'P01_01'"):
        discover_flow_videos(root)
    with pytest.raises(DataError, match="No flow videos"):
        discover_flow_videos(root / "P01" / "flow_frames" / "P01_01" / "u")


# -- TV-L1 ------------------------------------------------------------------------------------


class ListReader:
    """An rgb FrameReader over images in memory that records what it was asked for."""

    name = "synthetic"

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images
        self.requests: list[list[int] | None] = []

    def frame_count(self) -> int:
        return len(self.images)

    def read(self, wanted: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        self.requests.append(None if wanted is None else list(wanted))
        numbers = range(1, len(self.images) + 1) if wanted is None else wanted
        for n in numbers:
            if n <= len(self.images):
                yield n, self.images[n - 1]


def textured_frames() -> list[np.ndarray]:
    """Three 48x64 frames: a smooth random texture, then shifted 2 px right, then 2 px down."""
    rng = np.random.default_rng(0)
    noise = rng.random((48 + 8, 64 + 8))
    kernel = np.outer(*(2 * [np.array([1, 4, 6, 4, 1]) / 16]))
    smooth = sum(kernel[i, j] * noise[i : i + 52, j : j + 68] for i in range(5) for j in range(5))
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255
    first = smooth[2:50, 2:66]
    right = smooth[2:50, 0:64]  # content moved 2 px to the right
    down = smooth[0:48, 0:64]  # then 2 px down
    return [np.repeat(f.astype(np.uint8)[..., None], 3, axis=2) for f in (first, right, down)]


def test_tvl1_flow_points_the_way_things_move() -> None:
    rgb = ListReader(textured_frames())
    reader = TVL1FlowReader(rgb, height=None)
    assert reader.name == "synthetic" and reader.frame_count() == 3
    frames = dict(reader.read())
    assert sorted(frames) == [1, 2, 3]
    assert frames[1].shape == (48, 64, 2) and frames[1].dtype == np.uint8
    assert (frames[1] == 128).all()  # frame 1: no earlier frame, zero motion
    inner = (slice(8, -8), slice(8, -8))
    u2, v2 = frames[2][inner][..., 0], frames[2][inner][..., 1]
    # moved 2 px right: u = +2 -> round(22 * 255 / 40) = 140 (u > 128 means rightwards)
    assert abs(float(np.median(u2)) - 140) <= 1 and abs(float(np.median(v2)) - 128) <= 1
    u3, v3 = frames[3][inner][..., 0], frames[3][inner][..., 1]
    assert abs(float(np.median(u3)) - 128) <= 1 and abs(float(np.median(v3)) - 140) <= 1


def test_tvl1_sparse_read_asks_for_the_previous_frame() -> None:
    rgb = ListReader(textured_frames())
    reader = TVL1FlowReader(rgb, height=None)
    full = dict(reader.read())
    sparse = list(reader.read([3]))
    assert rgb.requests[-1] == [2, 3]  # frame 3's flow is from frame 2, never from frame 4
    assert [n for n, _ in sparse] == [3] and np.array_equal(sparse[0][1], full[3])
    assert [n for n, _ in reader.read([1, 9])] == [1]
    assert rgb.requests[-1] == [1, 8, 9]


def test_tvl1_resizes_to_height_keeping_aspect() -> None:
    reader = TVL1FlowReader(ListReader(textured_frames()), height=24)
    (_, first), (_, second) = reader.read([1, 2])
    assert first.shape == (24, 32, 2) and second.shape == (24, 32, 2)


def test_tvl1_over_a_frame_folder(tmp_path: Path) -> None:
    folder = tmp_path / "P01_01"
    folder.mkdir()
    for n, image in enumerate(textured_frames(), start=1):
        Image.fromarray(image).save(folder / f"frame_{n:010d}.png")
    frames = dict(TVL1FlowReader(FrameFolderReader(folder, name="P01_01"), height=None).read())
    assert float(np.median(frames[2][8:-8, 8:-8, 0])) > 135


def test_tvl1_without_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(DataError, match="opencv-contrib-python-headless"):
        list(TVL1FlowReader(ListReader(textured_frames())).read())
