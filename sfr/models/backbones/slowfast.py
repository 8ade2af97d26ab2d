"""SlowFast R50/R101 in pure PyTorch, laid out as pytorchvideo's `create_slowfast`.

Follows pytorchvideo 0.1.5 (`pytorchvideo/models/slowfast.py`, `resnet.py`, `stem.py`, `head.py`,
`net.py`; Feichtenhofer et al., "SlowFast networks for video recognition", ICCV 2019). The
state dict is key for key (names and shapes) that of `create_slowfast(model_depth=...)`, so the
Kinetics-400 checkpoints of the pytorchvideo/PySlowFast model zoo (`SLOWFAST_8x8_R50.pyth`,
`SLOWFAST_8x8_R101.pyth`, state under `model_state`) load unchanged.

    slow (B, 3, T/4, H, W)                        fast (B, 3, T, H, W)
      │                                              │
    blocks.0  stem 1x7x7, 64 ch ◄── fuse ─────── stem 5x7x7, 8 ch
      │ (64 + 16 ch)                     conv Kx1x1  │
    blocks.1  res2, 256 ch     ◄── fuse ───────── res2, 32 ch      fuse: Conv3d(C_f → 2·C_f,
      │ (256 + 64)                                   │                  kernel Kx1x1, stride 4 =
    blocks.2  res3, 512 ch     ◄── fuse ───────── res3, 64 ch            alpha in time) + BN +
      │ (512 + 128)                                  │                  ReLU, concatenated to
    blocks.3  res4, 1024 ch    ◄── fuse ───────── res4, 128 ch           the slow channels
      │ (1024 + 256)                                 │
    blocks.4  res5, 2048 ch                       res5, 256 ch      (no fusion after res5)
      │                                              │
      └─────── blocks.5 pool each pathway, concatenate (2048 + 256 = 2304) ──┘
                          │
               blocks.6 dropout → proj 2304 → num_classes → average over (t, h, w)

Both pathways keep their frame count through every stage (no temporal stride); the slow
pathway's conv_a is 1x1x1 in res2/res3 and 3x1x1 in res4/res5, the fast one's 3x1x1 throughout.
Spatial stride 2 sits in the stem conv, the stem max-pool and conv_b of the first block of
res3-res5; the first block of each stage has a 1x1x1 projection shortcut (branch1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sfr.models.backbones.weights import load_backbone_state, read_backbone_state

Kernel3 = tuple[int, int, int]


class SlowFastVariant(NamedTuple):
    """Blocks per stage (res2..res5) and the fast→slow fusion kernel of the published weights."""

    stage_depths: tuple[int, int, int, int]
    fusion_kernel: Kernel3


VARIANTS: dict[int, SlowFastVariant] = {
    50: SlowFastVariant((3, 4, 6, 3), (7, 1, 1)),
    101: SlowFastVariant((3, 4, 23, 3), (5, 1, 1)),
}
ALPHA = 4  # frame-rate ratio fast/slow: the fusion conv's temporal stride
BETA_INV = 8  # channel ratio slow/fast
FUSION_CHANNEL_RATIO = 2  # the fusion conv maps C_fast to 2·C_fast channels
STEM_CHANNELS = 64  # slow stem width; stage widths are 256, 512, 1024, 2048
STEM_KERNELS: tuple[Kernel3, Kernel3] = ((1, 7, 7), (5, 7, 7))  # slow, fast
CONV_A_TEMPORAL: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 1, 3, 3), (3, 3, 3, 3))
STAGE_SPATIAL_STRIDES = (1, 2, 2, 2)
HEAD_POOL_KERNELS: tuple[Kernel3, Kernel3] = ((8, 7, 7), (32, 7, 7))  # at 224 px, T = 32
DROPOUT = 0.5
FEATURE_DIM = 2048 + 2048 // BETA_INV  # 2304


def _norm(channels: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(channels, eps=1e-5, momentum=0.1)


def _conv(c_in: int, c_out: int, kernel: Kernel3, stride: Kernel3 = (1, 1, 1)) -> nn.Conv3d:
    """Bias-free Conv3d padded by kernel // 2 (output size = input size / stride)."""
    padding = tuple(k // 2 for k in kernel)
    return nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)


