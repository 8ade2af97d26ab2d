"""Annotation CSVs of EK55, EK100 and EGTEA, and actions tables."""

from __future__ import annotations

import pytest
from golden import GOLDEN_DATA

from sfr.data.annotations import read_actions, read_class_list, read_segments
from sfr.errors import DataError


def test_ek55_padded_rows_are_normalised(tmp_path) -> None:
    path = tmp_path / "training.csv"
    path.write_text("00330, P01_02, 0000000152, 0000000203, 003, 007, 0021\n")
    (segment,) = read_segments(path)
    assert (segment.id, segment.video, segment.start_frame, segment.end_frame) == (
        "330",
        "P01_02",
        152,
        203,
    )
    assert (segment.verb, segment.noun, segment.action) == (3, 7, 21)


def test_ek100_string_ids_and_test_csv_without_labels(tmp_path) -> None:
    path = tmp_path / "test.csv"
    path.write_text("P01_11_0,P01_11,120,300\nP01_11_1,P01_11,400,500\n")
    segments = read_segments(path)
    assert [s.id for s in segments] == ["P01_11_0", "P01_11_1"]
    assert segments[0].action is None and not segments[0].labelled


def test_egtea_rows(tmp_path) -> None:
    path = tmp_path / "training1.csv"
    path.write_text("2,P07-R01-PastaSalad,2751,2808,2,2,2\n")
    (segment,) = read_segments(path)
    assert segment.video == "P07-R01-PastaSalad" and segment.action == 2


def test_golden_files() -> None:
    assert len(read_segments(GOLDEN_DATA / "training.csv")) == 90
    actions = read_actions(GOLDEN_DATA / "actions.csv")
    assert actions.num_actions == 24 and actions.verbs[1] == 3 and actions.nouns[1] == 6
    assert read_class_list(GOLDEN_DATA / "EPIC_many_shot_verbs.csv", "verb_class") == [5, 3, 1]


def test_egtea_actions_table_without_header(tmp_path) -> None:
    path = tmp_path / "actions.csv"
    path.write_text("0, 0_0, Inspect/Read_recipe\n1, 1_1, Open_fridge\n2, 3_10, Cut_onion\n")
    actions = read_actions(path)
    assert actions.verbs.tolist() == [0, 1, 3] and actions.nouns.tolist() == [0, 1, 10]
    assert actions.names[2] == "Cut_onion" and actions.num_nouns == 11


@pytest.mark.parametrize(
    "content,match",
    [
        ("1, P01, 10\n", "expected 7 columns"),
        ("1, P01, x, 20, 1, 1, 1\n", "line 1: column 'start_frame'"),
        (
            "1, P01, 10, 20, 1, 1, 1\n01, P01, 30, 40, 1, 1, 1\n",
            "line 2: segment id '1' is already used on line 1",
        ),
    ],
)
def test_malformed_csvs_name_file_and_line(tmp_path, content: str, match: str) -> None:
    path = tmp_path / "validation.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as caught:
        read_segments(path)
    assert str(path) in str(caught.value)


def test_missing_csv(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_segments(tmp_path / "training.csv")


@pytest.mark.parametrize(
    ("row", "frames"),
    [
        ("7, P01_01, 0000000200, 0000000100, 3, 1, 12", "200 to frame 100"),
        ("8, P01_01, -5, 9, 3, 1, 12", "-5 to frame 9"),
    ],
)
def test_a_segment_that_ends_before_it_starts_is_refused(tmp_path, row: str, frames: str) -> None:
    path = tmp_path / "validation.csv"
    path.write_text("1, P01_01, 0000000010, 0000000020, 3, 1, 12\n" + row + "\n")
    with pytest.raises(DataError, match=f"line 2: segment .* runs from frame {frames}"):
        read_segments(path)
    path.write_text("1, P01_01, 0000000010, 0000000010, 3, 1, 12\n")  # one frame long: kept
    assert read_segments(path)[0].end_frame == 10


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        ("id,action,verb,noun\n0,a,0,0\n1,b,1,0\n1,c,1,1\n", (4, 3)),
        ("0, 0_0, Take\n1, 1_0, Put\n1, 1_1, Cut\n", (3, 2)),
    ],
    ids=["ek55", "egtea"],
)
def test_an_action_id_defined_twice_is_refused(tmp_path, text: str, lines: tuple) -> None:
    path = tmp_path / "actions.csv"
    path.write_text(text)
    again, first = lines
    with pytest.raises(
        DataError, match=f"line {again}: action id 1 is already defined on line {first}"
    ):
        read_actions(path)
