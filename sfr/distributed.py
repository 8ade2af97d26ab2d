"""Multi-process runs under torchrun: joining the process group, rank 0 writes, gathering results.

`torchrun --nproc-per-node N -m sfr COMMAND ...` starts N copies of a command with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment (PyTorch's elastic
launcher, torch.distributed.run). `session` joins them into one process group: gloo on the CPU,
NCCL on CUDA (one GPU per process, `cuda:LOCAL_RANK`). Outside torchrun, or with a world of one
process, every helper here is a no-op and the command runs as a single process.

Only training and evaluation use this module; models and measures never see a process group.
Collectives time out after SFR_DIST_TIMEOUT seconds (default 1800), so a process that dies or
hangs makes the others fail with a `DistributedError` instead of waiting forever.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from sfr.data.loader import resolve_device
from sfr.errors import ConfigError, DistributedError, SfrError

TIMEOUT_ENV = "SFR_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


def launched() -> bool:
    """Whether this process was started by torchrun as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def active() -> bool:
    """Whether a process group of more than one process is set up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the process group's, else torchrun's RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """Processes in the run (1 outside torchrun)."""
    return dist.get_world_size() if active() else 1


def local_world_size() -> int:
    """Processes of the run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    if not launched():
        return 1
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and prints."""
    return rank() == 0


def timeout() -> timedelta:
    """The collective timeout: SFR_DIST_TIMEOUT seconds, default 30 min."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ConfigError(
            f"{TIMEOUT_ENV} is '{text}', not a positive number of seconds.",
            f"Example: {TIMEOUT_ENV}=600",
        )
    return timedelta(seconds=seconds)


def process_device(name: str) -> torch.device:
    """The device of this process: `resolve_device(name)`, on CUDA the GPU `cuda:LOCAL_RANK`
    when several processes run (torchrun starts one per GPU)."""
    device = resolve_device(name)
    if device.type != "cuda" or not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if local >= torch.cuda.device_count():
        raise DistributedError(
            f"torchrun started process LOCAL_RANK {local} but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s).",
            "Start at most one process per GPU: --nproc-per-node <number of GPUs>.",
        )
    return torch.device("cuda", local)


@contextmanager
def session(device: str) -> Iterator[torch.device]:
    """Join torchrun's process group for the duration of a command; yields this process's device.

    Backend: NCCL when the device is CUDA, gloo otherwise. Outside torchrun nothing is set up.
    Raises DistributedError when the other processes cannot be reached within the timeout.
    """
    target = process_device(device)
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield target
        return
    missing = [name for name in LAUNCH_ENV if not os.environ.get(name)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} "
            "is not set in the environment.",
            "Start multi-process runs with torchrun: torchrun --nproc-per-node N -m sfr ...",
        )
    backend = "nccl" if target.type == "cuda" else "gloo"
    if target.type == "cuda":
        torch.cuda.set_device(target)
    try:
        dist.init_process_group(backend, timeout=timeout())
    except (RuntimeError, ValueError) as error:
        raise DistributedError(
            f"Rank {rank()} could not join the {os.environ['WORLD_SIZE']}-process run at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {_first_line(error)}",
            "Check that every node uses the same --rdzv-endpoint (or --master-addr/--master-port)"
            " and --nnodes, and that the port is reachable.",
        ) from None
    try:
        yield target
    except SfrError as error:
        error.rank = rank()  # type: ignore[attr-defined]  # raised while the group ran
        raise
    finally:
        shutdown()


def own_error(error: SfrError) -> bool:
    """Whether a process other than rank 0 should report `error` itself: it arose in that
    process while the group ran (rank 0 reports the errors that every process meets alike,
    such as a bad option, and those it handed to the others)."""
    return getattr(error, "rank", None) is not None and not getattr(error, "from_main", False)


def shutdown() -> None:
    """Leave the process group (safe to call when none is set up)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here (no-op for one process)."""
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_main(work: Callable[[], T]) -> T:
    """Run `work` on rank 0 only and hand its result (or its SfrError) to every process.

    For steps that write files but whose outcome all processes need, such as preparing a run
    folder: the other ranks raise the same user error as rank 0 instead of waiting for it.
    """
    if not active():
        return work()
    box: list[object] = [None]
    if is_main():
        try:
            box[0] = ("ok", work())
        except SfrError as error:
            box[0] = ("error", error)
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    kind, value = box[0]  # type: ignore[misc]
    if kind == "error":
        if not is_main():
            value.from_main = True  # type: ignore[union-attr]  # rank 0 reports it
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over the processes (float64)."""
    if not active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def gather_rows(array: np.ndarray) -> np.ndarray:
    """Every process's (n_r, ...) array, concatenated in rank order on every process.

    The row counts may differ between processes; nothing is padded in the result, so measures
    computed on it equal those of a single process that saw all rows in the same order.
    """
    if not active():
        return array
    array = np.ascontiguousarray(array)
    as_bool = array.dtype == np.bool_
    device = _comm_device()
    local = torch.from_numpy(array.astype(np.uint8) if as_bool else array).to(device)
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    rows = np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, sizes, strict=True)])
    return rows.astype(np.bool_) if as_bool else rows


def shard(size: int) -> range:
    """This process's contiguous share of `size` items (rank order = item order, no padding)."""
    count, me = world_size(), rank() if active() else 0
    return range(size * me // count, size * (me + 1) // count)


def is_peer_failure(error: BaseException) -> bool:
    """Whether an exception means a collective failed: a peer died, hung or closed its socket."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text
        for marker in ("Gloo", "gloo", "NCCL", "Connection closed", "Connection reset", "Timed out")
    )


@contextmanager
def peer_failures(what: str, hint: str) -> Iterator[None]:
    """Turn a failed collective inside the block into a DistributedError naming `what`."""
    try:
        yield
    except Exception as error:
        if not active() or not is_peer_failure(error):
            raise
        raise DistributedError(
            f"{what}: process rank {rank()} of {world_size()} lost contact with the other "
            f"processes ({_first_line(error)}). Another rank stopped (killed, out of memory, "
            f"crashed) or stalled for longer than {TIMEOUT_ENV}={timeout().total_seconds():g} s.",
            hint,
        ) from None


def _first_line(error: BaseException) -> str:
    """The gist of a backend error: its first sentence, without the C++ source location."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0].rstrip(".")[:300]
