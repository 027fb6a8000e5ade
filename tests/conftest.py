"""Shared fixtures: the synthetic subject (made once per session) and small video makers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

os.environ.setdefault("GLOG_minloglevel", "2")


def require_preprocess_deps():
    for module in ("av", "mediapipe", "skimage", "cv2"):
        pytest.importorskip(module, reason=f"preprocessing tests need {module} (pip install 'gsavatar[preprocess]')")


@pytest.fixture(scope="session")
def demo_video(tmp_path_factory):
    """A 6 s synthetic talking head at 256 px with its ground truth."""
    require_preprocess_deps()
    from gsavatar.data.synthetic import make_synthetic_subject

    return make_synthetic_subject(tmp_path_factory.mktemp("demo") / "demo.mp4", duration_s=6.0, size=256, seed=1)


@pytest.fixture(scope="session")
def demo_subject(demo_video, tmp_path_factory):
    """The synthetic subject preprocessed at 256 px with log-mel features; returns (dir, report)."""
    from gsavatar.config import PreprocessConfig
    from gsavatar.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("subject") / "subject"
    report = preprocess(demo_video.video_path, out, PreprocessConfig(size=256, audio_features=("logmel",)))
    return out, report


@pytest.fixture(scope="session")
def trained(demo_subject, tmp_path_factory):
    """The cpu-tiny preset trained on the synthetic subject (about 2 minutes on 2 cores), once per
    session: (subject_dir, run_dir, summary). Tests must not write into run_dir."""
    from gsavatar.config import load_preset
    from gsavatar.train.trainer import train

    subject, _ = demo_subject
    run = tmp_path_factory.mktemp("run") / "tiny"
    summary = train(subject, run, load_preset("cpu-tiny"), show_progress=False)
    return subject, run, summary


def tone(seconds: float, rate: int = 16000, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
