"""`sfr fuse arch1|arch2`: train the fusion levels of a slow-fast model over trained branches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from sfr.cli.branch_stage import (
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    PrecisionOpt,
    RunsOpt,
    SetOpt,
    WorkersOpt,
)
from sfr.cli.common import fail, force_option, multiprocess_errors
from sfr.cli.fusion_common import load_fusion_config, run_and_report
from sfr.config import Choice
from sfr.train.fusion import FusionPlan


@multiprocess_errors
def fuse(
    architecture: Annotated[
        Literal["arch1", "arch2"],
        typer.Argument(
            help="arch1: rates of each modality first; arch2: modalities of each rate first."
        ),
    ],
    config: ConfigOpt,
    data: DataOpt,
    runs: RunsOpt = Path("runs"),
    stage: Annotated[
        int | None, typer.Option("--stage", help="Train only this fusion level (1 or 2).")
    ] = None,
    force: Annotated[
        bool,
        force_option(
            "Replace the fusion stages trained before (finished or interrupted): retrain them "
            "from scratch"
        ),
    ] = False,
    freeze_branches: Annotated[
        bool | None,
        typer.Option(
            "--freeze-branches/--train-branches", help="Train only each level's attention."
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Fusion training epochs.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Fusion SGD learning rate.")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Fusion batch size.")
    ] = None,
    device: Annotated[str | None, DeviceOpt] = None,
    precision: Annotated[str | None, PrecisionOpt] = None,
    workers: Annotated[int | None, WorkersOpt] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    set_: SetOpt = None,
) -> None:
    """Train the attention fusions of Architecture 1 or 2 from the fine-tuned branches.

    Finished stages are skipped unless --force, interrupted ones resumed. Example:
    sfr fuse arch2 --config configs/ek55/sf_arch2.toml --data DATA --runs runs
    """
    resolved = load_fusion_config(
        config,
        {
            "model.freeze_branches": freeze_branches,
            "fusion_optim.epochs": epochs,
            "fusion_optim.lr": lr,
            "fusion_optim.batch_size": batch_size,
            "run.device": device,
            "run.precision": precision,
            "data.num_workers": workers,
            "run.seed": seed,
        },
        set_,
        {
            "model.architecture": Choice(
                architecture, "ARCHITECTURE", "sfr fuse {value} --config {path}"
            )
        },
    )
    levels = FusionPlan(resolved, runs).levels
    if not levels:
        raise fail(
            f"{config}: a single branch has nothing to fuse.",
            "List several modalities or rates in [model].",
        )
    if stage is not None and stage not in levels:
        raise fail(
            f"--stage {stage}: this {architecture} model has fusion "
            f"level{'s' if len(levels) > 1 else ''} {', '.join(map(str, levels))} only.",
            "Pass one of those, or leave --stage out to train every level.",
        )
    run_and_report(
        resolved,
        data,
        runs,
        levels=None if stage is None else [stage],
        branches=False,
        force=force,
        hint=f"Train the branches first: sfr pipeline {config} --data {data} --runs {runs}",
    )
