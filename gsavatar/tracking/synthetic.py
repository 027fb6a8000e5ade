"""Synthetic landmark tracks with known ground truth, for testing and benchmarking the tracker.

A morphable model is posed along smooth random head motion with random expressions and
projected through a known pinhole camera; the result is laid out exactly like FaceMesh output
(pixels, with MediaPipe-style relative depth scaled like ``x``), plus Gaussian pixel noise.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from gsavatar.tracking.camera import axis_angle_to_matrix
from gsavatar.tracking.morphable import MorphableModel


@dataclasses.dataclass
class SyntheticTracks:
    landmarks: np.ndarray  # [N, V, 3] pixels (x, y) and relative depth scaled like x
    rotation: np.ndarray  # [N, 3, 3] ground-truth world-to-camera rotation
    translation: np.ndarray  # [N, 3] metres
    expression: np.ndarray  # [N, K]
    focal: float
    principal: tuple[float, float]
    size: int


def _smooth_noise(rng: np.random.Generator, n: int, dims: int, cutoff_frames: float) -> np.ndarray:
    """Zero-mean, unit-peak random curves that vary on a scale of ``cutoff_frames``."""
    raw = rng.standard_normal((n + 4 * int(cutoff_frames), dims))
    kernel = np.exp(-0.5 * (np.arange(-2 * int(cutoff_frames), 2 * int(cutoff_frames) + 1) / cutoff_frames) ** 2)
    smooth = np.stack([np.convolve(raw[:, d], kernel, mode="valid")[:n] for d in range(dims)], 1)
    smooth -= smooth.mean(0)
    return smooth / np.maximum(np.abs(smooth).max(0), 1e-12)


def synthesize_tracks(model: MorphableModel, num_frames: int, focal: float, size: int = 512,
                      distance_m: float | None = None, max_yaw_deg: float = 25.0, max_pitch_deg: float = 12.0,
                      max_roll_deg: float = 8.0, expression_scale: float = 1.0, noise_px: float = 1.0,
                      depth_noise_px: float = 3.0, seed: int = 0) -> SyntheticTracks:
    """Pose ``model`` along smooth random motion and project it (see module docstring).

    By default the head is placed so that the face is about 40% of the image high.
    """
    rng = np.random.default_rng(seed)
    n = num_frames
    principal = ((size - 1) / 2, (size - 1) / 2)
    face_height = np.ptp(model.mean[:, 1])
    distance = distance_m or focal * face_height / (0.4 * size)
    angles = _smooth_noise(rng, n, 3, 12.0) * np.radians([max_pitch_deg, max_yaw_deg, max_roll_deg])
    rotation = axis_angle_to_matrix(torch.as_tensor(angles)).numpy()
    shift = _smooth_noise(rng, n, 3, 20.0) * np.array([0.08 * size * distance / focal, 0.05 * size * distance / focal,
                                                        0.1 * distance])
    translation = np.array([0.0, 0.0, distance]) + shift
    k = model.num_expression
    expression = _smooth_noise(rng, n, k, 3.0) * 2.0 * expression_scale if k else np.zeros((n, 0))
    verts = model.vertices(torch.as_tensor(expression)).numpy()
    cam = np.einsum("nij,nvj->nvi", rotation, verts) + translation[:, None]
    uv = cam[..., :2] / cam[..., 2:3] * focal + np.asarray(principal)
    # MediaPipe-style depth: relative to the head, in the same pixel scale as x at the head's distance.
    centre_depth = cam[..., 2].mean(1, keepdims=True)
    z = (cam[..., 2] - centre_depth) * focal / centre_depth
    landmarks = np.concatenate([uv + rng.normal(0, noise_px, uv.shape),
                                (z + rng.normal(0, depth_noise_px, z.shape))[..., None]], -1)
    return SyntheticTracks(landmarks.astype(np.float32), rotation, translation, expression, float(focal), principal, size)


def speech_like(model: MorphableModel) -> MorphableModel:
    """The same model with its expression basis faded out above the mouth, so that expressions
    move lips, jaw and cheeks but leave forehead, nose bridge and eye corners still, as speech
    does (a learned basis can also hold tracking noise on those points)."""
    from gsavatar.data.landmarks import NOSE_BOTTOM
    from gsavatar.tracking.morphable import LEFT_IRIS, RIGHT_IRIS

    y = model.mean[:, 1]
    eyes = 0.5 * (y[RIGHT_IRIS] + y[LEFT_IRIS])
    weight = np.clip((y - eyes) / (y[NOSE_BOTTOM] - eyes), 0.0, 1.0)  # 0 at the eyes, 1 from the nose down
    return MorphableModel(model.mean, (model.basis * weight[None, :, None]).astype(np.float32), model.rigid)
