"""``gsavatar track --overlay``: the fitted model drawn over the frames, with the audio, to judge by eye.

Drawn per frame: the model's mesh (a triangulation of the mean shape, thin white lines), the
fitted landmarks (green dots), the FaceMesh landmarks it was fitted to (small red dots), the
head-frame axes at the origin (x red, y green, z blue; 5 cm) and the frame's reprojection RMSE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gsavatar.tracking.camera import project
from gsavatar.tracking.tracker import TrackingResult


def mesh_edges(mean_shape: np.ndarray) -> np.ndarray:
    """Edges ``[E, 2]`` of a Delaunay triangulation of the frontal (x, y) view of the mean shape."""
    import cv2

    xy = mean_shape[:, :2].astype(np.float64)
    lo, hi = xy.min(0) - 1e-3, xy.max(0) + 1e-3
    scale = 1000.0 / (hi - lo).max()
    subdiv = cv2.Subdiv2D((0, 0, int((hi - lo)[0] * scale) + 2, int((hi - lo)[1] * scale) + 2))
    pts = (xy - lo) * scale
    for p in pts:
        subdiv.insert((float(p[0]), float(p[1])))
    tri = subdiv.getTriangleList().reshape(-1, 3, 2)
    # Map triangle corners back to vertex indices (Subdiv2D returns coordinates).
    index = {tuple(np.round(p, 3)): i for i, p in enumerate(pts.astype(np.float32).astype(np.float64))}
    edges = set()
    for t in tri:
        ids = [index.get(tuple(np.round(c.astype(np.float64), 3))) for c in t]
        if None in ids:
            continue  # a corner of the bounding triangle
        for a, b in ((0, 1), (1, 2), (2, 0)):
            edges.add((min(ids[a], ids[b]), max(ids[a], ids[b])))
    return np.array(sorted(edges), np.int64).reshape(-1, 2)


def project_model(result: TrackingResult, index: int) -> np.ndarray:
    """The fitted model's landmarks of frame ``index`` in pixels ``[V, 2]``."""
    verts = result.model.vertices(torch.as_tensor(result.expression[index], dtype=torch.float64))
    cam = verts @ torch.as_tensor(result.rotation[index]).T + torch.as_tensor(result.translation[index])
    k = result.intrinsics
    return project(cam, k.fx, (k.cx, k.cy)).numpy()


def draw_frame(image: np.ndarray, result: TrackingResult, index: int, observed: np.ndarray | None,
               edges: np.ndarray) -> np.ndarray:
    import cv2

    out = image.copy()
    uv = project_model(result, index)
    shift = 4  # sub-pixel drawing: coordinates in 1/16 px
    to_int = lambda p: tuple(int(round(c * (1 << shift))) for c in p)  # noqa: E731
    for a, b in edges:
        cv2.line(out, to_int(uv[a]), to_int(uv[b]), (255, 255, 255), 1, cv2.LINE_AA, shift)
    if observed is not None:
        for p in observed[:, :2]:
            cv2.circle(out, to_int(p), 1 << shift, (255, 40, 40), -1, cv2.LINE_AA, shift)
    for p in uv:
        cv2.circle(out, to_int(p), 1 << shift, (40, 255, 40), -1, cv2.LINE_AA, shift)
    k = result.intrinsics
    axes = torch.as_tensor(np.vstack([np.zeros(3), 0.05 * np.eye(3)]))
    cam = axes @ torch.as_tensor(result.rotation[index]).T + torch.as_tensor(result.translation[index])
    ends = project(cam, k.fx, (k.cx, k.cy)).numpy()
    for axis, colour in zip(range(3), ((255, 0, 0), (0, 255, 0), (0, 0, 255))):
        cv2.line(out, to_int(ends[0]), to_int(ends[axis + 1]), colour, 2, cv2.LINE_AA, shift)
    rmse = float(np.sqrt(np.mean(result.residual_px[index] ** 2)))
    label = f"frame {index}  rmse {rmse:.2f}px{'' if result.valid[index] else '  (no landmarks)'}"
    scale = max(0.35, image.shape[0] / 1024)
    cv2.putText(out, label, (8, int(24 * scale * 2)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), 1, cv2.LINE_AA)
    return out


def write_overlay(dataset, result: TrackingResult, path: str | Path) -> Path:
    """Encode the overlay of every frame of ``dataset`` (a SubjectDataset) with its audio to ``path``."""
    from gsavatar.outputs.video_writer import write_mp4
    from gsavatar.progress import progress

    edges = mesh_edges(result.model.mean)
    landmarks = dataset.landmarks

    def frames():
        for i in progress(range(dataset.num_frames), desc="overlay", unit="frame", leave=False):
            yield draw_frame(dataset.frame(i), result, i, landmarks[i] if dataset.landmarks_valid[i] else None, edges)

    return write_mp4(path, frames(), fps=dataset.fps, audio=dataset.audio)
