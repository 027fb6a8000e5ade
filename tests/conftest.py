"""Shared fixtures: the synthetic subject (made once per session) and small video makers."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

os.environ.setdefault("GLOG_minloglevel", "2")


def require_preprocess_deps():
    for module in ("av", "mediapipe", "skimage", "cv2"):
        pytest.importorskip(module, reason=f"preprocessing tests need {module} (pip install 'gsavatar[preprocess]')")


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """Each test starts on the thread count the suite started with, whatever the one before set
    (the viewer tests pin torch to one thread, as ``gsavatar view`` does)."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_video(tmp_path_factory):
    """A 6 s synthetic talking head at 256 px with its ground truth."""
    require_preprocess_deps()
    from gsavatar.data.synthetic import make_synthetic_subject

    return make_synthetic_subject(tmp_path_factory.mktemp("demo") / "demo.mp4", duration_s=6.0, size=256, seed=1)


def demo_config():
    """How ``demo_subject`` is preprocessed: 256 px, log-mel features."""
    from gsavatar.config import PreprocessConfig

    return PreprocessConfig(size=256, audio_features=("logmel",))


@pytest.fixture(scope="session")
def demo_subject(demo_video, tmp_path_factory):
    """The synthetic subject preprocessed with ``demo_config()``; returns (dir, report)."""
    from gsavatar.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("subject") / "subject"
    report = preprocess(demo_video.video_path, out, demo_config())
    return out, report


@pytest.fixture()
def subject_copy(demo_subject, tmp_path):
    """A copy of ``demo_subject`` that a test may change (re-run stages, interrupt them)."""
    dst = tmp_path / "subject"
    shutil.copytree(demo_subject[0], dst)
    return dst


@contextlib.contextmanager
def cpu_kernels_built_meanwhile(session: pytest.Session, enabled: bool):
    """While the block runs, builds the CPU kernels in a thread when ``enabled`` and a collected test
    needs them (tests/test_kernels_*.py), one compiler job at a time; returns once both are done. A
    build failure is remembered by gsavatar.kernels, and the kernel tests report it."""
    from gsavatar import kernels

    if not enabled or not kernels.available("cpp") or not any(
            item.path.name.startswith("test_kernels_") for item in session.items):
        yield
        return

    def build():
        with contextlib.suppress(kernels.KernelBuildError):
            kernels.load("cpp")

    with pytest.MonkeyPatch.context() as env:
        env.setenv("MAX_JOBS", "1")  # read by torch's extension builder
        thread = threading.Thread(target=build, name="cpu kernel build")
        thread.start()
        try:
            yield
        finally:
            thread.join()


@pytest.fixture(scope="session")
def trained(demo_subject, tmp_path_factory, request):
    """The cpu-tiny preset trained on the synthetic subject (about 2 minutes on 2 cores), once per
    session: (subject_dir, run_dir, summary). Tests must not write into run_dir."""
    from gsavatar.config import load_preset
    from gsavatar.train.trainer import train

    subject, _ = demo_subject
    run = tmp_path_factory.mktemp("run") / "tiny"
    cfg = load_preset("cpu-tiny")
    # Training on one CPU thread leaves the other core idle: the kernel build (a minute on a fresh
    # clone) runs there instead of in the suite's own time.
    with cpu_kernels_built_meanwhile(request.session, enabled=cfg.cpu_threads == 1):
        summary = train(subject, run, cfg, show_progress=False)
    return subject, run, summary


def remux(src: Path, dst: Path, until_s: float = math.inf, options: dict | None = None) -> None:
    """Copy ``src``'s first video and audio streams into ``dst`` packet by packet (nothing re-encoded),
    keeping the packets that start before ``until_s``."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", options=options or {}) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in (inp.streams.video[0], inp.streams.audio[0])}
        for packet in inp.demux():
            if packet.dts is None or packet.pts * packet.time_base >= until_s:
                continue
            packet.stream = streams[packet.stream.index]
            out.mux(packet)


def assert_same_image_but_cutoff_flips(got, want, what: str, atol: float = 1e-5, max_fraction: float = 0.01):
    """Two renders of the same Gaussians whose parameters differ only by float32 rounding.

    Rounding moves a pixel by ~1e-7, except where some Gaussian's alpha there sits on the 1/255
    cut-off: its contribution (alpha <= ~1/255 of a colour <= 1, and as much of what lies behind)
    then appears in one render and not the other. A Gaussian whose opacity is itself near 1/255
    flips over its whole footprint, so such pixels are not always isolated. So: within ``atol``
    but for at most ``max_fraction`` of the pixels, and those within 2/255. A real error (a stale
    cache, a wrong transform) moves most of the image, or some pixel by more.
    """
    diff = (got - want).abs().reshape(-1, got.shape[-1]).amax(-1)
    off = diff > atol
    assert off.float().mean() <= max_fraction and diff.max() <= 2 / 255, \
        f"{what}: {int(off.sum())} of {off.numel()} pixels differ by more than {atol}, up to {float(diff.max()):.2e}"


def tone(seconds: float, rate: int = 16000, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="session")
def avatar_file(request):
    """A trained avatar: ``$GSAVATAR_TEST_AVATAR`` (an avatar.pt; how a GPU machine without the
    preprocessing dependencies runs these tests) or the session's cpu-tiny run on the demo subject."""
    from gsavatar.model.io import find_avatar_file

    given = os.environ.get("GSAVATAR_TEST_AVATAR")
    if given:
        return find_avatar_file(given)
    _, run_dir, _ = request.getfixturevalue("trained")
    return find_avatar_file(run_dir)


def driven_avatar(path, device):
    """(avatar, one frame's inputs), driven from the checkpoint alone as `gsavatar render` drives it."""
    import numpy as np

    from gsavatar.drive import build_drive
    from gsavatar.model.io import load_run

    bundle = load_run(path, device)
    speech = 0.1 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    return bundle.avatar, build_drive(bundle.subject, speech).inputs(12, bundle.avatar, device=device)


def avatar_frame_with_grads(avatar, inputs, backends):
    """``{backend: (frame, parameter gradients)}``: the frame rendered through each backend and
    backpropagated from a fixed random weighting of its pixels, every branch's ``means2d.grad``
    kept (what densification reads)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(inputs.height, inputs.width, 3, generator=generator).to(inputs.viewmat.device)
    results = {}
    for name in backends:
        avatar.zero_grad()
        out = avatar(inputs, backend=name)
        for branch in out.branches.values():
            branch.means2d.retain_grad()
        (out.image * weights).sum().backward()
        results[name] = (out, {n: p.grad.clone() for n, p in avatar.named_parameters() if p.grad is not None})
    return results

