"""`StepWeight`: products by a reused weight through oneDNN on the CPU, BLAS elsewhere."""

from __future__ import annotations

import threading

import pytest
import torch
from test_cli import preset_args

from sfr.errors import ConfigError
from sfr.models import matmul
from sfr.models.branch import create_branch
from sfr.models.matmul import StepWeight, cpu_matmul, fixed_weights, linear, onednn_available

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")


def _weight_and_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 32, generator=generator)
    return weight, torch.randn(7, 32, generator=generator), torch.randn(7, 48, generator=generator)


@needs_onednn
@pytest.mark.parametrize("transpose", [False, True])
def test_products_equal_blas_up_to_rounding(transpose: bool, monkeypatch) -> None:
    weight, x, bias = _weight_and_rows()
    if transpose:
        x = torch.randn(7, 48)
        bias = torch.randn(7, 32)
    fast = StepWeight(weight, 7, transpose=transpose)
    assert fast.packed is not None  # oneDNN, reordered once
    expected = x @ (weight if transpose else weight.t())
    assert (fast.mm(x) - expected).abs().max() <= 1e-4
    assert (fast.addmm(bias, x) - (bias + expected)).abs().max() <= 1e-4
    out = torch.empty_like(bias)
    assert fast.addmm(bias, x, out=out) is out and torch.equal(out, fast.addmm(bias, x))
    monkeypatch.setenv("SFR_CPU_MATMUL", "blas")
    blas = StepWeight(weight, 7, transpose=transpose)
    assert blas.packed is None and torch.equal(blas.mm(x), expected)


@needs_onednn
def test_a_changed_weight_is_never_met_by_a_stale_copy() -> None:
    """Each StepWeight reorders its own copy: changes through the version counter or through
    `.data` (which hides them from it, as EMA code often does) are both seen."""
    weight, x, _ = _weight_and_rows(1)
    parameter = torch.nn.Parameter(weight.clone())
    with torch.no_grad():
        before = StepWeight(parameter, 7).mm(x)
        parameter.add_(1.0)  # an optimizer step
        after = StepWeight(parameter, 7).mm(x)
        version = parameter._version
        parameter.data.mul_(2.0)  # the version counter does not move
        assert parameter._version == version
        doubled = StepWeight(parameter, 7).mm(x)
    assert (after - before - x.sum(1, keepdim=True)).abs().max() <= 1e-3
    assert (doubled - 2 * after).abs().max() <= 1e-3


def test_blas_wherever_onednn_does_not_apply() -> None:
    weight, x, _ = _weight_and_rows(2)
    assert StepWeight(weight.double(), 7).packed is None  # float64: the oracle's precision
    parameter = torch.nn.Parameter(weight)
    recorded = StepWeight(parameter, 7)  # autograd records the product
    assert recorded.packed is None
    recorded.mm(x).sum().backward()
    assert parameter.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert StepWeight(weight, 7).packed is None


def test_the_environment_variable_is_checked(monkeypatch) -> None:
    monkeypatch.delenv("SFR_CPU_MATMUL", raising=False)
    assert cpu_matmul() == "onednn"
    monkeypatch.setenv("SFR_CPU_MATMUL", " BLAS ")
    assert cpu_matmul() == "blas"
    monkeypatch.setenv("SFR_CPU_MATMUL", "mkl")
    with pytest.raises(ConfigError, match="SFR_CPU_MATMUL must be one of onednn, blas, not 'mkl'"):
        StepWeight(torch.ones(2, 2), 1)


def test_a_bad_matmul_setting_is_a_message_in_the_cli(
    cli, golden_data, presets_dir, tmp_path, monkeypatch
) -> None:
    """Exit 2 naming the variable, no traceback, from a command that runs a model."""
    monkeypatch.setenv("SFR_CPU_MATMUL", "mkl")
    code, output, _ = cli(
        "train-branch",
        *preset_args(presets_dir),
        "--data",
        golden_data,
        "--runs",
        tmp_path / "runs",
        "--alpha",
        "0.5",
        "--s-enc",
        "6",
        "--s-ant",
        "4",
        "--epochs",
        "1",
    )
    assert code == 2, output
    assert "SFR_CPU_MATMUL must be one of onednn, blas, not 'mkl'" in output
    assert "Traceback" not in output
    assert not (tmp_path / "runs").exists()  # refused before anything is written


