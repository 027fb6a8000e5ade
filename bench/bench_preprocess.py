"""Benchmark ``gsavatar preprocess`` on a video: wall time per stage, peak RSS, face fraction.

Runs the preprocess in a fresh subprocess (so peak RSS is that of the whole preprocess, as a
user would see it), prints a table, and with ``--write`` appends a row to BENCHMARKS.md.

    python bench/bench_preprocess.py ../shared/data/cnn2_25fps.mp4 --write
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import tyro
from common import append_row, machine


@dataclasses.dataclass
class Args:
    video: tyro.conf.Positional[Path]
    """Video to preprocess."""
    size: int = 512
    """Working resolution."""
    audio_features: tuple[str, ...] = ("logmel", "whisper")
    """Audio feature kinds."""
    write: bool = False
    """Append the result to BENCHMARKS.md."""


def main(args: Args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "subject"
        cmd = [sys.executable, "-m", "gsavatar", "preprocess", str(args.video), "-o", str(out),
               "--size", str(args.size), "--audio-features", *args.audio_features]
        subprocess.run(cmd, check=True)
        report = json.loads((out / "preprocess_report.json").read_text())
    print(f"\n{args.video.name}: {report['num_frames']} frames at {args.size}px, face in {100 * report['face_fraction']:.1f}%")
    print(f"{'stage':<16}{'wall s':>8}{'model load s':>14}")
    for name, s in report["stages"].items():
        print(f"{name:<16}{s['wall_s']:>8.1f}{s.get('model_load_s', 0):>14.1f}")
    print(f"{'total':<16}{report['total_wall_s']:>8.1f}{report['model_load_s']:>14.1f}")
    print(f"excluding model load: {report['wall_s_excluding_model_load']:.1f} s; peak RSS {report['peak_rss_mb']:.0f} MB")
    if args.write:
        stages = ", ".join(f"{k} {v['wall_s']:.1f}" for k, v in report["stages"].items())
        shown = "python bench/bench_preprocess.py " + shlex.join([str(args.video), "--size", str(args.size),
                                                                     "--audio-features", *args.audio_features])
        row = (f"| {datetime.date.today()} | {args.video.name} | {report['num_frames']} | {args.size} | "
               f"{report['total_wall_s']:.1f} | {report['wall_s_excluding_model_load']:.1f} | {stages} | "
               f"{report['peak_rss_mb']:.0f} | {100 * report['face_fraction']:.1f}% | {machine()} | `{shown}` |\n")
        append_row("## Preprocessing (`gsavatar preprocess`)", row)


if __name__ == "__main__":
    main(tyro.cli(Args))
