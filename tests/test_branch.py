"""The efficient RU-LSTM branch computes the plain formulation's function, and the published one."""

from __future__ import annotations

import pytest
import torch
from golden import BRANCH_CASES, CASE_GRID, GOLDEN, golden_case

from sfr.hub.published import branch_state_from_published, load_published_checkpoint
from sfr.models.branch import create_branch, length_buckets, set_kernel
from sfr.models.reference import plain_forward


def _branch(
    seq_comp: bool, feat: int = 6, hidden: int = 10, classes: int = 7, dropout: float = 0.0
):
    torch.manual_seed(0)
    return create_branch(
        feat_dim=feat,
        hidden=hidden,
        num_classes=classes,
        dropout=dropout,
        sequence_completion=seq_comp,
    ).double()


@pytest.mark.parametrize("seq_comp", [False, True], ids=["anticipation", "sequence_completion"])
@pytest.mark.parametrize("s_enc,s_ant", [(6, 8), (24, 16)], ids=["T14", "T40"])
@pytest.mark.parametrize("with_context", [False, True], ids=["scores", "context"])
def test_efficient_matches_plain_outputs_and_gradients(
    seq_comp: bool, s_enc: int, s_ant: int, with_context: bool
) -> None:
    """Both kernels (step loop and fused LSTM, its unrolls padded or packed) against the plain
    oracle, float64, 1e-5."""
    branch = _branch(seq_comp)
    steps = s_enc + s_ant
    x = torch.randn(3, steps, 6, dtype=torch.float64, requires_grad=True)
    wanted = list(range(s_enc, steps))

    def objective(scores: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        weights = torch.linspace(-1, 1, scores.numel(), dtype=torch.float64).view_as(scores)
        value = (scores * weights).sum()
        if with_context:
            value = value + (context.sin()).sum()
        return value

    plain = plain_forward(branch, x)
    plain_sel = (plain.scores[:, s_enc:], plain.context[:, s_enc:])
    plain_grads = torch.autograd.grad(objective(*plain_sel), [x, *branch.parameters()])
    for kernel in ("loop", "fused", "fused packed"):  # fused: padded unrolls on the CPU
        set_kernel(branch, "fused" if kernel.startswith("fused") else "loop")
        branch.padded_unrolls = False if kernel == "fused packed" else None
        fast = branch(x, wanted)
        fast_grads = torch.autograd.grad(objective(*fast), [x, *branch.parameters()])
        assert fast.scores.shape == (3, s_ant, 7) and fast.context.shape == (3, s_ant, 20)
        assert (fast.scores - plain_sel[0]).abs().max() <= 1e-5, kernel
        assert (fast.context - plain_sel[1]).abs().max() <= 1e-5, kernel
        for mine, theirs in zip(fast_grads, plain_grads, strict=True):
            assert (mine - theirs).abs().max() <= 1e-5, kernel


@pytest.mark.parametrize("kernel", ["loop", "fused"])
@pytest.mark.parametrize("seq_comp", [False, True])
def test_every_step_and_arbitrary_step_subsets(kernel: str, seq_comp: bool) -> None:
    branch = _branch(seq_comp).eval()
    set_kernel(branch, kernel)
    x = torch.randn(2, 14, 6, dtype=torch.float64)
    plain = plain_forward(branch, x)
    every = branch(x)
    assert (every.scores - plain.scores).abs().max() <= 1e-12
    for subset in ([0, 3, 4, 9, 13], [0], [13], [0, 1, 2], [5, 6, 12]):
        picked = branch(x, subset)
        assert (picked.scores - plain.scores[:, subset]).abs().max() <= 1e-12
        assert (picked.context - plain.context[:, subset]).abs().max() <= 1e-12


def test_rejects_bad_step_lists() -> None:
    branch = _branch(False)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    for bad in ([], [3, 2], [1, 1], [5], [-1]):
        with pytest.raises(ValueError):
            branch(x, bad)


class _RecordingDropout(torch.nn.Module):
    """Dropout stand-in that records the mask of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (torch.rand_like(x) > 0.5).to(x.dtype)
        self.masks.append(mask)
        return x * mask


@pytest.mark.parametrize("shared", [False, True])
def test_training_dropout_masks_per_unrolling_step_unless_shared(shared: bool) -> None:
    branch = _branch(False)
    set_kernel(branch, "loop")
    branch.shared_dropout_mask = shared
    branch.train()
    branch.input_dropout.p = 0.5  # a non-zero rate activates the training path
    recorder = _RecordingDropout()
    recorder.p = 0.5
    branch.input_dropout = recorder
    batch, s_enc, s_ant = 2, 3, 4
    with torch.no_grad():  # the per-step loop; with gradients the loop packs (test below)
        branch(
            torch.randn(batch, s_enc + s_ant, 6, dtype=torch.float64),
            list(range(s_enc, s_enc + s_ant)),
        )
    rolling, unrolling = recorder.masks[0], recorder.masks[1:]
    assert rolling.shape == (batch, s_enc + s_ant, 6)
    if shared:
        assert len(unrolling) == 1 and unrolling[0].shape == (s_ant * batch, 6)
    else:
        # one call per unrolling step; unroll 0 (longest, S_ant + 1 steps) sees a new mask each step
        assert len(unrolling) == s_ant + 1
        assert [m.shape[0] for m in unrolling] == [4 * batch] * 2 + [
            3 * batch,
            2 * batch,
            1 * batch,
        ]
        first_unroll = [m[:batch] for m in unrolling]
        assert not all(torch.equal(first_unroll[0], m) for m in first_unroll[1:])


def _fused_training_masks(
    seq_comp: bool,
    shared: bool,
    padded: bool | None,
    batch: int,
    s_enc: int,
    s_ant: int,
    kernel: str = "fused",
) -> list[torch.Tensor]:
    """The input dropout masks one training forward of `kernel` draws, in order."""
    branch = _branch(seq_comp)
    set_kernel(branch, kernel)  # type: ignore[arg-type]
    assert branch.padded_unrolls is None  # the default: padded on the CPU
    branch.padded_unrolls = padded
    branch.shared_dropout_mask = shared
    branch.train()
    recorder = _RecordingDropout()
    recorder.p = 0.5
    branch.input_dropout = recorder
    x = torch.randn(batch, s_enc + s_ant, 6, dtype=torch.float64)
    branch(x, list(range(s_enc, s_enc + s_ant)))
    return recorder.masks


@pytest.mark.parametrize("kernel", ["fused", "loop"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("seq_comp", [False, True])
def test_packed_unrolls_draw_a_mask_per_unrolling_step_unless_shared(
    shared: bool, seq_comp: bool, kernel: str
) -> None:
    """The packed layout: one fused call (as on CUDA), or the loop's `lstm_recurrence`."""
    batch, s_enc, s_ant = 2, 3, 4
    masks = _fused_training_masks(seq_comp, shared, False, batch, s_enc, s_ant, kernel)
    rolling, unrolling = masks[0], masks[1:]
    assert rolling.shape == (batch, s_enc + s_ant, 6) and len(unrolling) == 1
    lengths = [s_ant + (0 if seq_comp else 1) - k for k in range(s_ant)]  # 5, 4, 3, 2 (+1)
    if shared:  # one mask per input: per unroll (anticipation) or per frame (completion)
        expected = (s_enc + s_ant, batch, 6) if seq_comp else (s_ant, batch, 6)
        assert unrolling[0].shape == expected
    else:  # the packed unroll inputs, one fresh mask element per step, unroll, sample and unit
        assert unrolling[0].shape == (sum(lengths), batch, 6)
        active = [sum(n > j for n in lengths) for j in range(lengths[0])]
        first_rows = [sum(active[:j]) for j in range(lengths[0])]  # unroll 0 leads every step
        first_unroll = unrolling[0][first_rows]
        assert not all(torch.equal(first_unroll[0], m) for m in first_unroll[1:])


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("seq_comp", [False, True])
def test_padded_fused_unrolls_draw_a_mask_per_step_unless_shared(
    shared: bool, seq_comp: bool
) -> None:
    """The padded layout (the CPU default): one call per group of similar lengths."""
    batch, s_enc, s_ant = 2, 3, 8
    unrolling = _fused_training_masks(seq_comp, shared, None, batch, s_enc, s_ant)[1:]
    lengths = [s_ant + (0 if seq_comp else 1) - k for k in range(s_ant)]
    buckets = length_buckets(lengths)
    assert 1 < len(buckets) < len(lengths)
    if shared:  # one mask per input, drawn once for every group
        expected = (s_enc + s_ant, batch, 6) if seq_comp else (s_ant, batch, 6)
        assert [m.shape for m in unrolling] == [expected]
    else:  # per group: (its longest length, its unrolls, B, F), a fresh element everywhere
        shapes = [(lengths[first], last - first, batch, 6) for first, last in buckets]
        assert [tuple(m.shape) for m in unrolling] == shapes
        first_unroll = unrolling[0][:, 0]
        assert not all(torch.equal(first_unroll[0], m) for m in first_unroll[1:])


def test_length_buckets_bound_the_padding() -> None:
    assert length_buckets(list(range(17, 1, -1))) == [(0, 7), (7, 12), (12, 15), (15, 16)]
    assert length_buckets([17, 13, 9, 5]) == [(0, 2), (2, 3), (3, 4)]
    assert length_buckets([3]) == [(0, 1)]
    for lengths in ([40, 39, 38, 30, 2, 1], list(range(41, 1, -1))):
        for first, last in length_buckets(lengths):
            real = sum(lengths[first:last])
            assert lengths[first] * (last - first) - real <= 0.25 * real


class _InputDropout(torch.nn.Module):
    """A deterministic stand-in with a per-element 'mask' that depends on the value only."""

    p = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x.sin() > -0.2) * 2.0


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("seq_comp", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_fused_kernel_with_training_masks_matches_the_loop(
    seq_comp: bool, shared: bool, padded: bool
) -> None:
    """Same masks in both kernels (a function of the input): same outputs and gradients,
    with the fused unrolls packed in one call or padded in groups."""
    branch = _branch(seq_comp)
    branch.padded_unrolls = padded
    branch.shared_dropout_mask = shared
    branch.input_dropout = _InputDropout()
    branch.train()
    x = torch.randn(3, 14, 6, dtype=torch.float64, requires_grad=True)
    steps = list(range(6, 14))
    results = []
    for kernel in ("loop", "fused"):
        set_kernel(branch, kernel)
        assert branch.fused_stages(x.device) == (kernel == "fused",) * 2
        out = branch(x, steps)
        value = out.scores.sum() + out.context.cos().sum()
        results.append((out, torch.autograd.grad(value, [x, *branch.parameters()])))
    (loop, loop_grads), (fused, fused_grads) = results
    assert (loop.scores - fused.scores).abs().max() <= 1e-12
    assert (loop.context - fused.context).abs().max() <= 1e-12
    for mine, theirs in zip(fused_grads, loop_grads, strict=True):
        assert (mine - theirs).abs().max() <= 1e-10


def test_auto_kernel_rule_and_unknown_kernels() -> None:
    branch = _branch(False, dropout=0.8)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for training in (True, False):  # the loop on the CPU, the fused kernel on CUDA
        assert branch.train(training).fused_stages(cpu) == (False, False)
        assert branch.fused_stages(cuda) == (True, True)
    set_kernel(branch, "fused")
    assert branch.fused_stages(cpu) == (True, True)
    set_kernel(branch, "loop")
    assert branch.fused_stages(cuda) == (False, False)
    with pytest.raises(ValueError, match="kernel must be one of auto, fused, loop"):
        set_kernel(branch, "cudnn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kernel must be one of"):
        create_branch(feat_dim=2, hidden=3, num_classes=2, kernel="x")  # type: ignore[arg-type]


@pytest.mark.parametrize("kernel", ["loop", "fused"])
@pytest.mark.parametrize("training", [False, True])
def test_branch_runs_under_bf16_autocast(kernel: str, training: bool) -> None:
    torch.manual_seed(0)
    branch = create_branch(feat_dim=16, hidden=24, num_classes=9, dropout=0.0, kernel=kernel)
    branch.train(training)
    x = torch.randn(4, 14, 16)
    steps = list(range(6, 14))
    reference = branch(x, steps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = branch(x, steps)
        loss = out.scores.float().logsumexp(-1).sum() + out.context.float().sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in branch.parameters())
    assert (out.scores.float() - reference.scores).abs().max() <= 0.1
    assert (out.context.float() - reference.context).abs().max() <= 0.1


def test_train_mode_without_dropout_equals_eval() -> None:
    branch = _branch(True, dropout=0.0)
    x = torch.randn(2, 14, 6, dtype=torch.float64)
    train_out = branch.train()(x, list(range(6, 14))).scores
    eval_out = branch.eval()(x, list(range(6, 14))).scores
    assert torch.equal(train_out, eval_out)


@pytest.mark.parametrize("case", BRANCH_CASES)
def test_published_weights_reproduce_published_outputs(case: str) -> None:
    ctor, io = golden_case(case)
    branch = create_branch(
        feat_dim=ctor["feat_in"],
        hidden=ctor["hidden"],
        num_classes=ctor["num_class"],
        dropout=ctor["dropout"],
        sequence_completion=ctor["sequence_completion"],
    ).eval()
    state = load_published_checkpoint(GOLDEN / case / "checkpoint.pth.tar")["state_dict"]
    branch.load_state_dict(branch_state_from_published(state))
    s_enc, s_ant = CASE_GRID[case]
    x = io["x"]
    assert x.shape[1] == s_enc + s_ant
    out = branch(x, list(range(s_enc, s_enc + s_ant)))
    assert (out.scores - io["scores"][:, s_enc:]).abs().max() <= 1e-5
    if "context" in io:
        assert (out.context - io["context"][:, s_enc:]).abs().max() <= 1e-5
    every = branch(x)
    assert (every.scores - io["scores"]).abs().max() <= 1e-5


def test_published_checkpoint_loads_only_numpy_scalars(tmp_path) -> None:
    container = load_published_checkpoint(GOLDEN / BRANCH_CASES[0] / "checkpoint.pth.tar")
    assert float(container["best_perf"]) == pytest.approx(13.25)
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "x": Evil()}, path, pickle_module=pickle)
    from sfr.errors import DataError

    with pytest.raises(
        DataError,
        match=r"refers to the Python object (builtins\.)?print, which sfr does not unpickle",
    ):
        load_published_checkpoint(path)


def test_wrong_inputs_name_the_expected_shape_and_both_kernels_agree_on_them() -> None:
    branch = _branch(False).eval()  # feat_dim 6
    for kernel in ("loop", "fused"):
        set_kernel(branch, kernel)
        for shape in ((7, 6), (2, 5, 4), (0, 5, 6), (1, 2, 5, 6)):
            with pytest.raises(ValueError, match=r"x must be a \(B, T, 6\) tensor"):
                branch(torch.randn(*shape, dtype=torch.float64), [1])
        x = torch.randn(2, 5, 6, dtype=torch.float64)
        as_tensor = branch(x, torch.tensor([1, 3]))  # steps as a tensor: same as a list
        assert torch.equal(as_tensor.scores, branch(x, [1, 3]).scores)
    with pytest.raises(ValueError, match="kernel must be one of auto, fused, loop, not 'bogus'"):
        branch.kernel = "bogus"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="Linear holds no RU-LSTM branch"):
        set_kernel(torch.nn.Linear(2, 2), "fused")
