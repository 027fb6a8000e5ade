"""Face detection and MediaPipe FaceMesh landmarks (legacy solutions, models bundled).

Landmarks are stored in pixels of the working-size crop: ``x`` right, ``y`` down, and
``z`` MediaPipe's relative depth scaled by the image width (smaller = closer to the camera).
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np

from gsavatar.errors import MissingDependencyError

NUM_LANDMARKS = 478

# FaceMesh indices (facts about MediaPipe's canonical topology).
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400,
             377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
INNER_LIPS = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95]
# Eye contours for the eye aspect ratio: (outer corner, upper 1, upper 2, inner corner, lower 2, lower 1).
RIGHT_EYE_EAR = [33, 160, 158, 133, 153, 144]
LEFT_EYE_EAR = [362, 385, 387, 263, 373, 380]
FOREHEAD, CHIN, UPPER_INNER_LIP, LOWER_INNER_LIP, NOSE_BOTTOM = 10, 152, 13, 14, 2
# Where the inside of the mouth reads the face's motion: the inner lip contour and the chin (the jaw).
MOUTH_ANCHORS = [*INNER_LIPS, CHIN]


def _mediapipe_solutions():
    try:
        os.environ.setdefault("GLOG_minloglevel", "2")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with contextlib.redirect_stderr(io.StringIO()):
            import mediapipe as mp
        return mp.solutions
    except ImportError as e:
        raise MissingDependencyError(
            f"preprocessing needs mediapipe==0.10.14 ({e}); install with: pip install 'gsavatar[preprocess]'"
        ) from None


class FaceDetector:
    """BlazeFace (full range) boxes in pixels, ``[K, 4]`` as x0, y0, x1, y1, largest first."""

    def __init__(self, min_confidence: float = 0.5):
        self._det = _mediapipe_solutions().face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_confidence)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        result = self._det.process(rgb)
        boxes = []
        for d in result.detections or []:
            b = d.location_data.relative_bounding_box
            boxes.append([b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h])
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return boxes[np.argsort(-area)]

    def close(self) -> None:
        self._det.close()


class FaceMeshTracker:
    """FaceMesh in tracking mode with iris refinement: 478 points per face per frame."""

    def __init__(self, max_faces: int = 2, min_confidence: float = 0.5):
        self._mesh = _mediapipe_solutions().face_mesh.FaceMesh(
            static_image_mode=False, max_num_faces=max_faces, refine_landmarks=True,
            min_detection_confidence=min_confidence, min_tracking_confidence=min_confidence)

    def __call__(self, rgb: np.ndarray) -> list[np.ndarray]:
        """All faces found in ``rgb`` as ``[478, 3]`` float32 arrays in pixels."""
        h, w = rgb.shape[:2]
        result = self._mesh.process(rgb)
        faces = []
        for face in result.multi_face_landmarks or []:
            pts = np.array([(p.x, p.y, p.z) for p in face.landmark], np.float32)
            pts *= np.array([w, h, w], np.float32)
            faces.append(pts)
        return faces

    def close(self) -> None:
        self._mesh.close()


def choose_face(faces: list[np.ndarray], previous_centre: np.ndarray | None) -> np.ndarray | None:
    """Keep one consistent face: the one nearest the previous choice, else the largest."""
    if not faces:
        return None
    if previous_centre is not None:
        return min(faces, key=lambda f: float(np.linalg.norm(f[:, :2].mean(0) - previous_centre)))
    return max(faces, key=lambda f: float(np.ptp(f[:, 0]) * np.ptp(f[:, 1])))


def interpolate_dropouts(landmarks: np.ndarray, detected: np.ndarray, max_gap: int):
    """Fill frames without a detection by linear interpolation between neighbours.

    Returns ``(landmarks, interpolated, valid)``: ``interpolated`` marks frames filled from
    both sides within ``max_gap`` frames; frames in longer gaps (or before the first / after
    the last detection) are held at the nearest detection and marked not ``valid``.
    """
    n = len(detected)
    out = landmarks.copy()
    interpolated = np.zeros(n, bool)
    valid = detected.copy()
    idx = np.flatnonzero(detected)
    if idx.size == 0:
        return out, interpolated, valid
    for k in np.flatnonzero(~detected):
        right = np.searchsorted(idx, k)
        lo = idx[right - 1] if right > 0 else None
        hi = idx[right] if right < idx.size else None
        if lo is not None and hi is not None:
            a = (k - lo) / (hi - lo)
            out[k] = (1 - a) * landmarks[lo] + a * landmarks[hi]
            if hi - lo - 1 <= max_gap:
                interpolated[k] = valid[k] = True
        else:
            out[k] = landmarks[lo if lo is not None else hi]
    return out, interpolated, valid
