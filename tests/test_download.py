"""`sfr download` against a loopback HTTP server with injected faults: resume, retries, errors,
checksums, safe archives, the manifest, offline verification, mirrors and dry runs."""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from clitools import assert_user_error
from httpserver import FileServer

from sfr.errors import DataError, SfrError
from sfr.hub import install as install_module
from sfr.hub.addresses import mirror_url, public_address, scrub
from sfr.hub.archive import extract_zip
from sfr.hub.download import (
    BytesReceived,
    DownloadError,
    Expected,
    FileStarted,
    RetryPolicy,
    RetryScheduled,
    UnreachableError,
    fetch,
)
from sfr.hub.install import Folders, install, plan
from sfr.hub.manifest import (
    MANIFEST_NAME,
    InstalledFile,
    ManifestEntry,
    load_manifest,
    record,
)
from sfr.hub.registry import load_registry, parse_registry

REGISTRY = load_registry()
SIZE = 300_000


def payload(seed: int, size: int = SIZE) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server() -> Iterator[FileServer]:
    """A running loopback file server."""
    with FileServer() as running:
        yield running


@pytest.fixture(autouse=True)
def no_backoff_in_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI downloads retry without waiting (the backoff delays are tested on `fetch`)."""
    monkeypatch.setattr(
        "sfr.cli.download.RetryPolicy", functools.partial(RetryPolicy, sleep=lambda delay: None)
    )


@pytest.fixture
def sleeps() -> list[float]:
    """The backoff delays a test's downloads asked for."""
    return []


@pytest.fixture
def policy(sleeps: list[float]) -> RetryPolicy:
    """Retries that record their delays instead of waiting."""
    return RetryPolicy(retries=3, timeout_s=5.0, sleep=sleeps.append)


def serve_artefacts(server: FileServer, names: list[str], seed: int = 0) -> dict[str, bytes]:
    """Serve each named artefact's primary address on the server's mirror; the bytes served."""
    served = {}
    for offset, name in enumerate(names):
        data = payload(seed + offset, 2_000 + offset)
        server.serve_mirrored(REGISTRY.get(name).url, data)
        served[name] = data
    return served


def zip_bytes(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    """A zip archive of `members` (names kept verbatim); `links` become symbolic links."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if name in links:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            bundle.writestr(info, data)
    return buffer.getvalue()


# --- the downloader -------------------------------------------------------------------------


def test_a_dropped_connection_is_resumed_with_a_range_request(server, policy, tmp_path) -> None:
    data = payload(1)
    url = server.serve("/f.bin", data, drop_after=[100_000])
    dest = tmp_path / "f.bin"
    events = []
    fetched = fetch(
        url,
        dest,
        label="f",
        expected=Expected(sha256=sha(data)),
        policy=policy,
        on_event=events.append,
    )
    assert dest.read_bytes() == data and fetched.sha256 == sha(data)
    first, second = server.hits("/f.bin")
    assert first.range is None and second.range == "bytes=100000-"
    starts = [e for e in events if isinstance(e, FileStarted)]
    assert [s.resumed_from for s in starts] == [0, 100_000]
    assert not (tmp_path / "f.bin.part").exists()


def test_a_server_error_is_retried_with_exponential_backoff(
    server, policy, sleeps, tmp_path
) -> None:
    data = payload(2)
    url = server.serve("/f.bin", data, fail_with=[500, 503])
    events = []
    fetch(url, tmp_path / "f.bin", label="f", policy=policy, on_event=events.append)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert sleeps == [1.0, 2.0]
    retries = [e for e in events if isinstance(e, RetryScheduled)]
    assert [r.attempt for r in retries] == [1, 2] and "HTTP 500" in retries[0].reason


def test_retries_run_out_after_failures_without_progress(server, policy, sleeps, tmp_path) -> None:
    url = server.serve("/f.bin", payload(3), fail_with=[500] * 10)
    with pytest.raises(UnreachableError, match="failed 4 times in a row") as raised:
        fetch(url, tmp_path / "f.bin", label="thing", policy=policy)
    assert "thing" in str(raised.value) and url in str(raised.value)
    assert sleeps == [1.0, 2.0, 4.0]
    assert not (tmp_path / "f.bin").exists()


def test_progress_resets_the_retry_count_on_a_flaky_connection(server, sleeps, tmp_path) -> None:
    data = payload(4)
    url = server.serve("/f.bin", data, drop_after=[50_000] * 5)
    strict = RetryPolicy(retries=1, sleep=sleeps.append)
    fetch(url, tmp_path / "f.bin", label="f", expected=Expected(sha256=sha(data)), policy=strict)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert len(server.hits("/f.bin")) == 6


def test_a_404_names_the_artefact_and_the_address(server, policy, sleeps, tmp_path) -> None:
    url = server.root + "/missing.bin"
    with pytest.raises(UnreachableError) as raised:
        fetch(url, tmp_path / "m.bin", label="ek55-features-rgb", policy=policy)
    assert "ek55-features-rgb" in str(raised.value) and url in str(raised.value)
    assert "404" in str(raised.value) and sleeps == []
    assert len(server.hits()) == 1


def test_a_wrong_checksum_installs_nothing_and_moves_the_bytes_aside(
    server, policy, tmp_path
) -> None:
    data = payload(5)
    url = server.serve("/f.bin", data)
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="failed verification") as raised:
        fetch(url, dest, label="f", expected=Expected(sha256="0" * 64), policy=policy)
    assert "f.bin.part.bad" in str(raised.value)
    assert not dest.exists() and not (tmp_path / "f.bin.part").exists()
    assert (tmp_path / "f.bin.part.bad").read_bytes() == data
    fetch(url, dest, label="f", expected=Expected(sha256=sha(data)), policy=policy)
    assert dest.read_bytes() == data
    assert server.hits("/f.bin")[-1].range is None  # the next run started clean


def test_a_server_without_range_support_restarts_from_zero(server, policy, tmp_path) -> None:
    data = payload(6)
    url = server.serve("/f.bin", data, ranges=False, drop_after=[120_000])
    events = []
    fetch(
        url,
        tmp_path / "f.bin",
        label="f",
        expected=Expected(sha256=sha(data)),
        policy=policy,
        on_event=events.append,
    )
    assert (tmp_path / "f.bin").read_bytes() == data
    assert server.hits("/f.bin")[1].range == "bytes=120000-"  # asked, got 200: started over
    assert [e.resumed_from for e in events if isinstance(e, FileStarted)] == [0, 0]


def test_a_file_changed_on_the_server_is_not_glued_onto_old_bytes(server, tmp_path) -> None:
    old, new = payload(11), payload(12)
    url = server.serve("/f.bin", old, drop_after=[100_000])

    def publish_new_version(delay: float) -> None:
        """While the downloader backs off, the server's file changes."""
        server.files["/f.bin"].data = new

    policy = RetryPolicy(sleep=publish_new_version)
    fetch(url, tmp_path / "f.bin", label="f", policy=policy)
    assert (tmp_path / "f.bin").read_bytes() == new
    resume = server.hits("/f.bin")[1]
    assert resume.range == "bytes=100000-" and resume.if_range == f'"{sha(old)[:16]}"'
    assert not (tmp_path / "f.bin.part.validator").exists()


def test_a_complete_part_file_is_installed_without_downloading_again(
    server, policy, tmp_path
) -> None:
    data = payload(7)
    url = server.serve("/f.bin", data)
    (tmp_path / "f.bin.part").write_bytes(data)
    fetch(url, tmp_path / "f.bin", label="f", expected=Expected(sha256=sha(data)), policy=policy)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert server.hits("/f.bin")[0].range == f"bytes={SIZE}-"  # answered 416: nothing left


def test_a_size_different_from_the_registry_is_refused(server, policy, tmp_path) -> None:
    url = server.serve("/f.bin", payload(8))
    with pytest.raises(UnreachableError, match="the registry expects 1,000"):
        fetch(url, tmp_path / "f.bin", label="f", expected=Expected(size=1000), policy=policy)


def test_a_download_the_disk_cannot_hold_is_refused(server, policy, tmp_path, monkeypatch) -> None:
    url = server.serve("/f.bin", payload(9))
    monkeypatch.setattr("sfr.hub.download.shutil.disk_usage", lambda path: SimpleNamespace(free=10))
    with pytest.raises(DownloadError, match="Not enough disk space"):
        fetch(url, tmp_path / "f.bin", label="f", policy=policy)


def test_the_mirror_rule_keeps_host_and_path() -> None:
    url = "https://iplab.dmi.unict.it/sharing/rulstm/features/rgb/data.mdb"
    assert (
        mirror_url(url, "http://mirror.lan:8080/sfr/")
        == "http://mirror.lan:8080/sfr/iplab.dmi.unict.it/sharing/rulstm/features/rgb/data.mdb"
    )
    assert (
        mirror_url(url, "https://m.org")
        == "https://m.org/iplab.dmi.unict.it/sharing/rulstm/features/rgb/data.mdb"
    )
    with pytest.raises(SfrError, match="not an http"):
        mirror_url(url, "ftp://m.org")


# --- archives --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "links", "why"),
    [
        ({"ok.txt": b"1", "/abs/evil.txt": b"x"}, (), "absolute path"),
        ({"ok.txt": b"1", "sub/../../evil.txt": b"x"}, (), "'..'"),
        ({"ok.txt": b"1", "C:/evil.txt": b"x"}, (), "absolute path"),
        ({"ok.txt": b"1", "link": b"/etc/passwd"}, ("link",), "symbolic link"),
    ],
)
def test_a_malicious_zip_is_refused_whole(tmp_path, members, links, why) -> None:
    archive = tmp_path / "evil.zip"
    archive.write_bytes(zip_bytes(members, links))
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(DataError, match="Refusing to extract") as raised:
        extract_zip(archive, dest, tmp_path / "box" / "staging")
    assert why in str(raised.value)
    assert list(dest.iterdir()) == [] and not (tmp_path / "box" / "staging").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["box", "dest", "evil.zip"]


