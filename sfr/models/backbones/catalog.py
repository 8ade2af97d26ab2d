"""The backbones `sfr features` offers: each builder with its weights layout and preprocessing.

A backbone is described as data (timm's pretrained configs, applied to video): which modalities it
reads, the size of the vector it writes, how a frame becomes its input (`Preprocessing`), which
clip of frames ends at a keyed frame, and how its published checkpoint is laid out. The
description travels into every store the backbone writes (`Preprocessing.to_json`), so two
extractions are never mixed in one store.

| backbone          | modalities | dim  | input per keyed frame n                         | source |
| ----------------- | ---------- | ---- | ----------------------------------------------- | ------ |
| `tsn-bninception` | rgb, flow  | 1024 | rgb: frame n; flow: 5 (u, v) pairs ending at n    | RU-LSTM FEATEXT examples |
| `slowfast-r50`    | rgb        | 2304 | 32 frames at stride 2 ending at n (slow: every 4th) | pytorchvideo |
| `slowfast-r101`   | rgb        | 2304 | as R50                                           | pytorchvideo |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from sfr.errors import ConfigError

Interpolation = Literal["pil-bilinear", "bilinear"]
Channels = Literal["RGB", "BGR", "uv"]


@dataclass(frozen=True)
class Preprocessing:
    """How decoded frames become one input of a backbone (recorded in every store it writes).

    A frame is resized to `size` (height, width) or so that its short side is `short_side`
    pixels (aspect kept, pytorchvideo's `ShortSideScale` arithmetic), centre-cropped to
    `crop` x `crop` when set, put in `channels` order (`uv` for flow: the u and v grey images),
    then normalised as `(value * scale / 255 - mean) / std` per channel. `pil-bilinear` resizes
    the uint8 image with pillow (the published TSN extraction resized PIL images);
    `bilinear` resizes the float tensor with `torch.nn.functional.interpolate`
    (pytorchvideo's transforms). The input of keyed frame n is the clip of `clip_frames` frames
    `n - (clip_frames - 1) * clip_stride, ..., n` (30 fps frame numbers; frames before the first
    are replaced by frame 1, as the time grids pad): it never reads a frame after n.
    """

    size: tuple[int, int] | None = None
    short_side: int | None = None
    crop: int | None = None
    interpolation: Interpolation = "pil-bilinear"
    channels: Channels = "RGB"
    scale: float = 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    clip_frames: int = 1
    clip_stride: int = 1

    def __post_init__(self) -> None:
        if (self.size is None) == (self.short_side is None):
            raise ConfigError("Preprocessing needs exactly one of size and short_side.")
        if self.clip_frames < 1 or self.clip_stride < 1:
            raise ConfigError("Clip length and stride must be at least 1.")
        for name in ("short_side", "crop"):
            value = getattr(self, name)
            if value is not None and value < 8:
                raise ConfigError(f"Preprocessing {name} must be at least 8 pixels, not {value}.")
        if self.size is not None and min(self.size) < 8:
            raise ConfigError(f"Preprocessing size must be at least 8x8 pixels, not {self.size}.")
        resized = min(self.size) if self.size is not None else self.short_side
        if self.crop is not None and resized is not None and self.crop > resized:
            raise ConfigError(
                f"--crop {self.crop} is larger than the resized frame's short side ({resized}).",
                "Use a crop no larger than --short-side (TSN backbones resize to 256x454).",
            )
        if len(self.mean) != len(self.std):
            raise ConfigError(
                f"--mean has {len(self.mean)} values and --std {len(self.std)}: give one value "
                "per channel (3 for rgb), or one for all."
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"--std values must be above 0, not {list(self.std)}.")

    @property
    def channels_per_frame(self) -> int:
        return 2 if self.channels == "uv" else 3

    def clip(self, frame: int) -> list[int]:
        """The 30 fps frames of keyed frame `frame`'s input, oldest first, ending at `frame`."""
        first = frame - (self.clip_frames - 1) * self.clip_stride
        return [max(1, first + i * self.clip_stride) for i in range(self.clip_frames)]

    @property
    def clip_span(self) -> int:
        """Frames from the oldest clip frame to the keyed one, both included."""
        return (self.clip_frames - 1) * self.clip_stride + 1

    def replace(self, **changes: Any) -> Preprocessing:
        """A copy with some fields changed (command-line options), validated again."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        """Plain JSON description (lists for tuples), stored beside every store."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True)
class Backbone:
    """One video backbone: its builder, its checkpoint loader and its preprocessing per modality.

    `create(modality)` builds the network (random weights); `load(model, path)` loads a
    published checkpoint (DataError on keys that do not fit); `features(model, batch)` maps a
    normalised batch (B, C, H, W) or clips (B, 3, T, H, W) to (B, dim) vectors.
    """

    name: str
    dim: int
    description: str
    preprocessing: dict[str, Preprocessing]
    default_weights: dict[str, str]  # modality -> registry artefact name
    build: Callable[[str], nn.Module]
    load: Callable[[nn.Module, Path], None]
    features: Callable[[nn.Module, Tensor], Tensor] = field(default=lambda model, x: model(x))
    adjustable: tuple[str, ...] = ("mean", "std")  # preprocessing fields options may change
    clip_multiple: int = 1  # clip lengths must be multiples of this (SlowFast: alpha = 4)

    def preprocessing_for(self, modality: str, changes: dict[str, Any]) -> Preprocessing:
        """The published preprocessing of `modality` with `changes` (command-line options);
        ConfigError for a field this backbone's recipe does not have (TSN resizes whole
        frames: no crop, short side or clip settings)."""
        self.check_modality(modality)
        given = {k: v for k, v in changes.items() if v is not None}
        fixed = [k for k in given if k not in self.adjustable]
        if fixed:
            flag = "--" + fixed[0].replace("_", "-")
            takes = [b.name for b in BACKBONES.values() if fixed[0] in b.adjustable]
            raise ConfigError(
                f"{flag} does not apply to {self.name}, whose recipe is fixed "
                f"({self.description}).",
                f"{flag} applies to {', '.join(takes)}." if takes else None,
            )
        preprocessing = self.preprocessing[modality].replace(**given)
        if preprocessing.clip_frames % self.clip_multiple:
            raise ConfigError(
                f"--clip-frames {preprocessing.clip_frames} is not a multiple of "
                f"{self.clip_multiple}: the slow pathway of {self.name} takes every "
                f"{self.clip_multiple}th frame of the clip."
            )
        return preprocessing

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.preprocessing)

    def create(self, modality: str) -> nn.Module:
        self.check_modality(modality)
        return self.build(modality)

    def check_modality(self, modality: str) -> None:
        if modality not in self.preprocessing:
            allowed = ", ".join(self.modalities)
            raise ConfigError(
                f"Backbone {self.name} does not extract {modality} features (it reads {allowed}).",
                "Choose another --backbone: sfr features --help lists them.",
            )


def _tsn_build(modality: str) -> nn.Module:
    from sfr.models.backbones.bninception import create_bninception

    return create_bninception(in_channels=10 if modality == "flow" else 3)


def _tsn_load(model: nn.Module, path: Path) -> None:
    from sfr.models.backbones.bninception import load_tsn_weights

    load_tsn_weights(model, path)


def _slowfast_build(depth: int) -> Callable[[str], nn.Module]:
    def build(modality: str) -> nn.Module:
        from sfr.models.backbones.slowfast import create_slowfast

        return create_slowfast(model_depth=depth)

    return build


def _slowfast_load(model: nn.Module, path: Path) -> None:
    from sfr.models.backbones.slowfast import load_slowfast_weights

    load_slowfast_weights(model, path)


def _slowfast_features(model: nn.Module, clips: Tensor) -> Tensor:
    """(B, 3, T, H, W) clips → (B, 2304): the pathways packed as pytorchvideo's PackPathway."""
    from sfr.models.backbones.slowfast import pack_pathways

    return model(pack_pathways(clips, alpha=4))


# The published TSN extraction (RU-LSTM FEATEXT): whole frame to 256x454, x255, BGR minus mean.
_TSN_RGB = Preprocessing(
    size=(256, 454), channels="BGR", scale=255.0, mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0)
)
# Flow images (grey 0..255) minus 128; 5 (u, v) pairs stacked, oldest first, ending at the frame.
_TSN_FLOW = Preprocessing(
    size=(256, 454), channels="uv", scale=255.0, mean=(128.0, 128.0), std=(1.0, 1.0), clip_frames=5
)
# pytorchvideo's Kinetics recipe: /255, mean 0.45, std 0.225, short side 256, centre crop 256,
# 32 frames at stride 2 (the slow pathway takes every 4th of them).
_SLOWFAST_RGB = Preprocessing(
    short_side=256,
    crop=256,
    interpolation="bilinear",
    channels="RGB",
    scale=1.0,
    mean=(0.45, 0.45, 0.45),
    std=(0.225, 0.225, 0.225),
    clip_frames=32,
    clip_stride=2,
)


