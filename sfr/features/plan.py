"""Which frames of each video get a vector: every frame (the full layout) or the sparse layout.

The sparse layout holds exactly the frames some time grids read before the annotated actions,
computed with the project's own `TimeGrid` (the published sampler's arithmetic, DESIGN §3), so a
store extracted for `0.125:24:16` serves every branch on that grid and nothing more. The full
layout holds every frame at 30 fps, or one frame per 1/fps-second bin with `--fps`.
Shards split the videos round-robin over their sorted names, the same on every machine.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypeVar

from sfr.config import BranchRunConfig, FusionRunConfig, load_config
from sfr.data.annotations import Segment, read_segments
from sfr.data.timegrid import TimeGrid
from sfr.errors import ConfigError
from sfr.files import missing_reason

T = TypeVar("T")


@dataclass(frozen=True)
class FramePlan:
    """The frames to extract: every frame (optionally subsampled) or the frames of time grids.

    `starts` maps each annotated video to the start frames (30 fps) of its actions; with `grids`
    set, a video's keyed frames are the union of `grid.frames(start)` over its actions and the
    grids. Without grids every frame is keyed, or with `subsample_fps` the first frame of each
    1/subsample_fps-second bin (frames 1, 4, 7, ... at 10 fps).
    """

    grids: tuple[TimeGrid, ...] = ()
    starts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    subsample_fps: float | None = None
    fps: float = 30.0

    def __post_init__(self) -> None:
        if self.grids and self.subsample_fps is not None:
            raise ConfigError(
                "--fps subsamples the full layout; the sparse layout (--annotations with --grids "
                "or --config) already holds only the frames the grids read.",
                "Drop --fps, or drop --annotations/--grids/--config.",
            )
        if self.subsample_fps is not None and not 0 < self.subsample_fps <= self.fps:
            raise ConfigError(
                f"--fps {self.subsample_fps:g} must be above 0 and at most {self.fps:g} "
                "(the frame rate of the keys)."
            )

    @property
    def layout(self) -> str:
        return "sparse" if self.grids else "full"

    @property
    def labels(self) -> list[str]:
        """How the record names this plan: `full`, `full@10fps` or `grid 0.125:24:16` each."""
        if self.grids:
            return [f"grid {g.alpha:g}:{g.s_enc}:{g.s_ant}" for g in self.grids]
        return ["full" if self.subsample_fps is None else f"full@{self.subsample_fps:g}fps"]

    def keyed(self, video: str) -> list[int] | None:
        """Sorted frames of `video` to extract in the sparse layout; None for the full layout.

        An unannotated video has no frame in the sparse layout (an empty list).
        """
        if not self.grids:
            return None
        return list(self._sparse_frames.get(video, ()))

    @cached_property
    def _sparse_frames(self) -> dict[str, tuple[int, ...]]:
        """Every annotated video's sparse frames, computed once per plan."""
        out = {}
        for video, starts in self.starts.items():
            frames: set[int] = set()
            for start in starts:
                for grid in self.grids:
                    read = grid.frames(start)
                    if read is not None:
                        frames.update(int(f) for f in read)
            out[video] = tuple(sorted(frames))
        return out

    def keeps(self, frame: int) -> bool:
        """Whether the full layout keeps `frame` (always, unless subsampled by --fps)."""
        if self.subsample_fps is None:
            return True
        step = self.subsample_fps / self.fps
        return frame == 1 or math.floor((frame - 1) * step) > math.floor((frame - 2) * step)


def parse_grid(text: str, fps: float = 30.0) -> TimeGrid:
    """`alpha:s_enc:s_ant` (e.g. `0.125:24:16`) → TimeGrid; ConfigError naming the bad text."""
    parts = text.split(":")
    try:
        alpha, s_enc, s_ant = float(parts[0]), int(parts[1]), int(parts[2])
        if len(parts) != 3 or alpha <= 0 or s_enc < 0 or s_ant < 1 or not math.isfinite(alpha):
            raise ValueError
    except (ValueError, IndexError):
        raise ConfigError(
            f"--grids {text!r} is not ALPHA:S_ENC:S_ANT with alpha > 0 s, S_ENC ≥ 0, S_ANT ≥ 1.",
            "For example --grids 0.125:24:16 0.5:6:4.",
        ) from None
    return TimeGrid(alpha, s_enc, s_ant, fps)


def grids_of_config(path: Path) -> tuple[list[TimeGrid], float]:
    """The time grids every branch of a branch or fusion config reads, and its frame rate."""
    import tomllib

    try:
        tree = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        tree = {}  # load_config below gives the precise message
    if "model" in tree:
        fusion = load_config(FusionRunConfig, path)
        fps = fusion.data.fps
        return [rate.grid(fps, fusion=False) for rate in fusion.model.rates], fps
    branch = load_config(BranchRunConfig, path)
    return [branch.branch.grid(branch.data.fps)], branch.data.fps


def action_starts(csvs: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Video → sorted unique action start frames over annotation CSVs (train, validation, test)."""
    starts: dict[str, set[int]] = defaultdict(set)
    for path in csvs:
        if not Path(path).is_file():
            raise ConfigError(
                f"--annotations {path} {missing_reason(Path(path))}.",
                "Pass the annotation CSV files (training.csv validation.csv ...).",
            )
        segments: list[Segment] = read_segments(Path(path))
        for segment in segments:
            starts[segment.video].add(segment.start_frame)
    return {video: tuple(sorted(frames)) for video, frames in starts.items()}


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`I/N` (1-based, e.g. `2/4`) → (I, N); ConfigError otherwise."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
        if not 1 <= index <= count:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"--shard {text!r} is not I/N with 1 ≤ I ≤ N.",
            "For example --shard 1/4 on the first of four machines, --shard 4/4 on the last.",
        ) from None
    return index, count


def shard_of(items: Sequence[T], shard: tuple[int, int] | None) -> list[T]:
    """The items of shard I of N: every N-th item of the (sorted) list, starting at item I."""
    if shard is None:
        return list(items)
    index, count = shard
    return [item for position, item in enumerate(items) if position % count == index - 1]
