"""Render speed of ``gsavatar render``: frames per second rendering only, and end to end with encoding.

    python bench/bench_render.py RUN_DIR [--audio SPEECH] [--seconds 8] [--size 512] [--write] [--note TEXT]

Renders the first ``--seconds`` of the speech (default: the shared radio31_8s.wav) with the
avatar of RUN_DIR at its trained size (or ``--size``) through the same function as the
command (gsavatar.outputs.render_video.render_video) and prints: rendering-only frames/s
(the avatar's forward passes), end-to-end frames/s (rendering + H.264/AAC encoding, after
set-up) and the total wall time including set-up (loading the avatar, decoding the audio,
audio features). --write appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_AUDIO, append_row, like_the_cli, machine  # noqa: E402

TABLE = "## Rendering video (`gsavatar render`)"
DEFAULT_AUDIO = SHARED_AUDIO / "radio31_8s.wav"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run directory with avatar.pt")
    ap.add_argument("--audio", type=Path, default=DEFAULT_AUDIO, help="speech file (default: shared radio31_8s.wav)")
    ap.add_argument("--seconds", type=float, default=8.0, help="render this many seconds of the speech")
    ap.add_argument("--size", type=int, default=None, help="output size in pixels (default: the trained size)")
    ap.add_argument("--camera", default="train", help="camera path (train, orbit, zoom or a JSON file)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cpu-threads", type=int, default=-1, help="-1: the trained preset's (1 for the CPU presets)")
    ap.add_argument("--write", action="store_true", help="append a row to BENCHMARKS.md")
    ap.add_argument("--note", default="", help="added to the machine column (e.g. 'shared with other jobs')")
    args = ap.parse_args()
    like_the_cli()

    from gsavatar.data.video import write_wav
    from gsavatar.drive import SAMPLE_RATE, DriveConfig, load_speech
    from gsavatar.outputs.render_video import render_video

    load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    samples = load_speech(args.audio)[: int(round(args.seconds * SAMPLE_RATE))]
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "speech.wav"
        write_wav(clip, samples)
        r = render_video(args.run, clip, Path(tmp) / "out.mp4", DriveConfig(camera=args.camera), size=args.size,
                         device=args.device, progress=False, cpu_threads=args.cpu_threads)
        mp4_kb = (Path(tmp) / "out.mp4").stat().st_size / 1024
    encode_s = r["total_s"] - r["setup_s"] - r["render_s"]
    summary = args.run / "summary.json"
    r["gaussians"] = sum(json.loads(summary.read_text())["gaussians"].values()) if summary.is_file() else "?"
    print(f"{r['frames']} frames ({r['seconds']:.2f} s of audio) at {r['size']} px on {r['device']}, camera {args.camera}")
    print(f"rendering only: {r['render_fps']:.1f} frames/s ({1000 * r['render_s'] / r['frames']:.1f} ms a frame)")
    print(f"end to end (render + encode, after set-up): {r['end_to_end_fps']:.1f} frames/s; encoding {encode_s:.2f} s")
    print(f"total wall incl. set-up (avatar, audio decode, features): {r['total_s']:.1f} s (set-up {r['setup_s']:.1f} s); "
          f"mp4 {mp4_kb:.0f} KB; real-time factor {r['seconds'] / r['total_s']:.2f}x")
    if args.write:
        size_arg = f" --size {args.size}" if args.size else ""
        cmd = f"python bench/bench_render.py {args.run} --seconds {args.seconds:g}{size_arg}"
        if args.camera != "train":
            cmd += f" --camera {args.camera}"
        note = (f", {args.note}" if args.note else "") + f", load average {load:.1f} at start"
        row = (f"| {datetime.date.today()} | {args.run} ({r['gaussians']} Gaussians) | {r['size']} | "
               f"{args.audio.name} ({r['seconds']:.1f} s, "
               f"{r['frames']} frames) | {r['render_fps']:.1f} | {r['end_to_end_fps']:.1f} | {r['total_s']:.1f} "
               f"(set-up {r['setup_s']:.1f}) | {r['device']}: {machine()}{note} | `{cmd}` |")
        append_row(TABLE, row)


if __name__ == "__main__":
    main()
