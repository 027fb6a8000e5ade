"""Training building blocks: presets, losses, sampler, densification surgery, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gsavatar.config import TrainConfig, available_presets, config_from_dict, load_preset
from gsavatar.errors import InputError


def test_presets_load_and_typos_are_refused(tmp_path):
    assert {"cpu-tiny", "default"} <= set(available_presets())
    tiny = load_preset("cpu-tiny")
    assert tiny.render_size == 128 and [s.name for s in tiny.stages] == ["mouth", "face", "fuse", "torso"]
    assert tiny.stages[1].static_iterations > 0 and tiny.avatar.face.hash.log2_table_size == 14
    assert load_preset("default") == TrainConfig()
    bad = tmp_path / "bad.toml"
    bad.write_text("[avatar.face]\nnum_gausians = 3\n")
    with pytest.raises(InputError, match="num_gausians"):
        load_preset(str(bad))
    with pytest.raises(InputError, match="unknown preset 'nope'.*cpu-tiny"):
        load_preset("nope")
    # A config survives the dict round trip that checkpoints use.
    import dataclasses
    import json

    assert config_from_dict(TrainConfig, json.loads(json.dumps(dataclasses.asdict(tiny)))) == tiny


def test_psnr_of_known_noise_and_ssim_of_known_images():
    from gsavatar.imaging import psnr, ssim_map

    g = torch.Generator().manual_seed(0)
    a = torch.full((64, 64, 3), 0.5)
    noise = 0.05 * torch.randn(64, 64, 3, generator=g)
    expected = 10 * math.log10(1 / float((noise ** 2).mean()))
    assert abs(psnr(a + noise, a) - expected) < 1e-4
    assert abs(psnr(a + noise, a) - 26.02) < 0.2  # sigma 0.05 -> 26.0 dB
    assert float(ssim_map(a + noise, a + noise).min()) > 0.9999
    # Constant images: only the luminance term remains, (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    b = torch.full((32, 32, 3), 0.3)
    c1 = 0.01 ** 2
    want = (2 * 0.5 * 0.3 + c1) / (0.25 + 0.09 + c1)
    assert abs(float(ssim_map(a[:32, :32], b)[16, 16]) - want) < 1e-4  # float32 E[x^2] - E[x]^2 is not exactly 0


def test_curriculum_slides_from_closed_to_open_mouths():
    from gsavatar.train.sampler import FrameSampler

    mouth = np.linspace(0, 1, 100)
    blink = np.random.default_rng(0).random(100)
    s = FrameSampler(np.arange(100), mouth, blink)
    rng = np.random.default_rng(0)
    early = [s.sample(rng, "mouth_open", 0.0) for _ in range(200)]
    late_mouth = [s.sample(rng, "mouth_open", 0.39) for _ in range(200)]
    assert max(mouth[early]) <= 0.31 and min(mouth[late_mouth]) >= 0.65
    blink_phase = [s.sample(rng, "mouth_open", 0.41) for _ in range(200)]
    assert max(blink[blink_phase]) <= np.sort(blink)[40]  # window start 5% of the way up
    uniform = [s.sample(rng, None, 0.0) for _ in range(2000)]
    assert len(set(uniform)) > 95
    with pytest.raises(ValueError, match="unknown curriculum"):
        s.sample(rng, "smile", 0.0)


def _gaussians(n=50):
    from gsavatar.model.gaussians import GaussianSet

    g = torch.Generator().manual_seed(0)
    return GaussianSet(torch.randn(n, 3, generator=g) * 0.05, torch.rand(n, 3, generator=g), 0.004, 0.5, 2)


def test_densification_clones_splits_prunes_and_keeps_optimizer_state_aligned():
    from gsavatar.config import DensifyConfig
    from gsavatar.model.gaussians import PARAM_NAMES
    from gsavatar.train.strategy import DensifyStrategy

    gs = _gaussians(50)
    with torch.no_grad():
        gs.params["log_scales"][:10] = math.log(0.02)  # big: split when their gradient is high
        gs.params["opacity_logits"][45:] = -10  # nearly transparent: pruned
    opt = torch.optim.Adam([{"params": [gs.params[n]], "lr": 1e-3} for n in PARAM_NAMES])
    # One optimiser step so Adam has moments to carry through the surgery.
    sum((p ** 2).sum() for p in gs.params.values()).backward()
    opt.step()
    strategy = DensifyStrategy(DensifyConfig(grad_threshold=0.5, split_scale=0.01, prune_opacity=0.005), max_gaussians=1000)
    state = strategy.initial_state(50, "cpu")
    state["grad2d"][:5] = 1.0  # big + high gradient -> split
    state["grad2d"][20:30] = 1.0  # small + high gradient -> clone
    state["count"][:] = 1
    means_before = gs.means.detach().clone()
    summary = strategy.densify_and_prune(state, gs, opt, torch.Generator().manual_seed(1))
    assert summary["cloned"] == 10 and summary["split"] == 5 and summary["pruned"] == 5
    assert len(gs) == 50 + 10 + 2 * 5 - 5 - 5 == summary["total"]
    for group in opt.param_groups:  # every parameter and its moments have the new length
        p = group["params"][0]
        assert p.shape[0] == len(gs) and opt.state[p]["exp_avg"].shape == p.shape
        assert any(p is q for q in gs.params.values())
    # Split children sit near their parent, at 1/1.6 of its scale.
    children = gs.means.detach()[-10:]
    parents = means_before[:5].repeat(2, 1)
    assert (children - parents).norm(dim=1).max() < 0.2
    # One Adam step of 1e-3 moved them.
    assert torch.allclose(gs.log_scales.detach()[-10:], torch.full((10, 3), math.log(0.02 / 1.6)), atol=3e-3)
    # The budget caps growth.
    capped = DensifyStrategy(DensifyConfig(grad_threshold=0.5), max_gaussians=len(gs) + 3)
    st = capped.initial_state(len(gs), "cpu")
    st["grad2d"][:] = 1.0
    st["count"][:] = 1
    assert capped.densify_and_prune(st, gs, opt, torch.Generator())["total"] <= len(gs) + 3


def test_checkpoint_round_trip_is_typed_atomic_and_weights_only(tmp_path):
    from gsavatar.model.io import Checkpoint, Progress, load_checkpoint, save_checkpoint

    gen = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(5)
    ck = Checkpoint(config={"a": [1, 2]}, subject={"K": torch.eye(3)}, model={"w": torch.arange(4.0)},
                    progress=Progress(2, 7, 99, 1.5, ["mouth", "face"]),
                    rng={"torch": gen.get_state(), "numpy": rng.bit_generator.state})
    path = tmp_path / "c.pt"
    save_checkpoint(ck, path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
    back = load_checkpoint(path)
    assert isinstance(back.progress, Progress) and back.progress.completed_stages == ["mouth", "face"]
    assert torch.equal(back.model["w"], torch.arange(4.0))
    r2 = np.random.default_rng()
    r2.bit_generator.state = back.rng["numpy"]
    assert r2.integers(1 << 30) == rng.integers(1 << 30)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(InputError, match="not a readable gsavatar checkpoint"):
        load_checkpoint(path)
    # A pickle that is not plain data is refused by weights_only loading.
    torch.save({"x": object}, path)
    with pytest.raises(InputError):
        load_checkpoint(path)


def test_densify_schedule_runs_densification_and_opacity_reset_on_their_own_periods():
    from gsavatar.config import DensifyConfig
    from gsavatar.model.gaussians import PARAM_NAMES
    from gsavatar.train.strategy import DensifyStrategy

    gs = _gaussians(20)
    opt = torch.optim.Adam([{"params": [gs.params[n]], "lr": 1e-3} for n in PARAM_NAMES])
    s = DensifyStrategy(DensifyConfig(start=2, every=2, reset_opacity_every=4, grad_threshold=1e9, stop_fraction=0.5),
                        max_gaussians=100)
    state = s.initial_state(len(gs), "cpu")
    events = {}
    for step in range(12):
        means2d = torch.zeros(len(gs), 2, requires_grad=True)
        means2d.grad = torch.ones(len(gs), 2)
        out = s.after_backward(state, gs, opt, means2d, torch.ones(len(gs)), 64, 64, step, 12, torch.Generator())
        if out:
            events[step] = out
    # Densify at 2 and 4 (every 2 from 2, before stop = 6); the reset at 4 coincides with densification.
    assert sorted(events) == [2, 4] and events[4].get("opacity_reset") and "opacity_reset" not in events[2]
    assert float(gs.opacities.detach().max()) <= 0.0101


@pytest.mark.parametrize("toml, message", [
    ("[[stages]]\nname = 'face'\niterations = 5\ncurriculum = 'smile'\n", "unknown curriculum 'smile'"),
    ("[[stages]]\nname = 'hair'\niterations = 5\n", "unknown stage 'hair'"),
    ("log_every = 0\n", "log_every must be at least 1"),
    ("[densify]\nevery = 0\n", "densify.every"),
    ("[loss]\nsilence_every = -1\n", "loss.silence_every must be 0"),
    ("[avatar.face.hash]\nnum_levels = 0\n", "HashGridConfig.num_levels must be an integer >= 1"),
    ("[[stages]]\nname = 'face'\n", "preset"),
])
def test_preset_values_that_would_fail_late_are_refused_up_front(tmp_path, toml, message):
    path = tmp_path / "p.toml"
    path.write_text(toml)
    with pytest.raises(InputError, match=message):
        load_preset(str(path))


@pytest.fixture()
def caller_threads():
    """Puts torch on a thread count no preset uses (1 for the CPU presets), and back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def test_training_gives_back_the_callers_thread_count_even_when_it_fails(tmp_path, caller_threads):
    from gsavatar.train.trainer import Trainer, train

    cfg = load_preset("cpu-tiny")
    assert cfg.cpu_threads == 1
    (tmp_path / "subject").mkdir()
    with pytest.raises(InputError):  # the trainer has set one thread by the time the subject is read
        Trainer(cfg, tmp_path / "subject", tmp_path / "run", show_progress=False)
    assert torch.get_num_threads() == 1, "the trainer no longer sets the preset's thread count"
    torch.set_num_threads(caller_threads)
    with pytest.raises(InputError):
        train(tmp_path / "subject", tmp_path / "run", cfg, show_progress=False)
    assert torch.get_num_threads() == caller_threads