def test_a_zip_with_one_top_level_folder_is_extracted_stripped(tmp_path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"egtea/rgb/data.mdb": b"lmdb", "egtea/actions.csv": b"0,a,b\n"}))
    extracted = extract_zip(archive, tmp_path / "data", tmp_path / "staging")
    assert (tmp_path / "data" / "rgb" / "data.mdb").read_bytes() == b"lmdb"
    assert (tmp_path / "data" / "actions.csv").read_bytes() == b"0,a,b\n"
    assert {str(f.relative) for f in extracted} == {"rgb/data.mdb", "actions.csv"}
    assert not (tmp_path / "staging").exists()


def test_extraction_keeps_several_top_level_entries_and_refuses_to_clobber(tmp_path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"x/1.txt": b"1", "2.txt": b"2"}))
    dest = tmp_path / "data"
    extract_zip(archive, dest, tmp_path / "staging")
    assert (dest / "x" / "1.txt").is_file() and (dest / "2.txt").is_file()
    extract_zip(archive, dest, tmp_path / "staging")  # identical files: fine
    (dest / "2.txt").write_bytes(b"mine")
    with pytest.raises(DataError, match="differ"):
        extract_zip(archive, dest, tmp_path / "staging")
    assert (dest / "2.txt").read_bytes() == b"mine"
    extract_zip(archive, dest, tmp_path / "staging", overwrite=True)
    assert (dest / "2.txt").read_bytes() == b"2"


# --- installing artefacts (core) -------------------------------------------------------------


class FakeConverter:
    """Stands in for `sfr.hub.convert.install_published`: records calls, writes a file."""

    def __init__(self) -> None:
        """No calls yet."""
        self.calls: list[dict[str, object]] = []

    def __call__(
        self,
        checkpoint: Path,
        *,
        dataset: str,
        modality: str,
        task: str,
        runs_dir: Path,
        source_sha256: str,
        force: bool = False,
    ) -> Path:
        """Record the call and write a stand-in converted checkpoint; its path."""
        self.calls.append(
            {
                "checkpoint": checkpoint,
                "dataset": dataset,
                "modality": modality,
                "task": task,
                "runs_dir": runs_dir,
                "source_sha256": source_sha256,
                "force": force,
            }
        )
        out = runs_dir / dataset / f"{modality}-{task}" / "best.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"converted")
        return out


def test_the_converter_seam_receives_each_published_checkpoint(server, policy, tmp_path) -> None:
    artefacts = REGISTRY.pretrained("ek55", "early_recognition")
    served = serve_artefacts(server, [a.name for a in artefacts])
    steps = plan(artefacts, Folders(runs=tmp_path / "runs"), base_url=server.mirror)
    converter = FakeConverter()
    report = install(steps, policy=policy, converter=converter)
    assert report.converted == [a.name for a in artefacts]
    rgb = converter.calls[0]
    assert rgb["checkpoint"] == tmp_path / "runs" / artefacts[0].dest
    assert (rgb["dataset"], rgb["modality"], rgb["task"]) == ("ek55", "rgb", "early_recognition")
    assert rgb["runs_dir"] == tmp_path / "runs"
    assert rgb["source_sha256"] == sha(served["rulstm-ek55-early-rgb"])
    entry = load_manifest(tmp_path / "runs").artefacts["rulstm-ek55-early-rgb"]
    assert entry.converted == "ek55/rgb-early_recognition/best.safetensors"


# --- the CLI ---------------------------------------------------------------------------------


def test_annotations_are_installed_recorded_and_never_fetched_twice(cli, server, tmp_path) -> None:
    names = [a.name for a in REGISTRY.annotations("ek55")]
    served = serve_artefacts(server, names)
    data = tmp_path / "ek55"
    code, output, _ = cli(
        "download", "annotations", "ek55", "--data", data, "--base-url", server.mirror
    )
    assert code == 0, output
    for name in names:
        artefact = REGISTRY.get(name)
        assert (data / artefact.dest).read_bytes() == served[name]
    manifest = json.loads((data / MANIFEST_NAME).read_text())
    entry = manifest["artefacts"]["ek55-annotations-actions"]
    assert entry["sha256"] == sha(served["ek55-annotations-actions"])
    assert entry["url"].startswith(server.mirror) and entry["downloaded_at"]
    assert entry["files"] == {"actions.csv": {"size": 2_000, "sha256": entry["sha256"]}}
    before = len(server.hits())
    code, output, _ = cli(
        "download", "annotations", "ek55", "--data", data, "--base-url", server.mirror
    )
    assert code == 0, output
    assert len(server.hits()) == before
    assert output.count("already installed, skipped") == len(names)


