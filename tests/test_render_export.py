"""``gsavatar render`` (speech -> H.264 + AAC mp4 in sync) and ``gsavatar export`` (3DGS PLY).

Everything renders the session's cpu-tiny avatar (the ``trained`` fixture, 128 px) driven by a
couple of seconds of synthetic speech, so the whole file takes well under a minute.
"""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_image_but_cutoff_flips

av = pytest.importorskip("av")
cv2 = pytest.importorskip("cv2")

from gsavatar.cli import main  # noqa: E402
from gsavatar.data.video import write_wav  # noqa: E402
from gsavatar.drive import DriveConfig, frame_count, load_speech  # noqa: E402
from gsavatar.outputs.video_writer import write_mp4  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEECH_SECONDS = 2.13  # 53.25 frames -> 53 (no rounding tie)
FRAME_S = 1 / 25


def speechlike(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """A voiced buzz plus noise under a syllable-rate envelope (what the audio features respond to)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    envelope = np.clip(np.sin(2 * np.pi * 3.1 * t), 0, None) ** 2
    voice = np.sign(np.sin(2 * np.pi * 140 * t)) * 0.2 + 0.05 * rng.standard_normal(t.size)
    return (0.6 * envelope * voice).astype(np.float32)


def encode_audio(path: Path, samples: np.ndarray, rate: int, codec: str) -> Path:
    """Write mono float samples with PyAV (``.m4a``: AAC in MP4, ``.mp3``: MP3)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame_size = stream.codec_context.frame_size or 1152
        fmt = stream.codec_context.format.name
        for start in range(0, len(samples), frame_size):
            chunk = samples[start:start + frame_size].reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk.astype(np.float32)), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            if fmt != "fltp":
                frame = av.AudioResampler(format=fmt, layout="mono", rate=rate).resample(frame)[0]
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def decode(path: Path) -> dict:
    """Streams, frames and durations of an mp4, read back with PyAV."""
    with av.open(str(path)) as c:
        vs, streams = c.streams.video, c.streams.audio
        info = {"video_codecs": [s.codec_context.name for s in vs], "audio_codecs": [s.codec_context.name for s in streams],
                "video_s": float(vs[0].duration * vs[0].time_base), "audio_s": float(streams[0].duration * streams[0].time_base),
                "audio_rate": streams[0].rate}
    with av.open(str(path)) as c:
        info["frames"] = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        info["audio"] = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return info


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """2.13 s of speech-like sound at 22.05 kHz (so rendering resamples)."""
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    write_wav(path, speechlike(SPEECH_SECONDS, 22050), rate=22050)
    return path


@pytest.fixture(scope="module")
def rendered(trained, speech, tmp_path_factory):
    from gsavatar.outputs.render_video import render_video

    _, run, _ = trained
    out = tmp_path_factory.mktemp("render")
    summary = render_video(run, speech, out / "talk.mp4", DriveConfig(), frames_dir=out / "frames", progress=False)
    return out / "talk.mp4", out / "frames", summary


def _render(trained, speech, out: Path, **kwargs):
    from gsavatar.outputs.render_video import render_video

    _, run, _ = trained
    render_video(run, speech, out / "v.mp4", kwargs.pop("drive", DriveConfig()), frames_dir=out / "frames", progress=False, **kwargs)
    return sorted((out / "frames").glob("frame_*.png"))


