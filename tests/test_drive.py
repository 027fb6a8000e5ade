"""gsavatar.drive: looping, frame counts, camera paths, keyframe files, blinks and speech loading."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from gsavatar.data.video import write_wav
from gsavatar.drive import (
    FPS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    DriveConfig,
    SpeechFeaturizer,
    camera_path,
    frame_count,
    generated_blinks,
    load_keyframes,
    load_speech,
    pingpong,
    speech_features,
)
from gsavatar.errors import InputError
from gsavatar.model.audio import AudioSpec

CENTRE = np.array([0.01, -0.02, 0.6])  # the head centre in camera coordinates (m)


@pytest.mark.parametrize("length", [2, 7, 50])
def test_pingpong_has_no_jumps_and_covers_the_range(length):
    idx = pingpong(5 * length, length)
    assert idx[0] == 0 and np.abs(np.diff(idx)).max() <= 1
    assert set(idx.tolist()) == set(range(length))
    assert pingpong(10, 1).tolist() == [0] * 10


def test_frame_count_rounds_to_the_nearest_frame():
    assert frame_count(np.zeros(10 * SAMPLES_PER_FRAME + SAMPLES_PER_FRAME // 2 - 1)) == 10
    assert frame_count(np.zeros(10 * SAMPLES_PER_FRAME + SAMPLES_PER_FRAME // 2 + 1)) == 11
    assert frame_count(np.zeros(10 * SAMPLES_PER_FRAME)) == 10
    assert frame_count(np.zeros(0)) == 1


def _yaw_deg(mats: torch.Tensor) -> np.ndarray:
    # orbit_transform's rotation is rz @ rx @ ry: with roll 0 its first row is ry's, (cos y, 0, sin y).
    return np.degrees(np.arcsin(mats[:, 0, 2].double().numpy()))


def test_train_camera_is_identity():
    mats = camera_path(DriveConfig(camera="train"), 30, CENTRE)
    assert mats.shape == (30, 4, 4) and torch.equal(mats, torch.eye(4).expand(30, 4, 4))


def test_orbit_starts_at_identity_sweeps_30_degrees_and_keeps_the_head_centre():
    cfg = DriveConfig(camera="orbit")
    num = int(cfg.orbit_period_s * FPS)
    mats = camera_path(cfg, num, CENTRE)
    torch.testing.assert_close(mats[0], torch.eye(4), atol=1e-6, rtol=0)
    yaw = _yaw_deg(mats)
    assert yaw.max() == pytest.approx(cfg.orbit_yaw_deg, abs=0.5) and yaw.min() == pytest.approx(-cfg.orbit_yaw_deg, abs=0.5)
    assert np.abs(np.diff(yaw)).max() < 2.0  # smooth: under 2 degrees per frame
    centre = torch.tensor([*CENTRE, 1.0], dtype=torch.float32)
    moved = torch.einsum("nij,j->ni", mats, centre)[:, :3]
    torch.testing.assert_close(moved, centre[:3].expand(num, 3), atol=1e-5, rtol=0)


def test_zoom_brings_the_head_closer_by_the_zoom_factor():
    cfg = DriveConfig(camera="zoom", zoom_factor=1.6)
    mats = camera_path(cfg, 100, CENTRE).double()
    centre = torch.tensor([*CENTRE, 1.0], dtype=torch.float64)
    depth = torch.einsum("nij,j->ni", mats, centre)[:, 2].numpy()
    assert depth[0] == pytest.approx(CENTRE[2], rel=1e-6)
    assert depth[-1] == pytest.approx(CENTRE[2] / cfg.zoom_factor, rel=1e-5)
    assert np.all(np.diff(depth) <= 1e-9)  # monotonic push-in
    # Projected size of the head scales as 1 / depth: 1.6x larger at the end.
    assert depth[0] / depth[-1] == pytest.approx(1.6, rel=1e-5)


def test_keyframe_file_interpolates(tmp_path):
    path = tmp_path / "path.json"
    path.write_text(json.dumps({"keyframes": [{"t": 0, "yaw": 0}, {"t": 1.0, "yaw": 20, "zoom": 2}, {"t": 2.0, "yaw": -10}]}))
    mats = camera_path(DriveConfig(camera=str(path)), 51, CENTRE)
    yaw = _yaw_deg(mats)
    assert yaw[0] == pytest.approx(0, abs=1e-4) and yaw[25] == pytest.approx(20, abs=1e-3)
    assert yaw[50] == pytest.approx(-10, abs=1e-3) and yaw[12] == pytest.approx(20 * 12 / 25, abs=1e-3)
    centre = torch.tensor([*CENTRE, 1.0], dtype=torch.float32)
    assert float((mats[25] @ centre)[2]) == pytest.approx(CENTRE[2] / 2, rel=1e-5)  # zoom 2 halves the distance


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not a camera path"),
    ('{"keyframes": [{"yaw": 10}]}', "is not a camera path"),
    ('{"frames": []}', "is not a camera path"),
    ('{"keyframes": []}', "has no keyframes"),
    ('{"keyframes": [{"t": 1}, {"t": 1}]}', "times must increase"),
    ('{"keyframes": [{"t": 0, "zoom": 0}]}', "zoom must be a finite number >= 0.05"),
    ('{"keyframes": [{"t": "soon"}]}', "is not a camera path"),
])
def test_bad_keyframe_files_are_one_line_input_errors(text, message, tmp_path):
    path = tmp_path / "cam.json"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        load_keyframes(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_keyframe_file(tmp_path):
    with pytest.raises(InputError, match="no such camera path file"):
        load_keyframes(tmp_path / "none.json")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_generated_blinks_have_a_human_rate(seed):
    num = 60 * FPS
    blink = generated_blinks(num, np.random.default_rng(seed))
    assert blink.shape == (num,) and blink.min() >= 0 and blink.max() <= 1
    closed = blink > 0.5
    blinks = int(np.sum(closed[1:] & ~closed[:-1]) + closed[0])
    assert 8 <= blinks <= 30, blinks  # people blink about 10 to 25 times a minute
    starts = np.flatnonzero(closed[1:] & ~closed[:-1])
    assert np.all(np.diff(starts) >= 1.5 * FPS - 2)  # never two blinks within 1.5 s
    lengths = np.diff(np.flatnonzero(np.diff(np.r_[0, closed.astype(int), 0])))[::2]
    assert lengths.max() <= 0.4 * FPS  # short: under 0.4 s closed


def test_load_speech_resamples_to_16k(tmp_path):
    path = tmp_path / "speech.wav"
    write_wav(path, 0.3 * np.sin(2 * np.pi * 200 * np.arange(22050 * 2) / 22050), rate=22050)
    samples = load_speech(path)
    assert samples.dtype == np.float32 and abs(len(samples) - 32000) <= 16
    assert frame_count(samples) == 50 and np.abs(samples).max() == pytest.approx(0.3, abs=0.02)


def test_load_speech_errors(tmp_path):
    from gsavatar.outputs.video_writer import write_mp4

    with pytest.raises(InputError, match="no such audio file"):
        load_speech(tmp_path / "missing.wav")
    silent = write_mp4(tmp_path / "silent.mp4", [np.zeros((32, 32, 3), np.uint8)] * 10)
    with pytest.raises(InputError, match="has no audio stream"):
        load_speech(silent)
    short = tmp_path / "short.wav"
    write_wav(short, np.zeros(1600), rate=16000)  # 0.1 s
    with pytest.raises(InputError, match="at least"):
        load_speech(short)
    long = tmp_path / "long.wav"
    write_wav(long, np.zeros(16000 * 5), rate=16000)
    with pytest.raises(InputError, match="limit") as e:
        load_speech(long, max_seconds=2.0)
    assert "\n" not in str(e.value)
    assert math.isclose(len(load_speech(long, max_seconds=10.0)) / 16000, 5.0)


def test_frame_inputs_index_copies_made_once_per_device():
    """inputs() gives each frame's slice of the sequence (audio window with replicated edges) and
    copies the sequence to a device once, not per frame; a replaced sequence gets its own copies."""
    import dataclasses
    import types
    from types import SimpleNamespace

    from gsavatar.config import AvatarConfig
    from gsavatar.drive import DriveSequence
    from gsavatar.model.avatar import Avatar

    g = torch.Generator().manual_seed(0)
    n = 6
    seq = DriveSequence(torch.randn(n, 2, 5, generator=g), torch.randn(n, 4, 4, generator=g), torch.randn(n, 6, generator=g),
                        torch.rand(n, generator=g), torch.randn(n, 4, 4, generator=g), torch.eye(3), 32)
    # The avatar's own input builders on a stand-in with a radius-1 window over 3 neighbours.
    cfg = SimpleNamespace(cfg=AvatarConfig(audio_window_radius=1, audio_smoothing_frames=3))
    cfg.audio_input = types.MethodType(Avatar.audio_input, cfg)
    cfg.frame_inputs = types.MethodType(Avatar.frame_inputs, cfg)
    inp = seq.inputs(0, cfg)
    assert torch.equal(inp.audio[0, 0], seq.audio[0]) and torch.equal(inp.audio[0, 2], seq.audio[0])  # frames -1, -2 -> 0
    assert torch.equal(inp.audio[2, 2], seq.audio[2]) and inp.audio.shape == (3, 3, 2, 5)
    assert torch.equal(inp.viewmat, seq.viewmats[0]) and torch.equal(inp.pose, seq.poses[0])
    assert torch.equal(inp.blink, seq.blink[0]) and torch.equal(inp.camera, seq.cameras[0])
    own = torch.full((4, 4), 2.0)
    assert torch.equal(seq.inputs(5, cfg, camera=own).camera, own)
    for k in range(n):  # another device: one copy of the sequence serves every frame
        meta = seq.inputs(k, cfg, device="meta")
        assert meta.audio.device.type == "meta" and meta.viewmat.device.type == "meta"
    assert seq.on("meta") is seq.on("meta") and set(seq._copies) == {"cpu", "meta"}
    assert seq.inputs(1, cfg, camera=own, device="meta").camera.device.type == "meta"
    other = dataclasses.replace(seq, viewmats=seq.viewmats + 1)
    assert torch.equal(other.inputs(3, cfg).viewmat, seq.viewmats[3] + 1)


def test_speech_featurizer_builds_the_extractor_once_and_matches_speech_features(monkeypatch):
    """The viewer keeps one SpeechFeaturizer: its extractor is built on first use only, and its
    features are exactly those of a fresh extractor; a shape the avatar was not trained on is an
    InputError naming both shapes."""
    import gsavatar.data.audio_features as af

    builds = []
    real = af.extractor_from_description

    def counting(description, **run):
        builds.append(description["kind"])
        return real(description, **run)

    monkeypatch.setattr(af, "extractor_from_description", counting)
    description = {"kind": "logmel", "options": {}}
    probe = real(description)
    subject = AudioSpec(kind="logmel", extractor=description, feature_dim=probe.dim, steps_per_frame=probe.steps_per_frame)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(int(s * SAMPLE_RATE)).astype(np.float32) * 0.1 for s in (1.0, 2.3)]
    featurizer = SpeechFeaturizer(subject)
    kept = [featurizer(c) for c in clips]
    assert builds == ["logmel"]
    assert [len(f) for f in kept] == [frame_count(c) for c in clips]
    for clip, feats in zip(clips, kept):
        assert torch.equal(feats, speech_features(subject, clip))
    assert builds == ["logmel"] * 3  # speech_features builds its own each time
    with pytest.raises(InputError, match=r"gives features \(\d+, \d+\), the avatar was trained on \(\d+, 999\)"):
        SpeechFeaturizer(dataclasses.replace(subject, feature_dim=999))(clips[0])
