"""Published Slow-Fast RU-LSTM checkpoints converted to sfr: every layout recognised, the
published outputs reproduced on the golden cases, the published sampling available, and the
conversions placed where `sfr fuse` continues from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import assert_user_error
from golden import GOLDEN, GOLDEN_DATA, golden_case
from safetensors.torch import load_file

import sfr
from sfr.checkpoint import read_metadata
from sfr.config import FusionRunConfig, load_config
from sfr.data.annotations import read_segments
from sfr.data.dataset import AnticipationDataset, open_stores
from sfr.data.timegrid import TimeGrid, sampled_frames
from sfr.errors import ConfigError, DataError
from sfr.hub.convert import convert_checkpoint
from sfr.hub.published import load_published_checkpoint

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MODALITIES = ("rgb", "flow", "obj")
PAPER_RATES = ("0.125:24:16", "0.5:6:4")
# The 7 steps the published slow-fast classes output (the last 4 are scored).
PUBLISHED_TIMES = (3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5)
WHOLE = {"sf_arch2": MODALITIES, "sf_arch1": MODALITIES, "sf_single_rgb": ("rgb",)}
# Published file names of what each case stands for.
PUBLISHED_NAME = {
    "sf_branch_rgb_a0.125_24_16": "RULSTM-anticipation_0.125_24_16_rgb_best.pth.tar",
    "sf_fusion_a0.125_12_16": "RULSTM-anticipation_0.125_12_16_fusion_best.pth.tar",
    "sf_fusion_a0.5_6_4": "RULSTM-anticipation_0.5_6_4_fusion_best.pth.tar",
    "sf_arch2": "RULSTM-anticipation_0.125_24_16_0.5_6_4_fusion_best.pth.tar",
    "sf_arch1": "RULSTM-anticipation_0.125_24_16_0.5_6_4_fusion_best.pth.tar",
    "sf_single_rgb": "RULSTM-anticipation_0.125_24_16_0.5_6_4_rgb_best.pth.tar",
}


def _checkpoint(case: str) -> Path:
    return GOLDEN / case / "checkpoint.pth.tar"


def _named(case: str, folder: Path) -> Path:
    """The golden checkpoint under the name the published code gives such a file."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(_checkpoint(case), folder / PUBLISHED_NAME[case]))


def _whole_features(io: dict[str, torch.Tensor], modalities: tuple[str, ...]) -> dict:
    """The published model's own slicing of its 40-step inputs, written out independently:
    fast rate the last 28 steps, slow rate steps 0, 4, ..., 36."""
    features = {}
    for m in modalities:
        features[f"{m}@0.125"] = io[f"x_fast_{m}"][:, 12:]
        features[f"{m}@0.5"] = io[f"x_slow_{m}"][:, 0:40:4]
    return features


# --- golden cases: converted checkpoints compute the published outputs ---------------------------


def test_golden_per_rate_branch(tmp_path: Path) -> None:
    _, io = golden_case("sf_branch_rgb_a0.125_24_16")
    out = tmp_path / "branch.safetensors"
    conversion = convert_checkpoint(
        _checkpoint("sf_branch_rgb_a0.125_24_16"), out, modality="rgb", rates=["0.125:24:16"]
    )
    model = sfr.load_model(out)
    assert (model.kind, model.stage, model.label) == ("branch", "finetune", "rgb@0.125")
    every_step = model.module(
        {"rgb@0.125": io["x_rgb"]}, TimeGrid(0.125, 24, 16).times
    )  # all 40 steps the published branch scores
    assert (every_step.scores - io["scores"]).abs().max() <= 1e-5
    assert conversion.converted["layout"] == "branch"
    assert conversion.converted["dropped"] == [
        "fast_slow_fusion.1.bias",
        "fast_slow_fusion.1.weight",
    ]


