"""Where `sfr features` gets its frames: discovery of a user's inputs and frame readers.

Every public feature store keys frames by their number at 30 fps, 1-based (DESIGN §7: the RU-LSTM
authors re-encoded every video to 30 fps before extracting). The readers here hand out frames
already numbered that way:

- an EPIC-KITCHENS frame folder (`P01_01/frame_0000000001.jpg`, ..., as published for EK55 and
  EK100, where EPIC-100 nests them as `P01/rgb_frames/P01_01/`), read with pillow;
- a video file, decoded with PyAV (`sfr.features.video`) or torchcodec
  (`sfr.features.video_torchcodec`) and re-timed to a constant 30 fps.

Optical flow (`sfr.features.flow`) and object detections (`sfr.features.detections`) have their
own readers with the same `read(wanted)` shape.

PyAV, OpenCV and pillow are optional dependencies (extra `sfr[video]`); they are imported inside
functions through `require`, so that `sfr` imports without them.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Literal, Protocol

import numpy as np

from sfr.errors import DataError, install_extra
from sfr.files import missing_reason

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v"})
"""File name endings (compared in lower case) that `discover_videos` takes for video files."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

RGB_FRAME_PREFIXES = frozenset({"frame", "img"})
"""Prefixes of rgb frame files: EPIC's `frame_0000000001.jpg`, dense_flow / TSN's `img_00001.jpg`."""

FLOW_COMPONENT_PAIRS = (("u", "v"), ("flow_x", "flow_y"), ("x", "y"))
"""Sub-folder pairs holding the two flow components of one video (EPIC: u/v; TSN: flow_x/flow_y)."""

# `prefix_000123.jpg`: the prefix may itself contain underscores (`flow_x_00001.jpg`).
_NUMBERED = re.compile(r"^(?P<prefix>[A-Za-z][A-Za-z_]*?)_(?P<digits>\d+)\.(?:jpe?g|png)$", re.I)

_PACKAGES = {
    "av": "PyAV (the `av` package)",
    "cv2": "OpenCV with its contrib modules (the `opencv-contrib-python-headless` package)",
    "PIL": "pillow (the `pillow` package)",
    "torchcodec": "torchcodec (the `torchcodec` package)",
}

InputKind = Literal["frames", "video", "flow", "detections"]


@dataclass(frozen=True)
class VideoInput:
    """One video of a user's input.

    `name` is the video id used in feature keys (the folder name or the file stem, e.g.
    `P01_01`); `path` the frame folder, video file, flow folder or detections file; `kind` says
    which of those it is.
    """

    name: str
    path: Path
    kind: InputKind


class FrameReader(Protocol):
    """Frames of one video, numbered at 30 fps from 1.

    `read` yields `(frame, image)` in ascending frame order: for each wanted frame, or for every
    frame when `wanted` is None. Images are `(H, W, 3)` uint8 RGB for rgb readers and `(H, W, 2)`
    uint8 `(u, v)` for flow readers. Frames past the end of the video are not yielded (the caller
    notices). `frame_count` is exact for frame folders and an estimate for videos
    (duration x 30, rounded), or None when unknown.
    """

    name: str

    def frame_count(self) -> int | None: ...

    def read(self, wanted: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]: ...


def require(module: str, extra: str = "video") -> ModuleType:
    """Import an optional dependency, or raise a DataError saying how to install it.

    `module` is the import name (`av`, `cv2`, `PIL`); `extra` the `sfr` extra that brings it.
    A package that is installed but fails to load (a missing shared library) is reported too.
    """
    label = _PACKAGES.get(module.partition(".")[0], f"the `{module}` package")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        reason = "it is not installed" if isinstance(error, ModuleNotFoundError) else str(error)
        raise DataError(
            f"This step needs {label} ({reason}).",
            f"Install the optional dependencies with: {install_extra(extra)}",
        ) from None
    except OSError as error:  # an installed package whose compiled library cannot load
        raise DataError(
            f"This step needs {label}, which is installed but cannot load: {error}.",
            f"Reinstall it with: {install_extra(extra).replace('install', 'install --force-reinstall', 1)}",
        ) from None


