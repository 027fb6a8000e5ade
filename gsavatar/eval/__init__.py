"""Evaluation: test-split metrics of an avatar and of trivial baselines measured the same way."""
