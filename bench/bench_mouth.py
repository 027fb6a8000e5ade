"""Lip-sync without rendering (gsavatar.eval.lipsync): designs of the audio -> motion part compared
over seeds, or one trained run scored, in minutes on a CPU.

    python bench/bench_mouth.py designs SUBJECT --designs base logmel radius2 --seeds 0 1 [--write]
    python bench/bench_mouth.py run RUN_DIR [--subject SUBJECT] [--write]
    python bench/bench_mouth.py folds SUBJECT [--kinds logmel whisper] [--folds 11] [--write]

``designs`` trains only the motion stage of ``--preset`` (the face net learns audio -> landmark
motion from the tracking, nothing rendered: about a minute for 3000 iterations) for every design
and seed, then scores each net. ``run`` scores a whole trained avatar. Scores, per avatar:

* held-out: the predicted inner-lip gap on the test split against the tracked gap (r at lag 0,
  and the best lag), and the nearest-audio baseline's;
* per drive (``--drives``: the shared radio31 and vrt1 clips, plus any wav): r against the
  drive's speech energy at the best lag over the speech, the baseline's, and the mouth's opening
  in 2 s of silence appended to the drive (fraction of the subject's speaking range; 0 is closed).

``folds`` asks how much one held-out split says: a linear probe (ridge regression, fixed
:data:`PROBE_RIDGE`, from the normalised +-4-frame feature window to the tracked lip gap) is fitted
and scored on each of ``--folds`` contiguous stretches of the subject in turn (its training leaves
out the stretch and 8 frames either side): the subject's own test split, and ``--folds - 1``
equal stretches of the frames before it.

Its last line: ``mouth: <design> held-out r <r>, drives r <min>..<max> (baseline <min>..<max>), silence <s>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_AUDIO, append_row, like_the_cli, machine  # noqa: E402

TABLE = "## Lip-sync without rendering (`bench/bench_mouth.py`)"
FOLD_TABLE = "## Held-out splits compared (`bench/bench_mouth.py folds`)"
PROBE_RIDGE = 1e4
"""The probe's ridge penalty (on features normalised to unit variance): the strongest of 1e2-1e4,
which scored best on cnn2's test split for both feature kinds (chosen on that split, so the
probe's test-split column is, if anything, flattered)."""
PROBE_RADIUS = 4
SILENCE_S = 2.0


def _design(cfg, name: str):
    """The preset with one named change (what each design tests is in its name)."""
    avatar = {
        "base": {},
        "logmel": {"audio_feature": "logmel"},
        "whisper": {"audio_feature": "whisper"},
        "both": {"audio_feature": "logmel+whisper"},  # side by side, Whisper's steps repeated to log-mel's rate
        "phonemes": {"audio_feature": "phonemes"},
        "logmel_phonemes": {"audio_feature": "logmel+phonemes"},
        "radius2": {"audio_window_radius": 2},
        "radius8": {"audio_window_radius": 8},
        "smooth1": {"audio_smoothing_frames": 1},
        "smooth16": {"audio_smoothing_frames": 16},
        # How far ahead a frame reads (the latency floor of live streaming), the window's 9 frames kept:
        # live = the live preset (2 frames ahead), future0 (none), future4 (4 frames).
        "live": {"audio_window_radius": 6, "audio_window_future": 2, "audio_smoothing_future": 0},
        "future0": {"audio_window_radius": 8, "audio_window_future": 0, "audio_smoothing_future": 0},
        "future4": {"audio_window_radius": 5, "audio_window_future": 3, "audio_smoothing_future": 1},
    }
    loss = {"nosilence": {"silence_every": 0}, "silence4": {"silence_every": 4}}
    augment = {"augment": {"variants": 4},  # four noisy, louder/quieter copies, heard half the time
               # four copies as other voices (frequencies scaled by 0.85-1.15), level and noise untouched
               "timbre": {"variants": 4, "warp": 0.15, "gain_db": 0.0, "noise_snr_db": 200.0},
               # four copies spoken 0.85-1.15 times as fast, level and noise untouched
               "tempo": {"variants": 4, "tempo": 0.15, "gain_db": 0.0, "noise_snr_db": 200.0}}
    for part in name.split("+"):  # designs combine: logmel+nosilence
        if part in avatar:
            cfg = dataclasses.replace(cfg, avatar=dataclasses.replace(cfg.avatar, **avatar[part]))
        elif part in loss:
            cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **loss[part]))
        elif part in augment:
            cfg = dataclasses.replace(cfg, audio_augment=dataclasses.replace(cfg.audio_augment, **augment[part]))
        else:
            raise SystemExit(f"unknown design {part!r} (choose from {', '.join([*avatar, *loss, *augment])}, joined by +)")
    return cfg


