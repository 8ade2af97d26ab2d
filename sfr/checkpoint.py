"""Safetensors checkpoints with their metadata, written atomically (temp file, then rename).

A checkpoint holds tensors (weights, and for resuming optimiser state and RNG state) and a JSON
document in the safetensors metadata under the key `sfr` (config, epoch, metrics). A kill at
any moment leaves either the previous file or the new one, never a torn file.

Epochs in the metadata (`epoch`, and `best_epoch` of a resume checkpoint) are numbered from 1, as
on screen, in status.json and in metrics.jsonl: `"epoch": 3` is the third epoch, `"best_epoch":
null` means no best yet. `"epoch_base": 1` marks such metadata; sfr before it counted from 0 and
wrote no marker, and `read_metadata` renumbers those files when it reads them.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from sfr.errors import DataError, RunError
from sfr.files import atomic_write, missing_reason

METADATA_KEY = "sfr"
# Marks metadata whose epochs are numbered from 1; metadata without it counts them from 0.
EPOCH_BASE_KEY = "epoch_base"


def epochs_from_one(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata with its epochs numbered from 1 and marked so (`EPOCH_BASE_KEY`).

    Metadata without the marker (sfr before it, 0-based) is renumbered: `epoch` + 1, and a
    `best_epoch` of -1 (no best yet) becomes None. Metadata without epochs is returned unchanged.
    """
    if "epoch" not in metadata or metadata.get(EPOCH_BASE_KEY) == 1:
        return metadata
    out = {**metadata, EPOCH_BASE_KEY: 1}
    if isinstance(out["epoch"], int):
        out["epoch"] += 1
    best = out.get("best_epoch")
    if isinstance(best, int):
        out["best_epoch"] = best + 1 if best >= 0 else None
    return out


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write tensors and a JSON-able metadata document as one safetensors file, atomically.

    The only file created beside `path` is sfr's temp file (`atomic_write`), which the next
    command on that output deletes when a kill left it (`remove_stale_temp_files`). Every
    safetensors file sfr writes (run checkpoints, exported bundles, converted checkpoints) is
    written here.

    An `epoch` (and `best_epoch`) in `metadata` must be numbered from 1 (None: no best yet); the
    file records that numbering (`EPOCH_BASE_KEY`).
    """
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if "epoch" in metadata:
        metadata = {**metadata, EPOCH_BASE_KEY: 1}
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}

    def write(tmp: Path) -> None:
        # Serialised in memory, then written into sfr's own temp file: the library's
        # `save_file` would create a temp file of its own beside it (`.tmpXXXXXX`), which a kill
        # mid-write leaves behind, under a name sfr cannot tell from a user's file.
        try:
            data = safetensors.torch.save(contiguous, metadata=header)
        except SafetensorError as error:
            raise OSError(str(error)) from None
        with open(tmp, "wb") as handle:
            handle.write(data)

    atomic_write(path, write)


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata document of a checkpoint, without loading its tensors.

    Epochs are numbered from 1, also in files of sfr versions that counted from 0 (renumbered by
    `epochs_from_one`). Raises RunError for an unreadable file or metadata that is no JSON object.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except SafetensorError as error:
        raise _not_safetensors(Path(path), error) from None
    except OSError as error:
        raise RunError(f"Checkpoint {path} cannot be read: {error.strerror or error}.") from None
    if raw is None:
        raise RunError(f"{path} is a safetensors file without sfr metadata.")
    try:
        metadata = json.loads(raw)
    except ValueError as error:
        metadata = error
    if not isinstance(metadata, dict):
        raise RunError(
            f"The sfr metadata of checkpoint {path} is not a JSON object ({metadata}).",
            "The file is damaged or was not written by sfr: train or export it again.",
        )
    return epochs_from_one(metadata)


def _not_safetensors(path: Path, error: Exception) -> RunError:
    """A file that safetensors cannot parse: empty, damaged or cut short, or another format.

    A file that starts as safetensors do (an 8-byte little-endian header length, then the JSON
    header's `{`) was a checkpoint until it was damaged or truncated: the hint says how to make
    it again (`--force` for a run's best/last checkpoint, export or download for a bundle).
    """
    if path.is_file() and path.stat().st_size == 0:
        what = "is empty (0 bytes)"
    elif _has_safetensors_start(path):
        return RunError(
            f"Checkpoint {path} is damaged or cut short: it starts as a safetensors file but "
            f"cannot be read ({error}).",
            _damaged_hint(path),
        )
    else:
        what = f"is not a safetensors checkpoint ({error})"
    if path.name in RUN_CHECKPOINTS:  # a run's own file: sfr wrote it
        return RunError(f"Checkpoint {path} {what}: it is damaged.", _damaged_hint(path))
    return RunError(
        f"Checkpoint {path} {what}.",
        "Pass a best.safetensors, a run folder or an exported bundle; a published .pth.tar "
        "checkpoint is converted first: sfr convert FILE.pth.tar OUT.safetensors.",
    )


def _has_safetensors_start(path: Path) -> bool:
    """Whether `path` begins with a plausible safetensors header length followed by `{`."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(9)
    except OSError:
        return False
    if len(start) < 9:
        return False
    length = int.from_bytes(start[:8], "little")
    return 2 <= length <= 100_000_000 and start[8:9] == b"{"


RUN_CHECKPOINTS = ("best.safetensors", "last.safetensors")  # a run folder's checkpoints


def _damaged_hint(path: Path) -> str:
    """What to do about a damaged checkpoint, by the role its name gives it (`RUN_CHECKPOINTS`,
    else a bundle)."""
    if path.name == "last.safetensors":
        return (
            "This is the stage's resume checkpoint: start the stage again with --force "
            "(or restore the file from a copy)."
        )
    if path.name == "best.safetensors":
        return (
            f"Train the stage of {path.parent} again with --force (sfr train-branch, finetune or "
            "fuse, as it was made; a converted published checkpoint: sfr convert or sfr download "
            "pretrained again), or restore the file from a copy."
        )
    return "Export this bundle again (sfr export model) or copy or download it again."


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a checkpoint written by `save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"Checkpoint {path} {missing_reason(path)}.")
    metadata = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except SafetensorError as error:
        raise _not_safetensors(path, error) from None
    except OSError as error:
        raise RunError(f"Checkpoint {path} cannot be read: {error.strerror or error}.") from None
    return tensors, metadata


def load_error_summary(error: Exception) -> str:
    """The telling line of a `load_state_dict` error (the first size mismatch or missing key)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "size mismatch" in line or "Missing key" in line or "Unexpected key" in line:
            return line.rstrip(".")
    return lines[0] if lines else type(error).__name__


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix.`, with the prefix removed."""
    start = prefix + "."
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}


def add_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors renamed to `prefix.<name>`."""
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


# What numpy float64 scalars in a pickle need (the `perf` values of published checkpoints).
NUMPY_SCALAR_GLOBALS: list[Any] = [
    np._core.multiarray.scalar,
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    np.dtypes.Float64DType,
]

_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+)")


def safe_torch_load(path: Path, *, allowed: Sequence[Any], what: str, hint: str) -> Any:
    """A PyTorch pickle read with `torch.load(weights_only=True)`, admitting only `allowed` globals.

    `what` says what such files legitimately hold and `hint` what to do, for the message naming a
    refused Python object. Raises DataError for a missing file, a refused object or bytes that
    are no PyTorch checkpoint (nothing from the file is ever run).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Checkpoint {path} {missing_reason(path)}.")
    try:
        with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol chatter; errors still raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types on bytes that are no checkpoint
        raise _unreadable(path, error, what, hint) from None


def _unreadable(path: Path, failure: Exception, what: str, hint: str) -> DataError:
    """Why torch refused a file: a Python object sfr does not unpickle, or no checkpoint at all."""
    text = str(failure)
    refused = _UNSAFE_GLOBAL.search(text)
    if refused is not None:
        return DataError(
            f"{path} refers to the Python object {refused.group(1)}, which sfr does not unpickle: "
            f"{what} (nothing from the file was run).",
            hint,
        )
    detail = (text.partition("WeightsUnpickler error:")[2] or text).strip()
    reason = type(failure).__name__ + (f": {detail.splitlines()[0]}" if detail else "")
    return DataError(
        f"{path} cannot be read as a PyTorch checkpoint ({reason}).",
        "Check that it is a complete .pth.tar file (a download sfr made: sfr download verify).",
    )