def _png(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


# -- the video ------------------------------------------------------------------------------------
def test_mp4_has_h264_and_aac_with_one_frame_per_40ms_in_sync(rendered):
    path, _, summary = rendered
    n = round(SPEECH_SECONDS * 25)
    info = decode(path)
    assert info["video_codecs"] == ["h264"] and info["audio_codecs"] == ["aac"]
    assert summary["frames"] == n and len(info["frames"]) == n
    assert info["video_s"] == pytest.approx(n * FRAME_S, abs=1e-6)
    # Stream metadata and the decoded samples (encoder padding included) both end within a frame of the video.
    assert abs(info["audio_s"] - info["video_s"]) <= FRAME_S
    assert abs(len(info["audio"]) / info["audio_rate"] - info["video_s"]) <= FRAME_S
    assert info["frames"][0].shape == (128, 128, 3)


def test_muxed_audio_is_the_speech_aligned_to_the_frames(rendered, speech):
    """The decoded track matches the input speech sample for sample in time (cross-correlation lag ~ 0)."""
    path, _, _ = rendered
    info = decode(path)
    rate = info["audio_rate"]
    ref = speechlike(SPEECH_SECONDS, rate)
    got = info["audio"][: len(ref)]
    env = lambda x: np.convolve(np.abs(x), np.ones(480) / 480, mode="same")  # noqa: E731
    a, b = env(ref) - env(ref).mean(), env(got) - env(got).mean()
    lags = np.arange(-rate // 50, rate // 50 + 1, 24)  # +- 20 ms
    corr = [np.dot(a[max(0, -k): len(a) - max(0, k)], b[max(0, k): len(b) - max(0, -k)]) for k in lags]
    lag_ms = 1000 * lags[int(np.argmax(corr))] / rate
    assert abs(lag_ms) <= 2.0, lag_ms


def test_frames_dir_holds_the_video_frames(rendered):
    path, frames_dir, summary = rendered
    pngs = sorted(frames_dir.glob("frame_*.png"))
    assert [p.name for p in pngs] == [f"frame_{k:05d}.png" for k in range(summary["frames"])]
    images = [_png(p) for p in pngs]
    assert {im.shape for im in images} == {(128, 128, 3)}
    decoded = decode(path)["frames"]
    for k in (0, len(images) // 2, len(images) - 1):  # same frames, in the same order (H.264 at crf 18: small error)
        err = np.abs(decoded[k].astype(float) - images[k]).mean()
        other = np.abs(decoded[k].astype(float) - images[(k + 9) % len(images)]).mean()
        assert err < 3.0 and err < other, (k, err, other)


def test_writer_keeps_a_click_on_its_frame():
    """A click at sample 640 k comes back at frame k's time (< 1 ms): AAC priming is handled by the mp4 edit list."""
    import tempfile

    n = 50
    audio = np.zeros(n * 640, np.float32)
    clicks = (5, 26, 47)
    for k in clicks:
        audio[640 * k: 640 * k + 8] = 0.9
    with tempfile.TemporaryDirectory() as d:
        path = write_mp4(Path(d) / "c.mp4", [np.zeros((32, 32, 3), np.uint8)] * n, audio=audio, aac_rate=48000)
        info = decode(path)
    x, rate = np.abs(info["audio"]), info["audio_rate"]
    for k in clicks:
        lo = int((k - 0.5) * FRAME_S * rate)
        onset = lo + int(np.argmax(x[lo: lo + int(FRAME_S * rate)] > 0.3))
        assert abs(onset / rate - k * FRAME_S) < 1e-3, (k, onset / rate)
    assert abs(len(info["audio"]) / rate - n * FRAME_S) <= FRAME_S and info["audio_s"] == pytest.approx(n * FRAME_S, abs=1e-3)


def test_orbit_starts_at_the_training_view_then_moves(rendered, trained, speech, tmp_path):
    _, frames_dir, _ = rendered
    train = sorted(frames_dir.glob("frame_*.png"))
    orbit = _render(trained, speech, tmp_path, drive=DriveConfig(camera="orbit"))
    assert len(orbit) == len(train)
    np.testing.assert_array_equal(_png(orbit[0]), _png(train[0]))
    mid = len(train) - 1  # 2.08 s: yaw = 30 sin(2 pi 2.08 / 8) = 30 deg
    assert np.abs(_png(orbit[mid]).astype(float) - _png(train[mid])).mean() > 5.0


def test_background_image_replaces_the_plate(rendered, trained, speech, tmp_path):
    _, frames_dir, _ = rendered
    plate = np.zeros((90, 60, 3), np.uint8)
    plate[:] = (255, 0, 255)  # magenta (RGB), any size: resized to the render
    cv2.imwrite(str(tmp_path / "plate.png"), cv2.cvtColor(plate, cv2.COLOR_RGB2BGR))
    frames = _render(trained, speech, tmp_path, background=tmp_path / "plate.png")
    before, after = _png(sorted(frames_dir.glob("frame_*.png"))[10]).astype(float), _png(frames[10]).astype(float)
    changed = np.abs(after - before).max(-1) > 40
    assert 0.1 < changed.mean() < 0.9, changed.mean()  # the plate shows around the person, not through them
    assert np.abs(after[changed] - [255, 0, 255]).mean() < np.abs(before[changed] - [255, 0, 255]).mean() / 2
    centre = (slice(24, 60), slice(44, 84))  # the face: unchanged
    assert np.abs(after[centre] - before[centre]).mean() < 2.0


def test_render_gives_back_the_callers_thread_count(trained, speech, tmp_path):
    """The cpu-tiny avatar renders on its preset's one thread, and a library caller gets its own count back."""
    from gsavatar.outputs.render_video import render_video

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        summary = render_video(trained[1], speech, tmp_path / "v.mp4", DriveConfig(), progress=False)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert summary["cpu_threads"] == 1
    assert after == 3


def test_compressed_speech_formats_and_the_cli(trained, tmp_path):
    """m4a (AAC) and mp3 at 44.1 kHz decode to the right frame count; the CLI renders an m4a end to end."""
    _, run, _ = trained
    samples = speechlike(1.0, 44100)
    inputs = {}
    for suffix, codec in ((".m4a", "aac"), (".mp3", "libmp3lame")):
        try:
            av.codec.Codec(codec, "w")
        except Exception:
            continue
        inputs[suffix] = encode_audio(tmp_path / f"speech{suffix}", samples, 44100, codec)
        assert frame_count(load_speech(inputs[suffix])) == 25  # encoder padding is trimmed to the declared duration
    assert ".m4a" in inputs
    out = tmp_path / "m4a.mp4"
    result = subprocess.run([sys.executable, "-m", "gsavatar", "render", str(run), "--audio", str(inputs[".m4a"]), "-o", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    n = frame_count(load_speech(inputs[".m4a"]))
    assert result.stdout.strip().splitlines()[-1].startswith(f"video: {out}  ({n} frames")
    assert len(decode(out)["frames"]) == n


@pytest.mark.parametrize("kind", ["random bytes", "text", "video without audio"])
def test_bad_audio_gives_one_line_error(kind, trained, tmp_path):
    _, run, _ = trained
    if kind == "random bytes":
        bad = tmp_path / "noise.wav"
        bad.write_bytes(np.random.default_rng(0).bytes(40000))
    elif kind == "text":
        bad = tmp_path / "notes.mp3"
        bad.write_text("this is not audio\n" * 200)
    else:
        bad = write_mp4(tmp_path / "silent.mp4", [np.zeros((32, 32, 3), np.uint8)] * 30)
    out = tmp_path / "o.mp4"
    result = subprocess.run([sys.executable, "-m", "gsavatar", "render", str(run), "--audio", str(bad), "-o", str(out)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and bad.name in lines[0], result.stderr
    assert not out.exists() and not list(tmp_path.glob(".o.tmp*"))


@pytest.mark.parametrize("case, message", [
    ("missing run", "no such run directory"),
    ("empty run", "holds no trained avatar (avatar.pt or checkpoint.pt)"),
    ("empty audio", "not a readable audio file"),
    ("missing audio", "no such audio file"),
    ("bad camera json", "is not a camera path"),
    ("unknown camera", "unknown camera"),
    ("bad background", "not a readable image"),
    ("missing output dir", "does not exist"),
    ("odd size", "even number"),
])
def test_render_bad_input_gives_one_line(case, message, trained, speech, tmp_path, capsys):
    _, run, _ = trained
    audio, out, extra = speech, tmp_path / "o.mp4", []
    if case == "missing run":
        run = tmp_path / "nope"
    elif case == "empty run":
        run = tmp_path
    elif case == "empty audio":
        audio = tmp_path / "empty.wav"
        audio.write_bytes(b"")
    elif case == "missing audio":
        audio = tmp_path / "gone.wav"
    elif case == "bad camera json":
        (tmp_path / "path.json").write_text('{"keyframes": [{"yaw": 10}]}')
        extra = ["--camera", str(tmp_path / "path.json")]
    elif case == "unknown camera":
        extra = ["--camera", "spin"]
    elif case == "bad background":
        (tmp_path / "bg.png").write_text("not an image")
        extra = ["--background", str(tmp_path / "bg.png")]
    elif case == "missing output dir":
        out = tmp_path / "no" / "o.mp4"
    elif case == "odd size":
        extra = ["--size", "99"]
    code = main(["render", str(run), "--audio", str(audio), "-o", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


# -- the PLY --------------------------------------------------------------------------------------
LAYOUT_DEG2 = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(24)]
               + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    _, run, _ = trained
    out = tmp_path_factory.mktemp("ply") / "avatar.ply"
    assert main(["export", str(run), "-o", str(out)]) == 0
    return out


def _rebuild_and_render(ply: dict, ranges: dict, branch: str, viewmat, K, size):
    from gsavatar.render import rasterize

    a, b = ranges[branch]
    return rasterize(ply["means"][a:b], ply["quats"][a:b], torch.exp(ply["log_scales"][a:b]),
                     torch.sigmoid(ply["opacity_logits"][a:b]), ply["sh"][a:b], viewmat, K, size, size,
                     sh_degree=ply["sh_degree"], tile_size=8)


def test_ply_has_the_3dgs_layout(exported, trained):
    from plyfile import PlyData

    from gsavatar.model.io import load_run

    _, run, _ = trained
    avatar = load_run(run).avatar
    raw = PlyData.read(str(exported))
    assert [e.name for e in raw.elements] == ["vertex"] and raw.header.startswith("ply\nformat binary_little_endian 1.0")
    props = raw["vertex"].properties
    assert [p.name for p in props] == LAYOUT_DEG2 + ["branch"]
    assert all(p.val_dtype in ("f4", "<f4", "float32") for p in props[:-1]), {p.val_dtype for p in props}
    v = raw["vertex"].data
    face = avatar.gaussians["face"]
    shN = face.params["shN"].detach().numpy()  # [G, 8, 3]
    g = len(face)
    # f_rest is channel-major: f_rest_{c*8 + k} = shN[:, k, c].
    for c in range(3):
        for k in (0, 3, 7):
            np.testing.assert_array_equal(v[f"f_rest_{c * 8 + k}"][:g], shN[:, k, c])
    np.testing.assert_array_equal(v["f_dc_1"][:g], face.params["sh0"].detach().numpy()[:, 0, 1])
    np.testing.assert_array_equal(v["opacity"][:g], face.params["opacity_logits"].detach().numpy())
    np.testing.assert_array_equal(np.stack([v["rot_0"], v["rot_1"], v["rot_2"], v["rot_3"]], 1)[:g], face.quats.detach().numpy())
    assert not np.any(np.stack([v["nx"], v["ny"], v["nz"]]))
    counts = np.bincount(v["branch"], minlength=3)
    assert counts.tolist() == [len(avatar.gaussians[b]) for b in ("face", "mouth", "torso")]
    assert any("head" in c and "y down" in c for c in raw.comments)


def test_ply_round_trip_renders_every_branch_as_the_avatar(exported, trained):
    """export -> read_ply -> rasterize with the recorded view equals each branch of the avatar (torso included)."""
    from gsavatar.model.avatar import FrameInputs
    from gsavatar.model.io import load_run
    from gsavatar.outputs.ply import header_info, read_ply

    _, run, _ = trained
    bundle = load_run(run)
    avatar, subject = bundle.avatar, bundle.subject
    ply = read_ply(exported)
    info = header_info(ply["comments"])
    size = info["size"]
    assert size == subject.render_size and torch.equal(info["K"], subject.K.float())
    inputs = FrameInputs(viewmat=info["viewmat"], K=info["K"], width=size, height=size, audio=torch.zeros(1),
                         blink=torch.zeros(()), pose=torch.zeros(6))
    for branch in ("face", "mouth", "torso"):
        with torch.no_grad():
            want = avatar(inputs, layers=(branch,), deform=False, backend="torch").branches[branch]
            got = _rebuild_and_render(ply, info["ranges"], branch, info["viewmat"], info["K"], size)
        assert want.alpha.max() > 0.5, branch
        if branch != "torso":  # written as the avatar holds them: the same floats, the same image
            torch.testing.assert_close(got.color, want.color, atol=1e-5, rtol=0, msg=branch)
            torch.testing.assert_close(got.alpha, want.alpha, atol=1e-5, rtol=0, msg=branch)
            continue
        # The torso is written in the head frame (camera frame -> head frame in float64, stored as
        # float32) and drawn back through the view: its centres move by float32 rounding (~1e-5 px).
        assert_same_image_but_cutoff_flips(got.color, want.color, "torso colour")
        assert_same_image_but_cutoff_flips(got.alpha, want.alpha, "torso alpha")


def test_frame_export_is_the_deformed_avatar(exported, trained, speech, tmp_path, capsys):
    from gsavatar.model.io import load_run
    from gsavatar.outputs.ply import _own_audio_sequence, header_info, read_ply

    _, run, _ = trained
    bundle = load_run(run)
    avatar, subject = bundle.avatar, bundle.subject
    k = 7
    assert main(["export", str(run), "-o", str(tmp_path / "f.ply"), "--frame", str(k)]) == 0
    assert main(["export", str(run), "-o", str(tmp_path / "s.ply"), "--frame", str(k), "--audio", str(speech)]) == 0
    canonical, framed, driven = read_ply(exported), read_ply(tmp_path / "f.ply"), read_ply(tmp_path / "s.ply")
    info = header_info(framed["comments"])
    a, b = info["ranges"]["face"]
    assert (framed["means"][a:b] - canonical["means"][a:b]).abs().max() > 1e-4
    assert (framed["means"][a:b] - driven["means"][a:b]).abs().max() > 1e-6  # other audio, other mouth
    torch.testing.assert_close(info["viewmat"], subject.viewmats[k].float(), atol=1e-6, rtol=0)
    inputs = _own_audio_sequence(subject).inputs(k, avatar)
    for branch in ("face", "mouth", "torso"):
        with torch.no_grad():
            want = avatar(inputs, layers=(branch,), deform=True, backend="torch").branches[branch]
            got = _rebuild_and_render(framed, info["ranges"], branch, info["viewmat"], info["K"], info["size"])
        torch.testing.assert_close(got.color, want.color, atol=1e-5, rtol=0, msg=branch)


@pytest.mark.parametrize("args, message", [
    (["--frame", "100000"], "out of range"),
    (["--audio", "{speech}"], "only matters with --frame"),
    (["-o", "{tmp}/a.obj"], "must be a .ply file"),
])
def test_export_bad_input_gives_one_line(args, message, trained, speech, tmp_path, capsys):
    _, run, _ = trained
    code = main(["export", str(run), "-o", str(tmp_path / "a.ply")] + [a.format(tmp=tmp_path, speech=speech) for a in args])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and message in err, err
    assert not list(tmp_path.glob("*.ply"))


def test_frame_export_without_audio_needs_the_subject(tmp_path):
    from gsavatar.errors import InputError
    from gsavatar.model.audio import AudioSpec
    from gsavatar.model.io import SubjectInfo
    from gsavatar.outputs.ply import _own_audio_sequence

    gone = SubjectInfo(str(tmp_path / "gone"), AudioSpec("logmel", {}, 80, 4), 1, 16, torch.eye(3),
                       torch.eye(4)[None], torch.zeros(1, 6), torch.zeros(1), (0, 1), (0, 0))
    with pytest.raises(InputError, match="pass --audio SPEECH") as e:
        _own_audio_sequence(gone)
    assert "\n" not in str(e.value)


def test_rendered_ahead_keeps_order_hands_back_failures_and_stops_with_its_consumer():
    """Frames are rendered in a thread of their own, a bounded number ahead of the encoder."""
    import time

    from gsavatar.outputs.render_video import rendered_ahead

    with rendered_ahead(iter(range(7)), depth=2) as frames:
        assert list(frames) == list(range(7))

    def failing():
        yield 0
        raise ValueError("frame 1 failed")

    with pytest.raises(ValueError, match="frame 1 failed"):
        with rendered_ahead(failing()) as frames:
            list(frames)

    made = []

    def endless():
        while True:
            made.append(len(made))
            yield made[-1]

    with rendered_ahead(endless(), depth=2) as frames:
        assert next(frames) == 0
    stopped_at = len(made)
    time.sleep(0.3)
    assert len(made) == stopped_at <= 1 + 2 + 1  # the one consumed, the buffer, the one in hand
