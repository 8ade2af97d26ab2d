"""What `sfr fuse` and `sfr pipeline` share: loading a fusion config, running and rendering."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from sfr.cli.common import (
    PRELOAD_SET,
    TrainingView,
    console,
    distributed_run,
    pipeline_rows,
    results_table,
    step_line,
)
from sfr.config import Choice, FusionRunConfig, load_config, parse_override
from sfr.data.observation import position_label
from sfr.data.provenance import fill_recorded_dims
from sfr.files import check_folder_path
from sfr.train.fusion import FusionPlan
from sfr.train.pipeline import StepStarted, run_pipeline


def load_fusion_config(
    config: Path,
    named: dict[str, Any],
    set_: list[str] | None,
    chosen: Mapping[str, Choice] = {},
) -> FusionRunConfig:
    """The config file with `--set` overrides, then the named options, on top; `chosen` are the
    required arguments, which must agree with the file (`load_config`)."""
    overrides = dict(parse_override(item) for item in set_ or [])
    overrides.update({k: v for k, v in named.items() if v is not None})
    return load_config(FusionRunConfig, config, overrides, chosen=chosen)


def run_and_report(
    resolved: FusionRunConfig,
    data: Path,
    runs: Path,
    *,
    levels: Collection[int] | None,
    branches: bool,
    force: bool,
    hint: str,
) -> None:
    """Run the requested steps with progress bars, then print the side-by-side table."""
    check_folder_path(runs, "runs (--runs)")  # a file there is not "a stage not trained"
    resolved.data.feature_dims = fill_recorded_dims(
        resolved.data.feature_dims, data, resolved.model.modalities
    )
    with distributed_run(resolved.run.device, resolved.run.precision):
        plan = FusionPlan(resolved, runs)
        model = resolved.model
        task = resolved.data.task
        positions = ", ".join(position_label(t, task, unit=False) for t in resolved.fused_times)
        what = (
            f"early recognition at observed ratios {positions}"
            if task == "early_recognition"
            else f"fused anticipation times {positions} s"
        )
        console.print(
            f"[bold]{model.architecture}[/] over {', '.join(model.modalities)} at alpha "
            f"{', '.join(f'{a:g}' for a in model.alphas)}: {what}  →  {runs / resolved.fusion_dir}",
            highlight=False,
        )
        measure = f"{resolved.run.select}@{position_label(resolved.run.select_time, task)}"
        with TrainingView(measure=measure, forcing=PRELOAD_SET) as view:

            def show(event: object) -> None:
                if isinstance(event, StepStarted):
                    view.title = f"{event.step.stage} {event.step.label}"
                    view.bars.console.print(step_line(event), highlight=False)
                else:
                    view(event)

            result = run_pipeline(
                plan, data, levels=levels, branches=branches, force=force, progress=show, hint=hint
            )
        console.print(
            results_table(
                pipeline_rows(result),
                result.times,
                "Validation action accuracy (%), top-1/top-5 at the "
                + (
                    "observed ratios" if task == "early_recognition" else "fused anticipation times"
                ),
                f"best epochs chosen by {measure}; "
                "every time and measure per epoch: metrics.jsonl in each run folder",
                task,
            )
        )
