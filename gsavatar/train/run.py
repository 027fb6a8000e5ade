"""``gsavatar train`` end to end: a video or a subject directory in, a trained avatar out."""

from __future__ import annotations

import contextlib
from pathlib import Path

from gsavatar.config import PreprocessConfig, TrainConfig
from gsavatar.errors import InputError
from gsavatar.files import check_creatable_dir, exclusive_lock


def prepare_subject(source: Path, run_dir: Path, render_size: int) -> Path:
    """The subject dataset to train on: ``source`` itself, or RUN_DIR/subject preprocessed from a video."""
    from gsavatar.data.dataset import read_manifest

    if source.is_dir():
        manifest = read_manifest(source)
        if manifest is None:
            raise InputError(f"{source} is a directory but not a subject dataset (no manifest.json); "
                             f"give a video or run gsavatar preprocess")
        stages = manifest.get("stages", {})
        if not manifest.get("complete") and [s for s, v in stages.items() if not v.get("done")] == ["tracking"]:
            from gsavatar.data.preprocess import track

            track(source, PreprocessConfig().tracking)
        return source
    if not source.is_file():
        raise InputError(f"{source} does not exist")
    from gsavatar.data.preprocess import preprocess

    subject = run_dir / "subject"
    size = 512 if render_size > 256 else 256
    preprocess(source, subject, PreprocessConfig(size=size))
    return subject


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Hold an exclusive lock on RUN_DIR for the whole run, so that a second ``gsavatar train`` on
    the same directory stops with one line instead of interleaving checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(run_dir / ".lock", f"{run_dir} is in use by another gsavatar train; wait for it to finish "
                                           f"or use another RUN_DIR"):
        yield


def clear_run(run_dir: Path) -> None:
    """Remove a run's training state and results (the preprocessed subject stays)."""
    for name in ("checkpoint.pt", "avatar.pt", "summary.json", "config.json", "train.log"):
        (Path(run_dir) / name).unlink(missing_ok=True)


def train_command(source: Path, run_dir: Path, cfg: TrainConfig, force: bool = False) -> dict:
    from gsavatar.render import check_backend
    from gsavatar.runtime import resolve_device
    from gsavatar.train.trainer import train

    check_backend(cfg.backend, resolve_device(cfg.device))  # a bad --device or --backend fails before any preprocessing
    source, run_dir = Path(source), Path(run_dir)
    check_creatable_dir(run_dir, "RUN_DIR")
    with run_dir_lock(run_dir):
        if force:
            clear_run(run_dir)
        subject = prepare_subject(source, run_dir, cfg.render_size)
        return train(subject, run_dir, cfg)