def test_motion_stage_fits_the_tracked_landmark_motion_and_touches_nothing_else(demo_subject, tmp_path):
    """The motion stage trains the face net on the tracked landmark motion alone (nothing is
    rendered): the landmark error over the training frames falls well below the untrained net's,
    while every Gaussian and the other branches' nets keep their initial values."""
    import dataclasses

    from gsavatar.config import StageConfig
    from gsavatar.train.trainer import Trainer

    cfg = dataclasses.replace(load_preset("cpu-tiny"), stages=[StageConfig("motion", 300, densify=False)],
                              eval_frames=0).validate()

    def landmark_error(trainer) -> float:
        frames = [int(i) for i in trainer.data.train_indices[::3]]
        with torch.no_grad():
            return float(np.mean([float(trainer._landmark_loss(trainer.data.inputs(i, trainer.avatar),
                                                               trainer.data.landmark_offsets(i)))
                                  for i in frames]))

    initial = Trainer(cfg, demo_subject[0], tmp_path / "unused", show_progress=False)
    initial._fresh()  # what run() starts from (same seed)
    trained = Trainer(cfg, demo_subject[0], tmp_path / "run", show_progress=False)
    trained.run()
    before, after = landmark_error(initial), landmark_error(trained)
    assert after < 0.5 * before, (before, after)
    start, end = initial.avatar.state_dict(), trained.avatar.state_dict()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed and all(k.startswith("face_deformer.") for k in changed), sorted(changed)[:5]
    assert trained.history[-1]["psnr"] is None and trained.history[-1]["stage"] == "motion"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "motion it 300: loss" in log and "tracked landmark motion only" in log


