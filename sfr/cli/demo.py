"""`sfr demo`: the whole branch pipeline on embedded synthetic data, ending with a results table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from sfr.cli.common import TrainingView, console, user_errors
from sfr.train.demo import DemoDataReady, DemoEvent, DemoPlan, DemoResult, DemoStep, run_demo


def results_table(result: DemoResult, plan: DemoPlan) -> Table:
    """Fine-tuned branches × anticipation times common to all of them, top-1 / top-5 action %."""
    branch_times = [set(f"{a * k:g}" for k in range(1, s_ant + 1)) for a, _, s_ant in plan.rates]
    times = sorted(set.intersection(*branch_times), key=float, reverse=True)
    table = Table(
        title=f"Validation action accuracy (%), top-1 / top-5, {result.num_classes} classes",
        title_justify="left",
        caption=f"top-5 by chance {100 * 5 / result.num_classes:.1f}%, "
        f"by the 5 most frequent actions {result.prior_top5:.1f}%",
        caption_justify="left",
    )
    table.add_column("branch (fine-tuned)", no_wrap=True)
    for seconds in times:
        table.add_column(f"τ={seconds}s", justify="right", no_wrap=True)
    for (branch, stage), fit in result.results.items():
        if stage == "finetune":
            table.add_row(
                branch,
                *(f"{fit.metrics[f'top1@{t}']:.1f}/{fit.metrics[f'top5@{t}']:.1f}" for t in times),
            )
    return table


@user_errors
def demo(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the synthetic data and runs.")
    ] = Path("sfr-demo"),
) -> None:
    """Generate synthetic data, pre-train and fine-tune every branch, print the results."""
    plan = DemoPlan()
    torch.set_num_threads(plan.threads)
    began = time.perf_counter()
    with TrainingView() as view:

        def show(event: DemoEvent) -> None:
            if isinstance(event, DemoDataReady):
                s = event.summary
                view.bars.console.print(
                    f"Synthetic data in the public EK55 format: {s.path} "
                    f"({s.rows['training']} training / {s.rows['validation']} validation segments, "
                    f"{s.num_actions} actions)",
                    highlight=False,
                )
            elif isinstance(event, DemoStep):
                view.title = f"[{event.index}/{event.total}] {event.stage} {event.branch}"
                view.bars.console.print(f"[bold]{view.title}[/]", highlight=False)
            else:
                view(event)

        result = run_demo(out, plan, progress=show)
    console.print(results_table(result, plan))
    console.print(
        f"Done in {time.perf_counter() - began:.0f} s. Runs (metrics.jsonl, safetensors "
        f"checkpoints) are in {result.runs_dir}.",
        highlight=False,
    )
