"""Batched inference over a split: top-k verb, noun and action predictions at every time.

One code path serves a branch, a fusion level, a whole architecture and a weighted ensemble:
each member turns a batch into action probabilities (softmax of its scores), the ensemble is
their weighted mean, and verb and noun probabilities are marginalised from it (DESIGN §5). Only
the k best classes of each row are kept, so memory grows with samples × times × k, not with
the number of classes. Segments that some member's time grid sets aside stay in the result,
flagged `discarded`, so that each benchmark can count them as it requires.

Under torchrun every process scores a contiguous share of the segments and the kept top-k rows
are gathered (`sfr.distributed`), so the predictions equal those of a single process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Subset

from sfr import distributed
from sfr.data.annotations import ActionsTable, Segment
from sfr.data.dataset import AnticipationDataset, open_stores
from sfr.data.loader import create_loader, iterate_batches, resolve_precision, to_device
from sfr.data.observation import ratio_label
from sfr.errors import ConfigError
from sfr.eval.metrics import marginalise, top_k
from sfr.models.fusion import FusionNode
from sfr.models.matmul import fixed_weights
from sfr.models.trained import TrainedModel
from sfr.models.tree import ModelTree

TASKS = ("verb", "noun", "action")
Task = Literal["verb", "noun", "action"]
SUBMISSION_ACTIONS = 100


@dataclass(frozen=True)
class Member:
    """A model and its weight in an ensemble (a single model is an ensemble of one)."""

    model: TrainedModel
    weight: float = 1.0


@dataclass
class AttentionMeans:
    """Mean attention weight of each input of one fusion unit at each anticipation time."""

    unit: str
    fuses: str
    inputs: tuple[str, ...]
    times: tuple[float, ...]
    weights: np.ndarray  # (K, n), rows sum to 1


@dataclass
class FullScores:
    """Scores at one anticipation time in the form a challenge submission needs."""

    time: float
    verb: np.ndarray  # (N, verbs) probabilities
    noun: np.ndarray  # (N, nouns) probabilities
    action_ids: np.ndarray  # (N, 100) best actions, best first
    action_probs: np.ndarray  # (N, 100)


@dataclass
class SplitPredictions:
    """Predictions for every segment of a split, in CSV order, discarded ones included."""

    ids: list[str]
    labels: dict[str, np.ndarray]  # task -> (N,), -1 for unlabelled segments
    discarded: np.ndarray  # (N,) bool
    times: tuple[float, ...]
    top_ids: dict[str, np.ndarray]  # task -> (N, K, k_task), best first; -1 on discarded rows
    top_probs: dict[str, np.ndarray]  # task -> (N, K, k_task); 0 on discarded rows
    attention: list[AttentionMeans] = field(default_factory=list)
    full: FullScores | None = None

    def hits(self, task: str, k: int) -> np.ndarray:
        """(N, K) booleans: is the label among the k best at each time (never on discarded rows)."""
        labels = self.labels[task]
        return (self.top_ids[task][:, :, :k] == labels[:, None, None]).any(-1) & (
            ~self.discarded[:, None]
        )


def check_members(members: Sequence[Member]) -> None:
    """Refuse an ensemble whose members cannot be averaged, naming the two that disagree."""
    if not members:
        raise ConfigError("No model to evaluate.")
    first = members[0].model
    for member in members[1:]:
        model = member.model
        if model.times != first.times:
            raise ConfigError(
                f"The ensemble's models predict at different anticipation times: {first.name} at "
                f"{_seconds(first.times)}, {model.name} at {_seconds(model.times)}.",
                "Ensemble models that share their anticipation times (same alpha and s_ant, or "
                "fusions over the same rates).",
            )
        if model.num_classes != first.num_classes:
            raise ConfigError(
                f"The ensemble's models have different numbers of classes: {first.name} "
                f"{first.num_classes}, {model.name} {model.num_classes}."
            )
    weights = [member.weight for member in members]
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"Ensemble weights must be finite, non-negative and not all zero, got "
            f"{', '.join(f'{w:g}' for w in weights)}.",
            "Example: --weights 0.55 0.45",
        )


def _seconds(times: Sequence[float]) -> str:
    return ", ".join(f"{t:g}" for t in times) + " s"


def _fusion_units(node: FusionNode) -> list[FusionNode]:
    """Every fusion node of a tree, lowest first."""
    units = [
        unit
        for child in node.inputs
        if isinstance(child, FusionNode)
        for unit in _fusion_units(child)
    ]
    return [*units, node]


class _AttentionSums:
    """Running sums of a fusion model's attention weights over the evaluated samples."""

    def __init__(self, model: TrainedModel) -> None:
        self.model = model
        self.sums: dict[str, np.ndarray] = {}
        self.count = 0

    def add(self, attention: dict[str, torch.Tensor]) -> None:
        for label, weights in attention.items():
            batch = weights.double().sum(0).cpu().numpy()
            self.sums[label] = self.sums.get(label, 0) + batch
        self.count += next(iter(attention.values())).shape[0] if attention else 0

    def means(self) -> list[AttentionMeans]:
        """Mean weights over the samples of every process."""
        if not isinstance(self.model.module, FusionNode):
            return []
        units = _fusion_units(self.model.module)
        for node in units:  # the same collectives on every process, even one without samples
            local = self.sums.get(node.label)
            if local is None:
                local = np.zeros((len(self.model.times), len(node.input_labels)))
            self.sums[node.label] = distributed.gather_rows(np.asarray(local)[None]).sum(0)
        (count,) = distributed.all_sum([self.count])
        self.count = int(count)
        if self.count == 0:
            return []
        tree = ModelTree(self.model.config)
        return [
            AttentionMeans(
                node.label,
                tree.by_label[node.label].fuses,
                node.input_labels,
                self.model.times,
                self.sums[node.label] / self.count,
            )
            for node in units
        ]


