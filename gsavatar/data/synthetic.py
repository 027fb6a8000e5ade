"""A synthetic talking subject made only from what installed packages ship.

The face is scikit-image's astronaut photograph (Eileen Collins, public domain), cropped to
head and shoulders. A speech-like signal is synthesised (voiced harmonics shaped by vowel
formants, a syllable rhythm with pauses, consonant noise bursts), and in every video frame
the lower lip and jaw are pushed down by an amount proportional to that frame's loudness,
with the opened gap painted as the mouth interior. The head also sways slightly (rotation
and translation). Because the mouth opening is known exactly per frame, the generator gives
ground truth for testing landmarks, audio/video sync and, later, lip-sync.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from gsavatar.data.video import FPS

# Landmark positions measured once on skimage.data.astronaut() (512 x 512) with MediaPipe
# FaceMesh: facts about that photograph, so the generator needs no detector.
_ASTRONAUT_MOUTH_LEFT = (201.8, 139.2)  # FaceMesh 61
_ASTRONAUT_MOUTH_RIGHT = (245.0, 141.0)  # FaceMesh 291
_ASTRONAUT_INNER_UPPER = (223.5, 143.2)  # FaceMesh 13
_ASTRONAUT_INNER_LOWER = (223.0, 150.1)  # FaceMesh 14
_ASTRONAUT_CHIN = (221.3, 177.4)  # FaceMesh 152
_ASTRONAUT_FOREHEAD = (226.3, 71.7)  # FaceMesh 10
# Head-and-shoulders region of the photograph (x0, y0, side), face in the upper middle.
_ASTRONAUT_REGION = (88, 16, 272)

# (F1, F2, F3) in Hz of a few vowels (adult averages): a, e, i, o, u.
_VOWEL_FORMANTS = [(730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240)]


@dataclasses.dataclass
class SyntheticSubject:
    """What :func:`make_synthetic_subject` wrote, with its per-frame ground truth."""

    video_path: Path
    num_frames: int
    size: int
    mouth_open_px: np.ndarray  # [N] extra inner-lip gap in output pixels (0 = rest)
    loudness: np.ndarray  # [N] syllable envelope averaged over the frame, in [0, 1]
    head_rotation_deg: np.ndarray  # [N] in-plane rotation applied to the frame
    head_translation_px: np.ndarray  # [N, 2]
    face_height_px: float  # forehead (FaceMesh 10) to chin (152) at rest, output pixels


def synthesize_speech(duration_s: float, rate: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(signal, envelope)`` sampled at ``rate``: a speech-like sound and its syllable envelope."""
    n = int(round(duration_s * rate))
    t = np.arange(n) / rate
    envelope = np.zeros(n)
    f1, f2, f3 = np.full(n, 500.0), np.full(n, 1500.0), np.full(n, 2500.0)
    bursts = np.zeros(n)
    pos = 0.35  # lead-in silence (s)
    while pos < duration_s - 0.4:
        for _ in range(int(rng.integers(1, 5))):  # a "word" of 1-4 syllables
            dur = rng.uniform(0.14, 0.30)
            if pos + dur > duration_s - 0.2:
                break
            a, b = int(pos * rate), int((pos + dur) * rate)
            bump = np.sin(np.linspace(0, np.pi, b - a)) ** 2
            envelope[a:b] = np.maximum(envelope[a:b], rng.uniform(0.55, 1.0) * bump)
            f1[a:b], f2[a:b], f3[a:b] = _VOWEL_FORMANTS[int(rng.integers(len(_VOWEL_FORMANTS)))]
            c = min(n, a + int(0.03 * rate))  # a consonant onset: short noise burst
            bursts[a:c] = rng.uniform(0.1, 0.3)
            pos += dur + rng.uniform(0.02, 0.06)
        pos += rng.uniform(0.2, 0.55)  # pause between words
    f0 = 120.0 + 18.0 * np.sin(2 * np.pi * 0.4 * t) + 6.0 * np.sin(2 * np.pi * 2.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = np.zeros(n)
    for k in range(1, 32):  # harmonics weighted by a three-formant resonance curve
        fk = k * f0
        gain = sum(1.0 / (1.0 + ((fk - f) / bw) ** 2) for f, bw in ((f1, 90.0), (f2, 120.0), (f3, 160.0)))
        voiced += np.where(fk < rate / 2 - 500, gain / k, 0.0) * np.sin(k * phase)
    noise = np.diff(rng.standard_normal(n + 1))  # high-passed noise for the consonants
    signal = envelope * voiced + bursts * noise
    signal *= 0.8 / (np.abs(signal).max() + 1e-9)
    return signal.astype(np.float32), envelope


def _base_image(size: int) -> tuple[np.ndarray, float, float]:
    """The astronaut's head and shoulders at ``size`` px, with the scale and offset used."""
    import cv2
    from skimage import data as skdata

    x0, y0, side = _ASTRONAUT_REGION
    image = skdata.astronaut()[y0:y0 + side, x0:x0 + side]
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if size < side else cv2.INTER_CUBIC)
    return image, size / side, (x0, y0)


