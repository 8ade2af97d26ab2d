"""Optical flow as pairs of grey images (u, v), read from published layouts or computed with TV-L1.

The published flow features of RU-LSTM were extracted from TV-L1 flow images: each component
clipped to +-20 pixels and mapped linearly to 0..255, as dense_flow (Wang et al.'s TSN tool)
writes them (its `CAST` macro: `cvRound(255 * (v + 20) / 40)`, saturating; `flow_to_image`).

Existing flow frames are read in the layouts that were published:

- EPIC-KITCHENS: `VIDEO/u/frame_0000000001.jpg` with `VIDEO/v/frame_0000000001.jpg`
  (EPIC-100 nests them as `P01/flow_frames/P01_01/u/...`). EPIC's flow frames are at half the
  frame rate of its rgb frames: pass `stride=2`;
- TSN / mmaction: `VIDEO/flow_x/` with `VIDEO/flow_y/` sub-folders of `frame_`, `img_`, `x_` /
  `y_` numbered images;
- dense_flow's own output: `VIDEO/flow_x_00001.jpg` with `VIDEO/flow_y_00001.jpg` in one folder.

Or flow is computed from rgb frames with OpenCV contrib's Dual TV-L1 (`TVL1FlowReader`).
OpenCV's convention: flow (u, v) at pixel (x, y) says that the content at (x, y) in the earlier
frame is at (x + u, y + v) in the later one, so motion to the right gives u > 0 (grey > 128) and
motion down gives v > 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sfr.errors import DataError, install_extra
from sfr.features.sources import (
    FLOW_COMPONENT_PAIRS,
    FrameReader,
    NumberedImages,
    VideoInput,
    check_root,
    load_image,
    numbered_images,
    one_numbering,
    require,
    select_inputs,
    walk_folders,
    wanted_frames,
)
from sfr.files import missing_reason

FLOW_BOUND = 20.0
"""Flow components are clipped to +-FLOW_BOUND pixels before they become grey levels."""

DEFAULT_FLOW_HEIGHT = 256
"""TV-L1 runs on frames resized to this many rows (the published EPIC frames were 256 high)."""

FlowLayout = Literal["u/v", "flow_x/flow_y", "x/y", "dense_flow"]

_PAIR_LAYOUTS: dict[str, FlowLayout] = {"u": "u/v", "flow_x": "flow_x/flow_y", "x": "x/y"}


def flow_to_image(flow: np.ndarray, bound: float = FLOW_BOUND) -> np.ndarray:
    """Flow in pixels, `(H, W, 2)` float, as `(H, W, 2)` uint8 grey levels.

    value = round((f + bound) * 255 / (2 * bound)), rounding half to even and saturating at 0
    and 255, as dense_flow does: 0 -> 128, -bound or less -> 0, +bound or more -> 255.
    """
    flow = np.asarray(flow, dtype=np.float64)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must have shape (H, W, 2), got {flow.shape}")
    scaled = np.round((flow + bound) * (255.0 / (2.0 * bound)))
    return np.clip(np.nan_to_num(scaled, nan=128.0), 0, 255).astype(np.uint8)


# -- published flow frames --------------------------------------------------------------------


def _single_prefix(folder: Path) -> NumberedImages | None:
    """The numbered images of one flow component folder (one prefix: frame_, img_, x_, ...)."""
    return one_numbering(
        numbered_images(folder),
        f"The flow folder {folder} mixes files named",
        "Keep one numbering per flow component folder.",
    )


def flow_layout(folder: Path) -> tuple[FlowLayout, NumberedImages, NumberedImages] | None:
    """The layout of a flow video folder and its (u, v) images, or None when it holds none."""
    folder = Path(folder)
    for first, second in FLOW_COMPONENT_PAIRS:
        if (folder / first).is_dir() and (folder / second).is_dir():
            u = _single_prefix(folder / first)
            v = _single_prefix(folder / second)
            if u is None and v is None:
                continue
            layout = _PAIR_LAYOUTS[first]
            empty_u = NumberedImages(folder / first, "frame", {})
            empty_v = NumberedImages(folder / second, "frame", {})
            return layout, u or empty_u, v or empty_v
    if folder.is_dir():
        groups = numbered_images(folder)
        if "flow_x" in groups or "flow_y" in groups:
            u = groups.get("flow_x") or NumberedImages(folder, "flow_x", {})
            v = groups.get("flow_y") or NumberedImages(folder, "flow_y", {})
            return "dense_flow", u, v
    return None


def _is_dense_flow_name(name: str) -> bool:
    return name.startswith(("flow_x_", "flow_y_"))


def _has_flow(folder: Path, dirs: Sequence[str], files: Iterable[str]) -> bool:
    names = set(dirs)
    if any(first in names and second in names for first, second in FLOW_COMPONENT_PAIRS):
        return True
    return any(map(_is_dense_flow_name, files))


def discover_flow_videos(root: Path, *, names: Sequence[str] | None = None) -> list[VideoInput]:
    """The flow videos under `root`, found recursively, each named by its folder.

    A flow video folder holds `u/` and `v/` (EPIC; EPIC-100 nests `P01/flow_frames/P01_01/u/`),
    `flow_x/` and `flow_y/`, or dense_flow's `flow_x_00001.jpg` / `flow_y_00001.jpg` files.
    Sorted by name; duplicate names are an error naming both; `names` filters as in
    `discover_videos`.
    """
    root = check_root(root, "flow")
    found: list[VideoInput] = []
    for folder, dirs, files in walk_folders(root, leaf=_is_dense_flow_name):
        if _has_flow(folder, dirs, files) and flow_layout(folder) is not None:
            dirs[:] = []
            found.append(VideoInput(folder.name, folder, "flow"))
    return select_inputs(found, names, root, "flow videos")


class FlowFrameReader:
    """Published flow frames of one video as `(H, W, 2)` uint8 (u, v) images.

    The layout is detected (module docstring). `stride` is the number of rgb frames per flow
    frame: keyed frame n reads flow frame (n - 1) // stride + 1 (EPIC-KITCHENS' flow frames are at
    half the rate of its rgb frames: stride 2), so `frame_count` is stride x the flow frames.
    A missing u or v file or a gap in the numbering is an error naming the file, raised before
    any frame is read.
    """

    def __init__(self, folder: Path, *, name: str, stride: int = 1) -> None:
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        self.folder = Path(folder)
        self.name = name
        self.stride = stride
        self._components: tuple[NumberedImages, NumberedImages] | None = None
        self.layout: FlowLayout | None = None

    def _files(self) -> tuple[NumberedImages, NumberedImages]:
        if self._components is None:
            if not self.folder.is_dir():
                raise DataError(
                    f"The flow folder {self.folder} {missing_reason(self.folder, 'folder')}.",
                    "Check the path of the flow frames of this video.",
                )
            found = flow_layout(self.folder)
            if found is None:
                raise DataError(
                    f"The flow folder {self.folder} holds no flow frames.",
                    "Expected u/ and v/ sub-folders (EPIC), flow_x/ and flow_y/, or dense_flow's "
                    "flow_x_00001.jpg and flow_y_00001.jpg files.",
                )
            layout, u, v = found
            last = max(u.last, v.last)
            for component in (u, v):
                missing = component.first_missing(last)
                if missing is not None:
                    raise DataError(
                        f"Flow file {missing} of {self.name} is missing "
                        f"(flow frames run up to {last}).",
                        "Extract the flow of this video again: every flow frame needs both its "
                        "u (x) and v (y) image, numbered from 1 without gaps.",
                    )
            self.layout = layout
            self._components = (u, v)
        return self._components

    def frame_count(self) -> int:
        """The number of keyed frames: stride x the number of flow frames (exact)."""
        u, _ = self._files()
        return u.last * self.stride

    def read(self, wanted: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(frame, (H, W, 2) uint8 (u, v))` for each wanted keyed frame (all when None)."""
        u, v = self._files()
        count = self.frame_count()
        frames = wanted_frames(wanted)
        numbers: Iterable[int] = range(1, count + 1) if frames is None else frames
        cached: tuple[int, np.ndarray] | None = None
        for frame in numbers:
            if frame > count:
                return
            index = (frame - 1) // self.stride + 1
            if cached is not None and cached[0] == index:
                yield frame, cached[1].copy()
                continue
            image_u = load_image(u.files[index], "L", frame=index)
            image_v = load_image(v.files[index], "L", frame=index)
            if image_u.shape != image_v.shape:
                raise DataError(
                    f"The flow images {u.files[index]} and {v.files[index]} differ in size "
                    f"({image_u.shape[1]}x{image_u.shape[0]} and "
                    f"{image_v.shape[1]}x{image_v.shape[0]}).",
                    "Extract the flow of this video again.",
                )
            image = np.stack([image_u, image_v], axis=-1)
            cached = (index, image)
            yield frame, image


