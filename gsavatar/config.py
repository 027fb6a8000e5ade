"""Documented configuration dataclasses. Every number a stage uses lives here, not in loops."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal

from gsavatar.errors import InputError

BACKEND_NAMES = ("auto", "torch", "cpp", "cuda", "gsplat")
"""The rendering backends a user can name (see :mod:`gsavatar.render.backends`)."""

MOUTH_FOLLOWS = ("audio", "lips")
"""What may move the inside of the mouth (:attr:`AvatarConfig.mouth_follows`)."""

MIN_FRAME_SIZE = 16
"""Smallest frame side rendered or written (pixels)."""
MAX_FRAME_SIZE = 2048
"""Largest frame side rendered or written (pixels). Memory grows with the pixels times the
Gaussians each tile holds: at 4096 px the reference rasterizer needs tens of GB and minutes a frame."""


def check_frame_size(size, minimum: int = MIN_FRAME_SIZE, what: str = "--size") -> int:
    """``size`` as an int if it is an even number of pixels in [``minimum``, :data:`MAX_FRAME_SIZE`]
    (H.264's 4:2:0 chroma needs even sides), else a one-line :class:`InputError`."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < minimum or size % 2:
        raise InputError(f"{what} must be an even number of at least {minimum} pixels (H.264 4:2:0 needs even "
                         f"sizes), got {size}")
    if size > MAX_FRAME_SIZE:
        raise InputError(f"{what} {size} is over the limit of {MAX_FRAME_SIZE} pixels (memory grows with the "
                         f"pixels: at 4096 px a frame needs tens of GB and minutes)")
    return int(size)


def check_number(what: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False) -> float:
    """``value`` as a float if it is a finite number in [``low``, ``high``] (``(low, high]`` with
    ``low_open``), else a one-line :class:`InputError` naming ``what``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        rule = " and ".join(r for r in (lo, hi) if r)
        raise InputError(f"{what} must be a finite number{' ' + rule if rule else ''} (got {value!r})")
    return float(value)


def check_finite_fields(obj, prefix: str = "") -> None:
    """Every float in a (nested) config dataclass is finite, else a one-line :class:`InputError`
    naming the field (TOML and JSON both accept ``nan`` and ``inf``)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        items = value if isinstance(value, (list, tuple)) else [value]
        for k, item in enumerate(items):
            label = name if len(items) == 1 and not isinstance(value, (list, tuple)) else f"{name}[{k}]"
            if dataclasses.is_dataclass(item):
                check_finite_fields(item, label + ".")
            elif isinstance(item, float) and not math.isfinite(item):
                raise InputError(f"{label} must be a finite number (got {item!r})")


@dataclasses.dataclass
class TrackingConfig:
    """How the morphable face model is learned and fitted to the landmark tracks (``gsavatar track``)."""

    interocular_mm: float = 63.0
    """Population prior for the distance between the iris centres; it sets the metric scale."""
    expression_components: int = 32
    """Size of the expression basis (PCA of the subject's own non-rigid landmark motion)."""
    focal_px: float | None = None
    """Focal length in pixels at the working size, if known; by default it is estimated."""
    focal_search_range: tuple[float, float] = (0.5, 12.0)
    """Focal lengths searched, as multiples of the image size (0.5: 90 degree field of view; 12: about 5)."""
    focal_search_frames: int = 400
    """Frames (evenly spaced) used to score each candidate focal length."""
    focal_search_points: int = 100
    """Landmarks scored in the focal search: the ones that move least relative to the head."""
    focal_search_steps: int = 12
    """Golden-section steps on log(focal) after the coarse ladder."""
    iterations: int = 200
    """L-BFGS iterations of the final fit over all frames."""
    search_iterations: int = 8
    """Gauss-Newton iterations of the rigid pose fit per candidate focal length."""
    robust_scale_px: float = 3.0
    """Cauchy loss scale: landmark errors well above this many pixels count logarithmically (outliers)."""
    smooth_translation: float = 0.5
    """Weight of the squared second difference of translation (per mm^2, against squared pixels)."""
    smooth_rotation: float = 0.5
    """Weight of the squared second difference of rotation (per degree^2)."""
    smooth_expression: float = 0.05
    """Weight of the squared second difference of the expression coefficients."""
    expression_prior: float = 0.01
    """Weight of the standard-normal prior on the expression coefficients."""


@dataclasses.dataclass
class PreprocessConfig:
    """How a video becomes a subject dataset (``gsavatar preprocess``)."""

    size: int = 512
    """Working resolution: the square crop is resized to ``size`` x ``size`` pixels."""
    min_duration_s: float = 5.0
    """Shorter videos are refused: too little speech to learn an avatar from."""
    max_source_side: int = 640
    """The face-track scan runs on frames downscaled so their longer side is at most this."""
    scan_stride: int = 5
    """The face-track scan runs the face detector on every ``scan_stride``-th frame."""
    crop_face_scale: float = 3.0
    """Crop side as a multiple of the median face-box height (head and shoulders)."""
    crop_face_centre: float = 0.42
    """Vertical position of the face centre in the crop (0 = top, 1 = bottom)."""
    max_interpolated_gap: int = 12
    """Landmark dropouts up to this many frames are interpolated; longer ones are held and flagged invalid."""
    min_face_fraction: float = 0.5
    """Refuse a video where FaceMesh finds the face in less than this fraction of frames."""
    jpeg_quality: int = 95
    """Quality of the stored frames (JPEG, random access, about 10x smaller than PNG)."""
    background_samples: int = 150
    """Frames sampled (evenly) for the background plate's temporal median."""
    audio_features: tuple[str, ...] = ("logmel", "phonemes", "whisper")
    """Audio feature kinds to extract (see ``gsavatar.data.audio_features.available_kinds``): what
    training's "auto" prefers (``gsavatar.data.frames.AUDIO_PREFERENCE``) and Whisper to choose."""
    test_fraction: float = 1.0 / 11.0
    """The last ``test_fraction`` of frames form the test split (the published convention)."""
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    """3DMM tracking (the last stage): model learning and fitting settings."""


# --------------------------------------------------------------------------------------------
# The avatar (model) and its training. Presets in configs/*.toml override these defaults.


@dataclasses.dataclass
class HashGridConfig:
    """A multiresolution hash grid (Instant-NGP): levels, table size and resolutions."""

    num_levels: int = 12
    """Number of resolution levels ``L``; the output has ``num_levels * features_per_level`` channels."""
    features_per_level: int = 1
    """Feature channels ``F`` stored per grid vertex and level."""
    log2_table_size: int = 17
    """Entries per level's table is ``2**log2_table_size`` (``T``); finer levels that do not fit are hashed."""
    base_resolution: int = 16
    """Resolution ``N_0`` of the coarsest level (cells per axis over ``[0, 1]``)."""
    max_resolution: int = 512
    """Finest level's resolution; level ``l`` has ``floor(base * b**l)``, ``b = exp((ln max - ln base) / (L - 1))``."""
    init_scale: float = 1e-4
    """Table entries start uniform in ``[-init_scale, init_scale]`` (small: the encoding starts near zero)."""

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first field with an unusable value."""
        def bad(field: str, rule: str) -> InputError:
            return InputError(f"HashGridConfig.{field} must be {rule} (got {getattr(self, field)!r})")

        if not _is_int(self.num_levels) or self.num_levels < 1:
            raise bad("num_levels", "an integer >= 1")
        if not _is_int(self.features_per_level) or self.features_per_level < 1:
            raise bad("features_per_level", "an integer >= 1")
        if not _is_int(self.log2_table_size) or not 4 <= self.log2_table_size <= 24:
            raise bad("log2_table_size", "an integer in [4, 24]")
        if not _is_int(self.base_resolution) or self.base_resolution < 2:
            raise bad("base_resolution", "an integer >= 2")
        if not _is_int(self.max_resolution) or self.max_resolution < self.base_resolution:
            raise bad("max_resolution", f"an integer >= base_resolution ({self.base_resolution})")
        if not (isinstance(self.init_scale, (int, float)) and math.isfinite(self.init_scale) and self.init_scale >= 0):
            raise bad("init_scale", "a finite number >= 0")

    def resolutions(self) -> list[int]:
        """``N_l`` for every level, coarse to fine (the last one is ``max_resolution``)."""
        self.validate()
        if self.num_levels == 1:
            return [self.base_resolution]
        log_b = (math.log(self.max_resolution) - math.log(self.base_resolution)) / (self.num_levels - 1)
        # The tiny epsilon keeps exact products (the last level: base * b**(L-1) = max) from flooring
        # one below because of rounding in exp/log.
        return [int(math.floor(self.base_resolution * math.exp(l * log_b) * (1 + 1e-12)))
                for l in range(self.num_levels)]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass
class BranchConfig:
    """One Gaussian branch (face, inside-mouth or torso) and its deformation network."""

    num_gaussians: int = 2000
    """Gaussians at initialisation (densification then adds and prunes)."""
    max_gaussians: int = 30000
    """Densification never grows the branch beyond this."""
    sh_degree: int = 2
    """Spherical-harmonics degree of the colours (0: view-independent)."""
    hash: HashGridConfig = dataclasses.field(default_factory=HashGridConfig)
    """Tri-plane hash grids over the canonical Gaussian centres."""
    hidden: int = 64
    """Width of the deformation decoder MLP."""
    layers: int = 3
    """Layers of the deformation decoder MLP."""
    position_scale: float = 0.01
    """Position offsets are the network output times this (metres): keeps early motion small."""
    init_scale: float = 0.004
    """Initial Gaussian scale (metres; camera-frame metres for the torso)."""
    init_opacity: float = 0.3
    """Initial Gaussian opacity."""


def _mouth_branch() -> BranchConfig:
    return BranchConfig(num_gaussians=1500, max_gaussians=10000, hidden=32, layers=2,
                        hash=HashGridConfig(base_resolution=64, max_resolution=1024), init_scale=0.003)


def _torso_branch() -> BranchConfig:
    return BranchConfig(num_gaussians=1500, max_gaussians=20000, sh_degree=0, hidden=32, layers=2,
                        hash=HashGridConfig(num_levels=8, log2_table_size=14, max_resolution=128))


@dataclasses.dataclass
class AvatarConfig:
    """The avatar's three Gaussian branches and its conditioning."""

    face: BranchConfig = dataclasses.field(default_factory=BranchConfig)
    """Face branch: persistent head Gaussians deformed by audio and blink (position, rotation, scale)."""
    mouth: BranchConfig = dataclasses.field(default_factory=_mouth_branch)
    """Inside-mouth branch: Gaussians in the mouth cavity, position deformed as ``mouth_follows`` says."""
    torso: BranchConfig = dataclasses.field(default_factory=_torso_branch)
    """Torso branch: camera-frame Gaussians moved by the head pose (never by frame index)."""
    audio_feature: str = "auto"
    """Audio feature kind to condition on; "auto" picks logmel+phonemes, then logmel, whisper, hubert, wav2vec2,
    whichever the subject has (why: gsavatar.data.frames.AUDIO_PREFERENCE); kinds joined by + side by side."""
    audio_window_radius: int = 4
    """Frames of audio context before a frame fed to the audio encoder (and after it, unless
    ``audio_window_future`` is set)."""
    audio_window_future: int | None = None
    """Frames of audio context after a frame fed to the audio encoder; None: ``audio_window_radius``
    (a symmetric window)."""
    audio_dim: int = 32
    """Size of the encoded audio feature."""
    audio_smoothing_frames: int = 8
    """Neighbouring frames whose encoded audio is blended by learned attention."""
    audio_smoothing_future: int | None = None
    """How many of those neighbours come after the frame; None: centred (``frames - 1 - frames // 2``).
    With ``audio_window_future`` it sets how far ahead a frame's prediction reads
    (:meth:`audio_reach`): the latency floor of live streaming."""
    blink_dim: int = 8
    """Size of the encoded blink feature."""
    mouth_follows: str = "audio"
    """What moves the inside of the mouth: "audio", an audio encoder of its own, learnt from pixels;
    "lips", the motion the face net predicts for the lips and chin, so that teeth and cavity can never
    contradict the lips. Over two seeds on cnn2 the two are even on every lip-sync figure and on PSNR
    (BENCHMARKS.md, "Lip-sync on novel audio"), so the default stays as avatars were trained before."""
    hash_bound: float = 0.2
    """Canonical coordinates (metres in the head frame) are clamped to +-this for the face/mouth hash grids."""

    def audio_window(self) -> tuple[int, int]:
        """``(past, future)`` frames of the audio encoder's window around each neighbour."""
        future = self.audio_window_radius if self.audio_window_future is None else self.audio_window_future
        return self.audio_window_radius, future

    def audio_neighbours(self) -> tuple[int, int]:
        """``(before, after)``: neighbour frames blended before and after a frame."""
        k = self.audio_smoothing_frames
        after = k - 1 - k // 2 if self.audio_smoothing_future is None else self.audio_smoothing_future
        return k - 1 - after, after

    def audio_reach(self) -> tuple[int, int]:
        """``(past, future)``: frames of audio before and after a frame that its prediction reads."""
        (wp, wf), (nb, na) = self.audio_window(), self.audio_neighbours()
        return wp + nb, wf + na


@dataclasses.dataclass
class StageConfig:
    """One training stage: which branches learn, what they are compared with, for how long."""

    name: str
    """motion | mouth | face | fuse | torso (see gsavatar.train.trainer.STAGES)."""
    iterations: int
    """Optimiser steps in this stage."""
    static_iterations: int = 0
    """For the face stage: the first steps render the canonical Gaussians without deformation."""
    curriculum: str | None = None
    """Incremental sampling over "mouth_open" (and then blink) instead of uniform frames; None: uniform."""
    densify: bool = True
    """Densify and prune the trained branch's Gaussians in this stage."""


def _default_stages() -> list[StageConfig]:
    return [
        StageConfig("motion", 3000, densify=False),
        StageConfig("mouth", 20000),
        StageConfig("face", 30000, static_iterations=3000, curriculum="mouth_open"),
        StageConfig("fuse", 5000, densify=False),
        StageConfig("torso", 8000),
    ]


@dataclasses.dataclass
class LossConfig:
    """Loss weights (every weight used in the training loop lives here)."""

    ssim: float = 0.2
    """Weight of D-SSIM against (1 - weight) L1."""
    alpha: float = 0.1
    """Face stage: face alpha should be 1 on the head (minus the mouth) and 0 elsewhere."""
    mouth_alpha: float = 0.05
    """Mouth stage: mouth alpha should be 0 outside the head."""
    torso_alpha: float = 0.1
    """Torso stage: torso alpha should be 1 on the torso and 0 on the background."""
    mouth_region: float = 2.0
    """Extra weight of the photometric loss inside the mouth region (lip-sync matters most there)."""
    landmark_deformation: float = 1.0
    """The face net's offsets at the tracked landmarks should match the tracked expression motion (per cm^2)."""
    silence_every: int = 10
    """One landmark step in this many hears digital silence instead of its frame's audio and is asked
    for the subject's resting mouth (0: never). A talking-head video has no silence in it, so without
    these steps the face net has never heard any and keeps the mouth ajar in pauses."""
    deformation: float = 1e-3
    """L2 on the face position offsets (network units): stillness unless the images ask for motion."""
    mouth_deformation: float = 1e-3
    """L2 on the mouth position offsets (network units)."""
    lpips: float = 0.0
    """LPIPS weight late in the face stage; used only if LPIPS and its backbone weights are present locally."""


@dataclasses.dataclass
class DensifyConfig:
    """Adaptive density control (clone, split, prune), as in 3D Gaussian Splatting."""

    start: int = 500
    """First stage iteration that densifies."""
    stop_fraction: float = 0.6
    """No densification after this fraction of the stage."""
    every: int = 100
    """Densify every this many iterations."""
    grad_threshold: float = 2e-4
    """Mean screen-space gradient (NDC units) above which a Gaussian is cloned or split."""
    split_scale: float = 0.01
    """Gaussians larger than this (metres) are split, smaller ones cloned."""
    prune_opacity: float = 0.005
    """Gaussians less opaque than this are removed."""
    reset_opacity_every: int = 3000
    """Opacity reset period (0: never)."""


@dataclasses.dataclass
class OptimConfig:
    """Learning rates (Adam)."""

    means: float = 1.6e-4
    """Gaussian centres, in metres per step (scaled by nothing: the head is ~0.2 m)."""
    quats: float = 1e-3
    """Rotations (unnormalised quaternions)."""
    log_scales: float = 5e-3
    """Log-scales."""
    opacity: float = 5e-2
    """Opacity logits."""
    sh0: float = 2.5e-3
    """Base colour (SH degree 0)."""
    shN: float = 1.25e-4
    """Higher SH coefficients."""
    encoding: float = 1e-2
    """Hash-grid tables."""
    network: float = 5e-4
    """MLPs and audio encoders."""
    final_lr_fraction: float = 0.1
    """Learning rates decay exponentially to this fraction over each stage."""


@dataclasses.dataclass
class AudioAugmentConfig:
    """Copies of the subject's own audio, made louder or quieter and noisier, that training steps
    hear instead of the clean track (so the audio -> motion net sees more than one recording)."""

    variants: int = 0
    """How many copies to make when training starts (0: none, every step hears the clean track)."""
    probability: float = 0.5
    """Chance that a step hears one of the copies (picked at random) instead of the clean track."""
    gain_db: float = 6.0
    """Each copy's level: the track's, times a gain drawn uniformly within +-this (dB)."""
    noise_snr_db: float = 20.0
    """Each copy's white noise: a signal-to-noise ratio drawn from this to 20 dB more (dB)."""
    warp: float = 0.0
    """Each copy's frequencies scaled by a factor drawn within 1 +- this, its timing kept: the pitch
    and formants of a shorter or longer vocal tract, i.e. another voice (0: no warp)."""
    tempo: float = 0.0
    """Each copy spoken faster or slower by a factor drawn within 1 +- this, its frequencies kept (0:
    the subject's own tempo). Such a copy no longer matches the video's frames, so only the landmark
    terms hear it (the motion stage, and the face stage's landmark prior), with the tracked motion
    read at the copy's times (interpolated between frames); the images are rendered from the clean
    track."""


@dataclasses.dataclass
class TrainConfig:
    """Everything ``gsavatar train`` does. Presets (configs/*.toml) override fields of this."""

    render_size: int = 512
    """Training resolution (frames are resized from the dataset's working size)."""
    avatar: AvatarConfig = dataclasses.field(default_factory=AvatarConfig)
    """The avatar's branches and conditioning."""
    stages: list[StageConfig] = dataclasses.field(default_factory=_default_stages)
    """Stages, in order; resuming restarts inside the stage that was running."""
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    """Loss weights."""
    audio_augment: AudioAugmentConfig = dataclasses.field(default_factory=AudioAugmentConfig)
    """Augmented copies of the training audio (off by default)."""
    densify: DensifyConfig = dataclasses.field(default_factory=DensifyConfig)
    """Densification and pruning."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Learning rates."""
    seed: int = 0
    """Random seed; CPU training is deterministic for a fixed seed."""
    device: str = "auto"
    """auto (CUDA if available) | cpu | cuda."""
    cpu_threads: int = 0
    """Torch CPU threads (0: torch's default). The small ops of CPU training often run faster on 1 thread."""
    backend: str = "auto"
    """Rendering backend (rasterizer and hash grid): auto (our compiled backend for the device, CPU or
    CUDA, once it passes a self-check, else the PyTorch reference) | torch | cuda | cpp | gsplat (gsplat's CUDA
    rasterizer, a cross-check); see ``gsavatar.render.backends``. Rendering, eval and the viewer use auto."""
    checkpoint_every: int = 500
    """Write the resumable checkpoint every this many iterations (and at every stage end)."""
    log_every: int = 25
    """Progress-bar and log-file refresh period (iterations)."""
    eval_frames: int = 0
    """Test-split frames evaluated in the final summary (0: all)."""

    def validate(self) -> "TrainConfig":
        """Raise a one-line InputError for settings that would only fail deep inside training."""
        check_finite_fields(self)
        known_stages, known_curricula = ("motion", "mouth", "face", "fuse", "torso"), (None, "mouth_open")
        checks = [
            (MIN_FRAME_SIZE <= self.render_size <= MAX_FRAME_SIZE,
             f"render_size must be between {MIN_FRAME_SIZE} and {MAX_FRAME_SIZE} (got {self.render_size})"),
            (self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be at least 1"),
            (self.densify.every >= 1, f"densify.every must be at least 1 (got {self.densify.every})"),
            (self.loss.silence_every >= 0, f"loss.silence_every must be 0 (never) or more (got {self.loss.silence_every})"),
            (_is_int(self.audio_augment.variants) and 0 <= self.audio_augment.variants <= 16
             and 0 <= self.audio_augment.probability <= 1 and self.audio_augment.gain_db >= 0
             and 0 <= self.audio_augment.warp <= 0.5 and 0 <= self.audio_augment.tempo <= 0.5,
             "audio_augment: need 0 <= variants <= 16, 0 <= probability <= 1, gain_db >= 0, 0 <= warp <= 0.5 "
             "and 0 <= tempo <= 0.5"),
            (0 < self.optim.final_lr_fraction <= 1, "optim.final_lr_fraction must be in (0, 1]"),
            (bool(self.stages), "at least one stage is needed"),
            (self.backend in BACKEND_NAMES, f"backend must be one of {', '.join(BACKEND_NAMES)} (got {self.backend!r})"),
        ]
        for s in self.stages:
            checks += [
                (s.name in known_stages, f"unknown stage '{s.name}' (known: {', '.join(known_stages)})"),
                (s.iterations >= 0 and 0 <= s.static_iterations <= s.iterations,
                 f"stage {s.name}: need 0 <= static_iterations <= iterations"),
                (s.curriculum in known_curricula, f"stage {s.name}: unknown curriculum '{s.curriculum}' (known: mouth_open)"),
            ]
        a = self.avatar
        checks += [
            (_is_int(a.audio_window_radius) and a.audio_window_radius >= 0,
             f"avatar.audio_window_radius must be an integer >= 0 (got {a.audio_window_radius!r})"),
            (a.audio_window_future is None or (_is_int(a.audio_window_future) and a.audio_window_future >= 0),
             f"avatar.audio_window_future must be an integer >= 0 (got {a.audio_window_future!r})"),
            (a.mouth_follows in MOUTH_FOLLOWS,
             f"avatar.mouth_follows must be one of {', '.join(MOUTH_FOLLOWS)} (got {a.mouth_follows!r})"),
            (_is_int(a.audio_smoothing_frames) and a.audio_smoothing_frames >= 1,
             f"avatar.audio_smoothing_frames must be an integer >= 1 (got {a.audio_smoothing_frames!r})"),
            (a.audio_smoothing_future is None or (_is_int(a.audio_smoothing_future)
                                                  and 0 <= a.audio_smoothing_future < a.audio_smoothing_frames),
             f"avatar.audio_smoothing_future must be an integer in 0..audio_smoothing_frames - 1 "
             f"(got {a.audio_smoothing_future!r})"),
        ]
        for b in ("face", "mouth", "torso"):
            br = getattr(self.avatar, b)
            checks.append((0 < br.num_gaussians <= br.max_gaussians and 0 <= br.sh_degree <= 3,
                           f"avatar.{b}: need 0 < num_gaussians <= max_gaussians and sh_degree in 0..3"))
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        for b in ("face", "mouth", "torso"):
            getattr(self.avatar, b).hash.validate()
        return self


# --------------------------------------------------------------------------------------------
# Building configs from dicts (checkpoints, presets).


PoseMode = Literal["loop", "still"]
BlinkMode = Literal["track", "generate", "none"]
CameraKind = Literal["train", "orbit", "zoom"]


@dataclasses.dataclass
class DriveConfig:
    """How head pose, blinks and the camera are chosen when new audio drives the avatar."""

    pose: PoseMode = "loop"
    """loop: the training sequence's head motion, played back and forth (no jump at the ends); still: its median pose."""
    blink: BlinkMode = "track"
    """track: the training sequence's blinks (played with the pose); generate: random blinks at a human rate; none."""
    pose_smoothing_frames: float = 2.0
    """Gaussian sigma (frames) applied to the looped pose, so the turn-around points are smooth."""
    camera: str = "train"
    """train (the tracked camera), orbit (yaw +-orbit_yaw_deg, some pitch), zoom (slow push-in), or a JSON keyframe file."""
    orbit_yaw_deg: float = 30.0
    """Orbit amplitude in yaw (degrees)."""
    orbit_pitch_deg: float = 8.0
    """Orbit amplitude in pitch (degrees)."""
    orbit_period_s: float = 8.0
    """Seconds for one full left-right-left sweep."""
    zoom_factor: float = 1.6
    """Zoom path: the head appears this many times larger at the end than at the start."""
    seed: int = 0
    """Seed of the blink generator."""


@dataclasses.dataclass
class EvalConfig:
    """What ``gsavatar eval`` measures and how (see gsavatar.eval.evaluate)."""

    audio: tuple[str, ...] = ()
    """Extra speech files to drive the avatar with: each gets an AV offset and its correlation (no reference video needed)."""
    max_frames: int = 0
    """Score only the first MAX_FRAMES frames of the test split (0: all); the split stays contiguous for the signal metrics."""
    baselines: bool = True
    """Also score the mean training frame and the training frame nearest in audio feature, the same way."""
    max_lag: int = 3
    """AV offset search range in frames (+-). Speech has 4-5 syllables a second, so on clips of a few
    seconds the mouth/energy correlation has side peaks one syllable (5-6 frames) away that can beat
    the true one (seen on cnn2's 6.5 s test split: true peak r 0.29 at 0, side peak 0.38 at -6; on the
    whole 71 s video the peak is at 0). +-3 frames (120 ms) keeps the search on the sync peak; an
    offset at the edge means out of sync by at least that."""
    fps_warmup: int = 3
    """Renders before timing starts (allocator, caches, CUDA kernels)."""
    fps_repeats: int = 5
    """Timed repeats; the median is reported."""
    fps_frames: int = 10
    """Frames per timed repeat."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    cpu_threads: int = -1
    """torch CPU threads: -1 uses the trained preset's cpu_threads (1 for the CPU presets: on a busy
    2-core machine more threads are many times slower), 0 leaves torch's default."""
    drive_pose: str = "loop"
    """Head pose for the novel-audio drives (loop or still; see gsavatar.drive.DriveConfig)."""


def config_from_dict(cls, data: dict, base=None):
    """Build dataclass ``cls`` from a (possibly partial) nested dict, over ``base`` (default: defaults).

    Unknown keys are errors (a typo in a preset must not be silently ignored).
    """
    import typing

    obj = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise InputError(f"unknown {cls.__name__} setting(s): {', '.join(sorted(unknown))} (known: {', '.join(sorted(names))})")
    changes = {}
    for key, value in data.items():
        hint = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = config_from_dict(type(current), value, current)
        elif typing.get_origin(hint) is list and typing.get_args(hint) and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            item = typing.get_args(hint)[0]
            changes[key] = [config_from_dict(item, v, item(**{k: v[k] for k in ("name", "iterations") if k in v}))
                            if isinstance(v, dict) else v for v in value]
        elif isinstance(current, tuple) and isinstance(value, list):
            changes[key] = tuple(value)
        else:
            changes[key] = value
    return dataclasses.replace(obj, **changes)


def scale_iterations(cfg: "TrainConfig", k: float) -> "TrainConfig":
    """``cfg`` with every stage's iterations (and the densification schedule, counted in them) times ``k``."""
    if k == 1.0:
        return cfg
    stages = [dataclasses.replace(s, iterations=max(1, round(s.iterations * k)), static_iterations=round(s.static_iterations * k))
              for s in cfg.stages]
    d = cfg.densify
    densify = dataclasses.replace(d, start=round(d.start * k), every=max(1, round(d.every * k)),
                                  reset_opacity_every=round(d.reset_opacity_every * k))
    return dataclasses.replace(cfg, stages=stages, densify=densify)


def presets_dir():
    """The training presets: the repository's configs/, installed as the package ``gsavatar.presets``
    (an importlib.resources Traversable; a pathlib.Path for an installed package)."""
    from importlib.resources import files

    try:
        return files("gsavatar.presets")
    except ModuleNotFoundError:  # a checkout used through PYTHONPATH, not installed: nothing maps configs/
        from pathlib import Path

        return Path(__file__).resolve().parents[1] / "configs"


def available_presets() -> list[str]:
    d = presets_dir()
    return sorted(p.name.removesuffix(".toml") for p in d.iterdir() if p.name.endswith(".toml")) if d.is_dir() else []


AUTO_PRESET = {"cuda": "default", "cpu": "cpu-30min"}
"""What ``--preset auto`` picks per device type: the GPU preset only where a GPU trains it (the
default preset on a CPU would run for more than a day)."""


def auto_preset(device_type: str) -> str:
    """The preset ``auto`` stands for on a device of this type ("cuda" or "cpu")."""
    return AUTO_PRESET[device_type]


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> TrainConfig:
    """A :class:`TrainConfig` from a preset name (configs/NAME.toml) or a path to a .toml file.

    A preset may start from another: ``base = "NAME"`` applies its settings over that preset's
    (a list such as ``[[stages]]`` replaces the base's list whole)."""
    import tomllib
    from pathlib import Path

    path = Path(name) if name.endswith(".toml") else presets_dir() / f"{name}.toml"
    if not path.is_file():
        raise InputError(f"unknown preset '{name}' (available: {', '.join(available_presets()) or 'none'})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"preset {path} is not valid TOML: {e}") from None
    base = None
    if "base" in data:
        parent = data.pop("base")
        if not isinstance(parent, str) or parent in _seen or name in _seen:
            raise InputError(f"preset {path}: base must name another preset, without cycles (got {parent!r})")
        base = load_preset(parent, _seen + (name,))
    try:
        return config_from_dict(TrainConfig, data, base).validate()
    except TypeError as e:  # e.g. a [[stages]] entry without a name or iterations
        raise InputError(f"preset {path}: {e}") from None
