"""The one typed, versioned training checkpoint, written atomically and loaded without pickle.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (so
``torch.load(weights_only=True)`` reads it); :class:`Checkpoint` gives it a type. The same
file format serves the resumable ``RUN_DIR/checkpoint.pt`` and the final ``RUN_DIR/avatar.pt``
(which has no optimizer state).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from gsavatar.errors import InputError

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
    subject: dict  # subject_dir, audio_kind, feature_dim, num_frames, cameras and signals needed to render
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
        d = dict(d)
        if d.pop("format", None) != CHECKPOINT_FORMAT:
            raise InputError("not a gsavatar checkpoint")
        if d.get("version") != CHECKPOINT_VERSION:
            raise InputError(f"checkpoint version {d.get('version')} is not supported (this gsavatar reads {CHECKPOINT_VERSION})")
        d["progress"] = Progress(**d["progress"])
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
        if tmp.exists():
            tmp.unlink()


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
    return Checkpoint.from_dict(raw)


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


def load_avatar(path: str | Path, device: str | torch.device = "cpu"):
    """``(avatar, config, subject)`` from ``avatar.pt`` (or a training ``checkpoint.pt``), in eval mode."""
    from gsavatar.config import TrainConfig, config_from_dict
    from gsavatar.train.init import avatar_from_state

    ckpt = load_checkpoint(path)
    cfg = config_from_dict(TrainConfig, ckpt.config)
    s = ckpt.subject
    avatar = avatar_from_state(cfg, s["feature_dim"], s["steps_per_frame"], ckpt.model)
    return avatar.to(device).eval(), cfg, s
