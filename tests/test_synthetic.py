"""The synthetic dataset: public EK55 format, complete stores, determinism, atomic writes, signal."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sfr.data.annotations import Segment, read_actions, read_class_list, read_segments
from sfr.data.presets import write_synthetic_presets
from sfr.data.store import FeatureStore
from sfr.data.synthetic import SyntheticSpec, SyntheticSummary, write_synthetic
from sfr.data.timegrid import TimeGrid
from sfr.errors import ConfigError, DataError, RunError, SfrError

SMALL = SyntheticSpec(num_videos=3, val_videos=2, actions_per_video=12, seed=3)
# Enough segments for nearest-class-mean classifiers; still generated in well under a second.
MEDIUM = SyntheticSpec(num_videos=8, val_videos=4, actions_per_video=40, seed=1)
GRIDS = [TimeGrid(0.125, 24, 16), TimeGrid(0.25, 6, 8), TimeGrid(0.5, 6, 4)]
SEGMENT_LINE = re.compile(r"^\d{5}, P\d{2}_\d{2}, \d{10}, \d{10}, \d{3}, \d{3}, \d{4}$")
FPS = 30
Features = dict[str, dict[str, np.ndarray]]  # modality -> video -> (N, dim) frames 1..N


def stores(root: Path, summary: SyntheticSummary) -> dict[str, FeatureStore]:
    """Readers of the three modality stores with the dimensions the summary reports."""
    return {m: FeatureStore(root / m, dim) for m, dim in summary.dims.items()}


def video_features(root: Path, summary: SyntheticSummary) -> Features:
    """Every frame (1..N) of every video, per modality, read through the public store reader."""
    meta = json.loads((root / "synthetic_meta.json").read_text())
    return {
        m: {video: store.read(video, range(1, n + 1)) for video, n in meta["videos"].items()}
        for m, store in stores(root, summary).items()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticSummary]:
    root = tmp_path_factory.mktemp("small") / "data"
    return root, write_synthetic(root, SMALL)


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Features]:
    root = tmp_path_factory.mktemp("medium") / "data"
    return root, video_features(root, write_synthetic(root, MEDIUM))


def test_files_parse_with_the_project_readers(small: tuple[Path, SyntheticSummary]) -> None:
    root, summary = small
    train, val = read_segments(root / "training.csv"), read_segments(root / "validation.csv")
    actions = read_actions(root / "actions.csv")
    assert summary.rows == {"training": len(train), "validation": len(val)}
    assert len(train) == SMALL.num_videos * SMALL.actions_per_video
    assert len(val) == SMALL.val_videos * SMALL.actions_per_video
    assert len({s.id for s in train + val}) == len(train) + len(val)
    assert {s.video for s in train}.isdisjoint({s.video for s in val})
    assert len({s.video for s in train}) == SMALL.num_videos
    assert actions.num_actions == summary.num_actions == SMALL.num_actions
    assert (actions.num_verbs, actions.num_nouns) == (SMALL.num_verbs, SMALL.num_nouns)
    assert len(set(zip(actions.verbs.tolist(), actions.nouns.tolist()))) == actions.num_actions
    for s in train + val:
        assert 1 <= s.start_frame < s.end_frame
        assert (s.verb, s.noun) == (actions.verbs[s.action], actions.nouns[s.action])
    for kind, count in (("verb", SMALL.num_verbs), ("noun", SMALL.num_nouns)):
        many = read_class_list(root / f"EPIC_many_shot_{kind}s.csv", f"{kind}_class")
        frequency = np.bincount([getattr(s, kind) for s in train], minlength=count)
        assert many == sorted(set(many)) and 0 < len(many) < count
        assert int(frequency.argmax()) in many
        assert frequency[many].min() >= np.delete(frequency, many).max()
    meta = json.loads((root / "synthetic_meta.json").read_text())
    assert meta["rows"] == summary.rows and meta["frames"] == summary.frames
    assert meta["dims"] == summary.dims == {"rgb": 32, "flow": 32, "obj": 24}
    assert meta["spec"]["seed"] == SMALL.seed


def test_files_use_the_ek55_layout(small: tuple[Path, SyntheticSummary]) -> None:
    root, _ = small
    for split in ("training", "validation"):
        lines = (root / f"{split}.csv").read_text().splitlines()
        bad = [line for line in lines if not SEGMENT_LINE.match(line)]
        assert lines and not bad, bad[:3]
    actions = (root / "actions.csv").read_text().splitlines()
    assert actions[0] == "id,action,verb,noun"
    assert all(re.fullmatch(r"\d+,[a-z-]+_[a-z]+,\d+,\d+", line) for line in actions[1:])
    assert (root / "EPIC_many_shot_verbs.csv").read_text().startswith("verb_class,verb\n")
    assert (root / "EPIC_many_shot_nouns.csv").read_text().startswith("noun_class,noun\n")


def test_stores_hold_every_frame_any_sampler_asks_for(small: tuple[Path, SyntheticSummary]) -> None:
    root, summary = small
    segments = read_segments(root / "training.csv") + read_segments(root / "validation.csv")
    readers = stores(root, summary)
    assert all(store.env.stat()["entries"] == summary.frames for store in readers.values())
    discarded = {grid.alpha: 0 for grid in GRIDS}
    padded = 0
    for grid in GRIDS:
        for s in segments:
            frames = grid.frames(s.start_frame)
            if frames is None:
                discarded[grid.alpha] += 1
                continue
            padded += int(np.floor((s.start_frame / FPS - grid.offsets) * FPS).min() < 1)
            for modality, store in readers.items():
                vectors = store.read(s.video, frames, s.id)
                assert vectors.shape == (grid.steps, summary.dims[modality])
                assert np.isfinite(vectors).all()
                if modality == "obj":
                    assert vectors.min() >= 0
    assert 1 <= discarded[0.125] <= discarded[0.25] <= discarded[0.5] < len(segments) / 10
    assert padded >= 1


def test_obj_features_are_sparse_non_negative_scores(
    small: tuple[Path, SyntheticSummary],
) -> None:
    root, summary = small
    obj = np.concatenate(list(video_features(root, summary)["obj"].values()))
    assert obj.min() == 0.0
    assert 0.02 < (obj > 0).mean() < 0.3


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    def write(name: str, seed: int) -> tuple[dict[str, bytes], Features]:
        root = tmp_path / name
        summary = write_synthetic(root, SyntheticSpec(**{**vars(SMALL), "seed": seed}))
        texts = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
        return texts, video_features(root, summary)

    texts_a, features_a = write("a", 7)
    texts_b, features_b = write("b", 7)
    texts_c, features_c = write("c", 8)
    assert texts_a == texts_b
    assert texts_a["training.csv"] != texts_c["training.csv"]
    for modality, videos in features_a.items():
        for video, vectors in videos.items():
            np.testing.assert_array_equal(vectors, features_b[modality][video])
    assert not np.array_equal(features_a["rgb"]["P01_01"][:100], features_c["rgb"]["P01_01"][:100])


def test_refuses_a_non_empty_folder_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match=re.escape(str(out))):
        write_synthetic(out, SMALL)
    assert (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]

    # force replaces only what sfr wrote: a foreign folder is kept even then (issue 11)
    with pytest.raises(DataError, match="is not a synthetic dataset sfr wrote"):
        write_synthetic(out, SMALL, force=True)
    assert (out / "mine.txt").read_text() == "keep me"

    (out / "mine.txt").unlink()
    write_synthetic(out, SMALL)
    with pytest.raises(RunError, match="already holds a synthetic dataset"):
        write_synthetic(out, SMALL)
    # a file sfr did not write inside the dataset: --force names it and deletes nothing
    (out / "rgb" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match=re.escape(str(out / "rgb" / "notes.txt"))):
        write_synthetic(out, SMALL, force=True)
    assert (out / "rgb" / "notes.txt").read_text() == "mine"
    (out / "rgb" / "notes.txt").unlink()
    # builds of a killed write (being built, being replaced) are removed when it runs again
    stale = [tmp_path / f".data.{'ab' * 16}.tmp", tmp_path / f".data.{'cd' * 16}.old"]
    for folder in stale:
        folder.mkdir()
        (folder / "training.csv").write_text("torn")
    (tmp_path / ".data.mine.tmp").mkdir()  # not a name sfr gives: kept
    summary = write_synthetic(out, SMALL, force=True)
    assert summary.path == out and (out / "training.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.mine.tmp", "data"]


def test_force_names_a_config_and_an_empty_folder_of_the_user_and_deletes_nothing(
    tmp_path: Path,
) -> None:
    """Issue 11: only the preset names sfr writes under configs/ are its own, and a folder the
    user made (even empty) is named too; --force then deletes nothing."""
    out = tmp_path / "data"
    summary = write_synthetic(out, SMALL)
    presets = write_synthetic_presets(out, summary.num_actions, summary.dims)
    assert presets  # the published presets are sfr's own: --force replaces them
    mine = out / "configs" / "my_experiment.toml"
    mine.write_text("my precious config")
    (out / "rgb" / "scratch").mkdir()
    with pytest.raises(RunError, match="did not write") as refused:
        write_synthetic(out, SMALL, force=True)
    assert str(mine) in str(refused.value) and str(out / "rgb" / "scratch") in str(refused.value)
    assert mine.read_text() == "my precious config" and (out / "rgb" / "scratch").is_dir()
    assert all(preset.is_file() for preset in presets)
    mine.unlink()
    (out / "rgb" / "scratch").rmdir()
    write_synthetic(out, SMALL, force=True)
    assert not (out / "configs").exists()


def test_an_output_path_that_is_a_file_is_named_as_a_file(tmp_path: Path) -> None:
    out = tmp_path / "afile"
    out.write_text("mine")
    for force in (False, True):
        with pytest.raises(SfrError, match=re.escape(f"The output folder {out} is a file.")):
            write_synthetic(out, SMALL, force=force)
        with pytest.raises(SfrError, match=re.escape(f"{out / 'sub'} lies under the file {out}")):
            write_synthetic(out / "sub", SMALL, force=force)  # was a FileExistsError traceback
    assert out.read_text() == "mine"


def test_writes_into_an_empty_folder_and_reports_progress(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    calls: list[tuple[int, int]] = []
    write_synthetic(out, SMALL, progress=lambda done, total: calls.append((done, total)))
    videos = SMALL.num_videos + SMALL.val_videos
    assert calls == [(k, videos) for k in range(1, videos + 1)]
    assert (out / "rgb" / "data.mdb").is_file()


def test_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    def explode(done: int, total: int) -> None:
        if done == 2:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_synthetic(tmp_path / "data", SMALL, progress=explode)
    assert list(tmp_path.iterdir()) == []


def test_rejects_an_impossible_spec() -> None:
    with pytest.raises(ConfigError, match="num_actions"):
        SyntheticSpec(num_verbs=3, num_nouns=4, num_actions=13)
    with pytest.raises(ConfigError, match="cue_window"):
        SyntheticSpec(cue_window=(0.5, 0.4))


# --- the signal: pure numpy nearest-class-mean classifiers, trained on training, scored on validation


def pooled(
    segments: list[Segment],
    features: dict[str, np.ndarray],
    seconds_before: np.ndarray,
    pool: Callable[..., np.ndarray],
) -> np.ndarray:
    """One vector per segment: `pool` over the frames `seconds_before` its start (clipped to 1)."""
    rows = []
    for s in segments:
        frames = np.floor((s.start_frame / FPS - seconds_before) * FPS).astype(int)
        rows.append(pool(features[s.video][np.maximum(frames, 1) - 1], axis=0))
    return np.array(rows)


def ncm_accuracy(
    medium: tuple[Path, Features],
    modality: str,
    label: Callable[[Segment], int],
    seconds_before: np.ndarray,
    pool: Callable[..., np.ndarray],
) -> float:
    """Validation accuracy of a nearest-class-mean classifier of `label` on pooled features."""
    root, features = medium
    train, val = read_segments(root / "training.csv"), read_segments(root / "validation.csv")
    x_train, x_val = (
        pooled(segs, features[modality], seconds_before, pool) for segs in (train, val)
    )
    y_train, y_val = (np.array([label(s) for s in segs]) for segs in (train, val))
    classes = np.unique(y_train)
    means = np.stack([x_train[y_train == c].mean(axis=0) for c in classes])
    distances = ((x_val[:, None, :] - means[None]) ** 2).sum(axis=2)
    return float((classes[distances.argmin(axis=1)] == y_val).mean())


def baseline(root: Path, label: Callable[[Segment], int], num_classes: int) -> float:
    """Chance, or the validation accuracy of always answering the most frequent training class."""
    train, val = read_segments(root / "training.csv"), read_segments(root / "validation.csv")
    top = np.bincount([label(s) for s in train]).argmax()
    return max(1 / num_classes, float(np.mean([label(s) == top for s in val])))


def noun(segment: Segment) -> int:
    return int(segment.noun)


def verb(segment: Segment) -> int:
    return int(segment.verb)


def activity_of(root: Path) -> Callable[[Segment], int]:
    """Label function: the activity (group of nouns, from the metadata) of a segment's noun."""
    groups = json.loads((root / "synthetic_meta.json").read_text())["activities"]
    of_noun = {n: k for k, nouns in enumerate(groups) for n in nouns}
    return lambda segment: of_noun[int(segment.noun)]


