"""Branch stages: sequence-completion pre-training, then anticipation fine-tuning of one branch.

    RUNS/<dataset>/<modality>-a<alpha>-enc<S_enc>-ant<S_ant>/pretrain   (sfr train-branch)
    RUNS/<dataset>/<modality>-a<alpha>-enc<S_enc>-ant<S_ant>/finetune   (sfr finetune)

Fine-tuning starts from the pre-training's best weights, found by that convention.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sfr import distributed
from sfr.checkpoint import load_checkpoint
from sfr.config import BranchRunConfig, DataConfig, FusionRunConfig, OptimConfig
from sfr.data.annotations import (
    ActionsTable,
    Segment,
    check_action_ids,
    read_actions,
    read_class_weights,
    read_segments,
)
from sfr.data.dataset import AnticipationDataset, Stream, open_stores, preload_tables
from sfr.data.provenance import fill_recorded_dims
from sfr.errors import ConfigError, DataError, RunError
from sfr.files import missing_reason
from sfr.models.branch import RULSTMBranch, create_branch
from sfr.models.tree import branch_spec
from sfr.train.loop import FitResult, FitSettings, Progress, Trainer
from sfr.train.rundir import RunDir, holding_process

Stage = Literal["pretrain", "finetune"]
STAGES: tuple[Stage, ...] = ("pretrain", "finetune")


@dataclass
class BranchTask:
    """An RU-LSTM branch scored at the anticipation steps of its stream's time grid."""

    module: RULSTMBranch
    stream: Stream

    @property
    def steps(self) -> tuple[int, ...]:
        return self.stream.grid.anticipation_steps

    @property
    def times(self) -> tuple[float, ...]:
        return self.stream.grid.anticipation_times

    def scores(self, features: dict[str, Tensor]) -> Tensor:
        return self.module(features[self.stream.key], self.steps).scores


@dataclass(frozen=True)
class StageData:
    """Training and validation sets of a stage, and the actions table."""

    train: AnticipationDataset
    val: AnticipationDataset
    actions: ActionsTable
    num_classes: int


def branch_stream(config: BranchRunConfig) -> Stream:
    return Stream(config.branch.modality, config.grid)


def _checked_segments(path: Path, num_classes: int) -> list[Segment]:
    segments = read_segments(path)
    for segment in segments:
        if segment.action is None:
            raise DataError(
                f"{path}: segment {segment.id} has no labels; a labelled split is needed."
            )
    check_action_ids(segments, path, num_classes)
    return segments