def test_a_404_through_the_cli_names_the_artefact_and_the_address(cli, server, tmp_path) -> None:
    mirrored = mirror_url(REGISTRY.get("egtea-features").url, server.mirror)
    result = cli("download", "features", "egtea", "--data", tmp_path, "--base-url", server.mirror)
    assert_user_error(*result, "egtea-features", mirrored, "404")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sfr-downloads"]
    left = [p for p in (tmp_path / ".sfr-downloads").rglob("*") if p.is_file()]
    assert all(p.parent.name == "locks" and p.suffix == ".lock" for p in left), left


def test_sfr_mirror_environment_variable_points_downloads_at_a_mirror(
    cli, server, tmp_path, monkeypatch
) -> None:
    served = serve_artefacts(server, ["ek55-features-obj"])
    monkeypatch.setenv("SFR_MIRROR", server.mirror)
    code, output, _ = cli("download", "features", "ek55", "--modality", "obj", "--data", tmp_path)
    assert code == 0, output
    assert (tmp_path / "obj" / "data.mdb").read_bytes() == served["ek55-features-obj"]
    assert (
        server.hits()[0].path == "/mirror/iplab.dmi.unict.it/sharing/rulstm/features/obj/data.mdb"
    )


def test_sparse_and_full_stores_share_a_place_and_need_force(cli, server, tmp_path) -> None:
    served = serve_artefacts(server, ["ek55-features-rgb", "ek55-features-rgb-full"])
    base = ("--data", tmp_path, "--base-url", server.mirror)
    assert cli("download", "features", "ek55", "rgb", *base)[0] == 0
    result = cli("download", "features", "ek55", "--modality", "rgb", "--full", *base)
    assert_user_error(*result, "ek55-features-rgb (sparse)", "--force")
    assert (tmp_path / "rgb" / "data.mdb").read_bytes() == served["ek55-features-rgb"]
    code, output, _ = cli("download", "features", "ek55", "-m", "rgb", "--full", "--force", *base)
    assert code == 0, output
    assert (tmp_path / "rgb" / "data.mdb").read_bytes() == served["ek55-features-rgb-full"]
    manifest = load_manifest(tmp_path)
    assert set(manifest.artefacts) == {"ek55-features-rgb-full"}
    assert manifest.artefacts["ek55-features-rgb-full"].variant == "full"


def test_a_file_not_installed_by_sfr_is_not_overwritten(cli, server, tmp_path) -> None:
    serve_artefacts(server, ["ek55-features-flow"])
    (tmp_path / "flow").mkdir()
    (tmp_path / "flow" / "data.mdb").write_bytes(b"mine")
    result = cli(
        "download", "features", "ek55", "flow", "--data", tmp_path, "--base-url", server.mirror
    )
    assert_user_error(*result, "not installed by sfr download")
    assert (tmp_path / "flow" / "data.mdb").read_bytes() == b"mine" and not server.hits()


def test_egtea_zip_is_extracted_stripped_recorded_and_verified(cli, server, tmp_path) -> None:
    members = {"egtea/TSN-s1-rgb/data.mdb": payload(10, 5_000), "egtea/TSN-s1-flow/data.mdb": b"f"}
    server.serve_mirrored(REGISTRY.get("egtea-features").url, zip_bytes(members))
    code, output, _ = cli(
        "download", "features", "egtea", "--data", tmp_path, "--base-url", server.mirror
    )
    assert code == 0, output
    assert (tmp_path / "TSN-s1-rgb" / "data.mdb").read_bytes() == payload(10, 5_000)
    assert not (tmp_path / ".sfr-downloads" / "egtea.zip").exists()  # deleted after use
    entry = load_manifest(tmp_path).artefacts["egtea-features"]
    assert set(entry.files) == {"TSN-s1-rgb/data.mdb", "TSN-s1-flow/data.mdb"}
    assert cli("download", "verify", "--data", tmp_path)[0] == 0


def test_a_malicious_zip_through_the_cli_extracts_nothing(cli, server, tmp_path) -> None:
    data = tmp_path / "box" / "egtea"
    archive = zip_bytes({"fine.txt": b"1", "../../escaped.txt": b"x"})
    server.serve_mirrored(REGISTRY.get("egtea-features").url, archive)
    result = cli("download", "features", "egtea", "--data", data, "--base-url", server.mirror)
    assert_user_error(*result, "Refusing to extract", "'..'")
    assert not list(tmp_path.rglob("escaped.txt")) and not (data / "fine.txt").exists()
    assert not (data / MANIFEST_NAME).exists()


def test_verify_detects_a_tampered_and_a_missing_file(cli, server, tmp_path) -> None:
    serve_artefacts(server, [a.name for a in REGISTRY.annotations("egtea")])
    assert (
        cli("download", "annotations", "egtea", "--data", tmp_path, "--base-url", server.mirror)[0]
        == 0
    )
    code, output, _ = cli("download", "verify", "--data", tmp_path)
    assert code == 0 and "All 7 installed files match" in output
    tampered = tmp_path / "training1.csv"
    content = bytearray(tampered.read_bytes())
    content[10] ^= 0xFF
    tampered.write_bytes(bytes(content))
    (tmp_path / "validation2.csv").unlink()
    result = cli("download", "verify", "--data", tmp_path)
    assert_user_error(
        *result, "2 of 7", "egtea-annotations-training1", "egtea-annotations-validation2"
    )
    assert "sha256 mismatch" in result[1] and "missing" in result[1]


