"""Safe reading of published RU-LSTM `.pth.tar` checkpoints and mapping of their key layout.

The published files are pickles `{'state_dict', 'epoch', 'perf', 'best_perf'}` whose `perf`
values are numpy float64 scalars. They are read with `torch.load(weights_only=True)`, allowing
exactly the numpy globals such scalars need and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from sfr.checkpoint import NUMPY_SCALAR_GLOBALS, safe_torch_load
from sfr.errors import DataError

# Published branch key -> sfr `RULSTMBranch` key (one-layer LSTMs).
_BRANCH_KEYS = {
    "rolling_lstm.lstm.": "rolling.",
    "unrolling_lstm.": "unrolling.",
    "classifier.1.": "classifier.",
}


def load_published_checkpoint(path: Path) -> dict[str, Any]:
    """The published checkpoint container, loaded without executing arbitrary pickled code."""
    path = Path(path)
    container = safe_torch_load(
        path,
        allowed=NUMPY_SCALAR_GLOBALS,
        what="published RU-LSTM checkpoints hold only tensors and numpy float64 scalars",
        hint="Convert only checkpoints saved by the RU-LSTM code, or re-save the file with "
        "tensors and plain numbers only.",
    )
    if not isinstance(container, dict) or "state_dict" not in container:
        raise DataError(f"{path} holds no 'state_dict': not a published RU-LSTM checkpoint.")
    return container


def branch_state_from_published(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Rename one published RU-LSTM branch's weights (under `prefix`) to `RULSTMBranch` keys."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        for old, new in _BRANCH_KEYS.items():
            if rest.startswith(old):
                out[new + rest[len(old) :]] = value
                break
        else:
            raise DataError(f"Unexpected key '{key}' in a published RU-LSTM branch state dict.")
    return out
