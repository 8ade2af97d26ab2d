"""`sfr features merge`: the stores of several shards (machines, GPUs) into one store.

Every shard must have been made the same way (the records agree on backbone, weights,
preprocessing, dimension and frame rate); their vectors are copied key by key in batched
transactions, a key present in two stores must hold the same bytes, and the merged record lists
every video of every shard. Rerunning a merge after a kill copies what is still missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb

from sfr.data.provenance import RECORD_NAME, StoreRecord, read_record, write_record
from sfr.data.store import lmdb_problem
from sfr.errors import DataError, counted
from sfr.files import check_writable_dir, remove_stale_temp_files

_BATCH = 4096


@dataclass(frozen=True)
class MergeResult:
    copied: int  # keys written into the merged store
    present: int  # keys it held already (same bytes)
    videos: int  # videos in the merged record


def merge_stores(
    out: Path,
    shards: Sequence[Path],
    progress: Callable[[Path, int], None] = lambda shard, copied: None,
) -> MergeResult:
    """Copy every vector of `shards` into the store `out` (created if needed).

    Raises DataError when a shard is not a store written by `sfr features`, when the shards (or
    `out`) were made differently, or when one key holds different vectors in two stores.
    """
    out = Path(out)
    if not shards:
        raise DataError("Nothing to merge: name the shard stores after the output store.")
    records = [(Path(s), _shard_record(Path(s))) for s in shards]
    seen: set[Path] = set()
    for path, _ in records:
        if path.resolve() == out.resolve():
            raise DataError(f"{path} is both a shard and the output store.")
        if path.resolve() in seen:
            raise DataError(f"{path} is named twice among the shards.")
        seen.add(path.resolve())
    merged = read_record(out)
    if merged is None and (out / "data.mdb").is_file():
        raise DataError(
            f"{out} holds a feature store that sfr features did not write: refusing to merge "
            "into it.",
            "Merge into a new folder.",
        )
    reference_path, reference = records[0] if merged is None else (out, merged)
    for path, record in records:
        _check_mergeable(reference_path, reference, path, record)
        _check_complete(path, record)
    merged = merged or reference.model_copy(deep=True, update={"videos": {}, "layouts": []})
    check_writable_dir(out, "merged store")
    remove_stale_temp_files(out, RECORD_NAME)  # of record writes killed midway
    copied = present = 0
    try:
        target = lmdb.open(str(out), map_size=1 << 34, subdir=True)
    except lmdb.Error as error:
        cause, hint = lmdb_problem(out, error, writing=True)
        raise DataError(f"Cannot open the merged store {out}: {cause}.", hint) from None
    try:
        for path, record in records:
            shard_copied, shard_present = _copy(path, target, out)
            copied += shard_copied
            present += shard_present
            progress(path, shard_copied)
            _merge_record(merged, record)
            write_record(out, merged)
    finally:
        target.close()
    return MergeResult(copied, present, len(merged.videos))


def _open_shard(path: Path) -> lmdb.Environment:
    """A shard store opened read-only; DataError naming it when LMDB cannot open it."""
    try:
        return lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    except lmdb.Error as error:
        cause, hint = lmdb_problem(path, error)
        raise DataError(f"Cannot open the shard store {path}: {cause}.", hint) from None


def _check_complete(path: Path, record: StoreRecord) -> None:
    """DataError when a shard holds vectors of a video its record does not mark complete (an
    interrupted or failed extraction): its vectors would enter the merged store unrecorded."""
    complete = {video for video, done in record.videos.items() if done.complete}
    unfinished: set[str] = set()
    source = _open_shard(path)
    try:
        with source.begin() as read:
            for key in read.cursor().iternext(values=False):
                video = bytes(key).decode("utf-8", "replace").rsplit("_frame_", 1)[0]
                if video not in complete:
                    unfinished.add(video)
    finally:
        source.close()
    if unfinished:
        names = sorted(unfinished)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise DataError(
            f"{path} holds vectors of {counted(len(names), 'video')} whose extraction did not finish "
            f"({shown}): nothing was merged.",
            "Run that shard's sfr features command again (it resumes and completes them, or "
            "names the videos that fail), then merge.",
        )


def _check_mergeable(first_path: Path, first: StoreRecord, path: Path, record: StoreRecord) -> None:
    """DataError naming both stores and the first field in which their makers differ."""
    if first.layouts and sorted(record.layouts) != sorted(first.layouts):
        raise DataError(
            f"{path} (layouts {', '.join(record.layouts)}) cannot be merged with {first_path} "
            f"(layouts {', '.join(first.layouts)}): shards of one extraction share one layout.",
            "Merge only the shards of one extraction (the same command with --shard I/N).",
        )
    for field, value in first.identity().items():
        other = record.identity()[field]
        if other != value:
            raise DataError(
                f"{path} ({field} = {other!r}) cannot be merged with {first_path} ({field} = "
                f"{value!r}): stores made two ways are never mixed.",
                "Merge only the shards of one extraction (the same command with --shard I/N).",
            )


def _shard_record(path: Path) -> StoreRecord:
    record = read_record(path)
    if record is None or not (path / "data.mdb").is_file():
        raise DataError(
            f"{path} is not a feature store written by sfr features (no data.mdb with "
            "sfr-features.json beside it).",
            "Pass the --out folders of the sharded runs.",
        )
    return record


def _merge_record(merged: StoreRecord, shard: StoreRecord) -> None:
    for label in shard.layouts:
        if label not in merged.layouts:
            merged.layouts.append(label)
    for video, progress in shard.videos.items():
        known = merged.videos.get(video)
        if known is None or (progress.complete and not known.complete):
            merged.videos[video] = progress.model_copy()


def _copy(shard: Path, target: lmdb.Environment, out: Path) -> tuple[int, int]:
    """Copy the shard's keys into `target` in batches; (copied, already present)."""
    copied = present = 0
    source = _open_shard(shard)
    try:
        with source.begin() as read:
            cursor = read.cursor()
            batch: list[tuple[bytes, bytes]] = []
            for key, value in cursor:
                batch.append((bytes(key), bytes(value)))
                if len(batch) >= _BATCH:
                    c, p = _write(target, batch, shard, out)
                    copied, present, batch = copied + c, present + p, []
            if batch:
                c, p = _write(target, batch, shard, out)
                copied, present = copied + c, present + p
    finally:
        source.close()
    return copied, present


def _write(
    target: lmdb.Environment, batch: list[tuple[bytes, bytes]], shard: Path, out: Path
) -> tuple[int, int]:
    copied = present = 0
    while True:
        try:
            with target.begin(write=True) as txn:
                for key, value in batch:
                    old = txn.get(key)
                    if old is None:
                        txn.put(key, value)
                        copied += 1
                    elif bytes(old) != value:
                        raise DataError(
                            f"Key '{key.decode(errors='replace')}' holds different vectors in "
                            f"{shard} and {out}: the shards overlap and disagree.",
                            "Extract each video in one shard only (--shard I/N splits them).",
                        )
                    else:
                        present += 1
            return copied, present
        except lmdb.MapFullError:
            target.set_mapsize(target.info()["map_size"] * 2)
            copied = present = 0
        except lmdb.Error as error:
            cause, hint = lmdb_problem(out, error, writing=True)
            raise DataError(
                f"The merged store {out} cannot be written: {cause}.",
                f"{hint} The same merge run again copies only what is missing.",
            ) from None
