"""An LSTM recurrence over precomputed input projections, with a hand-written backward pass.

    gates_x (N, 4H), packed time-major ──► h, c (N, H) of every step, packed the same way

The rows of step j are `batch_sizes[j]` and those of step j + 1 a prefix of them (as in a
`PackedSequence`: sequences of descending lengths, the ones still running first). The input
projections W_ih·x_t + b of all steps are one matrix product computed by the caller, so its
backward (dW_ih, and no dx where the input needs no gradient) is one product too.

The backward runs the recurrence in reverse with one (rows_j, 4H) @ (4H, H) product per step and
then the recurrent weights' gradient as ONE (4H, N) @ (N, H) product over all steps. Autograd over
a per-step loop instead accumulates dW_hh with one small product per step, and PyTorch's fused
CPU LSTM (oneDNN) computes the input gradient whether it is wanted or not and can only run
sequences of one length per call (padding); here neither happens. The function is the PyTorch
LSTM cell (gate order i, f, g, o): c' = σ(f)·c + σ(i)·tanh(g), h' = σ(o)·tanh(c'). Gradients are
checked against autograd over `sfr.models.branch.lstm_step` in float64 (tests/test_recurrence.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from sfr.models.matmul import StepWeight


def _offsets(batch_sizes: Sequence[int]) -> list[int]:
    offsets = [0]
    for rows in batch_sizes:
        offsets.append(offsets[-1] + rows)
    return offsets


class _Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        gates_x: Tensor,
        h0: Tensor,
        c0: Tensor,
        w_hh: Tensor,
        batch_sizes: tuple[int, ...],
    ) -> tuple[Tensor, Tensor]:
        hidden = h0.shape[1]
        offsets = _offsets(batch_sizes)
        acts = torch.empty_like(gates_x)  # (N, 4H): σ(i), σ(f), tanh(g), σ(o) of every row
        hs = gates_x.new_empty(offsets[-1], hidden)
        cs = gates_x.new_empty(offsets[-1], hidden)
        recurrent = StepWeight(w_hh, batch_sizes[0])
        h, c = h0, c0
        for j, rows in enumerate(batch_sizes):
            span = slice(offsets[j], offsets[j + 1])
            act = acts[span]
            recurrent.addmm(gates_x[span], h[:rows], out=act)
            # gate by gate as `lstm_step` (PyTorch's vectorised and scalar tails of a row
            # round differently, so the row lengths must match for the same bits)
            i, f, g, o = act.chunk(4, dim=1)
            i.sigmoid_()
            f.sigmoid_()
            g.tanh_()
            o.sigmoid_()
            # the products summed in the order of `lstm_step`: the same bits in evaluation
            c = torch.mul(f, c[:rows], out=cs[span]).add_(i * g)
            h = torch.mul(o, torch.tanh(c), out=hs[span])
        ctx.set_materialize_grads(False)
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(acts, hs, cs, h0, c0, w_hh)
        return hs, cs

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_hs: Tensor | None, grad_cs: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        acts, hs, cs, h0, c0, w_hh = ctx.saved_tensors
        batch_sizes: tuple[int, ...] = ctx.batch_sizes
        offsets = _offsets(batch_sizes)
        hidden = h0.shape[1]
        transposed = StepWeight(w_hh, batch_sizes[0], transpose=True)  # dgates @ W_hh
        grad_gates = torch.empty_like(acts)  # (N, 4H): the loss's gradient at the pre-activations
        # the gradients carried from step j + 1 to step j: rows past step j + 1's stay zero
        carry_h = h0.new_zeros(batch_sizes[0], hidden)
        carry_c = h0.new_zeros(batch_sizes[0], hidden)
        for j in range(len(batch_sizes) - 1, -1, -1):
            rows = batch_sizes[j]
            span = slice(offsets[j], offsets[j + 1])
            i, f, g, o = acts[span].chunk(4, dim=1)
            c_prev = c0[:rows] if j == 0 else cs[offsets[j - 1] : offsets[j - 1] + rows]
            tanh_c = torch.tanh(cs[span])
            dh = carry_h[:rows] if grad_hs is None else grad_hs[span] + carry_h[:rows]
            dc = carry_c[:rows] if grad_cs is None else grad_cs[span] + carry_c[:rows]
            # dc += dh·σ(o)·(1 - tanh²c)
            dc = dc + dh * o * (1 - tanh_c * tanh_c)
            di, df, dg, do = grad_gates[span].chunk(4, dim=1)
            torch.mul(dc, g, out=di).mul_(i * (1 - i))
            torch.mul(dc, c_prev, out=df).mul_(f * (1 - f))
            torch.mul(dc, i, out=dg).mul_(1 - g * g)
            torch.mul(dh, tanh_c, out=do).mul_(o * (1 - o))
            torch.mul(dc, f, out=carry_c[:rows])
            carry_h[:rows] = transposed.mm(grad_gates[span])
        grad_w_hh = None
        if ctx.needs_input_grad[3]:
            # h_{j-1} of every row of step j: h0 for step 0, else a prefix of step j - 1's rows
            h_prev = torch.cat(
                [h0[: batch_sizes[0]]]
                + [
                    hs[offsets[j - 1] : offsets[j - 1] + batch_sizes[j]]
                    for j in range(1, len(batch_sizes))
                ]
            )
            grad_w_hh = grad_gates.t().mm(h_prev)  # (4H, H)
        grad_h0 = carry_h if ctx.needs_input_grad[1] else None
        grad_c0 = carry_c if ctx.needs_input_grad[2] else None
        return grad_gates, grad_h0, grad_c0, grad_w_hh, None


def lstm_recurrence(
    gates_x: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, batch_sizes: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Hidden and cell states (N, H) each of every row of an LSTM recurrence.

    gates_x (N, 4H): the input projections W_ih·x + b_ih + b_hh of every row, packed time-major
    with `batch_sizes[j]` rows at step j, each step's rows a prefix of the step before's;
    h0, c0 (batch_sizes[0], H): the initial states; w_hh (4H, H): the recurrent weights
    (`nn.LSTM.weight_hh_l0`). Differentiable in all four tensors (once: no double backward).

    Raises ValueError for batch sizes that do not count the rows of gates_x or that grow.
    """
    sizes = tuple(int(rows) for rows in batch_sizes)
    if (
        not sizes
        or sum(sizes) != gates_x.shape[0]
        or sizes[0] != h0.shape[0]
        or any(later > earlier for earlier, later in itertools.pairwise(sizes))
        or sizes[-1] < 1
    ):
        raise ValueError(
            f"batch_sizes {list(sizes)} must be positive, non-increasing, start at the "
            f"{h0.shape[0]} initial states and sum to the {gates_x.shape[0]} rows of gates_x."
        )
    return _Recurrence.apply(gates_x, h0, c0, w_hh, sizes)
