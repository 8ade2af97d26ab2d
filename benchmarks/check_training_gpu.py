"""GPU check: training samples/s of the fast branch and Architecture 2, plain vs efficient kernels.

For the fast branch (rgb, alpha 0.125, T = 24 + 16 = 40) and the published Architecture 2
(rgb/flow/obj 1024/1024/352 at alpha 0.125 and 0.5, fused at 2, 1.5, 1, 0.5 s), hidden 1024,
2513 classes, published dropouts: training samples/s (forward, backward, SGD step) of

- plain: the published formulation (one rolling call per step, one unrolling call from every
  step, `sfr.models.reference`), every branch over all its steps;
- loop: the efficient branch, Python step loop;
- fused: the efficient branch, fused LSTM kernel (cuDNN), every unroll in one packed call;
- auto: what the branch picks on this device;

in fp32 and under bf16 autocast, and the largest difference of the fused and loop outputs from
the plain formulation in fp32 (dropout 0, scores and context). Needs only torch, numpy and
`sfr.models`; about two minutes on one GPU.

    python benchmarks/check_training_gpu.py [--device cuda] [--batch 128] [--seconds 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sfr.data.timegrid import TimeGrid
from sfr.models.branch import create_branch, set_kernel
from sfr.models.fusion import BranchNode, FusionNode, NodeOutput
from sfr.models.reference import plain_forward

HIDDEN, CLASSES = 1024, 2513
DIMS = {"rgb": 1024, "flow": 1024, "obj": 352}
FAST_GRID = TimeGrid(0.125, 24, 16)  # the fast branch trained alone
RATE_GRIDS = {0.125: TimeGrid(0.125, 12, 16), 0.5: TimeGrid(0.5, 6, 4)}  # as the fusion feeds them


def build_arch2(branch_dropout: float, modality_dropout: float, rate_dropout: float) -> FusionNode:
    """Published Architecture 2: modalities fused at each rate, then the two rates fused."""
    per_rate = []
    for alpha, grid in RATE_GRIDS.items():
        leaves = [
            BranchNode(
                create_branch(
                    feat_dim=dim, hidden=HIDDEN, num_classes=CLASSES, dropout=branch_dropout
                ),
                f"{modality}@{alpha:g}",
                grid,
            )
            for modality, dim in DIMS.items()
        ]
        per_rate.append(FusionNode(f"rgb+flow+obj@{alpha:g}", leaves, HIDDEN, modality_dropout))
    return FusionNode("rgb+flow+obj@0.125+0.5", per_rate, HIDDEN, rate_dropout)


def plain_tree(node: nn.Module, features: dict[str, Tensor], times: Sequence[float]) -> NodeOutput:
    """Every branch the published way over all its steps, the fused steps picked, then fused."""
    if isinstance(node, BranchNode):
        every = plain_forward(node.branch, features[node.key])
        steps = list(node.grid.steps_at(times))
        return NodeOutput(every.scores[:, steps], every.context[:, steps], {})
    assert isinstance(node, FusionNode)
    outputs = [plain_tree(child, features, times) for child in node.inputs]
    scores, context, _ = node.attention([o.scores for o in outputs], [o.context for o in outputs])
    return NodeOutput(scores, context, {})


class Model:
    """A model with its inputs and forward passes per formulation."""

    def __init__(self, name: str, batch: int, device: torch.device, dropout: bool) -> None:
        torch.manual_seed(0)
        rates = (0.8, 0.8, 0.9) if dropout else (0.0, 0.0, 0.0)
        if name == "fast branch":
            branch = create_branch(
                feat_dim=DIMS["rgb"], hidden=HIDDEN, num_classes=CLASSES, dropout=rates[0]
            )
            self.module: nn.Module = branch.to(device)
            x = torch.randn(batch, FAST_GRID.steps, DIMS["rgb"], device=device)
            steps = list(FAST_GRID.anticipation_steps)
            s_enc = FAST_GRID.s_enc
            self.plain: Callable[[], tuple[Tensor, Tensor]] = lambda: tuple(
                t[:, s_enc:] for t in plain_forward(branch, x)
            )  # type: ignore[assignment]
            self.efficient: Callable[[], tuple[Tensor, Tensor]] = lambda: tuple(branch(x, steps))  # type: ignore[assignment]
        else:
            node = build_arch2(*rates).to(device)
            self.module = node
            times = node.times
            features = {
                f"{m}@{alpha:g}": torch.randn(batch, grid.steps, DIMS[m], device=device)
                for alpha, grid in RATE_GRIDS.items()
                for m in DIMS
            }
            self.plain = lambda: tuple(plain_tree(node, features, times)[:2])  # type: ignore[assignment]
            self.efficient = lambda: tuple(node(features, times)[:2])  # type: ignore[assignment]
        self.labels = torch.randint(0, CLASSES, (batch,), device=device)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=1e-6, momentum=0.9)

    def forward(self, formulation: str) -> tuple[Tensor, Tensor]:
        if formulation == "plain":
            return self.plain()
        set_kernel(self.module, formulation)  # type: ignore[arg-type]
        return self.efficient()

    def train_step(self, formulation: str, precision: str) -> None:
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        device_type = self.labels.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            scores, _ = self.forward(formulation)
            labels = self.labels.repeat_interleave(scores.shape[1])
            loss = F.cross_entropy(scores.reshape(-1, CLASSES).float(), labels)
        loss.backward()
        self.optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def samples_per_second(
    run: Callable[[], None], batch: int, seconds: float, device: torch.device
) -> float:
    """Training samples/s of `run` over at least `seconds` (and 3 steps) after 2 warm-up steps."""
    for _ in range(2):
        run()
    sync(device)
    steps, began = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - began < seconds:
        run()
        steps += 1
        sync(device)
    return steps * batch / (time.perf_counter() - began)


def max_differences(model: Model) -> dict[str, float]:
    """Largest |difference| from the plain formulation of the loop and fused outputs (fp32)."""
    model.module.eval()
    with torch.no_grad():
        plain = model.forward("plain")
        return {
            kernel: max(
                (mine - theirs).abs().max().item()
                for mine, theirs in zip(model.forward(kernel), plain, strict=True)
            )
            for kernel in ("loop", "fused")
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per figure")
    args = parser.parse_args()
    device = torch.device(args.device)
    shown = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{shown}, torch {torch.__version__}, cuDNN "
        f"{torch.backends.cudnn.version()}, batch {args.batch}, hidden {HIDDEN}, {CLASSES} "
        f"classes, published dropouts; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
        f"cuDNN TF32 {torch.backends.cudnn.allow_tf32}"
    )
    failures: list[str] = []
    header = f"{'model':<16}{'precision':<10}" + "".join(
        f"{f:>10}" for f in ("plain", "loop", "fused", "auto")
    )
    print("training samples/s (forward + backward + SGD step)")
    print(header + f"{'fused/plain':>13}{'auto/plain':>12}")
    for name in ("fast branch", "Architecture 2"):
        model = Model(name, args.batch, device, dropout=True)
        auto = "fused" if _auto_fused(model, device) else "loop"
        for precision in ("fp32", "bf16"):
            rates: dict[str, float] = {}
            for formulation in ("plain", "loop", "fused", "auto"):
                try:
                    rates[formulation] = samples_per_second(
                        _trainer(model, formulation, precision), args.batch, args.seconds, device
                    )
                except RuntimeError as error:  # report and go on: one failure hides no figure
                    rates[formulation] = float("nan")
                    failures.append(f"{name} {precision} {formulation}: {error}")
            print(
                f"{name:<16}{precision:<10}"
                + "".join(f"{rates[f]:>10.0f}" for f in ("plain", "loop", "fused", "auto"))
                + f"{rates['fused'] / rates['plain']:>12.2f}x{rates['auto'] / rates['plain']:>11.2f}x"
            )
        print(f"{'':<26}auto picks {auto} in training on {device.type}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("max |output - plain| in fp32, dropout 0 (scores and context)")
    for name in ("fast branch", "Architecture 2"):
        differences = max_differences(Model(name, args.batch, device, dropout=False))  # fp32
        print(f"{name:<16}" + "  ".join(f"{k} {v:.2e}" for k, v in differences.items()))
    _report(failures)


def _report(failures: list[str]) -> None:
    for failure in failures:
        print(f"FAILED {failure}")


def _trainer(model: Model, formulation: str, precision: str) -> Callable[[], None]:
    return lambda: model.train_step(formulation, precision)


def _auto_fused(model: Model, device: torch.device) -> bool:
    model.module.train()
    return all(
        all(m.fused_stages(device)) for m in model.module.modules() if hasattr(m, "fused_stages")
    )


if __name__ == "__main__":
    main()
