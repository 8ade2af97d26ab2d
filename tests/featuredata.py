"""Inputs of `sfr features` written in their real formats: EPIC frame folders, videos (PyAV),
flow frames, detection files, and backbone checkpoints in the published containers."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FRAME_SIZE = (48, 64)  # (height, width) of generated frames


def frame_image(video_seed: int, frame: int, size: tuple[int, int] = FRAME_SIZE) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 RGB frame: smooth gradients that move with `frame`."""
    height, width = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = 0.3 * frame + video_seed
    red = 127 + 100 * np.sin(x / 7.0 + phase)
    green = 127 + 100 * np.cos(y / 5.0 - phase)
    blue = 127 + 100 * np.sin((x + y) / 11.0 + 0.5 * phase)
    return np.clip(np.stack([red, green, blue], axis=2), 0, 255).astype(np.uint8)


def write_frame_folder(folder: Path, frames: int, seed: int = 0) -> Path:
    """EPIC layout: `folder/frame_0000000001.jpg` ... (1-based), written with pillow."""
    folder.mkdir(parents=True, exist_ok=True)
    for frame in range(1, frames + 1):
        Image.fromarray(frame_image(seed, frame)).save(
            folder / f"frame_{frame:010d}.jpg", quality=95
        )
    return folder


def write_video(path: Path, frames: int, fps: int = 30, seed: int = 0) -> Path:
    """An H.264 video of `frames` frames at `fps`, written with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = FRAME_SIZE
        stream.pix_fmt = "yuv420p"
        for frame in range(1, frames + 1):
            image = av.VideoFrame.from_ndarray(frame_image(seed, frame), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_flow_frames(folder: Path, frames: int, seed: int = 0) -> Path:
    """EPIC flow layout: `folder/u/frame_%010d.jpg` and `folder/v/frame_%010d.jpg` (grey)."""
    rng = np.random.default_rng(seed)
    for axis in ("u", "v"):
        (folder / axis).mkdir(parents=True, exist_ok=True)
    for frame in range(1, frames + 1):
        for axis in ("u", "v"):
            grey = rng.integers(60, 196, size=FRAME_SIZE, dtype=np.uint8)
            Image.fromarray(grey, mode="L").save(folder / axis / f"frame_{frame:010d}.jpg")
    return folder


def write_detections(path: Path, frames: int, classes: int, seed: int = 0) -> np.ndarray:
    """A published-style detections file: an object array of (m, 6) arrays, one per frame."""
    rng = np.random.default_rng(seed)
    per_frame = np.empty(frames, dtype=object)
    for index in range(frames):
        m = int(rng.integers(0, 4))
        boxes = rng.uniform(0, 100, size=(m, 4))
        per_frame[index] = np.column_stack(
            [rng.integers(0, classes, size=m), boxes, rng.uniform(0.1, 1.0, size=m)]
        ).astype(np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, per_frame, allow_pickle=True)
    return per_frame


def seeded_state(model: torch.nn.Module, seed: int) -> OrderedDict[str, torch.Tensor]:
    """Deterministic weights for `model`'s keys: small normal weights, BN statistics near 1."""
    generator = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value.clone()
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        elif key.endswith(("running_mean", "bias")):
            state[key] = torch.randn(value.shape, generator=generator) * 0.02
        elif value.dim() == 1:  # BN weight
            state[key] = 1 + torch.randn(value.shape, generator=generator) * 0.05
        else:
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=generator) / fan_in**0.5
    return state


def write_tsn_checkpoint(path: Path, in_channels: int, seed: int = 0) -> OrderedDict:
    """A checkpoint in the published TSN container (`module.base_model.` keys + `new_fc`)."""
    from sfr.models.backbones.bninception import create_bninception

    state = seeded_state(create_bninception(in_channels=in_channels), seed)
    published: OrderedDict[str, torch.Tensor] = OrderedDict(
        (f"module.base_model.{k}", v) for k, v in state.items() if "num_batches_tracked" not in k
    )
    published["module.new_fc.weight"] = torch.zeros(125, 1024)
    published["module.new_fc.bias"] = torch.zeros(125)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"epoch": 80, "arch": "BNInception", "state_dict": published, "best_prec1": 31.2}, path
    )
    return state


def write_slowfast_checkpoint(path: Path, depth: int = 50, seed: int = 0) -> OrderedDict:
    """A checkpoint in the PySlowFast/pytorchvideo container (`model_state`)."""
    from sfr.models.backbones.slowfast import create_slowfast

    state = seeded_state(create_slowfast(model_depth=depth), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state": state, "epoch": 196, "cfg": "MODEL:\n  ARCH: slowfast\n"}, path)
    return state