class Stem(nn.Module):
    """Conv (stride 1x2x2) → BN → ReLU → max-pool 1x3x3 stride 1x2x2: (B, 3, T, H, W) →
    (B, C, T, H/4, W/4)."""

    def __init__(self, c_out: int, kernel: Kernel3) -> None:
        super().__init__()
        self.conv = _conv(3, c_out, kernel, stride=(1, 2, 2))
        self.norm = _norm(c_out)
        self.pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(F.relu(self.norm(self.conv(x))))


class Bottleneck(nn.Module):
    """conv_a (kt x1x1) → BN → ReLU → conv_b (1x3x3, spatial stride) → BN → ReLU → conv_c (1x1x1)
    → BN: (B, C_in, T, H, W) → (B, C_out, T, H/s, W/s)."""

    def __init__(self, c_in: int, c_inner: int, c_out: int, kt: int, stride: int) -> None:
        super().__init__()
        self.conv_a = _conv(c_in, c_inner, (kt, 1, 1))
        self.norm_a = _norm(c_inner)
        self.conv_b = _conv(c_inner, c_inner, (1, 3, 3), stride=(1, stride, stride))
        self.norm_b = _norm(c_inner)
        self.conv_c = _conv(c_inner, c_out, (1, 1, 1))
        self.norm_c = _norm(c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm_a(self.conv_a(x)))
        x = F.relu(self.norm_b(self.conv_b(x)))
        return self.norm_c(self.conv_c(x))


class ResBlock(nn.Module):
    """ReLU(shortcut(x) + branch2(x)); the shortcut is a strided 1x1x1 conv + BN (branch1) where
    the width or the size changes, else the identity."""

    def __init__(self, c_in: int, c_inner: int, c_out: int, kt: int, stride: int) -> None:
        super().__init__()
        self.branch1_conv: nn.Conv3d | None = None
        self.branch1_norm: nn.BatchNorm3d | None = None
        if c_in != c_out or stride != 1:
            self.branch1_conv = _conv(c_in, c_out, (1, 1, 1), stride=(1, stride, stride))
            self.branch1_norm = _norm(c_out)
        self.branch2 = Bottleneck(c_in, c_inner, c_out, kt, stride)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        if self.branch1_conv is not None and self.branch1_norm is not None:
            shortcut = self.branch1_norm(self.branch1_conv(x))
        return F.relu(shortcut + self.branch2(x))


