"""The command shared by `sfr train-branch` and `sfr finetune`: one stage of one branch.

Every config field can be overridden: the common ones by name (`--alpha 0.125 --s-enc 24`),
any other with `--set section.field=value`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from sfr.cli.common import (
    TrainingView,
    console,
    device_option,
    distributed_run,
    fail,
    force_option,
    handles_user_errors,
    precision_option,
    stage_table,
)
from sfr.config import BranchRunConfig, load_config, parse_override
from sfr.data.observation import position_label
from sfr.errors import counted
from sfr.train.stages import Stage, train_branch_stage

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="TOML config file (configs/...).")]
DataOpt = Annotated[
    Path,
    typer.Option("--data", "-d", help="Data folder: annotation CSVs and rgb/flow/obj LMDB stores."),
]
RunsOpt = Annotated[Path, typer.Option("--runs", help="Runs folder: holds the run directories.")]
ForceOpt = Annotated[bool, force_option("Replace a finished or interrupted run and start over")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue an interrupted (or extend a finished) run.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config field: section.field=value (repeatable)."),
]
DataGroup, BranchGroup, OptimGroup, RunGroup = "Data", "Branch", "Optimisation", "Run"
WorkersOpt = typer.Option(
    "--workers",
    "--num-workers",
    min=0,
    help="Worker processes reading the data (DataLoader; each opens its own LMDB handles). "
    "Not used for a preloaded table (data.preload): its batches are gathered in the training "
    "process.",
    rich_help_panel=DataGroup,
)
PrecisionOpt = precision_option(
    "fp32, or bf16/fp16 mixed precision (CUDA only).", rich_help_panel=RunGroup
)
DeviceOpt = device_option(rich_help_panel=RunGroup)


def _opt(flag: str, help: str, group: str) -> Any:
    return typer.Option(flag, help=help, rich_help_panel=group)


def make_branch_command(stage: Stage, doc: str) -> Callable[..., None]:
    """Build the Typer command that runs `stage` of one branch."""

    def command(
        config: ConfigOpt,
        data: DataOpt,
        runs: RunsOpt = Path("runs"),
        force: ForceOpt = False,
        resume: ResumeOpt = False,
        dataset: Annotated[
            str | None, _opt("--dataset", "ek55, ek100 or egtea.", DataGroup)
        ] = None,
        split: Annotated[
            int | None,
            _opt(
                "--split",
                "EGTEA split number (1-3): training{N}.csv, validation{N}.csv.",
                DataGroup,
            ),
        ] = None,
        fps: Annotated[
            float | None, _opt("--fps", "Frame rate of the CSV frame numbers.", DataGroup)
        ] = None,
        preload: Annotated[
            bool | None,
            _opt(
                "--preload/--no-preload",
                "Read every feature vector the splits need into memory first (refused if it "
                "would not fit), batches then gathered in the training process without "
                "--workers; or read them from the LMDB stores as training goes. Default "
                '(data.preload = "auto"): preload where it takes at most half the available '
                "memory.",
                DataGroup,
            ),
        ] = None,
        num_workers: Annotated[int | None, WorkersOpt] = None,
        modality: Annotated[
            str | None, _opt("--modality", "rgb, flow or obj.", BranchGroup)
        ] = None,
        alpha: Annotated[
            float | None, _opt("--alpha", "Seconds between steps.", BranchGroup)
        ] = None,
        s_enc: Annotated[int | None, _opt("--s-enc", "Encoding steps.", BranchGroup)] = None,
        s_ant: Annotated[int | None, _opt("--s-ant", "Anticipation steps.", BranchGroup)] = None,
        hidden: Annotated[int | None, _opt("--hidden", "LSTM hidden size.", BranchGroup)] = None,
        dropout: Annotated[float | None, _opt("--dropout", "Dropout rate.", BranchGroup)] = None,
        epochs: Annotated[int | None, _opt("--epochs", "Training epochs.", OptimGroup)] = None,
        batch_size: Annotated[int | None, _opt("--batch-size", "Batch size.", OptimGroup)] = None,
        lr: Annotated[float | None, _opt("--lr", "SGD learning rate.", OptimGroup)] = None,
        momentum: Annotated[float | None, _opt("--momentum", "SGD momentum.", OptimGroup)] = None,
        weight_decay: Annotated[
            float | None, _opt("--weight-decay", "L2 penalty.", OptimGroup)
        ] = None,
        seed: Annotated[int | None, _opt("--seed", "Random seed.", RunGroup)] = None,
        device: Annotated[str | None, DeviceOpt] = None,
        precision: Annotated[str | None, PrecisionOpt] = None,
        select: Annotated[
            str | None,
            _opt(
                "--select",
                "Best epoch by top5 (accuracy), mt5r (mean recall) or top1 (early recognition).",
                RunGroup,
            ),
        ] = None,
        select_time: Annotated[
            float | None,
            _opt(
                "--select-time",
                "Anticipation time (s) of the selection; early recognition: observed ratio.",
                RunGroup,
            ),
        ] = None,
        name: Annotated[
            str | None, _opt("--name", "Run folder name (default from the branch).", RunGroup)
        ] = None,
        set_: SetOpt = None,
    ) -> None:
        if force and resume:
            raise fail("--force and --resume exclude each other.", "Pass one of them.")
        named = {
            "data.dataset": dataset, "data.split": split, "data.fps": fps, "data.preload": preload,
            "data.num_workers": num_workers, "branch.modality": modality, "branch.alpha": alpha,
            "branch.s_enc": s_enc, "branch.s_ant": s_ant, "branch.hidden": hidden,
            "branch.dropout": dropout, "optim.epochs": epochs, "optim.batch_size": batch_size,
            "optim.lr": lr, "optim.momentum": momentum, "optim.weight_decay": weight_decay,
            "run.seed": seed, "run.device": device, "run.precision": precision, "run.select": select,
            "run.select_time": select_time, "run.name": name,
        }  # fmt: skip
        overrides = dict(parse_override(item) for item in set_ or [])
        overrides.update({k: v for k, v in named.items() if v is not None})
        resolved = load_config(BranchRunConfig, config, overrides)
        grid = resolved.grid
        task = resolved.data.task
        title = f"{stage} {resolved.branch.slug}"
        what = (
            f"{counted(grid.steps, 'frame')} spread over the action (early recognition)"
            if task == "early_recognition"
            else f"T = {counted(grid.steps, 'step')} of {grid.alpha:g} s"
        )
        measure = f"{resolved.run.select}@{position_label(resolved.run.select_time, task)}"
        with distributed_run(resolved.run.device, resolved.run.precision):
            console.print(
                f"[bold]{title}[/]  {what}  →  {runs / resolved.branch_dir / stage}",
                highlight=False,
            )
            with TrainingView(title, measure) as view:
                result = train_branch_stage(
                    resolved,
                    stage,
                    data,
                    runs,
                    force=force,
                    resume=resume,
                    progress=view,
                    source=str(config),
                )
            console.print(
                stage_table(
                    result,
                    grid.anticipation_times,
                    f"Validation, best epoch {result.best_epoch + 1} "
                    f"({measure} = {result.best:.2f})",
                    task,
                )
            )

    command.__doc__ = doc
    return handles_user_errors(
        "Checkpoints are written atomically: run the same command with --resume to continue.",
        multiprocess=True,
    )(command)
