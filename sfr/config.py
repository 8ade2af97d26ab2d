"""Typed configuration: pydantic models for every setting, loaded from TOML with overrides on top.

A config file is validated as a whole before any work starts; an unknown field or a value out of
range is reported with the file, the dotted field name and the allowed values.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from sfr.data.observation import ObservationGrid, ratio_label
from sfr.data.timegrid import Sampling, TimeGrid, as_time
from sfr.errors import ConfigError
from sfr.files import missing_reason

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Modality = Literal["rgb", "flow", "obj"]
MODALITIES: tuple[str, ...] = ("rgb", "flow", "obj")
DatasetName = Literal["ek55", "ek100", "egtea"]
Task = Literal["anticipation", "early_recognition"]

# The published presets, `<dataset>/<name>.toml` (package data: in a checkout, also at configs/).
PRESETS: Path = Path(str(importlib.resources.files("sfr") / "configs"))

# Published facts of each benchmark: action classes and public feature dimensions.
DATASET_CLASSES: dict[str, int] = {"ek55": 2513, "ek100": 3806, "egtea": 106}
PUBLIC_FEATURE_DIMS: dict[str, int] = {"rgb": 1024, "flow": 1024, "obj": 352}


class StrictModel(BaseModel):
    """Base of every config section: unknown fields are errors, values are re-validated on edit;
    NaN and infinite numbers are refused everywhere."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Upper bounds that keep a typo from allocating tens of GB or running for hours: generous
# multiples of the largest published values (hidden 1024, 40 steps, 1024-d features).
MAX_HIDDEN = 16_384
MAX_STEPS = 1_000
MAX_FEATURE_DIM = 65_536
MAX_CLASSES = 1_000_000


def _folder_name(value: str) -> str:
    """A run or data name becomes one folder under --runs: one path component, never `..`."""
    if value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise ValueError(f"must be one folder name (no '/', '\\', '.' or '..'), got {value!r}")
    return value


FolderName = Annotated[str, AfterValidator(_folder_name)]


StrictModelT = TypeVar("StrictModelT", bound=StrictModel)


# The devices every --device option and run.device accept, as PyTorch names them (`cuda` is
# the current CUDA device, `cuda:N` the N-th, from 0); `auto` is CUDA where available, else CPU.
DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
PRECISION_NAMES = ("fp32", "bf16", "fp16")  # sfr.data.loader.PRECISIONS


def shown(value: object) -> str:
    """A value typed by the user as a message shows it: bare when it reads unambiguously,
    quoted when empty or padded with spaces (`''`, `' cpu'`)."""
    text = str(value)
    return text if text and text.strip() == text and isinstance(value, str) else repr(value)


def device_problem(name: object) -> str | None:
    """Why `name` is no device sfr accepts (`DEVICE_NAMES`), None when it is one.

    The one check of every --device option and of run.device: lower case, no other forms
    (`gpu`, `CPU`, `cpu:0`, `cuda:-1`, `''` are refused). Whether the device exists on this
    machine is checked where it is used (`sfr.data.loader.resolve_device`).
    """
    if isinstance(name, str) and _DEVICE.fullmatch(name):
        return None
    return f"use {DEVICE_NAMES}"


def check_device(name: str, what: str = "--device") -> str:
    """`name` when it is a device sfr accepts (`device_problem`); else ConfigError
    `--device banana: use auto, cpu, cuda, cuda:N or mps.` (`what` names the option or field)."""
    problem = device_problem(name)
    if problem:
        raise ConfigError(f"{what} {shown(name)}: {problem}.")
    return name


def precision_problem(name: object) -> str | None:
    """Why `name` is no precision sfr accepts (`PRECISION_NAMES`, lower case as every choice of
    sfr), None when it is one."""
    if name in PRECISION_NAMES:
        return None
    return f"use {', '.join(PRECISION_NAMES[:-1])} or {PRECISION_NAMES[-1]}"


