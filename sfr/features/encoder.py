"""From decoded frames to feature vectors: preprocessing, batching and the backbone's forward pass.

`prepare` runs in the decoding threads (CPU: resize, crop, channel order) and keeps what it can in
uint8; `collate` stacks the prepared frames of a batch of clips; `encode` moves the batch to the
device, normalises it there and runs the backbone in inference mode, optionally under autocast.
The arithmetic follows the published extractions (DESIGN §7): TSN frames are resized as pillow
images (the RU-LSTM FEATEXT examples), SlowFast frames as float tensors (pytorchvideo transforms).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from sfr.config import check_device
from sfr.data.loader import resolve_device as resolve_torch_device
from sfr.errors import ConfigError
from sfr.features.sources import require
from sfr.models.backbones.catalog import Backbone, Preprocessing

Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Encoder(Protocol):
    """What the extraction loop needs: clips, per-frame preparation, batching, encoding."""

    dim: int

    def clip(self, frame: int) -> list[int]: ...

    def prepare(self, image: np.ndarray) -> Tensor: ...

    def collate(self, clips: Sequence[Sequence[Tensor]]) -> Tensor: ...

    def encode(self, batch: Tensor) -> np.ndarray: ...


def prepare_frame(image: np.ndarray, pre: Preprocessing) -> Tensor:
    """One decoded frame (H, W, 3) RGB or (H, W, 2) uv uint8 → (C, h, w) tensor, not normalised.

    `pil-bilinear` keeps uint8 values (pillow's bilinear resize of each image, as the published
    TSN extraction); `bilinear` returns float32 values in 0..255 (pytorchvideo's ShortSideScale
    on float tensors, then its centre crop).
    """
    if image.ndim != 3 or image.shape[2] != pre.channels_per_frame:
        raise ValueError(f"expected (H, W, {pre.channels_per_frame}) frames, got {image.shape}")
    height, width = image.shape[:2]
    out_h, out_w = pre.size if pre.size is not None else _short_side(height, width, pre.short_side)
    if pre.interpolation == "pil-bilinear":
        pil = require("PIL.Image", "video")
        # Each flow component is its own grey image; rgb frames are resized whole.
        planes = [image[:, :, c] for c in range(2)] if pre.channels == "uv" else [image]
        resized = np.concatenate(
            [
                np.asarray(
                    pil.fromarray(np.ascontiguousarray(plane)).resize((out_w, out_h), pil.BILINEAR)
                ).reshape(out_h, out_w, -1)
                for plane in planes
            ],
            axis=2,
        )
        tensor = torch.from_numpy(resized).permute(2, 0, 1)  # (C, h, w); a fresh array
    else:
        chw = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
        tensor = torch.nn.functional.interpolate(
            chw[None], size=(out_h, out_w), mode="bilinear", align_corners=False
        )[0]
    if pre.crop is not None:
        tensor = _centre_crop(tensor, pre.crop)
    if pre.channels == "BGR":
        tensor = tensor.flip(0)
    return tensor.contiguous()


def _short_side(height: int, width: int, size: int | None) -> tuple[int, int]:
    """pytorchvideo's ShortSideScale sizes: the short side becomes `size`, the other floors."""
    assert size is not None
    if width < height:
        return math.floor(height / width * size), size
    return size, math.floor(width / height * size)


def _centre_crop(tensor: Tensor, crop: int) -> Tensor:
    """torchvision's video centre crop offsets (`int(round((h - crop) / 2))`)."""
    height, width = tensor.shape[-2:]
    if height < crop or width < crop:
        raise ConfigError(f"Centre crop {crop} is larger than the resized frame {height}x{width}.")
    top = round((height - crop) / 2.0)
    left = round((width - crop) / 2.0)
    return tensor[..., top : top + crop, left : left + crop]


