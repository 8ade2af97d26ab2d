"""`sfr features rgb|flow|obj|merge`: one's own videos, flow frames or detections → feature stores.

Thin: parses options into a `FeatureRequest` (resolving weights given by registry name), renders
the extraction's progress (a bar per video being decoded, a total with frames/s) and its result.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    TaskID,
)
from rich.table import Table

from sfr.cli.common import (
    USER_ERROR_EXIT,
    console,
    device_option,
    err_console,
    handles_user_errors,
    info_bars,
    precision_option,
)
from sfr.errors import ConfigError
from sfr.features.encoder import resolve_device
from sfr.features.extract import (
    ExtractionEvent,
    ExtractionResult,
    ExtractionStarted,
    FramesWritten,
    VideoFailed,
    VideoFinished,
    VideoNotice,
    VideoStarted,
)
from sfr.features.inputs import InputOptions
from sfr.features.merge import merge_stores
from sfr.features.plan import FramePlan, action_starts, grids_of_config, parse_grid, parse_shard
from sfr.features.request import FeatureRequest, run_request
from sfr.hub.install import DEFAULT_RUNS, Folders
from sfr.hub.registry import load_registry
from sfr.models.backbones.catalog import backbone_names

features_errors = handles_user_errors(
    "Every committed vector is kept: run the same command again to continue where it stopped."
)

features_app = typer.Typer(
    name="features",
    help="Extract feature stores from your own videos (TSN BNInception rgb/flow, SlowFast rgb) "
    "or object detections, in the public LMDB format the rest of sfr reads.",
    no_args_is_help=True,
)

_GRID = re.compile(r"^\d*\.?\d+(e-?\d+)?:\d+:\d+$")

OutOpt = Annotated[Path, typer.Option("--out", help="Store folder to write (DATA/<modality>).")]
VideosOpt = Annotated[
    Path | None,
    typer.Option(
        "--videos",
        help="Folder of video files (.mp4 ...) and/or EPIC frame folders (VIDEO/frame_0000000001.jpg).",
    ),
]
BackboneOpt = Annotated[
    str, typer.Option("--backbone", help=f"One of: {', '.join(backbone_names())}.")
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="Backbone checkpoint: a file, or a name of `sfr download list` (tsn-rgb, tsn-flow, "
        "tsn-rgb-ek100, tsn-flow-ek100, slowfast-r50-kinetics, slowfast-r101-kinetics) "
        "installed under --runs.",
    ),
]
RunsOpt = Annotated[
    Path, typer.Option("--runs", help="Runs folder where `sfr download get` put the weights.")
]
AnnotationsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--annotations",
        help="Annotation CSVs (training.csv validation.csv ...): extract only the frames the "
        "time grids read before their actions (the sparse layout).",
    ),
]
GridsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--grids", help="Time grids ALPHA:S_ENC:S_ANT of the sparse layout (0.125:24:16 0.5:6:4)."
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="A branch or fusion config: the grids of all its branches."),
]
FpsOpt = Annotated[
    float | None,
    typer.Option("--fps", help="Full layout only: keep one frame per 1/FPS s (default all 30)."),
]
VideoOpt = Annotated[
    list[str] | None, typer.Option("--video", help="Only these videos (repeat the option).")
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="I/N: the I-th of N shards of the videos (1-based); merge the shard stores with "
        "`sfr features merge`.",
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Clips per forward pass.")]
WorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers", min=1, help="Worker threads decoding videos (videos decoded at once)."
    ),
]
DeviceOpt = Annotated[str, device_option()]
PrecisionOpt = Annotated[
    str, precision_option("fp32, or on CUDA bf16/fp16 (autocast; stored as float32).")
]
BackendOpt = Annotated[
    str, typer.Option("--backend", help="Video decoder: pyav, or torchcodec if installed.")
]
SourceFpsOpt = Annotated[
    float | None,
    typer.Option(
        "--source-fps",
        help="Frame rate of the frame folders (or detection files) when not 30: their frames are "
        "re-timed to 30 fps keys as videos are (video files carry their own timing).",
    ),
]
RestArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="More annotation CSVs or grids, as in --annotations a.csv b.csv --grids 0.5:6:4 0.125:24:16.",
        show_default=False,
    ),
]


def _preprocessing_overrides(
    short_side: int | None,
    crop: int | None,
    mean: str | None,
    std: str | None,
    clip_frames: int | None,
    clip_stride: int | None,
) -> dict[str, object]:
    def floats(text: str | None, flag: str) -> tuple[float, ...] | None:
        if text is None:
            return None
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise ConfigError(f"{flag} {text!r} is not comma-separated numbers.") from None
        return values * 3 if len(values) == 1 else values  # one value for the 3 rgb channels

    return {
        "short_side": short_side,
        "crop": crop,
        "mean": floats(mean, "--mean"),
        "std": floats(std, "--std"),
        "clip_frames": clip_frames,
        "clip_stride": clip_stride,
    }


def _plan(
    annotations: list[Path] | None,
    grids: list[str] | None,
    config: Path | None,
    fps: float | None,
    rest: list[str] | None,
) -> FramePlan:
    """The frame plan from the options; trailing values are more CSVs or grids."""
    csvs = list(annotations or [])
    grid_texts = [g for item in grids or [] for g in item.split(",") if g]
    for value in rest or []:
        if _GRID.match(value):
            grid_texts.append(value)
        elif value.lower().endswith(".csv"):
            csvs.append(Path(value))
        else:
            raise ConfigError(
                f"Unexpected argument {value!r}: not an annotation CSV nor a grid ALPHA:S_ENC:S_ANT."
            )
    parsed = [parse_grid(g) for g in grid_texts]
    key_fps = 30.0
    if config is not None:
        from_config, key_fps = grids_of_config(config)
        parsed += from_config
    if parsed and not csvs:
        raise ConfigError(
            "The sparse layout (--grids or --config) needs the annotations whose actions the "
            "grids read before: --annotations training.csv validation.csv.",
            "Without --grids and --config, every frame is extracted (the full layout).",
        )
    if bool(csvs) != bool(parsed):
        raise ConfigError(
            "The sparse layout needs both the annotations and the grids: --annotations "
            "training.csv validation.csv with --grids 0.125:24:16 (or --config).",
            "Without either, every frame is extracted (the full layout).",
        )
    unique = list(dict.fromkeys(parsed))
    return FramePlan(
        grids=tuple(unique),
        starts=action_starts(csvs) if csvs else {},
        subsample_fps=fps,
        fps=key_fps,
    )


def _weights(value: str | None, runs: Path) -> tuple[Path | None, str | None]:
    """A weights file, or the installed file of a registry artefact (and its name)."""
    if value is None:
        return None, None
    path = Path(value)
    if path.is_file():
        return path, None
    registry = load_registry()
    if value in registry.names:
        artefact = registry.get(value)
        if artefact.kind != "backbone":
            raise ConfigError(f"{value} is a {artefact.kind} artefact, not backbone weights.")
        installed = Folders(runs=runs).of(artefact) / artefact.dest
        if not installed.is_file():
            raise ConfigError(
                f"The weights {value} are not downloaded ({installed} does not exist).",
                f"Fetch them: sfr download get {value} --runs {runs}",
            )
        return installed, value
    what = "is a folder, not a file" if path.is_dir() else "no such file"
    raise ConfigError(
        f"--weights {value}: {what}, and not a backbone name of `sfr download list`.",
        "Pass the checkpoint file (TSN .pth.tar, SlowFast .pyth) or a name such as tsn-rgb.",
    )


class ExtractionView:
    """Rich rendering: a bar per video being extracted, a total line with frames/s."""

    def __init__(self) -> None:
        self.bars = info_bars()
        self.total: TaskID | None = None
        self.videos: dict[str, TaskID] = {}

    def __enter__(self) -> ExtractionView:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def __call__(self, event: ExtractionEvent) -> None:
        bars = self.bars
        if isinstance(event, ExtractionStarted):
            if event.skipped_videos:
                bars.console.print(
                    f"  {_videos(event.skipped_videos)} already complete in the store: skipped"
                )
            self.total = bars.add_task("videos", total=event.videos, info="")
        elif isinstance(event, VideoStarted):
            note = f" ({event.present} already stored)" if event.present else ""
            self.videos[event.video] = bars.add_task(
                f"  {escape(event.video)}{note}", total=event.frames, info=""
            )
        elif isinstance(event, FramesWritten):
            for video, count in event.video_counts.items():
                if video in self.videos:
                    bars.advance(self.videos[video], count)
            if self.total is not None:
                bars.update(
                    self.total,
                    info=f"{event.written:,} frames · {event.frames_per_s:,.1f} frames/s",
                )
        elif isinstance(event, VideoFinished):
            self._end(event.video)
            bars.console.print(
                f"  [green]✓[/] {escape(event.video)}  {event.written:,} frames  "
                f"{event.seconds:.1f} s",
                highlight=False,
            )
        elif isinstance(event, VideoFailed):
            self._end(event.video)
            bars.console.print(
                f"  [red]✗[/] {escape(event.video)}: {escape(event.message)}", highlight=False
            )
        elif isinstance(event, VideoNotice):
            bars.console.print(
                f"  [yellow]![/] {escape(event.video)}: {escape(event.message)}", highlight=False
            )

    def _end(self, video: str) -> None:
        task = self.videos.pop(video, None)
        if task is not None:
            self.bars.remove_task(task)
        if self.total is not None:
            self.bars.advance(self.total, 1)


def _videos(count: int) -> str:
    return f"{count} video" + ("" if count == 1 else "s")


def _report(result: ExtractionResult, out: Path) -> None:
    table = Table(title=f"Feature store {out}", title_justify="left", show_header=False)
    table.add_column()
    table.add_column(justify="right")
    table.add_row("vectors written", f"{result.written:,} × {result.dim}-d ({result.backbone})")
    table.add_row("videos completed", str(len(result.completed)))
    table.add_row("videos already complete", str(len(result.skipped)))
    table.add_row("videos failed", str(len(result.failed)))
    table.add_row("speed", f"{result.frames_per_s:,.1f} frames/s over {result.seconds:.1f} s")
    console.print(table)
    if result.failed:
        for video, message in result.failed:
            err_console.print(f"[red]Failed:[/] {escape(video)}: {escape(message)}")
        err_console.print(
            "[yellow]Hint:[/] fix or remove those inputs and run the same command again; "
            "what was written is kept."
        )
        raise typer.Exit(USER_ERROR_EXIT)


def _run_backbone(
    modality: str,
    out: Path,
    inputs: InputOptions,
    *,
    plan: FramePlan,
    backbone: str,
    weights: str | None,
    runs: Path,
    batch_size: int,
    workers: int,
    device: str,
    precision: str,
    preprocessing: dict[str, Any] | None = None,
) -> None:
    """An rgb or flow extraction through a backbone, as the command line asked for it."""
    path, name = _weights(weights, runs)
    _run(
        FeatureRequest(
            modality=modality,
            out=out,
            inputs=inputs,
            plan=plan,
            backbone=backbone,
            weights=path,
            weights_name=name,
            preprocessing=preprocessing or {},
            batch_size=batch_size,
            workers=workers,
            device=resolve_device(device),
            precision=precision,
        )
    )


def _run(request: FeatureRequest) -> None:
    with ExtractionView() as view:
        result = run_request(request, view)
    _report(result, request.out)


@features_app.command("rgb")
@features_errors
def rgb(
    out: OutOpt,
    videos: VideosOpt = None,
    backbone: BackboneOpt = "tsn-bninception",
    weights: WeightsOpt = None,
    runs: RunsOpt = DEFAULT_RUNS,
    annotations: AnnotationsOpt = None,
    grids: GridsOpt = None,
    config: ConfigOpt = None,
    fps: FpsOpt = None,
    video: VideoOpt = None,
    shard: ShardOpt = None,
    batch_size: BatchOpt = 16,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    short_side: Annotated[
        int | None, typer.Option("--short-side", help="SlowFast: resize short side (256).")
    ] = None,
    crop: Annotated[int | None, typer.Option("--crop", help="SlowFast: centre crop (256).")] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="Per-channel mean, e.g. 0.45.")] = None,
    std: Annotated[str | None, typer.Option("--std", help="Per-channel std, e.g. 0.225.")] = None,
    clip_frames: Annotated[
        int | None, typer.Option("--clip-frames", help="SlowFast: frames per clip (32).")
    ] = None,
    clip_stride: Annotated[
        int | None, typer.Option("--clip-stride", help="SlowFast: frames between them (2).")
    ] = None,
    backend: BackendOpt = "pyav",
    source_fps: SourceFpsOpt = None,
    rest: RestArg = None,
) -> None:
    """RGB features of every frame (or of the frames some time grids read) of your videos.

    Example: sfr features rgb --videos VIDEOS --weights tsn-rgb --out DATA/rgb
    """
    _run_backbone(
        "rgb",
        out,
        InputOptions(
            videos=videos,
            names=video,
            shard=parse_shard(shard),
            backend=backend,
            source_fps=source_fps,
        ),
        plan=_plan(annotations, grids, config, fps, rest),
        backbone=backbone,
        weights=weights,
        runs=runs,
        preprocessing=_preprocessing_overrides(
            short_side, crop, mean, std, clip_frames, clip_stride
        ),
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
    )


@features_app.command("flow")
@features_errors
def flow(
    out: OutOpt,
    videos: VideosOpt = None,
    flow_frames: Annotated[
        Path | None,
        typer.Option(
            "--flow-frames",
            help="Existing flow frames: VIDEO/{u,v}/frame_%010d.jpg, VIDEO/flow_{x,y}/..., or "
            "VIDEO/flow_x_%05d.jpg (instead of computing TV-L1 flow from --videos).",
        ),
    ] = None,
    flow_stride: Annotated[
        int,
        typer.Option(
            "--flow-stride",
            min=1,
            help="Frames per flow frame (EPIC-KITCHENS' published flow frames: 2).",
        ),
    ] = 1,
    flow_height: Annotated[
        int,
        typer.Option("--flow-height", min=16, help="TV-L1: frames resized to this height first."),
    ] = 256,
    backbone: BackboneOpt = "tsn-bninception",
    weights: WeightsOpt = None,
    runs: RunsOpt = DEFAULT_RUNS,
    annotations: AnnotationsOpt = None,
    grids: GridsOpt = None,
    config: ConfigOpt = None,
    fps: FpsOpt = None,
    video: VideoOpt = None,
    shard: ShardOpt = None,
    batch_size: BatchOpt = 16,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    backend: BackendOpt = "pyav",
    source_fps: SourceFpsOpt = None,
    rest: RestArg = None,
) -> None:
    """Optical-flow features: 5 stacked (u, v) pairs ending at each keyed frame (TSN flow).

    Example: sfr features flow --flow-frames FLOW --weights tsn-flow --out DATA/flow
    """
    _run_backbone(
        "flow",
        out,
        InputOptions(
            videos=videos,
            flow_frames=flow_frames,
            names=video,
            shard=parse_shard(shard),
            flow_stride=flow_stride,
            flow_height=flow_height,
            backend=backend,
            source_fps=source_fps,
        ),
        plan=_plan(annotations, grids, config, fps, rest),
        backbone=backbone,
        weights=weights,
        runs=runs,
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
    )


@features_app.command("obj")
@features_errors
def obj(
    out: OutOpt,
    detections: Annotated[
        Path | None,
        typer.Option("--detections", help="Folder of per-video detection files (VIDEO.npy)."),
    ] = None,
    classes: Annotated[
        int, typer.Option("--classes", min=1, help="Object classes (EK55/EK100: 352).")
    ] = 352,
    class_offset: Annotated[
        int,
        typer.Option(
            "--class-offset",
            min=0,
            help="Subtracted from class ids: 1 for detectors whose class 0 is background "
            "(the published EK100 detections).",
        ),
    ] = 0,
    annotations: AnnotationsOpt = None,
    grids: GridsOpt = None,
    config: ConfigOpt = None,
    fps: FpsOpt = None,
    video: VideoOpt = None,
    shard: ShardOpt = None,
    workers: WorkersOpt = 2,
    source_fps: SourceFpsOpt = None,
    rest: RestArg = None,
) -> None:
    """Object features: per frame, the sum of the detection scores of each class (352-d).

    Example: sfr features obj --detections DETECTIONS --out DATA/obj
    """
    _run(
        FeatureRequest(
            modality="obj",
            out=out,
            inputs=InputOptions(
                detections=detections,
                names=video,
                shard=parse_shard(shard),
                classes=classes,
                class_offset=class_offset,
                source_fps=source_fps,
            ),
            plan=_plan(annotations, grids, config, fps, rest),
            batch_size=512,
            workers=workers,
        )
    )


@features_app.command("merge")
@features_errors
def merge(
    out: Annotated[Path, typer.Argument(help="The merged store folder (created if needed).")],
    shards: Annotated[list[Path], typer.Argument(help="Store folders of the shards.")],
) -> None:
    """Merge the stores of `--shard I/N` runs into one store.

    Example: sfr features merge DATA/rgb shard1/rgb shard2/rgb
    """
    result = merge_stores(
        out,
        shards,
        lambda shard, copied: console.print(f"  {escape(str(shard))}: {copied:,} vectors copied"),
    )
    console.print(
        f"Merged {len(shards)} stores into {escape(str(out))}: {result.copied:,} vectors copied, "
        f"{result.present:,} already there, {result.videos} videos.",
        highlight=False,
    )