def _device_name(value: str) -> str:
    problem = device_problem(value)
    if problem:
        raise ValueError(f"{json.dumps(value)} is not a device: {problem}")
    return value


_BOOLEANS = {
    **dict.fromkeys(("true", "yes", "on", "1", "y", "t"), True),
    **dict.fromkeys(("false", "no", "off", "0", "n", "f"), False),
}


def _preload_mode(value: object) -> object:
    """data.preload as "auto" or a boolean, in the spellings every boolean field takes."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text in _BOOLEANS:
            return _BOOLEANS[text]
    if isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
        return bool(value)
    raise ValueError(
        f'must be "auto", true or false, not {value!r} (a boolean in any spelling a boolean '
        'field takes: also "yes"/"no", "on"/"off", "y"/"n", "t"/"f", 1/0)'
    )


class DataConfig(StrictModel):
    """Where the annotations and features are and how to read them."""

    dataset: DatasetName = Field("ek55", description="annotation format and benchmark")
    task: Task = Field(
        "anticipation",
        description="anticipation (frames before the action, scored by anticipation time) or "
        "early_recognition (s_ant frames spread over the action, scored by observed ratio)",
    )
    name: FolderName | None = Field(
        None,
        description="first folder of run directories (default: dataset); one folder name",
    )
    fps: float = Field(
        30.0, gt=0, le=1000, description="frame rate of the frame numbers in the CSVs"
    )
    split: int = Field(1, ge=1, le=3, description="EGTEA split (training{split}.csv)")
    train_csv: str | None = Field(None, description="training CSV (default per dataset)")
    val_csv: str | None = Field(None, description="validation CSV (default per dataset)")
    actions_csv: str = "actions.csv"
    num_classes: int | None = Field(
        None, ge=2, le=MAX_CLASSES, description="action classes (default: actions.csv)"
    )
    feature_dims: dict[Modality, Annotated[int, Field(ge=1, le=MAX_FEATURE_DIM)]] = Field(
        default_factory=dict,
        description="feature size per modality (default rgb/flow 1024, obj 352)",
    )
    sampling: Sampling = Field(
        "grid",
        description="grid: every rate reads its own time grid; published: every rate takes its "
        "frames from one sequence on the finest grid, as the published Slow-Fast loader does",
    )
    preload: Annotated[Literal["auto"] | bool, BeforeValidator(_preload_mode)] = Field(
        "auto",  # sfr.data.dataset.PreloadMode
        description="read every unique feature vector the splits need into memory once before "
        "training (one table per modality), batches then gathered in the training process "
        "without workers: true (refused if larger than the available memory), false (read "
        "from the LMDB stores as training goes), auto (true where the tables take at most "
        "half the available memory, else false)",
    )
    num_workers: int = Field(
        0,
        ge=0,
        le=256,
        description="DataLoader worker processes reading the LMDB stores (none for a preloaded "
        "table)",
    )

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
    alpha: float = Field(gt=0, le=60, description="seconds between steps")
    s_enc: int = Field(ge=0, le=MAX_STEPS, description="encoding steps")
    s_ant: int = Field(ge=1, le=MAX_STEPS, description="anticipation steps")
    hidden: int = Field(1024, ge=1, le=MAX_HIDDEN)
    dropout: float = Field(0.8, ge=0, lt=1)
    shared_dropout_mask: bool = Field(
        False,
        description="one input-dropout mask per unroll instead of one per unrolling step "
        "(cheaper, differs from the published training)",
    )

    def grid(self, fps: float, task: str = "anticipation") -> TimeGrid | ObservationGrid:
        """The branch's time grid, or for early recognition its observation grid."""
        if task == "early_recognition":
            return ObservationGrid(self.alpha, self.s_ant, fps)
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
    batch_size: int = Field(128, ge=1, le=65_536)
    epochs: int = Field(100, ge=1, le=100_000)
    class_weights: str | None = Field(
        None,
        description="text file of one loss weight per action class (the published "
        "actions_weights, which its code leaves commented out), relative to the data folder",
    )


