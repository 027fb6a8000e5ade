"""Per-frame facial signals from landmarks: eye blink and mouth opening."""

from __future__ import annotations

import numpy as np

from gsavatar.data.landmarks import CHIN, FOREHEAD, LEFT_EYE_EAR, LOWER_INNER_LIP, RIGHT_EYE_EAR, UPPER_INNER_LIP


def eye_aspect_ratio(landmarks: np.ndarray) -> np.ndarray:
    """Mean of both eyes' EAR = (|p2-p6| + |p3-p5|) / (2 |p1-p4|), per frame ``[N]``."""
    xy = landmarks[..., :2]
    ears = []
    for p1, p2, p3, p4, p5, p6 in (RIGHT_EYE_EAR, LEFT_EYE_EAR):
        vertical = np.linalg.norm(xy[:, p2] - xy[:, p6], axis=-1) + np.linalg.norm(xy[:, p3] - xy[:, p5], axis=-1)
        ears.append(vertical / (2 * np.linalg.norm(xy[:, p1] - xy[:, p4], axis=-1) + 1e-6))
    return 0.5 * (ears[0] + ears[1])


def blink_signal(ear: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Normalise the EAR per subject to a blink value in [0, 1]: 0 = eyes open, 1 = closed.

    The subject's open-eye level is the 90th percentile of EAR and the closed level the 2nd
    percentile (robust to a few tracking errors); on a subject that never blinks the range is
    floored at 15% of the open level so that noise does not read as blinking.
    """
    ref = ear[valid] if valid is not None and valid.any() else ear
    open_level, closed_level = np.percentile(ref, 90), np.percentile(ref, 2)
    span = max(open_level - closed_level, 0.15 * open_level, 1e-6)
    return np.clip((open_level - ear) / span, 0.0, 1.0).astype(np.float32)


def face_height(landmarks: np.ndarray) -> np.ndarray:
    """Forehead (FaceMesh 10) to chin (152) distance in pixels, per frame."""
    return np.linalg.norm(landmarks[:, FOREHEAD, :2] - landmarks[:, CHIN, :2], axis=-1)


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap (FaceMesh 13 to 14) over face height, per frame."""
    gap = np.linalg.norm(landmarks[:, UPPER_INNER_LIP, :2] - landmarks[:, LOWER_INNER_LIP, :2], axis=-1)
    return (gap / (face_height(landmarks) + 1e-6)).astype(np.float32)
