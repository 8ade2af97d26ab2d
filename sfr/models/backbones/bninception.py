"""BN-Inception of the TSN checkpoints: the network behind RU-LSTM's published rgb/flow features.

Follows `pretrainedmodels.models.bninception` (Cadene's pretrained-models.pytorch 0.7.4) as set up
by RU-LSTM's `FEATEXT/extract_example_{rgb,flow}.py`: the flow network takes 10 channels (5
stacked (u, v) pairs) in its first convolution, the classifier is dropped and the last feature
map is averaged over space.

    x (B, C, H, W)     C = 3: BGR minus [104, 117, 128]; C = 10: u1, v1, ..., u5, v5 minus 128
      │ conv1_7x7_s2 ─ max 3x3/2 ─ conv2_3x3_reduce ─ conv2_3x3 ─ max 3x3/2
      ▼
    inception 3a ─ 3b ─ 3c↓ ─ 4a ─ 4b ─ 4c ─ 4d ─ 4e↓ ─ 5a ─ 5b      (↓: stride 2)
      │ each block: concat( 1x1 │ 1x1→3x3 │ 1x1→3x3→3x3 │ pool(→1x1) ) along channels
      ▼
    feature map (B, 1024, h, w) ── global average pool ──► feature (B, 1024)

Every convolution has a bias and is followed by BatchNorm and ReLU. The BatchNorms keep PyTorch's
defaults (eps 1e-5, momentum 0.1) as in the 0.7.4 release; the repository's later source writes
momentum=0.9, which only changes how training would update the running statistics. Max pools
round up (`ceil_mode`), the in-block average pools count the zero padding. A reduction
block (3c, 4e) halves the map in its strided convolutions and in its pool, which agree only on an
even map: an input side works when it lies in 32k-1 .. 32k+6 (224 and 256 do, 454 = 14 * 32 + 6
just does, 112 does not).

The layers are attributes with the published names (`inception_3a_double_3x3_1_bn`, ...), so the
state dict is key for key that of `pretrainedmodels`' `bninception` less `last_linear`, and the
TSN checkpoints load after stripping `module.base_model.` (`load_tsn_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sfr.models.backbones.weights import load_backbone_state, read_backbone_state

FEATURE_DIM = 1024  # width of the last feature map and of the published feature

# Layout of a TSN `.pth.tar` (tsn-pytorch `main.py` saves the state dict of `DataParallel(TSN)`):
# the backbone under `module.base_model.`, the classifier as `module.new_fc.{weight,bias}` (left
# unstripped, then dropped). `base_model.`/`new_fc.` cover a checkpoint saved without DataParallel.
TSN_CHECKPOINT: dict[str, tuple[str, ...]] = {
    "containers": ("state_dict",),
    "strip_prefixes": ("module.base_model.", "base_model."),
    # Classifiers the published extraction never runs: TSN's `new_fc` (dropout > 0), or the
    # replaced last layer `fc` (dropout 0), or pretrainedmodels' ImageNet `last_linear`.
    "ignore_prefixes": ("module.new_fc.", "new_fc.", "fc.", "last_linear."),
}


class Inception(NamedTuple):
    """One inception block: the widths of its branches, its pool and its stride.

    Branches, in concatenation order: `1x1` (absent when 0), `3x3_reduce → 3x3`,
    `double_3x3_reduce → double_3x3_1 → double_3x3_2`, `pool → pool_proj` (the pooled input is
    concatenated as is when `pool_proj` is 0). Stride 2 applies to `3x3`, `double_3x3_2` and the
    pool (3x3/2, unpadded); stride-1 pools are 3x3/1 padded by 1.
    """

    name: str
    n1x1: int
    n3x3_reduce: int
    n3x3: int
    n_double_reduce: int
    n_double: int
    pool: Literal["avg", "max"]
    pool_proj: int
    stride: int = 1


# fmt: off
INCEPTION_BLOCKS: tuple[Inception, ...] = (
    #          name   1x1   3x3: reduce, out   double: reduce, out   pool   proj  stride
    Inception("3a",   64,        64,   64,             64,   96,   "avg",   32),
    Inception("3b",   64,        64,   96,             64,   96,   "avg",   64),
    Inception("3c",    0,       128,  160,             64,   96,   "max",    0,   2),
    Inception("4a",  224,        64,   96,             96,  128,   "avg",  128),
    Inception("4b",  192,        96,  128,             96,  128,   "avg",  128),
    Inception("4c",  160,       128,  160,            128,  160,   "avg",  128),
    Inception("4d",   96,       128,  192,            160,  192,   "avg",  128),
    Inception("4e",    0,       128,  192,            192,  256,   "max",    0,   2),
    Inception("5a",  352,       192,  320,            160,  224,   "avg",  128),
    Inception("5b",  352,       192,  320,            192,  224,   "max",  128),
)
# fmt: on


class _Plan(NamedTuple):
    """The layer names one block runs: its conv units per branch, its pool and projection."""

    spec: Inception
    branches: tuple[tuple[str, ...], ...]
    pool: str
    pool_proj: str | None


def _pool(kind: str, stride: int) -> nn.Module:
    """The 3x3 pool of a block: padded by 1 at stride 1 (size kept), unpadded at stride 2."""
    padding = 1 if stride == 1 else 0
    if kind == "avg":
        return nn.AvgPool2d(3, stride, padding, ceil_mode=True, count_include_pad=True)
    if kind == "max":
        return nn.MaxPool2d(3, stride, padding, ceil_mode=True)
    raise ValueError(f"Unknown pool kind '{kind}' (expected 'avg' or 'max').")


class BNInception(nn.Module):
    """BN-Inception trunk: `forward_features` gives the last map, `forward` its spatial mean.

    Each conv unit `name` is two attributes, `name` (Conv2d with bias) and `name_bn`
    (BatchNorm2d), run as conv → BN → ReLU.
    """

    def __init__(
        self, in_channels: int = 3, blocks: tuple[Inception, ...] = INCEPTION_BLOCKS
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self._unit("conv1_7x7_s2", in_channels, 64, 7, stride=2, padding=3)
        self.pool1_3x3_s2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self._unit("conv2_3x3_reduce", 64, 64, 1)
        self._unit("conv2_3x3", 64, 192, 3, padding=1)
        self.pool2_3x3_s2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        channels = 192
        plans = []
        for spec in blocks:
            plan, channels = self._block(spec, channels)
            plans.append(plan)
        self._plans = tuple(plans)
        self.out_channels = channels

    def _unit(
        self, name: str, cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 0
    ) -> str:
        """Register conv `name` and its BatchNorm `name_bn`; return `name`."""
        self.add_module(name, nn.Conv2d(cin, cout, kernel, stride, padding))
        self.add_module(f"{name}_bn", nn.BatchNorm2d(cout))
        return name

    def _block(self, spec: Inception, cin: int) -> tuple[_Plan, int]:
        """Register the layers of one block in the published order; return its plan and width."""
        p, s = f"inception_{spec.name}_", spec.stride
        branches: list[tuple[str, ...]] = []
        if spec.n1x1:
            branches.append((self._unit(p + "1x1", cin, spec.n1x1, 1),))
        branches.append(
            (
                self._unit(p + "3x3_reduce", cin, spec.n3x3_reduce, 1),
                self._unit(p + "3x3", spec.n3x3_reduce, spec.n3x3, 3, stride=s, padding=1),
            )
        )
        nr, nd = spec.n_double_reduce, spec.n_double
        branches.append(
            (
                self._unit(p + "double_3x3_reduce", cin, nr, 1),
                self._unit(p + "double_3x3_1", nr, nd, 3, padding=1),
                self._unit(p + "double_3x3_2", nd, nd, 3, stride=s, padding=1),
            )
        )
        self.add_module(p + "pool", _pool(spec.pool, s))
        proj = self._unit(p + "pool_proj", cin, spec.pool_proj, 1) if spec.pool_proj else None
        cout = spec.n1x1 + spec.n3x3 + nd + (spec.pool_proj or cin)
        return _Plan(spec, tuple(branches), p + "pool", proj), cout

    def _run_unit(self, name: str, x: Tensor) -> Tensor:
        """conv → BN → ReLU of the unit `name`."""
        x = getattr(self, f"{name}_bn")(getattr(self, name)(x))
        return F.relu(x, inplace=True)

    def _run_block(self, plan: _Plan, x: Tensor) -> Tensor:
        """(B, C_in, h, w) → (B, C_out, h / stride, w / stride)."""
        if plan.spec.stride == 2 and (x.shape[-2] % 2 or x.shape[-1] % 2):
            raise ValueError(
                f"BNInception: the map entering inception_{plan.spec.name} is "
                f"{x.shape[-2]}x{x.shape[-1]}; its strided convolutions and pool need even sizes. "
                "Input sides from 32k-1 to 32k+6 work (224, 256, 454)."
            )
        outs = []
        for branch in plan.branches:
            y = x
            for name in branch:
                y = self._run_unit(name, y)
            outs.append(y)
        y = getattr(self, plan.pool)(x)
        outs.append(self._run_unit(plan.pool_proj, y) if plan.pool_proj else y)
        return torch.cat(outs, dim=1)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) float → last feature map (B, 1024, h, w), h ≈ H / 32, w ≈ W / 32."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"BNInception expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}."
            )
        x = self.pool1_3x3_s2(self._run_unit("conv1_7x7_s2", x))
        x = self._run_unit("conv2_3x3", self._run_unit("conv2_3x3_reduce", x))
        x = self.pool2_3x3_s2(x)
        for plan in self._plans:
            x = self._run_block(plan, x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, 1024): the feature map averaged over space (the published feature)."""
        return F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1)


def create_bninception(*, in_channels: int = 3) -> BNInception:
    """The TSN BN-Inception trunk: `in_channels` 3 for rgb, 10 for flow (5 stacked (u, v) pairs).

    Weights are PyTorch's defaults; load the published ones with `load_tsn_weights`.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}.")
    return BNInception(in_channels)


def load_tsn_weights(model: BNInception, path: Path) -> None:
    """Load a TSN checkpoint (`TSN-rgb.pth.tar`, `TSN-flow.pth.tar`) into `model`.

    Raises DataError when the file is unreadable or its keys or shapes do not fit `model`.
    """
    state = read_backbone_state(Path(path), **TSN_CHECKPOINT)
    modality = {3: "rgb", 10: "flow"}.get(model.in_channels, f"{model.in_channels}-channel")
    load_backbone_state(model, state, source=str(path), backbone=f"BNInception ({modality})")
