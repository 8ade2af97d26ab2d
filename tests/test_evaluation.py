"""Evaluation through the core API: load_model, export_bundle, evaluate, score, make_submission
and anticipate (DESIGN §5, issue 4).

The models are the session's `trained_runs` (Architectures 2 and 1 over rgb, flow and obj at
alpha 0.25 and 0.5, hidden 8, on the tiny synthetic EK55 data: 12 validation segments, the
first of which starts at frame 3 and is discarded by every grid). Every number a report holds is
recomputed here without the runner: the module runs over `AnticipationDataset` samples, and the
documented metric functions turn its softmax into accuracies, recalls and times to action.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    EK100_LISTS,
    EVAL_FINAL,
    EVAL_UNITS,
    Ek100Data,
    TrainedRuns,
    eval_fusion_config,
    relabel_checkpoint,
    writable_copy,
)
from safetensors.torch import load_file
from test_matmul import count_reorders

import sfr
from sfr.checkpoint import read_metadata
from sfr.data.annotations import ActionsTable, Segment, read_actions, read_segments
from sfr.data.dataset import AnticipationDataset, open_stores
from sfr.errors import ConfigError, DataError, RunError
from sfr.eval import runner
from sfr.eval.anticipate import anticipate, earliest_time
from sfr.eval.benchmark import SPLITS, Benchmark, load_benchmark, score, split_csv
from sfr.eval.evaluation import EvaluationSettings, evaluate, load_models
from sfr.eval.metrics import (
    many_shot_actions,
    marginalise,
    mean_time_to_action,
    mean_topk_recall,
    softmax,
    topk_accuracy,
    topk_hits,
    verb_noun_probabilities,
)
from sfr.eval.runner import Member, SplitPredictions, predict_split
from sfr.eval.submission import check_challenge, make_submission
from sfr.models.branch import create_branch
from sfr.models.fusion import BranchNode, FusionNode, NodeOutput
from sfr.models.matmul import onednn_available
from sfr.models.trained import TrainedModel, export_bundle, load_model, model_checkpoints
from sfr.train.fusion import FusionPlan

pytestmark = pytest.mark.usefixtures("module_torch_thread")

CPU = EvaluationSettings(device="cpu")
TASKS = ("verb", "noun", "action")
BRANCHES = ["rgb@0.25", "flow@0.25", "obj@0.25", "rgb@0.5", "flow@0.5", "obj@0.5"]
FAST_TIMES = (1.0, 0.75, 0.5, 0.25)
FUSED_TIMES = (1.0, 0.5)
NUM_CLASSES = 32
TOLERANCE = 1e-6  # percent values are rounded to 6 decimals in reports


# --------------------------------------------------------------------------------------------
# helpers: features, hand-computed scores and measures


def validation(data: Path) -> list[Segment]:
    return read_segments(data / "validation.csv")


def stores(model: TrainedModel, data: Path) -> dict[str, Any]:
    return open_stores(
        data, {s.modality: model.data.feature_dim(s.modality) for s in model.streams}
    )


def stack(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        key: torch.stack([s["features"][key] for s in samples]) for key in samples[0]["features"]
    }


def features_of(model: TrainedModel, data: Path) -> dict[str, torch.Tensor]:
    """A batch of every kept validation segment, with the streams the model reads."""
    dataset = AnticipationDataset(validation(data), model.streams, stores(model, data))
    return stack([dataset[i] for i in range(len(dataset))])


def eval_outputs(
    node: BranchNode | FusionNode, features: dict[str, torch.Tensor], times: Sequence[float]
) -> NodeOutput:
    """The node's outputs as a loaded model computes them: in eval mode, without gradients
    (oneDNN's inference and training LSTM kernels round differently)."""
    node.eval()
    with torch.no_grad():
        return node(features, times)


def assert_same_output(a: NodeOutput, b: NodeOutput) -> None:
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.context, b.context)
    assert sorted(a.attention) == sorted(b.attention)
    for label in a.attention:
        assert torch.equal(a.attention[label], b.attention[label]), label


@dataclass
class HandRun:
    """A model run by hand over a split: raw scores of the kept segments, in CSV order."""

    segments: list[Segment]
    kept: np.ndarray  # (N,) bool
    scores: np.ndarray  # (n_kept, K, A) float64
    attention: dict[str, np.ndarray]  # unit -> (n_kept, K, n)
    discarded: int

    def labels(self, task: str, rows: np.ndarray | None = None) -> np.ndarray:
        values = np.array([getattr(s, task) for s in self.segments], dtype=np.int64)
        return values[self.kept] if rows is None else values[rows]


def run_by_hand(model: TrainedModel, data: Path, segments: list[Segment]) -> HandRun:
    dataset = AnticipationDataset(segments, model.streams, stores(model, data))
    samples = [dataset[i] for i in range(len(dataset))]
    with torch.no_grad():
        output = model.module(stack(samples), model.times)
    gone = {s.id for s in dataset.discarded}
    return HandRun(
        segments,
        np.array([s.id not in gone for s in segments]),
        output.scores.double().numpy(),
        {label: w.double().numpy() for label, w in output.attention.items()},
        len(dataset.discarded),
    )


def task_probabilities(scores: np.ndarray, actions: ActionsTable) -> dict[str, np.ndarray]:
    """Softmax over the actions, verb and noun probabilities by the published marginalisation."""
    verb, noun = verb_noun_probabilities(scores, actions)
    return {"verb": verb, "noun": noun, "action": softmax(scores)}


def marginals(action_probs: np.ndarray, actions: ActionsTable) -> dict[str, np.ndarray]:
    return {
        "verb": marginalise(action_probs, actions.verbs, actions.num_verbs),
        "noun": marginalise(action_probs, actions.nouns, actions.num_nouns),
        "action": action_probs,
    }


def many_shot_lists(data: Path, actions: ActionsTable) -> dict[str, np.ndarray]:
    """The EK55 many-shot verbs and nouns read from their CSVs, and the many-shot actions."""
    lists = {}
    for task in ("verb", "noun"):
        with (data / f"EPIC_many_shot_{task}s.csv").open(newline="") as handle:
            lists[task] = np.array([int(row[f"{task}_class"]) for row in csv.DictReader(handle)])
    lists["action"] = many_shot_actions(actions, lists["verb"], lists["noun"])
    return lists


