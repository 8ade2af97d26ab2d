"""The artefact registry: every shipped entry is well-formed, selections pick the right files,
and malformed registry files are refused by name."""

from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import urlsplit

import pytest

from sfr.errors import ConfigError, SfrError
from sfr.hub.registry import Convert, Unzip, load_registry, parse_registry

REGISTRY = load_registry()

GOOD_ENTRY = """
[[artefact]]
name = "thing"
description = "a thing"
kind = "backbone"
root = "runs"
dest = "backbones/thing.bin"
urls = ["https://example.org/thing.bin"]
"""


@pytest.mark.parametrize("artefact", REGISTRY.artefacts, ids=lambda a: a.name)
def test_every_entry_is_well_formed(artefact) -> None:
    assert artefact.description.strip() and "\n" not in artefact.description
    for url in artefact.urls:
        parts = urlsplit(url)
        assert parts.scheme == "https" and parts.netloc
    dest = PurePosixPath(artefact.dest)
    assert not dest.is_absolute() and ".." not in dest.parts
    assert artefact.post.kind in ("none", "unzip", "convert")
    assert artefact.root in ("data", "runs")
    if artefact.root == "data":
        assert artefact.dataset is not None
    if isinstance(artefact.post, Convert):
        assert artefact.root == "runs" and artefact.dest.endswith(".pth.tar")
        assert artefact.post.dataset == artefact.dataset
    if isinstance(artefact.post, Unzip):
        assert artefact.archive_name.endswith(".zip")


def test_names_are_unique_and_the_expected_ones_exist() -> None:
    names = REGISTRY.names
    assert len(names) == len(set(names))
    for name in (
        "ek55-features-rgb",
        "ek55-features-rgb-full",
        "ek100-features-flow-full",
        "egtea-features",
        "ek55-annotations-actions",
        "rulstm-ek55-anticipation-rgb",
        "rulstm-ek55-early-rgb",
        "rulstm-ek100-anticipation-fusion",
        "tsn-rgb",
        "tsn-flow-ek100",
        "ek100-detected-objects",
        "slowfast-r50-kinetics",
        "ek55-class-names-verbs",
        "ek100-class-names-nouns",
    ):
        assert name in names


def test_annotations_land_where_sfr_reads_them() -> None:
    ek55 = {a.dest for a in REGISTRY.annotations("ek55")}
    assert {"training.csv", "validation.csv", "actions.csv"} <= ek55
    assert {"EPIC_many_shot_verbs.csv", "EPIC_many_shot_nouns.csv"} <= ek55
    ek100 = {a.dest for a in REGISTRY.annotations("ek100")}
    assert {"validation_unseen_participants_ids.csv", "validation_tail_actions_ids.csv"} <= ek100
    egtea = {a.dest for a in REGISTRY.annotations("egtea")}
    assert egtea == {"actions.csv"} | {
        f"{s}{i}.csv" for s in ("training", "validation") for i in (1, 2, 3)
    }
    with_names = {a.dest for a in REGISTRY.annotations("ek100", class_names=True)}
    assert {"EPIC_100_verb_classes.csv", "EPIC_100_noun_classes.csv"} <= with_names


def test_feature_selection_by_dataset_modality_and_variant() -> None:
    sparse = REGISTRY.features("ek55", ["obj", "rgb"])
    assert [a.name for a in sparse] == ["ek55-features-obj", "ek55-features-rgb"]
    assert [a.dest for a in sparse] == ["obj/data.mdb", "rgb/data.mdb"]
    full = REGISTRY.features("ek55", ["rgb"], full=True)
    assert [a.name for a in full] == ["ek55-features-rgb-full"] and full[0].dest == "rgb/data.mdb"
    assert len(REGISTRY.features("ek100")) == 3  # full implied
    assert [a.name for a in REGISTRY.features("egtea")] == ["egtea-features"]
    with pytest.raises(SfrError, match="one archive"):
        REGISTRY.features("egtea", ["rgb"])


def test_pretrained_selection_by_task() -> None:
    assert len(REGISTRY.pretrained("ek55")) == 7
    early = REGISTRY.pretrained("ek55", "early_recognition")
    assert {a.post.modality for a in early if isinstance(a.post, Convert)} == {"rgb", "flow", "obj"}
    with pytest.raises(SfrError, match="No early_recognition checkpoints") as raised:
        REGISTRY.pretrained("ek100", "early_recognition")
    assert "anticipation" in str(raised.value)


@pytest.mark.parametrize(
    ("call", "valid"),
    [
        (lambda: REGISTRY.annotations("ek99"), "ek55, ek100, egtea"),
        (lambda: REGISTRY.features("ek55", ["depth"]), "rgb, flow, obj"),
        (lambda: REGISTRY.pretrained("ek55", "recognition"), "anticipation, early_recognition"),
        (lambda: REGISTRY.get("tsn-depth"), "tsn-rgb"),
    ],
)
def test_unknown_names_list_the_valid_ones(call, valid: str) -> None:
    with pytest.raises(SfrError) as raised:
        call()
    assert valid in str(raised.value)


def test_a_well_formed_registry_file_loads() -> None:
    assert parse_registry(GOOD_ENTRY).names == ["thing"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            ('urls = ["https://example.org/thing.bin"]', 'urls = ["http://example.org/thing.bin"]'),
            "https",
        ),
        (
            ('urls = ["https://example.org/thing.bin"]', 'urls = ["https://u:pw@example.org/t"]'),
            "user information",
        ),
        (('dest = "backbones/thing.bin"', 'dest = "../thing.bin"'), "'..'"),
        (('dest = "backbones/thing.bin"', 'dest = "/abs/thing.bin"'), "relative"),
        (('kind = "backbone"', 'kind = "backbone"\npost = { kind = "untar" }'), "post"),
        (('kind = "backbone"', 'kind = "backbone"\nmirror = "x"'), "mirror"),
        (('root = "runs"', 'root = "data"'), "dataset"),
        (('kind = "backbone"', 'kind = "backbone"\nsha256 = "xyz"'), "sha256"),
    ],
)
def test_malformed_registry_files_are_refused(change: tuple[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match="not a valid artefact registry") as raised:
        parse_registry(GOOD_ENTRY.replace(*change))
    assert needle in str(raised.value)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="appears twice"):
        parse_registry(GOOD_ENTRY + GOOD_ENTRY)
