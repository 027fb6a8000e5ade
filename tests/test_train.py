"""Training end to end on the synthetic subject: lip-sync is learned, runs resume after SIGKILL,
and the train command reports bad input in one line.

The synthetic subject's mouth opening is known per frame (the generator pushes the jaw down
with the speech loudness), so lip-sync is checked against ground truth on held-out frames.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gsavatar.config import load_preset
from gsavatar.data.synthetic import mouth_darkness
from gsavatar.model.io import load_checkpoint, load_run

ROOT = Path(__file__).resolve().parents[1]


def _render_test_split(avatar, data, audio: torch.Tensor) -> dict[int, torch.Tensor]:
    from gsavatar.eval.baselines import avatar_predictor

    predict = avatar_predictor(avatar, data, audio)
    return {int(i): predict(int(i)) for i in data.test_indices}


def _face_psnr(images: dict, data) -> float:
    from gsavatar.eval.baselines import score

    return score(images.__getitem__, data)["psnr_face"]


def test_learns_lip_sync_on_held_out_frames(trained, demo_video):
    """Rendered mouth opening follows the ground truth on the test split (r >= 0.8); shuffled audio breaks it."""
    from gsavatar.data.frames import SubjectFrames

    subject, run, _ = trained
    bundle = load_run(run)
    avatar, cfg = bundle.avatar, bundle.config
    data = SubjectFrames(subject, cfg.render_size)
    truth = demo_video.mouth_open_px[data.test_indices]
    assert truth.max() > 5 and (truth < 0.5).sum() > 3, "the test split must hold both open and closed mouths"
    lm = data.dataset.landmarks

    images = _render_test_split(avatar, data, data.audio)
    opening = [mouth_darkness(images[int(i)].numpy(), lm[i], data.dataset.size) for i in data.test_indices]
    r = np.corrcoef(opening, truth)[0, 1]
    assert r >= 0.8, f"rendered vs true mouth opening on held-out frames: r = {r:.3f}"

    # The same frames driven by the audio features shuffled in time (fixed permutation).
    perm = torch.from_numpy(np.random.default_rng(0).permutation(data.num_frames))
    shuffled = _render_test_split(avatar, data, data.audio[perm])
    opening_shuffled = [mouth_darkness(shuffled[int(i)].numpy(), lm[i], data.dataset.size) for i in data.test_indices]
    r_shuffled = np.corrcoef(opening_shuffled, truth)[0, 1] if np.std(opening_shuffled) > 0 else 0.0
    assert r_shuffled < 0.5, f"shuffled audio still gives r = {r_shuffled:.3f}: the mouth is not driven by audio"
    # Margin: 3 dB means the face-region error doubles. A mouth that opens at the wrong times
    # costs about 8 dB here (measured 31.6 vs 23.5 dB), so 3 dB leaves room for run-to-run noise
    # while a model that ignored audio (equal PSNR) fails.
    psnr_true, psnr_shuffled = _face_psnr(images, data), _face_psnr(shuffled, data)
    assert psnr_true - psnr_shuffled >= 3.0, f"face PSNR {psnr_true:.2f} dB with true audio vs {psnr_shuffled:.2f} shuffled"


def test_run_directory_has_avatar_log_and_summary(trained):
    """avatar.pt loads weights-only and reproduces the summary's PSNR; it beats the mean training frame."""
    import json

    from gsavatar.data.frames import SubjectFrames
    from gsavatar.eval import score_test_split
    from gsavatar.train.trainer import summary_frames

    subject, run, summary = trained
    assert json.loads((run / "summary.json").read_text()) == summary
    assert set(summary["gaussians"]) == {"face", "mouth", "torso"} and all(v > 100 for v in summary["gaussians"].values())
    log = (run / "train.log").read_text()
    for stage in ("mouth", "face", "fuse", "torso"):
        assert f"stage {stage} done" in log
    assert "test PSNR" in log
    ckpt = load_checkpoint(run / "avatar.pt")
    assert ckpt.progress.completed_stages == ["mouth", "face", "fuse", "torso"] and ckpt.optimizers == {}
    bundle = load_run(run)
    avatar, cfg = bundle.avatar, bundle.config
    data = SubjectFrames(subject, cfg.render_size)
    again = score_test_split(avatar, data, summary_frames(data.test_indices, cfg.eval_frames))
    assert again["psnr_face"] == pytest.approx(summary["test_psnr_face"], abs=1e-3)
    # Baseline: the mean training frame, measured the same way.
    from gsavatar.eval.baselines import mean_frame, score

    baseline = score(mean_frame(data), data)["psnr_face"]
    assert summary["test_psnr_face"] > baseline + 1.0, (summary["test_psnr_face"], baseline)


