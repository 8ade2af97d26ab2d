"""Anticipation dataset: for every segment, the features each branch needs on its own time grid.

A stream's grid is a `TimeGrid` (frames before the action, anticipation) or an `ObservationGrid`
(frames spread over the action itself, early recognition).

A `Stream` is one (modality, time grid) input of a model. Streams of the same modality share one
store read per sample: the union of their frames is read in one transaction, then split.
Segments for which some stream has no valid frame are set aside as `discarded` (DESIGN §3).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from sfr.data.annotations import Segment
from sfr.data.observation import ObservationGrid
from sfr.data.store import FeatureStore
from sfr.data.timegrid import Sampling, TimeGrid, sampled_frames
from sfr.errors import DataError

PreloadMode = Literal["auto"] | bool  # data.preload: see `preload_tables`

# "auto" preloads when the tables of every process on the machine take at most this share of the
# available memory: the other half stays for the model, its gradients, the batches, the page
# cache that LMDB reads through, and whatever else the machine runs.
AUTO_PRELOAD_SHARE = 0.5


@dataclass(frozen=True)
class Stream:
    """One input of a model: a modality read on a time grid."""

    modality: str
    grid: TimeGrid | ObservationGrid

    def frames(self, segment: Segment) -> np.ndarray | None:
        """Frames this stream reads for `segment`, oldest first; None if its grid discards it."""
        if isinstance(self.grid, ObservationGrid):
            return self.grid.frames(segment.start_frame, segment.end_frame)
        return self.grid.frames(segment.start_frame)

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

    Preloaded, every unique vector that the samples read is read once up front into a
    `FeatureTable` (`table`; its size in bytes is `preloaded_bytes`), and batches are gathered
    from it: the values are exactly those read from the stores. `preload` is True, False or
    "auto" (`preload_tables`, which also states the refusal of a table that would not fit and
    what `preload_copies` counts); `preloading` records what was made of it.
    `progress(done, total)` is called as vectors are read (counted over all modalities).
    """

    def __init__(
        self,
        segments: Sequence[Segment],
        streams: Sequence[Stream],
        stores: Mapping[str, FeatureStore],
        *,
        preload: PreloadMode = False,
        sampling: Sampling = "grid",
        progress: Callable[[int, int], None] | None = None,
        preload_copies: int = 1,
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
        self._labels = {
            task: torch.tensor(
                [_label(getattr(plan.segment, task)) for plan in self.plans], dtype=torch.int64
            )
            for task in ("verb", "noun", "action")
        }
        self._buffers = _BatchBuffers()
        self.table: FeatureTable | None = None
        self.preloading = preload_tables([self], preload, progress, preload_copies)

    def __getstate__(self) -> dict:
        """Pickled (for a spawned worker) without the recycled batch memory of this process."""
        state = self.__dict__.copy()
        state["_buffers"] = _BatchBuffers()
        return state

    @property
    def preloaded_bytes(self) -> int:
        """Bytes held in memory by the preloaded table (vectors and row indices); 0 without."""
        return 0 if self.table is None else self.table.nbytes

    def _read_table(self, layout: _TableLayout, read: Callable[[int], None]) -> FeatureTable:
        """Read the vectors of `layout` into a table; `read(n)` after every n vectors read."""
        vectors: dict[str, torch.Tensor] = {}
        for modality, keys in layout.keys.items():
            table = torch.empty((len(keys), self.stores[modality].dim), dtype=torch.float32)
            array = table.numpy()
            codes, frames = np.divmod(keys, layout.span)
            starts = [*np.flatnonzero(np.diff(codes, prepend=-1)).tolist(), len(keys)]
            for first, end in itertools.pairwise(starts):
                video = layout.videos[int(codes[first])]
                for lo in range(first, end, _PRELOAD_CHUNK):
                    hi = min(lo + _PRELOAD_CHUNK, end)
                    self._read_table_rows(modality, video, frames[lo:hi], array[lo:hi])
                    read(hi - lo)
            vectors[modality] = table
        rows = {key: torch.from_numpy(index) for key, index in layout.rows.items()}
        return FeatureTable(vectors, rows)

    def _read_table_rows(
        self, modality: str, video: str, frames: np.ndarray, out: np.ndarray
    ) -> None:
        """Read `frames` of `video` into rows of the table; a store error names the sample
        that needs the faulty vector, as the streamed read would."""
        try:
            self.stores[modality].read(video, frames, out=out)
        except DataError:
            for index, plan in enumerate(self.plans):
                if plan.segment.video == video:
                    self._read(index)
            raise

    def _plan(self, segment: Segment) -> _Plan | None:
        if any(isinstance(stream.grid, ObservationGrid) for stream in self.streams):
            # early recognition: frames spread over the action itself, one rate
            sampled = [stream.frames(segment) for stream in self.streams]
            if any(frames is None for frames in sampled):
                return None
        else:
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
            vectors = self.stores[modality].read(segment.video, frames, sample_id=segment.described)
            for stream in self.streams:
                if stream.modality == modality:
                    features[stream.key] = vectors[plan.picks[stream.key]]
        return features

    def __len__(self) -> int:
        return len(self.plans)

    def __getitems__(self, indices: Sequence[int]) -> dict:
        """A whole batch, as DataLoader's default collation would build it from the samples:
        `{"id": [...], "verb"/"noun"/"action": (B,) int64, "features": {key: (B, T, D)}}`.

        Each stream's features are written straight into one (B, T, D) tensor: in shared memory
        inside a DataLoader worker (handing it to the main process copies nothing), else in
        memory recycled from batches no longer in use (`_BatchBuffers`).
        Preloaded: one gather per stream from the table (`FeatureTable.gather`). Otherwise: one
        LMDB transaction per store and sample, no per-sample tensors, no stacking.
        """
        picked = torch.as_tensor(indices, dtype=torch.int64)
        shapes = [
            (len(indices), stream.grid.steps, self.stores[stream.modality].dim)
            for stream in self.streams
        ]
        if torch.utils.data.get_worker_info() is not None:
            tensors = [_shared_tensor(shape) for shape in shapes]
        else:
            tensors = self._buffers.tensors(shapes)
        features = {stream.key: t for stream, t in zip(self.streams, tensors, strict=True)}
        if self.table is not None:
            self.table.gather(picked.numpy(), self.streams, features)
        else:
            arrays = {key: tensor.numpy() for key, tensor in features.items()}
            for row, index in enumerate(indices):
                self._read_into(index, {key: array[row] for key, array in arrays.items()})
        labels = {task: self._labels[task].index_select(0, picked) for task in self._labels}
        ids = [self.plans[index].segment.id for index in indices]
        return {BATCHED: True, "id": ids, **labels, "features": features}

    def _read_into(self, index: int, out: dict[str, np.ndarray]) -> None:
        """Sample `index`'s features, read from the stores, into the (T, D) arrays `out`."""
        plan = self.plans[index]
        segment = plan.segment
        for modality, frames in plan.frames.items():
            mine = [s for s in self.streams if s.modality == modality]
            picks = plan.picks[mine[0].key]
            direct = len(mine) == 1 and np.array_equal(picks, np.arange(len(frames)))
            store = self.stores[modality]
            if direct:  # the stream reads every frame once, in order: no gather needed
                store.read(segment.video, frames, sample_id=segment.described, out=out[mine[0].key])
                continue
            vectors = store.read(segment.video, frames, sample_id=segment.described)
            for stream in mine:
                out[stream.key][...] = vectors[plan.picks[stream.key]]

    def __getitem__(self, index: int) -> dict:
        segment = self.plans[index].segment
        if self.table is not None:
            table = self.table
            features = {
                s.key: table.vectors[s.modality][table.rows[s.key][index]] for s in self.streams
            }
        else:
            features = {key: torch.from_numpy(v) for key, v in self._read(index).items()}
        return {
            "id": segment.id,
            "verb": _label(segment.verb),
            "noun": _label(segment.noun),
            "action": _label(segment.action),
            "features": features,
        }


BATCHED = "batched"  # key that marks a batch built whole by `__getitems__`


def _label(value: int | None) -> int:
    return -1 if value is None else value


def _shared_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor in shared memory, created there directly (as DataLoader's
    own collation does; `share_memory_()` would copy a fresh tensor into it)."""
    storage = torch.empty(0)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0).new(storage).view(shape)


class _BatchBuffers:
    """Memory for the batches built in this process, recycled once no tensor uses it.

    A fresh allocation of a batch's size (tens of MiB) is a new memory mapping whose every page
    faults on its first write, which costs more than gathering a preloaded batch. So each batch
    is carved from an arena, and an arena is handed out again only when every array carved from
    it has been freed (their weak references are dead): no tensor of that batch, nor any view
    of one, is alive anywhere in this process. At most `keep` arenas are kept; past that, a
    batch gets memory of its own. Used from one thread (the loader's).
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._arenas: list[tuple[np.ndarray, list[weakref.ref]]] = []

    def tensors(self, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        """Uninitialised float32 tensors of `shapes`, carved from one recycled arena."""
        sizes = [math.prod(shape) for shape in shapes]
        arena, refs = self._arena(sum(sizes))
        tensors, offset = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            array = arena[offset : offset + size].reshape(shape)
            refs.append(weakref.ref(array))
            tensors.append(torch.from_numpy(array))  # holds `array` until its storage dies
            offset += size
        return tensors

    def _arena(self, size: int) -> tuple[np.ndarray, list[weakref.ref]]:
        free = [i for i, (_, refs) in enumerate(self._arenas) if all(r() is None for r in refs)]
        for i in free:
            arena, refs = self._arenas[i]
            if arena.size == size:
                refs.clear()
                return arena, refs
        entry: tuple[np.ndarray, list[weakref.ref]] = (np.empty(size, np.float32), [])
        if len(self._arenas) < self.keep:
            self._arenas.append(entry)
        elif free:
            self._arenas[free[0]] = entry
        return entry


@dataclass(frozen=True)
class FeatureTable:
    """The preloaded features of a dataset: every unique vector it reads, once.

    `vectors[modality]` is a (N_unique, D) float32 tensor whose rows are the unique (video, frame)
    vectors that the samples read from that modality's store, sorted by video then frame (slow
    and fast streams, and overlapping segments, share rows); `rows[stream key]` is a
    (N_samples, T) int64 tensor: sample i's step t is `vectors[modality][rows[key][i, t]]`.
    """

    vectors: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor]

    def gather(
        self, samples: np.ndarray, streams: Sequence[Stream], out: Mapping[str, torch.Tensor]
    ) -> None:
        """Write the steps of `samples` ((B,) int64 sample indices) into `out[stream key]`,
        contiguous (B, T, D) float32 tensors: one gather of B·T rows per stream.

        numpy's `take` copies the rows on the calling thread. torch's `index_select` would split
        them over the intra-op threads, which was measured 3-4x slower than one thread on the
        2-core development machine with other jobs running: the copy is bound by memory
        bandwidth, not by arithmetic, and waits for the slowest thread. `mode="clip"` spares the
        buffered copy that `take` makes of `out` in its checking mode; the rows are valid by
        construction, so nothing is clipped.
        """
        for stream in streams:
            rows = self.rows[stream.key].numpy()[samples].reshape(-1)
            target = out[stream.key].numpy().reshape(len(rows), -1)
            np.take(self.vectors[stream.modality].numpy(), rows, axis=0, out=target, mode="clip")

    @property
    def nbytes(self) -> int:
        """Bytes of the vectors and of the row indices."""
        tensors = [*self.vectors.values(), *self.rows.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class _TableLayout:
    """What a `FeatureTable` will hold, before anything is read.

    `keys[modality]`: sorted unique `video code * span + frame` of that modality's vectors
    (`videos[code]` names the video); `rows[stream key]`: (N_samples, T) int64 rows.
    """

    videos: list[str]
    span: int
    keys: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]

    @classmethod
    def of(cls, plans: Sequence[_Plan], streams: Sequence[Stream]) -> _TableLayout:
        videos = sorted({plan.segment.video for plan in plans})
        code = {video: i for i, video in enumerate(videos)}
        codes = np.array([code[plan.segment.video] for plan in plans], dtype=np.int64)[:, None]
        frames = {
            s.key: np.array(
                [plan.frames[s.modality][plan.picks[s.key]] for plan in plans], dtype=np.int64
            ).reshape(len(plans), s.grid.steps)
            for s in streams
        }
        span = 1 + max((int(f.max()) for f in frames.values() if f.size), default=0)
        keys: dict[str, np.ndarray] = {}
        rows: dict[str, np.ndarray] = {}
        for modality in dict.fromkeys(s.modality for s in streams):
            mine = [s.key for s in streams if s.modality == modality]
            combined = np.concatenate([codes * span + frames[key] for key in mine], axis=1)
            unique, inverse = np.unique(combined.ravel(), return_inverse=True)
            keys[modality] = unique
            inverse = inverse.reshape(combined.shape)
            edges = np.cumsum([0] + [frames[key].shape[1] for key in mine])
            for key, lo, hi in zip(mine, edges[:-1], edges[1:], strict=True):
                rows[key] = np.ascontiguousarray(inverse[:, lo:hi], dtype=np.int64)
        return cls(videos, span, keys, rows)

    def nbytes(self, dims: Mapping[str, int]) -> int:
        """Bytes of the table that this layout describes (float32 vectors, int64 rows)."""
        vectors = sum(4 * len(keys) * dims[modality] for modality, keys in self.keys.items())
        return vectors + sum(rows.nbytes for rows in self.rows.values())


_PRELOAD_CHUNK = 4096  # vectors per read transaction (and per progress report) when preloading


CGROUP_ROOT = Path("/sys/fs/cgroup")  # where the control groups are mounted (v2, or v1 "memory/")
CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")  # this process's control group in each hierarchy
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


@dataclass(frozen=True)
class Preloading:
    """What `data.preload` made of the datasets of a stage (decided for them together).

    `mode` is the setting (True, False or "auto"), `preloaded` whether the tables were read.
    `table_bytes`: bytes of the tables in one process (0 where `mode` is False: not computed);
    `available`: bytes of memory available when it was decided (`available_memory`; None where
    unknown or not looked at); `copies`: the processes on this machine that each hold them.
    """

    mode: PreloadMode
    preloaded: bool
    table_bytes: int = 0
    available: int | None = None
    copies: int = 1


def preload_tables(
    datasets: Sequence[AnticipationDataset],
    mode: PreloadMode,
    progress: Callable[[int, int], None] | None = None,
    copies: int = 1,
) -> Preloading:
    """Apply `data.preload` to datasets read together (a stage's training and validation sets),
    setting each one's `table` and `preloading`.

    The tables' sizes are computed exactly before anything is read: `copies` (the processes of
    a torchrun job on this machine, each of which holds its own tables) times the bytes of every
    dataset's table, against `available_memory()`.
    True: read every table; refused (DataError naming both sizes and --no-preload) where they
    would not fit, read anyway where the available memory is unknown.
    "auto": read them where they take at most `AUTO_PRELOAD_SHARE` of the available memory;
    otherwise, and where the available memory is unknown, read nothing: the datasets stream
    from the LMDB stores (the result says why).
    False: read nothing.
    `progress(done, total)` is called as vectors are read, counted over all datasets and
    modalities.
    """
    if mode is False:
        return _record(datasets, Preloading(False, False, copies=copies))
    layouts = [_TableLayout.of(d.plans, d.streams) for d in datasets]
    dims = [
        {m: d.stores[m].dim for m in lay.keys} for d, lay in zip(datasets, layouts, strict=True)
    ]
    needed = sum(layout.nbytes(dim) for layout, dim in zip(layouts, dims, strict=True))
    available = available_memory()
    if mode == "auto" and (available is None or needed * copies > available * AUTO_PRELOAD_SHARE):
        return _record(datasets, Preloading("auto", False, needed, available, copies))
    if available is not None and needed * copies > available:
        vectors: dict[str, int] = {}
        for layout in layouts:
            for modality, keys in layout.keys.items():
                vectors[modality] = vectors.get(modality, 0) + len(keys)
        every = {m: dim for dim in dims for m, dim in dim.items()}
        sizes = ", ".join(f"{m} {count:,} vectors × {every[m]}" for m, count in vectors.items())
        each = f", in each of the {copies} processes on this machine" if copies > 1 else ""
        raise DataError(
            f"Preloading {sum(len(d.plans) for d in datasets):,} sequences needs "
            f"{binary_size(needed)} of memory ({sizes} float32, plus row indices){each}, but this "
            f"machine has {binary_size(available)} available (MemAvailable in /proc/meminfo, within "
            "the memory limit of this process's control group).",
            "Train without preloading (train-branch/finetune --no-preload, or --set "
            "data.preload=false in any command): batches are then read from the LMDB stores "
            "as training goes, with --workers processes.",
        )
    total = sum(len(keys) for layout in layouts for keys in layout.keys.values())
    done = 0

    def read(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    for dataset, layout in zip(datasets, layouts, strict=True):
        dataset.table = dataset._read_table(layout, read)
    return _record(datasets, Preloading(mode, True, needed, available, copies))


def _record(datasets: Sequence[AnticipationDataset], preloading: Preloading) -> Preloading:
    for dataset in datasets:
        dataset.preloading = preloading
    return preloading


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: `MemAvailable` of /proc/meminfo (Linux),
    lowered to what this process's control groups leave (`cgroup_memory_left`: containers and
    SLURM jobs); None where /proc/meminfo cannot be read or has no `MemAvailable`."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if available is None:
        return None
    left = cgroup_memory_left()
    return available if left is None else max(0, min(available, left))


def cgroup_memory_left() -> int | None:
    """The least memory that a limit on this process's control group or on one of its ancestors
    leaves: limit − (usage − inactive file cache, which the kernel reclaims), over cgroup v2
    (`memory.max`, `memory.current`, `memory.stat` inactive_file) and v1 (`memory.limit_in_bytes`,
    `memory.usage_in_bytes`, `memory.stat` total_inactive_file); None where no limit is set.

    The groups are those of /proc/self/cgroup under `CGROUP_ROOT` (a SLURM job's or a systemd
    unit's, which set their limit on a parent of the process's own group), and the mount's root
    itself, which is the container's own group where it has its own cgroup namespace or mount.
    """
    left = None
    for directory, v2 in _memory_groups():
        limit_name, usage_name, cache_key = (
            ("memory.max", "memory.current", "inactive_file")
            if v2
            else ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        )
        try:
            limit_text = (directory / limit_name).read_text().strip()
            if limit_text == "max" or int(limit_text) >= UNLIMITED:
                continue
            usage = int((directory / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        cache = 0
        try:
            for line in (directory / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_key:
                    cache = int(value)
        except (OSError, ValueError):
            pass
        here = int(limit_text) - max(0, usage - cache)
        left = here if left is None else min(left, here)
    return left


def _memory_groups() -> list[tuple[Path, bool]]:
    """(directory, is cgroup v2) of this process's memory control groups and their ancestors,
    then the mount roots (`cgroup_memory_left`)."""
    groups: list[tuple[Path, bool]] = []
    try:
        lines = CGROUP_MEMBERSHIP.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base, v2 = CGROUP_ROOT, True
        elif "memory" in controllers.split(","):
            base, v2 = CGROUP_ROOT / "memory", False
        else:
            continue
        own = base / path.strip("/")
        groups += [(own, v2)] + [(parent, v2) for parent in own.parents if base in parent.parents]
    roots = [(CGROUP_ROOT, True), (CGROUP_ROOT / "memory", False)]
    return groups + [root for root in roots if root not in groups]


def binary_size(nbytes: int) -> str:
    """Bytes in binary units: GiB, MiB or KiB, whichever is the largest below the size."""
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.2f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


def open_stores(data_dir: Path, dims: Mapping[str, int]) -> dict[str, FeatureStore]:
    """Feature stores `data_dir/<modality>` with the expected dimension of each."""
    return {m: FeatureStore(Path(data_dir) / m, dim, name=m) for m, dim in dims.items()}
