"""The observation grid of early action recognition: which frames of the action a branch reads.

Early recognition (the second task of the published RU-LSTM, `--task early_recognition`) observes
the action itself: S_ant frames spread evenly from its start frame `s` to its end frame `e`, and
step `i` (0-based) has seen the fraction (i + 1) / S_ant of the action (12.5%, 25%, ..., 100%
for S_ant = 8). The frames follow the published sampler (RULSTM/dataset.py, `action_samples`)
bit for bit:

    frames = floor(linspace(s, e, S_ant + 1))[1:]          # float64 linspace, first point dropped

and a row is set aside exactly when the published sampler sets it aside: its discard test still
looks at the frames *before* the action on the grid of `alpha`, so an action whose frame
`floor((s / fps - alpha) * fps)` is < 1 (starting within ~alpha s of the video's start) is
discarded although its own frames exist. `alpha` has no other role in this task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from sfr.data.timegrid import as_time


def ratio_label(ratio: float) -> str:
    """Published column name of an observed ratio: 0.125 -> `12.5%`, 1.0 -> `100.0%`."""
    return f"{100 * ratio:0.1f}%"


@dataclass(frozen=True)
class ObservationGrid:
    """Early-recognition grid of a branch: `s_ant` frames spread over the action, `alpha` for discards.

    It answers the questions a `TimeGrid` answers, with observed ratios in place of anticipation
    times: `times` / `anticipation_times` are the ratios (0, 1] of the steps, smallest first, and
    every step is scored (the published loss and measures cover all S_ant steps).
    """

    alpha: float
    s_ant: int
    fps: float = 30.0

    @property
    def s_enc(self) -> int:
        """No encoding steps: the branch observes only the action."""
        return 0

    @property
    def steps(self) -> int:
        """Total number of steps T = S_ant."""
        return self.s_ant

    @cached_property
    def times(self) -> tuple[float, ...]:
        """Observed ratio of every step, smallest first (0.125, 0.25, ..., 1.0 for S_ant = 8)."""
        return tuple(as_time((i + 1) / self.s_ant) for i in range(self.s_ant))

    @property
    def ratios(self) -> tuple[float, ...]:
        """Same as `times`: the observed ratio of every step."""
        return self.times

    @property
    def anticipation_times(self) -> tuple[float, ...]:
        """The scored positions: every step's observed ratio (name shared with `TimeGrid`)."""
        return self.times

    @property
    def anticipation_steps(self) -> tuple[int, ...]:
        """Every step is scored."""
        return tuple(range(self.s_ant))

    def step_at(self, ratio: float) -> int:
        """Index of the step that has observed `ratio` of the action; ValueError if none."""
        return self.times.index(as_time(ratio))

    def steps_at(self, ratios: Sequence[float]) -> tuple[int, ...]:
        """Step indices of several ratios (see `step_at`)."""
        return tuple(self.step_at(r) for r in ratios)

    def discarded(self, start_frame: int) -> bool:
        """Whether the published sampler sets the row aside (no frame >= 1 at `alpha` before it)."""
        last_past = np.floor((start_frame / self.fps - self.alpha) * self.fps)
        return bool(last_past < 1)

    def frames(self, start_frame: int, end_frame: int) -> np.ndarray | None:
        """Frames read for the action [start_frame, end_frame], oldest first; None if discarded."""
        if self.discarded(start_frame):
            return None
        points = np.linspace(start_frame, end_frame, self.s_ant + 1)[1:]
        return np.floor(points).astype(int)


def position_label(value: float, task: str, *, unit: bool = True) -> str:
    """How a scored position reads: `1s` (anticipation time τ) or `12.5%` (observed ratio)."""
    if task == "early_recognition":
        return ratio_label(value)
    return f"{value:g}s" if unit else f"{value:g}"


def position_header(task: str) -> str:
    """Column header of scored positions: `τ (s)` or `observed`."""
    return "observed" if task == "early_recognition" else "τ (s)"
