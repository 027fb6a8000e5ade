"""Driving a trained avatar with any speech: audio -> per-frame inputs (pose, blink, camera).

Everything that renders an avatar from new audio (``gsavatar render``, the viewer, the
evaluation of novel-audio lip-sync) goes through :class:`DriveSequence`:

    speech file --load_speech--> 16 kHz mono --speech_features--> [N, S, D] (the avatar's own extractor)
    training sequence --pose_sequence / blink_sequence--> head pose and blink for N frames
    camera path (train view, orbit, zoom, JSON keyframes) --camera_path--> [N, 4, 4]

N = round(audio seconds x 25): frame k owns audio samples [640 k, 640 (k + 1)), the same time
base as preprocessing (gsavatar.data.video), so a render is in sync from the first frame to
the last. A camera transform acts on camera-frame points (it moves the viewer, not the head):
the face and mouth are drawn with ``camera @ viewmat``, the torso (which lives in the camera
frame) with ``camera``; the background plate is an image and does not move.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path

import numpy as np
import torch

from gsavatar.config import DriveConfig, check_frame_size, check_number
from gsavatar.data.timebase import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from gsavatar.errors import InputError
from gsavatar.model.audio import AudioSpec
from gsavatar.model.io import SubjectInfo
from gsavatar.tracking.camera import scale_intrinsics

__all__ = ["FPS", "SAMPLE_RATE", "SAMPLES_PER_FRAME", "DriveConfig", "DriveSequence", "SpeechFeaturizer", "build_drive",
           "camera_path", "load_keyframes", "load_speech", "speech_features"]

SPEECH_SUFFIXES = (".wav", ".mp3", ".m4a", ".mp4", ".aac", ".flac", ".ogg", ".webm", ".mov", ".mkv")

# -- audio ------------------------------------------------------------------------------------
def load_speech(path: str | Path, max_seconds: float | None = None, min_seconds: float = 0.2) -> np.ndarray:
    """Decode the first audio stream of any file FFmpeg reads to 16 kHz mono float32 in [-1, 1].

    Raises :class:`InputError` with one line for a missing file, a file with no audio, an
    unreadable file, or audio shorter than ``min_seconds`` / longer than ``max_seconds``.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such audio file: {path}")
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise InputError(f"{path.name} has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            limit = None if max_seconds is None else int((max_seconds + 1) * SAMPLE_RATE)
            total = 0
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].size
                if limit is not None and total > limit:
                    raise InputError(f"{path.name} is longer than the limit of {max_seconds:g} s")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
            stream = container.streams.audio[0]
            declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    except InputError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InputError(f"{path.name} is not a readable audio file ({text})") from None
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if declared is not None and 0 < round(declared * SAMPLE_RATE) < samples.size:
        # AAC pads its last frame to 1024 samples; the container's duration (edit list) says
        # where the real audio ends (a 2.000 s m4a decodes to 2.048 s otherwise: one frame too many).
        samples = samples[: int(round(declared * SAMPLE_RATE))]
    seconds = samples.size / SAMPLE_RATE
    if seconds < min_seconds:
        raise InputError(f"{path.name} holds {seconds:.2f} s of audio; at least {min_seconds:g} s is needed")
    if max_seconds is not None and seconds > max_seconds:
        raise InputError(f"{path.name} is {seconds:.1f} s long, over the limit of {max_seconds:g} s")
    if not np.isfinite(samples).all():
        raise InputError(f"{path.name} decodes to NaN or infinite samples")
    return np.clip(samples, -1.0, 1.0)


SILENCE_PEAK_DBFS = -60.0
"""Audio whose loudest sample stays below this (dB of full scale) counts as silence."""


def silence_note(samples: np.ndarray, name: str) -> str | None:
    """One line telling the user that ``samples`` (from the file ``name``) are silent and the avatar
    will idle (mouth closed; blinks and head motion go on), or None when there is sound. Silence is
    not an error: a pause or an idle clip is a legitimate drive, but a wrong track usually is not."""
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    if peak >= 10 ** (SILENCE_PEAK_DBFS / 20):
        return None
    level = "digital silence" if peak == 0 else f"peak {20 * math.log10(peak):.0f} dBFS"
    return f"{name} is silent ({level}): the avatar idles (mouth closed)"


