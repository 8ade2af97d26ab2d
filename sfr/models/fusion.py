"""Attention fusion (MATT) and the fusion tree that stacks it over branches at several rates.

    features ──► BranchNode(rgb@0.125) ─┐            (scores, context) at the requested times
    features ──► BranchNode(flow@0.125) ├─► FusionNode ──► fused scores, fused context, weights
    features ──► BranchNode(obj@0.125) ─┘

A `FusionNode`'s inputs may themselves be fusion nodes, so the same block fuses modalities at
one rate, rates of one modality, or fused levels (Architectures 1 and 2). Every node is asked for
its outputs at a tuple of anticipation times (seconds before the action): a branch turns them
into its own step indices through its time grid and computes only those steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sfr.data.timegrid import TimeGrid
from sfr.models.branch import BranchOutput
from sfr.models.matmul import linear


class NodeOutput(NamedTuple):
    """Scores (B, K, C), context (B, K, 2H) and the attention weights of every fusion below."""

    scores: Tensor
    context: Tensor
    attention: dict[str, Tensor]  # fusion label -> (B, K, n_inputs)


class StepModel(Protocol):
    """What a branch node runs: scores and context at the requested step indices."""

    def __call__(self, x: Tensor, steps: Sequence[int]) -> BranchOutput: ...


class AttentionFusion(nn.Module):
    """MATT: an MLP on the concatenated contexts of n inputs gives softmax weights over them.

    MLP: 2Hn → 2Hn/4 → 2Hn/8 → n with ReLU and dropout between; fused scores are the weighted
    sum of the inputs' raw scores, the fused context the weighted sum of their contexts.
    """

    def __init__(self, num_inputs: int, hidden: int, dropout: float) -> None:
        super().__init__()
        width = 2 * hidden * num_inputs
        self.num_inputs = num_inputs
        self.mlp = nn.Sequential(
            nn.Linear(width, width // 4),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width // 4, width // 8),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width // 8, num_inputs),
        )

    def forward(
        self, scores: Sequence[Tensor], contexts: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Fused scores (B, K, C), fused context (B, K, 2H) and weights (B, K, n)."""
        hidden = torch.cat(list(contexts), dim=-1)  # (B, K, 2Hn)
        for layer in self.mlp:  # `self.mlp(...)`, its products through `linear`
            hidden = (
                linear(hidden, layer.weight, layer.bias)
                if isinstance(layer, nn.Linear)
                else layer(hidden)
            )
        weights = F.softmax(hidden, dim=-1)  # (B, K, n)
        fused_scores = (torch.stack(list(scores), dim=-1) * weights.unsqueeze(2)).sum(-1)
        fused_context = (torch.stack(list(contexts), dim=-1) * weights.unsqueeze(2)).sum(-1)
        return fused_scores, fused_context, weights


class BranchNode(nn.Module):
    """A leaf of the fusion tree: one branch reading the stream `key` on its time grid."""

    def __init__(self, branch: nn.Module, key: str, grid: TimeGrid) -> None:
        super().__init__()
        self.branch = branch
        self.key = key
        self.grid = grid

    @property
    def label(self) -> str:
        return self.key

    @property
    def times(self) -> tuple[float, ...]:
        return self.grid.anticipation_times

    def forward(self, features: dict[str, Tensor], times: Sequence[float]) -> NodeOutput:
        out = self.branch(features[self.key], self.grid.steps_at(times))
        return NodeOutput(out.scores, out.context, {})


class FusionNode(nn.Module):
    """Attention fusion of several nodes at the anticipation times they all produce.

    With `frozen_inputs`, the inputs are neither trained nor put in training mode.
    """

    def __init__(
        self,
        label: str,
        inputs: Sequence[BranchNode | FusionNode],
        hidden: int,
        dropout: float,
        *,
        frozen_inputs: bool = False,
    ) -> None:
        super().__init__()
        self.label = label
        self.inputs = nn.ModuleList(inputs)
        self.attention = AttentionFusion(len(inputs), hidden, dropout)
        self.frozen_inputs = frozen_inputs
        if frozen_inputs:
            self.inputs.requires_grad_(False)

    @property
    def input_labels(self) -> tuple[str, ...]:
        return tuple(node.label for node in self.inputs)

    @property
    def times(self) -> tuple[float, ...]:
        """Times (early recognition: observed ratios) every input produces, in the inputs' order."""
        common = set.intersection(*(set(node.times) for node in self.inputs))
        return tuple(t for t in self.inputs[0].times if t in common)

    def train(self, mode: bool = True) -> FusionNode:
        super().train(mode)
        if self.frozen_inputs:
            self.inputs.eval()
        return self

    def forward(self, features: dict[str, Tensor], times: Sequence[float]) -> NodeOutput:
        outputs = [node(features, times) for node in self.inputs]
        scores, context, weights = self.attention(
            [o.scores for o in outputs], [o.context for o in outputs]
        )
        attention = {self.label: weights}
        for output in outputs:
            attention.update(output.attention)
        return NodeOutput(scores, context, attention)
