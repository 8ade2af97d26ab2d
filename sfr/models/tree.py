"""The structure of a configured model: its branch leaves, fusion units, streams and specs.

A `ModelTree` knows everything about a model that follows from its config alone: which
streams each branch reads, how the fusion units stack, and the spec every checkpoint records.
Training places its nodes in run directories; evaluation rebuilds them from a checkpoint.
"""

from __future__ import annotations

from typing import Any

from sfr.config import BranchRunConfig, FusionRunConfig
from sfr.data.dataset import Stream
from sfr.models.architectures import leaf_label, plan_architecture
from sfr.models.branch import create_branch
from sfr.models.fusion import BranchNode, FusionNode


def branch_spec(config: BranchRunConfig, num_classes: int) -> dict[str, Any]:
    """What a branch checkpoint records about its module: enough to rebuild it.

    Early-recognition branches also record their task, so that an anticipation branch is never
    taken for one (same weights, other inputs).
    """
    spec: dict[str, Any] = {
        "feat_dim": config.data.feature_dim(config.branch.modality),
        "hidden": config.branch.hidden,
        "num_classes": num_classes,
    }
    if config.data.task != "anticipation":
        spec["task"] = config.data.task
    return spec


class ModelTree:
    """The branches and fusion units of one fusion config."""

    def __init__(self, config: FusionRunConfig) -> None:
        self.config = config
        model = config.model
        self.units = plan_architecture(model.architecture, model.modalities, model.alphas)
        leaves = [(leaf_label(m, r.alpha), m, r) for r in model.rates for m in model.modalities]
        self.streams = {
            label: Stream(m, r.grid(config.data.fps, fusion=True, task=config.data.task))
            for label, m, r in leaves
        }
        self.branch_rates = {label: (m, r) for label, m, r in leaves}
        self.by_label = {unit.label: unit for unit in self.units}

    @property
    def levels(self) -> list[int]:
        return sorted({unit.level for unit in self.units})

    def leaves(self, label: str) -> list[str]:
        """Branch labels under a unit (or the branch itself)."""
        if label in self.branch_rates:
            return [label]
        return [leaf for child in self.by_label[label].inputs for leaf in self.leaves(child)]

    def spec(self, label: str, num_classes: int) -> dict[str, Any]:
        """What a node is: compared with the spec saved in its checkpoints."""
        if label in self.branch_rates:
            modality, rate = self.branch_rates[label]
            return branch_spec(self.config.branch_config(modality, rate), num_classes)
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
            **({"task": self.config.data.task} if self.config.data.task != "anticipation" else {}),
        }

    def _grid(self, leaf: str) -> tuple[float, int, int]:
        grid = self.streams[leaf].grid
        return grid.alpha, grid.s_enc, grid.s_ant

    def build(self, label: str, num_classes: int, frozen: bool = False) -> BranchNode | FusionNode:
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
