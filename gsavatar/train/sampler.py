"""Which training frame each iteration sees: uniform, or the incremental-sampling curriculum.

Incremental sampling (TalkingGaussian): instead of uniform frames from the start, the stage
first sees frames with a closed mouth and slides a window of the sorted frames towards wide
open mouths, then does the same over blink strength, then samples uniformly. Small motions
are learned before large ones, which keeps the deformation field from tearing early.
"""

from __future__ import annotations

import numpy as np

MOUTH_PHASE = 0.4  # fraction of the stage sliding over mouth opening
BLINK_PHASE = 0.2  # then this fraction sliding over blink
WINDOW = 0.3  # the window covers this fraction of the training frames


class FrameSampler:
    def __init__(self, train_indices: np.ndarray, mouth_open: np.ndarray, blink: np.ndarray):
        self.train = np.asarray(train_indices)
        self.by_mouth = self.train[np.argsort(mouth_open[self.train], kind="stable")]
        self.by_blink = self.train[np.argsort(blink[self.train], kind="stable")]

    def sample(self, rng: np.random.Generator, curriculum: str | None, progress: float) -> int:
        """A training frame index for a stage that is ``progress`` (0..1) done."""
        if curriculum is None:
            return int(rng.choice(self.train))
        if curriculum != "mouth_open":
            raise ValueError(f"unknown curriculum {curriculum!r} (known: mouth_open)")
        if progress < MOUTH_PHASE:
            return self._window(rng, self.by_mouth, progress / MOUTH_PHASE)
        if progress < MOUTH_PHASE + BLINK_PHASE:
            return self._window(rng, self.by_blink, (progress - MOUTH_PHASE) / BLINK_PHASE)
        return int(rng.choice(self.train))

    @staticmethod
    def _window(rng: np.random.Generator, ordered: np.ndarray, t: float) -> int:
        n = len(ordered)
        width = max(1, int(round(WINDOW * n)))
        start = int(round(t * (n - width)))
        return int(ordered[start + rng.integers(width)])
