"""`sfr pipeline CONFIG`: every stage of a slow-fast model, in order, ending with one table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sfr.cli.branch_stage import DataOpt, DeviceOpt, PrecisionOpt, RunsOpt, SetOpt, WorkersOpt
from sfr.cli.common import fail, force_option, multiprocess_errors
from sfr.cli.fusion_common import load_fusion_config, run_and_report


@multiprocess_errors
def pipeline(
    data: DataOpt,
    config_arg: Annotated[
        Path | None,
        typer.Argument(
            metavar="CONFIG", help="Fusion config (configs/ek55/sf_arch2.toml, ...), or --config."
        ),
    ] = None,
    config_opt: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Fusion config, as for `sfr fuse` (or CONFIG)."),
    ] = None,
    runs: RunsOpt = Path("runs"),
    force: Annotated[
        bool,
        force_option(
            "Replace every stage trained before (finished or interrupted): retrain it from scratch"
        ),
    ] = False,
    freeze_branches: Annotated[
        bool | None,
        typer.Option(
            "--freeze-branches/--train-branches", help="Fusion stages train only attention."
        ),
    ] = None,
    device: Annotated[str | None, DeviceOpt] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    precision: Annotated[str | None, PrecisionOpt] = None,
    workers: Annotated[int | None, WorkersOpt] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Training epochs of every stage.")
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="SGD learning rate of every stage.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Batch size of every stage.")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Pre-train and fine-tune every branch, then train every fusion level.

    Finished stages are skipped and interrupted ones resumed, so the same command finishes an
    interrupted pipeline. Example: sfr pipeline configs/ek55/sf_arch2.toml --data DATA --runs runs
    """
    if (config_arg is None) == (config_opt is None):
        raise fail(
            "Give the fusion config once: sfr pipeline CONFIG or sfr pipeline --config CONFIG.",
            "Example: sfr pipeline --config configs/ek55/sf_arch2.toml --data DATA --runs runs",
        )
    config = config_arg if config_arg is not None else config_opt
    resolved = load_fusion_config(
        config,
        {
            "model.freeze_branches": freeze_branches,
            "run.device": device,
            "run.precision": precision,
            "data.num_workers": workers,
            "run.seed": seed,
            **{f"{section}.epochs": epochs for section in ("optim", "fusion_optim")},
            **{f"{section}.lr": lr for section in ("optim", "fusion_optim")},
            **{f"{section}.batch_size": batch_size for section in ("optim", "fusion_optim")},
        },
        set_,
    )
    run_and_report(
        resolved, data, runs, levels=None, branches=True, force=force,
        hint=f"Run the whole pipeline: sfr pipeline {config} --data {data} --runs {runs}",
    )  # fmt: skip
