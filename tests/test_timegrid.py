"""The time grid reproduces the published sampler's frames bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden import GOLDEN, GOLDEN_DATA
from hypothesis import given
from hypothesis import strategies as st

from sfr.data.annotations import read_segments
from sfr.data.dataset import AnticipationDataset, Stream, open_stores
from sfr.data.timegrid import TimeGrid, as_time


@pytest.mark.parametrize("split", ["training", "validation"])
def test_frames_match_published_sampler_on_every_row_and_grid(split: str) -> None:
    expected = json.loads((GOLDEN / f"frames_{split}.json").read_text())
    segments = read_segments(GOLDEN_DATA / f"{split}.csv")
    assert len(expected["grids"]) == 4
    for grid_spec in expected["grids"]:
        grid = TimeGrid(grid_spec["alpha"], grid_spec["S_enc"], grid_spec["S_ant"])
        discarded = {s.id for s in segments if grid.frames(s.start_frame) is None}
        assert discarded == set(grid_spec["discarded_ids"])
        kept = [s for s in segments if s.id not in discarded]
        assert len(kept) == len(grid_spec["frames"])
        for segment in kept:
            assert grid.frames(segment.start_frame).tolist() == grid_spec["frames"][segment.id]


def test_dataset_reads_golden_frames_and_sets_discarded_aside() -> None:
    expected = json.loads((GOLDEN / "frames_validation.json").read_text())["grids"]
    streams = [Stream("rgb", TimeGrid(g["alpha"], g["S_enc"], g["S_ant"])) for g in expected[:2]]
    stores = open_stores(GOLDEN_DATA, {"rgb": 16})
    dataset = AnticipationDataset(read_segments(GOLDEN_DATA / "validation.csv"), streams, stores)
    assert [s.id for s in dataset.discarded] == expected[0]["discarded_ids"]
    sample = dataset[0]
    for stream, grid_spec in zip(streams, expected[:2]):
        frames = grid_spec["frames"][sample["id"]]
        assert dataset.frames_of(0, stream).tolist() == frames
        direct = stores["rgb"].read(dataset.plans[0].segment.video, frames)
        np.testing.assert_array_equal(sample["features"][stream.key].numpy(), direct)


def test_same_modality_streams_read_each_frame_once() -> None:
    grid_fast, grid_slow = TimeGrid(0.125, 24, 16), TimeGrid(0.5, 6, 4)
    stores = open_stores(GOLDEN_DATA, {"rgb": 16})
    segments = read_segments(GOLDEN_DATA / "validation.csv")
    dataset = AnticipationDataset(
        segments, [Stream("rgb", grid_fast), Stream("rgb", grid_slow)], stores
    )
    plan = dataset.plans[3]
    union = set(grid_fast.frames(plan.segment.start_frame)) | set(
        grid_slow.frames(plan.segment.start_frame)
    )
    assert sorted(plan.frames["rgb"].tolist()) == sorted(union)
    assert len(plan.frames["rgb"]) == len(set(plan.frames["rgb"].tolist()))


def test_anticipation_times_are_indexed_by_time_not_position() -> None:
    fast, slow = TimeGrid(0.125, 24, 16), TimeGrid(0.5, 6, 4)
    assert slow.anticipation_times == (2.0, 1.5, 1.0, 0.5)
    assert fast.anticipation_times[0] == 2.0 and fast.anticipation_times[-1] == 0.125
    assert fast.times[fast.step_at(1.0)] == slow.times[slow.step_at(1.0)] == 1.0
    assert fast.step_at(1.0) == 32 and slow.step_at(1.0) == 8
    with pytest.raises(ValueError):
        slow.step_at(0.25)


@given(
    alpha=st.sampled_from([0.125, 0.25, 0.5, 1.0]),
    s_enc=st.integers(0, 12),
    s_ant=st.integers(1, 16),
    start=st.integers(1, 5000),
)
def test_frames_never_reach_the_action_and_padding_uses_the_first_valid_frame(
    alpha: float, s_enc: int, s_ant: int, start: int
) -> None:
    grid = TimeGrid(alpha, s_enc, s_ant)
    frames = grid.frames(start)
    raw = np.floor((start / 30 - grid.offsets) * 30).astype(int)
    if (raw < 1).all():
        assert frames is None
        return
    assert len(frames) == grid.steps
    assert (frames >= 1).all() and (frames < start).all()
    assert (np.diff(frames) >= 0).all()
    assert (frames[raw < 1] == raw[raw >= 1].min()).all()


@given(
    alpha=st.floats(0.01, 2.0, allow_nan=False, allow_infinity=False) | st.sampled_from([0.2, 0.1]),
    s_enc=st.integers(0, 60),
    s_ant=st.integers(1, 60),
)
def test_every_alpha_gives_exactly_t_steps_with_the_published_offsets(
    alpha: float, s_enc: int, s_ant: int
) -> None:
    grid = TimeGrid(alpha, s_enc, s_ant)
    assert grid.offsets.shape == (grid.steps,)
    assert len(grid.times) == grid.steps and len(grid.anticipation_times) == s_ant
    assert len(grid.frames(100_000)) == grid.steps
    # Where the published call yields T values, its offsets are reproduced bit for bit.
    published = np.arange(alpha, alpha * (grid.steps + 1), alpha)
    np.testing.assert_array_equal(grid.offsets[::-1], published[: grid.steps])


@pytest.mark.parametrize(
    ("alpha", "s_enc", "s_ant"),
    [(0.2, 24, 16), (0.1, 24, 16), (0.4, 24, 16), (0.3, 8, 6), (0.15, 8, 6), (0.6, 8, 6)],
)
def test_non_binary_alphas_reported_in_issue_11_get_exactly_t_steps(
    alpha: float, s_enc: int, s_ant: int
) -> None:
    grid = TimeGrid(alpha, s_enc, s_ant)
    assert grid.offsets.shape == (s_enc + s_ant,)
    assert grid.anticipation_times[-1] == as_time(alpha)
    assert grid.times[0] == as_time(alpha * (s_enc + s_ant))