def ek55_measures(
    probs: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    many_shot: dict[str, np.ndarray],
    times: Sequence[float],
) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    """EK55 top-1, top-5, many-shot mean top-5 recall per time (percent) and TtA(5) (seconds)."""
    results: dict[str, dict[str, list[float]]] = {}
    tta = {}
    for task in TASKS:
        p, y = probs[task], labels[task]
        steps = range(len(times))
        results[task] = {
            "top1": [100 * topk_accuracy(p[:, i], y, 1) for i in steps],
            "top5": [100 * topk_accuracy(p[:, i], y, 5) for i in steps],
            "mt5r": [100 * mean_topk_recall(p[:, i], y, 5, many_shot[task]) for i in steps],
        }
        tta[task] = mean_time_to_action(p, y, times, 5)
        # TtA(5) spelled out: the largest time from which the label is among the 5 best
        top5 = np.argsort(-p, axis=-1, kind="stable")[..., :5]
        hit = (top5 == y[:, None, None]).any(-1)
        assert tta[task] == pytest.approx(np.where(hit, times, 0.0).max(axis=1).mean())
    return results, tta


def assert_results_match(reported: dict[str, Any], expected: dict[str, Any]) -> None:
    """Every task, measure and time of a report group equals the hand-computed value."""
    assert sorted(reported) == sorted(expected)
    for task, measures in expected.items():
        assert sorted(reported[task]) == sorted(measures), task
        for measure, values in measures.items():
            assert reported[task][measure] == pytest.approx(values, abs=TOLERANCE), (task, measure)


def class_mean_by_hand(hits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([hits[labels == c].mean() for c in np.unique(labels)]))


# --------------------------------------------------------------------------------------------
# module fixture: the models evaluated on EK55


@pytest.fixture(scope="module")
def ek55(trained_runs: TrainedRuns) -> tuple[list[TrainedModel], dict[str, Any]]:
    """A branch and both whole architectures, evaluated once on the validation split."""
    models = [
        load_model(trained_runs.branch("rgb@0.25")),
        load_model(trained_runs.fusion("arch2")),
        load_model(trained_runs.fusion("arch1")),
    ]
    return models, evaluate(models, trained_runs.data, settings=CPU, sfr_version="test")


# --------------------------------------------------------------------------------------------
# 1. load_model: every stage and level, rebuilt exactly


@pytest.mark.parametrize("label", BRANCHES)
def test_load_model_rebuilds_each_finetuned_branch(trained_runs: TrainedRuns, label: str) -> None:
    """A branch run folder loads its fine-tuned branch, whose outputs equal a plan-built node's."""
    model = load_model(trained_runs.branch(label, stage=None))
    best = trained_runs.branch(label) / "best.safetensors"
    assert model.source == best
    assert (model.kind, model.stage, model.label, model.num_classes) == (
        "branch",
        "finetune",
        label,
        NUM_CLASSES,
    )
    assert model.times == (FAST_TIMES if label.endswith("0.25") else FUSED_TIMES)
    assert not model.module.training
    node = FusionPlan(eval_fusion_config(), trained_runs.runs).build(label, NUM_CLASSES)
    node.branch.load_state_dict(load_file(str(best)))
    node.eval()
    features = features_of(model, trained_runs.data)
    assert_same_output(model(features), eval_outputs(node, features, node.times))
    assert load_model(best).source == load_model(best.parent).source == best


def test_load_model_rebuilds_a_pretraining_stage(trained_runs: TrainedRuns) -> None:
    """A pretrain folder loads the sequence-completion branch with the pre-trained weights."""
    folder = trained_runs.branch("flow@0.25", "pretrain")
    model = load_model(folder)
    assert (model.kind, model.stage, model.source) == (
        "branch",
        "pretrain",
        folder / "best.safetensors",
    )
    assert model.module.branch.sequence_completion
    weights = load_file(str(folder / "best.safetensors"))
    branch = create_branch(feat_dim=8, hidden=8, num_classes=NUM_CLASSES, sequence_completion=True)
    branch.load_state_dict(weights)
    node = BranchNode(branch, "flow@0.25", model.streams[0].grid).eval()
    features = features_of(model, trained_runs.data)
    assert_same_output(model(features), eval_outputs(node, features, FAST_TIMES))
    finetuned = load_model(trained_runs.branch("flow@0.25"))
    assert not torch.equal(model(features).scores, finetuned(features).scores)


@pytest.mark.parametrize(
    ("architecture", "label"),
    [(arch, label) for arch, labels in EVAL_UNITS.items() for label in labels],
)
def test_load_model_rebuilds_each_fusion_unit(
    trained_runs: TrainedRuns, architecture: str, label: str
) -> None:
    """Each unit folder of both architectures loads a tree with the plan-built unit's outputs."""
    folder = trained_runs.unit(architecture, label)
    model = load_model(folder)
    assert (model.kind, model.stage, model.label) == ("fusion", label, label)
    assert model.config.model.architecture == architecture
    plan = FusionPlan(eval_fusion_config(architecture), trained_runs.runs)
    assert [s.key for s in model.streams] == plan.leaves(label)
    node = plan.build(label, NUM_CLASSES)
    node.load_state_dict(load_file(str(folder / "best.safetensors")))
    node.eval()
    assert model.times == node.times
    features = features_of(model, trained_runs.data)
    output = model(features)
    assert_same_output(output, eval_outputs(node, features, node.times))
    below = set(EVAL_UNITS[architecture]) if label == EVAL_FINAL else {label}
    assert set(output.attention) == below


@pytest.mark.parametrize("architecture", ["arch2", "arch1"])
def test_a_fusion_folder_stands_for_its_final_unit_or_every_level(
    trained_runs: TrainedRuns, architecture: str
) -> None:
    """A fusion folder loads its final unit, or with every level each unit, lowest level first."""
    folder = trained_runs.fusion(architecture)
    units = [folder / label / "best.safetensors" for label in EVAL_UNITS[architecture]]
    assert model_checkpoints(folder, every_level=True) == units
    assert model_checkpoints(folder) == [units[-1]]
    model = load_model(folder)
    assert (model.source, model.stage, model.times) == (units[-1], EVAL_FINAL, FUSED_TIMES)
    assert "whole model" in model.description
    levels = load_models([folder], every_level=True)
    assert [m.stage for m in levels] == EVAL_UNITS[architecture]
    assert all("level 1 of 2" in m.description for m in levels[:-1])


