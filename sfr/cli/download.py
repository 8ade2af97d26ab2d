"""`sfr download`: fetch public annotations, feature stores and published checkpoints.

Thin: parses the command line, asks `sfr.hub` for a plan, renders it (dry run) or carries it out
with a progress bar per file and a total.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.filesize import decimal
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from sfr.cli.common import console, fail, handles_user_errors
from sfr.errors import SfrError, counted
from sfr.files import missing_reason
from sfr.hub.addresses import public_address
from sfr.hub.download import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    BytesReceived,
    DownloadError,
    FileFinished,
    FileStarted,
    RetryPolicy,
    RetryScheduled,
    remote_size,
)
from sfr.hub.install import (
    DEFAULT_RUNS,
    ArtefactInstalled,
    ArtefactRecovered,
    ArtefactSkipped,
    ConversionFinished,
    ConversionStarted,
    ExtractionStarted,
    Folders,
    HubEvent,
    Step,
    install,
    plan,
    verify_folders,
)
from sfr.hub.manifest import manifest_path, total_bytes, verify_folder
from sfr.hub.registry import Artefact, check_choice, load_registry

download_errors = handles_user_errors(
    "Partial downloads are kept as .part files: run the same command again to resume."
)

download_app = typer.Typer(
    name="download",
    help="Fetch public annotations, feature stores and published RU-LSTM checkpoints: "
    "resumable, verified (size, sha256), recorded in a manifest for offline `verify`.",
    no_args_is_help=True,
)

DataOpt = Annotated[
    Path | None,
    typer.Option("--data", help="Dataset folder to install into (default: data/<dataset>)."),
]
RunsOpt = Annotated[Path, typer.Option("--runs", help="Runs folder (checkpoints, backbones).")]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run", help="List what would be fetched, with sizes; fetch nothing, no network."
    ),
]
CheckSizeOpt = Annotated[
    bool,
    typer.Option(
        "--check-size", help="With --dry-run: ask each server for the size (one HEAD request each)."
    ),
]
BaseUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--base-url",
        envvar="SFR_MIRROR",
        help="Mirror to fetch from instead: https://HOST/PATH becomes BASE_URL/HOST/PATH "
        "(the layout `wget -x` writes).",
    ),
]
RetriesOpt = Annotated[
    int,
    typer.Option("--retries", min=0, help="Failed attempts in a row (without progress) to retry."),
]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", min=1.0, help="Seconds without data before an attempt fails.")
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace installed files: download again, also over files of another variant or "
        "not installed by sfr.",
    ),
]


class DownloadView:
    """Rich rendering of download events: a bar per file with speed and ETA, and a total bar."""

    def __init__(self, steps: Sequence[Step]) -> None:
        """Bars for the files `steps` fetch (hidden when the console is not a terminal)."""
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        fetching = [s for s in steps if s.action == "fetch"]
        self.known = {s.artefact.name: s.artefact.size for s in fetching if s.artefact.size}
        self.received: dict[str, int] = {}
        self.files: dict[str, TaskID] = {}
        self.total = self.bars.add_task(
            f"total ({len(fetching)} files)",
            total=sum(self.known.values()) or None,
            visible=len(fetching) > 1,
        )

    def __enter__(self) -> DownloadView:
        """Start drawing the bars."""
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop drawing (the bars vanish; the printed lines stay)."""
        self.bars.stop()

    def say(self, text: str) -> None:
        """Print a line above the bars."""
        self.bars.console.print(text, highlight=False)

    def __call__(self, event: HubEvent) -> None:
        """Render one event: bars for bytes, lines for retries and finished artefacts."""
        if isinstance(event, FileStarted):
            if event.label not in self.files:
                self.files[event.label] = self.bars.add_task(escape(event.label), total=None)
            if event.total is not None and event.label not in self.known:
                self.known[event.label] = event.total
            self.received[event.label] = event.resumed_from
            self.bars.update(
                self.files[event.label], total=event.total, completed=event.resumed_from
            )
            if event.resumed_from:
                self.say(f"  {escape(event.label)}: resuming at {decimal(event.resumed_from)}")
            self._update_total()
        elif isinstance(event, BytesReceived):
            self.received[event.label] += event.count
            self.bars.advance(self.files[event.label], event.count)
            self._update_total()
        elif isinstance(event, RetryScheduled):
            self.say(
                f"  [yellow]{escape(event.label)}: {escape(event.reason)}; retry "
                f"{event.attempt}/{event.retries} in {event.delay_s:g} s[/]"
            )
        elif isinstance(event, FileFinished) and event.label in self.files:
            self.bars.remove_task(self.files.pop(event.label))
        else:
            self._report(event)

    def _report(self, event: HubEvent) -> None:
        """One line for an artefact-level event."""
        if isinstance(event, ArtefactSkipped):
            self.say(f"[dim]· {escape(event.name)}: already installed, skipped ({event.path})[/]")
        elif isinstance(event, ExtractionStarted):
            self.say(f"  {escape(event.name)}: extracting into {event.dest}")
        elif isinstance(event, ArtefactInstalled):
            files = f", {event.files} files" if event.files > 1 else ""
            self.say(
                f"[green]✓[/] {escape(event.name)} → {event.path} ({decimal(event.size)}"
                f"{files}, sha256 {event.sha256[:12]}…)"
            )
            if event.replaced_sha256 is not None:
                self.say(
                    f"  [yellow]{escape(event.name)}: differs from the earlier download "
                    f"(sha256 {event.replaced_sha256[:12]}…): the file changed upstream or that "
                    "download was wrong; the new digest is recorded.[/]"
                )
        elif isinstance(event, ArtefactRecovered):
            self.say(
                f"[green]✓[/] {escape(event.name)} → {event.path} (put in place by an "
                f"interrupted run; size and sha256 {event.sha256[:12]}… match, now recorded)"
            )
        elif isinstance(event, ConversionStarted):
            self.say(f"  {escape(event.name)}: converting {event.checkpoint}")
        elif isinstance(event, ConversionFinished):
            self.say(f"[green]✓[/] {escape(event.name)} converted → {event.path}")

    def _update_total(self) -> None:
        """Bring the total bar in line with the bytes received and the sizes known."""
        self.bars.update(
            self.total,
            total=sum(self.known.values()) or None,
            completed=sum(self.received.values()),
        )