def test_silent_landmark_steps_teach_the_resting_mouth_for_silence(demo_subject, tmp_path):
    """With landmark steps that hear digital silence and are asked for the resting mouth, the face
    net learns that mapping and the lips close in silence. (The synthetic subject's mouth rests
    closed often, so a net that never heard silence is not far off: measured 4.1e-4 cm^2 against
    1.7e-4 with the steps; the bound asks for a clear gain, not that ratio.)"""
    import dataclasses

    from gsavatar.config import StageConfig
    from gsavatar.eval import lipsync
    from gsavatar.train.trainer import Trainer

    def trained(every: int) -> Trainer:
        base = load_preset("cpu-tiny")
        cfg = dataclasses.replace(base, stages=[StageConfig("motion", 400, densify=False)], eval_frames=0,
                                  loss=dataclasses.replace(base.loss, silence_every=every)).validate()
        trainer = Trainer(cfg, demo_subject[0], tmp_path / f"run{every}", show_progress=False)
        trainer.run()
        return trainer

    def silence_error(trainer: Trainer) -> float:
        silence = trainer.silence
        audio = trainer.avatar.audio_input(silence.features, len(silence.features) // 2)
        inputs = dataclasses.replace(trainer.data.inputs(0, trainer.avatar), audio=audio)
        with torch.no_grad():
            return float(trainer._landmark_loss(inputs, silence.offsets))

    with_silence, without = trained(4), trained(0)
    assert without.silence is None and with_silence.silence is not None
    without.silence = with_silence.silence  # the same example, to measure the net that never heard it
    assert silence_error(with_silence) < 0.7 * silence_error(without), (silence_error(with_silence), silence_error(without))
    data = with_silence.data
    gaps = lipsync.avatar_lip_gaps(with_silence.avatar, lipsync.canonical_lips(data), with_silence.silence.features)
    assert lipsync.mouth_range(data).opening(gaps).mean() < 0.2


def test_training_without_a_working_extractor_warns_and_trains_without_silent_steps(demo_subject, tmp_path,
                                                                                   monkeypatch, capsys):
    import dataclasses

    from gsavatar.config import StageConfig
    from gsavatar.train import trainer as trainer_module

    def unavailable(data):
        raise InputError("the whisper extractor needs faster-whisper: pip install 'gsavatar[audio]'")

    monkeypatch.setattr(trainer_module, "silence_example", unavailable)
    cfg = dataclasses.replace(load_preset("cpu-tiny"), stages=[StageConfig("motion", 20, densify=False)],
                              eval_frames=0).validate()
    t = trainer_module.Trainer(cfg, demo_subject[0], tmp_path / "run", show_progress=False)
    assert t.silence is None
    t.run()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "warning: no silent landmark steps (the whisper extractor needs faster-whisper" in log
    # Said where the user looks too, with the short-video warning (the demo subject is 6 s long).
    err = capsys.readouterr().err
    assert "warning: no silent landmark steps" in err and "s of training video is short for lip-sync" in err


def test_short_video_warning():
    from gsavatar.train.trainer import MIN_LIPSYNC_SECONDS, short_video_note

    assert short_video_note(int(MIN_LIPSYNC_SECONDS * 25)) is None
    note = short_video_note(8 * 25)
    assert note.startswith("warning: 8 s of training video is short for lip-sync") and "a minute or more" in note


def test_training_a_short_subject_says_so_in_its_log(trained):
    """The demo subject is 6 s long: its run's log carries the warning."""
    _, run, _ = trained
    log = (run / "train.log").read_text()
    assert "s of training video is short for lip-sync on new speech" in log


def test_audio_augment_copies_are_the_subject_audio_louder_quieter_and_noisier(demo_subject):
    import dataclasses

    import numpy as np

    from gsavatar.config import AudioAugmentConfig, TrainConfig, config_from_dict
    from gsavatar.data.frames import SubjectFrames
    from gsavatar.train.trainer import augmented_audio

    data = SubjectFrames(demo_subject[0], 128, "auto", "cpu")
    assert augmented_audio(data, AudioAugmentConfig(), np.random.default_rng(0)) == []
    cfg = AudioAugmentConfig(variants=2, gain_db=6.0, noise_snr_db=20.0)
    copies = [c.features for c in augmented_audio(data, cfg, np.random.default_rng(0))]
    assert len(copies) == 2 and all(c.shape == data.audio.shape for c in copies)
    # Log-mel: a gain g shifts every bin by 2 log10(g), within +-0.6 for +-6 dB, where the speech is loud
    # (noise 20 dB or more under the track's mean power barely moves those bins; it fills the silent ones).
    loud = data.audio > torch.quantile(data.audio.flatten(), 0.9)
    shifts = [float((c - data.audio)[loud].median()) for c in copies]
    assert all(-0.65 < d < 0.65 for d in shifts) and not torch.equal(copies[0], copies[1])
    quiet = data.audio <= -9.99  # digital silence in the clean track: the copies' noise is heard there
    assert all(bool((c[quiet] > -9.99).all()) for c in copies)
    assert all(not torch.equal(c, data.audio) for c in copies)
    again = [c.features for c in augmented_audio(data, cfg, np.random.default_rng(0))]
    assert all(torch.equal(a, b) for a, b in zip(copies, again))  # a resumed run rebuilds the same copies
    with pytest.raises(InputError, match="audio_augment"):
        config_from_dict(TrainConfig, {"audio_augment": {"variants": 99}}).validate()
    with pytest.raises(InputError, match="warp"):
        config_from_dict(TrainConfig, {"audio_augment": {"warp": 0.9}}).validate()
    with pytest.raises(InputError, match="tempo"):
        config_from_dict(TrainConfig, {"audio_augment": {"tempo": -0.1}}).validate()
    assert dataclasses.asdict(TrainConfig())["audio_augment"]["variants"] == 0


@pytest.mark.parametrize("factor", [0.87, 0.94, 1.06, 1.13])
def test_a_frequency_warp_moves_tones_keeps_their_level_and_timing(factor):
    """Another voice's timbre for the audio copies: steady tones move to factor x their frequency at
    their level, a burst stays where it was in time, and a factor of 1 gives the input back."""
    import numpy as np

    from gsavatar.data.voice import WARP_FFT, warp_frequencies

    rate = 16000
    t = np.arange(rate) / rate
    for freq in (200.0, 700.0, 1000.0, 2500.0):
        x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        y = warp_frequencies(x, factor)
        spectrum = np.abs(np.fft.rfft(y))
        assert abs(np.fft.rfftfreq(len(y), 1 / rate)[np.argmax(spectrum)] - freq * factor) <= 1.0  # one bin of 1 s
        inner = slice(WARP_FFT, -WARP_FFT)  # away from the ends, where the STFT's frames are padded
        level_db = 10 * np.log10(np.mean(y[inner] ** 2) / np.mean(x[inner] ** 2))
        assert abs(level_db) < 1.0, (freq, level_db)
    burst = (0.5 * np.sin(2 * np.pi * 1000 * t) * ((t > 0.4) & (t < 0.6))).astype(np.float32)
    envelope = np.convolve(np.abs(warp_frequencies(burst, factor)), np.ones(160) / 160, mode="same")  # 10 ms
    loud = np.flatnonzero(envelope > 0.5 * envelope.max()) / rate
    half_window = WARP_FFT / 2 / rate  # a frame smears an edge by at most half its length
    assert abs(loud.min() - 0.4) < half_window and abs(loud.max() - 0.6) < half_window
    # Factor 1: the vocoder's phases telescope back to the analysis phases; its float64 arithmetic
    # (FFTs of log2(N) stages, four overlapping frames) is far below the final rounding to float32.
    bound = 2.0**-24 * np.abs(x).max() + 4 * 2 * np.log2(WARP_FFT) * 2.0**-53 * np.abs(x).max() * 4
    assert np.abs(warp_frequencies(x, 1.0) - x).max() <= bound


@pytest.mark.parametrize("factor", [0.85, 1.15])
def test_a_tempo_change_moves_events_in_time_and_keeps_frequencies(factor):
    """Speech at another tempo for the audio copies: a burst at t lands at t / factor, a tone keeps its
    frequency and level, and the result is len / factor samples long."""
    import numpy as np

    from gsavatar.data.voice import WARP_FFT, change_tempo

    rate = 16000
    t = np.arange(2 * rate) / rate
    x = (0.5 * np.sin(2 * np.pi * 700 * t)).astype(np.float32)
    y = change_tempo(x, factor)
    assert len(y) == round(len(x) / factor)
    assert abs(np.fft.rfftfreq(len(y), 1 / rate)[np.argmax(np.abs(np.fft.rfft(y)))] - 700) <= rate / len(y)
    inner = slice(WARP_FFT, -WARP_FFT)
    assert abs(10 * np.log10(np.mean(y[inner] ** 2) / np.mean(x[inner] ** 2))) < 1.0
    burst = (x * ((t > 0.8) & (t < 1.0))).astype(np.float32)
    envelope = np.convolve(np.abs(change_tempo(burst, factor)), np.ones(160) / 160, mode="same")
    loud = np.flatnonzero(envelope > 0.5 * envelope.max()) / rate
    half_window = WARP_FFT / 2 / rate
    assert abs(loud.min() - 0.8 / factor) < half_window and abs(loud.max() - 1.0 / factor) < half_window


def test_tempo_copies_map_to_the_subject_timeline(demo_subject):
    """A copy at tempo r: its frame j stands for the subject's frame r j; only landmark steps hear it."""
    import numpy as np

    from gsavatar.config import AudioAugmentConfig
    from gsavatar.data.frames import SubjectFrames
    from gsavatar.train.trainer import AudioCopy, augmented_audio

    data = SubjectFrames(demo_subject[0], 128, "auto", "cpu")
    cfg = AudioAugmentConfig(variants=2, gain_db=0.0, noise_snr_db=200.0, tempo=0.15)
    copies = augmented_audio(data, cfg, np.random.default_rng(0))
    n = len(data.audio)
    for c in copies:
        assert 0.85 <= c.tempo <= 1.15 and c.tempo != 1.0
        assert abs(len(c.features) - n / c.tempo) <= 1  # the copy is as much longer or shorter
        for index in (0, n // 3, n - 1):
            j, lo, hi, w = c.frame_for(index, n)
            assert abs(j * c.tempo - index) <= c.tempo / 2 + 1e-9 or j == len(c.features) - 1
            assert lo <= hi <= n - 1 and 0 <= w < 1 and abs(lo + w - min(j * c.tempo, n - 1)) < 1e-9
    same = AudioCopy(data.audio)
    assert same.frame_for(5, n) == (5, 5, 6, 0.0)


def test_tempo_copies_are_heard_by_the_landmark_steps_only(demo_subject, tmp_path, monkeypatch):
    """Every landmark term (probability 1: the motion stage's steps, the face stage's landmark prior)
    hears a tempo copy; what the images are compared with is drawn from the clean track."""
    import dataclasses

    from gsavatar.config import AudioAugmentConfig, StageConfig
    from gsavatar.train import trainer as trainer_module

    base = load_preset("cpu-tiny")
    cfg = dataclasses.replace(base, stages=[StageConfig("motion", 20, densify=False), StageConfig("face", 4, densify=False)],
                              eval_frames=0, audio_augment=AudioAugmentConfig(variants=2, probability=1.0, tempo=0.15)).validate()
    t = trainer_module.Trainer(cfg, demo_subject[0], tmp_path / "run", show_progress=False)
    copies, heard = [], []
    frame_for = trainer_module.AudioCopy.frame_for
    monkeypatch.setattr(trainer_module.AudioCopy, "frame_for", lambda self, *a: copies.append(self) or frame_for(self, *a))
    inputs = t.data.inputs
    monkeypatch.setattr(t.data, "inputs", lambda *a, audio=None, **k: heard.append(audio) or inputs(*a, audio=audio, **k))
    t.run()
    every = cfg.loss.silence_every  # the silent landmark steps hear silence instead
    landmark_terms = sum(it % every != every - 1 for n in (20, 4) for it in range(n))
    assert len(copies) == landmark_terms and {c.tempo for c in copies} <= {c.tempo for c in t.audio_variants}
    assert heard and all(a is None for a in heard)


def test_a_checkpoint_from_before_a_setting_was_added_still_resumes():
    """Settings compared through TrainConfig: a key the checkpoint lacks counts as its default."""
    import dataclasses
    import json

    from gsavatar.config import TrainConfig
    from gsavatar.train.trainer import _same_settings

    now = json.loads(json.dumps(dataclasses.asdict(TrainConfig())))
    older = json.loads(json.dumps(now))
    del older["audio_augment"]["warp"]
    assert _same_settings(older, now)
    older["seed"] = 7
    assert not _same_settings(older, now)
    assert not _same_settings({**now, "retired_setting": 1}, now)
