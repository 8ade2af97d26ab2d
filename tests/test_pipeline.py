"""The fusion pipeline through its core API: FusionPlan, pipeline_steps, run_pipeline and
train_fusion_unit.

Everything trains on the session's tiny synthetic dataset (every frame stored; rgb/flow 8-d,
obj 6-d, 32 actions) with two rates, alpha 0.25 (2 + 4 steps) and alpha 0.5 (1 + 2 steps),
whose fused anticipation times are 1 and 0.5 s.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file

import sfr.train.fusion as fusion_module
from sfr.checkpoint import read_metadata
from sfr.config import FusionRunConfig, build_config
from sfr.data.synthetic import SyntheticSpec, write_synthetic
from sfr.errors import DataError, RunError
from sfr.train.fusion import FusionPlan, train_fusion_unit
from sfr.train.loop import BatchDone, EpochDone, StageStarted, Trainer
from sfr.train.pipeline import PipelineResult, StepStarted, pipeline_steps, run_pipeline

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DIMS = {"rgb": 8, "flow": 8, "obj": 6}
SLOW = {"alpha": 0.5, "s_enc": 1, "s_ant": 2}
FAST = {"alpha": 0.25, "s_enc": 2, "s_ant": 4}
RATES = [FAST, SLOW]
BRANCHES = ["rgb@0.25", "flow@0.25", "obj@0.25", "rgb@0.5", "flow@0.5", "obj@0.5"]
FINAL = "rgb+flow+obj@0.25+0.5"
UNITS = {
    "arch2": [("rgb+flow+obj@0.25", 1), ("rgb+flow+obj@0.5", 1), (FINAL, 2)],
    "arch1": [("rgb@0.25+0.5", 1), ("flow@0.25+0.5", 1), ("obj@0.25+0.5", 1), (FINAL, 2)],
}
FUSION_DIR = "synthetic/{arch}-rgb+flow+obj-a0.25-enc2-ant4+a0.5-enc1-ant2"
FUSED_KEYS = {"top1@1", "top5@1", "top1@0.5", "top5@0.5", "mt5r@1"}
MODALITY_DROPOUT, RATE_DROPOUT = 0.3, 0.4


def fusion_config(overrides: dict[str, Any] | None = None, **model: Any) -> FusionRunConfig:
    """rgb, flow and obj at alpha 0.25 and 0.5, hidden 8, 2 epochs per stage; `model` on top."""
    tree = {
        "data": {"name": "synthetic", "feature_dims": DIMS},
        "model": {
            "architecture": "arch2",
            "rates": RATES,
            "hidden": 8,
            "branch_dropout": 0.5,
            "modality_dropout": MODALITY_DROPOUT,
            "rate_dropout": RATE_DROPOUT,
            **model,
        },
        "optim": {"lr": 0.1, "batch_size": 8, "epochs": 2},
        "fusion_optim": {"lr": 0.1, "batch_size": 8, "epochs": 2},
        "run": {"seed": 0, "device": "cpu"},
    }
    return build_config(FusionRunConfig, tree, overrides or {})


def branch_root(runs: Path, label: str, stage: str = "finetune") -> Path:
    modality, alpha = label.split("@")
    grid = {"0.25": "enc2-ant4", "0.5": "enc1-ant2"}[alpha]
    return runs / "synthetic" / f"{modality}-a{alpha}-{grid}" / stage


def unit_root(runs: Path, label: str, arch: str = "arch2") -> Path:
    return runs / FUSION_DIR.format(arch=arch) / label


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"tensor {key} differs"


def with_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix.`, with the prefix removed."""
    return {k[len(prefix) + 1 :]: v for k, v in weights.items() if k.startswith(prefix + ".")}


def starts(events: list[object]) -> list[StepStarted]:
    return [e for e in events if isinstance(e, StepStarted)]


def same_fit(a: Any, b: Any) -> bool:
    return (a.best_epoch, a.best, a.metrics) == (b.best_epoch, b.best, b.metrics)


def metrics_lines(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


def interrupt_at(label: str, stage: str, when: Callable[[object], bool]) -> Callable:
    """A progress callback that raises KeyboardInterrupt at the first matching event of a step."""
    current: dict[str, tuple[str, str]] = {}

    def progress(event: object) -> None:
        if isinstance(event, StepStarted):
            current["step"] = (event.step.label, event.step.stage)
        elif current.get("step") == (label, stage) and when(event):
            raise KeyboardInterrupt

    return progress


class RecordingTrainer(Trainer):
    """A Trainer that records the weights of its model, by run folder name, when `fit` starts."""

    seen: ClassVar[dict[str, dict[str, torch.Tensor]]] = {}

    def fit(self, resume: bool):  # type: ignore[override]
        state = self.task.module.state_dict()
        RecordingTrainer.seen[self.run_dir.root.name] = {k: v.clone() for k, v in state.items()}
        return super().fit(resume)


@dataclass
class Trained:
    runs: Path
    result: PipelineResult
    events: list[object]


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path, module_torch_thread: None
) -> Trained:
    """The whole Architecture 2 pipeline of `fusion_config()`, trained once; do not modify."""
    runs = tmp_path_factory.mktemp("pipeline") / "runs"
    events: list[object] = []
    result = run_pipeline(FusionPlan(fusion_config(), runs), synthetic_data, progress=events.append)
    return Trained(runs, result, events)


