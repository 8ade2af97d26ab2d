"""`sfr demo`: the whole method on embedded synthetic data, ending with a side-by-side table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from sfr.cli.common import (
    TrainingView,
    console,
    force_option,
    pipeline_rows,
    results_table,
    step_line,
    training_errors,
)
from sfr.train.demo import (
    DemoDataReady,
    DemoEvent,
    DemoPlan,
    DemoResult,
    demo_config,
    run_demo,
)
from sfr.train.pipeline import StepStarted


def demo_table(result: DemoResult) -> Table:
    """Every branch, every fusion level and the final model at every fused anticipation time."""
    return results_table(
        pipeline_rows(result.pipeline),
        result.pipeline.times,
        f"Validation action accuracy (%), top-1/top-5, {result.num_classes} classes",
        f"top-5 by chance {100 * 5 / result.num_classes:.1f}%, "
        f"by the 5 most frequent actions {result.prior_top5:.1f}%",
    )


def headline(result: DemoResult) -> str:
    """The final fusion against the best single branch at 1 s (or the latest fused time)."""
    times = result.pipeline.times
    seconds = 1.0 if 1.0 in times else times[-1]
    key = f"top5@{seconds:g}"
    rows = pipeline_rows(result.pipeline)
    branches = [(name, fit) for name, fit in rows if not name.startswith("L")]
    best_name, best = max(branches, key=lambda row: row[1].metrics[key])
    final_name, final = rows[-1]
    return (
        f"At τ = {seconds:g} s the final fusion {final_name} reaches {final.metrics[key]:.1f}% "
        f"top-5; the best single branch, {best_name}, {best.metrics[key]:.1f}%."
    )


@training_errors
def demo(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the synthetic data and runs.")
    ] = Path("sfr-demo"),
    force: Annotated[
        bool,
        force_option("Replace an earlier demo in --out: new data, every stage trained again"),
    ] = False,
) -> None:
    """Generate synthetic data, train every branch and both fusion levels, print the results.

    Run again on the same --out, it continues: finished stages are skipped and interrupted ones
    resumed, so an interrupted demo finishes without redoing work.
    """
    plan = DemoPlan()
    torch.set_num_threads(plan.threads)
    began = time.perf_counter()
    run = demo_config(plan).run
    with TrainingView(measure=f"{run.select}@{run.select_time:g}s", forcing=None) as view:

        def show(event: DemoEvent) -> None:
            if isinstance(event, DemoDataReady):
                s = event.summary
                view.bars.console.print(
                    f"Synthetic data in the public EK55 format: {s.path} "
                    f"({s.rows['training']} training / {s.rows['validation']} validation segments, "
                    f"{s.num_actions} actions)",
                    highlight=False,
                )
                if event.continued:
                    view.bars.console.print(
                        f"Continuing the demo in {out}: finished stages are skipped, interrupted "
                        "ones resumed (--force starts over).",
                        highlight=False,
                    )
            elif isinstance(event, StepStarted):
                view.bars.console.print(step_line(event), highlight=False)
            else:
                view(event)

        result = run_demo(out, plan, force=force, progress=show)
    console.print(demo_table(result))
    console.print(headline(result), highlight=False)
    console.print(
        f"Done in {time.perf_counter() - began:.0f} s. Runs (metrics.jsonl, safetensors "
        f"checkpoints) are in {result.runs_dir}.",
        highlight=False,
    )
