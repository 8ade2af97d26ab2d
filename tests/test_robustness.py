"""Issue 11: every wrong input a clear answer (exit 2, no traceback), every failure recoverable.

Each test names the case of the issue it turns into a check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import lmdb
import numpy as np
import pytest
from clitools import assert_user_error
from conftest import TrainedRuns, writable_copy

from sfr.errors import DataError
from sfr.files import json_text

pytestmark = pytest.mark.usefixtures("module_torch_thread")

Cli = Callable[..., tuple[int, str, BaseException | None]]
CPU = ("--device", "cpu")


def poison_video(store: Path, video: str, value: float = math.nan) -> int:
    """Overwrite the first element of every vector of `video` in an LMDB store with `value`."""
    env = lmdb.open(str(store))
    count = 0
    try:
        with env.begin(write=True) as txn:
            for key, raw in list(txn.cursor()):
                if key.decode().startswith(f"{video}_frame_"):
                    vector = np.frombuffer(raw, np.float32).copy()
                    vector[0] = value
                    txn.put(key, vector.tobytes())
                    count += 1
    finally:
        env.close()
    return count


# --------------------------------------------------------------------------------------------
# case 2: non-finite features and strict JSON


def test_validate_refuses_a_non_finite_feature_vector(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path
) -> None:
    data = writable_copy(trained_runs.data, tmp_path / "data")
    video = (data / "validation.csv").read_text().splitlines()[0].split(",")[1].strip()
    assert poison_video(data / "rgb", video) > 0
    code, output, error = cli("validate", trained_runs.branch("rgb@0.25"), "--data", data, *CPU)
    assert_user_error(
        code, output, error, "Feature store 'rgb'", f"'{video}_frame_", "annotation id", "NaN"
    )


def test_json_is_written_strictly() -> None:
    assert json_text({"a": [1.5]}, "x") == '{"a": [1.5]}'
    with pytest.raises(DataError, match="The submission holds NaN or infinite numbers"):
        json_text({"a": {"b": math.nan}}, "The submission")
    with pytest.raises(DataError):
        json_text([math.inf], "The submission")


def test_export_submission_refuses_non_finite_scores(
    cli: Cli, trained_runs: TrainedRuns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sfr.cli.export as export_module

    def nan_scores(*args: object, **kwargs: object) -> dict:
        return {"version": "0.1", "results": {"1": {"verb": {"0": math.nan}}}}

    monkeypatch.setattr(export_module, "make_submission", nan_scores)
    out = tmp_path / "sub.json"
    code, output, error = cli(
        "export", "submission", trained_runs.branch("rgb@0.25"), out,
        "--data", trained_runs.data, "--split", "validation", *CPU,
    )  # fmt: skip
    assert_user_error(code, output, error, "NaN or infinite", "nothing written")
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# case 4: EGTEA cross-split scoring; case 16: an unlabelled split is refused before inference


def test_validate_refuses_another_egtea_split_unless_forced(
    cli: Cli, trained_runs: TrainedRuns, synthetic_copy: Path, tmp_path: Path
) -> None:
    from conftest import relabel_checkpoint

    for name in ("validation1.csv", "validation2.csv"):
        (synthetic_copy / name).write_text((synthetic_copy / "validation.csv").read_text())
    best = trained_runs.branch("rgb@0.25") / "best.safetensors"
    model = relabel_checkpoint(best, tmp_path / "egtea.safetensors", "egtea")
    args = ("validate", model, "--data", synthetic_copy, *CPU)
    code, output, error = cli(*args, "--split", "validation2")
    assert_user_error(
        code, output, error, "trained on EGTEA split 1", "validation2", "--other-split"
    )
    code, output, _ = cli(*args, "--split", "validation2", "--other-split")
    assert code == 0, output
    code, output, _ = cli(*args, "--split", "validation1")
    assert code == 0, output


def test_validate_refuses_an_unlabelled_split_before_inference(
    cli: Cli, trained_runs: TrainedRuns, synthetic_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sfr.eval.evaluation as evaluation_module

    rows = [
        ",".join(r.split(",")[:4])
        for r in (synthetic_copy / "validation.csv").read_text().splitlines()
    ]
    (synthetic_copy / "test_seen.csv").write_text("\n".join(rows) + "\n")

    def no_inference(*args: object, **kwargs: object) -> None:
        raise AssertionError("inference ran")

    monkeypatch.setattr(evaluation_module, "predict_split", no_inference)
    code, output, error = cli(
        "validate", trained_runs.branch("rgb@0.25"), "--data", synthetic_copy,
        "--split", "test_seen", *CPU,
    )  # fmt: skip
    assert_user_error(code, output, error, "test_seen.csv has no labels", "sfr export submission")


# --------------------------------------------------------------------------------------------
# case 5: ensemble weights


@pytest.mark.parametrize("weights", ["nan,1", "inf,1", "-1,2", "0,0"])
def test_validate_refuses_non_finite_negative_or_zero_weights(
    cli: Cli, trained_runs: TrainedRuns, weights: str
) -> None:
    code, output, error = cli(
        "validate", trained_runs.branch("rgb@0.25"), trained_runs.branch("flow@0.25"),
        "--data", trained_runs.data, "--ensemble", "--weights", weights, *CPU,
    )  # fmt: skip
    assert_user_error(code, output, error, "weights must be finite")


def test_ensemble_api_refuses_a_nan_weight(trained_runs: TrainedRuns) -> None:
    from sfr.errors import ConfigError
    from sfr.eval.evaluation import EvaluationSettings, evaluate
    from sfr.models.trained import load_model

    models = [load_model(trained_runs.branch(x)) for x in ("rgb@0.25", "flow@0.25")]
    with pytest.raises(ConfigError, match="finite"):
        evaluate(
            models, trained_runs.data, ensemble_weights=[math.nan, 1.0],
            settings=EvaluationSettings(device="cpu"),
        )  # fmt: skip
