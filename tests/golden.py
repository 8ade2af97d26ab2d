"""Paths and loaders of the golden cases (outputs of the published RU-LSTM code, tests/data/golden)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

GOLDEN = Path(__file__).parent / "data" / "golden"
GOLDEN_DATA = GOLDEN / "data"
BRANCH_CASES = (
    "rulstm_rgb_a0.25_6_8",
    "rulstm_rgb_a0.25_6_8_context",
    "rulstm_rgb_a0.25_6_8_seqcomp",
    "rulstm_rgb_a0.125_24_16",
)
# (S_enc, S_ant) of each branch case: the anticipation steps are the last S_ant.
CASE_GRID = {
    "rulstm_rgb_a0.25_6_8": (6, 8),
    "rulstm_rgb_a0.25_6_8_context": (6, 8),
    "rulstm_rgb_a0.25_6_8_seqcomp": (6, 8),
    "rulstm_rgb_a0.125_24_16": (24, 16),
    "rulstm_fusion_a0.25_6_8": (6, 8),
}


def golden_case(name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(constructor settings, inputs/outputs) of a golden case."""
    meta = json.loads((GOLDEN / name / "meta.json").read_text())
    return meta["ctor"], load_file(str(GOLDEN / name / "io.safetensors"))
