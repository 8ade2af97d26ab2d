"""The README's table of published early-recognition commands: each `sfr` line runs the model the
published line names (task, modality, grid, sizes, optimiser, selection) on the same data.

Every row of the table is read from README.md. The published line is parsed with the options
and defaults of the published RULSTM/main.py (written out below as the test's oracle); the
`sfr` line is resolved through its preset and run through the CLI on tiny synthetic data in the
EK55 and EK100 layouts (sizes shrunk with `--set`, which leaves the compared settings alone).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_DIR, writable_copy

from sfr.config import BranchRunConfig, load_config
from sfr.data.annotations import read_actions, read_segments
from sfr.hub.registry import load_registry

pytestmark = pytest.mark.usefixtures("module_torch_thread")

README = REPO_DIR / "README.md"
DIMS = {"rgb": 8, "flow": 8, "obj": 6}
EK100_LISTS = (
    "validation_unseen_participants_ids.csv",
    "validation_tail_verbs_ids.csv",
    "validation_tail_nouns_ids.csv",
    "validation_tail_actions_ids.csv",
)


@dataclass(frozen=True)
class Row:
    published: str
    sfr: str
    variants: tuple[str, ...]  # "(and `--split test_unseen`)": the same line with that option

    @property
    def id(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.published.lower()).strip("-")[:90]


def readme_rows() -> list[Row]:
    """The rows of the table in the README's "Early action recognition" section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Early action recognition") :]
    section = section[: section.index("\n### ")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[1].startswith("`sfr "):
            continue
        published = re.match(r"`([^`]*)`", cells[0]).group(1)
        commands = re.findall(r"`([^`]*)`", cells[1])
        rows.append(Row(published, commands[0], tuple(commands[1:])))
    return rows


ROWS = readme_rows()


def published_args(command: str) -> argparse.Namespace:
    """The published main.py's options and defaults (RULSTM/main.py), as the oracle."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "validate", "test", "validate_json"])
    parser.add_argument("path_to_data")
    parser.add_argument("path_to_models")
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--S_enc", type=int, default=6)
    parser.add_argument("--S_ant", type=int, default=8)
    parser.add_argument("--task", default="anticipation")
    parser.add_argument("--modality", default="rgb")
    parser.add_argument("--sequence_completion", action="store_true")
    parser.add_argument("--mt5r", action="store_true")
    parser.add_argument("--num_class", type=int, default=2513)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--feat_in", type=int, default=1024)
    parser.add_argument("--dropout", type=float, default=0.8)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--ek100", "-ek100", action="store_true")
    parser.add_argument("--json_directory", default=None)
    words = shlex.split(command)
    assert words[:2] == ["python", "main.py"], command
    return parser.parse_args(words[2:])


def exp_name(args: argparse.Namespace, modality: str | None = None) -> str:
    """The published run name (main.py): the checkpoint and json file names derive from it."""
    name = f"RULSTM-{args.task}_{args.alpha}_{args.S_ant}_{modality or args.modality}"
    return name + ("_mt5r" if args.mt5r else "")


def branch_dir(args: argparse.Namespace, modality: str) -> str:
    dataset = "ek100" if args.ek100 else "ek55"
    return f"runs/{dataset}/early-{modality}-a{args.alpha:g}-enc0-ant{args.S_ant}/finetune"


# --- the data and runs every row runs on ---------------------------------------------------------


@dataclass
class Layout:
    root: Path
    num_classes: int

    def translate(self, command: str) -> list[str]:
        """The `sfr` words with `data/…`, `runs…` and `jsons/…` moved under the test folder."""
        words = shlex.split(command)
        assert words[0] == "sfr", command
        out = []
        for word in words[1:]:
            if word.startswith(("data/", "jsons/", "runs/")) or word == "runs":
                word = str(self.root / word)
            out.append(word)
        return out

    def shrink(self) -> list[str]:
        """Tiny sizes for the synthetic data; the compared settings are left as they are."""
        sizes = [f"data.feature_dims.{m}={d}" for m, d in DIMS.items()]
        sizes += [f"data.num_classes={self.num_classes}", "branch.hidden=4"]
        return [*(w for s in sizes for w in ("--set", s)), "--epochs", "1", "--batch-size", "8"]


def _four_columns(source: Path, target: Path) -> None:
    """A test CSV (id, video, start, end) made from a labelled split."""
    rows = [f"{s.id},{s.video},{s.start_frame},{s.end_frame}\n" for s in read_segments(source)]
    target.write_text("".join(rows), encoding="utf-8")


def _train_commands() -> list[str]:
    """The table's training lines, and for EK100 the flow and obj lines it says go likewise."""
    commands = [row.sfr for row in ROWS if row.sfr.split()[1] in ("train-branch", "finetune")]
    for command in [c for c in commands if "configs/ek100/early_rgb.toml" in c]:
        commands += [command.replace("early_rgb", f"early_{m}") for m in ("flow", "obj")]
    return commands


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path) -> Layout:
    """EK55 and EK100 copies of the synthetic data (with test CSVs and EK100 id lists), and
    every branch the table trains, trained by the table's own `sfr` lines."""
    from typer.testing import CliRunner

    from sfr.cli.app import app

    root = tmp_path_factory.mktemp("migration")
    ek55 = writable_copy(synthetic_data, root / "data" / "ek55")
    for split in ("test_seen", "test_unseen"):
        _four_columns(ek55 / "validation.csv", ek55 / f"{split}.csv")
    ek100 = writable_copy(synthetic_data, root / "data" / "ek100")
    _four_columns(ek100 / "validation.csv", ek100 / "test_timestamps.csv")
    ids = [s.id for s in read_segments(ek100 / "validation.csv")]
    for index, name in enumerate(EK100_LISTS):
        (ek100 / name).write_text("".join(f"{i}\n" for i in ids[index::2]), encoding="utf-8")
    result = Layout(root, read_actions(ek55 / "actions.csv").num_actions)
    runner = CliRunner()
    for command in _train_commands():
        args = [*result.translate(command), *result.shrink(), "--device", "cpu"]
        outcome = runner.invoke(app, args)
        assert outcome.exit_code == 0, f"{command}\n{outcome.output}"
    return result


