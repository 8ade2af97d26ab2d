"""Running a model over a dataset: device and precision, loaders and their batches.

Loaders are set up for throughput: each worker process opens its own LMDB environments after
the fork (`FeatureStore.env`) and reads a sample in one transaction per store; workers persist
across epochs; batches are pinned on CUDA so the copy to the GPU overlaps the next read.
A preloaded dataset's batches are gathered in the training process, without workers.
Training batches come from `ShardedBatchSampler`, which splits every global batch of a
seeded permutation between the processes of a distributed run without padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from sfr.config import check_device
from sfr.data.dataset import BATCHED
from sfr.errors import ConfigError, SfrError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU; a name sfr does not accept
    (`sfr.config.check_device`) or an unavailable device is a user error (ConfigError)."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(
            f"--device {name} (run.device): this machine has no such CUDA device.",
            "Use --device cpu (or auto).",
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"--device {name} (run.device): MPS is not available.", "Use --device cpu."
        )
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device`, None for fp32 (no autocast).

    Mixed precision (bf16, fp16) runs matmuls and LSTM cells in half precision under
    `torch.autocast`; losses, softmax and measures stay in float32. It needs a CUDA device:
    on the CPU it is refused rather than silently slower or less exact.
    """
    if precision not in PRECISIONS:
        raise ConfigError(
            f"run.precision is '{precision}'; expected one of {', '.join(PRECISIONS)}."
        )
    if precision == "fp32":
        return None
    if device.type != "cuda":
        raise ConfigError(
            f"--precision {precision} needs a CUDA device, but this run uses {device.type}.",
            "Use --precision fp32 on the CPU (the default), or --device cuda.",
        )
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "--precision bf16: this GPU does not support bfloat16.", "Use --precision fp16."
        )
    return PRECISIONS[precision]


class ShardedBatchSampler(Sampler[list[int]]):
    """One process's share of every global batch, reshuffled every epoch from the run's seed.

    Epoch e orders the N samples by a permutation drawn from a generator seeded with
    `seed * 100003 + e` (the identity without `shuffle`) and cuts it into global batches of
    `batch_size` (the last one may be shorter). Each global batch is split into `world_size`
    contiguous chunks and rank r yields chunk r, so the ranks of a distributed run see exactly
    the samples of a single-process run with the same seed and batch size: no sample is
    repeated to even the shards out (unlike torch's DistributedSampler). `weights()` gives the
    factor that makes a rank's mean loss count as its share of the global batch; a rank whose
    chunk is empty gets the batch's first sample with weight 0, so that every rank takes part
    in every gradient exchange.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.size = size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of `epoch` from the next iteration on."""
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """Sample indices of every global batch of the current epoch, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        return [order[i : i + self.batch_size] for i in range(0, self.size, self.batch_size)]

    def _chunk(self, batch: Sequence[int]) -> list[int]:
        lo = len(batch) * self.rank // self.world_size
        hi = len(batch) * (self.rank + 1) // self.world_size
        return list(batch[lo:hi])

    def weights(self) -> list[float]:
        """Per batch of this rank: world_size × (its samples / the global batch's samples)."""
        return [
            self.world_size * len(self._chunk(batch)) / len(batch)
            for batch in self.global_batches()
        ]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield self._chunk(batch) or [batch[0]]

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)


def create_loader(
    dataset: Dataset,
    *,
    device: torch.device,
    workers: int,
    batch_size: int | None = None,
    batch_sampler: Sampler[list[int]] | None = None,
    persistent: bool = False,
) -> DataLoader:
    """A DataLoader in dataset order (or `batch_sampler`'s), set up for throughput.

    `workers` processes read samples (each opens its own LMDB handles); `persistent` keeps them
    alive between epochs; batches are pinned in page-locked memory when `device` is CUDA.
    A preloaded dataset (`is_preloaded`) gets no worker processes whatever `workers` says
    (`loader_workers`). The loader draws its worker seeds from a generator of its own, never
    from the global torch RNG, so dropout masks do not depend on the number of workers or on
    their persistence.
    """
    workers = loader_workers(dataset, workers)
    return DataLoader(
        dataset,
        batch_size=batch_size if batch_sampler is None else 1,
        batch_sampler=batch_sampler,
        shuffle=False,
        num_workers=workers,
        persistent_workers=persistent and workers > 0,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
        collate_fn=collate,
    )


def underlying(dataset: Dataset) -> Dataset:
    """The dataset under `dataset`'s `Subset` wrappers (distributed shards), or itself."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def is_preloaded(dataset: Dataset) -> bool:
    """Whether `dataset` (or the dataset under its `Subset` wrappers) gathers its batches from a
    preloaded table (`AnticipationDataset.table`)."""
    return getattr(underlying(dataset), "table", None) is not None


def loader_workers(dataset: Dataset, workers: int) -> int:
    """The worker processes a loader of `dataset` uses: `workers`, or 0 for a preloaded dataset.

    A batch gathered from the table in the training process costs less than handing a batch
    over from a worker, which goes through new shared memory (measured in
    benchmarks/bench_loader.py: 78,700 samples/s with 0 workers, 10,000-11,100 with 2 or 4).
    """
    return 0 if is_preloaded(dataset) else workers


def collate(samples: list | dict) -> dict:
    """DataLoader's default collation, except for a batch that the dataset built whole
    (`AnticipationDataset.__getitems__`), which passes as it is (without its marker)."""
    if isinstance(samples, dict) and samples.pop(BATCHED, False):
        return samples
    return default_collate(samples)


def iterate_batches(loader: DataLoader) -> Iterator[dict]:
    """Iterate a loader, restoring the plain message of an sfr error raised in a worker process.

    DataLoader re-raises a worker's exception with the worker's traceback as its message.
    """
    try:
        yield from loader
    except SfrError as error:
        marker = f"{type(error).__name__}: "
        if "Original Traceback" not in error.message or marker not in error.message:
            raise
        original = error.message.rsplit(marker, 1)[1].strip()
        raise type(error).from_text(original) from None


def to_device(features: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The features moved to `device` (asynchronously from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in features.items()}