def _mouth_frame(base: np.ndarray, geom: dict, open_px: float) -> np.ndarray:
    """Push the lower lip and jaw down by ``open_px`` and paint the gap as mouth interior."""
    import cv2

    h, w = base.shape[:2]
    if open_px <= 0.05:
        return base.copy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mx, split, half_w, chin, face_h = geom["mx"], geom["split"], geom["half_w"], geom["chin"], geom["face_h"]
    # Horizontal profile: full opening in the middle of the mouth, none past the corners.
    u = np.clip(np.abs(xx - mx) / (half_w * 1.15), 0, 1)
    profile = np.clip(np.cos(0.5 * np.pi * u), 0.0, 1.0) ** 1.5
    # Vertical falloff: lip and chin move together, the neck below stays (jaw drop).
    below = yy - split
    fall = np.clip(1.0 - (yy - chin) / (0.45 * face_h), 0, 1)
    d = open_px * profile * fall
    src_y = np.where(below > 0, yy - d, yy)
    warped = cv2.remap(base, xx, src_y.astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # The gap between split and split + d (where profile > 0): a dark mouth cavity.
    gap = np.clip(np.minimum(below, open_px * profile - below), -1, 1)  # soft 1 px edge
    alpha = np.clip(gap + 0.5, 0, 1) * (below > -1) * (profile > 0.02)
    depth = np.clip(below / max(open_px, 1.0), 0, 1)
    cavity = np.stack([70 - 40 * depth, 22 - 12 * depth, 28 - 14 * depth], axis=-1)
    out = warped * (1 - alpha[..., None]) + cavity * alpha[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def make_synthetic_subject(
    path: str | Path,
    duration_s: float = 8.0,
    size: int = 512,
    seed: int = 0,
    max_open_fraction: float = 0.16,
    head_motion: float = 1.0,
    audio_rate: int = 44100,
) -> SyntheticSubject:
    """Write a talking-head mp4 (H.264 + AAC) of the astronaut speaking synthetic speech.

    ``max_open_fraction`` is the largest extra mouth opening as a fraction of face height;
    ``head_motion`` scales the head sway (0 = still).
    """
    import cv2

    from gsavatar.outputs.video_writer import write_mp4

    rng = np.random.default_rng(seed)
    num_frames = int(round(duration_s * FPS))
    audio, envelope = synthesize_speech(num_frames / FPS, audio_rate, rng)
    per_frame = envelope[: num_frames * (len(envelope) // num_frames)].reshape(num_frames, -1).mean(axis=1)
    loudness = np.clip(per_frame / (per_frame.max() + 1e-9), 0, 1)

    base, scale, (ox, oy) = _base_image(size)
    to_out = lambda p: ((p[0] - ox) * scale, (p[1] - oy) * scale)  # noqa: E731
    left, right = to_out(_ASTRONAUT_MOUTH_LEFT), to_out(_ASTRONAUT_MOUTH_RIGHT)
    upper, lower = to_out(_ASTRONAUT_INNER_UPPER), to_out(_ASTRONAUT_INNER_LOWER)
    chin, forehead = to_out(_ASTRONAUT_CHIN), to_out(_ASTRONAUT_FOREHEAD)
    face_h = chin[1] - forehead[1]
    geom = dict(mx=0.5 * (left[0] + right[0]), split=0.5 * (upper[1] + lower[1]),
                half_w=0.5 * (right[0] - left[0]), chin=chin[1], face_h=face_h)
    open_px = loudness * max_open_fraction * face_h

    t = np.arange(num_frames) / FPS
    rot = head_motion * (2.5 * np.sin(2 * np.pi * 0.23 * t) + 1.0 * np.sin(2 * np.pi * 0.61 * t + 1.0))
    trans = head_motion * np.stack([0.012 * size * np.sin(2 * np.pi * 0.17 * t + 0.5),
                                    0.008 * size * np.sin(2 * np.pi * 0.29 * t)], axis=1)
    centre = (geom["mx"], 0.5 * (forehead[1] + chin[1]))

    def frames():
        for k in range(num_frames):
            img = _mouth_frame(base, geom, float(open_px[k]))
            m = cv2.getRotationMatrix2D(centre, float(rot[k]), 1.0)
            m[:, 2] += trans[k]
            yield cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, frames(), fps=FPS, audio=audio, audio_rate=audio_rate)
    return SyntheticSubject(path, num_frames, size, open_px, loudness, rot, trans, float(face_h))


def mouth_darkness(image: np.ndarray, landmarks: np.ndarray, landmark_size: int) -> float:
    """Mouth opening measured on an image of the synthetic subject (a real frame or a render).

    The dark-pixel fraction in a box below the upper inner lip: the synthetic cavity is dark red.

    The box is placed with the frame's ground-truth landmarks (the same for the render and the
    real frame, since both share the tracked head pose) and spans the mouth corners and a
    quarter of the face height downwards. Measured on real frames it correlates with the
    generator's opening at r > 0.98.
    """
    s = image.shape[0] / landmark_size
    x0, x1 = landmarks[61, 0] * s, landmarks[291, 0] * s
    top = landmarks[13, 1] * s - 0.01 * image.shape[0]
    face_h = np.linalg.norm(landmarks[10, :2] - landmarks[152, :2]) * s
    box = image[int(top):int(np.ceil(top + 0.01 * image.shape[0] + 0.25 * face_h)), int(x0):int(np.ceil(x1))]
    lum = box.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return float(np.clip((0.25 - lum) / 0.25, 0, 1).mean())