def _drives(names: list[str]) -> dict:
    import numpy as np

    from gsavatar.drive import frame_count, load_speech

    known = {"radio31": SHARED_AUDIO / "radio31_8s.wav", "vrt1": SHARED_AUDIO / "vrt1_5s.wav"}
    out = {}
    for name in names:
        path = known.get(name, Path(name))
        if not path.is_file():
            print(f"drive {name}: {path} not found, skipped")
            continue
        speech = load_speech(path)
        out[path.stem] = (np.concatenate([speech, np.zeros(int(SILENCE_S * 16000), np.float32)]), frame_count(speech))
    return out


def score_avatar(avatar, data, drives: dict) -> dict:
    import numpy as np

    from gsavatar.drive import SpeechFeaturizer
    from gsavatar.eval import lipsync as L

    truth = data.lip_gaps()
    test = np.asarray(data.test_indices)
    lips = L.canonical_lips(data)
    mouth = L.mouth_range(data)
    reach = L.reach_frames(avatar)
    result = {"held_out": L.timing(L.avatar_lip_gaps(avatar, lips, data.audio, data.blink, test), truth[test]),
              "held_out_baseline": L.timing(L.nearest_audio_lip_gaps(data, data.audio[test]), truth[test]),
              "drives": {}}
    featurizer = SpeechFeaturizer(avatar.audio_spec)
    for name, (samples, speech_frames) in drives.items():
        features = featurizer(samples)
        result["drives"][name] = tuple(L.score_drive(gaps, samples, mouth, reach, timed_frames=speech_frames)
                                       for gaps in (L.avatar_lip_gaps(avatar, lips, features),
                                                    L.nearest_audio_lip_gaps(data, features)))
    return result


