"""One `sfr features rgb|flow|obj` run, as data: what to extract, from what, into which store.

`run_request` builds the encoder (backbone + weights + preprocessing, or detections), the store
record describing it, the jobs and the frame plan, then runs the extraction loop. The CLI only
parses options into a `FeatureRequest` and renders the progress events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfr import __version__
from sfr.data.provenance import StoreRecord, now
from sfr.errors import ConfigError, DataError
from sfr.features.encoder import BackboneEncoder, DetectionEncoder, Encoder, Precision
from sfr.features.extract import (
    ExtractionEvent,
    ExtractionResult,
    VideoJob,
    VideoNotice,
    extract_features,
)
from sfr.features.inputs import InputOptions, video_jobs
from sfr.features.plan import FramePlan
from sfr.files import sha256_file
from sfr.models.backbones.catalog import get_backbone


@dataclass(frozen=True)
class FeatureRequest:
    """Everything one extraction needs.

    `weights` is the checkpoint file of the backbone (None only for obj); `weights_name` the
    registry name it was given by, if any (recorded beside the store with the file's sha256).
    `preprocessing` overrides fields of the backbone's published preprocessing (short_side,
    crop, mean, std, clip_frames, clip_stride).
    """

    modality: str
    out: Path
    inputs: InputOptions
    plan: FramePlan = field(default_factory=FramePlan)
    backbone: str = "tsn-bninception"
    weights: Path | None = None
    weights_name: str | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16
    workers: int = 2
    device: str = "cpu"
    precision: Precision = "fp32"


def plan_request(request: FeatureRequest) -> tuple[Encoder, StoreRecord, list[VideoJob]]:
    """The encoder, the record and the jobs of a request, checked before any work starts."""
    jobs = video_jobs(request.modality, request.inputs)
    if request.modality == "obj":
        encoder: Encoder = DetectionEncoder(request.inputs.classes)
        record = _record(
            request,
            backbone="detections",
            dim=request.inputs.classes,
            weights=None,
            preprocessing={
                "classes": request.inputs.classes,
                "class_offset": request.inputs.class_offset,
                "source_fps": request.inputs.source_fps,
                "feature": "sum of detection scores per class",
            },
        )
        return encoder, record, jobs
    backbone = get_backbone(request.backbone)
    preprocessing = backbone.preprocessing_for(request.modality, request.preprocessing)
    if request.weights is None:
        raise ConfigError(
            f"--weights is needed: the checkpoint of {backbone.name} for {request.modality} "
            f"(a file, or a name such as {backbone.default_weights[request.modality]}).",
        )
    if request.modality == "flow" and request.inputs.flow_stride > 1:
        # Flow frames at 1/stride of the frame rate: 5 consecutive flow frames end at the key.
        preprocessing = preprocessing.replace(clip_stride=request.inputs.flow_stride)
    try:
        weights_sha = sha256_file(request.weights)
    except OSError as error:
        raise DataError(f"Cannot read {request.weights}: {error.strerror or error}.") from None
    encoder = BackboneEncoder(
        backbone,
        request.modality,
        preprocessing,
        request.weights,
        device=request.device,
        precision=request.precision,
    )
    record = _record(
        request,
        backbone=backbone.name,
        dim=backbone.dim,
        weights={
            "name": request.weights_name,
            "file": request.weights.name,
            "sha256": weights_sha,
        },
        preprocessing=preprocessing.to_json()
        | {"source_fps": request.inputs.source_fps}  # frame folders' rate, when not 30
        | ({"flow": _flow_source(request)} if request.modality == "flow" else {}),
    )
    return encoder, record, jobs


def _flow_source(request: FeatureRequest) -> dict[str, Any]:
    if request.inputs.flow_frames is not None:
        return {"source": "flow frames", "stride": request.inputs.flow_stride}
    return {"source": "tv-l1 (opencv)", "bound": 20, "height": request.inputs.flow_height}


def _record(
    request: FeatureRequest,
    *,
    backbone: str,
    dim: int,
    weights: dict[str, Any] | None,
    preprocessing: dict[str, Any],
) -> StoreRecord:
    stamp = now()
    return StoreRecord(
        sfr_version=__version__,
        created=stamp,
        updated=stamp,
        modality=request.modality,  # type: ignore[arg-type]
        dim=dim,
        fps=request.plan.fps,
        backbone=backbone,
        weights=weights,
        preprocessing=preprocessing,
        layouts=request.plan.labels,
    )


def run_request(
    request: FeatureRequest,
    progress: Callable[[ExtractionEvent], None] = lambda event: None,
) -> ExtractionResult:
    """Plan, then extract (see `extract_features` for resuming and failures)."""
    encoder, record, jobs = plan_request(request)
    inputs = request.inputs
    plan = request.plan
    if (
        plan.layout == "sparse"
        and inputs.shard is None
        and not any(plan.keyed(job.name) for job in jobs)
    ):
        raise DataError(
            f"None of the {len(jobs)} input videos has an annotated action in the annotations "
            f"(they name {len(plan.starts)} other videos, e.g. "
            f"{', '.join(sorted(plan.starts)[:3]) or 'none'}): nothing to extract.",
            "Check that the video names (file stems or folder names) are those of the CSVs.",
        )
    if plan.layout == "sparse" and inputs.shard is None and not inputs.names:
        found = {job.name for job in jobs}
        absent = sorted(video for video in request.plan.starts if video not in found)
        if absent:
            shown = ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else "")
            progress(
                VideoNotice(
                    "annotations",
                    f"{len(absent)} annotated videos have no input ({shown}): they get no vectors",
                )
            )
    return extract_features(
        jobs=jobs,
        encoder=encoder,
        plan=request.plan,
        out=request.out,
        record=record,
        batch_size=request.batch_size,
        workers=request.workers,
        progress=progress,
    )
