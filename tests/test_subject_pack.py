"""bench/subject_pack.py: a packed subject unpacks, without PyAV, into a subject
dataset that loads and trains, with frames close to the originals and masks unchanged."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "subject_pack.py"
PSNR_MEAN_BAR = 40.0  # dB, decoded frames vs the subject's JPEGs
PSNR_FRAME_BAR = 38.0  # dB, every single frame


def run_script(*args, block_av: bool = False) -> subprocess.CompletedProcess:
    """Run the script's main in a fresh interpreter; with ``block_av``, ``import av`` fails there."""
    block = "sys.modules['av'] = None; " if block_av else ""
    code = f"import runpy, sys; {block}sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    peak = 255.0 if np.asarray(a).dtype == np.uint8 else 1.0
    return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)


def read_bgr(path: Path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_COLOR)


@pytest.fixture(scope="module")
def packed(demo_subject, tmp_path_factory):
    """(subject, pack, unpacked): the session's synthetic subject packed, then unpacked with PyAV blocked."""
    pytest.importorskip("av", reason="packing needs PyAV")
    subject, _ = demo_subject
    base = tmp_path_factory.mktemp("pack")
    pack, unpacked = base / "pack", base / "unpacked"
    r = run_script("pack", subject, pack)
    assert r.returncode == 0, r.stderr
    assert "MiB" in r.stdout and "PSNR" in r.stdout
    r = run_script("unpack", pack, unpacked, block_av=True)
    assert r.returncode == 0, r.stderr
    assert "unpacked in" in r.stdout
    return subject, pack, unpacked


def test_pack_contents(packed):
    subject, pack, _ = packed
    manifest = json.loads((subject / "manifest.json").read_text())
    info = json.loads((pack / "pack.json").read_text())
    assert info["num_frames"] == manifest["num_frames"] and info["size"] == manifest["size"]
    assert info["crf"] == 12 and info["video"]["pix_fmt"] == "yuv444p"
    assert info["source"] == str(subject.resolve())
    assert info["psnr_db"]["mean"] >= PSNR_MEAN_BAR and info["psnr_db"]["min"] >= PSNR_FRAME_BAR
    assert not (pack / "frames").exists() and not (pack / "matte").exists() and not (pack / "landmarks.npz").exists()
    assert (pack / "frames.mp4").is_file() and "masks/000000.png" in info["files"]


def test_unpacked_frames_and_files(packed):
    subject, _, unpacked = packed
    n = json.loads((subject / "manifest.json").read_text())["num_frames"]
    names = sorted(p.name for p in (unpacked / "frames").iterdir())
    assert names == sorted(p.name for p in (subject / "frames").iterdir())
    assert len(names) == n
    values = [psnr(read_bgr(subject / "frames" / name), read_bgr(unpacked / "frames" / name)) for name in names]
    assert np.mean(values) >= PSNR_MEAN_BAR and min(values) >= PSNR_FRAME_BAR
    masks = sorted(p.name for p in (subject / "masks").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(subject / "masks", unpacked / "masks", masks, shallow=False)
    assert len(match) == n and not mismatch and not errors  # byte for byte
    for name in ("manifest.json", "tracking.npz", "signals.npz", "background.png", "audio.wav", "features/logmel.npy"):
        assert filecmp.cmp(subject / name, unpacked / name, shallow=False), name


def test_unpacked_subject_loads_and_trains(packed, tmp_path):
    import torch

    from gsavatar.config import load_preset
    from gsavatar.data.frames import SubjectFrames
    from gsavatar.train.trainer import train

    torch.set_num_threads(1)
    subject, _, unpacked = packed
    size = json.loads((subject / "manifest.json").read_text())["size"]
    original, copy = SubjectFrames(subject, size), SubjectFrames(unpacked, size)
    assert copy.num_frames == original.num_frames
    a, b = original.frame(0), copy.frame(0)
    assert psnr(a.image.numpy(), b.image.numpy()) >= PSNR_MEAN_BAR
    for mask in ("head", "face", "mouth", "torso", "person"):
        assert torch.equal(getattr(a, mask), getattr(b, mask)), mask
    assert torch.equal(original.viewmats, copy.viewmats) and torch.equal(original.audio, copy.audio)

    cfg = load_preset("cpu-tiny")  # two steps per stage: the trainer runs end to end on the unpack
    cfg = dataclasses.replace(cfg, eval_frames=2, stages=[dataclasses.replace(s, iterations=2, static_iterations=0)
                                                          for s in cfg.stages])
    summary = train(unpacked, tmp_path / "run", cfg, show_progress=False)
    assert summary["iterations"] == 2 * len(cfg.stages) and (tmp_path / "run" / "avatar.pt").is_file()


def test_unpack_is_idempotent(packed):
    _, pack, unpacked = packed
    frame = unpacked / "frames" / "000000.jpg"
    before = frame.stat().st_mtime_ns
    r = run_script("unpack", pack, unpacked, block_av=True)
    assert r.returncode == 0 and "already unpacked" in r.stdout
    assert frame.stat().st_mtime_ns == before


def _missing_video(pack: Path) -> None:
    (pack / "frames.mp4").unlink()


def _wrong_frame_count(pack: Path) -> None:
    info = json.loads((pack / "pack.json").read_text())
    info["num_frames"] += 1
    (pack / "pack.json").write_text(json.dumps(info))


def _truncated_video(pack: Path) -> None:
    video = pack / "frames.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])


def _changed_mask(pack: Path) -> None:
    with open(pack / "masks" / "000000.png", "ab") as f:
        f.write(b"\0")


@pytest.mark.parametrize("damage, message", [(_missing_video, "no frames.mp4"), (_wrong_frame_count, "pack.json says"),
                                             (_truncated_video, "does not match pack.json"),
                                             (_changed_mask, "does not match pack.json")])
def test_bad_pack_is_one_line_error(packed, tmp_path, damage, message):
    _, pack, _ = packed
    bad = tmp_path / "bad"
    shutil.copytree(pack, bad)
    damage(bad)
    target = tmp_path / "out" / "subject"
    r = run_script("unpack", bad, target, block_av=True)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    out = tmp_path / "out"
    assert not target.exists() and (not out.exists() or not any(out.iterdir()))  # nothing half-written


def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    for args in (("unpack", tmp_path / "empty", tmp_path / "s"), ("pack", tmp_path / "empty", tmp_path / "p"),
                 ("pack", tmp_path / "nowhere", tmp_path / "p")):
        r = run_script(*args)
        assert r.returncode == 1 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "s").exists() and not (tmp_path / "p").exists()