def test_a_pytorch_without_the_operators_falls_back(monkeypatch) -> None:
    onednn_available.cache_clear()
    try:

        class _NoOps:
            def __getattr__(self, name: str):
                raise AttributeError(name)

        monkeypatch.setattr(matmul.torch.ops, "mkldnn", _NoOps())
        assert not onednn_available()
        weight, x, _ = _weight_and_rows(3)
        product = StepWeight(weight, 7)
        assert product.packed is None and torch.equal(product.mm(x), x @ weight.t())
    finally:
        monkeypatch.undo()
        onednn_available.cache_clear()


@needs_onednn
@pytest.mark.parametrize("x_grad", [False, True])
def test_linear_equals_f_linear_with_gradients(x_grad: bool) -> None:
    """3-D input, bias, gradients of weight, bias (and input): against `F.linear` in float64."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 32, generator=generator).requires_grad_(x_grad)
    weight = torch.randn(48, 32, generator=generator, requires_grad=True)
    bias = torch.randn(48, generator=generator, requires_grad=True)
    out = linear(x, weight, bias)
    assert out.grad_fn is not None and "Linear" in type(out.grad_fn).__name__
    with torch.no_grad():
        assert torch.equal(linear(x, weight, bias), out.detach())  # the same bits without autograd
    upstream = torch.randn(3, 5, 48, generator=generator)
    inputs = [weight, bias, *([x] if x_grad else [])]
    grads = torch.autograd.grad(out, inputs, upstream)
    exact = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    reference = torch.nn.functional.linear(*exact)
    assert (out.double() - reference).abs().max() <= 1e-4
    exact_inputs = [exact[1], exact[2], *([exact[0]] if x_grad else [])]
    for mine, oracle in zip(
        grads, torch.autograd.grad(reference, exact_inputs, upstream.double()), strict=True
    ):
        assert (mine.double() - oracle).abs().max() <= 1e-4 * max(1.0, oracle.abs().max())


def test_linear_falls_back_to_f_linear(monkeypatch) -> None:
    x, weight, bias = (
        torch.randn(4, 6).double(),
        torch.randn(3, 6).double(),
        torch.randn(3).double(),
    )
    assert torch.equal(linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))
    monkeypatch.setenv("SFR_CPU_MATMUL", "blas")
    x, weight = x.float(), weight.float()
    assert torch.equal(linear(x, weight), torch.nn.functional.linear(x, weight))


def test_fused_optimizer_steps_and_saving_after_a_forward() -> None:
    """Fused optimizers update parameters without moving their version counters, and a model
    that ran a CPU forward must still pickle: no reordered copy outlives its pass."""
    import io

    from sfr.models.branch import create_branch

    losses = {}
    for choice in ("onednn", "blas"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SFR_CPU_MATMUL", choice)
            torch.manual_seed(0)
            model = create_branch(feat_dim=8, hidden=20, num_classes=5, dropout=0.0).train()
            x, y = torch.randn(6, 5, 8), torch.randint(0, 5, (6,))
            optimizer = torch.optim.SGD(model.parameters(), lr=1.0, fused=True)
            losses[choice] = []
            for _ in range(4):
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x).scores[:, -1], y)
                loss.backward()
                optimizer.step()
                losses[choice].append(loss.item())
            with torch.no_grad():
                model.eval()(x)
            torch.save(model, io.BytesIO())
    assert losses["onednn"] == pytest.approx(losses["blas"], rel=1e-5)
    assert losses["onednn"][-1] < losses["onednn"][0] - 0.1


def count_reorders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The row counts of every weight reordered for oneDNN from now on (a list filled as it goes)."""
    calls: list[int] = []
    reorder = matmul._reorder

    def counted(weight: torch.Tensor, rows: int) -> torch.Tensor:
        calls.append(rows)
        return reorder(weight, rows)

    monkeypatch.setattr(matmul, "_reorder", counted)
    return calls


