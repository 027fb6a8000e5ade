"""Lip-sync on the synthetic subject: train cpu-tiny (or reuse a run), then compare the rendered
mouth opening on the held-out frames with the generator's ground truth, with the true audio
and with the audio features shuffled in time.

    python bench/bench_lipsync.py --work WORK_DIR [--duration 6] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, machine  # noqa: E402

TABLE = "## Lip-sync on the synthetic subject"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch

    from gsavatar.config import PreprocessConfig, load_preset
    from gsavatar.data.frames import SubjectFrames
    from gsavatar.data.preprocess import preprocess
    from gsavatar.data.synthetic import make_synthetic_subject, mouth_darkness
    from gsavatar.eval.baselines import avatar_predictor, score
    from gsavatar.model.io import load_run
    from gsavatar.train.trainer import train

    args.work.mkdir(parents=True, exist_ok=True)
    truth_path = args.work / "mouth_open_px.npy"
    if not truth_path.exists():  # the same subject as the test suite's fixture (256 px, seed 1)
        s = make_synthetic_subject(args.work / "demo.mp4", duration_s=args.duration, size=256, seed=1)
        preprocess(s.video_path, args.work / "subject", PreprocessConfig(size=256, audio_features=("logmel",)))
        np.save(truth_path, s.mouth_open_px)
    run = args.work / "run"
    if not (run / "summary.json").exists():
        train(args.work / "subject", run, load_preset(args.preset))
    summary = json.loads((run / "summary.json").read_text())
    bundle = load_run(run)
    avatar, cfg = bundle.avatar, bundle.config
    data = SubjectFrames(args.work / "subject", cfg.render_size)
    truth = np.load(truth_path)[data.test_indices]
    lm = data.dataset.landmarks

    perm = torch.from_numpy(np.random.default_rng(0).permutation(data.num_frames))
    results = {}
    for name, audio in (("true audio", data.audio), ("shuffled audio", data.audio[perm])):
        images = {int(i): avatar_predictor(avatar, data, audio)(int(i)) for i in data.test_indices}
        opening = [mouth_darkness(images[int(i)].numpy(), lm[i], data.dataset.size) for i in data.test_indices]
        r = float(np.corrcoef(opening, truth)[0, 1]) if np.std(opening) > 0 else 0.0
        results[name] = (r, score(images.__getitem__, data)["psnr_face"])
        print(f"{name:<15} mouth-opening r = {r:+.3f}   face PSNR {results[name][1]:.2f} dB")
    if args.write:
        (r, p), (rs, ps) = results["true audio"], results["shuffled audio"]
        append_row(TABLE, f"| {datetime.date.today()} | {args.duration:.0f} s, 256 px, seed 1 | {args.preset} | "
                          f"{summary['wall_s'] / 60:.1f} | {len(truth)} | {r:.3f} | {rs:.3f} | {p:.2f} | {ps:.2f} | "
                          f"{machine()} | `python bench/bench_lipsync.py --work {args.work} --duration {args.duration:g}` |")


if __name__ == "__main__":
    main()
