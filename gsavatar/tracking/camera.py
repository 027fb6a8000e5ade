"""Camera conventions, written down once. Tracking, training, rendering and the viewer all use these.

Head (world) frame
    The avatar lives in a canonical *head frame* that does not move; the camera moves around it.
    Units are metres. Axes follow the image when the person looks straight into the camera:
    ``x`` towards image right (the subject's left), ``y`` down (forehead -> chin), ``z`` away
    from the camera (into the head), so the face points towards ``-z``. The origin is the
    centroid of the subject's mean landmark shape (on the face, between nose and eyes).

Camera frame
    OpenCV: ``x`` right, ``y`` down, ``z`` forward (the viewing direction). A head-frame point
    ``X`` maps to the camera frame as ``X_cam = R @ X + t`` (``R``, ``t``: *world-to-camera*,
    "extrinsics"); with the person facing the camera ``R`` is close to the identity and ``t``
    is about ``(0, 0, distance)``. ``world_to_camera`` packs them in a 4x4 matrix, the
    ``viewmat`` that the rasterizer takes.

Intrinsics
    Pinhole, no distortion, square pixels, at the *working resolution* of the subject dataset
    (``size`` x ``size``): ``u = fx * X_cam / Z_cam + cx``, ``v = fy * Y_cam / Z_cam + cy``,
    pixel centres at integer coordinates (pixel ``(0, 0)`` covers ``[-0.5, 0.5]^2``).
    ``fx = fy = focal``; the principal point is the centre of the *source* video frame mapped
    into the crop (it is the crop centre only when the crop is centred in the source).
    Caveat: the poses are fitted to landmarks stored as MediaPipe's ``x * W`` (continuous
    coordinates, pixel ``(0, 0)`` covering ``[0, 1]^2``), so the fitted cameras reproject in
    that convention, which is the rasterizer's; the half-pixel difference above only moves the
    fixed principal point, which the fitted pose absorbs. Training uses ``K`` as is.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels of a ``width`` x ``height`` image (see the module docstring)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def matrix(self) -> np.ndarray:
        """The 3x3 ``K``."""
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], np.float64)

    def scaled(self, width: int, height: int) -> "Intrinsics":
        """The same camera at another resolution of the same image."""
        sx, sy = width / self.width, height / self.height
        return Intrinsics(self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5,
                          width, height)

    @property
    def fov_x_deg(self) -> float:
        return float(np.degrees(2 * np.arctan(self.width / (2 * self.fx))))


def principal_point_in_crop(source_width: int, source_height: int, crop: dict, size: int) -> tuple[float, float]:
    """Where the source frame's centre lands in the ``size`` x ``size`` crop (working pixels)."""
    scale = size / crop["side"]
    cx = ((source_width - 1) / 2 - crop["x0"] + 0.5) * scale - 0.5
    cy = ((source_height - 1) / 2 - crop["y0"] + 0.5) * scale - 0.5
    return float(cx), float(cy)


def quat_to_matrix(quats: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` quaternions ``(w, x, y, z)`` (normalised here, any dtype) -> ``[..., 3, 3]`` rotations."""
    q = quats / (quats * quats).sum(-1, keepdim=True).clamp_min(1e-24).sqrt()
    w, x, y, z = q.unbind(-1)
    rows = [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]
    return torch.stack(rows, -1).reshape(q.shape[:-1] + (3, 3))


def scale_intrinsics(K: torch.Tensor, factor: float) -> torch.Tensor:
    """``K [3, 3]`` (float32, CPU) for the same camera with the image resized by ``factor``. In the
    continuous pixel convention (pixel ``j`` spans ``[j, j + 1]``) fx, fy, cx and cy all scale alike."""
    K = torch.as_tensor(K).detach().cpu().float().clone()
    K[:2] *= factor
    return K


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, ``[..., 3] -> [..., 3, 3]``; exact and differentiable at zero angle."""
    theta2 = (axis_angle * axis_angle).sum(-1, keepdim=True)
    small = theta2 < 1e-8
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    # sin(t)/t and (1 - cos t)/t^2, with their Taylor series near zero.
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2_safe)
    x, y, z = axis_angle.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*axis_angle.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device).expand_as(skew)
    return eye + a[..., None] * skew + b[..., None] * (skew @ skew)


def matrix_to_axis_angle(rotation: np.ndarray) -> np.ndarray:
    """``[..., 3, 3] -> [..., 3]`` (numpy), through the quaternion for stability at all angles."""
    r = np.asarray(rotation, np.float64)
    q = _matrix_to_quaternion(r)
    w = np.clip(q[..., 0], -1.0, 1.0)
    v = q[..., 1:]
    sin_half = np.linalg.norm(v, axis=-1)
    angle = 2 * np.arctan2(sin_half, w)
    scale = np.where(sin_half > 1e-12, angle / np.maximum(sin_half, 1e-12), 2.0)
    return v * scale[..., None]


def _matrix_to_quaternion(r: np.ndarray) -> np.ndarray:
    """(w, x, y, z) with w >= 0, choosing the best-conditioned of the four branches."""
    m00, m11, m22 = r[..., 0, 0], r[..., 1, 1], r[..., 2, 2]
    candidates = np.stack([
        np.stack([1 + m00 + m11 + m22, r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1),
        np.stack([r[..., 2, 1] - r[..., 1, 2], 1 + m00 - m11 - m22, r[..., 0, 1] + r[..., 1, 0], r[..., 0, 2] + r[..., 2, 0]], -1),
        np.stack([r[..., 0, 2] - r[..., 2, 0], r[..., 0, 1] + r[..., 1, 0], 1 - m00 + m11 - m22, r[..., 1, 2] + r[..., 2, 1]], -1),
        np.stack([r[..., 1, 0] - r[..., 0, 1], r[..., 0, 2] + r[..., 2, 0], r[..., 1, 2] + r[..., 2, 1], 1 - m00 - m11 + m22], -1),
    ], -2)  # [..., 4, 4]; candidate i has 4 q_i^2 in slot i
    best = np.argmax(np.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1), -1)
    q = np.take_along_axis(candidates, best[..., None, None], -2)[..., 0, :]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return q * np.where(q[..., :1] < 0, -1.0, 1.0)


def rotation_angle_deg(rotation: np.ndarray) -> np.ndarray:
    """Angle of rotation matrices ``[..., 3, 3]`` in degrees."""
    trace = np.trace(np.asarray(rotation, np.float64), axis1=-2, axis2=-1)
    return np.degrees(np.arccos(np.clip((trace - 1) / 2, -1.0, 1.0)))


def project(points_cam: torch.Tensor, focal: torch.Tensor | float, principal: tuple[float, float]) -> torch.Tensor:
    """Camera-frame points ``[..., 3]`` -> pixels ``[..., 2]`` (points must be in front: Z > 0)."""
    z = points_cam[..., 2:3].clamp_min(1e-6)
    uv = points_cam[..., :2] / z * focal
    return uv + torch.as_tensor(principal, dtype=points_cam.dtype, device=points_cam.device)


def world_to_camera_matrix(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """``[N, 3, 3]``, ``[N, 3]`` -> ``[N, 4, 4]`` world-to-camera (viewmat)."""
    rotation, translation = np.asarray(rotation), np.asarray(translation)
    out = np.zeros((*rotation.shape[:-2], 4, 4), rotation.dtype)
    out[..., :3, :3] = rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1
    return out