def test_a_fusion_folder_without_a_unit_names_it(trained_runs: TrainedRuns, tmp_path: Path) -> None:
    """With every level, a fusion folder missing a unit is refused naming that unit."""
    folder = Path(shutil.copytree(trained_runs.fusion("arch2"), tmp_path / "arch2"))
    shutil.rmtree(folder / "rgb+flow+obj@0.5")
    with pytest.raises(RunError) as caught:
        load_models([folder], every_level=True)
    assert caught.value.message == f"{folder} has no finished rgb+flow+obj@0.5 stage."
    assert load_model(folder).stage == EVAL_FINAL


def test_load_model_refuses_a_folder_that_is_not_a_run(
    trained_runs: TrainedRuns, tmp_path: Path
) -> None:
    """A missing path and a folder without a checkpoint are refused by name."""
    with pytest.raises(RunError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(RunError) as caught:
        load_model(trained_runs.runs / "synthetic")
    assert str(trained_runs.runs / "synthetic") in caught.value.message
    assert "not a finished run" in caught.value.message


def test_load_model_refuses_a_resume_checkpoint_by_name(trained_runs: TrainedRuns) -> None:
    """`last.safetensors` (training state) is refused with a pointer to best.safetensors."""
    last = trained_runs.branch("rgb@0.25", "finetune") / "last.safetensors"
    with pytest.raises(RunError, match="training state for resuming") as caught:
        load_model(last)
    assert "best.safetensors" in caught.value.hint


# --------------------------------------------------------------------------------------------
# 2. model bundles


@pytest.mark.parametrize("which", ["branch", "arch2"])
def test_exported_bundle_is_self_contained_and_gives_identical_outputs(
    trained_runs: TrainedRuns, tmp_path: Path, which: str
) -> None:
    """A bundle reloads with identical outputs after the runs folder it came from is deleted."""
    runs = TrainedRuns(
        Path(shutil.copytree(trained_runs.runs, tmp_path / "runs")), trained_runs.data
    )
    source = runs.branch("obj@0.5") if which == "branch" else runs.fusion("arch2")
    model = load_model(source)
    features = features_of(model, trained_runs.data)
    expected = model(features)
    out = tmp_path / "bundles" / f"{which}.safetensors"
    export_bundle(model, out, sfr.__version__)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left
    shutil.rmtree(runs.runs)

    again = sfr.load_model(out)
    assert_same_output(again(features), expected)
    assert (again.kind, again.stage, again.times, again.name) == (
        model.kind,
        model.stage,
        model.times,
        model.name,
    )
    assert again.source == out
    bundle = read_metadata(out)["bundle"]
    assert bundle == {
        "format": "sfr-model/1",
        "exported_from": str(model.source),
        "sfr": sfr.__version__,
    }
    weights = load_file(str(out))
    if which == "arch2":  # every level's weights, all six branches included
        assert len({key.split(".branch.")[0] for key in weights if ".branch." in key}) == 6
        assert {k for k in weights if k.endswith("attention.mlp.0.weight")} == {
            "attention.mlp.0.weight",
            "inputs.0.attention.mlp.0.weight",
            "inputs.1.attention.mlp.0.weight",
        }


# --------------------------------------------------------------------------------------------
# 3. EK55 measures recomputed by hand


@pytest.mark.parametrize("index", [0, 1, 2], ids=["branch", "arch2", "arch1"])
def test_ek55_measures_equal_a_computation_by_hand(
    ek55: tuple[list[TrainedModel], dict[str, Any]], trained_runs: TrainedRuns, index: int
) -> None:
    """EK55 top-1/top-5/many-shot mT5R at every time and TtA(5) equal a computation by hand."""
    models, doc = ek55
    model, entry = models[index], doc["models"][index]
    data = trained_runs.data
    segments = validation(data)
    hand = run_by_hand(model, data, segments)
    assert hand.discarded >= 1 and not hand.kept[0]  # the first segment starts at frame 3
    assert entry["samples"] == {
        "total": len(segments),
        "evaluated": len(segments) - hand.discarded,
        "discarded": hand.discarded,
        "discarded_policy": "excluded",
    }
    actions = read_actions(data / "actions.csv")
    labels = {task: hand.labels(task) for task in TASKS}
    results, tta = ek55_measures(
        task_probabilities(hand.scores, actions),
        labels,
        many_shot_lists(data, actions),
        model.times,
    )
    assert entry["times"] == list(model.times)
    assert list(entry["results"]) == ["overall"]
    assert_results_match(entry["results"]["overall"], results)
    assert entry["tta"]["k"] == 5
    for task in TASKS:
        assert entry["tta"][task] == pytest.approx(tta[task], abs=TOLERANCE), task
    # the attention each fusion unit gave its inputs, averaged over the evaluated segments
    assert [a["unit"] for a in entry["attention"]] == (
        [] if model.kind == "branch" else EVAL_UNITS[model.config.model.architecture]
    )
    for unit in entry["attention"]:
        mean = hand.attention[unit["unit"]].mean(axis=0)
        assert np.allclose(unit["weights"], mean, rtol=0, atol=TOLERANCE), unit["unit"]
        assert unit["times"] == list(model.times)
        assert np.allclose(np.sum(unit["weights"], axis=1), 1, atol=1e-5)


def test_ek55_report_document(ek55: tuple[list[TrainedModel], dict[str, Any]]) -> None:
    """The report names the dataset, split, measures, groups and each model it scored."""
    models, doc = ek55
    assert (doc["schema"], doc["dataset"], doc["split"], doc["sfr_version"]) == (
        "sfr-report/1",
        "ek55",
        "validation",
        "test",
    )
    assert list(doc["measure_names"]) == ["top1", "top5", "mt5r"]
    assert list(doc["group_names"]) == ["overall"]
    assert doc["headline"] == {"group": "overall", "task": "action", "measure": "top5"}
    assert [e["name"] for e in doc["models"]] == [m.name for m in models]
    assert [e["kind"] for e in doc["models"]] == ["branch", "fusion", "fusion"]
    assert [e["source"] for e in doc["models"]] == [str(m.source) for m in models]
    assert json.loads(json.dumps(doc)) == doc


# --------------------------------------------------------------------------------------------
# 4. EK100: discarded segments count as wrong, unseen and tail groups


def test_ek100_scores_every_segment_and_the_unseen_and_tail_subsets(
    ek100: Ek100Data, ek55: tuple[list[TrainedModel], dict[str, Any]], trained_runs: TrainedRuns
) -> None:
    """EK100 counts discarded segments as wrong; unseen and tail measures match the id lists."""
    model = load_model(ek100.model)
    assert model.data.dataset == "ek100"
    doc = evaluate([model], ek100.data, settings=CPU)
    entry = doc["models"][0]
    assert doc["dataset"] == "ek100"
    assert list(doc["group_names"]) == ["overall", "unseen", "tail"]
    assert list(entry["results"]) == ["overall", "unseen", "tail"]
    assert entry["tta"] is None
    segments = validation(ek100.data)
    assert segments[0].id == "P01_03_0"
    hand = run_by_hand(model, ek100.data, segments)
    assert entry["samples"] == {
        "total": 12,
        "evaluated": 12,
        "discarded": hand.discarded,
        "discarded_policy": "counted as wrong",
    }
    actions = read_actions(ek100.data / "actions.csv")
    probs = task_probabilities(hand.scores, actions)
    ids = np.array([s.id for s in segments])
    subsets = {
        "overall": dict.fromkeys(TASKS, np.ones(len(ids), bool)),
        "unseen": dict.fromkeys(TASKS, np.isin(ids, ek100.lists["unseen"])),
        "tail": {task: np.isin(ids, ek100.lists[task]) for task in TASKS},
    }
    assert subsets["unseen"]["verb"][0]  # the discarded segment is in the unseen subset
    for group, rows_of in subsets.items():
        expected = {}
        for task in TASKS:
            labels = hand.labels(task, np.ones(len(ids), bool))
            hits = {}
            for k in (1, 5):
                hits[k] = np.zeros((len(ids), len(model.times)), bool)  # discarded: wrong
                hits[k][hand.kept] = topk_hits(probs[task], hand.labels(task), k)
            rows = rows_of[task]
            steps = range(len(model.times))
            expected[task] = {
                "top1": [100 * hits[1][rows, i].mean() for i in steps],
                "top5": [100 * hits[5][rows, i].mean() for i in steps],
                "mt5r": [100 * class_mean_by_hand(hits[5][rows, i], labels[rows]) for i in steps],
            }
        assert_results_match(entry["results"][group], expected)

    # the same model under the EK55 policy: top-k lower by exactly the discarded share
    _, ek55_doc = ek55
    ek55_entry = ek55_doc["models"][1]
    assert ek55_entry["source"] == str(trained_runs.unit("arch2", EVAL_FINAL) / "best.safetensors")
    share = (12 - hand.discarded) / 12
    for task in TASKS:
        for measure in ("top1", "top5"):
            ek55_values = ek55_entry["results"]["overall"][task][measure]
            values = entry["results"]["overall"][task][measure]
            assert all(a <= b for a, b in zip(values, ek55_values, strict=True))
            assert values == pytest.approx([v * share for v in ek55_values], abs=2 * TOLERANCE)


@pytest.mark.parametrize("missing", sorted(EK100_LISTS.values()))
def test_ek100_without_an_id_list_names_the_file(
    ek100: Ek100Data, tmp_path: Path, missing: str
) -> None:
    """A missing EK100 id list is a DataError naming the file."""
    data = writable_copy(ek100.data, tmp_path / "data")
    (data / missing).unlink()
    with pytest.raises(DataError) as caught:
        evaluate([load_model(ek100.model)], data, settings=CPU)
    assert f"{data} lacks {missing}:" in caught.value.message
    assert "sfr download annotations ek100" in (caught.value.hint or "")


def test_ek100_lists_are_named_together_and_a_validation_submission_needs_none(
    ek100: Ek100Data, tmp_path: Path
) -> None:
    """Every missing list is named at once; the challenge file is written without them (the
    unseen / tail breakdown is the evaluation server's, from its own lists)."""
    data = writable_copy(ek100.data, tmp_path / "data")
    names = list(dict.fromkeys(EK100_LISTS.values()))
    for name in names:
        (data / name).unlink()
    with pytest.raises(DataError) as caught:
        evaluate([load_model(ek100.model)], data, settings=CPU)
    assert f"{data} lacks {', '.join(names)}:" in caught.value.message
    assert "unseen participants and tail classes" in caught.value.message
    document = make_submission(load_model(ek100.model), data, "validation", device="cpu")
    ids = [s.id for s in validation(data)]
    assert check_challenge(document, "ek100", ids, NUM_CLASSES) == []


# --------------------------------------------------------------------------------------------
# 5. score on hand-built predictions: EGTEA mean class accuracy, EK55 many-shot recall

HAND_TIMES = (1.0, 0.5)
HAND_LABELS = [0, 0, 0, 1, 2]  # the last segment (class 2) is discarded
HAND_TOP = [  # (N, K, 5): best first, at 1.0 s then 0.5 s
    [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]],
    [[0, 3, 4, 5, 6], [2, 3, 4, 5, 0]],
    [[1, 0, 3, 4, 5], [5, 6, 7, 8, 9]],
    [[2, 3, 4, 5, 6], [1, 0, 2, 3, 4]],
    [[-1] * 5, [-1] * 5],
]


