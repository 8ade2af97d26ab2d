"""Issue 11, cases 9-16 swept across the commands: a folder where a file is expected, a file
where a folder is, a path under a file, an empty file, a file of the wrong format. Each gets a
message naming the path and what it is (exit 2, no traceback), never a traceback or a message
about something else ("does not exist", "damaged", "already exists")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from clitools import assert_user_error
from golden import GOLDEN

Cli = Callable[..., tuple[int, str, BaseException | None]]
FUSION = GOLDEN / "rulstm_fusion_a0.25_6_8" / "checkpoint.pth.tar"
NOT_SAFETENSORS = "is not a safetensors checkpoint"

# (command line, fragments of the message); {file} is a text file, {dir} an empty folder,
# {empty} an empty file, {model} a converted model, {data} the golden data folder.
CASES = [
    ("convert {fusion} --into {file}", ["The runs (--into) folder {file} is a file"]),
    (
        "convert {fusion} {dir}",
        ["The converted checkpoint {dir} is a folder", "e.g. {dir}/out.safetensors"],
    ),
    ("export model {model} {dir}", ["The output file {dir} is a folder", "{dir}/out.safetensors"]),
    (
        "export submission {model} {dir} --data {data} --split validation",
        ["The output file {dir} is a folder", "e.g. {dir}/out.json"],
    ),
    ("download list --data {file}", ["The download folder {file} is a file"]),
    (
        "download annotations ek55 --data {file}/sub --dry-run",
        ["{file}/sub lies under the file {file}"],
    ),
    ("download verify --data {file}", ["{file} is a file, not a folder"]),
    ("validate {empty}.safetensors --data {data}", ["{empty}.safetensors is empty (0 bytes)"]),
    (
        "predict {file} --data {data} --video S01_01 --at 5",
        [NOT_SAFETENSORS, "sfr convert FILE.pth.tar OUT.safetensors"],
    ),
    ("export model {file} {dir}/bundle.safetensors", [NOT_SAFETENSORS]),
    (
        "validate {model} --data {file}",
        ["{file}/validation.csv does not exist ({file} is a file, not a folder)"],
    ),
    (
        "export submission {model} {dir}/s.json --data {file} --split validation",
        ["({file} is a file, not a folder)"],
    ),
    (
        "train-branch --config {file}/rgb.toml --data {data}",
        ["Config file {file}/rgb.toml does not exist ({file} is a file, not a folder)"],
    ),
    (
        "features obj --out {dir}/o --detections {file} --annotations {data}/training.csv "
        "--grids 0.25:6:8",
        ["{file} is not a detections file (expected VIDEO.npy)"],
    ),
    (
        "features obj --out {dir}/o --detections {dir} --annotations {dir} --grids 0.25:6:8",
        ["--annotations {dir} is a folder, not a file"],
    ),
    (
        "features obj --out {dir}/o --detections {dir} --annotations {empty}.csv --grids 0.25:6:8",
        ["{empty}.csv holds no segments (the file is empty)"],
    ),
    (
        "features rgb --out {dir}/o --videos {dir} --weights {dir} "
        "--annotations {data}/training.csv --grids 0.25:6:8",
        ["--weights {dir}: is a folder, not a file"],
    ),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden published fusion, converted once."""
    from sfr.hub.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("model") / "matt.safetensors"
    convert_checkpoint(FUSION, out)
    return out


@pytest.mark.parametrize(("line", "needles"), CASES, ids=[line for line, _ in CASES])
def test_a_wrong_path_is_named_for_what_it_is(
    cli: Cli, golden_data: Path, model: Path, tmp_path: Path, line: str, needles: list[str]
) -> None:
    (tmp_path / "text.txt").write_text("hello, world\n")
    (tmp_path / "folder").mkdir()
    for suffix in (".safetensors", ".csv"):
        (tmp_path / f"empty{suffix}").write_bytes(b"")
    names = {
        "file": tmp_path / "text.txt",
        "dir": tmp_path / "folder",
        "empty": tmp_path / "empty",
        "model": model,
        "data": golden_data,
        "fusion": FUSION,
    }
    args = line.format(**names).split()
    if args[0] in ("validate", "predict", "export") and args[1] != "model":
        args += ["--device", "cpu"]
    code, output, error = cli(*args)
    assert_user_error(code, output, error, *(needle.format(**names) for needle in needles))
    assert "damaged" not in output and "already exists" not in output


def test_a_run_file_that_cannot_be_read_is_not_called_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sfr.errors import RunError
    from sfr.train.rundir import RunDir

    (tmp_path / "status.json").write_text('{"state": "finished"}')

    def refuse(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)  # as chmod 000 would (tests may run as root)
    with pytest.raises(RunError) as caught:
        RunDir(tmp_path).status()
    assert f"{tmp_path / 'status.json'} cannot be read: Permission denied" in caught.value.message
    assert "damaged" not in str(caught.value)