class ResStage(nn.Module):
    """`depth` ResBlocks; only the first changes the width and strides (res_blocks.0)."""

    def __init__(self, depth: int, c_in: int, c_out: int, kt: int, stride: int) -> None:
        super().__init__()
        c_inner = c_out // 4
        self.res_blocks = nn.ModuleList(
            ResBlock(c_in if i == 0 else c_out, c_inner, c_out, kt, stride if i == 0 else 1)
            for i in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.res_blocks:
            x = block(x)
        return x


class FuseFastToSlow(nn.Module):
    """Lateral connection: [slow (B, Cs, T/4, ...), fast (B, Cf, T, ...)] →
    [cat(slow, ReLU(BN(conv(fast)))) (B, Cs + 2·Cf, T/4, ...), fast]."""

    def __init__(self, c_fast: int, kernel: Kernel3) -> None:
        super().__init__()
        c_out = c_fast * FUSION_CHANNEL_RATIO
        self.conv_fast_to_slow = _conv(c_fast, c_out, kernel, stride=(ALPHA, 1, 1))
        self.norm = _norm(c_out)

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        slow, fast = x
        fused = F.relu(self.norm(self.conv_fast_to_slow(fast)))
        return [torch.cat([slow, fused], dim=1), fast]


class PathwayStage(nn.Module):
    """One stage of each pathway (multipathway_blocks.0 slow, .1 fast), then the optional fusion."""

    def __init__(self, slow: nn.Module, fast: nn.Module, fusion: FuseFastToSlow | None) -> None:
        super().__init__()
        self.multipathway_blocks = nn.ModuleList([slow, fast])
        self.multipathway_fusion = fusion

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        out = [block(p) for block, p in zip(self.multipathway_blocks, x)]
        return out if self.multipathway_fusion is None else self.multipathway_fusion(out)


class PoolConcat(nn.Module):
    """pytorchvideo's head pooling (PoolConcatPathway): AvgPool3d (stride 1) per pathway, then
    concatenation of the channels: [(B, 2048, t, h, w), (B, 256, 4t, h, w)] → (B, 2304, t', h', w').

    Where a feature map is smaller than the kernel (pytorchvideo raises) the kernel is clipped to
    it, which makes the pooling the global average."""

    def __init__(self, kernels: Sequence[Kernel3] = HEAD_POOL_KERNELS) -> None:
        super().__init__()
        self.kernels = tuple(tuple(k) for k in kernels)

    def forward(self, x: list[Tensor]) -> Tensor:
        pooled = []
        for kernel, p in zip(self.kernels, x):
            clipped = tuple(min(k, s) for k, s in zip(kernel, p.shape[2:]))
            pooled.append(F.avg_pool3d(p, clipped, stride=1))
        return torch.cat(pooled, dim=1)


class Head(nn.Module):
    """ResNetBasicHead: dropout → proj over channels → average over (t, h, w):
    (B, 2304, t, h, w) → (B, num_classes). No activation (pytorchvideo's default is None)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(DROPOUT)
        self.proj = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(self.dropout(x).permute(0, 2, 3, 4, 1))
        return x.mean(dim=(1, 2, 3))


class SlowFast(nn.Module):
    """SlowFast network; `blocks` 0-4 are the stem and res2-res5 of both pathways with their
    fusions, 5 the head pooling, 6 the classification head (see the module diagram)."""

    def __init__(self, model_depth: int, fusion_kernel: Kernel3, num_classes: int) -> None:
        super().__init__()
        self.model_depth = model_depth
        self.num_classes = num_classes
        depths = VARIANTS[model_depth].stage_depths
        slow_in, fast_in = STEM_CHANNELS, STEM_CHANNELS // BETA_INV
        stages: list[nn.Module] = [
            PathwayStage(
                Stem(slow_in, STEM_KERNELS[0]),
                Stem(fast_in, STEM_KERNELS[1]),
                FuseFastToSlow(fast_in, fusion_kernel),
            )
        ]
        width = STEM_CHANNELS * 4
        for i, depth in enumerate(depths):
            slow_in += fast_in * FUSION_CHANNEL_RATIO  # the fused fast channels
            stride = STAGE_SPATIAL_STRIDES[i]
            slow = ResStage(depth, slow_in, width, CONV_A_TEMPORAL[0][i], stride)
            fast = ResStage(depth, fast_in, width // BETA_INV, CONV_A_TEMPORAL[1][i], stride)
            last = i == len(depths) - 1
            fusion = None if last else FuseFastToSlow(width // BETA_INV, fusion_kernel)
            stages.append(PathwayStage(slow, fast, fusion))
            slow_in, fast_in, width = width, width // BETA_INV, width * 2
        stages += [PoolConcat(), Head(num_classes)]
        self.blocks = nn.ModuleList(stages)
        self._init_weights()

    def _init_weights(self) -> None:
        """pytorchvideo's ResNet init: He-normal (fan_out) convs, BN 1/0 except 0/0 for the last BN
        of each bottleneck, proj N(0, 0.01) with zero bias."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.norm_c.weight)

    def pathway_features(self, pathways: Sequence[Tensor]) -> list[Tensor]:
        """Outputs of res5: [slow (B, 2048, T/4, H/32, W/32), fast (B, 256, T, H/32, W/32)].

        Unlike pytorchvideo's model the input list is not modified."""
        _check_pathways(pathways)
        x = list(pathways)
        for block in self.blocks[:5]:
            x = block(x)
        return x

    def forward(self, pathways: Sequence[Tensor]) -> Tensor:
        """[slow (B, 3, T/4, H, W), fast (B, 3, T, H, W)] → (B, 2304) feature, the input of the
        classification projection: per pathway the global average over (t, h, w) of res5's
        output (slow 2048, then fast 256 channels).

        At crop 224 with T = 32 this is exactly the output of pytorchvideo's head pooling
        (`blocks[5]`, kernels (8, 7, 7) and (32, 7, 7)); at other sizes it is the global average
        (pytorchvideo's stride-1 pooling would then average sliding windows or fail).
        """
        slow, fast = self.pathway_features(pathways)
        return torch.cat([slow.mean(dim=(2, 3, 4)), fast.mean(dim=(2, 3, 4))], dim=1)

    def classify(self, pathways: Sequence[Tensor]) -> Tensor:
        """(B, num_classes) logits: pytorchvideo's full model (head pooling with kernels (8, 7, 7)
        and (32, 7, 7), dropout, proj, output average; no softmax), the same function in eval
        mode. Inputs smaller than 224 px / T = 32 pool globally where pytorchvideo would fail."""
        return self.blocks[6](self.blocks[5](self.pathway_features(pathways)))


def _check_pathways(pathways: Sequence[Tensor]) -> None:
    if len(pathways) != 2:
        raise ValueError(f"SlowFast takes [slow, fast] clips, got {len(pathways)} tensors.")
    slow, fast = pathways
    if slow.dim() != 5 or fast.dim() != 5 or slow.shape[1] != 3 or fast.shape[1] != 3:
        raise ValueError(
            f"SlowFast takes (B, 3, T, H, W) clips, got {tuple(slow.shape)} and "
            f"{tuple(fast.shape)}."
        )
    if slow.shape[2] != math.ceil(fast.shape[2] / ALPHA) or slow.shape[3:] != fast.shape[3:]:
        raise ValueError(
            f"The slow clip {tuple(slow.shape)} must have 1/{ALPHA} of the fast clip's "
            f"{tuple(fast.shape)} frames and its size (see pack_pathways)."
        )


def create_slowfast(
    *,
    model_depth: int = 50,
    slowfast_fusion_conv_kernel_size: Kernel3 | None = None,
    num_classes: int = 400,
) -> SlowFast:
    """SlowFast-R50 or -R101 with pytorchvideo's layout; the fusion kernel defaults to that of the
    published Kinetics-400 weights: (7, 1, 1) for R50, (5, 1, 1) for R101."""
    if model_depth not in VARIANTS:
        raise ValueError(
            f"SlowFast model_depth must be one of {sorted(VARIANTS)}, not {model_depth}."
        )
    kernel = slowfast_fusion_conv_kernel_size or VARIANTS[model_depth].fusion_kernel
    if len(kernel) != 3:
        raise ValueError(f"The fusion kernel must be (t, h, w), not {kernel}.")
    t, h, w = (int(k) for k in kernel)
    return SlowFast(model_depth, (t, h, w), num_classes)


def pack_pathways(clip: Tensor, *, alpha: int = ALPHA) -> list[Tensor]:
    """(B, 3, T, H, W) → [slow (B, 3, T/alpha, H, W), fast = clip], as pytorchvideo's PackPathway.

    The slow frames are `torch.linspace(0, T - 1, T // alpha).long()`: the first and the last
    frame are kept (T = 32: 0, 4, 8, 13, 17, 22, 26, 31), so both pathways end at the clip's last
    frame. T must be a multiple of alpha.
    """
    if clip.dim() != 5:
        raise ValueError(f"pack_pathways takes a (B, 3, T, H, W) clip, got {tuple(clip.shape)}.")
    frames = clip.shape[2]
    if frames < alpha or frames % alpha:
        raise ValueError(f"The clip's {frames} frames are not a positive multiple of {alpha}.")
    index = torch.linspace(0, frames - 1, frames // alpha, device=clip.device).long()
    return [clip.index_select(2, index), clip]


def load_slowfast_weights(model: SlowFast, path: Path) -> None:
    """Load a PySlowFast/pytorchvideo checkpoint (`{'model_state': ...}` or `{'state_dict': ...}`,
    keys optionally prefixed `module.`) into `model`, head included.

    Raises DataError for an unreadable file or any missing, unexpected or mis-shaped key.
    """
    state = read_backbone_state(
        path, containers=("model_state", "state_dict"), strip_prefixes=("module.",)
    )
    load_backbone_state(model, state, source=str(path), backbone=f"SlowFast-R{model.model_depth}")