def size_text(artefact: Artefact, announced: int | None = None) -> str:
    """Exact size if known, else the announced or published rough size, else 'unknown'."""
    if announced is not None:
        return decimal(announced)
    if artefact.size is not None:
        return decimal(artefact.size)
    if artefact.approx_size is not None:
        return f"~{decimal(artefact.approx_size)}"
    return "unknown"


def _dry_run(steps: Sequence[Step], *, check_size: bool, timeout: float) -> None:
    """Show the plan with sizes; only `check_size` touches the network (HEAD requests)."""
    table = Table(title="Dry run: nothing is fetched", title_justify="left")
    for column in ("artefact", "action", "size", "destination", "from"):
        table.add_column(column, no_wrap=column in ("artefact", "size"))
    announced: dict[str, int | None] = {}
    refused = 0
    for step in steps:
        name = step.artefact.name
        fetch = "fetch"
        if check_size and step.action == "fetch":
            try:
                announced[name] = remote_size(step.urls[0], timeout_s=timeout)
            except DownloadError as error:
                announced[name] = None
                refused += 1
                fetch = "[yellow]fetch (the size check failed)[/]"
                hint = f" {error.hint}" if error.hint else ""
                console.print(f"[yellow]{escape(error.message + hint)}[/]", highlight=False)
        action = {
            "fetch": fetch,
            "skip": "[dim]skip (installed)[/]",
            "convert": "convert only",
            "blocked": f"[red]refused: {escape(step.detail)}[/]",
        }[step.action]
        table.add_row(
            escape(name),
            action,
            size_text(step.artefact, announced.get(name)),
            str(step.target),
            escape(public_address(step.urls[0])),
        )
    console.print(table)
    fetching = [s for s in steps if s.action == "fetch"]
    exact = [announced.get(s.artefact.name) or s.artefact.size for s in fetching]
    rough = [s.artefact.approx_size for s in fetching]
    sizes = [e if e is not None else r for e, r in zip(exact, rough)]
    unknown = sum(size is None for size in sizes)
    approx = "~" if any(e is None and r is not None for e, r in zip(exact, rough)) else ""
    summary = f"Would fetch {counted(len(fetching), 'file')}"
    if unknown < len(fetching):
        summary += f", {approx}{decimal(sum(s for s in sizes if s is not None))}"
        if unknown:
            summary += f" + {unknown} of unknown size"
    elif unknown:
        summary += " of unknown size"
    if unknown and not check_size:
        summary += " (--check-size asks the servers)"
    if refused:
        summary += (
            f"; {counted(refused, 'size check')} failed (above): the download will likely fail "
            "the same way"
        )
    console.print(summary + ".", highlight=False)


