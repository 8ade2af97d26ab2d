"""Fusion trees: MATT reproduces the published fusion, slow-fast steps align in time, only the fused
steps are computed, Architectures 1 and 2 are planned as documented, frozen inputs stay frozen, and
the efficient tree computes the plain evaluation's function (tests/fusion_oracle.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fusion_oracle import plain_tree_forward
from golden import GOLDEN, golden_case
from torch import Tensor, nn

from sfr.config import FusionRunConfig, build_config
from sfr.data.timegrid import TimeGrid
from sfr.errors import ConfigError
from sfr.hub.published import branch_state_from_published, load_published_checkpoint
from sfr.models.architectures import FusionUnit, plan_architecture
from sfr.models.branch import BranchOutput, create_branch, set_kernel
from sfr.models.fusion import AttentionFusion, BranchNode, FusionNode, NodeOutput
from sfr.train.fusion import FusionPlan

MODALITIES = ("rgb", "flow", "obj")
PUBLISHED_RATES = (
    {"alpha": 0.125, "s_enc": 24, "s_ant": 16, "fusion_s_enc": 12},
    {"alpha": 0.5, "s_enc": 6, "s_ant": 4},
)
THREE_RATES = (
    {"alpha": 0.125, "s_enc": 8, "s_ant": 16},
    {"alpha": 0.25, "s_enc": 6, "s_ant": 8},
    {"alpha": 0.5, "s_enc": 3, "s_ant": 4},
)
FUSED_TIMES = (2.0, 1.5, 1.0, 0.5)
# Steps the fusion stages feed each rate: (alpha, encoding, anticipation), set by hand.
FUSION_STEPS = {
    "published": {0.125: (12, 16), 0.5: (6, 4)},
    "three-rates": {0.125: (8, 16), 0.25: (6, 8), 0.5: (3, 4)},
}
RATE_SETS = {"published": PUBLISHED_RATES, "three-rates": THREE_RATES}


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    """Tiny models: one intra-op thread is faster and the tests stay deterministic."""


def _config(rates: Sequence[dict[str, Any]], architecture: str = "arch2", **model: Any):
    tree = {
        "data": {"feature_dims": {"rgb": 5, "flow": 5, "obj": 4}},
        "model": {
            "architecture": architecture,
            "modalities": list(MODALITIES),
            "rates": list(rates),
            "hidden": 6,
            **model,
        },
    }
    return build_config(FusionRunConfig, tree)


def _plan(rates: Sequence[dict[str, Any]], architecture: str = "arch2", **model: Any):
    return FusionPlan(_config(rates, architecture, **model), Path("unused-runs"))


def _leaves(node: nn.Module) -> list[BranchNode]:
    return [m for m in node.modules() if isinstance(m, BranchNode)]


def _fusions(node: nn.Module) -> list[FusionNode]:
    return [m for m in node.modules() if isinstance(m, FusionNode)]


def _timestamps(steps: int, alpha: float) -> np.ndarray:
    """Seconds before the action of each of `steps` steps, oldest first, computed independently."""
    return alpha * np.arange(steps, 0, -1)


# --- MATT reproduces the published fusion ------------------------------------------------------


def _published_fusion() -> tuple[FusionNode, dict[str, Tensor], Tensor]:
    ctor, io = golden_case("rulstm_fusion_a0.25_6_8")
    state = load_published_checkpoint(GOLDEN / "rulstm_fusion_a0.25_6_8" / "checkpoint.pth.tar")[
        "state_dict"
    ]
    grid = TimeGrid(0.25, 6, 8)
    nodes = []
    for index, (modality, settings) in enumerate(zip(MODALITIES, ctor["branches"])):
        branch = create_branch(
            feat_dim=settings["feat_in"],
            hidden=settings["hidden"],
            num_classes=settings["num_class"],
            dropout=settings["dropout"],
        )
        branch.load_state_dict(branch_state_from_published(state, prefix=f"branches.{index}."))
        nodes.append(BranchNode(branch, f"{modality}@0.25", grid))
    node = FusionNode("rgb+flow+obj@0.25", nodes, ctor["hidden"], ctor["dropout"])
    matt = {key.removeprefix("MATT."): v for key, v in state.items() if key.startswith("MATT.")}
    assert sorted(matt) == sorted(f"{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias"))
    node.attention.mlp.load_state_dict(matt)
    features = {f"{m}@0.25": io[f"x{i}"] for i, m in enumerate(MODALITIES)}
    return node.eval(), features, io["scores"]


def test_matt_reproduces_published_fusion_at_anticipation_steps() -> None:
    node, features, expected = _published_fusion()
    assert node.times == (2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25)
    with torch.no_grad():
        out = node(features, node.times)
    assert out.scores.shape == (6, 8, 24)
    assert (out.scores - expected[:, 6:]).abs().max() <= 1e-5
    weights = out.attention["rgb+flow+obj@0.25"]
    assert weights.shape == (6, 8, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(6, 8))


def test_matt_reproduces_published_fusion_at_every_step() -> None:
    node, features, expected = _published_fusion()
    every = node.inputs[0].grid.times  # 3.5, 3.25, ..., 0.25
    assert len(every) == 14
    with torch.no_grad():
        out = node(features, every)
    assert (out.scores - expected).abs().max() <= 1e-5


# --- time alignment ----------------------------------------------------------------------------


class TimestampProbe(nn.Module):
    """Stands in for a branch: copies the timestamp carried by x's requested steps into every
    score and context entry, and records the steps it was asked for."""

    def __init__(self, classes: int, hidden: int) -> None:
        super().__init__()
        self.classes, self.hidden = classes, hidden
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: Tensor, steps: Sequence[int]) -> BranchOutput:
        self.calls.append(tuple(steps))
        stamp = x[:, list(steps), :1]  # (B, K, 1)
        return BranchOutput(
            stamp.expand(-1, -1, self.classes), stamp.expand(-1, -1, 2 * self.hidden)
        )


def _stamped_features(steps: dict[float, tuple[int, int]], batch: int = 2) -> dict[str, Tensor]:
    """Inputs whose every value at step i is that step's seconds before the action."""
    features = {}
    for alpha, (s_enc, s_ant) in steps.items():
        stamps = torch.tensor(_timestamps(s_enc + s_ant, alpha), dtype=torch.float64)
        for modality, dim in zip(MODALITIES, (5, 5, 4)):
            features[f"{modality}@{alpha:g}"] = stamps.view(1, -1, 1).expand(batch, -1, dim)
    return features