def _slowfast(depth: int, description: str) -> Backbone:
    return Backbone(
        name=f"slowfast-r{depth}",
        dim=2304,
        description=description,
        preprocessing={"rgb": _SLOWFAST_RGB},
        default_weights={"rgb": f"slowfast-r{depth}-kinetics"},
        build=_slowfast_build(depth),
        load=_slowfast_load,
        features=_slowfast_features,
        adjustable=("short_side", "crop", "mean", "std", "clip_frames", "clip_stride"),
        clip_multiple=4,
    )


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            name="tsn-bninception",
            dim=1024,
            description="BNInception of the published TSN checkpoints (RU-LSTM rgb/flow features)",
            preprocessing={"rgb": _TSN_RGB, "flow": _TSN_FLOW},
            default_weights={"rgb": "tsn-rgb", "flow": "tsn-flow"},
            build=_tsn_build,
            load=_tsn_load,
        ),
        _slowfast(50, "SlowFast 8x8 R50 (pytorchvideo layout, Kinetics-400 weights)"),
        _slowfast(
            101, "SlowFast 8x8 R101 (pytorchvideo layout, fusion kernel 5x1x1, Kinetics-400)"
        ),
    )
}


def get_backbone(name: str) -> Backbone:
    """The backbone called `name`; ConfigError listing the known ones otherwise."""
    if name not in BACKBONES:
        raise ConfigError(
            f"Unknown backbone '{name}'.", f"Known backbones: {', '.join(BACKBONES)}."
        )
    return BACKBONES[name]


def backbone_names() -> Sequence[str]:
    return tuple(BACKBONES)