class RunConfig(StrictModel):
    """Reproducibility, device and model selection."""

    seed: int = 0
    device: Annotated[str, AfterValidator(_device_name)] = Field("auto", description=DEVICE_NAMES)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32, or bf16/fp16 mixed precision (autocast; CUDA only)"
    )
    select: Literal["top5", "mt5r", "top1"] = Field(
        "top5",
        description="best epoch by top-5 action accuracy, mean top-5 recall or top-1 accuracy "
        "(the published early recognition selects by top-1)",
    )
    select_time: float = Field(
        1.0,
        gt=0,
        description="anticipation time (s) of the selection; early recognition: observed ratio "
        "(1.0 = the whole action)",
    )
    name: FolderName | None = Field(None, description="run folder name (default from the branch)")


def _check_select_time(
    seconds: float, times: tuple[float, ...], what: str, task: str = "anticipation"
) -> None:
    """ValueError unless the selection time (early recognition: observed ratio) is one of `times`."""
    if as_time(seconds) not in times:
        allowed = ", ".join(f"{t:g}" for t in times)
        if task == "early_recognition":
            raise ValueError(
                f"run.select_time {seconds:g} is not an observed ratio of the branch ({what}); "
                f"allowed: {allowed} (1 = the whole action)"
            )
        raise ValueError(f"run.select_time {seconds:g} s is not {what}; allowed: {allowed}")


def _early_problem(s_enc: int, field: str) -> str | None:
    """Why a grid does not fit early recognition (it has no encoding steps), or None."""
    if s_enc != 0:
        return (
            f"{field} is {s_enc}, but early recognition observes only the action: set it to 0 "
            "(the published code ignores S_enc for this task; s_ant is the number of frames "
            "sampled from the action)"
        )
    return None


class BranchRunConfig(StrictModel):
    """Everything `sfr train-branch` and `sfr finetune` need."""

    data: DataConfig = Field(default_factory=DataConfig)
    branch: BranchConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _selection_time_on_grid(self) -> BranchRunConfig:
        task = self.data.task
        if task == "early_recognition":
            problem = _early_problem(self.branch.s_enc, "branch.s_enc")
            if problem:
                raise ValueError(problem)
        times = self.grid.anticipation_times
        if task == "early_recognition":
            what = f"s_ant {self.branch.s_ant}: {', '.join(ratio_label(t) for t in times)}"
        else:
            what = f"an anticipation time of the branch (alpha {self.branch.alpha:g}, s_ant {self.branch.s_ant})"
        _check_select_time(self.run.select_time, times, what, task)
        return self

    @property
    def grid(self) -> TimeGrid | ObservationGrid:
        """The branch's grid for the configured task."""
        return self.branch.grid(self.data.fps, self.data.task)

    @property
    def branch_dir(self) -> str:
        """Runs folder of the branch, e.g. `ek55/rgb-a0.25-enc6-ant8` or `ek55/early-rgb-a0.25-enc0-ant8`."""
        return f"{self.data.run_prefix}/{self.run.name or task_prefix(self.data.task) + self.branch.slug}"


class RateConfig(StrictModel):
    """One rate of a slow-fast model: its branches' grid, and the encoding steps fusion reads."""

    alpha: float = Field(gt=0, le=60, description="seconds between steps")
    s_enc: int = Field(ge=0, le=MAX_STEPS, description="encoding steps of the branch stages")
    s_ant: int = Field(ge=1, le=MAX_STEPS, description="anticipation steps")
    fusion_s_enc: int | None = Field(
        None,
        ge=0,
        le=MAX_STEPS,
        description="encoding steps fed by the fusion stages (default: s_enc)",
    )

    def grid(
        self, fps: float, *, fusion: bool, task: str = "anticipation"
    ) -> TimeGrid | ObservationGrid:
        """The rate's time grid (early recognition: its observation grid)."""
        if task == "early_recognition":
            return ObservationGrid(self.alpha, self.s_ant, fps)
        s_enc = self.s_enc if not fusion or self.fusion_s_enc is None else self.fusion_s_enc
        return TimeGrid(self.alpha, s_enc, self.s_ant, fps)

    @property
    def slug(self) -> str:
        enc = self.s_enc if self.fusion_s_enc is None else self.fusion_s_enc
        return f"a{self.alpha:g}-enc{enc}-ant{self.s_ant}"