@pytest.mark.parametrize("case", ["sf_fusion_a0.125_12_16", "sf_fusion_a0.5_6_4"])
def test_golden_per_rate_fusions(case: str, tmp_path: Path) -> None:
    meta = json.loads((GOLDEN / case / "meta.json").read_text())
    _, io = golden_case(case)
    alpha, s_enc, s_ant = meta["rate"], meta["s_enc"], meta["s_ant"]
    out = tmp_path / "fusion.safetensors"
    convert_checkpoint(_checkpoint(case), out, rates=[f"{alpha}:{s_enc}:{s_ant}"])
    model = sfr.load_model(out)
    assert model.kind == "fusion" and model.label == f"rgb+flow+obj@{alpha:g}"
    assert model.times == TimeGrid(alpha, s_enc, s_ant).anticipation_times
    features = {f"{m}@{alpha:g}": io[f"x_{m}"] for m in MODALITIES}
    every_step = model.module(features, TimeGrid(alpha, s_enc, s_ant).times)
    assert (every_step.scores - io["scores"]).abs().max() <= 1e-5
    # it is the level-1 unit of the paper's Architecture 2 (both rates), so `sfr fuse` continues
    config = model.config
    assert isinstance(config, FusionRunConfig)
    assert config.fusion_dir == "ek55/arch2-rgb+flow+obj-a0.125-enc12-ant16+a0.5-enc6-ant4"


@pytest.mark.parametrize("case", sorted(WHOLE))
def test_golden_whole_slowfast_models(case: str, tmp_path: Path) -> None:
    _, io = golden_case(case)
    out = tmp_path / "model.safetensors"
    modality = "rgb" if case == "sf_single_rgb" else None
    conversion = convert_checkpoint(_checkpoint(case), out, rates=PAPER_RATES, modality=modality)
    model = sfr.load_model(out)
    features = _whole_features(io, WHOLE[case])
    # the steps the published code scores (its last S_ant = 4 outputs) are sfr's fused times
    assert model.times == (2.0, 1.5, 1.0, 0.5)
    output = model(features)
    assert (output.scores - io["scores"][:, 3:]).abs().max() <= 1e-5
    if "context" in io:
        assert (output.context - io["context"][:, 3:]).abs().max() <= 1e-5
    # and the published model's 3 earlier outputs too
    every = model.module(features, PUBLISHED_TIMES)
    assert (every.scores - io["scores"]).abs().max() <= 1e-5

    config = model.config
    assert isinstance(config, FusionRunConfig)
    expected_arch = "arch2" if case == "sf_arch2" else "arch1"
    assert config.model.architecture == expected_arch
    assert [(r.alpha, r.s_enc, r.s_ant, r.fusion_s_enc) for r in config.model.rates] == [
        (0.125, 24, 16, 12),
        (0.5, 6, 4, None),
    ]
    label = "rgb@0.125+0.5" if case == "sf_single_rgb" else "rgb+flow+obj@0.125+0.5"
    assert model.stage == label
    state = load_published_checkpoint(_checkpoint(case))["state_dict"]
    unused = sorted(k for k in state if ".fast_slow_fusion." in k)
    assert unused and conversion.converted["dropped"] == unused
    assert not any("fast_slow_fusion" in key for key in conversion.tensors)
    assert conversion.metadata["metrics"] == ({"top5@1": 31.5} if case != "sf_single_rgb" else {})


def test_file_names_give_rates_modality_and_the_preset_layout(
    tmp_path: Path, presets_dir: Path
) -> None:
    preset = load_config(
        FusionRunConfig, presets_dir / "ek55" / "sf_arch2.toml", {"model.hidden": 32}
    )
    for case in PUBLISHED_NAME:
        source = _named(case, tmp_path / case)
        conversion = convert_checkpoint(source, tmp_path / f"{case}.safetensors")
        config = conversion.config
        if case == "sf_branch_rgb_a0.125_24_16":
            assert (
                config.branch_dir == preset.branch_config("rgb", preset.model.rates[0]).branch_dir
            )
            continue
        assert isinstance(config, FusionRunConfig)
        assert config.model.rates == preset.model.rates
        if case != "sf_arch1" and case != "sf_single_rgb":
            assert config.fusion_dir == preset.fusion_dir
        else:
            assert config.fusion_dir == preset.fusion_dir.replace("arch2", "arch1")


