"""Preprocessing the synthetic subject end to end: outputs, sync, masks, caching."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import demo_config, require_preprocess_deps

require_preprocess_deps()

from gsavatar.config import PreprocessConfig  # noqa: E402
from gsavatar.data import masks as M  # noqa: E402
from gsavatar.data.dataset import SubjectDataset  # noqa: E402
from gsavatar.data.preprocess import STAGES, preprocess  # noqa: E402
from gsavatar.errors import Terminated  # noqa: E402


def test_dataset_layout_and_manifest(demo_video, demo_subject):
    root, report = demo_subject
    ds = SubjectDataset(root)
    n = demo_video.num_frames
    m = ds.manifest
    assert m["complete"] and m["num_frames"] == n == 150 and m["fps"] == 25 and m["size"] == 256
    assert len(m["source"]["sha256"]) == 64
    assert set(m["stages"]) == {s.name for s in STAGES} and all(s["done"] for s in m["stages"].values())
    # The last 1/11 of frames is the test split.
    assert m["split"]["test"] == [n - round(n / 11), n] and m["split"]["train"] == [0, n - round(n / 11)]
    assert ds.frame(0).shape == (256, 256, 3) and ds.frame(n - 1).dtype == np.uint8
    assert ds.landmarks.shape == (n, 478, 3)
    assert ds.audio.shape == (n * 640,)
    assert ds.audio_features("logmel").shape == (n, 4, 80)
    assert m["audio_features"]["logmel"]["shape"] == [n, 4, 80]
    assert report["face_fraction"] == 1.0 and report["frames_with_face"] == n
    assert report["peak_rss_mb"] < 3000
    on_disk = json.loads((root / "preprocess_report.json").read_text())
    assert set(on_disk["stages"]) == {s.name for s in STAGES}
    assert all(v["wall_s"] >= 0 for v in on_disk["stages"].values())


def test_mouth_opening_follows_the_ground_truth(demo_video, demo_subject):
    """Landmarks + decoding keep sync: the measured mouth opening tracks the synthetic one at
    lag 0 (a one-frame shift would lower the correlation)."""
    ds = SubjectDataset(demo_subject[0])
    measured = ds.signals["mouth_open"]
    truth = demo_video.mouth_open_px
    r0 = np.corrcoef(measured, truth)[0, 1]
    assert r0 > 0.9, r0
    for lag in (1, 2):
        assert r0 > np.corrcoef(measured[lag:], truth[:-lag])[0, 1]
        assert r0 > np.corrcoef(measured[:-lag], truth[lag:])[0, 1]


def test_audio_energy_matches_the_mouth(demo_video, demo_subject):
    """The stored 16 kHz audio is aligned to frames: per-frame loudness of the decoded track
    correlates with the synthetic envelope at lag 0."""
    ds = SubjectDataset(demo_subject[0])
    rms = np.sqrt((ds.audio.reshape(ds.num_frames, 640) ** 2).mean(axis=1))
    r = np.corrcoef(rms, demo_video.loudness)[0, 1]
    assert r > 0.9, r
    logmel_energy = ds.audio_features("logmel").mean(axis=(1, 2))
    assert np.corrcoef(logmel_energy, demo_video.loudness)[0, 1] > 0.6


def test_masks_are_consistent(demo_subject):
    ds = SubjectDataset(demo_subject[0])
    for k in (0, ds.num_frames // 2, ds.num_frames - 1):
        labels = ds.labels(k)
        person, head, face = labels & M.PERSON > 0, labels & M.HEAD > 0, labels & M.FACE > 0
        mouth, torso = labels & M.MOUTH > 0, labels & M.TORSO > 0
        assert face.sum() > 0.03 * labels.size  # the face is a sizeable region
        assert not (face & ~head).any() and not (mouth & ~face).any()
        assert not (head & torso).any() and not (torso & ~person).any()
        assert torso.sum() > 0.05 * labels.size  # shoulders are there
        # The face mask contains the landmarks' centroid.
        cx, cy = ds.landmarks[k, :, :2].mean(0).round().astype(int)
        assert face[cy, cx]
    # The mouth mask grows when the mouth opens.
    opening = ds.signals["mouth_open"]
    wide, closed = int(np.argmax(opening)), int(np.argmin(opening))
    assert (ds.labels(wide) & M.MOUTH > 0).sum() > 2 * (ds.labels(closed) & M.MOUTH > 0).sum()


def test_background_plate_matches_background_pixels(demo_subject):
    ds = SubjectDataset(demo_subject[0])
    plate = ds.background.astype(float)
    frame, labels = ds.frame(0).astype(float), ds.labels(0)
    bg = labels & M.PERSON == 0
    # Away from the person the plate reproduces the frame (JPEG noise and a slight head sway aside).
    assert np.abs(plate[bg] - frame[bg]).mean() < 12
    # Where the person always is, the plate is filled with background-like colour, not the person.
    face = labels & M.FACE > 0
    assert np.abs(plate[face] - frame[face]).mean() > 20


def test_blink_signal_range(demo_subject):
    ds = SubjectDataset(demo_subject[0])
    blink = ds.signals["blink"]
    assert blink.shape == (ds.num_frames,) and blink.min() >= 0 and blink.max() <= 1
    # The synthetic subject never closes her eyes.
    assert np.median(blink) < 0.3


# The two tests below re-run a copy of the session's finished dataset: a fresh one would cost a whole preprocess.
def test_rerun_skips_and_size_change_reruns(demo_video, subject_copy):
    out = subject_copy
    again = preprocess(demo_video.video_path, out, demo_config())
    assert all(s["skipped"] for s in again["stages"].values())
    resized = preprocess(demo_video.video_path, out, PreprocessConfig(size=192, audio_features=("logmel",)))
    assert resized["stages"]["scan"]["skipped"]  # the crop does not depend on the size
    assert not resized["stages"]["frames"]["skipped"] and not resized["stages"]["masks"]["skipped"]
    assert SubjectDataset(out).frame(0).shape == (192, 192, 3)


def test_interrupted_run_is_not_trusted_and_resumes(demo_video, subject_copy, monkeypatch):
    from gsavatar.errors import IncompleteDatasetError, StoppedBySignal

    out = subject_copy
    cfg = demo_config()
    # Force the masks stage to re-run and die half way (as a kill would).
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"]["masks"]["key"] = "stale"
    (out / "manifest.json").write_text(json.dumps(manifest))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "label_map", boom)
    with pytest.raises(StoppedBySignal, match="during the masks stage"):
        preprocess(demo_video.video_path, out, cfg)
    with pytest.raises(IncompleteDatasetError, match="masks"):
        SubjectDataset(out)
    assert (out / "masks").is_dir() and not list(out.glob(".masks.*"))  # old masks kept, temp removed
    monkeypatch.undo()
    report = preprocess(demo_video.video_path, out, cfg)
    assert report["stages"]["landmarks"]["skipped"] and not report["stages"]["masks"]["skipped"]
    assert SubjectDataset(out).manifest["complete"]


def test_interrupt_in_a_new_folder_keeps_finished_stages_and_resumes(demo_video, tmp_path, monkeypatch):
    """Ctrl-C in the last stage of a run into a new folder keeps the finished stages and the manifest
    recording them (only the unfinished stage's temporaries go), and the same call resumes."""
    import gsavatar.tracking.tracker as tracker
    from gsavatar.errors import IncompleteDatasetError, StoppedBySignal

    out, cfg = tmp_path / "subject", demo_config()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracker, "track_landmarks", interrupted)
    with pytest.raises(StoppedBySignal) as stopped:
        preprocess(demo_video.video_path, out, cfg)
    assert stopped.value.exit_code == 130 and isinstance(stopped.value.__cause__, KeyboardInterrupt)
    message = str(stopped.value)
    assert "SIGINT" in message and "tracking" in message and "audio_features" in message and "same command" in message
    manifest = json.loads((out / "manifest.json").read_text())
    earlier = [s.name for s in STAGES if s.name != "tracking"]
    assert not manifest["complete"] and not manifest["stages"]["tracking"]["done"]
    assert all(manifest["stages"][name]["done"] for name in earlier)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    with pytest.raises(IncompleteDatasetError):
        SubjectDataset(out)
    kept = [out / "scan.json", out / "frames" / "000000.jpg", out / "landmarks.npz", out / "features" / "logmel.npy"]
    mtimes = [p.stat().st_mtime_ns for p in kept]
    monkeypatch.undo()
    report = preprocess(demo_video.video_path, out, cfg)
    assert [name for name, s in report["stages"].items() if not s["skipped"]] == ["tracking"]
    assert [p.stat().st_mtime_ns for p in kept] == mtimes
    assert SubjectDataset(out).manifest["complete"]