def frame_count(samples: np.ndarray) -> int:
    """Video frames for an audio track: round(seconds x 25), at least one."""
    return max(1, int(round(len(samples) / SAMPLES_PER_FRAME)))


class SpeechFeaturizer:
    """The extractor the avatar was trained with, built once and kept (a viewer turns every upload
    into features; rebuilding Whisper for each cost ~0.27 s of a 0.93 s upload of 5 s). Calls are
    serialised: one extractor is shared by every thread that uses this object."""

    def __init__(self, audio: AudioSpec):
        self.description = audio.extractor or {"kind": audio.kind, "options": {}}
        self.expected = (audio.steps_per_frame, audio.feature_dim)
        self._extractor = None
        self._lock = threading.Lock()

    def __call__(self, samples: np.ndarray, num_frames: int | None = None) -> torch.Tensor:
        """``[N, S, D]`` features of 16 kHz ``samples`` (N = :func:`frame_count` unless given)."""
        n = frame_count(samples) if num_frames is None else int(num_frames)
        with self._lock:
            if self._extractor is None:
                from gsavatar.data.audio_features import extractor_from_description

                self._extractor = extractor_from_description(self.description)
            feats = self._extractor.extract(np.asarray(samples, np.float32), n, sample_rate=SAMPLE_RATE)
        if feats.shape[1:] != self.expected:
            raise InputError(f"the {self.description['kind']} extractor gives features {feats.shape[1:]}, "
                             f"the avatar was trained on {self.expected}")
        return torch.from_numpy(np.ascontiguousarray(feats, np.float32))


def speech_features(audio: AudioSpec, samples: np.ndarray, num_frames: int | None = None) -> torch.Tensor:
    """``[N, S, D]`` features of ``samples`` made by the extractor the avatar was trained with
    (built for this call; keep a :class:`SpeechFeaturizer` to make features more than once)."""
    return SpeechFeaturizer(audio)(samples, num_frames)


# -- head pose and blink ----------------------------------------------------------------------
def pingpong(num: int, length: int) -> np.ndarray:
    """Indices 0, 1, ..., L-1, L-2, ..., 1, 0, 1, ... (``num`` of them): a loop with no jump."""
    if length <= 1:
        return np.zeros(num, np.int64)
    period = 2 * (length - 1)
    k = np.arange(num) % period
    return np.where(k < length, k, period - k).astype(np.int64)


def _gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Smooth ``[N, C]`` along N with a Gaussian (edges replicated)."""
    if sigma <= 0 or len(x) < 2:
        return x
    r = int(math.ceil(3 * sigma))
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    w /= w.sum()
    padded = np.concatenate([np.repeat(x[:1], r, 0), x, np.repeat(x[-1:], r, 0)])
    return np.stack([np.convolve(padded[:, c], w, mode="valid") for c in range(x.shape[1])], 1)


def source_frames(subject: SubjectInfo) -> np.ndarray:
    """The training split's frame indices (the motion the avatar has seen)."""
    lo, hi = subject.train
    return np.arange(int(lo), int(hi))


