"""Anticipation datasets: the preloaded feature table against streamed LMDB reads, its size, the
refusal of a table that would not fit, and the recycled memory of batches."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from sfr.data import dataset as dataset_module
from sfr.data.annotations import Segment
from sfr.data.dataset import (
    AnticipationDataset,
    Preloading,
    Stream,
    open_stores,
    preload_tables,
)
from sfr.data.loader import create_loader
from sfr.data.observation import ObservationGrid
from sfr.data.store import FeatureStoreWriter
from sfr.data.timegrid import TimeGrid
from sfr.errors import DataError

DIMS = {"rgb": 8, "obj": 6}
FRAMES = 400  # every frame 1..FRAMES of every video is in the stores
SLOW, FAST = TimeGrid(0.5, 2, 4), TimeGrid(0.25, 4, 8)  # the 0.5 s grid divides the 0.25 s one


@pytest.fixture(scope="module")
def full_stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full-rate stores (every frame of three videos), random vectors, in the public format."""
    root = tmp_path_factory.mktemp("full")
    rng = np.random.default_rng(7)
    for modality, dim in DIMS.items():
        with FeatureStoreWriter(root / modality, map_size=1 << 24) as writer:
            for video in ("P01_01", "P01_02", "P02_03"):
                writer.put_many(video, 1, rng.standard_normal((FRAMES, dim), dtype=np.float32))
    return root


def segments() -> list[Segment]:
    """Overlapping segments (shared frames), some padded at the video start, one discarded."""
    starts = [2, 20, 45, 60, 61, 90, 150, 151, 240, 300]
    return [
        Segment(f"{i}", ("P01_01", "P01_02", "P02_03")[i % 3], start, start + 25 + 7 * i,
                verb=i % 4, noun=i % 5, action=i % 9)
        for i, start in enumerate(starts)
    ]  # fmt: skip


def both(root: Path, streams: list[Stream], **options) -> tuple[AnticipationDataset, ...]:
    stores = open_stores(root, DIMS)
    streamed = AnticipationDataset(segments(), streams, stores, **options)
    preloaded = AnticipationDataset(segments(), streams, stores, preload=True, **options)
    return streamed, preloaded


def assert_same_batches(streamed: AnticipationDataset, preloaded: AnticipationDataset) -> None:
    """Batches and samples bit-identical, ids and labels equal."""
    assert preloaded.ids == streamed.ids and len(preloaded) > 3
    last = len(streamed) - 1
    for indices in ([0], [3, 0, last, 3, 1], list(range(len(streamed)))):
        expected, got = streamed.__getitems__(indices), preloaded.__getitems__(indices)
        assert got["id"] == expected["id"]
        for task in ("verb", "noun", "action"):
            assert torch.equal(got[task], expected[task])
        assert got["features"].keys() == expected["features"].keys()
        for key, tensor in expected["features"].items():
            assert got["features"][key].dtype == torch.float32
            assert torch.equal(got["features"][key], tensor), key
    for index in (0, last):
        for key, tensor in streamed[index]["features"].items():
            assert torch.equal(preloaded[index]["features"][key], tensor), key


@pytest.mark.parametrize("sampling", ["grid", "published"])
def test_preloaded_batches_equal_streamed_ones(full_stores: Path, sampling: str) -> None:
    """Two rates of rgb and one of obj, with sfr's and with the published sampling."""
    streams = [Stream("rgb", FAST), Stream("rgb", SLOW), Stream("obj", FAST)]
    streamed, preloaded = both(full_stores, streams, sampling=sampling)
    assert [s.id for s in preloaded.discarded] == [s.id for s in streamed.discarded]
    assert_same_batches(streamed, preloaded)


def test_preloaded_early_recognition_equals_streamed(full_stores: Path) -> None:
    streams = [Stream("rgb", ObservationGrid(0.25, 8)), Stream("obj", ObservationGrid(0.25, 8))]
    streamed, preloaded = both(full_stores, streams)
    assert [s.id for s in streamed.discarded] == ["0"]  # starts within 0.25 s of the video
    assert_same_batches(streamed, preloaded)


def test_table_holds_each_unique_frame_once(full_stores: Path) -> None:
    streams = [Stream("rgb", FAST), Stream("rgb", SLOW), Stream("obj", FAST)]
    _, preloaded = both(full_stores, streams)
    table = preloaded.table
    assert table is not None
    for modality in DIMS:
        mine = [s for s in streams if s.modality == modality]
        unique = {
            (preloaded.plans[i].segment.video, int(frame))
            for i in range(len(preloaded))
            for stream in mine
            for frame in preloaded.frames_of(i, stream)
        }
        reads = sum(len(preloaded) * s.grid.steps for s in mine)
        assert (
            table.vectors[modality].shape == (len(unique), DIMS[modality]) and len(unique) < reads
        )
    for stream in streams:
        assert table.rows[stream.key].shape == (len(preloaded), stream.grid.steps)
        assert table.rows[stream.key].dtype == torch.int64
    size = sum(
        t.numel() * t.element_size() for t in [*table.vectors.values(), *table.rows.values()]
    )
    assert preloaded.preloaded_bytes == size > 0
    assert (
        AnticipationDataset(segments(), streams, open_stores(full_stores, DIMS)).preloaded_bytes
        == 0
    )


