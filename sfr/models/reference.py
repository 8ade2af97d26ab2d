"""The plain, step-by-step RU-LSTM formulation of the published code: the oracle of the fast one.

It runs the rolling LSTM one call per step and one unrolling LSTM call from every step, exactly
as the published implementation does, on the parameters of an `RULSTMBranch`. Tests check the
efficient branch against it; benchmarks time both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sfr.models.branch import BranchOutput, RULSTMBranch


def plain_forward(branch: RULSTMBranch, x: Tensor) -> BranchOutput:
    """Scores (B, T, C) and context (B, T, 2H) at every step, computed the published way."""
    inputs = x.transpose(0, 1)  # (T, B, F)
    num_steps, batch, feat = inputs.shape
    rolled = branch.input_dropout(inputs)
    state = None
    hs, cs = [], []
    for t in range(num_steps):
        _, state = branch.rolling(rolled[t : t + 1], state)
        hs.append(state[0])
        cs.append(state[1])
    last_hidden = []
    for t in range(num_steps):
        if branch.sequence_completion:
            ins = inputs[t:]
        else:
            ins = inputs[t].unsqueeze(0).expand(num_steps - t + 1, batch, feat)
        out, _ = branch.unrolling(branch.input_dropout(ins), (hs[t], cs[t]))
        last_hidden.append(out[-1])
    h_last = torch.stack(last_hidden, dim=1)  # (B, T, H)
    scores = branch.classifier(branch.head_dropout(h_last))
    c_roll = torch.cat(cs).transpose(0, 1)  # (B, T, H)
    return BranchOutput(scores, torch.cat([h_last, c_roll], dim=2))
