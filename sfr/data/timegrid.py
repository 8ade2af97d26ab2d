"""The time grid of one branch: which frames it reads before an action, and which steps anticipate.

The arithmetic follows the published RU-LSTM sampler bit for bit (DESIGN §3): the public sparse
feature stores contain exactly the frames it produces and no others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

# Times (seconds) are compared after rounding, so 0.125 * 8 and 1.0 are the same time.
_TIME_DECIMALS = 6


def as_time(seconds: float) -> float:
    """Canonical float for a time in seconds, so that equal times compare and hash equal."""
    return round(float(seconds), _TIME_DECIMALS)


@dataclass(frozen=True)
class TimeGrid:
    """Observation grid of a branch: `s_enc` encoding then `s_ant` anticipation steps, `alpha` s apart.

    Step `i` (0-based, oldest first) observes the video `times[i]` seconds before the action starts;
    the last step observes it `alpha` seconds before.
    """

    alpha: float
    s_enc: int
    s_ant: int
    fps: float = 30.0

    @property
    def steps(self) -> int:
        """Total number of steps T = S_enc + S_ant."""
        return self.s_enc + self.s_ant

    @cached_property
    def offsets(self) -> np.ndarray:
        """Seconds before the action start of every step, oldest first: (T,) float64.

        The published sampler calls `np.arange(alpha, alpha * (T + 1), alpha)`, whose float stop
        yields T + 1 values for some alphas (0.2 at T = 40). numpy fills an arange as
        `start + i * step`, so the same expression over exactly T indices gives the published
        values bit for bit whenever the published call yields T of them (every binary alpha).
        """
        return (self.alpha + self.alpha * np.arange(self.steps, dtype=np.float64))[::-1]

    @cached_property
    def times(self) -> tuple[float, ...]:
        """Canonical seconds-before-action of every step, oldest first."""
        return tuple(as_time(t) for t in self.offsets)

    @property
    def anticipation_times(self) -> tuple[float, ...]:
        """Seconds before the action of the anticipation steps, oldest first (2.0, ..., 0.25)."""
        return self.times[self.s_enc :]

    @property
    def anticipation_steps(self) -> tuple[int, ...]:
        """Step indices of the anticipation steps."""
        return tuple(range(self.s_enc, self.steps))

    def step_at(self, seconds: float) -> int:
        """Index of the step that observes the video `seconds` before the action; KeyError if none."""
        return self.times.index(as_time(seconds))

    def steps_at(self, seconds: Sequence[float]) -> tuple[int, ...]:
        """Step indices of several times (see `step_at`)."""
        return tuple(self.step_at(t) for t in seconds)

    def first_full_start(self) -> int:
        """The earliest start frame at which every step reads a real frame (none padded).

        Found with the sampler's own float arithmetic, which can floor `x.0` to `x - 1`.
        """
        start = int(np.floor(self.offsets[0] * self.fps))
        while np.floor((start / self.fps - self.offsets[0]) * self.fps) < 1:
            start += 1
        return start

    def frames(self, start_frame: int) -> np.ndarray | None:
        """Frames read for an action starting at `start_frame`, oldest first; None if discarded.

        Frames before the first frame of the video (< 1) are replaced by the earliest valid frame;
        a sequence without any valid frame is discarded.
        """
        frames = np.floor((start_frame / self.fps - self.offsets) * self.fps).astype(int)
        valid = frames >= 1
        if not valid.any():
            return None
        frames[~valid] = frames[valid].min()
        return frames


Sampling = Literal["grid", "published"]


def sampled_frames(
    grids: Sequence[TimeGrid], start_frame: int, sampling: Sampling = "grid"
) -> list[np.ndarray] | None:
    """Frames each of `grids` reads for an action at `start_frame`; None if the row is discarded.

    `grid` (sfr's default): every grid samples, pads and discards on its own (`TimeGrid.frames`);
    the row is discarded if any grid has no valid frame.
    `published`: the published Slow-Fast RU-LSTM loader samples one sequence on the finest grid
    (alpha = the smallest, long enough to cover the longest grid: 40 steps of 0.125 s for the
    paper's 0.125/28 and 0.5/10 steps), pads and discards it once, and every rate takes its steps
    from it (the 0.5 s rate: every 4th step, the last one 0.5 s before the action). The frames
    differ from `grid` only where the sequence is padded, and rows are kept as long as the fine
    grid has a valid frame. ValueError if the rates do not divide each other.
    """
    if sampling == "grid":
        frames = [grid.frames(start_frame) for grid in grids]
        return None if any(f is None for f in frames) else frames  # type: ignore[misc]
    fine = min(grids, key=lambda grid: grid.alpha)
    ratios = []
    for grid in grids:
        ratio = grid.alpha / fine.alpha
        if abs(ratio - round(ratio)) > 1e-6:
            raise ValueError(f"alpha {grid.alpha:g} is no multiple of alpha {fine.alpha:g}")
        ratios.append(round(ratio))
    base_steps = max(grid.steps * ratio for grid, ratio in zip(grids, ratios))
    base = TimeGrid(fine.alpha, 0, base_steps, fine.fps).frames(start_frame)
    if base is None:
        return None
    return [
        base[base_steps - ratio * (grid.steps - np.arange(grid.steps))]
        for grid, ratio in zip(grids, ratios)
    ]