def _record_outputs(tree: nn.Module) -> dict[str, list[NodeOutput]]:
    recorded: dict[str, list[NodeOutput]] = {}
    for module in tree.modules():
        if isinstance(module, (BranchNode, FusionNode)):
            module.register_forward_hook(
                lambda mod, args, out: recorded.setdefault(mod.label, []).append(out)
            )
    return recorded


@pytest.mark.parametrize("architecture", ["arch1", "arch2"])
@pytest.mark.parametrize("rates", ["published", "three-rates"])
def test_every_input_of_every_fusion_sees_the_same_time(rates: str, architecture: str) -> None:
    plan = _plan(RATE_SETS[rates], architecture)
    tree = plan.build(plan.units[-1].label, 3, frozen=False).double().eval()
    for leaf in _leaves(tree):
        leaf.branch = TimestampProbe(3, 6)
    recorded = _record_outputs(tree)
    times = tree.times
    assert times == FUSED_TIMES
    assert plan.config.fused_times == FUSED_TIMES

    with torch.no_grad():
        out = tree(_stamped_features(FUSION_STEPS[rates]), times)

    expected = torch.tensor(FUSED_TIMES, dtype=torch.float64).view(1, -1, 1)
    labels = {leaf.label for leaf in _leaves(tree)} | {u.label for u in plan.units}
    assert set(recorded) == labels
    for label, outputs in recorded.items():
        (output,) = outputs  # every node runs exactly once
        for tensor in (output.scores, output.context):
            assert tensor.shape[1] == len(FUSED_TIMES), label
            assert (tensor - expected).abs().max() <= 1e-9, label
    assert (out.scores - expected).abs().max() <= 1e-9
    assert set(out.attention) == {u.label for u in plan.units}


@pytest.mark.parametrize("architecture", ["arch1", "arch2"])
@pytest.mark.parametrize("rates", ["published", "three-rates"])
def test_fusion_times_are_the_intersection_of_the_inputs_times(
    rates: str, architecture: str
) -> None:
    plan = _plan(RATE_SETS[rates], architecture)
    tree = plan.build(plan.units[-1].label, 3, frozen=False)
    grids = FUSION_STEPS[rates]
    for leaf in _leaves(tree):
        s_enc, s_ant = grids[leaf.grid.alpha]
        assert (leaf.grid.s_enc, leaf.grid.s_ant) == (s_enc, s_ant)
        stamps = _timestamps(s_enc + s_ant, leaf.grid.alpha)[s_enc:]
        assert np.allclose(leaf.times, stamps, atol=1e-12)
    for fusion in _fusions(tree):
        common = set.intersection(*({round(t, 6) for t in leaf.times} for leaf in _leaves(fusion)))
        assert fusion.times == tuple(sorted(common, reverse=True)), fusion.label
    assert tree.times == FUSED_TIMES
    if architecture == "arch2":  # level 1 fuses modalities at one rate: all its times
        for fusion in tree.inputs:
            assert len(fusion.times) == fusion.inputs[0].grid.s_ant