# -- TV-L1 flow from rgb frames ---------------------------------------------------------------


def _opencv_tvl1() -> Any:
    """OpenCV contrib's Dual TV-L1 with its default parameters, or a DataError saying why not."""
    cv2 = require("cv2")
    optflow = getattr(cv2, "optflow", None)
    if optflow is None or not hasattr(optflow, "DualTVL1OpticalFlow_create"):
        raise DataError(
            "Computing TV-L1 flow needs OpenCV's contrib modules (cv2.optflow), which this OpenCV "
            "lacks.",
            "pip uninstall opencv-python opencv-python-headless; "
            f"pip install opencv-contrib-python-headless (or: {install_extra('video')})",
        )
    return optflow.DualTVL1OpticalFlow_create()


class TVL1FlowReader:
    """TV-L1 optical flow computed from an rgb reader, as `(H, W, 2)` uint8 (u, v) images.

    Frames are turned grey and resized (area interpolation, aspect kept) to `height` rows when
    given; flow runs with OpenCV contrib's `DualTVL1OpticalFlow_create()` defaults; each component
    is clipped to +-20 and scaled to 0..255 (`flow_to_image`). Keyed frame n holds the flow from
    frame n - 1 to frame n, so it never sees a frame after n (anticipation must not); frame 1 has
    no earlier frame and gets zero motion (128 everywhere). A sparse read asks the rgb reader for
    frame n - 1 as well as n.
    """

    def __init__(self, rgb: FrameReader, *, height: int | None = DEFAULT_FLOW_HEIGHT) -> None:
        if height is not None and height < 8:
            raise ValueError(f"height must be at least 8 rows, got {height}")
        self.rgb = rgb
        self.name = rgb.name
        self.height = height
        self._tvl1: Any = None

    def frame_count(self) -> int | None:
        """The rgb reader's frame count: one flow image per rgb frame."""
        return self.rgb.frame_count()

    def _grey(self, image: np.ndarray) -> np.ndarray:
        cv2 = require("cv2")
        grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        if self.height is not None and grey.shape[0] != self.height:
            width = max(1, round(grey.shape[1] * self.height / grey.shape[0]))
            grey = cv2.resize(grey, (width, self.height), interpolation=cv2.INTER_AREA)
        return grey

    def flow(self, earlier: np.ndarray, later: np.ndarray) -> np.ndarray:
        """TV-L1 flow from one grey frame to the next, `(H, W, 2)` float32 in pixels."""
        if self._tvl1 is None:
            self._tvl1 = _opencv_tvl1()
        return self._tvl1.calc(earlier, later, None)

    def read(self, wanted: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(frame, (H, W, 2) uint8 (u, v))` for each wanted frame (all when None)."""
        frames = wanted_frames(wanted)
        if frames == []:
            return
        targets = None if frames is None else set(frames)
        request = None
        if frames is not None:
            request = sorted({f - 1 for f in frames if f > 1} | set(frames))
        if self._tvl1 is None:
            self._tvl1 = _opencv_tvl1()
        previous: tuple[int, np.ndarray] | None = None
        for frame, image in self.rgb.read(request):
            grey = self._grey(image)
            if targets is None or frame in targets:
                if frame == 1:
                    motion = np.full((*grey.shape, 2), 128, dtype=np.uint8)
                elif previous is not None and previous[0] == frame - 1:
                    if previous[1].shape != grey.shape:
                        raise DataError(
                            f"Frames {frame - 1} and {frame} of {self.name} differ in size "
                            f"({previous[1].shape[1]}x{previous[1].shape[0]} and "
                            f"{grey.shape[1]}x{grey.shape[0]} after resizing).",
                            "Flow needs frames of one size: re-extract the frames of this video.",
                        )
                    motion = flow_to_image(self.flow(previous[1], grey))
                else:
                    raise DataError(
                        f"Frame {frame - 1} of {self.name} was not read, so the flow of frame "
                        f"{frame} cannot be computed.",
                        "The frames of this video are incomplete: extract them again.",
                    )
                yield frame, motion
            previous = (frame, grey)
