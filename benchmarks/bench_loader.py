"""Loader throughput: samples/s of the training DataLoader alone, with 0, 2 and 4 workers.

An EK-scale synthetic store in the public LMDB format (1024-d rgb and flow, 352-d obj vectors,
float32) holds the frames that the alpha 0.125 grid (24 + 16 = 40 steps) reads for `SEGMENTS`
segments spaced one second apart, as in EPIC-KITCHENS videos. The loader is the one training
uses (`create_loader`: per-worker LMDB handles, persistent workers, one read transaction per
store and sample) and is measured on its own, without a model: the fastest of three passes of
4096 samples after a warm-up pass, in batches of 128, for the fast branch (rgb at alpha 0.125)
and for the three modalities that a fusion level reads; each streamed from LMDB and preloaded
(`--preload`: one in-memory table of the unique vectors, batches gathered from it; `create_loader`
gives a preloaded table no worker processes, so its 2- and 4-worker rows run with 0 workers).

    python benchmarks/bench_loader.py [--segments 1024]     or     from bench_loader import run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from sfr.data.annotations import Segment
from sfr.data.dataset import AnticipationDataset, Stream, open_stores
from sfr.data.loader import create_loader
from sfr.data.store import FeatureStoreWriter
from sfr.data.timegrid import TimeGrid

DIMS = {"rgb": 1024, "flow": 1024, "obj": 352}
GRID = TimeGrid(alpha=0.125, s_enc=24, s_ant=16)  # T = 40
SEGMENTS, PER_VIDEO, SPACING, BATCH = 1024, 128, 30, 128  # spacing in frames (1 s at 30 fps)
EPOCH = 4096  # samples per timed pass (32 batches, the segments repeated), as in a long epoch
WORKERS = (0, 2, 4)
PASSES = 3  # timed passes per measurement; the fastest is reported


def segments(count: int) -> list[Segment]:
    """`count` labelled segments, `PER_VIDEO` per video, one second apart."""
    first = int(np.ceil(GRID.alpha * (GRID.steps + 1) * GRID.fps)) + 1
    return [
        Segment(f"{i}", f"P01_{i // PER_VIDEO:02d}", first + SPACING * (i % PER_VIDEO),
                first + SPACING * (i % PER_VIDEO) + 60, verb=0, noun=0, action=i % 2513)
        for i in range(count)
    ]  # fmt: skip


def write_store(folder: Path, planned: list[Segment]) -> dict[str, int]:
    """Random vectors for every frame the grid reads, one LMDB store per modality."""
    rng = np.random.default_rng(0)
    frames = {(s.video, int(f)) for s in planned for f in GRID.frames(s.start_frame)}
    for modality, dim in DIMS.items():
        with FeatureStoreWriter(folder / modality, map_size=1 << 30) as writer:
            for video, frame in sorted(frames):
                writer.put(video, frame, rng.standard_normal(dim, dtype=np.float32))
    return {"frames": len(frames)}


def samples_per_second(dataset: AnticipationDataset, workers: int, device: str) -> float:
    """The fastest of `PASSES` timed passes of `EPOCH` samples after a warm-up pass (workers
    started, pages cached): the best pass is the one least disturbed by other processes on a
    shared machine. On CUDA the batches are pinned (page-locked) as training pins them, not
    copied to the GPU."""
    epoch = Subset(dataset, [i % len(dataset) for i in range(EPOCH)])
    loader = create_loader(
        epoch, batch_size=BATCH, device=torch.device(device), workers=workers, persistent=True
    )
    for _ in loader:
        pass
    best = 0.0
    for _ in range(PASSES):
        began, seen = time.perf_counter(), 0
        for batch in loader:
            seen += len(batch["action"])
        best = max(best, seen / (time.perf_counter() - began))
    return best


def run(
    segment_count: int = SEGMENTS, workers: tuple[int, ...] = WORKERS, device: str = "cpu"
) -> dict[str, Any]:
    """Samples/s per consumer and worker count: {"loader": {"fast branch rgb@0.125":
    {"0": ..., "2": ..., "4": ...}, "fast branch rgb@0.125, preloaded": {...},
    "rgb+flow+obj@0.125": {...}, "rgb+flow+obj@0.125, preloaded": {...}}, "setup": {...}}
    (`setup["table_bytes"]`: the preloaded tables' sizes).

    `device` "cuda" pins the batches in page-locked memory (as training on a GPU does)."""
    planned = segments(segment_count)
    with tempfile.TemporaryDirectory(prefix="sfr-bench-loader-") as tmp:
        root = Path(tmp)
        setup = write_store(root, planned)
        stores = open_stores(root, DIMS)
        consumers = {
            "fast branch rgb@0.125": [Stream("rgb", GRID)],
            "rgb+flow+obj@0.125": [Stream(m, GRID) for m in DIMS],
        }
        results: dict[str, dict[str, float]] = {}
        table_bytes: dict[str, int] = {}
        for name, streams in consumers.items():
            for preload in (False, True):
                dataset = AnticipationDataset(planned, streams, stores, preload=preload)
                label = f"{name}, preloaded" if preload else name
                results[label] = {str(w): samples_per_second(dataset, w, device) for w in workers}
                if preload:
                    table_bytes[label] = dataset.preloaded_bytes
    return {
        "loader": results,
        "setup": {
            **setup,
            "segments": segment_count,
            "samples_per_pass": EPOCH,
            "batch": BATCH,
            "steps": GRID.steps,
            "alpha": GRID.alpha,
            "dims": DIMS,
            "cpus": os.cpu_count(),
            "device": device,
            "table_bytes": table_bytes,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--segments", type=int, default=SEGMENTS)
    parser.add_argument("--device", default="cpu", help="cuda: pin the batches, as on a GPU")
    args = parser.parse_args()
    result = run(args.segments, device=args.device)
    print(
        f"Loader alone, {args.segments} segments, T = {GRID.steps}, batch {BATCH}, "
        f"{os.cpu_count()} CPUs, {'pinned' if args.device == 'cuda' else 'pageable'} (samples/s)"
    )
    print(f"{'consumer':<38}" + "".join(f"{f'{w} workers':>12}" for w in WORKERS))
    for name, rates in result["loader"].items():
        print(f"{name:<38}" + "".join(f"{rates[str(w)]:>12,.0f}" for w in WORKERS))
    for name, size in result["setup"]["table_bytes"].items():
        print(f"table of {name}: {size / 2**20:,.1f} MiB")


if __name__ == "__main__":
    main()
