"""The extraction loop: decode in worker threads, encode in batches, commit to the store as it goes.

    worker threads (one video each)                 main thread
    read frames → prepare (resize, crop) ─┐
    read frames → prepare ────────────────┼─ queue ─→ batch of clips → encode → LMDB commit
    read frames → prepare ────────────────┘          (record updated as each video completes)

Decoding and resizing release the GIL (PyAV, pillow, torch), so `workers` threads keep the
backbone fed. Every batch is committed in one LMDB transaction: a kill leaves whole vectors only,
and a rerun skips the keys already in the store (the record beside the store says which videos
are complete, so a finished video is not even decoded again). A video that cannot be read is
reported and skipped; the others go on.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np
import torch
from torch import Tensor

from sfr.data.provenance import (
    RECORD_NAME,
    StoreRecord,
    VideoProgress,
    check_same_maker,
    read_record,
    write_record,
)
from sfr.data.store import FeatureStoreWriter, lmdb_problem
from sfr.errors import DataError, SfrError, counted
from sfr.features.encoder import Encoder
from sfr.features.plan import FramePlan
from sfr.features.sources import FrameReader
from sfr.files import check_writable_dir, remove_stale_temp_files


@dataclass(frozen=True)
class VideoJob:
    """One video to extract: its name in the keys and how to open its frames (in a worker)."""

    name: str
    open: Callable[[], FrameReader]
    source: str  # path shown in messages
    decoder: str | None = None  # "pyav" or "torchcodec" for a video file, recorded with the store


# Progress events (the CLI renders them; the core never prints).
@dataclass(frozen=True)
class ExtractionStarted:
    videos: int
    frames: int | None  # frames to extract over all videos (None: unknown)
    skipped_videos: int  # complete in the store already


@dataclass(frozen=True)
class VideoStarted:
    video: str
    frames: int | None  # frames to extract in this video (None: unknown)
    present: int  # frames of this video already in the store


@dataclass(frozen=True)
class FramesWritten:
    video_counts: dict[str, int]  # frames written per video in this batch
    written: int  # frames written in this run so far
    frames_per_s: float


@dataclass(frozen=True)
class VideoFinished:
    video: str
    written: int
    seconds: float


@dataclass(frozen=True)
class VideoFailed:
    video: str
    message: str


@dataclass(frozen=True)
class VideoNotice:
    video: str
    message: str


ExtractionEvent = (
    ExtractionStarted | VideoStarted | FramesWritten | VideoFinished | VideoFailed | VideoNotice
)


@dataclass
class ExtractionResult:
    """What a run did: vectors written, videos completed, skipped or failed (with reasons)."""

    backbone: str = ""
    dim: int = 0
    written: int = 0
    completed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    notices: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def frames_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Todo:
    """A video to extract: the frames already stored, and its keyed frames (None: all)."""

    job: VideoJob
    have: set[int]
    keyed: list[int] | None


@dataclass(frozen=True)
class _Item:
    video: str
    frame: int
    clip: tuple[Tensor, ...]


@dataclass(frozen=True)
class _Done:
    video: str
    queued: int
    frames_seen: int
    started: float


@dataclass(frozen=True)
class _Failed:
    video: str
    message: str


_STOP = object()


def extract_features(
    *,
    jobs: Sequence[VideoJob],
    encoder: Encoder,
    plan: FramePlan,
    out: Path,
    record: StoreRecord,
    batch_size: int = 16,
    workers: int = 2,
    progress: Callable[[ExtractionEvent], None] = lambda event: None,
) -> ExtractionResult:
    """Extract the vectors of `jobs` into the store folder `out`, skipping those already there.

    `record` describes this extraction (backbone, weights, preprocessing, dimension); a store
    made another way is refused before anything is written (DataError), and so is a store
    without a record (a public one, or not made by sfr). Returns what was done; a video that
    fails (undecodable, gap in its frames, frames past its end) is listed in `failed` and the
    others go on. Raises DataError when the store cannot be written (full disk: rerun to resume).
    """
    out = Path(out)
    check_writable_dir(out, "store (--out)")
    remove_stale_temp_files(out, RECORD_NAME)  # of record writes killed midway
    if batch_size < 1 or workers < 1:
        raise DataError("--batch-size and --workers must be at least 1.")
    record = _open_record(out, record)
    result = ExtractionResult(backbone=record.backbone, dim=record.dim)
    started = time.perf_counter()
    try:
        writer = FeatureStoreWriter(out, commit_every=1 << 30)
    except lmdb.Error as error:
        raise _store_error(out, error) from None
    try:
        label = "+".join(plan.labels)
        todo: list[_Todo] = []
        for job in jobs:
            done = record.videos.get(job.name)
            if done is not None and done.complete and done.layout in (label, "full"):
                result.skipped.append(job.name)  # every frame is there, or this plan's
                continue
            keyed = plan.keyed(job.name)
            if keyed == []:
                notice = VideoNotice(job.name, "no annotated action: nothing to extract")
                result.notices.append((notice.video, notice.message))
                progress(notice)
                continue
            todo.append(_Todo(job, _present_frames(writer, job.name), keyed))
        progress(ExtractionStarted(len(todo), None, len(result.skipped)))
        _run(todo, encoder, plan, writer, record, label, out, batch_size, workers, progress, result)
    finally:
        writer_close_error = _close(writer, out)
        result.seconds = time.perf_counter() - started
    if writer_close_error is not None:
        raise writer_close_error
    return result


def _open_record(out: Path, record: StoreRecord) -> StoreRecord:
    """The store's record, checked against this extraction; a new store gets `record`."""
    existing = read_record(out)
    if existing is None:
        if (out / "data.mdb").is_file() and (out / "data.mdb").stat().st_size > 0:
            raise DataError(
                f"{out} already holds a feature store that sfr features did not write (no "
                f"{out / 'sfr-features.json'}): vectors made two ways are never mixed.",
                "Write to another --out folder.",
            )
        write_record(out, record)
        return record
    check_same_maker(existing, record, out)
    for label in record.layouts:
        if label not in existing.layouts:
            existing.layouts.append(label)
    existing.sfr_version = record.sfr_version
    existing.weights = record.weights
    write_record(out, existing)
    return existing


