"""Early action recognition (the published `--task early_recognition`): the published sampler's
frames, the config, training/validation/export by observed ratio on synthetic data through the
CLI, published checkpoints converted, downloaded and scored, and the published late fusion."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import assert_user_error
from conftest import REPO_DIR
from golden import GOLDEN, GOLDEN_DATA
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import sfr
from sfr.checkpoint import read_metadata
from sfr.config import BranchRunConfig, FusionRunConfig, build_config, load_config
from sfr.data.annotations import read_actions, read_segments
from sfr.data.dataset import AnticipationDataset, Stream, open_stores
from sfr.data.observation import ObservationGrid, ratio_label
from sfr.errors import ConfigError
from sfr.eval.evaluation import EvaluationSettings, evaluate
from sfr.eval.metrics import marginalise
from sfr.eval.runner import Member, predict_split
from sfr.hub.registry import load_registry
from sfr.models.branch import RULSTMBranch, create_branch
from sfr.models.reference import plain_forward
from sfr.train.stages import BranchTask

pytestmark = pytest.mark.usefixtures("single_torch_thread")

RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
DIMS = {"rgb": 8, "flow": 8, "obj": 6}
HIDDEN = 4
CPU = ("--device", "cpu")


def published_action_frames(start: int, end: int, samples: int) -> list[int]:
    """The published `action_samples` arithmetic, written out as the test's oracle: n + 1 points
    evenly from start to end with numpy's integer linspace, the first one dropped."""
    return np.linspace(start, end, samples + 1, dtype=int)[1:].tolist()


# --- the sampler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["training", "validation"])
def test_frames_are_the_published_action_samples_on_every_golden_row(split: str) -> None:
    """Same frames as the published sampler on the golden CSVs, the same rows set aside: the
    published code discards by the frames before the action, whatever the task (golden lists)."""
    golden = json.loads((GOLDEN / f"frames_{split}.json").read_text())["grids"]
    segments = read_segments(GOLDEN_DATA / f"{split}.csv")
    for alpha in (0.25, 0.125, 0.5):
        grid = ObservationGrid(alpha, 8)
        published_discards = next(g for g in golden if g["alpha"] == alpha)["discarded_ids"]
        discarded = [s.id for s in segments if grid.frames(s.start_frame, s.end_frame) is None]
        assert discarded == published_discards
    grid = ObservationGrid(0.25, 8)
    kept = [s for s in segments if grid.frames(s.start_frame, s.end_frame) is not None]
    assert len(kept) == len(segments) - len(golden[0]["discarded_ids"])
    for segment in kept:
        frames = grid.frames(segment.start_frame, segment.end_frame)
        expected = published_action_frames(segment.start_frame, segment.end_frame, 8)
        assert frames.tolist() == expected, segment.id


@given(
    start=st.integers(1, 200_000),
    length=st.integers(0, 3_000),
    samples=st.integers(1, 32),
    alpha=st.sampled_from([0.125, 0.25, 0.5, 1.0]),
)
def test_frames_spread_over_the_action_and_end_on_its_last_frame(
    start: int, length: int, samples: int, alpha: float
) -> None:
    grid = ObservationGrid(alpha, samples)
    frames = grid.frames(start, start + length)
    if frames is None:
        assert np.floor((start / 30 - alpha) * 30) < 1
        return
    assert frames.tolist() == published_action_frames(start, start + length, samples)
    assert len(frames) == samples and frames[-1] == start + length
    assert (np.diff(frames) >= 0).all() and frames[0] >= start


def test_steps_are_observed_ratios_named_as_the_published_columns() -> None:
    grid = ObservationGrid(0.25, 8)
    assert grid.times == RATIOS and grid.anticipation_times == RATIOS
    assert grid.anticipation_steps == tuple(range(8)) and (grid.s_enc, grid.steps) == (0, 8)
    published = [f"{c:0.1f}%" for c in np.linspace(0, 100, 9)[1:]]
    assert [ratio_label(r) for r in grid.times] == published
    assert grid.steps_at([1.0, 0.125]) == (7, 0)


