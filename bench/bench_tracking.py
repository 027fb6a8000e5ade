"""Benchmark 3DMM tracking: real video (accuracy against FaceMesh, jitter, time) and synthetic
ground truth (recovery of focal length, rotation and translation).

    # real: preprocess (untimed, cached in --work) then time `gsavatar track --force`
    python bench/bench_tracking.py real ../shared/data/cnn2_25fps.mp4 --write
    # synthetic ground truth: poses, expressions and focal known, 1 px landmark noise
    python bench/bench_tracking.py synthetic --write

Prints a table; ``--write`` appends rows to BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tyro
from common import append_row, machine

REAL_TABLE = "## Tracking on real video (`gsavatar track`)"
SYNTHETIC_TABLE = "## Tracking against synthetic ground truth"


@dataclasses.dataclass
class Real:
    """Time `gsavatar track` on a video's subject dataset and report its accuracy."""

    video: tyro.conf.Positional[Path]
    size: int = 512
    work: Path | None = None
    """Keep the subject dataset here (re-used across runs); default: a temporary folder."""
    write: bool = False

    def __call__(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            subject = (self.work or Path(tmp)) / f"{self.video.stem}_{self.size}"
            run = [sys.executable, "-m", "gsavatar"]
            subprocess.run(run + ["preprocess", str(self.video), "-o", str(subject), "--size", str(self.size),
                                  "--audio-features", "logmel"], check=True)
            t = time.perf_counter()
            subprocess.run(run + ["track", str(subject), "--force"], check=True)
            process_s = time.perf_counter() - t
            r = json.loads((subject / "tracking_report.json").read_text())
        print(f"\n{self.video.name} at {self.size}px, {r['num_frames']} frames")
        for key in ("reprojection_rmse_px", "reprojection_rmse_rigid_px", "reprojection_p95_px",
                    "jitter_translation_mm", "jitter_rotation_deg", "focal_px", "fov_x_deg", "wall_s"):
            print(f"  {key:<28}{r[key]}")
        print(f"  {'command wall s':<28}{process_s:.1f} (includes Python start and imports)")
        if self.write:
            shown = "python bench/bench_tracking.py real " + shlex.join([str(self.video), "--size", str(self.size)])
            append_row(REAL_TABLE, (
                f"| {datetime.date.today()} | {self.video.name} | {r['num_frames']} | {self.size} | "
                f"{r['reprojection_rmse_rigid_px']:.2f} | {r['reprojection_rmse_px']:.2f} | "
                f"{r['jitter_translation_mm']:.2f} / {r['jitter_rotation_deg']:.3f} | {r['focal_px']:.0f} "
                f"({r['fov_x_deg']:.1f} deg) | {r['wall_s']:.1f} ({process_s:.1f}) | {machine()} | `{shown}` |"))


@dataclasses.dataclass
class Synthetic:
    """Recover known poses, expressions and focal lengths from synthetic landmark tracks.

    The ground-truth model is learned from the built-in demo subject's FaceMesh tracks (made
    here at 256 px) with expressions confined to the lower face, as in the tests.
    """

    frames: int = 600
    noise_px: float = 1.0
    cases: tuple[str, ...] = ("500:5", "600:2", "700:3", "800:1", "900:4", "1000:0")
    """focal:seed pairs (focal in pixels at 512 px)."""
    write: bool = False

    def __call__(self) -> None:
        from gsavatar.config import PreprocessConfig, TrackingConfig
        from gsavatar.data.preprocess import preprocess
        from gsavatar.data.synthetic import make_synthetic_subject
        from gsavatar.tracking.camera import rotation_angle_deg
        from gsavatar.tracking.morphable import learn_morphable_model
        from gsavatar.tracking.synthetic import speech_like, synthesize_tracks
        from gsavatar.tracking.tracker import track_landmarks

        with tempfile.TemporaryDirectory() as tmp:
            video = make_synthetic_subject(Path(tmp) / "demo.mp4", duration_s=6.0, size=256, seed=1).video_path
            preprocess(video, Path(tmp) / "s", PreprocessConfig(size=256, audio_features=("logmel",)))
            with np.load(Path(tmp) / "s" / "landmarks.npz") as d:
                gt = speech_like(learn_morphable_model(d["landmarks"], d["valid"], 600.0, (127.5, 127.5), 8).model)
        print(f"\n{'focal':>6}{'seed':>5}{'focal err %':>12}{'rot mean/p95/max deg':>24}{'trans err % mean/max':>22}{'s':>6}")
        rows = []
        for case in self.cases:
            focal, seed = float(case.split(":")[0]), int(case.split(":")[1])
            tracks = synthesize_tracks(gt, self.frames, focal, 512, noise_px=self.noise_px, seed=seed)
            t = time.perf_counter()
            r = track_landmarks(tracks.landmarks, np.ones(self.frames, bool), 512, tracks.principal, TrackingConfig())
            wall = time.perf_counter() - t
            rot = rotation_angle_deg(r.rotation @ tracks.rotation.transpose(0, 2, 1))
            trans = 100 * np.linalg.norm(r.translation - tracks.translation, axis=1) / np.linalg.norm(tracks.translation, axis=1)
            ferr = 100 * (r.focal / focal - 1)
            print(f"{focal:>6.0f}{seed:>5}{ferr:>12.2f}{rot.mean():>10.2f}/{np.percentile(rot, 95):.2f}/{rot.max():.2f}"
                  f"{trans.mean():>14.2f}/{trans.max():.2f}{wall:>6.1f}")
            rows.append(f"{focal:.0f}: f {ferr:+.1f}%, rot {rot.mean():.2f}/{np.percentile(rot, 95):.2f}/{rot.max():.2f} deg, "
                        f"trans {trans.mean():.1f}/{trans.max():.1f}%")
        if self.write:
            shown = f"python bench/bench_tracking.py synthetic --frames {self.frames} --noise-px {self.noise_px}"
            append_row(SYNTHETIC_TABLE, f"| {datetime.date.today()} | {self.frames} | {self.noise_px} | "
                                        f"{'; '.join(rows)} | {machine()} | `{shown}` |")


if __name__ == "__main__":
    tyro.extras.subcommand_cli_from_dict({"real": Real, "synthetic": Synthetic})()
