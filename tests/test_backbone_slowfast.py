"""SlowFast backbone: pytorchvideo's state-dict layout, checkpoint loading, pathway packing, and
agreement with pytorchvideo's outputs (a stored golden fixture).

Layout digests: sha256 of the sorted `key:shape` lines (`_digest`) of the state dict of
pytorchvideo 0.1.5's `create_slowfast(model_depth=50)` and
`create_slowfast(model_depth=101, slowfast_fusion_conv_kernel_size=(5, 1, 1))`, computed once
from pytorchvideo itself; `_expected_layout` rebuilds the same lists here from the architecture
so that a mismatch shows which key differs.

Golden fixture `tests/data/backbones/slowfast_r50_golden.safetensors` (written once, outside the
repository, from pytorchvideo 0.1.5's own model code, pip-downloaded sdist, no torchvision):
- `clip`: `torch.randn(1, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))` stored as
  float16; the oracle ran on its float32 conversion, packed by pytorchvideo's PackPathway rule
  (slow frames `linspace(0, 7, 2).long()` = 0, 7);
- pytorchvideo's `create_slowfast(model_depth=50, head_pool_kernel_sizes=((2, 2, 2), (8, 2, 2)))`
  (global pooling at this size) given the weights of `_deterministic_state` (a rule on each
  tensor's position in the state dict, no random generator), in eval mode, float32;
- `feature`: the output of its `blocks[5]` (PoolConcatPathway), (1, 2304);
- `logits`: its full forward, (1, 400).
With the same weights at 224 px and T = 32 (pytorchvideo's default head), `classify` equalled
pytorchvideo's forward bit for bit (R50 and R101; also R50 at 256 px, where the head pools sliding
windows) and `forward` its `blocks[5]` output to 1.5e-5 (R50, features up to 37) and 5.5e-4
(R101, features up to 660): a relative 1e-6, the rounding of a mean against AvgPool3d's sum.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from sfr.errors import DataError
from sfr.models.backbones.slowfast import (
    SlowFast,
    create_slowfast,
    load_slowfast_weights,
    pack_pathways,
)

pytestmark = pytest.mark.usefixtures("module_torch_thread")

GOLDEN = Path(__file__).parent / "data" / "backbones" / "slowfast_r50_golden.safetensors"
# sha256 of the sorted key:shape lines of pytorchvideo's state dicts (see the module docstring).
PYTORCHVIDEO_DIGEST = {
    50: "e3cf9f0265a6bb4de14777da1821bc2692bb4884b4a8c94e17a60e886a7daea7",
    101: "11ce27223ae7d2bd4522ca87838c08088da666741cb47c8e4a0cf5ce8e07bd74",
}
PYTORCHVIDEO_PARAMS = {50: 34_566_488, 101: 62_826_968}
PYTORCHVIDEO_KEYS = {50: 662, 101: 1274}  # num_batches_tracked included

Layout = list[tuple[str, tuple[int, ...]]]


def _digest(layout: Layout) -> str:
    lines = "\n".join(f"{k}:{'x'.join(map(str, s))}" for k, s in sorted(layout))
    return hashlib.sha256(lines.encode()).hexdigest()


def _expected_layout(depths: tuple[int, ...], fusion_t: int) -> Layout:
    """The (key, shape) list of pytorchvideo's SlowFast, written out from the architecture."""
    out: Layout = []

    def conv(name: str, c_out: int, c_in: int, kernel: tuple[int, int, int]) -> None:
        out.append((f"{name}.weight", (c_out, c_in, *kernel)))

    def bn(name: str, c: int) -> None:
        out.extend((f"{name}.{p}", (c,)) for p in ("weight", "bias", "running_mean", "running_var"))
        out.append((f"{name}.num_batches_tracked", ()))

    def fusion(block: int, c_fast: int) -> None:
        conv(
            f"blocks.{block}.multipathway_fusion.conv_fast_to_slow",
            2 * c_fast,
            c_fast,
            (fusion_t, 1, 1),
        )
        bn(f"blocks.{block}.multipathway_fusion.norm", 2 * c_fast)

    for path, (c, kt) in enumerate([(64, 1), (8, 5)]):
        conv(f"blocks.0.multipathway_blocks.{path}.conv", c, 3, (kt, 7, 7))
        bn(f"blocks.0.multipathway_blocks.{path}.norm", c)
    fusion(0, 8)
    slow_t, fast_t = (1, 1, 3, 3), (3, 3, 3, 3)
    c_in = {0: 64 + 16, 1: 8}
    for stage, depth in enumerate(depths):
        c_out_slow = 256 * 2**stage
        for path, (c_out, kt) in enumerate(
            [(c_out_slow, slow_t[stage]), (c_out_slow // 8, fast_t[stage])]
        ):
            for i in range(depth):
                name = f"blocks.{stage + 1}.multipathway_blocks.{path}.res_blocks.{i}"
                dim_in = c_in[path] if i == 0 else c_out
                if i == 0:
                    conv(f"{name}.branch1_conv", c_out, dim_in, (1, 1, 1))
                    bn(f"{name}.branch1_norm", c_out)
                inner = c_out // 4
                conv(f"{name}.branch2.conv_a", inner, dim_in, (kt, 1, 1))
                bn(f"{name}.branch2.norm_a", inner)
                conv(f"{name}.branch2.conv_b", inner, inner, (1, 3, 3))
                bn(f"{name}.branch2.norm_b", inner)
                conv(f"{name}.branch2.conv_c", c_out, inner, (1, 1, 1))
                bn(f"{name}.branch2.norm_c", c_out)
        if stage < 3:
            fusion(stage + 1, c_out_slow // 8)
        c_in = {0: c_out_slow + c_out_slow // 4, 1: c_out_slow // 8}
    out += [("blocks.6.proj.weight", (400, 2304)), ("blocks.6.proj.bias", (400,))]
    return out


def _layout(model: torch.nn.Module) -> Layout:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _uniform(count: int, salt: int) -> Tensor:
    """`count` float64 values in [0, 1): an integer hash (31-bit LCG steps and xor-shifts) of the
    element index and `salt`, the same on every platform and torch version."""
    x = (torch.arange(count, dtype=torch.int64) + salt * 1_000_003) % 2**31
    for _ in range(3):
        x = (x * 1_103_515_245 + 12_345) % 2**31
        x = x ^ (x >> 15)
    return x.double() / 2**31


def _deterministic_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """Weights from a fixed rule on each tensor's position in the state dict: He-uniform convs,
    BN weight in [0.5, 1), bias and running mean in [-0.1, 0.1), running var in [0.5, 1.5),
    proj uniform of std 1/sqrt(2304 * 3)."""
    state = {}
    for salt, (key, value) in enumerate(model.state_dict().items()):
        if key.endswith("num_batches_tracked"):
            state[key] = value.clone()
            continue
        u = _uniform(value.numel(), salt).view(value.shape)
        if value.dim() == 5:
            bound = math.sqrt(6.0 / (value[0].numel()))
            new = (2 * u - 1) * bound
        elif value.dim() == 2:
            new = (2 * u - 1) / math.sqrt(value.shape[1])
        elif key.endswith("running_var"):
            new = 0.5 + u
        elif key.endswith("weight") and "norm" in key:
            new = 0.5 + 0.5 * u
        else:  # BN bias, running mean, proj bias
            new = 0.1 * (2 * u - 1)
        state[key] = new.to(value.dtype)
    return state


@pytest.fixture(scope="module")
def r50() -> SlowFast:
    model = create_slowfast(model_depth=50).eval()
    model.load_state_dict(_deterministic_state(model))
    return model


def _tiny_pathways(seed: int = 0) -> list[Tensor]:
    clip = torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(seed))
    return pack_pathways(clip)


@pytest.mark.parametrize("depth", [50, 101])
def test_state_dict_layout_is_pytorchvideos(depth: int) -> None:
    model = create_slowfast(model_depth=depth)
    layout = _layout(model)
    expected = _expected_layout(
        (3, 4, 6, 3) if depth == 50 else (3, 4, 23, 3), 7 if depth == 50 else 5
    )
    assert sorted(layout) == sorted(expected)
    assert _digest(expected) == PYTORCHVIDEO_DIGEST[depth]
    assert len(layout) == PYTORCHVIDEO_KEYS[depth]
    assert sum(p.numel() for p in model.parameters()) == PYTORCHVIDEO_PARAMS[depth]
    shapes = dict(layout)
    assert shapes["blocks.0.multipathway_blocks.0.conv.weight"] == (64, 3, 1, 7, 7)
    assert shapes["blocks.0.multipathway_blocks.1.conv.weight"] == (8, 3, 5, 7, 7)
    fusion_t = 7 if depth == 50 else 5
    assert shapes["blocks.0.multipathway_fusion.conv_fast_to_slow.weight"] == (
        16,
        8,
        fusion_t,
        1,
        1,
    )
    assert shapes["blocks.3.multipathway_fusion.conv_fast_to_slow.weight"] == (
        256,
        128,
        fusion_t,
        1,
        1,
    )
    assert shapes["blocks.1.multipathway_blocks.0.res_blocks.0.branch1_conv.weight"] == (
        256,
        80,
        1,
        1,
        1,
    )
    assert shapes["blocks.4.multipathway_blocks.0.res_blocks.0.branch2.conv_a.weight"] == (
        512,
        1280,
        3,
        1,
        1,
    )
    assert shapes["blocks.6.proj.weight"] == (400, 2304)
    assert not any(k.startswith(("blocks.4.multipathway_fusion", "blocks.5")) for k in shapes)
    last = 5 if depth == 50 else 22
    assert f"blocks.3.multipathway_blocks.1.res_blocks.{last}.branch2.norm_c.running_var" in shapes


def test_builder_options() -> None:
    model = create_slowfast(
        model_depth=50, slowfast_fusion_conv_kernel_size=(5, 1, 1), num_classes=7
    )
    shapes = dict(_layout(model))
    assert shapes["blocks.1.multipathway_fusion.conv_fast_to_slow.weight"] == (64, 32, 5, 1, 1)
    assert shapes["blocks.6.proj.weight"] == (7, 2304)
    with pytest.raises(ValueError, match="model_depth"):
        create_slowfast(model_depth=18)


def _save_checkpoint(path: Path, state: dict[str, Tensor], container: str = "model_state") -> Path:
    torch.save({container: state, "epoch": 196, "cfg": "MODEL:\n  ARCH: slowfast\n"}, path)
    return path


def test_published_container_loads(r50: SlowFast, tmp_path: Path) -> None:
    state = r50.state_dict()
    model = create_slowfast(model_depth=50).eval()
    load_slowfast_weights(model, _save_checkpoint(tmp_path / "SLOWFAST_8x8_R50.pyth", state))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # A DataParallel checkpoint under 'state_dict' loads too, and the old-PyTorch BN counters
    # may be absent.
    prefixed = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    other = create_slowfast(model_depth=50)
    load_slowfast_weights(other, _save_checkpoint(tmp_path / "dp.pyth", prefixed, "state_dict"))
    assert torch.equal(other.blocks[6].proj.weight, r50.blocks[6].proj.weight)


def test_wrong_checkpoints_are_refused(r50: SlowFast, tmp_path: Path) -> None:
    state = dict(r50.state_dict())
    model = create_slowfast(model_depth=50)
    missing = {k: v for k, v in state.items() if k != "blocks.6.proj.bias"}
    with pytest.raises(DataError, match=r"missing \(first: 'blocks\.6\.proj\.bias'\)"):
        load_slowfast_weights(model, _save_checkpoint(tmp_path / "missing.pyth", missing))
    extra = {**state, "blocks.7.proj.weight": torch.zeros(1)}
    with pytest.raises(DataError, match=r"unexpected \(first: 'blocks\.7\.proj\.weight'\)"):
        load_slowfast_weights(model, _save_checkpoint(tmp_path / "extra.pyth", extra))
    wrong = {**state, "blocks.6.proj.weight": torch.zeros(174, 2304)}
    with pytest.raises(DataError, match=r"'blocks\.6\.proj\.weight' has shape \(174, 2304\)"):
        load_slowfast_weights(model, _save_checkpoint(tmp_path / "wrong.pyth", wrong))
    r101 = create_slowfast(model_depth=101)
    with pytest.raises(
        DataError,
        match=r"SlowFast-R101.*missing \(first: 'blocks\.3\.multipathway_blocks\.0\.res_blocks\.6\.",
    ):
        load_slowfast_weights(r101, _save_checkpoint(tmp_path / "r50.pyth", state))
    with pytest.raises(DataError, match="holds no state dict"):
        load_slowfast_weights(
            model, _save_checkpoint(tmp_path / "odd.pyth", {"x": torch.zeros(1)}, "model")
        )


def test_outputs_survive_a_state_dict_round_trip(r50: SlowFast, tmp_path: Path) -> None:
    pathways = _tiny_pathways()
    path = _save_checkpoint(tmp_path / "round.pyth", r50.state_dict())
    copy = create_slowfast(model_depth=50).eval()
    load_slowfast_weights(copy, path)
    with torch.no_grad():
        assert torch.equal(copy(pathways), r50(pathways))
        assert torch.equal(copy.classify(pathways), r50.classify(pathways))


def test_forward_shapes_and_inputs(r50: SlowFast) -> None:
    pathways = _tiny_pathways()
    kept = [p.clone() for p in pathways]
    with torch.no_grad():
        feature = r50(pathways)
        logits = r50.classify(pathways)
        slow, fast = r50.pathway_features(pathways)
    assert feature.shape == (1, 2304) and logits.shape == (1, 400)
    assert slow.shape == (1, 2048, 2, 1, 1) and fast.shape == (1, 256, 8, 1, 1)
    assert torch.allclose(feature[:, :2048], slow.mean(dim=(2, 3, 4)))
    # The head's projection of the feature is the logits (global pooling at this size).
    assert torch.allclose(r50.blocks[6].proj(feature), logits, atol=1e-5)
    assert len(pathways) == 2 and all(torch.equal(a, b) for a, b in zip(pathways, kept))
    with pytest.raises(ValueError, match="1/4"):
        r50([pathways[0][:, :, :1], pathways[1]])
    with pytest.raises(ValueError, match=r"\[slow, fast\]"):
        r50([pathways[1]])


def test_pack_pathways_takes_pytorchvideos_frames() -> None:
    frames = torch.arange(32, dtype=torch.float32).view(1, 1, 32, 1, 1).expand(2, 3, 32, 4, 4)
    slow, fast = pack_pathways(frames)
    assert slow.shape == (2, 3, 8, 4, 4) and fast is frames
    assert slow[0, 0, :, 0, 0].tolist() == [0, 4, 8, 13, 17, 22, 26, 31]
    assert slow[1, 2, -1, 3, 3] == fast[1, 2, -1, 3, 3] == 31
    slow8, _ = pack_pathways(frames[:, :, :8])
    assert slow8[0, 0, :, 0, 0].tolist() == [0, 7]
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_pathways(frames[:, :, :30])
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        pack_pathways(frames[0])


def test_matches_pytorchvideo_golden(r50: SlowFast) -> None:
    golden = load_file(str(GOLDEN))
    pathways = pack_pathways(golden["clip"].float())
    with torch.no_grad():
        feature = r50(pathways)
        logits = r50.classify(pathways)
    torch.testing.assert_close(feature, golden["feature"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, golden["logits"], rtol=1e-4, atol=1e-5)
