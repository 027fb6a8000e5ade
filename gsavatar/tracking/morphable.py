"""A morphable model of one person's face landmarks, learned from their own video.

Why learned: the usual face models (BFM, FLAME) need a licence-gated download. MediaPipe gives
478 landmarks with a relative depth per frame, which is enough to learn a person-specific
linear model: vertices = identity_mean + sum_k expression_k * basis_k.

How (:func:`learn_morphable_model`):

1. Back-project every frame's landmarks into the camera frame with a pinhole camera of the
   given focal length; the head's distance comes from the interocular distance (population
   prior, ``interocular_mm``), MediaPipe's depth (scaled like ``x``) gives each point's depth
   relative to the head.
2. Generalised Procrustes: align all frames with a similarity transform fitted on *rigid*
   points (forehead, nose bridge, eye corners, temples) only, so that speech and blinks do not
   move the alignment.
3. The mean aligned shape is the identity, rescaled so the iris centres are exactly
   ``interocular_mm`` apart and rotated into the canonical head frame (``camera.py``).
4. PCA of the aligned residuals gives the expression basis, scaled so that coefficients have
   unit variance over the video (a standard-normal prior is then the natural regulariser).

The per-frame Procrustes transforms are returned too: they are the tracker's initial poses.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

# Rigid landmarks (MediaPipe topology): forehead, nose bridge, eye corners, temples.
RIGID_LANDMARKS = (10, 151, 9, 8, 109, 338, 67, 297, 108, 337, 168, 6, 197, 195, 5, 4,
                   33, 133, 362, 263, 127, 356)
RIGHT_IRIS, LEFT_IRIS = 468, 473  # iris centres (refined FaceMesh)
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263


@dataclasses.dataclass
class MorphableModel:
    """Linear landmark model in the head frame (metres).

    ``vertices(e) = mean + einsum(e, basis)``; ``e`` has one coefficient per expression
    component, about standard normal over the training video.
    """

    mean: np.ndarray  # [V, 3] float32, identity shape (metres, head frame)
    basis: np.ndarray  # [K, V, 3] float32, expression basis (metres per unit coefficient)
    rigid: np.ndarray  # [R] int64, indices of rigid landmarks

    @property
    def num_vertices(self) -> int:
        return self.mean.shape[0]

    @property
    def num_expression(self) -> int:
        return self.basis.shape[0]

    def vertices(self, expression: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` coefficients -> ``[..., V, 3]`` head-frame vertices (torch, differentiable)."""
        mean = torch.as_tensor(self.mean, dtype=expression.dtype, device=expression.device)
        basis = torch.as_tensor(self.basis, dtype=expression.dtype, device=expression.device)
        return mean + torch.einsum("...k,kvc->...vc", expression, basis)

    def to_arrays(self, prefix: str = "model_") -> dict[str, np.ndarray]:
        return {f"{prefix}mean": self.mean, f"{prefix}basis": self.basis, f"{prefix}rigid": self.rigid}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "model_") -> "MorphableModel":
        return cls(np.asarray(arrays[f"{prefix}mean"], np.float32), np.asarray(arrays[f"{prefix}basis"], np.float32),
                   np.asarray(arrays[f"{prefix}rigid"], np.int64))


@dataclasses.dataclass
class LearnedModel:
    """What :func:`learn_morphable_model` returns: the model and per-frame initial fits."""

    model: MorphableModel
    rotation: np.ndarray  # [N, 3, 3] world-to-camera rotation per frame
    translation: np.ndarray  # [N, 3] world-to-camera translation (metres)
    expression: np.ndarray  # [N, K] least-squares coefficients of each frame's aligned shape
    explained_variance: float  # fraction of the residual variance the basis keeps
    point_spread: np.ndarray  # [V] RMS distance (metres) of each aligned landmark from its mean: non-rigidity


def back_project(landmarks: np.ndarray, focal: float, principal: tuple[float, float],
                 interocular_m: float) -> np.ndarray:
    """Landmarks ``[N, V, 3]`` (pixels, MediaPipe depth scaled like x) -> camera frame ``[N, V, 3]`` (metres)."""
    lm = np.asarray(landmarks, np.float64)
    cx, cy = principal
    ipd_px = np.linalg.norm(lm[:, RIGHT_IRIS] - lm[:, LEFT_IRIS], axis=-1)  # 3D, so yaw does not shrink it
    eye_depth_px = 0.5 * (lm[:, RIGHT_IRIS, 2] + lm[:, LEFT_IRIS, 2])
    # Depth of the eyes from the apparent interocular distance, then of MediaPipe's depth origin.
    eye_depth = focal * interocular_m / np.maximum(ipd_px, 1e-6)
    origin_depth = eye_depth / (1 + eye_depth_px / focal)
    z = origin_depth[:, None] * (1 + lm[..., 2] / focal)
    x = (lm[..., 0] - cx) * z / focal
    y = (lm[..., 1] - cy) * z / focal
    return np.stack([x, y, z], -1)


