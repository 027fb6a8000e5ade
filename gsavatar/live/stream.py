"""The streaming core: speech arrives a chunk at a time, frames come out at 25 per second.

One :class:`LiveAvatar` per trained run (the avatar, its extractor, the idle motion), shared by
every client; one :class:`LiveStream` per client. A stream is a timeline of 16 kHz samples that
only grows: pushed audio is appended where the timeline ends, and frame ``k`` always shows
samples ``[640 k, 640 (k + 1))``, the time base of offline rendering, so sound and picture of a
stream cannot drift apart (each :class:`LiveFrame` carries the samples it shows).

A frame can be drawn once the audio its prediction reads has arrived: ``lookahead_frames`` frames
past its own (the avatar's audio reach, :meth:`gsavatar.config.AvatarConfig.audio_reach`) plus the
feature window's few samples. A paced caller (a server at 25 frames per second) calls
:meth:`LiveStream.next_frame` when a frame is due: if its audio has not arrived, the stream
writes silence there first, so the avatar idles (mouth closed, blinks and the head loop go on)
and speech that arrives later is placed after that silence, never under frames already shown.
An unpaced caller (a file, a test) uses :meth:`LiveStream.ready_frames` and :meth:`LiveStream.finish`
and gets exactly the frames an offline render of the same samples would give.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import torch

from gsavatar.config import DriveConfig, check_frame_size
from gsavatar.data.timebase import SAMPLE_RATE, SAMPLES_PER_FRAME
from gsavatar.errors import InputError

MIN_INPUT_RATE, MAX_INPUT_RATE = 8000, 192000
"""Sample rates a client may send (resampled to 16 kHz)."""
FLOAT_PCM_PEAK = 1.5
"""Float PCM louder than this is taken for integer PCM sent as float (a 1.0 full scale clips only)."""


@dataclasses.dataclass(frozen=True)
class LiveConfig:
    """How a stream is drawn and how much it may hold."""

    size: int | None = None
    """Frame size in pixels (square); None: the size the avatar was trained at."""
    drive: DriveConfig = dataclasses.field(default_factory=lambda: DriveConfig(camera="train"))
    """Head pose loop and blinks while speaking and idling (the camera stays the tracked one)."""
    max_backlog_seconds: float = 30.0
    """Audio received but not yet shown beyond which a client is sending faster than real time:
    :meth:`LiveStream.push` refuses more (memory stays bounded)."""
    render_slots: int = 2
    """Frames drawn at once over all streams of one avatar (the CPU rasterizer uses every core)."""


@dataclasses.dataclass(frozen=True)
class LiveFrame:
    """One frame of a stream."""

    index: int
    """Frame number k (from 0 at the start of the stream)."""
    image: np.ndarray | None
    """uint8 ``[H, W, 3]``; None when the caller skipped drawing it (a paced server running late)."""
    audio: np.ndarray
    """float32 ``[640]``: the samples this frame shows, ``span`` of the stream's timeline."""
    span: tuple[int, int]
    """``(640 k, 640 (k + 1))``: sample indices of the stream's 16 kHz timeline."""
    filled: bool
    """True when some of this frame's audio is silence the stream wrote because none had arrived in time."""


class BacklogError(InputError):
    """A client sends faster than real time: the chunk is refused, the stream goes on."""


class LiveAvatar:
    """A trained avatar opened for streaming (``run``: a run directory or avatar file)."""

    def __init__(self, run: str | Path, config: LiveConfig | None = None, device: str | torch.device = "cpu"):
        from gsavatar.data.audio_features import extractor_from_description
        from gsavatar.drive import EndlessMotion
        from gsavatar.model.io import load_run
        from gsavatar.tracking.camera import scale_intrinsics

        self.config = config or LiveConfig()
        self.bundle = load_run(run, device)
        self.avatar, self.subject = self.bundle.avatar, self.bundle.subject
        audio = self.subject.audio
        self._describe = audio.extractor or {"kind": audio.kind, "options": {}}
        self.extractor = extractor_from_description(self._describe)
        self.device = torch.device(device)
        trained = self.subject.render_size
        self.size = trained if self.config.size is None else check_frame_size(self.config.size)
        self.K = scale_intrinsics(self.subject.K, self.size / trained).float().to(self.device)
        self.motion = EndlessMotion(self.subject, self.config.drive)
        self.past_frames, self.lookahead_frames = self.avatar.cfg.audio_reach()
        self.right_context = self.extractor.stream().right_context
        self._slots = threading.BoundedSemaphore(max(1, int(self.config.render_slots)))

    @property
    def lookahead_seconds(self) -> float:
        """How far past a frame's own audio its prediction reads: the latency floor."""
        return (self.lookahead_frames * SAMPLES_PER_FRAME + self.right_context) / SAMPLE_RATE

    def open(self, sample_rate: int = SAMPLE_RATE) -> "LiveStream":
        """A new stream for one client sending mono PCM at ``sample_rate``."""
        return LiveStream(self, sample_rate)

    @torch.no_grad()
    def draw(self, features: torch.Tensor, index: int, frame: int) -> np.ndarray:
        """The image of stream frame ``frame`` whose audio input is frame ``index`` of ``features``."""
        from gsavatar.imaging import to_uint8

        viewmat, pose, blink = self.motion.at(frame)
        d = self.device
        inputs = self.avatar.frame_inputs(features.to(d), index, viewmat=viewmat.to(d), K=self.K, size=self.size,
                                          blink=blink.to(d), pose=pose.to(d))
        with self._slots:
            image = self.avatar(inputs).image
        return to_uint8(image)


