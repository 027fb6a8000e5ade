"""Metric functions: images, landmarks, lip-sync and blink signals. Pure numpy / torch, no files.

Definitions (the usual ones in the talking-head literature):

- PSNR: 10 log10(1 / MSE) for images in [0, 1]; over a split, the mean MSE over frames first.
- SSIM: Wang et al. 2004 (Gaussian window 11, sigma 1.5), mean of the SSIM map (inside a mask if given).
- LMD: per frame, centre the predicted and ground-truth landmark sets on their own means, then
  average the Euclidean distance between corresponding points; average over frames. In pixels
  of the image the landmarks were found on. Mouth LMD uses iBUG-68 points 48-67, face LMD all 68.
- Mouth opening: mean of the three inner-lip gaps (iBUG 61-67, 62-66, 63-65) over the distance
  between the outer eye corners (36-45), so it does not depend on image size or head distance.
- Eye opening: the eye aspect ratio (Soukupova and Cech 2016), the mean of both eyes.
- Speech energy: log energy of 300-3000 Hz in the 40 ms of audio each 25 fps frame owns.
- AV offset: the lag (frames) in [-max_lag, max_lag] maximising the Pearson correlation of
  mouth opening and speech energy; positive means the mouth moves *after* the sound. On short
  clips keep max_lag below one syllable (about 5 frames): the syllable rhythm makes side peaks
  there (gsavatar.config.EvalConfig.max_lag).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gsavatar import imaging
from gsavatar.data.timebase import FPS, SAMPLE_RATE

MOUTH_POINTS = np.arange(48, 68)
FACE_POINTS = np.arange(68)
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))
EYE_CORNERS = (36, 45)


# -- images -----------------------------------------------------------------------------------
def mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean squared error of ``[H, W, C]`` images (over pixels where ``mask [H, W, 1]`` > 0)."""
    return float(imaging.mse(a.detach().float(), b.detach().float(), mask))


def psnr_from_mse(values) -> float | None:
    """dB of the mean of per-frame MSEs (None for no frames)."""
    values = list(values)
    if not values:
        return None
    return 10 * math.log10(1.0 / max(float(np.mean(values)), 1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean SSIM of ``[H, W, C]`` images in [0, 1] (inside ``mask`` if given)."""
    return float(imaging.masked_mean(imaging.ssim_map(a.detach().float(), b.detach().float()), mask))


# -- landmarks --------------------------------------------------------------------------------
def landmark_distance(pred: np.ndarray, truth: np.ndarray, points=MOUTH_POINTS) -> float:
    """LMD of one frame: ``[68, 2]`` sets, each centred on the mean of the chosen points."""
    p = np.asarray(pred, np.float64)[points]
    t = np.asarray(truth, np.float64)[points]
    p = p - p.mean(0)
    t = t - t.mean(0)
    return float(np.linalg.norm(p - t, axis=-1).mean())


def mouth_opening(points: np.ndarray) -> float:
    """Inner-lip gap over outer-eye-corner distance, for ``[68, 2]`` iBUG landmarks."""
    p = np.asarray(points, np.float64)
    gap = np.mean([np.linalg.norm(p[a] - p[b]) for a, b in INNER_LIP_PAIRS])
    return float(gap / max(np.linalg.norm(p[EYE_CORNERS[0]] - p[EYE_CORNERS[1]]), 1e-9))


def eye_opening(points: np.ndarray) -> float:
    """Eye aspect ratio averaged over both eyes (iBUG 36-41 and 42-47)."""
    p = np.asarray(points, np.float64)

    def ear(e):  # e: the six points of one eye, corner first
        return (np.linalg.norm(e[1] - e[5]) + np.linalg.norm(e[2] - e[4])) / (2 * max(np.linalg.norm(e[0] - e[3]), 1e-9))

    return float((ear(p[36:42]) + ear(p[42:48])) / 2)


# -- signals ----------------------------------------------------------------------------------
def pearson(a, b) -> float | None:
    """Pearson correlation (None when either signal is constant or shorter than 3)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3 or a.std() < 1e-12 or b.std() < 1e-12:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def speech_energy(samples: np.ndarray, num_frames: int, sample_rate: int = SAMPLE_RATE, fps: int = FPS,
                  band_hz: tuple[float, float] = (300.0, 3000.0)) -> np.ndarray:
    """``[num_frames]`` log band energy of the audio each frame owns (samples [k T, (k+1) T), T = rate / fps)."""
    hop = sample_rate // fps
    x = np.asarray(samples, np.float64)
    x = np.pad(x, (0, max(0, num_frames * hop - x.size)))[: num_frames * hop].reshape(num_frames, hop)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(hop), axis=1)) ** 2
    freqs = np.fft.rfftfreq(hop, 1.0 / sample_rate)
    band = (freqs >= band_hz[0]) & (freqs <= band_hz[1])
    return np.log(spectrum[:, band].sum(1) + 1e-8)


def lagged_correlation(mouth, energy, lag: int) -> float | None:
    """corr(mouth[k], energy[k - lag]) over the frames where both exist."""
    mouth = np.asarray(mouth, np.float64)
    energy = np.asarray(energy, np.float64)
    n = min(mouth.size, energy.size)
    if lag >= 0:
        return pearson(mouth[lag:n], energy[: n - lag])
    return pearson(mouth[: n + lag], energy[-lag:n])


def av_offset(mouth, energy, max_lag: int = 3) -> dict:
    """``{"offset": frames, "correlation": r at that lag, "correlation_at_0": r, "by_lag": {lag: r}}``.

    The offset is None when no lag gives a positive correlation (e.g. a mouth that never moves).
    """
    by_lag = {lag: lagged_correlation(mouth, energy, lag) for lag in range(-max_lag, max_lag + 1)}
    defined = {k: v for k, v in by_lag.items() if v is not None}
    if not defined:
        return {"offset": None, "correlation": None, "correlation_at_0": None, "by_lag": by_lag}
    best = max(defined, key=lambda k: (defined[k], -abs(k)))
    if defined[best] <= 0:  # no lag where mouth and sound go together: no offset to report
        return {"offset": None, "correlation": defined[best], "correlation_at_0": by_lag[0], "by_lag": by_lag}
    return {"offset": int(best), "correlation": defined[best], "correlation_at_0": by_lag[0], "by_lag": by_lag}
