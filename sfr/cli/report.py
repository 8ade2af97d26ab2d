"""`sfr report`: render a saved report.json again (Markdown, HTML and plots)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sfr.cli.common import console, user_errors
from sfr.eval.report import read_report, write_report


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
) -> None:
    """Render report.md, report.html and plots/*.png again from a report.json."""
    doc = read_report(source)
    folder = source if source.is_dir() else source.parent
    files = write_report(doc, out if out is not None else folder)
    console.print(f"Wrote {len(files.all())} files:", highlight=False)
    for path in files.all():
        console.print(f"  {path}", highlight=False, soft_wrap=True)