def require_data_dir(data_dir: Path) -> Path:
    """The data folder, or a DataError if it does not exist."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"Data folder {data_dir} {missing_reason(data_dir, 'folder')}.",
            "Pass the folder with --data.",
        )
    return data_dir


def load_stage_data(
    data_config: DataConfig,
    data_dir: Path,
    streams: Sequence[Stream],
    progress: Callable[[int, int], None] | None = None,
    *,
    nothing_to_train: bool = False,
) -> StageData:
    """Read the actions table and the training/validation CSVs, open the streams' stores, and
    apply `data.preload` to both splits together (`preload_tables`: with "auto" both are
    preloaded or both streamed; each dataset's `preloading` says which and why).

    `nothing_to_train` (a finished run resumed with no more epochs) streams: a table read only
    to be dropped would cost minutes on EK100."""
    data_dir = require_data_dir(data_dir)
    actions = read_actions(data_dir / data_config.actions_csv)
    num_classes = data_config.num_classes or actions.num_actions
    if num_classes != actions.num_actions:
        raise ConfigError(
            f"data.num_classes is {num_classes} but {data_dir / data_config.actions_csv} lists "
            f"{actions.num_actions} actions.",
            "Remove data.num_classes (or override it: --set data.num_classes=N) or point "
            "data.actions_csv at the matching table.",
        )
    modalities = dict.fromkeys(stream.modality for stream in streams)
    stores = open_stores(data_dir, {m: data_config.feature_dim(m) for m in modalities})
    sets = []
    for split in ("training", "validation"):
        path = data_dir / data_config.csv_name(split)
        dataset = AnticipationDataset(
            _checked_segments(path, num_classes),
            streams,
            stores,
            sampling=data_config.sampling,
        )
        if len(dataset) == 0:
            longest = max(streams, key=lambda stream: stream.grid.alpha * stream.grid.steps)
            raise DataError(
                f"{path} has no usable segment: all {len(dataset.discarded)} start too early in "
                f"their video for the {longest.key} grid ({longest.grid.steps} steps).",
                "Check the CSV and the alpha / s_enc / s_ant settings.",
            )
        _ = dataset[0]  # a first read checks the stores' dimensions before any run folder
        sets.append(dataset)
    preload = False if nothing_to_train else data_config.preload
    preload_tables(sets, preload, progress, distributed.local_world_size())
    return StageData(sets[0], sets[1], actions, num_classes)


def load_branch_data(
    config: BranchRunConfig,
    data_dir: Path,
    progress: Callable[[int, int], None] | None = None,
    *,
    nothing_to_train: bool = False,
) -> StageData:
    """Training and validation sets of one branch (`load_stage_data`)."""
    return load_stage_data(
        config.data,
        data_dir,
        [branch_stream(config)],
        progress,
        nothing_to_train=nothing_to_train,
    )


def stage_dir(config: BranchRunConfig, runs_dir: Path, stage: Stage) -> RunDir:
    return RunDir(Path(runs_dir) / config.branch_dir / stage)


def branch_metadata(config: BranchRunConfig, stage: Stage, num_classes: int) -> dict[str, Any]:
    """What a branch checkpoint says about itself: enough to rebuild and place it."""
    return {
        "kind": "branch",
        "stage": stage,
        "config": config.model_dump(mode="json"),
        "model": branch_spec(config, num_classes),
    }


def best_weights(
    run: RunDir, expected: dict[str, Any], create_hint: str, resume_hint: str | None = None
) -> dict[str, Tensor]:
    """Best weights of a finished lower stage, refused if its saved model spec differs.

    Raises RunError when the stage is being trained by another process now (wait for it), has
    no checkpoint (`create_hint`), stopped before its last epoch (`resume_hint`, by default
    `create_hint`: a command that resumes it) or was trained with another model spec.
    """
    holder = run.holder()
    if holder is not None:
        process = holding_process(holder)
        raise RunError(
            f"The stage in {run.root} is being trained by {process} now: it has no final "
            "best weights yet.",
            f"Wait for {process} to finish, then run this command again.",
        )
    if not run.best_path.is_file():
        raise RunError(
            f"No checkpoint at {run.best_path}: that stage has not been trained.", create_hint
        )
    if not run.finished:
        raise RunError(
            f"The stage in {run.root} was interrupted before its last epoch.",
            resume_hint or f"{create_hint} (it resumes the interrupted run).",
        )
    tensors, meta = load_checkpoint(run.best_path)
    saved = meta.get("model")
    if saved != expected:
        raise RunError(
            f"The checkpoint {run.best_path} was trained with a different configuration: "
            f"{_spec_difference(saved, expected)}.",
            f"Retrain that stage with this config, adding --force to replace it: {create_hint}",
        )
    return tensors


def _spec_difference(saved: Any, expected: Any, path: str = "model") -> str:
    """The first place where two model specs differ, as `path: saved X, needed Y`."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        for key in sorted(set(saved) | set(expected)):
            if saved.get(key) != expected.get(key):
                return _spec_difference(saved.get(key), expected.get(key), f"{path}.{key}")
    if isinstance(saved, list) and isinstance(expected, list) and len(saved) == len(expected):
        for index, (a, b) in enumerate(zip(saved, expected)):
            if a != b:
                return _spec_difference(a, b, f"{path}[{index}]")
    return f"{path}: saved {json.dumps(saved)}, needed {json.dumps(expected)}"


def fit_settings(
    config: BranchRunConfig | FusionRunConfig,
    optim: OptimConfig,
    class_weights: Sequence[float] | None = None,
) -> FitSettings:
    """Trainer settings from a config's run/data sections and the stage's optimiser section."""
    return FitSettings(
        epochs=optim.epochs,
        batch_size=optim.batch_size,
        lr=optim.lr,
        momentum=optim.momentum,
        weight_decay=optim.weight_decay,
        seed=config.run.seed,
        select=config.run.select,
        select_time=config.run.select_time,
        num_workers=config.data.num_workers,
        device=config.run.device,
        class_weights=None if class_weights is None else tuple(class_weights),
        precision=config.run.precision,
    )


def stage_class_weights(optim: OptimConfig, data_dir: Path, num_classes: int) -> list[float] | None:
    """The loss weights `optim.class_weights` names (relative to the data folder), or None."""
    if optim.class_weights is None:
        return None
    path = Path(optim.class_weights)
    return read_class_weights(path if path.is_absolute() else Path(data_dir) / path, num_classes)


# What torch's CPU allocator says when malloc fails (DefaultCPUAllocator); devices raise OOM types.
_CPU_ALLOCATION_FAILURE = "can't allocate memory"
_OUT_OF_MEMORY = tuple(
    kind
    for kind in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError)
    if isinstance(kind, type)
)


