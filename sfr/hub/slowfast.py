"""Conversion of published Slow-Fast RU-LSTM checkpoints (Osman et al., ICCV-W 2021) into sfr.

The Slow-Fast code saves the same `{'state_dict', 'epoch', 'perf', 'best_perf'}` container as
RU-LSTM, with other layouts (its `models.py` classes):

    per-rate branch   RULSTM-anticipation_0.125_24_16_rgb_best      RU-LSTM keys + fast_slow_fusion.1.*
    per-rate MATT     RULSTM-anticipation_0.5_6_4_fusion_best       branches.{rgb,flow,obj}.*, MATT.*
    single modality   ..._0.125_24_16_0.5_6_4_rgb_best               branches.{fast,slow}.*, MATT.*
    Architecture 2    ..._0.125_24_16_0.5_6_4_fusion_best            branches.{rate}.branches.{modality}.*
    Architecture 1    (same name, --arc1)                            branches.{modality}.branches.{rate}.*

Every branch carries a `fast_slow_fusion` linear that no forward pass uses: it is dropped (and
reported). The rates come from the file name (the published `--alphas_fused`, `--S_enc_fused`,
`--S_ant_fused`), else from `rates`. The published slow-fast classes feed each rate other than
0.5 only its last T - 12 steps (`inputs[:, 12:]`), so a fast rate named 0.125_24_16 is fused on
12 + 16 steps: sfr's `fusion_s_enc`. Whole models become the final unit of an Architecture 1 or 2
config, per-rate MATTs and single-modality models its level-1 units (so `sfr fuse` continues from
them), per-rate branches a branch's fine-tuning.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from sfr.config import MODALITIES, PUBLIC_FEATURE_DIMS, FusionRunConfig, build_config
from sfr.data.timegrid import as_time
from sfr.errors import ConfigError, DataError, SfrError
from sfr.files import sha256_file
from sfr.hub.convert import (
    _DROPOUT,
    _OPTIM,
    _RATE_DROPOUT,
    PUBLISHED_FUSION_MODALITIES,
    Conversion,
    PublishedBranch,
    _check_shape,
    _inspect_branch,
    _integer,
    _number,
    conversion_run,
    convert_state,
    fusion_branch_indices,
    install_conversion,
)
from sfr.hub.published import branch_state_from_published, load_published_checkpoint
from sfr.models.tree import ModelTree

UNUSED_PREFIX = "fast_slow_fusion."
# The published slow-fast classes drop the first 12 steps of every rate other than 0.5.
PUBLISHED_SLICE = 12
SLICE_FREE_ALPHA = 0.5
# The rates of the paper (file names RULSTM-anticipation_0.125_24_16_0.5_6_4_*).
PAPER_RATES: tuple[tuple[float, int, int], ...] = ((0.125, 24, 16), (0.5, 6, 4))

SlowFastKind = Literal["branch", "rate_fusion", "single", "arch1", "arch2"]
KIND_TEXT: dict[str, str] = {
    "branch": "Slow-Fast per-rate branch",
    "rate_fusion": "Slow-Fast per-rate MATT fusion",
    "single": "Slow-Fast single-modality model",
    "arch1": "Slow-Fast Architecture 1 whole model",
    "arch2": "Slow-Fast Architecture 2 whole model",
}
_NAME = re.compile(
    r"RULSTM-anticipation_((?:\d+(?:\.\d+)?_\d+_\d+_)+)(rgb|flow|obj|fusion)"
    r"(?:_mt5r)?(?:_sequence_completion)?(?:_best)?\.pth(?:\.tar)?$"
)


@dataclass(frozen=True)
class PublishedRate:
    """One rate as the published code names it: alpha, S_enc and S_ant of its loader."""

    alpha: float
    s_enc: int
    s_ant: int

    def __str__(self) -> str:
        return f"{self.alpha:g}:{self.s_enc}:{self.s_ant}"


@dataclass(frozen=True)
class PublishedNode:
    """A module of a published state dict: a branch (leaf) or a MATT over children."""

    branch: PublishedBranch | None
    children: tuple[PublishedNode, ...] = ()

    @property
    def depth(self) -> int:
        return 0 if self.branch is not None else 1 + max(c.depth for c in self.children)

    def leaves(self) -> list[PublishedBranch]:
        if self.branch is not None:
            return [self.branch]
        return [leaf for child in self.children for leaf in child.leaves()]


def parse_rate(text: str) -> PublishedRate:
    """`0.125:24:16` (alpha:S_enc:S_ant) as a rate; ConfigError naming the text otherwise."""
    parts = text.replace("/", ":").split(":")
    try:
        alpha, s_enc, s_ant = float(parts[0]), int(parts[1]), int(parts[2])
        if len(parts) != 3 or alpha <= 0 or s_enc < 0 or s_ant < 1:
            raise ValueError
    except (ValueError, IndexError):
        raise ConfigError(
            f"--rates {text!r} is not ALPHA:S_ENC:S_ANT.",
            "Pass each rate as the published file names give it, e.g. --rates 0.125:24:16 "
            "--rates 0.5:6:4.",
        ) from None
    return PublishedRate(alpha, s_enc, s_ant)


def name_settings(name: str) -> tuple[list[PublishedRate], str | None]:
    """Rates and modality a published file name states (`..._0.125_24_16_0.5_6_4_fusion_best`)."""
    match = _NAME.search(name)
    if match is None:
        return [], None
    numbers = match.group(1).strip("_").split("_")
    rates = [
        PublishedRate(float(numbers[i]), int(numbers[i + 1]), int(numbers[i + 2]))
        for i in range(0, len(numbers), 3)
    ]
    return rates, match.group(2)


def is_slowfast_state(state: Mapping[str, Any]) -> bool:
    """Whether a state dict was saved by the Slow-Fast code (unused linears, nested branches)."""
    return any(
        isinstance(k, str) and (UNUSED_PREFIX in k or re.match(r"branches\.\d+\.branches\.", k))
        for k in state
    )


def split_unused(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The state without the unused `fast_slow_fusion` weights, and the keys dropped."""
    kept, dropped = {}, []
    for key, value in state.items():
        parts = key.split(".")
        if UNUSED_PREFIX.rstrip(".") in parts:
            dropped.append(key)
        else:
            kept[key] = value
    return kept, dropped