def run_downloads(
    artefacts: Sequence[Artefact],
    folders: Folders,
    *,
    dry_run: bool,
    check_size: bool,
    base_url: str | None,
    retries: int,
    timeout: float,
    force: bool,
) -> None:
    """Plan, then either show the plan (dry run) or install it with progress bars."""
    steps = plan(artefacts, folders, base_url=base_url, force=force)
    if dry_run:
        _dry_run(steps, check_size=check_size, timeout=timeout)
        return
    if check_size:
        raise SfrError("--check-size only applies to a --dry-run.")
    with DownloadView(steps) as view:
        report = install(
            steps, policy=RetryPolicy(retries=retries, timeout_s=timeout), on_event=view
        )
    parts = []
    if report.fetched or not (report.verified or report.skipped or report.recovered):
        parts.append(f"fetched {len(report.fetched)} ({decimal(report.downloaded_bytes)})")
    if report.verified:
        parts.append(
            f"{len(report.verified)} already downloaded by an earlier run, verified and installed"
        )
    if report.skipped:
        parts.append(f"{len(report.skipped)} already installed")
    if report.converted:
        parts.append(f"converted {len(report.converted)}")
    if report.recovered:
        parts.append(f"recovered {len(report.recovered)} from an interrupted run")
    console.print("Done: " + ", ".join(parts) + ".", highlight=False)


@download_app.command("annotations")
@download_errors
def annotations(
    dataset: Annotated[str, typer.Argument(help="ek55, ek100 or egtea.")],
    data: DataOpt = None,
    class_names: Annotated[
        bool,
        typer.Option(
            "--class-names", help="Also fetch the verb/noun class-name CSVs (EK55, EK100)."
        ),
    ] = False,
    dry_run: DryRunOpt = False,
    check_size: CheckSizeOpt = False,
    base_url: BaseUrlOpt = None,
    retries: RetriesOpt = DEFAULT_RETRIES,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    force: ForceOpt = False,
) -> None:
    """Fetch a dataset's annotation CSVs (actions, splits, many-shot / unseen / tail lists).

    Example: sfr download annotations ek55 --data data/ek55
    """
    artefacts = load_registry().annotations(dataset, class_names=class_names)
    run_downloads(
        artefacts,
        Folders(data=data),
        dry_run=dry_run,
        check_size=check_size,
        base_url=base_url,
        retries=retries,
        timeout=timeout,
        force=force,
    )


