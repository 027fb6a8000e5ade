"""Train an avatar on a subject (or reuse a finished run) and score it against two baselines.

    python bench/bench_train.py SUBJECT_OR_VIDEO --run RUN_DIR --preset cpu-30min [--write]

Prints test-split PSNR (full frame and inside the face mask) of the avatar, the mean training
frame and the training frame nearest in audio feature, all at the training resolution on the
same frames; --write appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, machine  # noqa: E402

TABLE = "## Avatar training (`gsavatar train`)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="subject dataset or video")
    ap.add_argument("--run", type=Path, required=True, help="run directory (reused if it holds a finished run)")
    ap.add_argument("--preset", default="cpu-30min")
    ap.add_argument("--write", action="store_true", help="append a row to BENCHMARKS.md")
    args = ap.parse_args()

    import torch

    from gsavatar.config import load_preset
    from gsavatar.data.frames import SubjectFrames
    from gsavatar.eval.baselines import avatar_predictor, mean_frame, nearest_audio_frame, score
    from gsavatar.model.io import load_run
    from gsavatar.train.run import prepare_subject, train_command

    cfg = load_preset(args.preset)
    if not (args.run / "summary.json").exists():
        train_command(args.source, args.run, cfg)
    summary = json.loads((args.run / "summary.json").read_text())
    bundle = load_run(args.run)
    avatar, cfg = bundle.avatar, bundle.config
    torch.set_num_threads(max(1, cfg.cpu_threads) if cfg.cpu_threads else torch.get_num_threads())
    subject = prepare_subject(args.source, args.run, cfg.render_size)
    data = SubjectFrames(subject, cfg.render_size, summary["audio_feature"])

    t = time.perf_counter()
    results = {"avatar": score(avatar_predictor(avatar, data), data), "mean training frame": score(mean_frame(data), data),
               "nearest-audio training frame": score(nearest_audio_frame(data), data)}
    print(f"scored in {time.perf_counter() - t:.1f} s on {results['avatar']['frames']} test frames at {cfg.render_size} px")
    print(f"{'method':<30} {'PSNR':>8} {'face PSNR':>10}")
    for name, r in results.items():
        print(f"{name:<30} {r['psnr']:>8.2f} {r['psnr_face']:>10.2f}")
    a, m, n = results["avatar"], results["mean training frame"], results["nearest-audio training frame"]
    if args.write:
        g = summary["gaussians"]
        row = (f"| {datetime.date.today()} | {args.source.name} | {args.preset} | {cfg.render_size} | "
               f"{summary['wall_s'] / 60:.1f} | {g['face']} / {g['mouth']} / {g['torso']} | {a['frames']} | "
               f"{a['psnr']:.2f} / {a['psnr_face']:.2f} | {m['psnr']:.2f} / {m['psnr_face']:.2f} | "
               f"{n['psnr']:.2f} / {n['psnr_face']:.2f} | {summary['device']}: {machine()} | "
               f"`python bench/bench_train.py {args.source} --run {args.run} --preset {args.preset}` |")
        append_row(TABLE, row)


if __name__ == "__main__":
    main()
