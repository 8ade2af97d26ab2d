"""A small synthetic dataset in the public EK55 on-disk layout, learnable at two time scales.

Used by `sfr demo` and `sfr synth --out OUT` to exercise the whole pipeline without downloads. The
folder holds full LMDB stores (`rgb/`, `flow/`, `obj/`: every frame of every video), the EK55
annotation CSVs, `actions.csv`, the EPIC class lists, the many-shot lists and `synthetic_meta.json`.

Signal model (everything else is Gaussian noise of scale `noise`, part of it smooth over ~1 s):

- labels: the nouns are grouped into activities (`nouns_per_activity` each); a video is a chain
  of activity stretches of a few actions each, and an action is drawn from a Zipf law over the
  actions whose noun belongs to the stretch's activity (so some classes are many-shot);
- slow context: from `context[0]` to `context[1]` seconds before each action, rgb shows a fixed
  pattern of its activity and obj detects the activity's objects (a few classes, scores >= 0);
  consecutive actions of one stretch chain these windows into seconds of persistent context;
- fast cue: a `cue_length` burst at a random offset within `cue_window` seconds before the
  action shows a pattern of its verb in flow (weaker in rgb), then a faint trace of it lingers
  until the start. A sampler every 0.125 s always sees the burst, one every 0.5 s often misses it.

The activity narrows an action down to a few candidates, the verb picks one, so a model needs both
cues to be sure. The first action of a video starts within its first second (padded sequences),
and the first video of each split starts at frame 3, which small alphas discard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sfr.data.presets import preset_names
from sfr.data.store import FeatureStoreWriter
from sfr.errors import ConfigError, DataError
from sfr.files import check_folder_path, existing_output, foreign_files, refuse_foreign

MODALITIES: tuple[str, ...] = ("rgb", "flow", "obj")
VERB_NAMES: tuple[str, ...] = (
    "take", "put", "open", "close", "wash", "cut", "mix", "pour", "move", "turn-on", "turn-off",
    "remove", "throw", "dry", "peel", "insert", "fill", "squeeze", "shake", "scoop",
)  # fmt: skip
NOUN_NAMES: tuple[str, ...] = (
    "cup", "plate", "knife", "pan", "tap", "spoon", "bowl", "onion", "fridge", "lid", "sponge",
    "board", "drawer", "bag", "pot", "glass", "fork", "tomato", "bottle", "cupboard", "oil",
    "salt", "towel", "kettle",
)  # fmt: skip
FIRST_START_FRAME = 3  # first action of each split's first video: discarded at alpha 0.125
RGB_CUE_SHARE = 0.3  # strength of the verb cue in rgb relative to flow
OBJ_THRESHOLD = 1.5  # obj = max(0, noise + boost - threshold): ~7% background detections
OBJ_BOOST = 4.0  # boost of the activity's objects, in units of context_strength
OBJECTS_PER_NOUN = 3


@dataclass(frozen=True)
class SyntheticSpec:
    """Size, timing and signal strengths of a synthetic dataset; times are in seconds."""

    num_videos: int = 12  # training videos
    val_videos: int = 3
    actions_per_video: int = 60
    num_verbs: int = 8
    num_nouns: int = 10
    num_actions: int = 32
    dims: tuple[int, int, int] = (32, 32, 24)  # rgb, flow, obj
    fps: int = 30
    seed: int = 0
    noise: float = 1.0
    zipf: float = 0.7  # action frequencies fall as rank ** -zipf
    nouns_per_activity: int = 2
    activity_length: tuple[int, int] = (2, 6)  # range of actions per activity stretch
    duration: tuple[float, float] = (1.0, 3.0)  # range of action lengths
    gap: tuple[float, float] = (1.0, 4.0)  # range of pauses between an action's end and the next
    context: tuple[float, float] = (5.0, 0.0)  # activity context, from/to seconds before start
    context_strength: float = 1.0  # per-dimension RMS of the rgb activity pattern
    cue_window: tuple[float, float] = (1.5, 0.25)  # the verb burst lies within, before start
    cue_length: float = 0.25
    cue_strength: float = 3.0  # per-dimension RMS of the flow verb pattern
    cue_trace: float = 0.15  # share of the verb pattern lingering from the burst to the start
    smooth_noise: float = 0.5  # share of the noise variance that varies slowly
    noise_span: float = 1.0  # time scale of the slow part of the noise
    many_shot: float = 0.5  # share of verbs / nouns listed as many-shot (the most frequent)

    def __post_init__(self) -> None:
        """Reject an impossible spec up front, with one ConfigError listing every problem."""
        problems = []
        if min(self.num_videos, self.val_videos, self.actions_per_video, *self.dims) < 1:
            problems.append("videos, actions per video and dims must be >= 1")
        if min(self.num_verbs, self.num_nouns, self.nouns_per_activity, self.fps) < 1:
            problems.append("num_verbs, num_nouns, nouns_per_activity and fps must be >= 1")
        if not max(self.num_verbs, self.num_nouns) <= self.num_actions:
            problems.append("num_actions must be >= max(num_verbs, num_nouns)")
        if not self.num_actions <= self.num_verbs * self.num_nouns:
            problems.append("num_actions must be <= num_verbs * num_nouns")
        if not 1 <= self.activity_length[0] <= self.activity_length[1]:
            problems.append("activity_length must be a range (low, high) with 1 <= low <= high")
        if min(self.noise, self.zipf, self.context_strength, self.cue_strength) < 0:
            problems.append("noise, zipf and strengths must be >= 0")
        if not (0 < self.duration[0] <= self.duration[1] and 0 < self.gap[0] <= self.gap[1]):
            problems.append("duration and gap must be ranges (low, high) with 0 < low <= high")
        if not self.context[0] > self.context[1] >= 0:
            problems.append("context must be (from, to) seconds before the start, from > to >= 0")
        if not self.cue_window[0] - self.cue_window[1] >= self.cue_length > 0:
            problems.append("cue_window must be (from, to) with room for cue_length > 0")
        if self.cue_window[0] - self.cue_window[1] > self.duration[0] + self.gap[0]:
            problems.append("cue_window must be shorter than the shortest action + gap")
        if not (0 <= self.smooth_noise <= 1 and self.cue_trace >= 0 and 0 < self.many_shot <= 1):
            problems.append("smooth_noise and many_shot must lie in [0, 1], cue_trace >= 0")
        if self.noise_span <= 0:
            problems.append("noise_span must be > 0")
        if problems:
            raise ConfigError(f"Invalid synthetic dataset spec: {'; '.join(problems)}.")

    @property
    def num_activities(self) -> int:
        """Number of activities: the nouns split into groups of `nouns_per_activity`."""
        return -(-self.num_nouns // self.nouns_per_activity)


@dataclass(frozen=True)
class SyntheticSummary:
    """What `write_synthetic` wrote: folder, rows per split, frames per modality, classes, dims."""

    path: Path
    rows: dict[str, int]
    frames: int
    num_actions: int
    dims: dict[str, int]


@dataclass(frozen=True)
class _Classes:
    """Action classes, activities and the fixed feature patterns every video draws from."""

    verbs: np.ndarray  # (A,) verb of each action
    nouns: np.ndarray  # (A,) noun of each action
    activity_of_noun: np.ndarray  # (num_nouns,)
    activity_probs: np.ndarray  # (K,) share of the actions in each activity
    action_cdf: np.ndarray  # (K, A) cumulative Zipf law of the actions within each activity
    context_patterns: dict[str, np.ndarray]  # modality -> (K + 1, dim), last row zero
    verb_patterns: dict[str, np.ndarray]  # modality -> (num_verbs + 1, dim), last row zero


@dataclass(frozen=True)
class _Video:
    """One generated video: per-modality features of frames 1..N and its action segments."""

    features: dict[str, np.ndarray]  # modality -> (N, dim) float32
    starts: np.ndarray
    ends: np.ndarray
    actions: np.ndarray


def write_synthetic(
    out: Path,
    spec: SyntheticSpec = SyntheticSpec(),
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SyntheticSummary:
    """Generate the dataset of `spec` into `out`, atomically (built beside it, then renamed).

    A non-empty `out` is refused with a DataError unless `force`, which replaces it. `progress`
    receives (videos written, videos in all).
    """
    out = check_folder_path(Path(out), "output")
    remove_stale_builds(out)
    _check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        summary = _generate(tmp, spec, progress)
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dataclasses.replace(summary, path=out)


def spec_record(spec: SyntheticSpec) -> dict[str, Any]:
    """The spec as `synthetic_meta.json` records it (JSON: tuples become lists)."""
    record: dict[str, Any] = json.loads(json.dumps(asdict(spec)))
    return record


def read_synthetic(folder: Path) -> tuple[SyntheticSummary, dict[str, Any]]:
    """What an earlier `write_synthetic` recorded in `folder/synthetic_meta.json`: its summary
    and its spec (`spec_record`). DataError naming the file when it is unreadable or damaged."""
    path = Path(folder) / "synthetic_meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        summary = SyntheticSummary(
            path=Path(folder),
            rows={split: int(count) for split, count in meta["rows"].items()},
            frames=int(meta["frames"]),
            num_actions=int(meta["num_actions"]),
            dims={modality: int(dim) for modality, dim in meta["dims"].items()},
        )
        spec = meta["spec"]
        if not isinstance(spec, dict):
            raise TypeError
    except OSError as error:
        raise DataError(f"{path} cannot be read: {error.strerror}.") from None
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise DataError(
            f"{path} is damaged: it is not the record sfr writes of a synthetic dataset.",
            "Pass --force to generate the dataset again (sfr deletes only what it wrote).",
        ) from None
    return summary, spec


# The files `write_synthetic` (and `sfr synth`'s presets) write, by path inside the dataset.
_SYNTHETIC_FILES = frozenset(
    ["synthetic_meta.json", "training.csv", "validation.csv", "actions.csv"]
    + [f"EPIC_{kind}_classes.csv" for kind in ("verb", "noun")]
    + [f"EPIC_many_shot_{kind}s.csv" for kind in ("verb", "noun")]
    + [f"{modality}/{name}" for modality in MODALITIES for name in ("data.mdb", "lock.mdb")]
)


def synthetic_file(relative: Path) -> bool:
    """Whether a path inside a synthetic dataset is one sfr writes there (the `--force` rule):
    its data files and `configs/<published preset name>.toml`, nothing else."""
    posix = relative.as_posix()
    return posix in _SYNTHETIC_FILES or (
        len(relative.parts) == 2
        and relative.parts[0] == "configs"
        and relative.name in preset_names()
    )


def _check_target(out: Path, force: bool) -> None:
    """Refuse an existing non-empty `out` (a file counts as non-empty) unless `force` and it is
    an earlier synthetic dataset holding only files sfr wrote (`force` only ever replaces what
    sfr wrote; anything else is named)."""
    occupied = out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir())))
    if not occupied:
        return
    earlier = out.is_dir() and not out.is_symlink() and (out / "synthetic_meta.json").is_file()
    if not earlier:
        raise DataError(
            f"The output folder {out} already exists, is not empty and is not a synthetic dataset "
            "sfr wrote.",
            "Choose a new or empty folder: --force deletes only what sfr wrote.",
        )
    if not force:
        raise existing_output(out, "output folder", "a synthetic dataset")
    refuse_foreign(out, "output folder", foreign_files(out, synthetic_file))


def remove_stale_builds(out: Path) -> None:
    """Delete the build folders a killed `write_synthetic` of `out` left beside it
    (`.OUT.<uuid>.tmp` being built, `.OUT.<uuid>.old` being replaced); nothing else."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.[0-9a-f]{{32}}\.(tmp|old)$")
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.*"):
        if pattern.match(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished `tmp` to `out`; a forced replacement moves the old `out` aside first."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    _check_target(out, force)
    old = out.parent / f".{out.name}.{uuid.uuid4().hex}.old"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _generate(
    folder: Path, spec: SyntheticSpec, progress: Callable[[int, int], None] | None
) -> SyntheticSummary:
    """Write every file of the dataset into the existing empty `folder`; returns its summary."""
    rng = np.random.default_rng(spec.seed)
    dims = dict(zip(MODALITIES, spec.dims))
    classes = _draw_classes(rng, spec, dims)
    names = _video_names(spec.num_videos + spec.val_videos)
    splits = {"training": names[: spec.num_videos], "validation": names[spec.num_videos :]}
    rows: dict[str, list[str]] = {split: [] for split in splits}
    counts = np.zeros(spec.num_actions, dtype=np.int64)
    frames: dict[str, int] = {}
    with ExitStack() as stack:
        writers = {m: stack.enter_context(FeatureStoreWriter(folder / m)) for m in MODALITIES}
        for split, videos in splits.items():
            for index, name in enumerate(videos):
                video = _draw_video(rng, spec, classes, first=index == 0)
                for modality, writer in writers.items():
                    writer.put_many(name, 1, video.features[modality])
                frames[name] = len(video.features["rgb"])
                first_id = sum(len(lines) for lines in rows.values())
                rows[split].extend(
                    f"{first_id + k:05d}, {name}, {start:010d}, {end:010d}, "
                    f"{classes.verbs[a]:03d}, {classes.nouns[a]:03d}, {a:04d}\n"
                    for k, (start, end, a) in enumerate(
                        zip(video.starts, video.ends, video.actions)
                    )
                )
                if split == "training":
                    counts += np.bincount(video.actions, minlength=spec.num_actions)
                if progress is not None:
                    progress(len(frames), len(names))
    for split, lines in rows.items():
        (folder / f"{split}.csv").write_text("".join(lines), encoding="utf-8")
    _write_classes(folder, spec, classes, counts)
    summary = SyntheticSummary(
        path=folder,
        rows={split: len(lines) for split, lines in rows.items()},
        frames=sum(frames.values()),
        num_actions=spec.num_actions,
        dims=dims,
    )
    meta = {
        "format": "ek55",
        "spec": spec_record(spec),
        "rows": summary.rows,
        "frames": summary.frames,
        "videos": frames,
        "num_actions": spec.num_actions,
        "num_verbs": spec.num_verbs,
        "num_nouns": spec.num_nouns,
        "activities": [
            np.flatnonzero(classes.activity_of_noun == k).tolist()
            for k in range(spec.num_activities)
        ],
        "dims": dims,
    }
    (folder / "synthetic_meta.json").write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
    return summary


def _video_names(count: int) -> list[str]:
    """EK55-style video names, four videos per participant: P01_01 .. P01_04, P02_01, ..."""
    return [f"P{k // 4 + 1:02d}_{k % 4 + 1:02d}" for k in range(count)]


def _draw_classes(rng: np.random.Generator, spec: SyntheticSpec, dims: dict[str, int]) -> _Classes:
    """Draw the actions' (verb, noun) pairs, the activities, the Zipf law and feature patterns."""
    num_verbs, num_nouns, num_actions = spec.num_verbs, spec.num_nouns, spec.num_actions
    cover = np.arange(max(num_verbs, num_nouns))  # the first pairs use every verb and every noun
    first = rng.permutation(num_verbs)[cover % num_verbs] * num_nouns
    first += rng.permutation(num_nouns)[cover % num_nouns]
    rest = np.setdiff1d(np.arange(num_verbs * num_nouns), first)
    extra = rng.choice(rest, size=num_actions - len(cover), replace=False)
    pairs = np.sort(np.concatenate([first, extra]))  # action ids ordered by (verb, noun)
    verbs, nouns = pairs // num_nouns, pairs % num_nouns

    weights = (rng.permutation(num_actions) + 1.0) ** -spec.zipf
    activity_of_noun = rng.permutation(num_nouns) // spec.nouns_per_activity
    member = activity_of_noun[nouns] == np.arange(spec.num_activities)[:, None]  # (K, A)
    within = np.cumsum(weights * member, axis=1)
    activity_mass = within[:, -1]

    objects = np.zeros((spec.num_activities + 1, dims["obj"]))
    for noun in range(num_nouns):
        chosen = rng.choice(dims["obj"], size=min(OBJECTS_PER_NOUN, dims["obj"]), replace=False)
        objects[activity_of_noun[noun], chosen] = OBJ_BOOST * spec.context_strength
    return _Classes(
        verbs=verbs,
        nouns=nouns,
        activity_of_noun=activity_of_noun,
        activity_probs=activity_mass / activity_mass.sum(),
        action_cdf=within / activity_mass[:, None],
        context_patterns={
            "rgb": _patterns(rng, spec.num_activities, dims["rgb"], spec.context_strength),
            "flow": np.zeros((spec.num_activities + 1, dims["flow"])),
            "obj": objects,
        },
        verb_patterns={
            "rgb": _patterns(rng, num_verbs, dims["rgb"], RGB_CUE_SHARE * spec.cue_strength),
            "flow": _patterns(rng, num_verbs, dims["flow"], spec.cue_strength),
            "obj": np.zeros((num_verbs + 1, dims["obj"])),
        },
    )


def _patterns(rng: np.random.Generator, count: int, dim: int, strength: float) -> np.ndarray:
    """`count` random directions of per-dimension RMS `strength`, plus a final all-zero row."""
    patterns = rng.standard_normal((count + 1, dim))
    patterns *= strength * np.sqrt(dim) / np.linalg.norm(patterns, axis=1, keepdims=True)
    patterns[-1] = 0.0
    return patterns


def _draw_video(
    rng: np.random.Generator, spec: SyntheticSpec, classes: _Classes, first: bool
) -> _Video:
    """Draw one video's activities, actions and timing, and the features of all its frames."""
    n, fps = spec.actions_per_video, spec.fps
    stretches = rng.integers(spec.activity_length[0], spec.activity_length[1] + 1, size=n)
    activity_per_stretch = rng.choice(len(classes.activity_probs), size=n, p=classes.activity_probs)
    activities = np.repeat(activity_per_stretch, stretches)[:n]
    draws = rng.random(n)[:, None]
    actions = (classes.action_cdf[activities] <= draws).sum(axis=1)  # inverse-CDF sampling

    lengths = np.maximum(1, np.rint(rng.uniform(*spec.duration, size=n) * fps)).astype(np.int64)
    gaps = np.maximum(1, np.rint(rng.uniform(*spec.gap, size=n) * fps)).astype(np.int64)
    first_start = FIRST_START_FRAME if first else int(rng.integers(FIRST_START_FRAME, fps + 1))
    starts = first_start + np.concatenate([[0], np.cumsum(lengths + gaps)[:-1]])
    ends = starts + lengths
    num_frames = int(ends[-1] + rng.integers(fps, 2 * fps + 1))

    context_to = starts - round(spec.context[1] * fps)
    context_from = np.maximum(starts - round(spec.context[0] * fps), np.r_[1, context_to[:-1]])
    context = _paint(num_frames, context_from, context_to, activities)

    cue_frames = max(1, round(spec.cue_length * fps))
    earliest = round(spec.cue_window[0] * fps)
    latest = min(earliest, round(spec.cue_window[1] * fps) + cue_frames)
    cue_from = starts - rng.integers(latest, earliest + 1, size=n)
    burst = _paint(num_frames, cue_from, cue_from + cue_frames, classes.verbs[actions])
    trace = _paint(num_frames, cue_from + cue_frames, starts, classes.verbs[actions])

    features = {}
    for modality, dim in zip(MODALITIES, spec.dims):
        verb_patterns = classes.verb_patterns[modality]
        signal = classes.context_patterns[modality][context] + verb_patterns[burst]
        signal += spec.cue_trace * verb_patterns[trace]
        values = signal + spec.noise * _noise(rng, num_frames, dim, spec)
        if modality == "obj":
            values = np.maximum(values - OBJ_THRESHOLD, 0.0)
        features[modality] = values.astype(np.float32)
    return _Video(features, starts, ends, actions)


def _paint(
    num_frames: int, starts: np.ndarray, stops: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """Per-frame label of frames 1..N: values[k] on frames [starts[k], stops[k]), -1 elsewhere.

    The intervals are disjoint; frames before frame 1 are dropped. Label -1 picks the zero row of
    a pattern table.
    """
    starts = np.maximum(starts, 1)
    lengths = np.maximum(stops - starts, 0)
    offsets = np.cumsum(lengths) - lengths
    frames = np.repeat(starts - offsets, lengths) + np.arange(lengths.sum())
    labels = np.full(num_frames, -1, dtype=np.int64)
    labels[frames - 1] = np.repeat(values, lengths)
    return labels


def _noise(rng: np.random.Generator, num_frames: int, dim: int, spec: SyntheticSpec) -> np.ndarray:
    """Unit-variance Gaussian noise, a `smooth_noise` share of it a moving average over noise_span."""
    width = max(1, round(spec.noise_span * spec.fps))
    white = rng.standard_normal((num_frames, dim))
    sums = np.cumsum(rng.standard_normal((num_frames + width, dim)), axis=0)
    smooth = (sums[width:] - sums[:-width]) / np.sqrt(width)
    return np.sqrt(1 - spec.smooth_noise) * white + np.sqrt(spec.smooth_noise) * smooth


def _write_classes(
    folder: Path, spec: SyntheticSpec, classes: _Classes, counts: np.ndarray
) -> None:
    """Write actions.csv, the EPIC verb / noun class lists and the many-shot lists (the most
    frequent in training)."""
    verb_names = [_name(VERB_NAMES, "verb", v) for v in range(spec.num_verbs)]
    noun_names = [_name(NOUN_NAMES, "noun", n) for n in range(spec.num_nouns)]
    lines = ["id,action,verb,noun\n"] + [
        f"{a},{verb_names[v]}_{noun_names[n]},{v},{n}\n"
        for a, (v, n) in enumerate(zip(classes.verbs, classes.nouns))
    ]
    (folder / "actions.csv").write_text("".join(lines), encoding="utf-8")
    for kind, labels, names in (
        ("verb", classes.verbs, verb_names),
        ("noun", classes.nouns, noun_names),
    ):
        per_class = np.bincount(labels, weights=counts, minlength=len(names))
        keep = max(1, int(np.ceil(spec.many_shot * len(names))))
        many = np.sort(np.argsort(-per_class, kind="stable")[:keep])
        text = f"{kind}_class,{kind}\n" + "".join(f"{c},{names[c]}\n" for c in many)
        (folder / f"EPIC_many_shot_{kind}s.csv").write_text(text, encoding="utf-8")
        classes_text = f"{kind}_id,class_key\n" + "".join(f"{c},{n}\n" for c, n in enumerate(names))
        (folder / f"EPIC_{kind}_classes.csv").write_text(classes_text, encoding="utf-8")


def _name(names: tuple[str, ...], kind: str, index: int) -> str:
    """Readable class name, falling back to `verb12` / `noun30` beyond the built-in list."""
    return names[index] if index < len(names) else f"{kind}{index}"
