"""`sfr train-branch`: sequence-completion pre-training of one branch (one modality, one rate)."""

from sfr.cli.branch_stage import make_branch_command

train_branch = make_branch_command(
    "pretrain",
    """Pre-train one RU-LSTM branch by sequence completion.

    Example: sfr train-branch --config configs/ek55/rgb_a0.5.toml --data DATA --runs runs
    """,
)
