"""Landmark tracks -> morphable model, focal length, per-frame head pose and expression.

:func:`track_landmarks` is the whole algorithm on arrays (no files): it is what the ``track``
command runs on a subject dataset and what the synthetic ground-truth test checks.

1. Focal length (unless given): for a ladder of candidates, learn the rigid face shape at that
   focal length on a subset of frames and fit it to their 2D landmarks with the shape free
   (perspective bundle adjustment on the rigid points); the reprojection error is lowest near
   the true focal length, because a wrong one bends the shape differently at each head pose.
   The best candidate is refined by golden-section search on ``log f``.
2. Learn the full morphable model (identity + expression basis) at that focal length.
3. Fit every frame (pose, expression) with temporal smoothness, starting from the alignments.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np

from gsavatar.config import TrackingConfig
from gsavatar.errors import InputError
from gsavatar.tracking.camera import Intrinsics, rotation_angle_deg, world_to_camera_matrix
from gsavatar.tracking.fit import fit_rigid_poses, fit_sequence
from gsavatar.tracking.morphable import MorphableModel, learn_morphable_model

_GOLDEN = (math.sqrt(5) - 1) / 2
TRACKING_VERSION = 1  # of the tracking.npz layout


@dataclasses.dataclass
class TrackingResult:
    """Everything tracking produces (arrays are per frame unless noted)."""

    model: MorphableModel  # per subject
    intrinsics: Intrinsics  # per subject, at the working resolution
    rotation: np.ndarray  # [N, 3, 3] world-to-camera
    axis_angle: np.ndarray  # [N, 3] radians
    translation: np.ndarray  # [N, 3] metres
    expression: np.ndarray  # [N, K]
    residual_px: np.ndarray  # [N, V] reprojection error of each landmark
    valid: np.ndarray  # [N] frames whose landmarks were trusted
    focal_search: dict  # candidate focal lengths (px) -> score (rigid RMSE, px)
    timings: dict  # seconds per step
    explained_variance: float  # fraction of the non-rigid landmark variance the expression basis keeps

    @property
    def focal(self) -> float:
        return self.intrinsics.fx

    @property
    def num_frames(self) -> int:
        return len(self.rotation)

    def world_to_camera(self) -> np.ndarray:
        """``[N, 4, 4]`` float32 view matrices (head frame -> OpenCV camera), see ``camera.py``."""
        return world_to_camera_matrix(self.rotation, self.translation).astype(np.float32)

    def save(self, path) -> None:
        """Write ``tracking.npz`` atomically (arrays only; loads without pickle)."""
        from gsavatar.data.io import atomic_save_npz

        k = self.intrinsics
        searched = np.array(sorted(self.focal_search.items()), np.float64).reshape(-1, 2)
        atomic_save_npz(path, format_version=np.array(TRACKING_VERSION),
                        rotation=self.rotation.astype(np.float32), axis_angle=self.axis_angle.astype(np.float32),
                        translation=self.translation.astype(np.float32), expression=self.expression.astype(np.float32),
                        world_to_camera=self.world_to_camera(),
                        intrinsics=np.array([k.fx, k.fy, k.cx, k.cy, k.width, k.height], np.float64),
                        residual_px=self.residual_px.astype(np.float32), valid=self.valid,
                        focal_search=searched, explained_variance=np.array(self.explained_variance),
                        **self.model.to_arrays())

    @classmethod
    def load(cls, path) -> "TrackingResult":
        with np.load(path, allow_pickle=False) as z:
            if int(z["format_version"]) != TRACKING_VERSION:
                raise ValueError(f"{path} has tracking format {int(z['format_version'])}, expected {TRACKING_VERSION}")
            fx, fy, cx, cy, w, h = z["intrinsics"].tolist()
            return cls(MorphableModel.from_arrays(z), Intrinsics(fx, fy, cx, cy, int(w), int(h)),
                       z["rotation"].astype(np.float64), z["axis_angle"].astype(np.float64),
                       z["translation"].astype(np.float64), z["expression"], z["residual_px"], z["valid"],
                       {float(f): float(v) for f, v in z["focal_search"]}, {}, float(z["explained_variance"]))

    @property
    def focal_at_search_limit(self) -> bool:
        """True when the focal search ended at an end of its range: the video shows too little
        head rotation to measure perspective (the fit is still good for this video)."""
        if not self.focal_search:
            return False
        ends = (min(self.focal_search), max(self.focal_search))
        return any(abs(math.log(self.focal / end)) < 1e-3 for end in ends)

    def metrics(self) -> dict:
        """Reprojection RMSE (px), pose jitter, focal: the figures tracking_report.json holds."""
        res = self.residual_px[self.valid]
        rigid = res[:, self.model.rigid]
        return {
            "reprojection_rmse_px": _rms(res), "reprojection_rmse_rigid_px": _rms(rigid),
            "reprojection_p95_px": float(np.percentile(res, 95)) if res.size else float("nan"),
            **pose_jitter(self.rotation, self.translation),
            "focal_px": round(self.focal, 2), "fov_x_deg": round(self.intrinsics.fov_x_deg, 2),
            "mean_distance_m": round(float(np.median(self.translation[:, 2])), 4),
        }


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else float("nan")


def pose_jitter(rotation: np.ndarray, translation: np.ndarray) -> dict:
    """RMS of the second difference of translation (mm) and of rotation (degrees).

    The rotation's second difference is the angle of ``(R[i+1] R[i]^T) (R[i] R[i-1]^T)^T``, the
    change of frame-to-frame rotation, so it does not depend on the choice of head frame.
    """
    if len(rotation) < 3:
        return {"jitter_translation_mm": 0.0, "jitter_rotation_deg": 0.0}
    d2t = (translation[2:] - 2 * translation[1:-1] + translation[:-2]) * 1e3
    step = rotation[1:] @ np.transpose(rotation[:-1], (0, 2, 1))  # frame-to-frame rotation
    change = step[1:] @ np.transpose(step[:-1], (0, 2, 1))
    return {"jitter_translation_mm": _rms(np.linalg.norm(d2t, axis=-1)),
            "jitter_rotation_deg": _rms(rotation_angle_deg(change))}


def _rigid_score(landmarks: np.ndarray, valid: np.ndarray, focal: float, principal, points: np.ndarray,
                 cfg: TrackingConfig) -> float:
    """Reprojection RMSE of the most rigid ``points`` when the rigid shape learned at this focal
    length is fitted (pose only, to convergence) to their 2D positions."""
    learned = learn_morphable_model(landmarks, valid, focal, principal, 0, cfg.interocular_mm)
    _, _, residual = fit_rigid_poses(learned.model.mean[points], landmarks[valid][:, points], focal, principal,
                                     learned.rotation[valid], learned.translation[valid],
                                     iterations=cfg.search_iterations, robust_scale_px=cfg.robust_scale_px)
    return _rms(residual)


def estimate_focal(landmarks: np.ndarray, valid: np.ndarray, size: int, principal, cfg: TrackingConfig,
                   progress: Callable[[int], None] | None = None) -> tuple[float, dict]:
    """Search the focal length (pixels); returns it and the scores of every focal length tried."""
    rows = np.flatnonzero(valid)
    rows = rows[np.linspace(0, len(rows) - 1, min(len(rows), cfg.focal_search_frames)).round().astype(int)]
    lm, ok = landmarks[rows], np.ones(len(rows), bool)
    # Score on the landmarks that move least relative to the head (the more, the sharper).
    lo, hi = (math.log(size * r) for r in cfg.focal_search_range)
    spread = learn_morphable_model(lm, ok, size * 1.5, principal, 0, cfg.interocular_mm).point_spread
    points = np.argsort(spread)[:cfg.focal_search_points]
    scores: dict[float, float] = {}

    def score(log_f: float) -> float:
        f = math.exp(log_f)
        if f not in scores:
            scores[f] = _rigid_score(lm, ok, f, principal, points, cfg)
            if progress is not None:
                progress(1)
        return scores[f]

    ladder = np.linspace(lo, hi, 9)
    values = [score(x) for x in ladder]
    best = int(np.argmin(values))
    a, b = ladder[max(best - 1, 0)], ladder[min(best + 1, len(ladder) - 1)]
    # Golden-section search for the minimum inside [a, b].
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    for _ in range(cfg.focal_search_steps):
        if score(c) < score(d):
            b, d = d, c
            c = b - _GOLDEN * (b - a)
        else:
            a, c = c, d
            d = a + _GOLDEN * (b - a)
    best_f = min(scores, key=scores.get)
    return best_f, {round(f, 2): round(s, 5) for f, s in sorted(scores.items())}


def track_landmarks(landmarks: np.ndarray, valid: np.ndarray, size: int, principal: tuple[float, float],
                    cfg: TrackingConfig | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> TrackingResult:
    """Run the whole tracker on landmarks ``[N, V, 3]`` (pixels at ``size``; see module docstring).

    ``progress(step, done, total)`` is called as work advances (for a progress bar).
    """
    cfg = cfg or TrackingConfig()
    valid = np.asarray(valid, bool)
    if valid.sum() < 3:
        raise InputError("too few frames with valid face landmarks to track (need at least 3)")
    timings = {}
    t = time.perf_counter()
    search_total = 9 + cfg.focal_search_steps
    if cfg.focal_px is None:
        done = [0]

        def tick(k: int) -> None:
            done[0] += k
            if progress is not None:
                progress("focal", done[0], search_total)

        focal, search = estimate_focal(landmarks, valid, size, principal, cfg, tick)
    else:
        focal, search = float(cfg.focal_px), {}
    timings["focal_search_s"] = time.perf_counter() - t

    t = time.perf_counter()
    learned = learn_morphable_model(landmarks, valid, focal, principal, cfg.expression_components, cfg.interocular_mm)
    timings["model_s"] = time.perf_counter() - t

    t = time.perf_counter()
    done_fit = [0]

    def tick_fit(k: int) -> None:
        done_fit[0] += k
        if progress is not None:
            progress("fit", done_fit[0], cfg.iterations)

    fit = fit_sequence(learned.model, landmarks, valid.astype(np.float64), focal, principal, cfg,
                       learned.rotation, learned.translation, learned.expression, progress=tick_fit)
    timings["fit_s"] = time.perf_counter() - t
    intrinsics = Intrinsics(focal, focal, principal[0], principal[1], size, size)
    return TrackingResult(learned.model, intrinsics, fit.rotation, fit.axis_angle, fit.translation,
                          fit.expression, fit.residual_px, valid, search,
                          {k: round(v, 3) for k, v in timings.items()}, learned.explained_variance)
