"""`sfr convert`: a published RU-LSTM `.pth.tar` checkpoint into an sfr safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sfr.cli.common import console, force_option, user_errors
from sfr.config import FusionRunConfig
from sfr.errors import counted
from sfr.hub.convert import PartInstalled, conversion_run, convert_checkpoint
from sfr.hub.slowfast import KIND_TEXT


def describe(converted: dict[str, Any], stage: str) -> str:
    """One line saying what was inferred from a published checkpoint."""
    inferred = converted["inferred"]
    layout = converted.get("layout")
    if layout is not None and layout != "branch":
        dims = ", ".join(f"{m} {d}" for m, d in inferred["feat_dims"].items())
        published = ", ".join(
            f"{key} {converted[key]:g}"
            for key in ("epoch", "perf", "best_perf")
            if converted[key] is not None
        )
        return (
            f"{KIND_TEXT[layout]} of {inferred['branches']} branches (features {dims}), hidden "
            f"{inferred['hidden']}, {inferred['num_classes']} classes; rates "
            f"{', '.join(inferred['rates'])} (unit {stage})"
            + (f"; published {published}" if published else "")
            + "."
        )
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
    if layout == "branch":
        what = f"{KIND_TEXT[layout]}: {what}"
    if converted["task"] == "early_recognition":
        grid = (
            f"early recognition over {counted(inferred['s_ant'], 'frame')} spread over the action"
        )
    else:
        grid = (
            f"anticipation at alpha {inferred['alpha']:g}, "
            f"{inferred['s_enc']} + {counted(inferred['s_ant'], 'step')}"
        )
    return (
        f"{what}, hidden {inferred['hidden']}, {inferred['num_classes']} classes; "
        f"{grid} (stage {stage})" + (f"; published {published}" if published else "") + "."
    )


@user_errors
def convert(
    source: Annotated[
        Path, typer.Argument(help="A published RU-LSTM or Slow-Fast RU-LSTM checkpoint (.pth.tar).")
    ],
    out: Annotated[
        Path | None,
        typer.Argument(help="The .safetensors checkpoint to write (or use --into)."),
    ] = None,
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
    rates: Annotated[
        list[str] | None,
        typer.Option(
            "--rates",
            help="Slow-Fast checkpoints: one ALPHA:S_ENC:S_ANT per rate, fastest first, as the "
            "published --alphas_fused/--S_enc_fused/--S_ant_fused (default: from the file name).",
        ),
    ] = None,
    into: Annotated[
        Path | None,
        typer.Option(
            "--into",
            help="Install as the finished stage in this runs folder (for sfr fuse / pipeline / "
            "validate) instead of writing OUT.",
        ),
    ] = None,
    force: Annotated[
        bool, force_option("Replace OUT, or the run installed in --into, if it exists")
    ] = False,
) -> None:
    """Convert a published RU-LSTM or Slow-Fast RU-LSTM checkpoint for sfr.load_model.

    Recognised layouts: RU-LSTM branch and MATT fusion; Slow-Fast per-rate branch, per-rate MATT,
    single-modality slow-fast model, Architecture 1 and 2 whole models. Examples:
    sfr convert RULSTM-anticipation_0.25_6_8_rgb_best.pth.tar rgb.safetensors --modality rgb
    sfr convert RULSTM-anticipation_0.125_24_16_0.5_6_4_fusion_best.pth.tar --into runs
    """
    parts: list[PartInstalled] = []
    conversion = convert_checkpoint(
        source,
        out,
        rates=rates or (),
        into=into,
        dataset=dataset,
        modality=modality,
        alpha=alpha,
        s_enc=s_enc,
        s_ant=s_ant,
        task=task,
        sequence_completion=sequence_completion,
        force=force,
        on_part=parts.append,
    )
    console.print(
        f"{source.name}: {describe(conversion.converted, conversion.stage)}", highlight=False
    )
    dropped = conversion.converted.get("dropped") or []
    if dropped:
        console.print(
            f"Dropped {len(dropped)} unused fast_slow_fusion weights (no forward pass of the "
            f"published code uses them): {', '.join(dropped[:2])}{', …' if len(dropped) > 2 else ''}.",
            highlight=False,
        )
    digest = conversion.converted["sha256"][:12]
    if into is not None:
        run = conversion_run(conversion, into)
        console.print(
            f"Installed {run.best_path} as a finished {conversion.stage} stage (sha256 of the "
            f"source recorded: {digest}…); sfr fuse, sfr pipeline and sfr validate use it.",
            highlight=False,
        )
        for part in parts:
            if part.kept is None:
                console.print(f"  with {part.label} → {part.path.parent}", highlight=False)
            else:
                console.print(
                    f"  [yellow]{part.label}: kept {part.path.parent} ({part.kept})[/]",
                    highlight=False,
                )
        if isinstance(conversion.config, FusionRunConfig):
            console.print(
                f"sfr validate {run.root.parent} --levels scores every level.", highlight=False
            )
        return
    console.print(
        f"Wrote {out} (sha256 of the source recorded: {digest}…); "
        "load it with sfr.load_model(path) or pass it to sfr validate.",
        highlight=False,
    )
