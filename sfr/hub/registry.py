"""The registry of downloadable artefacts: a typed view of `registry.toml`, and its selections.

Each artefact names where it comes from (one or more https addresses, tried in order), what it
weighs when known, its sha256 when known, where it lands (a path relative to a dataset folder or
to the runs folder) and what happens after the download (nothing, unzip, or conversion of a
published checkpoint). The data file is validated on load, so a typo fails loudly, not later.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import PurePosixPath
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sfr.errors import ConfigError, SfrError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DatasetName = Literal["ek55", "ek100", "egtea"]
DATASETS: tuple[str, ...] = ("ek55", "ek100", "egtea")
Root = Literal["data", "runs"]
Kind = Literal["annotations", "class-names", "features", "pretrained", "backbone", "detections"]
Task = Literal["anticipation", "early_recognition"]
TASKS: tuple[str, ...] = ("anticipation", "early_recognition")
FEATURE_MODALITIES: tuple[str, ...] = ("rgb", "flow", "obj")


class _Strict(BaseModel):
    """A registry record: unknown keys are errors, values are frozen once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoPostProcessing(_Strict):
    """The downloaded file is used as it is."""

    kind: Literal["none"] = "none"


class Unzip(_Strict):
    """The download is a zip archive, extracted safely into `dest` and then deleted.

    When every member sits under one top-level folder, that folder is stripped.
    """

    kind: Literal["unzip"]


class Convert(_Strict):
    """The download is a published RU-LSTM checkpoint, converted once into sfr's run layout."""

    kind: Literal["convert"]
    dataset: DatasetName
    modality: Literal["rgb", "flow", "obj", "fusion"]
    task: Task


PostProcessing = Annotated[NoPostProcessing | Unzip | Convert, Field(discriminator="kind")]