@download_app.command("features")
@download_errors
def features(
    dataset: Annotated[str, typer.Argument(help="ek55, ek100 or egtea.")],
    modalities: Annotated[
        list[str] | None,
        typer.Argument(
            help="Modalities (rgb flow obj; default all), as MODALITY... or --modality."
        ),
    ] = None,
    modality: Annotated[
        list[str] | None,
        typer.Option(
            "--modality",
            "-m",
            help="rgb, flow or obj; repeat it, list them after it or separate them with commas "
            "(--modality rgb flow = --modality rgb --modality flow = --modality rgb,flow).",
        ),
    ] = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="EK55: the full-frame-rate stores, needed for any alpha other than 0.25 "
            "(implied for EK100).",
        ),
    ] = False,
    data: DataOpt = None,
    dry_run: DryRunOpt = False,
    check_size: CheckSizeOpt = False,
    base_url: BaseUrlOpt = None,
    retries: RetriesOpt = DEFAULT_RETRIES,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    force: ForceOpt = False,
) -> None:
    """Fetch the public RU-LSTM LMDB feature stores (EGTEA: a zip, extracted safely).

    EK55/EK100 stores land in DATA/<modality>/data.mdb; the sparse and the full EK55 store share
    that place, so installing one over the other needs --force.

    Example: sfr download features ek55 --modality rgb flow --full --data data/ek55
    """
    chosen = [
        m.strip() for value in [*(modality or []), *(modalities or [])] for m in value.split(",")
    ]
    artefacts = load_registry().features(dataset, [m for m in chosen if m], full=full)
    run_downloads(
        artefacts,
        Folders(data=data),
        dry_run=dry_run,
        check_size=check_size,
        base_url=base_url,
        retries=retries,
        timeout=timeout,
        force=force,
    )


@download_app.command("pretrained")
@download_errors
def pretrained(
    model: Annotated[
        str, typer.Argument(help="rulstm-ek55, rulstm-ek100 or sf-rulstm-ek55 (with --from).")
    ],
    runs: RunsOpt = DEFAULT_RUNS,
    task: Annotated[
        str, typer.Option("--task", help="anticipation, early_recognition (or early) or all.")
    ] = "all",
    dry_run: DryRunOpt = False,
    check_size: CheckSizeOpt = False,
    base_url: BaseUrlOpt = None,
    retries: RetriesOpt = DEFAULT_RETRIES,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    force: ForceOpt = False,
    from_dir: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="sf-rulstm-ek55: the folder holding the published Slow-Fast checkpoints "
            "(their hosting links are dead); each is converted into the run layout.",
        ),
    ] = None,
) -> None:
    """Fetch the published RU-LSTM checkpoints and convert each once into an sfr run.

    The .pth.tar files are kept in RUNS/<dataset>/published/; the converted safetensors
    checkpoints land in the run layout that `sfr validate` and `sfr fuse` read.
    The Slow-Fast RU-LSTM checkpoints (sf-rulstm-ek55) are installed from a folder (--from).

    Example: sfr download pretrained rulstm-ek55 --task anticipation --runs runs
    Example: sfr download pretrained sf-rulstm-ek55 --from ~/sf-rulstm-models --runs runs
    """
    if model.startswith("sf-rulstm-") or from_dir is not None:
        _install_slowfast(model, from_dir, runs, force, dry_run)
        return
    registry = load_registry()
    models = sorted({f"rulstm-{a.dataset}" for a in registry.artefacts if a.kind == "pretrained"})
    check_choice("model", model, models)
    artefacts = registry.pretrained(model.removeprefix("rulstm-"), task)
    run_downloads(
        artefacts,
        Folders(runs=runs),
        dry_run=dry_run,
        check_size=check_size,
        base_url=base_url,
        retries=retries,
        timeout=timeout,
        force=force,
    )


