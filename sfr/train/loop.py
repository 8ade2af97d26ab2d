"""The training loop of one stage: SGD epochs, validation, best/last checkpoints, exact resume.

Each epoch reads like this: shuffle with a generator seeded by (seed, epoch) → forward → loss on
every anticipation step → backward → SGD step → validate → checkpoint. The global torch RNG
(dropout masks) is saved with the last checkpoint, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from sfr.checkpoint import (
    add_prefix,
    load_checkpoint,
    load_error_summary,
    save_checkpoint,
    split_prefix,
)
from sfr.data.loader import iterate_batches, resolve_device, to_device
from sfr.errors import RunError, TrainingError
from sfr.eval.metrics import mean_topk_recall, topk_accuracy
from sfr.train.rundir import RunDir


class AnticipationTask(Protocol):
    """A trainable model and how to get its action scores at its anticipation times."""

    module: nn.Module
    times: tuple[float, ...]  # anticipation times (s) of the K scored steps, oldest first

    def scores(self, features: dict[str, Tensor]) -> Tensor:
        """Action scores (B, K, C) at `times`."""


@dataclass(frozen=True)
class FitSettings:
    """Optimisation and selection settings of a stage."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    seed: int
    select: Literal["top5", "mt5r"]
    select_time: float
    num_workers: int = 0
    device: str = "cpu"
    class_weights: tuple[float, ...] | None = None  # per action class; None: unweighted


@dataclass(frozen=True)
class StageStarted:
    run_dir: str
    start_epoch: int
    epochs: int
    train_samples: int
    val_samples: int
    batches_per_epoch: int


@dataclass(frozen=True)
class BatchDone:
    phase: Literal["train", "val"]
    epoch: int
    done: int
    total: int
    loss: float
    top5: float  # running top-5 action accuracy (%) at the selection time
    samples_per_s: float


@dataclass(frozen=True)
class EpochDone:
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    metrics: dict[str, float]  # e.g. "top5@1" -> percent
    selection: float
    best: float
    best_epoch: int
    is_best: bool
    seconds: float


ProgressEvent = StageStarted | BatchDone | EpochDone
Progress = Callable[[ProgressEvent], None]


@dataclass
class FitResult:
    """What a finished stage reports: the best epoch and its validation measures."""

    run_dir: str
    best_epoch: int
    best: float
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def _top5_hits(scores: Tensor, labels: Tensor) -> int:
    """How many rows of (B, C) scores rank their label among the top 5 (running accuracy)."""
    top5 = scores.topk(min(5, scores.shape[-1]), dim=1).indices  # (B, 5)
    return int((top5 == labels[:, None]).any(dim=1).sum())


