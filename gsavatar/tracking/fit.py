"""Fitting the morphable model to 2D landmark tracks: per-frame pose and expression, shared focal.

One batched problem over all frames (torch, L-BFGS)::

    min  sum_i w_i mean_j rho(|project(R_i X_j(e_i) + t_i; f) - u_ij|)        robust reprojection
       + smooth_translation * |D2 t_i|^2 + smooth_rotation * |D2 r_i|^2       temporal smoothness
       + smooth_expression * |D2 e_i|^2 + expression_prior * |e_i|^2 / K        (D2: second difference)

``rho`` is the Cauchy loss (quadratic below ``robust_scale_px``, logarithmic above), so a few
landmarks that FaceMesh misplaces do not drag the pose. Frames with invalid landmarks get
``w_i = 0``; the smoothness terms carry the pose across them. Variables are scaled so that a unit
step moves landmarks by roughly a pixel (translation in millimetres, rotation in degrees, depth
in centimetres), which L-BFGS needs to converge in a few hundred steps.

The focal length is *searched*: :func:`estimate_focal` fits a subset of frames for a ladder of
focal lengths (relearning the model at each, see ``morphable.py``) and refines the best by
golden-section search on ``log f``. Wrong focal lengths distort the back-projected shapes
differently at different head poses, which the fit cannot explain, so the residual is lowest
near the true focal length.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch

from gsavatar.config import TrackingConfig
from gsavatar.tracking.camera import axis_angle_to_matrix, matrix_to_axis_angle, project
from gsavatar.tracking.morphable import MorphableModel

_DEG = math.pi / 180.0
_TRANSLATION_UNIT = np.array([1e-3, 1e-3, 1e-2])  # metres per optimisation unit (x, y: mm; depth: cm)


@dataclasses.dataclass
class FitResult:
    rotation: np.ndarray  # [N, 3, 3] world-to-camera
    axis_angle: np.ndarray  # [N, 3] the same rotation as an axis-angle vector (radians)
    translation: np.ndarray  # [N, 3] metres
    expression: np.ndarray  # [N, K]
    focal: float  # pixels at the working resolution
    residual_px: np.ndarray  # [N, V] reprojection error of each landmark
    loss: float
    iterations: int


def _second_difference(x: torch.Tensor) -> torch.Tensor:
    return x[2:] - 2 * x[1:-1] + x[:-2]


def fit_sequence(model: MorphableModel, points: np.ndarray, frame_weight: np.ndarray, focal: float,
                 principal: tuple[float, float], cfg: TrackingConfig, rotation: np.ndarray,
                 translation: np.ndarray, expression: np.ndarray | None = None,
                 iterations: int | None = None, progress: Callable[[int], None] | None = None) -> FitResult:
    """Fit pose and expression of every frame to 2D landmarks ``points [N, V, 2]`` (pixels).

    ``rotation``/``translation``/``expression`` are the initial values (from the model learning
    or :func:`initial_pose`); the focal length is fixed (see ``tracker.estimate_focal``).
    """
    dtype = torch.float64
    n, k = len(points), model.num_expression
    target = torch.as_tensor(points[..., :2], dtype=dtype)
    weight = torch.as_tensor(frame_weight, dtype=dtype)
    weight = weight / weight.sum().clamp_min(1e-12)
    unit = torch.as_tensor(_TRANSLATION_UNIT, dtype=dtype)
    r_var = torch.tensor(matrix_to_axis_angle(rotation) / _DEG, dtype=dtype, requires_grad=True)
    t_var = torch.tensor(np.asarray(translation) / _TRANSLATION_UNIT, dtype=dtype, requires_grad=True)
    e0 = np.zeros((n, k)) if expression is None else np.asarray(expression, np.float64)
    e_var = torch.tensor(e0, dtype=dtype, requires_grad=True)
    variables = [r_var, t_var, e_var]
    c2 = cfg.robust_scale_px ** 2
    mean = torch.as_tensor(model.mean, dtype=dtype)
    basis = torch.as_tensor(model.basis, dtype=dtype).reshape(k, model.num_vertices * 3)

    def residual() -> torch.Tensor:
        verts = mean + (e_var @ basis).reshape(n, -1, 3)
        rot = axis_angle_to_matrix(r_var * _DEG)
        cam = verts @ rot.transpose(1, 2) + (t_var * unit)[:, None]
        return project(cam, focal, principal) - target

    def objective() -> torch.Tensor:
        r2 = residual().pow(2).sum(-1)
        data = (c2 * torch.log1p(r2 / c2)).mean(-1) @ weight
        loss = data + cfg.expression_prior * e_var.pow(2).sum() / (n * max(k, 1))
        if n > 2:
            t_mm = t_var * unit * 1e3
            loss = loss + (cfg.smooth_translation * _second_difference(t_mm).pow(2).sum()
                           + cfg.smooth_rotation * _second_difference(r_var).pow(2).sum()
                           + cfg.smooth_expression * _second_difference(e_var).pow(2).sum()) / n
        return loss

    optimiser = torch.optim.LBFGS(variables, lr=1.0, max_iter=20, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimiser.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    total = cfg.iterations if iterations is None else iterations
    steps = max(1, total // 20)
    for _ in range(steps):
        optimiser.step(closure)
        if progress is not None:
            progress(20)
    with torch.no_grad():
        loss = float(objective())
        res = residual().norm(dim=-1).numpy()
        rot = axis_angle_to_matrix(r_var * _DEG).numpy()
    return FitResult(rotation=rot, axis_angle=(r_var.detach().numpy() * _DEG),
                     translation=(t_var.detach().numpy() * _TRANSLATION_UNIT), expression=e_var.detach().numpy(),
                     focal=float(focal), residual_px=res, loss=loss,
                     iterations=int(optimiser.state[r_var].get("n_iter", 0)))


def _skew(v: np.ndarray) -> np.ndarray:
    x, y, z = np.moveaxis(v, -1, 0)
    zero = np.zeros_like(x)
    return np.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*v.shape[:-1], 3, 3)


def _rodrigues(w: np.ndarray) -> np.ndarray:
    return axis_angle_to_matrix(torch.as_tensor(w, dtype=torch.float64)).numpy()


def fit_rigid_poses(shape: np.ndarray, points: np.ndarray, focal: float, principal: tuple[float, float],
                    rotation: np.ndarray, translation: np.ndarray, iterations: int = 10,
                    robust_scale_px: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame pose of a rigid ``shape [P, 3]`` seen at ``points [N, P, 2]``: batched Gauss-Newton.

    Every frame is its own 6-parameter least-squares problem (rotation update on the left,
    translation), solved exactly in a few steps; with ``robust_scale_px`` the residuals are
    reweighted for the Cauchy loss (IRLS). Returns rotation, translation and residuals ``[N, P]``.
    """
    x = np.asarray(shape, np.float64)
    uv = np.asarray(points, np.float64)[..., :2]
    rot, t = np.array(rotation, np.float64), np.array(translation, np.float64)
    c = np.asarray(principal, np.float64)
    for _ in range(iterations):
        rx = np.einsum("nij,pj->npi", rot, x)  # [N, P, 3]
        cam = rx + t[:, None]
        z = np.maximum(cam[..., 2], 1e-6)
        proj = cam[..., :2] / z[..., None] * focal + c
        r = (proj - uv).reshape(len(uv), -1)  # [N, 2P]
        # d(u, v)/d(cam): f/z [[1, 0, -x/z], [0, 1, -y/z]]
        dproj = np.zeros((*cam.shape[:2], 2, 3))
        dproj[..., 0, 0] = dproj[..., 1, 1] = focal / z
        dproj[..., 0, 2] = -focal * cam[..., 0] / z ** 2
        dproj[..., 1, 2] = -focal * cam[..., 1] / z ** 2
        dcam = np.concatenate([-_skew(rx), np.broadcast_to(np.eye(3), (*rx.shape[:2], 3, 3))], -1)  # [N, P, 3, 6]
        jac = (dproj @ dcam).reshape(len(uv), -1, 6)
        w = np.ones_like(r)
        if robust_scale_px:
            pair = (r.reshape(len(uv), -1, 2) ** 2).sum(-1, keepdims=True)
            w = np.repeat(1.0 / (1.0 + pair / robust_scale_px ** 2), 2, -1).reshape(r.shape)
        jtj = np.einsum("nk,nki,nkj->nij", w, jac, jac) + 1e-9 * np.eye(6)
        step = -np.linalg.solve(jtj, np.einsum("nk,nki,nk->ni", w, jac, r)[..., None])[..., 0]
        rot = _rodrigues(step[:, :3]) @ rot
        t = t + step[:, 3:]
    cam = np.einsum("nij,pj->npi", rot, x) + t[:, None]
    proj = cam[..., :2] / np.maximum(cam[..., 2:3], 1e-6) * focal + c
    return rot, t, np.linalg.norm(proj - uv, axis=-1)


