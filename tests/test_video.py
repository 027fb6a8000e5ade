"""Decoding: constant 25 fps from any frame timing, audio in sync, mp4 writing."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_preprocess_deps

require_preprocess_deps()

from gsavatar.data.video import SAMPLES_PER_FRAME, DecodeStats, decode_audio, iter_frames, probe_video, read_wav, write_wav  # noqa: E402
from gsavatar.outputs.video_writer import write_mp4  # noqa: E402


def _coded_frames(n: int, size: int = 64):
    """Frame i is uniformly grey at level 8 * i (recoverable after lossy coding)."""
    return [np.full((size, size, 3), 8 * i, np.uint8) for i in range(n)]


def _level(image) -> int:
    return int(round(float(image.mean()) / 8))


def test_variable_frame_rate_resampled_to_nearest_frame(tmp_path):
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.uniform(0.01, 0.09, size=30))
    times -= times[0]
    path = tmp_path / "vfr.mp4"
    write_mp4(path, _coded_frames(30), timestamps=times.tolist())
    stats = DecodeStats()
    out = [(k, _level(im)) for k, im in iter_frames(path, lambda f: f.to_ndarray(format="rgb24"), stats)]
    assert stats.source_frames == 30
    # Every output frame k shows the source frame whose timestamp is nearest to k / 25.
    for k, level in out:
        distances = np.abs(times - k / 25)
        best = np.flatnonzero(distances <= distances.min() + 1e-6)
        assert level in best, (k, level, best)
    # Duration is kept: the last source frame lasts one interval past its timestamp.
    end = times[-1] + (times[-1] - times[-2])
    assert abs(len(out) - end * 25) <= 1


def test_constant_rate_source_maps_one_to_one(tmp_path):
    path = tmp_path / "cfr.mp4"
    write_mp4(path, _coded_frames(25), fps=25)
    levels = [_level(im) for _, im in iter_frames(path, lambda f: f.to_ndarray(format="rgb24"))]
    assert levels == list(range(25))


def test_60fps_source_is_downsampled(tmp_path):
    path = tmp_path / "60.mp4"
    write_mp4(path, _coded_frames(30), fps=60)  # 0.5 s
    levels = [_level(im) for _, im in iter_frames(path, lambda f: f.to_ndarray(format="rgb24"))]
    assert len(levels) == 12 or len(levels) == 13
    assert levels[:5] == [round(k * 60 / 25) for k in range(5)]


def test_audio_click_lands_on_its_frame(tmp_path):
    """A click at 2.0 s in a 44.1 kHz AAC track lands at sample 2.0 * 16000 (frame 50)."""
    rate = 44100
    audio = np.zeros(int(4 * rate), np.float32)
    click = int(2.0 * rate)
    audio[click:click + 200] = 0.9
    path = tmp_path / "click.mp4"
    write_mp4(path, [np.zeros((64, 64, 3), np.uint8)] * 100, audio=audio, audio_rate=rate)
    stats = DecodeStats()
    n = sum(1 for _ in iter_frames(path, lambda f: None, stats))
    samples, seconds = decode_audio(path, stats.t0, n)
    assert samples.shape == (n * SAMPLES_PER_FRAME,)
    onset = int(np.argmax(np.abs(samples) > 0.3))
    assert abs(onset - 2.0 * 16000) <= 16 * 2, onset  # within 2 ms
    assert onset // SAMPLES_PER_FRAME == 50
    assert abs(seconds - 4.0) < 0.1


def test_probe_and_wav_round_trip(tmp_path):
    path = tmp_path / "a.mp4"
    write_mp4(path, _coded_frames(10, 32))
    info = probe_video(path)
    assert (info.width, info.height, info.has_audio) == (32, 32, False)
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    write_wav(tmp_path / "x.wav", x)
    y, rate = read_wav(tmp_path / "x.wav")
    assert rate == 16000 and np.abs(y - x).max() < 1e-4


def test_writer_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "bad.mp4"
    import av

    with pytest.raises(av.error.FFmpegError):
        write_mp4(path, [np.zeros((31, 31, 3), np.uint8)])  # odd size: H.264 yuv420p refuses
    assert list(tmp_path.iterdir()) == []