MICRO = """
render_size = 64
cpu_threads = 1
checkpoint_every = 7
log_every = 5
[avatar.face]
num_gaussians = 600
max_gaussians = 900
[avatar.face.hash]
num_levels = 4
log2_table_size = 10
max_resolution = 64
[avatar.mouth]
num_gaussians = 200
[avatar.mouth.hash]
num_levels = 4
log2_table_size = 10
max_resolution = 64
[avatar.torso]
num_gaussians = 150
[densify]
start = 4
every = 4
[[stages]]
name = "mouth"
iterations = 12
[[stages]]
name = "face"
iterations = 30
static_iterations = 6
curriculum = "mouth_open"
[[stages]]
name = "fuse"
iterations = 10
densify = false
[[stages]]
name = "torso"
iterations = 12
"""


@pytest.fixture(scope="module")
def micro_reference(demo_subject, tmp_path_factory):
    """(subject, preset file, config, reference summary, reference avatar.pt) of an uninterrupted micro run."""
    from gsavatar.train.trainer import train

    subject, _ = demo_subject
    work = tmp_path_factory.mktemp("micro")
    preset = work / "micro.toml"
    preset.write_text(MICRO)
    cfg = load_preset(str(preset))
    summary = train(subject, work / "reference", cfg, show_progress=False)
    return subject, preset, cfg, summary, work / "reference" / "avatar.pt"