class BackboneEncoder:
    """A backbone with its weights on a device, encoding prepared clips into (B, dim) vectors."""

    def __init__(
        self,
        backbone: Backbone,
        modality: str,
        preprocessing: Preprocessing,
        weights: Path | None,
        *,
        device: str = "cpu",
        precision: Precision = "fp32",
    ) -> None:
        self.backbone = backbone
        self.dim = backbone.dim
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        if precision != "fp32" and self.device.type != "cuda":
            raise ConfigError(
                f"--precision {precision} needs a CUDA device; on {device} features are fp32.",
                "Drop --precision, or pass --device cuda.",
            )
        self.precision = precision
        model = backbone.create(modality)
        if weights is not None:
            backbone.load(model, weights)
        self.model = model.eval().to(self.device)
        self._memory_format: torch.memory_format | None = None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            # fp32 means fp32: TF32 convolutions would move features by ~1e-3 of their scale.
            torch.backends.cudnn.allow_tf32 = precision != "fp32"
            torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
            video = preprocessing.channels != "uv" and preprocessing.clip_frames > 1
            self._memory_format = torch.channels_last_3d if video else torch.channels_last
            self.model = self.model.to(memory_format=self._memory_format)
        channels = preprocessing.channels_per_frame
        repeat = preprocessing.clip_frames if preprocessing.channels == "uv" else 1
        mean = torch.tensor(preprocessing.mean * repeat, dtype=torch.float32)
        std = torch.tensor(preprocessing.std * repeat, dtype=torch.float32)
        if len(mean) != channels * repeat:
            raise ConfigError(
                f"Normalisation has {len(preprocessing.mean)} mean values for {channels} channels."
            )
        self._mean = mean.to(self.device)
        self._std = std.to(self.device)

    def clip(self, frame: int) -> list[int]:
        return self.preprocessing.clip(frame)

    def prepare(self, image: np.ndarray) -> Tensor:
        return prepare_frame(image, self.preprocessing)

    def collate(self, clips: Sequence[Sequence[Tensor]]) -> Tensor:
        """Clips of prepared frames → (B, C, h, w) (one frame, or flow pairs stacked on channels,
        oldest first: u1, v1, u2, v2, ...) or (B, C, T, h, w) (video clips)."""
        pre = self.preprocessing
        if pre.channels == "uv" or pre.clip_frames == 1:
            return torch.stack([torch.cat(list(clip), dim=0) for clip in clips])
        return torch.stack([torch.stack(list(clip), dim=1) for clip in clips])

    def encode(self, batch: Tensor) -> np.ndarray:
        """(B, ...) prepared batch → (B, dim) float32 features, normalised on the device."""
        pre = self.preprocessing
        x = batch.to(self.device, non_blocking=True).float()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x = (x * (pre.scale / 255.0) - self._mean.view(shape)) / self._std.view(shape)
        if self._memory_format is not None:  # cuDNN's fast layout for convolutions on CUDA
            x = x.contiguous(memory_format=self._memory_format)
        autocast: Any = (
            torch.autocast(self.device.type, dtype=_AUTOCAST[self.precision])
            if self.precision != "fp32"
            else nullcontext()
        )
        with torch.inference_mode(), autocast:
            features = self.backbone.features(self.model, x)
        return features.float().cpu().numpy().reshape(len(batch), self.dim)


class DetectionEncoder:
    """Object features need no network: the detections reader yields the vectors themselves."""

    def __init__(self, classes: int) -> None:
        self.dim = classes

    def clip(self, frame: int) -> list[int]:
        return [frame]

    def prepare(self, image: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32))

    def collate(self, clips: Sequence[Sequence[Tensor]]) -> Tensor:
        return torch.stack([clip[-1] for clip in clips])

    def encode(self, batch: Tensor) -> np.ndarray:
        return batch.numpy().astype(np.float32, copy=False)


def resolve_device(device: str) -> str:
    """`auto` → `cuda` when available, else `cpu`; a name sfr does not accept
    (`sfr.config.check_device`) or a device this machine lacks is a clear error (ConfigError)."""
    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {device}: this PyTorch build sees no CUDA device.",
            "Use --device cpu, or install a CUDA build of torch on a GPU machine.",
        )
    return str(resolve_torch_device(device))  # a GPU index past the last, MPS unavailable