# --- one test per row ----------------------------------------------------------------------------


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_the_sfr_line_does_what_the_published_line_does(row: Row, layout: Layout, cli) -> None:
    if row.published.startswith("./scripts/download_models_ek55.sh"):
        _download_row(row, layout, cli)
        return
    args = published_args(row.published)
    assert args.task == "early_recognition"
    dataset = "ek100" if args.ek100 else "ek55"
    assert f"data/{dataset}" in row.sfr.split()
    if args.mode == "train":
        _train_row(row, args, layout)
    elif args.mode == "validate":
        _validate_row(row, args, layout, cli)
    else:
        _submission_row(row, args, layout, cli)


def _train_row(row: Row, args: argparse.Namespace, layout: Layout) -> None:
    words = row.sfr.split()
    stage = {"train-branch": "pretrain", "finetune": "finetune"}[words[1]]
    assert stage == ("pretrain" if args.sequence_completion else "finetune")
    config = load_config(BranchRunConfig, REPO_DIR / words[words.index("--config") + 1])
    branch, optim, run = config.branch, config.optim, config.run
    assert (config.data.task, config.data.dataset) == (args.task, "ek100" if args.ek100 else "ek55")
    assert (branch.modality, branch.alpha, branch.s_ant) == (args.modality, args.alpha, args.S_ant)
    assert branch.s_enc == 0  # the published code ignores S_enc for this task
    assert (branch.hidden, branch.dropout) == (args.hidden, args.dropout)
    assert config.data.feature_dim(branch.modality) == args.feat_in
    assert config.data.num_classes == args.num_class
    assert (optim.lr, optim.momentum, optim.batch_size, optim.epochs) == (
        args.lr,
        args.momentum,
        args.batch_size,
        args.epochs,
    )
    # the published selection: top-1 (or mean top-5 recall with --mt5r) at the last step
    assert (run.select, run.select_time) == ("mt5r" if args.mt5r else "top1", 1.0)

    # the line ran (in the fixture) and trained that branch on the early-recognition frames
    folder = layout.root / branch_dir(args, args.modality).replace("/finetune", f"/{stage}")
    assert json.loads((folder / "status.json").read_text())["state"] == "finished"
    saved = json.loads((folder / "config.json").read_text())
    assert saved["data"]["task"] == "early_recognition"
    assert (saved["branch"]["modality"], saved["branch"]["s_ant"]) == (args.modality, args.S_ant)