def _start_and_wait_for(run, subject, preset, global_iteration: int) -> subprocess.Popen:
    """`gsavatar train` in a subprocess, returned once its checkpoint has reached ``global_iteration``."""
    cmd = [sys.executable, "-m", "gsavatar", "train", str(subject), "-o", str(run), "--preset", str(preset)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoint.pt").exists():
            ckpt = load_checkpoint(run / "checkpoint.pt")
            if ckpt.progress.global_iteration >= global_iteration:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped"
    return proc


def _resume_and_compare(run, micro_reference):
    """Resume ``run`` to the end: the result equals the uninterrupted reference."""
    from gsavatar.train.trainer import train

    subject, _, cfg, reference, reference_avatar = micro_reference
    resumed = train(subject, run, cfg, show_progress=False)
    assert "resuming" in (run / "train.log").read_text()
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]  # a write cut by a kill is cleaned up
    final = load_checkpoint(run / "avatar.pt")
    assert final.progress.completed_stages == ["mouth", "face", "fuse", "torso"]
    assert final.progress.global_iteration == sum(s.iterations for s in cfg.stages)
    expected = load_checkpoint(reference_avatar).model
    assert final.model.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(final.model[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    assert resumed["test_psnr"] == pytest.approx(reference["test_psnr"], abs=1e-3)


def test_resume_after_sigkill_matches_an_uninterrupted_run(micro_reference, tmp_path):
    """SIGKILL mid-run, re-run the same command: no corruption, no lost stage, same result as no kill."""
    subject, preset = micro_reference[:2]
    run = tmp_path / "killed"
    proc = _start_and_wait_for(run, subject, preset, 21)  # into the face stage
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run / "checkpoint.pt").progress
    assert killed_at.completed_stages == ["mouth"] and killed_at.stage_index == 1
    assert not (run / "avatar.pt").exists() and not (run / "summary.json").exists()
    _resume_and_compare(run, micro_reference)


def test_sigterm_checkpoints_the_current_iteration_and_exits_in_one_line(micro_reference, tmp_path):
    """SIGTERM (what `timeout` and schedulers send) stops after the current iteration with a checkpoint of
    that iteration, not of the last periodic one; exit status 143; the same command resumes exactly."""
    subject, preset = micro_reference[:2]
    run = tmp_path / "stopped"
    proc = _start_and_wait_for(run, subject, preset, 15)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "resume" in lines[0], stderr
    stopped_at = load_checkpoint(run / "checkpoint.pt").progress
    assert f"({stopped_at.global_iteration} in all)" in lines[0]
    assert stopped_at.global_iteration >= 15
    assert "stopped by SIGTERM" in (run / "train.log").read_text()
    assert not (run / "avatar.pt").exists()
    _resume_and_compare(run, micro_reference)


@pytest.mark.parametrize("args, message", [
    (["train", "/nonexistent/video.mp4", "-o", "{tmp}/run"], "does not exist"),
    (["train", "{tmp}", "-o", "{tmp}/run"], "not a subject dataset"),
    (["train", "{tmp}", "-o", "{tmp}/run", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "{tmp}", "-o", "{tmp}/run", "--iterations-scale", "0"], "iterations-scale must be a finite number > 0"),
    (["train", "{tmp}", "-o", "{tmp}/run", "--device", "tpu"], "unknown device"),
    (["train", "/nonexistent/video.mp4", "-o", "{tmp}/run", "--backend", "vulkan"],
     "backend must be one of auto, torch, cpp, cuda, gsplat"),
    # A backend that cannot run on the device fails before the video is even looked at.
    (["train", "/nonexistent/video.mp4", "-o", "{tmp}/run", "--backend", "gsplat", "--device", "cpu"],
     "backend 'gsplat' cannot run here"),
    (["train", "/nonexistent/video.mp4", "-o", "{tmp}/run", "--backend", "cuda", "--device", "cpu"],
     "backend 'cuda' cannot run here"),
])
def test_train_command_bad_input_gives_one_line(args, message, tmp_path, capsys):
    from gsavatar.cli import main

    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and message in err, err


def test_preset_auto_picks_the_cpu_preset_without_cuda_and_says_so(tmp_path, monkeypatch):
    """No --preset: on a machine without CUDA, auto must mean cpu-30min (the GPU preset would run
    for more than a day), and the choice is printed; --preset default on a CPU gets a note."""
    from gsavatar.cli import Train
    from gsavatar.config import load_preset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg, note = Train(tmp_path, tmp_path / "run").config()
    expected = load_preset("cpu-30min")
    assert cfg.render_size == expected.render_size == 256 and cfg.stages == expected.stages
    assert note.startswith("preset auto: cpu-30min") and "no CUDA" in note
    cfg, note = Train(tmp_path, tmp_path / "run", preset="default").config()
    assert cfg.render_size == 512 and "meant for a GPU" in note and "--preset cpu-30min" in note
    cfg, note = Train(tmp_path, tmp_path / "run", preset="cpu-tiny").config()
    assert cfg.stages == load_preset("cpu-tiny").stages and note is None
    # On a CUDA device auto is the GPU preset (the device is only resolved, never used, here).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg, note = Train(tmp_path, tmp_path / "run").config()
    assert cfg.stages == load_preset("default").stages and note.startswith("preset auto: default")
    # --device cpu on a CUDA machine: auto follows the device asked for.
    cfg, note = Train(tmp_path, tmp_path / "run", device="cpu").config()
    assert cfg.render_size == 256 and cfg.device == "cpu" and "cpu-30min" in note


def test_a_run_directory_in_use_is_refused_in_one_line(tmp_path, capsys):
    """A second train on a RUN_DIR that another run holds stops at once; the lock goes with its holder."""
    from gsavatar.cli import main
    from gsavatar.train.run import run_dir_lock

    run = tmp_path / "run"
    args = ["train", str(tmp_path), "-o", str(run)]
    with run_dir_lock(run):
        code = main(args)
        err = capsys.readouterr().err.strip()
        assert code != 0 and len(err.splitlines()) == 1 and "in use by another gsavatar train" in err, err
    code = main(args)  # released: now it gets as far as checking the input
    err = capsys.readouterr().err.strip()
    assert code != 0 and "not a subject dataset" in err, err
