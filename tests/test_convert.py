"""Published RU-LSTM checkpoints converted to sfr: same outputs, checked shapes, safe reading, and
installation where sfr's later stages and `sfr validate` find them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import assert_user_error
from golden import BRANCH_CASES, CASE_GRID, GOLDEN, golden_case
from torch import Tensor, nn

import sfr
from sfr.checkpoint import read_metadata, save_checkpoint
from sfr.config import BranchRunConfig, FusionRunConfig, build_config, load_config
from sfr.errors import ConfigError, DataError, RunError
from sfr.hub.convert import (
    PublishedBranch,
    PublishedLayout,
    convert_checkpoint,
    install_published,
    published_config,
)
from sfr.hub.published import load_published_checkpoint
from sfr.models.branch import RULSTMBranch, create_branch
from sfr.models.reference import plain_forward
from sfr.train.fusion import FusionPlan
from sfr.train.stages import best_weights, stage_dir

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MODALITIES = ("rgb", "flow", "obj")
FUSION_CASE = "rulstm_fusion_a0.25_6_8"
# Grid of each golden case: (alpha, S_enc, S_ant).
CASE_ALPHA = {case: 0.125 if "0.125" in case else 0.25 for case in (*BRANCH_CASES, FUSION_CASE)}
SHA = "0" * 64


def _checkpoint(case: str) -> Path:
    return GOLDEN / case / "checkpoint.pth.tar"


def _grid(case: str) -> tuple[float, int, int]:
    return (CASE_ALPHA[case], *CASE_GRID[case])


def _published_state(branch: RULSTMBranch, prefix: str = "") -> dict[str, Tensor]:
    """A branch's weights under the published RU-LSTM keys (DESIGN §4), written independently."""
    state = {}
    for name, lstm in (
        ("rolling_lstm.lstm.", branch.rolling),
        ("unrolling_lstm.", branch.unrolling),
    ):
        for param, value in lstm.named_parameters():
            state[prefix + name + param] = value.detach().clone()
    state[prefix + "classifier.1.weight"] = branch.classifier.weight.detach().clone()
    state[prefix + "classifier.1.bias"] = branch.classifier.bias.detach().clone()
    return state


def _save_published(path: Path, state: dict[str, Tensor], epoch: int = 12) -> Path:
    """A container as the published code saves it (perf values are numpy float64 scalars)."""
    container = {
        "state_dict": state,
        "epoch": epoch,
        "perf": np.float64(31.5),
        "best_perf": np.float64(31.5),
    }
    torch.save(container, path)
    return path


def _random_branch(feat: int, hidden: int, classes: int, seed: int = 0) -> RULSTMBranch:
    torch.manual_seed(seed)
    return create_branch(feat_dim=feat, hidden=hidden, num_classes=classes).eval()


def _matt(num_inputs: int, hidden: int) -> nn.Sequential:
    """The published MATT MLP: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear."""
    width = 2 * hidden * num_inputs
    return nn.Sequential(
        nn.Linear(width, int(width / 4)),
        nn.ReLU(),
        nn.Dropout(0.8),
        nn.Linear(int(width / 4), int(width / 8)),
        nn.ReLU(),
        nn.Dropout(0.8),
        nn.Linear(int(width / 8), num_inputs),
    ).eval()


def _golden_branch_state(case: str = "rulstm_rgb_a0.25_6_8") -> dict[str, Tensor]:
    return load_published_checkpoint(_checkpoint(case))["state_dict"]


# --- golden checkpoints: converted models compute the published outputs -------------------------


