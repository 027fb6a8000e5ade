"""Every failure a clean failure: checkpoints that do not match, silent speech, numbers that are
not finite or out of range, outputs that cannot be written, and SIGTERM mid-render. Each case is
one ``error:`` line (or one ``warning:`` line where the work is legitimate), a non-zero exit
status where it fails, and nothing half-written left behind."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_preprocess_deps

require_preprocess_deps()

from gsavatar.cli import main  # noqa: E402
from gsavatar.data.video import write_wav  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    t = np.arange(16000) / 16000
    write_wav(path, (0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32))
    return path


# -- checkpoints that do not match --------------------------------------------------------------
def _broken_run(trained, tmp_path: Path, how: str) -> Path:
    _, run, _ = trained
    broken = tmp_path / f"run_{how.replace(' ', '_')}"
    broken.mkdir()
    raw = torch.load(run / "avatar.pt", weights_only=True)
    if how == "missing key":
        del raw["model"]["gaussians.face.params.means"]
    elif how == "unexpected key":
        raw["model"]["face_deformer.extra.weight"] = torch.zeros(3)
    elif how == "wrong shape":
        key = "face_deformer.decoder.0.weight"
        raw["model"][key] = torch.zeros(raw["model"][key].shape[0] + 1, raw["model"][key].shape[1])
    elif how == "version":
        raw["version"] = 99
    elif how == "missing field":
        del raw["subject"]
    elif how == "subject":
        del raw["subject"]["render_size"]
    elif how == "not a checkpoint":
        (broken / "avatar.pt").write_bytes(os.urandom(4096))
        return broken
    torch.save(raw, broken / "avatar.pt")
    return broken


@pytest.mark.parametrize("how, words", [
    ("missing key", ["missing keys", "gaussians.face.params.means"]),
    ("unexpected key", ["unexpected keys", "face_deformer.extra.weight"]),
    ("wrong shape", ["wrong shapes", "face_deformer.decoder.0.weight"]),
    ("version", ["version 99"]),
    ("missing field", ["missing fields subject"]),
    ("subject", ["render_size"]),
    ("not a checkpoint", ["not a readable gsavatar checkpoint"]),
])
def test_a_checkpoint_that_does_not_match_is_one_line_naming_the_file(how, words, trained, speech_wav, tmp_path,
                                                                        capsys):
    broken = _broken_run(trained, tmp_path, how)
    path = str(broken / "avatar.pt")
    out = tmp_path / "o.mp4"
    for argv in (["render", str(broken), "--audio", str(speech_wav), "-o", str(out)],
                 ["export", str(broken), "-o", str(tmp_path / "o.ply")],
                 ["eval", str(broken), "--no-baselines"],
                 ["view", str(broken), "--port", "0"]):
        one_error_line(capsys, main(argv), path, *words)
    assert not out.exists() and not (tmp_path / "o.ply").exists()


# -- silence ----------------------------------------------------------------------------------
def test_silent_speech_renders_an_idle_avatar_with_one_warning(trained, tmp_path, capsys):
    _, run, _ = trained
    silent = tmp_path / "silent.wav"
    write_wav(silent, np.zeros(16000, np.float32))
    out = tmp_path / "idle.mp4"
    assert main(["render", str(run), "--audio", str(silent), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "silent.wav is silent" in warnings[0] and "idles" in warnings[0], err
    assert out.is_file()


def test_silence_note_threshold():
    from gsavatar.drive import SILENCE_PEAK_DBFS, silence_note

    quiet = 10 ** (SILENCE_PEAK_DBFS / 20)
    assert "digital silence" in silence_note(np.zeros(100, np.float32), "a.wav")
    assert silence_note(np.full(100, 0.5 * quiet, np.float32), "a.wav") is not None
    assert silence_note(np.full(100, 2 * quiet, np.float32), "a.wav") is None


# -- numbers: finite and in range -------------------------------------------------------------
@pytest.mark.parametrize("keyframes, words", [
    ('[{"t": 0, "yaw": NaN}]', ["keyframe 0 yaw", "finite", "nan"]),
    ('[{"t": 0}, {"t": Infinity}]', ["keyframe 1 t", "finite"]),
    ('[{"t": 0, "zoom": 1e9}]', ["keyframe 0 zoom", "<= 20"]),
    ('[{"t": -1}]', ["keyframe 0 t", ">= 0"]),
    ('[{"t": 0, "pitch": 720}]', ["keyframe 0 pitch", "<= 360"]),
])
def test_camera_keyframes_are_finite_and_in_range(keyframes, words, trained, speech_wav, tmp_path, capsys):
    _, run, _ = trained
    path = tmp_path / "path.json"
    path.write_text('{"keyframes": %s}' % keyframes)
    out = tmp_path / "o.mp4"
    one_error_line(capsys, main(["render", str(run), "--audio", str(speech_wav), "-o", str(out), "--camera", str(path)]),
                   "path.json", *words)
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["render", "{run}", "--audio", "{speech}", "-o", "{tmp}/o.mp4", "--size", "4096"], ["--size 4096", "2048"]),
    (["render", "{run}", "--audio", "{speech}", "-o", "{tmp}/o.mp4", "--max-seconds", "nan"], ["--max-seconds", "finite"]),
    (["view", "{run}", "--size", "4096"], ["--size 4096"]),
    (["preprocess", "{speech}", "-o", "{tmp}/s", "--size", "8192"], ["--size 8192"]),
    (["train", "{tmp}", "-o", "{tmp}/r", "--iterations-scale", "inf"], ["--iterations-scale", "finite"]),
    (["train", "{tmp}", "-o", "{tmp}/r", "--preset", "{tmp}/nan.toml"], ["loss.ssim", "finite"]),
])
def test_numbers_from_flags_and_files_are_checked_before_any_work(argv, words, trained, speech_wav, tmp_path, capsys):
    _, run, _ = trained
    (tmp_path / "nan.toml").write_text("[loss]\nssim = nan\n")
    args = [a.format(run=run, speech=speech_wav, tmp=tmp_path) for a in argv]
    one_error_line(capsys, main(args), *words)
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


# -- outputs that cannot be written -----------------------------------------------------------
def _unwritable_dir(tmp_path: Path) -> Path:
    """An existing folder this process cannot create files in."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for candidate in ("/sys", "/proc/self"):  # root ignores permission bits; these refuse even root
        try:
            fd, name = tempfile.mkstemp(dir=candidate)
        except OSError:
            return Path(candidate)
        os.close(fd)
        os.unlink(name)
    pytest.skip("running as root with no folder that refuses root's writes")


