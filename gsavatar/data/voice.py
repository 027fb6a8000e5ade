"""Another voice from the subject's own: every frequency of a recording scaled, its timing kept
(the training-time augmentation ``audio_augment.warp`` uses it), or its tempo changed, its
frequencies kept (``audio_augment.tempo``).

A phase vocoder stretches the audio to ``factor`` times its duration with its frequencies kept,
then band-limited resampling brings it back to its length, which scales every frequency by
``factor``: pitch and formants move together, as between a shorter and a longer vocal tract.
"""

from __future__ import annotations

import numpy as np
import torch

WARP_FFT = 512
"""STFT size of :func:`warp_frequencies` (32 ms at 16 kHz: resolves formants, keeps syllables sharp)."""
LOCK_BINS = 5
"""Phase locking of :func:`warp_frequencies`: a bin follows the strongest bin within +-2 (a Hann
window's main lobe is 4 bins wide)."""


def _stretch(x: torch.Tensor, rate: float) -> torch.Tensor:
    """``x`` played ``rate`` times as fast with its frequencies kept (a phase vocoder): output frame
    ``m`` is the analysis frame at ``m * rate`` (magnitudes interpolated between the two frames
    around it), and each bin's phase advances by its true frequency (read from the phase change
    between those frames) over one hop, so the frames overlap-add in phase."""
    hop = WARP_FFT // 4
    window = torch.hann_window(WARP_FFT, dtype=x.dtype)
    spec = torch.stft(x, WARP_FFT, hop, window=window, return_complex=True)  # [F, T]
    spec = torch.cat([spec, torch.zeros_like(spec[:, :1])], dim=1)  # a silent frame past the end
    steps = torch.arange(0, spec.shape[1] - 1, rate, dtype=x.dtype)
    left = steps.floor().long()
    frac = steps - left
    magnitude = (1 - frac) * spec[:, left].abs() + frac * spec[:, left + 1].abs()
    nominal = 2 * np.pi * hop * torch.arange(spec.shape[0], dtype=x.dtype)[:, None] / WARP_FFT
    advance = spec[:, left + 1].angle() - spec[:, left].angle() - nominal
    advance = nominal + torch.remainder(advance + np.pi, 2 * np.pi) - np.pi  # the true advance per hop
    phase = spec[:, :1].angle() + torch.cumsum(advance, dim=1) - advance  # frame m: the advances before it
    # Phase locking: each bin keeps its analysis phase relative to the strongest bin near it, which
    # alone carries the accumulated phase, so the bins of one partial stay in step (without it a
    # frame pair read twice sets them apart for good, and a steady tone loses up to 12 dB).
    _, peak = torch.nn.functional.max_pool1d(magnitude.T[:, None], LOCK_BINS, 1, LOCK_BINS // 2, return_indices=True)
    peak = peak[:, 0].T  # [F, M]: the bin each bin follows
    analysis = spec[:, left].angle()
    phase = phase.gather(0, peak) + analysis - analysis.gather(0, peak)
    return torch.istft(torch.polar(magnitude, phase), WARP_FFT, hop, window=window, length=round(x.numel() / rate))


def warp_frequencies(samples: np.ndarray, factor: float) -> np.ndarray:
    """``samples`` (16 kHz) with every frequency scaled by ``factor`` and the timing kept: stretched
    to ``factor`` times the duration with a phase vocoder (frequencies kept), then resampled back to
    the original length (band-limited, by FFT), which scales every frequency by ``factor``. Pitch
    and formants move together, as between a shorter and a longer vocal tract."""
    x = torch.from_numpy(np.asarray(samples, np.float32)).double()
    longer = _stretch(x, 1.0 / factor).numpy()
    spectrum = np.fft.rfft(longer)
    keep = x.numel() // 2 + 1
    spectrum = spectrum[:keep] if len(spectrum) >= keep else np.pad(spectrum, (0, keep - len(spectrum)))
    return (np.fft.irfft(spectrum, n=x.numel()) * (x.numel() / len(longer))).astype(np.float32)


def change_tempo(samples: np.ndarray, factor: float) -> np.ndarray:
    """``samples`` (16 kHz) spoken ``factor`` times as fast with their frequencies kept (a phase
    vocoder): time ``t`` of the result is time ``factor * t`` of the original, and the result is
    ``round(len(samples) / factor)`` samples long."""
    return _stretch(torch.from_numpy(np.asarray(samples, np.float32)).double(), factor).numpy().astype(np.float32)