def _install_slowfast(
    model: str, folder: Path | None, runs: Path, force: bool, dry_run: bool
) -> None:
    """`pretrained sf-rulstm-<dataset> --from DIR`: convert a folder of Slow-Fast checkpoints."""
    from sfr.hub.slowfast import (  # torch is imported only when converting
        KIND_TEXT,
        PUBLISHED_FILES,
        install_slowfast_folder,
    )

    if not model.startswith("sf-rulstm-"):
        raise fail(
            f"--from installs the Slow-Fast RU-LSTM checkpoints (sf-rulstm-ek55), not {model}.",
            "Download RU-LSTM checkpoints without --from, or convert a local one with "
            "sfr convert FILE --into RUNS.",
        )
    check_choice("model", model, [f"sf-rulstm-{d}" for d in PUBLISHED_FILES])
    if folder is None:
        raise fail(
            f"{model}: the published Slow-Fast RU-LSTM checkpoints have no working download "
            "address.",
            "Pass --from DIR, the folder holding the files its download script fetched "
            "(RULSTM-anticipation_*_best.pth.tar).",
        )
    dataset = model.removeprefix("sf-rulstm-")
    result = install_slowfast_folder(
        folder,
        runs,
        dataset=dataset,
        force=force,
        dry_run=dry_run,
        on_file=lambda path: console.print(
            f"  {'reading' if dry_run else 'converting'} {path.name}", highlight=False
        ),
    )
    arrow = "would go to" if dry_run else "→"
    for source, conversion, installed in result.installed:
        layout = KIND_TEXT[conversion.converted["layout"]]
        console.print(
            f"[green]✓[/] {escape(source.name)}: {layout} {arrow} {escape(str(installed))}"
        )
    for source, reason in result.failed:
        console.print(f"[red]✗[/] {escape(source.name)}: {escape(reason)}")
    if result.ignored:
        console.print(
            f"Ignored (not published file names): {', '.join(result.ignored)}.", highlight=False
        )
    if result.missing:
        console.print(
            f"Not in {folder} (not installed): {', '.join(result.missing)}.", highlight=False
        )
    count = len(result.installed)
    files = f"{count} checkpoint{'s' if count != 1 else ''}"
    if dry_run:
        console.print(f"Dry run: {files} would be installed into {runs}.", highlight=False)
    else:
        console.print(
            f"Installed {files} into {runs}; continue with sfr fuse arch2 --config "
            f"configs/{dataset}/sf_arch2.toml --runs {runs} --data DATA, or validate a unit "
            "folder.",
            highlight=False,
        )
    if result.failed:
        raise fail(
            f"{len(result.failed)} of {len(result.failed) + count} files could not be installed "
            "(listed above).",
            "Fix or rename them and run the same command again; installed ones are kept.",
        )


@download_app.command("get")
@download_errors
def get(
    names: Annotated[list[str], typer.Argument(help="Artefact names (see `sfr download list`).")],
    data: DataOpt = None,
    runs: RunsOpt = DEFAULT_RUNS,
    dry_run: DryRunOpt = False,
    check_size: CheckSizeOpt = False,
    base_url: BaseUrlOpt = None,
    retries: RetriesOpt = DEFAULT_RETRIES,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    force: ForceOpt = False,
) -> None:
    """Fetch artefacts by name: any registry entry (TSN / SlowFast weights, EK100 detections...).

    Example: sfr download get tsn-rgb slowfast-r50-kinetics --runs runs
    """
    registry = load_registry()
    run_downloads(
        [registry.get(name) for name in dict.fromkeys(names)],
        Folders(data=data, runs=runs),
        dry_run=dry_run,
        check_size=check_size,
        base_url=base_url,
        retries=retries,
        timeout=timeout,
        force=force,
    )


PRESENCE = {
    "installed": "[green]yes[/]",
    "not converted": "[yellow]downloaded, not converted[/]",
    "changed": "[yellow]changed since download[/]",
    "interrupted": "[yellow]installed by an interrupted run (the next download records it)[/]",
    "occupied": "no (another file is there)",
    "absent": "no",
}


