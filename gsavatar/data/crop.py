"""One fixed square crop for the whole video, from the face track."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Crop:
    """A square region of the source frame: ``[x0, x0 + side) x [y0, y0 + side)`` in source pixels."""

    x0: int
    y0: int
    side: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def compute_crop(
    face_boxes: np.ndarray,
    width: int,
    height: int,
    face_scale: float = 3.0,
    face_centre_at: float = 0.42,
) -> Crop:
    """A square crop centred on the face track that holds head and shoulders in every frame.

    ``face_boxes``: ``[K, 4]`` (x0, y0, x1, y1) of the tracked face in frames where it was
    found. The side is ``face_scale`` times the median face box height, grown to contain every
    box with half a face of margin, and never larger than the frame. The face centre sits at
    ``face_centre_at`` of the crop height (room below for the shoulders). Horizontally the
    crop is centred on the median face centre; the crop is shifted, not shrunk, at borders.
    """
    boxes = np.asarray(face_boxes, np.float64)
    h_face = float(np.median(boxes[:, 3] - boxes[:, 1]))
    cx = float(np.median(0.5 * (boxes[:, 0] + boxes[:, 2])))
    cy = float(np.median(0.5 * (boxes[:, 1] + boxes[:, 3])))
    margin = 0.5 * h_face
    need_w = 2 * max(cx - boxes[:, 0].min(), boxes[:, 2].max() - cx) + 2 * margin
    need_h = max((cy - boxes[:, 1].min() + margin) / face_centre_at,
                 (boxes[:, 3].max() - cy + margin) / (1 - face_centre_at))
    side = int(round(min(max(face_scale * h_face, need_w, need_h), width, height)))
    x0 = int(round(np.clip(cx - side / 2, 0, width - side)))
    y0 = int(round(np.clip(cy - face_centre_at * side, 0, height - side)))
    return Crop(x0, y0, side)