def test_verify_without_any_manifest_says_so(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_user_error(*cli("download", "verify"), "Nothing to verify")
    assert_user_error(*cli("download", "verify", "--runs", tmp_path), "has no download manifest")


def test_dry_run_fetches_nothing_and_shows_sizes(cli, server, tmp_path) -> None:
    serve_artefacts(server, ["ek55-features-rgb", "ek55-features-flow"])
    code, output, _ = cli(
        "download", "features", "ek55", "--modality", "rgb,flow", "--data", tmp_path,
        "--base-url", server.mirror, "--dry-run",
    )  # fmt: skip
    assert code == 0, output
    assert "ek55-features-rgb" in output and "ek55-features-flow" in output
    assert "~6.1 GB" in output and "unknown" in output
    assert server.requests == [] and list(tmp_path.iterdir()) == []


def test_dry_run_with_check_size_asks_with_head_only(cli, server, tmp_path) -> None:
    serve_artefacts(server, ["tsn-rgb"])
    code, output, _ = cli(
        "download", "get", "tsn-rgb", "--runs", tmp_path, "--base-url", server.mirror,
        "--dry-run", "--check-size",
    )  # fmt: skip
    assert code == 0, output
    assert "2.0 kB" in output
    assert [r.method for r in server.requests] == ["HEAD"] and list(tmp_path.iterdir()) == []


def test_pretrained_checkpoints_are_fetched_then_converted_once(
    cli, server, tmp_path, monkeypatch
) -> None:
    converter = FakeConverter()
    monkeypatch.setattr(install_module, "convert_published", converter)
    names = [a.name for a in REGISTRY.pretrained("ek100")]
    serve_artefacts(server, names)
    runs = tmp_path / "runs"
    args = ("download", "pretrained", "rulstm-ek100", "--runs", runs, "--base-url", server.mirror)
    code, output, _ = cli(*args)
    assert code == 0, output
    assert [c["modality"] for c in converter.calls] == ["rgb", "flow", "obj", "fusion"]
    assert (
        runs / "ek100" / "published" / "RULSTM-anticipation_0.25_6_8_fusion_mt5r_best.pth.tar"
    ).is_file()
    requests_before = len(server.hits())
    code, output, _ = cli(*args)
    assert code == 0 and len(server.hits()) == requests_before and len(converter.calls) == 4
    assert not any(call["force"] for call in converter.calls)
    # --force downloads again and replaces the conversions of the earlier download
    code, output, _ = cli(*args, "--force")
    assert code == 0, output
    assert len(converter.calls) == 8 and all(call["force"] for call in converter.calls[4:])


def test_a_golden_published_checkpoint_goes_through_the_real_converter(
    cli, server, tmp_path
) -> None:
    golden = (
        Path(__file__).parent / "data" / "golden" / "rulstm_rgb_a0.25_6_8" / "checkpoint.pth.tar"
    )
    server.serve_mirrored(REGISTRY.get("rulstm-ek55-anticipation-rgb").url, golden.read_bytes())
    args = ("--runs", tmp_path, "--base-url", server.mirror)
    code, output, _ = cli("download", "get", "rulstm-ek55-anticipation-rgb", *args)
    assert code == 0, output
    entry = load_manifest(tmp_path).artefacts["rulstm-ek55-anticipation-rgb"]
    assert entry.converted == "ek55/rgb-a0.25-enc6-ant8/finetune/best.safetensors"
    assert (tmp_path / entry.converted).is_file()
    assert cli("download", "verify", "--runs", tmp_path)[0] == 0


def test_a_failed_conversion_is_retried_without_downloading_again(
    cli, server, tmp_path, monkeypatch
) -> None:
    def broken(checkpoint: Path, **kwargs: object) -> Path:
        """A converter that fails."""
        raise SfrError(f"cannot convert {checkpoint}")

    monkeypatch.setattr(install_module, "convert_published", broken)
    serve_artefacts(server, ["rulstm-ek55-anticipation-rgb"])
    args = (
        "download",
        "get",
        "rulstm-ek55-anticipation-rgb",
        "--runs",
        tmp_path,
        "--base-url",
        server.mirror,
    )
    assert_user_error(*cli(*args), "cannot convert")
    converter = FakeConverter()
    monkeypatch.setattr(install_module, "convert_published", converter)
    code, output, _ = cli(*args)
    assert code == 0, output
    # one download and its proof of the end (a 416 at the size); nothing after the failure
    assert len(server.hits()) == 2 and len(converter.calls) == 1


def test_list_shows_every_artefact_and_what_is_present(cli, server, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    serve_artefacts(server, ["ek55-annotations-actions"])
    assert cli("download", "get", "ek55-annotations-actions", "--base-url", server.mirror)[0] == 0
    assert (tmp_path / "data" / "ek55" / "actions.csv").is_file()
    code, output, _ = cli("download", "list")
    assert code == 0, output
    for name in REGISTRY.names:
        assert name in output
    row = next(line for line in output.splitlines() if "ek55-annotations-actions" in line)
    assert "yes" in row
    code, output, _ = cli("download", "list", "--urls")
    assert code == 0 and REGISTRY.get("slowfast-r50-kinetics").url in output.splitlines()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("annotations", "ek99"), ("ek99", "ek55, ek100, egtea")),
        (("features", "ek55", "--modality", "depth"), ("depth", "rgb, flow, obj")),
        (("features", "egtea", "--full"), ("one archive",)),
        (("pretrained", "rulstm-egtea"), ("rulstm-ek100, rulstm-ek55",)),
        (("pretrained", "rulstm-ek100", "--task", "early_recognition"), ("anticipation",)),
        (("get", "tsn-depth"), ("tsn-rgb",)),
        (("get", "tsn-rgb", "--check-size"), ("--dry-run",)),
    ],
)
def test_unknown_names_and_bad_options_are_user_errors(cli, tmp_path, args, needles) -> None:
    assert_user_error(
        *cli("download", *args, "--data" if args[0] != "pretrained" else "--runs", tmp_path),
        *needles,
    )


# --- completeness: a file is installed only when the server proved its end ------------------


def test_a_body_without_length_cut_short_is_resumed_and_its_end_proven(
    server, policy, tmp_path
) -> None:
    data = payload(20)
    url = server.serve("/f.bin", data, length=False, drop_after=[100_000])
    fetched = fetch(url, tmp_path / "f.bin", label="f", policy=policy)
    assert (tmp_path / "f.bin").read_bytes() == data and fetched.size == SIZE
    # the cut body was not taken as the file: resumed, then the end proven by a 416 at SIZE
    assert [r.range for r in server.hits("/f.bin")] == [None, "bytes=100000-", f"bytes={SIZE}-"]


def test_a_cut_body_without_length_or_ranges_is_never_installed(server, policy, tmp_path) -> None:
    url = server.serve("/f.bin", payload(21), length=False, ranges=False, drop_after=[100_000])
    with pytest.raises(DownloadError, match="cannot be told from a cut one"):
        fetch(url, tmp_path / "f.bin", label="f", policy=policy)
    assert not (tmp_path / "f.bin").exists()


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"length": False, "total_in_416": False}, "without saying the size"),
        ({"length_delta": 1_000}, "starting this file again"),  # body shorter than announced
        ({"length_delta": -1_000}, "the size changed"),  # body longer than announced
        ({"etag_per_answer": True}, "the ETag changed"),
    ],
    ids=["416-without-size", "length-too-long", "length-too-short", "etag-per-answer"],
)
def test_a_server_that_cannot_prove_the_end_never_gets_a_file_installed(
    server, policy, tmp_path, fault, reason
) -> None:
    url = server.serve("/f.bin", payload(22), **fault)
    events = []
    with pytest.raises(UnreachableError, match="failed 4 times in a row"):
        fetch(url, tmp_path / "f.bin", label="f", policy=policy, on_event=events.append)
    reasons = [e.reason for e in events if isinstance(e, RetryScheduled)]
    assert any(reason in r for r in reasons), reasons
    assert not (tmp_path / "f.bin").exists()


@pytest.mark.parametrize(
    "fault",
    [
        {"range_start_delta": 5},
        {"range_total_delta": 7},
        {"range_length_delta": -3},
        {"range_extra_bytes": 10, "length": False},
    ],
    ids=["range-starts-elsewhere", "range-total-differs", "range-length-differs", "range-too-long"],
)
def test_a_resume_answered_with_an_inconsistent_range_starts_the_file_again(
    server, policy, tmp_path, fault
) -> None:
    data = payload(23)
    url = server.serve("/f.bin", data, drop_after=[100_000], **fault)
    fetch(url, tmp_path / "f.bin", label="f", policy=policy)
    assert (tmp_path / "f.bin").read_bytes() == data
    ranges = [r.range for r in server.hits("/f.bin")]
    assert ranges == [None, "bytes=100000-", None, f"bytes={SIZE}-"]  # restarted, then proven


def test_a_server_cutting_every_copy_at_the_same_place_fails_after_the_retries(
    server, policy, tmp_path
) -> None:
    data = payload(36)
    url = server.serve("/f.bin", data, length=False, ranges=False, drop_after=[100_000] * 20)
    with pytest.raises(UnreachableError, match="no bytes beyond the 100,000 held"):
        fetch(
            url, tmp_path / "f.bin", label="f", expected=Expected(sha256=sha(data)), policy=policy
        )
    assert not (tmp_path / "f.bin").exists() and len(server.hits("/f.bin")) == 5


def test_an_encoded_body_is_refused(server, policy, tmp_path) -> None:
    url = server.serve("/f.bin", payload(37), content_encoding="gzip")
    with pytest.raises(UnreachableError, match="Content-Encoding 'gzip'"):
        fetch(url, tmp_path / "f.bin", label="f", policy=policy)
    assert not (tmp_path / "f.bin").exists()


