"""`sfr demo`: synthetic data in the public format, then the whole Architecture 2 pipeline.

The embedded default trains rgb, flow and obj branches at the published slow-fast rates
(alpha 0.125 with 24 + 16 steps, fed 12 + 16 at fusion, and alpha 0.5 with 6 + 4) at a small
hidden size — each pre-trained by sequence completion, then fine-tuned — then the modality
attention of each rate, then the slow-fast attention over both rates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sfr.config import MODALITIES, FusionRunConfig, build_config
from sfr.data.annotations import read_segments
from sfr.data.synthetic import (
    SyntheticSpec,
    SyntheticSummary,
    read_synthetic,
    remove_stale_builds,
    spec_record,
    write_synthetic,
)
from sfr.errors import DataError
from sfr.files import check_folder_path, existing_output, remove_owned
from sfr.train.fusion import FusionPlan
from sfr.train.loop import ProgressEvent
from sfr.train.pipeline import PipelineResult, StepStarted, run_pipeline
from sfr.train.rundir import RUN_FILES, RunInUseError


@dataclass(frozen=True)
class DemoPlan:
    """What the demo generates and trains (small enough for 2 CPU cores in a few minutes)."""

    spec: SyntheticSpec = field(default_factory=SyntheticSpec)
    architecture: str = "arch2"
    # (alpha, S_enc, S_ant, S_enc fed by the fusion stages)
    rates: tuple[tuple[float, int, int, int], ...] = ((0.125, 24, 16, 12), (0.5, 6, 4, 6))
    modalities: tuple[str, ...] = MODALITIES
    hidden: int = 64
    dropout: float = 0.5
    branch_epochs: int = 8
    fusion_epochs: int = 6
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    threads: int = 1  # small matrices: one thread is as fast and robust to a busy machine


@dataclass(frozen=True)
class DemoDataReady:
    """The demo's data is in place: written now, or kept from an earlier run it `continued`."""

    summary: SyntheticSummary
    continued: bool = False


@dataclass
class DemoResult:
    """Where everything went, the baselines, and every stage's best validation measures."""

    data_dir: Path
    runs_dir: Path
    num_classes: int
    prior_top5: float  # % of validation hit by the 5 most frequent training actions
    pipeline: PipelineResult


DemoEvent = DemoDataReady | StepStarted | ProgressEvent


def demo_config(plan: DemoPlan) -> FusionRunConfig:
    """The pipeline config of the demo plan."""
    dims = dict(zip(MODALITIES, plan.spec.dims, strict=True))
    optim = {"lr": plan.lr, "batch_size": plan.batch_size}
    return build_config(
        FusionRunConfig,
        {
            "data": {"name": "synthetic", "feature_dims": dims, "preload": True},
            "model": {
                "architecture": plan.architecture,
                "modalities": list(plan.modalities),
                "rates": [
                    {"alpha": a, "s_enc": e, "s_ant": s, "fusion_s_enc": f}
                    for a, e, s, f in plan.rates
                ],
                "hidden": plan.hidden,
                "branch_dropout": plan.dropout,
                "modality_dropout": plan.dropout,
                "rate_dropout": plan.dropout,
            },
            "optim": {**optim, "epochs": plan.branch_epochs},
            "fusion_optim": {**optim, "epochs": plan.fusion_epochs},
            "run": {"seed": plan.seed, "device": "cpu"},
        },
        source="demo plan",
    )


def frequency_prior_top5(data_dir: Path) -> float:
    """Top-5 accuracy (%) on validation of always guessing the 5 most frequent training actions."""
    train = [s.action for s in read_segments(data_dir / "training.csv")]
    val = [s.action for s in read_segments(data_dir / "validation.csv")]
    frequent = {action for action, _ in Counter(train).most_common(5)}
    return 100 * sum(action in frequent for action in val) / len(val)


def run_demo(
    out: Path,
    plan: DemoPlan = DemoPlan(),
    *,
    force: bool = False,
    progress: Callable[[DemoEvent], None] | None = None,
) -> DemoResult:
    """Generate the synthetic data under `out/data` and run the pipeline under `out/runs`.

    Run again on its folder, a demo continues as `sfr pipeline` does (`run_pipeline`): its data
    is kept, finished stages are skipped and interrupted ones resumed, so an interrupted demo
    finishes without redoing work (a finished one only reports its results again). `force`
    starts over: new data, every stage retrained (sfr's one overwrite rule: only what sfr wrote
    is deleted). `out` must be empty, absent or a demo folder (DataError otherwise); an earlier
    demo whose data was made by another spec is replaced only with `force` (RunError).
    """
    report = progress or (lambda event: None)
    out = check_folder_path(Path(out), "demo (--out)")
    data_dir, runs_dir = out / "data", out / "runs"
    remove_stale_builds(data_dir)  # a demo killed while writing its data left its build folder
    earlier = (data_dir / "synthetic_meta.json").is_file()
    if out.exists() and any(out.iterdir()) and not earlier:
        raise DataError(
            f"{out} is not empty and is not an earlier sfr demo folder.",
            "Choose another folder with --out.",
        )
    if earlier and not force:
        summary, spec = read_synthetic(data_dir)
        if spec != spec_record(plan.spec):
            raise existing_output(
                out,
                "demo folder",
                "a demo made with other data settings",
                "Pass --force to generate and train it again from scratch (sfr deletes only "
                "what it wrote), or choose another --out.",
            )
    else:
        summary = write_synthetic(data_dir, plan.spec, force=True)
        # the runs of an earlier demo, whatever its plan: only the files sfr wrote in run folders
        remove_owned(
            runs_dir, lambda relative: len(relative.parts) > 1 and relative.name in RUN_FILES
        )
    report(DemoDataReady(summary, continued=earlier and not force))
    fusion_plan = FusionPlan(demo_config(plan), runs_dir)
    try:
        pipeline = run_pipeline(fusion_plan, data_dir, force=force, progress=report)
    except RunInUseError as error:  # a demo has no --runs or run.name: another --out
        raise error.elsewhere("another --out folder") from None
    return DemoResult(
        data_dir, runs_dir, summary.num_actions, frequency_prior_top5(data_dir), pipeline
    )
