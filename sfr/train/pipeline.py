"""The whole method in order: every branch's two stages, then every fusion level.

Finished stages are skipped (their best checkpoint reports their measures), interrupted ones
resumed, so running the same pipeline again after an interruption finishes it without redoing
anything. `levels` and `branches` restrict it to part of the work (`sfr fuse --stage`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sfr import distributed
from sfr.checkpoint import read_metadata
from sfr.data.dataset import open_stores
from sfr.errors import RunError
from sfr.train.fusion import FusionPlan, train_fusion_unit
from sfr.train.loop import FitResult, ProgressEvent, time_key
from sfr.train.rundir import UNFINISHED, RunDir, config_differences
from sfr.train.stages import (
    STAGES,
    StageData,
    load_branch_data,
    require_data_dir,
    stage_dir,
    train_branch_stage,
)


@dataclass(frozen=True)
class PipelineStep:
    """One stage of the pipeline: a branch stage (level 0) or a fusion unit (level ≥ 1)."""

    label: str
    stage: str  # "pretrain", "finetune" or "fusion"
    level: int
    run: RunDir


@dataclass(frozen=True)
class StepStarted:
    """A step is about to run (`action` "train" or "resume") or is skipped as finished."""

    index: int
    total: int
    step: PipelineStep
    action: Literal["train", "resume", "skip"]


@dataclass
class PipelineResult:
    """Best validation measures of every step, keyed by (label, stage)."""

    times: tuple[float, ...]
    results: dict[tuple[str, str], FitResult] = field(default_factory=dict)
    steps: list[PipelineStep] = field(default_factory=list)


def pipeline_steps(
    plan: FusionPlan, levels: Collection[int] | None = None, branches: bool = True
) -> list[PipelineStep]:
    """Steps in training order (branches by rate then modality, then fusion units bottom-up)."""
    steps: list[PipelineStep] = []
    if branches:
        for label, (modality, rate) in plan.branch_rates.items():
            config = plan.config.branch_config(modality, rate)
            for stage in STAGES:
                steps.append(PipelineStep(label, stage, 0, stage_dir(config, plan.runs_dir, stage)))
    for unit in plan.units:
        if levels is None or unit.level in levels:
            steps.append(PipelineStep(unit.label, "fusion", unit.level, plan.unit_dir(unit)))
    return steps


def finished_result(run: RunDir) -> FitResult:
    """The best result of a finished stage, read back from its best checkpoint."""
    meta = read_metadata(run.best_path)
    selection = meta["selection"]
    metrics = meta.get("metrics") or {}
    return FitResult(
        str(run.root),
        meta["epoch"] - 1,  # FitResult counts from 0, checkpoints from 1
        # a converted part of a published whole model records no measure of its own
        metrics.get(time_key(selection["measure"], selection["time"]), float("nan")),
        metrics,
    )


def step_config(step: PipelineStep, plan: FusionPlan) -> dict[str, Any]:
    """The resolved config a step runs with (a branch's own config for branch stages)."""
    if step.level == 0:
        modality, rate = plan.branch_rates[step.label]
        return plan.config.branch_config(modality, rate).model_dump(mode="json")
    return plan.config.model_dump(mode="json")


def step_differences(
    step: PipelineStep, plan: FusionPlan, saved: dict[str, Any], current: dict[str, Any]
) -> list[str]:
    """The config fields that differ and concern the step's model: a branch stage's own config
    (`config_differences`), a fusion unit's own fields (`FusionPlan.unit_differences`)."""
    if step.level == 0:
        return config_differences(saved, current)
    return plan.unit_differences(plan.by_label[step.label], saved, current)


def _same_run(step: PipelineStep, plan: FusionPlan) -> bool:
    """Whether a finished step was trained with this config (True) or only fewer epochs (False).

    A finished step trained with another config is refused, naming the differing fields.
    """
    saved = step.run.saved_config() or {}
    current = step_config(step, plan)
    changed = step_differences(step, plan, saved, current)
    if changed:
        raise RunError(
            f"The finished stage in {step.run.root} was trained with another config: it "
            f"differs in {', '.join(changed)}.",
            "Pass --force to retrain, or use another --runs folder (or run.name) for this config.",
        )
    epochs = "optim" if step.level == 0 else "fusion_optim"
    return saved.get(epochs, {}).get("epochs") == current[epochs]["epochs"]


def check_existing_steps(steps: list[PipelineStep], plan: FusionPlan) -> None:
    """Refuse before any training when a finished or interrupted step holds another config.

    Only the fields its model depends on are compared (`config_differences`); a step that
    stopped before its first checkpoint holds nothing to keep and is started again.
    """
    for step in steps:
        state = step.run.status()["state"]
        if state == "empty" or (state in UNFINISHED and not step.run.last_path.is_file()):
            continue
        current = step_config(step, plan)
        changed = step_differences(step, plan, step.run.saved_config() or {}, current)
        if changed and state in UNFINISHED:
            raise RunError(
                f"Cannot resume {step.run.root}: its saved config differs in {', '.join(changed)}.",
                "Resume with the same settings, or pass --force to start over.",
            )
        if changed:
            raise RunError(
                f"The finished stage in {step.run.root} was trained with another config: it "
                f"differs in {', '.join(changed)}.",
                "Pass --force to retrain, or use another --runs folder (or run.name) for this "
                "config.",
            )
        section = "optim" if step.level == 0 else "fusion_optim"
        step.run.check_epochs(current[section]["epochs"], f"{section}.epochs")


def _finetuned(pretrain: PipelineStep, steps: list[PipelineStep], plan: FusionPlan) -> bool:
    """Whether a branch's fine-tuning is already finished (then its pre-training is not needed,
    e.g. for a converted published branch)."""
    finetune = next(s for s in steps if s.label == pretrain.label and s.stage == "finetune")
    return finetune.run.status()["state"] == "finished" and _same_run(finetune, plan)


def run_pipeline(
    plan: FusionPlan,
    data_dir: Path,
    *,
    levels: Collection[int] | None = None,
    branches: bool = True,
    force: bool = False,
    progress: Callable[[StepStarted | ProgressEvent], None] | None = None,
    hint: str = "Run the whole pipeline first (`sfr pipeline`).",
) -> PipelineResult:
    """Run (or skip, or resume) every step; `force` retrains finished steps from scratch."""
    report = progress or (lambda event: None)
    data_config = plan.config.data
    stores = {m: data_config.feature_dim(m) for m in plan.config.model.modalities}
    open_stores(require_data_dir(data_dir), stores)  # every store exists before any training
    steps = pipeline_steps(plan, levels, branches)
    distributed.on_main(lambda: [step.run.check_free() for step in steps])  # before any training
    if not force:
        check_existing_steps(steps, plan)  # up front, not after hours of other training
    result = PipelineResult(plan.config.fused_times, steps=steps)
    branch_data: dict[str, StageData] = {}
    for index, step in enumerate(steps, start=1):
        state = step.run.status()["state"]
        pretrain_unneeded = step.stage == "pretrain" and state != "finished"
        if pretrain_unneeded and not force and _finetuned(step, steps, plan):
            report(StepStarted(index, len(steps), step, "skip"))
            continue
        if state == "finished" and not force and _same_run(step, plan):
            report(StepStarted(index, len(steps), step, "skip"))
            result.results[(step.label, step.stage)] = finished_result(step.run)
            continue
        resume = state != "empty" and not force
        report(StepStarted(index, len(steps), step, "resume" if resume else "train"))
        if step.level == 0:
            modality, rate = plan.branch_rates[step.label]
            config = plan.config.branch_config(modality, rate)
            if step.label not in branch_data:
                branch_data[step.label] = load_branch_data(config, data_dir)
            fit = train_branch_stage(
                config, step.stage, data_dir, plan.runs_dir, force=force, resume=resume,
                progress=report, data=branch_data[step.label],
            )  # fmt: skip
        else:
            unit = plan.by_label[step.label]
            fit = train_fusion_unit(
                plan, unit, data_dir, force=force, resume=resume, progress=report, hint=hint,
            )  # fmt: skip
        result.results[(step.label, step.stage)] = fit
    return result