def hand_predictions(labelled: bool = True) -> SplitPredictions:
    """Five segments, the same labels and rankings for verb, noun and action."""
    n = len(HAND_LABELS)
    labels = np.array(HAND_LABELS if labelled else [-1] * n)
    top = np.array(HAND_TOP)
    return SplitPredictions(
        ids=[str(i) for i in range(n)],
        labels=dict.fromkeys(TASKS, labels),
        discarded=np.array([False, False, False, False, True]),
        times=HAND_TIMES,
        top_ids=dict.fromkeys(TASKS, top),
        top_probs=dict.fromkeys(TASKS, np.where(top >= 0, 0.1, 0.0)),
    )


def hand_benchmark(dataset: str, labelled: bool = True, **extra: Any) -> Benchmark:
    segments = [
        Segment(
            str(i), "P01_01", 100 * (i + 1), 100 * (i + 1) + 30, *(3 * [a if labelled else None])
        )
        for i, a in enumerate(HAND_LABELS)
    ]
    actions = ActionsTable(np.arange(10), np.arange(10), tuple(f"a{i}" for i in range(10)))
    split = "validation1" if dataset == "egtea" else "validation"
    return Benchmark(dataset, split, Path(f"{split}.csv"), actions, segments, **extra)


def test_egtea_mean_class_accuracy_by_hand() -> None:
    """EGTEA mean class accuracy is the class mean of top-1 recall over the kept segments."""
    result = score(hand_predictions(), hand_benchmark("egtea"))
    assert result["samples"] == {
        "total": 5,
        "evaluated": 4,
        "discarded": 1,
        "discarded_policy": "excluded",
    }
    assert result["tta"] is None
    # 1.0 s: top-1 hits 1 1 0 0, top-5 hits 1 1 1 0; classes 0 (2 of 3) and 1 (0 of 1)
    # 0.5 s: top-1 hits 0 0 0 1, top-5 hits 0 1 0 1; classes 0 (0 of 3) and 1 (1 of 1)
    expected = {"top1": [50.0, 25.0], "top5": [75.0, 50.0], "mca": [33.333333, 50.0]}
    assert result["results"] == {"overall": dict.fromkeys(TASKS, expected)}


