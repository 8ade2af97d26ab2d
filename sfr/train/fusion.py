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
from torch import Tensor

from sfr.config import FusionRunConfig
from sfr.data.dataset import Stream
from sfr.models.architectures import FusionUnit, leaf_label, plan_architecture
from sfr.models.branch import create_branch
from sfr.models.fusion import BranchNode, FusionNode
from sfr.train.loop import FitResult, Progress, Trainer
from sfr.train.rundir import RunDir
from sfr.train.stages import (
    StageData,
    best_weights,
    branch_metadata,
    fit_settings,
    load_stage_data,
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


class FusionPlan:
    """The branches and fusion units of one config, and where each one's runs live."""

    def __init__(self, config: FusionRunConfig, runs_dir: Path) -> None:
        self.config = config
        self.runs_dir = Path(runs_dir)
        model = config.model
        self.units = plan_architecture(model.architecture, model.modalities, model.alphas)
        leaves = [(leaf_label(m, r.alpha), m, r) for r in model.rates for m in model.modalities]
        self.streams = {
            label: Stream(m, r.grid(config.data.fps, fusion=True)) for label, m, r in leaves
        }
        self.branch_rates = {label: (m, r) for label, m, r in leaves}
        self.by_label = {unit.label: unit for unit in self.units}

    @property
    def levels(self) -> list[int]:
        return sorted({unit.level for unit in self.units})

    def unit_dir(self, unit: FusionUnit) -> RunDir:
        return RunDir(self.runs_dir / self.config.fusion_dir / unit.label)

    def branch_dir(self, label: str) -> RunDir:
        modality, rate = self.branch_rates[label]
        return stage_dir(self.config.branch_config(modality, rate), self.runs_dir, "finetune")

    def leaves(self, label: str) -> list[str]:
        """Branch labels under a unit (or the branch itself)."""
        if label in self.branch_rates:
            return [label]
        return [leaf for child in self.by_label[label].inputs for leaf in self.leaves(child)]

    def spec(self, label: str, num_classes: int) -> dict[str, Any]:
        """What a node is: compared with the spec saved in its checkpoints."""
        if label in self.branch_rates:
            modality, rate = self.branch_rates[label]
            branch = self.config.branch_config(modality, rate)
            return branch_metadata(branch, "finetune", num_classes)["model"]
        unit = self.by_label[label]
        model = self.config.model
        return {
            "label": unit.label,
            "fuses": unit.fuses,
            "hidden": model.hidden,
            "dropout": getattr(model, unit.dropout_field),
            "num_classes": num_classes,
            "grids": {leaf: list(self._grid(leaf)) for leaf in self.leaves(label)},
            "inputs": [self.spec(child, num_classes) for child in unit.inputs],
        }

    def _grid(self, leaf: str) -> tuple[float, int, int]:
        grid = self.streams[leaf].grid
        return grid.alpha, grid.s_enc, grid.s_ant

    def build(self, label: str, num_classes: int, frozen: bool) -> BranchNode | FusionNode:
        """An untrained node with the structure of `label`."""
        model = self.config.model
        if label in self.branch_rates:
            modality = self.branch_rates[label][0]
            branch = create_branch(
                feat_dim=self.config.data.feature_dim(modality),
                hidden=model.hidden,
                num_classes=num_classes,
                dropout=model.branch_dropout,
            )
            return BranchNode(branch, label, self.streams[label].grid)
        unit = self.by_label[label]
        return FusionNode(
            label,
            [self.build(child, num_classes, frozen) for child in unit.inputs],
            model.hidden,
            getattr(model, unit.dropout_field),
            frozen_inputs=frozen,
        )

    def initialise(self, node: FusionNode, unit: FusionUnit, num_classes: int, hint: str) -> None:
        """Load every input of `node` from the best checkpoint of its own stage."""
        for child, label in zip(node.inputs, unit.inputs, strict=True):
            if label in self.branch_rates:
                weights = best_weights(self.branch_dir(label), self.spec(label, num_classes), hint)
                child.branch.load_state_dict(weights)
            else:
                run = self.unit_dir(self.by_label[label])
                child.load_state_dict(best_weights(run, self.spec(label, num_classes), hint))


def load_fusion_data(plan: FusionPlan, unit: FusionUnit, data_dir: Path) -> StageData:
    """Training and validation sets with every stream the unit's branches read."""
    streams = [plan.streams[leaf] for leaf in plan.leaves(unit.label)]
    return load_stage_data(plan.config.data, data_dir, streams)


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
    data = data or load_fusion_data(plan, unit, data_dir)
    torch.manual_seed(config.run.seed)
    node = plan.build(unit.label, data.num_classes, config.model.freeze_branches)
    if not (resume and run.last_path.is_file()):  # inputs are loaded before anything is written
        plan.initialise(node, unit, data.num_classes, hint)
    resuming = run.prepare(config.model_dump(mode="json"), force=force, resume=resume)
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
        fit_settings(config, config.fusion_optim),
        metadata,
        progress,
    )
    return trainer.fit(resuming)
