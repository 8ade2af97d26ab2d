"""The root `sfr` application: wires the subcommands together, nothing else."""

from __future__ import annotations

from typing import Annotated

import typer

from sfr import __version__
from sfr.cli.common import SfrGroup, console
from sfr.cli.convert import convert
from sfr.cli.demo import demo
from sfr.cli.download import download_app
from sfr.cli.export import export
from sfr.cli.features import features_app
from sfr.cli.finetune import finetune
from sfr.cli.fuse import fuse
from sfr.cli.pipeline import pipeline
from sfr.cli.predict import predict
from sfr.cli.report import report
from sfr.cli.synth import synth
from sfr.cli.train_branch import train_branch
from sfr.cli.validate import validate

app = typer.Typer(
    name="sfr",
    help="Slow-Fast Rolling-Unrolling LSTMs for egocentric action anticipation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    cls=SfrGroup,
)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"sfr {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Slow-Fast Rolling-Unrolling LSTMs for egocentric action anticipation."""


app.command("demo")(demo)
app.command("synth")(synth)
app.command("train-branch")(train_branch)
app.command("finetune")(finetune)
app.command("fuse")(fuse)
app.command("pipeline")(pipeline)
app.add_typer(download_app, name="download")
app.add_typer(features_app, name="features")
app.command("convert")(convert)
app.command("report")(report)
app.command("validate")(validate)
app.add_typer(export)
app.command("predict")(predict)


def main() -> None:
    app()
