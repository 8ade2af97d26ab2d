"""Fusion stages: each attention fusion of an architecture, trained from the levels below it.

    RUNS/<dataset>/<arch>-<modalities>-<rates>/<unit label>/     e.g.
    runs/ek55/arch2-rgb+flow+obj-a0.125-enc12-ant16+a0.5-enc6-ant4/rgb+flow+obj@0.125/

A unit is initialised from its inputs' best weights: branches from their fine-tuning runs,
lower fusion units from their own runs. Every checkpoint records the model spec it was trained
with, so a lower stage trained with another config is refused by name, not by a shape crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sfr import distributed
from sfr.config import FusionRunConfig
from sfr.models.architectures import FusionUnit
from sfr.models.fusion import FusionNode
from sfr.models.tree import ModelTree
from sfr.train.loop import FitResult, Progress, Trainer
from sfr.train.rundir import RunDir, config_differences
from sfr.train.stages import (
    StageData,
    allocation_failures,
    best_weights,
    fit_settings,
    load_stage_data,
    stage_class_weights,
    stage_dir,
)


@dataclass
class FusionTask:
    """A fusion tree scored at its fused anticipation times."""

    module: FusionNode

    @property
    def times(self) -> tuple[float, ...]:
        return self.module.times

    def scores(self, features: dict[str, Tensor]) -> Tensor:
        return self.module(features, self.times).scores


_ATTENTION_DROPOUTS = ("model.modality_dropout", "model.rate_dropout")


class FusionPlan(ModelTree):
    """The branches and fusion units of one config, and where each one's runs live."""

    def __init__(self, config: FusionRunConfig, runs_dir: Path) -> None:
        super().__init__(config)
        self.runs_dir = Path(runs_dir)

    def unit_dir(self, unit: FusionUnit) -> RunDir:
        return RunDir(self.runs_dir / self.config.fusion_dir / unit.label)

    def branch_dir(self, label: str) -> RunDir:
        modality, rate = self.branch_rates[label]
        return stage_dir(self.config.branch_config(modality, rate), self.runs_dir, "finetune")

    def unit_differences(
        self, unit: FusionUnit, saved: dict[str, Any], current: dict[str, Any]
    ) -> list[str]:
        """The fields in which two fusion configs differ that concern `unit`'s model.

        Not compared: the branch stages' `optim` (their own runs depend on it; a unit reads
        their best weights, whose spec is checked when loaded), the feature sizes of modalities
        no branch under the unit reads, and the attention dropout of units above it (a level-1
        modality fusion ignores `model.rate_dropout`), besides `config_differences`' own rules.
        """
        dropouts, stack = set(), [unit.label]
        while stack:
            below = self.by_label.get(stack.pop())
            if below is not None:
                dropouts.add(f"model.{below.dropout_field}")
                stack += list(below.inputs)
        modalities = {self.branch_rates[leaf][0] for leaf in self.leaves(unit.label)}

        def concerns(field: str) -> bool:
            if field.startswith("optim."):
                return False
            if field.startswith("data.feature_dims."):
                return field.removeprefix("data.feature_dims.") in modalities
            return field not in _ATTENTION_DROPOUTS or field in dropouts

        return [field for field in config_differences(saved, current) if concerns(field)]

    def initialise(self, node: FusionNode, unit: FusionUnit, num_classes: int, hint: str) -> None:
        """Load every input of `node` from the best checkpoint of its own stage."""
        for child, label in zip(node.inputs, unit.inputs, strict=True):
            if label in self.branch_rates:
                weights = best_weights(self.branch_dir(label), self.spec(label, num_classes), hint)
                child.branch.load_state_dict(weights)
            else:
                run = self.unit_dir(self.by_label[label])
                child.load_state_dict(best_weights(run, self.spec(label, num_classes), hint))


def load_fusion_data(
    plan: FusionPlan, unit: FusionUnit, data_dir: Path, *, nothing_to_train: bool = False
) -> StageData:
    """Training and validation sets with every stream the unit's branches read
    (`load_stage_data`)."""
    streams = [plan.streams[leaf] for leaf in plan.leaves(unit.label)]
    return load_stage_data(plan.config.data, data_dir, streams, nothing_to_train=nothing_to_train)


def train_fusion_unit(
    plan: FusionPlan,
    unit: FusionUnit,
    data_dir: Path,
    *,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    data: StageData | None = None,
    hint: str = "Train it with `sfr pipeline` on the same config.",
) -> FitResult:
    """Train one fusion unit in its run directory and return its best result."""
    config = plan.config
    run = plan.unit_dir(unit)
    distributed.on_main(run.check_free)  # another process training there: before loading data
    done = resume and run.trained_to(config.fusion_optim.epochs)
    data = data or load_fusion_data(plan, unit, data_dir, nothing_to_train=done)
    class_weights = stage_class_weights(config.fusion_optim, data_dir, data.num_classes)

    def build() -> nn.Module:
        return plan.build(unit.label, data.num_classes, config.model.freeze_branches)

    with run.held(), allocation_failures(build, f"model.hidden (now {config.model.hidden})"):
        torch.manual_seed(config.run.seed)
        node = build()
        if not (resume and run.last_path.is_file()):  # inputs are loaded before anything is written
            plan.initialise(node, unit, data.num_classes, hint)
        resuming = distributed.on_main(
            lambda: run.prepare(
                config.model_dump(mode="json"),
                force=force,
                resume=resume,
                differences=lambda saved, current: plan.unit_differences(unit, saved, current),
                epochs_key="fusion_optim.epochs",
            )
        )
        metadata = {
            "kind": "fusion",
            "stage": unit.label,
            "config": config.model_dump(mode="json"),
            "model": plan.spec(unit.label, data.num_classes),
        }
        trainer = Trainer(
            FusionTask(node),
            data.train,
            data.val,
            run,
            fit_settings(config, config.fusion_optim, class_weights),
            metadata,
            progress,
        )
        return trainer.fit(resuming)
