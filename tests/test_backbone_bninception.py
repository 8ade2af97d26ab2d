"""The TSN BN-Inception backbone: published state-dict layout, TSN checkpoint loading, and the
function of pretrainedmodels' `bninception` as RU-LSTM's feature extraction sets it up.

Golden fixture `tests/data/backbones/bninception_golden.safetensors`: made outside this repository
with `pretrainedmodels/models/bninception.py` of pretrainedmodels 0.7.4 (PyPI sdist, that one file
imported on its own), set up as in RU-LSTM's `FEATEXT/extract_example_{rgb,flow}.py`
(`bninception(pretrained=None)`; flow: `conv1_7x7_s2 = nn.Conv2d(10, 64, 7, 2, 3)`;
`last_linear = nn.Identity()`, `global_pool = nn.AdaptiveAvgPool2d(1)`), weights from
`synthetic_state` below, eval mode, torch 2.13 CPU float32. It holds the inputs
(`torch.randn(shape, generator=torch.Generator().manual_seed(0))` rounded to float16 and stored
so: `rgb_input` (2, 3, 64, 96), `flow_input` (1, 10, 64, 64)) and the published network's
outputs `rgb_output` (2, 1024), `flow_output` (1, 1024). When it was made, this module's network
agreed with the published one bit for bit, there and at 96x160, 224x224 and 256x454.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sfr.errors import DataError
from sfr.models.backbones.bninception import (
    TSN_CHECKPOINT,
    BNInception,
    create_bninception,
    load_tsn_weights,
)

GOLDEN = Path(__file__).parent / "data" / "backbones" / "bninception_golden.safetensors"

# Every convolution of pretrainedmodels' BNInception in registration order: name, input channels,
# output channels, kernel size (rgb; flow differs in conv1_7x7_s2's 10 inputs). Each one carries a
# bias and is followed by a BatchNorm `<name>_bn`.
CONVS = """
conv1_7x7_s2                          3   64  7
conv2_3x3_reduce                     64   64  1
conv2_3x3                            64  192  3
inception_3a_1x1                    192   64  1
inception_3a_3x3_reduce             192   64  1
inception_3a_3x3                     64   64  3
inception_3a_double_3x3_reduce      192   64  1
inception_3a_double_3x3_1            64   96  3
inception_3a_double_3x3_2            96   96  3
inception_3a_pool_proj              192   32  1
inception_3b_1x1                    256   64  1
inception_3b_3x3_reduce             256   64  1
inception_3b_3x3                     64   96  3
inception_3b_double_3x3_reduce      256   64  1
inception_3b_double_3x3_1            64   96  3
inception_3b_double_3x3_2            96   96  3
inception_3b_pool_proj              256   64  1
inception_3c_3x3_reduce             320  128  1
inception_3c_3x3                    128  160  3
inception_3c_double_3x3_reduce      320   64  1
inception_3c_double_3x3_1            64   96  3
inception_3c_double_3x3_2            96   96  3
inception_4a_1x1                    576  224  1
inception_4a_3x3_reduce             576   64  1
inception_4a_3x3                     64   96  3
inception_4a_double_3x3_reduce      576   96  1
inception_4a_double_3x3_1            96  128  3
inception_4a_double_3x3_2           128  128  3
inception_4a_pool_proj              576  128  1
inception_4b_1x1                    576  192  1
inception_4b_3x3_reduce             576   96  1
inception_4b_3x3                     96  128  3
inception_4b_double_3x3_reduce      576   96  1
inception_4b_double_3x3_1            96  128  3
inception_4b_double_3x3_2           128  128  3
inception_4b_pool_proj              576  128  1
inception_4c_1x1                    576  160  1
inception_4c_3x3_reduce             576  128  1
inception_4c_3x3                    128  160  3
inception_4c_double_3x3_reduce      576  128  1
inception_4c_double_3x3_1           128  160  3
inception_4c_double_3x3_2           160  160  3
inception_4c_pool_proj              576  128  1
inception_4d_1x1                    608   96  1
inception_4d_3x3_reduce             608  128  1
inception_4d_3x3                    128  192  3
inception_4d_double_3x3_reduce      608  160  1
inception_4d_double_3x3_1           160  192  3
inception_4d_double_3x3_2           192  192  3
inception_4d_pool_proj              608  128  1
inception_4e_3x3_reduce             608  128  1
inception_4e_3x3                    128  192  3
inception_4e_double_3x3_reduce      608  192  1
inception_4e_double_3x3_1           192  256  3
inception_4e_double_3x3_2           256  256  3
inception_5a_1x1                   1056  352  1
inception_5a_3x3_reduce            1056  192  1
inception_5a_3x3                    192  320  3
inception_5a_double_3x3_reduce     1056  160  1
inception_5a_double_3x3_1           160  224  3
inception_5a_double_3x3_2           224  224  3
inception_5a_pool_proj             1056  128  1
inception_5b_1x1                   1024  352  1
inception_5b_3x3_reduce            1024  192  1
inception_5b_3x3                    192  320  3
inception_5b_double_3x3_reduce     1024  192  1
inception_5b_double_3x3_1           192  224  3
inception_5b_double_3x3_2           224  224  3
inception_5b_pool_proj             1024  128  1
"""
RGB_PARAMS = 10_270_240  # pretrainedmodels' 11_295_240 less last_linear (1024 * 1000 + 1000)
FLOW_PARAMS = RGB_PARAMS + 64 * 7 * 7 * (10 - 3)


def expected_layout(in_channels: int) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of the published state dict, in order, built from CONVS."""
    layout: list[tuple[str, tuple[int, ...]]] = []
    for line in CONVS.strip().splitlines():
        name, cin, cout, k = line.split()
        cin_, cout_, k_ = (in_channels if name == "conv1_7x7_s2" else int(cin)), int(cout), int(k)
        layout += [(f"{name}.weight", (cout_, cin_, k_, k_)), (f"{name}.bias", (cout_,))]
        layout += [(f"{name}_bn.{s}", (cout_,)) for s in ("weight", "bias", "running_mean")]
        layout += [(f"{name}_bn.running_var", (cout_,)), (f"{name}_bn.num_batches_tracked", ())]
    return layout


