"""`sfr export`: challenge submissions and self-contained model bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sfr import __version__
from sfr.cli.branch_stage import DataOpt
from sfr.cli.common import SamplingOpt, console, sample_bars, user_errors
from sfr.eval.submission import SupervisionLevels, make_submission
from sfr.files import atomic_write_text, check_output_file, json_text, refuse_existing
from sfr.models.trained import export_bundle, load_model

export = typer.Typer(
    name="export",
    help="Write challenge submissions and self-contained model bundles.",
    no_args_is_help=True,
)
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace OUT if it exists (only that file is replaced).")
]
ModelArg = Annotated[
    Path,
    typer.Argument(
        help="Run folder (…/finetune, a fusion unit or a whole fusion folder) or checkpoint."
    ),
]


@export.command("submission")
@user_errors
def submission(
    model: ModelArg,
    out: Annotated[Path, typer.Argument(help="The challenge JSON file to write.")],
    data: DataOpt,
    split: Annotated[
        str,
        typer.Option(help="EK55: test_seen, test_unseen or validation; EK100: test or validation."),
    ] = "test_seen",
    time: Annotated[
        float, typer.Option(help="Anticipation time (s) of the submitted scores.")
    ] = 1.0,
    sls_pt: Annotated[int, typer.Option(help="Supervision level: pre-training.")] = 1,
    sls_tl: Annotated[int, typer.Option(help="Supervision level: training labels.")] = 4,
    sls_td: Annotated[int, typer.Option(help="Supervision level: training data.")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="Segments per inference batch.")] = 128,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    sampling: SamplingOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write the EPIC-KITCHENS anticipation challenge JSON: one entry per id of the split."""
    check_output_file(out, "output file")
    refuse_existing(out, "submission file", force)  # before the inference, not after it
    trained = load_model(model).use_sampling(sampling)
    bars = sample_bars()
    with bars:
        task = bars.add_task("scoring", total=None)
        document = make_submission(
            trained,
            data,
            split,
            time=time,
            sls=SupervisionLevels(sls_pt, sls_tl, sls_td),
            batch_size=batch_size,
            device=device,
            progress=lambda done, total: bars.update(task, completed=done, total=total),
        )
    atomic_write_text(out, json_text(document, f"The submission for {out}", indent=1))
    console.print(
        f"Wrote {out}: {len(document['results'])} {split} segments, version {document['version']}, "
        f"scores at τ = {time:g} s from {trained.name}.",
        highlight=False,
    )


@export.command("model")
@user_errors
def model_bundle(
    model: ModelArg,
    out: Annotated[Path, typer.Argument(help="The .safetensors bundle to write.")],
    force: ForceOpt = False,
) -> None:
    """Write one file with every weight of every level and the config (`sfr.load_model` reads it)."""
    check_output_file(out, "output file")
    refuse_existing(out, "bundle", force)
    trained = load_model(model)
    export_bundle(trained, out, __version__)
    size = out.stat().st_size / 2**20
    console.print(
        f"Wrote {out} ({size:.1f} MiB): {trained.description}; load it with sfr.load_model(path).",
        highlight=False,
    )