def test_egtea_model_is_scored_on_the_named_split(
    trained_runs: TrainedRuns, synthetic_copy: Path, tmp_path: Path
) -> None:
    """An EGTEA model is scored on validation{N}.csv with mean class accuracy and no TtA."""
    (synthetic_copy / "validation2.csv").write_text((synthetic_copy / "validation.csv").read_text())
    best = trained_runs.branch("rgb@0.25") / "best.safetensors"
    model = load_model(relabel_checkpoint(best, tmp_path / "egtea.safetensors", "egtea"))
    # every validation2 segment is a training segment of split 1: scored only when forced
    with pytest.raises(ConfigError, match=r"(?s)trained on EGTEA split 1.*--other-split"):
        evaluate([model], synthetic_copy, split="validation2", settings=CPU)
    forced = EvaluationSettings(device="cpu", other_split=True)
    doc = evaluate([model], synthetic_copy, split="validation2", settings=forced)
    assert (doc["dataset"], doc["split"]) == ("egtea", "validation2")
    assert list(doc["measure_names"]) == ["top1", "top5", "mca"]
    entry = doc["models"][0]
    assert entry["tta"] is None and entry["samples"]["discarded_policy"] == "excluded"
    hand = run_by_hand(model, synthetic_copy, validation(synthetic_copy))
    probs = task_probabilities(hand.scores, read_actions(synthetic_copy / "actions.csv"))
    for task in TASKS:
        labels = hand.labels(task)
        top1 = np.argsort(-probs[task], axis=-1, kind="stable")[..., 0] == labels[:, None]
        expected = [100 * class_mean_by_hand(top1[:, i], labels) for i in range(len(FAST_TIMES))]
        assert entry["results"]["overall"][task]["mca"] == pytest.approx(expected, abs=TOLERANCE)
    with pytest.raises(DataError, match=r"validation3\.csv does not exist"):
        evaluate([model], synthetic_copy, split="validation3", settings=forced)


def test_ek55_many_shot_recall_and_time_to_action_by_hand() -> None:
    """EK55 mT5R averages over the many-shot classes present; TtA(5) is hand-computed."""
    many_shot = {"verb": np.array([0, 1]), "noun": np.array([1]), "action": np.array([0, 2])}
    result = score(hand_predictions(), hand_benchmark("ek55", many_shot=many_shot))
    results = result["results"]["overall"]
    # top-5 hits: 1.0 s -> 1 1 1 0, 0.5 s -> 0 1 0 1 (labels 0 0 0 1)
    assert results["verb"] == {
        "top1": [50.0, 25.0],
        "top5": [75.0, 50.0],
        "mt5r": [50.0, 66.666667],  # classes 0 and 1: (3/3 + 0/1) / 2, (1/3 + 1/1) / 2
    }
    assert results["noun"]["mt5r"] == [0.0, 100.0]  # class 1 only
    assert results["action"]["mt5r"] == [100.0, 33.333333]  # class 0 only: 2 is discarded
    assert result["tta"] == {"k": 5, "verb": 0.875, "noun": 0.875, "action": 0.875}


def test_class_mean_measures_are_none_without_any_class_present() -> None:
    """A many-shot list none of whose classes is labelled gives None, not 0, at every time."""
    none_present = dict.fromkeys(TASKS, np.array([7, 8]))
    result = score(hand_predictions(), hand_benchmark("ek55", many_shot=none_present))
    for task in TASKS:
        assert result["results"]["overall"][task]["mt5r"] == [None, None]
        assert result["results"]["overall"][task]["top5"] == [75.0, 50.0]


def test_score_refuses_an_unlabelled_split() -> None:
    """Scoring a split without labels is a ConfigError that points to the submission command."""
    with pytest.raises(ConfigError) as caught:
        score(hand_predictions(labelled=False), hand_benchmark("ek55", labelled=False))
    assert "validation.csv has no labels" in caught.value.message
    assert "sfr export submission" in (caught.value.hint or "")


# --------------------------------------------------------------------------------------------
# 6. ensembles


def test_ensemble_scores_the_weighted_mean_of_the_members_probabilities(
    trained_runs: TrainedRuns,
) -> None:
    """An ensemble scores the weighted mean of its members' softmax probabilities."""
    data = trained_runs.data
    a = load_model(trained_runs.branch("rgb@0.25"))
    b = load_model(trained_runs.branch("flow@0.25"))
    doc = evaluate([a, b], data, ensemble_weights=[3.0, 1.0], settings=CPU)
    assert [e["name"] for e in doc["models"]] == [a.name, b.name, "ensemble"]
    entry = doc["models"][2]
    assert (entry["kind"], entry["source"], entry["attention"]) == ("ensemble", "", [])
    assert entry["members"] == [{"name": a.name, "weight": 0.75}, {"name": b.name, "weight": 0.25}]
    segments = validation(data)
    hand_a, hand_b = run_by_hand(a, data, segments), run_by_hand(b, data, segments)
    assert (hand_a.kept == hand_b.kept).all()
    actions = read_actions(data / "actions.csv")
    mean = 0.75 * softmax(hand_a.scores) + 0.25 * softmax(hand_b.scores)
    labels = {task: hand_a.labels(task) for task in TASKS}
    results, tta = ek55_measures(
        marginals(mean, actions), labels, many_shot_lists(data, actions), a.times
    )
    assert_results_match(entry["results"]["overall"], results)
    assert entry["tta"] == pytest.approx({"k": 5, **tta}, abs=TOLERANCE)
    # equal weights would give other probabilities: the weights are used, not only reported
    predictions = predict_split(
        [Member(a, 3.0), Member(b, 1.0)], segments, data, actions, device="cpu"
    )
    best = np.sort(mean, axis=-1)[..., ::-1][..., :5]
    assert np.allclose(predictions.top_probs["action"][hand_a.kept], best, atol=1e-6)
    equal = 0.5 * softmax(hand_a.scores) + 0.5 * softmax(hand_b.scores)
    assert not np.allclose(np.sort(equal, axis=-1)[..., ::-1][..., :5], best, atol=1e-6)


