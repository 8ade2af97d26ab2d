"""Object detections (.npy per video) into obj features, read without running pickled code."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from sfr.errors import DataError
from sfr.features.detections import (
    DetectionsReader,
    discover_detections,
    load_detections,
    object_features,
)


def detections_per_frame() -> list[np.ndarray]:
    """Four frames of detections (class id, x1, y1, x2, y2, score); frame 3 has none."""
    return [
        np.array([[3, 0, 0, 10, 10, 0.5], [3, 5, 5, 20, 20, 0.25], [0, 1, 1, 2, 2, 0.125]]),
        np.array([[351, 0, 0, 4, 4, 0.75]], dtype=np.float32),
        np.zeros((0, 6)),
        np.array([[7, 0, 0, 1, 1, 1.0], [3, 0, 0, 1, 1, 0.5]]),
    ]


def expected_features(classes: int = 352) -> np.ndarray:
    out = np.zeros((4, classes), np.float32)
    out[0, 3], out[0, 0] = 0.75, 0.125
    out[1, 351] = 0.75
    out[3, 7], out[3, 3] = 1.0, 0.5
    return out


def object_array(items: list[np.ndarray]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        array[i] = item
    return array


def save_objects(path: Path, items: list[np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, object_array(items), allow_pickle=True)
    return path


def test_object_array_gives_per_class_score_sums(tmp_path: Path) -> None:
    path = save_objects(tmp_path / "P01_01.npy", detections_per_frame())
    reader = DetectionsReader(path, name="P01_01")
    assert reader.frame_count() == 4
    frames = list(reader.read())
    assert [n for n, _ in frames] == [1, 2, 3, 4]
    got = np.stack([feature for _, feature in frames])
    assert got.dtype == np.float32 and got.shape == (4, 352)
    assert np.array_equal(got, expected_features())
    sparse = list(reader.read([4, 2, 9]))
    assert [n for n, _ in sparse] == [2, 4]
    assert np.array_equal(sparse[1][1], expected_features()[3])


def test_object_features_of_a_list() -> None:
    got = object_features(detections_per_frame(), classes=352)
    assert np.array_equal(got, expected_features())


def test_regular_three_dimensional_array(tmp_path: Path) -> None:
    # (frames, m, 6) with zero-score padding rows (class -1 would be out of range otherwise)
    array = np.zeros((2, 3, 6), np.float32)
    array[0, 0] = [5, 0, 0, 1, 1, 0.5]
    array[0, 1] = [5, 0, 0, 1, 1, 0.25]
    array[0, 2] = [-1, 0, 0, 0, 0, 0]
    array[1, 0] = [9, 0, 0, 1, 1, 1.0]
    np.save(tmp_path / "vid.npy", array)
    got = object_features(load_detections(tmp_path / "vid.npy"), classes=10)
    want = np.zeros((2, 10), np.float32)
    want[0, 5], want[1, 9] = 0.75, 1.0
    assert np.array_equal(got, want)


class Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pickles as Python 2 did: text and bytes are both `str`, written with BINSTRING opcodes."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def save_python2_objects(path: Path, items: list[np.ndarray]) -> Path:
    """An object array .npy as numpy under Python 2 wrote it (the published detections)."""
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(object_array(items))
    payload = buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    with path.open("wb") as file:
        header = {"descr": "|O", "fortran_order": False, "shape": (len(items),)}
        np.lib.format.write_array_header_1_0(file, header)
        file.write(payload)
    return path


def test_python2_pickled_file(tmp_path: Path) -> None:
    path = save_python2_objects(tmp_path / "P01_01.npy", detections_per_frame())
    with pytest.raises(UnicodeError):  # numpy's own default needs encoding= for these
        np.load(path, allow_pickle=True)
    assert np.array_equal(object_features(load_detections(path)), expected_features())
    reference = np.load(path, allow_pickle=True, encoding="bytes")  # RU-LSTM's example
    for ours, theirs in zip(load_detections(path), reference):
        assert np.array_equal(np.asarray(ours), theirs)


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "P01_01.npy"
    np.save(path, object_array([np.zeros((0, 6)), Exploit(marker)]), allow_pickle=True)  # type: ignore[list-item]
    with pytest.raises(DataError) as caught:
        DetectionsReader(path, name="P01_01").frame_count()
    message = caught.value.message
    assert str(path) in message and "system" in message and "nothing in the file was run" in message
    assert not marker.exists()


def test_hand_written_global_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npy"
    with path.open("wb") as file:
        np.lib.format.write_array_header_1_0(
            file, {"descr": "|O", "fortran_order": False, "shape": (1,)}
        )
        file.write(b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode())
        file.write(b"')\ntR.")
    with pytest.raises(DataError, match=r"builtins\.eval"):
        load_detections(path)
    assert not marker.exists()


def test_class_offset_drops_background(tmp_path: Path) -> None:
    # a detector numbering objects 1..352 and background 0
    items = [np.array([[1, 0, 0, 1, 1, 0.5], [0, 0, 0, 1, 1, 0.9], [352, 0, 0, 1, 1, 0.25]])]
    path = save_objects(tmp_path / "v.npy", items)
    (_, feature), *_ = DetectionsReader(path, name="v", class_offset=1).read()
    want = np.zeros(352, np.float32)
    want[0], want[351] = 0.5, 0.25
    assert np.array_equal(feature, want)


def test_class_id_out_of_range_suggests_offset(tmp_path: Path) -> None:
    items = [np.zeros((0, 6)), np.array([[352, 0, 0, 1, 1, 0.5]])]
    path = save_objects(tmp_path / "P01_01.npy", items)
    with pytest.raises(DataError) as caught:
        list(DetectionsReader(path, name="P01_01").read())
    assert str(path) in caught.value.message
    assert "Frame 2" in caught.value.message and "class id 352" in caught.value.message
    assert "--class-offset 1" in (caught.value.hint or "")

    with pytest.raises(DataError, match="class id -2"):
        object_features([np.array([[-2, 0, 0, 1, 1, 0.5]])])
    with pytest.raises(DataError, match="class id 400"):
        object_features([np.array([[400, 0, 0, 1, 1, 0.5]])], class_offset=1)


def test_malformed_contents(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"shape \(2, 5\)"):
        object_features([np.zeros((0, 6)), np.zeros((2, 5))], source="x.npy")
    with pytest.raises(DataError, match="not a whole number"):
        object_features([np.array([[1.5, 0, 0, 1, 1, 0.5]])])
    not_npy = tmp_path / "P01_01.npy"
    not_npy.write_bytes(b"definitely not numpy")
    with pytest.raises(DataError, match=r"not a \.npy file"):
        load_detections(not_npy)
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((4, 6)))
    with pytest.raises(DataError, match=r"shape \(4, 6\)"):
        load_detections(flat)
    truncated = tmp_path / "cut.npy"
    save_objects(truncated, detections_per_frame())
    truncated.write_bytes(truncated.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"cut\.npy"):
        load_detections(truncated)


def test_discovers_nested_detection_files(tmp_path: Path) -> None:
    save_objects(tmp_path / "P01" / "P01_01.npy", detections_per_frame())
    save_objects(tmp_path / "P02" / "P02_03.npy", detections_per_frame())
    (tmp_path / "readme.txt").write_text("not detections")
    found = discover_detections(tmp_path)
    assert [(v.name, v.kind) for v in found] == [("P01_01", "detections"), ("P02_03", "detections")]
    assert found[0].path == tmp_path / "P01" / "P01_01.npy"
    assert [v.name for v in discover_detections(tmp_path, names=["P02_03"])] == ["P02_03"]
    save_objects(tmp_path / "copy" / "P01_01.npy", detections_per_frame())
    with pytest.raises(DataError, match="P01_01"):
        discover_detections(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No detection files"):
        discover_detections(tmp_path / "empty")
    assert [v.name for v in discover_detections(tmp_path / "P01" / "P01_01.npy")] == ["P01_01"]