@pytest.fixture
def runs_copy(trained: Trained, tmp_path: Path) -> Path:
    """A private copy of the trained runs folder."""
    return Path(shutil.copytree(trained.runs, tmp_path / "runs"))


@pytest.fixture
def branches_only(runs_copy: Path) -> Path:
    """The trained branch stages without any fusion stage."""
    shutil.rmtree(runs_copy / FUSION_DIR.format(arch="arch2"))
    return runs_copy


# --------------------------------------------------------------------------------------------
# the whole pipeline


def check_pipeline(arch: str, runs: Path, result: PipelineResult, events: list[object]) -> None:
    expected = [(b, s, 0) for b in BRANCHES for s in ("pretrain", "finetune")]
    expected += [(label, "fusion", level) for label, level in UNITS[arch]]
    assert [(s.label, s.stage, s.level) for s in result.steps] == expected
    assert [(e.index, e.total, e.step.label, e.step.stage, e.action) for e in starts(events)] == [
        (i, len(expected), label, stage, "train")
        for i, (label, stage, _) in enumerate(expected, start=1)
    ]
    assert result.times == (1.0, 0.5)
    assert sorted(result.results) == sorted((label, stage) for label, stage, _ in expected)

    for step in result.steps:
        if step.level == 0:
            root = branch_root(runs, step.label, step.stage)
        else:
            root = unit_root(runs, step.label, arch)
        assert step.run.root == root
        fit = result.results[(step.label, step.stage)]
        assert Path(fit.run_dir) == root
        status = json.loads((root / "status.json").read_text())
        assert status["state"] == "finished" and status["epoch"] == 2
        assert [r["epoch"] for r in metrics_lines(root)] == [1, 2]
        meta = read_metadata(root / "best.safetensors")
        assert meta["kind"] == ("branch" if step.level == 0 else "fusion")
        assert meta["metrics"] == fit.metrics and meta["epoch"] == fit.best_epoch + 1
        if step.level:
            assert meta["stage"] == step.label
            assert meta["config"]["model"]["architecture"] == arch
            assert meta["model"]["label"] == step.label
            num_inputs = len(meta["model"]["inputs"])
            weights = tensors(root / "best.safetensors")
            width = 2 * 8 * num_inputs  # MATT: 2Hn -> 2Hn/4 -> 2Hn/8 -> n
            assert weights["attention.mlp.0.weight"].shape == (width // 4, width)
            assert weights["attention.mlp.3.weight"].shape == (width // 8, width // 4)
            assert weights["attention.mlp.6.weight"].shape == (num_inputs, width // 8)

    # the final model: every branch inside, measured at exactly the fused times
    final = result.results[(FINAL, "fusion")]
    assert set(final.metrics) == FUSED_KEYS
    assert all(
        set(k for k in r if "@" in k) == FUSED_KEYS for r in metrics_lines(Path(final.run_dir))
    )
    weights = tensors(Path(final.run_dir) / "best.safetensors")
    leaves = {key.split(".branch.")[0] for key in weights if ".branch." in key}
    assert len(leaves) == 6
    meta = read_metadata(Path(final.run_dir) / "best.safetensors")
    grids = {"0.25": [0.25, 2, 4], "0.5": [0.5, 1, 2]}
    assert meta["model"]["grids"] == {b: grids[b.split("@")[1]] for b in BRANCHES}
    assert meta["model"]["num_classes"] == 32 and meta["model"]["hidden"] == 8


def test_architecture_2_trains_end_to_end(trained: Trained) -> None:
    check_pipeline("arch2", trained.runs, trained.result, trained.events)
    meta = read_metadata(unit_root(trained.runs, "rgb+flow+obj@0.25") / "best.safetensors")
    leaf = {"feat_dim": 8, "hidden": 8, "num_classes": 32}
    assert meta["model"] == {
        "label": "rgb+flow+obj@0.25",
        "fuses": "modalities",
        "hidden": 8,
        "dropout": MODALITY_DROPOUT,
        "num_classes": 32,
        "grids": {"rgb@0.25": [0.25, 2, 4], "flow@0.25": [0.25, 2, 4], "obj@0.25": [0.25, 2, 4]},
        "inputs": [leaf, leaf, {**leaf, "feat_dim": 6}],
    }
    final = read_metadata(unit_root(trained.runs, FINAL) / "best.safetensors")["model"]
    assert (final["fuses"], final["dropout"]) == ("rates", RATE_DROPOUT)
    assert [spec["label"] for spec in final["inputs"]] == ["rgb+flow+obj@0.25", "rgb+flow+obj@0.5"]
    assert final["inputs"][0] == meta["model"]
    # modality attention at one rate is scored at that rate's own anticipation times
    fast = trained.result.results[("rgb+flow+obj@0.25", "fusion")].metrics
    assert {k for k in fast if k.startswith("top5@")} == {f"top5@{t}" for t in (1, 0.75, 0.5, 0.25)}
    # the built tree carries the dropout of each level
    node = FusionPlan(fusion_config(), trained.runs).build(FINAL, 32, frozen=False)
    assert node.attention.mlp[2].p == RATE_DROPOUT
    assert node.inputs[0].attention.mlp[2].p == MODALITY_DROPOUT
    assert node.inputs[1].inputs[2].branch.input_dropout.p == 0.5


def test_architecture_1_trains_end_to_end(synthetic_data: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    events: list[object] = []
    config = fusion_config(architecture="arch1")
    result = run_pipeline(FusionPlan(config, runs), synthetic_data, progress=events.append)
    check_pipeline("arch1", runs, result, events)
    rates = read_metadata(unit_root(runs, "obj@0.25+0.5", "arch1") / "best.safetensors")["model"]
    assert (rates["fuses"], rates["dropout"]) == ("rates", RATE_DROPOUT)
    assert rates["grids"] == {"obj@0.25": [0.25, 2, 4], "obj@0.5": [0.5, 1, 2]}
    final = read_metadata(unit_root(runs, FINAL, "arch1") / "best.safetensors")["model"]
    assert (final["fuses"], final["dropout"]) == ("modalities", MODALITY_DROPOUT)
    # rates fused first: every level-1 unit is already scored at the fused times only
    for label, _ in UNITS["arch1"]:
        assert set(result.results[(label, "fusion")].metrics) == FUSED_KEYS, label


def test_pipeline_steps_follow_levels_and_branches(tmp_path: Path) -> None:
    plan = FusionPlan(fusion_config(), tmp_path / "runs")
    assert plan.levels == [1, 2]
    names = [(s.label, s.stage) for s in pipeline_steps(plan)]
    assert names[:4] == [
        ("rgb@0.25", "pretrain"),
        ("rgb@0.25", "finetune"),
        ("flow@0.25", "pretrain"),
        ("flow@0.25", "finetune"),
    ]
    assert len(names) == 15
    only_two = pipeline_steps(plan, levels=[2], branches=False)
    assert [(s.label, s.level, s.run.root) for s in only_two] == [
        (FINAL, 2, unit_root(tmp_path / "runs", FINAL))
    ]
    assert [s.label for s in pipeline_steps(plan, levels=[1], branches=False)] == [
        "rgb+flow+obj@0.25",
        "rgb+flow+obj@0.5",
    ]
    assert [s.level for s in pipeline_steps(plan, levels=[])] == [0] * 12
    assert plan.branch_dir("obj@0.5").root == branch_root(tmp_path / "runs", "obj@0.5")


# --------------------------------------------------------------------------------------------
# skip, force, resume


def test_a_finished_finetune_without_its_pretraining_is_not_pretrained_again(
    runs_copy: Path, synthetic_data: Path
) -> None:
    """A branch installed fine-tuned (e.g. a converted published one) needs no pre-training."""
    shutil.rmtree(branch_root(runs_copy, "rgb@0.25", "pretrain"))
    events: list[object] = []
    run_pipeline(FusionPlan(fusion_config(), runs_copy), synthetic_data, progress=events.append)
    assert [e.action for e in starts(events)] == ["skip"] * 15
    assert len(events) == 15
    assert not branch_root(runs_copy, "rgb@0.25", "pretrain").exists()


def test_rerun_skips_every_step_and_force_retrains(
    trained: Trained, runs_copy: Path, synthetic_data: Path
) -> None:
    steps = trained.result.steps
    before = {s.label + s.stage: (runs_copy / s.run.root.relative_to(trained.runs)) for s in steps}
    contents = {k: (root / "best.safetensors").read_bytes() for k, root in before.items()}

    events: list[object] = []
    again = run_pipeline(
        FusionPlan(fusion_config(), runs_copy), synthetic_data, progress=events.append
    )
    assert [e.action for e in starts(events)] == ["skip"] * 15
    assert len(events) == 15  # nothing trained: no stage or epoch events
    assert sorted(again.results) == sorted(trained.result.results)
    for key, fit in trained.result.results.items():
        assert same_fit(again.results[key], fit), key
    assert {k: (root / "best.safetensors").read_bytes() for k, root in before.items()} == contents

    stray = unit_root(runs_copy, FINAL) / "stray.txt"
    stray.write_text("left by hand")
    events = []
    forced = run_pipeline(
        FusionPlan(fusion_config(), runs_copy), synthetic_data, force=True, progress=events.append
    )
    assert [e.action for e in starts(events)] == ["train"] * 15
    assert [e.start_epoch for e in events if isinstance(e, StageStarted)] == [0] * 15
    assert stray.read_text() == "left by hand"  # --force deletes only what sfr wrote
    for key, fit in trained.result.results.items():  # same seed: the same runs again
        assert same_fit(forced.results[key], fit), key
    assert_same_tensors(
        tensors(unit_root(runs_copy, FINAL) / "best.safetensors"),
        tensors(unit_root(trained.runs, FINAL) / "best.safetensors"),
    )


def first_train_batch_of_epoch_1(event: object) -> bool:
    return isinstance(event, BatchDone) and event.phase == "train" and event.epoch == 1


@pytest.mark.parametrize(
    ("label", "stage", "when"),
    [
        pytest.param("flow@0.5", "finetune", first_train_batch_of_epoch_1, id="branch-epoch-2"),
        pytest.param(
            "rgb+flow+obj@0.25", "fusion", lambda e: isinstance(e, EpochDone), id="level-1-epoch-1"
        ),
        pytest.param(FINAL, "fusion", first_train_batch_of_epoch_1, id="level-2-epoch-2"),
    ],
)
def test_interrupted_pipeline_resumes_to_the_same_result(
    trained: Trained,
    synthetic_data: Path,
    tmp_path: Path,
    label: str,
    stage: str,
    when: Callable[[object], bool],
) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(
            FusionPlan(fusion_config(), runs),
            synthetic_data,
            progress=interrupt_at(label, stage, when),
        )
    index = next(
        i for i, s in enumerate(trained.result.steps) if (s.label, s.stage) == (label, stage)
    )
    crashed = runs / trained.result.steps[index].run.root.relative_to(trained.runs)
    assert json.loads((crashed / "status.json").read_text())["state"] == "interrupted"
    assert read_metadata(crashed / "last.safetensors")["epoch"] == 1
    later = trained.result.steps[index + 1 :]
    assert not any((runs / s.run.root.relative_to(trained.runs)).exists() for s in later)

    torch.manual_seed(1234)  # whatever the process did before must not matter
    events: list[object] = []
    resumed = run_pipeline(
        FusionPlan(fusion_config(), runs), synthetic_data, progress=events.append
    )
    actions = [e.action for e in starts(events)]
    assert actions == ["skip"] * index + ["resume"] + ["train"] * (14 - index)
    assert [e.start_epoch for e in events if isinstance(e, StageStarted)] == [1] + [0] * (
        14 - index
    )

    for step in trained.result.steps:
        root = runs / step.run.root.relative_to(trained.runs)
        assert metrics_lines(root) == metrics_lines(step.run.root), step.label
        assert same_fit(
            resumed.results[(step.label, step.stage)],
            trained.result.results[(step.label, step.stage)],
        )
    for name in ("best.safetensors", "last.safetensors"):
        assert_same_tensors(
            tensors(unit_root(runs, FINAL) / name), tensors(unit_root(trained.runs, FINAL) / name)
        )


# --------------------------------------------------------------------------------------------
# part of the work: levels and branches


def test_level_2_alone_when_level_1_is_done(
    trained: Trained, runs_copy: Path, synthetic_data: Path
) -> None:
    shutil.rmtree(unit_root(runs_copy, FINAL))
    level_1 = [unit_root(runs_copy, label) / "best.safetensors" for label, _ in UNITS["arch2"][:2]]
    before = [path.read_bytes() for path in level_1]
    events: list[object] = []
    result = run_pipeline(
        FusionPlan(fusion_config(), runs_copy),
        synthetic_data,
        levels=[2],
        branches=False,
        progress=events.append,
    )
    assert [(s.label, s.stage, s.level) for s in result.steps] == [(FINAL, "fusion", 2)]
    assert [(e.index, e.total, e.action) for e in starts(events)] == [(1, 1, "train")]
    assert list(result.results) == [(FINAL, "fusion")]
    assert [path.read_bytes() for path in level_1] == before
    # trained alone from the same level-1 weights, it is the unit of the whole pipeline
    assert_same_tensors(
        tensors(unit_root(runs_copy, FINAL) / "best.safetensors"),
        tensors(unit_root(trained.runs, FINAL) / "best.safetensors"),
    )


def test_level_2_without_level_1_names_the_command_to_run(
    branches_only: Path, synthetic_data: Path
) -> None:
    plan = FusionPlan(fusion_config(), branches_only)
    hint = "Train level 1 first: sfr fuse arch2 --config my.toml --stage 1"
    with pytest.raises(RunError) as caught:
        run_pipeline(plan, synthetic_data, levels=[2], branches=False, hint=hint)
    assert caught.value.hint == hint
    missing = unit_root(branches_only, "rgb+flow+obj@0.25") / "best.safetensors"
    assert str(missing) in caught.value.message and "not been trained" in caught.value.message
    assert not unit_root(branches_only, FINAL).exists()  # nothing written for the refused unit

    # an interrupted level 1 is refused too, and the hint says that it resumes
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(
            plan,
            synthetic_data,
            levels=[1],
            branches=False,
            progress=interrupt_at(
                "rgb+flow+obj@0.25", "fusion", lambda e: isinstance(e, EpochDone)
            ),
        )
    with pytest.raises(RunError) as caught:
        run_pipeline(plan, synthetic_data, levels=[2], branches=False, hint=hint)
    assert "interrupted" in caught.value.message
    assert str(unit_root(branches_only, "rgb+flow+obj@0.25")) in caught.value.message
    assert hint in (caught.value.hint or "") and "resume" in (caught.value.hint or "")


def test_fusion_without_branches_names_the_command_to_run(
    synthetic_data: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    hint = "Train the branches first: sfr pipeline my.toml"
    with pytest.raises(RunError) as caught:
        run_pipeline(
            FusionPlan(fusion_config(), runs), synthetic_data, levels=[1], branches=False, hint=hint
        )
    assert caught.value.hint == hint
    assert str(branch_root(runs, "rgb@0.25") / "best.safetensors") in caught.value.message
    assert not unit_root(runs, "rgb+flow+obj@0.25").exists()


def test_train_fusion_unit_refuses_a_finished_run_unless_forced(
    trained: Trained, runs_copy: Path, synthetic_data: Path
) -> None:
    plan = FusionPlan(fusion_config(), runs_copy)
    unit = plan.units[1]
    best = unit_root(runs_copy, unit.label) / "best.safetensors"
    before = best.read_bytes()
    with pytest.raises(RunError) as caught:
        train_fusion_unit(plan, unit, synthetic_data)
    assert "finished run" in caught.value.message and str(best.parent) in caught.value.message
    assert best.read_bytes() == before
    fit = train_fusion_unit(plan, unit, synthetic_data, force=True)
    assert same_fit(fit, trained.result.results[(unit.label, "fusion")])
    assert len(fit.history) == 2


# --------------------------------------------------------------------------------------------
# stage initialisation and checkpoint specs


def test_each_fusion_level_starts_from_the_best_weights_below(
    branches_only: Path, synthetic_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    RecordingTrainer.seen = {}
    monkeypatch.setattr(fusion_module, "Trainer", RecordingTrainer)
    run_pipeline(FusionPlan(fusion_config(), branches_only), synthetic_data, branches=False)
    seen = RecordingTrainer.seen
    assert sorted(seen) == sorted(label for label, _ in UNITS["arch2"])

    for alpha in ("0.25", "0.5"):
        label = f"rgb+flow+obj@{alpha}"
        start = seen[label]
        for index, modality in enumerate(("rgb", "flow", "obj")):
            finetuned = tensors(
                branch_root(branches_only, f"{modality}@{alpha}") / "best.safetensors"
            )
            assert_same_tensors(with_prefix(start, f"inputs.{index}.branch"), finetuned)
        # training moved the level-1 weights, so "starts from the best" is not "starts from init"
        best = tensors(unit_root(branches_only, label) / "best.safetensors")
        assert not torch.equal(best["attention.mlp.0.weight"], start["attention.mlp.0.weight"])

    for index, label in enumerate(("rgb+flow+obj@0.25", "rgb+flow+obj@0.5")):
        level_1 = tensors(unit_root(branches_only, label) / "best.safetensors")
        assert_same_tensors(with_prefix(seen[FINAL], f"inputs.{index}"), level_1)


def test_a_lower_stage_of_another_config_is_refused_by_its_spec(
    branches_only: Path, synthetic_data: Path
) -> None:
    smaller = FusionPlan(fusion_config(hidden=6), branches_only)
    with pytest.raises(RunError) as caught:
        run_pipeline(smaller, synthetic_data, levels=[1], branches=False)
    text = str(caught.value)
    assert "model.hidden: saved 8, needed 6" in text
    assert str(branch_root(branches_only, "rgb@0.25") / "best.safetensors") in text
    assert not unit_root(branches_only, "rgb+flow+obj@0.25").exists()

    # level 2 refuses a level 1 trained with another modality dropout
    run_pipeline(
        FusionPlan(fusion_config(), branches_only), synthetic_data, levels=[1], branches=False
    )
    other = FusionPlan(fusion_config(modality_dropout=0.25), branches_only)
    with pytest.raises(RunError) as caught:
        run_pipeline(other, synthetic_data, levels=[2], branches=False)
    text = str(caught.value)
    assert f"model.dropout: saved {MODALITY_DROPOUT}, needed 0.25" in text
    assert str(unit_root(branches_only, "rgb+flow+obj@0.25") / "best.safetensors") in text
    assert not unit_root(branches_only, FINAL).exists()

    # a refused --force keeps the finished run it would have replaced
    level_1 = unit_root(branches_only, "rgb+flow+obj@0.25") / "best.safetensors"
    before = level_1.read_bytes()
    with pytest.raises(RunError, match=r"model\.hidden: saved 8, needed 6"):
        run_pipeline(smaller, synthetic_data, levels=[1], branches=False, force=True)
    assert level_1.read_bytes() == before


def test_branches_with_another_class_count_are_refused(
    synthetic_data: Path, tmp_path: Path
) -> None:
    other_data = tmp_path / "data16"
    spec = SyntheticSpec(
        num_videos=2, val_videos=1, actions_per_video=12, dims=(8, 8, 6), num_actions=16
    )
    write_synthetic(other_data, spec)
    runs = tmp_path / "runs"
    config = fusion_config({"optim.epochs": 1}, modalities=["rgb", "flow"], rates=[FAST])
    run_pipeline(FusionPlan(config, runs), other_data, levels=[])  # branches only, 16 classes
    with pytest.raises(RunError) as caught:
        run_pipeline(FusionPlan(config, runs), synthetic_data, branches=False)
    assert "model.num_classes: saved 16, needed 32" in str(caught.value)


def test_frozen_branches_keep_their_fine_tuned_weights(
    trained: Trained, branches_only: Path, synthetic_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    RecordingTrainer.seen = {}
    monkeypatch.setattr(fusion_module, "Trainer", RecordingTrainer)
    config = fusion_config(freeze_branches=True)
    run_pipeline(FusionPlan(config, branches_only), synthetic_data, branches=False)
    attention = ("attention.mlp.0.weight", "attention.mlp.3.weight", "attention.mlp.6.weight")

    label = "rgb+flow+obj@0.5"
    best = tensors(unit_root(branches_only, label) / "best.safetensors")
    for index, modality in enumerate(("rgb", "flow", "obj")):
        finetuned = tensors(branch_root(branches_only, f"{modality}@0.5") / "best.safetensors")
        assert_same_tensors(with_prefix(best, f"inputs.{index}.branch"), finetuned)
    for key in attention:
        assert not torch.equal(best[key], RecordingTrainer.seen[label][key]), key
    saved = json.loads((unit_root(branches_only, label) / "config.json").read_text())
    assert saved["model"]["freeze_branches"] is True

    final = tensors(unit_root(branches_only, FINAL) / "best.safetensors")
    for index, label in enumerate(("rgb+flow+obj@0.25", "rgb+flow+obj@0.5")):
        level_1 = tensors(unit_root(branches_only, label) / "best.safetensors")
        assert_same_tensors(with_prefix(final, f"inputs.{index}"), level_1)
    for key in attention:
        assert not torch.equal(final[key], RecordingTrainer.seen[FINAL][key]), key

    # without freezing, the same stage does move the branches
    unfrozen = tensors(unit_root(trained.runs, "rgb+flow+obj@0.5") / "best.safetensors")
    finetuned = tensors(branch_root(trained.runs, "rgb@0.5") / "best.safetensors")
    moved = with_prefix(unfrozen, "inputs.0.branch")
    assert any(not torch.equal(moved[k], finetuned[k]) for k in finetuned)


# --------------------------------------------------------------------------------------------
# data problems


@pytest.mark.parametrize("part", ["pipeline", "fusion only"])
def test_a_missing_feature_store_is_named(
    part: str, synthetic_copy: Path, trained: Trained, tmp_path: Path
) -> None:
    shutil.rmtree(synthetic_copy / "obj")
    if part == "pipeline":
        runs, branches = tmp_path / "fresh-runs", True
    else:
        runs, branches = Path(shutil.copytree(trained.runs, tmp_path / "runs")), False
        shutil.rmtree(runs / FUSION_DIR.format(arch="arch2"))
    with pytest.raises(DataError) as caught:
        run_pipeline(FusionPlan(fusion_config(), runs), synthetic_copy, branches=branches)
    assert "Feature store 'obj' not found" in caught.value.message
    assert str(synthetic_copy / "obj") in caught.value.message


# --------------------------------------------------------------------------------------------
# other shapes of the method


def test_one_rate_is_ru_lstm_with_modality_attention(synthetic_data: Path, tmp_path: Path) -> None:
    """Three modalities at one rate: a single fusion level; arch1 and arch2 share the branches."""
    runs = tmp_path / "runs"
    times = {"1", "0.75", "0.5", "0.25"}
    for arch in ("arch2", "arch1"):
        config = fusion_config({"optim.epochs": 1}, architecture=arch, rates=[FAST])
        assert config.fused_times == (1.0, 0.75, 0.5, 0.25)
        plan = FusionPlan(config, runs)
        assert len(plan.units) == 1 and len(plan.levels) == 1
        unit = plan.units[0]
        assert (unit.label, unit.inputs, unit.fuses) == (
            "rgb+flow+obj@0.25",
            ("rgb@0.25", "flow@0.25", "obj@0.25"),
            "modalities",
        )
        events: list[object] = []
        result = run_pipeline(plan, synthetic_data, progress=events.append)
        branch_action = "train" if arch == "arch2" else "skip"
        assert [e.action for e in starts(events)] == [branch_action] * 6 + ["train"]
        fit = result.results[(unit.label, "fusion")]
        root = runs / "synthetic" / f"{arch}-rgb+flow+obj-a0.25-enc2-ant4" / unit.label
        assert Path(fit.run_dir) == root
        assert {k for k in fit.metrics if k.startswith("top5@")} == {f"top5@{t}" for t in times}
        meta = read_metadata(root / "best.safetensors")
        assert (meta["model"]["fuses"], meta["model"]["dropout"]) == (
            "modalities",
            MODALITY_DROPOUT,
        )


def test_one_modality_at_two_rates_is_a_pure_slow_fast_fusion(
    synthetic_data: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    for arch in ("arch2", "arch1"):
        config = fusion_config({"optim.epochs": 1}, architecture=arch, modalities=["flow"])
        plan = FusionPlan(config, runs)
        assert len(plan.units) == 1 and len(plan.levels) == 1
        unit = plan.units[0]
        assert (unit.label, unit.inputs, unit.fuses) == (
            "flow@0.25+0.5",
            ("flow@0.25", "flow@0.5"),
            "rates",
        )
        result = run_pipeline(plan, synthetic_data)
        assert [s.stage for s in result.steps] == ["pretrain", "finetune"] * 2 + ["fusion"]
        fit = result.results[(unit.label, "fusion")]
        assert set(fit.metrics) == FUSED_KEYS
        meta = read_metadata(Path(fit.run_dir) / "best.safetensors")
        assert (meta["model"]["fuses"], meta["model"]["dropout"]) == ("rates", RATE_DROPOUT)
        assert Path(fit.run_dir).parent.name == f"{arch}-flow-a0.25-enc2-ant4+a0.5-enc1-ant2"


def test_three_rates(synthetic_data: Path, tmp_path: Path) -> None:
    """alpha 0.25, 0.5 and 1: fused only at 1 s; the rate attention has three inputs."""
    rates = [FAST, SLOW, {"alpha": 1.0, "s_enc": 1, "s_ant": 1}]
    config = fusion_config({"optim.epochs": 1}, rates=rates, modalities=["rgb", "obj"])
    assert config.fused_times == (1.0,)
    plan = FusionPlan(config, tmp_path / "runs")
    assert [(u.label, u.level) for u in plan.units] == [
        ("rgb+obj@0.25", 1),
        ("rgb+obj@0.5", 1),
        ("rgb+obj@1", 1),
        ("rgb+obj@0.25+0.5+1", 2),
    ]
    result = run_pipeline(plan, synthetic_data)
    final = result.results[("rgb+obj@0.25+0.5+1", "fusion")]
    assert set(final.metrics) == {"top1@1", "top5@1", "mt5r@1"}
    weights = tensors(Path(final.run_dir) / "best.safetensors")
    assert weights["attention.mlp.6.weight"].shape == (3, 6)


# --------------------------------------------------------------------------------------------
# known problems


@pytest.mark.parametrize(
    ("override", "value", "field"),
    [("fusion_optim.lr", 0.05, "fusion_optim.lr"), ("model.hidden", 6, "hidden")],
)
def test_a_finished_step_of_another_config_is_not_reported_as_this_one(
    runs_copy: Path, synthetic_data: Path, override: str, value: Any, field: str
) -> None:
    config = fusion_config({override: value})
    try:
        run_pipeline(FusionPlan(config, runs_copy), synthetic_data)
    except RunError as error:
        assert field in error.message
    else:  # retrained instead: the final checkpoint must then be this config's
        meta = read_metadata(unit_root(runs_copy, FINAL) / "best.safetensors")
        assert meta["config"] == config.model_dump(mode="json")


def test_an_interrupted_fusion_unit_resumes_with_more_epochs(
    branches_only: Path, synthetic_data: Path
) -> None:
    label = "rgb+flow+obj@0.5"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(
            FusionPlan(fusion_config(), branches_only),
            synthetic_data,
            levels=[1],
            branches=False,
            progress=interrupt_at(label, "fusion", lambda e: isinstance(e, EpochDone)),
        )
    events: list[object] = []
    more = fusion_config({"fusion_optim.epochs": 3})
    run_pipeline(
        FusionPlan(more, branches_only),
        synthetic_data,
        levels=[1],
        branches=False,
        progress=events.append,
    )
    # the finished unit is extended to the new epoch count too: its results are this config's
    assert [e.action for e in starts(events)] == ["resume", "resume"]
    assert [r["epoch"] for r in metrics_lines(unit_root(branches_only, label))] == [1, 2, 3]
    # fewer epochs than the units hold: refused before any step runs (issue 11)
    events.clear()
    with pytest.raises(RunError, match=r"fusion_optim\.epochs\): the run already has 3 epochs"):
        run_pipeline(
            FusionPlan(fusion_config({"fusion_optim.epochs": 2}), branches_only),
            synthetic_data,
            levels=[1],
            branches=False,
            progress=events.append,
        )
    assert events == []


def test_every_existing_stage_is_checked_before_any_training(
    runs_copy: Path, synthetic_data: Path
) -> None:
    """Issue 11 case 8: a final unit of another config is refused before the first step runs."""
    events: list[object] = []
    # the level-1 units (modality fusions) do not depend on it: the final unit is named
    with pytest.raises(RunError, match=r"(?s)rgb\+flow\+obj@0\.25\+0\.5 was.*model\.rate_dropout"):
        run_pipeline(
            FusionPlan(fusion_config(rate_dropout=0.1), runs_copy),
            synthetic_data,
            progress=events.append,
        )
    assert events == []


def test_a_branch_is_compared_only_on_what_its_model_depends_on(
    runs_copy: Path, synthetic_data: Path
) -> None:
    """Issue 11 case 8: the rgb branches do not depend on the flow feature size."""
    config = fusion_config({"data.feature_dims.flow": 9}, modalities=["rgb"])
    events: list[object] = []
    run_pipeline(FusionPlan(config, runs_copy), synthetic_data, levels=[], progress=events.append)
    assert [e.action for e in starts(events)] == ["skip"] * 4
    changed = fusion_config({"data.feature_dims.rgb": 9}, modalities=["rgb"])
    with pytest.raises(RunError, match=r"data\.feature_dims\.rgb"):
        run_pipeline(FusionPlan(changed, runs_copy), synthetic_data, levels=[])


def test_fusion_units_are_compared_only_on_their_own_fields(
    runs_copy: Path, synthetic_data: Path
) -> None:
    """Issue 11 case 8: the branch stages' `optim.lr` concerns no fusion unit: fusing again with
    it changed skips the finished units, and resumes an interrupted one (checked up front and
    again when its run folder is prepared)."""
    changed = {"optim.lr": 0.05}
    events: list[object] = []
    run_pipeline(
        FusionPlan(fusion_config(changed), runs_copy),
        synthetic_data,
        branches=False,
        progress=events.append,
    )
    assert [e.action for e in starts(events)] == ["skip"] * 3
    final = unit_root(runs_copy, FINAL)
    status = json.loads((final / "status.json").read_text())
    (final / "status.json").write_text(json.dumps({**status, "state": "running"}))
    events.clear()
    more = fusion_config({**changed, "fusion_optim.epochs": 3})
    run_pipeline(
        FusionPlan(more, runs_copy),
        synthetic_data,
        levels=[2],
        branches=False,
        progress=events.append,
    )
    assert [e.action for e in starts(events)] == ["resume"]
    assert [r["epoch"] for r in metrics_lines(final)] == [1, 2, 3]


def test_a_change_a_unit_depends_on_is_refused_before_any_training(
    runs_copy: Path, synthetic_data: Path
) -> None:
    """Issue 11 case 8: `fusion_optim.lr` concerns every fusion unit (not the branches): with one
    level-1 unit still to train, the finished one is refused before anything is trained."""
    missing = unit_root(runs_copy, "rgb+flow+obj@0.5")
    shutil.rmtree(missing)
    before = sorted(p for p in runs_copy.rglob("*"))
    events: list[object] = []
    with pytest.raises(RunError, match=r"(?s)rgb\+flow\+obj@0\.25 was.*fusion_optim\.lr"):
        run_pipeline(
            FusionPlan(fusion_config({"fusion_optim.lr": 0.05}), runs_copy),
            synthetic_data,
            progress=events.append,
        )
    assert events == []
    assert not missing.exists()
    assert sorted(p for p in runs_copy.rglob("*")) == before