def test_ensemble_of_models_with_other_times_is_refused_naming_both(
    trained_runs: TrainedRuns,
) -> None:
    """An ensemble over different times is refused naming both models, so is a bad weight count."""
    fast = load_model(trained_runs.branch("rgb@0.25"))
    slow = load_model(trained_runs.branch("rgb@0.5"))
    with pytest.raises(ConfigError) as caught:
        evaluate([fast, slow], trained_runs.data, ensemble_weights=[1.0, 1.0], settings=CPU)
    message = caught.value.message
    assert "rgb@0.25 finetune at 1, 0.75, 0.5, 0.25 s" in message
    assert "rgb@0.5 finetune at 1, 0.5 s" in message
    with pytest.raises(ConfigError, match="gives 1 weight for 2 models"):
        evaluate([fast, fast], trained_runs.data, ensemble_weights=[1.0], settings=CPU)
    # without an ensemble, the two are scored side by side
    doc = evaluate([fast, slow], trained_runs.data, settings=CPU)
    assert [e["times"] for e in doc["models"]] == [list(FAST_TIMES), list(FUSED_TIMES)]


# --------------------------------------------------------------------------------------------
# 7. challenge submissions

EARLY_ID = "99999"  # a test segment that starts too early for any grid: discarded


@pytest.fixture(scope="module")
def with_test_split(trained_runs: TrainedRuns, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the data with a `test_seen.csv` (4 columns, no labels): some validation rows
    and one that starts at frame 2."""
    data = writable_copy(trained_runs.data, tmp_path_factory.mktemp("test-split") / "data")
    rows = [line.split(",")[:4] for line in (data / "validation.csv").read_text().splitlines()[3:9]]
    rows.append([f"{EARLY_ID}", " P01_03", " 0000000002", " 0000000030"])
    (data / "test_seen.csv").write_text("".join(",".join(r) + "\n" for r in rows), "utf-8")
    return data


def check_entries(document: dict[str, Any], ids: list[str], verbs: int, nouns: int) -> None:
    assert list(document["results"]) == ids
    for entry in document["results"].values():
        assert sorted(entry) == ["action", "noun", "verb"]
        assert list(entry["verb"]) == [str(v) for v in range(verbs)]
        assert list(entry["noun"]) == [str(n) for n in range(nouns)]
        assert len(entry["action"]) == min(100, NUM_CLASSES)
        assert all(len(key.split(",")) == 2 for key in entry["action"])


def test_submission_on_the_validation_split(trained_runs: TrainedRuns) -> None:
    """The EK55 challenge document has every id, all classes and predict_split's scores."""
    data = trained_runs.data
    model = load_model(trained_runs.fusion("arch2"))
    document = make_submission(model, data, "validation", device="cpu")
    assert {k: v for k, v in document.items() if k != "results"} == {
        "version": "0.1",
        "challenge": "action_anticipation",
        "sls_pt": 1,
        "sls_tl": 4,
        "sls_td": 3,
    }
    segments = validation(data)
    ids = [s.id for s in segments]
    assert ids[:2] == ["24", "25"]  # EK55 ids without their zero padding
    check_entries(document, ids, 125, 352)
    assert check_challenge(document, "ek55", ids, NUM_CLASSES) == []
    assert json.loads(json.dumps(document)) == document

    actions = read_actions(data / "actions.csv")
    predictions = predict_split(
        [Member(model)],
        segments,
        data,
        actions,
        device="cpu",
        full_at=1.0,
        num_verbs=125,
        num_nouns=352,
    )
    full = predictions.full
    assert full is not None and full.time == 1.0
    hand = run_by_hand(model, data, segments)
    step = model.times.index(1.0)
    probs = softmax(hand.scores)[:, step]
    kept_rows = iter(range(len(probs)))
    for row, segment_id in enumerate(ids):
        entry = document["results"][segment_id]
        assert list(entry["verb"].values()) == full.verb[row].tolist()
        assert list(entry["noun"].values()) == full.noun[row].tolist()
        if predictions.discarded[row]:
            assert not hand.kept[row]
            assert not any(entry["verb"].values()) and not any(entry["noun"].values())
            assert not any(entry["action"].values())
            continue
        p = probs[next(kept_rows)]
        order = np.argsort(-p, kind="stable")
        assert list(entry["action"]) == [f"{actions.verbs[a]},{actions.nouns[a]}" for a in order]
        assert list(entry["action"].values()) == pytest.approx(p[order].tolist(), abs=1e-9)
        verbs = marginalise(p, actions.verbs, actions.num_verbs)
        assert [entry["verb"][str(v)] for v in range(actions.num_verbs)] == pytest.approx(
            verbs.tolist(), abs=1e-6
        )
        nouns = marginalise(p, actions.nouns, actions.num_nouns)
        assert [entry["noun"][str(n)] for n in range(actions.num_nouns)] == pytest.approx(
            nouns.tolist(), abs=1e-6
        )
    assert predictions.discarded.sum() == hand.discarded >= 1


def test_submission_on_a_test_split_lists_every_id_including_discarded(
    trained_runs: TrainedRuns, with_test_split: Path
) -> None:
    """An unlabelled test split gets one entry per id; the discarded one has zero scores."""
    model = load_model(trained_runs.branch("rgb@0.25"))
    document = make_submission(model, with_test_split, "test_seen", device="cpu", time=0.75)
    ids = [s.id for s in read_segments(with_test_split / "test_seen.csv")]
    assert len(ids) == 7 and ids[-1] == EARLY_ID
    check_entries(document, ids, 125, 352)
    early = document["results"][EARLY_ID]
    assert not any(early["verb"].values()) and not any(early["action"].values())
    kept = document["results"][ids[0]]
    assert sum(kept["action"].values()) == pytest.approx(1.0, abs=1e-6)  # all 32 actions


def test_check_challenge_finds_a_missing_id_and_a_wrong_count(trained_runs: TrainedRuns) -> None:
    """check_challenge names a missing id, a wrong number of verbs and of actions."""
    model = load_model(trained_runs.branch("rgb@0.5"))
    document = make_submission(model, trained_runs.data, "validation", device="cpu")
    ids = list(document["results"])
    missing = json.loads(json.dumps(document))
    del missing["results"][ids[3]]
    assert check_challenge(missing, "ek55", ids, NUM_CLASSES) == [f"1 ids missing, e.g. {ids[3]}"]
    verbs = json.loads(json.dumps(document))
    del verbs["results"][ids[0]]["verb"]["124"]
    assert check_challenge(verbs, "ek55", ids, NUM_CLASSES) == [
        f"{ids[0]}: expected 125 verbs and 352 nouns"
    ]
    few = json.loads(json.dumps(document))
    few["results"][ids[-1]]["action"].popitem()
    assert check_challenge(few, "ek55", ids, NUM_CLASSES) == [
        f"{ids[-1]}: expected 32 actions keyed 'verb,noun'"
    ]
    assert check_challenge({"results": document["results"]}, "ek55", ids, NUM_CLASSES)[0] == (
        "missing key 'version'"
    )


def test_submission_refuses_egtea_a_time_the_model_lacks_and_a_bad_split(
    trained_runs: TrainedRuns, tmp_path: Path
) -> None:
    """Submissions refuse EGTEA, a time the model lacks and an unknown split."""
    final = trained_runs.unit("arch2", EVAL_FINAL) / "best.safetensors"
    egtea = load_model(relabel_checkpoint(final, tmp_path / "egtea.safetensors", "egtea"))
    with pytest.raises(ConfigError, match="egtea has no EPIC-KITCHENS challenge"):
        make_submission(egtea, trained_runs.data, "validation", device="cpu")
    model = load_model(final)
    with pytest.raises(ConfigError) as caught:
        make_submission(model, trained_runs.data, "validation", time=0.75, device="cpu")
    assert "does not predict at 0.75 s; it predicts at 1, 0.5 s" in caught.value.message
    with pytest.raises(ConfigError) as caught:
        make_submission(model, trained_runs.data, "test", device="cpu")
    assert "Split 'test' does not exist for ek55" in caught.value.message
    assert "validation, test_seen, test_unseen" in (caught.value.hint or "")


def test_ek100_submission_is_version_0_2(ek100: Ek100Data) -> None:
    """An EK100 model writes the 0.2 format: 97 verbs, 300 nouns, string ids."""
    document = make_submission(load_model(ek100.model), ek100.data, "validation", device="cpu")
    assert document["version"] == "0.2"
    ids = [s.id for s in validation(ek100.data)]
    check_entries(document, ids, 97, 300)
    assert check_challenge(document, "ek100", ids, NUM_CLASSES) == []


# --------------------------------------------------------------------------------------------
# 8. anticipate


def class_names(path: Path) -> dict[int, str]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return {int(row[0]): row[1] for row in rows}


@pytest.mark.parametrize("which", ["branch", "arch1"])
def test_anticipate_lists_the_top_5_with_names_at_every_time(
    trained_runs: TrainedRuns, which: str
) -> None:
    """anticipate lists the named top 5 per time, equal to predict_split at a segment start."""
    data = trained_runs.data
    source = trained_runs.branch("obj@0.25") if which == "branch" else trained_runs.fusion("arch1")
    model = load_model(source)
    segments = validation(data)
    segment = segments[4]
    result = anticipate(model, data, segment.video, segment.start_frame / 30, device="cpu")
    assert result.times == model.times and len(result.candidates) == len(model.times)
    assert result.names_from == (data / "EPIC_verb_classes.csv", data / "EPIC_noun_classes.csv")
    actions = read_actions(data / "actions.csv")
    verb_names = class_names(data / "EPIC_verb_classes.csv")
    noun_names = class_names(data / "EPIC_noun_classes.csv")
    for candidates in result.candidates:
        assert len(candidates) == 5
        probabilities = [c.probability for c in candidates]
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0 <= p <= 1 for p in probabilities)
        for c in candidates:
            assert (c.verb, c.noun) == (actions.verbs[c.action], actions.nouns[c.action])
            assert (c.verb_name, c.noun_name) == (verb_names[c.verb], noun_names[c.noun])
            assert c.action_name == f"{c.verb_name}_{c.noun_name}"
    predictions = predict_split([Member(model)], segments, data, actions, device="cpu")
    row = 4
    assert not predictions.discarded[row]
    ids = [[c.action for c in candidates] for candidates in result.candidates]
    probs = [[c.probability for c in candidates] for candidates in result.candidates]
    assert ids == predictions.top_ids["action"][row].tolist()
    assert np.allclose(probs, predictions.top_probs["action"][row], atol=1e-6)


