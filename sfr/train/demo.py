"""`sfr demo`: synthetic data in the public format, then every branch trained in both stages.

The embedded default trains rgb, flow and obj branches at the published slow-fast rates
(alpha 0.125 with 24 + 16 steps and alpha 0.5 with 6 + 4) at a small hidden size, each first
pre-trained by sequence completion and then fine-tuned for anticipation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sfr.config import MODALITIES, BranchRunConfig, build_config
from sfr.data.annotations import read_segments
from sfr.data.synthetic import SyntheticSpec, SyntheticSummary, write_synthetic
from sfr.errors import DataError
from sfr.train.loop import FitResult, ProgressEvent
from sfr.train.stages import STAGES, Stage, load_branch_data, train_branch_stage


@dataclass(frozen=True)
class DemoPlan:
    """What the demo generates and trains (small enough for 2 CPU cores in a few minutes)."""

    spec: SyntheticSpec = field(default_factory=SyntheticSpec)
    rates: tuple[tuple[float, int, int], ...] = ((0.125, 24, 16), (0.5, 6, 4))
    modalities: tuple[str, ...] = MODALITIES
    hidden: int = 64
    dropout: float = 0.5
    pretrain_epochs: int = 4
    finetune_epochs: int = 10
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    threads: int = 1  # small matrices: one thread is as fast and robust to a busy machine


@dataclass(frozen=True)
class DemoStep:
    """A stage of one branch is about to start (index counts from 1)."""

    index: int
    total: int
    branch: str
    stage: Stage


@dataclass(frozen=True)
class DemoDataReady:
    summary: SyntheticSummary


@dataclass
class DemoResult:
    """Where everything went and the best validation measures of every branch and stage."""

    data_dir: Path
    runs_dir: Path
    num_classes: int
    prior_top5: float  # % of validation hit by the 5 most frequent training actions
    results: dict[tuple[str, Stage], FitResult] = field(default_factory=dict)


DemoEvent = DemoStep | DemoDataReady | ProgressEvent


def demo_configs(plan: DemoPlan) -> list[BranchRunConfig]:
    """One branch config per (modality, rate) of the plan."""
    dims = dict(zip(MODALITIES, plan.spec.dims, strict=True))
    return [
        build_config(
            BranchRunConfig,
            {
                "data": {"name": "synthetic", "feature_dims": dims, "preload": True},
                "branch": {
                    "modality": modality,
                    "alpha": alpha,
                    "s_enc": s_enc,
                    "s_ant": s_ant,
                    "hidden": plan.hidden,
                    "dropout": plan.dropout,
                },
                "optim": {"lr": plan.lr, "batch_size": plan.batch_size, "epochs": 1},
                "run": {"seed": plan.seed, "device": "cpu"},
            },
            source="demo plan",
        )
        for alpha, s_enc, s_ant in plan.rates
        for modality in plan.modalities
    ]


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
    progress: Callable[[DemoEvent], None] | None = None,
) -> DemoResult:
    """Generate the synthetic data under `out/data` and train every branch under `out/runs`.

    `out` must be empty, absent, or an earlier demo folder (which is replaced).
    """
    report = progress or (lambda event: None)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, not a folder.", "Choose a folder with --out.")
    if out.exists() and any(out.iterdir()) and not (out / "data" / "synthetic_meta.json").is_file():
        raise DataError(
            f"{out} is not empty and is not an earlier sfr demo folder.",
            "Choose another folder with --out.",
        )
    data_dir, runs_dir = out / "data", out / "runs"
    summary = write_synthetic(data_dir, plan.spec, force=True)
    report(DemoDataReady(summary))
    configs = demo_configs(plan)
    result = DemoResult(data_dir, runs_dir, summary.num_actions, frequency_prior_top5(data_dir))
    total = len(configs) * len(STAGES)
    index = 0
    for config in configs:
        data = load_branch_data(config, data_dir)
        for stage in STAGES:
            index += 1
            epochs = plan.pretrain_epochs if stage == "pretrain" else plan.finetune_epochs
            staged = config.model_copy(
                update={"optim": config.optim.model_copy(update={"epochs": epochs})}
            )
            report(DemoStep(index, total, config.branch.slug, stage))
            result.results[(config.branch.slug, stage)] = train_branch_stage(
                staged,
                stage,
                data_dir,
                runs_dir,
                force=True,
                progress=report,
                data=data,
                source="(demo)",
            )
    return result