class FusionModelConfig(StrictModel):
    """Branches over `modalities` × `rates`, fused by attention in Architecture 1 or 2."""

    architecture: Literal["arch1", "arch2"] = Field(
        "arch2",
        description="arch1: rates of each modality first; arch2: modalities of each rate first",
    )
    modalities: list[Modality] = Field(default_factory=lambda: list(MODALITIES), min_length=1)
    rates: list[RateConfig] = Field(min_length=1)
    hidden: int = Field(1024, ge=1, le=MAX_HIDDEN)
    branch_dropout: float = Field(0.8, ge=0, lt=1)
    modality_dropout: float = Field(0.8, ge=0, lt=1, description="dropout of modality attention")
    rate_dropout: float = Field(0.9, ge=0, lt=1, description="dropout of slow-fast attention")
    freeze_branches: bool = Field(
        False, description="train only the attention of each fusion stage, not the levels below"
    )

    @property
    def alphas(self) -> list[float]:
        return [rate.alpha for rate in self.rates]


class FusionRunConfig(StrictModel):
    """Everything `sfr fuse` and `sfr pipeline` need: every branch and every fusion stage."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: FusionModelConfig
    optim: OptimConfig = Field(default_factory=OptimConfig, description="branch stages")
    fusion_optim: OptimConfig = Field(default_factory=OptimConfig, description="fusion stages")
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _rates_fuse(self) -> FusionRunConfig:
        alphas = self.model.alphas
        if len(set(alphas)) != len(alphas):
            raise ValueError(f"model.rates: each alpha may appear once, got {alphas}")
        if len(set(self.model.modalities)) != len(self.model.modalities):
            raise ValueError(
                f"model.modalities: each modality may appear once, got {self.model.modalities}"
            )
        problem = rate_ratio_problem(alphas)
        if problem:
            raise ValueError(f"model.rates: {problem}")
        task = self.data.task
        if task == "early_recognition":
            if len(self.model.rates) != 1:
                raise ValueError(
                    f"model.rates: early recognition observes the action at one rate, got "
                    f"{len(self.model.rates)} (alphas {', '.join(f'{a:g}' for a in alphas)}); "
                    "give one rate and fuse the modalities with MATT"
                )
            rate = self.model.rates[0]
            for value, field in ((rate.s_enc, "s_enc"), (rate.fusion_s_enc, "fusion_s_enc")):
                problem = _early_problem(value or 0, f"model.rates[0].{field}")
                if problem:
                    raise ValueError(problem)
        times = self.fused_times
        if not times:
            listed = "; ".join(
                f"alpha {r.alpha:g}: {', '.join(f'{t:g}' for t in r.grid(self.data.fps, fusion=True).anticipation_times)}"
                for r in self.model.rates
            )
            raise ValueError(f"model.rates: the rates share no anticipation time ({listed})")
        what = (
            "an observed ratio of the model"
            if task == "early_recognition"
            else "a fused anticipation time"
        )
        _check_select_time(self.run.select_time, times, what, task)
        return self

    @property
    def fused_times(self) -> tuple[float, ...]:
        """Anticipation times every rate produces, oldest first."""
        grids = [r.grid(self.data.fps, fusion=True, task=self.data.task) for r in self.model.rates]
        common = set.intersection(*(set(g.anticipation_times) for g in grids))
        return tuple(t for t in grids[0].anticipation_times if t in common)

    def branch_config(self, modality: str, rate: RateConfig) -> BranchRunConfig:
        """The config of one branch's own stages (pre-training and fine-tuning)."""
        return BranchRunConfig(
            data=self.data,
            branch=BranchConfig(
                modality=modality,
                alpha=rate.alpha,
                s_enc=rate.s_enc,
                s_ant=rate.s_ant,
                hidden=self.model.hidden,
                dropout=self.model.branch_dropout,
            ),
            optim=self.optim,
            run=self.run.model_copy(update={"name": None}),
        )

    @property
    def fusion_dir(self) -> str:
        """Folder of the fusion stages, e.g. `ek55/arch2-rgb+flow+obj-a0.125-enc12-ant16+a0.5-enc6-ant4`."""
        name = self.run.name or (
            f"{task_prefix(self.data.task)}{self.model.architecture}-{'+'.join(self.model.modalities)}-"
            + "+".join(rate.slug for rate in self.model.rates)
        )
        return f"{self.data.run_prefix}/{name}"