def wanted_frames(wanted: Iterable[int] | None) -> list[int] | None:
    """`wanted` as a sorted list of distinct frame numbers (None stays None: every frame).

    Readers yield each distinct wanted frame once, in ascending order, whatever order they
    were asked in. A frame number below 1 is a programming error (ValueError).
    """
    if wanted is None:
        return None
    frames = sorted({int(frame) for frame in wanted})
    if frames and frames[0] < 1:
        raise ValueError(f"frame numbers start at 1, got {frames[0]}")
    return frames


def as_fraction(value: float | Fraction) -> Fraction:
    """A frame rate as an exact fraction (30.0 -> 30, 29.97 -> 2997/100)."""
    if isinstance(value, Fraction):
        return value
    if not value > 0:
        raise ValueError(f"a frame rate must be positive, got {value}")
    return Fraction(str(value)).limit_denominator(1_000_000)


# -- numbered image files ----------------------------------------------------------------------


@dataclass(frozen=True)
class NumberedImages:
    """The image files `PREFIX_NNN.jpg` of one folder with one prefix, by number.

    `files[n]` is the file of number n (1-based in every published layout).
    """

    folder: Path
    prefix: str
    files: dict[int, Path]

    @property
    def last(self) -> int:
        return max(self.files) if self.files else 0

    def first_missing(self, last: int | None = None) -> Path | None:
        """The file of the first number in 1..`last` (default: the highest) that is absent.

        Its name copies the digit width and extension of the next file present, so that the
        message names the file the user would look for.
        """
        last = self.last if last is None else last
        numbers = sorted(self.files)
        for expected, number in enumerate(numbers, start=1):
            if number != expected:
                return _sibling_name(self.files[number], expected)
        if len(numbers) < last:
            model = self.files[numbers[-1]] if numbers else None
            missing = len(numbers) + 1
            if model is None:
                return self.folder / f"{self.prefix}_{missing:010d}.jpg"
            return _sibling_name(model, missing)
        return None


def _sibling_name(model: Path, number: int) -> Path:
    match = _NUMBERED.match(model.name)
    assert match is not None
    digits = match.group("digits")
    name = f"{match.group('prefix')}_{number:0{len(digits)}d}{model.suffix}"
    return model.with_name(name)


def numbered_images(folder: Path) -> dict[str, NumberedImages]:
    """The numbered image files directly in `folder`, grouped by prefix (`frame`, `flow_x`, ...).

    Two files with the same prefix and number (`frame_1.jpg` and `frame_0000000001.jpg`, or a
    .jpg and a .png) are an error naming both.
    """
    groups: dict[str, dict[int, Path]] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError as error:
        raise DataError(
            f"Cannot list the folder {folder}: {error.strerror or error}.",
            "Check that the folder exists and that you can read it.",
        ) from None
    for entry in entries:
        match = _NUMBERED.match(entry.name)
        if match is None:
            continue
        files = groups.setdefault(match.group("prefix"), {})
        number = int(match.group("digits"))
        path = Path(entry.path)
        if number in files:
            raise DataError(
                f"Two files hold frame {number} in {folder}: {files[number].name} and {path.name}.",
                "Keep one numbering (EPIC: frame_0000000001.jpg) and remove the other files.",
            )
        files[number] = path
    return {prefix: NumberedImages(Path(folder), prefix, files) for prefix, files in groups.items()}


def rgb_frame_files(folder: Path) -> NumberedImages | None:
    """The rgb frame files of a folder (`frame_*.jpg` or `img_*.jpg`), or None when it has none."""
    groups = {p: g for p, g in numbered_images(folder).items() if p.lower() in RGB_FRAME_PREFIXES}
    return one_numbering(
        groups,
        f"The frame folder {folder} mixes frame files named",
        "Keep the frames of one video in one numbering (EPIC: frame_0000000001.jpg).",
    )


