"""Evaluation: test-split metrics of an avatar and of trivial baselines measured the same way.

Public: :func:`evaluate_run` (``gsavatar eval``), :func:`score_test_split` (the PSNR that
training reports at its end) and :func:`load_lpips`.
"""

from __future__ import annotations


def evaluate_run(*args, **kwargs) -> dict:
    """See :func:`gsavatar.eval.evaluate.evaluate_run`."""
    from gsavatar.eval.evaluate import evaluate_run as _run

    return _run(*args, **kwargs)


def score_test_split(*args, **kwargs) -> dict:
    """See :func:`gsavatar.eval.baselines.score_test_split`."""
    from gsavatar.eval.baselines import score_test_split as _score

    return _score(*args, **kwargs)


def load_lpips(device):
    """See :func:`gsavatar.eval.lpips.load_lpips`."""
    from gsavatar.eval.lpips import load_lpips as _load

    return _load(device)


__all__ = ["evaluate_run", "load_lpips", "score_test_split"]
