"""Preprocessing the shared real recordings (skipped when ../shared/data is absent)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SHARED_DATA, require_preprocess_deps

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


@pytest.fixture(scope="module")
def cnn2(tmp_path_factory):
    require_preprocess_deps()
    from gsavatar.config import PreprocessConfig
    from gsavatar.data.dataset import SubjectDataset
    from gsavatar.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("cnn2") / "subject"
    report = preprocess(SHARED_DATA / "cnn2_25fps.mp4", out, PreprocessConfig(size=256, audio_features=("logmel",)))
    return SubjectDataset(out), report


def test_cnn2_every_frame_with_a_face(cnn2):
    ds, report = cnn2
    assert ds.num_frames == 1779 and report["face_fraction"] == 1.0
    assert ds.manifest["split"]["test"] == [1779 - 162, 1779]
    assert report["peak_rss_mb"] < 3000


def test_cnn2_audio_and_mouth_in_sync(cnn2):
    """Real footage is in sync, so mouth opening vs speech energy must peak at lag 0 (+-1)."""
    ds, _ = cnn2
    lag, r = best_lag(ds.signals["mouth_open"], speech_energy(ds.audio, ds.num_frames))
    assert abs(lag) <= 1 and r > 0.15, (lag, r)


def test_cnn2_tracking_meets_the_targets(cnn2):
    """Issue targets at 512 px are rigid < 1.5 px and all < 2.5 px in under 60 s; this subject is
    at 256 px, so the pixel bars are halved. BENCHMARKS.md has the 512 px figures (32 s of
    tracking on a quiet machine, bench/bench_tracking.py). Inside the suite the 2-core machine is
    shared with the other tests (61.8 s seen once), so the time bar here is a 2x regression guard."""
    ds, report = cnn2
    metrics = ds.manifest["stages"]["tracking"]["result"]
    assert metrics["reprojection_rmse_rigid_px"] < 0.75 and metrics["reprojection_rmse_px"] < 1.25, metrics
    assert report["stages"]["tracking"]["wall_s"] < 120
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