def _fmt(x, spec=".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _summary_line(label: str, results: list[dict]) -> tuple[str, dict]:
    """Mean over seeds of each figure, and the one-line summary."""
    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    held = mean(r["held_out"].r_at_0 for r in results)
    held_lag = [r["held_out"].lag for r in results]
    base = mean(r["held_out_baseline"].r_at_0 for r in results)
    names = list(results[0]["drives"])
    drive_r = {n: mean(r["drives"][n][0].timing.r for r in results) for n in names}
    drive_base = {n: mean(r["drives"][n][1].timing.r for r in results) for n in names}
    drive_lag = {n: [r["drives"][n][0].timing.lag for r in results] for n in names}
    silence = mean(r["drives"][n][0].silence_opening for r in results for n in names)
    figures = {"held": held, "held_lag": held_lag, "held_base": base, "drive_r": drive_r, "drive_base": drive_base,
               "drive_lag": drive_lag, "silence": silence}
    rs, bs = [v for v in drive_r.values() if v is not None], [v for v in drive_base.values() if v is not None]
    line = (f"mouth: {label} held-out r {_fmt(held)} (lags {held_lag}; baseline {_fmt(base)}), drives r "
            f"{_fmt(min(rs) if rs else None)}..{_fmt(max(rs) if rs else None)} (baseline "
            f"{_fmt(min(bs) if bs else None)}..{_fmt(max(bs) if bs else None)}), silence {_fmt(silence)}")
    return line, figures


def _row(args, label: str, seeds: str, figures: dict, minutes: float) -> str:
    drives = "; ".join(f"{n} {_fmt(figures['drive_r'][n])} (lags {figures['drive_lag'][n]}; baseline "
                       f"{_fmt(figures['drive_base'][n])})" for n in figures["drive_r"])
    return (f"| {datetime.date.today()} | {args.target.name} | {label} | {seeds} | {_fmt(figures['held'])} "
            f"(lags {figures['held_lag']}) | {_fmt(figures['held_base'])} | {drives} | {_fmt(figures['silence'])} | "
            f"{minutes:.1f} | {machine()} | `{' '.join(['python', 'bench/bench_mouth.py', *sys.argv[1:]])}` |")


def fold_scores(subject: Path, kind: str, folds: int) -> list[tuple[int, int, object]]:
    """(first frame, last frame, TimingScore) of the probe on each fold (see the module's doc)."""
    import numpy as np

    from gsavatar.data.frames import SubjectFrames
    from gsavatar.eval import lipsync as L

    data = SubjectFrames(subject, 256, kind, "cpu")
    truth = data.lip_gaps()
    n = len(truth)
    feats = data.audio.cpu().numpy().reshape(n, -1).astype(np.float64)
    window = np.clip(np.arange(n)[:, None] + np.arange(-PROBE_RADIUS, PROBE_RADIUS + 1)[None], 0, n - 1)
    x = feats[window].reshape(n, -1)
    split = int(data.test_indices[0])  # the last fold is the subject's test split; the rest share the frames before it
    stretches = [np.arange(split * f // (folds - 1), split * (f + 1) // (folds - 1)) for f in range(folds - 1)]
    out = []
    for test in [*stretches, np.asarray(data.test_indices)]:
        gap = 2 * PROBE_RADIUS  # frames whose windows overlap the fold stay out of its training
        train = np.setdiff1d(np.arange(n), np.arange(max(0, test[0] - gap), min(n, test[-1] + gap + 1)))
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-3
        a, y = (x[train] - mu) / sd, truth[train] - truth[train].mean()
        if a.shape[1] <= a.shape[0]:
            w = np.linalg.solve(a.T @ a + PROBE_RIDGE * np.eye(a.shape[1]), a.T @ y)
        else:  # more dimensions than frames: the same solution from the frames' side (dual form)
            w = a.T @ np.linalg.solve(a @ a.T + PROBE_RIDGE * np.eye(a.shape[0]), y)
        out.append((int(test[0]), int(test[-1]), L.timing(((x[test] - mu) / sd) @ w + truth[train].mean(), truth[test])))
    return out


def folds_main(args) -> None:
    for kind in args.kinds:
        start = time.perf_counter()
        scores = fold_scores(args.target, kind, args.folds)
        for first, last, t in scores:
            print(f"{kind} frames {first}-{last}: r at 0 {_fmt(t.r_at_0)}, best {_fmt(t.r)} at lag {t.lag}")
        r0 = [t.r_at_0 for _, _, t in scores]
        lags = [t.lag for _, _, t in scores]
        at0 = sum(lag == 0 for lag in lags)
        test = scores[-1][2]
        line = (f"mouth: probe {kind} on {args.target.name}: r at 0 over {args.folds} folds mean {statistics.fmean(r0):.2f}, "
                f"{min(r0):.2f}..{max(r0):.2f}, lag 0 in {at0} of {args.folds}; the test split (last fold) "
                f"{_fmt(test.r_at_0)} (lag {test.lag})")
        print(line, f"({time.perf_counter() - start:.1f} s)")
        if args.write:
            append_row(FOLD_TABLE, (
                f"| {datetime.date.today()} | {args.target.name} | {kind} | {args.folds} | {statistics.fmean(r0):.2f} | "
                f"{min(r0):.2f}..{max(r0):.2f} | {at0} of {args.folds} (others: {sorted(x for x in lags if x != 0)}) | "
                f"{_fmt(test.r_at_0)} (lag {test.lag}) | {machine()} | "
                f"`{' '.join(['python', 'bench/bench_mouth.py', *sys.argv[1:]])}` |"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("designs", "run", "folds"))
    ap.add_argument("target", type=Path, help="designs, folds: a subject directory; run: a run directory")
    ap.add_argument("--kinds", nargs="+", default=["logmel"], help="folds: feature kinds (a+b: side by side)")
    ap.add_argument("--folds", type=int, default=11, help="folds: contiguous stretches (the last: the test split)")
    ap.add_argument("--subject", type=Path, default=None, help="run: the subject (default: the avatar's own)")
    ap.add_argument("--designs", nargs="+", default=["base"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--preset", default="cpu-30min")
    ap.add_argument("--iterations", type=int, default=3000, help="motion-stage iterations of each design")
    ap.add_argument("--drives", nargs="+", default=["radio31", "vrt1"], help="radio31, vrt1 or wav paths")
    ap.add_argument("--write", action="store_true", help="append rows to BENCHMARKS.md")
    args = ap.parse_args()
    like_the_cli()

    import torch

    from gsavatar.config import StageConfig, load_preset
    from gsavatar.data.frames import SubjectFrames
    from gsavatar.model.io import load_run
    from gsavatar.train.trainer import train

    if args.what == "folds":
        folds_main(args)
        return
    drives = _drives(args.drives)
    if args.what == "run":
        start = time.perf_counter()
        bundle = load_run(args.target, "cpu")
        subject = args.subject or bundle.subject.subject_dir
        torch.set_num_threads(1)
        data = SubjectFrames(subject, bundle.subject.render_size, bundle.subject.audio.kind, "cpu")
        line, figures = _summary_line(args.target.name, [score_avatar(bundle.avatar, data, drives)])
        print(f"scored in {time.perf_counter() - start:.1f} s")
        if args.write:
            append_row(TABLE, _row(args, "trained avatar", "-", figures, 0.0))
        print(line)
        return
    lines = []
    for name in args.designs:
        results, minutes = [], []
        for seed in args.seeds:
            cfg = _design(load_preset(args.preset), name)
            cfg = dataclasses.replace(cfg, seed=seed, stages=[StageConfig("motion", args.iterations, densify=False)])
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                train(args.target, Path(tmp) / "run", cfg, show_progress=False)
                bundle = load_run(Path(tmp) / "run", "cpu")
                minutes.append((time.perf_counter() - start) / 60)
            data = SubjectFrames(args.target, bundle.subject.render_size, bundle.subject.audio.kind, "cpu")
            results.append(score_avatar(bundle.avatar, data, drives))
            print(f"{name} seed {seed}: held-out r {_fmt(results[-1]['held_out'].r_at_0)} "
                  f"({minutes[-1]:.1f} min to train and score)", flush=True)
        line, figures = _summary_line(name, results)
        lines.append(line)
        print(line, flush=True)
        if args.write:
            append_row(TABLE, _row(args, f"{name}: motion stage {args.iterations} it", " ".join(map(str, args.seeds)),
                                   figures, statistics.fmean(minutes)))
    print("\n".join(lines[:-1]))
    print(lines[-1])


if __name__ == "__main__":
    main()
