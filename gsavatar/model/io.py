"""Avatar files: the one typed, versioned checkpoint, and loading a trained run as a typed bundle.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (so
``torch.load(weights_only=True)`` reads it); :class:`Checkpoint` gives it a type. The same
file format serves the resumable ``RUN_DIR/checkpoint.pt`` and the final ``RUN_DIR/avatar.pt``
(which has no optimizer state). :func:`load_run` is how everything that uses a trained avatar
(render, eval, export, the viewer) opens a run: it returns an :class:`AvatarBundle`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from gsavatar.config import TrainConfig, config_from_dict
from gsavatar.errors import InputError
from gsavatar.files import remove_quietly
from gsavatar.model.audio import AudioSpec

CHECKPOINT_FORMAT = "gsavatar-checkpoint"
CHECKPOINT_VERSION = 1


@dataclasses.dataclass
class Progress:
    """Where training stands. ``stage_iteration`` steps of stage ``stage_index`` are done."""

    stage_index: int = 0
    stage_iteration: int = 0
    global_iteration: int = 0
    elapsed_s: float = 0.0
    completed_stages: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Checkpoint:
    config: dict  # dataclasses.asdict(TrainConfig)
    subject: dict  # SubjectInfo.to_dict(): the subject's audio spec, cameras and signals needed to render
    model: dict  # Avatar.state_dict()
    progress: Progress
    optimizers: dict = dataclasses.field(default_factory=dict)  # name -> optimizer.state_dict()
    strategy: dict = dataclasses.field(default_factory=dict)  # branch -> densification state
    rng: dict = dataclasses.field(default_factory=dict)  # torch generator / numpy generator states
    history: list = dataclasses.field(default_factory=list)  # per-log-step records
    version: int = CHECKPOINT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format"] = CHECKPOINT_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Checkpoint":
        """The typed checkpoint; a one-line :class:`InputError` saying what does not match."""
        d = dict(d)
        if d.pop("format", None) != CHECKPOINT_FORMAT:
            raise InputError("not a gsavatar checkpoint")
        if d.get("version") != CHECKPOINT_VERSION:
            raise InputError(f"checkpoint version {d.get('version')} is not supported (this gsavatar reads {CHECKPOINT_VERSION})")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = {n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        problems = _key_problems(set(fields), required, set(d), "field")
        if problems:
            raise InputError(f"not a checkpoint of this gsavatar: {problems}")
        for name in ("config", "subject", "model", "optimizers", "strategy", "rng"):
            if name in d and not isinstance(d[name], dict):
                raise InputError(f"the checkpoint's {name!r} is a {type(d[name]).__name__}, not a dict")
        try:
            d["progress"] = Progress(**d["progress"])
        except TypeError as e:
            raise InputError(f"the checkpoint's training progress does not match this gsavatar ({e})") from None
        return cls(**d)


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> None:
    """Write atomically: a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or foreign file: one line, not a traceback
        raise InputError(f"{path} is not a readable gsavatar checkpoint ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} is not a gsavatar checkpoint")
    try:
        return Checkpoint.from_dict(raw)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None


AVATAR_FILES = ("avatar.pt", "checkpoint.pt")  # the final avatar first; a training checkpoint if the run is unfinished


