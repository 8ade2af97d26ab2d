"""One benchmark table: `sfr`'s efficient models against the plain (published) formulation.

Real dimensions (hidden 1024, rgb/flow features 1024, obj 352, EK55's 2513 classes), published
dropouts (branch 0.8, modality attention 0.8, slow-fast attention 0.9), `--threads` intra-op
threads (default 2). Every pair of formulations runs side by side in this one process on the same
weights and inputs, their repetitions interleaved so that a change of machine load hits both.

Rows:
- branch T = 14 (alpha 0.25, 6 + 8) and T = 40 (alpha 0.125, 24 + 16), training (forward +
  backward + SGD step, per-step dropout masks) and evaluation (no gradients; the repetitions
  in one block as `validate` runs a split's batches, `fixed_weights`): the plain
  formulation (`sfr.models.reference`, the published code's loops) against the efficient branch
  with its default (`auto`) kernel, at `--batch` and, for T = 40, at `--large-batch` (the
  published training batch, 128); for evaluation also the ceiling: the plain run's wall
  seconds over the efficient products' time at this machine's peak product rate (`peak_rate`),
  the most any kernel of the efficient formulation could reach;
- published Architecture 2 (rgb/flow/obj at alpha 0.125 and 0.5, fused at 2, 1.5, 1, 0.5 s),
  training and evaluation: every branch the plain way over all its steps (`tests/fusion_oracle.py`)
  against the fusion tree;
- the fused LSTM kernel against the Python step loop (both efficient), training and evaluation,
  and the loop's recurrent products through BLAS against oneDNN (`sfr.models.matmul`);
- validation of Architecture 2 over a split: model time against the time of each measure
  (softmax, verb/noun marginalisation, top-k lists, top-k accuracy, mean top-5 recall);
- peak memory of one training step (resident set size growth, each in a fresh process, or CUDA
  peak allocation), plain against efficient;
- loader samples/s at 0, 2 and 4 workers, streamed and preloaded (`benchmarks/bench_loader.py`,
  when present), against the recorded GPU training rate of the fast branch
  (`GPU_FAST_BRANCH_TRAINING`, target 10x) and against this machine's CPU training rate.

    nox -s bench        or        python benchmarks/bench.py [--batch 32] [--repeats 3] [--sections speed]

Prints the table and writes `benchmarks/results.json` (`--out`). Needs only torch, numpy and
`sfr.models` / `sfr.eval.metrics` (no LMDB, pydantic or video packages), so that it runs on a bare
GPU machine too (`--device cuda`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from check_training_gpu import DIMS as ARCH2_DIMS  # noqa: E402
from check_training_gpu import RATE_GRIDS, build_arch2  # noqa: E402
from fusion_oracle import plain_tree_forward  # noqa: E402

from sfr.eval import metrics  # noqa: E402
from sfr.models.branch import create_branch, length_buckets, set_kernel  # noqa: E402
from sfr.models.matmul import (  # noqa: E402
    MATMUL_ENV,
    StepWeight,
    fixed_weights,
    onednn_available,
)
from sfr.models.reference import plain_forward  # noqa: E402

HIDDEN, FEATURES, CLASSES, VERBS, NOUNS = 1024, 1024, 2513, 125, 352
GRIDS = {"T=14": (6, 8), "T=40": (24, 16)}
PUBLISHED_DROPOUTS = (0.8, 0.8, 0.9)  # branch, modality attention, slow-fast attention
TARGETS = {  # speed-up the issue asks of the efficient models on 2 CPU threads
    ("branch T=14", "training"): 3.5,
    ("branch T=40", "training"): 6.0,
    ("branch T=40", "evaluation"): 10.0,
    ("Architecture 2", "training"): 6.0,
    ("Architecture 2", "evaluation"): 10.0,
}
MEASURE_SHARE_TARGET = 0.10  # every measure below 10% of a validation
LONG_CALL = 5.0  # seconds: a first call this long is timed, not a warm-up


def interleaved(
    runs: dict[str, Callable[[], None]], repeats: int, sync: Callable[[], None]
) -> dict[str, dict[str, float]]:
    """Fastest wall and CPU seconds of each run: {name: {"wall": s, "cpu": s}}.

    One warm-up each, then the repetitions interleaved. A first call longer than `LONG_CALL`
    seconds counts as a repetition: set-up costs (kernel selection, allocator growth) are
    milliseconds, and the plain runs last minutes on 2 threads. The fastest repetition is the
    one least disturbed by other load (on the shared development machine a run of the same code
    took 1.5x longer at some minutes than at others); CPU seconds (all threads of this process)
    are what such load changes least.
    """
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}

    def timed(run: Callable[[], None]) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu

    for name, run in runs.items():
        first = timed(run)
        if first[0] > LONG_CALL:
            times[name].append(first)
    for _ in range(repeats):
        for name, run in runs.items():
            if len(times[name]) < repeats:
                times[name].append(timed(run))
    return {
        name: {"wall": min(w for w, _ in values), "cpu": min(c for _, c in values)}
        for name, values in times.items()
    }


def _pair_row(
    group: str, row: str, baseline: str, candidate: str, seconds: dict[str, dict[str, float]]
) -> dict[str, Any]:
    base, cand = seconds[baseline], seconds[candidate]
    return {
        "group": group,
        "row": row,
        "baseline": baseline,
        "candidate": candidate,
        "baseline_value": base["cpu"],
        "candidate_value": cand["cpu"],
        "unit": "cpu s",
        "ratio": base["cpu"] / cand["cpu"],
        "wall": {baseline: base["wall"], candidate: cand["wall"]},
        "wall_ratio": base["wall"] / cand["wall"],
        "target": None,
    }


def branch_multiply_adds(
    branch: nn.Module,
    num_steps: int,
    steps: list[int],
    formulation: str,
    device: torch.device,
    training: bool,
) -> int:
    """Multiply-adds of one branch's forward pass for ONE sample: LSTM gate products and the
    classifier (the pointwise gate arithmetic is left out, as are the backward passes, which
    cost about twice the forward products in both formulations).

    plain: the published loops, every one of the `num_steps` steps rolled and unrolled (T - t + 1
    steps from step t), the fused LSTM computing each step's input product; efficient: the
    requested `steps` only, as the default (`auto`) kernel computes them on `device`: the fused
    kernel (CUDA) computes every step's input product, and on the CPU runs the unrolls padded
    to their group's longest length (`length_buckets`); the loop (CPU) computes the unrolls'
    input products once per input (hoisted) unless every unrolling step draws its own dropout
    mask (training), then once per step.
    """
    feat, hidden, classes = branch.feat_dim, branch.hidden, branch.num_classes
    gates = 4 * hidden
    extra = 0 if branch.sequence_completion else 1
    head = hidden * classes
    if formulation == "plain":
        unrolled = sum(num_steps - t + extra for t in range(num_steps))
        return (num_steps + unrolled) * gates * (feat + hidden) + num_steps * head
    lengths = [num_steps - t + extra for t in steps]
    rolled = steps[-1] + 1
    branch.train(training)
    fused, _ = branch.fused_stages(device)  # what `auto` runs, by the branch's own rule
    if not fused:  # the loop, input products hoisted where no per-step mask applies
        unroll_inputs = sum(lengths) if branch.per_step_masks else len(steps)
        lstm = (num_steps + unroll_inputs) * gates * feat + (rolled + sum(lengths)) * gates * hidden
        return lstm + len(steps) * head
    if branch.pads_unrolls(device):
        unrolled = sum(lengths[first] * (last - first) for first, last in length_buckets(lengths))
    else:
        unrolled = sum(lengths)
    return (rolled + unrolled) * gates * (feat + hidden) + len(steps) * head


def tree_multiply_adds(
    node: nn.Module,
    times: tuple[float, ...],
    formulation: str,
    device: torch.device,
    training: bool,
) -> int:
    """`branch_multiply_adds` summed over a fusion tree's branches, plus its attention MLPs
    (computed at the requested times by both formulations)."""
    if hasattr(node, "branch"):
        steps = list(node.grid.steps_at(times))
        return branch_multiply_adds(
            node.branch, node.grid.steps, steps, formulation, device, training
        )
    mlp = sum(
        m.in_features * m.out_features for m in node.attention.mlp if isinstance(m, nn.Linear)
    )
    below = sum(
        tree_multiply_adds(child, times, formulation, device, training) for child in node.inputs
    )
    return below + len(times) * mlp


class Workload:
    """A model, its inputs and the forward passes to compare, for training or evaluation."""

    def __init__(self, name: str, batch: int, device: torch.device, seed: int = 0) -> None:
        self.name = name
        torch.manual_seed(seed)
        self.model: nn.Module
        self.forwards: dict[str, Callable[[], torch.Tensor]] = {}
        if name.startswith("branch"):
            s_enc, s_ant = GRIDS[name.removeprefix("branch ")]
            branch = create_branch(
                feat_dim=FEATURES, hidden=HIDDEN, num_classes=CLASSES, dropout=0.8
            )
            self.model = branch.to(device)
            x = torch.randn(batch, s_enc + s_ant, FEATURES, device=device)
            steps = list(range(s_enc, s_enc + s_ant))
            self.forwards["plain"] = lambda: plain_forward(branch, x).scores[:, s_enc:]
            self.forwards["efficient"] = lambda: branch(x, steps).scores
            self.multiply_adds = lambda formulation, training: branch_multiply_adds(
                branch, s_enc + s_ant, steps, formulation, device, training
            )
        else:
            node = build_arch2(*PUBLISHED_DROPOUTS)
            self.model = node.to(device)
            times = node.times
            features = {
                f"{modality}@{alpha:g}": torch.randn(batch, grid.steps, dim, device=device)
                for alpha, grid in RATE_GRIDS.items()
                for modality, dim in ARCH2_DIMS.items()
            }
            self.forwards["plain"] = lambda: plain_tree_forward(node, features, times).scores
            self.forwards["efficient"] = lambda: node(features, times).scores
            self.multiply_adds = lambda formulation, training: tree_multiply_adds(
                node, times, formulation, device, training
            )
        self.labels = torch.randint(0, CLASSES, (batch,), device=device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-6, momentum=0.9)

    def step(self, formulation: str, training: bool) -> Callable[[], None]:
        """One training step (forward, backward, SGD) or one evaluation forward pass."""
        forward = self.forwards[formulation]

        def train() -> None:
            self.model.train()
            self.optimizer.zero_grad()
            scores = forward()  # (B, K, C)
            labels = self.labels.repeat_interleave(scores.shape[1])
            F.cross_entropy(scores.reshape(-1, CLASSES).float(), labels).backward()
            self.optimizer.step()

        def evaluate() -> None:
            self.model.eval()
            with torch.no_grad():
                forward()

        return train if training else evaluate


def speed_rows(
    args: argparse.Namespace, device: torch.device, sync: Callable, peak: float
) -> list[dict]:
    """Efficient vs plain (with the ceiling at `peak` multiply-adds/s for evaluation), fused
    kernel vs step loop, and the loop's oneDNN vs BLAS products, at real dimensions."""
    rows = []
    names = ["branch T=14", "branch T=40", "Architecture 2"]
    plans = [(name, args.batch, "efficient vs plain") for name in names]
    if args.large_batch:  # the published batch, where the plain formulation's products are big
        group = f"efficient vs plain, batch {args.large_batch}"
        plans.append(("branch T=40", args.large_batch, group))
    for name, batch, group in plans:
        work = Workload(name, batch, device)
        for mode in ("training", "evaluation"):
            training = mode == "training"
            with evaluation_pass(training):
                seconds = interleaved(
                    {f: work.step(f, training) for f in ("plain", "efficient")}, args.repeats, sync
                )
            row = _pair_row(group, f"{name} {mode}", "plain", "efficient", seconds)
            row["target"] = TARGETS.get((name, mode))
            row["batch"] = batch
            # the speed-up if both formulations ran their products at the same rate
            row["arithmetic_ratio"] = work.multiply_adds("plain", training) / work.multiply_adds(
                "efficient", training
            )
            row["samples_per_s"] = batch / seconds["efficient"]["wall"]
            if not training:  # the plain run against the efficient products all at peak rate
                at_peak = batch * work.multiply_adds("efficient", training) / peak
                row["ceiling_ratio"] = seconds["plain"]["wall"] / at_peak
            rows.append(row)
            print(_line(rows[-1]), file=sys.stderr, flush=True)
        if group != "efficient vs plain":
            continue
        if name != "branch T=14":  # the fused kernel against the step loop
            for mode in ("training", "evaluation"):
                training = mode == "training"

                step = work.step("efficient", training)
                with evaluation_pass(training):
                    seconds = interleaved(
                        {k: _with_kernel(work.model, k, step) for k in ("loop", "fused")},
                        args.repeats,
                        sync,
                    )
                set_kernel(work.model, "auto")
                row = _pair_row(
                    "fused kernel vs step loop", f"{name} {mode}", "loop", "fused", seconds
                )
                row["auto"] = _auto_stages(work.model, device, training)
                rows.append(row)
                print(_line(rows[-1]), file=sys.stderr, flush=True)
            if device.type == "cpu" and onednn_available():  # where the loop's speed comes from
                for mode in ("training", "evaluation"):
                    step = _with_kernel(
                        work.model, "loop", work.step("efficient", mode == "training")
                    )
                    with evaluation_pass(mode == "training"):
                        seconds = interleaved(
                            {m: _with_matmul(m, step) for m in ("blas", "onednn")},
                            args.repeats,
                            sync,
                        )
                    set_kernel(work.model, "auto")
                    rows.append(
                        _pair_row(
                            "loop kernel: oneDNN vs BLAS products",
                            f"{name} {mode}",
                            "blas",
                            "onednn",
                            seconds,
                        )
                    )
                    print(_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def evaluation_pass(training: bool) -> contextlib.AbstractContextManager:
    """For evaluation, the block `validate` and `predict` run a split's batches in
    (`fixed_weights`: weights prepared once, at the warm-up call, as at a pass's first batch);
    nothing for training, whose weights change at every step."""
    return contextlib.nullcontext() if training else fixed_weights()


def _with_matmul(matmul: str, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        previous = os.environ.get(MATMUL_ENV)
        os.environ[MATMUL_ENV] = matmul
        try:
            step()
        finally:
            if previous is None:
                os.environ.pop(MATMUL_ENV, None)
            else:
                os.environ[MATMUL_ENV] = previous

    return run


def peak_rate(device: torch.device, sync: Callable[[], None]) -> float:
    """Multiply-adds per second of this machine's fastest product at an LSTM step's shape,
    (256, 1024) @ (1024, 4096): the best of BLAS (`torch.mm`) and, on the CPU, oneDNN
    (`StepWeight`), best of 30 after a warm-up (a brief pause of the shared machine's other load
    is enough to catch it). No formulation can run its products faster."""
    weight = torch.randn(4 * HIDDEN, FEATURES, device=device)
    x = torch.randn(256, FEATURES, device=device)
    products = [lambda: torch.mm(x, weight.t())]
    if device.type == "cpu":
        with torch.no_grad():
            prepared = StepWeight(weight, 256)
            if prepared.packed is not None:
                products.append(lambda: prepared.mm(x))
    best = 0.0
    for product in products:
        product()
        sync()
        for _ in range(30):
            began = time.perf_counter()
            product()
            sync()
            best = max(best, 256 * FEATURES * 4 * HIDDEN / (time.perf_counter() - began))
    return best


def _with_kernel(model: nn.Module, kernel: str, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        set_kernel(model, kernel)  # type: ignore[arg-type]
        step()

    return run


def _auto_stages(model: nn.Module, device: torch.device, training: bool) -> str:
    """What the default kernel runs for `model` on `device`, in words."""
    model.train(training)
    stages = {m.fused_stages(device) for m in model.modules() if hasattr(m, "fused_stages")}
    names = {(True, True): "fused", (False, False): "loop"}
    return ", ".join(sorted(names.get(s, "loop") for s in stages))


def validation_rows(args: argparse.Namespace, device: torch.device, sync: Callable) -> list[dict]:
    """Architecture 2 over a split: model time and the time of every measure, as the runner."""
    work = Workload("Architecture 2", args.batch, device, seed=1)
    work.model.eval()
    rng = np.random.default_rng(0)
    verb_of = rng.integers(0, VERBS, CLASSES)
    noun_of = rng.integers(0, NOUNS, CLASSES)
    verb_of[:VERBS], noun_of[:NOUNS] = np.arange(VERBS), np.arange(NOUNS)
    spent = {
        name: 0.0
        for name in ("model", "softmax", "marginalise", "top-k lists", "top-k accuracy", "mt5r")
    }
    scores, batches = [], max(1, args.split // args.batch)

    def timed(name: str, run: Callable[[], Any]) -> Any:
        began = time.process_time()  # CPU seconds: robust to a shared machine's load
        value = run()
        spent[name] += time.process_time() - began
        return value

    def model() -> np.ndarray:
        with torch.no_grad():
            out = work.forwards["efficient"]()
        sync()
        return out.float().cpu().numpy()

    with fixed_weights():  # as the runner: the split's batches in one evaluation pass
        for _ in range(batches):
            batch_scores = timed("model", model)  # (B, K, C)
            probs = timed("softmax", lambda s=batch_scores: metrics.softmax(s))
            verb = timed("marginalise", lambda p=probs: metrics.marginalise(p, verb_of, VERBS))
            noun = timed("marginalise", lambda p=probs: metrics.marginalise(p, noun_of, NOUNS))
            for task in (probs, verb, noun):
                timed("top-k lists", lambda t=task: metrics.top_k(t.reshape(-1, t.shape[-1]), 5))
            scores.append(batch_scores)
    every = np.concatenate(scores)
    labels = rng.integers(0, CLASSES, len(every))
    for k in range(every.shape[1]):
        for top in (1, 5):
            timed(
                "top-k accuracy",
                lambda k=k, top=top: metrics.topk_accuracy(every[:, k], labels, top),
            )
        timed("mt5r", lambda k=k: metrics.mean_topk_recall(every[:, k], labels, 5))
    total = sum(spent.values())
    rows = [
        {
            "group": "validation split",
            "row": f"Architecture 2, {len(every)} samples: {name}",
            "baseline": "validation",
            "candidate": name,
            "baseline_value": total,
            "candidate_value": seconds,
            "unit": "cpu s",
            "ratio": seconds / total,
            "target": None if name == "model" else MEASURE_SHARE_TARGET,
            "share": True,
        }
        for name, seconds in spent.items()
    ]
    for row in rows:
        print(_line(row), file=sys.stderr, flush=True)
    return rows


def _resident_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_child(workload: str, formulation: str, batch: int, device: str) -> None:
    """(In a fresh process.) Print the peak memory growth (bytes) of one training step.

    CPU: the resident set size sampled every millisecond during the step, minus the size before
    it (freed heap returned to the system first); CUDA: the peak allocation minus the one before.
    """
    torch.set_num_threads(2)
    dev = torch.device(device)
    work = Workload(workload, batch, dev)
    step = work.step(formulation, True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated() - base)
        return
    with contextlib.suppress(OSError):  # glibc: hand freed heap back before the baseline
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = peak = _resident_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    done.set()
    sampler.join()
    print(max(peak, _resident_bytes()) - base)


def memory_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for workload in ("branch T=40", "Architecture 2"):
        peaks = {}
        for formulation in ("plain", "efficient"):
            command = [sys.executable, __file__, "--peak-memory", workload, formulation]
            command += ["--batch", str(args.batch), "--device", args.device]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            peaks[formulation] = int(done.stdout.split()[-1]) / 2**20
        rows.append(
            {
                "group": "peak memory, one training step",
                "row": workload,
                "baseline": "plain (published)",
                "candidate": "efficient",
                "baseline_value": peaks["plain"],
                "candidate_value": peaks["efficient"],
                "unit": "MiB",
                "ratio": peaks["plain"] / peaks["efficient"] if peaks["efficient"] else None,
                "target": 1.0,
            }
        )
        print(_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


# Samples/s of fp32 training of the fast branch (rgb, alpha 0.125, T = 40, hidden 1024, batch 128,
# 2513 classes) on one NVIDIA H200: the GPU-class consumer of the loader target (issue 12: the
# loader alone at least 10x this rate). Recorded in the README's GPU table (step-loop kernel,
# torch 2.11, CUDA 13); `python benchmarks/check_training_gpu.py` measures it on a GPU.
GPU_FAST_BRANCH_TRAINING = 3448.0
LOADER_TARGET = 10.0  # loader samples/s over the GPU fast branch's training samples/s


def loader_rows(fast_branch_training: float | None) -> tuple[list[dict], str | None]:
    """Rows of `bench_loader.run()` (samples/s per consumer and worker count, streamed and
    preloaded), each against the recorded GPU training rate of the fast branch
    (`GPU_FAST_BRANCH_TRAINING`, with the target for the fast-branch consumers) and against
    `fast_branch_training` (this machine's CPU rate, when measured), or a note why there are none."""
    try:
        import bench_loader  # type: ignore[import-not-found]
    except ImportError:
        return [], "benchmarks/bench_loader.py is not present: loader row skipped"
    result = bench_loader.run()
    baselines = [
        ("loader alone vs GPU training", "fast branch training (H200 fp32, recorded)",
         GPU_FAST_BRANCH_TRAINING, LOADER_TARGET),
        ("loader alone vs CPU training", "fast branch training (this machine)",
         fast_branch_training, None),
    ]  # fmt: skip
    rows = []
    for group, baseline, value, target in baselines:
        for consumer, rates in result.get("loader", {}).items():
            for workers, rate in rates.items():
                rows.append(
                    {
                        "group": group,
                        "row": f"{consumer}, {workers} workers",
                        "baseline": baseline,
                        "candidate": "loader",
                        "baseline_value": value,
                        "candidate_value": rate,
                        "unit": "samples/s",
                        "ratio": rate / value if value else None,
                        "target": target if consumer.startswith("fast branch") else None,
                    }
                )
    return rows, None


def _line(row: dict) -> str:
    unit = row["unit"]
    base, cand = row["baseline_value"], row["candidate_value"]
    if row.get("share"):
        shown = f"{cand:>10.3f} s of {base:.3f} s{row['ratio'] * 100:>8.1f}%"
        target = f"<{row['target'] * 100:g}%" if row["target"] is not None else "-"
        ok = "-" if row["target"] is None else ("yes" if row["ratio"] < row["target"] else "NO")
        return f"{row['row']:<52}{shown:>33}{target:>8}{ok:>5}"
    ratio = row["ratio"]
    shown_base = "-" if base is None else f"{base:.3g}"
    shown = f"{shown_base:>10}{cand:>10.3g} {unit:<9}"
    shown_ratio = "-" if ratio is None else f"{ratio:.2f}x"
    target = f"≥{row['target']:g}x" if row["target"] is not None else "-"
    ok = (
        "-"
        if row["target"] is None or ratio is None
        else ("yes" if ratio >= row["target"] else "NO")
    )
    wall = f"{row['wall_ratio']:.2f}x" if row.get("wall_ratio") else "-"
    arithmetic = f"{row['arithmetic_ratio']:.2f}x" if row.get("arithmetic_ratio") else "-"
    ceiling = f"{row['ceiling_ratio']:.2f}x" if row.get("ceiling_ratio") else "-"
    return (
        f"{row['row']:<52}{shown:>30}{shown_ratio:>8}{target:>7}{ok:>5}{wall:>8}{arithmetic:>8}"
        f"{ceiling:>9}"
    )


def markdown(results: dict[str, Any]) -> str:
    """The table of a results.json as Markdown (the README's performance section)."""
    lines = [
        "| group | row | baseline | candidate | ratio | target | met | wall-clock ratio "
        "| multiply-adds ratio | ceiling at peak rate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = list(dict.fromkeys(row["group"] for row in results["rows"]))
    for row in sorted(results["rows"], key=lambda r: order.index(r["group"])):
        unit, base, cand, target = (
            row["unit"],
            row["baseline_value"],
            row["candidate_value"],
            row["target"],
        )
        if row.get("share"):
            shown_ratio = f"{row['ratio'] * 100:.1f}% of {base:.3g} s"
            shown_target = "-" if target is None else f"<{target * 100:g}%"
            met = "-" if target is None else ("yes" if row["ratio"] < target else "**no**")
            base_text, cand_text = "validation", f"{cand:.3g} s"
        else:
            shown_ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
            shown_target = "-" if target is None else f"≥{target:g}x"
            met = (
                "-"
                if target is None or row["ratio"] is None
                else ("yes" if row["ratio"] >= target else "**no**")
            )
            base_text = "-" if base is None else f"{row['baseline']} {base:.3g} {unit}"
            cand_text = f"{row['candidate']} {cand:.3g} {unit}"
        wall = f"{row['wall_ratio']:.2f}x" if row.get("wall_ratio") else "-"
        arithmetic = f"{row['arithmetic_ratio']:.2f}x" if row.get("arithmetic_ratio") else "-"
        ceiling = f"{row['ceiling_ratio']:.2f}x" if row.get("ceiling_ratio") else "-"
        lines.append(
            f"| {row['group']} | {row['row']} | {base_text} | {cand_text} | {shown_ratio} | "
            f"{shown_target} | {met} | {wall} | {arithmetic} | {ceiling} |"
        )
    return "\n".join(lines)


def machine(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch": args.batch,
        "repeats": args.repeats,
        "hidden": HIDDEN,
        "classes": CLASSES,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--large-batch",
        type=int,
        default=128,
        help="also the T = 40 branch at this batch (the published 128; 0: skip)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split", type=int, default=256, help="validation samples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--sections",
        default="speed,validation,memory,loader",
        help="comma-separated subset of speed, validation, memory, loader",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--peak-memory", nargs=2, metavar=("WORKLOAD", "FORMULATION"))
    parser.add_argument(
        "--markdown", type=Path, help="print a results.json as Markdown, run nothing"
    )
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    torch.set_num_threads(args.threads)
    if args.peak_memory:
        peak_memory_child(*args.peak_memory, args.batch, args.device)
        return
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sections = set(args.sections.split(","))
    peak = peak_rate(device, sync)
    rows = speed_rows(args, device, sync, peak) if "speed" in sections else []
    if "validation" in sections:
        rows += validation_rows(args, device, sync)
    if "memory" in sections and not args.skip_memory:
        rows += memory_rows(args)
    fast = next(
        (r["samples_per_s"] for r in rows if r["row"] == "branch T=40 training"),
        None,
    )
    loader, note = loader_rows(fast) if "loader" in sections else ([], None)
    rows += loader
    info = machine(args, device)
    info["peak_multiply_adds_per_s"] = peak
    args.out.write_text(
        json.dumps({"machine": info, "rows": rows, "notes": [note] if note else []}, indent=2)
        + "\n"
    )
    print(
        f"sfr benchmark: {info['cpu']}, {info['threads']} threads, {info['device']}, torch "
        f"{info['torch']}, batch {args.batch}, hidden {HIDDEN}, {CLASSES} classes, fastest of "
        f"{args.repeats} (after a warm-up for calls under {LONG_CALL:g} s)"
    )
    print(
        f"{'row':<52}{'baseline':>10}{'candidate':>10} {'unit':<9}{'ratio':>8}{'target':>7}{'met':>5}"
        f"{'wall':>8}{'madds':>8}{'ceiling':>9}"
    )
    print(
        "(ratio: CPU seconds, baseline / candidate; wall: wall-clock seconds; madds: multiply-adds"
        " of the baseline / the candidate's, the ratio if both computed at the same rate; ceiling:"
        " the baseline's wall seconds / the candidate's products at this machine's peak rate,"
        f" {info['peak_multiply_adds_per_s'] / 1e9:.0f} G/s, the most any kernel could reach)"
    )
    order = list(dict.fromkeys(row["group"] for row in rows))
    group = None
    for row in sorted(rows, key=lambda r: order.index(r["group"])):
        if row["group"] != group:
            group = row["group"]
            first = (
                f"{row['baseline']} → {row['candidate']}"
                if not row.get("share")
                else "share of a validation"
            )
            print(f"-- {group} ({first})")
        print(_line(row))
    if note:
        print(f"-- loader: {note}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