def task_prefix(task: str) -> str:
    """Prefix of run folder names: `early-` for early recognition, none for anticipation."""
    return "early-" if task == "early_recognition" else ""


def rate_ratio_problem(alphas: Sequence[float]) -> str | None:
    """Why a set of rates cannot be fused (a ratio that is not an integer), or None."""
    rates = sorted(set(alphas))
    for index, fast in enumerate(rates):
        for slow in rates[index + 1 :]:
            ratio = slow / fast
            if abs(ratio - round(ratio)) > 1e-6:
                return (
                    f"the rates {fast:g} and {slow:g} have ratio {ratio:.4g}, which is not an "
                    "integer (slow-fast fusion needs rates that divide each other, e.g. 0.125, 0.25, 0.5)"
                )
    return None


def check_rates(alphas: Sequence[float], field: str = "alphas") -> None:
    """Refuse a set of rates unless every ratio between two of them is an integer."""
    problem = rate_ratio_problem(alphas)
    if problem:
        raise ConfigError(f"{field}: {problem}.")


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


def _describe(
    error: ValidationError,
    model: type[BaseModel],
    source: str,
    overridden: Sequence[str] = (),
) -> str:
    """One line per problem: `source: dotted.field: message (allowed: ...)`.

    A field set on the command line (`overridden`) is blamed on the override, not the file.
    """
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
        origin = (
            "command-line override"
            if any(loc == key or loc.startswith(key + ".") for key in overridden)
            else source
        )
        lines.append(f"{origin}: {loc}: {message}" if loc else f"{source}: {message}")
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
            "Invalid configuration:\n"
            + _describe(error, model, source, [k for k, v in overrides.items() if v is not None]),
            "Fix the file or the command-line override; `sfr <command> --help` lists the options.",
        ) from None


def published_preset(path: Path) -> Path:
    """`path`, or the shipped preset it names: `configs/<dataset>/<name>.toml` when no such file
    exists here (an installed sfr has no configs/ folder beside the working directory)."""
    parts = path.parts
    if path.exists() or path.is_absolute() or len(parts) != 3 or parts[0] != "configs":
        return path
    shipped = PRESETS / parts[1] / parts[2]
    return shipped if shipped.is_file() else path


def _preset_names() -> str:
    """The shipped presets' folders and an example, for messages."""
    datasets = sorted(p.name for p in PRESETS.iterdir() if p.is_dir()) if PRESETS.is_dir() else []
    return f"<dataset> {' | '.join(datasets)}, e.g. configs/ek55/rgb_a0.5.toml"


