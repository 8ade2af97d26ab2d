"""LMDB feature stores: public key/value format, one transaction per sample, clear errors."""

from __future__ import annotations

import pickle

import lmdb
import numpy as np
import pytest
from golden import GOLDEN_DATA

from sfr.data.store import FeatureStore, FeatureStoreWriter, frame_key
from sfr.errors import DataError


def test_public_key_format() -> None:
    assert frame_key("P01_01", 152) == "P01_01_frame_0000000152.jpg"


def test_writer_output_is_readable_the_published_way(tmp_path) -> None:
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    with FeatureStoreWriter(tmp_path / "rgb", commit_every=2) as writer:
        writer.put_many("P01_01", 5, vectors)
    env = lmdb.open(str(tmp_path / "rgb"), readonly=True, lock=False)
    with env.begin() as txn:
        raw = txn.get(b"P01_01_frame_0000000006.jpg")
    np.testing.assert_array_equal(np.frombuffer(raw, "float32"), vectors[1])
    env.close()
    store = FeatureStore(tmp_path / "rgb", 4)
    np.testing.assert_array_equal(store.read("P01_01", [7, 5, 7]), vectors[[2, 0, 2]])


def test_reads_golden_store_in_one_transaction(monkeypatch) -> None:
    store = FeatureStore(GOLDEN_DATA / "rgb", 16)
    calls = []
    env = store.env
    original = env.begin
    monkeypatch.setattr(
        store,
        "_env",
        type("Env", (), {"begin": lambda self, **kw: calls.append(kw) or original(**kw)})(),
    )
    store._pid = __import__("os").getpid()
    out = store.read("S01_01", [4, 12, 19, 27])
    assert out.shape == (4, 16) and out.dtype == np.float32
    assert len(calls) == 1


def test_missing_key_names_key_store_and_annotation(tmp_path) -> None:
    with FeatureStoreWriter(tmp_path / "flow") as writer:
        writer.put("P01_01", 1, np.zeros(4, np.float32))
    store = FeatureStore(tmp_path / "flow", 4, name="flow")
    with pytest.raises(DataError) as caught:
        store.read("P01_01", [1, 2], sample_id="330")
    message = str(caught.value)
    assert "P01_01_frame_0000000002.jpg" in message and "flow" in message and "330" in message


def test_wrong_dimension_names_expected_and_found(tmp_path) -> None:
    with FeatureStoreWriter(tmp_path / "obj") as writer:
        writer.put("P01_01", 1, np.zeros(6, np.float32))
    with pytest.raises(DataError, match=r"dimension 6, expected 352"):
        FeatureStore(tmp_path / "obj", 352).read("P01_01", [1])


def test_missing_store_folder(tmp_path) -> None:
    with pytest.raises(DataError, match=r"Feature store 'rgb' not found"):
        FeatureStore(tmp_path / "rgb", 1024, name="rgb")


def test_store_pickles_without_its_handle_and_reopens() -> None:
    store = FeatureStore(GOLDEN_DATA / "obj", 12)
    first = store.read("S01_01", [4])
    clone = pickle.loads(pickle.dumps(store))
    assert clone._env is None
    np.testing.assert_array_equal(clone.read("S01_01", [4]), first)


def test_two_stores_on_one_folder_share_the_environment() -> None:
    first, second = FeatureStore(GOLDEN_DATA / "rgb", 16), FeatureStore(GOLDEN_DATA / "rgb", 16)
    np.testing.assert_array_equal(first.read("S01_01", [4]), second.read("S01_01", [4]))
    assert first.env is second.env