def find_avatar_file(run: str | Path) -> Path:
    """``RUN_DIR/avatar.pt``, else ``RUN_DIR/checkpoint.pt`` (a run still training); a file path is used as is."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise InputError(f"no such run directory: {run}")
    for name in AVATAR_FILES:
        if (run / name).is_file():
            return run / name
    raise InputError(f"{run} holds no trained avatar (avatar.pt or checkpoint.pt); train one with gsavatar train")


@dataclasses.dataclass(frozen=True)
class SubjectInfo:
    """What a trained avatar keeps of its subject: all that rendering, scoring and viewing read."""

    subject_dir: str
    """The subject dataset it was trained on (absolute; may have moved since)."""
    audio: AudioSpec
    """The audio features it was trained on."""
    num_frames: int
    render_size: int
    """Training resolution (square, pixels)."""
    K: torch.Tensor
    """[3, 3] intrinsics at ``render_size``."""
    viewmats: torch.Tensor
    """[N, 4, 4] tracked head frame -> camera, per subject frame."""
    poses: torch.Tensor
    """[N, 6] tracked head axis-angle and translation."""
    blink: torch.Tensor
    """[N] tracked blink signal in [0, 1]."""
    train: tuple[int, int]
    """Frame range ``[start, stop)`` of the training split."""
    test: tuple[int, int]
    """Frame range of the test split (``(0, 0)`` when there is none)."""

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's plain form (readable with ``weights_only=True``)."""
        return {"subject_dir": self.subject_dir, "audio_kind": self.audio.kind, "feature_dim": self.audio.feature_dim,
                "steps_per_frame": self.audio.steps_per_frame, "audio_extractor": dict(self.audio.extractor),
                "num_frames": self.num_frames, "render_size": self.render_size, "K": self.K,
                "viewmats": self.viewmats, "poses": self.poses, "blink": self.blink, "train": list(self.train),
                "test": list(self.test)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SubjectInfo":
        """From the checkpoint's plain form; a one-line :class:`InputError` for a missing or bad field."""
        try:
            return cls._from_dict(d)
        except KeyError as e:
            raise InputError(f"the checkpoint's subject lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise InputError(f"the checkpoint's subject is malformed ({e})") from None

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> "SubjectInfo":
        audio = AudioSpec(kind=str(d["audio_kind"]), extractor=dict(d.get("audio_extractor") or {}),
                          feature_dim=int(d["feature_dim"]), steps_per_frame=int(d["steps_per_frame"]))
        return cls(subject_dir=str(d["subject_dir"]), audio=audio, num_frames=int(d["num_frames"]),
                   render_size=int(d["render_size"]), K=d["K"], viewmats=d["viewmats"], poses=d["poses"],
                   blink=d["blink"], train=tuple(int(x) for x in d["train"]), test=tuple(int(x) for x in d["test"]))


@dataclasses.dataclass(frozen=True)
class AvatarBundle:
    """A trained run, loaded: what :func:`load_run` returns."""

    avatar: Any
    """The :class:`gsavatar.model.avatar.Avatar`, in eval mode on the requested device."""
    config: TrainConfig
    """The configuration it was trained with."""
    subject: SubjectInfo
    """What it keeps of its subject."""
    path: Path
    """The file it was loaded from."""


def avatar_from_state(cfg: TrainConfig, audio: AudioSpec, state: dict):
    """An avatar shaped like ``state`` (Gaussian counts, plate size), with ``state`` loaded."""
    from gsavatar.model.avatar import BRANCHES, Avatar
    from gsavatar.model.gaussians import GaussianSet

    a = cfg.avatar
    sized = [f"gaussians.{b}.params.means" for b in BRANCHES]
    buffers = ("background", "audio_mean", "audio_std", "pose_mean", "pose_scale", "torso_centre")
    needed = set(sized) | set(buffers)  # what sizes the avatar; the rest is checked once it is built
    problems = _key_problems(set(state) | needed, needed, set(state), "key")
    if problems or not all(torch.is_tensor(state[k]) for k in (*sized, *buffers)):
        raise InputError(f"the avatar's state does not match this gsavatar: {problems or 'a sizing entry is not a tensor'}")
    sets = {b: GaussianSet.empty(state[f"gaussians.{b}.params.means"].shape[0], getattr(a, b).sh_degree)
            for b in BRANCHES}
    z = {k: torch.zeros_like(state[k]) for k in buffers}
    anchors = state.get("lip_anchors")
    try:
        avatar = Avatar(a, audio, sets["face"], sets["mouth"], sets["torso"], z["background"], z["audio_mean"],
                        z["audio_std"], z["pose_mean"], z["pose_scale"], z["torso_centre"],
                        lip_anchors=torch.zeros_like(anchors) if torch.is_tensor(anchors) else None)
    except (RuntimeError, ValueError, IndexError) as e:
        raise InputError(f"the avatar's state does not fit its own configuration ({str(e).splitlines()[0][:160]})") from None
    expected = avatar.state_dict()
    problems = _key_problems(set(expected), set(expected), set(state), "key")
    wrong = [f"{k} {list(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__} "
             f"(expected {list(v.shape)})" for k, v in expected.items()
             if k in state and not (torch.is_tensor(state[k]) and state[k].shape == v.shape)]
    if wrong:
        problems = "; ".join(filter(None, [problems, "wrong shapes: " + _first(wrong)]))
    if problems:
        raise InputError(f"the avatar's state does not match its configuration: {problems}")
    avatar.load_state_dict(state)
    return avatar


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _key_problems(known: set[str], required: set[str], present: set[str], what: str) -> str:
    """'' when ``present`` holds every required name and nothing unknown, else what is wrong (one line)."""
    missing, unexpected = sorted(required - present), sorted(present - known)
    parts = []
    if missing:
        parts.append(f"missing {what}s {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected {what}s {_first(unexpected)}")
    return "; ".join(parts)


def load_run(run: str | Path, device: str | torch.device = "cpu") -> AvatarBundle:
    """The trained avatar of ``run`` (a run directory: its ``avatar.pt``, else the ``checkpoint.pt`` of
    a run still training; or an avatar file), as an :class:`AvatarBundle`."""
    path = find_avatar_file(run)
    ckpt = load_checkpoint(path)
    try:
        cfg = config_from_dict(TrainConfig, ckpt.config).validate()
        subject = SubjectInfo.from_dict(ckpt.subject)
        avatar = avatar_from_state(cfg, subject.audio, ckpt.model)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:  # a config entry of the wrong kind
        raise InputError(f"{path}: the checkpoint's configuration does not match this gsavatar ({e})") from None
    return AvatarBundle(avatar.to(device).eval(), cfg, subject, path)
