"""Object detections (one .npy per video) into the 352-d obj features of RU-LSTM.

The file format is that of the published EPIC-KITCHENS detections used by RU-LSTM (DESIGN §2):
`P01_01.npy` holds an object array with one `(m, 6)` float array per frame (frame i + 1 at
index i), columns class id, x1, y1, x2, y2, score. A regular `(frames, m, 6)` float array is
accepted too. The obj feature of a frame is, per class id, the sum of the scores of that class's
detections in the frame: the computation of RU-LSTM's example `FEATEXT/extract_example_obj.py`,
which loads such files with `np.load(..., allow_pickle=True, encoding='bytes')` because they were
pickled under Python 2.

Object arrays are pickles, and unpickling can run arbitrary code. These files are therefore read
with a restricted unpickler that builds only numpy arrays and dtypes; any other global in the
pickle (say `os.system`) is refused before anything runs.

Class ids: with `class_offset` 0 (RU-LSTM's files) every class id must lie in [0, classes).
`class_offset` k is for detectors that number their classes from k, keeping the ids below k for
background (Detectron-style models give background id 0, objects 1..352): feature index =
class id - k, and detections with an id in [0, k) are background and dropped, not an error.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from sfr.errors import DataError
from sfr.features.sources import (
    VideoInput,
    as_fraction,
    check_root,
    retimed_count,
    retimed_index,
    select_inputs,
    walk_folders,
    wanted_frames,
)

OBJ_CLASSES = 352
"""Dimension of the published obj features: EPIC-KITCHENS-55's noun classes."""

DETECTION_COLUMNS = 6
"""Columns of one detection: class id, x1, y1, x2, y2, score."""