def load_config(
    model: type[StrictModelT],
    path: Path,
    overrides: Mapping[str, Any] = {},
    *,
    chosen: Mapping[str, Choice] = {},
) -> StrictModelT:
    """Read a TOML config file and validate it with overrides (see `build_config`).

    A relative `configs/<dataset>/<name>.toml` that does not exist is the published preset of
    that name shipped with sfr (`PRESETS`), so the README's commands run from any folder.
    `chosen` holds the fields a required command-line choice sets (`sfr fuse ARCHITECTURE`):
    applied last, but refused (ConfigError naming the file, both values and what to do) where
    the file or a `--set` override in `overrides` states another value, so that an explicit
    config is honoured or refused, never silently overridden; a file that leaves the field out
    takes the choice. Raises ConfigError for a missing, unreadable or invalid file.
    """
    path = published_preset(Path(path))
    if path.is_dir():
        raise ConfigError(
            f"Config file {path} is a folder.", "Pass a TOML file to --config (configs/...)."
        )
    if not path.is_file():
        raise ConfigError(
            f"Config file {path} {missing_reason(path)}.",
            "Pass an existing TOML file to --config, or a published preset: "
            f"configs/<dataset>/<name>.toml, one of {_preset_names()}.",
        )
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path} is not a TOML text file (it is not UTF-8 text).",
            "Pass a TOML config file to --config (configs/...).",
        ) from None
    except OSError as error:
        raise ConfigError(f"Config file {path} cannot be read: {error.strerror}.") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}.") from None
    _refuse_other_kind(model, tree, path)
    for dotted, choice in chosen.items():
        _check_choice(tree, overrides, path, dotted, choice)
    every = {**overrides, **{dotted: choice.value for dotted, choice in chosen.items()}}
    return build_config(model, tree, every, source=str(path))


@dataclass(frozen=True)
class Choice:
    """A config field's value chosen by a required command-line argument.

    `given_as` names the argument for messages (`ARCHITECTURE`), `command` is how a user passes
    another value of it (`sfr fuse {value} --config {path}`, formatted with both).
    """

    value: Any
    given_as: str
    command: str


def _stated(tree: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    """(whether the config tree states the dotted field, its value)."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _check_choice(
    tree: Mapping[str, Any], overrides: Mapping[str, Any], path: Path, dotted: str, choice: Choice
) -> None:
    """ConfigError where the file, or a `--set` override of it, states another value than the
    command-line `choice` of field `dotted`."""
    section, _, field = dotted.rpartition(".")
    if overrides.get(dotted) is not None:
        if overrides[dotted] != choice.value:
            raise ConfigError(
                f"--set {dotted}={overrides[dotted]} contradicts the {choice.given_as} argument "
                f"{choice.value}.",
                f"Give the {field} once, as the {choice.given_as} argument.",
            )
        return  # the user overrides the file on purpose
    present, stated = _stated(tree, dotted)
    if not present or stated == choice.value:
        return
    keep = choice.command.format(value=stated, path=path)
    raise ConfigError(
        f"{path} declares {field} = {json.dumps(stated)} in [{section}], but the command line "
        f"asks for {choice.value} (the {choice.given_as} argument).",
        f"Run {keep} to use the config as written, or, to use {choice.value}, set "
        f"{field} = {json.dumps(choice.value)} in [{section}] of {path} (or remove that line).",
    )


def _refuse_other_kind(model: type[BaseModel], tree: Mapping[str, Any], path: Path) -> None:
    """A fusion config given where a branch config is read, or the reverse: say which it is and
    which commands take it (rather than listing an unknown field)."""
    fields = model.model_fields
    if "branch" in fields and "branch" not in tree and ("model" in tree or "fusion_optim" in tree):
        raise ConfigError(
            f"{path} is a fusion config ([model] section), not a branch config ([branch]).",
            f"Train it with sfr pipeline {path} or sfr fuse ARCH --config {path}; "
            "train-branch and finetune take a branch config, e.g. configs/ek55/rgb_a0.5.toml.",
        )
    if "model" in fields and "model" not in tree and "branch" in tree:
        raise ConfigError(
            f"{path} is a branch config ([branch] section), not a fusion config ([model]).",
            f"Train it with sfr train-branch --config {path} (then sfr finetune); fuse and "
            "pipeline take a fusion config, e.g. configs/ek55/sf_arch2.toml.",
        )


def config_json(config: BaseModel) -> str:
    """The resolved config as stable JSON (saved beside every checkpoint)."""
    return json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True)