class Artefact(_Strict):
    """One downloadable file: addresses, expected size and digest, destination, post-processing."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    description: str = Field(min_length=1)
    kind: Kind
    dataset: DatasetName | None = None
    modality: Literal["rgb", "flow", "obj", "fusion"] | None = None
    variant: Literal["sparse", "full"] | None = None
    urls: list[str] = Field(min_length=1)
    size: int | None = Field(None, gt=0, description="exact size in bytes, checked")
    approx_size: int | None = Field(None, gt=0, description="published rough size, shown only")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    root: Root
    dest: str
    post: PostProcessing = NoPostProcessing()

    @field_validator("urls")
    @classmethod
    def _https_only(cls, urls: list[str]) -> list[str]:
        """Published addresses are https (a mirror may be http; it is applied later)."""
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme != "https" or not parts.netloc or not parts.path.strip("/"):
                raise ValueError(f"{url!r} is not an https address of a file")
            if "@" in parts.netloc:
                raise ValueError(f"{url!r} carries user information; registry addresses are public")
        return urls

    @field_validator("dest")
    @classmethod
    def _relative_dest(cls, dest: str) -> str:
        """A destination stays inside its root folder."""
        path = PurePosixPath(dest)
        if not dest or "\\" in dest or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"{dest!r} must be a relative path without '..' or backslashes")
        return dest

    @model_validator(mode="after")
    def _consistent(self) -> Artefact:
        """Dataset-folder artefacts name their dataset; only archives install into the root."""
        if self.root == "data" and self.dataset is None:
            raise ValueError("an artefact installed in a dataset folder needs a dataset")
        if PurePosixPath(self.dest) == PurePosixPath(".") and self.post.kind != "unzip":
            raise ValueError("only an unzipped archive may install into the folder itself")
        return self

    @property
    def url(self) -> str:
        """The primary address (the others are fallbacks)."""
        return self.urls[0]

    @property
    def archive_name(self) -> str:
        """File name of the download itself (the last segment of the primary address)."""
        return PurePosixPath(urlsplit(self.url).path).name


class Registry(_Strict):
    """Every known artefact, in the order of the data file."""

    artefacts: list[Artefact] = Field(alias="artefact", min_length=1)

    @field_validator("artefacts")
    @classmethod
    def _unique_names(cls, artefacts: list[Artefact]) -> list[Artefact]:
        """Names are how users and manifests refer to artefacts: no two alike."""
        seen: set[str] = set()
        for artefact in artefacts:
            if artefact.name in seen:
                raise ValueError(f"artefact name {artefact.name!r} appears twice")
            seen.add(artefact.name)
        return artefacts

    @property
    def names(self) -> list[str]:
        """Every artefact name, in registry order."""
        return [artefact.name for artefact in self.artefacts]

    def get(self, name: str) -> Artefact:
        """The artefact called `name`; an unknown name is an error that lists the known ones."""
        for artefact in self.artefacts:
            if artefact.name == name:
                return artefact
        raise SfrError(
            f"Unknown artefact {name!r}.",
            hint=f"Known artefacts: {', '.join(self.names)} (see `sfr download list`).",
        )

    def annotations(self, dataset: str, *, class_names: bool = False) -> list[Artefact]:
        """The annotation CSVs of a dataset, with the verb/noun class names when asked."""
        dataset = check_choice("dataset", dataset, DATASETS)
        kinds = {"annotations", "class-names"} if class_names else {"annotations"}
        return [a for a in self.artefacts if a.dataset == dataset and a.kind in kinds]

    def features(
        self, dataset: str, modalities: Sequence[str] = (), *, full: bool = False
    ) -> list[Artefact]:
        """The feature stores of a dataset: per modality for EK55/EK100, one archive for EGTEA.

        EK55 has a sparse (alpha 0.25 frames) and a full variant; EK100 was published full only,
        so `full` is implied there.
        """
        dataset = check_choice("dataset", dataset, DATASETS)
        stores = [a for a in self.artefacts if a.kind == "features" and a.dataset == dataset]
        if all(a.modality is None for a in stores):
            if modalities or full:
                raise SfrError(
                    f"The {dataset} features come as one archive holding every modality "
                    "at the full frame rate.",
                    hint=f"Run `sfr download features {dataset}` without --modality/--full.",
                )
            return stores
        variants = {a.variant for a in stores}
        variant = "full" if full or "sparse" not in variants else "sparse"
        chosen = [check_choice("modality", m, FEATURE_MODALITIES) for m in modalities]
        wanted = chosen or list(FEATURE_MODALITIES)
        return [
            a
            for m in dict.fromkeys(wanted)
            for a in stores
            if a.modality == m and a.variant == variant
        ]

    def pretrained(self, dataset: str, task: str = "all") -> list[Artefact]:
        """The published RU-LSTM checkpoints of a dataset for one task or for every task."""
        dataset = check_choice("dataset", dataset, DATASETS)
        published = [
            a
            for a in self.artefacts
            if a.kind == "pretrained" and isinstance(a.post, Convert) and a.dataset == dataset
        ]
        tasks = sorted({a.post.task for a in published if isinstance(a.post, Convert)})
        if not published:
            raise SfrError(f"No RU-LSTM checkpoints were published for {dataset}.")
        if task == "all":
            return published
        task = check_choice("task", task, (*TASKS, "all"))
        if task not in tasks:
            raise SfrError(
                f"No {task} checkpoints were published for {dataset}.",
                hint=f"Published for {dataset}: {', '.join(tasks)}.",
            )
        return [a for a in published if isinstance(a.post, Convert) and a.post.task == task]


def check_choice(what: str, value: str, choices: Iterable[str]) -> str:
    """`value` if it is one of `choices`, else an error that lists them."""
    options = list(choices)
    if value not in options:
        raise SfrError(f"Unknown {what} {value!r}.", hint=f"Valid: {', '.join(options)}.")
    return value


def parse_registry(text: str, source: str = "registry.toml") -> Registry:
    """Validate a registry data file's text (extra keys, bad URLs and paths are refused)."""
    try:
        return Registry.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source} is not valid TOML: {error}") from None
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"{source} is not a valid artefact registry: {problems}") from None


def load_registry() -> Registry:
    """The registry shipped with sfr (`sfr/hub/registry.toml`)."""
    data = resources.files("sfr.hub").joinpath("registry.toml")
    return parse_registry(data.read_text(encoding="utf-8"), source=str(data))
