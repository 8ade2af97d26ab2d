"""Typed configs: TOML in, overrides on top, invalid values refused with field and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfr.config import (
    BranchRunConfig,
    FusionRunConfig,
    build_config,
    check_rates,
    load_config,
    parse_override,
)
from sfr.errors import ConfigError

CONFIGS = Path(__file__).parents[1] / "configs"
BASE = {"branch": {"modality": "rgb", "alpha": 0.5, "s_enc": 6, "s_ant": 4}}


@pytest.mark.parametrize(
    "path", sorted(CONFIGS.glob("*/*_a[0-9]*.toml")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_every_preset_is_valid_and_starts_with_its_command(path: Path) -> None:
    config = load_config(BranchRunConfig, path)
    assert path.read_text().startswith(
        f"# sfr train-branch --config configs/{path.parent.name}/{path.name}"
    )
    assert config.data.dataset == path.parent.name
    assert (
        config.data.num_classes == {"ek55": 2513, "ek100": 3806, "egtea": 106}[config.data.dataset]
    )
    assert (config.branch.alpha, config.branch.s_enc, config.branch.s_ant) in {
        (0.25, 6, 8),
        (0.5, 6, 4),
        (0.125, 24, 16),
    }


def test_preset_set_is_complete() -> None:
    names = {f"{p.parent.name}/{p.stem}" for p in CONFIGS.glob("*/*_a[0-9]*.toml")}
    for dataset in ("ek55", "ek100", "egtea"):
        for modality in ("rgb", "flow", "obj"):
            for alpha in ("0.25", "0.5", "0.125"):
                assert f"{dataset}/{modality}_a{alpha}" in names


def test_overrides_apply_on_top_of_the_file() -> None:
    config = load_config(
        BranchRunConfig,
        CONFIGS / "ek55" / "rgb_a0.5.toml",
        {"branch.alpha": 0.125, "branch.s_enc": 24, "branch.s_ant": 16, "optim.epochs": 3},
    )
    assert config.branch.slug == "rgb-a0.125-enc24-ant16"
    assert config.branch_dir == "ek55/rgb-a0.125-enc24-ant16"
    assert config.optim.epochs == 3 and config.optim.lr == 0.01


@pytest.mark.parametrize(
    "override,expected",
    [
        ({"branch.alpha": -0.5}, "branch.alpha: Input should be greater than 0"),
        ({"branch.s_ant": 0}, "branch.s_ant: Input should be greater than or equal to 1"),
        ({"branch.modality": "depth"}, "branch.modality: Input should be 'rgb', 'flow' or 'obj'"),
        ({"branch.hiden": 3}, "branch.hiden: unknown field (allowed: modality, alpha"),
        ({"data.dataset": "ek99"}, "data.dataset: Input should be 'ek55', 'ek100' or 'egtea'"),
        (
            {"run.select_time": 0.3},
            "not an anticipation time of the branch (alpha 0.5, s_ant 4); allowed: 2, 1.5, 1, 0.5",
        ),
        ({"optim.lr": 0}, "optim.lr: Input should be greater than 0"),
    ],
)
def test_invalid_values_name_the_field_and_allowed_values(override: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(BranchRunConfig, BASE, override, source="my.toml")
    assert expected in str(caught.value)
    # a field set by an override is blamed on it (issue 11), a whole-config rule on the file
    blamed = "my.toml" if "anticipation time" in expected else "command-line override"
    assert f"{blamed}: " in str(caught.value)


def test_typo_in_a_file(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[branch]\nmodality = "rgb"\nalpha = 0.25\ns_enc = 6\ns_ant = 8\n\n[optim]\nepoch = 3\n'
    )
    with pytest.raises(
        ConfigError,
        match=r"bad.toml: optim.epoch: unknown field \(allowed: lr, momentum, weight_decay, batch_size, epochs, class_weights\)",
    ):
        load_config(BranchRunConfig, path)


def test_unreadable_or_missing_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(BranchRunConfig, tmp_path / "none.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[branch\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(BranchRunConfig, broken)


def test_parse_override_reads_toml_values() -> None:
    assert parse_override("optim.lr=0.1") == ("optim.lr", 0.1)
    assert parse_override("data.preload=true") == ("data.preload", True)
    assert parse_override("run.name=my-run") == ("run.name", "my-run")
    assert parse_override("data.feature_dims.rgb=16") == ("data.feature_dims.rgb", 16)
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


def test_rate_ratios_must_be_integers() -> None:
    check_rates([0.125, 0.25, 0.5])
    check_rates([0.5])
    with pytest.raises(ConfigError, match=r"rates 0.25 and 0.375 have ratio 1.5"):
        check_rates([0.25, 0.375], field="fusion.alphas")


def test_egtea_split_names_its_csvs() -> None:
    config = build_config(BranchRunConfig, {**BASE, "data": {"dataset": "egtea", "split": 2}})
    assert config.data.csv_name("training") == "training2.csv"
    assert config.data.csv_name("validation") == "validation2.csv"
    with pytest.raises(ConfigError, match=r"data.split: Input should be less than or equal to 3"):
        build_config(BranchRunConfig, {**BASE, "data": {"dataset": "egtea", "split": 4}})


@pytest.mark.parametrize(
    "path",
    sorted(CONFIGS.glob("*/*arch*.toml")) + sorted(CONFIGS.glob("*/rulstm_matt.toml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_fusion_presets(path: Path) -> None:
    config = load_config(FusionRunConfig, path)
    assert path.read_text().startswith(f"# sfr pipeline configs/{path.parent.name}/{path.name}")
    if path.stem == "rulstm_matt":
        assert config.fused_times == (2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25)
    else:
        assert config.fused_times == (2.0, 1.5, 1.0, 0.5)
        assert config.model.rate_dropout == 0.9


def test_published_arch2_feeds_the_fast_rate_12_plus_16_steps_at_fusion() -> None:
    config = load_config(FusionRunConfig, CONFIGS / "ek55" / "sf_arch2.toml")
    fast, slow = config.model.rates
    assert (fast.alpha, fast.s_enc, fast.s_ant, fast.fusion_s_enc) == (0.125, 24, 16, 12)
    assert fast.grid(30, fusion=True).steps == 28 and fast.grid(30, fusion=False).steps == 40
    assert config.branch_config("rgb", fast).branch.slug == "rgb-a0.125-enc24-ant16"
    assert (slow.alpha, slow.s_enc, slow.s_ant) == (0.5, 6, 4)


FUSION = {
    "model": {
        "rates": [
            {"alpha": 0.125, "s_enc": 24, "s_ant": 16},
            {"alpha": 0.5, "s_enc": 6, "s_ant": 4},
        ]
    }
}


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            {
                "model.rates": [
                    {"alpha": 0.25, "s_enc": 6, "s_ant": 8},
                    {"alpha": 0.375, "s_enc": 6, "s_ant": 4},
                ]
            },
            "model.rates: the rates 0.25 and 0.375 have ratio 1.5",
        ),
        (
            {
                "model.rates": [
                    {"alpha": 0.25, "s_enc": 6, "s_ant": 1},
                    {"alpha": 0.5, "s_enc": 6, "s_ant": 1},
                ]
            },
            "share no anticipation time (alpha 0.25: 0.25; alpha 0.5: 0.5)",
        ),
        (
            {
                "model.rates": [
                    {"alpha": 0.25, "s_enc": 6, "s_ant": 8},
                    {"alpha": 0.25, "s_enc": 2, "s_ant": 8},
                ]
            },
            "each alpha may appear once",
        ),
        (
            {"model.modalities": ["rgb", "depth"]},
            "model.modalities.1: Input should be 'rgb', 'flow' or 'obj'",
        ),
        ({"model.architecture": "arch3"}, "model.architecture: Input should be 'arch1' or 'arch2'"),
        ({"run.select_time": 0.25}, "not a fused anticipation time; allowed: 2, 1.5, 1, 0.5"),
    ],
)
def test_invalid_fusion_configs(override: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(FusionRunConfig, FUSION, override, source="sf.toml")
    assert expected in str(caught.value)


def test_preload_is_auto_by_default_and_configs_with_a_boolean_still_load(tmp_path: Path) -> None:
    """data.preload: "auto" unless stated; the true/false of existing config files and of
    `--set` keep their meaning; any other value is refused naming the field and the choices."""
    assert load_config(BranchRunConfig, CONFIGS / "ek55" / "rgb_a0.5.toml").data.preload == "auto"
    path = tmp_path / "branch.toml"
    for written, expected in (("true", True), ("false", False), ('"auto"', "auto")):
        path.write_text(
            f"[data]\npreload = {written}\n[branch]\nmodality = 'rgb'\nalpha = 0.5\n"
            "s_enc = 6\ns_ant = 4\n"
        )
        assert load_config(BranchRunConfig, path).data.preload == expected
    # the spellings every other boolean field takes (yes/on/1 ...), as every other one does
    for override, expected in (
        ("true", True), ("false", False), ("auto", "auto"), ("yes", True), ("off", False),
        ("True", True), ("1", True), ("Auto", "auto"),
    ):  # fmt: skip
        key, value = parse_override(f"data.preload={override}")
        assert load_config(BranchRunConfig, path, {key: value}).data.preload == expected
    with pytest.raises(ConfigError) as refused:
        load_config(BranchRunConfig, path, {"data.preload": "sometimes"})
    message = str(refused.value)
    assert """data.preload: must be "auto", true or false, not 'sometimes' (a boolean""" in message
    # every spelling accepted above is listed, in both directions
    for spelling in ('"yes"/"no"', '"on"/"off"', '"y"/"n"', '"t"/"f"', "1/0"):
        assert spelling in message, message
    for refused_value in (2, [], "maybe"):
        with pytest.raises(ConfigError, match="yes"):
            load_config(BranchRunConfig, path, {"data.preload": refused_value})
    for accepted, expected in ((1.0, True), (0, False), ("n", False), ("T", True)):
        assert (
            load_config(BranchRunConfig, path, {"data.preload": accepted}).data.preload is expected
        )
