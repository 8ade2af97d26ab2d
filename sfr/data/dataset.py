"""Anticipation dataset: for every segment, the features each branch needs on its own time grid.

A `Stream` is one (modality, time grid) input of a model. Streams of the same modality share one
store read per sample: the union of their frames is read in one transaction, then split.
Segments for which some stream has no valid frame are set aside as `discarded` (DESIGN §3).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sfr.data.annotations import Segment
from sfr.data.store import FeatureStore
from sfr.data.timegrid import Sampling, TimeGrid, sampled_frames
from sfr.errors import DataError


@dataclass(frozen=True)
class Stream:
    """One input of a model: a modality read on a time grid."""

    modality: str
    grid: TimeGrid

    @property
    def key(self) -> str:
        """Name of the stream in a sample's `features`, e.g. `rgb@0.25`."""
        return f"{self.modality}@{self.grid.alpha:g}"


@dataclass(frozen=True)
class _Plan:
    """Per segment and modality: the unique frames to read and where each stream's steps sit."""

    segment: Segment
    frames: dict[str, np.ndarray]  # modality -> unique frames
    picks: dict[str, np.ndarray]  # stream key -> indices into frames[modality]


class AnticipationDataset(Dataset):
    """Samples `{"id", "verb", "noun", "action", "features": {stream key: (T, D) float32}}`.

    Labels are -1 for unlabelled (test) segments. `discarded` lists the segments set aside.
    `sampling` chooses how the streams' frames are sampled (`sfr.data.timegrid.sampled_frames`).
    With `preload`, every sequence is read once up front and served from memory.
    """

    def __init__(
        self,
        segments: Sequence[Segment],
        streams: Sequence[Stream],
        stores: Mapping[str, FeatureStore],
        *,
        preload: bool = False,
        sampling: Sampling = "grid",
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        keys = [s.key for s in streams]
        if len(set(keys)) != len(keys):
            raise ValueError(f"streams must be distinct, got {keys}")
        missing = sorted({s.modality for s in streams} - set(stores))
        if missing:
            raise DataError(f"No feature store given for modality {', '.join(missing)}.")
        self.streams = tuple(streams)
        self.stores = dict(stores)
        self.sampling = sampling
        self.plans: list[_Plan] = []
        self.discarded: list[Segment] = []
        for segment in segments:
            plan = self._plan(segment)
            if plan is None:
                self.discarded.append(segment)
            else:
                self.plans.append(plan)
        self._cache: list[dict[str, np.ndarray]] | None = None
        if preload:
            total = len(self.plans)
            cache = []
            for index in range(total):
                cache.append(self._read(index))
                if progress is not None:
                    progress(index + 1, total)
            self._cache = cache

    def _plan(self, segment: Segment) -> _Plan | None:
        sampled = sampled_frames(
            [stream.grid for stream in self.streams], segment.start_frame, self.sampling
        )
        if sampled is None:
            return None
        per_stream = {stream.key: f for stream, f in zip(self.streams, sampled, strict=True)}
        frames: dict[str, np.ndarray] = {}
        picks: dict[str, np.ndarray] = {}
        for modality in dict.fromkeys(s.modality for s in self.streams):
            mine = [s for s in self.streams if s.modality == modality]
            unique = np.unique(np.concatenate([per_stream[s.key] for s in mine]))
            frames[modality] = unique
            for stream in mine:
                picks[stream.key] = np.searchsorted(unique, per_stream[stream.key])
        return _Plan(segment, frames, picks)

    @property
    def ids(self) -> list[str]:
        return [plan.segment.id for plan in self.plans]

    def frames_of(self, index: int, stream: Stream) -> np.ndarray:
        """The frame numbers `stream` reads for sample `index` (oldest first)."""
        plan = self.plans[index]
        return plan.frames[stream.modality][plan.picks[stream.key]]

    def _read(self, index: int) -> dict[str, np.ndarray]:
        plan = self.plans[index]
        segment = plan.segment
        features: dict[str, np.ndarray] = {}
        for modality, frames in plan.frames.items():
            vectors = self.stores[modality].read(segment.video, frames, sample_id=segment.id)
            for stream in self.streams:
                if stream.modality == modality:
                    features[stream.key] = vectors[plan.picks[stream.key]]
        return features

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, index: int) -> dict:
        segment = self.plans[index].segment
        features = self._cache[index] if self._cache is not None else self._read(index)
        return {
            "id": segment.id,
            "verb": -1 if segment.verb is None else segment.verb,
            "noun": -1 if segment.noun is None else segment.noun,
            "action": -1 if segment.action is None else segment.action,
            "features": {key: torch.from_numpy(value) for key, value in features.items()},
        }


def open_stores(data_dir: Path, dims: Mapping[str, int]) -> dict[str, FeatureStore]:
    """Feature stores `data_dir/<modality>` with the expected dimension of each."""
    return {m: FeatureStore(Path(data_dir) / m, dim, name=m) for m, dim in dims.items()}
