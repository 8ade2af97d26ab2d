"""Install registry artefacts: where each lands, whether it is already there, fetch, verify,
post-process (unzip, convert) and record it in the folder's manifest.

`plan` decides, without touching the network, what each artefact needs; `install` carries the
plan out, reporting progress through a callback. The checkpoint conversion of published RU-LSTM
files goes through `convert_published` (or the `converter` passed to `install`), the one seam
between downloading and `sfr.hub.convert`.

`install` holds an exclusive lock per destination (`.sfr-downloads/locks/`) from before it looks
at the folder again until the artefact is recorded, so two processes sharing a data folder never
write the same `.part` or install over each other; the second is refused, naming the lock.
Putting a file in place and recording it is one recoverable step (a pending manifest entry
first, adopted by the next run when a kill came between the rename and the record).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

import requests

from sfr.errors import SfrError
from sfr.files import sha256_file
from sfr.hub.addresses import mirror_url, public_address
from sfr.hub.archive import ExtractedFile, extract_zip
from sfr.hub.download import (
    DownloadError,
    DownloadEvent,
    Expected,
    FetchedFile,
    RetryPolicy,
    UnreachableError,
    fetch,
)
from sfr.hub.manifest import (
    STAGING_DIR,
    InstalledFile,
    Manifest,
    ManifestEntry,
    clean_stale_temps,
    is_intact,
    load_manifest,
    lock_path,
    manifest_path,
    matches,
    record,
    record_pending,
)
from sfr.hub.registry import Artefact, Convert, Unzip
from sfr.hub.safefiles import DestinationLock, check_regular

DEFAULT_DATA_ROOT = Path("data")
DEFAULT_RUNS = Path("runs")

State = Literal["installed", "not converted", "changed", "interrupted", "occupied", "absent"]
Action = Literal["fetch", "skip", "convert", "adopt", "blocked"]


class Converter(Protocol):
    """Post-processing `convert`: install a published checkpoint as an sfr run; its path."""

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
        """Convert `checkpoint` into `runs_dir`'s run layout; the installed checkpoint (`force`
        replaces a conversion of another download, as `--force` asks)."""
        ...


def convert_published(
    checkpoint: Path,
    *,
    dataset: str,
    modality: str,
    task: str,
    runs_dir: Path,
    source_sha256: str,
    force: bool = False,
) -> Path:
    """The default converter: `sfr.hub.convert.install_published` (imported only when used)."""
    from sfr.hub.convert import install_published

    return install_published(
        checkpoint,
        dataset=dataset,
        modality=modality,
        task=task,
        runs_dir=runs_dir,
        source_sha256=source_sha256,
        force=force,
    )


@dataclass(frozen=True)
class Folders:
    """Where artefacts land: a dataset folder (given, else `data/<dataset>`) or the runs folder."""

    data: Path | None = None
    runs: Path = DEFAULT_RUNS

    def of(self, artefact: Artefact) -> Path:
        """The root folder of an artefact."""
        if artefact.root == "runs":
            return self.runs
        if self.data is not None:
            return self.data
        return DEFAULT_DATA_ROOT / str(artefact.dataset)


@dataclass(frozen=True)
class Step:
    """What one artefact needs: its folder, target, addresses, state and the action to take."""

    artefact: Artefact
    folder: Path
    target: Path
    urls: tuple[str, ...]
    state: State
    action: Action
    detail: str
    entry: ManifestEntry | None
    displaced: tuple[str, ...]
    forced: bool

    @property
    def download_path(self) -> Path:
        """Where the bytes are downloaded: the target itself, or a staging archive for zips."""
        if isinstance(self.artefact.post, Unzip):
            return self.folder / STAGING_DIR / self.artefact.archive_name
        return self.target


@dataclass(frozen=True)
class ArtefactSkipped:
    """An artefact already installed and verified; nothing fetched."""

    name: str
    path: Path
    reason: str


@dataclass(frozen=True)
class ExtractionStarted:
    """A verified archive is being extracted."""

    name: str
    archive: Path
    dest: Path


@dataclass(frozen=True)
class ArtefactInstalled:
    """An artefact was fetched, verified, installed and recorded in the manifest.

    `replaced_sha256` is the different digest recorded for an earlier download of it (the file
    changed upstream, or that download was wrong); the new one replaces it.
    """

    name: str
    path: Path
    size: int
    sha256: str
    files: int
    replaced_sha256: str | None = None


@dataclass(frozen=True)
class ArtefactRecovered:
    """A file installed by a run killed before recording it matched and was recorded."""

    name: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class ConversionStarted:
    """A published checkpoint is being converted."""

    name: str
    checkpoint: Path


@dataclass(frozen=True)
class ConversionFinished:
    """A published checkpoint was converted into `path`."""

    name: str
    path: Path


HubEvent = (
    DownloadEvent
    | ArtefactSkipped
    | ExtractionStarted
    | ArtefactInstalled
    | ArtefactRecovered
    | ConversionStarted
    | ConversionFinished
)


@dataclass(frozen=True)
class InstallReport:
    """What `install` did, artefact names per outcome, and the bytes it downloaded.

    `fetched` took bytes from the network (`downloaded_bytes` counts them: for a resumed file,
    only the rest); `verified` were already whole on disk from an earlier run (a complete
    `.part` or staged archive) and were only verified and installed.
    """

    fetched: list[str]
    skipped: list[str]
    converted: list[str]
    downloaded_bytes: int
    recovered: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)


def plan(
    artefacts: Sequence[Artefact],
    folders: Folders,
    *,
    base_url: str | None = None,
    force: bool = False,
) -> list[Step]:
    """Decide, from the folders and their manifests only (no network), what each artefact needs."""
    manifests: dict[Path, Manifest] = {}
    steps = []
    for artefact in artefacts:
        folder = folders.of(artefact)
        if folder not in manifests:
            manifests[folder] = load_manifest(folder)
        manifest = manifests[folder]
        target = folder.joinpath(*PurePosixPath(artefact.dest).parts)
        urls = tuple(mirror_url(u, base_url) if base_url else u for u in artefact.urls)
        state, detail = _state(artefact, folder, target, manifest)
        action = _action(state, force)
        displaced = tuple(
            entry.name
            for entry in manifest.artefacts.values()
            if entry.name != artefact.name and entry.path == artefact.dest
        )
        entry = manifest.artefacts.get(artefact.name)
        steps.append(
            Step(artefact, folder, target, urls, state, action, detail, entry, displaced, force)
        )
    return steps


def _state(artefact: Artefact, folder: Path, target: Path, manifest: Manifest) -> tuple[State, str]:
    """An artefact's state in its folder, and a phrase saying why."""
    pending = manifest.pending.get(artefact.name)
    if pending is not None and is_intact(folder, pending):
        return "interrupted", f"{target} was put in place by a run killed before recording it"
    entry = manifest.artefacts.get(artefact.name)
    if entry is not None and is_intact(folder, entry):
        if isinstance(artefact.post, Convert) and (
            entry.converted is None or not (folder / entry.converted).is_file()
        ):
            return "not converted", f"downloaded to {target}, not converted yet"
        return "installed", f"installed at {target} (size matches {manifest_path(folder)})"
    if entry is not None:
        return "changed", f"{target} is missing or changed since it was installed"
    if not isinstance(artefact.post, Unzip) and (target.exists() or target.is_symlink()):
        owner = manifest.owner_of(artefact.dest)
        if owner is not None:
            variant = f" ({owner.variant})" if owner.variant else ""
            return "occupied", f"{target} holds {owner.name}{variant}"
        return "occupied", f"{target} exists and was not installed by sfr download"
    return "absent", f"not in {folder}"


