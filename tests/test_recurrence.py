"""`lstm_recurrence`: the PyTorch LSTM cell over packed steps, with its own backward pass."""

from __future__ import annotations

import pytest
import torch

from sfr.models.branch import create_branch, lstm_step, set_kernel
from sfr.models.matmul import StepWeight
from sfr.models.recurrence import lstm_recurrence


def _inputs(sizes: list[int], hidden: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    return (
        tensor(sum(sizes), 4 * hidden),
        tensor(sizes[0], hidden),
        tensor(sizes[0], hidden),
        tensor(4 * hidden, hidden),
    )


def _step_loop(gates_x, h0, c0, w_hh, sizes):
    """The same recurrence as autograd over `lstm_step`, one step at a time."""
    h, c, hs, cs, start = h0, c0, [], [], 0
    weight = StepWeight(w_hh, sizes[0])
    for rows in sizes:
        h, c = lstm_step(gates_x[start : start + rows], h[:rows], c[:rows], weight)
        hs.append(h)
        cs.append(c)
        start += rows
    return torch.cat(hs), torch.cat(cs)


@pytest.mark.parametrize(
    "sizes", [[4, 4, 4], [6, 6, 4, 4, 1], [3], [5, 2, 2, 1]], ids=["equal", "shrinking", "1", "mix"]
)
@pytest.mark.parametrize("use", ["h", "c", "both"])
def test_outputs_and_gradients_equal_autograd_over_the_step_loop(
    sizes: list[int], use: str
) -> None:
    """float64: every output and the gradient of all four inputs, against the oracle."""
    inputs = _inputs(sizes, 5, torch.float64)
    weights = torch.linspace(-1, 1, sum(sizes) * 5, dtype=torch.float64).view(sum(sizes), 5)
    results = []
    for function in (lstm_recurrence, _step_loop):
        hs, cs = function(*inputs, sizes)
        value = {"h": (hs * weights).sum(), "c": (cs * weights).cos().sum()}
        objective = value["h"] + value["c"] if use == "both" else value[use]
        results.append((hs, cs, torch.autograd.grad(objective, inputs)))
    (hs, cs, grads), (hs_ref, cs_ref, grads_ref) = results
    assert (hs - hs_ref).abs().max() <= 1e-14 and (cs - cs_ref).abs().max() <= 1e-14
    for mine, oracle in zip(grads, grads_ref, strict=True):
        assert (mine - oracle).abs().max() <= 1e-12
    assert all(g.abs().sum() > 0 for g in grads)  # every input reaches the objective


def test_gradcheck_and_inputs_without_gradients() -> None:
    sizes = [3, 3, 2, 1]
    inputs = _inputs(sizes, 2, torch.float64, seed=1)
    assert torch.autograd.gradcheck(lambda *a: lstm_recurrence(*a, sizes), inputs)
    gates_x, h0, c0, w_hh = inputs
    hs, _ = lstm_recurrence(gates_x, h0.detach(), c0.detach(), w_hh, sizes)
    grad_gates, grad_w = torch.autograd.grad(hs.sum(), [gates_x, w_hh])
    assert grad_gates.shape == gates_x.shape and grad_w.shape == w_hh.shape


def test_float32_forward_is_the_step_loop_bit_for_bit_and_gradients_agree() -> None:
    """float32 runs the products through oneDNN where PyTorch has it (`sfr.models.matmul`)."""
    sizes = [24, 24, 16, 8, 8, 1]
    inputs = _inputs(sizes, 32, torch.float32, seed=2)
    with torch.no_grad():
        loop = _step_loop(*inputs, sizes)
    hs, cs = lstm_recurrence(*inputs, sizes)
    assert torch.equal(hs, loop[0]) and torch.equal(cs, loop[1])
    grads = torch.autograd.grad((hs.sin().sum() + cs.sum()), inputs)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    hs64, cs64 = lstm_recurrence(*exact, sizes)
    grads64 = torch.autograd.grad((hs64.sin().sum() + cs64.sum()), exact)
    for mine, oracle in zip(grads, grads64, strict=True):
        assert (mine.double() - oracle).abs().max() <= 1e-4 * max(1.0, oracle.abs().max())


@pytest.mark.parametrize(
    "sizes", [[], [4, 5], [4, 0], [3, 3]], ids=["empty", "growing", "0", "sum"]
)
def test_bad_batch_sizes_are_named(sizes: list[int]) -> None:
    gates_x, h0, c0, w_hh = _inputs([4, 4], 3, torch.float64)
    with pytest.raises(ValueError, match="batch_sizes"):
        lstm_recurrence(gates_x, h0, c0, w_hh, sizes)


def test_a_weight_changed_after_the_forward_pass_is_refused_by_autograd() -> None:
    sizes = [2, 2]
    gates_x, h0, c0, w_hh = _inputs(sizes, 3, torch.float64)
    hs, _ = lstm_recurrence(gates_x, h0, c0, w_hh, sizes)
    with torch.no_grad():
        w_hh.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        hs.sum().backward()


@pytest.mark.parametrize("seq_comp", [False, True], ids=["anticipation", "sequence_completion"])
def test_loop_kernel_results_do_not_depend_on_grad_mode_batch_or_other_steps(
    seq_comp: bool,
) -> None:
    """float32 CPU evaluation is bit-for-bit repeatable (the `auto` kernel on the CPU); hidden 40
    is no multiple of the vector width, so the gates' scalar tails are covered too."""
    torch.manual_seed(0)
    branch = create_branch(
        feat_dim=24, hidden=40, num_classes=9, dropout=0.8, sequence_completion=seq_comp
    ).eval()
    set_kernel(branch, "auto")
    x = torch.randn(12, 40, 24)
    steps = list(range(24, 40))
    with torch.no_grad():
        reference = branch(x, steps)
        subset = branch(x, [24, 31, 39])
        few = branch(x[:5], steps)
    with_grad = branch(x, steps)  # parameters require gradients: `lstm_recurrence`
    assert torch.equal(with_grad.scores.detach(), reference.scores)
    assert torch.equal(with_grad.context.detach(), reference.context)
    assert torch.equal(subset.scores, reference.scores[:, [0, 7, 15]])
    assert torch.equal(few.scores, reference.scores[:5])
