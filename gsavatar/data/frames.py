"""The subject dataset as tensors at a working resolution: frames, masks, cameras, conditioning
signals. How training and scoring read a subject (through SubjectDataset).

Frames are decoded lazily and cached as uint8 at the training resolution (1779 frames at
256 px: 350 MB; at 512 px: 1.4 GB), never as float.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from gsavatar.data.dataset import SubjectDataset
from gsavatar.data.landmarks import LOWER_INNER_LIP, UPPER_INNER_LIP
from gsavatar.errors import InputError

AUDIO_PREFERENCE = ("logmel+phonemes", "logmel", "whisper", "hubert", "wav2vec2")
"""What "auto" conditions on, first available first. The mouth must follow speech the avatar never
heard. On cnn2 (BENCHMARKS.md, "Lip-sync without rendering", two seeds of the motion stage), a
face net on log-mel side by side with phoneme log-posteriors (a multilingual recogniser: what a
phoneme is does not depend on the voice or the language) fits the subject's held-out frames
better than log-mel alone (r 0.62 against 0.56) and follows German and Spanish speech better
(0.65 / 0.66 against 0.52 / 0.51), other English voices as well or better (0.28 / 0.33 against
0.28 / 0.27), and closes the lips in silence as log-mel does; whole avatars (two seeds each)
keep the gain on the other languages and come out about even on English voices and held-out
frames, where the seeds differ more than the features. Log-mel alone follows other voices
far better than Whisper tiny.en states (an English-only encoder, whose features of silence look
like speech: 0.27-0.52 against 0.12-0.30, lips ajar in silence), though Whisper fits the
subject's own held-out frames better (0.66)."""
REST_PERCENTILE = 5.0
"""A subject's mouth at rest: its tracked lip gap at this percentile of the training frames (the
mouth closes in pauses; lower percentiles are tracking noise)."""


def choose_audio_feature(dataset: SubjectDataset, wanted: str) -> str:
    have = list(dataset.manifest["audio_features"])
    if wanted != "auto":
        if not dataset.has_audio_features(wanted):
            raise InputError(f"{dataset.root} has no '{wanted}' audio features (has: {', '.join(have)})")
        return wanted
    for kind in AUDIO_PREFERENCE:
        if dataset.has_audio_features(kind):
            return kind
    raise InputError(f"{dataset.root} has no usable audio features (has: {', '.join(have) or 'none'})")


@dataclasses.dataclass
class SubjectFrame:
    """One frame's targets at the training resolution (float in [0, 1], ``[H, W, ...]``)."""

    index: int
    image: torch.Tensor  # [H, W, 3]
    head: torch.Tensor  # [H, W, 1] head (face, hair, ears)
    face: torch.Tensor  # [H, W, 1] face oval
    mouth: torch.Tensor  # [H, W, 1] inside the inner lips
    mouth_region: torch.Tensor  # [H, W, 1] the mouth dilated (lips and teeth included)
    torso: torch.Tensor  # [H, W, 1]
    person: torch.Tensor  # [H, W, 1]
    back: torch.Tensor  # [H, W, 3] the image with the (dilated) head replaced by the background plate
    ring: torch.Tensor  # [H, W, 1] the dilation margin around the head, where ``back`` is neither plate nor frame truth


