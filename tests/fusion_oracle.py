"""The plain evaluation of a fusion tree: the oracle of the efficient one (tests and benchmark).

Every branch runs the published step-by-step formulation (`sfr.models.reference.plain_forward`)
over ALL the steps of its input, as the published fusion code does; the steps of the requested
times are picked afterwards by time through the leaf's grid, and fused bottom-up by the tree's
own `AttentionFusion` modules. Same weights, same dropout modules: with dropout 0 it computes
the function of `node(features, times)`, with a great deal more work.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from sfr.models.fusion import BranchNode, FusionNode, NodeOutput
from sfr.models.reference import plain_forward


def plain_tree_forward(
    node: BranchNode | FusionNode, features: dict[str, Tensor], times: Sequence[float]
) -> NodeOutput:
    """Scores (B, K, C), context (B, K, 2H) and attention weights at `times`, the plain way."""
    if isinstance(node, BranchNode):
        every = plain_forward(node.branch, features[node.key])  # (B, T, ·): every step
        steps = list(node.grid.steps_at(times))
        return NodeOutput(every.scores[:, steps], every.context[:, steps], {})
    outputs = [plain_tree_forward(child, features, times) for child in node.inputs]
    scores, context, weights = node.attention(
        [o.scores for o in outputs], [o.context for o in outputs]
    )
    attention = {node.label: weights}
    for output in outputs:
        attention.update(output.attention)
    return NodeOutput(scores, context, attention)