def seconds(start: float, stop: float, step: float = 1 / FPS) -> np.ndarray:
    """Times before the action start from `start` up to `stop` seconds, `step` apart."""
    return np.arange(start, stop + 1e-9, step)


def test_slow_context_predicts_the_activity_and_the_noun(medium: tuple[Path, Features]) -> None:
    root, _ = medium
    activity = activity_of(root)
    base = baseline(root, activity, MEDIUM.num_activities)
    recent = ncm_accuracy(medium, "rgb", activity, seconds(1 / FPS, 4.0), np.mean)
    early = ncm_accuracy(medium, "rgb", activity, seconds(2.5, 4.0), np.mean)
    objects = ncm_accuracy(medium, "obj", activity, seconds(1 / FPS, 4.0), np.mean)
    assert recent > base + 0.5
    assert early > base + 0.4  # the context persists for seconds
    assert objects > base + 0.4
    noun_base = baseline(root, noun, MEDIUM.num_nouns)
    assert ncm_accuracy(medium, "rgb", noun, seconds(1 / FPS, 4.0), np.mean) > noun_base + 0.2


def test_fast_cue_predicts_the_verb_only_when_sampled_densely(
    medium: tuple[Path, Features],
) -> None:
    root, _ = medium
    base = baseline(root, verb, MEDIUM.num_verbs)
    every_frame = ncm_accuracy(medium, "flow", verb, seconds(1 / FPS, 1.5), np.max)
    fast = ncm_accuracy(medium, "flow", verb, seconds(0.125, 1.5, 0.125), np.max)
    slow = ncm_accuracy(medium, "flow", verb, seconds(0.5, 1.5, 0.5), np.max)
    long_before = ncm_accuracy(medium, "flow", verb, seconds(2.0, 5.0), np.max)
    assert every_frame > base + 0.4
    assert fast > base + 0.4
    assert slow < fast - 0.1  # a 0.5 s sampler often misses the short burst
    assert long_before < base + 0.15  # the cue is short and close to the start