def _action(state: State, force: bool) -> Action:
    """What to do about an artefact in `state`."""
    if force:
        return "fetch"
    return {
        "installed": "skip",
        "not converted": "convert",
        "changed": "fetch",
        "interrupted": "adopt",
        "occupied": "blocked",
        "absent": "fetch",
    }[state]


def _refresh(step: Step) -> Step:
    """`step` planned again from its folder as it is now (after its lock was taken)."""
    manifest = load_manifest(step.folder)
    artefact = step.artefact
    state, detail = _state(artefact, step.folder, step.target, manifest)
    displaced = tuple(
        entry.name
        for entry in manifest.artefacts.values()
        if entry.name != artefact.name and entry.path == artefact.dest
    )
    return replace(
        step,
        state=state,
        action=_action(state, step.forced),
        detail=detail,
        entry=manifest.artefacts.get(artefact.name),
        displaced=displaced,
    )


def destination_lock(step: Step) -> DestinationLock:
    """The lock of a step's destination (shared by every artefact installing there)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", step.artefact.dest.strip("/"))
    name = "folder" if name in ("", ".") else name
    return DestinationLock(
        lock_path(step.folder, f"dest-{name}"), f"{step.target} ({step.artefact.name})"
    )


def install(
    steps: Sequence[Step],
    *,
    policy: RetryPolicy = RetryPolicy(),
    on_event: Callable[[HubEvent], None] = lambda event: None,
    converter: Converter | None = None,
    session: requests.Session | None = None,
) -> InstallReport:
    """Carry a plan out: fetch and verify, extract or convert, record each artefact.

    Nothing is fetched when any step is blocked (a file of another variant, or one sfr did not
    install, sits at a destination) or when another process holds the lock of a destination
    (LockedError). Each artefact is recorded in its folder's manifest as soon as it is
    installed, so an interrupted run keeps what it finished.
    """
    _refuse_blocked(steps)
    try:
        return _install(steps, policy, on_event, converter or convert_published, session)
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise SfrError(
            f"Installing {', '.join(dict.fromkeys(s.artefact.name for s in steps))} failed: "
            f"{error.strerror or error}{where}.",
            hint="Check the folders are writable and the disk has room, then run the command "
            "again: what was received is kept and resumed.",
        ) from None


def _install(
    steps: Sequence[Step],
    policy: RetryPolicy,
    on_event: Callable[[HubEvent], None],
    convert: Converter,
    session: requests.Session | None,
) -> InstallReport:
    """`install` without the translation of disk errors."""
    fetched, skipped, converted, recovered, verified = [], [], [], [], []
    downloaded = 0
    with ExitStack() as locks:
        held: set[Path] = set()
        for step in steps:
            lock = destination_lock(step)
            if step.action != "skip" and lock.path not in held:
                locks.enter_context(lock)
                held.add(lock.path)
        for folder in dict.fromkeys(step.folder for step in steps):
            clean_stale_temps(folder)
        steps = [_refresh(step) if step.action != "skip" else step for step in steps]
        _refuse_blocked(steps)
        for step in steps:
            name = step.artefact.name
            if step.action == "skip":
                on_event(ArtefactSkipped(name, step.target, step.detail))
                skipped.append(name)
                continue
            entry = step.entry
            if step.action == "adopt":
                entry = _adopt(step, on_event)
                if entry is not None:
                    recovered.append(name)
                else:
                    step = replace(step, action="fetch")
            if step.action == "fetch":
                entry, size = _fetch_and_record(step, policy, on_event, session)
                (fetched if size else verified).append(name)
                downloaded += size
            if isinstance(step.artefact.post, Convert) and entry is not None:
                _convert(step, entry, convert, on_event)
                converted.append(name)
    return InstallReport(fetched, skipped, converted, downloaded, recovered, verified)


def _refuse_blocked(steps: Sequence[Step]) -> None:
    """Refuse the whole plan when a step is blocked."""
    blocked = [step for step in steps if step.action == "blocked"]
    if blocked:
        raise SfrError(
            "Nothing was downloaded: " + "; ".join(step.detail for step in blocked) + ".",
            hint="Pass --force to replace these files, or --data/--runs to use another folder.",
        )


def _adopt(step: Step, on_event: Callable[[HubEvent], None]) -> ManifestEntry | None:
    """Record the pending entry of a killed run when its files match it (size and sha256);
    the entry, or None when they do not (the artefact is then fetched)."""
    pending = load_manifest(step.folder).pending.get(step.artefact.name)
    if pending is None or not matches(step.folder, pending):
        return None
    displaced = tuple(name for name in step.displaced if name != pending.name)
    record(step.folder, pending, replaces=displaced)
    if isinstance(step.artefact.post, Unzip):
        step.download_path.unlink(missing_ok=True)
    on_event(ArtefactRecovered(step.artefact.name, step.target, pending.sha256))
    return pending


def _fetch_and_record(
    step: Step,
    policy: RetryPolicy,
    on_event: Callable[[HubEvent], None],
    session: requests.Session | None,
) -> tuple[ManifestEntry, int]:
    """Fetch, verify and install one artefact, then record it; (entry, bytes downloaded).

    Disk errors become a DownloadError naming the artefact; nothing unverified is in place.
    """
    try:
        return _fetch_and_record_unchecked(step, policy, on_event, session)
    except OSError as error:
        raise DownloadError(
            f"Installing {step.artefact.name} into {step.folder} failed: "
            f"{error.strerror or error}{f' ({error.filename})' if error.filename else ''}.",
            hint="Check the folder is writable and the disk has room, then run the command "
            "again: what was received is kept and resumed.",
        ) from None


def _fetch_and_record_unchecked(
    step: Step,
    policy: RetryPolicy,
    on_event: Callable[[HubEvent], None],
    session: requests.Session | None,
) -> tuple[ManifestEntry, int]:
    """`_fetch_and_record` without the translation of disk errors."""
    artefact = step.artefact
    source = step.download_path

    def entry_for(fetched: FetchedFile, files: dict[str, InstalledFile]) -> ManifestEntry:
        return ManifestEntry(
            name=artefact.name,
            url=public_address(fetched.url),
            path=artefact.dest,
            size=fetched.size,
            sha256=fetched.sha256,
            variant=artefact.variant,
            downloaded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            files=files,
            digest_from="registry" if artefact.sha256 else "first download",
        )

    if isinstance(artefact.post, Unzip):
        if step.forced and check_regular(source):
            source.unlink()  # --force fetches the archive again
        if check_regular(source):
            # Renamed into the staging folder only after verification: an earlier run was
            # interrupted while extracting it.
            fetched = FetchedFile(
                source, source.stat().st_size, sha256_file(source), public_address(step.urls[0])
            )
            downloaded = 0
        else:
            fetched = _fetch_any(step, source, policy, on_event, session)
            downloaded = fetched.received
        on_event(ExtractionStarted(artefact.name, source, step.target))
        staging = step.folder / STAGING_DIR / f"{artefact.name}.extracting"
        # Files of an earlier extraction of the same artefact are sfr's to replace.
        overwrite = step.forced or step.state == "changed"
        prefix = PurePosixPath(artefact.dest)

        def files_of(extracted: list[ExtractedFile]) -> dict[str, InstalledFile]:
            return {
                str(prefix / item.relative): InstalledFile(size=item.size, sha256=item.sha256)
                for item in extracted
            }

        extracted = extract_zip(
            source,
            step.target,
            staging,
            overwrite=overwrite,
            before_move=lambda items: record_pending(
                step.folder, entry_for(fetched, files_of(items))
            ),
        )
        entry = entry_for(fetched, files_of(extracted))
        source.unlink()  # before the record: a kill in between is adopted from the pending entry
    else:

        def pending(verified: FetchedFile) -> None:
            files = {artefact.dest: InstalledFile(size=verified.size, sha256=verified.sha256)}
            record_pending(step.folder, entry_for(verified, files))

        fetched = _fetch_any(step, source, policy, on_event, session, before_install=pending)
        downloaded = fetched.received
        files = {artefact.dest: InstalledFile(size=fetched.size, sha256=fetched.sha256)}
        entry = entry_for(fetched, files)
    record(step.folder, entry, replaces=step.displaced)
    earlier = step.entry.sha256 if step.entry is not None else None
    on_event(
        ArtefactInstalled(
            artefact.name,
            step.target,
            fetched.size,
            fetched.sha256,
            len(entry.files),
            replaced_sha256=earlier if earlier not in (None, fetched.sha256) else None,
        )
    )
    return entry, downloaded


def _fetch_any(
    step: Step,
    dest: Path,
    policy: RetryPolicy,
    on_event: Callable[[HubEvent], None],
    session: requests.Session | None,
    before_install: Callable[[FetchedFile], None] = lambda fetched: None,
) -> FetchedFile:
    """Fetch from the first address that answers; later addresses are fallbacks.

    Only the registry's sha256 is required: a digest recorded at an earlier download is no
    trust anchor (it may be of a wrong file, or the file changed upstream), so `--force` and
    re-downloads never fail against it; the new digest replaces it.
    """
    artefact = step.artefact
    expected = Expected(size=artefact.size, sha256=artefact.sha256)
    failures: list[DownloadError] = []
    for url in step.urls:
        try:
            return fetch(
                url,
                dest,
                label=artefact.name,
                expected=expected,
                policy=policy,
                on_event=on_event,
                session=session,
                before_install=before_install,
            )
        except UnreachableError as error:
            failures.append(error)
    if len(failures) == 1:
        raise failures[0]
    raise DownloadError(
        f"{artefact.name}: no address worked. " + " ".join(f.message for f in failures),
        hint=failures[-1].hint,
    )


def _convert(
    step: Step,
    entry: ManifestEntry,
    convert: Converter,
    on_event: Callable[[HubEvent], None],
) -> None:
    """Convert a downloaded published checkpoint and record where the result went."""
    post = step.artefact.post
    assert isinstance(post, Convert)
    on_event(ConversionStarted(step.artefact.name, step.target))
    installed = convert(
        step.target,
        dataset=post.dataset,
        modality=post.modality,
        task=post.task,
        runs_dir=step.folder,
        source_sha256=entry.sha256,
        force=step.forced,
    )
    try:
        relative = str(PurePosixPath(Path(installed).relative_to(step.folder)))
    except ValueError:
        relative = str(Path(installed).resolve())
    record(step.folder, entry.model_copy(update={"converted": relative}))
    on_event(ConversionFinished(step.artefact.name, Path(installed)))


def verify_folders(data: Sequence[Path], runs: Path | None) -> list[Path]:
    """The folders `sfr download verify` checks: the given ones, else every `data/*` folder and
    the runs folder that hold a manifest."""
    if data or runs is not None:
        return [*data, *([runs] if runs is not None else [])]
    candidates = sorted(p for p in DEFAULT_DATA_ROOT.glob("*") if p.is_dir())
    return [p for p in [*candidates, DEFAULT_RUNS] if manifest_path(p).is_file()]