def test_a_full_disk_during_a_download_is_a_message(server, policy, tmp_path, monkeypatch) -> None:
    url = server.serve("/f.bin", payload(38)).replace("http://", "http://u:pw@")

    def full(path: Path, mode: str) -> object:
        """A disk that is full for writing."""
        if mode != "rb":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return open(path, mode)

    monkeypatch.setattr("sfr.hub.download.open_regular", full)
    with pytest.raises(DownloadError) as raised:
        fetch(url, tmp_path / "f.bin", label="thing", policy=policy)
    text = str(raised.value)
    assert "thing" in text and "No space left on device" in text and "f.bin.part" in text
    assert public_address(url) in text and "pw@" not in text
    assert not (tmp_path / "f.bin").exists()


@pytest.mark.parametrize("ranges", [True, False], ids=["ranges", "no-ranges"])
def test_a_chunked_body_cut_before_its_last_chunk_is_never_taken_whole(
    server, policy, tmp_path, ranges
) -> None:
    data = payload(41)
    url = server.serve("/f.bin", data, chunked=True, ranges=ranges, drop_after=[100_000])
    events = []
    fetch(url, tmp_path / "f.bin", label="f", policy=policy, on_event=events.append)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert next(e.reason for e in events if isinstance(e, RetryScheduled)).startswith(
        "connection broken"
    )
    # resumed (or restarted, without ranges), then the end confirmed: a 416 at the size, or
    # the whole-file answer of a server ignoring ranges after a body that ended with its last
    # chunk
    assert [r.range for r in server.hits("/f.bin")][-1] == f"bytes={SIZE}-"


def test_a_server_ignoring_ranges_proves_the_end_with_its_length(server, policy, tmp_path) -> None:
    data = payload(24)
    url = server.serve("/f.bin", data, ranges=False)
    fetch(url, tmp_path / "f.bin", label="f", policy=policy)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert [r.range for r in server.hits("/f.bin")] == [None, f"bytes={SIZE}-"]


def test_a_file_changed_between_the_download_and_the_proof_is_fetched_again(
    server, policy, tmp_path
) -> None:
    old, new = payload(25), payload(26)
    url = server.serve("/f.bin", old)
    received = []

    def publish_new_version(event: object) -> None:
        """Once the old version is fully received, the server's file changes."""
        if isinstance(event, BytesReceived):
            received.append(event.count)
            if sum(received) == SIZE:
                server.files["/f.bin"].data = new

    fetch(url, tmp_path / "f.bin", label="f", policy=policy, on_event=publish_new_version)
    assert (tmp_path / "f.bin").read_bytes() == new


def test_without_validators_or_digest_a_cut_file_is_fetched_whole_again(
    server, policy, tmp_path
) -> None:
    """No ETag, no Last-Modified, no published digest: a resume could join two versions of a
    file of the same size, so the file is asked for whole again."""
    old, new = payload(41), payload(42)
    url = server.serve("/f.bin", old, validators=False, drop_after=[10_000])

    def publish_new_version(event: object) -> None:
        if isinstance(event, BytesReceived):
            server.files["/f.bin"].data = new  # changes while the first copy is cut

    fetch(url, tmp_path / "f.bin", label="f", policy=policy, on_event=publish_new_version)
    assert (tmp_path / "f.bin").read_bytes() == new
    assert [r.range for r in server.hits("/f.bin")][:2] == [None, None]


def test_a_part_longer_than_the_file_is_thrown_away(server, policy, tmp_path) -> None:
    data = payload(27)
    url = server.serve("/f.bin", data)
    (tmp_path / "f.bin.part").write_bytes(data + b"extra")
    fetch(url, tmp_path / "f.bin", label="f", policy=policy)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_a_truncating_server_without_length_through_the_cli(cli, server, tmp_path) -> None:
    name = "ek55-features-obj"
    data = payload(28)
    url = REGISTRY.get(name).url
    server.serve_mirrored(url, data, length=False, ranges=False, drop_after=[100_000])
    args = ("download", "get", name, "--data", tmp_path, "--base-url", server.mirror)
    assert_user_error(*cli(*args), name, mirror_url(url, server.mirror), "cut one")
    assert not (tmp_path / "obj" / "data.mdb").exists()
    assert not load_manifest(tmp_path).artefacts
    # the same server answering ranges: resumed, proven, installed and verified
    server.serve_mirrored(url, data, length=False, drop_after=[100_000])
    code, output, _ = cli(*args)
    assert code == 0, output
    assert (tmp_path / "obj" / "data.mdb").read_bytes() == data
    assert load_manifest(tmp_path).artefacts[name].sha256 == sha(data)
    assert cli("download", "verify", "--data", tmp_path)[0] == 0


def test_a_part_left_by_another_variant_is_not_resumed(cli, server, tmp_path) -> None:
    sparse, full = payload(39, 50_000), payload(40, 50_000)
    # no validators and the same size: only the record of whose bytes they are tells them apart
    server.serve_mirrored(
        REGISTRY.get("ek55-features-rgb").url, sparse, validators=False, drop_after=[1_000]
    )
    server.serve_mirrored(REGISTRY.get("ek55-features-rgb-full").url, full, validators=False)
    base = ("--data", tmp_path, "--base-url", server.mirror, "--retries", "0")
    assert cli("download", "features", "ek55", "rgb", *base)[0] == 2
    assert (tmp_path / "rgb" / "data.mdb.part").stat().st_size == 1_000
    code, output, _ = cli("download", "features", "ek55", "rgb", "--full", *base)
    assert code == 0, output
    assert (tmp_path / "rgb" / "data.mdb").read_bytes() == full


# --- recorded digests are no trust anchor ---------------------------------------------------


def test_force_replaces_a_recorded_digest_and_says_so(cli, server, tmp_path) -> None:
    name = "ek55-annotations-actions"
    url = REGISTRY.get(name).url
    first, second = payload(30, 2_000), payload(31, 2_100)
    server.serve_mirrored(url, first)
    args = ("download", "get", name, "--data", tmp_path, "--base-url", server.mirror)
    assert cli(*args)[0] == 0
    server.serve_mirrored(url, second)  # changed upstream (or the first download was wrong)
    code, output, _ = cli(*args, "--force")
    assert code == 0, output
    assert "differs from the earlier download" in output
    entry = load_manifest(tmp_path).artefacts[name]
    assert entry.sha256 == sha(second) and entry.digest_from == "first download"
    # a re-download of a file that went missing locally is not held to the old digest either
    (tmp_path / "actions.csv").unlink()
    server.serve_mirrored(url, first)
    code, output, _ = cli(*args)
    assert code == 0, output
    assert (tmp_path / "actions.csv").read_bytes() == first
    code, output, _ = cli("download", "verify", "--data", tmp_path)
    assert code == 0 and "first download" in output
    assert "not that the download was the published file" in output


# --- install + record is one recoverable step -----------------------------------------------

KILL_SCRIPT = """
import os, signal, sys
import {module} as target

original = target.{name}


def killed(*args, **kwargs):
    if {after}:
        original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)


target.{name} = killed
from sfr.cli.app import app

app(sys.argv[1:], prog_name="sfr")
"""


