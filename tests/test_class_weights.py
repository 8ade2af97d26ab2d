"""Class-weighted anticipation loss (`optim.class_weights`, the published `actions_weights`
option that its code leaves commented out): weighted as `F.cross_entropy`, read safely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import assert_user_error

from sfr.data.annotations import read_class_weights
from sfr.errors import DataError
from sfr.train.loop import anticipation_loss

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_weighted_loss_is_the_weighted_mean_over_every_step() -> None:
    torch.manual_seed(0)
    scores, labels = torch.randn(3, 4, 5), torch.tensor([0, 2, 4])
    weight = torch.tensor([1.0, 0.0, 3.0, 1.0, 0.5])
    per_step = -torch.log_softmax(scores, dim=-1)[torch.arange(3), :, labels]  # (B, K)
    w = weight[labels].unsqueeze(1).expand(3, 4)
    expected = (per_step * w).sum() / w.sum()
    assert torch.allclose(anticipation_loss(scores, labels, weight), expected)
    assert torch.allclose(anticipation_loss(scores, labels, torch.ones(5)), per_step.mean())


def test_weights_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "actions_weights"
    path.write_text("1 2\n0.5\n", encoding="utf-8")
    assert read_class_weights(path, 3) == [1.0, 2.0, 0.5]
    with pytest.raises(DataError, match="holds 3 weights but the data has 4"):
        read_class_weights(path, 4)
    path.write_text("1 x 2", encoding="utf-8")
    with pytest.raises(DataError, match="expected numbers only"):
        read_class_weights(path, 3)
    path.write_text("1 -2 2", encoding="utf-8")
    with pytest.raises(DataError, match=r"weight -2\.0 is not a finite number"):
        read_class_weights(path, 3)
    with pytest.raises(DataError, match="cannot be read"):
        read_class_weights(tmp_path / "absent", 3)


def _train_loss(cli, data: Path, runs: Path, presets_dir: Path, *extra: str) -> float:
    code, output, error = cli(
        "train-branch", "--config", presets_dir / "ek55" / "rgb_a0.25.toml",
        "--hidden", "8", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
        "--set", "data.feature_dims.rgb=16", "--set", "data.num_classes=24",
        "--data", data, "--runs", runs, *extra,
    )  # fmt: skip
    assert code == 0, f"{output}\n{error!r}"
    metrics = runs / "ek55" / "rgb-a0.25-enc6-ant8" / "pretrain" / "metrics.jsonl"
    return json.loads(metrics.read_text().splitlines()[0])["train_loss"]


def test_training_uses_the_weights(
    cli, golden_copy: Path, presets_dir: Path, tmp_path: Path
) -> None:
    (golden_copy / "ones").write_text(" ".join(["1"] * 24), encoding="utf-8")
    (golden_copy / "skewed").write_text(" ".join(str(1 + i % 5) for i in range(24)))
    plain = _train_loss(cli, golden_copy, tmp_path / "a", presets_dir)
    ones = _train_loss(
        cli, golden_copy, tmp_path / "b", presets_dir, "--set", 'optim.class_weights="ones"'
    )
    skewed = _train_loss(
        cli, golden_copy, tmp_path / "c", presets_dir, "--set", 'optim.class_weights="skewed"'
    )
    assert ones == pytest.approx(plain, rel=1e-6)
    assert skewed != pytest.approx(plain, rel=1e-3)

    (golden_copy / "short").write_text("1 1 1")
    code, output, error = cli(
        "train-branch", "--config", presets_dir / "ek55" / "rgb_a0.25.toml",
        "--hidden", "8", "--epochs", "1", "--device", "cpu",
        "--set", "data.feature_dims.rgb=16", "--set", "data.num_classes=24",
        "--set", 'optim.class_weights="short"',
        "--data", golden_copy, "--runs", tmp_path / "d",
    )  # fmt: skip
    assert_user_error(code, output, error, str(golden_copy / "short"), "24 action classes")
    assert not (tmp_path / "d").exists()  # refused before any run folder is made