def pose_sequence(subject: SubjectInfo, num: int, cfg: DriveConfig) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``(viewmats [N,4,4], poses [N,6], source indices [N])`` for ``num`` output frames."""
    from gsavatar.tracking.camera import axis_angle_to_matrix

    frames = source_frames(subject)
    poses_all = subject.poses.detach().cpu().numpy().astype(np.float64)
    if cfg.pose == "still":
        src = np.full(num, frames[len(frames) // 2], np.int64)
        poses = np.repeat(np.median(poses_all[frames], 0, keepdims=True), num, 0)
    elif cfg.pose == "loop":
        src = frames[pingpong(num, len(frames))]
        poses = _gaussian_smooth(poses_all[src], cfg.pose_smoothing_frames)
    else:
        raise InputError(f"unknown pose mode {cfg.pose!r} (loop or still)")
    poses_t = torch.from_numpy(poses.astype(np.float32))
    viewmats = torch.zeros(num, 4, 4)
    viewmats[:, :3, :3] = axis_angle_to_matrix(poses_t[:, :3])
    viewmats[:, :3, 3] = poses_t[:, 3:]
    viewmats[:, 3, 3] = 1
    return viewmats, poses_t, src


def generated_blinks(num: int, rng: np.random.Generator, rate_per_min: float = 17.0, duration_s: float = 0.25,
                     strength: float = 1.0) -> np.ndarray:
    """A blink signal in [0, 1] at a human rate (about 17 a minute; gaps 1.5 s at least) and duration (~0.25 s)."""
    out = np.zeros(num, np.float32)
    mean_gap = 60.0 / rate_per_min
    t = rng.uniform(0.5, mean_gap) * FPS
    half = duration_s * FPS / 2
    while t < num:
        k = np.arange(max(0, int(t - half) - 1), min(num, int(t + half) + 2))
        shape = np.clip(1 - np.abs(k - t) / half, 0, 1)  # closes and opens over `duration_s`
        out[k] = np.maximum(out[k], strength * (0.5 - 0.5 * np.cos(np.pi * shape)))
        t += max(1.5, rng.gamma(4.0, mean_gap / 4.0)) * FPS
    return out


def blink_sequence(subject: SubjectInfo, num: int, src: np.ndarray, cfg: DriveConfig) -> torch.Tensor:
    blink = subject.blink.detach().cpu().numpy().astype(np.float32)
    if cfg.blink == "track":
        return torch.from_numpy(blink[src])
    if cfg.blink == "generate":
        strength = float(np.quantile(blink[source_frames(subject)], 0.99)) or 1.0
        return torch.from_numpy(generated_blinks(num, np.random.default_rng(cfg.seed), strength=strength))
    if cfg.blink == "none":
        return torch.zeros(num)
    raise InputError(f"unknown blink mode {cfg.blink!r} (track, generate or none)")


class EndlessMotion:
    """Head pose and blink for frame ``k`` of a stream with no known end (live speech): the same
    values :func:`pose_sequence` and :func:`blink_sequence` give frame ``k`` of a drive of any
    length, except a drive's last frames, whose pose smoothing sees that drive's end. The ping-pong
    loop has no end, so neither has this; generated blinks repeat after ``blink_period_frames``."""

    def __init__(self, subject: SubjectInfo, cfg: DriveConfig | None = None, blink_period_frames: int = 3600 * FPS):
        from gsavatar.tracking.camera import axis_angle_to_matrix

        self.cfg = cfg or DriveConfig()
        self._rotation = axis_angle_to_matrix
        self._frames = source_frames(subject)
        self._poses = subject.poses.detach().cpu().numpy().astype(np.float64)
        self._blink = subject.blink.detach().cpu().numpy().astype(np.float32)
        if self.cfg.pose not in ("loop", "still"):
            raise InputError(f"unknown pose mode {self.cfg.pose!r} (loop or still)")
        if self.cfg.blink not in ("track", "generate", "none"):
            raise InputError(f"unknown blink mode {self.cfg.blink!r} (track, generate or none)")
        self._still = np.median(self._poses[self._frames], 0)
        sigma = self.cfg.pose_smoothing_frames
        self._radius = int(math.ceil(3 * sigma)) if sigma > 0 else 0
        w = np.exp(-0.5 * (np.arange(-self._radius, self._radius + 1) / sigma) ** 2) if sigma > 0 else np.ones(1)
        self._weights = w / w.sum()
        self._generated = None
        if self.cfg.blink == "generate":
            strength = float(np.quantile(self._blink[self._frames], 0.99)) or 1.0
            self._generated = generated_blinks(blink_period_frames, np.random.default_rng(self.cfg.seed), strength=strength)

    def source(self, k: int) -> int:
        """The training frame whose motion frame ``k`` plays (before smoothing)."""
        if self.cfg.pose == "still":
            return int(self._frames[len(self._frames) // 2])
        return int(self._frames[_pingpong_at(k, len(self._frames))])

    def at(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(viewmat [4, 4], pose [6], blink [])`` of frame ``k`` (float32)."""
        if self.cfg.pose == "still":
            pose = self._still
        else:
            ks = np.clip(np.arange(k - self._radius, k + self._radius + 1), 0, None)  # the start edge replicated
            src = self._frames[[_pingpong_at(int(j), len(self._frames)) for j in ks]]
            pose = self._weights @ self._poses[src]
        pose_t = torch.from_numpy(pose.astype(np.float32))
        viewmat = torch.eye(4)
        viewmat[:3, :3] = self._rotation(pose_t[None, :3])[0]
        viewmat[:3, 3] = pose_t[3:]
        if self.cfg.blink == "track":
            blink = self._blink[self.source(k)]
        elif self.cfg.blink == "generate":
            blink = self._generated[k % len(self._generated)]
        else:
            blink = 0.0
        return viewmat, pose_t, torch.tensor(float(blink))


