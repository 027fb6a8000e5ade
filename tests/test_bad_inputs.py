"""Bad input: each case either works or fails with a one-line error, a non-zero exit, and no
dataset left behind that a later stage would trust."""

from __future__ import annotations

import shutil
import sys

import numpy as np
from conftest import remux, require_preprocess_deps, tone

require_preprocess_deps()

from gsavatar.cli import main  # noqa: E402
from gsavatar.data.dataset import SubjectDataset  # noqa: E402
from gsavatar.outputs.video_writer import write_mp4  # noqa: E402


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["preprocess", *map(str, args), "--size", "128", "--audio-features", "logmel"])
    return code, capsys.readouterr().err


def assert_one_line_failure(code: int, err: str, out, *words: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code != 0
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists(), "a failed first run must not leave a dataset folder behind"


def _astronaut(size: int) -> np.ndarray:
    from gsavatar.data.synthetic import _base_image

    return _base_image(size)[0]


def test_not_a_video(tmp_path, capsys):
    bad = tmp_path / "notes.mp4"
    bad.write_text("these are meeting notes, not a video\n" * 50)
    out = tmp_path / "out"
    code, err = run_cli(capsys, bad, "-o", out)
    assert_one_line_failure(code, err, out, "notes.mp4", "not a readable video")


def test_missing_file(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, tmp_path / "nope.mp4", "-o", out)
    assert_one_line_failure(code, err, out, "no such file")


def test_no_audio_track(tmp_path, capsys):
    video = tmp_path / "silent.mp4"
    write_mp4(video, [_astronaut(128)] * 150)
    out = tmp_path / "out"
    code, err = run_cli(capsys, video, "-o", out)
    assert_one_line_failure(code, err, out, "no audio track")


def test_no_face(tmp_path, capsys):
    video = tmp_path / "wall.mp4"
    ramp = np.linspace(40, 200, 128, dtype=np.float32)
    wall = np.repeat(np.stack([ramp[None, :].repeat(128, 0)] * 3, -1), 1, 0).astype(np.uint8)
    write_mp4(video, [wall] * 150, audio=tone(6.0))
    out = tmp_path / "out"
    code, err = run_cli(capsys, video, "-o", out)
    assert_one_line_failure(code, err, out, "no face")


def test_too_short(tmp_path, capsys, demo_video):
    video = tmp_path / "short.mp4"
    write_mp4(video, [_astronaut(128)] * 75, audio=tone(3.0))
    out = tmp_path / "out"
    code, err = run_cli(capsys, video, "-o", out)
    assert_one_line_failure(code, err, out, "3.0 s", "at least 5 s")


def test_truncated_file(tmp_path, capsys, demo_video):
    data = demo_video.video_path.read_bytes()
    video = tmp_path / "cut.mp4"
    video.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code, err = run_cli(capsys, video, "-o", out)
    assert_one_line_failure(code, err, out, "cut.mp4")
    assert "truncated" in err or "not a readable video" in err


def test_truncated_streamable_file(tmp_path, capsys, demo_video):
    """With the index at the front (faststart), a cut file opens but ends early."""
    fast = tmp_path / "fast.mp4"
    remux(demo_video.video_path, fast, options={"movflags": "faststart"})
    data = fast.read_bytes()
    video = tmp_path / "fast cut.mp4"
    video.write_bytes(data[: int(len(data) * 0.6)])
    out = tmp_path / "out"
    code, err = run_cli(capsys, video, "-o", out)
    assert_one_line_failure(code, err, out, "truncated")


def test_two_faces_keeps_the_largest(tmp_path, capsys):
    big, small = _astronaut(224), _astronaut(112)
    canvas = np.full((224, 384, 3), 200, np.uint8)
    canvas[:, :224] = big
    canvas[56:168, 262:374] = small
    video = tmp_path / "two.mp4"
    write_mp4(video, [canvas] * 150, audio=tone(6.0))
    out = tmp_path / "out"
    code, err = run_cli(capsys, video, "-o", out)
    assert code == 0, err
    assert "more than one face" in err
    ds = SubjectDataset(out)
    crop = ds.manifest["crop"]
    assert crop["x0"] + crop["side"] / 2 < 224  # centred on the big face
    # The landmarks follow the big face in every frame (its centre is left of the small one).
    scale = crop["side"] / 128
    centres_x = ds.landmarks[:, :, 0].mean(1) * scale + crop["x0"]
    assert (centres_x < 224).all()


def test_4k_video_is_downscaled(tmp_path, capsys):
    canvas = np.full((2160, 3840, 3), 180, np.uint8)
    canvas[:, 840:3000] = _astronaut(2160)
    video = tmp_path / "uhd.mp4"
    write_mp4(video, [canvas] * 130, audio=tone(5.2), preset="ultrafast", crf=30)
    out = tmp_path / "out"
    code, err = run_cli(capsys, video, "-o", out)
    assert code == 0, err
    ds = SubjectDataset(out)
    assert ds.manifest["source"]["width"] == 3840 and ds.frame(0).shape == (128, 128, 3)
    assert 1000 < ds.manifest["crop"]["side"] <= 2160
    assert ds.manifest["num_frames"] == 130


def test_path_with_spaces_and_non_ascii(tmp_path, capsys, demo_video):
    folder = tmp_path / "my vidéos ñ 字"
    folder.mkdir()
    video = folder / "clip ü 1.mp4"
    shutil.copy(demo_video.video_path, video)
    out = folder / "sujet été"
    code, err = run_cli(capsys, video, "-o", out)
    assert code == 0, err
    assert SubjectDataset(out).num_frames == demo_video.num_frames


def test_refuses_a_foreign_non_empty_output_dir(tmp_path, capsys, demo_video):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"x")
    code = main(["preprocess", str(demo_video.video_path), "-o", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "not a gsavatar subject dataset" in err
    assert (out / "holiday.jpg").exists() and not (out / "manifest.json").exists()


def test_bad_size_and_feature_kind(tmp_path, capsys, demo_video):
    out = tmp_path / "o"
    assert main(["preprocess", str(demo_video.video_path), "-o", str(out), "--size", "33"]) != 0
    assert "--size" in capsys.readouterr().err
    assert main(["preprocess", str(demo_video.video_path), "-o", str(out), "--audio-features", "deepspeech"]) != 0
    assert "deepspeech" in capsys.readouterr().err
    assert not out.exists()


def test_missing_audio_feature_dependency_fails_before_any_stage(tmp_path, capsys, demo_video, monkeypatch):
    """A feature kind whose weights or package are missing stops preprocess at once, in one line that
    says what to set or install, instead of after the frames, landmarks and masks stages."""
    import time

    monkeypatch.delenv("GSAVATAR_HUBERT_MODEL", raising=False)
    out = tmp_path / "o"
    t = time.perf_counter()
    code = main(["preprocess", str(demo_video.video_path), "-o", str(out), "--audio-features", "logmel", "hubert"])
    assert_one_line_failure(code, capsys.readouterr().err, out, "GSAVATAR_HUBERT_MODEL", "--audio-features")
    assert time.perf_counter() - t < 5.0
    monkeypatch.setenv("GSAVATAR_HUBERT_MODEL", str(tmp_path / "no_such_model"))
    code = main(["preprocess", str(demo_video.video_path), "-o", str(out), "--audio-features", "hubert"])
    assert_one_line_failure(code, capsys.readouterr().err, out, "no_such_model", "config.json")
    for name in ("faster_whisper", "ctranslate2"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    code = main(["preprocess", str(demo_video.video_path), "-o", str(out)])  # whisper is a default kind
    assert_one_line_failure(code, capsys.readouterr().err, out, "faster-whisper", "pip install")
