"""The videos of one `sfr features` run: found in the user's folders, filtered, sharded, openable.

rgb reads frame folders or video files (`--videos`); flow reads existing flow frames
(`--flow-frames`) or computes TV-L1 flow from the videos; obj reads per-video detection files
(`--detections`). Each becomes a `VideoJob` whose reader is opened in a worker thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sfr.errors import ConfigError
from sfr.features.detections import DetectionsReader, discover_detections
from sfr.features.extract import VideoJob
from sfr.features.flow import FlowFrameReader, TVL1FlowReader, discover_flow_videos
from sfr.features.plan import shard_of
from sfr.features.sources import FrameReader, VideoInput, discover_videos, open_frames


@dataclass(frozen=True)
class InputOptions:
    """Where the inputs are and how to read them (the command line's input options)."""

    videos: Path | None = None
    flow_frames: Path | None = None
    detections: Path | None = None
    names: Sequence[str] | None = None
    shard: tuple[int, int] | None = None
    flow_stride: int = 1
    flow_height: int | None = 256
    classes: int = 352
    class_offset: int = 0
    backend: str = "pyav"
    source_fps: float | None = None  # frame folders / detection files not at 30 fps


def video_jobs(modality: str, options: InputOptions) -> list[VideoJob]:
    """The jobs of a run, sorted by video name, restricted to `names` and to the shard.

    Raises ConfigError when the modality's input folder is not given, DataError when a folder is
    missing, empty, or holds two videos of the same name.
    """
    names = list(options.names) if options.names else None
    if options.source_fps is not None and not 0 < options.source_fps < math.inf:
        raise ConfigError(
            f"--source-fps {options.source_fps:g} is not a frame rate: give a finite number above 0."
        )
    if options.backend not in ("pyav", "torchcodec"):
        raise ConfigError(f"--backend {options.backend}: unknown decoder; one of pyav, torchcodec.")
    if modality == "obj":
        if options.detections is None:
            raise ConfigError(
                "Object features are made from detections: pass --detections DIR "
                "(one .npy file per video)."
            )
        inputs = shard_of(discover_detections(options.detections, names=names), options.shard)
        return [_job(v, lambda v=v: _detections(v, options)) for v in inputs]
    if modality == "flow" and options.flow_frames is not None:
        inputs = shard_of(discover_flow_videos(options.flow_frames, names=names), options.shard)
        return [
            _job(v, lambda v=v: FlowFrameReader(v.path, name=v.name, stride=options.flow_stride))
            for v in inputs
        ]
    if options.videos is None:
        where = "--videos DIR (frame folders or video files)"
        if modality == "flow":
            where += " to compute TV-L1 flow, or --flow-frames DIR"
        raise ConfigError(f"No input for {modality} features: pass {where}.")
    inputs = shard_of(discover_videos(options.videos, names=names), options.shard)
    if options.backend == "torchcodec" and any(v.kind == "video" for v in inputs):
        from sfr.features.video_torchcodec import load_torchcodec

        load_torchcodec()  # before any store exists: say now if it cannot load
    if modality == "flow":
        return [
            _job(
                v,
                lambda v=v: TVL1FlowReader(_frames(v, options), height=options.flow_height),
                options.backend,
            )
            for v in inputs
        ]
    return [_job(v, lambda v=v: _frames(v, options), options.backend) for v in inputs]


def _job(video: VideoInput, open_reader, decoder: str | None = None) -> VideoJob:  # type: ignore[no-untyped-def]
    """A job; `decoder` (the video backend) is recorded only for video files."""
    decoder = decoder if video.kind == "video" else None
    return VideoJob(name=video.name, open=open_reader, source=str(video.path), decoder=decoder)


def _frames(video: VideoInput, options: InputOptions) -> FrameReader:
    return open_frames(video, backend=options.backend, folder_fps=options.source_fps)


def _detections(video: VideoInput, options: InputOptions) -> DetectionsReader:
    return DetectionsReader(
        video.path,
        name=video.name,
        classes=options.classes,
        class_offset=options.class_offset,
        source_fps=options.source_fps,
    )
