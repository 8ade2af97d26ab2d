"""Training: run directories, safetensors checkpoints, the training loop and its stages."""
