"""Video files decoded with PyAV and re-timed to a constant 30 fps.

The RU-LSTM authors re-encoded every EPIC-KITCHENS video to 30 fps before extracting features,
so every public store keys frames by their number at 30 fps (DESIGN §7). A user's video at
another (or a variable) frame rate is re-timed here, without re-encoding:

    keyed frame n (1-based) shows the source frame on screen at t = (n - 1) / 30 s after the
    first frame: the last decoded frame whose timestamp is at or before t. The video lasts until
    the last frame stops showing (its timestamp plus its duration), so it has the frames n with
    (n - 1) / 30 < end: a 2 s video gives 60 frames whatever its rate.

This is the rule of FFmpeg's `fps` filter with `round=up` (`ffmpeg -vf fps=30:round=up`), checked
frame by frame against that filter in the tests: a source frame first counts at the first output
tick at or after its timestamp, so a frame is never shown before its time. (The filter's default,
`round=near`, would show a frame up to half a tick early, and `round=down` up to a whole tick.)
One refinement: containers store timestamps on a tick (1 ms in Matroska), so a frame due at
66.67 ms may be stamped 67 ms; a timestamp within half a tick (at most 1 ms) of an output time
counts as on time.

25 fps -> 30 fps shows every 5th source frame twice; 60 fps -> 30 fps shows every second source
frame. Frames are never resized. They are converted to RGB by FFmpeg's own filter
(`format=rgb24`, the conversion of `ffmpeg -i VIDEO frame_%010d.jpg`, with which the published
frames were made; PyAV's `to_ndarray` differs from it on 10-bit video) and turned upright by the
rotation a phone records in the display matrix, as `ffmpeg -i` does by default.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from sfr.errors import DataError
from sfr.features.sources import as_fraction, require, wanted_frames
from sfr.files import missing_reason

SEEK_GAP_SECONDS = Fraction(10)
"""A sparse read seeks (instead of decoding through) to a wanted frame more than this far ahead."""

_MAX_TOLERANCE = Fraction(1, 1000)

TRUNCATION_SLACK = Fraction(1, 2)
"""Seconds a video's frames may stop short of its declared duration (`check_complete`)."""

_DAMAGED_HINT = (
    "The file is damaged, truncated or not a video: re-download it, or re-encode it with "
    "ffmpeg -i VIDEO -c:v libx264 -pix_fmt yuv420p OUT.mp4"
)


class _Restart(Exception):
    """A seek landed after the wanted frame: decode again from the start, without seeking."""


