"""Train an avatar on a subject (or reuse a finished run), run the full `gsavatar eval` protocol,
and append rows to BENCHMARKS.md.

    python bench/bench_eval.py SUBJECT_OR_VIDEO --run RUN_DIR --preset cpu-30min \
        [--audio ../shared/data/audio/radio31_8s.wav ...] [--max-frames N] [--write]

One row per method (avatar, its head over the true torso, mean training frame, nearest-audio
training frame) under
"## Evaluation (`gsavatar eval`)", and one row per driving audio file under
"## Lip-sync on novel audio (`gsavatar eval --audio`)", and PSNR by region for the avatar (both
protocols) and the mean frame under "## Where the error is". Every figure comes from RUN_DIR/eval.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, machine  # noqa: E402

TABLE = "## Evaluation (`gsavatar eval`)"
DRIVE_TABLE = "## Lip-sync on novel audio (`gsavatar eval --audio`)"
REGION_TABLE = "## Where the error is (`gsavatar eval`, PSNR by region)"
NAMES = {"avatar": "avatar", "avatar_gt_torso": "avatar head over the true torso (published protocol)",
         "mean_frame": "mean training frame", "nearest_audio": "nearest-audio training frame"}


def _f(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="subject dataset or video")
    ap.add_argument("--run", type=Path, required=True, help="run directory (reused if it holds a finished run)")
    ap.add_argument("--preset", default="cpu-30min")
    ap.add_argument("--audio", type=Path, nargs="*", default=[], help="speech files to drive the avatar with")
    ap.add_argument("--max-frames", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--write", action="store_true", help="append rows to BENCHMARKS.md")
    ap.add_argument("--note", default="", help="free text for the machine column (e.g. 'shared with other jobs')")
    args = ap.parse_args()

    from gsavatar.config import EvalConfig, load_preset
    from gsavatar.eval.evaluate import evaluate_run, format_table
    from gsavatar.train.run import prepare_subject, train_command

    cfg = load_preset(args.preset)
    if not (args.run / "summary.json").exists():
        train_command(args.source, args.run, cfg)
    subject = prepare_subject(args.source, args.run, cfg.render_size)
    result = evaluate_run(args.run, EvalConfig(audio=tuple(map(str, args.audio)), max_frames=args.max_frames,
                                               device=args.device), subject_dir=subject)
    print(format_table(result))
    if not args.write:
        return
    summary = json.loads((args.run / "summary.json").read_text())
    cmd = (f"`python bench/bench_eval.py {args.source.name} --preset {args.preset}"
           + (f" --max-frames {args.max_frames}" if args.max_frames else "") + "`")
    where = f"{machine()}, {result['environment']['device']}" + (f", {args.note}" if args.note else "")
    split = result["split"]
    gt = result["ground_truth"]
    for key, name in NAMES.items():
        if key not in result["methods"]:
            continue
        m = result["methods"][key]
        fps = f"{result['speed']['fps']:.1f}" if key == "avatar" else "-"
        append_row(TABLE, (
            f"| {datetime.date.today()} | {args.source.name} | {args.preset} ({summary['wall_s'] / 60:.1f} min) | {name} | "
            f"{split['count']} @ {split['resolution']} px | {_f(m['psnr'], '{:.2f}')} / {_f(m['psnr_face'], '{:.2f}')} | "
            f"{_f(m['ssim'], '{:.4f}')} / {_f(m['ssim_face'], '{:.4f}')} | {_f(m['lpips'], '{:.4f}')} | "
            f"{_f(m['lmd_mouth'], '{:.2f}')} / {_f(m['lmd_face'], '{:.2f}')} | {_f(m['mouth_corr'], '{:.2f}')} | "
            f"{_f(m['blink_corr'], '{:.2f}')} | {_f(m['av_offset'], '{:+d}')} ({_f(m['av_corr'], '{:.2f}')}); "
            f"truth {_f(gt['av_offset'], '{:+d}')} ({_f(gt['av_corr'], '{:.2f}')}) | {fps} | {cmd} | {where} |"))
    for key in ("avatar", "avatar_gt_torso", "mean_frame"):
        if key not in result["methods"]:
            continue
        m = result["methods"][key]
        append_row(REGION_TABLE, (
            f"| {datetime.date.today()} | {args.source.name} | {args.preset} | {NAMES[key]} | "
            f"{split['count']} @ {split['resolution']} px | "
            + " | ".join(_f(m.get(k), "{:.2f}")
                         for k in ("psnr", "psnr_face", "psnr_hair", "psnr_torso", "psnr_background", "psnr_head_edge"))
            + f" | {cmd} | {where} |"))
    for path, d in result["drives"].items():
        a = d["avatar"]
        b = d.get("nearest_audio", {})
        append_row(DRIVE_TABLE, (
            f"| {datetime.date.today()} | {args.source.name} | {args.preset} | {Path(path).name} ({d['seconds']:.1f} s) | "
            f"{_f(a['av_offset'], '{:+d}')} | {_f(a['av_corr'], '{:.2f}')} | {_f(a['av_corr_at_0'], '{:.2f}')} | "
            f"{_f(b.get('av_offset'), '{:+d}')} ({_f(b.get('av_corr'), '{:.2f}')}) | {cmd} | {where} |"))


if __name__ == "__main__":
    main()
