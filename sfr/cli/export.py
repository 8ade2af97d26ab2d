"""`sfr export`: challenge submissions and self-contained model bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sfr import __version__
from sfr.cli.branch_stage import DataOpt
from sfr.cli.common import (
    SamplingOpt,
    console,
    device_option,
    force_option,
    sample_bars,
    user_errors,
)
from sfr.data.observation import position_label
from sfr.errors import ConfigError, counted
from sfr.eval.submission import SupervisionLevels, challenge_split, make_submission
from sfr.files import atomic_write_text, check_output_file, json_text, refuse_existing
from sfr.models.trained import export_bundle, load_model

export = typer.Typer(
    name="export",
    help="Write challenge submissions and self-contained model bundles.",
    no_args_is_help=True,
)
ForceOpt = Annotated[bool, force_option("Replace OUT if it exists", folder=False)]
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
        str | None,
        typer.Option(
            help="EK55: test_seen, test_unseen or validation; EK100: test or validation "
            "(default: test_seen for EK55, test for EK100).",
        ),
    ] = None,
    time: Annotated[
        float,
        typer.Option(
            help="Anticipation time (s) of the submitted scores; early recognition: the observed "
            "ratio (1 = the whole action, as published)."
        ),
    ] = 1.0,
    sls_pt: Annotated[
        int, typer.Option(min=0, max=5, help="Supervision level: pre-training (0-5).")
    ] = 1,
    sls_tl: Annotated[
        int, typer.Option(min=0, max=5, help="Supervision level: training labels (0-5).")
    ] = 4,
    sls_td: Annotated[
        int, typer.Option(min=0, max=5, help="Supervision level: training data (0-5).")
    ] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="Segments per inference batch.")] = 128,
    device: Annotated[str, device_option()] = "auto",
    sampling: SamplingOpt = None,
    with_: Annotated[
        list[Path] | None,
        typer.Option(
            "--with",
            help="Average MODEL with this model too (repeat the option); the published "
            "early-recognition fusion: the rgb run --with the flow and obj runs --ensemble-of scores.",
        ),
    ] = None,
    ensemble_of: Annotated[
        str,
        typer.Option(
            "--ensemble-of",
            help="What --with averages: probabilities, or scores (raw action scores, as the "
            "published early-recognition fusion).",
        ),
    ] = "probabilities",
    force: ForceOpt = False,
) -> None:
    """Write the EPIC-KITCHENS anticipation challenge JSON: one entry per id of the split."""
    if ensemble_of not in ("probabilities", "scores"):
        raise ConfigError(f"--ensemble-of {ensemble_of}: unknown.", "Pass probabilities or scores.")
    check_output_file(out, "output file", ".json")
    refuse_existing(out, "submission file", force)  # before the inference, not after it
    trained = load_model(model).use_sampling(sampling)
    split = split or challenge_split(trained.data.dataset)
    others = [load_model(path).use_sampling(sampling) for path in with_ or []]
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
            ensemble=others,
            mean_of=ensemble_of,  # type: ignore[arg-type]
        )
    atomic_write_text(out, json_text(document, f"The submission for {out}", indent=1))
    console.print(
        f"Wrote {out}: {counted(len(document['results']), f'{split} segment')}, version {document['version']}, "
        f"scores at {_position(time, trained.data.task)} from {trained.name}"
        + (f" and {', '.join(m.name for m in others)} (mean of {ensemble_of})" if others else "")
        + ".",
        highlight=False,
    )


def _position(value: float, task: str) -> str:
    if task == "early_recognition":
        return f"{position_label(value, task)} observed"
    return f"τ = {value:g} s"


@export.command("model")
@user_errors
def model_bundle(
    model: ModelArg,
    out: Annotated[Path, typer.Argument(help="The .safetensors bundle to write.")],
    force: ForceOpt = False,
) -> None:
    """Write one file with every weight of every level and the config (`sfr.load_model` reads it)."""
    check_output_file(out, "output file", ".safetensors")
    refuse_existing(out, "bundle", force)
    trained = load_model(model)
    export_bundle(trained, out, __version__)
    size = out.stat().st_size / 2**20
    console.print(
        f"Wrote {out} ({size:.1f} MiB): {trained.description}; load it with sfr.load_model(path).",
        highlight=False,
    )