@pytest.mark.parametrize("case", [c for c in BRANCH_CASES if not c.endswith("_seqcomp")])
def test_golden_branches_reproduce_published_outputs(case: str, tmp_path: Path) -> None:
    ctor, io = golden_case(case)
    alpha, s_enc, s_ant = _grid(case)
    grid = {} if alpha == 0.25 else {"alpha": alpha, "s_enc": s_enc, "s_ant": s_ant}
    out = tmp_path / "branch.safetensors"
    conversion = convert_checkpoint(_checkpoint(case), out, modality="rgb", **grid)

    model = sfr.load_model(out)
    assert model.kind == "branch" and model.stage == "finetune"
    assert model.times == tuple(alpha * k for k in range(s_ant, 0, -1))
    output = model({"rgb@" + f"{alpha:g}": io["x"]})
    assert output.scores.shape == (6, s_ant, ctor["num_class"])
    assert (output.scores - io["scores"][:, s_enc:]).abs().max() <= 1e-5
    if "context" in io:
        assert (output.context - io["context"][:, s_enc:]).abs().max() <= 1e-5

    meta = read_metadata(out)
    assert meta == {**conversion.metadata, "epoch_base": 1}  # the file marks epochs from 1
    assert meta["model"] == {"feat_dim": 16, "hidden": 32, "num_classes": 24}
    config = BranchRunConfig.model_validate(meta["config"])
    assert config.data.feature_dims == {"rgb": 16} and config.data.num_classes == 24
    assert (config.branch.alpha, config.branch.s_enc, config.branch.s_ant) == (alpha, s_enc, s_ant)
    converted = meta["converted"]
    assert converted["source"] == "checkpoint.pth.tar"
    assert converted["sha256"] == conversion.converted["sha256"] and len(converted["sha256"]) == 64
    assert (converted["epoch"], converted["perf"], converted["best_perf"]) == (7, 12.5, 13.25)
    assert meta["epoch"] == 7  # the published code saves epochs counted from 1, as sfr does
    assert converted["inferred"] == {
        "modality": "rgb",
        "feat_dim": ctor["feat_in"],
        "hidden": ctor["hidden"],
        "num_classes": ctor["num_class"],
        "alpha": alpha,
        "s_enc": s_enc,
        "s_ant": s_ant,
    }
    # the published value is top-5 at the 4th-last step: 1 s at alpha 0.25 only
    assert meta["metrics"] == ({"top5@1": 12.5} if alpha == 0.25 else {})
    assert meta["selection"] == {"measure": "top5", "time": 1.0}


def test_golden_fusion_becomes_the_level_1_unit_of_the_one_rate_config(tmp_path: Path) -> None:
    ctor, io = golden_case(FUSION_CASE)
    out = tmp_path / "fusion.safetensors"
    convert_checkpoint(_checkpoint(FUSION_CASE), out)

    model = sfr.load_model(out)
    assert model.kind == "fusion" and model.label == "rgb+flow+obj@0.25"
    assert model.times == (2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25)
    features = {f"{m}@0.25": io[f"x{i}"] for i, m in enumerate(MODALITIES)}
    output = model(features)
    assert output.scores.shape == (6, 8, 24)
    assert (output.scores - io["scores"][:, 6:]).abs().max() <= 1e-5

    meta = read_metadata(out)
    config = FusionRunConfig.model_validate(meta["config"])
    assert config.fusion_dir == "ek55/arch2-rgb+flow+obj-a0.25-enc6-ant8"
    assert config.data.feature_dims == {"rgb": 16, "flow": 16, "obj": 12}
    assert (meta["kind"], meta["stage"]) == ("fusion", "rgb+flow+obj@0.25")
    assert meta["converted"]["inferred"] == {
        "modality": "fusion",
        "feat_dims": {"rgb": 16, "flow": 16, "obj": 12},
        "branches": 3,
        "hidden": ctor["hidden"],
        "num_classes": 24,
        "alpha": 0.25,
        "s_enc": 6,
        "s_ant": 8,
    }