def is_allocation_failure(error: BaseException) -> bool:
    """Whether `error` is torch failing to allocate memory (host or device)."""
    return isinstance(error, _OUT_OF_MEMORY) or (
        isinstance(error, RuntimeError) and _CPU_ALLOCATION_FAILURE in str(error)
    )


def model_size(build: Callable[[], nn.Module]) -> str:
    """`N parameters, B GB of fp32 weights` of the model `build` makes, counted by building it on
    the meta device (which allocates no memory); "size unknown" if that fails."""
    try:
        with torch.device("meta"):
            count = sum(parameter.numel() for parameter in build().parameters())
    except Exception:  # only the message depends on it
        return "size unknown"
    return f"{count:,} parameters, {count * 4 / 1e9:.2f} GB of fp32 weights"


@contextmanager
def allocation_failures(build: Callable[[], nn.Module], settings: str) -> Iterator[None]:
    """Turn torch's allocation failures (`is_allocation_failure`) inside the block, building or
    training the model that `build` makes, into a RunError naming the model's size and the
    config fields that set it (`settings`, e.g. "branch.hidden (--hidden, now 16384)")."""
    try:
        yield
    except RuntimeError as error:
        if not is_allocation_failure(error):
            raise
        reason = " ".join(str(error).split()) or type(error).__name__
        start = reason.find("DefaultCPUAllocator")  # after the C++ source location
        reason = reason[max(start, 0) :][:300]
        raise RunError(
            f"Out of memory building or training the model ({model_size(build)}; training needs "
            f"about 3 times that for gradients and momentum, plus a batch's activations): {reason}",
            f"Choose a smaller {settings} or batch size (--batch-size), or a device with more "
            "memory.",
        ) from None


def train_branch_stage(
    config: BranchRunConfig,
    stage: Stage,
    data_dir: Path,
    runs_dir: Path,
    *,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    data: StageData | None = None,
    source: str | None = None,
) -> FitResult:
    """Run one stage of one branch in its run directory and return its best result.

    `data` may be passed to share loaded datasets between stages; `source` names the config
    file in hints.
    """
    config.data.feature_dims = fill_recorded_dims(
        config.data.feature_dims, data_dir, [config.branch.modality]
    )
    run = stage_dir(config, runs_dir, stage)
    distributed.on_main(run.check_free)  # another process training there: before loading data
    done = resume and run.trained_to(config.optim.epochs)
    data = data or load_branch_data(config, data_dir, nothing_to_train=done)
    class_weights = stage_class_weights(config.optim, data_dir, data.num_classes)
    init = None
    if stage == "finetune" and not (resume and run.last_path.is_file()):
        command = f"sfr train-branch --config {source or 'CONFIG.toml'} --data {data_dir} --runs {runs_dir}"
        init = best_weights(
            stage_dir(config, runs_dir, "pretrain"),
            branch_metadata(config, "pretrain", data.num_classes)["model"],
            f"Create it first with the same config and overrides as this command: {command} ...",
            f"Finish it first with the same config and overrides as this command: {command} "
            "... --resume",
        )

    def build() -> RULSTMBranch:
        return create_branch(
            feat_dim=config.data.feature_dim(config.branch.modality),
            hidden=config.branch.hidden,
            num_classes=data.num_classes,
            dropout=config.branch.dropout,
            sequence_completion=stage == "pretrain",
            shared_dropout_mask=config.branch.shared_dropout_mask,
        )

    with (
        run.held(),
        allocation_failures(build, f"branch.hidden (--hidden, now {config.branch.hidden})"),
    ):
        torch.manual_seed(config.run.seed)  # initial weights and dropout masks follow run.seed
        branch = build()  # before the run folder is written: a model too big leaves nothing
        resuming = distributed.on_main(
            lambda: run.prepare(config.model_dump(mode="json"), force=force, resume=resume)
        )
        if init is not None and not resuming:
            branch.load_state_dict(init)
        settings = fit_settings(config, config.optim, class_weights)
        task = BranchTask(branch, branch_stream(config))
        trainer = Trainer(
            task,
            data.train,
            data.val,
            run,
            settings,
            branch_metadata(config, stage, data.num_classes),
            progress,
        )
        return trainer.fit(resuming)
