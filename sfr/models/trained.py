"""A trained model rebuilt from one checkpoint: structure from its metadata, weights from its tensors.

Every sfr checkpoint (a stage's `best.safetensors`, an exported bundle, a converted published
checkpoint) records its run config and model spec, so one file is enough to rebuild a branch or
a whole fusion tree, ready for inference:

    model = sfr.load_model("runs/ek55/arch2-.../rgb+flow+obj@0.125+0.5/best.safetensors")
    output = model(features)          # scores (B, K, classes) at model.times
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import Tensor

from sfr.checkpoint import load_checkpoint, load_error_summary, read_metadata, save_checkpoint
from sfr.config import BranchRunConfig, DataConfig, FusionRunConfig
from sfr.data.dataset import Stream
from sfr.data.timegrid import Sampling
from sfr.errors import DataError, RunError, counted
from sfr.models.branch import create_branch
from sfr.models.fusion import BranchNode, FusionNode, NodeOutput
from sfr.models.tree import ModelTree, branch_spec

BUNDLE_FORMAT = "sfr-model/1"
CHECKPOINT_NAME = "best.safetensors"


@dataclass
class TrainedModel:
    """A branch or fusion tree in evaluation mode, with the config it was trained with."""

    module: BranchNode | FusionNode
    kind: Literal["branch", "fusion"]
    stage: str
    config: BranchRunConfig | FusionRunConfig
    num_classes: int
    streams: tuple[Stream, ...]
    source: Path
    metadata: dict[str, Any]

    @property
    def data(self) -> DataConfig:
        return self.config.data

    @property
    def times(self) -> tuple[float, ...]:
        """Anticipation times (seconds, oldest first) at which the model predicts."""
        return self.module.times

    @property
    def label(self) -> str:
        """The node's label: `rgb@0.25` for a branch, `rgb+flow+obj@0.125+0.5` for a fusion."""
        return self.module.label

    @property
    def name(self) -> str:
        """Short display name: `rgb@0.25 finetune`, `arch2 rgb+flow+obj@0.125+0.5`."""
        if isinstance(self.config, BranchRunConfig):
            return f"{self.label} {self.stage}"
        return f"{self.config.model.architecture} {self.stage}"

    @property
    def description(self) -> str:
        """One line saying what the model is."""
        if isinstance(self.config, BranchRunConfig):
            branch = self.config.branch
            if self.data.task == "early_recognition":
                return (
                    f"{branch.modality} branch, early recognition "
                    f"({counted(branch.s_ant, 'frame')} over the action, {self.stage})"
                )
            return (
                f"{branch.modality} branch, alpha {branch.alpha:g} "
                f"({branch.s_enc} + {counted(branch.s_ant, 'step')}, {self.stage})"
            )
        model = self.config.model
        tree = ModelTree(self.config)
        level = tree.by_label[self.stage].level
        last = max(tree.levels)
        what = "whole model" if level == last else f"level {level} of {last}"
        arch = "Architecture 1" if model.architecture == "arch1" else "Architecture 2"
        sampling = ", published Slow-Fast sampling" if self.data.sampling == "published" else ""
        early = ", early recognition" if self.data.task == "early_recognition" else ""
        return f"{self.stage} ({arch}, {what}{early}{sampling})"

    def use_sampling(self, sampling: Sampling | None) -> TrainedModel:
        """Read its data with `sampling` (`sfr.data.timegrid.sampled_frames`) from now on; None
        keeps the config's `data.sampling`."""
        if sampling is not None:
            self.config.data.sampling = sampling
        return self

    def to(self, device: torch.device | str) -> TrainedModel:
        self.module.to(device)
        return self

    def input_shapes(self) -> dict[str, tuple[int, int]]:
        """Per input key (`rgb@0.25`): the (T steps, F features) each (B, T, F) tensor must have."""
        return {s.key: (s.grid.steps, self.data.feature_dim(s.modality)) for s in self.streams}

    @torch.no_grad()
    def __call__(self, features: dict[str, Tensor]) -> NodeOutput:
        """Scores (B, K, classes), context and attention weights at every time of `times`.

        `features` maps every key of `input_shapes()` to a (B, T, F) floating-point tensor with
        B ≥ 1 (other keys are refused: a misspelt key would otherwise pass unnoticed); DataError
        naming the key and the expected shape or dtype otherwise. Inputs of another floating
        dtype are computed in the model's (float32). On the CPU a sample's outputs are the same
        bits whatever the batch it comes in (a batch of one runs as two copies).
        """
        shapes = self.input_shapes()
        if isinstance(features, dict):  # a Stream of `streams` as a key means its `key`
            features = {getattr(k, "key", k): v for k, v in features.items()}
        given = (
            f"a {type(features).__name__}"
            if not isinstance(features, dict)
            else next(
                (f"a key of type {type(k).__name__}" for k in features if not isinstance(k, str)),
                "",
            )
        )
        if given:
            raise DataError(
                f"{self.name} takes a dict of (B, T, F) tensors keyed by stream "
                f"({', '.join(shapes)}), not {given}."
            )
        dtype = next(self.module.parameters()).dtype
        batch = None
        for key, (steps, dim) in shapes.items():
            if key not in features:
                raise DataError(
                    f"{self.name} needs the input '{key}' (a (B, {steps}, {dim}) tensor); "
                    f"given: {', '.join(sorted(features)) or 'none'}."
                )
            value = features[key]
            if not (isinstance(value, Tensor) and value.is_floating_point()):
                kind = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise DataError(f"{self.name}: input '{key}' is {kind}, not a float tensor.")
            shape = tuple(value.shape)
            batch = shape[0] if batch is None and len(shape) == 3 else batch
            if len(shape) == 3 and shape[0] == 0:
                raise DataError(f"{self.name}: input '{key}' is an empty batch (B = 0).")
            if len(shape) != 3 or shape[1:] != (steps, dim) or shape[0] != batch:
                raise DataError(
                    f"{self.name}: input '{key}' has shape {shape}, expected "
                    f"({batch if batch is not None else 'B'}, {steps}, {dim}) = (batch, "
                    f"{counted(steps, 'step')} of {self.streams_by_key[key].grid.alpha:g} s, "
                    f"{counted(dim, 'feature')})."
                )
        unknown = sorted(set(features) - set(shapes))
        if unknown:
            raise DataError(
                f"{self.name} has no input {', '.join(map(repr, unknown))}; its inputs are "
                f"{', '.join(shapes)}."
            )
        inputs = {k: v.to(dtype) for k, v in features.items()}
        if batch != 1:
            return self.module(inputs, self.times)
        # a batch of one runs other products (matrix times vector) than batches of two or more,
        # which round differently in the last bit: it runs as two copies, so that on the CPU a
        # sample's scores are the same bits whatever batch it comes in (`--batch-size`, `predict`)
        out = self.module({k: v.expand(2, -1, -1) for k, v in inputs.items()}, self.times)
        return NodeOutput(
            out.scores[:1], out.context[:1], {k: w[:1] for k, w in out.attention.items()}
        )

    @property
    def streams_by_key(self) -> dict[str, Stream]:
        return {stream.key: stream for stream in self.streams}