def anticipation_loss(scores: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy on every anticipation step, the action label repeated (published loss).

    `weight` (C,) weighs each action class, as `F.cross_entropy` does (the published
    `actions_weights` option, commented out in its code).
    """
    batch, steps, classes = scores.shape  # (B, K, C)
    return F.cross_entropy(
        scores.reshape(batch * steps, classes), labels.repeat_interleave(steps), weight=weight
    )


def time_key(measure: str, seconds: float) -> str:
    """Metric name such as `top5@1` or `top1@0.25`."""
    return f"{measure}@{seconds:g}"


def evaluate_scores(
    scores: np.ndarray, labels: np.ndarray, times: tuple[float, ...], select_time: float
) -> dict[str, float]:
    """Action top-1/top-5 (%) at every time and mean top-5 recall (%) at the selection time."""
    metrics: dict[str, float] = {}
    for k, seconds in enumerate(times):
        metrics[time_key("top1", seconds)] = 100 * topk_accuracy(scores[:, k], labels, 1)
        metrics[time_key("top5", seconds)] = 100 * topk_accuracy(scores[:, k], labels, 5)
    k_sel = times.index(select_time)
    metrics[time_key("mt5r", select_time)] = 100 * mean_topk_recall(scores[:, k_sel], labels, 5)
    return metrics


class Trainer:
    """Trains one `AnticipationTask` in one run directory."""

    def __init__(
        self,
        task: AnticipationTask,
        train_set: Dataset,
        val_set: Dataset,
        run_dir: RunDir,
        settings: FitSettings,
        metadata: dict[str, Any],
        progress: Progress | None = None,
    ) -> None:
        self.task = task
        self.train_set = train_set
        self.val_set = val_set
        self.run_dir = run_dir
        self.settings = settings
        self.metadata = metadata
        self.progress = progress or (lambda event: None)
        self.device = resolve_device(settings.device)
        self.class_weights = (
            None
            if settings.class_weights is None
            else torch.tensor(settings.class_weights, dtype=torch.float32, device=self.device)
        )
        self.optimizer = torch.optim.SGD(
            task.module.parameters(),
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )

    def _loader(self, dataset: Dataset, epoch: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.settings.seed * 100_003 + epoch)
        return DataLoader(
            dataset,
            batch_size=self.settings.batch_size,
            shuffle=shuffle,
            num_workers=self.settings.num_workers,
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    def fit(self, resume: bool) -> FitResult:
        """Train to `settings.epochs`, continuing from last.safetensors when `resume`."""
        module = self.task.module.to(self.device)
        start, best, best_epoch = 0, -math.inf, -1
        history = self.run_dir.read_metrics()
        if resume:
            start, best, best_epoch = self._restore()
        history = [h for h in history if h["epoch"] < start]
        self.run_dir.set_status("running", epoch=start - 1, best=best, best_epoch=best_epoch)
        batches = math.ceil(len(self.train_set) / self.settings.batch_size)
        self.progress(
            StageStarted(
                str(self.run_dir.root),
                start,
                self.settings.epochs,
                len(self.train_set),
                len(self.val_set),
                batches,
            )
        )
        for epoch in range(start, self.settings.epochs):
            began = time.perf_counter()
            train_loss = self._train_epoch(module, epoch)
            val_loss, metrics = self._validate(module, epoch)
            selection = metrics[time_key(self.settings.select, self.settings.select_time)]
            is_best = selection > best
            if is_best:
                best, best_epoch = selection, epoch
                self._save_best(epoch, metrics)
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "selection": selection,
                "best": best,
                "is_best": is_best,
                **metrics,
            }
            history.append(record)
            self.run_dir.write_metrics(history)
            self._save_last(epoch, best, best_epoch)
            self.run_dir.set_status("running", epoch=epoch, best=best, best_epoch=best_epoch)
            self.progress(
                EpochDone(
                    epoch,
                    self.settings.epochs,
                    train_loss,
                    val_loss,
                    metrics,
                    selection,
                    best,
                    best_epoch,
                    is_best,
                    time.perf_counter() - began,
                )
            )
        self.run_dir.set_status(
            "finished", epoch=self.settings.epochs - 1, best=best, best_epoch=best_epoch
        )
        best_metrics = next((h for h in history if h["epoch"] == best_epoch), {})
        return FitResult(
            str(self.run_dir.root),
            best_epoch,
            best,
            {k: v for k, v in best_metrics.items() if "@" in k},
            history,
        )

    def _train_epoch(self, module: nn.Module, epoch: int) -> float:
        module.train()
        loader = self._loader(self.train_set, epoch, shuffle=True)
        total, hits, seen, began = 0.0, 0, 0, time.perf_counter()
        k_sel = self.task.times.index(self.settings.select_time)
        for index, batch in enumerate(iterate_batches(loader)):
            labels = batch["action"].to(self.device)
            scores = self.task.scores(to_device(batch["features"], self.device))  # (B, K, C)
            loss = anticipation_loss(scores, labels, self.class_weights)
            if not torch.isfinite(loss):
                kept = (
                    f" The checkpoints of epoch {epoch - 1} are kept in {self.run_dir.root} "
                    "(continue from them with --resume)."
                    if self.run_dir.last_path.is_file()
                    else ""
                )
                raise TrainingError(
                    f"The training loss became {loss.item()} at epoch {epoch + 1}, batch "
                    f"{index + 1}: training stopped.",
                    "Possible causes, most likely first: non-finite or very large input features "
                    "(check the feature stores and data.feature_dims), then a learning rate too "
                    f"high for these inputs (lower --lr).{kept}",
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(labels)
            hits += _top5_hits(scores[:, k_sel], labels)
            seen += len(labels)
            rate = seen / max(time.perf_counter() - began, 1e-9)
            self.progress(
                BatchDone(
                    "train", epoch, index + 1, len(loader), total / seen, 100 * hits / seen, rate
                )
            )
        return total / max(seen, 1)

    @torch.no_grad()
    def _validate(self, module: nn.Module, epoch: int) -> tuple[float, dict[str, float]]:
        module.eval()
        loader = self._loader(self.val_set, epoch, shuffle=False)
        all_scores, all_labels, total, hits, began = [], [], 0.0, 0, time.perf_counter()
        k_sel = self.task.times.index(self.settings.select_time)
        for index, batch in enumerate(iterate_batches(loader)):
            labels = batch["action"].to(self.device)
            scores = self.task.scores(to_device(batch["features"], self.device))
            total += anticipation_loss(scores, labels, self.class_weights).item() * len(labels)
            all_scores.append(scores.float().cpu().numpy())
            all_labels.append(labels.cpu().numpy())
            hits += _top5_hits(scores[:, k_sel], labels)
            seen = sum(len(lab) for lab in all_labels)
            rate = seen / max(time.perf_counter() - began, 1e-9)
            self.progress(
                BatchDone(
                    "val", epoch, index + 1, len(loader), total / seen, 100 * hits / seen, rate
                )
            )
        scores = np.concatenate(all_scores)
        labels = np.concatenate(all_labels)
        metrics = evaluate_scores(scores, labels, self.task.times, self.settings.select_time)
        return total / max(len(labels), 1), metrics

    def _save_best(self, epoch: int, metrics: dict[str, float]) -> None:
        meta = {
            **self.metadata,
            "epoch": epoch,
            "metrics": metrics,
            "selection": {"measure": self.settings.select, "time": self.settings.select_time},
        }
        save_checkpoint(self.run_dir.best_path, self.task.module.state_dict(), meta)

    def _save_last(self, epoch: int, best: float, best_epoch: int) -> None:
        tensors = add_prefix(self.task.module.state_dict(), "model")
        for index, state in self.optimizer.state_dict()["state"].items():
            if state.get("momentum_buffer") is not None:
                tensors[f"optim.momentum.{index}"] = state["momentum_buffer"]
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {**self.metadata, "epoch": epoch, "best": best, "best_epoch": best_epoch}
        save_checkpoint(self.run_dir.last_path, tensors, meta)

    def _restore(self) -> tuple[int, float, int]:
        """Load last.safetensors; returns (next epoch, best selection value, best epoch).

        Raises RunError when the file lacks a part of the state or holds other shapes.
        """
        try:
            return self._restore_state()
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            raise RunError(
                f"Cannot resume from {self.run_dir.last_path}: it does not hold this run's "
                f"training state ({type(error).__name__}: {load_error_summary(error)}).",
                "Pass --force instead of --resume to delete what sfr wrote in "
                f"{self.run_dir.root} and train from scratch.",
            ) from None

    def _restore_state(self) -> tuple[int, float, int]:
        tensors, meta = load_checkpoint(self.run_dir.last_path)
        self.task.module.load_state_dict(split_prefix(tensors, "model"))
        momentum = split_prefix(tensors, "optim.momentum")
        state = self.optimizer.state_dict()
        state["state"] = {
            int(i): {"momentum_buffer": buf.to(self.device)} for i, buf in momentum.items()
        }
        self.optimizer.load_state_dict(state)
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        best = -math.inf if meta["best"] is None else float(meta["best"])
        return int(meta["epoch"]) + 1, best, int(meta["best_epoch"])