def test_dataset_reads_the_action_frames_of_each_segment(synthetic_data: Path) -> None:
    grid = ObservationGrid(0.25, 8)
    stream = Stream("rgb", grid)
    stores = open_stores(synthetic_data, {"rgb": 8})
    segments = read_segments(synthetic_data / "validation.csv")
    dataset = AnticipationDataset(segments, [stream], stores)
    assert [s.id for s in dataset.discarded] == [segments[0].id]  # starts at frame 3
    for index in (0, len(dataset) - 1):
        segment = dataset.plans[index].segment
        frames = published_action_frames(segment.start_frame, segment.end_frame, 8)
        assert dataset.frames_of(index, stream).tolist() == frames
        direct = stores["rgb"].read(segment.video, np.array(frames))
        np.testing.assert_array_equal(dataset[index]["features"]["rgb@0.25"].numpy(), direct)


# --- configuration -------------------------------------------------------------------------------


def _branch_tree(**data: object) -> dict:
    return {
        "data": {"name": "synthetic", "feature_dims": DIMS, **data},
        "branch": {"modality": "rgb", "alpha": 0.25, "s_enc": 0, "s_ant": 8, "hidden": HIDDEN},
    }


def test_task_defaults_to_anticipation_and_early_recognition_is_asked_for() -> None:
    config = build_config(BranchRunConfig, _branch_tree())
    assert (
        config.data.task == "anticipation" and config.branch_dir == "synthetic/rgb-a0.25-enc0-ant8"
    )
    early = build_config(BranchRunConfig, _branch_tree(task="early_recognition"))
    assert early.grid == ObservationGrid(0.25, 8)
    assert early.branch_dir == "synthetic/early-rgb-a0.25-enc0-ant8"
    task = BranchTask(create_branch(feat_dim=8, hidden=4, num_classes=5), Stream("rgb", early.grid))
    assert task.steps == tuple(range(8)) and task.times == RATIOS  # the loss covers every step


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({"branch.s_enc": 6}, ["branch.s_enc is 6", "observes only the action"]),
        ({"run.select_time": 0.3}, ["run.select_time 0.3 is not an observed ratio", "12.5%"]),
        ({"data.task": "recognition"}, ["data.task", "'anticipation' or 'early_recognition'"]),
    ],
)
def test_bad_early_settings_are_named(change: dict, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as error:
        build_config(BranchRunConfig, _branch_tree(task="early_recognition"), change)
    for needle in needles:
        assert needle in error.value.message


def test_early_fusion_has_one_rate(presets_dir: Path) -> None:
    path = presets_dir / "ek55" / "early_matt.toml"
    config = load_config(FusionRunConfig, path)
    assert config.fused_times == RATIOS
    assert config.fusion_dir == "ek55/early-arch2-rgb+flow+obj-a0.25-enc0-ant8"
    two_rates = [{"alpha": 0.25, "s_enc": 0, "s_ant": 8}, {"alpha": 0.5, "s_enc": 0, "s_ant": 4}]
    with pytest.raises(ConfigError, match="early recognition observes the action at one rate"):
        load_config(FusionRunConfig, path, {"model.rates": two_rates})


@pytest.mark.parametrize("dataset", ["ek55", "ek100", "egtea"])
def test_presets_are_the_published_early_recognition_settings(
    dataset: str, presets_dir: Path
) -> None:
    for modality in ("rgb", "flow", "obj"):
        config = load_config(BranchRunConfig, presets_dir / dataset / f"early_{modality}.toml")
        branch, optim = config.branch, config.optim
        assert config.data.task == "early_recognition"
        assert (branch.modality, branch.alpha, branch.s_enc, branch.s_ant) == (modality, 0.25, 0, 8)
        assert (branch.hidden, branch.dropout) == (1024, 0.8)
        assert (optim.lr, optim.momentum, optim.batch_size, optim.epochs) == (0.01, 0.9, 128, 200)
        select = "mt5r" if dataset == "ek100" else "top1"
        assert (config.run.select, config.run.select_time) == (select, 1.0)
    fusion = load_config(FusionRunConfig, presets_dir / dataset / "early_matt.toml")
    assert fusion.data.task == "early_recognition" and fusion.fused_times == RATIOS


# --- training, validation and export through the CLI ---------------------------------------------

BRANCH_TOML = """\
[data]
task = "early_recognition"
name = "{name}"
feature_dims = {{ rgb = 8, flow = 8, obj = 6 }}

[branch]
modality = "rgb"
alpha = 0.25
s_enc = 0
s_ant = 8
hidden = 4
dropout = 0.2

[optim]
batch_size = 8
epochs = 1

[run]
select = "top1"
device = "cpu"
"""
FUSION_TOML = """\
[data]
task = "early_recognition"
name = "{name}"
feature_dims = {{ rgb = 8, flow = 8, obj = 6 }}

[model]
architecture = "arch2"
modalities = ["rgb", "flow", "obj"]
hidden = 4
branch_dropout = 0.2
modality_dropout = 0.2

[[model.rates]]
alpha = 0.25
s_enc = 0
s_ant = 8

[optim]
batch_size = 8
epochs = 1

[fusion_optim]
batch_size = 8
epochs = 1

[run]
select = "top1"
device = "cpu"
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _observed_rows(output: str) -> list[str]:
    """The observed-ratio labels that start table rows (`│ 12.5% │ ...`), in order."""
    return re.findall(r"(?m)^[\s│]*(\d+\.\d%)[\s│]", output)


def test_train_finetune_fuse_validate_export_on_synthetic_data(
    cli, synthetic_data: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    branch = _write(tmp_path / "early_rgb.toml", BRANCH_TOML.format(name="synthetic"))
    data = ("--data", synthetic_data, "--runs", runs)
    for modality in ("rgb", "flow", "obj"):
        for command in ("train-branch", "finetune"):
            code, output, error = cli(command, "--config", branch, "--modality", modality, *data)
            assert code == 0, f"{output}\n{error!r}"
        assert "8 frames spread over the action (early recognition)" in output
        assert "observed" in output and "top1@100.0%" in output
        assert _observed_rows(output) == [ratio_label(r) for r in RATIOS]
    finetune = runs / "synthetic" / "early-rgb-a0.25-enc0-ant8" / "finetune"
    history = [json.loads(line) for line in (finetune / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["selection"] == history[0]["top1@1"]
    assert {f"top1@{r:g}" for r in RATIOS} <= set(history[0])

    fusion = _write(tmp_path / "early_matt.toml", FUSION_TOML.format(name="synthetic"))
    code, output, error = cli("fuse", "arch2", "--config", fusion, *data)
    assert code == 0, f"{output}\n{error!r}"
    assert "early recognition at observed ratios 12.5%, 25.0%" in output
    folder = runs / "synthetic" / "early-arch2-rgb+flow+obj-a0.25-enc0-ant8"
    assert (folder / "rgb+flow+obj@0.25" / "best.safetensors").is_file()

    report = tmp_path / "report"
    code, output, error = cli(
        "validate", folder, finetune, "--data", synthetic_data, "--report", report, *CPU
    )
    assert code == 0, f"{output}\n{error!r}"
    assert _observed_rows(output)[:16] == [ratio_label(r) for r in RATIOS] * 2
    assert "Mean TtA" not in output  # the published code reports no TtA for this task
    doc = json.loads((report / "report.json").read_text())
    assert doc["task"] == "early_recognition" and doc["headline"]["measure"] == "top1"
    assert [entry["times"] for entry in doc["models"]] == [list(RATIOS)] * 2
    assert all(entry["tta"] is None for entry in doc["models"])
    markdown = (report / "report.md").read_text()
    assert "# Early action recognition" in markdown and "| 12.5% |" in markdown

    bundle = tmp_path / "early.safetensors"
    code, output, error = cli("export", "model", folder, bundle)
    assert code == 0, f"{output}\n{error!r}"
    model = sfr.load_model(bundle)
    assert model.times == RATIOS and model.config.data.task == "early_recognition"

    submission = tmp_path / "validation.json"
    code, output, error = cli(
        "export", "submission", folder, submission, "--data", synthetic_data,
        "--split", "validation", *CPU,
    )  # fmt: skip
    assert code == 0, f"{output}\n{error!r}"
    assert "scores at 100.0% observed" in output
    ids = {s.id for s in read_segments(synthetic_data / "validation.csv")}
    assert set(json.loads(submission.read_text())["results"]) == ids
    code, output, error = cli(
        "export", "submission", folder, tmp_path / "other.json", "--data", synthetic_data,
        "--split", "validation", "--time", "2", *CPU,
    )  # fmt: skip
    assert_user_error(code, output, error, "with 200.0% of the action observed", "12.5%")

    code, output, error = cli("predict", folder, "--data", synthetic_data, "--video", "P01_03",
                              "--at", "10")  # fmt: skip
    assert_user_error(code, output, error, "recognises actions early", "sfr validate")


def test_the_early_matt_preset_runs_on_sfr_synth_data(cli, tmp_path: Path) -> None:
    """`sfr synth`, then `sfr pipeline configs/ek55/early_matt.toml` (sizes shrunk with --set):
    six branch stages and the MATT stage, scored by observed ratio."""
    data, runs = tmp_path / "synth", tmp_path / "runs"
    code, output, error = cli(
        "synth", "--out", data, "--videos", "2", "--val-videos", "1", "--actions-per-video", "10"
    )
    assert code == 0, f"{output}\n{error!r}"
    num_classes = read_actions(data / "actions.csv").num_actions
    sizes = ["data.feature_dims.rgb=32", "data.feature_dims.flow=32", "data.feature_dims.obj=24",
             f"data.num_classes={num_classes}", "model.hidden=4", "optim.epochs=1",
             "fusion_optim.epochs=1", "optim.batch_size=8", "fusion_optim.batch_size=8"]  # fmt: skip
    preset = REPO_DIR / "configs" / "ek55" / "early_matt.toml"
    overrides = [word for item in sizes for word in ("--set", item)]
    code, output, error = cli(
        "pipeline", preset, "--data", data, "--runs", runs, "--device", "cpu", *overrides
    )
    assert code == 0, f"{output}\n{error!r}"
    assert "early recognition at observed ratios 12.5%" in output
    folder = runs / "ek55" / "early-arch2-rgb+flow+obj-a0.25-enc0-ant8"
    model = sfr.load_model(folder)
    assert model.label == "rgb+flow+obj@0.25" and model.times == RATIOS
    for modality in DIMS:
        stage = runs / "ek55" / f"early-{modality}-a0.25-enc0-ant8" / "pretrain"
        assert json.loads((stage / "status.json").read_text())["state"] == "finished"


def test_anticipation_and_early_models_are_not_validated_together(
    cli, synthetic_data: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    branch = _write(tmp_path / "early_rgb.toml", BRANCH_TOML.format(name="synthetic"))
    data = ("--data", synthetic_data, "--runs", runs)
    assert cli("train-branch", "--config", branch, *data)[0] == 0
    anticipation = ("--set", "data.task=anticipation", "--s-enc", "2", "--s-ant", "4")
    assert cli("train-branch", "--config", branch, *anticipation, *data)[0] == 0
    early = runs / "synthetic" / "early-rgb-a0.25-enc0-ant8" / "pretrain"
    other = runs / "synthetic" / "rgb-a0.25-enc2-ant4" / "pretrain"
    code, output, error = cli("validate", early, other, "--data", synthetic_data, *CPU)
    assert_user_error(code, output, error, "early_recognition model", "Validate models of one task")


def _full_rate_stores(data: Path, dims: dict[str, int]) -> None:
    """Replace a data folder's stores by full-frame-rate ones (every frame of every video its
    CSVs name, seeded noise), in the public LMDB format."""
    import shutil

    from sfr.data.store import FeatureStoreWriter

    ends: dict[str, int] = {}
    for split in ("training", "validation"):
        for segment in read_segments(data / f"{split}.csv"):
            ends[segment.video] = max(ends.get(segment.video, 0), segment.end_frame)
    rng = np.random.default_rng(0)
    for modality, dim in dims.items():
        shutil.rmtree(data / modality)
        with FeatureStoreWriter(data / modality) as writer:
            for video, last in sorted(ends.items()):
                writer.put_many(video, 1, rng.standard_normal((last, dim)).astype(np.float32))


def test_trains_validates_and_exports_on_the_golden_csvs(
    cli, golden_copy: Path, tmp_path: Path
) -> None:
    """The golden CSVs and actions (the published sampler's data) with full-rate stores: the
    rows kept are the published ones (1 of the 30 validation rows discarded at alpha 0.25)."""
    _full_rate_stores(golden_copy, {"rgb": 16})
    config = _write(tmp_path / "early.toml", BRANCH_TOML.format(name="golden"))
    dims = ("--set", "data.feature_dims.rgb=16")
    runs = ("--data", golden_copy, "--runs", tmp_path / "runs")
    for command in ("train-branch", "finetune"):
        code, output, error = cli(command, "--config", config, *dims, *runs)
        assert code == 0, f"{output}\n{error!r}"
    finetune = tmp_path / "runs" / "golden" / "early-rgb-a0.25-enc0-ant8" / "finetune"
    code, output, error = cli("validate", finetune, "--data", golden_copy, *CPU)
    assert code == 0, f"{output}\n{error!r}"
    golden = json.loads((GOLDEN / "frames_validation.json").read_text())["grids"][0]
    assert golden["alpha"] == 0.25 and len(golden["discarded_ids"]) == 1
    assert "29 of 30 segments (1 discarded, excluded)" in output
    assert _observed_rows(output) == [ratio_label(r) for r in RATIOS]
    bundle = tmp_path / "golden-early.safetensors"
    assert cli("export", "model", finetune, bundle)[0] == 0
    assert sfr.load_model(bundle).times == RATIOS


# --- published checkpoints -----------------------------------------------------------------------


def _published_state(branch: RULSTMBranch) -> dict[str, Tensor]:
    """A branch's weights under the published RU-LSTM keys (DESIGN §4), written independently."""
    state = {}
    for name, lstm in (
        ("rolling_lstm.lstm.", branch.rolling),
        ("unrolling_lstm.", branch.unrolling),
    ):
        for param, value in lstm.named_parameters():
            state[name + param] = value.detach().clone()
    state["classifier.1.weight"] = branch.classifier.weight.detach().clone()
    state["classifier.1.bias"] = branch.classifier.bias.detach().clone()
    return state


def _published_branch(feat: int, classes: int, seed: int) -> RULSTMBranch:
    torch.manual_seed(seed)
    return create_branch(feat_dim=feat, hidden=HIDDEN, num_classes=classes).eval()


def _save_published(path: Path, branch: RULSTMBranch) -> Path:
    """The published container: numpy float64 perf values, as the published files hold."""
    path.parent.mkdir(parents=True, exist_ok=True)
    container = {
        "state_dict": _published_state(branch),
        "epoch": 40,
        "perf": np.float64(27.5),
        "best_perf": np.float64(27.5),
    }
    torch.save(container, path)
    return path


def _early_name(modality: str) -> str:
    return f"RULSTM-early_recognition_0.25_8_{modality}_best.pth.tar"


def test_converted_checkpoint_computes_the_published_function_and_is_scored(
    cli, synthetic_data: Path, tmp_path: Path
) -> None:
    classes = read_actions(synthetic_data / "actions.csv").num_actions
    published = _published_branch(8, classes, seed=3)
    source = _save_published(tmp_path / _early_name("rgb"), published)
    out = tmp_path / "early_rgb.safetensors"
    code, output, error = cli("convert", source, out, "--modality", "rgb")
    assert code == 0, f"{output}\n{error!r}"
    assert "early recognition over 8 frames spread over the action (stage finetune)" in output
    model = sfr.load_model(out)
    assert model.config.data.task == "early_recognition" and model.times == RATIOS
    assert model.metadata["metrics"] == {"top1@1": 27.5}

    # the published model on the published action samples: the plain RU-LSTM loop as oracle
    segments = read_segments(synthetic_data / "validation.csv")[1:4]
    store = open_stores(synthetic_data, {"rgb": 8})["rgb"]
    x = torch.stack(
        [
            torch.from_numpy(
                store.read(
                    s.video, np.array(published_action_frames(s.start_frame, s.end_frame, 8))
                )
            )
            for s in segments
        ]
    )
    with torch.no_grad():
        expected = plain_forward(published, x).scores.detach()  # (B, 8, C), every step scored
    dataset = AnticipationDataset(segments, model.streams, {"rgb": store})
    features = {"rgb@0.25": torch.stack([dataset[i]["features"]["rgb@0.25"] for i in range(3)])}
    torch.testing.assert_close(model(features).scores, expected, atol=1e-5, rtol=0)

    code, output, error = cli("validate", out, "--data", synthetic_data, *CPU)
    assert code == 0, f"{output}\n{error!r}"
    assert "rgb branch, early recognition (8 frames over the action, finetune)" in output


def test_downloaded_published_checkpoints_install_fuse_and_average_as_published(
    cli, synthetic_data: Path, tmp_path: Path
) -> None:
    """`sfr download pretrained rulstm-ek55 --task early` installs the three early branches as
    finished runs; `sfr fuse` trains MATT over them; `--ensemble-of scores` is the published
    fusion (action scores averaged, verbs and nouns by their averaged probabilities)."""
    from httpserver import FileServer

    classes = read_actions(synthetic_data / "actions.csv").num_actions
    registry = load_registry()
    branches = {m: _published_branch(DIMS[m], classes, seed=i) for i, m in enumerate(DIMS)}
    runs = tmp_path / "runs"
    with FileServer() as server:
        for modality, branch in branches.items():
            path = _save_published(tmp_path / "published" / _early_name(modality), branch)
            url = registry.get(f"rulstm-ek55-early-{modality}").url
            server.serve_mirrored(url, path.read_bytes())
        code, output, error = cli(
            "download", "pretrained", "rulstm-ek55", "--task", "early", "--runs", runs,
            "--base-url", server.mirror,
        )  # fmt: skip
    assert code == 0, f"{output}\n{error!r}"
    runs_of = {m: runs / "ek55" / f"early-{m}-a0.25-enc0-ant8" / "finetune" for m in DIMS}
    for modality, run in runs_of.items():
        meta = read_metadata(run / "best.safetensors")
        assert meta["converted"]["source"] == _early_name(modality)
        assert json.loads((run / "status.json").read_text())["state"] == "finished"

    fusion = _write(
        tmp_path / "early_matt.toml", FUSION_TOML.format(name="-").replace('name = "-"\n', "")
    )
    code, output, error = cli(
        "fuse", "arch2", "--config", fusion, "--data", synthetic_data, "--runs", runs
    )
    assert code == 0, f"{output}\n{error!r}"
    assert (
        runs / "ek55" / "early-arch2-rgb+flow+obj-a0.25-enc0-ant8" / "rgb+flow+obj@0.25"
    ).is_dir()

    models = [sfr.load_model(run) for run in runs_of.values()]
    settings = EvaluationSettings(device="cpu", ensemble_of="scores")
    doc = evaluate(models, synthetic_data, ensemble_weights=[1, 1, 1], settings=settings)
    assert doc["models"][-1]["description"].startswith("weighted mean of the action scores of")

    segments = read_segments(synthetic_data / "validation.csv")
    actions = read_actions(synthetic_data / "actions.csv")
    store = open_stores(synthetic_data, DIMS)
    grid = ObservationGrid(0.25, 8)
    kept = [s for s in segments if grid.frames(s.start_frame, s.end_frame) is not None]
    raw, verb_probs = 0, 0
    for modality, branch in branches.items():
        frames = [published_action_frames(s.start_frame, s.end_frame, 8) for s in kept]
        reads = [store[modality].read(s.video, np.array(f)) for s, f in zip(kept, frames)]
        with torch.no_grad():
            scores = plain_forward(branch, torch.from_numpy(np.stack(reads))).scores.double()
        raw = raw + scores.numpy() / 3
        probs = torch.softmax(scores, -1).numpy()
        verb_probs = (
            verb_probs + marginalise(probs, actions.verbs, actions.num_verbs, "action0") / 3
        )
    members = [Member(m) for m in models]
    rows = [segments.index(s) for s in kept]
    published = predict_split(members, segments, synthetic_data, actions, device="cpu",
                              mean_of="scores")  # fmt: skip
    by_probabilities = predict_split(members, segments, synthetic_data, actions, device="cpu")
    top5 = np.argsort(-raw, axis=-1, kind="stable")[..., :5]
    np.testing.assert_array_equal(published.top_ids["action"][rows], top5)
    assert not np.array_equal(by_probabilities.top_ids["action"][rows], top5)
    verb_top5 = np.argsort(-verb_probs, axis=-1, kind="stable")[..., :5]
    np.testing.assert_array_equal(published.top_ids["verb"][rows], verb_top5)