def test_rates_that_cannot_be_told_are_asked_for(cli, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    code, output, error = cli("convert", _checkpoint("sf_arch2"), out)
    assert_user_error(code, output, error, "Architecture 2", "--rates 0.125:24:16 --rates 0.5:6:4")
    code, output, error = cli("convert", _checkpoint("sf_fusion_a0.5_6_4"), out)
    assert_user_error(code, output, error, "per-rate MATT", "--rates ALPHA:S_ENC:S_ANT")
    code, output, error = cli("convert", _checkpoint("sf_arch2"), out, "--rates", "0.125/24")
    assert_user_error(code, output, error, "'0.125/24' is not ALPHA:S_ENC:S_ANT")
    code, output, error = cli("convert", _checkpoint("sf_arch2"), out, "--rates", "0.125:24:16")
    assert_user_error(code, output, error, "fuses several rates")
    code, output, error = cli("convert", _checkpoint("sf_single_rgb"), out, "--rates",
                              "0.125:24:16", "--rates", "0.5:6:4")  # fmt: skip
    assert_user_error(code, output, error, "--modality rgb, flow or obj")
    code, output, error = cli("convert", _checkpoint("sf_arch2"), out, "--rates", "0.5:6:4",
                              "--rates", "0.125:24:16")  # fmt: skip
    assert_user_error(
        code, output, error, "fastest first", "Pass --rates 0.125:24:16 --rates 0.5:6:4"
    )
    code, output, error = cli("convert", _checkpoint("sf_arch2"), "--rates", "0.125:24:16")
    assert_user_error(code, output, error, "either an output file or a runs folder")
    code, output, error = cli("convert", _checkpoint("sf_arch2"), out, "--into", tmp_path)
    assert_user_error(code, output, error, "not both or neither")
    with pytest.raises(ConfigError, match="not --alpha"):
        convert_checkpoint(_checkpoint("sf_arch2"), out, alpha=0.125)
    assert not out.exists()


def test_cli_says_what_it_recognised_and_dropped(cli, tmp_path: Path) -> None:
    source = _named("sf_arch2", tmp_path / "published")
    out = tmp_path / "arch2.safetensors"
    code, output, error = cli("convert", source, out)
    assert code == 0, f"{output}\n{error!r}"
    assert "Slow-Fast Architecture 2 whole model of 6 branches" in output
    assert "rates 0.125:24:16, 0.5:6:4 (unit rgb+flow+obj@0.125+0.5)" in output
    assert "Dropped 12 unused fast_slow_fusion weights" in output
    assert f"Wrote {out}" in output


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ("matt", "branches.1.MATT.6.weight has shape (2, 24), expected (3, 24)"),
        ("extra", "unexpected key branches.0.branches.1.extra.weight"),
        ("missing", "lacks branches.1.branches.2.classifier.1.bias"),
    ],
)
def test_defects_are_refused_naming_the_key(edit: str, needle: str, tmp_path: Path) -> None:
    container = load_published_checkpoint(_checkpoint("sf_arch2"))
    state = dict(container["state_dict"])
    if edit == "matt":
        state["branches.1.MATT.6.weight"] = torch.zeros(2, 24)
    elif edit == "extra":
        state["branches.0.branches.1.extra.weight"] = torch.zeros(2)
    else:
        del state["branches.1.branches.2.classifier.1.bias"]
    source = tmp_path / PUBLISHED_NAME["sf_arch2"]
    torch.save({**container, "state_dict": state}, source)
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        convert_checkpoint(source, tmp_path / "out.safetensors")


# --- the published slow-fast sampling -----------------------------------------------------------


