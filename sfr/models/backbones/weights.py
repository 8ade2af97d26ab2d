"""Loading a video backbone's published weights: safe unpickling, container keys, strict key check.

Published backbone checkpoints are PyTorch pickles: TSN's `.pth.tar` (`{'epoch', 'arch',
'state_dict', 'best_prec1'}`, keys prefixed `module.base_model.`, plus a `new_fc` head) and
PySlowFast/pytorchvideo's `.pyth` (`{'model_state', 'epoch', ...}`). They are read with
`torch.load(weights_only=True)` (nothing in them is run), the state dict is taken from the first
container key present, prefixes are stripped, the heads named in `ignore_prefixes` dropped, and
every remaining key must be one of the model's with the same shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sfr.checkpoint import NUMPY_SCALAR_GLOBALS, safe_torch_load
from sfr.errors import DataError

# Buffers that checkpoints written by older PyTorch versions lack; their defaults are right.
_OPTIONAL_SUFFIXES = (".num_batches_tracked",)


def read_backbone_state(
    path: Path,
    *,
    containers: Sequence[str] = ("state_dict", "model_state"),
    strip_prefixes: Sequence[str] = (),
    ignore_prefixes: Sequence[str] = (),
) -> dict[str, Tensor]:
    """The tensors of a backbone checkpoint file, renamed to the model's keys.

    The state dict is `container[key]` for the first of `containers` present (or the file itself
    when it is a flat mapping of tensors); each key loses the first of `strip_prefixes` it starts
    with; keys starting with one of `ignore_prefixes` (after stripping) are dropped.
    Raises DataError when the file is missing, unreadable or holds no state dict.
    """
    path = Path(path)
    container = safe_torch_load(
        path,
        allowed=NUMPY_SCALAR_GLOBALS,
        what="backbone checkpoints hold tensors, numbers and strings",
        hint="Use the published TSN or SlowFast checkpoint file, or re-save it with "
        "torch.save({'state_dict': model.state_dict()}, path).",
    )
    state = _state_of(container, containers, path)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = str(key)
        for prefix in strip_prefixes:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if any(name.startswith(prefix) for prefix in ignore_prefixes):
            continue
        if not isinstance(value, Tensor):
            raise DataError(f"{path}: entry '{key}' of the state dict is not a tensor.")
        out[name] = value
    return out


def _state_of(container: Any, containers: Sequence[str], path: Path) -> Mapping[str, Any]:
    if isinstance(container, Mapping):
        for key in containers:
            if isinstance(container.get(key), Mapping):
                return container[key]
        if container and all(isinstance(v, Tensor) for v in container.values()):
            return container
    names = ", ".join(f"'{c}'" for c in containers)
    hint = "Pass the checkpoint file of the chosen backbone (--weights)."
    if isinstance(container, Mapping) and isinstance(container.get("model_state"), Mapping):
        hint = (
            "It holds 'model_state', as the SlowFast checkpoints of pytorchvideo and SlowFast "
            "do: choose that backbone, e.g. --backbone slowfast-r50 (or slowfast-r101)."
        )
    raise DataError(
        f"{path} holds no state dict (looked for {names} or a plain mapping of tensors).", hint
    )


def load_backbone_state(
    model: nn.Module, state: Mapping[str, Tensor], *, source: str, backbone: str
) -> None:
    """Copy `state` into `model`, refusing any missing, unexpected or mis-shaped key.

    Missing `num_batches_tracked` buffers (absent from checkpoints of old PyTorch versions) are
    accepted. Raises DataError naming the first missing and unexpected keys and `source`.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: '{unexpected[0]}')")
        raise DataError(
            f"The weights in {source} do not fit the {backbone} backbone: keys "
            + " and ".join(parts)
            + ".",
            "Check that --weights matches --backbone and the modality (rgb weights have a "
            "3-channel first convolution, TSN flow weights a 10-channel one).",
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise DataError(
                f"The weights in {source} do not fit the {backbone} backbone: '{key}' has shape "
                f"{tuple(value.shape)}, the backbone needs {tuple(expected[key].shape)}.",
                "Check that --weights matches --backbone and the modality.",
            )
    with torch.no_grad():
        model.load_state_dict(dict(state), strict=False)