class VideoFileReader:
    """The frames of a video file, decoded with PyAV and re-timed to `fps` (module docstring).

    Frames are `(H, W, 3)` uint8 RGB arrays at the video's own size. A sparse read converts to
    RGB only the frames it yields and seeks to wanted frames more than 10 s ahead; its images are
    identical to those of a full read. An undecodable file is a DataError naming it.
    """

    def __init__(self, path: Path, *, name: str, fps: float = 30.0) -> None:
        self.path = Path(path)
        self.name = name
        self.fps = as_fraction(fps)
        self._exact_count: int | None = None
        self.seeks = 0
        """How many seeks the last read did (diagnostics)."""
        self._restart_after = 0

    # -- opening ---------------------------------------------------------------------------

    def _open(self) -> tuple[Any, Any]:
        av = require("av")
        if not self.path.is_file():
            raise DataError(
                f"The video file {self.path} {missing_reason(self.path)}.",
                "Check the path of this video.",
            )
        try:
            container = av.open(str(self.path), mode="r")
        except (av.error.FFmpegError, OSError, ValueError) as error:
            raise DataError(
                f"Cannot open the video {self.path}: {ffmpeg_reason(error)}.", _DAMAGED_HINT
            ) from None
        if not container.streams.video:
            container.close()
            raise DataError(
                f"The file {self.path} has no video stream.",
                "Give a video file with a picture track (an audio-only file cannot be read).",
            )
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return container, stream

    def frame_count(self) -> int | None:
        """The number of 30 fps frames: exact after a full read, else duration x fps, rounded.

        None when the container records no duration.
        """
        if self._exact_count is not None:
            return self._exact_count
        container, stream = self._open()
        try:
            duration = declared_duration(container, stream)
        finally:
            container.close()
        if duration is None or duration <= 0:
            return None
        return round(duration * self.fps)

    # -- reading ---------------------------------------------------------------------------

    def read(self, wanted: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(frame, (H, W, 3) uint8 RGB)` for each wanted 30 fps frame (all when None).

        Frames past the end of the video are not yielded.
        """
        frames = wanted_frames(wanted)
        if frames == []:
            return
        self.seeks = 0
        try:
            yield from self._read(frames, allow_seek=frames is not None)
        except _Restart:
            yield from self._read(frames, allow_seek=False, after=self._restart_after)

    def _read(
        self, frames: list[int] | None, *, allow_seek: bool, after: int = 0
    ) -> Iterator[tuple[int, np.ndarray]]:
        """The re-timing loop over one opened container; frames up to `after` were yielded."""
        av = require("av")
        container, stream = self._open()
        step = 1 / self.fps
        time_base = Fraction(stream.time_base) if stream.time_base else None
        default_duration = default_frame_duration(stream, self.fps)
        if frames is not None:
            frames = [frame for frame in frames if frame > after]
        index = 0  # position in `frames` (sparse) or the next frame number - 1 (full read)

        def target() -> int | None:
            if frames is None:
                return index + 1
            return frames[index] if index < len(frames) else None

        to_rgb = RGBConverter()
        origin: Fraction | None = None
        current: Any = None  # the av.VideoFrame on screen, its time and its RGB array once made
        current_time = Fraction(0)
        current_rgb: np.ndarray | None = None
        current_duration = default_duration
        previous_time: Fraction | None = None
        awaiting_key = False  # after a seek, frames before the first key frame are dropped
        sought: int | None = None  # the wanted frame of the last seek: one seek per frame
        self._restart_after = after
        decoded = container.decode(stream)
        try:
            while True:
                try:
                    frame = next(decoded)
                except StopIteration:
                    break
                except (av.error.FFmpegError, OSError, ValueError) as error:
                    last = target()
                    where = f"before frame {last}" if last is not None else "at its end"
                    raise DataError(
                        f"Cannot decode the video {self.path} {where}: {ffmpeg_reason(error)}.",
                        _DAMAGED_HINT,
                    ) from None
                if awaiting_key and not frame.key_frame:
                    continue
                time = _frame_time(frame, time_base, previous_time, default_duration)
                previous_time = time
                if origin is None:
                    origin = time
                shown = time - origin
                tolerance = _tolerance(frame, time_base)
                if awaiting_key:
                    awaiting_key = False
                    wanted = target()
                    if wanted is not None and shown > (wanted - 1) * step + tolerance:
                        raise _Restart  # the seek overshot: decode from the start instead
                elif current is not None and shown < current_time:
                    shown = current_time  # a timestamp going back replaces the frame on screen
                # keyed frames before this one show the current frame
                while (wanted := target()) is not None and (wanted - 1) * step + tolerance < shown:
                    if current_rgb is None:
                        current_rgb = to_rgb(current)
                        image = current_rgb
                    else:
                        image = current_rgb.copy()
                    self._restart_after = wanted
                    yield wanted, image
                    index += 1
                if target() is None:
                    return
                current, current_time, current_rgb = frame, shown, None
                current_duration = _frame_duration(frame, time_base, default_duration)
                wanted = target()
                assert wanted is not None
                if (
                    allow_seek
                    and wanted != sought
                    and (wanted - 1) * step - shown > SEEK_GAP_SECONDS
                ):
                    assert origin is not None and time_base is not None
                    offset = int((origin + (wanted - 1) * step) / time_base)
                    try:
                        container.seek(offset, stream=stream, backward=True, any_frame=False)
                    except (av.error.FFmpegError, OSError, ValueError):
                        allow_seek = False  # not seekable: decode through instead
                        continue
                    self.seeks += 1
                    sought = wanted
                    decoded = container.decode(stream)
                    current, current_rgb, previous_time, awaiting_key = None, None, None, True
            if current is None:
                if awaiting_key:  # a seek went past the end: let a plain decode decide
                    raise _Restart
                if origin is None:
                    raise DataError(f"The video {self.path} has no decodable frame.", _DAMAGED_HINT)
                return
            end = current_time + current_duration
            check_complete(self.path, end, declared_duration(container, stream))
            while (wanted := target()) is not None and (wanted - 1) * step < end:
                if current_rgb is None:
                    current_rgb = to_rgb(current)
                    image = current_rgb
                else:
                    image = current_rgb.copy()
                yield wanted, image
                index += 1
            if frames is None and after == 0:
                self._exact_count = index
        finally:
            container.close()


class RGBConverter:
    """Decoded frames to `(H, W, 3)` uint8 RGB as the `ffmpeg` command line makes them.

    The pixel format is converted by FFmpeg's `format=rgb24` filter (a graph rebuilt whenever
    the size or pixel format of the frames changes), then the image is rotated upright by the
    frame's display-matrix rotation (counter-clockwise degrees, a multiple of 90), as `ffmpeg -i`
    autorotates.
    """

    def __init__(self) -> None:
        self._shape: tuple[int, int, str] | None = None
        self._graph: Any = None  # owns the filters below: it must live as long as they do
        self._source: Any = None
        self._sink: Any = None

    def __call__(self, frame: Any) -> np.ndarray:
        shape = (frame.width, frame.height, frame.format.name)
        if shape != self._shape:
            self._build(frame)
            self._shape = shape
        self._source.push(frame)
        image = self._sink.pull().to_ndarray()
        turns = round(float(getattr(frame, "rotation", 0) or 0) / 90) % 4
        return np.ascontiguousarray(np.rot90(image, turns)) if turns else image

    def _build(self, frame: Any) -> None:
        av = require("av")
        graph = av.filter.Graph()
        self._source = graph.add_buffer(
            width=frame.width,
            height=frame.height,
            format=frame.format.name,
            time_base=frame.time_base or Fraction(1, 1000),
        )
        convert = graph.add("format", "rgb24")
        self._sink = graph.add("buffersink")
        self._source.link_to(convert)
        convert.link_to(self._sink)
        graph.configure()
        self._graph = graph


def declared_duration(container: Any, stream: Any) -> Fraction | None:
    """How long the container says the video lasts (seconds): the video stream's duration, else
    the container's, else its frame count over its average rate; None when it says nothing."""
    if stream.duration is not None and stream.time_base is not None:
        return stream.duration * Fraction(stream.time_base)
    if container.duration is not None:
        return Fraction(container.duration, 1_000_000)
    if stream.frames and stream.average_rate:
        return stream.frames / Fraction(stream.average_rate)
    return None


def check_complete(path: Path, end: Fraction, declared: Fraction | None) -> None:
    """Refuse a video whose frames stop well before the duration its container declares.

    A file cut short by an interrupted copy keeps its header: FFmpeg's threaded decoder then
    simply stops at the cut, and the video would pass as a shorter one. `end` is when the last
    decoded frame stops showing, in seconds after the first; up to 0.5 s or 2% short is accepted
    (containers round durations, and an audio track may outlast the picture by a little).
    Raises DataError naming the file and both times.
    """
    if declared is None or declared <= 0:
        return
    if end < declared - max(TRUNCATION_SLACK, declared / 50):
        raise DataError(
            f"The video {path} stops at {float(end):.2f} s, but its container says it lasts "
            f"{float(declared):.2f} s: the file is truncated.",
            "Re-download or re-copy it; to keep only the frames it has, rewrite it with "
            "ffmpeg -i VIDEO -c copy FIXED.mp4",
        )


def ffmpeg_reason(error: Exception) -> str:
    """An FFmpeg error's own words ("Invalid data found when processing input")."""
    return str(getattr(error, "strerror", None) or error)


def default_frame_duration(stream: Any, fps: Fraction) -> Fraction:
    """How long a frame without a recorded duration shows: 1 / the stream's average rate."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return 1 / Fraction(rate)
    return 1 / fps


def _frame_time(
    frame: Any, time_base: Fraction | None, previous: Fraction | None, duration: Fraction
) -> Fraction:
    """A decoded frame's timestamp in seconds (exact), from its pts, else its dts, else guessed."""
    base = Fraction(frame.time_base) if frame.time_base else time_base
    for stamp in (frame.pts, frame.dts):
        if stamp is not None and base is not None:
            return stamp * base
    return Fraction(0) if previous is None else previous + duration


def _frame_duration(frame: Any, time_base: Fraction | None, default: Fraction) -> Fraction:
    base = Fraction(frame.time_base) if frame.time_base else time_base
    duration = getattr(frame, "duration", None)  # PyAV >= 13
    if duration and duration > 0 and base is not None:
        return duration * base
    return default


def _tolerance(frame: Any, time_base: Fraction | None) -> Fraction:
    """Half a timestamp tick, at most 1 ms: how early a stamp may be (rounding of the container)."""
    base = Fraction(frame.time_base) if frame.time_base else time_base
    if base is None:
        return Fraction(0)
    return min(base / 2, _MAX_TOLERANCE)
