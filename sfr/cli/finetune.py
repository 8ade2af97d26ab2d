"""`sfr finetune`: anticipation fine-tuning of a branch from its pre-trained best weights."""

from sfr.cli.branch_stage import make_branch_command

finetune = make_branch_command(
    "finetune",
    """Fine-tune one RU-LSTM branch for anticipation, starting from its pre-training.

    Use the same config as `sfr train-branch`. Example:
    sfr finetune --config configs/ek55/rgb_a0.5.toml --data DATA --runs runs
    """,
)
