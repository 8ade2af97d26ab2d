"""Run directories: one folder per stage of one model, named from its config.

    RUNS/<dataset>/<branch slug>/<stage>/    e.g. runs/ek55/rgb-a0.5-enc6-ant4/pretrain/
        config.json        resolved config of the run
        status.json        {"state": "running" | "finished", "epoch": ..., "best": ...}
        metrics.jsonl      one line per finished epoch
        best.safetensors   weights of the best epoch (+ config and metrics in its metadata)
        last.safetensors   weights, optimiser and RNG state after the last epoch (for --resume)

Later stages find earlier ones by this convention.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sfr.errors import RunError
from sfr.files import atomic_write_text, finite_or_none

# Settings that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = (
    "optim.epochs",
    "fusion_optim.epochs",
    "run.device",
    "data.num_workers",
    "data.preload",
)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted fields whose values differ between two config trees (resumable ones excluded)."""
    a, b = _flatten(saved), _flatten(current)
    return sorted(
        key for key in set(a) | set(b) if a.get(key) != b.get(key) and key not in RESUMABLE_CHANGES
    )


class RunDir:
    """The files of one stage run and the rules for starting, resuming or overwriting it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    config_path = property(lambda self: self.root / "config.json")
    status_path = property(lambda self: self.root / "status.json")
    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    best_path = property(lambda self: self.root / "best.safetensors")
    last_path = property(lambda self: self.root / "last.safetensors")

    def status(self) -> dict[str, Any]:
        """`{"state": "empty" | "running" | "finished", ...}` as recorded in status.json."""
        if not self.status_path.is_file():
            return {"state": "empty"}
        return json.loads(self.status_path.read_text(encoding="utf-8"))

    @property
    def finished(self) -> bool:
        return self.status()["state"] == "finished"

    def saved_config(self) -> dict[str, Any] | None:
        if not self.config_path.is_file():
            return None
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    def prepare(self, config: dict[str, Any], *, force: bool, resume: bool) -> bool:
        """Make the folder ready for training; True if a saved state should be resumed.

        A finished or interrupted run is refused unless `force` (start over) or `resume`
        (continue it; its saved config must match apart from `RESUMABLE_CHANGES`).
        """
        state = self.status()["state"]
        if force and self.root.exists():
            shutil.rmtree(self.root)
            state = "empty"
        if state != "empty" and not resume:
            what = "a finished run" if state == "finished" else "an interrupted run"
            raise RunError(
                f"Run directory {self.root} already holds {what}.",
                "Pass --resume to continue it (for example with more --epochs) or --force to "
                "delete it and train from scratch.",
            )
        saved = self.saved_config()
        if resume and saved is not None:
            changed = config_differences(saved, config)
            if changed:
                raise RunError(
                    f"Cannot resume {self.root}: its saved config differs in {', '.join(changed)}.",
                    "Resume with the same settings, or pass --force to start over.",
                )
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, json.dumps(config, indent=2, sort_keys=True))
        return resume and self.last_path.is_file()

    def set_status(self, state: str, **fields: Any) -> None:
        record = finite_or_none({"state": state, **fields})  # no best yet: null, not -Infinity
        atomic_write_text(self.status_path, json.dumps(record, sort_keys=True))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl atomically with exactly `records` (used to drop redone epochs)."""
        atomic_write_text(
            self.metrics_path, "".join(json.dumps(finite_or_none(r)) + "\n" for r in records)
        )
