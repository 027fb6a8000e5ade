"""Documented configuration dataclasses. Every number a stage uses lives here, not in loops."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class PreprocessConfig:
    """How a video becomes a subject dataset (``gsavatar preprocess``)."""

    size: int = 512
    """Working resolution: the square crop is resized to ``size`` x ``size`` pixels."""
    min_duration_s: float = 5.0
    """Shorter videos are refused: too little speech to learn an avatar from."""
    max_source_side: int = 640
    """The face-track scan runs on frames downscaled so their longer side is at most this."""
    scan_stride: int = 5
    """The face-track scan runs the face detector on every ``scan_stride``-th frame."""
    crop_face_scale: float = 3.0
    """Crop side as a multiple of the median face-box height (head and shoulders)."""
    crop_face_centre: float = 0.42
    """Vertical position of the face centre in the crop (0 = top, 1 = bottom)."""
    max_interpolated_gap: int = 12
    """Landmark dropouts up to this many frames are interpolated; longer ones are held and flagged invalid."""
    min_face_fraction: float = 0.5
    """Refuse a video where FaceMesh finds the face in less than this fraction of frames."""
    jpeg_quality: int = 95
    """Quality of the stored frames (JPEG, random access, about 10x smaller than PNG)."""
    background_samples: int = 150
    """Frames sampled (evenly) for the background plate's temporal median."""
    audio_features: tuple[str, ...] = ("logmel", "whisper")
    """Audio feature kinds to extract (see ``gsavatar.data.audio_features.available_kinds``)."""
    audio_window_radius: int = 8
    """Frames of audio context on each side that models read around each frame."""
    test_fraction: float = 1.0 / 11.0
    """The last ``test_fraction`` of frames form the test split (the published convention)."""
