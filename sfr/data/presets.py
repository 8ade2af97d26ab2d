"""The published EK55 presets adapted to a synthetic dataset, so that they run without overrides.

`sfr synth --out OUT` writes `OUT/configs/<preset>.toml`: each published EK55 preset (package data
`sfr/configs/ek55/`, read through the installed package, never a source checkout) with its
`[data]` section set to the synthetic data (its class count, its feature sizes, and
`name = "synthetic"` so that its runs stay apart from real EK55 runs). Every other setting is
the published one.
"""

from __future__ import annotations

import re
from pathlib import Path

from sfr.config import PRESETS, BranchRunConfig, FusionRunConfig, load_config
from sfr.errors import ConfigError
from sfr.files import atomic_write_text

PUBLISHED_PRESETS = PRESETS / "ek55"
SYNTHETIC_RUN_NAME = "synthetic"
_NUM_CLASSES_LINE = re.compile(r"^num_classes = \d+$", re.M)


def adapt_preset(text: str, num_classes: int, dims: dict[str, int]) -> str:
    """A preset's TOML text with its `data.num_classes` line replaced by the synthetic data's
    class count, feature sizes and run name (comments and every other line kept)."""
    if len(_NUM_CLASSES_LINE.findall(text)) != 1:
        raise ConfigError("A published preset lacks its `num_classes = N` line in [data].")
    sizes = ", ".join(f"{modality} = {dim}" for modality, dim in dims.items())
    data = (
        f"num_classes = {num_classes}\n"
        f"feature_dims = {{ {sizes} }}\n"
        f'name = "{SYNTHETIC_RUN_NAME}"  # runs go to RUNS/{SYNTHETIC_RUN_NAME}/...'
    )
    return _NUM_CLASSES_LINE.sub(lambda _: data, text)


def preset_names(source: Path = PUBLISHED_PRESETS) -> frozenset[str]:
    """The file names `write_synthetic_presets` writes under `DATA/configs/` (the published
    presets' names; none without published presets)."""
    return frozenset(p.name for p in source.glob("*.toml")) if source.is_dir() else frozenset()


def write_synthetic_presets(
    data_dir: Path, num_classes: int, dims: dict[str, int], source: Path = PUBLISHED_PRESETS
) -> list[Path]:
    """Write `data_dir/configs/*.toml`, each checked by loading it; [] without published presets
    (`source` holds none).

    Raises ConfigError if an adapted preset does not validate.
    """
    if not source.is_dir():
        return []
    target = Path(data_dir) / "configs"
    written = []
    for preset in sorted(source.glob("*.toml")):
        text = preset.read_text(encoding="utf-8")
        text = text.replace(f"configs/ek55/{preset.name}", str(target / preset.name))
        text = text.replace("--data DATA", f"--data {data_dir}")
        path = target / preset.name
        atomic_write_text(path, adapt_preset(text, num_classes, dims))
        load_config(FusionRunConfig if "[model]" in text else BranchRunConfig, path)
        written.append(path)
    return written