def initial_pose(model: MorphableModel, points: np.ndarray, focal: float,
                 principal: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Pose of the mean shape from 2D points alone (scaled-orthographic fit on the rigid points).

    Solves ``u ~ A X + b`` per frame by least squares, takes the nearest scaled rotation to the
    2x3 ``A``, and converts its scale to a depth with the focal length.
    """
    x = model.mean[model.rigid].astype(np.float64)
    centroid = x.mean(0)
    xc = x - centroid
    uv = np.asarray(points, np.float64)[:, model.rigid, :2]
    b = uv.mean(1)
    a = np.einsum("npc,pj->ncj", uv - b[:, None], np.linalg.pinv(xc).T)  # [N, 2, 3]
    u, s, vt = np.linalg.svd(a, full_matrices=False)  # a = u diag(s) vt, vt [N, 2, 3]
    rows = u @ vt  # nearest matrix with orthonormal rows
    rotation = np.concatenate([rows, np.cross(rows[:, 0], rows[:, 1])[:, None]], 1)
    scale = s.mean(-1)  # pixels per metre = focal / depth
    depth = focal / scale
    centre_cam = np.stack([(b[:, 0] - principal[0]) * depth / focal, (b[:, 1] - principal[1]) * depth / focal, depth], -1)
    translation = centre_cam - rotation @ centroid
    return rotation, translation