def synthetic_state(in_channels: int) -> dict[str, Tensor]:
    """Deterministic weights (the rule the golden fixture was made with).

    Keys in sorted order, key i drawn from `torch.Generator().manual_seed(i)`: conv weights
    He-normal (std sqrt(2 / fan_in)), BN weight uniform in [0.5, 1.5), BN running_var uniform in
    [0.75, 1.5) (so that a unit neither grows nor shrinks its input on average and every layer
    shows in the output), conv biases, BN biases and running means normal * 0.1,
    num_batches_tracked = i.
    """
    state: dict[str, Tensor] = {}
    for i, (key, shape) in enumerate(sorted(expected_layout(in_channels))):
        gen = torch.Generator().manual_seed(i)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(i)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)
        elif key.endswith("_bn.weight"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("_bn.running_var"):
            state[key] = torch.rand(shape, generator=gen) * 0.75 + 0.75
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.1
    return state


def synthetic_model(in_channels: int) -> BNInception:
    model = create_bninception(in_channels=in_channels)
    model.load_state_dict(synthetic_state(in_channels))
    return model.eval()


def tsn_checkpoint(state: dict[str, Tensor], num_classes: int = 8) -> dict:
    """`state` in the container of a published TSN `.pth.tar` (DataParallel(TSN).state_dict())."""
    inner: OrderedDict[str, Tensor] = OrderedDict(
        (f"module.base_model.{k}", v.clone()) for k, v in state.items()
    )
    inner["module.new_fc.weight"] = torch.zeros(num_classes, 1024)
    inner["module.new_fc.bias"] = torch.zeros(num_classes)
    return {"epoch": 80, "arch": "BNInception", "state_dict": inner, "best_prec1": 31.2}


@pytest.fixture(autouse=True)
def _threads(single_torch_thread):
    """The convolutions here are small: one thread avoids OpenMP contention on busy runners."""


@pytest.fixture(scope="module")
def rgb_model() -> BNInception:
    return synthetic_model(3)


# ---------------------------------------------------------------------------------- layout


@pytest.mark.parametrize(("in_channels", "params"), [(3, RGB_PARAMS), (10, FLOW_PARAMS)])
def test_state_dict_is_published_layout(in_channels: int, params: int) -> None:
    model = create_bninception(in_channels=in_channels)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected_layout(in_channels)
    assert len(got) == 69 * 7 == 483
    assert sum(p.numel() for p in model.parameters()) == params
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(math.prod(s) for k, s in got if not k.endswith(buffers)) == params
    assert not any(k.startswith("last_linear") for k, _ in got)


def test_layers_match_published_settings() -> None:
    model = create_bninception()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 69
    assert all(b.eps == 1e-5 and b.momentum == 0.1 and b.affine for b in bns)
    assert model.conv1_7x7_s2.stride == (2, 2) and model.conv1_7x7_s2.padding == (3, 3)
    assert model.inception_3c_3x3.stride == (2, 2)
    assert model.inception_4e_double_3x3_2.stride == (2, 2)
    assert isinstance(model.inception_5b_pool, torch.nn.MaxPool2d)
    assert isinstance(model.inception_5a_pool, torch.nn.AvgPool2d)


# ---------------------------------------------------------------------------------- forward


def test_forward_shapes_and_global_pool(rgb_model: BNInception) -> None:
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fmap = rgb_model.forward_features(x)
        feat = rgb_model(x)
    assert fmap.shape == (1, 1024, 3, 5)
    assert feat.shape == (1, 1024)
    torch.testing.assert_close(feat, fmap.mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
    assert bool((fmap >= 0).all())  # the last units end in ReLU (max pool of rectified maps in 5b)


def test_bad_inputs_are_refused(rgb_model: BNInception) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        rgb_model(torch.zeros(1, 10, 64, 64))
    # 112 px: an odd 7-pixel map reaches inception_4e's stride-2 convolutions and pool
    with pytest.raises(ValueError, match="inception_4e"):
        rgb_model(torch.zeros(1, 3, 112, 64))
    with pytest.raises(ValueError, match="in_channels"):
        create_bninception(in_channels=0)


# ---------------------------------------------------------------------------------- TSN loading


def test_tsn_checkpoint_loads(tmp_path: Path) -> None:
    state = synthetic_state(10)
    path = tmp_path / "TSN-flow.pth.tar"
    torch.save(tsn_checkpoint(state), path)
    model = create_bninception(in_channels=10)
    load_tsn_weights(model, path)
    got = model.state_dict()
    assert sorted(got) == sorted(state)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert TSN_CHECKPOINT["containers"] == ("state_dict",)


def test_tsn_checkpoint_without_num_batches_tracked_loads(tmp_path: Path) -> None:
    state = {k: v for k, v in synthetic_state(3).items() if "num_batches_tracked" not in k}
    path = tmp_path / "TSN-rgb.pth.tar"
    torch.save(tsn_checkpoint(state), path)
    model = create_bninception()
    load_tsn_weights(model, path)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())


def _refusal(tmp_path: Path, state: dict[str, Tensor], in_channels: int = 3) -> str:
    path = tmp_path / "TSN-rgb.pth.tar"
    torch.save(tsn_checkpoint(state), path)
    with pytest.raises(DataError) as info:
        load_tsn_weights(create_bninception(in_channels=in_channels), path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_missing_extra_and_misshaped_keys_are_refused(tmp_path: Path) -> None:
    base = synthetic_state(3)
    missing = {
        k: v
        for k, v in base.items()
        if k not in ("inception_3a_3x3.weight", "inception_5b_pool_proj_bn.running_var")
    }
    message = _refusal(tmp_path, missing)
    assert "2 missing (first: 'inception_3a_3x3.weight')" in message

    extra = {**base, "classifier.weight": torch.zeros(9, 1024), "zz.bias": torch.zeros(3)}
    assert "2 unexpected (first: 'classifier.weight')" in _refusal(tmp_path, extra)

    # Classifiers the extraction never runs are dropped: TSN's `fc` (a model trained with
    # dropout 0 replaces the last layer in place) and pretrainedmodels' `last_linear`.
    heads = {**base, "fc.weight": torch.zeros(125, 1024), "last_linear.bias": torch.zeros(1000)}
    path = tmp_path / "TSN-heads.pth.tar"
    torch.save(tsn_checkpoint(heads), path)
    load_tsn_weights(create_bninception(in_channels=3), path)

    misshaped = {**base, "inception_4c_1x1.weight": torch.zeros(160, 576, 3, 3)}
    message = _refusal(tmp_path, misshaped)
    assert "'inception_4c_1x1.weight' has shape (160, 576, 3, 3)" in message
    assert "(160, 576, 1, 1)" in message


def test_rgb_checkpoint_into_flow_model_is_refused(tmp_path: Path) -> None:
    message = _refusal(tmp_path, synthetic_state(3), in_channels=10)
    assert "BNInception (flow)" in message
    assert "'conv1_7x7_s2.weight' has shape (64, 3, 7, 7)" in message
    assert "needs (64, 10, 7, 7)" in message


# ---------------------------------------------------------------------------------- outputs


def test_outputs_survive_a_state_dict_round_trip(tmp_path: Path, rgb_model: BNInception) -> None:
    save_file(rgb_model.state_dict(), str(tmp_path / "bninception.safetensors"))
    clone = create_bninception()
    clone.load_state_dict(load_file(str(tmp_path / "bninception.safetensors")))
    clone.eval()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(clone(x), rgb_model(x))


@pytest.mark.parametrize("modality", ["rgb", "flow"])
def test_matches_published_network(modality: str, rgb_model: BNInception) -> None:
    golden = load_file(str(GOLDEN))
    x, expected = golden[f"{modality}_input"].float(), golden[f"{modality}_output"]
    model = rgb_model if modality == "rgb" else synthetic_model(10)
    with torch.no_grad():
        got = model(x)
    assert got.shape == expected.shape == (x.shape[0], 1024)
    scale = expected.abs().max().item()
    assert 1 < scale < 100, scale  # outputs of order 1 to 10: the tolerance below means something
    # Bit for bit on the machine that made the fixture; 1e-5 of the scale (about 1.5e-4) leaves
    # room for other CPUs' float32 summation orders, and a single BatchNorm's eps set to 1e-4
    # instead of 1e-5 already moves the output by 3.5e-4.
    assert (got - expected).abs().max().item() < 1e-5 * scale


def test_a_slowfast_checkpoint_given_for_tsn_names_the_backbone_to_choose(tmp_path: Path) -> None:
    path = tmp_path / "SLOWFAST_8x8_R50.pyth"
    torch.save({"model_state": {"s1.pathway0_stem.conv.weight": torch.zeros(1)}}, path)
    with pytest.raises(DataError, match="holds no state dict") as caught:
        load_tsn_weights(create_bninception(in_channels=3), path)
    assert "--backbone slowfast-r50" in (caught.value.hint or "")
