"""Forward+backward time per batch: the published slow-fast Architecture 2 model, efficient vs plain.

Real dimensions (rgb/flow/obj features 1024/1024/352, hidden 1024, batch 64, EK55's 2513
classes) at the published rates: alpha 0.125 (branch grid 24+16, fed 12+16 steps by the fusion
stages) and alpha 0.5 (6+4), fused at 2.0, 1.5, 1.0 and 0.5 s. Efficient: the fusion tree as
`sfr` runs it, every branch computing only the 4 fused steps. Plain: the same weights, every
branch computed the published way over all its steps, the fused steps picked afterwards and fused
by the same attention modules (`tests/fusion_oracle.py`). Both run side by side in this one
process on the same weights and inputs, in training mode.

    nox -s bench            or            python benchmarks/bench_fusion.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from sfr.config import FusionRunConfig, build_config
from sfr.models.fusion import BranchNode
from sfr.train.fusion import FusionPlan

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_branch import seconds_per_batch  # noqa: E402
from fusion_oracle import plain_tree_forward  # noqa: E402

FEATURE_DIMS = {"rgb": 1024, "flow": 1024, "obj": 352}
RATES = (
    {"alpha": 0.125, "s_enc": 24, "s_ant": 16, "fusion_s_enc": 12},
    {"alpha": 0.5, "s_enc": 6, "s_ant": 4},
)
FUSED_TIMES = (2.0, 1.5, 1.0, 0.5)
HIDDEN, BATCH, CLASSES, TARGET = 1024, 64, 2513, 5.0
# (branch, modality attention, slow-fast attention) dropouts: identical-function check, published.
DROPOUTS = ((0.0, 0.0, 0.0), (0.8, 0.8, 0.9))


def published_config(dropouts: tuple[float, float, float]) -> FusionRunConfig:
    """The published Architecture 2 config with the given dropouts."""
    branch, modality, rate = dropouts
    tree: dict[str, Any] = {
        "data": {"feature_dims": FEATURE_DIMS},
        "model": {
            "architecture": "arch2",
            "modalities": list(FEATURE_DIMS),
            "rates": list(RATES),
            "hidden": HIDDEN,
            "branch_dropout": branch,
            "modality_dropout": modality,
            "rate_dropout": rate,
        },
    }
    return build_config(FusionRunConfig, tree)


def bench_model(
    dropouts: tuple[float, float, float], repeats: int
) -> tuple[float, float, float, dict[str, tuple[int, int]]]:
    """(plain s, efficient s, max |Δ fused scores|, {stream: (fused steps, all steps)})."""
    config = published_config(dropouts)
    plan = FusionPlan(config, Path("runs"))  # building a node reads and writes nothing there
    torch.manual_seed(0)
    node = plan.build(plan.units[-1].label, CLASSES, frozen=False).train()
    times = node.times
    if times != FUSED_TIMES:
        raise RuntimeError(f"fused times {times}, expected {FUSED_TIMES}")
    features = {
        key: torch.randn(BATCH, stream.grid.steps, config.data.feature_dim(stream.modality))
        for key, stream in plan.streams.items()
    }
    steps: dict[str, tuple[int, int]] = {}  # stream -> (steps the efficient branch computes, T)
    for leaf in (m for m in node.modules() if isinstance(m, BranchNode)):
        leaf.branch.register_forward_pre_hook(
            lambda _, args, key=leaf.key: steps.__setitem__(key, (len(args[1]), args[0].shape[1]))
        )
    labels = torch.randint(0, CLASSES, (BATCH,)).repeat_interleave(len(times))
    last: dict[str, torch.Tensor] = {}

    def step(name: str, forward: Any) -> None:
        node.zero_grad()
        scores = forward(node, features, times).scores  # (B, K, C)
        F.cross_entropy(scores.reshape(-1, CLASSES), labels).backward()
        last[name] = scores.detach()

    plain = seconds_per_batch(lambda: step("plain", plain_tree_forward), repeats)
    efficient = seconds_per_batch(lambda: step("efficient", lambda n, f, t: n(f, t)), repeats)
    difference = float("nan")
    if not any(dropouts):  # same function: the last timed batches must agree
        difference = (last["plain"] - last["efficient"]).abs().max().item()
    return plain, efficient, difference, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(
        f"Slow-fast Architecture 2 (rgb/flow/obj at alpha 0.125 and 0.5), forward+backward per "
        f"batch (hidden {HIDDEN}, batch {BATCH}, {CLASSES} classes, "
        f"{torch.get_num_threads()} threads)"
    )
    print(
        f"{'dropouts b/m/r':<22}{'plain s':>10}{'fast s':>10}{'ratio':>8}{'target':>8}{'max |Δ|':>10}"
    )
    steps: dict[str, tuple[int, int]] = {}
    for dropouts in DROPOUTS:
        plain, fast, difference, steps = bench_model(dropouts, args.repeats)
        identical = not any(dropouts)
        shown_target = f"≥{TARGET:g}x" if identical else "-"
        shown_diff = f"{difference:.1e}" if identical else "(masks)"
        name = "/".join(f"{p:g}" for p in dropouts)
        print(
            f"{name:<22}{plain:>10.3f}{fast:>10.3f}{plain / fast:>7.2f}x{shown_target:>8}{shown_diff:>10}"
        )
    print(
        f"fused times {', '.join(f'{t:g}' for t in FUSED_TIMES)} s; steps computed per branch: "
        + ", ".join(f"{key} {k} of {n}" for key, (k, n) in steps.items())
    )
    print("plain: every branch unrolled from all its steps the published way, fused steps picked;")
    print("dropouts 0: identical function; published dropouts: a fresh mask per unrolling step.")


if __name__ == "__main__":
    main()
