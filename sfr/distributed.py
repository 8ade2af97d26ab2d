"""Multi-process runs under torchrun: joining the process group, rank 0 writes, gathering results.

`torchrun --nproc-per-node N -m sfr COMMAND ...` starts N copies of a command with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment (PyTorch's elastic
launcher, torch.distributed.run). `session` joins them into one process group: gloo on the CPU,
NCCL on CUDA (one GPU per process, `cuda:LOCAL_RANK`). Outside torchrun, or with a world of one
process, every helper here is a no-op and the command runs as a single process. The
environment is read in `environment` only, and checked there: a part of it (a stray RANK) is
refused rather than guessed at.

Only training and evaluation use this module; models and measures never see a process group.
Collectives time out after SFR_DIST_TIMEOUT seconds (default 1800, 1 s to 7 days), so a process
that dies or hangs makes the others fail with a `DistributedError` instead of waiting forever;
a DataLoader worker that dies is reported the same way (`process_failures`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from sfr.data.loader import resolve_device
from sfr.errors import ConfigError, DistributedError, SfrError

TIMEOUT_ENV = "SFR_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_RANGE_S = (1.0, 7 * 24 * 3600.0)  # below 1 s joining fails; 1e13 s overflows gloo
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN_HINT = (
    "to run several, start the command with torchrun: torchrun --nproc-per-node N -m sfr ..."
)

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """What torchrun's environment says about this process (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


def environment() -> Launch:
    """torchrun's variables of this process, read and checked here only.

    Neither RANK nor WORLD_SIZE set: a single process. Otherwise both must be integers with
    0 <= RANK < WORLD_SIZE, and with WORLD_SIZE > 1 LOCAL_RANK, MASTER_ADDR and MASTER_PORT
    must be set too (torchrun sets them all; torch.distributed.run). LOCAL_WORLD_SIZE is
    optional (1 when absent). Raises DistributedError naming the variables otherwise: a stray
    RANK in a shell, or a launcher that sets only part of them.
    """
    if not any(os.environ.get(name) for name in ("RANK", "WORLD_SIZE")):
        return Launch()
    missing = [name for name in ("RANK", "WORLD_SIZE") if not os.environ.get(name)]
    if missing:
        present = "WORLD_SIZE" if missing == ["RANK"] else "RANK"
        raise DistributedError(
            f"{present} is {os.environ[present]} in the environment but {missing[0]} is not set: "
            "that is part of torchrun's environment, not all of it.",
            f"Unset {present} to run as one process; {TORCHRUN_HINT}",
        )
    world = _integer("WORLD_SIZE", least=1)
    rank_ = _integer("RANK", least=0)
    if rank_ >= world:
        raise DistributedError(
            f"RANK is {rank_} but WORLD_SIZE is {world}: a rank must be below the number of "
            "processes.",
            f"Unset RANK and WORLD_SIZE to run as one process; {TORCHRUN_HINT}",
        )
    if world == 1:
        return Launch()
    missing = [name for name in LAUNCH_ENV if not os.environ.get(name)]
    if missing:
        names = _listed(missing)
        raise DistributedError(
            f"WORLD_SIZE is {world} but {names} {'is' if len(missing) == 1 else 'are'} not set "
            "in the environment.",
            f"Unset WORLD_SIZE and RANK to run as one process; {TORCHRUN_HINT}",
        )
    _integer("MASTER_PORT", least=1)
    local_world = _integer("LOCAL_WORLD_SIZE", least=1) if os.environ.get("LOCAL_WORLD_SIZE") else 1
    return Launch(rank_, world, _integer("LOCAL_RANK", least=0), local_world)


def _integer(name: str, least: int) -> int:
    """The environment variable `name` as an integer >= `least` (DistributedError otherwise)."""
    text = os.environ[name]
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise DistributedError(
            f"{name} is '{text}' in the environment, not an integer >= {least}.",
            f"torchrun sets {name} itself: unset it to run as one process; {TORCHRUN_HINT}",
        )
    return value


