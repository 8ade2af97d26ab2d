"""LMDB feature stores in the public RU-LSTM format (DESIGN §2).

One LMDB environment per modality; key `f"{video}_frame_{frame:010d}.jpg"` (utf-8), value the raw
float32 vector. Readers open the environment lazily, so a store can be handed to DataLoader worker
processes (each opens its own handle), and read a whole sample in one transaction.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn

import lmdb
import numpy as np

from sfr.errors import DataError
from sfr.files import missing_reason

if TYPE_CHECKING:
    from sfr.data.provenance import StoreRecord


def frame_key(video: str, frame: int) -> str:
    """The public key of one frame's feature vector."""
    return f"{video}_frame_{frame:010d}.jpg"


class FeatureStore:
    """Read-only view of one modality's LMDB store, checking every vector's size."""

    def __init__(self, path: Path, dim: int, name: str | None = None) -> None:
        self.path = Path(path)
        self.dim = dim
        self.name = name or self.path.name
        self._env: lmdb.Environment | None = None
        self._pid: int | None = None
        data = self.path / "data.mdb"
        if data.exists() and not data.is_file():
            raise DataError(
                f"Feature store '{self.name}': {data} is a folder, not the LMDB data file.",
                f"Point the data folder at the one holding {self.name}/data.mdb.",
            )
        if not data.is_file():
            raise DataError(
                f"Feature store '{self.name}' not found: {data} {missing_reason(data)}.",
                f"Put the {self.name} LMDB folder (data.mdb) of the features under the data folder, "
                f"or fetch the public ones: sfr download features ek55|ek100|egtea --data DATA.",
            )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_env"] = None
        state["_pid"] = None
        return state

    @property
    def env(self) -> lmdb.Environment:
        """The LMDB environment, opened once per process (LMDB handles must not cross a fork)."""
        if self._env is None or self._pid != os.getpid():
            self._env = _open_readonly(self.path)
            self._pid = os.getpid()
        return self._env

    def read(
        self,
        video: str,
        frames: Sequence[int] | np.ndarray,
        sample_id: str = "?",
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Vectors of `frames` of `video` as a (len(frames), dim) float32 array, in one transaction.

        `out`, a (len(frames), dim) float32 array (e.g. a row of a batch, or a slice of a
        preloaded table), receives the vectors straight from LMDB's memory map: each value is
        copied once, as raw bytes, into its row. DataError if a key is missing, holds a vector of
        another dimension, or holds NaN or infinite values (naming `sample_id`).
        """
        if out is None or not out.flags.c_contiguous:
            target = np.empty((len(frames), self.dim), dtype=np.float32)
        else:
            target = out
        width = 4 * self.dim
        raw = memoryview(target).cast("B")
        numbers = np.asarray(frames).tolist()
        keys = [frame_key(video, frame).encode() for frame in numbers]
        with self.env.begin(buffers=True) as txn:
            start = 0
            for index, (key, value) in enumerate(zip(keys, map(txn.get, keys), strict=True)):
                if value is None or len(value) != width:
                    self._refuse(key.decode(), value, sample_id, video, int(numbers[index]))
                raw[start : start + width] = value
                start += width
        finite = np.isfinite(target).all(axis=1)
        if not finite.all():
            key = frame_key(video, int(frames[int(np.argmin(finite))]))
            raise DataError(
                f"Feature store '{self.name}' ({self.path}): key '{key}', needed by annotation id "
                f"{sample_id}, holds a vector with NaN or infinite values.",
                "Re-extract or re-download this store; its vectors must be finite.",
            )
        if out is not None and target is not out:
            out[...] = target
            return out
        return target

    def _refuse(
        self, key: str, value: memoryview | None, sample_id: str, video: str, frame: int
    ) -> NoReturn:
        """The DataError of a missing key or of a vector of the wrong size.

        A missing key of a video the store does not hold, or of a frame outside the video's
        frames, is the annotation's fault and is named so; only a frame inside the range points
        at the store (sparse, or an unfinished extraction).
        """
        if value is None:
            held = self.frame_range(video)
            record = self._record()
            done = record.videos.get(video) if record is not None else None
            unfinished = record is not None and (
                (done is None and held is not None) or (done is not None and not done.complete)
            )
            needed = f"needed by annotation id {sample_id}"
            if held is None and not unfinished:
                raise self.video_not_held(
                    video,
                    f", {needed}",
                    "Check the segment's video id in the CSV (written as in the feature keys, "
                    "P01_01), or point --data at the store that holds this video.",
                )
            if held is not None and not unfinished and not held[0] <= frame <= held[1]:
                side = "past the last" if frame > held[1] else "before the first"
                raise DataError(
                    f"Frame {frame} (key '{key}') is {side} frame ({held[0]}..{held[1]}) of "
                    f"video {video} in the {self.name} feature store ({self.path}), {needed}.",
                    "Check the segment's start_frame and end_frame in the CSV against the "
                    "video, or extract the store over the whole video.",
                )
            raise DataError(
                f"Feature store '{self.name}' ({self.path}) has no key '{key}', {needed}.",
                self._missing_key_hint(video),
            )
        raise DataError(
            f"Feature store '{self.name}' ({self.path}): key '{key}' holds a vector of "
            f"dimension {len(value) // 4}, expected {self.dim}.",
            "Set data.feature_dims for this modality to the store's dimension.",
        )

    def video_not_held(self, video: str, needed_by: str, hint: str) -> DataError:
        """The DataError of a video this store holds no frame of (`needed_by`: ", needed by …")."""
        return DataError(
            f"Video '{video}' is not in the {self.name} feature store ({self.path}){needed_by}.",
            hint,
        )

    def frame_range(self, video: str) -> tuple[int, int] | None:
        """First and last frame numbers the store holds for `video`; None if it holds none.

        Keys sort by frame (zero-padded), so two cursor moves find both ends.
        """
        prefix = f"{video}_frame_".encode()
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if not cursor.set_range(prefix) or not cursor.key().startswith(prefix):
                return None
            first = cursor.key()
            if cursor.set_range(prefix + b"~"):  # "~" sorts after every digit
                cursor.prev()
            else:
                cursor.last()
            last = cursor.key()
        return _frame_of(first, prefix), _frame_of(last, prefix)

    def _record(self) -> StoreRecord | None:
        """The sfr features record of this store; None for another store or an unreadable one."""
        from sfr.data.provenance import read_record

        try:
            return read_record(self.path)
        except DataError:
            return None

    def _missing_key_hint(self, video: str) -> str:
        """What to do about a missing key: finish the video's extraction, extract more frames
        (own store) or fetch a full one."""
        record = self._record()
        if record is not None:
            done = record.videos.get(video)
            if done is None or not done.complete:
                return (
                    f"sfr features did not finish the video {video} in this store (its "
                    "extraction failed or was stopped): run the sfr features command of this "
                    f"store again; it resumes, or says why {video} fails."
                )
            return (
                f"This store was extracted by sfr features for {', '.join(record.layouts)}: "
                f"extract this branch's frames into it too, e.g. sfr features {self.name} ... "
                f"--out {self.path} --annotations CSV... --grids ALPHA:S_ENC:S_ANT."
            )
        return (
            "The store may be a sparse one (the public EK55 sparse stores hold only the "
            "frames of the alpha 0.25 grid): other rates and early recognition (frames inside "
            "the actions) need the full-frame-rate store, "
            "sfr download features ek55 --full --data DATA."
        )

    def close(self) -> None:
        """Forget this store's handle (the shared environment stays open for other readers)."""
        self._env = None


def _frame_of(key: bytes, prefix: bytes) -> int:
    return int(key[len(prefix) :].split(b".")[0])


def _open_readonly(path: Path) -> lmdb.Environment:
    """One read-only environment per folder and process: LMDB refuses to open a folder twice.

    A forked DataLoader worker inherits its parent's handles, which LMDB forbids using after a
    fork; the worker closes its inherited copy (the parent's stays open) and opens its own.
    """
    key = (str(path.resolve()), os.getpid())
    for inherited in [k for k in _READERS if k[0] == key[0] and k[1] != key[1]]:
        _READERS.pop(inherited).close()
    if key not in _READERS:
        size = (path / "data.mdb").stat().st_size
        if size == 0:
            raise DataError(
                f"Feature store {path}: data.mdb is empty (0 bytes).",
                "The file was not written or was cut short (an interrupted copy or download): "
                "fetch or extract the store again.",
            )
        try:
            env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, max_readers=512)
            needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        except lmdb.Error as error:
            cause, hint = lmdb_problem(path, error)
            raise DataError(f"Cannot open feature store {path}: {cause}.", hint) from None
        if size < needed:
            env.close()
            # Reading a page past the end of a memory-mapped file kills the process (SIGBUS).
            raise DataError(
                f"Feature store {path} is truncated: data.mdb holds {size} bytes, its index "
                f"needs {needed}.",
                "The file was cut short (an interrupted copy or download): fetch it again.",
            )
        _READERS[key] = env
    return _READERS[key]