def _numpy_core_multiarray() -> Any:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_core_multiarray()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class RefusedGlobal(Exception):
    """A pickle asked for a global outside the allowed numpy names."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module = module
        self.name = name


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dtypes and scalars, and nothing else.

    `find_class` resolves only `numpy.ndarray`, `numpy.dtype` and `_reconstruct` / `scalar` of
    `numpy.core.multiarray` (or numpy 2's `numpy._core.multiarray`): what `np.save` writes for an
    object array of float arrays. Any other global raises `RefusedGlobal` before it is imported,
    so nothing the pickle names is ever run.
    """

    def __init__(self, file: IO[bytes], *, encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding)
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise RefusedGlobal(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedGlobal("persistent_id", str(pid))


_NOTHING = object()


def load_detections(path: Path) -> np.ndarray | list[np.ndarray | None]:
    """The detections of one .npy file, without running any pickled code.

    Returns a regular `(frames, m, 6)` float array, or a list with one `(m, 6)` array per frame
    (None or an empty array for a frame without detections). Python 2 pickles (the published
    files) are read with encoding latin1, else bytes.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            try:
                version = np.lib.format.read_magic(file)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
                else:
                    raise DataError(
                        f"The detections file {path} is a .npy file of version "
                        f"{version[0]}.{version[1]}, which sfr does not read.",
                        "Save it again with numpy.save (format 1.0 or 2.0).",
                    )
            except ValueError as error:
                raise DataError(
                    f"The detections file {path} is not a .npy file: {error}.",
                    "Give the detections as one numpy .npy file per video (P01_01.npy).",
                ) from None
            if not dtype.hasobject:
                array = np.load(path, allow_pickle=False)
                return _regular(array, path)
            start = file.tell()
            content: Any = _NOTHING
            last_error: Exception | None = None
            for encoding in ("latin1", "bytes"):
                file.seek(start)
                try:
                    content = NumpyOnlyUnpickler(file, encoding=encoding).load()
                    break
                except RefusedGlobal as refused:
                    raise DataError(
                        f"The detections file {path} asks to load '{refused}', which is not part "
                        "of a numpy array; it was refused and nothing in the file was run.",
                        "Detection files hold only numpy arrays: this file may be malicious or "
                        "not a detections file. Get it again from a source you trust.",
                    ) from None
                except Exception as error:  # a damaged pickle fails in many ways
                    last_error = error
            if content is _NOTHING:
                raise DataError(
                    f"The detections file {path} cannot be read: {last_error}.",
                    "The file is damaged or not a detections file: get it again.",
                )
    except OSError as error:
        raise DataError(
            f"Cannot read the detections file {path}: {error.strerror or error}.",
            "Check that the file exists and that you can read it.",
        ) from None
    return _object_rows(content, shape, fortran, path)


def _regular(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim != 3 or array.shape[2] != DETECTION_COLUMNS:
        raise DataError(
            f"The detections file {path} holds an array of shape {array.shape}; expected "
            f"(frames, m, {DETECTION_COLUMNS}) or an object array of (m, {DETECTION_COLUMNS}) "
            "arrays.",
            "Columns are class id, x1, y1, x2, y2, score; one row of detections per frame.",
        )
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(
            f"The detections file {path} holds {array.dtype} values, not numbers.",
            "Save the detections as a float array.",
        )
    return array


def _object_rows(
    content: Any, shape: tuple[int, ...], fortran: bool, path: Path
) -> list[np.ndarray | None]:
    if not isinstance(content, np.ndarray):
        raise DataError(
            f"The detections file {path} holds a {type(content).__name__}, not an array.",
            "Save the detections with numpy.save(path, array, allow_pickle=True).",
        )
    if content.shape != tuple(shape):  # np.save stores the array itself: shapes agree
        content = content.reshape(shape, order="F" if fortran else "C")
    if content.ndim != 1:
        if content.dtype == object:
            raise DataError(
                f"The detections file {path} holds an object array of shape {content.shape}; "
                f"expected one (m, {DETECTION_COLUMNS}) array per frame (a 1-D object array).",
                "Save a 1-D object array with one detections array per frame.",
            )
        return list(_regular(np.asarray(content, dtype=np.float64), path))
    return [None if item is None else item for item in content]


def _frame_rows(item: Any, path: Path | str, frame: int) -> np.ndarray:
    """One frame's detections as an `(m, 6)` float64 array (m may be 0)."""
    if item is None:
        return np.zeros((0, DETECTION_COLUMNS))
    try:
        rows = np.asarray(item, dtype=np.float64)
    except (TypeError, ValueError):
        rows = None
    if rows is None or rows.size == 0:
        if rows is not None:
            return np.zeros((0, DETECTION_COLUMNS))
        raise DataError(
            f"Frame {frame} of the detections {path} holds {type(item).__name__} values, "
            "not numbers.",
            "Each frame's detections must be an (m, 6) float array.",
        )
    if rows.ndim == 1 and rows.shape[0] == DETECTION_COLUMNS:
        rows = rows[None]
    if rows.ndim != 2 or rows.shape[1] != DETECTION_COLUMNS:
        raise DataError(
            f"Frame {frame} of the detections {path} has shape {rows.shape}; expected "
            f"(m, {DETECTION_COLUMNS}).",
            "Columns are class id, x1, y1, x2, y2, score.",
        )
    return rows


def frame_feature(
    item: Any,
    *,
    classes: int = OBJ_CLASSES,
    class_offset: int = 0,
    source: Path | str = "the detections",
    frame: int = 1,
) -> np.ndarray:
    """The `(classes,)` float32 obj feature of one frame's `(m, 6)` detections.

    Per class (class id - class_offset), the sum of the scores; ids in [0, class_offset) are
    background and dropped; rows with score 0 add nothing and are skipped (padding of regular
    arrays). Any other id outside [0, classes) is a DataError naming `source`, frame and id.
    """
    rows = _frame_rows(item, source, frame)
    feature = np.zeros(classes, dtype=np.float64)
    rows = rows[rows[:, 5] != 0]
    if not rows.shape[0]:
        return feature.astype(np.float32)
    if not np.all(np.isfinite(rows[:, [0, 5]])):
        raise DataError(
            f"Frame {frame} of {source} has a detection whose class id or score is not a number.",
            "The detections file is damaged: get it again.",
        )
    fractional = rows[:, 0] != np.floor(rows[:, 0])
    if fractional.any():
        raise DataError(
            f"Frame {frame} of {source} has the class id {rows[fractional, 0][0]}, which is not "
            "a whole number.",
            "Column 0 of each detection is its class id.",
        )
    ids = rows[:, 0].astype(np.int64)
    background = (ids >= 0) & (ids < class_offset)
    index = ids - class_offset
    outside = ~background & ((index < 0) | (index >= classes))
    if outside.any():
        bad = int(ids[outside][0])
        hint = f"Feature index = class id - class offset must lie in [0, {classes})."
        if class_offset == 0 and bad == classes:
            hint += (
                f" Ids reach {classes}: the detector seems to number its classes from 1; "
                "pass --class-offset 1."
            )
        else:
            hint += " Check --classes and --class-offset against the detector's class list."
        raise DataError(
            f"Frame {frame} of {source} has a detection of class id {bad}, outside the "
            f"{classes} classes (class offset {class_offset}).",
            hint,
        )
    keep = ~background
    np.add.at(feature, index[keep], rows[keep, 5])
    return feature.astype(np.float32)


def object_features(
    detections: np.ndarray | Sequence[Any],
    *,
    classes: int = OBJ_CLASSES,
    class_offset: int = 0,
    source: Path | str = "the detections",
) -> np.ndarray:
    """The `(frames, classes)` float32 obj features of per-frame detections.

    `detections` is one `(m, 6)` array per frame (a list or object array, frame i + 1 at
    index i) or a `(frames, m, 6)` array; row i of the result is frame i + 1's per-class sum of
    scores (see `frame_feature`). `source` names the file in error messages.
    """
    if classes < 1:
        raise ValueError(f"classes must be positive, got {classes}")
    if class_offset < 0:
        raise ValueError(f"class_offset must not be negative, got {class_offset}")
    out = np.zeros((len(detections), classes), dtype=np.float32)
    for i, item in enumerate(detections):
        out[i] = frame_feature(
            item, classes=classes, class_offset=class_offset, source=source, frame=i + 1
        )
    return out


class DetectionsReader:
    """The obj features of one video's detections file, frame by frame.

    `read` yields `(frame, (classes,) float32)` for each wanted frame (1-based; all when None);
    frames past the end of the file are not yielded. The file is loaded on first use.
    """

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        classes: int = OBJ_CLASSES,
        class_offset: int = 0,
        fps: float = 30.0,
        source_fps: float | None = None,
    ) -> None:
        if classes < 1 or class_offset < 0:
            raise ValueError(f"bad classes={classes} or class_offset={class_offset}")
        self.path = Path(path)
        self.name = name
        self.classes = classes
        self.class_offset = class_offset
        self.fps = as_fraction(fps)
        self.source_fps = self.fps if source_fps is None else as_fraction(source_fps)
        self._detections: np.ndarray | list[np.ndarray | None] | None = None

    def _load(self) -> np.ndarray | list[np.ndarray | None]:
        if self._detections is None:
            self._detections = load_detections(self.path)
        return self._detections

    def frame_count(self) -> int:
        """The number of keyed frames (exact): the file's frames, re-timed to `fps` if needed."""
        return retimed_count(len(self._load()), self.fps, self.source_fps)

    def read(self, wanted: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(frame, (classes,) float32 obj feature)` for each wanted frame.

        Detections made at `source_fps` (every frame of a 60 fps video, say) are re-timed as
        videos are: keyed frame n takes the detections of the frame on screen at (n - 1) / fps.
        """
        detections = self._load()
        count = self.frame_count()
        frames = wanted_frames(wanted)
        numbers = range(1, count + 1) if frames is None else frames
        for frame in numbers:
            if frame > count:
                return
            index = retimed_index(frame, self.fps, self.source_fps)
            yield (
                frame,
                frame_feature(
                    detections[index - 1],
                    classes=self.classes,
                    class_offset=self.class_offset,
                    source=self.path,
                    frame=index,
                ),
            )


def discover_detections(root: Path, *, names: Sequence[str] | None = None) -> list[VideoInput]:
    """The detections files (`P01_01.npy`) under `root`, found recursively, named by stem.

    `root` may also be one .npy file. Sorted by name; duplicate names are an error naming both;
    `names` filters as in `discover_videos`.
    """
    root = check_root(root, "detections")
    found: list[VideoInput] = []
    if root.is_file():
        if root.suffix.lower() != ".npy":
            raise DataError(
                f"{root} is not a detections file (expected VIDEO.npy).",
                "Give a detections file or a folder of them (P01_01.npy, ...).",
            )
        found.append(VideoInput(root.stem, root, "detections"))
    else:
        for folder, _dirs, files in walk_folders(root):
            for file in files:
                if file.lower().endswith(".npy"):
                    found.append(VideoInput(Path(file).stem, folder / file, "detections"))
    return select_inputs(found, names, root, "detection files")