class SubjectFrames:
    def __init__(self, subject_dir, render_size: int, audio_feature: str = "auto", device: str | torch.device = "cpu"):
        self.dataset = ds = SubjectDataset(subject_dir)
        self.tracking = ds.tracking
        self.size = int(render_size)
        self.device = torch.device(device)
        self.num_frames = ds.num_frames
        self.train_indices = ds.train_indices
        self.test_indices = ds.test_indices
        self.audio_kind = choose_audio_feature(ds, audio_feature)
        feats = np.asarray(ds.audio_features(self.audio_kind, mmap=False), np.float32)
        self.audio = torch.from_numpy(feats).to(self.device)  # [N, S, D]
        train_feats = feats[self.train_indices].reshape(-1, feats.shape[-1])
        self.audio_mean = torch.from_numpy(train_feats.mean(0)).to(self.device)
        self.audio_std = torch.from_numpy(train_feats.std(0) + 1e-3).to(self.device)
        self.blink = torch.from_numpy(ds.signals["blink"].astype(np.float32)).to(self.device)
        self.mouth_open = ds.signals["mouth_open"].astype(np.float32)
        tr = self.tracking
        self.viewmats = torch.from_numpy(tr.world_to_camera()).to(self.device)  # [N, 4, 4]
        self.poses = torch.from_numpy(np.concatenate([tr.axis_angle, tr.translation], 1).astype(np.float32)).to(self.device)
        # Tracking intrinsics are at the working size in the continuous pixel convention of the
        # landmarks (pixel j spans [j, j+1]), which is the rasterizer's: scale fx, cx alike.
        s = self.size / ds.size
        k = tr.intrinsics
        self.K = torch.tensor([[k.fx * s, 0, k.cx * s], [0, k.fy * s, k.cy * s], [0, 0, 1]], dtype=torch.float32,
                              device=self.device)
        self.model_mean = torch.from_numpy(tr.model.mean).to(self.device)  # [V, 3]
        self.model_basis = torch.from_numpy(tr.model.basis).to(self.device)  # [K, V, 3]
        self.expression = torch.from_numpy(tr.expression.astype(np.float32)).to(self.device)
        self.valid = torch.from_numpy(tr.valid.astype(bool))
        self.background = self._resize(ds.background).to(self.device)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # ---------------------------------------------------------------------------------------
    def _resize(self, rgb: np.ndarray) -> torch.Tensor:
        import cv2

        if rgb.shape[0] != self.size:
            rgb = cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(np.ascontiguousarray(rgb)).float() / 255.0

    def _raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        if index not in self._cache:
            rgb, labels = self.dataset.frame(index), self.dataset.labels(index)
            if rgb.shape[0] != self.size:
                rgb = cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
                labels = cv2.resize(labels, (self.size, self.size), interpolation=cv2.INTER_NEAREST)
            self._cache[index] = (rgb, labels)
        return self._cache[index]

    def frame(self, index: int) -> SubjectFrame:
        import cv2

        from gsavatar.data.masks import FACE, HEAD, MOUTH, PERSON, TORSO

        rgb, labels = self._raw(index)
        k = max(3, 2 * round(self.size / 64) + 1)  # ~4 px at 128, ~16 px at 512
        kernel = np.ones((k, k), np.uint8)
        mouth = (labels & MOUTH) > 0
        mouth_region = cv2.dilate(mouth.astype(np.uint8), kernel, iterations=2) > 0
        head_dilated = cv2.dilate(((labels & HEAD) > 0).astype(np.uint8), kernel) > 0
        image = torch.from_numpy(rgb).float() / 255.0
        bg = self.background.cpu()
        back = torch.where(torch.from_numpy(head_dilated)[..., None], bg, image)

        def m(x):
            return torch.from_numpy(np.asarray(x, np.float32))[..., None].to(self.device)

        return SubjectFrame(index, image.to(self.device), m((labels & HEAD) > 0), m((labels & FACE) > 0), m(mouth), m(mouth_region),
                          m((labels & TORSO) > 0), m((labels & PERSON) > 0), back.to(self.device),
                          m(head_dilated & ((labels & HEAD) == 0)))

    def inputs(self, index: int, avatar, back: torch.Tensor | None = None, audio: torch.Tensor | None = None):
        """``avatar``'s inputs for frame ``index``: its tracked camera, pose and blink, driven by the
        subject's own audio features (or ``audio [N, S, D]``)."""
        return avatar.frame_inputs(self.audio if audio is None else audio, index, viewmat=self.viewmats[index], K=self.K,
                                   size=self.size, blink=self.blink[index], pose=self.poses[index], back=back)

    def landmark_offsets(self, index: int) -> torch.Tensor:
        """Tracked landmark motion of a frame relative to the canonical (mean) shape, ``[V, 3]`` metres."""
        return self.offsets_of(self.expression[index])

    def offsets_of(self, expression: torch.Tensor) -> torch.Tensor:
        """Landmark motion ``[V, 3]`` (metres) of tracking expression coefficients ``[K]``."""
        return torch.einsum("k,kvc->vc", expression, self.model_basis)

    def lip_gaps(self) -> np.ndarray:
        """``[N]`` tracked inner-lip gap (metres, FaceMesh 13 to 14 in 3-D) of every frame."""
        lips = [UPPER_INNER_LIP, LOWER_INNER_LIP]
        points = self.model_mean[lips][None] + torch.einsum("nk,kvc->nvc", self.expression, self.model_basis[:, lips])
        return (points[:, 0] - points[:, 1]).norm(dim=-1).cpu().numpy().astype(np.float64)

    def rest_expression(self) -> torch.Tensor:
        """``[K]`` the subject's mouth at rest: the mean expression of the training frames whose lip
        gap is at most its REST_PERCENTILE-th percentile (closed lips, whatever the rest of the face does)."""
        gaps = self.lip_gaps()[self.train_indices]
        closed = self.train_indices[gaps <= np.percentile(gaps, REST_PERCENTILE)]
        return self.expression[torch.as_tensor(closed, device=self.expression.device)].mean(0)