def one_numbering(
    groups: dict[str, NumberedImages], message: str, hint: str
) -> NumberedImages | None:
    """The only numbering in `groups` (None if empty); DataError `message PREFIX_* and ...`."""
    if len(groups) > 1:
        raise DataError(
            f"{message} " + " and ".join(f"{prefix}_*" for prefix in sorted(groups)) + ".", hint
        )
    return next(iter(groups.values()), None)


def is_rgb_frame_name(name: str) -> bool:
    """Whether a file name is that of an rgb frame (`frame_0000000001.jpg`, `img_00001.png`)."""
    match = _NUMBERED.match(name)
    return match is not None and match.group("prefix").lower() in RGB_FRAME_PREFIXES


def load_image(path: Path, mode: Literal["RGB", "L"], *, frame: int | None = None) -> np.ndarray:
    """Decode one image file with pillow: `(H, W, 3)` uint8 for mode "RGB", `(H, W)` for "L"."""
    require("PIL")
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.array(image.convert(mode))  # a writable copy (asarray is read-only)
    except FileNotFoundError:
        what = f"Frame {frame} ({path})" if frame is not None else f"The image {path}"
        raise DataError(
            f"{what} does not exist.",
            "The frame folder changed while it was read; extract its frames again.",
        ) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        what = f"frame {frame} ({path})" if frame is not None else f"the image {path}"
        raise DataError(
            f"Cannot decode {what}: {error}.",
            "The file is damaged or not an image: extract the frames of this video again.",
        ) from None


# -- discovery --------------------------------------------------------------------------------


def walk_folders(
    root: Path, *, leaf: Callable[[str], bool] | None = None
) -> Iterator[tuple[Path, list[str], list[str]]]:
    """The folders under `root` (itself first), depth first in sorted order, like `os.walk`.

    Yields `(folder, sub-folder names, file names)`, both sorted; the caller may prune the
    sub-folder list in place to skip them. Links are followed but no folder is visited twice;
    hidden entries (a leading dot) are skipped. When `leaf(file name)` holds for a file, the
    folder is a leaf: listing stops there and it is yielded without sub-folders, with the files
    seen so far, so that discovering 700 EPIC frame folders does not list their 20 million
    frames. A folder that cannot be listed is a DataError.
    """
    seen: set[tuple[int, int]] = set()
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        try:
            stat = os.stat(folder)
        except OSError:
            continue  # a dangling link
        if (stat.st_dev, stat.st_ino) in seen:
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs: list[str] = []
        files: list[str] = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        continue
                    if is_dir:
                        dirs.append(entry.name)
                        continue
                    files.append(entry.name)
                    if leaf is not None and leaf(entry.name):
                        dirs = []
                        break
        except OSError as error:
            raise DataError(
                f"Cannot list the folder {folder}: {error.strerror or error}.",
                "Check that you can read it, or point at a folder without it.",
            ) from None
        dirs.sort()
        files.sort()
        yield folder, dirs, files
        stack.extend(folder / name for name in reversed(dirs))


def check_root(root: Path, what: str) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"The {what} folder {root} does not exist.",
            "Check the path you gave.",
        )
    return root


def select_inputs(
    found: list[VideoInput], names: Sequence[str] | None, root: Path, what: str
) -> list[VideoInput]:
    """Sort by name, refuse duplicate names, and keep only `names` when given.

    `what` names the kind of input in messages ("videos", "flow videos", ...).
    """
    by_name: dict[str, VideoInput] = {}
    for item in sorted(found, key=lambda v: (v.name, str(v.path))):
        if item.name in by_name:
            other = by_name[item.name]
            raise DataError(
                f"Two inputs are named '{item.name}' under {root}: {other.path} and {item.path}.",
                "Video names become feature keys and must be unique: remove or rename one, or "
                "point at a narrower folder.",
            )
        by_name[item.name] = item
    if not by_name:
        raise DataError(f"No {what} found under {root}.", _FOUND_NOTHING_HINTS[what])
    if names is None:
        return list(by_name.values())
    unknown = [name for name in names if name not in by_name]
    if unknown:
        available = sorted(by_name)
        shown = ", ".join(available[:5]) + (", ..." if len(available) > 5 else "")
        raise DataError(
            f"No {what} named {', '.join(repr(n) for n in unknown[:5])} under {root}.",
            f"Available: {shown} ({len(available)} in all).",
        )
    return [by_name[name] for name in dict.fromkeys(names)]


