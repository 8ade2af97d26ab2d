"""Forward+backward time per batch: the efficient RU-LSTM branch versus the plain formulation.

Real dimensions (hidden 1024, feature 1024, batch 64, EK55's 2513 classes) at the two published
grids: alpha 0.25 (T = 14) and alpha 0.125 (T = 40). Both formulations run side by side in this
one process on the same weights and inputs; the outputs are checked identical first.

    nox -s bench            or            python benchmarks/bench_branch.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from sfr.models.branch import create_branch
from sfr.models.reference import plain_forward

GRIDS = (("alpha 0.25, T = 14", 6, 8, 3.0), ("alpha 0.125, T = 40", 24, 16, 5.0))
HIDDEN, FEATURES, BATCH, CLASSES = 1024, 1024, 64, 2513


def seconds_per_batch(step: Callable[[], None], repeats: int) -> float:
    """Median wall time of `step` after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def bench_grid(s_enc: int, s_ant: int, dropout: float, repeats: int) -> tuple[float, float, float]:
    """(plain s, efficient s, max |Δ output|) for one grid; training mode with `dropout`."""
    torch.manual_seed(0)
    branch = create_branch(
        feat_dim=FEATURES, hidden=HIDDEN, num_classes=CLASSES, dropout=dropout
    ).train()
    x = torch.randn(BATCH, s_enc + s_ant, FEATURES)
    labels = torch.randint(0, CLASSES, (BATCH,))
    steps = list(range(s_enc, s_enc + s_ant))

    def loss_of(scores: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(
            scores.reshape(-1, CLASSES), labels.repeat_interleave(s_ant)
        )

    def plain() -> None:
        branch.zero_grad()
        loss_of(plain_forward(branch, x).scores[:, s_enc:]).backward()

    def efficient() -> None:
        branch.zero_grad()
        loss_of(branch(x, steps).scores).backward()

    difference = float("nan")
    if dropout == 0:
        with torch.no_grad():
            difference = (
                (branch(x, steps).scores - plain_forward(branch, x).scores[:, s_enc:])
                .abs()
                .max()
                .item()
            )
    return seconds_per_batch(plain, repeats), seconds_per_batch(efficient, repeats), difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"RU-LSTM branch, forward+backward per batch (hidden {HIDDEN}, feature {FEATURES}, batch {BATCH}, "
        f"{torch.get_num_threads()} threads)"
    )
    print(
        f"{'grid':<22}{'dropout':>8}{'plain s':>10}{'fast s':>10}{'ratio':>8}{'target':>8}{'max |Δ|':>10}"
    )
    for name, s_enc, s_ant, target in GRIDS:
        for dropout in (0.0, 0.8):
            plain, fast, difference = bench_grid(s_enc, s_ant, dropout, args.repeats)
            shown_target = f"≥{target:g}x" if dropout == 0 else "-"
            shown_diff = f"{difference:.1e}" if dropout == 0 else "(masks)"
            print(
                f"{name:<22}{dropout:>8.1f}{plain:>10.3f}{fast:>10.3f}{plain / fast:>7.2f}x{shown_target:>8}{shown_diff:>10}"
            )
    print("dropout 0.0: identical function, input projection of the repeated input hoisted;")
    print(
        "dropout 0.8: published training (a fresh mask per unrolling step), no hoisting possible."
    )


if __name__ == "__main__":
    main()