def _pingpong_at(k: int, length: int) -> int:
    """Element ``k`` of :func:`pingpong` (without building the sequence)."""
    if length <= 1:
        return 0
    period = 2 * (length - 1)
    k %= period
    return k if k < length else period - k


# -- camera paths -----------------------------------------------------------------------------
def _rotation(yaw_deg: float, pitch_deg: float, roll_deg: float = 0.0) -> np.ndarray:
    y, p, r = np.radians([yaw_deg, pitch_deg, roll_deg])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def orbit_transform(centre: np.ndarray, yaw_deg: float, pitch_deg: float, roll_deg: float = 0.0,
                    distance_scale: float = 1.0) -> np.ndarray:
    """A camera-frame rigid transform: turn the view by yaw/pitch/roll about ``centre`` (camera
    coordinates, metres) and scale the camera's distance to it by ``distance_scale``."""
    centre = np.asarray(centre, np.float64)
    e = np.eye(4)
    e[:3, :3] = _rotation(yaw_deg, pitch_deg, roll_deg)
    # Rotate about the centre, then slide along the optical axis so the centre's depth is scaled.
    e[:3, 3] = centre - e[:3, :3] @ centre + np.array([0.0, 0.0, (distance_scale - 1.0) * centre[2]])
    return e


MAX_KEYFRAME_SECONDS = 24 * 3600.0
"""Keyframe times beyond a day are taken for a mistake."""
MIN_ZOOM, MAX_ZOOM = 0.05, 20.0
"""Zoom factors a camera path may use: beyond them the head is a speck or the camera sits inside it."""