@pytest.mark.parametrize("interrupt, code, name", [(KeyboardInterrupt, 130, "SIGINT"), (Terminated, 143, "SIGTERM")])
def test_interrupted_command_says_what_it_kept(demo_video, subject_copy, monkeypatch, capsys, interrupt, code, name):
    """`gsavatar preprocess` stopped by Ctrl-C / SIGTERM exits 128 + the signal's number with one line
    naming the kept stages and the way to resume; a killed run's leftover temporaries of the stage
    that runs again are removed, the finished stages' files are not touched."""
    import gsavatar.tracking.tracker as tracker
    from gsavatar.cli import main

    out = subject_copy
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"]["tracking"]["key"] = "stale"  # tracking runs again
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / ".tracking.npz.k1ll3d.tmp.npz").write_bytes(b"left by a SIGKILL")

    def interrupted(*args, **kwargs):
        raise interrupt()

    monkeypatch.setattr(tracker, "track_landmarks", interrupted)
    before = (out / "landmarks.npz").stat().st_mtime_ns
    assert main(["preprocess", str(demo_video.video_path), "-o", str(out), "--size", "256", "--audio-features", "logmel"]) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert name in lines[0] and "tracking stage" in lines[0] and "audio_features" in lines[0], lines[0]
    assert "run the same command to resume" in lines[0] and str(out) in lines[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and not manifest["stages"]["tracking"]["done"]
    assert all(r["done"] for s, r in manifest["stages"].items() if s != "tracking")
    assert (out / "landmarks.npz").stat().st_mtime_ns == before and (out / "tracking.npz").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