def run_killed(tmp_path: Path, where: str, *args: object, after: bool = False) -> int:
    """Run `sfr *args` in a new process that kills itself (SIGKILL) when `where` is called."""
    module, name = where.rsplit(".", 1)
    script = tmp_path / "killed.py"
    script.write_text(KILL_SCRIPT.format(module=module, name=name, after=after))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, str(script), *map(str, args)], env=env, capture_output=True, timeout=120
    )
    return done.returncode


def test_a_kill_between_rename_and_record_is_recovered_on_the_next_run(
    cli, server, tmp_path
) -> None:
    name = "ek55-features-flow"
    served = serve_artefacts(server, [name])
    data = tmp_path / "data"
    args = ("download", "get", name, "--data", data, "--base-url", server.mirror)
    code = run_killed(tmp_path, "sfr.hub.install.record", *args)
    assert code == -signal.SIGKILL
    assert (data / "flow" / "data.mdb").read_bytes() == served[name]
    assert name not in load_manifest(data).artefacts and name in load_manifest(data).pending
    assert_user_error(
        *cli("download", "verify", "--data", data), "interrupted", name, "without --force"
    )
    requests_before = len(server.hits())
    code, output, _ = cli(*args)
    assert code == 0, output
    assert "interrupted run" in output and len(server.hits()) == requests_before
    assert not load_manifest(data).pending
    assert load_manifest(data).artefacts[name].sha256 == sha(served[name])
    assert cli("download", "verify", "--data", data)[0] == 0


def test_a_kill_before_the_rename_resumes_the_verified_part(cli, server, tmp_path) -> None:
    name = "ek55-features-flow"
    served = serve_artefacts(server, [name])
    args = ("download", "get", name, "--data", tmp_path, "--base-url", server.mirror)
    assert run_killed(tmp_path, "sfr.hub.install.record_pending", *args, after=True) != 0
    assert not (tmp_path / "flow" / "data.mdb").exists()
    code, output, _ = cli(*args)
    assert code == 0, output
    assert (tmp_path / "flow" / "data.mdb").read_bytes() == served[name]
    assert not load_manifest(tmp_path).pending


def test_an_interrupted_zip_install_is_adopted(cli, server, tmp_path, monkeypatch) -> None:
    members = {"egtea/a/data.mdb": payload(32, 3_000), "egtea/b.csv": b"1,2\n"}
    server.serve_mirrored(REGISTRY.get("egtea-features").url, zip_bytes(members))
    args = ("download", "features", "egtea", "--data", tmp_path, "--base-url", server.mirror)

    def killed(*args: object, **kwargs: object) -> None:
        """Stands in for the process dying after the files are in place."""
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(install_module, "record", killed)
        assert cli(*args)[0] == 130
    assert (tmp_path / "a" / "data.mdb").is_file() and "egtea-features" in load_manifest(
        tmp_path
    ).pending
    requests_before = len(server.hits())
    code, output, _ = cli(*args)
    assert code == 0, output
    assert "recovered 1" in output and len(server.hits()) == requests_before
    assert set(load_manifest(tmp_path).artefacts["egtea-features"].files) == {"a/data.mdb", "b.csv"}


def test_a_pending_file_that_does_not_match_is_fetched_again(cli, server, tmp_path) -> None:
    name = "ek55-features-flow"
    served = serve_artefacts(server, [name])
    args = ("download", "get", name, "--data", tmp_path, "--base-url", server.mirror)
    assert run_killed(tmp_path, "sfr.hub.install.record", *args) == -signal.SIGKILL
    target = tmp_path / "flow" / "data.mdb"
    target.write_bytes(bytes(len(served[name])))  # same size, other bytes
    code, output, _ = cli(*args)
    assert code == 0, output
    assert target.read_bytes() == served[name] and not load_manifest(tmp_path).pending


# --- one writer per destination and per manifest --------------------------------------------

HOLD_LOCK = """
import sys
from pathlib import Path
from sfr.hub.safefiles import DestinationLock

with DestinationLock(Path(sys.argv[1]), "test"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_process_is_refused_while_another_holds_the_destination(
    cli, server, tmp_path
) -> None:
    name = "ek55-features-rgb"
    served = serve_artefacts(server, [name])
    steps = plan([REGISTRY.get(name)], Folders(data=tmp_path), base_url=server.mirror)
    lock = install_module.destination_lock(steps[0]).path
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ("download", "get", name, "--data", tmp_path, "--base-url", server.mirror)
        result = cli(*args)
        assert_user_error(*result, str(lock), f"pid {holder.pid}", "another sfr process")
        # the full store installs at the same place: the same lock
        full = ("download", "features", "ek55", "rgb", "--full", "--data", tmp_path)
        assert_user_error(*cli(*full, "--base-url", server.mirror), str(lock))
        assert not server.hits() and not (tmp_path / "rgb").exists()
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait()
    code, output, _ = cli(*args)
    assert code == 0, output
    assert (tmp_path / "rgb" / "data.mdb").read_bytes() == served[name]


def test_concurrent_records_keep_every_entry(tmp_path) -> None:
    def entry(name: str) -> ManifestEntry:
        """A manifest entry for a made-up file."""
        digest = sha(name.encode())
        return ManifestEntry(
            name=name,
            url="http://example.org/x",
            path=name,
            size=1,
            sha256=digest,
            downloaded_at="2026-01-01T00:00:00+00:00",
            files={name: InstalledFile(size=1, sha256=digest)},
        )

    def writer(prefix: str) -> None:
        """Record several entries, one rewrite each."""
        for index in range(15):
            record(tmp_path, entry(f"{prefix}{index}"))

    threads = [threading.Thread(target=writer, args=(p,)) for p in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(load_manifest(tmp_path).artefacts) == 45


# --- zip archives are planned before anything is written ------------------------------------


def zip_with_duplicates() -> bytes:
    """A zip holding two members of the same name."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        with zipfile.ZipFile(buffer, "w") as bundle:
            bundle.writestr("data/x.mdb", b"one")
            bundle.writestr("data/x.mdb", b"two")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("archive", "why"),
    [
        (zip_with_duplicates, "appears twice"),
        (lambda: zip_bytes({"A/x.csv": b"1", "a/x.csv": b"2"}), "case-insensitive"),
        (lambda: zip_bytes({"x": b"1", "x/y.csv": b"2"}), "needs a folder"),
        (lambda: zip_bytes({"top/": b"", "top": b"2", "z": b"3"}), "both a file and a folder"),
        (lambda: zip_bytes({"caf\u00e9.csv": b"1", "cafe\u0301.csv": b"2"}), "case-insensitive"),
        (
            lambda: zip_bytes({"top/x.mdb": b"1", "top/.sfr-manifest.json": b"garbage"}),
            "sfr's own bookkeeping",
        ),
        (
            lambda: zip_bytes({"x.mdb": b"1", ".SFR-downloads/locks/dest-x.lock": b""}),
            "sfr's own bookkeeping",
        ),
    ],
    ids=[
        "duplicate",
        "case",
        "file-vs-folder",
        "folder-entry-vs-file",
        "unicode-forms",
        "manifest-member",
        "staging-member",
    ],
)
def test_zips_with_clashing_members_extract_nothing(tmp_path, archive, why) -> None:
    path = tmp_path / "a.zip"
    path.write_bytes(archive())
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=why):
        extract_zip(path, dest, tmp_path / "staging")
    assert not dest.exists() and not (tmp_path / "staging").exists()


