"""Shared fixtures: golden and synthetic data folders, writable copies, and a CLI runner."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from sfr.data.synthetic import SyntheticSpec, write_synthetic

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
GOLDEN_DATA_DIR = TESTS_DIR / "data" / "golden" / "data"
PRESETS_DIR = REPO_DIR / "configs"

# A synthetic dataset small enough to write and train on in well under a second.
TINY_SPEC = SyntheticSpec(num_videos=2, val_videos=1, actions_per_video=12, dims=(8, 8, 6))


def writable_copy(source: Path, target: Path) -> Path:
    """Copy a data folder (the golden one is read-only) and make every copied path writable."""
    shutil.copytree(source, target)
    for root, dirs, files in os.walk(target):
        for name in [*dirs, *files]:
            path = Path(root) / name
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    Path(target).chmod(Path(target).stat().st_mode | stat.S_IWUSR)
    return Path(target)


@pytest.fixture
def single_torch_thread():
    """Run torch on one intra-op thread: the tiny models here are faster so, and on a busy
    2-core machine spinning OpenMP threads otherwise cost several times the work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def golden_data() -> Path:
    """The golden data folder (EK55 layout, rgb/flow 16-d, obj 12-d, 24 actions); do not modify."""
    assert (GOLDEN_DATA_DIR / "rgb" / "data.mdb").is_file()
    return GOLDEN_DATA_DIR


@pytest.fixture
def golden_copy(tmp_path: Path) -> Path:
    """A private, writable copy of the golden data folder."""
    return writable_copy(GOLDEN_DATA_DIR, tmp_path / "golden-copy")


@pytest.fixture(scope="session")
def tiny_spec() -> SyntheticSpec:
    return TINY_SPEC


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset written once per session by `write_synthetic`; do not modify."""
    out = tmp_path_factory.mktemp("synthetic") / "data"
    write_synthetic(out, TINY_SPEC)
    return out


@pytest.fixture(scope="session")
def presets_dir() -> Path:
    return PRESETS_DIR


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, BaseException | None]]:
    """Invoke `sfr` in-process: `cli(*args)` -> (exit code, stdout + stderr, exception).

    The consoles are made wide so that paths and messages are not wrapped.
    """
    from typer.testing import CliRunner

    from sfr.cli import common
    from sfr.cli.app import app

    for console in (common.console, common.err_console):
        monkeypatch.setattr(console, "_width", 1000, raising=False)
    runner = CliRunner()

    def invoke(*args: object) -> tuple[int, str, BaseException | None]:
        result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})
        output = result.output
        try:
            stderr = result.stderr
        except (ValueError, AttributeError):  # older Click: stderr not captured separately
            stderr = ""
        if stderr and stderr not in output:
            output += stderr
        return result.exit_code, output, result.exception

    return invoke


@pytest.fixture(scope="module")
def module_torch_thread():
    """`single_torch_thread` for the module-scoped fixtures that train a pipeline once."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def synthetic_copy(synthetic_data: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the session's synthetic dataset."""
    return writable_copy(synthetic_data, tmp_path / "synthetic-copy")
