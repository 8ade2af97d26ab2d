"""Jobs that the distributed tests run in 2 processes of a gloo process group on the CPU.

`launch` starts one spawned process per rank with torchrun's environment variables, so
`sfr.distributed.session` joins them exactly as under `torchrun`; each rank writes what the
test checks to `out/rank<r>.json`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

START_METHOD = "fork"  # a copy of the test process: no second import of torch (seconds each)
TIMEOUT_S = 30  # collectives of the test processes (SFR_DIST_TIMEOUT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    steps: list[tuple[str, dict[str, Any]]],
    out: Path,
    world: int = 2,
    wait_s: float = 90,
    timeout_s: float = TIMEOUT_S,
    grace_s: float | None = None,
) -> list[int | None]:
    """Run the jobs `steps` ((name, keyword arguments), in order, in one process group) on
    `world` ranks; returns their exit codes (None for a rank still running after `wait_s`,
    which is then killed: a hang). Ranks above 0 get `grace_s` more seconds once rank 0 is
    done (default `wait_s`)."""
    out.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context(START_METHOD)
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, world, port, steps, str(out), timeout_s))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    processes[0].join(wait_s)
    for process in processes[1:]:
        process.join(wait_s if grace_s is None else grace_s)
    codes = [process.exitcode for process in processes]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    return codes


def _rank_main(rank: int, world: int, port: int, steps: list, out: str, timeout_s: float) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SFR_DIST_TIMEOUT=str(timeout_s),
    )  # fmt: skip
    torch.set_num_threads(1)
    from sfr import distributed

    results = []
    with distributed.session("cpu"):
        for name, args in steps:
            results.append(JOBS[name](rank, **args))
            if "error" in results[-1]:
                break
    Path(out, f"rank{rank}.json").write_text(json.dumps(results), encoding="utf-8")


def _train(
    rank: int,
    config: str,
    data: str,
    runs: str,
    resume: bool = False,
    kill_at: Any = None,
    stall_at: Any = None,
) -> dict:
    """Train a branch's pre-training; rank 1 dies at (epoch, batch) `kill_at`, or stops
    responding for a minute at `stall_at`, if given."""
    from sfr.config import BranchRunConfig, load_config
    from sfr.errors import SfrError
    from sfr.train.loop import BatchDone
    from sfr.train.stages import train_branch_stage

    def progress(event: object) -> None:
        if (
            kill_at is not None
            and rank == 1
            and isinstance(event, BatchDone)
            and event.phase == "train"
            and (event.epoch, event.done) == tuple(kill_at)
        ):
            os._exit(3)  # as a process killed by the OOM killer or a failed node
        if (
            stall_at is not None
            and rank == 1
            and isinstance(event, BatchDone)
            and (event.phase, event.epoch, event.done) == ("train", *stall_at)
        ):
            time.sleep(60)  # as a process stuck on a dead file system

    resolved = load_config(BranchRunConfig, Path(config))
    try:
        fit = train_branch_stage(
            resolved, "pretrain", Path(data), Path(runs), resume=resume, progress=progress
        )
    except SfrError as error:
        return {"error": type(error).__name__, "message": error.message, "hint": error.hint}
    return {"best_epoch": fit.best_epoch, "metrics": fit.metrics}


def _validate(rank: int, args: list[str]) -> dict:
    """`sfr validate ARGS` through the command line, as torchrun would start it."""
    from sfr.cli.app import app

    try:
        app(args, standalone_mode=False)
    except SystemExit as exit:
        return {"exit": exit.code}
    return {"exit": 0}


def _start(rank: int, missing_on: int) -> dict:
    """Start a run as the training commands do (`on_main` prepares the run folder on rank 0),
    except that rank `missing_on` lacks an input first, as a machine without the shared
    --runs folder would."""
    from sfr import distributed
    from sfr.errors import RunError, SfrError

    try:
        if rank == missing_on:
            raise RunError("runs/x/pretrain has no best.safetensors.")
        distributed.on_main(lambda: "prepared")
    except SfrError as error:
        return {"error": type(error).__name__, "message": error.message, "hint": error.hint}
    return {"started": True}


JOBS = {"train": _train, "validate": _validate, "start": _start}