@pytest.mark.parametrize("kind", ["folder", "link"])
def test_a_member_whose_target_is_a_folder_or_a_link_moves_nothing(tmp_path, kind) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"a.csv": b"1", "b.csv": b"2"}))
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside.csv"
    outside.write_bytes(b"precious")
    if kind == "folder":
        (dest / "b.csv").mkdir()
    else:
        (dest / "b.csv").symlink_to(outside)
    with pytest.raises(DataError, match="a folder" if kind == "folder" else "symbolic link"):
        extract_zip(archive, dest, tmp_path / "staging", overwrite=True)
    assert not (dest / "a.csv").exists() and outside.read_bytes() == b"precious"


def test_a_zip_bomb_is_refused_before_writing(tmp_path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("zeros.bin", bytes(8 << 20))
    (tmp_path / "a.zip").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match="more than 100 times"):
        extract_zip(tmp_path / "a.zip", tmp_path / "dest", tmp_path / "staging")
    assert not (tmp_path / "dest").exists() and not (tmp_path / "staging").exists()


def test_a_zip_larger_than_the_free_space_is_refused(tmp_path, monkeypatch) -> None:
    (tmp_path / "a.zip").write_bytes(zip_bytes({"x.bin": payload(33, 5_000)}))
    monkeypatch.setattr(
        "sfr.hub.archive.shutil.disk_usage", lambda path: SimpleNamespace(free=1_000)
    )
    with pytest.raises(DataError, match="Not enough disk space to extract"):
        extract_zip(tmp_path / "a.zip", tmp_path / "dest", tmp_path / "staging")
    assert not (tmp_path / "dest").exists()


def test_a_disk_error_while_extracting_is_a_message(cli, server, tmp_path, monkeypatch) -> None:
    server.serve_mirrored(REGISTRY.get("egtea-features").url, zip_bytes({"x.bin": b"123"}))

    def full(path: Path, mode: str) -> object:
        """A disk that is full."""
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("sfr.hub.archive.open_regular", full)
    result = cli("download", "features", "egtea", "--data", tmp_path, "--base-url", server.mirror)
    assert_user_error(*result, "No space left on device", "egtea.zip")
    assert not (tmp_path / "x.bin").exists() and not load_manifest(tmp_path).artefacts


def test_a_zip_with_duplicate_members_through_the_cli(cli, server, tmp_path) -> None:
    server.serve_mirrored(REGISTRY.get("egtea-features").url, zip_with_duplicates())
    args = ("download", "features", "egtea", "--data", tmp_path, "--base-url", server.mirror)
    for _ in range(2):  # a rerun refuses the same way (the verified archive is kept)
        assert_user_error(*cli(*args), "appears twice", "Nothing was extracted")
    assert not (tmp_path / "x.mdb").exists() and not (tmp_path / MANIFEST_NAME).exists()
    server.serve_mirrored(REGISTRY.get("egtea-features").url, zip_bytes({"x.mdb": b"ok"}))
    code, output, _ = cli(*args, "--force")  # --force fetches the archive again
    assert code == 0, output
    assert (tmp_path / "x.mdb").read_bytes() == b"ok"


# --- never through a link -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".part", ".part.validator", ""])
def test_a_link_where_sfr_writes_is_refused_and_its_target_untouched(
    cli, server, tmp_path, suffix
) -> None:
    name = "ek55-features-obj"
    serve_artefacts(server, [name])
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    data = tmp_path / "data"
    (data / "obj").mkdir(parents=True)
    (data / "obj" / f"data.mdb{suffix}").symlink_to(outside)
    result = cli("download", "get", name, "--data", data, "--base-url", server.mirror, "--force")
    assert_user_error(*result, f"data.mdb{suffix}", "symbolic link")
    assert outside.read_bytes() == b"precious"
    assert (data / "obj" / f"data.mdb{suffix}").is_symlink()


def test_a_fifo_at_the_part_file_is_refused_without_blocking(server, policy, tmp_path) -> None:
    url = server.serve("/f.bin", payload(34))
    os.mkfifo(tmp_path / "f.bin.part")
    with pytest.raises(SfrError, match="named pipe"):
        fetch(url, tmp_path / "f.bin", label="f", policy=policy)
    assert not server.hits()


def test_a_link_at_the_lock_or_the_manifest_is_refused(cli, server, tmp_path) -> None:
    name = "ek55-features-obj"
    serve_artefacts(server, [name])
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    data = tmp_path / "data"
    (data / ".sfr-downloads" / "locks").mkdir(parents=True)
    (data / MANIFEST_NAME).symlink_to(outside)
    args = ("download", "get", name, "--data", data, "--base-url", server.mirror)
    assert_user_error(*cli(*args), MANIFEST_NAME, "symbolic link")
    (data / MANIFEST_NAME).unlink()
    (data / ".sfr-downloads" / "locks" / "manifest.lock").symlink_to(outside)
    assert_user_error(*cli(*args), "manifest.lock", "symbolic link")
    assert outside.read_bytes() == b"precious"


def test_verify_reports_an_installed_file_replaced_by_a_link(cli, server, tmp_path) -> None:
    name = "ek55-annotations-actions"
    serve_artefacts(server, [name])
    assert cli("download", "get", name, "--data", tmp_path, "--base-url", server.mirror)[0] == 0
    installed = tmp_path / "actions.csv"
    copy = tmp_path / "copy.csv"
    copy.write_bytes(installed.read_bytes())
    installed.unlink()
    installed.symlink_to(copy)
    result = cli("download", "verify", "--data", tmp_path)
    assert_user_error(*result, name)
    assert "not a regular file" in result[1]


# --- addresses never carry credentials ------------------------------------------------------


def test_credentials_in_the_mirror_address_are_never_recorded_or_printed(
    cli, server, tmp_path
) -> None:
    name = "ek55-annotations-actions"
    serve_artefacts(server, [name])
    secret_mirror = server.mirror.replace("http://", "http://user:s3cret@")
    args = ("download", "get", name, "--data", tmp_path, "--base-url", secret_mirror)
    code, output, _ = cli(*args, "--dry-run")
    assert code == 0 and "s3cret" not in output and server.mirror in output
    for malformed in ("http://user:s3cret@[::1", "http://user:s3cret@host:99999/x"):
        bad = ("download", "get", name, "--data", tmp_path, "--base-url", malformed)
        code, output, error = cli(*bad)
        assert_user_error(code, output, error, "is not an http(s) URL")
        assert "s3cret" not in output
    code, output, _ = cli(*args)
    assert code == 0 and "s3cret" not in output
    manifest = (tmp_path / MANIFEST_NAME).read_text()
    assert "s3cret" not in manifest and "user@" not in manifest
    assert load_manifest(tmp_path).artefacts[name].url.startswith(server.mirror)
    missing = ("download", "get", "ek55-annotations-training", "--data", tmp_path)
    code, output, _ = cli(*missing, "--base-url", secret_mirror)  # a 404
    assert code == 2 and "s3cret" not in output and server.mirror in output
    code, output, _ = cli(
        *missing, "--base-url", "http://user:s3cret@127.0.0.1:9/", "--retries", "0"
    )
    assert code == 2 and "s3cret" not in output and "127.0.0.1:9" in output  # unreachable


def test_public_address_and_scrub_remove_user_information() -> None:
    assert public_address("http://u:p@host:8/x?q=1") == "http://host:8/x?q=1"
    assert public_address("https://host/x") == "https://host/x"
    assert scrub("failed: http://u:p@host/x and https://v@h2/y") == (
        "failed: http://host/x and https://h2/y"
    )