def test_sequence_completion_checkpoint_converts_as_pretraining(tmp_path: Path) -> None:
    """The weights cannot tell: the flag, or the published `_sequence_completion` file name,
    makes the branch a pre-training (unrolled over the true future inputs); else fine-tuning."""
    _, io = golden_case("rulstm_rgb_a0.25_6_8_seqcomp")
    _, anticipation_io = golden_case("rulstm_rgb_a0.25_6_8")
    source = _checkpoint("rulstm_rgb_a0.25_6_8_seqcomp")
    named = tmp_path / "RULSTM-anticipation_0.25_6_8_rgb_sequence_completion_best.pth.tar"
    shutil.copy(source, named)
    outs = {
        "flag": convert_checkpoint(source, tmp_path / "a.safetensors", modality="rgb",
                                   sequence_completion=True),
        "name": convert_checkpoint(named, tmp_path / "b.safetensors", modality="rgb"),
        "plain": convert_checkpoint(source, tmp_path / "c.safetensors", modality="rgb"),
    }  # fmt: skip
    assert {k: c.stage for k, c in outs.items()} == {
        "flag": "pretrain",
        "name": "pretrain",
        "plain": "finetune",
    }
    for name, expected in (("a", io), ("b", io), ("c", anticipation_io)):
        model = sfr.load_model(tmp_path / f"{name}.safetensors")
        scores = model({"rgb@0.25": io["x"]}).scores
        assert (scores - expected["scores"][:, 6:]).abs().max() <= 1e-5, name


def test_fusion_cannot_be_a_sequence_completion_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only branches are pre-trained"):
        convert_checkpoint(
            _checkpoint(FUSION_CASE), tmp_path / "x.safetensors", sequence_completion=True
        )


# --- the reference formulation, saved in the published layout ---------------------------------


def test_reference_branch_in_published_layout_round_trips(tmp_path: Path) -> None:
    branch = _random_branch(feat=352, hidden=12, classes=9)
    source = _save_published(tmp_path / "ref.pth.tar", _published_state(branch))
    out = tmp_path / "ref.safetensors"
    conversion = convert_checkpoint(source, out, dataset="ek100")  # 352-d features: obj

    x = torch.randn(5, 14, 352)
    expected = plain_forward(branch, x)
    model = sfr.load_model(out)
    output = model({"obj@0.25": x})
    assert (output.scores - expected.scores[:, 6:]).abs().max() <= 1e-5
    assert (output.context - expected.context[:, 6:]).abs().max() <= 1e-5
    config = model.config
    assert isinstance(config, BranchRunConfig)
    assert config.branch.modality == "obj" and config.data.feature_dims == {}
    assert config.run.select == "mt5r"  # EK100 models were selected by mean top-5 recall
    assert conversion.metadata["metrics"] == {"mt5r@1": 31.5}
    converted = conversion.converted
    assert all(type(converted[k]) is float for k in ("perf", "best_perf"))
    assert converted["epoch"] == 12 and conversion.metadata["epoch"] == 12


def test_reference_fusion_in_published_layout_round_trips(tmp_path: Path) -> None:
    hidden, classes, dims = 6, 7, (20, 20, 9)
    branches = [_random_branch(d, hidden, classes, seed=i) for i, d in enumerate(dims)]
    matt = _matt(3, hidden)
    state = {}
    for index, branch in enumerate(branches):
        state.update(_published_state(branch, f"branches.{index}."))
    state.update({f"MATT.{k}": v.detach().clone() for k, v in matt.state_dict().items()})
    source = _save_published(tmp_path / "fusion.pth.tar", state)
    out = tmp_path / "fusion.safetensors"
    convert_checkpoint(source, out)

    xs = [torch.randn(4, 14, d) for d in dims]
    with torch.no_grad():
        plain = [plain_forward(b, x) for b, x in zip(branches, xs)]
        weights = torch.softmax(matt(torch.cat([p.context for p in plain], dim=-1)), dim=-1)
        expected = sum(p.scores * weights[..., i : i + 1] for i, p in enumerate(plain))
    model = sfr.load_model(out)
    output = model({f"{m}@0.25": x for m, x in zip(MODALITIES, xs)})
    assert (output.scores - expected[:, 6:]).abs().max() <= 1e-5
    assert (output.attention["rgb+flow+obj@0.25"] - weights[:, 6:]).abs().max() <= 1e-6
    assert model.config.data.feature_dims == {"rgb": 20, "flow": 20, "obj": 9}


