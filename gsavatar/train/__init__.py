"""Training: the staged loop, losses, densification strategy, checkpoints, and the dataset as tensors."""
