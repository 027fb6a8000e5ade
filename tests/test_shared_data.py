"""Preprocessing the shared real recordings (skipped when ../shared/data is absent)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA, remux, require_preprocess_deps

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "cnn2_25fps.mp4").is_file(),
                                reason=f"shared recordings not found at {SHARED_DATA}")


def speech_energy(audio: np.ndarray, num_frames: int) -> np.ndarray:
    """Log energy in 300-3000 Hz per 40 ms frame."""
    frames = audio[: num_frames * 640].reshape(num_frames, 640) * np.hanning(640)
    spectrum = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    hz = np.fft.rfftfreq(640, 1 / 16000)
    return np.log(spectrum[:, (hz >= 300) & (hz <= 3000)].sum(1) + 1e-8)


def best_lag(mouth: np.ndarray, energy: np.ndarray, max_lag: int = 5) -> tuple[int, float]:
    scores = {}
    for lag in range(-max_lag, max_lag + 1):
        a, b = (mouth[lag:], energy[: len(energy) - lag]) if lag >= 0 else (mouth[:lag], energy[-lag:])
        scores[lag] = np.corrcoef(a, b)[0, 1]
    lag = max(scores, key=scores.get)
    return lag, scores[lag]


CNN2_SECONDS = 20
"""The tests preprocess cnn2's first 20 s (500 frames), not all 71 s: the whole clip took 2 of the
suite's 13 minutes, mostly tracking, and the first 20 s measure alike (mouth/speech r 0.27 vs 0.28,
rigid RMSE 0.39 vs 0.42 px, the focal length inside the search). The whole clip's figures are
BENCHMARKS.md's (bench/bench_preprocess.py, bench/bench_tracking.py)."""


@pytest.fixture(scope="module")
def cnn2(tmp_path_factory):
    require_preprocess_deps()
    from gsavatar.config import PreprocessConfig
    from gsavatar.data.dataset import SubjectDataset
    from gsavatar.data.preprocess import preprocess

    work = tmp_path_factory.mktemp("cnn2")
    clip = work / f"cnn2_first_{CNN2_SECONDS}s.mp4"  # stream-copied: the recording's own frames and sound
    remux(SHARED_DATA / "cnn2_25fps.mp4", clip, until_s=CNN2_SECONDS)
    report = preprocess(clip, work / "subject", PreprocessConfig(size=256, audio_features=("logmel",)))
    return SubjectDataset(work / "subject"), report


def test_cnn2_every_frame_with_a_face(cnn2):
    ds, report = cnn2
    assert ds.num_frames == 500 and report["face_fraction"] == 1.0
    assert ds.manifest["split"]["test"] == [500 - 45, 500]
    assert report["peak_rss_mb"] < 3000


def test_cnn2_audio_and_mouth_in_sync(cnn2):
    """Real footage is in sync, so mouth opening vs speech energy must peak at lag 0 (+-1)."""
    ds, _ = cnn2
    lag, r = best_lag(ds.signals["mouth_open"], speech_energy(ds.audio, ds.num_frames))
    assert abs(lag) <= 1 and r > 0.15, (lag, r)


def test_cnn2_tracking_meets_the_targets(cnn2):
    """Issue targets at 512 px are rigid < 1.5 px and all < 2.5 px in under 60 s; this subject is
    at 256 px, so the pixel bars are halved. BENCHMARKS.md has the 512 px figures for the whole
    71 s (32 s of tracking on a quiet machine, bench/bench_tracking.py). The time bar is a
    regression guard for the first 20 s: 23 s (2 torch threads) to 33 s (1 thread, as after the
    suite's training) of tracking measured on the 2-core machine shared with two other jobs; the
    bar is 90 s, about 3x, because a spurious CI failure is costly. (The
    whole clip's bar was 120 s: the time is not proportional to the frames, the focal search
    costs the same from 400 frames up.)"""
    ds, report = cnn2
    metrics = ds.manifest["stages"]["tracking"]["result"]
    assert metrics["reprojection_rmse_rigid_px"] < 0.75 and metrics["reprojection_rmse_px"] < 1.25, metrics
    assert report["stages"]["tracking"]["wall_s"] < 90
    assert metrics["jitter_rotation_deg"] < 0.5 and metrics["jitter_translation_mm"] < 2.0
    tracking = ds.tracking
    assert not tracking.focal_at_search_limit  # a real head turns enough to measure perspective
    assert np.isfinite(tracking.translation).all() and (tracking.translation[:, 2] > 0).all()


def test_katiehill_preprocesses(tmp_path):
    require_preprocess_deps()
    from gsavatar.config import PreprocessConfig
    from gsavatar.data.dataset import SubjectDataset
    from gsavatar.data.preprocess import preprocess

    report = preprocess(SHARED_DATA / "katiehill_8s.mp4", tmp_path / "k", PreprocessConfig(size=256, audio_features=("logmel",)))
    ds = SubjectDataset(tmp_path / "k")
    assert ds.num_frames == 200 and report["face_fraction"] == 1.0
    assert ds.audio.shape == (200 * 640,)