def _listed(names: list[str]) -> str:
    """`A`, `A and B`, `A, B and C`."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def launched() -> bool:
    """Whether this process was started by torchrun as one of several (WORLD_SIZE > 1)."""
    return environment().world_size > 1


def active() -> bool:
    """Whether a process group of more than one process is set up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the process group's, else torchrun's (`environment`), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return environment().rank


def world_size() -> int:
    """Processes in the run (1 outside torchrun)."""
    return dist.get_world_size() if active() else 1


def local_world_size() -> int:
    """Processes of the run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    launch = environment()
    return launch.local_world_size if launch.world_size > 1 else 1


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and prints."""
    return rank() == 0


def timeout() -> timedelta:
    """The collective timeout: SFR_DIST_TIMEOUT seconds (1 s to 7 days), default 30 min."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = float("nan")
    low, high = TIMEOUT_RANGE_S
    if not low <= seconds <= high:
        raise ConfigError(
            f"{TIMEOUT_ENV} is '{text}', not a number of seconds from {low:g} to {high:g} "
            "(7 days): how long the processes of a run wait for each other.",
            f"Example: {TIMEOUT_ENV}=600, or unset it for the default {DEFAULT_TIMEOUT_S:g}.",
        )
    return timedelta(seconds=seconds)


def check_environment() -> Launch:
    """`environment()`, and under torchrun the collective timeout too: what a command checks
    before it does anything. Raises DistributedError or ConfigError."""
    launch = environment()
    if launch.world_size > 1:
        timeout()
    return launch


def process_device(name: str) -> torch.device:
    """The device of this process: `resolve_device(name)`, on CUDA the GPU `cuda:LOCAL_RANK`
    when several processes run (torchrun starts one per GPU)."""
    device = resolve_device(name)
    if device.type != "cuda" or not launched():
        return device
    local = environment().local_rank
    if local >= torch.cuda.device_count():
        raise mark_own(
            DistributedError(
                f"torchrun started process LOCAL_RANK {local} but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s).",
                "Start at most one process per GPU: --nproc-per-node <number of GPUs>.",
            )
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
    finally:
        shutdown()


def mark_own(error: SfrError) -> SfrError:
    """Record that `error` arose in this process alone (its share of the data, a lost peer):
    it reports the error itself, labelled with its rank (`reports`). Returns `error`."""
    error.rank = rank()  # type: ignore[attr-defined]
    return error


def own_batches(batches: Iterable[T]) -> Iterator[T]:
    """`batches`, marking an SfrError raised while reading them as this process's own
    (`mark_own`): under torchrun each process reads a share of the data of its own."""
    try:
        yield from batches
    except SfrError as error:
        raise mark_own(error) from None


def reports(error: SfrError) -> bool:
    """Whether this process prints `error` (every process of a run raises it, each for itself).

    Rank 0 reports every error, and alone those that every process meets alike, such as a bad
    option or config value, and those it handed to the others (`on_main`). Another rank reports
    the errors that arose in it alone (`mark_own`); and, as the first process of another
    machine (LOCAL_RANK 0), the errors met before the run started, which may be that
    machine's own (a file missing there: machines need not see the same files).
    """
    if is_main():
        return True
    if getattr(error, "from_main", False):
        return False
    if getattr(error, "rank", None) is not None:
        return True
    launch = environment()
    return launch.local_rank == 0 and launch.local_world_size < launch.world_size


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
    with process_failures("The run could not start", SETUP_HINT):
        dist.broadcast_object_list(box, src=0, device=_comm_device())
    kind, value = box[0]  # type: ignore[misc]
    if kind == "error":
        if not is_main():
            value.from_main = True  # type: ignore[union-attr]  # rank 0 reports it
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


SETUP_HINT = (
    "Check the other processes' output for the cause. With several machines, the --data and "
    "--runs folders must be one shared file system (e.g. NFS) seen at the same path by every "
    "machine, or identical copies: an input that one machine lacks stops its processes."
)


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


def is_worker_death(error: BaseException) -> bool:
    """Whether an exception is DataLoader's report of a worker process that died (killed by a
    signal, such as the kernel's when memory runs out, or exited): torch's
    `torch.utils.data.dataloader` raises it while batches are read, and its SIGCHLD handler
    anywhere in the main thread."""
    return isinstance(error, RuntimeError) and "DataLoader worker (pid" in str(error)


def is_process_failure(error: BaseException) -> bool:
    """Whether an exception means a process of the run was lost: another rank
    (`is_peer_failure`) or a DataLoader worker (`is_worker_death`)."""
    return is_peer_failure(error) or is_worker_death(error)


def _worker_death_text(error: BaseException) -> str:
    """Which DataLoader worker died and how, from torch's message: "DataLoader worker (pid 7)
    is killed by signal: Killed." or "DataLoader worker (pid(s) 7, 8) exited unexpectedly"."""
    found = re.search(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) ([^.\n]*)", str(error))
    pids, how = (found.group(1), found.group(2)) if found else ("?", "died")
    how = how.replace("is killed by signal: ", "was killed by signal ")
    whose = f" of process rank {rank()}" if active() else ""
    return (
        f"the DataLoader worker process{'es' if ',' in pids else ''} {pids} (one of the "
        "--workers processes that read the "
        f"batches{whose}) {how}. The kernel kills processes when memory runs out (`dmesg` says "
        "so); else a signal was sent to it."
    )


