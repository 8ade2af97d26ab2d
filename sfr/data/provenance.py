"""What made a feature store: the small JSON record `sfr features` writes beside `data.mdb`.

`DATA/rgb/sfr-features.json` names the backbone, the weights (file name and sha256), the
preprocessing, the frame rate of the keys, the vector dimension, the layout (every frame, or the
frames of some time grids) and, per video, how far the extraction got. It is what keeps two
extractions from being mixed in one store (DESIGN §7), what `sfr train-branch` reads the feature
dimension from when a config sets none, and what lets a killed extraction resume. Public stores
have no record: everything here treats a missing record as "unknown", never as an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sfr.errors import DataError
from sfr.files import atomic_write_text

RECORD_NAME = "sfr-features.json"
SCHEMA = "sfr-features/1"


class VideoProgress(BaseModel):
    """How much of one video a store holds: frames written and whether the video is complete."""

    model_config = ConfigDict(extra="forbid")

    frames: int = Field(0, ge=0, description="vectors of this video in the store")
    complete: bool = False
    layout: str = Field("full", description="the plan it is complete for: full, full@Nfps, grids")
    decoder: str | None = Field(None, description="pyav or torchcodec for a video file")


class StoreRecord(BaseModel):
    """The provenance of one feature store (schema `sfr-features/1`)."""

    model_config = ConfigDict(extra="forbid")

    schema_: str = Field(SCHEMA, alias="schema")
    sfr_version: str
    created: str
    updated: str
    modality: Literal["rgb", "flow", "obj"]
    dim: int = Field(ge=1)
    fps: float = Field(30.0, gt=0, description="frame rate of the frame numbers in the keys")
    backbone: str
    weights: dict[str, Any] | None = Field(None, description="file name and sha256 of the weights")
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    layouts: list[str] = Field(default_factory=list, description="full, full@Nfps, grid specs")
    videos: dict[str, VideoProgress] = Field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What must agree for two extractions to share a store."""
        sha = (self.weights or {}).get("sha256")
        return {
            "modality": self.modality,
            "dim": self.dim,
            "fps": self.fps,
            "backbone": self.backbone,
            "weights.sha256": sha,
            "preprocessing": self.preprocessing,
        }

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True), indent=2, sort_keys=True) + "\n"


def now() -> str:
    """UTC time stamp of records."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_path(store: Path) -> Path:
    return Path(store) / RECORD_NAME


def read_record(store: Path) -> StoreRecord | None:
    """The record of the store folder `store`, None when it has none (public stores).

    Raises DataError when the file exists but is not a valid record.
    """
    path = record_path(store)
    if not path.is_file():
        return None
    try:
        return StoreRecord.model_validate_json(path.read_bytes())
    except OSError as error:
        raise DataError(f"Cannot read {path}: {error.strerror or error}.") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise DataError(
            f"{path} is not a valid feature-store record ({where}: {first['msg']}).",
            "Restore the file, or delete it if you know what made the store.",
        ) from None


def write_record(store: Path, record: StoreRecord) -> None:
    """Write the record atomically (a kill leaves the old record or the new one)."""
    record.updated = now()
    atomic_write_text(record_path(store), record.to_json())


def check_same_maker(existing: StoreRecord, new: StoreRecord, store: Path) -> None:
    """Refuse to add vectors made another way to a store: DataError naming the first difference."""
    old, fresh = existing.identity(), new.identity()
    for field, value in old.items():
        if fresh[field] != value:
            raise DataError(
                f"The store {store} was made with {field} = {_show(value)}; this extraction has "
                f"{field} = {_show(fresh[field])}. Vectors made two ways are never mixed in one "
                "store.",
                "Write to another --out folder (or delete the store to start over).",
            )


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else repr(value)


def recorded_dim(store: Path) -> int | None:
    """The vector dimension recorded beside a store, None for a store without record."""
    record = read_record(store)
    return None if record is None else record.dim


def fill_recorded_dims(
    feature_dims: dict[str, int], data_dir: Path, modalities: Iterable[str]
) -> dict[str, int]:
    """`feature_dims` completed, for each modality it does not set, with the dimension recorded
    beside `data_dir/<modality>` by `sfr features` (stores without a record keep the default)."""
    out = dict(feature_dims)
    for modality in modalities:
        if modality not in out:
            dim = recorded_dim(Path(data_dir) / modality)
            if dim is not None:
                out[modality] = dim
    return out
