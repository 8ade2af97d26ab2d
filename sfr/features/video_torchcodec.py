"""Video files decoded with torchcodec, re-timed to a constant 30 fps by the same rule as PyAV's.

torchcodec (the PyTorch project's decoder, C++ over the system's FFmpeg 4-8) decodes a batch of
frames in one call. It is an optional backend (`sfr features ... --backend torchcodec`); PyAV
(`sfr.features.video`) stays the default: its wheels bundle FFmpeg, it reads every file FFmpeg
can, and on CPU it measured faster (see the README), while torchcodec needs FFmpeg installed on
the system and the release built for the installed torch (torchcodec 0.13 for torch 2.13).

Both backends give the picture of `ffmpeg -i VIDEO`: every keyed frame shows the same source
frame (the rule of `sfr.features.video`: keyed frame n, 1-based, shows the last frame whose
timestamp is at or before (n - 1) / 30 s after the first frame, a timestamp within half a tick,
at most 1 ms, of an output time counting as on time; the video has the frames n with
(n - 1) / 30 < end), converted to RGB by FFmpeg and turned upright by the display matrix. The
timestamps come from the container's packets, exact (fractions of the stream's time base), read
with PyAV's demuxer, which decodes nothing; packets an edit list discards are not frames.
torchcodec then decodes the chosen source frames by their index in presentation order, and each
frame it returns must carry the timestamp expected, else the video is refused (a DataError
pointing to the default backend) rather than shown differently.

Where the two differ: a file whose timestamps go back in presentation order (broken muxing) is
placed by sorted time here, by arrival in PyAV's reader; a file torchcodec cannot decode to its
end (an AVI with packed B-frames, as DivX wrote them) is refused here and read by PyAV.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from sfr.errors import DataError
from sfr.features.sources import as_fraction, require, wanted_frames
from sfr.features.video import (
    check_complete,
    declared_duration,
    default_frame_duration,
    ffmpeg_reason,
)
from sfr.files import missing_reason

BATCH_FRAMES = 32
"""Source frames decoded per torchcodec call (bounds memory on long videos)."""

_MAX_TOLERANCE = Fraction(1, 1000)

_HINT = (
    "The file is damaged, truncated or not a video: re-download it, or re-encode it with "
    "ffmpeg -i VIDEO -c:v libx264 -pix_fmt yuv420p OUT.mp4"
)
_TORCHCODEC_HINT = (
    "Decode this video with the default backend (drop --backend torchcodec), which reads every "
    "file FFmpeg can; if that fails too, the file is damaged"
)
_SOURCE_LOCATION = re.compile(r"^\w+, \S+\.(?:cpp|h):\d+, ")


@dataclass(frozen=True)
class Timeline:
    """The presentation times of a video's frames, exact, from its packets.

    `times` are seconds after the first frame, ascending (presentation order, the order of
    torchcodec's frame indices); `end` is when the last frame stops showing; `tolerance` is how
    early a timestamp may be stamped (half a tick of the stream's time base, at most 1 ms);
    `start` is the first frame's own timestamp. Packets an edit list discards (the frames before
    the cut of a trimmed mp4, which decoders drop too) are not frames.
    """

    times: tuple[Fraction, ...]
    end: Fraction
    tolerance: Fraction
    start: Fraction = Fraction(0)  # timestamp of the first frame in the container, seconds

    def frame_count(self, fps: Fraction) -> int:
        """Keyed frames at `fps`: the n >= 1 with (n - 1) / fps < end."""
        return math.ceil(self.end * fps) if self.end > 0 else 0

    def source_of(self, frame: int, fps: Fraction) -> int:
        """The 0-based source frame on screen at keyed frame `frame` (1-based, at `fps`)."""
        due = Fraction(frame - 1) / fps + self.tolerance
        return max(bisect.bisect_right(self.times, due) - 1, 0)  # last time at or before due


def read_timeline(path: Path) -> Timeline:
    """The exact frame times of the first video stream of `path` (module docstring).

    Raises DataError when the file cannot be opened or read, has no video stream, or has a frame
    without a timestamp (then only the PyAV backend, which decodes, can place it).
    """
    av = require("av")
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise DataError(f"Cannot open the video {path}: {ffmpeg_reason(error)}.", _HINT) from None
    try:
        if not container.streams.video:
            raise DataError(
                f"The file {path} has no video stream.",
                "Give a video file with a picture track (an audio-only file cannot be read).",
            )
        stream = container.streams.video[0]
        base = Fraction(stream.time_base) if stream.time_base else None
        if base is None:
            raise DataError(f"The video {path} has no time base.", _HINT)
        default = default_frame_duration(stream, Fraction(30))
        stamps: list[tuple[int, Fraction]] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:
                    continue  # the end-of-stream marker; frames before an edit list's cut
                if packet.pts is None:
                    raise DataError(
                        f"The video {path} has a frame without a timestamp, which the torchcodec "
                        "backend cannot place.",
                        _TORCHCODEC_HINT,
                    )
                duration = packet.duration * base if packet.duration else default
                stamps.append((packet.pts, duration))
        except (av.error.FFmpegError, OSError, ValueError) as error:
            raise DataError(
                f"Cannot read the video {path}: {ffmpeg_reason(error)}.", _HINT
            ) from None
        declared = declared_duration(container, stream)
    finally:
        container.close()
    if not stamps:
        raise DataError(f"The video {path} has no frame.", _HINT)
    stamps.sort(key=lambda stamp: stamp[0])
    origin = stamps[0][0] * base
    times = tuple(pts * base - origin for pts, _ in stamps)
    end = times[-1] + stamps[-1][1]
    check_complete(path, end, declared)
    return Timeline(times=times, end=end, tolerance=min(base / 2, _MAX_TOLERANCE), start=origin)


class TorchCodecVideoReader:
    """The frames of a video file, decoded with torchcodec and re-timed to `fps`.

    Same interface and the same frames shown as `sfr.features.video.VideoFileReader`: `read`
    yields `(frame, (H, W, 3) uint8 RGB)`; `frame_count` is exact (from the packets' timestamps).
    A missing torchcodec, or one that cannot load (no system FFmpeg, a release built for another
    torch), is a DataError saying so; an undecodable file a DataError naming it.
    """

    def __init__(self, path: Path, *, name: str, fps: float = 30.0) -> None:
        self.path = Path(path)
        self.name = name
        self.fps = as_fraction(fps)
        self._timeline: Timeline | None = None

    def timeline(self) -> Timeline:
        if not self.path.is_file():
            raise DataError(
                f"The video file {self.path} {missing_reason(self.path)}.",
                "Check the path of this video.",
            )
        if self._timeline is None:
            self._timeline = read_timeline(self.path)
        return self._timeline

    def frame_count(self) -> int | None:
        """The number of keyed frames at `fps` (exact)."""
        return self.timeline().frame_count(self.fps)

    def read(self, wanted: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(frame, (H, W, 3) uint8 RGB)` for each wanted keyed frame (all when None).

        Frames past the end of the video are not yielded.
        """
        frames = wanted_frames(wanted)
        if frames == []:
            return
        timeline = self.timeline()
        count = timeline.frame_count(self.fps)
        keyed = list(range(1, count + 1)) if frames is None else [f for f in frames if f <= count]
        if not keyed:
            return
        decoder = self._decoder(len(timeline.times))
        sources = [timeline.source_of(frame, self.fps) for frame in keyed]  # non-decreasing
        distinct = sorted(set(sources))
        position = 0
        for start in range(0, len(distinct), BATCH_FRAMES):  # one torchcodec call per batch
            batch = distinct[start : start + BATCH_FRAMES]
            end = bisect.bisect_right(sources, batch[-1])  # the keyed frames showing them
            label = f"{keyed[position]}-{keyed[end - 1]}" if end - position > 1 else keyed[position]
            images = self._decode(decoder, batch, label, timeline)
            row = {source: index for index, source in enumerate(batch)}
            for frame, source in zip(keyed[position:end], sources[position:end], strict=True):
                yield frame, images[row[source]].copy()
            position = end

    def _decoder(self, frames: int) -> Any:
        decoders = load_torchcodec()
        try:
            decoder = decoders.VideoDecoder(
                str(self.path), dimension_order="NHWC", seek_mode="exact", num_ffmpeg_threads=0
            )
        except (RuntimeError, ValueError, OSError) as error:
            raise DataError(
                f"torchcodec cannot open the video {self.path}: {torchcodec_reason(error)}.",
                _TORCHCODEC_HINT,
            ) from None
        if len(decoder) != frames:
            raise DataError(
                f"The video {self.path} has {frames} frames in its container but torchcodec "
                f"decodes {len(decoder)}.",
                _TORCHCODEC_HINT,
            )
        return decoder

    def _decode(
        self, decoder: Any, indices: list[int], frames: int | str, timeline: Timeline
    ) -> np.ndarray:
        try:
            batch = decoder.get_frames_at(indices)
        except (RuntimeError, ValueError, IndexError) as error:
            raise DataError(
                f"torchcodec cannot decode the video {self.path} at frames {frames}: "
                f"{torchcodec_reason(error)}.",
                _TORCHCODEC_HINT,
            ) from None
        stamps = batch.pts_seconds.tolist()
        for index, stamp in zip(indices, stamps, strict=True):
            due = timeline.start + timeline.times[index]
            if abs(stamp - float(due)) > 1e-6:
                raise DataError(
                    f"torchcodec places source frame {index} of {self.path} at {stamp:.6f} s, "
                    f"its timestamp says {float(due):.6f} s: the two backends would disagree.",
                    _TORCHCODEC_HINT,
                )
        images = batch.data.cpu().numpy()
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(
                f"torchcodec decoded {self.path} to an unexpected {images.dtype} array of shape "
                f"{images.shape}.",
                _TORCHCODEC_HINT,
            )
        return images


def torchcodec_reason(error: Exception) -> str:
    """torchcodec's error in its own words, without its C++ source location or final stop."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _SOURCE_LOCATION.sub("", text).rstrip(".")


def load_failures(error: Exception) -> str:
    """What torchcodec's import error says went wrong, in one line.

    torchcodec tries one library per FFmpeg major version and reports each failure under a
    heading `FFmpeg version N:`; the last OSError line of each section (other than its generic
    "Could not load this library") names the missing piece (`libavutil.so.59: cannot open
    shared object file`, an undefined torch symbol). Identical reasons are told once.
    """
    text = str(error)
    reasons: dict[str, list[str]] = {}
    for section in re.split(r"^FFmpeg version (?=\d+:)", text, flags=re.M)[1:]:
        version, _, body = section.partition(":")
        found = [
            line.partition(":")[2].strip()
            for line in body.splitlines()
            if line.startswith(("OSError:", "ImportError:", "RuntimeError:"))
            and "Could not load this library" not in line
        ]
        if found:
            reasons.setdefault(found[0], []).append(version)
    if not reasons:
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return first.rstrip(".:")
    return "; ".join(
        f"FFmpeg {', '.join(versions)}: {reason}" for reason, versions in reasons.items()
    )


def load_torchcodec() -> Any:
    """The `torchcodec.decoders` module, or a DataError saying why it cannot be used.

    torchcodec raises RuntimeError at import when it finds no FFmpeg 4-8 on the system or was
    built for another torch; that, a missing package and a broken install each get a message.
    """
    try:
        import torchcodec.decoders as decoders
    except ModuleNotFoundError:
        raise DataError(
            "The torchcodec video backend needs the torchcodec package: it is not installed.",
            'Install it with pip install -e ".[video,torchcodec]" in the sfr checkout (it also '
            "needs FFmpeg 4-8 on the system), or drop --backend to decode with PyAV.",
        ) from None
    except (ImportError, OSError, RuntimeError) as error:
        import torch

        raise DataError(
            f"torchcodec is installed but cannot load ({load_failures(error)}). It needs the "
            "shared libraries of FFmpeg 4-8 on the system and a torchcodec release built for "
            f"torch {torch.__version__} (torchcodec 0.13 for torch 2.13).",
            "Install FFmpeg (for example apt install ffmpeg) and the matching torchcodec "
            '(pip install -e ".[video,torchcodec]" in the sfr checkout), or drop --backend to '
            "decode with PyAV.",
        ) from None
    return decoders
