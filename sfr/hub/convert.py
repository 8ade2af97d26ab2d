"""Conversion of published RU-LSTM checkpoints into sfr checkpoints, and their place in the runs.

    RULSTM-anticipation_0.25_6_8_rgb_best.pth.tar      {'state_dict', 'epoch', 'perf', 'best_perf'}
      │ read safely (tensors and numpy float64 scalars only), every key and shape checked
      ▼
    what it is: a branch (feature size F, hidden H, C classes) or a MATT fusion of n branches
      │ keys renamed (DESIGN §4), config built in code from the published settings
      ▼
    a safetensors checkpoint holding what sfr's own `best.safetensors` of that stage holds:
    a branch's fine-tuning (`finetune`) or the level-1 modality fusion of the one-rate config
    (`rgb+flow+obj@0.25`), plus a `converted` entry recording the source and what was inferred.

`install_published` places a conversion where sfr's later stages look for it, so `sfr fuse`,
`sfr pipeline` and `sfr validate` use published branches and fusions as if sfr had trained them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from sfr.checkpoint import add_prefix, read_metadata, save_checkpoint
from sfr.config import (
    MODALITIES,
    PUBLIC_FEATURE_DIMS,
    BranchRunConfig,
    FusionRunConfig,
    RateConfig,
    build_config,
)
from sfr.data.timegrid import TimeGrid, as_time
from sfr.errors import ConfigError, DataError, RunError, SfrError
from sfr.files import (
    atomic_write_text,
    check_folder_path,
    check_output_file,
    existing_output,
    refuse_existing,
    remove_stale_temp_files,
    sha256_file,
)
from sfr.hub.published import branch_state_from_published, load_published_checkpoint
from sfr.models.architectures import leaf_label
from sfr.models.tree import ModelTree, branch_spec
from sfr.train.rundir import RunDir

DATASETS = ("ek55", "ek100")
# (alpha, S_enc, S_ant) of the published models. Early recognition reads S_ant = 8 frames spread
# evenly over the action itself, not a grid before it: S_enc is 0 and alpha only names the file.
PUBLISHED_GRIDS: dict[str, tuple[float, int, int]] = {
    "anticipation": (0.25, 6, 8),
    "early_recognition": (0.25, 0, 8),
}
# The published MATT fuses these branches, in this order.
PUBLISHED_FUSION_MODALITIES = ("rgb", "flow", "obj")
# Published training settings (RULSTM/main.py defaults); EK100 models select by mean top-5 recall.
_OPTIM = {"lr": 0.01, "momentum": 0.9, "batch_size": 128, "epochs": 100}
_EARLY_EPOCHS = 200  # RULSTM/scripts/train_early_recognition_ek55.sh
_DROPOUT = 0.8
_RATE_DROPOUT = 0.9

_BRANCH_KEYS = (
    "rolling_lstm.lstm.weight_ih_l0",
    "rolling_lstm.lstm.weight_hh_l0",
    "rolling_lstm.lstm.bias_ih_l0",
    "rolling_lstm.lstm.bias_hh_l0",
    "unrolling_lstm.weight_ih_l0",
    "unrolling_lstm.weight_hh_l0",
    "unrolling_lstm.bias_ih_l0",
    "unrolling_lstm.bias_hh_l0",
    "classifier.1.weight",
    "classifier.1.bias",
)
_MATT_LAYERS = (0, 3, 6)
_DEEPER_LAYER = re.compile(r"_l[1-9]\d*")  # weight_ih_l1: a second LSTM layer


@dataclass(frozen=True)
class PublishedBranch:
    """Sizes of one published branch, read from its tensor shapes."""

    feat_dim: int
    hidden: int
    num_classes: int


@dataclass(frozen=True)
class PublishedLayout:
    """What a published state dict holds: one branch, or a MATT fusion of several."""

    branches: tuple[PublishedBranch, ...]
    fusion: bool

    @property
    def hidden(self) -> int:
        return self.branches[0].hidden

    @property
    def num_classes(self) -> int:
        return self.branches[0].num_classes

    @property
    def kind(self) -> Literal["branch", "fusion"]:
        return "fusion" if self.fusion else "branch"


@dataclass(frozen=True)
class Conversion:
    """A converted checkpoint: sfr tensors and metadata, and the config they were placed in."""

    tensors: dict[str, Tensor]
    metadata: dict[str, Any]
    config: BranchRunConfig | FusionRunConfig

    @property
    def stage(self) -> str:
        return self.metadata["stage"]

    @property
    def converted(self) -> dict[str, Any]:
        """Source file, its sha256, the published epoch/perf and the inferred settings."""
        return self.metadata["converted"]


def inspect_state(state: Mapping[str, Any], source: str) -> PublishedLayout:
    """What a published state dict is, every key and shape checked; DataError naming the key."""
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise DataError(f"{source}: state_dict entry {key!r} is not a tensor.")
        if not value.is_floating_point():
            raise DataError(f"{source}: {key} holds {value.dtype} values, not floating point.")
        if _DEEPER_LAYER.search(key):
            raise DataError(
                f"{source}: {key} belongs to a deeper LSTM layer; sfr converts one-layer "
                "RU-LSTMs only (the published models have depth 1)."
            )
    if not any(key.startswith(("branches.", "MATT.")) for key in state):
        return PublishedLayout((_inspect_branch(state, "", source),), fusion=False)
    return _inspect_fusion(state, source)


def _inspect_branch(state: Mapping[str, Tensor], prefix: str, source: str) -> PublishedBranch:
    """Sizes of the branch under `prefix`, after checking its keys and every shape."""
    own = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    for key in own:
        if key not in _BRANCH_KEYS:
            raise DataError(
                f"{source}: unexpected key {prefix + key} in a published RU-LSTM branch "
                "(expected rolling_lstm.lstm.*, unrolling_lstm.* and classifier.1.*)."
            )
    missing = [prefix + key for key in _BRANCH_KEYS if key not in own]
    if missing:
        raise DataError(f"{source}: the published RU-LSTM branch lacks {', '.join(missing)}.")
    recurrent = own["rolling_lstm.lstm.weight_hh_l0"]
    hidden = recurrent.shape[-1]
    if recurrent.dim() != 2 or recurrent.shape[0] != 4 * hidden:
        raise DataError(
            f"{source}: {prefix}rolling_lstm.lstm.weight_hh_l0 has shape {tuple(recurrent.shape)}, "
            "expected (4 × hidden, hidden)."
        )
    for anchor in ("rolling_lstm.lstm.weight_ih_l0", "classifier.1.weight"):
        if own[anchor].dim() != 2:
            raise DataError(
                f"{source}: {prefix}{anchor} has shape {tuple(own[anchor].shape)}, expected a matrix."
            )
    sizes = PublishedBranch(
        feat_dim=own["rolling_lstm.lstm.weight_ih_l0"].shape[1],
        hidden=hidden,
        num_classes=own["classifier.1.weight"].shape[0],
    )
    gates, feat, classes = 4 * hidden, sizes.feat_dim, sizes.num_classes
    expected = {}
    for lstm in ("rolling_lstm.lstm.", "unrolling_lstm."):
        expected[lstm + "weight_ih_l0"] = (gates, feat)
        expected[lstm + "weight_hh_l0"] = (gates, hidden)
        expected[lstm + "bias_ih_l0"] = (gates,)
        expected[lstm + "bias_hh_l0"] = (gates,)
    expected["classifier.1.weight"] = (classes, hidden)
    expected["classifier.1.bias"] = (classes,)
    what = f"feature size {feat}, hidden {hidden}, {classes} classes"
    for key, shape in expected.items():
        _check_shape(own[key], shape, prefix + key, what, source)
    return sizes


def fusion_branch_indices(keys: list[str], prefix: str, source: str) -> list[int]:
    """The branch indices 0, 1, ... of a published MATT fusion whose keys (under `prefix`,
    removed) are `branches.<i>.*` and the MATT MLP; DataError naming an unexpected key or a gap."""
    indices: set[int] = set()
    matt = {f"MATT.{layer}.{p}" for layer in _MATT_LAYERS for p in ("weight", "bias")}
    for key in keys:
        match = re.match(r"branches\.(\d+)\.", key)
        if match:
            indices.add(int(match.group(1)))
        elif key not in matt:
            raise DataError(
                f"{source}: unexpected key {prefix + key} in a published MATT fusion "
                "(expected branches.<i>.* and MATT.0/3/6.weight/bias)."
            )
    if sorted(indices) != list(range(len(indices))) or len(indices) < 2:
        raise DataError(
            f"{source}: a MATT fusion needs {prefix}branches.0, branches.1, ... without gaps; "
            f"found branches {sorted(indices)}."
        )
    return sorted(indices)


def _inspect_fusion(state: Mapping[str, Tensor], source: str) -> PublishedLayout:
    """Sizes of a MATT fusion's branches, after checking that they agree and the MLP fits them."""
    indices = fusion_branch_indices(list(state), "", source)
    branches = tuple(_inspect_branch(state, f"branches.{i}.", source) for i in indices)
    first = branches[0]
    for index, branch in enumerate(branches[1:], start=1):
        if (branch.hidden, branch.num_classes) != (first.hidden, first.num_classes):
            raise DataError(
                f"{source}: branches.{index} has hidden {branch.hidden} and {branch.num_classes} "
                f"classes but branches.0 has hidden {first.hidden} and {first.num_classes}; "
                "MATT fuses branches of one size."
            )
    width = 2 * first.hidden * len(branches)
    layers = {0: (width // 4, width), 3: (width // 8, width // 4), 6: (len(branches), width // 8)}
    what = f"{len(branches)} branches of hidden {first.hidden}"
    for layer, (rows, cols) in layers.items():
        for name, shape in (("weight", (rows, cols)), ("bias", (rows,))):
            key = f"MATT.{layer}.{name}"
            if key not in state:
                raise DataError(f"{source}: the published MATT fusion lacks {key}.")
            _check_shape(state[key], shape, key, what, source)
    return PublishedLayout(branches, fusion=True)


def _check_shape(tensor: Tensor, shape: tuple[int, ...], key: str, what: str, source: str) -> None:
    if tuple(tensor.shape) != shape:
        raise DataError(
            f"{source}: {key} has shape {tuple(tensor.shape)}, expected {shape} ({what})."
        )


def published_config(
    layout: PublishedLayout,
    *,
    dataset: str,
    modality: str | None,
    alpha: float,
    s_enc: int,
    s_ant: int,
    task: str = "anticipation",
) -> BranchRunConfig | FusionRunConfig:
    """The sfr config of a published model: the published settings with the inferred sizes.

    Early recognition (`task`) gets `data.task = "early_recognition"` and the published selection:
    top-1 action accuracy (EK100: mean top-5 recall) with the whole action observed, as
    `configs/<dataset>/early_<modality>.toml`.

    A branch gets the settings of `configs/<dataset>/<modality>_a0.25.toml`, a fusion those of
    `configs/<dataset>/rulstm_matt.toml`; feature sizes other than the public ones (1024, 1024,
    352) are recorded in `data.feature_dims`, the classes in `data.num_classes`.
    """
    if dataset not in DATASETS:
        raise ConfigError(
            f"Unknown dataset {dataset!r} for a published RU-LSTM checkpoint.",
            f"Pass one of: {', '.join(DATASETS)}.",
        )
    if alpha <= 0 or s_enc < 0 or s_ant < 1:
        raise ConfigError(
            f"alpha {alpha:g}, s_enc {s_enc}, s_ant {s_ant} is no time grid.",
            "alpha must be > 0, s_enc >= 0 and s_ant >= 1.",
        )
    modalities = _modalities(layout, modality)
    dims = {m: b.feat_dim for m, b in zip(modalities, layout.branches, strict=True)}
    run: dict[str, Any] = {"seed": 0, "select_time": _selection_time(alpha, s_enc, s_ant, task)}
    if dataset == "ek100":
        run["select"] = "mt5r"
    elif task == "early_recognition":
        run["select"] = "top1"
    tree: dict[str, Any] = {
        "data": {
            "dataset": dataset,
            "task": task,
            "num_classes": layout.num_classes,
            "feature_dims": {m: d for m, d in dims.items() if d != PUBLIC_FEATURE_DIMS[m]},
        },
        "optim": {**_OPTIM, "epochs": _EARLY_EPOCHS}
        if task == "early_recognition"
        else dict(_OPTIM),
        "run": run,
    }
    if not layout.fusion:
        tree["branch"] = {
            "modality": modalities[0],
            "alpha": alpha,
            "s_enc": s_enc,
            "s_ant": s_ant,
            "hidden": layout.hidden,
            "dropout": _DROPOUT,
        }
        return build_config(BranchRunConfig, tree, source="published settings")
    tree["model"] = {
        "architecture": "arch2",
        "modalities": list(modalities),
        "rates": [{"alpha": alpha, "s_enc": s_enc, "s_ant": s_ant}],
        "hidden": layout.hidden,
        "branch_dropout": _DROPOUT,
        "modality_dropout": _DROPOUT,
        "rate_dropout": _RATE_DROPOUT,
    }
    tree["fusion_optim"] = dict(_OPTIM)
    return build_config(FusionRunConfig, tree, source="published settings")


def _modalities(layout: PublishedLayout, modality: str | None) -> tuple[str, ...]:
    """The modality of each branch: given for a branch (or told by 352-d features), fixed for MATT."""
    if layout.fusion:
        if modality not in (None, "fusion"):
            raise ConfigError(
                f"The checkpoint is a MATT fusion of {len(layout.branches)} branches, not a "
                f"{modality} branch.",
                "Leave out --modality for a fusion checkpoint.",
            )
        if len(layout.branches) != len(PUBLISHED_FUSION_MODALITIES):
            raise ConfigError(
                f"The checkpoint fuses {len(layout.branches)} branches; the published MATT fuses "
                f"{', '.join(PUBLISHED_FUSION_MODALITIES)}.",
                "Pass a fusion config whose model.modalities lists its branches in order.",
            )
        return PUBLISHED_FUSION_MODALITIES
    feat_dim = layout.branches[0].feat_dim
    if modality is None:
        if feat_dim == PUBLIC_FEATURE_DIMS["obj"]:
            return ("obj",)
        raise ConfigError(
            f"The checkpoint is a branch over {feat_dim}-d features: its modality cannot be told "
            "from its shapes (rgb and flow branches have the same).",
            "Pass --modality rgb, flow or obj.",
        )
    if modality not in MODALITIES:
        raise ConfigError(
            f"The checkpoint is a single branch: modality {modality!r} does not fit it.",
            "Pass --modality rgb, flow or obj.",
        )
    return (modality,)


def _selection_time(alpha: float, s_enc: int, s_ant: int, task: str = "anticipation") -> float:
    """1 s where the grid anticipates it (as sfr's presets), else the step the published code
    selects on (the 4th-last); early recognition: the whole action observed (ratio 1)."""
    if task == "early_recognition":
        return 1.0
    times = TimeGrid(alpha, s_enc, s_ant).anticipation_times
    return 1.0 if 1.0 in times else times[max(len(times) - 4, 0)]


def _check_config(
    config: BranchRunConfig | FusionRunConfig, layout: PublishedLayout, modality: str | None
) -> None:
    """Refuse a given config whose kind or sizes differ from the checkpoint's, naming the field."""
    problems = []
    if layout.fusion != isinstance(config, FusionRunConfig):
        want = "a fusion config" if layout.fusion else "a branch config"
        raise ConfigError(f"The checkpoint is a {layout.kind}: it needs {want}.")
    if isinstance(config, BranchRunConfig):
        modalities: tuple[str, ...] = (config.branch.modality,)
        if modality not in (None, config.branch.modality):
            problems.append(f"branch.modality is {config.branch.modality}, not {modality}")
        hidden = ("branch.hidden", config.branch.hidden)
    else:
        modalities = tuple(config.model.modalities)
        if modality not in (None, "fusion"):
            problems.append(f"the checkpoint is a fusion, not a {modality} branch")
        if len(modalities) != len(layout.branches):
            problems.append(
                f"model.modalities lists {len(modalities)}, the checkpoint fuses "
                f"{len(layout.branches)}"
            )
        hidden = ("model.hidden", config.model.hidden)
    if hidden[1] != layout.hidden:
        problems.append(f"{hidden[0]} is {hidden[1]}, the checkpoint's is {layout.hidden}")
    for m, branch in zip(modalities, layout.branches):
        if config.data.feature_dim(m) != branch.feat_dim:
            problems.append(
                f"data.feature_dims.{m} is {config.data.feature_dim(m)}, the checkpoint's is "
                f"{branch.feat_dim}"
            )
    if config.data.num_classes not in (None, layout.num_classes):
        problems.append(
            f"data.num_classes is {config.data.num_classes}, the checkpoint has "
            f"{layout.num_classes}"
        )
    if problems:
        raise ConfigError(
            "The config does not fit the checkpoint: " + "; ".join(problems) + ".",
            "Fix those fields, or convert without a config to use the published settings.",
        )


def _fusion_unit(config: FusionRunConfig, alpha: float | None) -> tuple[str, RateConfig]:
    """The modality fusion a published MATT becomes: the config's unit at rate `alpha` (default:
    its only rate, else the published 0.25) over its modalities; its label and rate."""
    rates = config.model.rates
    wanted = alpha if alpha is not None else rates[0].alpha if len(rates) == 1 else 0.25
    rate = next((r for r in rates if as_time(r.alpha) == as_time(wanted)), None)
    if rate is None:
        raise ConfigError(
            f"The config has no rate at alpha {wanted:g} for the published MATT "
            f"(its rates: {', '.join(f'{r.alpha:g}' for r in rates)}).",
            "Pass alpha to choose one of its rates.",
        )
    inputs = tuple(leaf_label(m, rate.alpha) for m in config.model.modalities)
    for unit in ModelTree(config).units:
        if unit.inputs == inputs:
            return unit.label, rate
    raise ConfigError(
        f"The config has no unit fusing {', '.join(inputs)}, which is what a published MATT is.",
        "Use an Architecture 2 config: its first level fuses the modalities of each rate.",
    )


def convert_state(
    container: Mapping[str, Any],
    source: Path,
    config: BranchRunConfig | FusionRunConfig | None = None,
    *,
    dataset: str | None = None,
    modality: str | None = None,
    alpha: float | None = None,
    s_enc: int | None = None,
    s_ant: int | None = None,
    task: str | None = None,
    sequence_completion: bool | None = None,
    source_sha256: str,
) -> Conversion:
    """Convert a published container in memory (see `convert_checkpoint` for the arguments)."""
    source = Path(source)
    state = container["state_dict"]
    if not isinstance(state, Mapping):
        raise DataError(f"{source}: its 'state_dict' is not a mapping of names to tensors.")
    layout = inspect_state(state, str(source))
    task = _task(task, config, source)
    if sequence_completion is None:  # the published names: `..._sequence_completion_best`
        sequence_completion = "_sequence_completion" in source.name
    if sequence_completion and layout.fusion:
        raise ConfigError(
            f"{source} is a MATT fusion; only branches are pre-trained by sequence completion."
        )
    if config is None:
        grid = PUBLISHED_GRIDS[task]
        try:
            config = published_config(
                layout,
                dataset=dataset or "ek55",
                modality=modality,
                alpha=grid[0] if alpha is None else alpha,
                s_enc=grid[1] if s_enc is None else s_enc,
                s_ant=grid[2] if s_ant is None else s_ant,
                task=task,
            )
        except ConfigError as error:
            raise ConfigError(f"{source}: {error.message}", error.hint) from None
    else:
        own_alpha = alpha is not None and isinstance(config, BranchRunConfig)
        if own_alpha or s_enc is not None or s_ant is not None:
            raise ConfigError(
                "The time grid comes from the given config: do not pass alpha, s_enc or s_ant "
                "as well (alpha only chooses the rate of a fusion config)."
            )
        if dataset not in (None, config.data.dataset):
            raise ConfigError(f"The given config is for {config.data.dataset}, not {dataset}.")
        _check_config(config, layout, modality)
    num_classes = layout.num_classes
    if isinstance(config, BranchRunConfig):
        stage = "pretrain" if sequence_completion else "finetune"
        tensors = {k: v.float() for k, v in branch_state_from_published(dict(state)).items()}
        spec = branch_spec(config, num_classes)
        branch = config.branch
        grid_settings = (branch.alpha, branch.s_enc, branch.s_ant)
        inferred: dict[str, Any] = {"modality": branch.modality, "feat_dim": spec["feat_dim"]}
    else:
        stage, rate = _fusion_unit(config, alpha)
        tensors = _fusion_tensors(state, len(layout.branches))
        spec = ModelTree(config).spec(stage, num_classes)
        grid_settings = (rate.alpha, rate.s_enc, rate.s_ant)
        inferred = {
            "modality": "fusion",
            "feat_dims": {m: b.feat_dim for m, b in zip(config.model.modalities, layout.branches)},
            "branches": len(layout.branches),
        }
    epoch = _integer(container, "epoch", source)
    perf = _number(container, "perf", source)
    selection = {"measure": config.run.select, "time": config.run.select_time}
    metadata = {
        "kind": layout.kind,
        "stage": stage,
        "config": config.model_dump(mode="json"),
        "model": spec,
        # the published code saves the number of finished epochs: the best one's number from 1
        "epoch": max(epoch, 1) if epoch is not None else 1,
        "metrics": _published_metrics(perf, task, grid_settings, selection),
        "selection": selection,
        "converted": {
            "source": source.name,
            "sha256": source_sha256,
            "task": task,
            "epoch": epoch,
            "perf": perf,
            "best_perf": _number(container, "best_perf", source),
            "inferred": {
                **inferred,
                "alpha": grid_settings[0],
                "s_enc": grid_settings[1],
                "s_ant": grid_settings[2],
                "hidden": layout.hidden,
                "num_classes": num_classes,
            },
        },
    }
    return Conversion(tensors, metadata, config)


def _task(task: str | None, config: BranchRunConfig | FusionRunConfig | None, source: Path) -> str:
    """The task of a conversion: given, else the config's, else the published file name's
    (`RULSTM-early_recognition_...`), else anticipation; a given task must be the config's."""
    if task is not None and task not in PUBLISHED_GRIDS:
        raise ConfigError(f"Unknown task {task!r}.", f"Pass one of: {', '.join(PUBLISHED_GRIDS)}.")
    if config is not None:
        if task not in (None, config.data.task):
            raise ConfigError(
                f"The given config is for {config.data.task}, not {task}.",
                "Leave out the task (the config's holds) or fix data.task in the config.",
            )
        return config.data.task
    if task is not None:
        return task
    return "early_recognition" if "early_recognition" in source.name else "anticipation"


def _fusion_tensors(state: Mapping[str, Tensor], num_branches: int) -> dict[str, Tensor]:
    """A published fusion's weights under `FusionNode` keys: `inputs.<i>.branch.*`, `attention.mlp.*`."""
    tensors: dict[str, Tensor] = {}
    for index in range(num_branches):
        branch = branch_state_from_published(dict(state), prefix=f"branches.{index}.")
        tensors.update(add_prefix(branch, f"inputs.{index}.branch"))
    for key, value in state.items():
        if key.startswith("MATT."):
            tensors["attention.mlp." + key.removeprefix("MATT.")] = value
    return {key: value.float() for key, value in tensors.items()}


def _published_metrics(
    perf: float | None,
    task: str,
    grid: tuple[float, int, int],
    selection: dict[str, Any],
) -> dict[str, float]:
    """The published validation value under sfr's name for it, where it is the same measure.

    The published code selects anticipation models on the 4th-last step (top-5 accuracy, or
    mean top-5 recall on EK100), in percent; early recognition on the last step, the whole
    action observed (top-1 accuracy, or mean top-5 recall on EK100).
    """
    alpha, _, s_ant = grid
    if perf is None:
        return {}
    if task == "early_recognition":
        if as_time(selection["time"]) != 1.0:
            return {}
        return {f"{selection['measure']}@1": perf}
    if s_ant < 4:
        return {}
    if as_time(4 * alpha) != as_time(selection["time"]):
        return {}
    return {f"{selection['measure']}@{selection['time']:g}": perf}


def _number(container: Mapping[str, Any], key: str, source: Path) -> float | None:
    """A published scalar (numpy float64) as a float; None where the container has none."""
    value = container.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{source}: '{key}' is {value!r}, not a number.") from None


def _integer(container: Mapping[str, Any], key: str, source: Path) -> int | None:
    """A published count as an int; None where the container has none."""
    value = _number(container, key, source)
    return None if value is None else int(value)


def convert_checkpoint(
    source: Path,
    out: Path | None,
    config: BranchRunConfig | FusionRunConfig | None = None,
    *,
    dataset: str | None = None,
    modality: str | None = None,
    alpha: float | None = None,
    s_enc: int | None = None,
    s_ant: int | None = None,
    task: str | None = None,
    sequence_completion: bool | None = None,
    source_sha256: str | None = None,
    rates: Sequence[str] = (),
    into: Path | None = None,
    force: bool = False,
    on_part: Callable[[PartInstalled], None] = lambda part: None,
) -> Conversion:
    """Convert a published RU-LSTM checkpoint into one sfr checkpoint file (`sfr.load_model` reads it).

    With `into` (a runs folder) instead of `out`, the conversion is installed as the finished stage
    it is (`install_conversion`), where `sfr fuse`, `sfr pipeline` and `sfr validate` find it; a
    fusion with every unit and branch below it (`on_part` is told of each).

    Checkpoints of the Slow-Fast RU-LSTM code are recognised by their layout and converted by
    `sfr.hub.slowfast` (`rates`: `ALPHA:S_ENC:S_ANT` each, where the file name does not state them).

    Without `config`, the published settings of `dataset` (default ek55) hold, with the sizes
    read from the tensors; `alpha`/`s_enc`/`s_ant` override the published grid of `task`
    (0.25/6/8; early recognition 0.25/0/8; default: the config's task, else early recognition
    when the file name says `early_recognition`, as the published names do, else anticipation). With `config`, its settings hold and must fit the
    tensors; a fusion becomes its modality fusion at rate `alpha` (default: its only rate, else
    0.25). `modality` is needed for a branch unless its 352-d features say obj. A branch is
    converted as fine-tuned (stage `finetune`) unless `sequence_completion` (by default: the
    published `_sequence_completion` file name) makes it a pre-training (stage `pretrain`,
    unrolled over the true future inputs): the weights cannot tell. `out` (or a run in `into`)
    is replaced only with `force`.
    """
    source = Path(source)
    if (out is None) == (into is None):
        raise ConfigError(
            "Give either an output file or a runs folder to install into, not both or neither.",
            "sfr convert FILE OUT.safetensors, or sfr convert FILE --into RUNS.",
        )
    if out is not None:
        refuse_existing(
            check_output_file(Path(out), "converted checkpoint", ".safetensors"),
            "converted checkpoint",
            force,
        )
    else:
        check_folder_path(Path(into), "runs (--into)")  # type: ignore[arg-type]
    container = load_published_checkpoint(source)
    conversion = _convert_any(
        container,
        source,
        config,
        rates=rates,
        dataset=dataset,
        modality=modality,
        alpha=alpha,
        s_enc=s_enc,
        s_ant=s_ant,
        task=task,
        sequence_completion=sequence_completion,
        source_sha256=source_sha256 or sha256_file(source),
    )
    if into is not None:
        install_conversion(conversion, Path(into), force=force, on_part=on_part)
    else:
        save_checkpoint(Path(out), conversion.tensors, conversion.metadata)  # type: ignore[arg-type]
    return conversion


def _convert_any(
    container: Mapping[str, Any],
    source: Path,
    config: BranchRunConfig | FusionRunConfig | None = None,
    *,
    rates: Sequence[str] = (),
    **settings: Any,
) -> Conversion:
    """`convert_state`, or the Slow-Fast conversion where the state has a Slow-Fast layout."""
    from sfr.hub import slowfast  # builds on this module

    state = container.get("state_dict")
    parsed = [slowfast.parse_rate(text) for text in rates]
    if isinstance(state, Mapping) and slowfast.is_slowfast_state(state):
        if config is not None:
            raise ConfigError(
                f"{source} is a Slow-Fast RU-LSTM checkpoint: it is converted with the published "
                "settings, not a given config."
            )
        grid = [settings.pop(key) for key in ("alpha", "s_enc", "s_ant")]
        if any(value is not None for value in grid):
            raise ConfigError(
                f"{source} is a Slow-Fast RU-LSTM checkpoint: give its grid as --rates "
                "ALPHA:S_ENC:S_ANT, not --alpha/--s-enc/--s-ant."
            )
        if settings.get("task") not in (None, "anticipation") or settings.get(
            "sequence_completion"
        ):
            raise ConfigError(
                f"{source} is a Slow-Fast RU-LSTM checkpoint: only anticipation models are "
                "converted from it."
            )
        return slowfast.convert_slowfast_state(
            container,
            source,
            dataset=settings.get("dataset"),
            modality=settings.get("modality"),
            rates=parsed,
            source_sha256=settings["source_sha256"],
        )
    named_rates, named_modality = slowfast.name_settings(source.name)
    if settings.get("modality") is None and named_modality in MODALITIES:
        settings["modality"] = named_modality  # the published names end in _<modality>_best
    grid_given = any(settings.get(k) is not None for k in ("alpha", "s_enc", "s_ant"))
    if not parsed and not grid_given and config is None and len(named_rates) == 1:
        parsed = named_rates  # ..._<alpha>_<S_enc>_<S_ant>_<modality>_best.pth.tar
    if parsed:
        if len(parsed) != 1 or any(
            settings.get(k) is not None for k in ("alpha", "s_enc", "s_ant")
        ):
            raise ConfigError(
                f"{source} is an RU-LSTM checkpoint of one rate: pass at most one --rates "
                "(or --alpha/--s-enc/--s-ant)."
            )
        (rate,) = parsed
        settings.update(alpha=rate.alpha, s_enc=rate.s_enc, s_ant=rate.s_ant)
    return convert_state(container, source, config, **settings)


def install_published(
    checkpoint: Path,
    *,
    dataset: str,
    modality: str,
    task: str,
    runs_dir: Path,
    source_sha256: str,
    force: bool = False,
) -> Path:
    """Convert a downloaded published checkpoint and install it where sfr looks for it; its path.

    Anticipation (published grid 0.25/6/8): a branch becomes the finished fine-tuning stage
    `RUNS/<dataset>/<modality>-a0.25-enc6-ant8/finetune/` (best.safetensors, config.json,
    status.json), the run `sfr fuse`/`sfr pipeline` start from for the alpha 0.25 branches; the
    MATT fusion (`modality` "fusion") becomes the level-1 unit of the one-rate `rulstm_matt`
    config, `RUNS/<dataset>/arch2-rgb+flow+obj-a0.25-enc6-ant8/rgb+flow+obj@0.25/`.
    Early recognition (published grid 0.25/0/8: 8 frames spread over the action) becomes the
    finished fine-tuning stage `RUNS/<dataset>/early-<modality>-a0.25-enc0-ant8/finetune/`, the
    run `configs/<dataset>/early_matt.toml` fuses.
    A run or file already there is replaced only if it is this same conversion, or with `force`.
    """
    checkpoint = Path(checkpoint)
    conversion = convert_state(
        load_published_checkpoint(checkpoint),
        checkpoint,
        dataset=dataset,
        modality=modality,
        task=task,
        source_sha256=source_sha256,
    )
    return install_conversion(conversion, runs_dir, force=force)


def conversion_run(conversion: Conversion, runs_dir: Path) -> RunDir:
    """The run folder a conversion is installed in (see `install_conversion`)."""
    config = conversion.config
    if isinstance(config, BranchRunConfig):
        return RunDir(Path(runs_dir) / config.branch_dir / conversion.stage)
    return RunDir(Path(runs_dir) / config.fusion_dir / conversion.stage)


@dataclass(frozen=True)
class PartInstalled:
    """A unit or branch below an installed fusion, written as its own finished run (`kept`
    None), or not written because its run folder holds something else (`kept` says what)."""

    label: str
    path: Path
    kept: str | None = None


def install_conversion(
    conversion: Conversion,
    runs_dir: Path,
    *,
    force: bool = False,
    on_part: Callable[[PartInstalled], None] = lambda part: None,
) -> Path:
    """Place a conversion as the finished stage sfr's later stages read; its best checkpoint.

    A branch becomes `RUNS/<branch_dir>/<stage>/`, a fusion unit `RUNS/<fusion_dir>/<unit>/`
    (best.safetensors, config.json, status.json). A run already there is replaced only if it is
    this same conversion (same source sha256), a part an earlier conversion took out of a whole
    model (below), or with `force`.

    A fusion also places every unit and branch below it as the finished run `sfr pipeline`
    would have left (a unit `RUNS/<fusion_dir>/<unit>/`, a branch its fine-tuning
    `RUNS/<branch_dir>/finetune/`), each holding its own weights taken from the fusion, so that
    `sfr validate --levels` scores every level of a converted whole model and `sfr pipeline`
    continues from it. A part whose folder holds anything but a part of this same conversion
    (a published branch converted on its own, a trained run) is kept as it is, also with
    `force` (the fusion carries its own copy of those weights); `on_part` is told of each part.
    """
    run = conversion_run(conversion, runs_dir)
    _make_room(run, conversion.converted["sha256"], force)
    _write_run(run, conversion.tensors, conversion.metadata, conversion.converted["perf"])
    if isinstance(conversion.config, FusionRunConfig):
        for label, part_run, tensors, metadata in _parts(conversion, Path(runs_dir)):
            kept = _occupied_by(part_run, conversion.converted["sha256"], force)
            if kept is None:
                _write_run(part_run, tensors, metadata, None)
            on_part(PartInstalled(label, part_run.best_path, kept))
    return run.best_path


def _write_run(
    run: RunDir, tensors: dict[str, Tensor], metadata: dict[str, Any], best: float | None
) -> None:
    """A finished run of a converted checkpoint: best.safetensors, config.json, status.json
    (`best`: the published measure, where it is this run's)."""
    try:
        run.root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(
            f"The run folder {run.root} cannot be made: {error.strerror or error}.",
            "Choose a runs folder you can write to (--into).",
        ) from None
    save_checkpoint(run.best_path, tensors, metadata)
    atomic_write_text(run.config_path, json.dumps(metadata["config"], indent=2, sort_keys=True))
    epoch = metadata["epoch"] - 1  # set_status takes 0-based indexes
    run.set_status(
        "finished",
        epoch=epoch,
        best=best,
        best_epoch=epoch,
        converted_from=metadata["converted"]["source"],
    )


def _parts(
    conversion: Conversion, runs_dir: Path
) -> list[tuple[str, RunDir, dict[str, Tensor], dict[str, Any]]]:
    """Every unit and branch below a converted fusion unit: (label, run, tensors, metadata).

    The weights of input `i` of a unit are its tensors under `inputs.<i>.`; a branch's are those
    under `inputs.<i>.branch.`. Parts record no measure (the published file scored only the
    whole) and name what they were taken from (`converted.part_of`).
    """
    config = conversion.config
    assert isinstance(config, FusionRunConfig)
    tree = ModelTree(config)
    num_classes = conversion.metadata["model"]["num_classes"]
    converted = {**conversion.converted, "part_of": conversion.stage}
    parts = []
    pending = [(conversion.stage, "")]
    while pending:
        label, prefix = pending.pop(0)
        for index, child in enumerate(tree.by_label[label].inputs):
            inner = f"{prefix}inputs.{index}."
            if child in tree.branch_rates:
                modality, rate = tree.branch_rates[child]
                branch = config.branch_config(modality, rate)
                tensors = _under(conversion.tensors, inner + "branch.")
                metadata = {
                    "kind": "branch",
                    "stage": "finetune",
                    "config": branch.model_dump(mode="json"),
                    "model": branch_spec(branch, num_classes),
                    "selection": {"measure": branch.run.select, "time": branch.run.select_time},
                }
                run = RunDir(runs_dir / branch.branch_dir / "finetune")
            else:
                pending.append((child, inner))
                tensors = _under(conversion.tensors, inner)
                metadata = {
                    **conversion.metadata,
                    "stage": child,
                    "model": tree.spec(child, num_classes),
                }
                run = RunDir(runs_dir / config.fusion_dir / child)
            metadata.update(epoch=conversion.metadata["epoch"], metrics={}, converted=converted)
            parts.append((child, run, tensors, metadata))
    return parts


def _under(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under `prefix`, with the prefix removed."""
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def _occupied_by(run: RunDir, source_sha256: str, force: bool) -> str | None:
    """What keeps a part's run folder from being written (None: free, or a part sfr took out of
    this same source, or with `force` out of another)."""
    if not run.root.exists():
        return None
    converted = _converted_record(run.best_path)
    if converted is not None and converted.get("part_of"):
        if converted.get("sha256") == source_sha256 or force:
            run.clear()
            return None
        return f"it holds a part of the conversion of {converted.get('source')}"
    if converted:
        return f"it holds the conversion of {converted.get('source')}"
    return "it holds a run sfr trained (or files sfr did not write)"


def _converted_record(best: Path) -> dict[str, Any] | None:
    """The `converted` entry of a checkpoint; {} for a checkpoint without one (trained by sfr),
    None where there is no readable checkpoint."""
    if not best.is_file():
        return None
    try:
        return read_metadata(best).get("converted") or {}
    except SfrError:
        return None


def _make_room(run: RunDir, source_sha256: str, force: bool) -> None:
    """Clear the run folder for an installation, or refuse naming what is there.

    The same conversion (same source sha256) is replaced silently; anything else only with
    `force`, which deletes only the files sfr wrote there (sfr's one overwrite rule).
    """
    target = check_folder_path(run.root, "run")
    remove_stale_temp_files(target)  # of writes killed midway
    if not target.exists():
        return
    holds = "files sfr did not convert from this checkpoint"
    converted = _converted_record(run.best_path)
    if converted is not None:
        if converted.get("sha256") == source_sha256:
            return
        if converted.get("part_of"):
            force = True  # a part sfr took out of a whole model: this direct conversion replaces it
        elif converted:
            holds = f"a conversion of {converted.get('source')}"
        else:
            holds = "a model trained by sfr"
    if not force:
        raise existing_output(target, "run folder", holds)
    run.clear()
