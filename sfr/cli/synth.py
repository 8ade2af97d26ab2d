"""`sfr synth`: write a synthetic dataset in the public EK55 on-disk format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sfr.cli.common import console, fail, force_option, user_errors
from sfr.data.presets import write_synthetic_presets
from sfr.data.synthetic import SyntheticSpec, write_synthetic
from sfr.errors import counted


@user_errors
def synth(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder to create (LMDB stores + annotation CSVs); required."),
    ] = None,
    out_arg: Annotated[
        Path | None, typer.Argument(metavar="OUT", hidden=True, help="Older spelling of --out.")
    ] = None,
    videos: Annotated[int, typer.Option(help="Training videos.")] = SyntheticSpec.num_videos,
    val_videos: Annotated[int, typer.Option(help="Validation videos.")] = SyntheticSpec.val_videos,
    actions_per_video: Annotated[
        int, typer.Option(help="Actions per video.")
    ] = SyntheticSpec.actions_per_video,
    seed: Annotated[int, typer.Option(help="Random seed.")] = SyntheticSpec.seed,
    force: Annotated[
        bool,
        force_option(
            "Replace an earlier synthetic dataset in --out (refused if it holds files sfr did "
            "not write)",
            folder=False,
        ),
    ] = False,
) -> None:
    """Write a learnable synthetic dataset (slow context + fast cue) in the public format.

    Example: sfr synth --out data/synthetic
    """
    if (out is None) == (out_arg is None):
        raise fail(
            "Give the output folder once: sfr synth --out DIR.",
            "Example: sfr synth --out data/synthetic",
        )
    out = out if out is not None else out_arg
    spec = SyntheticSpec(
        num_videos=videos, val_videos=val_videos, actions_per_video=actions_per_video, seed=seed
    )
    summary = write_synthetic(out, spec, force=force)
    dims = ", ".join(f"{m} {d}" for m, d in summary.dims.items())
    console.print(
        f"Wrote {summary.path}: {summary.rows['training']} training and "
        f"{counted(summary.rows['validation'], 'validation segment')}, "
        f"{counted(summary.num_actions, 'action')}, {counted(summary.frames, 'frame')} per "
        f"modality ({dims}).",
        highlight=False,
    )
    presets = write_synthetic_presets(summary.path, summary.num_actions, summary.dims)
    if presets:
        console.print(
            f"The published EK55 presets, set to this data, are in {presets[0].parent}: e.g. "
            f"sfr pipeline {presets[0].parent / 'sf_arch2.toml'} --data {summary.path}",
            highlight=False,
        )
