"""Products by a weight that many LSTM steps reuse, through oneDNN's matmul on the CPU.

PyTorch's CPU `mm` calls the BLAS it was built with (MKL in the official wheels). On the
2-thread AMD EPYC (AVX-512) machine of `benchmarks/results.json`, MKL ran the recurrent product
of one LSTM step, (16, 1024) @ (1024, 4096), at 71 GFLOPS and (256, 1024) @ (1024, 4096) at
164; oneDNN's matmul (the library behind PyTorch's fused CPU LSTM), with the weight reordered
once into its blocked layout, ran both at about 200. The step loop of `RULSTMBranch` and the
backward of `lstm_recurrence` multiply by the same recurrent weights at every step, so they
reorder them once per forward (or backward) pass and run every product there.

`linear` does the same for the input projections and the classifier (one product over many
rows each, where oneDNN ran 1.2x the BLAS rate), with the weight as it is (no reordering, so its
gradient can be recorded: its backward products are BLAS's).

Both fall back to PyTorch's own products wherever oneDNN does not apply: not the CPU, not
float32 (the float64 oracle tests), autocast active, a PyTorch built without oneDNN or without
its matmul operators (a private API of `torch.ops.mkldnn`, probed once), or SFR_CPU_MATMUL=blas
in the environment; `StepWeight` also wherever autograd records the product.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from sfr.errors import ConfigError

MATMUL_ENV = "SFR_CPU_MATMUL"
MATMULS = ("onednn", "blas")


def cpu_matmul() -> str:
    """The CPU matmul of reused weights: SFR_CPU_MATMUL (onednn or blas; default onednn).

    Raises ConfigError (exit 2 in the CLI) for any other value.
    """
    value = os.environ.get(MATMUL_ENV, "onednn").strip().lower() or "onednn"
    if value not in MATMULS:
        raise ConfigError(
            f"{MATMUL_ENV} must be one of {', '.join(MATMULS)}, not {value!r}.",
            f"Unset it (oneDNN where PyTorch has it) or set {MATMUL_ENV}=blas.",
        )
    return value


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch runs float32 products through oneDNN's packed matmul, correctly."""
    ops = torch.ops.mkldnn
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.linspace(-1, 1, 24).reshape(6, 4)
        x = torch.linspace(-2, 2, 12).reshape(3, 4)
        got = ops._linear_pointwise(x, ops._reorder_linear_weight(weight, 3), None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(got, x @ weight.t(), atol=1e-5))


class StepWeight:
    """A weight (N, K) prepared for many products by rows (M, K) → (M, N), as in `F.linear`.

    `rows` is the typical M (oneDNN picks its layout for it; any M works). The products equal
    those of `torch.addmm` up to float32 rounding; within one pass every product runs the same
    way, so a step loop and `lstm_recurrence` give the same bits.
    """

    def __init__(self, weight: Tensor, rows: int, *, transpose: bool = False) -> None:
        self.weight = weight
        self.rows = max(1, rows)
        self.transpose = transpose  # products by the weight itself, (M, N) @ (N, K) → (M, K)
        self.onednn = not (torch.is_grad_enabled() and weight.requires_grad) and _onednn_applies(
            weight, weight
        )
        self._packed: Tensor | None = None

    @property
    def packed(self) -> Tensor | None:
        """The weight in oneDNN's layout, reordered at the first product; None: BLAS.

        Never kept beyond this object (one forward or backward pass): a weight changed through
        `.data`, which leaves its version counter as it was, must not meet a stale copy.
        """
        if self.onednn and self._packed is None:
            weight = self.weight.detach()
            weight = weight.t().contiguous() if self.transpose else weight
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.rows)
        return self._packed

    def _blas_operand(self) -> Tensor:
        return self.weight if self.transpose else self.weight.t()

    def addmm(self, bias: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
        """bias + x @ weightᵀ (x @ weight with `transpose`): bias (M, N), x (M, K); into `out`
        (M, N) when given."""
        if self.packed is None or x.dtype != torch.float32 or bias.dtype != torch.float32:
            return torch.addmm(bias, x, self._blas_operand(), out=out)
        product = torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self.packed, None, "none", [], ""
        )
        return torch.add(product, bias, out=out) if out is not None else product.add_(bias)

    def mm(self, x: Tensor) -> Tensor:
        """x @ weightᵀ (x @ weight with `transpose`): x (M, K) → (M, N)."""
        if self.packed is None or x.dtype != torch.float32:
            return torch.mm(x, self._blas_operand())
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")


def _onednn_applies(x: Tensor, weight: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and cpu_matmul() == "onednn"
        and onednn_available()
    )


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = flat_grad.mm(weight).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = flat_grad.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_grad.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`: x (..., K), weight (N, K), bias (N,) → (..., N).

    Through oneDNN on the CPU in float32 (module docstring), differentiable (once) in all three;
    `F.linear` elsewhere. The same bits with or without autograd recording.
    """
    if not _onednn_applies(x, weight) or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        return _Linear.apply(x, weight, bias)
    return _onednn_linear(x, weight, bias)