def inspect_node(state: Mapping[str, Tensor], prefix: str, source: str) -> PublishedNode:
    """The module under `prefix`, every key and shape checked; DataError naming the key."""
    own = [key[len(prefix) :] for key in state if key.startswith(prefix)]
    if not any(key.startswith(("branches.", "MATT.")) for key in own):
        return PublishedNode(_inspect_branch(state, prefix, source))
    indices = fusion_branch_indices(own, prefix, source)
    children = tuple(inspect_node(state, f"{prefix}branches.{i}.", source) for i in indices)
    hidden = {leaf.hidden for leaf in PublishedNode(None, children).leaves()}
    classes = {leaf.num_classes for leaf in PublishedNode(None, children).leaves()}
    if len(hidden) != 1 or len(classes) != 1:
        raise DataError(
            f"{source}: the branches under {prefix or 'the model'} differ in hidden size or "
            "classes; a published fusion fuses branches of one size."
        )
    (size,) = hidden
    width = 2 * size * len(children)
    layers = {0: (width // 4, width), 3: (width // 8, width // 4), 6: (len(children), width // 8)}
    what = f"{len(children)} inputs of hidden {size}"
    for layer, (rows, cols) in layers.items():
        for name, shape in (("weight", (rows, cols)), ("bias", (rows,))):
            key = f"{prefix}MATT.{layer}.{name}"
            if key not in state:
                raise DataError(f"{source}: the published fusion lacks {key}.")
            _check_shape(state[key], shape, key, what, source)
    return PublishedNode(None, children)


def classify(node: PublishedNode, source: str) -> SlowFastKind:
    """Which published Slow-Fast class a module is, from its nesting and sizes."""
    if node.branch is not None:
        return "branch"
    if node.depth == 1:
        dims = [leaf.feat_dim for leaf in node.leaves()]
        if len(node.children) == 2 and dims[0] == dims[1]:
            return "single"
        if len(node.children) == len(PUBLISHED_FUSION_MODALITIES):
            return "rate_fusion"
    elif node.depth == 2 and all(child.depth == 1 for child in node.children):
        inner = {len(child.children) for child in node.children}
        if inner == {len(PUBLISHED_FUSION_MODALITIES)} and len(node.children) != 3:
            return "arch2"
        if len(node.children) == len(PUBLISHED_FUSION_MODALITIES) and inner != {3}:
            return "arch1"
    shape = f"depth {node.depth}, {len(node.children)} inputs"
    raise DataError(
        f"{source}: a fusion of {shape} is none of the published Slow-Fast layouts (per-rate "
        "MATT of rgb/flow/obj, single-modality slow-fast, Architecture 1 or 2)."
    )


def _fusion_rates(published: Sequence[PublishedRate], source: str) -> list[dict[str, Any]]:
    """sfr rates of a whole slow-fast model: the published slicing as `fusion_s_enc`."""
    if len(published) < 2:
        raise ConfigError(
            f"{source}: a slow-fast model fuses several rates; {len(published)} given.",
            "Pass every rate: --rates 0.125:24:16 --rates 0.5:6:4.",
        )
    rates = []
    for rate in published:
        entry: dict[str, Any] = {"alpha": rate.alpha, "s_enc": rate.s_enc, "s_ant": rate.s_ant}
        if as_time(rate.alpha) != SLICE_FREE_ALPHA:
            if rate.s_enc < PUBLISHED_SLICE:
                raise ConfigError(
                    f"{source}: rate {rate} has {rate.s_enc} encoding steps, but the published "
                    f"slow-fast classes drop the first {PUBLISHED_SLICE} of every rate but 0.5.",
                    "Check --rates (the published fast rate is 0.125:24:16).",
                )
            entry["fusion_s_enc"] = rate.s_enc - PUBLISHED_SLICE
        rates.append(entry)
    return rates


def _paper_rates(own: PublishedRate, fused: bool) -> list[dict[str, Any]] | None:
    """The paper's two rates if `own` (a per-rate file's grid) is one of them, else None."""
    rates = _fusion_rates([PublishedRate(*r) for r in PAPER_RATES], "paper")
    for rate in rates:
        s_enc = rate.get("fusion_s_enc", rate["s_enc"]) if fused else rate["s_enc"]
        if (as_time(rate["alpha"]), s_enc, rate["s_ant"]) == (
            as_time(own.alpha),
            own.s_enc,
            own.s_ant,
        ):
            return rates
    return None


def _config(
    *,
    dataset: str,
    architecture: str,
    modalities: Sequence[str],
    dims: Mapping[str, int],
    rates: list[dict[str, Any]],
    hidden: int,
    num_classes: int,
) -> FusionRunConfig:
    run: dict[str, Any] = {"seed": 0, "select_time": 1.0}
    if dataset == "ek100":
        run["select"] = "mt5r"
    tree = {
        "data": {
            "dataset": dataset,
            "num_classes": num_classes,
            "feature_dims": {m: d for m, d in dims.items() if d != PUBLIC_FEATURE_DIMS[m]},
        },
        "model": {
            "architecture": architecture,
            "modalities": list(modalities),
            "rates": rates,
            "hidden": hidden,
            "branch_dropout": _DROPOUT,
            "modality_dropout": _DROPOUT,
            "rate_dropout": _RATE_DROPOUT,
        },
        "optim": dict(_OPTIM),
        "fusion_optim": dict(_OPTIM),
        "run": run,
    }
    return build_config(FusionRunConfig, tree, source="published Slow-Fast settings")


def tree_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Published nested keys as `FusionNode` keys: `branches.i.` → `inputs.i.`, `MATT.` →
    `attention.mlp.`, a branch's own keys → `branch.` + `RULSTMBranch` keys."""
    tensors: dict[str, Tensor] = {}
    for key, value in state.items():
        rest, out = key, ""
        while match := re.match(r"branches\.(\d+)\.", rest):
            out += f"inputs.{match.group(1)}."
            rest = rest[match.end() :]
        if rest.startswith("MATT."):
            tensors[out + "attention.mlp." + rest.removeprefix("MATT.")] = value.float()
        else:
            (renamed,) = branch_state_from_published({rest: value}).items()
            tensors[out + "branch." + renamed[0]] = renamed[1].float()
    return tensors


def _modality_of(leaf: PublishedBranch, given: str | None, named: str | None, source: str) -> str:
    modality = given or (named if named in MODALITIES else None)
    if modality is None and leaf.feat_dim == PUBLIC_FEATURE_DIMS["obj"]:
        modality = "obj"
    if modality not in MODALITIES:
        raise ConfigError(
            f"{source}: the modality of this single-modality model cannot be told from its "
            f"shapes ({leaf.feat_dim}-d features) or its file name.",
            "Pass --modality rgb, flow or obj.",
        )
    return modality  # type: ignore[return-value]


def _alpha(rate: PublishedRate) -> float:
    return rate.alpha


def convert_slowfast_state(
    container: Mapping[str, Any],
    source: Path,
    *,
    dataset: str | None = None,
    modality: str | None = None,
    rates: Sequence[PublishedRate] = (),
    source_sha256: str,
) -> Conversion:
    """Convert a published Slow-Fast container in memory (see `convert_checkpoint`)."""
    source = Path(source)
    dataset = dataset or "ek55"
    kept, dropped = split_unused(container["state_dict"])
    node = inspect_node(kept, "", str(source))
    kind = classify(node, str(source))
    named_rates, named_modality = name_settings(source.name)
    published = list(rates) or named_rates
    if kind in ("branch", "rate_fusion") and len(published) > 1 and not rates:
        published = []
    if kind in ("branch", "rate_fusion") and len(published) != 1:
        raise ConfigError(
            f"{source}: a {KIND_TEXT[kind]} runs at one rate, which its file name does not "
            "state" + (f" ({len(published)} given)" if published else "") + ".",
            "Pass its rate: --rates ALPHA:S_ENC:S_ANT (e.g. --rates 0.125:24:16).",
        )
    if kind not in ("branch", "rate_fusion") and not published:
        raise ConfigError(
            f"{source}: a {KIND_TEXT[kind]}; its rates cannot be told from its shapes or its "
            "file name.",
            "Pass them as the published command did: --rates 0.125:24:16 --rates 0.5:6:4.",
        )
    extra = {"layout": kind, "dropped": sorted(dropped)}
    if kind == "branch":
        (rate,) = published
        conversion = convert_state(
            {**container, "state_dict": kept},
            source,
            dataset=dataset,
            modality=modality or (named_modality if named_modality in MODALITIES else None),
            alpha=rate.alpha,
            s_enc=rate.s_enc,
            s_ant=rate.s_ant,
            source_sha256=source_sha256,
        )
        conversion.converted.update(extra)
        return conversion
    leaves = node.leaves()
    first = leaves[0]
    if kind == "rate_fusion":
        (rate,) = published
        modalities: Sequence[str] = PUBLISHED_FUSION_MODALITIES
        architecture = "arch2"
        config_rates = _paper_rates(rate, fused=True) or [
            {"alpha": rate.alpha, "s_enc": rate.s_enc, "s_ant": rate.s_ant}
        ]
    else:
        alphas = [rate.alpha for rate in published]
        if alphas != sorted(alphas) or len(set(alphas)) != len(alphas):
            given = " ".join(f"--rates {rate}" for rate in published)
            ordered = " ".join(f"--rates {rate}" for rate in sorted(published, key=_alpha))
            raise ConfigError(
                f"{source}: rates are listed fastest first (the smallest alpha first, as the "
                f"published --alphas_fused 0.125 0.5), each once; got {given}.",
                f"Pass {ordered}.",
            )
        config_rates = _fusion_rates(published, str(source))
        if kind == "single":
            modalities = (_modality_of(first, modality, named_modality, str(source)),)
            architecture = "arch1"
        else:
            modalities = PUBLISHED_FUSION_MODALITIES
            architecture = kind
        rate_count = (
            len(node.children) if kind in ("single", "arch2") else len(node.children[0].children)
        )
        if rate_count != len(config_rates):
            raise ConfigError(
                f"{source}: the model fuses {rate_count} rates but {len(config_rates)} are "
                f"given ({', '.join(map(str, published))}).",
                "Pass one --rates per rate, fastest first, as --alphas_fused lists them.",
            )
    if kind == "arch1":
        dims = {m: child.leaves()[0].feat_dim for m, child in zip(modalities, node.children)}
    elif kind == "arch2":
        dims = {m: leaf.feat_dim for m, leaf in zip(modalities, node.children[0].leaves())}
    else:
        dims = {m: leaf.feat_dim for m, leaf in zip(modalities, leaves)}
    config = _config(
        dataset=dataset,
        architecture=architecture,
        modalities=modalities if kind != "single" else MODALITIES,
        dims=dims,
        rates=config_rates,
        hidden=first.hidden,
        num_classes=first.num_classes,
    )
    stage = _stage(config, kind, modalities, rate if kind == "rate_fusion" else None)
    tensors = tree_tensors(kept)
    spec = ModelTree(config).spec(stage, first.num_classes)
    epoch = _integer(container, "epoch", source)
    perf = _number(container, "perf", source)
    selection = {"measure": config.run.select, "time": config.run.select_time}
    final = kind in ("arch1", "arch2")
    metadata = {
        "kind": "fusion",
        "stage": stage,
        "config": config.model_dump(mode="json"),
        "model": spec,
        "epoch": max(epoch, 1) if epoch is not None else 1,  # finished epochs: from 1
        # whole models select on top-5 at 1 s (index 1/alpha of the slowest rate's last steps)
        "metrics": {f"{selection['measure']}@1": perf} if final and perf is not None else {},
        "selection": selection,
        "converted": {
            "source": source.name,
            "sha256": source_sha256,
            "task": "anticipation",
            "epoch": epoch,
            "perf": perf,
            "best_perf": _number(container, "best_perf", source),
            "inferred": {
                "modality": "fusion",
                "feat_dims": dims,
                "branches": len(leaves),
                "hidden": first.hidden,
                "num_classes": first.num_classes,
                "rates": [str(r) for r in published],
            },
            **extra,
        },
    }
    return Conversion(tensors, metadata, config)


def _stage(
    config: FusionRunConfig,
    kind: SlowFastKind,
    modalities: Sequence[str],
    rate: PublishedRate | None,
) -> str:
    """The unit a converted module is: the final one, a modality's rates, or a rate's modalities."""
    tree = ModelTree(config)
    if kind in ("arch1", "arch2"):
        return tree.units[-1].label
    for unit in tree.units:
        if unit.level != 1:
            continue
        if (
            kind == "single"
            and unit.fuses == "rates"
            and unit.inputs[0].startswith(f"{modalities[0]}@")
        ):
            return unit.label
        if (
            kind == "rate_fusion"
            and rate is not None
            and unit.fuses == "modalities"
            and unit.inputs[0].endswith(f"@{rate.alpha:g}")
        ):
            return unit.label
    raise ConfigError(f"The config has no unit for this {KIND_TEXT[kind]}.")


# What the published download script fetched for EK55 (its hosting links are dead).
PUBLISHED_FILES: dict[str, tuple[str, ...]] = {
    "ek55": (
        *(
            f"RULSTM-anticipation_{grid}_{modality}_best.pth.tar"
            for grid in ("0.5_6_4", "0.125_24_16")
            for modality in MODALITIES
        ),
        "RULSTM-anticipation_0.5_6_4_fusion_best.pth.tar",
        "RULSTM-anticipation_0.125_12_16_fusion_best.pth.tar",
        "RULSTM-anticipation_0.125_24_16_0.5_6_4_fusion_best.pth.tar",
    )
}


@dataclass(frozen=True)
class FolderInstall:
    """What `install_slowfast_folder` did: each file's conversion and run, and what was absent."""

    installed: list[tuple[Path, Conversion, Path]]  # source, conversion, installed checkpoint
    missing: list[str]
    failed: list[tuple[Path, str]] = field(default_factory=list)  # source, what went wrong
    ignored: list[str] = field(default_factory=list)  # names like a checkpoint's, not published


def install_slowfast_folder(
    folder: Path,
    runs_dir: Path,
    *,
    dataset: str = "ek55",
    force: bool = False,
    dry_run: bool = False,
    on_file: Callable[[Path], None] | None = None,
) -> FolderInstall:
    """Convert every published Slow-Fast checkpoint in `folder` into `runs_dir`'s run layout.

    The files are recognised by the names the published code gives them (`PUBLISHED_FILES`, and
    any other `RULSTM-anticipation_<rates>_<modality>_best.pth.tar`); each becomes the finished
    stage it is (`sfr.hub.convert.install_conversion`), so `sfr fuse` / `sfr pipeline` on the
    paper's config continue from them. A file that cannot be converted (damaged, or its contents
    do not fit its name) is listed in `failed` and the others go on; names that look like a
    checkpoint's but are not published names are listed in `ignored`. With `dry_run` every file
    is read and converted in memory, nothing is written (`installed` then says where each would
    go). DataError if the folder holds none of them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder.", "Pass the folder holding the .pth.tar files.")
    expected = PUBLISHED_FILES.get(dataset, ())
    found, ignored = [], []
    for path in sorted(folder.iterdir()):
        if path.is_file() and name_settings(path.name)[0] and path.name.endswith(".pth.tar"):
            found.append(path)
        elif ".pth" in path.name.lower() or "rulstm" in path.name.lower():
            ignored.append(path.name)
    if not found:
        raise DataError(
            f"{folder} holds no published Slow-Fast RU-LSTM checkpoint"
            + (f" ({', '.join(ignored)} do not carry published names)" if ignored else "")
            + ".",
            "It should hold files such as " + ", ".join(expected[-2:]) + ".",
        )
    installed: list[tuple[Path, Conversion, Path]] = []
    failed: list[tuple[Path, str]] = []
    for path in found:
        if on_file is not None:
            on_file(path)
        try:
            conversion = _convert_published_file(path, dataset)
            target = (
                conversion_run(conversion, runs_dir).best_path
                if dry_run
                else install_conversion(conversion, runs_dir, force=force)
            )
        except SfrError as error:
            failed.append((path, _folder_reason(path, error)))
            continue
        installed.append((path, conversion, target))
    names = {path.name for path in found}
    return FolderInstall(
        installed, [name for name in expected if name not in names], failed, ignored
    )


def _convert_published_file(path: Path, dataset: str) -> Conversion:
    """One file of a `--from` folder, converted with the settings its published name states."""
    container = load_published_checkpoint(path)
    digest = sha256_file(path)
    state = container["state_dict"]
    if isinstance(state, Mapping) and is_slowfast_state(state):
        return convert_slowfast_state(container, path, dataset=dataset, source_sha256=digest)
    # a per-rate branch saved without the unused linear: an RU-LSTM branch
    named_rates, modality = name_settings(path.name)
    rate = named_rates[0]
    return convert_state(
        container,
        path,
        dataset=dataset,
        modality=modality if modality in MODALITIES else None,
        alpha=rate.alpha,
        s_enc=rate.s_enc,
        s_ant=rate.s_ant,
        source_sha256=digest,
    )


def _folder_reason(path: Path, error: SfrError) -> str:
    """Why a file of a `--from` folder was not installed, for a user who did not pick its rates:
    a rate problem means its contents do not fit the rates of its name."""
    if isinstance(error, ConfigError) and "rate" in error.message:
        named = ", ".join(str(rate) for rate in name_settings(path.name)[0])
        return (
            f"its contents do not fit the rates its name states ({named}): {error.message} "
            f"Check that the file carries its own published name, or convert it with "
            f"sfr convert {path.name} --into RUNS --rates ... (fastest first)."
        )
    return error.message + (f" {error.hint}" if error.hint else "")
