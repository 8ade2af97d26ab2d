"""`sfr predict`: the actions a model anticipates at one moment of one video."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from sfr.cli.branch_stage import DataOpt
from sfr.cli.common import console, device_option, user_errors
from sfr.eval.anticipate import anticipate
from sfr.models.trained import load_model


@user_errors
def predict(
    model: Annotated[Path, typer.Argument(help="Run folder, fusion folder, checkpoint or bundle.")],
    data: DataOpt,
    video: Annotated[str, typer.Option(help="Video id, as in the feature keys (P01_01).")],
    at: Annotated[float, typer.Option(help="The moment (seconds into the video) to anticipate.")],
    top: Annotated[int, typer.Option(min=1, help="Actions listed per anticipation time.")] = 5,
    device: Annotated[str, device_option()] = "auto",
) -> None:
    """Print the top anticipated actions at every anticipation time before `--at`."""
    trained = load_model(model)
    result = anticipate(trained, data, video, at, k=top, device=device)
    table = Table(
        title=f"{video} at {at:g} s — {trained.name}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for name in ("τ", "rank", "action", "verb", "noun", "probability"):
        table.add_column(name, justify="right" if name in ("τ", "rank", "probability") else "left")
    for seconds, candidates in zip(result.times, result.candidates, strict=True):
        for rank, c in enumerate(candidates, start=1):
            table.add_row(
                f"{seconds:g}s" if rank == 1 else "",
                str(rank),
                f"{c.action} {c.action_name}".strip(),
                f"{c.verb} {c.verb_name}".strip(),
                f"{c.noun} {c.noun_name}".strip(),
                f"{c.probability:.3f}",
            )
        table.add_section()
    console.print(table)
    listed = len(result.candidates[0]) if result.candidates else 0
    if listed < result.requested:
        console.print(
            f"[dim]--top {result.requested} asks for more actions than the model knows: "
            f"all {listed} are listed.[/]"
        )
    if not result.names_from:
        console.print(
            "[dim]Verb and noun names appear when the EPIC class lists (EPIC_verb_classes.csv, "
            "EPIC_noun_classes.csv or the EPIC_100_ ones) are in the data folder.[/]"
        )
