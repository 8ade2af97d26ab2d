"""The Rolling-Unrolling LSTM branch (DESIGN §4), computed with far less work than the published loop.

    x (B, T, F)
      │ input dropout
      ▼
    rolling LSTM over steps 0..max(steps) ─────────────► (h_t, c_t) of every requested step t
      │ for every requested step t, all batched into one loop:
      ▼
    unrolling LSTM from (h_t, c_t), fed x_t repeated T - t + 1 times
    (sequence completion: fed x_t, ..., x_{T-1}), each input with its own dropout mask
      │ last hidden state h_n
      ▼
    dropout + linear ──► scores (B, K, C)       context = [h_n, c_t] (B, K, 2H)

The published code unrolls from every one of the T steps in its own LSTM call (O(T²) sequential
steps). Here only the requested steps are unrolled, all unrolls advance together (the ones that
finish early drop out of the batch), and where the input of an unroll is constant and no per-step
dropout applies, its input projection is computed once. `sfr.models.reference` keeps the plain
formulation as the oracle this one is tested against.

Two kernels compute the same function (`RULSTMBranch.kernel`):

- `loop`: one Python-level step per LSTM step, every unroll batched; the only one that hoists
  the input projection of a constant unroll input. Its recurrent products go through oneDNN's
  matmul on the CPU (`sfr.models.matmul`: 1.3-2.8x the BLAS rate of PyTorch's `mm` at these
  shapes); where a gradient is needed, the input projections of all steps are one product and
  the recurrence runs `lstm_recurrence`, whose backward computes the recurrent weights' gradient
  as one product and no input gradient that nothing needs (`sfr.models.recurrence`).
- `fused`: PyTorch's fused LSTM (oneDNN on CPU, cuDNN on GPU) on the modules' own weights. The
  rolling LSTM runs as one `nn.LSTM` call per stretch between requested steps (a call returns the
  cell state of its last step only); on CUDA all unrolls run as ONE call over a packed batch of
  K·B sequences of lengths T - t_k + 1, whose final hidden states are the unrolls' last ones; on
  the CPU, where PyTorch runs packed batches step by step outside oneDNN, unrolls of similar
  lengths run as a few padded calls instead (`length_buckets`: at most 25% padding steps). The
  inputs are dropped out as one tensor, one mask element per unrolling step, input and unit: the
  published per-step masks.

`auto` (the default) takes what measured fastest on the device (`benchmarks/bench.py`,
`benchmarks/check_training_gpu.py`): `fused` on CUDA, `loop` elsewhere (on 2 CPU threads it
trains and evaluates the T = 40 branch and Architecture 2 faster than the fused calls: README,
"Performance"; and its float32 results do not depend on the grad mode or on the other requested
steps, nor on the batch's other samples in batches of two or more, so CPU evaluation is
bit-for-bit repeatable).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from sfr.models.matmul import StepWeight, linear
from sfr.models.recurrence import lstm_recurrence

Kernel = Literal["auto", "fused", "loop"]
KERNELS: tuple[Kernel, ...] = ("auto", "fused", "loop")


class BranchOutput(NamedTuple):
    """Scores (B, K, C) and attention context (B, K, 2H) at the K requested steps."""

    scores: Tensor
    context: Tensor


def lstm_step(gates_x: Tensor, h: Tensor, c: Tensor, w_hh: StepWeight) -> tuple[Tensor, Tensor]:
    """One LSTM step given the input projection `gates_x` (biases included), PyTorch gate order.

    gates_x (N, 4H), h and c (N, H); w_hh: the recurrent weights (4H, H) prepared for the step
    loop (`sfr.models.matmul`). Returns the new (h, c).
    """
    gates = w_hh.addmm(gates_x, h)  # (N, 4H)
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def _lstm_params(lstm: nn.LSTM, rows: int) -> tuple[Tensor, Tensor, StepWeight]:
    """Input weights, summed biases and recurrent weights (prepared for products by about
    `rows` rows at a time) of a one-layer LSTM."""
    return lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0, StepWeight(lstm.weight_hh_l0, rows)


class RULSTMBranch(nn.Module):
    """An RU-LSTM branch over one modality at one rate.

    `sequence_completion` switches the unrolling input from the repeated current input
    (anticipation) to the true future inputs (pre-training). Parameters live in two one-layer
    `nn.LSTM` modules and a linear classifier, so the published weights map one to one.
    `kernel` picks how the LSTMs are computed (module docstring); it is not saved in checkpoints.
    """

    def __init__(
        self,
        feat_dim: int,
        hidden: int,
        num_classes: int,
        dropout: float = 0.8,
        *,
        sequence_completion: bool = False,
        shared_dropout_mask: bool = False,
        kernel: Kernel = "auto",
    ) -> None:
        super().__init__()
        self.kernel = kernel
        # fused unrolls as padded calls (`_unroll_fused_padded`) or one packed call; None: padded
        # on the CPU, where PyTorch runs packed LSTM batches step by step, packed elsewhere
        self.padded_unrolls: bool | None = None
        self.feat_dim = feat_dim
        self.hidden = hidden
        self.num_classes = num_classes
        self.sequence_completion = sequence_completion
        self.shared_dropout_mask = shared_dropout_mask
        self.input_dropout = nn.Dropout(dropout)
        self.rolling = nn.LSTM(feat_dim, hidden)
        self.unrolling = nn.LSTM(feat_dim, hidden)
        self.head_dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    @property
    def kernel(self) -> Kernel:
        """How the LSTMs are computed: one of `KERNELS` (ValueError for any other name)."""
        return self._kernel

    @kernel.setter
    def kernel(self, kernel: Kernel) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}.")
        self._kernel = kernel

    def forward(self, x: Tensor, steps: Sequence[int] | None = None) -> BranchOutput:
        """Scores (B, K, C) and context (B, K, 2H) at `steps` (K ascending indices into x's T
        steps; None: every step) of x (B, T, F).

        Raises ValueError for an x that is not (B ≥ 1, T, feat_dim), or steps that are not
        ascending distinct indices in [0, T).
        """
        if x.dim() != 3 or x.shape[0] == 0 or x.shape[2] != self.feat_dim:
            raise ValueError(
                f"x must be a (B, T, {self.feat_dim}) tensor of at least one sequence (batch, "
                f"steps, features), not {tuple(x.shape)}."
            )
        num_steps = x.shape[1]  # x: (B, T, F)
        steps = list(range(num_steps)) if steps is None else [int(step) for step in steps]
        if not steps or steps != sorted(set(steps)) or steps[0] < 0 or steps[-1] >= num_steps:
            raise ValueError(
                f"steps must be ascending distinct indices in [0, {num_steps}): {steps}"
            )
        fused_roll, fused_unroll = self.fused_stages(x.device)
        roll = self._roll_fused if fused_roll else self._roll
        unroll = self._unroll_fused if fused_unroll else self._unroll
        h_roll, c_roll = roll(x, steps)  # (K, B, H) each
        h_last = unroll(x, steps, h_roll, c_roll)  # (K, B, H)
        h_last = h_last.transpose(0, 1)  # (B, K, H)
        classifier = self.classifier
        scores = linear(self.head_dropout(h_last), classifier.weight, classifier.bias)  # (B, K, C)
        context = torch.cat([h_last, c_roll.transpose(0, 1)], dim=2)  # (B, K, 2H)
        return BranchOutput(scores, context)

    @property
    def per_step_masks(self) -> bool:
        """Whether the unrolls draw a fresh dropout mask at every step (published training)."""
        return self.training and self.input_dropout.p > 0 and not self.shared_dropout_mask

    def fused_stages(self, device: torch.device) -> tuple[bool, bool]:
        """Whether the (rolling, unrolling) LSTMs run the fused kernel on `device`.

        `fused` and `loop` apply to both; `auto` is `fused` on CUDA and `loop` elsewhere (module
        docstring: what measured fastest, and bit-for-bit repeatable CPU evaluation).
        """
        fused = self.kernel == "fused" or (self.kernel == "auto" and device.type == "cuda")
        return fused, fused

    def pads_unrolls(self, device: torch.device) -> bool:
        """Whether the fused kernel runs the unrolls as padded calls grouped by length
        (`padded_unrolls`; by default on the CPU) rather than as one packed call."""
        return self.padded_unrolls if self.padded_unrolls is not None else device.type == "cpu"

    def _roll_fused(self, x: Tensor, steps: list[int]) -> tuple[Tensor, Tensor]:
        """`_roll` with one fused call per stretch of steps that ends at a requested step.

        A one-step stretch (consecutive requested steps) is one `lstm_step`: the same function
        without the fused call's set-up cost, the input projections of all of them in one product.
        """
        dropped = self.input_dropout(x).transpose(0, 1)  # (T, B, F), one mask per input
        w_ih, bias, w_hh = _lstm_params(self.rolling, x.shape[0])
        single = [t for t, previous in zip(steps[1:], steps) if t == previous + 1]
        projected = dict(zip(single, linear(dropped[single], w_ih, bias))) if single else {}
        h = c = None  # (B, H) each, after the last computed step
        hs, cs = [], []
        begin = 0
        for t in steps:
            if h is not None and c is not None and t == begin:
                h, c = lstm_step(projected[t], h, c, w_hh)
            else:
                # the state in the input's dtype: autocast may have lowered the steps before
                state = (
                    None
                    if h is None or c is None
                    else (h.unsqueeze(0).to(x.dtype), c.unsqueeze(0).to(x.dtype))
                )
                _, (h_n, c_n) = self.rolling(dropped[begin : t + 1], state)
                h, c = h_n[0], c_n[0]
            hs.append(h)
            cs.append(c)
            begin = t + 1
        return torch.stack(hs), torch.stack(cs)

    def _unroll_fused(self, x: Tensor, steps: list[int], h0: Tensor, c0: Tensor) -> Tensor:
        """`_unroll` as one fused LSTM call over a packed batch of the K·B unroll sequences.

        Rows are unroll-major and lengths descend with the steps, so the sequences still running
        at unrolling step j are a prefix: the packed batch sizes are (active unrolls at j)·B.
        """
        num_unrolls, batch, hidden = h0.shape
        num_steps = x.shape[1]
        extra = 0 if self.sequence_completion else 1
        lengths = [num_steps - t + extra for t in steps]
        if self.pads_unrolls(x.device):
            return self._unroll_fused_padded(x, steps, lengths, h0, c0)
        active, source, index = self._packed_unroll_inputs(x, steps, lengths)
        if self.per_step_masks:
            data = self.input_dropout(source[index])  # a fresh mask for every step of every unroll
        else:
            data = self.input_dropout(source)[index]  # one mask per input, shared by its steps
        packed = PackedSequence(
            data.reshape(-1, data.shape[-1]), torch.tensor(active, dtype=torch.int64) * batch
        )
        # the input's dtype: cuDNN refuses mixed dtypes where autocast does not cast the call
        hx = (h0.reshape(1, -1, hidden).to(data.dtype), c0.reshape(1, -1, hidden).to(data.dtype))
        _, (h_n, _) = self.unrolling(packed, hx)  # h_n: each sequence's state at its own length
        return h_n.reshape(num_unrolls, batch, hidden)

    def _packed_unroll_inputs(
        self, x: Tensor, steps: list[int], lengths: list[int]
    ) -> tuple[list[int], Tensor, Tensor]:
        """The unrolls' inputs as a packed batch: (active unrolls at each unrolling step j,
        source (T or K, B, F), index (P,)) such that `source[index]` (P, B, F) holds, time-major
        and unroll-major within a step, the input each active unroll reads at each step.

        Lengths descend with the steps, so the unrolls still running at step j are a prefix.
        """
        active = [sum(1 for n in lengths if n > j) for j in range(lengths[0])]
        x_steps = x.transpose(0, 1)  # (T, B, F)
        start = torch.tensor(steps, device=x.device)
        unroll = torch.cat([torch.arange(a, device=x.device) for a in active])
        if self.sequence_completion:  # step j of unroll k reads x_{t_k + j}
            offset = torch.cat([torch.full((a,), j, device=x.device) for j, a in enumerate(active)])
            return active, x_steps, start[unroll] + offset
        return active, x_steps[start], unroll  # (K, B, F): the current input of each unroll

    def _unroll_fused_padded(
        self, x: Tensor, steps: list[int], lengths: list[int], h0: Tensor, c0: Tensor
    ) -> Tensor:
        """`_unroll_fused` on the CPU: a few fused calls over padded (not packed) sequences.

        PyTorch's CPU LSTM runs a packed batch step by step outside oneDNN, and the backward of
        each step's input slice fills a gradient the size of the whole packed input. Unrolls of
        similar lengths are grouped instead (`length_buckets`), each group one oneDNN call over
        its longest length; a shorter unroll's state is read at its own last step (the padding
        steps after it are computed and discarded). Same masks semantics as `_unroll_fused`.
        """
        _, batch, hidden = h0.shape
        x_steps = x.transpose(0, 1)  # (T, B, F)
        every = torch.tensor(steps, device=x.device)
        # without per-step masks, one mask per input, shared by all the steps that read it
        source = x_steps if self.sequence_completion else x_steps[every]  # (T or K, B, F)
        if not self.per_step_masks:
            source = self.input_dropout(source)
        finished = []
        for first, last in length_buckets(lengths):
            count, span = last - first, lengths[first]
            if self.sequence_completion:  # step j of unroll k reads x_{t_k + j} (padding: x_{T-1})
                offset = torch.arange(span, device=x.device).unsqueeze(1)
                frames = (every[first:last].unsqueeze(0) + offset).clamp(max=x.shape[1] - 1)
                data = source[frames]  # (span, count, B, F)
            else:  # unroll k reads x_{t_k} at every step
                data = source[first:last].unsqueeze(0).expand(span, count, batch, -1)
            if self.per_step_masks:
                data = self.input_dropout(data)  # a fresh mask for every step of every unroll
            data = data.reshape(span, count * batch, -1)
            hx = (
                h0[first:last].reshape(1, -1, hidden).to(data.dtype),
                c0[first:last].reshape(1, -1, hidden).to(data.dtype),
            )
            out, _ = self.unrolling(data, hx)  # (span, count·B, H)
            ends = torch.tensor([n - 1 for n in lengths[first:last]], device=x.device)
            out = out.reshape(span, count, batch, hidden)
            finished.append(out[ends, torch.arange(count, device=x.device)])  # (count, B, H)
        return torch.cat(finished)

    def _roll(self, x: Tensor, steps: list[int]) -> tuple[Tensor, Tensor]:
        """Rolling LSTM from a zero state up to the last requested step; states at `steps`."""
        w_ih, bias, w_hh = _lstm_params(self.rolling, x.shape[0])
        # one mask per input (drawn for all T: the same random stream whatever the steps)
        dropped = self.input_dropout(x)[:, : steps[-1] + 1]
        gates_x = linear(dropped, w_ih, bias)  # (B, steps[-1] + 1, 4H)
        if self._backward_by_recurrence(x):
            count, batch = steps[-1] + 1, x.shape[0]
            packed = gates_x.transpose(0, 1).reshape(count * batch, -1)  # (count·B, 4H)
            zeros = x.new_zeros(batch, self.hidden)
            hs, cs = lstm_recurrence(
                packed, zeros, zeros, self.rolling.weight_hh_l0, [batch] * count
            )
            return hs.view(count, batch, -1)[steps], cs.view(count, batch, -1)[steps]
        h = x.new_zeros(x.shape[0], self.hidden)
        c = x.new_zeros(x.shape[0], self.hidden)
        wanted = set(steps)
        hs, cs = [], []
        for t in range(steps[-1] + 1):
            h, c = lstm_step(gates_x[:, t], h, c, w_hh)
            if t in wanted:
                hs.append(h)
                cs.append(c)
        return torch.stack(hs), torch.stack(cs)

    def _unroll(self, x: Tensor, steps: list[int], h0: Tensor, c0: Tensor) -> Tensor:
        """All unrolls in one loop; returns the last hidden state of each, (K, B, H).

        Unroll k starts at step t_k and runs n_k steps; steps ascend, so lengths descend and
        the unrolls still running at step j are a prefix of the batch (unroll-major rows).
        """
        num_unrolls, batch, _ = h0.shape
        num_steps = x.shape[1]
        extra = 0 if self.sequence_completion else 1
        lengths = [num_steps - t + extra for t in steps]
        if self._backward_by_recurrence(x):
            return self._unroll_recurrence(x, steps, lengths, h0, c0)
        w_ih, bias, w_hh = _lstm_params(self.unrolling, h0.shape[0] * h0.shape[1])
        start = torch.tensor(steps, device=x.device)
        x_steps = x.transpose(0, 1)  # (T, B, F)

        per_step_masks = self.per_step_masks
        if self.sequence_completion:
            shared = x_steps if per_step_masks else self.input_dropout(x_steps)
            proj = None if per_step_masks else linear(shared, w_ih, bias)  # (T, B, 4H)
        else:
            current = x_steps[start].reshape(num_unrolls * batch, -1)  # (K*B, F)
            # (K*B, 4H), computed once where no per-step dropout applies
            proj = None if per_step_masks else linear(self.input_dropout(current), w_ih, bias)

        h = h0.reshape(num_unrolls * batch, -1)  # (K*B, H)
        c = c0.reshape(num_unrolls * batch, -1)
        finished: list[Tensor] = []
        for j in range(lengths[0]):
            active = sum(1 for n in lengths if n > j)
            rows = active * batch
            if self.sequence_completion:
                source = shared if proj is None else proj
                frames = source[start[:active] + j].reshape(rows, -1)  # (rows, F or 4H)
                gates_x = linear(self.input_dropout(frames), w_ih, bias) if proj is None else frames
            elif proj is None:
                gates_x = linear(self.input_dropout(current[:rows]), w_ih, bias)
            else:
                gates_x = proj[:rows]
            h, c = lstm_step(gates_x, h[:rows], c[:rows], w_hh)
            still = sum(1 for n in lengths if n > j + 1) * batch
            if still < rows:
                finished.append(h[still:rows])
        return torch.cat(finished[::-1]).reshape(num_unrolls, batch, -1)

    def _unroll_recurrence(
        self, x: Tensor, steps: list[int], lengths: list[int], h0: Tensor, c0: Tensor
    ) -> Tensor:
        """`_unroll` for training: the input projections of every step of every unroll as one
        product, the recurrence with its own backward (`lstm_recurrence`); same masks semantics.
        """
        num_unrolls, batch, hidden = h0.shape
        w_ih, bias, _ = _lstm_params(self.unrolling, 1)
        active, source, index = self._packed_unroll_inputs(x, steps, lengths)
        if self.per_step_masks:  # a fresh mask for every step of every unroll
            gates_x = linear(self.input_dropout(source[index]), w_ih, bias)  # (P, B, 4H)
        else:  # one mask per input, shared by all the steps that read it; projected once
            gates_x = linear(self.input_dropout(source), w_ih, bias)[index]
        hs, _ = lstm_recurrence(
            gates_x.reshape(-1, 4 * hidden),
            h0.reshape(num_unrolls * batch, hidden),
            c0.reshape(num_unrolls * batch, hidden),
            self.unrolling.weight_hh_l0,
            [count * batch for count in active],
        )
        # unroll k's last state: unroll-row k of its last step (rows are unroll-major in a step)
        step_start = [sum(active[:j]) for j in range(len(active))]
        last = torch.tensor([step_start[n - 1] + k for k, n in enumerate(lengths)], device=x.device)
        rows = (last.unsqueeze(1) * batch + torch.arange(batch, device=x.device)).reshape(-1)
        return hs[rows].reshape(num_unrolls, batch, hidden)

    def _backward_by_recurrence(self, x: Tensor) -> bool:
        """Whether the loop kernel computes a gradient and so runs `lstm_recurrence` (its
        forward is the loop's, bit for bit; autocast keeps the per-step loop)."""
        return (
            torch.is_grad_enabled()
            and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
            and not torch.is_autocast_enabled(x.device.type)
        )


def length_buckets(lengths: Sequence[int], waste: float = 0.25) -> list[tuple[int, int]]:
    """Groups [first, last) of consecutive unrolls (lengths descending) run as one padded call.

    A group grows while the padding steps it adds stay within `waste` times its real steps.
    """
    buckets = []
    first = 0
    while first < len(lengths):
        last = first + 1
        while last < len(lengths):
            real = sum(lengths[first : last + 1])
            if lengths[first] * (last + 1 - first) - real > waste * real:
                break
            last += 1
        buckets.append((first, last))
        first = last
    return buckets


def create_branch(
    *,
    feat_dim: int,
    hidden: int,
    num_classes: int,
    dropout: float = 0.8,
    sequence_completion: bool = False,
    shared_dropout_mask: bool = False,
    kernel: Kernel = "auto",
) -> RULSTMBranch:
    """Build an RU-LSTM branch (keyword-only, as every sfr builder); `kernel`: see the module."""
    return RULSTMBranch(
        feat_dim,
        hidden,
        num_classes,
        dropout,
        sequence_completion=sequence_completion,
        shared_dropout_mask=shared_dropout_mask,
        kernel=kernel,
    )


def set_kernel(model: nn.Module, kernel: Kernel) -> None:
    """Run every RU-LSTM branch in `model` (a branch, a fusion tree) with `kernel`.

    Raises ValueError for a name not in `KERNELS`, or a model without any branch.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}.")
    branches = [module for module in model.modules() if isinstance(module, RULSTMBranch)]
    if not branches:
        raise ValueError(f"{type(model).__name__} holds no RU-LSTM branch to set the kernel of.")
    for branch in branches:
        branch.kernel = kernel