def _config(metadata: dict[str, Any], source: Path) -> BranchRunConfig | FusionRunConfig:
    kind = metadata.get("kind")
    schema = {"branch": BranchRunConfig, "fusion": FusionRunConfig}.get(kind)
    if schema is None:
        raise RunError(f"{source} records an unknown model kind {kind!r}.")
    try:
        return schema.model_validate(metadata["config"])
    except (KeyError, ValidationError) as error:
        raise RunError(
            f"{source} does not record a usable config: {str(error).splitlines()[0]}.",
            "It was written by another version of sfr; export it again with this one.",
        ) from None


def model_from_checkpoint(
    tensors: dict[str, Tensor], metadata: dict[str, Any], source: Path
) -> TrainedModel:
    """Rebuild the module a checkpoint describes and load its weights (strictly)."""
    if "best_epoch" in metadata:
        raise RunError(
            f"{source} holds training state for resuming, not a model to evaluate.",
            f"Pass {source.with_name(CHECKPOINT_NAME)} or its run folder.",
        )
    config = _config(metadata, source)
    spec = metadata.get("model") or {}
    num_classes = spec.get("num_classes")
    if not isinstance(num_classes, int):
        raise RunError(f"{source} does not record the number of classes of its model.")
    stage = str(metadata.get("stage"))
    if isinstance(config, BranchRunConfig):
        if spec != branch_spec(config, num_classes):
            raise RunError(f"{source}: its model spec does not match its config.")
        branch = create_branch(
            feat_dim=spec["feat_dim"],
            hidden=spec["hidden"],
            num_classes=num_classes,
            dropout=config.branch.dropout,
            sequence_completion=stage == "pretrain",
        )
        grid = config.grid
        stream = Stream(config.branch.modality, grid)
        module: BranchNode | FusionNode = BranchNode(branch, stream.key, grid)
        target: torch.nn.Module = branch
        streams: tuple[Stream, ...] = (stream,)
    else:
        tree = ModelTree(config)
        if stage not in tree.by_label:
            raise RunError(f"{source}: fusion unit {stage!r} is not part of its config.")
        module = tree.build(stage, num_classes)
        target = module
        streams = tuple(tree.streams[leaf] for leaf in tree.leaves(stage))
    try:
        missing, unexpected = target.load_state_dict(tensors, strict=False)
    except RuntimeError as error:  # a tensor of another shape than the config describes
        raise RunError(
            f"{source}: its weights do not fit the model it describes ({load_error_summary(error)}).",
            "The file is damaged or was edited: train or export it again.",
        ) from None
    if missing or unexpected:
        raise RunError(
            f"{source}: its weights do not fit the model it describes "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}).",
        )
    module.eval()
    return TrainedModel(
        module, config_kind(config), stage, config, num_classes, streams, source, metadata
    )