def test_non_finite_vector_names_store_key_and_annotation(tmp_path) -> None:
    with FeatureStoreWriter(tmp_path / "rgb") as writer:
        writer.put("P01_01", 1, np.zeros(4, np.float32))
        writer.put("P01_01", 2, np.array([0, np.nan, 0, 0], np.float32))
        writer.put("P01_01", 3, np.array([0, 0, -np.inf, 0], np.float32))
    store = FeatureStore(tmp_path / "rgb", 4, name="rgb")
    with pytest.raises(DataError, match=r"'rgb'.*P01_01_frame_0000000002\.jpg.*id 17.*NaN"):
        store.read("P01_01", [1, 2, 3], sample_id="17")
    with pytest.raises(DataError, match=r"P01_01_frame_0000000003\.jpg"):
        store.read("P01_01", [1, 3], sample_id="18")


def test_truncated_store_is_refused_at_open_instead_of_a_bus_error(tmp_path) -> None:
    with FeatureStoreWriter(tmp_path / "rgb") as writer:
        writer.put_many("P01_01", 1, np.ones((2000, 64), np.float32))
    data = tmp_path / "rgb" / "data.mdb"
    size = data.stat().st_size
    with data.open("r+b") as handle:
        handle.truncate(size // 3)
    with pytest.raises(DataError, match=r"truncated: data\.mdb holds \d+ bytes"):
        FeatureStore(tmp_path / "rgb", 64).read("P01_01", [1500])


def test_a_store_already_open_in_this_process_is_not_called_damaged(tmp_path) -> None:
    writer = FeatureStoreWriter(tmp_path / "rgb")
    writer.put("P01_01", 1, np.zeros(4, np.float32))
    writer.flush()
    try:
        with pytest.raises(DataError) as caught:
            FeatureStore(tmp_path / "rgb", 4).read("P01_01", [1])
    finally:
        writer.close()
    text = str(caught.value)
    assert "already open in this process" in text and "Close the other handle" in text
    assert "damaged" not in text
    assert FeatureStore(tmp_path / "rgb", 4).read("P01_01", [1]).shape == (1, 4)  # once closed


@pytest.mark.parametrize(
    ("error", "cause", "hint"),
    [
        (lmdb.Error("s: Permission denied"), "permission denied", "readable by you"),
        (lmdb.Error("s: Read-only file system"), "permission denied", "readable by you"),
        (lmdb.Error("s: No such file or directory"), "a file of the store is missing", "lock.mdb"),
        (lmdb.Error("s: No space left on device"), "the disk is full", "Free disk space"),
        (lmdb.MapFullError("s: MDB_MAP_FULL"), "map size is used up", "free disk space"),
        (lmdb.VersionMismatchError("s: MDB_VERSION_MISMATCH"), "incompatible LMDB", "mdb_dump"),
        (lmdb.ReadersFullError("s: MDB_READERS_FULL"), "too many processes", "--workers"),
        (lmdb.InvalidError("s: MDB_INVALID"), "damaged or not an LMDB file", "again"),
        (lmdb.Error("s: Something new"), "LMDB says: s: Something new", "permissions"),
    ],
)
def test_each_lmdb_failure_is_named_for_its_cause(tmp_path, monkeypatch, error, cause, hint):
    data = tmp_path / "rgb"
    with FeatureStoreWriter(data) as writer:
        writer.put("P01_01", 1, np.zeros(4, np.float32))

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(lmdb, "open", refuse)
    with pytest.raises(DataError) as caught:
        FeatureStore(data, 4).read("P01_01", [1])
    assert cause in caught.value.message and hint in (caught.value.hint or "")
    if not isinstance(error, lmdb.InvalidError):
        assert "damaged" not in caught.value.message


def test_an_empty_data_file_or_a_folder_in_its_place_is_named(tmp_path) -> None:
    (tmp_path / "rgb").mkdir()
    (tmp_path / "rgb" / "data.mdb").write_bytes(b"")
    with pytest.raises(DataError, match=r"data\.mdb is empty \(0 bytes\)"):
        FeatureStore(tmp_path / "rgb", 4).read("P01_01", [1])
    (tmp_path / "flow" / "data.mdb").mkdir(parents=True)
    with pytest.raises(DataError, match=r"data\.mdb is a folder, not the LMDB data file"):
        FeatureStore(tmp_path / "flow", 4)
