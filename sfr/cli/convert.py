"""`sfr convert`: a published RU-LSTM `.pth.tar` checkpoint into an sfr safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sfr.cli.common import console, user_errors
from sfr.hub.convert import convert_checkpoint


def describe(converted: dict[str, Any], stage: str) -> str:
    """One line saying what was inferred from a published checkpoint."""
    inferred = converted["inferred"]
    if inferred["modality"] == "fusion":
        dims = ", ".join(f"{m} {d}" for m, d in inferred["feat_dims"].items())
        what = f"MATT fusion of {inferred['branches']} branches (features {dims})"
    else:
        what = f"{inferred['modality']} branch over {inferred['feat_dim']}-d features"
    published = ", ".join(
        f"{key} {converted[key]:g}"
        for key in ("epoch", "perf", "best_perf")
        if converted[key] is not None
    )
    if converted["task"] == "early_recognition":
        grid = f"early recognition over {inferred['s_ant']} frames spread over the action"
    else:
        grid = (
            f"anticipation at alpha {inferred['alpha']:g}, "
            f"{inferred['s_enc']} + {inferred['s_ant']} steps"
        )
    return (
        f"{what}, hidden {inferred['hidden']}, {inferred['num_classes']} classes; "
        f"{grid} (stage {stage})" + (f"; published {published}" if published else "") + "."
    )


@user_errors
def convert(
    source: Annotated[Path, typer.Argument(help="A published RU-LSTM checkpoint (.pth.tar).")],
    out: Annotated[Path, typer.Argument(help="The .safetensors checkpoint to write.")],
    dataset: Annotated[
        str, typer.Option(help="ek55 or ek100: the benchmark the checkpoint was trained on.")
    ] = "ek55",
    modality: Annotated[
        str | None,
        typer.Option(help="rgb, flow or obj, for a branch (352-d features are taken as obj)."),
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Seconds between steps (published: 0.25).")
    ] = None,
    s_enc: Annotated[
        int | None,
        typer.Option("--s-enc", help="Encoding steps (published: 6; early recognition: 0)."),
    ] = None,
    s_ant: Annotated[
        int | None, typer.Option("--s-ant", help="Anticipation steps (published: 8).")
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="anticipation or early_recognition (sets the published grid; default: "
            "early_recognition if the file name says so, as the published names do)."
        ),
    ] = None,
    sequence_completion: Annotated[
        bool | None,
        typer.Option(
            "--sequence-completion/--no-sequence-completion",
            help="A sequence-completion pre-training checkpoint (default: if its file name says "
            "_sequence_completion, as the published code names them).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Convert a published RU-LSTM checkpoint (branch or MATT fusion) for sfr.load_model."""
    conversion = convert_checkpoint(
        source,
        out,
        dataset=dataset,
        modality=modality,
        alpha=alpha,
        s_enc=s_enc,
        s_ant=s_ant,
        task=task,
        sequence_completion=sequence_completion,
        force=force,
    )
    console.print(
        f"{source.name}: {describe(conversion.converted, conversion.stage)}", highlight=False
    )
    console.print(
        f"Wrote {out} (sha256 of the source recorded: {conversion.converted['sha256'][:12]}…); "
        "load it with sfr.load_model(path) or pass it to sfr validate.",
        highlight=False,
    )
