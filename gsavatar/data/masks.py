"""Per-frame label masks (person, head, face, inner mouth, torso) and the background plate.

Masks are stored as one uint8 bit-field image per frame (PNG, lossless and small): test a
region with ``labels & BIT``.
"""

from __future__ import annotations

import numpy as np

from gsavatar.data.landmarks import CHIN, FACE_OVAL, INNER_LIPS, NOSE_BOTTOM, _mediapipe_solutions

PERSON, HEAD, FACE, MOUTH, TORSO = 1, 2, 4, 8, 16
LABEL_BITS = {"person": PERSON, "head": HEAD, "face": FACE, "mouth": MOUTH, "torso": TORSO}


class PersonSegmenter:
    """MediaPipe selfie segmentation: person probability per pixel."""

    def __init__(self):
        self._seg = _mediapipe_solutions().selfie_segmentation.SelfieSegmentation(model_selection=0)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return self._seg.process(rgb).segmentation_mask

    def close(self) -> None:
        self._seg.close()


def label_map(person_prob: np.ndarray, landmarks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Compose the bit-field label image for one frame from the person mask and landmarks.

    face: filled face oval; mouth: filled inner-lip contour; head: the face plus person pixels
    above the chin within a band around the face (hair, ears); torso: person minus head.
    """
    import cv2

    h, w = person_prob.shape
    person = person_prob > threshold
    xy = landmarks[:, :2]
    face = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(face, cv2.convexHull(np.round(xy[FACE_OVAL]).astype(np.int32)), 1)
    mouth = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mouth, [np.round(xy[INNER_LIPS]).astype(np.int32)], 1)
    x_min, x_max = xy[FACE_OVAL, 0].min(), xy[FACE_OVAL, 0].max()
    band = 0.35 * (x_max - x_min)
    cols = np.arange(w)
    rows = np.arange(h)
    wide = (cols >= x_min - band) & (cols <= x_max + band)
    narrow = (cols >= x_min) & (cols <= x_max)
    # Hair and ears: person pixels beside the face down to the nose; below the nose only
    # within the face's width (jaw), so shoulders and collars stay torso.
    above_nose = rows <= xy[NOSE_BOTTOM, 1]
    above_chin = rows <= xy[CHIN, 1] + 0.02 * (x_max - x_min)
    head = person & ((above_nose[:, None] & wide[None, :]) | (above_chin[:, None] & narrow[None, :]))
    head |= face.astype(bool)
    torso = person & ~head
    labels = (PERSON * (person | head) + HEAD * head + FACE * face.astype(bool)
              + MOUTH * mouth.astype(bool) + TORSO * torso)
    return labels.astype(np.uint8)


def fill_holes(image: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill pixels where ``known`` is False by push-pull: masked averages down a pyramid, then
    each level's holes take the upsampled coarser level (smooth, fast, no seams)."""
    import cv2

    img = image.astype(np.float32) * known[..., None]
    wgt = known.astype(np.float32)
    levels = [(img, wgt)]
    while min(img.shape[:2]) > 2 and wgt.min() == 0:
        img, wgt = cv2.pyrDown(img), cv2.pyrDown(wgt)
        levels.append((img, wgt))
    filled = levels[-1][0] / np.maximum(levels[-1][1], 1e-6)[..., None]
    for img, wgt in reversed(levels[:-1]):
        up = cv2.pyrUp(filled, dstsize=(img.shape[1], img.shape[0]))
        a = np.clip(wgt, 0, 1)[..., None]
        filled = a * img / np.maximum(wgt, 1e-6)[..., None] + (1 - a) * up
    out = np.where(known[..., None], image.astype(np.float32), filled)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def background_plate(frames: np.ndarray, person: np.ndarray, dilate_px: int = 6, rows_per_chunk: int = 32) -> tuple[np.ndarray, float]:
    """Per-pixel temporal median of background pixels over sampled frames, holes filled.

    ``frames`` ``[K, H, W, 3]`` uint8 and ``person`` ``[K, H, W]`` bool (the person mask,
    dilated by ``dilate_px`` so the soft edge does not bleed in). Returns the plate and the
    fraction of pixels that were never seen as background (filled by :func:`fill_holes`).
    """
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
    background = np.stack([cv2.dilate(p.astype(np.uint8), kernel) == 0 for p in person])
    k, h, w, _ = frames.shape
    plate = np.zeros((h, w, 3), np.float32)
    for r in range(0, h, rows_per_chunk):  # bounded memory: a strip of rows at a time
        # Masked median by sorting: foreground samples get the sentinel 256, which sorts last,
        # so the median of the c background samples sits at sorted index (c - 1) // 2 (and c // 2).
        block = np.moveaxis(frames[:, r:r + rows_per_chunk], 0, -1).astype(np.uint16)  # [rows, W, 3, K]
        bg = np.moveaxis(background[:, r:r + rows_per_chunk], 0, -1)[:, :, None, :]
        block[~np.broadcast_to(bg, block.shape)] = 256
        block.sort(axis=-1)
        count = np.broadcast_to(bg.sum(axis=-1, keepdims=True), (*block.shape[:3], 1))
        lo = np.take_along_axis(block, np.maximum(count - 1, 0) // 2, -1)[..., 0].astype(np.float32)
        hi = np.take_along_axis(block, np.minimum(count // 2, k - 1), -1)[..., 0].astype(np.float32)
        strip = 0.5 * (lo + hi)
        strip[count[..., 0] == 0] = 0
        plate[r:r + rows_per_chunk] = strip
    known = background.any(axis=0)
    return fill_holes(plate, known), float(1.0 - known.mean())