def similarity_align(source: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None):
    """Batched Umeyama: ``s, R, t`` minimising ``sum_j w_j |s R source_j + t - target_j|^2``.

    ``source`` ``[N, P, 3]``, ``target`` ``[P, 3]`` or ``[N, P, 3]``. Returns ``s [N]``,
    ``R [N, 3, 3]`` (proper rotations), ``t [N, 3]``.
    """
    source = np.asarray(source, np.float64)
    target = np.broadcast_to(np.asarray(target, np.float64), source.shape)
    w = np.ones(source.shape[1]) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    mu_s = np.einsum("p,npc->nc", w, source)
    mu_t = np.einsum("p,npc->nc", w, target)
    xs, xt = source - mu_s[:, None], target - mu_t[:, None]
    cov = np.einsum("p,npi,npj->nij", w, xt, xs)
    u, sig, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.ones((len(source), 3))
    fix[:, 2] = d
    rotation = u @ (fix[..., None] * vt)
    var_s = np.einsum("p,np->n", w, (xs ** 2).sum(-1))
    scale = (sig * fix).sum(-1) / np.maximum(var_s, 1e-30)
    translation = mu_t - scale[:, None] * np.einsum("nij,nj->ni", rotation, mu_s)
    return scale, rotation, translation


def canonical_orientation(shape: np.ndarray) -> np.ndarray:
    """Rotation taking a face shape ``[V, 3]`` into the head frame's axes (x: right eye -> left
    eye in image terms, y: forehead -> chin, z = x cross y, away from the viewer)."""
    from gsavatar.data.landmarks import CHIN, FOREHEAD

    x = shape[LEFT_EYE_OUTER] - shape[RIGHT_EYE_OUTER]
    x = x / np.linalg.norm(x)
    y = shape[CHIN] - shape[FOREHEAD]
    y = y - x * (x @ y)
    y = y / np.linalg.norm(y)
    return np.stack([x, y, np.cross(x, y)])  # rows are the new axes


def _remove_rigid_directions(residual: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Project ``residual [N, V*3]`` onto the complement of the 7 similarity motions of ``shape [V, 3]``."""
    eye = np.eye(3)
    motions = [np.cross(eye[a], shape) for a in range(3)]  # rotation about each axis
    motions += [np.broadcast_to(eye[a], shape.shape) for a in range(3)]  # translation
    motions.append(shape)  # scaling
    q, _ = np.linalg.qr(np.stack([m.reshape(-1) for m in motions], 1))
    return residual - (residual @ q) @ q.T


def learn_morphable_model(landmarks: np.ndarray, valid: np.ndarray, focal: float, principal: tuple[float, float],
                          num_expression: int, interocular_mm: float = 63.0, iterations: int = 3,
                          max_pca_frames: int = 4000) -> LearnedModel:
    """Learn a :class:`MorphableModel` from per-frame landmarks ``[N, V, 3]`` (see module docstring)."""
    ipd = interocular_mm / 1000.0
    cam = back_project(landmarks, focal, principal, ipd)  # [N, V, 3]
    valid = np.asarray(valid, bool)
    rigid = np.asarray(RIGID_LANDMARKS)
    frames = cam[valid]
    if len(frames) == 0:
        raise ValueError("no valid landmark frames to learn a face model from")
    # Generalised Procrustes on the rigid points, starting from the median frame's shape.
    reference = np.median(frames, axis=0)
    for _ in range(iterations):
        s, r, t = similarity_align(frames[:, rigid], reference[rigid])
        aligned = s[:, None, None] * np.einsum("nij,nvj->nvi", r, frames) + t[:, None]
        reference = aligned.mean(0)
        reference *= ipd / np.linalg.norm(reference[RIGHT_IRIS] - reference[LEFT_IRIS])
    # Canonical head frame: origin at the mean shape's centroid, axes from the face itself.
    axes = canonical_orientation(reference)
    centre = reference.mean(0)
    mean = (reference - centre) @ axes.T
    s, r, t = similarity_align(cam[:, rigid], mean[rigid])  # every frame, invalid ones included
    aligned = s[:, None, None] * np.einsum("nij,nvj->nvi", r, cam) + t[:, None]
    # Expression basis: PCA of the residuals of valid frames (evenly subsampled if very long).
    spread = np.sqrt(((aligned[valid] - mean) ** 2).sum(-1).mean(0))
    # Expressions must not be able to imitate a head motion: remove from the residuals the
    # directions of infinitesimal rotation, translation and scaling of the mean shape.
    residual = _remove_rigid_directions((aligned - mean).reshape(len(cam), -1), mean)
    fit_rows = np.flatnonzero(valid)
    if len(fit_rows) > max_pca_frames:
        fit_rows = fit_rows[np.linspace(0, len(fit_rows) - 1, max_pca_frames).round().astype(int)]
    k = int(min(num_expression, len(fit_rows) - 1, residual.shape[1]))
    if k > 0:
        _, sig, vt = np.linalg.svd(residual[fit_rows], full_matrices=False)
    else:  # the rigid shape alone (the focal-length search needs no basis)
        sig, vt = np.zeros(1), np.zeros((0, residual.shape[1]))
    std = sig[:k] / np.sqrt(len(fit_rows))
    basis = (vt[:k] * std[:, None]).reshape(k, cam.shape[1], 3)
    explained = float((sig[:k] ** 2).sum() / max((sig ** 2).sum(), 1e-30))
    expression = (residual @ vt[:k].T) / np.maximum(std, 1e-12)
    # Frame i's camera pose is the inverse of its alignment: X_cam = R^T (X_head - t) / s.
    rotation = np.transpose(r, (0, 2, 1))
    translation = -np.einsum("nij,nj->ni", rotation, t) / s[:, None]
    model = MorphableModel(mean.astype(np.float32), basis.astype(np.float32), rigid.astype(np.int64))
    return LearnedModel(model, rotation, translation, expression.astype(np.float32), explained, spread)
