"""Documented configuration dataclasses. Every number a stage uses lives here, not in loops."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TrackingConfig:
    """How the morphable face model is learned and fitted to the landmark tracks (``gsavatar track``)."""

    interocular_mm: float = 63.0
    """Population prior for the distance between the iris centres; it sets the metric scale."""
    expression_components: int = 32
    """Size of the expression basis (PCA of the subject's own non-rigid landmark motion)."""
    focal_px: float | None = None
    """Focal length in pixels at the working size, if known; by default it is estimated."""
    focal_search_range: tuple[float, float] = (0.5, 12.0)
    """Focal lengths searched, as multiples of the image size (0.5: 90 degree field of view; 12: about 5)."""
    focal_search_frames: int = 400
    """Frames (evenly spaced) used to score each candidate focal length."""
    focal_search_points: int = 100
    """Landmarks scored in the focal search: the ones that move least relative to the head."""
    focal_search_steps: int = 12
    """Golden-section steps on log(focal) after the coarse ladder."""
    iterations: int = 200
    """L-BFGS iterations of the final fit over all frames."""
    search_iterations: int = 8
    """Gauss-Newton iterations of the rigid pose fit per candidate focal length."""
    robust_scale_px: float = 3.0
    """Cauchy loss scale: landmark errors well above this many pixels count logarithmically (outliers)."""
    smooth_translation: float = 0.5
    """Weight of the squared second difference of translation (per mm^2, against squared pixels)."""
    smooth_rotation: float = 0.5
    """Weight of the squared second difference of rotation (per degree^2)."""
    smooth_expression: float = 0.05
    """Weight of the squared second difference of the expression coefficients."""
    expression_prior: float = 0.01
    """Weight of the standard-normal prior on the expression coefficients."""


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
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    """3DMM tracking (the last stage): model learning and fitting settings."""