def test_rates_without_a_common_time_fuse_at_no_time() -> None:
    def leaf(alpha: float) -> BranchNode:
        branch = create_branch(feat_dim=2, hidden=3, num_classes=2)
        return BranchNode(branch, f"rgb@{alpha:g}", TimeGrid(alpha, 2, 1))

    assert leaf(0.25).times == (0.25,) and leaf(0.5).times == (0.5,)
    assert FusionNode("rgb@0.25+0.5", [leaf(0.25), leaf(0.5)], 3, 0.0).times == ()


def test_config_refuses_rates_without_a_common_time() -> None:
    rates = [{"alpha": 0.25, "s_enc": 2, "s_ant": 1}, {"alpha": 0.5, "s_enc": 2, "s_ant": 1}]
    with pytest.raises(ConfigError, match=r"model\.rates: .*share no anticipation time") as error:
        _config(rates)
    assert "0.25" in str(error.value) and "0.5" in str(error.value)
    tree = {"model": {"rates": [{**rates[0], "s_ant": 2}, rates[1]]}, "run": {"select_time": 0.5}}
    assert build_config(FusionRunConfig, tree).fused_times == (0.5,)  # 0.5 s in common: accepted


def test_config_refuses_rates_whose_ratio_is_not_an_integer() -> None:
    rates = [{"alpha": 0.25, "s_enc": 2, "s_ant": 8}, {"alpha": 0.375, "s_enc": 2, "s_ant": 8}]
    with pytest.raises(ConfigError, match=r"model\.rates: .*0\.25 and 0\.375.*not an integer"):
        _config(rates)


# --- efficiency carries through ----------------------------------------------------------------


