"""Hash-grid encoder speed: our kernel against the PyTorch reference, forward and forward + backward.

    python bench/bench_hashgrid.py [--device cpu|cuda] [--points 16384 65536 262144] [--repeats 20] [--write]

The encoder is the face deformer's: a TriPlaneEncoder with the preset's face hash grid and
hash_bound (configs/default.toml: 3 planes x 12 levels x 1 feature, 2^17 entries per level,
resolutions 16..512), on random points in its box. "ours" is the CUDA kernel on --device cuda
and its host twin (the same math in C++ loops) on cpu. Forward + backward is what training does:
gradients to the tables only (the avatar feeds the Gaussian centres detached). Milliseconds per
call, the median of --repeats calls after five warm-up calls (CUDA: synchronised), the reference's
and ours taken in turn so that a busy machine slows both alike. On the CPU,
--threads torch threads (default 1: steadier when other jobs share the CPU); --points may be smaller there.
--write appends one row per point count to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, machine  # noqa: E402

TABLE = "## Hash-grid encoder (`bench/bench_hashgrid.py`)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--points", type=int, nargs="+", default=[16384, 65536, 262144])
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per figure (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    ap.add_argument("--preset", default="default", help="preset whose face hash grid is used")
    ap.add_argument("--write", action="store_true", help="append rows to BENCHMARKS.md")
    ap.add_argument("--note", default="", help="added to the machine column (e.g. 'shared with other jobs')")
    args = ap.parse_args()

    import torch

    from gsavatar.config import load_preset
    from gsavatar.model.encoding import TriPlaneEncoder
    from gsavatar.render import get_backend

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    avatar = load_preset(args.preset).avatar
    cfg, bound = avatar.face.hash, avatar.hash_bound

    # Named explicitly (strict): the kernels run, or the benchmark stops with the reason.
    backends = {"torch": get_backend("torch", device),
                device: get_backend("cuda" if device == "cuda" else "cpp", device)}  # the CUDA kernel, or its host twin
    t0 = time.perf_counter()
    backends[device].extension()
    build_s = time.perf_counter() - t0

    torch.manual_seed(0)
    encoders = {name: TriPlaneEncoder(cfg, bound).to(device) for name in backends}
    encoders[device].load_state_dict(encoders["torch"].state_dict())

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def median_ms(fns: dict) -> dict:
        """Median milliseconds of each function, called in turn."""
        for _ in range(5):
            for fn in fns.values():
                fn()
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(1000 * (time.perf_counter() - start))
        return {name: statistics.median(t) for name, t in times.items()}

    load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    print(f"face tri-plane encoder: {cfg.num_levels} levels x {cfg.features_per_level} features, "
          f"2^{cfg.log2_table_size} entries, resolutions {cfg.base_resolution}..{cfg.max_resolution}, "
          f"bound {bound}; {device}" + (f", {args.threads} thread(s)" if device == "cpu" else "")
          + f"; kernels loaded in {build_s:.1f} s; load average {load:.1f}")
    print(f"{'points':>8} | {'torch fwd':>10} | {'ours fwd':>9} | {'x':>5} | {'torch f+b':>10} | {'ours f+b':>9} | {'x':>5}")
    rows = []
    for n in args.points:
        xyz = (torch.rand(n, 3, device=device) * 2 - 1) * bound

        def forward(name, xyz=xyz):
            with torch.no_grad():
                encoders[name](xyz, backends[name])

        def forward_backward(name, xyz=xyz):
            encoders[name].zero_grad(set_to_none=True)
            encoders[name](xyz, backends[name]).sum().backward()

        fwd = median_ms({name: functools.partial(forward, name) for name in encoders})
        both = median_ms({name: functools.partial(forward_backward, name) for name in encoders})
        (tf, tb), (of, ob) = (fwd["torch"], both["torch"]), (fwd[device], both[device])
        print(f"{n:>8} | {tf:>10.2f} | {of:>9.2f} | {tf / of:>4.1f}x | {tb:>10.2f} | {ob:>9.2f} | {tb / ob:>4.1f}x")
        rows.append((n, tf, of, tb, ob))

    if args.write:
        where = f"{device}, {args.threads} torch thread(s)" if device == "cpu" else f"cuda ({torch.cuda.get_device_name()})"
        note = (f", {args.note}" if args.note else "") + f", load average {load:.1f} at start"
        cmd = f"python bench/bench_hashgrid.py --device {device} --points {' '.join(map(str, args.points))} --repeats {args.repeats}"
        if device == "cpu":
            cmd += f" --threads {args.threads}"
        ours = "CUDA kernel" if device == "cuda" else "host twin"
        for n, tf, of, tb, ob in rows:
            append_row(TABLE, f"| {datetime.date.today()} | {n} | {ours} | {tf:.2f} | {of:.2f} ({tf / of:.1f}x) | "
                              f"{tb:.2f} | {ob:.2f} ({tb / ob:.1f}x) | {where}: {machine()}{note} | `{cmd}` |")


if __name__ == "__main__":
    main()