def config_kind(config: BranchRunConfig | FusionRunConfig) -> Literal["branch", "fusion"]:
    return "branch" if isinstance(config, BranchRunConfig) else "fusion"


def checkpoint_path(path: Path) -> Path:
    """The checkpoint file of `path`: the file itself, or a run folder's best checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / CHECKPOINT_NAME, path / "finetune" / CHECKPOINT_NAME):
        if candidate.is_file():
            return candidate
    if path.is_dir():
        raise RunError(
            f"{path} holds no {CHECKPOINT_NAME}: it is not a finished run.",
            "Pass a stage folder (…/finetune, a fusion unit folder), a checkpoint file or a "
            "whole fusion folder.",
        )
    raise RunError(f"{path} does not exist.", "Pass a run folder or a .safetensors checkpoint.")


def model_checkpoints(path: Path, every_level: bool = False) -> list[Path]:
    """Checkpoints a path names: itself, a run folder's best, or a whole fusion folder's units.

    A fusion folder (`runs/ek55/arch2-…/`) stands for its final unit, or with `every_level` for
    all its units, lowest level first.
    """
    path = Path(path)
    if path.is_dir() and not (path / CHECKPOINT_NAME).is_file():
        units = sorted(p for p in path.glob(f"*/{CHECKPOINT_NAME}"))
        if units and not (path / "finetune").is_dir():
            metadata = read_metadata(units[0])
            config = _config(metadata, units[0])
            if isinstance(config, FusionRunConfig):
                order = [unit.label for unit in ModelTree(config).units]
                found = {p.parent.name: p for p in units}
                chosen = order if every_level else order[-1:]
                missing = [label for label in chosen if label not in found]
                if missing:
                    raise RunError(
                        f"{path} has no finished {missing[0]} stage.",
                        "Train it with `sfr fuse` or `sfr pipeline`, or pass a unit folder.",
                    )
                return [found[label] for label in chosen]
    return [checkpoint_path(path)]


def load_model(path: str | Path, device: torch.device | str = "cpu") -> TrainedModel:
    """A trained model from a checkpoint, a run or fusion folder or a bundle, in eval mode."""
    (source,) = model_checkpoints(Path(path))
    tensors, metadata = load_checkpoint(source)
    return model_from_checkpoint(tensors, metadata, source).to(device)


def export_bundle(model: TrainedModel, out: Path, sfr_version: str) -> None:
    """One self-contained file: every weight of every level and the config, written atomically."""
    metadata = {
        **model.metadata,
        "bundle": {"format": BUNDLE_FORMAT, "exported_from": str(model.source), "sfr": sfr_version},
    }
    tensors = (
        model.module.branch.state_dict()
        if isinstance(model.module, BranchNode)
        else model.module.state_dict()
    )
    save_checkpoint(out, tensors, metadata)
