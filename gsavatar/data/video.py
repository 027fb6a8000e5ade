"""Decoding through PyAV: probe, constant-25-fps frame stream, 16 kHz mono audio in sync.

Time base. Output frame ``k`` shows the scene at ``t0 + k / 25`` seconds, where ``t0`` is the
presentation time of the first decoded video frame. Audio sample ``i`` of the 16 kHz track
is the sound at ``t0 + i / 16000``: audio that starts before ``t0`` is cut, audio that starts
after it is preceded by silence, and the track is cut or padded to exactly
``num_frames * 640`` samples. So frame ``k`` owns samples ``[640 k, 640 (k + 1))`` whatever the
source's frame rate (variable frame rate included) or audio start offset.

Frame resampling picks, for each output time, the source frame whose presentation time is
nearest (an exact tie goes to the later frame), streaming: no more than two decoded frames are held.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gsavatar.data.timebase import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: F401 (re-exported)
from gsavatar.errors import InputError


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a first look at the container tells (before decoding every frame)."""

    path: str
    width: int
    height: int
    duration_s: float  # declared duration of the video stream (container metadata)
    has_audio: bool
    video_codec: str
    audio_codec: str | None
    average_fps: float | None


def _open(path: str | Path):
    import av

    try:
        return av.open(str(path))
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{Path(path).name} is not a readable video file ({_short(e)})") from None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:160]


def probe_video(path: str | Path) -> VideoInfo:
    """Open ``path`` and describe its streams; raise InputError for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    with _open(path) as container:
        if not container.streams.video:
            raise InputError(f"{path.name} has no video stream")
        v = container.streams.video[0]
        if not v.codec_context or not v.codec_context.width:
            raise InputError(f"{path.name} has a video stream that cannot be decoded")
        duration = None
        if v.duration is not None and v.time_base is not None:
            duration = float(v.duration * v.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6
        a = container.streams.audio[0] if container.streams.audio else None
        fps = float(v.average_rate) if v.average_rate else None
        return VideoInfo(
            path=str(path),
            width=int(v.codec_context.width),
            height=int(v.codec_context.height),
            duration_s=float(duration) if duration else 0.0,
            has_audio=a is not None,
            video_codec=v.codec_context.name,
            audio_codec=a.codec_context.name if a is not None else None,
            average_fps=fps,
        )


@dataclasses.dataclass
class DecodeStats:
    """Filled in while frames are streamed, read it once the iterator is exhausted."""

    t0: float | None = None  # presentation time of the first decoded frame (s)
    source_frames: int = 0
    output_frames: int = 0
    decoded_duration_s: float = 0.0
    errors: str | None = None  # first decode error, if decoding stopped early


def iter_frames(
    path: str | Path,
    transform: Callable[[object], np.ndarray],
    stats: DecodeStats | None = None,
    max_frames: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(k, image)`` for output frames at exactly 25 fps.

    ``transform`` maps a PyAV ``VideoFrame`` to the array to yield (for example a cropped,
    resized RGB image); it runs once per *source* frame that is used, so a 60 fps source is
    not converted twice per output frame. Decoding stops quietly at the first corrupt packet
    and the error is recorded in ``stats.errors`` (callers decide whether that is fatal).
    """
    import av

    stats = stats if stats is not None else DecodeStats()
    dt = 1.0 / FPS
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        prev_time: float | None = None
        prev_frame = None
        prev_image: np.ndarray | None = None
        k = 0
        last_duration = None
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                t = float(frame.time)
                if stats.t0 is None:
                    stats.t0 = t
                if prev_time is not None and t <= prev_time:
                    continue  # duplicate or out-of-order timestamp: keep the first
                stats.source_frames += 1
                if prev_time is not None:
                    last_duration = t - prev_time
                    midpoint = 0.5 * (prev_time + t)
                    # Every output time before the midpoint is nearest to the previous frame.
                    while stats.t0 + k * dt < midpoint - 1e-9:
                        if prev_image is None:
                            prev_image = transform(prev_frame)
                        yield k, prev_image
                        k += 1
                        if max_frames is not None and k >= max_frames:
                            stats.output_frames = k
                            return
                prev_time, prev_frame, prev_image = t, frame, None
        except av.error.FFmpegError as e:
            stats.errors = _short(e)
        if prev_frame is None:
            return
        # The last frame lasts one source frame interval (or one output frame if unknown).
        if frame_duration := getattr(prev_frame, "duration", None):
            last_duration = float(frame_duration * prev_frame.time_base)
        end = prev_time + (last_duration if last_duration else dt)
        stats.decoded_duration_s = end - stats.t0
        while stats.t0 + k * dt < end - 0.5 * dt:
            if prev_image is None:
                prev_image = transform(prev_frame)
            yield k, prev_image
            k += 1
            if max_frames is not None and k >= max_frames:
                break
        stats.output_frames = k


def decode_audio(path: str | Path, t0: float, num_frames: int) -> tuple[np.ndarray, float]:
    """Decode the first audio stream to 16 kHz mono float32, aligned to video time ``t0``.

    Returns ``(samples, audio_seconds)`` where ``samples`` has exactly ``num_frames * 640``
    values and ``audio_seconds`` is how much real audio the file held (before padding).
    """
    import av

    chunks: list[np.ndarray] = []
    start: float | None = None
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    with _open(path) as container:
        if not container.streams.audio:
            raise InputError(f"{Path(path).name} has no audio track (an audio-driven avatar needs speech)")
        stream = container.streams.audio[0]
        try:
            for frame in container.decode(stream):
                if start is None and frame.time is not None:
                    start = float(frame.time)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError:
            pass  # a truncated tail: keep what decoded; the caller checks durations
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    real_seconds = audio.size / SAMPLE_RATE
    offset = int(round(((start or 0.0) - t0) * SAMPLE_RATE))
    if offset > 0:
        audio = np.concatenate([np.zeros(offset, np.float32), audio])
    elif offset < 0:
        audio = audio[-offset:]
    n = num_frames * SAMPLES_PER_FRAME
    if audio.size < n:
        audio = np.pad(audio, (0, n - audio.size))
    return np.clip(audio[:n], -1.0, 1.0), real_seconds


def write_wav(path: str | Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """Write float samples in [-1, 1] as 16-bit PCM mono WAV (standard library only)."""
    import wave

    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV written by :func:`write_wav` as float32 mono."""
    import wave

    with wave.open(str(path), "rb") as w:
        rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        data = w.readframes(w.getnframes())
    if width != 2:
        raise InputError(f"{path}: only 16-bit PCM WAV is supported here")
    x = np.frombuffer(data, "<i2").astype(np.float32) / 32767.0
    return x.reshape(-1, channels).mean(axis=1), rate