def _validate_row(row: Row, args: argparse.Namespace, layout: Layout, cli) -> None:
    modalities = ["rgb", "flow", "obj"] if args.modality == "fusion" else [args.modality]
    words = row.sfr.split()
    models = [w for w in words[2:] if w.startswith("runs/")]
    assert models == [branch_dir(args, m) for m in modalities]
    code, output, error = cli(*layout.translate(row.sfr), "--device", "cpu")
    assert code == 0, f"{output}\n{error!r}"
    for modality in modalities:
        assert f"{modality} branch, early recognition (8 frames over the action" in output
    if args.modality == "fusion":  # the published late fusion: the mean of the raw scores
        assert "weighted mean of the action scores of rgb@0.25 finetune, flow@0.25" in output
    labels = [f"{c:0.1f}%" for c in (12.5, 25, 37.5, 50, 62.5, 75, 87.5, 100)]
    assert all(label in output for label in labels)  # published columns: observed ratios


def _submission_row(row: Row, args: argparse.Namespace, layout: Layout, cli) -> None:
    modalities = ["rgb", "flow", "obj"] if args.modality == "fusion" else [args.modality]
    words = row.sfr.split()
    models = [words[3], *(words[i + 1] for i, w in enumerate(words) if w == "--with")]
    assert models == [branch_dir(args, m) for m in modalities]
    assert ("--ensemble-of" in words) == (args.modality == "fusion")
    dataset = "ek100" if args.ek100 else "ek55"
    splits = {
        "validate_json": ["validation"],
        "test": ["test"] if args.ek100 else ["test_seen", "test_unseen"],
    }[args.mode]
    lines = [row.sfr, *(f"{row.sfr.rsplit(' --split ', 1)[0]} {v}" for v in row.variants)]
    for line, split in zip(lines, splits, strict=True):
        assert line.split()[-2:] == ["--split", split]
        out = Path(line.split()[4])
        suffix = {"validation": "validation", "test": "test"}.get(
            split, split.removeprefix("test_")
        )
        published_file = f"{args.json_directory}/{exp_name(args)}_{suffix}.json"
        if line is not row.sfr:  # a variant names its own file: the published one of that split
            line = line.replace(str(out), published_file)
            out = Path(published_file)
        assert str(out) == published_file
        (layout.root / out).parent.mkdir(parents=True, exist_ok=True)
        code, output, error = cli(*layout.translate(line), "--device", "cpu")
        assert code == 0, f"{output}\n{error!r}"
        assert "scores at 100.0% observed" in output  # the published test mode scores idx -1
        if args.modality == "fusion":
            assert "(mean of scores)" in output
        document = json.loads((layout.root / out).read_text())
        csv = (
            layout.root
            / "data"
            / dataset
            / ("test_timestamps.csv" if split == "test" else f"{split}.csv")
        )
        assert set(document["results"]) == {s.id for s in read_segments(csv)}


def _download_row(row: Row, layout: Layout, cli) -> None:
    """The published download script's early checkpoints are what the sfr line installs."""
    words = row.sfr.split()
    assert words[1:5] == ["download", "pretrained", "rulstm-ek55", "--task"]
    early = load_registry().pretrained("ek55", words[5])
    names = [Path(a.dest).name for a in early]
    assert names == [f"RULSTM-early_recognition_0.25_8_{m}_best.pth.tar" for m in DIMS]
    code, output, error = cli(*layout.translate(row.sfr), "--dry-run")
    assert code == 0, f"{output}\n{error!r}"
    assert all(name in output or a.name in output for name, a in zip(names, early))


def test_the_readme_table_covers_every_published_early_recognition_command() -> None:
    """The rows are read from the README: a moved or emptied table must not pass silently."""
    modes = {row.published.split()[2] for row in ROWS if row.published.startswith("python")}
    assert modes == {"train", "validate", "test", "validate_json"}
    assert any(row.published.startswith("./scripts/download_models_ek55.sh") for row in ROWS)
    trained = {
        (published_args(row.published).modality, published_args(row.published).sequence_completion)
        for row in ROWS
        if row.published.startswith("python main.py train ") and "--ek100" not in row.published
    }
    assert trained == {(m, sc) for m in DIMS for sc in (False, True)}
    assert len(ROWS) == 17