def load_keyframes(path: str | Path) -> list[dict]:
    """Read a camera-path JSON: ``{"keyframes": [{"t": seconds, "yaw": deg, "pitch": deg, "roll": deg,
    "zoom": factor}, ...]}`` (missing angles are 0, zoom 1; at least one keyframe, times increasing)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        keys = data["keyframes"] if isinstance(data, dict) else data
        out = [{"t": float(k["t"]), "yaw": float(k.get("yaw", 0)), "pitch": float(k.get("pitch", 0)),
                "roll": float(k.get("roll", 0)), "zoom": float(k.get("zoom", 1))} for k in keys]
        for i, k in enumerate(out):
            check_number(f"{path.name}: keyframe {i} t (seconds)", k["t"], 0.0, MAX_KEYFRAME_SECONDS)
            for angle in ("yaw", "pitch", "roll"):
                check_number(f"{path.name}: keyframe {i} {angle} (degrees)", k[angle], -360.0, 360.0)
            check_number(f"{path.name}: keyframe {i} zoom", k["zoom"], MIN_ZOOM, MAX_ZOOM)
    except FileNotFoundError:
        raise InputError(f"no such camera path file: {path}") from None
    except InputError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{path.name} is not a camera path ({type(e).__name__}: {e}); "
                         'expected {"keyframes": [{"t": 0, "yaw": 0, "pitch": 0, "zoom": 1}, ...]}') from None
    if not out:
        raise InputError(f"{path.name} has no keyframes")
    times = [k["t"] for k in out]
    if any(b <= a for a, b in zip(times, times[1:])):
        raise InputError(f"{path.name}: keyframe times must increase")
    return out


def camera_path(cfg: DriveConfig, num: int, centre: np.ndarray) -> torch.Tensor:
    """``[N, 4, 4]`` camera-frame transforms for the path named by ``cfg.camera``."""
    t = np.arange(num) / FPS
    if cfg.camera == "train":
        mats = np.repeat(np.eye(4)[None], num, 0)
    elif cfg.camera == "orbit":
        phase = 2 * np.pi * t / cfg.orbit_period_s
        mats = np.stack([orbit_transform(centre, cfg.orbit_yaw_deg * math.sin(p), cfg.orbit_pitch_deg * math.sin(2 * p))
                         for p in phase])
    elif cfg.camera == "zoom":
        s = t / max(t[-1], 1e-6) if num > 1 else np.zeros(1)
        s = s * s * (3 - 2 * s)  # ease in and out
        mats = np.stack([orbit_transform(centre, 0, 0, 0, 1.0 / (1 + (cfg.zoom_factor - 1) * x)) for x in s])
    else:
        keys = load_keyframes(cfg.camera)
        kt = np.array([k["t"] for k in keys])
        value = {name: np.interp(t, kt, [k[name] for k in keys]) for name in ("yaw", "pitch", "roll", "zoom")}
        mats = np.stack([orbit_transform(centre, value["yaw"][i], value["pitch"][i], value["roll"][i], 1.0 / value["zoom"][i])
                         for i in range(num)])
    return torch.from_numpy(mats.astype(np.float32))


def head_centre(subject: SubjectInfo) -> np.ndarray:
    """The head-frame origin in camera coordinates, averaged over the training frames."""
    frames = source_frames(subject)
    return subject.poses[frames, 3:].detach().cpu().numpy().astype(np.float64).mean(0)


# -- the sequence -----------------------------------------------------------------------------
@dataclasses.dataclass
class DriveSequence:
    """Everything needed to render ``len(self)`` frames of the avatar driven by one audio track."""

    audio: torch.Tensor  # [N, S, D] raw features
    viewmats: torch.Tensor  # [N, 4, 4] head frame -> tracked camera
    poses: torch.Tensor  # [N, 6]
    blink: torch.Tensor  # [N]
    cameras: torch.Tensor  # [N, 4, 4] camera-frame transforms (identity: the training view)
    K: torch.Tensor  # [3, 3] at (size, size)
    size: int
    samples: np.ndarray | None = None  # 16 kHz mono, len = N * 640 when built from audio
    _copies: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)  # device -> tensors

    def __len__(self) -> int:
        return int(self.audio.shape[0])

    def on(self, device: str | torch.device) -> dict[str, torch.Tensor]:
        """The per-frame tensors on ``device``, copied there once and kept: a copy from pageable
        host memory to a GPU waits for the GPU's queue to drain, which per frame would stall the
        render loop (a few hundred KB per minute of audio, so keeping them costs nothing)."""
        device = torch.device(device)
        key = str(device)
        copies = self._copies.get(key)
        if copies is None:
            copies = {name: getattr(self, name).to(device) for name in ("audio", "viewmats", "poses", "blink", "cameras", "K")}
            self._copies[key] = copies  # two threads may both copy; either result is the same
        return copies

    def inputs(self, index: int, avatar, camera: torch.Tensor | None = None, background: torch.Tensor | None = None,
               device: str | torch.device = "cpu"):
        """``avatar``'s FrameInputs of frame ``index`` on ``device`` (indexing copies kept there, see
        :meth:`on`); ``camera`` overrides the path's transform (the viewer's camera)."""
        t = self.on(device)
        if camera is None:
            cam = t["cameras"][index]
        elif camera.device.type == "cpu" and t["cameras"].device.type == "cuda":
            cam = camera.pin_memory().to(t["cameras"].device, non_blocking=True)  # no wait for the queue
        else:
            cam = camera.to(t["cameras"].device)
        return avatar.frame_inputs(t["audio"], index, viewmat=t["viewmats"][index], K=t["K"], size=self.size,
                                   blink=t["blink"][index], pose=t["poses"][index], background=background, camera=cam)


def build_drive(subject: SubjectInfo, samples: np.ndarray, cfg: DriveConfig | None = None, size: int | None = None,
                features: torch.Tensor | None = None, featurizer: SpeechFeaturizer | None = None) -> DriveSequence:
    """A :class:`DriveSequence` for a speech track (``features`` skips extraction when already made;
    ``featurizer`` reuses an extractor kept by the caller)."""
    cfg = cfg or DriveConfig()
    num = frame_count(samples)
    if features is not None:
        feats = features
    else:
        feats = (featurizer or SpeechFeaturizer(subject.audio))(samples, num)
    viewmats, poses, src = pose_sequence(subject, num, cfg)
    blink = blink_sequence(subject, num, src, cfg)
    cameras = camera_path(cfg, num, head_centre(subject))
    trained = subject.render_size
    size = trained if size is None else check_frame_size(size)
    K = scale_intrinsics(subject.K, size / trained)
    padded = np.pad(np.asarray(samples, np.float32), (0, max(0, num * SAMPLES_PER_FRAME - len(samples))))
    return DriveSequence(feats, viewmats, poses, blink, cameras, K, size, padded[: num * SAMPLES_PER_FRAME])
