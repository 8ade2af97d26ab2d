"""The root `sfr` application: wires the subcommands together, nothing else."""

from __future__ import annotations

import typer

from sfr.cli.demo import demo
from sfr.cli.finetune import finetune
from sfr.cli.fuse import fuse
from sfr.cli.pipeline import pipeline
from sfr.cli.synth import synth
from sfr.cli.train_branch import train_branch

app = typer.Typer(
    name="sfr",
    help="Slow-Fast Rolling-Unrolling LSTMs for egocentric action anticipation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command("demo")(demo)
app.command("synth")(synth)
app.command("train-branch")(train_branch)
app.command("finetune")(finetune)
app.command("fuse")(fuse)
app.command("pipeline")(pipeline)


def main() -> None:
    app()