@download_app.command("list")
@download_errors
def list_artefacts(
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Dataset folder to look in (default: data/<dataset>)."),
    ] = None,
    runs: RunsOpt = DEFAULT_RUNS,
    urls: Annotated[
        bool, typer.Option("--urls", help="Print every address, one per line (to build a mirror).")
    ] = False,
) -> None:
    """List every known artefact: name, what it is, size, whether it is installed.

    Presence is read from the manifests of data/<dataset> (or --data) and RUNS, offline.
    """
    registry = load_registry()
    if urls:
        for artefact in registry.artefacts:
            for url in artefact.urls:
                typer.echo(url)
        return
    table = Table(title="sfr download artefacts", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("description")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("present")
    for step in plan(registry.artefacts, Folders(data=data, runs=runs)):
        table.add_row(
            escape(step.artefact.name),
            escape(step.artefact.description),
            size_text(step.artefact),
            PRESENCE[step.state],
        )
    console.print(table)


@download_app.command("verify")
@download_errors
def verify(
    data: Annotated[
        list[Path] | None,
        typer.Option("--data", help="Dataset folder to verify (repeatable; default: data/*)."),
    ] = None,
    runs: Annotated[
        Path | None, typer.Option("--runs", help="Runs folder to verify (default: runs).")
    ] = None,
) -> None:
    """Recompute the sha256 of every installed file and compare with the manifest (offline).

    Exits with code 2 if any file is missing, not a regular file, differs, or was left by an
    interrupted install. A digest from the registry proves the published file; one learnt at
    the first download (no published digest) only detects later changes.
    """
    folders = verify_folders(data or [], runs)
    if not folders:
        raise SfrError(
            "Nothing to verify: no download manifest in data/*/ or runs/.",
            hint="Pass --data DIR / --runs DIR, or download something first.",
        )
    for folder in folders:
        if not folder.is_dir():
            raise SfrError(
                f"{folder} {missing_reason(folder, 'folder')}.",
                hint="Pass the --data / --runs folder that sfr download installed into.",
            )
        if not manifest_path(folder).is_file():
            raise SfrError(
                f"{folder} has no download manifest ({manifest_path(folder).name}).",
                hint="Only files installed by `sfr download` can be verified.",
            )
    bars = Progress(
        TextColumn("hashing"),
        BarColumn(),
        DownloadColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with bars:
        task = bars.add_task("hashing", total=sum(total_bytes(f) for f in folders))
        checks = [c for f in folders for c in verify_folder(f, lambda n: bars.advance(task, n))]
    table = Table(title="sfr download verify", title_justify="left")
    for column in ("artefact", "file", "status", "digest from"):
        table.add_column(column)
    for check in checks:
        colour = "green" if check.ok else "red"
        table.add_row(
            escape(check.artefact),
            str(check.path),
            f"[{colour}]{check.status}[/]",
            check.digest_from or "",
        )
    console.print(table)
    learnt = sum(check.digest_from == "first download" for check in checks)
    if learnt:
        console.print(
            f"{learnt} of {len(checks)} files are checked against the digest learnt when they "
            "were first downloaded (no published digest exists): a match shows the file did "
            "not change since, not that the download was the published file.",
            highlight=False,
        )
    bad = [check for check in checks if not check.ok]
    if bad:
        names = " ".join(dict.fromkeys(check.artefact for check in bad))
        unfinished = " ".join(
            dict.fromkeys(check.artefact for check in bad if check.status == "interrupted")
        )
        damaged = " ".join(
            dict.fromkeys(check.artefact for check in bad if check.status != "interrupted")
        )
        hints = []
        if unfinished:
            hints.append(
                f"Complete the interrupted install{'s' if ' ' in unfinished else ''} by running "
                f"the same download again, without --force: sfr download get {unfinished}."
            )
        if damaged:
            hints.append(
                f"Fetch the others again: sfr download get {damaged} --force."
                if unfinished
                else f"Fetch them again: sfr download get {damaged} --force."
            )
        raise SfrError(
            f"{len(bad)} of {len(checks)} installed files "
            + ("are not complete or " if unfinished else "")
            + f"failed verification ({names.replace(' ', ', ')}).",
            hint=" ".join(hints) + " (with the same --data/--runs)",
        )
    console.print(f"All {len(checks)} installed files match their manifests.", highlight=False)
