"""The training loop of one stage: SGD epochs, validation, best/last checkpoints, exact resume.

Each epoch reads like this: shuffle with a generator seeded by (seed, epoch) → forward → loss on
every anticipation step → backward → SGD step → validate → checkpoint. The torch RNG of every
process (dropout masks) is saved with the last checkpoint, so a resumed run continues bit for
bit.

Under torchrun (`sfr.distributed`) every process trains a DistributedDataParallel copy of the
model on its share of each global batch (`ShardedBatchSampler`); gradients are averaged so
that one step equals the single-process step on the whole global batch. Validation is split
between the processes and its per-sample results gathered, so every measure is the
single-process value. Only rank 0 writes the run folder; the others wait at a barrier.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset

from sfr import distributed
from sfr.checkpoint import (
    add_prefix,
    load_checkpoint,
    load_error_summary,
    save_checkpoint,
    split_prefix,
)
from sfr.data.dataset import Preloading
from sfr.data.loader import (
    ShardedBatchSampler,
    create_loader,
    iterate_batches,
    loader_workers,
    resolve_precision,
    to_device,
    underlying,
)
from sfr.errors import RunError, TrainingError
from sfr.eval.metrics import class_mean, label_ranks
from sfr.models.matmul import fixed_weights
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
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


@dataclass(frozen=True)
class StageStarted:
    """A stage starts (or resumes at `start_epoch`); how its training batches are read:
    `preloading` is what data.preload made of the training set (None for a dataset other than
    `AnticipationDataset`), `workers` the loader processes in use (0 for a preloaded table, whose
    batches are gathered in the training process; else data.num_workers)."""

    run_dir: str
    start_epoch: int
    epochs: int
    train_samples: int
    val_samples: int
    batches_per_epoch: int
    preloading: Preloading | None = None
    workers: int = 0


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
    """What a finished stage reports: the best epoch and its validation measures.

    `best_epoch` and the `epoch` of `history` records are 0-based indexes, as in the progress
    events; the files (checkpoints, status.json, metrics.jsonl) and the screen number from 1.
    """

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


def evaluate_ranks(
    ranks: np.ndarray, labels: np.ndarray, times: tuple[float, ...], select_time: float
) -> dict[str, float]:
    """Action top-1/top-5 (%) at every time and mean top-5 recall (%) at the selection time.

    `ranks` (N, K) is the 0-based rank of each row's label at each time (`label_ranks`): what
    the measures need of the (N, K, C) scores, small enough to gather from every process.
    """
    metrics: dict[str, float] = {}
    for k, seconds in enumerate(times):
        for measure, top in (("top1", 1), ("top5", 5)):
            hits = ranks[:, k] < top
            metrics[time_key(measure, seconds)] = 100 * float(hits.mean()) if len(hits) else 0.0
    k_sel = times.index(select_time)
    recall = class_mean(ranks[:, k_sel] < 5, labels)
    metrics[time_key("mt5r", select_time)] = 100 * (recall or 0.0)
    return metrics


class _TaskScores(nn.Module):
    """A task's scores as a module's forward, so DistributedDataParallel can wrap any task."""

    def __init__(self, task: AnticipationTask) -> None:
        super().__init__()
        self.model = task.module
        self.task_scores = task.scores

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.task_scores(features)


class Trainer:
    """Trains one `AnticipationTask` in one run directory (one process of a torchrun run, or
    the only one)."""

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
        self.device = distributed.process_device(settings.device)
        self.autocast_dtype = resolve_precision(settings.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=settings.precision == "fp16")
        self.rank, self.world = distributed.rank(), distributed.world_size()
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

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loaders(self) -> tuple[ShardedBatchSampler, DataLoader, DataLoader]:
        """This process's training batches (sampler set per epoch) and validation share."""
        settings = self.settings
        sampler = ShardedBatchSampler(
            len(self.train_set),
            settings.batch_size,
            shuffle=True,
            seed=settings.seed,
            rank=self.rank,
            world_size=self.world,
        )
        common = {"device": self.device, "workers": settings.num_workers, "persistent": True}
        train = create_loader(self.train_set, batch_sampler=sampler, **common)
        val_share = distributed.shard(len(self.val_set))
        val_set = self.val_set if self.world == 1 else Subset(self.val_set, val_share)
        val = create_loader(val_set, batch_size=settings.batch_size, **common)
        return sampler, train, val

    def fit(self, resume: bool) -> FitResult:
        """Train to `settings.epochs`, continuing from last.safetensors when `resume`.

        Raises TrainingError when the loss diverges and DistributedError when another process
        of a distributed run is lost; the last finished epoch's checkpoint is kept either way.
        """
        module = self.task.module.to(self.device)
        start, best, best_epoch = 0, -math.inf, -1
        history = self.run_dir.read_metrics()
        if resume:
            start, best, best_epoch = self._restore()
        else:
            self._seed_dropout(0)
        history = [h for h in history if h["epoch"] < start]
        self._write(
            lambda: self.run_dir.set_status(
                "running", epoch=start - 1, best=best, best_epoch=best_epoch
            )
        )
        try:
            sampler, train_loader, val_loader = self._loaders()
            model: nn.Module = _TaskScores(self.task)
            if self.world > 1:
                ids = [self.device.index] if self.device.type == "cuda" else None
                model = DistributedDataParallel(model, device_ids=ids)
            self.progress(
                StageStarted(
                    str(self.run_dir.root),
                    start,
                    self.settings.epochs,
                    len(self.train_set),
                    len(self.val_set),
                    len(sampler),
                    getattr(underlying(self.train_set), "preloading", None),
                    loader_workers(self.train_set, self.settings.num_workers),
                )
            )
            for epoch in range(start, self.settings.epochs):
                began = time.perf_counter()
                sampler.set_epoch(epoch)
                with distributed.process_failures(
                    f"Training stopped at epoch {epoch + 1}", self._resume_hint(epoch)
                ):
                    train_loss = self._train_epoch(model, train_loader, sampler.weights(), epoch)
                    val_loss, metrics = self._validate(module, val_loader, epoch)
                selection = metrics[time_key(self.settings.select, self.settings.select_time)]
                is_best = selection > best
                if is_best:
                    best, best_epoch = selection, epoch
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
                with distributed.process_failures(
                    f"Saving epoch {epoch + 1} failed", self._resume_hint(epoch)
                ):
                    rng = distributed.gather_rows(torch.get_rng_state().numpy()[None])  # (W, S)
                    self._write(
                        self._save_epoch, epoch, metrics, is_best, best, best_epoch, history, rng
                    )
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
            self._write(
                lambda: self.run_dir.set_status(
                    "finished", epoch=self.settings.epochs - 1, best=best, best_epoch=best_epoch
                )
            )
        except BaseException:  # a kill (KeyboardInterrupt, SIGTERM) or an error: say it stopped
            if distributed.is_main():
                self.run_dir.mark_interrupted()
            raise
        best_metrics = next((h for h in history if h["epoch"] == best_epoch), {})
        return FitResult(
            str(self.run_dir.root),
            best_epoch,
            best,
            {k: v for k, v in best_metrics.items() if "@" in k},
            history,
        )

    def _write(self, work: Callable[..., None], *args: Any) -> None:
        """Run `work(*args)` (file writes) on rank 0 only; every process continues once it is
        done (the barrier around checkpoint writes)."""
        if distributed.is_main():
            work(*args)
        distributed.barrier()

    def _resume_hint(self, epoch: int) -> str:
        kept = (
            f"The checkpoints of epoch {epoch} are kept in {self.run_dir.root}: continue "
            "with the same command and --resume."
            if epoch > 0 or self.run_dir.last_path.is_file()
            else f"No epoch had finished; {self.run_dir.root} holds no checkpoint yet."
        )
        others = "Check the other processes' output for the cause. " if self.world > 1 else ""
        return others + kept

    def _batches(self, loader: DataLoader) -> Iterator[dict]:
        """This process's batches; a data error met reading them is this process's own."""
        return distributed.own_batches(iterate_batches(loader))

    def _seed_dropout(self, epoch: int) -> None:
        """Give ranks above 0 dropout masks of their own (rank 0 keeps run.seed's stream)."""
        if self.rank > 0:
            torch.manual_seed(self.settings.seed * 1_000_003 + self.rank * 10_007 + epoch)

    def _train_epoch(
        self, model: nn.Module, loader: DataLoader, weights: list[float], epoch: int
    ) -> float:
        """One pass over this process's training batches; the mean loss over all processes.

        `weights` scale each batch's mean loss to its share of the global batch, so that
        DDP's average of the processes' gradients is the gradient of the global batch's mean.
        """
        model.train()
        total, hits, seen, began = 0.0, 0, 0, time.perf_counter()
        k_sel = self.task.times.index(self.settings.select_time)
        for index, (batch, weight) in enumerate(zip(self._batches(loader), weights, strict=True)):
            labels = batch["action"].to(self.device, non_blocking=True)
            with self._autocast():
                scores = model(to_device(batch["features"], self.device))  # (B, K, C)
                loss = anticipation_loss(scores, labels, self.class_weights)
            self._check_finite(loss, epoch, index)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss * weight if self.world > 1 else loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if weight > 0:
                total += loss.item() * len(labels)
                hits += _top5_hits(scores[:, k_sel].detach(), labels)
                seen += len(labels)
            rate = seen / max(time.perf_counter() - began, 1e-9)
            self.progress(
                BatchDone(
                    "train",
                    epoch,
                    index + 1,
                    len(loader),
                    total / max(seen, 1),
                    100 * hits / max(seen, 1),
                    rate,
                )
            )
        total, seen = distributed.all_sum([total, seen])
        return total / max(seen, 1)

    def _check_finite(self, loss: Tensor, epoch: int, index: int) -> None:
        """Stop on a non-finite loss (on every process when any one of them sees it)."""
        value = loss.detach().float()
        if self.world > 1:
            (finite,) = distributed.all_sum([float(torch.isfinite(value))])
            bad = finite < self.world
        else:
            bad = not torch.isfinite(value)
        if not bad or self.scaler.is_enabled():  # fp16: GradScaler skips such steps itself
            return
        kept = (
            f" The checkpoints of epoch {epoch} are kept in {self.run_dir.root} "
            "(continue from them with --resume)."
            if self.run_dir.last_path.is_file()
            else ""
        )
        raise TrainingError(
            f"The training loss became {value.item()} at epoch {epoch + 1}, batch "
            f"{index + 1}: training stopped.",
            "Possible causes, most likely first: non-finite or very large input features "
            "(check the feature stores and data.feature_dims), then a learning rate too "
            f"high for these inputs (lower --lr).{kept}",
        )

    @torch.no_grad()
    def _validate(
        self, module: nn.Module, loader: DataLoader, epoch: int
    ) -> tuple[float, dict[str, float]]:
        """Loss and measures over the whole validation set (every process's share gathered)."""
        module.eval()
        ranks, all_labels, losses = [], [], []
        total, hits, seen, began = 0.0, 0, 0, time.perf_counter()
        k_sel = self.task.times.index(self.settings.select_time)
        with fixed_weights():  # no weight changes in this pass: each is prepared once
            for index, batch in enumerate(self._batches(loader)):
                labels = batch["action"].to(self.device, non_blocking=True)
                with self._autocast():
                    scores = self.task.scores(
                        to_device(batch["features"], self.device)
                    )  # (B, K, C)
                scores = scores.float()
                batch_size, steps, classes = scores.shape
                loss = F.cross_entropy(
                    scores.reshape(-1, classes), labels.repeat_interleave(steps), reduction="none"
                ).reshape(batch_size, steps)  # (B, K): plain cross-entropy, even with class weights
                losses.append(loss.double().mean(1).cpu().numpy())
                label_np = labels.cpu().numpy()
                ranks.append(label_ranks(scores.cpu().numpy(), label_np))  # (B, K)
                all_labels.append(label_np)
                total += float(loss.sum()) / steps
                hits += _top5_hits(scores[:, k_sel], labels)
                seen += batch_size
                rate = seen / max(time.perf_counter() - began, 1e-9)
                self.progress(
                    BatchDone(
                        "val", epoch, index + 1, len(loader), total / seen, 100 * hits / seen, rate
                    )
                )
        times = self.task.times
        empty = np.zeros((0, len(times)), np.int64)
        all_ranks = distributed.gather_rows(np.concatenate(ranks) if ranks else empty)
        labels = distributed.gather_rows(np.concatenate(all_labels) if all_labels else empty[:, 0])
        loss = distributed.gather_rows(np.concatenate(losses) if losses else np.zeros(0))
        metrics = evaluate_ranks(all_ranks, labels, times, self.settings.select_time)
        return float(loss.sum()) / max(len(labels), 1), metrics

    def _save_epoch(
        self,
        epoch: int,
        metrics: dict[str, float],
        is_best: bool,
        best: float,
        best_epoch: int,
        history: list[dict[str, Any]],
        rng: np.ndarray,
    ) -> None:
        """Write the epoch's files: best weights (if best), metrics, last checkpoint, status."""
        if is_best:
            self._save_best(epoch, metrics)
        self.run_dir.write_metrics(history)
        self._save_last(epoch, best, best_epoch, rng)
        self.run_dir.set_status("running", epoch=epoch, best=best, best_epoch=best_epoch)

    def _save_best(self, epoch: int, metrics: dict[str, float]) -> None:
        meta = {
            **self.metadata,
            "epoch": epoch + 1,  # numbered from 1 in checkpoints, as on screen
            "metrics": metrics,
            "selection": {"measure": self.settings.select, "time": self.settings.select_time},
        }
        save_checkpoint(self.run_dir.best_path, self.task.module.state_dict(), meta)

    def _save_last(self, epoch: int, best: float, best_epoch: int, rng: np.ndarray) -> None:
        """Weights, momentum, loss scale and the RNG state of every process (`rng` (W, S))."""
        tensors = add_prefix(self.task.module.state_dict(), "model")
        for index, state in self.optimizer.state_dict()["state"].items():
            if state.get("momentum_buffer") is not None:
                tensors[f"optim.momentum.{index}"] = state["momentum_buffer"]
        tensors["rng.torch"] = torch.from_numpy(rng[0].copy())
        for rank in range(1, len(rng)):
            tensors[f"rng.torch.rank{rank}"] = torch.from_numpy(rng[rank].copy())
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        if self.scaler.is_enabled():
            amp = self.scaler.state_dict()  # fp16 loss scale and its growth tracker
            tensors["amp.scale"] = torch.tensor([amp["scale"]], dtype=torch.float64)
            tensors["amp.growth_tracker"] = torch.tensor([amp["_growth_tracker"]])
        meta = {
            **self.metadata,
            "epoch": epoch + 1,  # the files number epochs from 1, the code from 0
            "best": best,
            "best_epoch": best_epoch + 1 if best_epoch >= 0 else None,
            "world_size": self.world,
        }
        save_checkpoint(self.run_dir.last_path, tensors, meta)

    def _restore(self) -> tuple[int, float, int]:
        """Load last.safetensors; returns (next epoch, best selection value, best epoch).

        Every process restores its own RNG state when the run had as many processes; with
        another number of processes, ranks above 0 reseed from (run.seed, rank, epoch).
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
        own = "rng.torch" if self.rank == 0 else f"rng.torch.rank{self.rank}"
        if own in tensors:
            torch.set_rng_state(tensors[own])
        elif self.rank == 0 or meta.get("world_size", 1) == self.world:
            raise KeyError(f"{own} (the random state of this process)")
        else:  # saved by another number of processes: this rank had no state
            self._seed_dropout(int(meta["epoch"]))  # the number of the last epoch = next index
        if "rng.cuda" in tensors and self.device.type == "cuda" and self.rank == 0:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if "amp.scale" in tensors and self.scaler.is_enabled():
            amp = self.scaler.state_dict()
            amp["scale"] = float(tensors["amp.scale"][0])
            amp["_growth_tracker"] = int(tensors["amp.growth_tracker"][0])
            self.scaler.load_state_dict(amp)
        best = -math.inf if meta["best"] is None else float(meta["best"])
        best_epoch = -1 if meta["best_epoch"] is None else int(meta["best_epoch"]) - 1
        return int(meta["epoch"]), best, best_epoch  # read_metadata numbers epochs from 1
