"""`sfr report`: render a saved report.json again (Markdown, HTML and plots)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sfr.cli.common import console, force_option, user_errors
from sfr.errors import counted
from sfr.eval.report import claim_report_folder, read_report, write_report


@user_errors
def report(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="REPORT",
            help="A report.json written by `sfr validate --report`, or its folder.",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder to write to (default: the folder of REPORT)."),
    ] = None,
    force: Annotated[
        bool, force_option("Replace a report in --out (its report and plot files only)", False)
    ] = False,
) -> None:
    """Render report.md, report.html and plots/*.png again from a report.json.

    Its own folder is rendered again in place; another --out holding a report needs --force.
    """
    folder = source if source.is_dir() else source.parent
    target = out if out is not None else folder
    same = target.exists() and target.resolve() == folder.resolve()
    claim_report_folder(target, force or same)  # before reading and drawing anything
    doc = read_report(source)
    files = write_report(doc, target)
    console.print(f"Wrote {counted(len(files.all()), 'file')}:", highlight=False)
    for path in files.all():
        console.print(f"  {path}", highlight=False, soft_wrap=True)