def test_anticipate_refuses_a_moment_before_the_window(trained_runs: TrainedRuns) -> None:
    """Too early a moment is a DataError naming the window and the earliest moment."""
    model = load_model(trained_runs.fusion("arch2"))
    earliest = earliest_time(model)
    assert earliest == 1.534  # frame 46 (1.5 s window + one frame), rounded up to the ms
    for stream in model.streams:  # DESIGN §3 arithmetic: the oldest step reads frame 1
        start = round(earliest * 30)
        assert np.floor((start / 30 - stream.grid.offsets) * 30).min() == 1
        assert np.floor(((start - 1) / 30 - stream.grid.offsets) * 30).min() == 0
    with pytest.raises(DataError) as caught:
        anticipate(model, trained_runs.data, "P01_03", 1.5, device="cpu")
    text = str(caught.value)
    assert "P01_03 at 1.5 s is too early" in text
    assert "observes 1.5 s before the moment" in text and "6 steps of 0.25 s" in text
    assert "at or after 1.534 s" in text
    result = anticipate(model, trained_runs.data, "P01_03", earliest, device="cpu")
    assert len(result.candidates) == 2


@pytest.mark.parametrize(("alpha", "s_enc", "s_ant"), [(0.25, 6, 8), (0.125, 24, 16), (0.5, 6, 4)])
def test_earliest_moment_reads_a_real_frame_at_every_step_on_published_grids(
    alpha: float, s_enc: int, s_ant: int
) -> None:
    """On published grids the earliest moment reads a real frame (>= 1) at every step."""
    from sfr.config import BranchConfig, BranchRunConfig, DataConfig
    from sfr.data.dataset import Stream

    config = BranchRunConfig(
        data=DataConfig(feature_dims={"rgb": 4}),
        branch=BranchConfig(modality="rgb", alpha=alpha, s_enc=s_enc, s_ant=s_ant, hidden=4),
    )
    grid = config.branch.grid(30.0)
    branch = create_branch(feat_dim=4, hidden=4, num_classes=4)
    model = TrainedModel(
        BranchNode(branch, f"rgb@{alpha:g}", grid), "branch", "finetune", config, 4,
        (Stream("rgb", grid),), Path("model.safetensors"), {},
    )  # fmt: skip
    start = round(earliest_time(model) * 30)
    assert np.floor((start / 30 - grid.offsets) * 30).min() >= 1
    assert np.floor(((start - 1) / 30 - grid.offsets) * 30).min() < 1


