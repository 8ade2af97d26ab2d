"""The README's table of published commands: every `sfr` line runs the same model on the same data.

Each row of "Coming from the published programs" is read from README.md. The published command
is parsed with the options and defaults of the published `main.py` (RU-LSTM and Slow-Fast
RU-LSTM), and what the published program would do (model, grid, sizes, optimiser, selection,
data folder, CSV, checkpoint) is compared with what the `sfr` line resolves: its config, the
stage or fusion units it trains, and for `validate`/`export` the very model it loads (converted
from the checkpoint file the published command would load) and the CSV it reads. The core
calls are intercepted, so no training runs here; the Slow-Fast validation row also runs for
real on the golden data. A row this module has no check for fails: add one with the row.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from golden import GOLDEN, GOLDEN_DATA
from test_convert import _matt, _published_state, _random_branch, _save_published

from sfr.cli import branch_stage, export, fuse, validate
from sfr.config import BranchRunConfig, FusionRunConfig
from sfr.data.timegrid import as_time
from sfr.eval.benchmark import split_csv
from sfr.hub.published import load_published_checkpoint
from sfr.models.tree import ModelTree

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ROOT = Path(__file__).parent.parent
SECTION = "### Coming from the published programs: one command for one"
MODALITIES = ("rgb", "flow", "obj")
# The published `fast_slow_fusion`-free slicing: rates other than 0.5 drop their first 12 steps.
PUBLISHED_SLICE = 12
# The addresses each published download script fetches (RULSTM/scripts/*.sh).
HOST = "https://iplab.dmi.unict.it/sharing/rulstm"
SCRIPT_URLS = {
    "download_data_ek55.sh": [f"{HOST}/features/{m}/data.mdb" for m in MODALITIES],
    "download_data_ek55_full.sh": [f"{HOST}/features/{m}_full/data.mdb" for m in MODALITIES],
    "download_data_ek100_full.sh": [f"{HOST}/features/ek100/{m}_full/data.mdb" for m in MODALITIES],
    "download_models_ek55.sh": [
        *(
            f"{HOST}/iccv_models/RULSTM-anticipation_0.25_6_8_{m}_best.pth.tar"
            for m in (*MODALITIES, "fusion")
        ),
        *(
            f"{HOST}/iccv_models/RULSTM-early_recognition_0.25_8_{m}_best.pth.tar"
            for m in MODALITIES
        ),
    ],
    "download_models_ek100.sh": [
        f"{HOST}/ek100_models/RULSTM-anticipation_0.25_6_8_{m}_mt5r_best.pth.tar"
        for m in (*MODALITIES, "fusion")
    ],
}


@dataclass(frozen=True)
class Row:
    published: str
    sfr: tuple[str, ...]
    differs: str

    @property
    def id(self) -> str:
        return re.sub(r"\s+", " ", self.published.replace("python3 ", "").replace("python ", ""))


def migration_rows(readme: Path = ROOT / "README.md") -> list[Row]:
    """The rows of the README's migration table (every table in that section)."""
    text = readme.read_text(encoding="utf-8")
    section = text.split(SECTION, 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if not line.startswith("| `") or len(cells) < 2:
            continue
        published = re.findall(r"`([^`]+)`", cells[0])
        sfr_lines = tuple(c for c in re.findall(r"`([^`]+)`", cells[1]) if c.startswith("sfr "))
        assert len(published) == 1 and sfr_lines, line
        rows.append(Row(published[0], sfr_lines, cells[2] if len(cells) > 2 else ""))
    return rows


ROWS = migration_rows()


def test_the_table_covers_every_published_command() -> None:
    commands = {row.id for row in ROWS}
    assert len(commands) == len(ROWS)
    scripts = {Path(r.published).name for r in ROWS if r.published.startswith("./scripts/")}
    assert scripts == set(SCRIPT_URLS)
    modes = {shlex.split(r.published)[2] for r in ROWS if "main.py" in r.published}
    assert {"train", "validate", "validate_json", "test"} <= modes
    for mode in ("train", "validate"):
        for dataset in ("ek55", "ek100"):
            for modality in (*MODALITIES, "fusion"):
                assert any(
                    f"main.py {mode} data/{dataset} " in r.published
                    and f"--modality {modality}" in r.published
                    for r in ROWS
                ), (mode, dataset, modality)
    flags = " ".join(r.published for r in ROWS)
    for flag in ("--slowfastfusion", "--arc1", "--resume", "--sequence_completion", "--mt5r"):
        assert flag in flags


# --- what the published program does -------------------------------------------------------------


def published_parser() -> argparse.ArgumentParser:
    """The options and defaults of the published `main.py` (RU-LSTM and its Slow-Fast version)."""
    parser = argparse.ArgumentParser(prog="main.py")
    parser.add_argument("mode", choices=["train", "validate", "test", "validate_json"])
    parser.add_argument("path_to_data")
    parser.add_argument("path_to_models")
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--alphas_fused", type=float, nargs="+", default=[0.125, 0.5])
    parser.add_argument("--S_enc", type=int, default=6)
    parser.add_argument("--S_enc_fused", type=int, nargs="+", default=[12, 3])
    parser.add_argument("--S_ant", type=int, default=8)
    parser.add_argument("--S_ant_fused", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--task", default="anticipation")
    parser.add_argument("--modality", default="rgb", choices=[*MODALITIES, "fusion"])
    parser.add_argument("--slowfastfusion", action="store_true")
    parser.add_argument("--sequence_completion", action="store_true")
    parser.add_argument("--mt5r", action="store_true")
    parser.add_argument("--num_class", type=int, default=2513)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--feat_in", type=int, default=1024)
    parser.add_argument("--feats_in", type=int, nargs="+", default=[1024, 1024, 352])
    parser.add_argument("--dropout", type=float, default=0.8)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ek100", "-ek100", action="store_true")  # the README writes -ek100
    parser.add_argument("--json_directory", default=None)
    parser.add_argument("--arc1", action="store_true")
    return parser


def published_args(command: str) -> argparse.Namespace:
    words = shlex.split(command)
    assert words[0] in ("python", "python3") and words[1] == "main.py", command
    return published_parser().parse_args(words[2:])


def dataset_of(args: argparse.Namespace) -> str:
    """The benchmark a published command works on: EK100 by flag or folder, else EK55."""
    ek100 = args.ek100 or "ek100" in f"{args.path_to_data} {args.path_to_models}"
    return "ek100" if ek100 else "ek55"


def selection_time(alpha: float, s_ant: int) -> float:
    """The published selection step: index int(1/alpha) of the last S_ant predictions."""
    return as_time((s_ant - int(1.0 / alpha)) * alpha)


def exp_name(args: argparse.Namespace) -> str:
    """The published checkpoint name of a command (main.py's `exp_name`)."""
    if args.slowfastfusion:
        grids = "".join(
            f"{a}_{e}_{s}_"
            for a, e, s in zip(args.alphas_fused, args.S_enc_fused, args.S_ant_fused)
        )
        name = f"RULSTM-{args.task}_{grids}{args.modality}"
    else:
        name = f"RULSTM-{args.task}_{args.alpha}_{args.S_enc}_{args.S_ant}_{args.modality}"
    if args.mt5r:
        name += "_mt5r"
    if args.sequence_completion:
        name += "_sequence_completion"
    return name


def published_fused_steps(args: argparse.Namespace) -> dict[float, int]:
    """Steps the published slow-fast classes feed each rate: the loader's T on the finest grid,
    the first 12 dropped for rates other than 0.5, every step-th kept for slower rates."""
    base = max(args.S_enc_fused) + max(args.S_ant_fused)
    fine = min(args.alphas_fused)
    steps = {}
    for alpha in args.alphas_fused:
        length = base - (PUBLISHED_SLICE if alpha != 0.5 else 0)
        steps[alpha] = length // round(alpha / fine)
    return steps


# --- what the sfr line does ----------------------------------------------------------------------


class Stop(Exception):
    """Raised by an intercepted core call once its arguments are captured."""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with the project's configs, as a user's checkout."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_intercepted(cli, monkeypatch, module: Any, name: str, line: str) -> dict[str, Any]:
    """Run an `sfr` line with `module.name` replaced by a recorder; the call's arguments."""
    captured: dict[str, Any] = {}

    def record(*args: Any, **kwargs: Any) -> None:
        captured.update(args=args, kwargs=kwargs)
        raise Stop

    monkeypatch.setattr(module, name, record)
    _, output, error = cli(*shlex.split(line)[1:])
    assert isinstance(error, Stop), f"{line}\n{output}\n{error!r}"
    return captured


def check_branch_training(args: argparse.Namespace, line: str, cli, monkeypatch) -> None:
    call = run_intercepted(cli, monkeypatch, branch_stage, "train_branch_stage", line)
    config, stage, data = call["args"][:3]
    assert isinstance(config, BranchRunConfig)
    branch = config.branch
    assert stage == ("pretrain" if args.sequence_completion else "finetune")
    assert Path(data) == Path(args.path_to_data)
    assert config.data.dataset == dataset_of(args)
    assert (branch.modality, branch.alpha, branch.s_enc, branch.s_ant) == (
        args.modality, args.alpha, args.S_enc, args.S_ant,
    )  # fmt: skip
    assert (branch.hidden, branch.dropout) == (args.hidden, args.dropout)
    assert config.data.feature_dim(branch.modality) == args.feat_in
    assert config.data.num_classes == args.num_class
    optim = config.optim
    assert (optim.lr, optim.momentum, optim.batch_size, optim.epochs) == (
        args.lr, args.momentum, args.batch_size, args.epochs,
    )  # fmt: skip
    assert config.run.select == ("mt5r" if args.mt5r else "top5")
    assert config.run.select_time == selection_time(args.alpha, args.S_ant)


def published_unit(args: argparse.Namespace) -> tuple[str, str, float]:
    """(architecture, unit label, its attention dropout) of what a published fusion trains."""
    if not args.slowfastfusion:
        return "arch2", f"rgb+flow+obj@{args.alpha:g}", args.dropout
    rates = "+".join(f"{a:g}" for a in args.alphas_fused)
    if args.modality != "fusion":
        return "arch1", f"{args.modality}@{rates}", args.dropout
    return ("arch1" if args.arc1 else "arch2"), f"rgb+flow+obj@{rates}", args.dropout


def check_fusion_training(args: argparse.Namespace, line: str, cli, monkeypatch) -> None:
    call = run_intercepted(cli, monkeypatch, fuse, "run_and_report", line)
    config, data = call["args"][:2]
    assert isinstance(config, FusionRunConfig)
    assert Path(data) == Path(args.path_to_data)
    model = config.model
    architecture, label, dropout = published_unit(args)
    tree = ModelTree(config)
    assert model.architecture == architecture
    assert list(model.modalities) == list(MODALITIES)
    levels = call["kwargs"]["levels"]
    trained = [u.label for u in tree.units if levels is None or u.level in levels]
    assert label in trained, (label, trained)
    unit = tree.by_label[label]
    assert getattr(model, unit.dropout_field) == dropout
    assert model.hidden == args.hidden
    assert config.data.num_classes == args.num_class
    assert config.data.dataset == dataset_of(args)
    if args.modality == "fusion":
        assert [config.data.feature_dim(m) for m in MODALITIES] == args.feats_in
    else:
        assert config.data.feature_dim(args.modality) == args.feat_in
    optim = config.fusion_optim
    assert (optim.lr, optim.momentum, optim.batch_size, optim.epochs) == (
        args.lr, args.momentum, args.batch_size, args.epochs,
    )  # fmt: skip
    assert config.run.select == ("mt5r" if args.mt5r else "top5")
    # published: the whole slow-fast Architecture 2 runs its per-rate fusions under no_grad
    assert model.freeze_branches == (args.slowfastfusion and architecture == "arch2"
                                     and args.modality == "fusion")  # fmt: skip
    grids = {r.alpha: r for r in model.rates}
    if args.slowfastfusion:
        wanted = zip(args.alphas_fused, args.S_enc_fused, args.S_ant_fused)
        assert [(r.alpha, r.s_enc, r.s_ant) for r in model.rates] == list(wanted)
        steps = published_fused_steps(args)
        fused = {r.alpha: r.grid(config.data.fps, fusion=True).steps for r in model.rates}
        assert fused == steps
        assert config.fused_times[-4:] == tuple(
            as_time(k * max(args.alphas_fused)) for k in range(min(args.S_ant_fused), 0, -1)
        )  # the steps the published slow-fast classes score
        assert config.run.select_time == selection_time(
            max(args.alphas_fused), min(args.S_ant_fused)
        )
    else:
        rate = grids[args.alpha]
        assert (rate.alpha, rate.s_enc, rate.s_ant) == (args.alpha, args.S_enc, args.S_ant)
        assert config.run.select_time == selection_time(args.alpha, args.S_ant)
        assert model.branch_dropout == args.dropout


def published_checkpoint(args: argparse.Namespace, models: Path) -> Path:
    """The file the published command loads, made here: tiny random weights in the published
    layout, or the golden Slow-Fast model for the slow-fast commands."""
    models.mkdir(parents=True, exist_ok=True)
    path = models / f"{exp_name(args)}_best.pth.tar"
    if args.slowfastfusion:
        return Path(shutil.copy(GOLDEN / "sf_arch2" / "checkpoint.pth.tar", path))
    hidden, classes = 4, args.num_class
    if args.modality != "fusion":
        branch = _random_branch(args.feat_in, hidden, classes, seed=1)
        return _save_published(path, _published_state(branch))
    state = {}
    for index, dim in enumerate(args.feats_in):
        state.update(
            _published_state(_random_branch(dim, hidden, classes, seed=index), f"branches.{index}.")
        )
    state.update({f"MATT.{k}": v for k, v in _matt(3, hidden).state_dict().items()})
    return _save_published(path, state)


def weight_signature(tensors: dict[str, torch.Tensor]) -> list[tuple[int, float]]:
    """Sizes and sums of a set of weights, whatever their names."""
    return sorted((t.numel(), round(float(t.double().sum()), 4)) for t in tensors.values())


def check_loaded_model(args: argparse.Namespace, model: Any, source: Path) -> None:
    """The model sfr loaded is the one in the published file, on the published grid."""
    state = {
        k: v for k, v in load_published_checkpoint(source)["state_dict"].items()
        if "fast_slow_fusion" not in k
    }  # fmt: skip
    module = model.module.branch if model.kind == "branch" else model.module
    assert weight_signature(module.state_dict()) == weight_signature(state)
    assert model.data.dataset == dataset_of(args)
    if args.slowfastfusion:
        assert model.label == published_unit(args)[1]
        assert model.data.sampling == "published"
        return
    if args.modality == "fusion":
        assert model.label == f"rgb+flow+obj@{args.alpha:g}"
    else:
        branch = model.config.branch
        assert (branch.modality, branch.alpha, branch.s_enc, branch.s_ant) == (
            args.modality, args.alpha, args.S_enc, args.S_ant,
        )  # fmt: skip


def install_published(args: argparse.Namespace, workdir: Path, cli) -> Path:
    """Convert the published checkpoint into the runs, as `sfr download pretrained` does."""
    source = published_checkpoint(args, workdir / args.path_to_models)
    code, output, error = cli(
        "convert", source, "--into", workdir / "runs", "--dataset", dataset_of(args)
    )
    assert code == 0, f"{output}\n{error!r}"
    return source


def check_validation(args: argparse.Namespace, row: Row, workdir: Path, cli, monkeypatch) -> None:
    source = install_published(args, workdir, cli)
    (line,) = row.sfr
    call = run_intercepted(cli, monkeypatch, validate, "evaluate", line)
    (model,) = call["args"][0]
    assert Path(call["args"][1]) == Path(args.path_to_data)
    assert call["kwargs"]["split"] == "validation"
    check_loaded_model(args, model, source)


def check_submission(args: argparse.Namespace, row: Row, workdir: Path, cli, monkeypatch) -> None:
    source = install_published(args, workdir, cli)
    if args.mode == "validate_json":
        published_csvs = ["validation.csv"]
    elif dataset_of(args) == "ek100":
        published_csvs = ["test_timestamps.csv"]
    else:
        published_csvs = ["test_seen.csv", "test_unseen.csv"]
    csvs = []
    for line in row.sfr:
        call = run_intercepted(cli, monkeypatch, export, "make_submission", line)
        model, data, split = call["args"]
        assert Path(data) == Path(args.path_to_data)
        csvs.append(split_csv(model.data, Path(data), split).name)
        check_loaded_model(args, model, source)
        if args.slowfastfusion:  # published: index -4 of its 4 scored steps; sfr: the 1 s asked
            assert call["kwargs"]["time"] == 1.0 and "2.0 s" in row.differs
        else:  # published: index -4 of the 8 steps of alpha 0.25
            assert call["kwargs"]["time"] == selection_time(args.alpha, args.S_ant) == 1.0
    assert csvs == published_csvs


def check_download(row: Row, workdir: Path, cli) -> None:
    script = Path(row.published).name
    output = ""
    for line in row.sfr:
        code, text, error = cli(*shlex.split(line)[1:], "--dry-run")
        assert code == 0, f"{text}\n{error!r}"
        output += text
    for url in SCRIPT_URLS[script]:
        assert url in output, url
    if "data" in script:  # curl ... -o data/<dataset>/<modality>/data.mdb
        dataset = "ek100" if "ek100" in script else "ek55"
        for modality in MODALITIES:
            assert str(Path("data") / dataset / modality / "data.mdb") in output


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_row(row: Row, workdir: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    if row.published.startswith("./scripts/"):
        check_download(row, workdir, cli)
        return
    args = published_args(row.published)
    if args.task != "anticipation":
        pytest.fail(f"no check for {args.task} rows yet: add one to tests/test_migration.py")
    if args.mode == "train":
        (line,) = row.sfr
        if line.startswith(("sfr train-branch", "sfr finetune")):
            assert not args.slowfastfusion and args.modality != "fusion"
            assert line.startswith("sfr train-branch" if args.sequence_completion else "sfr fin")
            check_branch_training(args, line, cli, monkeypatch)
        else:
            assert line.startswith("sfr fuse ")
            check_fusion_training(args, line, cli, monkeypatch)
    elif args.mode == "validate":
        check_validation(args, row, workdir, cli, monkeypatch)
    else:
        check_submission(args, row, workdir, cli, monkeypatch)


def test_slowfast_validation_row_runs_on_the_golden_data(workdir: Path, cli) -> None:
    (row,) = [r for r in ROWS if "validate" in r.published and "--slowfastfusion" in r.published]
    args = published_args(row.published)
    install_published(args, workdir, cli)
    shutil.copytree(GOLDEN_DATA, workdir / args.path_to_data)
    (line,) = row.sfr
    code, output, error = cli(*shlex.split(line)[1:], "--device", "cpu")
    assert code == 0, f"{output}\n{error!r}"
    assert "(Architecture 2, whole model, published Slow-Fast sampling)" in output
    assert "29 of 30 segments" in output
