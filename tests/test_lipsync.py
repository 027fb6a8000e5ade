"""Lip-sync without rendering (gsavatar.eval.lipsync): the truth signal, the avatar's predicted
lip gap, and the drive and silence scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tone

from gsavatar.eval import lipsync as L


@pytest.fixture(scope="module")
def data(demo_subject):
    from gsavatar.data.frames import SubjectFrames

    return SubjectFrames(demo_subject[0], 128)


def test_tracked_lip_gap_follows_the_true_mouth(data, demo_video):
    # The synthetic subject's mouth opening is known; the tracked 3-D inner-lip gap must follow it
    # (the 2-D landmark signal of preprocessing does: tests/test_preprocess.py).
    gaps = data.lip_gaps()
    assert gaps.shape == (data.num_frames,) and np.isfinite(gaps).all()
    r = np.corrcoef(gaps, np.asarray(demo_video.mouth_open_px))[0, 1]
    assert r > 0.9, f"tracked lip gap against the true opening: r = {r:.3f}"
    mouth = L.mouth_range(data)
    assert 0 <= mouth.rest < mouth.open
    np.testing.assert_allclose(mouth.opening([mouth.rest, mouth.open]), [0.0, 1.0], atol=1e-12)


def test_avatar_lip_gap_is_the_face_field_at_the_lips_and_follows_the_audio(trained, data, demo_video):
    from gsavatar.model.io import load_run

    avatar = load_run(trained[1]).avatar
    lips = L.canonical_lips(data)
    test = np.asarray(data.test_indices)
    gaps = L.avatar_lip_gaps(avatar, lips, data.audio, data.blink, test)
    # The same points through the uncached path the trainer uses (face_offsets): the canonical
    # shortcut changes only the rounding of the first layer's sum (float32, ~1e-6 relative of
    # offsets of a few millimetres).
    for j, k in enumerate(test[:5]):
        inputs = data.inputs(int(k), avatar)
        with torch.no_grad():
            offsets, _, _ = avatar.face_offsets(lips, inputs)
        points = lips + offsets * avatar.face_deformer.position_scale
        assert abs(gaps[j] - float((points[0] - points[1]).norm())) < 1e-6
    truth = np.asarray(demo_video.mouth_open_px)[test]
    assert L.timing(gaps, truth).r_at_0 > 0.8
    # Audio shuffled in time: the prediction no longer follows the mouth.
    perm = torch.from_numpy(np.random.default_rng(0).permutation(data.num_frames))
    shuffled = L.avatar_lip_gaps(avatar, lips, data.audio[perm], data.blink, test)
    assert (L.timing(shuffled, truth).r_at_0 or 0.0) < 0.5


def test_silent_frames_keep_the_models_reach_from_sound():
    second = 16000
    samples = np.concatenate([tone(1.0), np.zeros(2 * second, np.float32), tone(1.0)])
    quiet = L.silent_frames(samples, 100, margin=3)
    # Frames 25..74 are silent; with 3 frames of reach, 28..71 hear nothing.
    assert np.flatnonzero(quiet).tolist() == list(range(28, 72))
    assert not L.silent_frames(samples, 100, margin=30).any()


def test_score_drive_times_the_speech_and_measures_the_silence():
    rng = np.random.default_rng(0)
    mouth = L.MouthRange(rest=0.001, open=0.009)
    speech = (0.3 * rng.standard_normal(16000 * 4)).astype(np.float32)
    speech *= np.repeat(rng.uniform(0, 1, 100), 640).astype(np.float32)  # loud and quiet frames
    samples = np.concatenate([speech, np.zeros(16000 * 2, np.float32)])
    from gsavatar.eval.metrics import speech_energy

    energy = speech_energy(samples, 150)
    follows = np.concatenate([0.001 + 0.0005 * (energy[:100] - energy[:100].min()), np.full(50, 0.001)])
    score = L.score_drive(follows, samples, mouth, margin=4, timed_frames=100)
    assert score.timing.lag == 0 and score.timing.r > 0.99 and score.timing.frames == 100
    assert score.silent_frames == 46 and score.silence_opening == pytest.approx(0.0, abs=1e-12)
    gaping = follows.copy()
    gaping[100:] = 0.009  # wide open through the silence
    assert L.score_drive(gaping, samples, mouth, margin=4, timed_frames=100).silence_opening == pytest.approx(1.0)