_FOUND_NOTHING_HINTS = {
    "videos": "Give a folder holding video files ("
    + ", ".join(sorted(VIDEO_SUFFIXES))
    + ") or EPIC frame folders (VIDEO/frame_0000000001.jpg, ...).",
    "flow videos": "Give a folder holding flow frames: VIDEO/u/frame_0000000001.jpg with "
    "VIDEO/v/..., VIDEO/flow_x/ with VIDEO/flow_y/, or VIDEO/flow_x_00001.jpg with flow_y_ files.",
    "detection files": "Give a folder holding one detections file per video (P01_01.npy).",
}


def _is_flow_component(folder: Path) -> bool:
    """Whether a frame folder is one component of a flow video (`u` beside `v`, ...)."""
    for first, second in FLOW_COMPONENT_PAIRS:
        partner = {first: second, second: first}.get(folder.name)
        if partner is not None and (folder.parent / partner).is_dir():
            return True
    return False


def discover_videos(root: Path, *, names: Sequence[str] | None = None) -> list[VideoInput]:
    """The videos under `root`: video files and EPIC-style frame folders, found recursively.

    A video file ends in .mp4 .avi .mkv .mov .webm .m4v (any case) and is named by its stem; a
    frame folder directly holds `frame_0000000001.jpg`, ... (other digit widths, `img_` and .png
    are accepted too) and is named by the folder, so EPIC-100's `P01/rgb_frames/P01_01/` gives
    `P01_01`. Folders that are one half of a flow video (`u` beside `v`, `flow_x` beside `flow_y`)
    are not rgb videos and are skipped. A frame folder is not searched further (nor listed in
    full: video files or folders inside it are ignored). `root` may also be a single video file
    or frame folder.
    Sorted by name; two inputs with the same name are an error naming both paths; `names`
    keeps only those videos (an unknown name is an error listing a few available ones).
    """
    root = check_root(root, "video")
    found: list[VideoInput] = []
    if root.is_file():
        if root.suffix.lower() not in VIDEO_SUFFIXES:
            raise DataError(
                f"{root} is not a video file (expected one of {', '.join(sorted(VIDEO_SUFFIXES))}).",
                "Give a video file or a folder of videos or frame folders.",
            )
        found.append(VideoInput(root.stem, root, "video"))
    else:
        for folder, _dirs, files in walk_folders(root, leaf=is_rgb_frame_name):
            if any(map(is_rgb_frame_name, files)):
                # a frame folder holds frames, not more videos (its listing stopped at a frame)
                if not _is_flow_component(folder):
                    found.append(VideoInput(folder.name, folder, "frames"))
                continue
            for file in files:
                path = folder / file
                if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
                    found.append(VideoInput(path.stem, path, "video"))
    return select_inputs(found, names, root, "videos")


# -- readers ----------------------------------------------------------------------------------


def open_frames(
    video: VideoInput,
    *,
    fps: float = 30.0,
    backend: str = "pyav",
    folder_fps: float | None = None,
) -> FrameReader:
    """A reader of the rgb frames of `video`, numbered at `fps` (30 for every public store).

    A frame folder gives a `FrameFolderReader` (its frames taken to be at `folder_fps`, by default
    already at `fps`); a video file a `VideoFileReader` (PyAV) or, with `backend="torchcodec"`, a
    `TorchCodecVideoReader`, both re-timed to `fps` by the same rule.
    """
    if video.kind == "frames":
        return FrameFolderReader(video.path, name=video.name, fps=fps, source_fps=folder_fps)
    if video.kind == "video":
        if backend == "pyav":
            from sfr.features.video import VideoFileReader

            return VideoFileReader(video.path, name=video.name, fps=fps)
        if backend == "torchcodec":
            from sfr.features.video_torchcodec import TorchCodecVideoReader

            return TorchCodecVideoReader(video.path, name=video.name, fps=fps)
        raise DataError(
            f"Unknown video backend '{backend}' for {video.path}.",
            "Choose the backend pyav (the default) or torchcodec.",
        )
    raise ValueError(
        f"open_frames reads rgb frame folders and videos, not {video.kind!r} inputs; "
        "use sfr.features.flow.FlowFrameReader or sfr.features.detections.DetectionsReader"
    )