_READERS: dict[tuple[str, int], lmdb.Environment] = {}


class FeatureStoreWriter:
    """Writes vectors into a new or existing store in the public format, committing in batches."""

    def __init__(self, path: Path, commit_every: int = 4096, map_size: int = 1 << 34) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(self.path), map_size=map_size, subdir=True)
        self._commit_every = commit_every
        self._pending: list[tuple[bytes, bytes]] = []

    @property
    def env(self) -> lmdb.Environment:
        """The open environment (for reading keys already written)."""
        return self._env

    def put(self, video: str, frame: int, vector: np.ndarray) -> None:
        self._pending.append(
            (frame_key(video, frame).encode("utf-8"), np.asarray(vector, np.float32).tobytes())
        )
        if len(self._pending) >= self._commit_every:
            self.flush()

    def put_many(self, video: str, first_frame: int, vectors: np.ndarray) -> None:
        """Write consecutive frames `first_frame, first_frame + 1, ...` of one video."""
        for offset, vector in enumerate(vectors):
            self.put(video, first_frame + offset, vector)

    def flush(self) -> None:
        while self._pending:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value)
                self._pending.clear()
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)

    def close(self) -> None:
        self.flush()
        self._env.close()

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def lmdb_problem(path: Path, error: lmdb.Error, *, writing: bool = False) -> tuple[str, str]:
    """What an LMDB error on the store folder `path` means and what to do: (cause, hint).

    LMDB reports most failures as a bare errno text; each is named for what it is (the store
    already open in this process, permissions, a missing file, a full disk, a version mismatch)
    so that only a real sign of damage is called damage.
    """
    text = str(error)
    lowered = text.lower()
    if "already open in this process" in lowered:
        return (
            "it is already open in this process (LMDB opens an environment once per process)",
            "Close the other handle on this folder first (FeatureStoreWriter.close(), "
            "env.close()) or read through it; separate processes may open it together.",
        )
    if isinstance(error, lmdb.ReadonlyError) or any(
        words in lowered
        for words in ("permission denied", "read-only file system", "operation not permitted")
    ):
        need = "writable" if writing else "readable"
        return (
            f"permission denied ({text})",
            f"Make {path} and its files {need} by you, or copy the store to a folder you own.",
        )
    if "no such file or directory" in lowered:
        return (
            f"a file of the store is missing ({text})",
            f"Check that {path} is the store folder holding data.mdb (and lock.mdb, if the "
            "store was copied with its lock file).",
        )
    if isinstance(error, lmdb.MapFullError):
        return (
            f"its map size is used up ({text})",
            "Run the same command again (sfr grows the map as it writes); if it keeps "
            "failing, check the free disk space.",
        )
    if isinstance(error, lmdb.DiskError) or any(
        words in lowered for words in ("no space left", "quota exceeded", "file too large")
    ):
        return (
            f"the disk is full ({text})",
            "Free disk space (or use another folder) and run the same command again.",
        )
    if isinstance(error, (lmdb.VersionMismatchError, lmdb.IncompatibleError)):
        return (
            f"it was written by an incompatible LMDB version or build ({text})",
            "Copy it with the LMDB version that wrote it (mdb_dump / mdb_load), or fetch or "
            "extract it again with this one.",
        )
    if isinstance(error, lmdb.ReadersFullError):
        return (
            f"too many processes read it at once ({text})",
            "Use fewer DataLoader workers (--workers) or close other readers.",
        )
    if isinstance(error, lmdb.LockError) or "resource temporarily unavailable" in lowered:
        return (
            f"its lock file is held or unusable ({text})",
            "Wait for the process that writes it to finish, or remove a stale lock.mdb.",
        )
    if isinstance(
        error,
        (
            lmdb.InvalidError,
            lmdb.CorruptedError,
            lmdb.PanicError,
            lmdb.PageNotFoundError,
            lmdb.BadChecksumError,
        ),
    ):
        return (
            f"data.mdb is damaged or not an LMDB file ({text})",
            "Download or extract the store again.",
        )
    return (
        f"LMDB says: {text}",
        "Check the folder and its files (path, permissions, free space); if data.mdb was cut "
        "short or damaged, download or extract the store again.",
    )