def _present_frames(writer: FeatureStoreWriter, video: str) -> set[int]:
    """Frames of `video` already in the store (one cursor scan of its key range)."""
    prefix = f"{video}_frame_".encode()
    frames: set[int] = set()
    with writer.env.begin() as txn:
        cursor = txn.cursor()
        if cursor.set_range(prefix):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    break
                digits = key[len(prefix) :].split(b".")[0]
                if digits.isdigit():
                    frames.add(int(digits))
    return frames


def _run(
    todo: list[_Todo],
    encoder: Encoder,
    plan: FramePlan,
    writer: FeatureStoreWriter,
    record: StoreRecord,
    label: str,
    out: Path,
    batch_size: int,
    workers: int,
    progress: Callable[[ExtractionEvent], None],
    result: ExtractionResult,
) -> None:
    """Producer threads over the videos, the consumer (encode + write) in this thread."""
    jobs: queue.Queue = queue.Queue()
    for entry in todo:
        jobs.put(entry)
    items: queue.Queue = queue.Queue(maxsize=max(4 * batch_size, 8))
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_worker, args=(jobs, items, encoder, plan, stop, progress), daemon=True
        )
        for _ in range(min(workers, max(1, len(todo))))
    ]
    for thread in threads:
        jobs.put(_STOP)
        thread.start()
    batch: list[_Item] = []
    queued: dict[str, _Done] = {}
    written: dict[str, int] = {}
    present = {entry.job.name: len(entry.have) for entry in todo}
    decoders = {entry.job.name: entry.job.decoder for entry in todo}
    finished_threads = 0
    start = time.perf_counter()

    def write_batch() -> None:
        vectors = encoder.encode(encoder.collate([item.clip for item in batch]))
        counts: dict[str, int] = {}
        try:
            for item, vector in zip(batch, vectors):
                writer.put(item.video, item.frame, vector)
                counts[item.video] = counts.get(item.video, 0) + 1
            writer.flush()
        except lmdb.Error as error:
            raise _store_error(out, error) from None
        for video, count in counts.items():
            written[video] = written.get(video, 0) + count
        result.written += len(batch)
        batch.clear()
        elapsed = time.perf_counter() - start
        progress(FramesWritten(counts, result.written, result.written / max(elapsed, 1e-9)))
        complete_videos()

    def complete_videos() -> None:
        for video, done in list(queued.items()):
            if written.get(video, 0) >= done.queued:
                del queued[video]
                record.videos[video] = VideoProgress(
                    frames=present[video] + written.get(video, 0),
                    complete=True,
                    layout=label,
                    decoder=decoders.get(video),
                )
                write_record(out, record)
                result.completed.append(video)
                progress(VideoFinished(video, written.get(video, 0), time.time() - done.started))

    try:
        while finished_threads < len(threads):
            message = items.get()
            if message is _STOP:
                finished_threads += 1
            elif isinstance(message, _Item):
                batch.append(message)
                if len(batch) >= batch_size:
                    write_batch()
            elif isinstance(message, _Done):
                queued[message.video] = message
                if not any(item.video == message.video for item in batch):
                    complete_videos()
            elif isinstance(message, _Failed):
                result.failed.append((message.video, message.message))
                progress(VideoFailed(message.video, message.message))
            elif isinstance(message, VideoNotice):
                result.notices.append((message.video, message.message))
                progress(message)
        if batch:
            write_batch()
    finally:
        stop.set()
        while True:  # unblock workers waiting on a full queue so they see the stop flag
            try:
                items.get_nowait()
            except queue.Empty:
                break


