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

`fixed_weights()` marks a block in which no weight changes (an evaluation pass over a split):
there each weight, `linear`'s too, is reordered once for the whole block instead of once per
forward pass (or never, for `linear` outside one).

Both fall back to PyTorch's own products wherever oneDNN does not apply: not the CPU, not
float32 (the float64 oracle tests), autocast active, a PyTorch built without oneDNN or without
its matmul operators (a private API of `torch.ops.mkldnn`, probed once), or SFR_CPU_MATMUL=blas
in the environment; `StepWeight` also wherever autograd records the product.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

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


class _Prepared(NamedTuple):
    weight: Tensor  # the parameter itself: its identity, storage and version are checked
    data_ptr: int
    version: int
    rows: int
    packed: Tensor


class _Blocks(threading.local):
    # this thread's reordered weights, kept for its outermost `fixed_weights` block; None
    # outside any block (per thread: another thread may train the same weights meanwhile)
    fixed: dict[tuple[int, bool], _Prepared] | None = None


_blocks = _Blocks()


def fixed_weights_held() -> bool:
    """Whether this thread is inside a `fixed_weights` block."""
    return _blocks.fixed is not None


@contextlib.contextmanager
def fixed_weights() -> Iterator[None]:
    """A block of forward passes in which no weight changes: `validate`, `predict`, the
    validation pass of training.

    Inside it a `StepWeight` reorders each weight once for the whole block (kept by weight and
    orientation, for the latest row count) rather than once per pass: 12 reorders of about
    3 ms per forward pass of published Architecture 2 on 2 CPU threads, 9% of its evaluation
    at batch 16 and most of it at batch 1. `linear` runs its products by reordered weights
    too (5-20% faster at the input projections, classifiers and attention MLPs of
    Architecture 2, the same bits). The copies take the weights' own size (about 420 MiB for
    Architecture 2 at hidden 1024) and are dropped when the outermost block ends.
    A weight replaced (`.data =`, `load_state_dict` into new storage) or changed in place by a
    recorded operation is reordered again; one changed through `.data` in place inside the
    block is not noticed (it breaks the block's promise). The block holds for the thread that
    entered it only.
    """
    outermost = _blocks.fixed is None
    if outermost:
        _blocks.fixed = {}
    try:
        yield
    finally:
        if outermost:
            _blocks.fixed = None


def _reorder(weight: Tensor, rows: int) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def _reordered(weight: Tensor, rows: int, transpose: bool) -> Tensor:
    """`weight` (its transpose with `transpose`) in oneDNN's layout for products by `rows` rows,
    from the current `fixed_weights` block's copies where it holds one still valid."""
    key = (id(weight), transpose)  # one copy per weight: the one for the latest row count
    kept_here = _blocks.fixed
    if kept_here is not None:
        kept = kept_here.get(key)
        if (
            kept is not None
            and kept.weight is weight
            and kept.data_ptr == weight.data_ptr()
            and kept.version == weight._version
            and kept.rows == rows
        ):
            return kept.packed
    source = weight.detach()
    source = source.t().contiguous() if transpose else source
    packed = _reorder(source, rows)
    if kept_here is not None:
        kept_here[key] = _Prepared(weight, weight.data_ptr(), weight._version, rows, packed)
    return packed


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

        Kept beyond this object (one forward or backward pass) only inside `fixed_weights`:
        elsewhere a weight changed through `.data` or by a fused optimiser, which leave its
        version counter as it was, must not meet a stale copy.
        """
        if self.onednn and self._packed is None:
            self._packed = _reordered(self.weight, self.rows, self.transpose)
        return self._packed

    @property
    def packed_columns(self) -> int:
        """N: the columns of every product."""
        return self.weight.shape[1] if self.transpose else self.weight.shape[0]

    def _blas_operand(self) -> Tensor:
        return self.weight if self.transpose else self.weight.t()

    def addmm(self, bias: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
        """bias + x @ weightᵀ (x @ weight with `transpose`): bias (M, N), x (M, K); into `out`
        (M, N) when given."""
        if self.packed is None or x.dtype != torch.float32 or bias.dtype != torch.float32:
            return torch.addmm(bias, x, self._blas_operand(), out=out)
        if out is None and bias.shape == (x.shape[0], self.packed_columns):
            # the sum as a post-op of the product: the same bits, one pass over the rows less
            return torch.ops.mkldnn._linear_pointwise.binary(
                x.contiguous(), bias.contiguous(), self.packed, None, "add"
            )
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
    """x (..., K) @ weight (N, K)ᵀ + bias; weight as it is or reordered (`_reordered`)."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")  # (M, N)
    return out.reshape(*x.shape[:-1], out.shape[-1])


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
    `F.linear` elsewhere. The same bits with or without autograd recording, and inside a
    `fixed_weights` block, where the weight is reordered once for the block.
    """
    if not _onednn_applies(x, weight) or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        return _Linear.apply(x, weight, bias)
    if fixed_weights_held() and x.numel():
        # evaluation: the weight reordered once for the block (for its latest row count), which
        # runs these products up to 1.2x faster and gives the same bits
        rows = x.numel() // x.shape[-1]
        return _onednn_linear(x, _reordered(weight, rows, False), bias)
    return _onednn_linear(x, weight, bias)
