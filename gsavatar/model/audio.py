"""What the avatar's audio input is, and the one function that cuts it out of a feature array.

Audio features come as ``[N, S, D]``: ``S`` steps of ``D`` channels for each 25 fps frame (see
:mod:`gsavatar.data.audio_features`). A frame's model input is a window of ``past + 1 + future``
frames around each of ``K`` neighbouring frames (the deformation nets encode each window and blend
the ``K`` encodings by attention): ``[K, past + 1 + future, S, D]``, edges replicated
(:meth:`gsavatar.config.AvatarConfig.audio_window`, ``audio_neighbours``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class AudioSpec:
    """The audio features an avatar was trained on (what any new speech must be turned into)."""

    kind: str
    """Feature kind (``logmel``, ``whisper``, ...; see :mod:`gsavatar.data.audio_features`)."""
    extractor: dict[str, Any]
    """The extractor's description: what defines the features (kind, options, dims), not how to run it."""
    feature_dim: int
    """``D``: channels per feature step."""
    steps_per_frame: int
    """``S``: feature steps per video frame."""


def audio_windows(features: Tensor, centres: Tensor, past: int, future: int) -> Tensor:
    """``[len(centres), past + 1 + future, ...]`` windows of ``features [N, ...]`` around each centre
    frame, frames outside ``[0, N)`` replaced by the nearest edge frame."""
    offsets = torch.arange(-past, future + 1, device=features.device)
    return features[(centres.to(features.device)[:, None] + offsets[None, :]).clamp(0, features.shape[0] - 1)]
