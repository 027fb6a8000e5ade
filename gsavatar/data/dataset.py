"""The on-disk subject dataset: layout, manifest, and the one reader later stages use.

Layout of ``SUBJECT_DIR``::

    manifest.json            source hash, fps, frame count, size, crop, split, features, stages
    preprocess_report.json   per-stage wall time, frames with a face, crop, peak memory
    scan.json                face track summary and the crop (source pixels)
    frames/000000.jpg ...    RGB frames at the working size, 25 fps
    audio.wav                16 kHz mono PCM, exactly num_frames * 640 samples
    landmarks.npz            landmarks [N, 478, 3] (pixels), detected / interpolated / valid [N]
    masks/000000.png ...     uint8 bit-field labels (see gsavatar.data.masks.LABEL_BITS)
    background.png           clean background plate
    signals.npz              blink [N] (0 open .. 1 closed), ear [N], mouth_open [N]
    features/<kind>.npy      audio features [N, S, D] (see gsavatar.data.audio_features)
    tracking.npz             morphable model, intrinsics, per-frame pose and expression
                             (see gsavatar.tracking.tracker.TrackingResult, conventions in
                             gsavatar.tracking.camera)
    tracking_report.json     reprojection RMSE, pose jitter, focal length, wall time

A dataset is trusted only when ``manifest["complete"]`` is true, which the preprocessor sets
as its very last write.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from gsavatar.errors import IncompleteDatasetError, InputError

MANIFEST_VERSION = 1


def frame_name(index: int, ext: str) -> str:
    return f"{index:06d}.{ext}"


def read_manifest(subject_dir: str | Path) -> dict | None:
    path = Path(subject_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


class SubjectDataset:
    """Read-only access to a complete subject dataset (frames are read lazily from disk)."""

    def __init__(self, subject_dir: str | Path):
        self.root = Path(subject_dir)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise InputError(f"{self.root} is not a subject dataset (no readable manifest.json); run gsavatar preprocess")
        if not manifest.get("complete"):
            missing = [s for s, v in manifest.get("stages", {}).items() if not v.get("done")]
            fix = f"run gsavatar track {self.root}" if missing == ["tracking"] else "re-run gsavatar preprocess"
            raise IncompleteDatasetError(
                f"{self.root} is incomplete (unfinished stages: {', '.join(missing) or 'unknown'}); {fix}")
        self.manifest = manifest

    # Sizes and splits
    @property
    def num_frames(self) -> int:
        return int(self.manifest["num_frames"])

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    @property
    def fps(self) -> int:
        return int(self.manifest["fps"])

    @property
    def train_indices(self) -> np.ndarray:
        return np.arange(*self.manifest["split"]["train"])

    @property
    def test_indices(self) -> np.ndarray:
        return np.arange(*self.manifest["split"]["test"])

    # Per-frame images
    def frame(self, index: int) -> np.ndarray:
        """RGB uint8 ``[size, size, 3]``."""
        import cv2

        bgr = cv2.imread(str(self.root / "frames" / frame_name(index, "jpg")), cv2.IMREAD_COLOR)
        return np.ascontiguousarray(bgr[..., ::-1])

    def labels(self, index: int) -> np.ndarray:
        """uint8 bit-field ``[size, size]``; test with ``gsavatar.data.masks`` bits."""
        import cv2

        return cv2.imread(str(self.root / "masks" / frame_name(index, "png")), cv2.IMREAD_UNCHANGED)

    @cached_property
    def background(self) -> np.ndarray:
        import cv2

        return np.ascontiguousarray(cv2.imread(str(self.root / "background.png"))[..., ::-1])

    # Per-frame arrays
    @cached_property
    def _landmarks(self):
        return dict(np.load(self.root / "landmarks.npz"))

    @property
    def landmarks(self) -> np.ndarray:
        """``[N, 478, 3]`` float32 in pixels of the working size."""
        return self._landmarks["landmarks"]

    @property
    def landmarks_valid(self) -> np.ndarray:
        return self._landmarks["valid"]

    @cached_property
    def tracking(self):
        """The :class:`~gsavatar.tracking.tracker.TrackingResult`: cameras (``world_to_camera()``,
        ``intrinsics``), expressions and the subject's morphable model."""
        from gsavatar.tracking.tracker import TrackingResult

        path = self.root / "tracking.npz"
        if not self.manifest.get("stages", {}).get("tracking", {}).get("done") or not path.is_file():
            raise IncompleteDatasetError(f"{self.root} has no face tracking yet; run gsavatar track {self.root}")
        return TrackingResult.load(path)

    @cached_property
    def signals(self) -> dict[str, np.ndarray]:
        return dict(np.load(self.root / "signals.npz"))

    @cached_property
    def audio(self) -> np.ndarray:
        from gsavatar.data.video import read_wav

        return read_wav(self.root / "audio.wav")[0]

    def has_audio_features(self, kind: str) -> bool:
        """Whether :meth:`audio_features` gives ``kind`` (a combination when it has every part)."""
        from gsavatar.data.audio_features import COMBINE

        return all(k in self.manifest["audio_features"] for k in kind.split(COMBINE))

    def audio_feature_description(self, kind: str) -> dict:
        """How features of ``kind`` were made (the extractor's description)."""
        from gsavatar.data.audio_features import COMBINE, combined_description

        if COMBINE in kind:
            return combined_description([self.audio_feature_description(k) for k in kind.split(COMBINE)])
        return dict(self.manifest["audio_features"][kind].get("description", {}))

    def audio_features(self, kind: str, mmap: bool = True) -> np.ndarray:
        """``[N, S, D]`` float32 features of ``kind`` (see ``manifest["audio_features"]``; a
        combination ``a+b`` of kinds it has is made from them)."""
        from gsavatar.data.audio_features import COMBINE, combine_features

        if COMBINE in kind and self.has_audio_features(kind):
            return combine_features([self.audio_features(k, mmap=False) for k in kind.split(COMBINE)])
        if kind not in self.manifest["audio_features"]:
            raise InputError(f"{self.root} has no '{kind}' audio features (has: {', '.join(self.manifest['audio_features'])})")
        return np.load(self.root / "features" / f"{kind}.npy", mmap_mode="r" if mmap else None)