# --------------------------------------------------------------------------------------------
# 9. bad input


def test_a_model_with_another_number_of_classes_is_refused(
    trained_runs: TrainedRuns, synthetic_copy: Path
) -> None:
    """An actions table of another size is a DataError naming both numbers and the table."""
    lines = (synthetic_copy / "actions.csv").read_text().splitlines(keepends=True)
    (synthetic_copy / "actions.csv").write_text("".join(lines[:-1]))  # 31 actions
    model = load_model(trained_runs.branch("rgb@0.25"))
    table = str(synthetic_copy / "actions.csv")
    with pytest.raises(DataError) as caught:
        evaluate([model], synthetic_copy, settings=CPU)
    assert "trained with 32 action classes" in caught.value.message
    assert f"{table} lists 31" in caught.value.message
    with pytest.raises(DataError, match="32 action classes"):
        make_submission(model, synthetic_copy, "validation", device="cpu")
    with pytest.raises(DataError) as caught:
        anticipate(model, synthetic_copy, "P01_03", 5.0, device="cpu")
    assert "32 actions" in caught.value.message and f"{table} lists 31" in caught.value.message


@pytest.mark.parametrize("dataset", ["ek55", "ek100", "egtea"])
def test_an_unknown_split_lists_the_valid_names(trained_runs: TrainedRuns, dataset: str) -> None:
    """A split name the dataset does not have is a ConfigError listing the valid ones."""
    config = eval_fusion_config().data.model_copy(update={"dataset": dataset})
    with pytest.raises(ConfigError) as caught:
        split_csv(config, trained_runs.data, "nonsense")
    assert caught.value.message == f"Split 'nonsense' does not exist for {dataset}."
    assert caught.value.hint == f"Choose one of: {', '.join(SPLITS[dataset])}."
    with pytest.raises(ConfigError, match="does not exist for ek55"):
        evaluate([load_model(trained_runs.branch("rgb@0.5"))], trained_runs.data, split="test")


def test_splits_map_to_the_datasets_csv_files(trained_runs: TrainedRuns) -> None:
    """Each valid split name reads the file its benchmark publishes."""
    data = Path("/data")
    base = eval_fusion_config().data
    ek100 = base.model_copy(update={"dataset": "ek100"})
    egtea = base.model_copy(update={"dataset": "egtea", "split": 2})
    assert split_csv(base, data, "validation") == data / "validation.csv"
    assert split_csv(base, data, "test_unseen") == data / "test_unseen.csv"
    assert split_csv(ek100, data, "test") == data / "test_timestamps.csv"
    assert split_csv(egtea, data, "validation") == data / "validation2.csv"
    assert split_csv(egtea, data, "validation3") == data / "validation3.csv"
    bench = load_benchmark(base, trained_runs.data, "validation", NUM_CLASSES)
    assert bench.many_shot is not None and bench.labelled and len(bench.segments) == 12


@pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")
def test_a_pass_over_a_split_prepares_each_weight_once(
    trained_runs: TrainedRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights cannot change within an evaluation pass: each weight is reordered for oneDNN
    once per batch size (`fixed_weights`), not once per batch; the predictions are the same
    bits as when every batch prepares its recurrent weights and no other."""
    data = trained_runs.data
    model = load_model(trained_runs.branch("rgb@0.25"))
    segments = validation(data)
    actions = read_actions(data / "actions.csv")
    calls = count_reorders(monkeypatch)
    batches = -(-len(segments) // 2)
    assert batches >= 3
    fixed = predict_split([Member(model)], segments, data, actions, batch_size=2, device="cpu")
    # the rolling and unrolling LSTMs' input and recurrent weights and the classifier's, for
    # the full batch size and for the last one
    assert 5 <= len(calls) <= 10
    monkeypatch.setattr(runner, "fixed_weights", contextlib.nullcontext)
    calls.clear()
    each = predict_split([Member(model)], segments, data, actions, batch_size=2, device="cpu")
    assert len(calls) == 2 * batches
    for task in TASKS:
        assert np.array_equal(fixed.top_ids[task], each.top_ids[task])
        assert np.array_equal(fixed.top_probs[task], each.top_probs[task])


@pytest.mark.parametrize("which", ["branch", "fusion"])
def test_a_sample_scores_the_same_bits_in_a_batch_of_one(
    trained_runs: TrainedRuns, which: str
) -> None:
    """`--batch-size 3` over 178 segments ends with a batch of one: its scores must be the
    bits the same sample gets in any other batch (a batch of one runs other products)."""
    run = trained_runs.branch("rgb@0.25") if which == "branch" else trained_runs.fusion("arch2")
    model = load_model(run)
    features = features_of(model, trained_runs.data)
    batch = {key: value[:3] for key, value in features.items()}
    alone = model({key: value[1:2] for key, value in features.items()})
    together = model(batch)
    assert alone.scores.shape[0] == 1
    assert torch.equal(alone.scores, together.scores[1:2])
    assert torch.equal(alone.context, together.context[1:2])
    for label, weights in together.attention.items():
        assert torch.equal(alone.attention[label], weights[1:2])