def retimed_index(frame: int, fps: Fraction, source_fps: Fraction) -> int:
    """The source frame (1-based, at `source_fps`) on screen at keyed frame `frame` (at `fps`).

    The frame on screen at t = (frame - 1) / fps is the last one starting at or before t:
    floor(t * source_fps) + 1. Same rule as the video re-timing (`sfr.features.video`).
    """
    return (frame - 1) * source_fps // fps + 1


def retimed_count(count: int, fps: Fraction, source_fps: Fraction) -> int:
    """Keyed frames (at `fps`) of `count` source frames at `source_fps`: the n with
    (n - 1) / fps < count / source_fps, when the last source frame stops showing."""
    if source_fps == fps:
        return count
    end = Fraction(count) / source_fps
    return int(-(-end * fps // 1))  # ceil(end * fps)


class FrameFolderReader:
    """The frames of an EPIC frame folder (`frame_%010d.jpg`, 1-based), decoded with pillow.

    Other digit widths (`frame_00001.jpg`), `img_` names and .png files are accepted. The frames
    are taken to be numbered at `fps` already (the published EPIC frame folders of RU-LSTM's
    features are); when `source_fps` differs (a folder extracted at 60 fps), keyed frame n shows
    the folder frame on screen at (n - 1) / fps, as for videos. A gap in the numbering (or a first
    frame other than 1) is an error naming the first missing file, raised before any frame is
    read; an unreadable image is an error naming the file and frame.
    """

    def __init__(
        self,
        folder: Path,
        *,
        name: str,
        fps: float = 30.0,
        source_fps: float | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.name = name
        self.fps = as_fraction(fps)
        self.source_fps = self.fps if source_fps is None else as_fraction(source_fps)
        self._images: NumberedImages | None = None

    def _frames(self) -> NumberedImages:
        if self._images is None:
            if not self.folder.is_dir():
                raise DataError(
                    f"The frame folder {self.folder} {missing_reason(self.folder, 'folder')}.",
                    "Check the path of the frames of this video.",
                )
            images = rgb_frame_files(self.folder)
            if images is None or not images.files:
                raise DataError(
                    f"The frame folder {self.folder} holds no frame files (frame_0000000001.jpg).",
                    "Extract the frames of this video, or remove the empty folder.",
                )
            missing = images.first_missing()
            if missing is not None:
                raise DataError(
                    f"Frame file {missing} is missing from the frame folder of {self.name} "
                    f"(frames run up to {images.last}).",
                    "Extract the frames of this video again: a gap in the numbering would shift "
                    "every later frame.",
                )
            self._images = images
        return self._images

    def frame_count(self) -> int:
        """The number of keyed frames (exact): the folder's frames, re-timed to `fps` if needed."""
        return retimed_count(self._frames().last, self.fps, self.source_fps)

    def read(self, wanted: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(frame, (H, W, 3) uint8 RGB)` for each wanted frame (all when None)."""
        images = self._frames()
        count = self.frame_count()
        frames = wanted_frames(wanted)
        numbers: Iterable[int] = range(1, count + 1) if frames is None else frames
        cached: tuple[int, np.ndarray] | None = None
        for frame in numbers:
            if frame > count:
                return
            index = frame
            if self.source_fps != self.fps:
                index = retimed_index(frame, self.fps, self.source_fps)
            if cached is not None and cached[0] == index:
                yield frame, cached[1].copy()
                continue
            image = load_image(images.files[index], "RGB", frame=index)
            cached = (index, image)
            yield frame, image