# --- the config of a conversion ------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["ek55", "ek100"])
@pytest.mark.parametrize("modality", ["rgb", "flow", "obj", "fusion"])
def test_published_config_is_the_preset(dataset: str, modality: str, presets_dir: Path) -> None:
    sizes = {"rgb": 1024, "flow": 1024, "obj": 352}
    classes = {"ek55": 2513, "ek100": 3806}[dataset]
    if modality == "fusion":
        layout = PublishedLayout(
            tuple(PublishedBranch(sizes[m], 1024, classes) for m in MODALITIES), fusion=True
        )
        preset, schema = "rulstm_matt.toml", FusionRunConfig
    else:
        layout = PublishedLayout((PublishedBranch(sizes[modality], 1024, classes),), False)
        preset, schema = f"{modality}_a0.25.toml", BranchRunConfig
    config = published_config(
        layout, dataset=dataset, modality=modality, alpha=0.25, s_enc=6, s_ant=8
    )
    expected = load_config(schema, presets_dir / dataset / preset)
    assert config.model_dump() == expected.model_dump()


def _three_rate_config(**model: object) -> FusionRunConfig:
    """Architecture 2 over three rates, sized like the golden cases."""
    tree = {
        "data": {"dataset": "ek55", "num_classes": 24,
                 "feature_dims": {"rgb": 16, "flow": 16, "obj": 12}},
        "model": {
            "architecture": "arch2",
            "rates": [
                {"alpha": 0.125, "s_enc": 24, "s_ant": 16, "fusion_s_enc": 12},
                {"alpha": 0.25, "s_enc": 6, "s_ant": 8},
                {"alpha": 0.5, "s_enc": 6, "s_ant": 4},
            ],
            "hidden": 32,
            **model,
        },
    }  # fmt: skip
    return build_config(FusionRunConfig, tree)


def test_fusion_converts_into_a_given_three_rate_config(tmp_path: Path) -> None:
    _, io = golden_case(FUSION_CASE)
    out = tmp_path / "unit.safetensors"
    conversion = convert_checkpoint(_checkpoint(FUSION_CASE), out, _three_rate_config())
    assert conversion.stage == "rgb+flow+obj@0.25"
    model = sfr.load_model(out)
    assert model.description.startswith("rgb+flow+obj@0.25 (Architecture 2, level 1 of 2)")
    output = model({f"{m}@0.25": io[f"x{i}"] for i, m in enumerate(MODALITIES)})
    assert (output.scores - io["scores"][:, 6:]).abs().max() <= 1e-5


def test_a_config_that_does_not_fit_is_refused_by_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.hidden is 64, the checkpoint's is 32"):
        convert_checkpoint(
            _checkpoint(FUSION_CASE), tmp_path / "x.safetensors", _three_rate_config(hidden=64)
        )
    with pytest.raises(ConfigError, match="time grid comes from the given config"):
        convert_checkpoint(
            _checkpoint(FUSION_CASE), tmp_path / "x.safetensors", _three_rate_config(), s_ant=4
        )
    assert not (tmp_path / "x.safetensors").exists()


# --- refusals ------------------------------------------------------------------------------------