# --- leftovers and unexpected errors --------------------------------------------------------


def test_stale_manifest_temporaries_and_validators_are_cleaned(cli, server, tmp_path) -> None:
    name = "ek55-annotations-actions"
    serve_artefacts(server, [name])
    stale = tmp_path / f".{MANIFEST_NAME}.abc123.tmp"
    stale.write_text("{half")
    orphan = tmp_path / "actions.csv.part.validator"
    orphan.write_text('"etag"')
    args = ("download", "get", name, "--data", tmp_path, "--base-url", server.mirror)
    assert cli(*args)[0] == 0
    assert not stale.exists() and not orphan.exists()
    assert server.hits()[0].if_range is None  # the orphaned validator was not used
    stale.write_text("{half")
    assert cli(*args)[0] == 0  # a run that fetches nothing cleans too
    assert not stale.exists()


def test_a_redirect_loop_is_a_message_naming_the_artefact_and_address(
    cli, server, tmp_path
) -> None:
    name = "ek55-annotations-actions"
    url = REGISTRY.get(name).url
    server.serve_mirrored(url, b"x", redirect_loop=True)
    secret_mirror = server.mirror.replace("http://", "http://user:s3cret@")
    result = cli("download", "get", name, "--data", tmp_path, "--base-url", secret_mirror)
    assert_user_error(*result, name, mirror_url(url, server.mirror), "TooManyRedirects")
    assert "s3cret" not in result[1] and not (tmp_path / "actions.csv").exists()


def test_an_unexpected_client_error_is_a_message(server, policy, tmp_path) -> None:
    class Broken(requests.Session):
        """A session whose client fails in an unexpected way."""

        def get(self, *args: object, **kwargs: object) -> requests.Response:
            raise requests.exceptions.InvalidHeader("bad header value")

    url = server.serve("/f.bin", payload(35)).replace("http://", "http://u:pw@")
    with pytest.raises(DownloadError) as raised:
        fetch(url, tmp_path / "f.bin", label="thing", policy=policy, session=Broken())
    text = str(raised.value)
    assert "thing" in text and "InvalidHeader" in text and "pw@" not in text
    assert not (tmp_path / "f.bin").exists()


def test_a_folder_error_is_a_message_naming_the_artefact(cli, server, tmp_path) -> None:
    name = "ek55-features-rgb"
    url = REGISTRY.get(name).url
    serve_artefacts(server, [name])
    (tmp_path / "rgb").write_text("a file where a folder belongs")
    result = cli("download", "get", name, "--data", tmp_path, "--base-url", server.mirror)
    assert_user_error(*result, name, mirror_url(url, server.mirror), "run the command again")


def test_a_disk_error_outside_the_transfer_is_a_message(cli, server, tmp_path) -> None:
    name = "ek55-annotations-actions"
    serve_artefacts(server, [name])
    (tmp_path / ".sfr-downloads").write_text("a file where sfr keeps its locks")
    result = cli("download", "get", name, "--data", tmp_path, "--base-url", server.mirror)
    assert_user_error(*result, name, ".sfr-downloads", "run the command again")
    assert not (tmp_path / "actions.csv").exists() and not server.hits()


def test_a_registry_digest_is_required_and_recorded_as_such(server, policy, tmp_path) -> None:
    data = payload(42, 5_000)
    text = (
        '[[artefact]]\nname = "thing"\ndescription = "a thing"\nkind = "backbone"\n'
        'root = "runs"\ndest = "backbones/thing.bin"\n'
        f'urls = ["https://example.org/thing.bin"]\nsha256 = "{sha(data)}"\n'
    )
    thing = parse_registry(text).get("thing")
    server.serve_mirrored(thing.url, payload(43, 5_000))  # not the published bytes
    steps = plan([thing], Folders(runs=tmp_path), base_url=server.mirror)
    with pytest.raises(DownloadError, match="recorded in the registry"):
        install(steps, policy=policy)
    assert not (tmp_path / "backbones" / "thing.bin").exists()
    server.serve_mirrored(thing.url, data)
    install(plan([thing], Folders(runs=tmp_path), base_url=server.mirror), policy=policy)
    entry = load_manifest(tmp_path).artefacts["thing"]
    assert entry.sha256 == sha(data) and entry.digest_from == "registry"


@pytest.mark.parametrize(
    ("status", "credentials", "needles"),
    [
        (401, "", ["needs credentials (HTTP 401 Unauthorized)", "USER:PASSWORD@HOST"]),
        (401, "reader:s3cret@", ["refused the user name and password in the address"]),
        (403, "reader:s3cret@", ["forbids access (HTTP 403 Forbidden)", "expired link"]),
    ],
)
def test_a_size_check_refused_by_the_server_says_why(
    cli, server, tmp_path, status, credentials, needles
) -> None:
    server.serve_mirrored(REGISTRY.get("tsn-rgb").url, payload(5, 2_000), fail_with=[status])
    mirror = server.mirror.replace("http://", f"http://{credentials}")
    code, output, _ = cli(
        "download", "get", "tsn-rgb", "--runs", tmp_path, "--base-url", mirror,
        "--dry-run", "--check-size",
    )  # fmt: skip
    assert code == 0, output
    for needle in needles:
        assert needle in output
    assert f"{server.mirror}/iplab.dmi.unict.it/sharing/rulstm/TSN-rgb.pth.tar" in output
    assert "s3cret" not in output and "--check-size asks" not in output
    assert "1 size check failed" in output


def test_a_download_refused_for_credentials_says_so(cli, server, tmp_path) -> None:
    server.serve_mirrored(REGISTRY.get("tsn-rgb").url, payload(5, 2_000), fail_with=[401])
    mirror = server.mirror.replace("http://", "http://reader:s3cret@")
    result = cli("download", "get", "tsn-rgb", "--runs", tmp_path, "--base-url", mirror)
    assert_user_error(*result, "needs credentials (HTTP 401 Unauthorized)", "refused the user")
    assert "s3cret" not in result[1]


def test_a_file_already_whole_on_disk_is_counted_as_verified_not_fetched(
    cli, server, tmp_path, monkeypatch
) -> None:
    data = payload(44, 5_000)
    text = (
        '[[artefact]]\nname = "thing"\ndescription = "a thing"\nkind = "backbone"\n'
        'root = "runs"\ndest = "backbones/thing.bin"\n'
        f'urls = ["https://example.org/thing.bin"]\nsha256 = "{sha(data)}"\n'
    )
    monkeypatch.setattr("sfr.cli.download.load_registry", lambda: parse_registry(text))
    server.serve_mirrored("https://example.org/thing.bin", data)
    (tmp_path / "backbones").mkdir()
    (tmp_path / "backbones" / "thing.bin.part").write_bytes(data)  # an earlier run's, whole
    code, output, _ = cli(
        "download", "get", "thing", "--runs", tmp_path, "--base-url", server.mirror
    )
    assert code == 0, output
    assert "Done: 1 already downloaded by an earlier run, verified and installed." in output
    assert "fetched" not in output
    assert (tmp_path / "backbones" / "thing.bin").read_bytes() == data
    (tmp_path / "backbones" / "thing.bin").unlink()
    (tmp_path / "backbones" / "thing.bin.part").write_bytes(data[:1_000])  # resumed: the rest
    code, output, _ = cli(
        "download", "get", "thing", "--runs", tmp_path, "--base-url", server.mirror, "--force"
    )
    assert code == 0, output
    assert "Done: fetched 1 (4.0 kB)." in output