def test_every_command_checks_its_output_can_be_written_before_any_work(trained, speech_wav, demo_video, tmp_path,
                                                                        capsys):
    from gsavatar.config import load_preset

    _, run, _ = trained
    subject, _, _ = trained
    bad = _unwritable_dir(tmp_path)
    cases = [
        (["render", str(run), "--audio", str(speech_wav), "-o", str(bad / "o.mp4")], "cannot write"),
        (["render", str(run), "--audio", str(speech_wav), "-o", str(tmp_path / "o.mp4"), "--frames-dir",
          str(bad / "frames")], "cannot write"),
        (["export", str(run), "-o", str(bad / "o.ply")], "cannot write"),
        (["train", str(subject), "-o", str(bad / "run"), "--preset", "cpu-tiny"], "cannot write"),
        (["track", str(subject), "--overlay", str(bad / "o.mp4")], "cannot write"),
        (["preprocess", str(demo_video.video_path), "-o", str(bad / "subject")], "cannot write"),
    ]
    for argv, word in cases:
        t = time.perf_counter()
        one_error_line(capsys, main(argv), word, str(bad))
        assert time.perf_counter() - t < 20, argv  # refused up front, not after the work
    assert not (tmp_path / "o.mp4").exists()
    assert load_preset("cpu-tiny")  # (the preset itself is fine)


def test_eval_checks_the_run_directory_can_take_its_report(trained, tmp_path, capsys, monkeypatch):
    import gsavatar.files as io
    from gsavatar.errors import InputError

    _, run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    real = io.check_writable_dir

    def refuse(folder, what="the output directory"):
        if Path(folder) == copy:
            raise InputError(f"cannot write to {what} {folder} (Read-only file system)")
        return real(folder, what)

    monkeypatch.setattr(io, "check_writable_dir", refuse)
    one_error_line(capsys, main(["eval", str(copy), "--no-baselines"]), "cannot write", "eval.json")


def test_cleanup_on_a_read_only_filesystem_does_not_raise(tmp_path):
    from gsavatar.files import remove_quietly

    remove_quietly(tmp_path / "never-made.tmp")
    remove_quietly(Path("/sys/never-made.tmp"))  # EACCES / EROFS instead of ENOENT: still quiet


# -- signals ------------------------------------------------------------------------------------
def test_sigterm_during_render_removes_the_temporary_mp4_and_exits_143(trained, tmp_path):
    _, run, _ = trained
    speech = tmp_path / "long.wav"
    write_wav(speech, (0.2 * np.random.default_rng(0).standard_normal(16000 * 60)).astype(np.float32))
    out = tmp_path / "talk.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "gsavatar", "render", str(run), "--audio", str(speech), "-o", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".talk.tmp*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.5)  # some frames into the temporary file
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: terminated (SIGTERM)"] and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".talk.tmp*")), list(tmp_path.iterdir())


def test_check_number_rules():
    from gsavatar.config import check_number
    from gsavatar.errors import InputError

    assert check_number("x", 2, 0, 3) == 2.0
    for bad in (math.nan, math.inf, -math.inf, "1", True, 0.0, 4):
        with pytest.raises(InputError):
            check_number("x", bad, 0, 3, low_open=True)