def _worker(
    jobs: queue.Queue,
    items: queue.Queue,
    encoder: Encoder,
    plan: FramePlan,
    stop: threading.Event,
    progress: Callable[[ExtractionEvent], None],
) -> None:
    """Take videos from `jobs` until the stop marker; put their clips on `items`."""
    # Parallelism comes from the worker threads themselves: the torch ops of one frame's
    # preparation run on this thread alone (the setting is per thread), so N workers never
    # start N intra-op thread teams that fight each other and the backbone for the cores.
    torch.set_num_threads(1)
    while not stop.is_set():
        entry = jobs.get()
        if entry is _STOP:
            break
        job = entry.job
        try:
            _extract_video(entry, items, encoder, plan, stop, progress)
        except _Stopped:
            break
        except SfrError as error:
            try:
                _put(items, _Failed(job.name, str(error)), stop)
            except _Stopped:
                break
        except Exception as error:  # one broken video must not end a run over hundreds
            message = f"{type(error).__name__}: {error} ({job.source})"
            try:
                _put(items, _Failed(job.name, message), stop)
            except _Stopped:
                break
    _put(items, _STOP, stop, always=True)


def _put(items: queue.Queue, message: object, stop: threading.Event, always: bool = False) -> None:
    while True:
        if stop.is_set() and not always:
            raise _Stopped
        try:
            items.put(message, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set() and always:
                return


class _Stopped(Exception):
    """The consumer stopped (error or Ctrl-C): the worker drops its video."""


def _extract_video(
    entry: _Todo,
    items: queue.Queue,
    encoder: Encoder,
    plan: FramePlan,
    stop: threading.Event,
    progress: Callable[[ExtractionEvent], None],
) -> None:
    """Decode one video and queue the clip of every keyed frame not yet in the store."""
    started = time.time()
    job, have, keyed = entry.job, entry.have, entry.keyed
    if keyed is not None:
        wanted_keys = [k for k in keyed if k not in have]
        if not wanted_keys:
            _put(items, _Done(job.name, 0, 0, started), stop)
            return
        reader = job.open()
        progress(VideoStarted(job.name, len(wanted_keys), len(have)))
        needed = sorted({f for k in wanted_keys for f in encoder.clip(k)})
        todo: set[int] | None = set(wanted_keys)
        frames: Iterator[tuple[int, np.ndarray]] = reader.read(needed)
    else:
        reader = job.open()
        count = reader.frame_count()
        estimate = None
        if count is not None:
            estimate = sum(1 for f in range(1, count + 1) if plan.keeps(f) and f not in have)
        progress(VideoStarted(job.name, estimate, len(have)))
        todo = None
        frames = reader.read(None)
    offset = encoder.clip(_FAR)[0] - _FAR  # oldest clip frame relative to the keyed one (≤ 0)
    stride = _clip_stride(encoder)
    cache: dict[int, Tensor] = {}
    produced: set[int] = set()
    seen = last = 0
    for frame, image in frames:
        if stop.is_set():
            raise _Stopped
        seen += 1
        last = frame
        if todo is not None:
            is_key, needed_later = frame in todo, offset < 0
        else:
            is_key = plan.keeps(frame) and frame not in have
            needed_later = frame == 1 or any(
                plan.keeps(k) and k not in have for k in range(frame, frame - offset + 1, stride)
            )
        if is_key or (offset < 0 and needed_later):
            cache[frame] = encoder.prepare(image)
        if is_key:
            try:
                clip = tuple(cache[f] for f in encoder.clip(frame))
            except KeyError as missing:
                raise DataError(
                    f"{job.source}: frame {missing.args[0]} was not decoded, but the input of "
                    f"frame {frame} needs it."
                ) from None
            _put(items, _Item(job.name, frame, clip), stop)
            produced.add(frame)
        for old in [f for f in cache if f <= frame + offset and f != 1]:
            del cache[old]  # no later keyed frame reads it
    if offset < 0 and 0 < last <= -offset and produced:
        _put(
            items,
            VideoNotice(
                job.name,
                f"{counted(last, 'frame')}, shorter than one clip ({counted(1 - offset, 'frame')}): "
                "its clips repeat "
                "frame 1, as the time grids pad a video's start with its earliest frame.",
            ),
            stop,
        )
    if todo is not None and len(produced) < len(todo):
        missing = sorted(todo - produced)
        count = reader.frame_count()
        length = f", {counted(count, 'frame')} at 30 fps" if count else ""
        written = f"; vectors were written for the other {len(produced)}" if produced else ""
        raise DataError(
            f"{job.source}: {len(missing)} of the frames the time grids read lie past the end of "
            f"the video (it ends before frame {missing[0]}{length}){written}.",
            "Check that the annotations belong to this video and its frame rate (keys are 30 fps "
            "frame numbers).",
        )
    _put(items, _Done(job.name, len(produced), seen, started), stop)


_FAR = 10**9


def _clip_stride(encoder: Encoder) -> int:
    """Frames between consecutive clip frames (1 for single-frame inputs)."""
    clip = encoder.clip(_FAR)
    return clip[1] - clip[0] if len(clip) > 1 else 1


def _store_error(out: Path, error: lmdb.Error) -> DataError:
    cause, hint = lmdb_problem(out, error, writing=True)
    return DataError(
        f"The feature store {out} cannot be written: {cause}.",
        f"{hint} The vectors written so far are kept: the next run skips them.",
    )


def _close(writer: FeatureStoreWriter, out: Path) -> DataError | None:
    try:
        writer.close()
    except lmdb.Error as error:
        return _store_error(out, error)
    return None
