"""Batches on Ray (`gsavatar batch`): the same render jobs with 1 and with 2 parallel workers.

    python bench/bench_batch.py RUN_DIR [--jobs 6] [--seconds 4] [--size 256] [--workers 2] [--write]

Makes ``--jobs`` render jobs of the avatar in RUN_DIR (each renders ``--seconds`` of the shared
radio31_8s.wav) and runs the batch three times through the library, each into a fresh output
root: in this process (the reference: no Ray), on a local Ray instance one step at a time, and on
the same instance ``--workers`` steps at a time (each step asks for 1 CPU and renders on 1 thread,
torch's and the rasterizer's, in all three runs). Ray's start-up is timed apart and left out of the batch times.
Speedup = one-at-a-time time / parallel time; overhead per task = (one-at-a-time Ray time -
in-process time) / jobs. The last line reads
``batch: <n> jobs ok, <failed> failed, speedup <x> on <w> workers, overhead <s> s per task``.
--write appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_AUDIO, append_row, like_the_cli, machine  # noqa: E402

TABLE = "## Batches (`gsavatar batch`)"
DEFAULT_AUDIO = SHARED_AUDIO / "radio31_8s.wav"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run directory with avatar.pt")
    ap.add_argument("--audio", type=Path, default=DEFAULT_AUDIO, help="speech file (default: shared radio31_8s.wav)")
    ap.add_argument("--jobs", type=int, default=6, help="render jobs in the batch")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds of speech each job renders")
    ap.add_argument("--size", type=int, default=256, help="output size in pixels")
    ap.add_argument("--workers", type=int, default=2, help="parallel steps in the parallel run")
    ap.add_argument("--write", action="store_true", help="append a row to BENCHMARKS.md")
    ap.add_argument("--note", default="", help="added to the machine column (e.g. 'shared with other jobs')")
    args = ap.parse_args()
    like_the_cli()

    from gsavatar.batch import BatchJobs, BatchResources, InProcessExecutor, RayExecutor, RenderJob, run_batch
    from gsavatar.batch.steps import use_cpus
    from gsavatar.data.video import write_wav
    from gsavatar.drive import SAMPLE_RATE, load_speech

    load = os.getloadavg()[0]
    samples = load_speech(args.audio)[: int(round(args.seconds * SAMPLE_RATE))]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_wav(tmp / "speech.wav", samples)
        renders = tuple(RenderJob(f"render{i}", (tmp / "speech.wav",), run=args.run.resolve(), size=args.size)
                        for i in range(args.jobs))

        def batch(name: str, executor) -> tuple[float, int, int]:
            jobs = BatchJobs(tmp / name, (), renders, BatchResources())
            start = time.perf_counter()
            results = run_batch(jobs, executor, log=lambda line: None)
            wall = time.perf_counter() - start
            ok, failed = sum(r.state == "done" for r in results), sum(r.state == "failed" for r in results)
            print(f"{name}: {wall:.1f} s for {args.jobs} jobs ({ok} ok, {failed} failed)", flush=True)
            return wall, ok, failed

        use_cpus(1)  # what a Ray step given 1 CPU does, so that the in-process run differs only by Ray
        in_process, ok0, failed0 = batch("in-process", InProcessExecutor())
        start = time.perf_counter()
        ray = RayExecutor(None, tmp, BatchResources())
        ray_start = time.perf_counter() - start
        print(f"Ray start-up (a local instance, node checks): {ray_start:.1f} s; {ray.description}")
        try:
            ray.max_parallel = 1
            one, ok1, failed1 = batch("ray-1-worker", ray)
            ray.max_parallel = args.workers
            many, ok2, failed2 = batch(f"ray-{args.workers}-workers", ray)
        finally:
            ray.close()
    speedup = one / many
    overhead = (one - in_process) / args.jobs
    failed = failed0 + failed1 + failed2
    if args.write:
        note = (f", {args.note}" if args.note else "") + f", load average {load:.1f} at start"
        cmd = (f"python bench/bench_batch.py {args.run} --jobs {args.jobs} --seconds {args.seconds:g} "
               f"--size {args.size} --workers {args.workers}")
        row = (f"| {datetime.date.today()} | {args.jobs} renders of {args.run} ({args.seconds:g} s, {args.size} px) | "
               f"{in_process:.1f} | {one:.1f} | {many:.1f} ({args.workers} workers) | {speedup:.2f}x | {overhead:.2f} | "
               f"{ray_start:.1f} | {machine()}{note} | `{cmd}` |")
        append_row(TABLE, row)
    print(f"batch: {ok2} jobs ok, {failed} failed, speedup {speedup:.2f} on {args.workers} workers, "
          f"overhead {overhead:.2f} s per task")


if __name__ == "__main__":
    main()