class CountingBranch(nn.Module):
    """Wraps a branch and records the number of input steps and the steps of every call."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def forward(self, x: Tensor, steps: Sequence[int]) -> BranchOutput:
        self.calls.append((x.shape[1], tuple(steps)))
        return self.branch(x, steps)


def test_fused_model_computes_only_the_fused_steps_of_every_branch() -> None:
    plan = _plan(PUBLISHED_RATES, "arch2", branch_dropout=0.0)
    tree = plan.build(plan.units[-1].label, 3, frozen=False)
    leaves = _leaves(tree)
    assert len(leaves) == 6
    for leaf in leaves:
        leaf.branch = CountingBranch(leaf.branch)
    features = {
        f"{m}@{alpha:g}": torch.randn(2, s_enc + s_ant, dim)
        for alpha, (s_enc, s_ant) in FUSION_STEPS["published"].items()
        for m, dim in zip(MODALITIES, (5, 5, 4))
    }
    out = tree(features, tree.times)
    assert out.scores.shape == (2, 4, 3)
    expected = {0.125: (28, (12, 16, 20, 24)), 0.5: (10, (6, 7, 8, 9))}
    for leaf in leaves:
        assert leaf.branch.calls == [expected[leaf.grid.alpha]], leaf.label


# --- Architectures 1 and 2 as plans ------------------------------------------------------------


def test_plan_two_rates_three_modalities() -> None:
    arch2 = plan_architecture("arch2", MODALITIES, [0.125, 0.5])
    assert arch2 == [
        FusionUnit("rgb+flow+obj@0.125", ("rgb@0.125", "flow@0.125", "obj@0.125"), "modalities", 1),
        FusionUnit("rgb+flow+obj@0.5", ("rgb@0.5", "flow@0.5", "obj@0.5"), "modalities", 1),
        FusionUnit(
            "rgb+flow+obj@0.125+0.5", ("rgb+flow+obj@0.125", "rgb+flow+obj@0.5"), "rates", 2
        ),
    ]
    arch1 = plan_architecture("arch1", MODALITIES, [0.125, 0.5])
    assert arch1 == [
        FusionUnit("rgb@0.125+0.5", ("rgb@0.125", "rgb@0.5"), "rates", 1),
        FusionUnit("flow@0.125+0.5", ("flow@0.125", "flow@0.5"), "rates", 1),
        FusionUnit("obj@0.125+0.5", ("obj@0.125", "obj@0.5"), "rates", 1),
        FusionUnit(
            "rgb+flow+obj@0.125+0.5",
            ("rgb@0.125+0.5", "flow@0.125+0.5", "obj@0.125+0.5"),
            "modalities",
            2,
        ),
    ]
    assert [u.dropout_field for u in arch2] == ["modality_dropout"] * 2 + ["rate_dropout"]
    assert [u.dropout_field for u in arch1] == ["rate_dropout"] * 3 + ["modality_dropout"]


@pytest.mark.parametrize("architecture", ["arch1", "arch2"])
def test_plan_one_rate_is_the_original_modality_attention(architecture: str) -> None:
    (unit,) = plan_architecture(architecture, MODALITIES, [0.25])
    assert unit.label == "rgb+flow+obj@0.25"
    assert unit.inputs == ("rgb@0.25", "flow@0.25", "obj@0.25")
    assert unit.fuses == "modalities" and unit.dropout_field == "modality_dropout"
    # a model with a single fusion level calls it level 1, whichever the architecture
    assert unit.level == 1


@pytest.mark.parametrize("architecture", ["arch1", "arch2"])
def test_plan_one_modality_is_a_pure_slow_fast_fusion(architecture: str) -> None:
    (unit,) = plan_architecture(architecture, ["rgb"], [0.125, 0.25, 0.5])
    assert unit.label == "rgb@0.125+0.25+0.5"
    assert unit.inputs == ("rgb@0.125", "rgb@0.25", "rgb@0.5")
    assert unit.fuses == "rates" and unit.dropout_field == "rate_dropout"
    assert unit.level == 1


@pytest.mark.parametrize("architecture", ["arch1", "arch2"])
def test_plan_one_branch_has_no_fusion(architecture: str) -> None:
    assert plan_architecture(architecture, ["flow"], [0.5]) == []


def test_plan_builds_the_planned_tree() -> None:
    plan = _plan(THREE_RATES, "arch1")
    tree = plan.build(plan.units[-1].label, 3, frozen=False)
    assert tree.label == "rgb+flow+obj@0.125+0.25+0.5"
    assert tree.input_labels == ("rgb@0.125+0.25+0.5", "flow@0.125+0.25+0.5", "obj@0.125+0.25+0.5")
    assert tree.inputs[2].input_labels == ("obj@0.125", "obj@0.25", "obj@0.5")
    assert tree.attention.mlp[0].in_features == 2 * 6 * 3
    assert tree.attention.mlp[-1].out_features == 3


# --- freezing ----------------------------------------------------------------------------------


def _tiny_fusion(frozen: bool) -> tuple[FusionNode, dict[str, Tensor]]:
    torch.manual_seed(0)
    grid = TimeGrid(0.25, 2, 3)
    nodes = [
        BranchNode(
            create_branch(feat_dim=4, hidden=5, num_classes=3, dropout=0.8), f"{m}@0.25", grid
        )
        for m in ("rgb", "flow")
    ]
    node = FusionNode("rgb+flow@0.25", nodes, 5, 0.8, frozen_inputs=frozen)
    features = {f"{m}@0.25": torch.randn(4, 5, 4) for m in ("rgb", "flow")}
    return node, features


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_frozen_inputs_are_neither_trained_nor_in_training_mode(frozen: bool) -> None:
    node, features = _tiny_fusion(frozen)
    node.eval()
    node.train()
    assert node.training and all(m.training for m in node.attention.modules())
    assert all(p.requires_grad for p in node.attention.parameters())
    assert all(m.training != frozen for m in node.inputs.modules())
    assert all(p.requires_grad != frozen for p in node.inputs.parameters())

    recorded = _record_outputs(node)
    first, second = node(features, node.times), node(features, node.times)
    leaves_equal = [
        torch.equal(a.scores, b.scores) and torch.equal(a.context, b.context)
        for a, b in (recorded[f"{m}@0.25"] for m in ("rgb", "flow"))
    ]
    assert all(leaves_equal) if frozen else not any(leaves_equal)
    assert not torch.equal(first.scores, second.scores)  # the attention's dropout is active

    (first.scores.sum() + second.scores.sum()).backward()
    assert all(p.grad is not None for p in node.attention.parameters())
    assert all((p.grad is None) == frozen for p in node.inputs.parameters())


def test_freezing_applies_to_every_level_of_a_planned_tree() -> None:
    plan = _plan(PUBLISHED_RATES, "arch2")
    tree = plan.build(plan.units[-1].label, 3, frozen=True).train()
    assert all(m.training for m in tree.attention.modules())
    assert not any(m.training for m in tree.inputs.modules())
    trainable = {name for name, p in tree.named_parameters() if p.requires_grad}
    assert trainable == {f"attention.{name}" for name, _ in tree.attention.named_parameters()}


# --- the efficient tree computes the plain evaluation's function --------------------------------


@pytest.mark.parametrize("kernel", ["loop", "fused"])
@pytest.mark.parametrize("architecture", ["arch1", "arch2"])
def test_efficient_tree_matches_plain_evaluation_with_gradients(
    architecture: str, kernel: str
) -> None:
    plan = _plan(
        PUBLISHED_RATES, architecture, branch_dropout=0.0, modality_dropout=0.0, rate_dropout=0.0
    )
    torch.manual_seed(0)
    tree = plan.build(plan.units[-1].label, 3, frozen=False).double().train()
    set_kernel(tree, kernel)
    features = {
        key: torch.randn(2, stream.grid.steps, plan.config.data.feature_dim(stream.modality))
        .double()
        .requires_grad_()
        for key, stream in plan.streams.items()
    }
    parameters = list(tree.parameters())
    inputs = [*features.values(), *parameters]

    def objective(out: NodeOutput) -> Tensor:
        weights = torch.linspace(-1, 1, out.scores.numel(), dtype=torch.float64)
        value = (out.scores * weights.view_as(out.scores)).sum() + out.context.sin().sum()
        return value + sum((w * w).sum() for w in out.attention.values())

    fast = tree(features, tree.times)
    fast_grads = torch.autograd.grad(objective(fast), inputs)
    plain = plain_tree_forward(tree, features, tree.times)
    plain_grads = torch.autograd.grad(objective(plain), inputs)

    assert fast.scores.shape == (2, 4, 3) and fast.context.shape == (2, 4, 12)
    assert (fast.scores - plain.scores).abs().max() <= 1e-5
    assert (fast.context - plain.context).abs().max() <= 1e-5
    assert set(fast.attention) == set(plain.attention) == {u.label for u in plan.units}
    for label, weights in fast.attention.items():
        assert (weights - plain.attention[label]).abs().max() <= 1e-5, label
    assert all(g.abs().max() > 0 for g in plain_grads[: len(features)])
    for mine, theirs in zip(fast_grads, plain_grads):
        assert (mine - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("kernel", ["loop", "fused"])
@pytest.mark.parametrize("training", [False, True])
def test_architecture2_trains_and_evaluates_under_bf16_autocast(
    kernel: str, training: bool
) -> None:
    plan = _plan(PUBLISHED_RATES, "arch2")  # published dropouts
    torch.manual_seed(0)
    tree = plan.build(plan.units[-1].label, 3, frozen=False)
    set_kernel(tree, kernel)
    features = {
        key: torch.randn(2, stream.grid.steps, plan.config.data.feature_dim(stream.modality))
        for key, stream in plan.streams.items()
    }
    reference = tree.eval()(features, tree.times)
    tree.train(training)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tree(features, tree.times)
        loss = out.scores.float().logsumexp(-1).sum()
    loss.backward()
    assert out.scores.shape == (2, 4, 3)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in tree.parameters())
    if not training:
        assert (out.scores.float() - reference.scores).abs().max() <= 0.1


def test_attention_mlp_products_equal_the_modules_own_with_gradients() -> None:
    """The MLP's products run through `sfr.models.matmul.linear` (oneDNN on the CPU): the same
    weights and gradients as calling the `nn.Sequential` itself."""
    torch.manual_seed(0)
    fusion = AttentionFusion(3, 16, dropout=0.0).train()
    contexts = [torch.randn(4, 2, 32, requires_grad=True) for _ in range(3)]
    scores = [torch.randn(4, 2, 9) for _ in range(3)]
    _, _, weights = fusion(scores, contexts)
    weights.pow(2).sum().backward()
    got = [p.grad.clone() for p in fusion.parameters()] + [c.grad.clone() for c in contexts]
    fusion.zero_grad()
    for c in contexts:
        c.grad = None
    expected = torch.softmax(fusion.mlp(torch.cat(contexts, dim=-1)), dim=-1)
    expected.pow(2).sum().backward()
    wanted = [p.grad for p in fusion.parameters()] + [c.grad for c in contexts]
    assert (weights - expected).abs().max() <= 1e-6
    for g, w in zip(got, wanted, strict=True):
        assert (g - w).abs().max() <= 1e-5