def test_preload_reports_progress_in_vectors(full_stores: Path) -> None:
    calls: list[tuple[int, int]] = []
    dataset = AnticipationDataset(
        segments(), [Stream("rgb", FAST), Stream("obj", SLOW)], open_stores(full_stores, DIMS),
        preload=True, progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    assert dataset.table is not None
    total = sum(len(vectors) for vectors in dataset.table.vectors.values())
    assert calls[-1] == (total, total) and all(t == total for _, t in calls)
    assert [done for done, _ in calls] == sorted({done for done, _ in calls})


def test_preload_that_would_not_fit_is_refused_before_reading(
    full_stores: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores = open_stores(full_stores, DIMS)
    size = AnticipationDataset(segments(), [Stream("rgb", FAST)], stores, preload=True).table
    assert size is not None
    needed = size.nbytes
    monkeypatch.setattr(dataset_module, "available_memory", lambda: needed - 1)
    monkeypatch.setattr(stores["rgb"], "read", lambda *a, **k: pytest.fail("read"))
    with pytest.raises(DataError) as caught:
        AnticipationDataset(segments(), [Stream("rgb", FAST)], stores, preload=True)
    message = str(caught.value)
    assert f"Preloading 9 sequences needs {needed / 1024:.1f} KiB of memory" in message
    assert f"rgb {len(size.vectors['rgb'])} vectors × 8 float32" in message
    assert f"{(needed - 1) / 1024:.1f} KiB available (MemAvailable" in message
    assert "--no-preload" in message


def test_preload_is_not_refused_where_the_available_memory_is_unknown(
    full_stores: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataset_module, "available_memory", lambda: None)
    stores = open_stores(full_stores, DIMS)
    assert AnticipationDataset(segments(), [Stream("rgb", FAST)], stores, preload=True).table


def test_available_memory_reads_meminfo() -> None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        pytest.skip("no /proc/meminfo")
    line = next(x for x in meminfo.read_text().splitlines() if x.startswith("MemAvailable:"))
    available = dataset_module.available_memory()
    assert available is not None and available < int(line.split()[1]) * 1024 + (1 << 30)


def test_available_memory_stays_within_the_control_group_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container's own limit at the mount root, a SLURM job's on a parent of the process's
    group (cgroup v2 without a namespace), and v1; reclaimable file cache does not count."""
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo")
    membership = tmp_path / "self-cgroup"
    monkeypatch.setattr(dataset_module, "CGROUP_ROOT", tmp_path / "fs")
    monkeypatch.setattr(dataset_module, "CGROUP_MEMBERSHIP", membership)

    def group(relative: str, limit: str, usage: int, stat: str = "") -> None:
        folder = tmp_path / "fs" / relative
        folder.mkdir(parents=True, exist_ok=True)
        v1 = relative.startswith("memory")
        (folder / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(limit + "\n")
        (folder / ("memory.usage_in_bytes" if v1 else "memory.current")).write_text(f"{usage}\n")
        if stat:
            (folder / "memory.stat").write_text(stat)

    unlimited = dataset_module.available_memory()
    assert unlimited is not None and unlimited > 1 << 20  # no cgroup files: MemAvailable
    group(".", "max", 123)
    assert dataset_module.available_memory() == pytest.approx(unlimited, rel=0.1)
    group(".", f"{600 << 20}", 100 << 20)  # a container: its own group at the mount root
    assert dataset_module.available_memory() == 500 << 20
    group(".", "max", 123)
    # a SLURM job: the limit on the job's group, the process two levels below, no namespace
    membership.write_text("0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n")
    group("system.slice/slurmstepd.scope/job_7", f"{800 << 20}", 300 << 20)
    group("system.slice/slurmstepd.scope/job_7/step_0/user/task_0", "max", 10)
    assert dataset_module.available_memory() == 500 << 20
    # page cache (LMDB pages read earlier) is reclaimed by the kernel: not counted as used
    group(
        "system.slice/slurmstepd.scope/job_7",
        f"{800 << 20}",
        300 << 20,
        f"anon 1000\ninactive_file {200 << 20}\n",
    )
    assert dataset_module.available_memory() == 700 << 20
    # cgroup v1: "no limit" is a number near 2**63; the memory hierarchy's own group
    membership.write_text("4:memory:/slurm/uid_0/job_9\n2:cpu,cpuacct:/slurm/uid_0/job_9\n")
    group("memory", str((1 << 63) - 4096), 5)
    group("memory/slurm/uid_0/job_9", f"{300 << 20}", 60 << 20, f"total_inactive_file {10 << 20}\n")
    assert dataset_module.available_memory() == 250 << 20


def test_each_process_of_a_torchrun_job_on_the_machine_counts(
    full_stores: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores = open_stores(full_stores, DIMS)
    table = AnticipationDataset(segments(), [Stream("rgb", FAST)], stores, preload=True).table
    assert table is not None
    monkeypatch.setattr(dataset_module, "available_memory", lambda: 3 * table.nbytes)
    for copies in (1, 3):  # three tables fit
        AnticipationDataset(
            segments(), [Stream("rgb", FAST)], stores, preload=True, preload_copies=copies
        )
    with pytest.raises(DataError, match="in each of the 4 processes on this machine"):
        AnticipationDataset(
            segments(), [Stream("rgb", FAST)], stores, preload=True, preload_copies=4
        )


def test_missing_vector_in_a_preload_names_the_annotation(tmp_path: Path) -> None:
    with FeatureStoreWriter(tmp_path / "rgb") as writer:
        writer.put_many("P01_01", 1, np.ones((199, 4), np.float32))
        writer.put_many("P01_01", 206, np.ones((60, 4), np.float32))  # frames 200..205 missing
    segments = [Segment("a", "P01_01", 100, 120), Segment("b", "P01_01", 230, 250)]
    with pytest.raises(DataError, match=r"no key 'P01_01_frame_0000000200\.jpg'.*id b\b"):
        AnticipationDataset(
            segments, [Stream("rgb", FAST)], open_stores(tmp_path, {"rgb": 4}), preload=True
        )


def test_a_preloaded_table_is_gathered_without_worker_processes(full_stores: Path) -> None:
    """Preloaded, `workers` 2 gives a loader of 0 worker processes (also through the Subset
    wrappers of a distributed shard) with the batches of workers 0; streamed keeps its workers."""
    streams = [Stream("rgb", FAST), Stream("obj", SLOW)]
    streamed, preloaded = both(full_stores, streams)
    cpu = torch.device("cpu")
    shard = Subset(Subset(preloaded, list(range(len(preloaded)))), [4, 0, 2, 3, 1, 5])
    for dataset in (preloaded, shard):
        batches = {}
        for workers in (0, 2):
            loader = create_loader(dataset, batch_size=4, device=cpu, workers=workers)
            assert loader.num_workers == 0
            batches[workers] = list(loader)
        assert len(batches[0]) == len(batches[2]) == math.ceil(len(dataset) / 4)
        for first, second in zip(batches[0], batches[2], strict=True):
            assert first["id"] == second["id"]
            for key in first["features"]:
                assert torch.equal(first["features"][key], second["features"][key])
    assert create_loader(streamed, batch_size=4, device=cpu, workers=2).num_workers == 2


def test_auto_preloads_what_fits_in_half_the_available_memory(
    full_stores: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.preload = "auto" on a training and a validation set read together: both preloaded
    while their tables take at most half the available memory, both streamed past that (where
    True still preloads) or where the available memory is unknown."""
    stores = open_stores(full_stores, DIMS)
    streams = [Stream("rgb", FAST), Stream("obj", SLOW)]

    def split_pair() -> list[AnticipationDataset]:
        return [AnticipationDataset(segments()[i::2], streams, stores) for i in (0, 1)]

    pair = split_pair()
    chosen = preload_tables(pair, "auto")
    needed = sum(d.preloaded_bytes for d in pair)
    assert chosen == Preloading("auto", True, needed, chosen.available) and needed > 0
    assert all(d.table is not None and d.preloading is chosen for d in pair)
    for available, copies, preloaded in (
        (2 * needed, 1, True),
        (2 * needed - 1, 1, False),
        (4 * needed, 2, True),
        (4 * needed - 1, 2, False),
        (None, 1, False),
    ):
        monkeypatch.setattr(dataset_module, "available_memory", lambda a=available: a)
        pair = split_pair()
        chosen = preload_tables(pair, "auto", copies=copies)
        assert chosen == Preloading("auto", preloaded, needed, available, copies)
        assert [d.table is not None for d in pair] == [preloaded] * 2
    monkeypatch.setattr(dataset_module, "available_memory", lambda: 2 * needed - 1)
    assert preload_tables(split_pair(), True).preloaded  # forced: it fits, though not in half
    pair = split_pair()
    assert preload_tables(pair, False) == Preloading(False, False)
    assert [d.table for d in pair] == [None, None]


def test_batch_memory_is_recycled_only_once_no_tensor_uses_it(full_stores: Path) -> None:
    streamed, preloaded = both(full_stores, [Stream("rgb", FAST), Stream("obj", SLOW)])
    for dataset in (streamed, preloaded):
        batch = dataset.__getitems__([0, 1, 2])
        base = batch["features"]["rgb@0.25"].data_ptr()
        held = batch["features"]["rgb@0.25"][1:]  # a view keeps the whole batch's memory in use
        del batch
        copy = held.clone()
        pointers = set()
        for _ in range(4):
            batch = dataset.__getitems__([4, 5, 6])
            pointers.add(batch["features"]["rgb@0.25"].data_ptr())
            del batch
        assert torch.equal(held, copy) and base not in pointers  # never written over
        assert len(pointers) == 1  # a freed batch's memory is handed out again
        del held
        assert dataset.__getitems__([4, 5, 6])["features"]["rgb@0.25"].data_ptr() == base