@pytest.mark.parametrize("split", ["training", "validation"])
def test_published_sampling_is_the_fast_sequence_of_the_published_loader(split: str) -> None:
    """The golden frames of the 0.125/24+16 grid are what the published loader reads: the fast
    rate is its last 28 steps, the slow rate its steps 0, 4, ..., 36, the same rows kept."""
    expected = json.loads((GOLDEN / f"frames_{split}.json").read_text())["grids"]
    (loader,) = [g for g in expected if (g["alpha"], g["S_enc"], g["S_ant"]) == (0.125, 24, 16)]
    grids = [TimeGrid(0.125, 12, 16), TimeGrid(0.5, 6, 4)]
    differ = 0
    for segment in read_segments(GOLDEN_DATA / f"{split}.csv"):
        frames = sampled_frames(grids, segment.start_frame, "published")
        if segment.id in loader["discarded_ids"]:
            assert frames is None
            continue
        published = loader["frames"][segment.id]
        assert frames[0].tolist() == published[12:]
        assert frames[1].tolist() == published[0:40:4]
        own = sampled_frames(grids, segment.start_frame, "grid")
        differ += own is None or own[1].tolist() != frames[1].tolist()
    assert differ > 0  # the golden rows include padded slow-rate frames where the two differ


def test_published_sampling_keeps_rows_the_slow_grid_discards() -> None:
    grids = [TimeGrid(0.125, 12, 16), TimeGrid(0.5, 6, 4)]
    assert sampled_frames(grids, 10, "grid") is None  # 0.5 s before frame 10 is before frame 1
    fast, slow = sampled_frames(grids, 10, "published")
    # every slow step is padded with the fast sequence's earliest valid frame (0.25 s before: 2)
    assert fast[-2:].tolist() == [2, 6] and set(slow.tolist()) == {2}
    assert sampled_frames(grids, 3, "published") is None


def test_dataset_with_published_sampling_feeds_what_the_published_loader_fed(
    golden_data: Path, tmp_path: Path
) -> None:
    _, io = golden_case("sf_arch2")
    out = tmp_path / "arch2.safetensors"
    convert_checkpoint(_checkpoint("sf_arch2"), out, rates=PAPER_RATES)
    model = sfr.load_model(out).use_sampling("published")
    segments = read_segments(golden_data / "validation.csv")
    stores = open_stores(golden_data, {"rgb": 16, "flow": 16, "obj": 12})
    dataset = AnticipationDataset(segments, model.streams, stores, sampling="published")
    row = {segment_id: index for index, segment_id in enumerate(dataset.ids)}
    expected = _whole_features(io, MODALITIES)
    for position, segment_id in enumerate(io["ids"].tolist()):
        sample = dataset[row[str(segment_id)]]
        for key, value in expected.items():
            np.testing.assert_array_equal(sample["features"][key].numpy(), value[position].numpy())


def test_validate_with_published_sampling(cli, golden_data: Path, tmp_path: Path) -> None:
    source = _named("sf_arch1", tmp_path / "published")
    runs = tmp_path / "runs"
    code, output, error = cli("convert", source, "--into", runs)
    assert code == 0, f"{output}\n{error!r}"
    folder = runs / "ek55" / "arch1-rgb+flow+obj-a0.125-enc12-ant16+a0.5-enc6-ant4"
    assert f"Installed {folder / 'rgb+flow+obj@0.125+0.5' / 'best.safetensors'}" in output
    for sampling, note in (("grid", ""), ("published", ", published Slow-Fast sampling")):
        code, output, error = cli(
            "validate", folder, "--data", golden_data, "--device", "cpu", "--sampling", sampling
        )
        assert code == 0, f"{output}\n{error!r}"
        assert f"rgb+flow+obj@0.125+0.5 (Architecture 1, whole model{note})" in output


# --- into the run layout: sfr fuse continues from converted per-rate fusions --------------------


