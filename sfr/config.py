"""Typed configuration: pydantic models for every setting, loaded from TOML with overrides on top.

A config file is validated as a whole before any work starts; an unknown field or a value out of
range is reported with the file, the dotted field name and the allowed values.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sfr.data.timegrid import TimeGrid, as_time
from sfr.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Modality = Literal["rgb", "flow", "obj"]
MODALITIES: tuple[str, ...] = ("rgb", "flow", "obj")
DatasetName = Literal["ek55", "ek100", "egtea"]

# Published facts of each benchmark: action classes and public feature dimensions.
DATASET_CLASSES: dict[str, int] = {"ek55": 2513, "ek100": 3806, "egtea": 106}
PUBLIC_FEATURE_DIMS: dict[str, int] = {"rgb": 1024, "flow": 1024, "obj": 352}


class StrictModel(BaseModel):
    """Base of every config section: unknown fields are errors, values are re-validated on edit."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


StrictModelT = TypeVar("StrictModelT", bound=StrictModel)


class DataConfig(StrictModel):
    """Where the annotations and features are and how to read them."""

    dataset: DatasetName = Field("ek55", description="annotation format and benchmark")
    name: str | None = Field(None, description="first folder of run directories (default: dataset)")
    fps: float = Field(30.0, gt=0, description="frame rate of the frame numbers in the CSVs")
    split: int = Field(1, ge=1, le=3, description="EGTEA split (training{split}.csv)")
    train_csv: str | None = Field(None, description="training CSV (default per dataset)")
    val_csv: str | None = Field(None, description="validation CSV (default per dataset)")
    actions_csv: str = "actions.csv"
    num_classes: int | None = Field(None, ge=2, description="action classes (default: actions.csv)")
    feature_dims: dict[Modality, int] = Field(
        default_factory=dict,
        description="feature size per modality (default rgb/flow 1024, obj 352)",
    )
    preload: bool = Field(False, description="read every sequence into memory once before training")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")

    @property
    def run_prefix(self) -> str:
        return self.name or self.dataset

    def csv_name(self, split: Literal["training", "validation"]) -> str:
        """File name of a split's CSV: explicit setting, else the dataset's convention."""
        explicit = self.train_csv if split == "training" else self.val_csv
        if explicit is not None:
            return explicit
        return f"{split}{self.split}.csv" if self.dataset == "egtea" else f"{split}.csv"

    def feature_dim(self, modality: str) -> int:
        return self.feature_dims.get(modality, PUBLIC_FEATURE_DIMS[modality])


class BranchConfig(StrictModel):
    """One RU-LSTM branch: a modality read at rate `alpha` over S_enc + S_ant steps."""

    modality: Modality
    alpha: float = Field(gt=0, description="seconds between steps")
    s_enc: int = Field(ge=0, description="encoding steps")
    s_ant: int = Field(ge=1, description="anticipation steps")
    hidden: int = Field(1024, ge=1)
    dropout: float = Field(0.8, ge=0, lt=1)
    shared_dropout_mask: bool = Field(
        False,
        description="one input-dropout mask per unroll instead of one per unrolling step "
        "(cheaper, differs from the published training)",
    )

    def grid(self, fps: float) -> TimeGrid:
        return TimeGrid(self.alpha, self.s_enc, self.s_ant, fps)

    @property
    def slug(self) -> str:
        """Folder name of the branch's runs, e.g. `rgb-a0.5-enc6-ant4`."""
        return f"{self.modality}-a{self.alpha:g}-enc{self.s_enc}-ant{self.s_ant}"


class OptimConfig(StrictModel):
    """SGD with momentum, as in the published method."""

    lr: float = Field(0.01, gt=0, lt=3.4e38, description="learning rate (a float32 value)")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1)
    epochs: int = Field(100, ge=1)


class RunConfig(StrictModel):
    """Reproducibility, device and model selection."""

    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    select: Literal["top5", "mt5r"] = Field(
        "top5", description="best epoch by top-5 action accuracy or mean top-5 recall"
    )
    select_time: float = Field(1.0, gt=0, description="anticipation time (s) of the selection")
    name: str | None = Field(None, description="run folder name (default from the branch)")


class BranchRunConfig(StrictModel):
    """Everything `sfr train-branch` and `sfr finetune` need."""

    data: DataConfig = Field(default_factory=DataConfig)
    branch: BranchConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _selection_time_on_grid(self) -> BranchRunConfig:
        times = self.branch.grid(self.data.fps).anticipation_times
        if as_time(self.run.select_time) not in times:
            allowed = ", ".join(f"{t:g}" for t in times)
            raise ValueError(
                f"run.select_time {self.run.select_time:g} s is not an anticipation time of the "
                f"branch (alpha {self.branch.alpha:g}, s_ant {self.branch.s_ant}); allowed: {allowed}"
            )
        return self

    @property
    def branch_dir(self) -> str:
        return f"{self.data.run_prefix}/{self.run.name or self.branch.slug}"


def check_rates(alphas: Sequence[float], field: str = "alphas") -> None:
    """Refuse a set of rates unless every ratio between two of them is an integer."""
    rates = sorted(set(alphas))
    for slow in rates:
        for fast in rates:
            ratio = slow / fast
            if slow > fast and abs(ratio - round(ratio)) > 1e-6:
                raise ConfigError(
                    f"{field}: the rates {fast:g} and {slow:g} have ratio {ratio:.4g}, "
                    "which is not an integer.",
                    "Slow-fast fusion needs rates that divide each other, e.g. 0.125, 0.25, 0.5.",
                )


def parse_override(item: str) -> tuple[str, Any]:
    """Parse `section.field=value`; the value is read as TOML (numbers, booleans, lists, strings)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"Override {item!r} is not of the form section.field=value.")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Override {dotted}: '{part}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def _describe(error: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line per problem: `source: dotted.field: message (allowed: ...)`."""
    lines = []
    for problem in error.errors():
        loc = ".".join(str(p) for p in problem["loc"])
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            section: Any = model
            for part in problem["loc"][:-1]:
                field = (
                    section.model_fields.get(str(part))
                    if hasattr(section, "model_fields")
                    else None
                )
                section = field.annotation if field is not None else None
            allowed = ", ".join(section.model_fields) if hasattr(section, "model_fields") else "?"
            message = f"unknown field (allowed: {allowed})"
        elif problem["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        lines.append(f"{source}: {loc}: {message}" if loc else f"{source}: {message}")
    return "\n".join(lines)


def build_config(
    model: type[StrictModelT],
    tree: Mapping[str, Any],
    overrides: Mapping[str, Any] = {},
    source: str = "config",
) -> StrictModelT:
    """Validate a config tree with dotted overrides applied on top; ConfigError on any problem."""
    merged = json.loads(json.dumps(tree))
    for dotted, value in overrides.items():
        if value is not None:
            _set_dotted(merged, dotted, value)
    try:
        return model.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(
            "Invalid configuration:\n" + _describe(error, model, source),
            "Fix the file or the command-line override; `sfr <command> --help` lists the options.",
        ) from None


def load_config(
    model: type[StrictModelT], path: Path, overrides: Mapping[str, Any] = {}
) -> StrictModelT:
    """Read a TOML config file and validate it with overrides (see `build_config`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"Config file {path} does not exist.", "Pass an existing TOML file to --config."
        )
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}.") from None
    return build_config(model, tree, overrides, source=str(path))


def config_json(config: BaseModel) -> str:
    """The resolved config as stable JSON (saved beside every checkpoint)."""
    return json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True)