def predict_split(
    members: Sequence[Member],
    segments: Sequence[Segment],
    data_dir: Path,
    actions: ActionsTable,
    *,
    batch_size: int = 128,
    device: str = "auto",
    precision: str = "fp32",
    workers: int | None = None,
    k: int = 5,
    full_at: float | None = None,
    absent: Literal["action0", "zero"] = "action0",
    num_verbs: int | None = None,
    num_nouns: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    mean_of: Literal["probabilities", "scores"] = "probabilities",
) -> SplitPredictions:
    """Run the (weighted) ensemble of `members` over `segments`, keeping the top-k of each task.

    A task with fewer than `k` classes keeps all of them, best first: its `top_ids` has
    `min(k, classes)` columns (e.g. 9 actions but all 8 verbs for k = 9).

    `full_at` also keeps every verb and noun probability and the 100 best actions at that time
    (for challenge submissions); `num_verbs`/`num_nouns` pad the verb/noun classes to the
    benchmark's counts.

    `mean_of="scores"` averages an ensemble as the published early-recognition fusion
    (RULSTM/main.py, `--task early_recognition --modality fusion`): actions ranked by the
    weighted mean of the members' raw scores (reported as its softmax), verbs and nouns by the
    mean of their marginal probabilities (which is the default's).
    `workers` DataLoader processes read the features (default: the first model's
    data.num_workers); `precision` bf16/fp16 runs the models under autocast (CUDA). Under
    torchrun each process scores its share of the segments; every process returns the whole
    split's predictions.
    """
    check_members(members)
    first = members[0].model
    times = first.times
    if full_at is not None and full_at not in times:
        task = first.data.task
        if task == "early_recognition":
            raise ConfigError(
                f"The model does not predict with {ratio_label(full_at)} of the action observed; "
                f"it predicts at the observed ratios {', '.join(map(ratio_label, times))}.",
                "Pass one of them as --time (1 = the whole action, as published).",
            )
        raise ConfigError(
            f"The model does not predict at {full_at:g} s; it predicts at {_seconds(times)}."
        )
    torch_device = distributed.process_device(device)
    autocast_dtype = resolve_precision(precision, torch_device)
    dims = {
        s.modality: m.model.data.feature_dim(s.modality) for m in members for s in m.model.streams
    }
    stores = open_stores(data_dir, dims)
    datasets = [
        AnticipationDataset(segments, m.model.streams, stores, sampling=m.model.data.sampling)
        for m in members
    ]
    kept_ids = {segment.id for segment in segments}
    for dataset in datasets:
        kept_ids -= {segment.id for segment in dataset.discarded}
    kept = [segment for segment in segments if segment.id in kept_ids]
    datasets = [  # members that discard fewer segments are planned again on the common ones
        dataset
        if len(dataset) == len(kept)
        else AnticipationDataset(kept, m.model.streams, stores, sampling=m.model.data.sampling)
        for dataset, m in zip(datasets, members, strict=True)
    ]
    share = distributed.shard(len(kept))  # this process's contiguous share of the segments
    loaders = [
        create_loader(
            Subset(dataset, share) if distributed.active() else dataset,
            batch_size=batch_size,
            device=torch_device,
            workers=m.model.data.num_workers if workers is None else workers,
        )
        for dataset, m in zip(datasets, members, strict=True)
    ]
    total_weight = sum(m.weight for m in members)
    for member in members:
        member.model.to(torch_device)
    counts = {
        "verb": max(num_verbs or 0, actions.num_verbs),
        "noun": max(num_nouns or 0, actions.num_nouns),
    }
    n, steps = len(segments), len(times)
    kept_k = {
        "verb": min(k, counts["verb"]),
        "noun": min(k, counts["noun"]),
        "action": min(k, first.num_classes),
    }
    top_ids = {t: np.full((n, steps, kept_k[t]), -1, dtype=np.int64) for t in TASKS}
    top_probs = {t: np.zeros((n, steps, kept_k[t]), dtype=np.float32) for t in TASKS}
    row_of = {segment.id: row for row, segment in enumerate(segments)}
    full_rows: dict[str, list[np.ndarray]] = {name: [] for name in ("verb", "noun", "ids", "probs")}
    local_rows: list[np.ndarray] = []
    local_ids: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    local_probs: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    full_index = times.index(full_at) if full_at is not None else None
    attention = _AttentionSums(first) if len(members) == 1 else None
    autocast = (
        torch.autocast(torch_device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    done = 0
    stopped = distributed.process_failures(
        "Inference stopped", "Nothing was written: run the same command again."
    )
    with stopped, fixed_weights():  # no weight changes in this pass: each is prepared once
        readers = (distributed.own_batches(iterate_batches(loader)) for loader in loaders)
        for batches in zip(*readers, strict=True):
            probs, raw = None, None
            for member, batch in zip(members, batches, strict=True):
                with autocast:
                    output = member.model(to_device(batch["features"], torch_device))
                fraction = member.weight / total_weight
                member_probs = torch.softmax(output.scores.double(), dim=-1) * fraction
                probs = member_probs if probs is None else probs + member_probs
                member_raw = output.scores.double() * fraction
                raw = member_raw if raw is None else raw + member_raw
                if attention is not None:
                    attention.add(output.attention)
            action = probs.cpu().numpy()
            per_task = {
                "verb": marginalise(action, actions.verbs, counts["verb"], absent),
                "noun": marginalise(action, actions.nouns, counts["noun"], absent),
                "action": action,
            }
            if mean_of == "scores" and len(members) > 1:
                action = torch.softmax(raw, dim=-1).cpu().numpy()
                per_task["action"] = action
            rows = np.array([row_of[i] for i in batches[0]["id"]])
            for task, task_probs in per_task.items():
                flat = task_probs.reshape(-1, task_probs.shape[-1])
                best = top_k(flat, k)
                local_ids[task].append(best.reshape(len(rows), steps, -1))
                local_probs[task].append(
                    np.take_along_axis(flat, best, 1)
                    .reshape(len(rows), steps, -1)
                    .astype(np.float32)
                )
            local_rows.append(rows)
            if full_index is not None:
                full_rows["verb"].append(per_task["verb"][:, full_index].astype(np.float32))
                full_rows["noun"].append(per_task["noun"][:, full_index].astype(np.float32))
                best = top_k(action[:, full_index], SUBMISSION_ACTIONS)
                full_rows["ids"].append(best)
                full_rows["probs"].append(np.take_along_axis(action[:, full_index], best, 1))
            done += len(rows)
            if progress is not None:
                progress(done, len(share))
    with stopped:
        rows = distributed.gather_rows(_stack(local_rows, (0,), np.int64))
        for task in TASKS:
            top_ids[task][rows] = distributed.gather_rows(
                _stack(local_ids[task], (0, steps, kept_k[task]), np.int64)
            )
            top_probs[task][rows] = distributed.gather_rows(
                _stack(local_probs[task], (0, steps, kept_k[task]), np.float32)
            )
        attention_means = attention.means() if attention is not None else []
    discarded = np.array([segment.id not in kept_ids for segment in segments], dtype=bool)
    labels = {
        task: np.array(
            [-1 if getattr(s, task) is None else getattr(s, task) for s in segments], dtype=np.int64
        )
        for task in TASKS
    }
    predictions = SplitPredictions(
        [segment.id for segment in segments],
        labels,
        discarded,
        times,
        top_ids,
        top_probs,
        attention_means,
    )
    if full_at is not None:
        shapes = {"verb": (0, counts["verb"]), "noun": (0, counts["noun"])}
        top = (0, min(SUBMISSION_ACTIONS, actions.num_actions))
        dtypes = {"verb": np.float32, "noun": np.float32, "ids": np.int64, "probs": np.float64}
        with stopped:
            full_rows = {
                name: [distributed.gather_rows(_stack(parts, shapes.get(name, top), dtypes[name]))]
                for name, parts in full_rows.items()
            }
        predictions.full = _full_scores(full_at, full_rows, discarded, counts, actions.num_actions)
    return predictions


def _stack(parts: list[np.ndarray], empty: tuple[int, ...], dtype: type) -> np.ndarray:
    """The rows of `parts` as one array of `dtype` (shape `empty` when there are none)."""
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty, dtype)


def _full_scores(
    time: float,
    rows: dict[str, list[np.ndarray]],
    discarded: np.ndarray,
    counts: dict[str, int],
    num_actions: int,
) -> FullScores:
    """Submission scores for every segment: discarded ones get zeros, as the published code."""
    n = len(discarded)
    kept = ~discarded
    top = min(SUBMISSION_ACTIONS, num_actions)
    verb = np.zeros((n, counts["verb"]), dtype=np.float32)
    noun = np.zeros((n, counts["noun"]), dtype=np.float32)
    action_ids = np.tile(np.arange(top, dtype=np.int64), (n, 1))
    action_probs = np.zeros((n, top), dtype=np.float64)
    if kept.any():
        verb[kept] = np.concatenate(rows["verb"])
        noun[kept] = np.concatenate(rows["noun"])
        action_ids[kept] = np.concatenate(rows["ids"])
        action_probs[kept] = np.concatenate(rows["probs"])
    return FullScores(time, verb, noun, action_ids, action_probs)
