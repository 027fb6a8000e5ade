"""Lip-sync in seconds, without rendering: the mouth motion an avatar predicts, scored.

The face network's offsets at the tracked inner-lip landmarks (FaceMesh 13 and 14, placed on the
tracking's mean shape, the same canonical points the trainer's motion term supervises) give the
lip gap the avatar shows in a frame: the rendered lips follow the same deformation field. That
takes one audio conditioner and two points a frame instead of a render and a landmark detector,
so the whole test split, novel drives and silence are scored in seconds on a CPU, and designs
(feature kind, window, training settings) can be compared over several seeds.

Scores (all Pearson r; lags in frames at 25 fps, +k: the prediction moves k frames late):

* held-out frames: predicted gap against the tracked gap of the same frames, at lag 0 and at the
  best lag within ``max_lag``;
* a drive (speech the avatar never heard): predicted gap against the speech's band energy at the
  best lag, as ``gsavatar eval`` scores rendered drives;
* silence: the mean opening over the silent frames of a drive, as a fraction of the subject's
  speaking range (0: the resting gap, the tracked 5th percentile; 1: its 95th percentile).

The nearest-audio baseline (each frame shows the training frame nearest in audio feature) is
scored the same way from its frames' tracked gaps.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from gsavatar.data.frames import REST_PERCENTILE
from gsavatar.data.landmarks import LOWER_INNER_LIP, UPPER_INNER_LIP
from gsavatar.data.timebase import SAMPLES_PER_FRAME
from gsavatar.eval import metrics as M

LIPS = (UPPER_INNER_LIP, LOWER_INNER_LIP)
OPEN_PERCENTILE = 95.0


@dataclasses.dataclass(frozen=True)
class MouthRange:
    """The subject's tracked lip gap (metres) at rest and wide open, over its training frames."""

    rest: float
    open: float

    def opening(self, gaps: np.ndarray) -> np.ndarray:
        """Gaps as a fraction of the speaking range (0 at rest, 1 wide open)."""
        return (np.asarray(gaps, np.float64) - self.rest) / max(self.open - self.rest, 1e-9)


@dataclasses.dataclass(frozen=True)
class TimingScore:
    """A predicted mouth signal against a reference signal (the tracked gap or speech energy)."""

    r_at_0: float | None
    r: float | None  # at the best lag
    lag: int | None  # the best lag; None when no lag correlates positively
    frames: int


@dataclasses.dataclass(frozen=True)
class DriveScore:
    """A drive: timing against its speech energy and the mouth in its silent stretches."""

    timing: TimingScore
    silent_frames: int
    silence_opening: float | None  # mean opening over the silent frames (fraction of the range)


def canonical_lips(data) -> torch.Tensor:
    """``[2, 3]`` the inner-lip landmarks on the tracking's mean shape (the face net's canonical space)."""
    return data.model_mean[list(LIPS)]


def mouth_range(data) -> MouthRange:
    gaps = data.lip_gaps()[np.asarray(data.train_indices)]
    return MouthRange(float(np.percentile(gaps, REST_PERCENTILE)), float(np.percentile(gaps, OPEN_PERCENTILE)))


@torch.no_grad()
def avatar_lip_gaps(avatar, lips: torch.Tensor, features: torch.Tensor, blink: torch.Tensor | None = None,
                    frames=None) -> np.ndarray:
    """The lip gap (metres) the avatar's face net gives each frame of ``features [N, S, D]`` (raw
    features of the avatar's kind); ``blink [N]`` defaults to open eyes, ``frames`` to all N."""
    from gsavatar.render import get_backend

    deformer = avatar.face_deformer
    lips = lips.to(features.device, torch.float32)
    canonical = deformer.canonical(lips, get_backend("torch", features.device))  # once: only audio changes
    frames = range(len(features)) if frames is None else frames
    gaps = []
    for k in frames:
        audio = avatar.normalise_audio(avatar.audio_input(features, int(k)))
        b = blink[int(k)] if blink is not None else torch.zeros((), device=features.device)
        offsets, _, _ = deformer.from_canonical(canonical, audio, b)
        points = lips + offsets * deformer.position_scale
        gaps.append(float((points[0] - points[1]).norm()))
    return np.asarray(gaps, np.float64)


def nearest_audio_lip_gaps(data, features: torch.Tensor) -> np.ndarray:
    """The tracked gap of the training frame nearest in audio feature, for each frame of ``features``."""
    from gsavatar.eval.baselines import nearest_training_frames

    chosen = nearest_training_frames(data, features).cpu().numpy()
    return data.lip_gaps()[chosen]


def timing(pred: np.ndarray, reference: np.ndarray, max_lag: int = 3) -> TimingScore:
    av = M.av_offset(pred, reference, max_lag)
    return TimingScore(av["correlation_at_0"], av["correlation"], av["offset"], int(min(len(pred), len(reference))))


def silent_frames(samples: np.ndarray, num_frames: int, margin: int) -> np.ndarray:
    """Frames whose own audio (and that of ``margin`` frames on each side, the model's reach) is
    silent by :func:`gsavatar.drive.silence_note`'s level."""
    from gsavatar.drive import SILENCE_PEAK_DBFS

    x = np.abs(np.asarray(samples, np.float64))
    x = np.pad(x, (0, max(0, num_frames * SAMPLES_PER_FRAME - x.size)))[: num_frames * SAMPLES_PER_FRAME]
    quiet = x.reshape(num_frames, SAMPLES_PER_FRAME).max(1) < 10 ** (SILENCE_PEAK_DBFS / 20)
    padded = np.pad(quiet, margin, constant_values=True)
    return np.array([padded[k:k + 2 * margin + 1].all() for k in range(num_frames)], bool)


def score_drive(pred: np.ndarray, samples: np.ndarray, mouth: MouthRange, margin: int, max_lag: int = 3,
                timed_frames: int | None = None) -> DriveScore:
    """``pred [N]`` lip gaps of a drive of ``samples`` (16 kHz mono) against its speech and silence.

    Timing is taken over the first ``timed_frames`` frames (all by default): give the speech's own
    length when silence was appended to a clip, or the step from speech to digital silence (a
    drop in log energy larger than any within speech) outweighs everything else in r."""
    n = len(pred)
    timed = n if timed_frames is None else min(n, timed_frames)
    quiet = silent_frames(samples, n, margin)
    energy = M.speech_energy(samples, n)
    spoken = not quiet[:timed].all()
    score = timing(pred[:timed], energy[:timed], max_lag) if spoken else TimingScore(None, None, None, timed)
    opening = float(mouth.opening(pred[quiet]).mean()) if quiet.any() else None
    return DriveScore(score, int(quiet.sum()), opening)


def reach_frames(avatar) -> int:
    """How many frames of audio one frame's prediction reads on its longer side (window plus smoothing)."""
    return max(avatar.cfg.audio_reach())