@pytest.mark.parametrize("sampling", ["grid", "published"])
def test_converted_per_rate_fusions_are_level_1_of_sfr_fuse(
    sampling: str, cli, golden_data: Path, presets_dir: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    for case in ("sf_fusion_a0.125_12_16", "sf_fusion_a0.5_6_4"):
        code, output, error = cli("convert", _named(case, tmp_path / "published"), "--into", runs)
        assert code == 0, f"{output}\n{error!r}"
    folder = runs / "ek55" / "arch2-rgb+flow+obj-a0.125-enc12-ant16+a0.5-enc6-ant4"
    fast = load_file(str(folder / "rgb+flow+obj@0.125" / "best.safetensors"))
    code, output, error = cli(
        "fuse", "arch2", "--config", presets_dir / "ek55" / "sf_arch2.toml",
        "--data", golden_data, "--runs", runs, "--epochs", "1", "--batch-size", "8",
        "--stage", "2", "--freeze-branches", "--device", "cpu",
        "--set", "data.num_classes=24", "--set", "model.hidden=32",
        "--set", "data.feature_dims={rgb = 16, flow = 16, obj = 12}",
        "--set", f'data.sampling="{sampling}"',
    )  # fmt: skip
    assert code == 0, f"{output}\n{error!r}"
    final = folder / "rgb+flow+obj@0.125+0.5" / "best.safetensors"
    trained = load_file(str(final))
    for key, value in fast.items():  # the frozen level-1 unit is the converted one
        assert torch.equal(trained[f"inputs.0.{key}"], value)
    metadata = read_metadata(final)
    assert metadata["stage"] == "rgb+flow+obj@0.125+0.5"
    assert metadata["config"]["data"]["sampling"] == sampling


def test_folder_dry_run_writes_nothing_and_bad_files_do_not_stop_the_others(
    cli, tmp_path: Path
) -> None:
    folder, runs = tmp_path / "published", tmp_path / "runs"
    _named("sf_branch_rgb_a0.125_24_16", folder)
    whole = _named("sf_arch2", folder).name
    # the 0.5 per-rate fusion saved under the whole model's name: contents and name disagree
    (folder / whole).write_bytes(_checkpoint("sf_fusion_a0.5_6_4").read_bytes())
    (folder / "rulstm-anticipation_0.5_6_4_rgb_best.pth.tar.1").write_bytes(b"x")
    code, output, error = cli("download", "pretrained", "sf-rulstm-ek55", "--from", folder,
                              "--runs", runs, "--dry-run")  # fmt: skip
    assert_user_error(code, output, error, "would go to", "1 of 2 files could not be installed")
    assert not runs.exists()
    assert f"{whole}: its contents do not fit the rates its name states" in output
    assert "--rates ... (fastest first)" in output and "Ignored (not published" in output
    code, output, error = cli("download", "pretrained", "sf-rulstm-ek55", "--from", folder,
                              "--runs", runs)  # fmt: skip
    assert_user_error(code, output, error, "Installed 1 checkpoint into", "installed ones are kept")
    assert len(list(runs.rglob("best.safetensors"))) == 1


def test_download_pretrained_sf_rulstm_from_a_folder(
    cli, golden_data: Path, tmp_path: Path
) -> None:
    folder, runs = tmp_path / "published", tmp_path / "runs"
    for case in ("sf_branch_rgb_a0.125_24_16", "sf_fusion_a0.5_6_4", "sf_arch2"):
        _named(case, folder)
    (folder / "notes.txt").write_text("not a checkpoint")
    code, output, error = cli("download", "pretrained", "sf-rulstm-ek55", "--runs", runs)
    assert_user_error(code, output, error, "no working download address", "--from DIR")

    code, output, error = cli(
        "download", "pretrained", "sf-rulstm-ek55", "--from", folder, "--runs", runs
    )
    assert code == 0, f"{output}\n{error!r}"
    fusion_dir = runs / "ek55" / "arch2-rgb+flow+obj-a0.125-enc12-ant16+a0.5-enc6-ant4"
    # the whole model brings every level and branch; the files of a unit or branch replace them
    units = {
        fusion_dir / u for u in ("rgb+flow+obj@0.125", "rgb+flow+obj@0.5", "rgb+flow+obj@0.125+0.5")
    }
    slugs = ("a0.125-enc24-ant16", "a0.5-enc6-ant4")
    branches = {runs / "ek55" / f"{m}-{s}" / "finetune" for m in MODALITIES for s in slugs}
    assert {p.parent for p in runs.rglob("best.safetensors")} == units | branches
    for own in (
        fusion_dir / "rgb+flow+obj@0.5",
        runs / "ek55" / "rgb-a0.125-enc24-ant16" / "finetune",
    ):
        assert "part_of" not in read_metadata(own / "best.safetensors")["converted"]
    assert "Slow-Fast Architecture 2 whole model" in output
    assert "RULSTM-anticipation_0.125_12_16_fusion_best.pth.tar" in output  # named as missing
    code, output, error = cli("convert", _named("sf_arch1", tmp_path / "other"), "--into", runs)
    assert code == 0, f"{output}\n{error!r}"  # Architecture 1: its own fusion folder
    other = _named("sf_fusion_a0.5_6_4", tmp_path / "other")
    torch.save({**load_published_checkpoint(other), "epoch": 3}, other)  # another file
    code, output, error = cli("convert", other, "--into", runs)
    assert_user_error(code, output, error, "already holds a conversion of", "--force")
    # again: the same conversions are replaced silently
    code, output, error = cli(
        "download", "pretrained", "sf-rulstm-ek55", "--from", folder, "--runs", runs
    )
    assert code == 0, f"{output}\n{error!r}"
    code, output, error = cli("validate", fusion_dir, "--data", golden_data, "--device", "cpu")
    assert code == 0, f"{output}\n{error!r}"
    assert "rgb+flow+obj@0.125+0.5 (Architecture 2, whole model)" in output

    code, output, error = cli(
        "download", "pretrained", "sf-rulstm-ek55", "--from", tmp_path / "none", "--runs", runs
    )
    assert_user_error(code, output, error, "none is not a folder")
    code, output, error = cli(
        "download", "pretrained", "rulstm-ek55", "--from", folder, "--runs", runs
    )
    assert_user_error(
        code, output, error, "--from installs the Slow-Fast", "sfr convert FILE --into"
    )


def test_converted_model_exports_and_predicts_the_published_scores(
    cli, golden_data: Path, tmp_path: Path
) -> None:
    _, io = golden_case("sf_arch1")
    converted, bundle = tmp_path / "arch1.safetensors", tmp_path / "bundle.safetensors"
    convert_checkpoint(_checkpoint("sf_arch1"), converted, rates=PAPER_RATES)
    code, output, error = cli("export", "model", converted, bundle)
    assert code == 0, f"{output}\n{error!r}"
    model = sfr.load_model(bundle)
    output_scores = model(_whole_features(io, MODALITIES)).scores
    assert (output_scores - io["scores"][:, 3:]).abs().max() <= 1e-5

    # segment 92 starts at frame 204 (6.8 s): predict reads the frames the published loader fed
    row = io["ids"].tolist().index(92)
    expected = torch.softmax(io["scores"][row, 5].double(), dim=-1)  # τ = 1.0 s
    code, output, error = cli(
        "predict", bundle, "--data", golden_data, "--video", "S01_04", "--at", "6.8",
        "--top", "1", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, f"{output}\n{error!r}"
    line = next(text for text in output.splitlines() if text.strip().startswith("1s"))
    action, probability = int(line.split()[2]), float(line.split()[-1])
    assert action == int(expected.argmax())
    assert probability == pytest.approx(float(expected.max()), abs=5e-4)


def test_ru_lstm_layout_takes_grid_and_modality_from_a_published_name(tmp_path: Path) -> None:
    """A per-rate file saved without the unused linear has the RU-LSTM layout: its name still
    gives its grid (and a branch's modality)."""
    fusion = tmp_path / "RULSTM-anticipation_0.5_6_4_fusion_best.pth.tar"
    shutil.copy(GOLDEN / "rulstm_fusion_a0.25_6_8" / "checkpoint.pth.tar", fusion)
    convert_checkpoint(fusion, tmp_path / "f.safetensors")
    model = sfr.load_model(tmp_path / "f.safetensors")
    assert model.label == "rgb+flow+obj@0.5" and model.times == (2.0, 1.5, 1.0, 0.5)
    branch = tmp_path / "RULSTM-anticipation_0.125_24_16_flow_best.pth.tar"
    shutil.copy(GOLDEN / "rulstm_rgb_a0.125_24_16" / "checkpoint.pth.tar", branch)
    conversion = convert_checkpoint(branch, tmp_path / "b.safetensors")
    assert conversion.config.branch_dir == "ek55/flow-a0.125-enc24-ant16"


def test_a_converted_whole_model_installs_every_level_and_branch(
    cli, golden_data: Path, tmp_path: Path
) -> None:
    runs, published = tmp_path / "runs", tmp_path / "published"
    code, output, error = cli("convert", _named("sf_branch_rgb_a0.125_24_16", published),
                              "--into", runs)  # fmt: skip
    assert code == 0, f"{output}\n{error!r}"
    code, output, error = cli("convert", _named("sf_arch2", published), "--into", runs)
    assert code == 0, f"{output}\n{error!r}"
    folder = runs / "ek55" / "arch2-rgb+flow+obj-a0.125-enc12-ant16+a0.5-enc6-ant4"
    whole = load_file(str(folder / "rgb+flow+obj@0.125+0.5" / "best.safetensors"))
    for index, unit in enumerate(("rgb+flow+obj@0.125", "rgb+flow+obj@0.5")):
        model = sfr.load_model(folder / unit)  # its own weights, loaded strictly
        assert (model.stage, model.label) == (unit, unit)
        for key, value in model.module.state_dict().items():
            assert torch.equal(value, whole[f"inputs.{index}.{key}"])
        status = json.loads((folder / unit / "status.json").read_text())
        assert status["state"] == "finished"
    # the branch converted on its own is kept; the other five come out of the whole model
    assert "rgb@0.125: kept" in output and "holds the conversion of" in output
    slugs = ("a0.125-enc24-ant16", "a0.5-enc6-ant4")
    for modality, slug in [(m, s) for m in MODALITIES for s in slugs]:
        model = sfr.load_model(runs / "ek55" / f"{modality}-{slug}" / "finetune")
        assert (model.kind, model.stage) == ("branch", "finetune")
        own = (modality, slug) == ("rgb", slugs[0])
        case = "sf_branch_rgb_a0.125_24_16" if own else "sf_arch2"
        assert read_metadata(model.source)["converted"]["source"] == PUBLISHED_NAME[case]
    obj = sfr.load_model(runs / "ek55" / "obj-a0.5-enc6-ant4" / "finetune").module.branch
    assert torch.equal(obj.classifier.weight, whole["inputs.1.inputs.2.branch.classifier.weight"])
    code, output, error = cli(
        "validate", folder, "--levels", "--data", golden_data, "--device", "cpu"
    )
    assert code == 0, f"{output}\n{error!r}"
    assert "[3] arch2 rgb+flow+obj@0.125+0.5" in output and "[2] arch2 rgb+flow+obj@0.5" in output
    # converting a unit's own published file replaces the part taken out of the whole model
    code, output, error = cli("convert", _named("sf_fusion_a0.5_6_4", published), "--into", runs)
    assert code == 0, f"{output}\n{error!r}"
    meta = read_metadata(folder / "rgb+flow+obj@0.5" / "best.safetensors")
    assert meta["converted"]["source"] == PUBLISHED_NAME["sf_fusion_a0.5_6_4"]
    assert "part_of" not in meta["converted"]