@needs_onednn
def test_fixed_weights_reorders_each_weight_once_for_the_block(monkeypatch) -> None:
    """Evaluation passes (`validate`, `predict`) reuse each reordered weight; the products give
    the same bits as without the block, and the copies are dropped when it ends."""
    torch.manual_seed(0)
    branch = create_branch(feat_dim=24, hidden=40, num_classes=9, dropout=0.5).eval()
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        expected = branch(x, [3, 5, 6]).scores
        expected_two = branch(x[:2], [3, 5, 6]).scores
        calls = count_reorders(monkeypatch)
        with fixed_weights():
            first = branch(x, [3, 5, 6]).scores
            # the rolling and unrolling LSTMs' input and recurrent weights, the classifier's
            assert len(calls) == 5
            with fixed_weights():  # an inner block keeps the outer one's copies
                second = branch(x, [3, 5, 6]).scores
            third = branch(x, [3, 5, 6]).scores
            assert len(calls) == 5
            two = branch(x[:2], [3, 5, 6]).scores  # another batch size: its own row counts
            assert len(calls) == 10
        assert not matmul.fixed_weights_held()
        branch(x, [3, 5, 6])
        assert len(calls) == 12  # outside a block: the recurrent weights once per pass again
    for scores in (first, second, third):
        assert torch.equal(scores, expected)
    assert torch.equal(two, expected_two)


@needs_onednn
def test_fixed_weights_still_sees_a_replaced_or_recorded_change(monkeypatch) -> None:
    weight, x, _ = _weight_and_rows(3)
    parameter = torch.nn.Parameter(weight.clone())
    calls = count_reorders(monkeypatch)
    with torch.no_grad(), fixed_weights():
        before = StepWeight(parameter, 7).mm(x)
        assert torch.equal(StepWeight(parameter, 7).mm(x), before) and len(calls) == 1
        parameter.add_(1.0)  # recorded in the version counter
        added = StepWeight(parameter, 7).mm(x)
        parameter.data = 2 * parameter.data  # new storage
        doubled = StepWeight(parameter, 7).mm(x)
    assert len(calls) == 3
    assert (added - before - x.sum(1, keepdim=True)).abs().max() <= 1e-3
    assert (doubled - 2 * added).abs().max() <= 1e-3


@needs_onednn
def test_the_fused_sum_of_addmm_gives_the_bits_of_a_separate_sum() -> None:
    weight, x, bias = _weight_and_rows(4)
    fast = StepWeight(weight, 7)
    fused = fast.addmm(bias, x)  # the sum as the product's post-op
    separate = fast.mm(x).add_(bias)
    assert torch.equal(fused, separate)
    strided = torch.randn(7, 2, 48)[:, 1]  # a non-contiguous bias (a step of (B, T, 4H))
    assert torch.equal(fast.addmm(strided, x), fast.mm(x).add_(strided))


@needs_onednn
def test_a_fixed_weights_block_holds_for_its_own_thread_only(monkeypatch) -> None:
    """Another thread (training the same weights meanwhile, say) reorders them afresh."""
    weight, x, _ = _weight_and_rows(6)
    calls = count_reorders(monkeypatch)
    seen: list[bool] = []

    def other() -> None:
        seen.append(matmul.fixed_weights_held())
        with torch.no_grad():
            StepWeight(weight, 7).mm(x)

    with torch.no_grad(), fixed_weights():
        StepWeight(weight, 7).mm(x)
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        StepWeight(weight, 7).mm(x)
    assert seen == [False] and len(calls) == 2