def exception_chain(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised while handling, newest first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 16:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def process_failure(error: BaseException, what: str, hint: str) -> SfrError | None:
    """The user error that `error` stands for when a process of the run was lost, else None.

    `error` is a failed collective or a DataLoader worker's death (else None). Raised while
    handling an sfr error (a worker killed as the process stops, after its message): that
    error; while handling Ctrl-C or SIGTERM: None (they stopped the workers too). A failed
    collective: this process lost contact with the others. A DataLoader worker that died:
    which one, and how. `what` says what stopped ("Training stopped at epoch 3");
    `hint` what to do.
    """
    if not is_process_failure(error):
        return error if isinstance(error, SfrError) else None
    chain = exception_chain(error)
    if any(isinstance(e, KeyboardInterrupt) for e in chain):
        return None  # a signal stopped this process and its workers: the caller says so
    earlier = next((e for e in chain if isinstance(e, SfrError)), None)
    if earlier is not None:
        return earlier
    peer = next((e for e in chain if is_peer_failure(e)), None)
    if peer is not None and active():
        return mark_own(
            DistributedError(
                f"{what}: process rank {rank()} of {world_size()} lost contact with the other "
                f"processes ({_first_line(peer)}). Another rank stopped (killed, out of memory, "
                f"crashed) or stalled for longer than {TIMEOUT_ENV}="
                f"{timeout().total_seconds():g} s.",
                hint,
            )
        )
    worker = next((e for e in chain if is_worker_death(e)), None)
    if worker is not None:
        return mark_own(DistributedError(f"{what}: {_worker_death_text(worker)}", hint))
    return None


class process_failures:  # a context manager, named like contextlib's
    """Turn a lost process inside the block (another rank, a DataLoader worker) into a
    DistributedError (`process_failure`) that says `what` stopped and `hint`. Reusable: one
    instance may guard several blocks."""

    def __init__(self, what: str, hint: str) -> None:
        self.what, self.hint = what, hint

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, trace: object) -> None:
        if not isinstance(error, Exception):
            return
        failure = process_failure(error, self.what, self.hint)
        if failure is not None and failure is not error:
            raise failure from None


def _first_line(error: BaseException) -> str:
    """The gist of a backend error: its first sentence, without the C++ source location."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0].rstrip(".")[:300]