class _Resampler:
    """Mono float32 at ``rate`` -> 16 kHz, chunk by chunk (PyAV's stateful resampler)."""

    def __init__(self, rate: int):
        import av

        self.rate = rate
        self._av = av
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        frame = self._av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
        frame.sample_rate = self.rate
        return self._join(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        return self._join(self._resampler.resample(None))

    @staticmethod
    def _join(frames) -> np.ndarray:
        parts = [f.to_ndarray().reshape(-1) for f in frames]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def as_float_pcm(samples: np.ndarray) -> np.ndarray:
    """Mono PCM (int16, or float in [-1, 1]) -> float32; one-line :class:`InputError` otherwise."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise InputError(f"audio must be mono, one sample per value (got shape {x.shape})")
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"audio samples must be int16 or float (got {x.dtype})")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise InputError("audio holds NaN or infinite samples")
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > FLOAT_PCM_PEAK:
        raise InputError(f"float audio must lie in [-1, 1] (peak {peak:.4g}): integer samples sent as float?")
    return np.clip(x, -1.0, 1.0)


class LiveStream:
    """One client's stream (see the module docstring). Thread-safe: one thread may push while
    another draws."""

    def __init__(self, live: LiveAvatar, sample_rate: int = SAMPLE_RATE):
        if not (isinstance(sample_rate, int) and MIN_INPUT_RATE <= sample_rate <= MAX_INPUT_RATE):
            raise InputError(f"sample rate must be an integer from {MIN_INPUT_RATE} to {MAX_INPUT_RATE} Hz (got {sample_rate!r})")
        self.live = live
        self.sample_rate = sample_rate
        self._resample = None if sample_rate == SAMPLE_RATE else _Resampler(sample_rate)
        self._features = live.extractor.stream()
        self._lock = threading.RLock()
        self._timeline = np.zeros(0, np.float32)  # samples from _timeline_start on (older ones dropped)
        self._timeline_start = 0
        self._received_end = 0  # the timeline's end after the client's last chunk
        self._pending: collections.deque = collections.deque()  # (samples, arrival time) not on the timeline yet
        self._pending_samples = 0
        self._fills: collections.deque = collections.deque()  # (start, end) of silence written for late audio
        self._feats: list[torch.Tensor] = []  # per-frame features from _feats_start on
        self._feats_start = 0
        self.next_index = 0
        self.finished = False
        self.silence_written = 0  # samples of silence written for audio that had not arrived (the delay it added)
        self.received_samples = 0  # 16 kHz samples the client sent
        self.received_peak = 0.0  # the loudest of them
        self.arrivals: collections.deque = collections.deque(maxlen=100_000)  # (first timeline sample, monotonic time)
        self.latencies: collections.deque = collections.deque(maxlen=100_000)  # seconds, one per chunk shown

    # -- audio in -----------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        """Length of the timeline (16 kHz samples, silence written for late audio included)."""
        return self._timeline_start + self._timeline.size

    def backlog_seconds(self) -> float:
        """Audio received (or written as silence) that no drawn frame has shown yet."""
        return max(0, self.samples + self._pending_samples - self.next_index * SAMPLES_PER_FRAME) / SAMPLE_RATE

    def push(self, samples: np.ndarray, arrived: float | None = None) -> None:
        """Queue PCM (int16, or float in [-1, 1]; mono at the stream's rate) for the timeline.
        ``arrived``: when its first sample reached the server (``time.monotonic``; default now).

        Audio joins the timeline when a frame reads it, so where a frame is due before its audio
        has all arrived, the silence written for it goes before the queued audio: a late chunk is
        delayed whole, not cut by a gap."""
        arrived = time.monotonic() if arrived is None else arrived
        x = as_float_pcm(samples)
        if self._resample is not None:
            x = self._resample(x)
        with self._lock:
            if self.finished:
                raise InputError("the stream has ended: no more audio is taken")
            limit = self.live.config.max_backlog_seconds
            if self.backlog_seconds() + x.size / SAMPLE_RATE > limit:
                raise BacklogError(f"audio is arriving faster than real time: over {limit:g} s waiting to be shown; "
                                   "chunk dropped (send at the pace of speech)")
            if x.size:
                self._pending.append((x, arrived))
                self._pending_samples += x.size
                self.received_samples += x.size
                self.received_peak = max(self.received_peak, float(np.abs(x).max()))

    def _commit(self) -> None:
        """Put the queued audio on the timeline, in one copy (a client ahead of real time may have
        queued seconds of small chunks)."""
        if not self._pending:
            return
        at = self.samples
        for x, arrived in self._pending:
            self.arrivals.append((at, arrived))
            at += x.size
        self._append(np.concatenate([x for x, _ in self._pending]))
        self._pending.clear()
        self._pending_samples = 0
        self._received_end = self.samples

    def _append(self, x: np.ndarray) -> None:
        self._timeline = np.concatenate([self._timeline, x])
        for row in self._features.push(x):
            self._feats.append(torch.from_numpy(np.ascontiguousarray(row))[None])

    def _needed(self, k: int) -> int:
        """Timeline samples frame ``k``'s features need."""
        return (k + 1 + self.live.lookahead_frames) * SAMPLES_PER_FRAME + self._features.right_context

    # -- frames out ---------------------------------------------------------------------------
    def ready(self) -> bool:
        """Whether the next frame's audio has all arrived."""
        with self._lock:
            self._commit()
            return self._complete(self.next_index)

    def _complete(self, k: int) -> bool:
        return self._feats_start + len(self._feats) > k + self.live.lookahead_frames

    def ready_frames(self) -> list[LiveFrame]:
        """Every frame whose audio has all arrived (none filled with silence)."""
        out = []
        while self.ready():
            out.append(self._draw_next())
        return out

    def next_frame(self, draw: bool = True) -> LiveFrame:
        """The next frame, now: where its audio has not arrived, silence is written first.
        ``draw=False`` advances without drawing (its audio still comes back)."""
        with self._lock:
            k = self.next_index
            short = self._needed(k) - self.samples - self._pending_samples
            if short > 0:
                self._fills.append((self.samples, self.samples + short))
                self._append(np.zeros(short, np.float32))
                self.silence_written += short
            self._commit()
        return self._draw_next(draw)

    def end(self) -> int:
        """No more audio: returns the frame count that shows all of it (round(samples / 640), as
        offline); frames past the audio are drawn over silence, as an offline render pads its end."""
        with self._lock:
            if not self.finished:
                if self._resample is not None:
                    tail = self._resample.flush()
                    if tail.size:
                        self._pending.append((tail, time.monotonic()))
                        self._pending_samples += tail.size
                self._commit()
                self.finished = True
            return max(1, int(round(self._received_end / SAMPLES_PER_FRAME)))

    def finish(self) -> list[LiveFrame]:
        """:meth:`end`, then every frame left that shows the audio (unpaced)."""
        end_frame = self.end()
        return [self.next_frame() for _ in range(max(0, end_frame - self.next_index))]

    def _draw_next(self, draw: bool = True) -> LiveFrame:
        with self._lock:
            k = self.next_index
            first = max(0, k - self.live.past_frames)
            window = torch.cat(self._feats[first - self._feats_start: k + self.live.lookahead_frames + 1 - self._feats_start])
            start = k * SAMPLES_PER_FRAME - self._timeline_start
            audio = self._timeline[start: start + SAMPLES_PER_FRAME].copy()
            lo, hi = k * SAMPLES_PER_FRAME, (k + 1) * SAMPLES_PER_FRAME
            while self._fills and self._fills[0][1] <= lo:
                self._fills.popleft()
            filled = bool(self._fills) and self._fills[0][0] < hi
            self.next_index = k + 1
            self._forget(k + 1)
        image = self.live.draw(window, k - first, k) if draw else None
        done = time.monotonic()
        with self._lock:
            while self.arrivals and self.arrivals[0][0] < (k + 1) * SAMPLES_PER_FRAME:
                self.latencies.append(done - self.arrivals.popleft()[1])
        return LiveFrame(k, image, audio, (lo, hi), filled)

    def _forget(self, k: int) -> None:
        """Drop what no frame from ``k`` on needs (bounded memory)."""
        keep_frame = max(0, k - self.live.past_frames)
        drop = keep_frame - self._feats_start
        if drop > 0:
            del self._feats[:drop]
            self._feats_start = keep_frame
        keep_sample = k * SAMPLES_PER_FRAME
        cut = keep_sample - self._timeline_start
        if cut > 0:
            self._timeline = self._timeline[cut:].copy()
            self._timeline_start = keep_sample