class _MakesADirectory:
    """Unpickling this would create a directory: proof that nothing of the file ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


@pytest.mark.parametrize("payload", ["object array", "custom class"])
def test_containers_with_other_pickled_objects_are_refused_unread(
    payload: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    extra = (
        np.array([1, "a"], dtype=object) if payload == "object array" else _MakesADirectory(marker)
    )
    source = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": _golden_branch_state(), "perf": np.float64(1), "x": extra}, source)
    with pytest.raises(DataError, match="which sfr does not unpickle") as error:
        convert_checkpoint(source, tmp_path / "x.safetensors", modality="rgb")
    assert str(source) in str(error.value)
    assert ("mkdir" in str(error.value)) == (payload == "custom class")
    assert not marker.exists() and not (tmp_path / "x.safetensors").exists()


def _edited(edit: str) -> dict[str, Tensor]:
    """A published state dict with one defect."""
    if edit.startswith("fusion"):
        state = load_published_checkpoint(_checkpoint(FUSION_CASE))["state_dict"]
    else:
        state = _golden_branch_state()
    if edit == "classifier bias":
        state["classifier.1.bias"] = torch.zeros(23)
    elif edit == "unrolling input size":
        state["unrolling_lstm.weight_ih_l0"] = torch.zeros(128, 15)
    elif edit == "recurrent weight":
        state["rolling_lstm.lstm.weight_hh_l0"] = torch.zeros(100, 32)
    elif edit == "second layer":
        state["rolling_lstm.lstm.weight_ih_l1"] = torch.zeros(128, 32)
    elif edit == "unexpected key":
        state["classifier.2.weight"] = torch.zeros(2, 2)
    elif edit == "missing key":
        del state["unrolling_lstm.bias_hh_l0"]
    elif edit == "fusion MATT.0":
        state["MATT.0.weight"] = torch.zeros(48, 190)
    elif edit == "fusion classes":
        state["branches.2.classifier.1.weight"] = torch.zeros(20, 32)
        state["branches.2.classifier.1.bias"] = torch.zeros(20)
    return state


@pytest.mark.parametrize(
    "edit,needles",
    [
        ("classifier bias", ["classifier.1.bias has shape (23,), expected (24,)", "24 classes"]),
        ("unrolling input size", ["unrolling_lstm.weight_ih_l0 has shape (128, 15)", "(128, 16)"]),
        ("recurrent weight", ["rolling_lstm.lstm.weight_hh_l0 has shape (100, 32)"]),
        ("second layer", ["rolling_lstm.lstm.weight_ih_l1", "one-layer"]),
        ("unexpected key", ["unexpected key classifier.2.weight"]),
        ("missing key", ["lacks unrolling_lstm.bias_hh_l0"]),
        ("fusion MATT.0", ["MATT.0.weight has shape (48, 190), expected (48, 192)"]),
        ("fusion classes", ["branches.2 has hidden 32 and 20 classes", "branches.0"]),
    ],
)
def test_defects_are_refused_naming_the_key(edit: str, needles: list[str], tmp_path: Path) -> None:
    source = _save_published(tmp_path / "bad.pth.tar", _edited(edit))
    with pytest.raises(DataError) as error:
        convert_checkpoint(source, tmp_path / "x.safetensors", modality=None
                           if edit.startswith("fusion") else "rgb")  # fmt: skip
    for needle in [str(source), *needles]:
        assert needle in str(error.value)


# --- installation into the run layout ------------------------------------------------------------


def _install(source: Path, runs: Path, modality: str, sha: str = SHA, **kwargs) -> Path:
    return install_published(
        source,
        dataset="ek55",
        modality=modality,
        task=kwargs.pop("task", "anticipation"),
        runs_dir=runs,
        source_sha256=sha,
        **kwargs,
    )


def test_installed_branches_initialise_a_three_rate_fusion(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    obj_branch = _random_branch(feat=12, hidden=32, classes=24)
    obj_source = _save_published(tmp_path / "obj.pth.tar", _published_state(obj_branch))
    sources = {"rgb": _checkpoint(BRANCH_CASES[0]), "flow": _checkpoint(BRANCH_CASES[0]),
               "obj": obj_source}  # fmt: skip
    for modality, source in sources.items():
        path = _install(source, runs, modality)
        assert (
            path == runs / "ek55" / f"{modality}-a0.25-enc6-ant8" / "finetune" / "best.safetensors"
        )
        status = json.loads((path.parent / "status.json").read_text())
        assert status["state"] == "finished" and status["converted_from"] == source.name

    plan = FusionPlan(_three_rate_config(), runs)
    unit = plan.by_label["rgb+flow+obj@0.25"]
    node = plan.build(unit.label, 24)
    plan.initialise(node, unit, 24, "unused hint")  # finds and accepts every installed branch
    expected = _published_state(obj_branch)
    assert torch.equal(node.inputs[2].branch.classifier.weight, expected["classifier.1.weight"])
    config = plan.config.branch_config("rgb", plan.config.model.rates[1])
    weights = best_weights(
        stage_dir(config, runs, "finetune"), plan.spec("rgb@0.25", 24), "unused hint"
    )
    assert torch.equal(weights["classifier.bias"], _golden_branch_state()["classifier.1.bias"])


def test_install_refuses_another_run_unless_forced(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    source = _checkpoint(BRANCH_CASES[0])
    path = _install(source, runs, "rgb")
    assert _install(source, runs, "rgb") == path  # the same conversion again: replaced

    with pytest.raises(RunError, match=r"already holds a conversion of checkpoint\.pth\.tar"):
        _install(source, runs, "rgb", sha="1" * 64)
    assert _install(source, runs, "rgb", sha="1" * 64, force=True) == path
    assert read_metadata(path)["converted"]["sha256"] == "1" * 64

    meta = read_metadata(path)
    del meta["converted"]
    save_checkpoint(path, {}, meta)  # now it looks like a model sfr trained
    with pytest.raises(RunError, match="already holds a model trained by sfr"):
        _install(source, runs, "rgb")


def test_install_names_the_file_whose_kind_or_folder_does_not_fit(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match=r"checkpoint\.pth\.tar: The checkpoint is a single"):
        _install(_checkpoint(BRANCH_CASES[0]), runs, "fusion")
    with pytest.raises(ConfigError, match=r"checkpoint\.pth\.tar: The checkpoint is a MATT"):
        _install(_checkpoint(FUSION_CASE), runs, "rgb")
    interrupted = runs / "ek55" / "rgb-a0.25-enc6-ant8" / "finetune"
    interrupted.mkdir(parents=True)
    (interrupted / "status.json").write_text('{"state": "running"}')
    with pytest.raises(RunError, match="holds files sfr did not convert from this checkpoint"):
        _install(_checkpoint(BRANCH_CASES[0]), runs, "rgb")


def test_install_early_recognition_writes_the_early_finetune_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    download = runs / "ek55" / "published" / "RULSTM-early_recognition_0.25_8_rgb_best.pth.tar"
    download.parent.mkdir(parents=True)
    shutil.copy(_checkpoint(BRANCH_CASES[0]), download)
    path = _install(download, runs, "rgb", task="early_recognition")
    assert path == runs / "ek55" / "early-rgb-a0.25-enc0-ant8" / "finetune" / "best.safetensors"
    meta = read_metadata(path)
    perf = float(load_published_checkpoint(download)["perf"])  # top-1 with 100% observed
    assert (meta["kind"], meta["stage"], meta["metrics"]) == (
        "branch",
        "finetune",
        {"top1@1": perf},
    )
    inferred = meta["converted"]["inferred"]
    assert (inferred["alpha"], inferred["s_enc"], inferred["s_ant"]) == (0.25, 0, 8)
    assert meta["converted"]["task"] == "early_recognition"
    model = sfr.load_model(path)
    assert model.config.data.task == "early_recognition"
    assert model.times == (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    assert not (runs / "ek55" / "rgb-a0.25-enc0-ant8").exists()


def test_validate_an_installed_fusion(cli, golden_data: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    path = _install(_checkpoint(FUSION_CASE), runs, "fusion")
    folder = runs / "ek55" / "arch2-rgb+flow+obj-a0.25-enc6-ant8"
    assert path == folder / "rgb+flow+obj@0.25" / "best.safetensors"
    code, output, error = cli("validate", folder, "--data", golden_data, "--device", "cpu")
    assert code == 0, f"{output}\n{error!r}"
    assert "rgb+flow+obj@0.25 (Architecture 2, whole model)" in output
    assert "29 of 30 segments" in output
    whole = read_metadata(path)
    for index, modality in enumerate(MODALITIES):  # its branches, each a finished fine-tuning
        branch = sfr.load_model(runs / "ek55" / f"{modality}-a0.25-enc6-ant8" / "finetune")
        assert branch.label == f"{modality}@0.25"
        assert read_metadata(branch.source)["converted"]["part_of"] == whole["stage"]
        assert torch.equal(
            branch.module.branch.classifier.bias,
            load_published_checkpoint(_checkpoint(FUSION_CASE))["state_dict"][
                f"branches.{index}.classifier.1.bias"
            ],
        )


# --- sfr convert ---------------------------------------------------------------------------------


def test_cli_convert_prints_what_it_inferred(cli, tmp_path: Path) -> None:
    out = tmp_path / "fusion.safetensors"
    code, output, error = cli("convert", _checkpoint(FUSION_CASE), out)
    assert code == 0, f"{output}\n{error!r}"
    assert (
        "MATT fusion of 3 branches (features rgb 16, flow 16, obj 12), hidden 32, 24 classes"
        in output
    )
    assert "alpha 0.25, 6 + 8 steps (stage rgb+flow+obj@0.25)" in output
    assert f"Wrote {out}" in output
    assert sfr.load_model(out).label == "rgb+flow+obj@0.25"

    code, output, error = cli("convert", _checkpoint(FUSION_CASE), out)
    assert_user_error(code, output, error, f"{out} already exists", "--force")
    code, output, error = cli(
        "convert", _checkpoint("rulstm_rgb_a0.125_24_16"), out, "--force", "--modality", "flow",
        "--alpha", "0.125", "--s-enc", "24", "--s-ant", "16",
    )  # fmt: skip
    assert code == 0, f"{output}\n{error!r}"
    assert "flow branch over 16-d features" in output and "alpha 0.125, 24 + 16 steps" in output


def test_cli_convert_needs_the_modality_of_a_1024_d_branch(cli, tmp_path: Path) -> None:
    branch = _random_branch(feat=1024, hidden=4, classes=5)
    source = _save_published(tmp_path / "rgb_or_flow.pth.tar", _published_state(branch))
    out = tmp_path / "out.safetensors"
    code, output, error = cli("convert", source, out)
    assert_user_error(code, output, error, "1024-d features", "--modality rgb, flow or obj")
    assert not out.exists()
    code, output, error = cli("convert", source, out, "--modality", "flow")
    assert code == 0, f"{output}\n{error!r}"
    assert sfr.load_model(out).config.data.feature_dims == {}


def test_cli_convert_unreadable_file(cli, tmp_path: Path) -> None:
    source = tmp_path / "broken.pth.tar"
    source.write_bytes(_checkpoint(FUSION_CASE).read_bytes()[:5000])
    code, output, error = cli("convert", source, tmp_path / "out.safetensors")
    assert_user_error(code, output, error, str(source), "cannot be read as a PyTorch checkpoint")
    code, output, error = cli("convert", tmp_path / "absent.pth.tar", tmp_path / "out.safetensors")
    assert_user_error(code, output, error, "absent.pth.tar does not exist")


def test_cli_convert_into_a_taken_run_folder_follows_the_overwrite_rule(
    cli, tmp_path: Path
) -> None:
    """Issue 11 cases 7 and 18: another conversion's run is refused (exit 2, folder named);
    --force deletes only what sfr wrote there (a file of one's own stays), and the temp files of
    a write killed midway go."""
    runs = tmp_path / "runs"
    code, output, _ = cli(
        "convert", _checkpoint(BRANCH_CASES[0]), "--into", runs, "--modality", "rgb"
    )
    assert code == 0, output
    run = runs / "ek55" / "rgb-a0.25-enc6-ant8" / "finetune"
    other = _save_published(tmp_path / "other.pth.tar", _golden_branch_state(), epoch=13)
    code, output, error = cli("convert", other, "--into", runs, "--modality", "rgb")
    assert_user_error(code, output, error, f"The run folder {run} already holds a conversion")
    assert "--force" in output
    (run / "notes.txt").write_text("mine")
    torn = run / ".best.safetensors.k1ll3d00.tmp"
    torn.write_bytes(b"torn")
    code, output, _ = cli("convert", other, "--into", runs, "--modality", "rgb", "--force")
    assert code == 0, output
    assert (run / "notes.txt").read_text() == "mine"
    assert not torn.exists()
    assert read_metadata(run / "best.safetensors")["converted"]["source"] == "other.pth.tar"
