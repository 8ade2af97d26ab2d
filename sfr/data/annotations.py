"""Annotation CSVs of EK55, EK100 and EGTEA Gaze+ (DESIGN §2), read with the standard library.

Segment CSVs have no header and 7 columns `id, video, start_frame, end_frame, verb, noun, action`
(test CSVs only the first 4). EK55 pads numbers with zeros and puts a space after each comma;
ids that are integers are normalised (`00330` -> `330`), EK100 ids stay strings (`P01_11_0`).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sfr.errors import DataError, counted
from sfr.files import missing_reason


@dataclass(frozen=True)
class Segment:
    """One annotated action segment; labels are None in test CSVs."""

    id: str
    video: str
    start_frame: int
    end_frame: int
    verb: int | None = None
    noun: int | None = None
    action: int | None = None
    source: str = field(default="", compare=False, repr=False)  # "PATH, line N" when read

    @property
    def labelled(self) -> bool:
        return self.action is not None

    @property
    def described(self) -> str:
        """`id` with the CSV line it was read from, for messages: `994 (validation.csv, line 5)`."""
        return f"{self.id} ({self.source})" if self.source else self.id


@dataclass(frozen=True)
class ActionsTable:
    """The action classes: verb and noun of each action id, and its name when known."""

    verbs: np.ndarray  # (A,) int64, verb class of each action
    nouns: np.ndarray  # (A,) int64, noun class of each action
    names: tuple[str, ...]

    @property
    def num_actions(self) -> int:
        return len(self.verbs)

    @property
    def num_verbs(self) -> int:
        return int(self.verbs.max()) + 1

    @property
    def num_nouns(self) -> int:
        return int(self.nouns.max()) + 1


def normalise_id(raw: str) -> str:
    """Strip an id and drop zero padding from integer ids (`00330` -> `330`)."""
    raw = raw.strip()
    return str(int(raw)) if raw.isdigit() else raw


# The largest verb or noun class id accepted: EK100 has 97 verbs and 300 nouns; a bigger id is
# a damaged table (the class-by-action matrices are sized by the largest id).
MAX_CLASS_ID = 99_999


def _rows(path: Path) -> Iterable[tuple[int, list[str]]]:
    """Non-empty rows of a CSV with stripped cells; DataError for an unreadable file."""
    if path.is_dir():
        raise DataError(
            f"Annotation file {path} is a folder.",
            "Check --data and the data.*_csv settings: they name annotation CSV files.",
        )
    if not path.is_file():
        raise DataError(
            f"Annotation file {path} {missing_reason(path)}.",
            "Check --data: it should hold the dataset's annotation CSVs.",
        )
    line_number = 0
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for line_number, row in enumerate(csv.reader(handle), start=1):
                cells = [cell.strip() for cell in row]
                if any(cells):
                    yield line_number, cells
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not a UTF-8 text CSV (byte {error.start} cannot be decoded).",
            "Check that the file is the annotation CSV and not a binary or re-encoded file.",
        ) from None
    except csv.Error as error:
        raise DataError(
            f"{path}, line {line_number + 1}: not a readable CSV row ({error}).",
            "Check that the file is the annotation CSV.",
        ) from None
    except OSError as error:
        raise DataError(f"{path} cannot be read: {error.strerror or error}.") from None


def _cell(cells: list[str], index: int, path: Path, line: int, column: str) -> str:
    if index >= len(cells):
        raise DataError(
            f"{path}, line {line}: the row has {len(cells)} columns, so no '{column}' "
            f"(column {index + 1} of the header)."
        )
    return cells[index]


def _class_id(cell: str, path: Path, line: int, column: str) -> int:
    value = _int(cell, path, line, column)
    if not 0 <= value <= MAX_CLASS_ID:
        raise DataError(
            f"{path}, line {line}: {column} class {value} is outside 0..{MAX_CLASS_ID}.",
            "Class ids are small non-negative integers: check the table.",
        )
    return value


def _int(cell: str, path: Path, line: int, column: str) -> int:
    try:
        return int(cell)
    except ValueError:
        raise DataError(
            f"{path}, line {line}: column '{column}' should be an integer, found {cell!r}."
        ) from None


def read_segments(path: Path) -> list[Segment]:
    """Read a segment CSV (training, validation or test); ids must be unique."""
    path = Path(path)
    segments: list[Segment] = []
    first_line: dict[str, int] = {}  # segment id -> its line
    for line, cells in _rows(path):
        if len(cells) not in (4, 7):
            raise DataError(
                f"{path}, line {line}: expected 7 columns (id, video, start_frame, end_frame, "
                f"verb, noun, action) or 4 for a test split, found {len(cells)}."
            )
        start = _int(cells[2], path, line, "start_frame")
        end = _int(cells[3], path, line, "end_frame")
        if start < 0 or end < start:
            why = (
                "frames are counted from 0"
                if start < 0
                else "an action cannot end before it starts"
            )
            raise DataError(
                f"{path}, line {line}: segment {cells[0].strip()} runs from frame {start} to "
                f"frame {end}; {why}.",
                "Correct the start_frame / end_frame columns of that row.",
            )
        labels = [_int(c, path, line, n) for c, n in zip(cells[4:], ("verb", "noun", "action"))]
        source = f"{path}, line {line}"
        segment_id = normalise_id(cells[0])
        if segment_id in first_line:
            raise DataError(
                f"{path}, line {line}: segment id {segment_id!r} is already used on line "
                f"{first_line[segment_id]}.",
                "Every segment id must appear once: remove the repeated row or renumber it.",
            )
        first_line[segment_id] = line
        segments.append(Segment(segment_id, cells[1], start, end, *labels, source=source))
    if not segments:
        raise DataError(
            f"{path} holds no segments (the file is empty).",
            "Put the split's annotation CSV there (sfr download annotations DATASET).",
        )
    return segments


def check_action_ids(segments: Sequence[Segment], path: Path, num_classes: int) -> None:
    """Refuse a labelled segment whose action id is not one of the `num_classes` actions."""
    for segment in segments:
        if segment.action is not None and not 0 <= segment.action < num_classes:
            raise DataError(
                f"{path}: segment {segment.id} has action {segment.action}, "
                f"outside 0..{num_classes - 1}.",
                "Check data.actions_csv / data.num_classes against this file.",
            )


def read_actions(path: Path) -> ActionsTable:
    """Read an actions table.

    EK55/EK100: header with at least `id`, `verb`, `noun` (EK55: `id,action,verb,noun`).
    EGTEA: no header, `id, verb_noun, name` (for example `3, 3_3, Cut_tomato`).
    """
    path = Path(path)
    rows = list(_rows(path))
    if not rows:
        raise DataError(f"Actions table {path} is empty.")
    first = rows[0][1]
    entries: dict[int, tuple[int, int, str]] = {}
    lines: dict[int, int] = {}  # action id -> the line that defines it
    if not first[0].isdigit():
        header = [c.lower() for c in first]
        missing = [c for c in ("id", "verb", "noun") if c not in header]
        if missing:
            raise DataError(f"{path}: header lacks column(s) {', '.join(missing)}.")
        col = {name: header.index(name) for name in header}
        for line, cells in rows[1:]:
            name = _cell(cells, col["action"], path, line, "action") if "action" in col else ""
            action = _int(_cell(cells, col["id"], path, line, "id"), path, line, "id")
            _unique_action(action, entries, lines, path, line)
            entries[action] = (
                _class_id(_cell(cells, col["verb"], path, line, "verb"), path, line, "verb"),
                _class_id(_cell(cells, col["noun"], path, line, "noun"), path, line, "noun"),
                name,
            )
    else:
        for line, cells in rows:
            if len(cells) < 2 or "_" not in cells[1]:
                raise DataError(f"{path}, line {line}: expected `id, verb_noun, name`.")
            verb, noun = cells[1].split("_", 1)
            name = cells[2] if len(cells) > 2 else cells[1]
            action = _int(cells[0], path, line, "id")
            _unique_action(action, entries, lines, path, line)
            entries[action] = (
                _class_id(verb, path, line, "verb"),
                _class_id(noun, path, line, "noun"),
                name,
            )
    if sorted(entries) != list(range(len(entries))):
        raise DataError(f"{path}: action ids must be 0..{len(entries) - 1} without gaps.")
    ordered = [entries[i] for i in range(len(entries))]
    return ActionsTable(
        verbs=np.array([e[0] for e in ordered], dtype=np.int64),
        nouns=np.array([e[1] for e in ordered], dtype=np.int64),
        names=tuple(e[2] for e in ordered),
    )


def _unique_action(
    action: int,
    entries: dict[int, tuple[int, int, str]],
    lines: dict[int, int],
    path: Path,
    line: int,
) -> None:
    """Refuse an action id defined twice (a second row would silently replace the first)."""
    if action in entries:
        raise DataError(
            f"{path}, line {line}: action id {action} is already defined on line {lines[action]}.",
            "Every action id must appear once: remove or renumber one of the two rows.",
        )
    lines[action] = line


def read_class_list(path: Path, column: str) -> list[int]:
    """Read a class list with a header naming `column` (EK55 many-shot lists: `verb_class`)."""
    path = Path(path)
    rows = list(_rows(path))
    if not rows or column not in rows[0][1]:
        raise DataError(f"{path}: expected a header with a '{column}' column.")
    index = rows[0][1].index(column)
    return [
        _class_id(_cell(cells, index, path, line, column), path, line, column)
        for line, cells in rows[1:]
    ]


def read_id_list(path: Path) -> set[str]:
    """Read a list of segment ids, one per line, no header (EK100 unseen/tail id lists)."""
    return {normalise_id(cells[0]) for _, cells in _rows(Path(path)) if cells and cells[0].strip()}


def read_class_names(path: Path) -> dict[int, str]:
    """Class id -> name from an EPIC class list (`verb_id,class_key,...` or `id,key,...`)."""
    path = Path(path)
    rows = list(_rows(path))
    if not rows or len(rows[0][1]) < 2:
        raise DataError(f"{path}: expected a header and at least two columns (id, name).")
    column = rows[0][1][0].strip()
    return {_int(cells[0], path, line, column): cells[1].strip() for line, cells in rows[1:]}


def read_class_weights(path: Path, num_classes: int) -> list[float]:
    """One loss weight per action class from a text file of numbers separated by white space
    (the published `actions_weights`, read there with `np.loadtxt`); DataError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"Class weights file {path} is not a UTF-8 text file.",
            "Point optim.class_weights at a text file with one weight per action class.",
        ) from None
    except OSError as error:
        raise DataError(
            f"Class weights file {path} cannot be read: {error.strerror or error}.",
            "Point optim.class_weights at a text file with one weight per action class.",
        ) from None
    try:
        weights = [float(word) for word in text.split()]
    except ValueError as error:
        raise DataError(f"{path}: {str(error).capitalize()}; expected numbers only.") from None
    if len(weights) != num_classes:
        raise DataError(
            f"{path} holds {counted(len(weights), 'weight')} but the data has {num_classes} action "
            "classes.",
            "Give one weight per action class, in the order of actions.csv.",
        )
    bad = next((w for w in weights if not np.isfinite(w) or w < 0), None)
    if bad is not None:
        raise DataError(f"{path}: weight {bad} is not a finite number >= 0.")
    return weights
