"""Speed of our kernels against the references: rasterizer, whole avatar frame, training iterations.

    python bench/bench_kernels.py raster [--device cuda] [--size 512] [--counts 10000 50000 200000] [--write]
    python bench/bench_kernels.py frame RUN_DIR [--audio SPEECH] [--device cuda] [--size 512] [--frames 10] [--write]
    python bench/bench_kernels.py train SUBJECT [--device cuda] [--iterations 200] [--write]

raster: one random scene (gsavatar.render.synthetic.random_scene) per Gaussian count at SIZE x SIZE,
    forward and forward+backward milliseconds (median of --repeats after --warmup) for every
    backend that runs on the device: "torch" (the reference), "cpp" (our CPU rasterizer), "cuda"
    (ours) and gsplat (GPU, when installed). The ratio column is ours / gsplat on a GPU, ours /
    torch on the CPU (lower is better). Also the (16 x 16 tile, Gaussian) pairs the frame bins and
    our forward time per pair.
frame: the whole avatar frame of a trained run (audio window -> deformation nets -> rasterize all
    branches -> composite) in frames per second at SIZE (default: the trained size), per backend,
    under torch.no_grad(), driven as `gsavatar render` drives it (pose loop, blinks) from the
    checkpoint alone, by --audio or 8 s of noise. Batches of --frames consecutive frames are timed
    (one GPU sync per batch). A plain frame settles its pair budget (one sync per frame, as
    `gsavatar render` does). On a GPU two more columns: "cuda no-sync" (inside
    gsavatar.render.unsettled_pair_budget: a PairBudget sizes the pair buffers and is settled once
    per batch, so no frame waits for the GPU) and "cuda graph" (that frame captured once as a CUDA
    graph and replayed).
train: training iterations per second of the `default` preset's loop (cpu-tiny's on CPU, or
    --preset) on SUBJECT for --iterations, per backend; with --stage NAME that stage alone, timed
    as the difference between runs of 2N and N iterations (set-up and evaluation cancel out).

The hash-grid encoder has its own script (bench/bench_hashgrid.py). Timings synchronise the GPU
around each measured call. --write appends rows to BENCHMARKS.md.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, like_the_cli, machine  # noqa: E402

RASTER_TABLE = "## Rasterizer kernels (`bench/bench_kernels.py raster`)"
FRAME_TABLE = "## Whole avatar frame (`bench/bench_kernels.py frame`)"
TRAIN_TABLE = "## Training iterations (`bench/bench_kernels.py train`)"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _time_interleaved_ms(fns: dict, device: str, warmup: int, repeats: int) -> dict:
    """:func:`_time_ms` of several functions taken in turn (a, b, a, b, ...): a load swing on a
    shared machine then slows every one of them alike, and their ratios hold."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _backends(device: str) -> list[str]:
    from gsavatar.render import available_backends

    names = ["torch"] + [b for b in ("cpp", "cuda") if b in available_backends()
                         and (b == "cuda") == (device == "cuda")]
    if device == "cuda":
        try:
            import gsplat  # noqa: F401

            names.append("gsplat")
        except ImportError:
            print("gsplat is not installed: no gsplat column (pip install gsplat==1.5.3 packaging)")
    return names


def _raster_call(backend: str, scene, size: int, grad: bool):
    from gsavatar.render import rasterize

    leaves = [t.detach().requires_grad_(grad and i < 5) for i, t in enumerate(scene)]

    def run():
        if backend == "gsplat":
            import gsplat

            color, alpha, _ = gsplat.rasterization(*leaves[:5], leaves[5][None], leaves[6][None], size, size,
                                                   near_plane=0.01, far_plane=1e3, eps2d=0.3, packed=False)
        else:
            out = rasterize(*leaves, size, size, backend=backend, tile_size=16 if backend != "torch" or
                            scene.means.is_cuda else 8)
            color, alpha = out.color, out.alpha
        if grad:
            (color.sum() + alpha.sum()).backward()

    return run


def _pairs(scene, size: int, backend: str) -> int:
    """The (16 x 16 tile, Gaussian) pairs our binning makes for ``scene``."""
    from gsavatar.render import get_backend

    ext = get_backend(backend, scene.means.device).extension()
    ids = torch.zeros(len(scene.means), dtype=torch.int32, device=scene.means.device)
    means2d, _conics, cov2d, depths, radii, _ = ext.project_forward(
        scene.means, scene.quats, scene.scales, None, 0, ids, scene.viewmat[None].contiguous(),
        scene.K[None].contiguous(), size, size, 0.3, 0.01, 1e3)
    return int(ext.isect_tiles(means2d, cov2d, scene.opacities.contiguous(), depths, radii, ids, 1, size, size,
                               -1)[2].item())


def bench_raster(args) -> None:
    from gsavatar.render.synthetic import random_scene

    rows = []
    print(f"rasterizer, {args.size}x{args.size}, device {args.device}")
    print(f"{'gaussians':>10} {'backend':>8} {'forward ms':>11} {'fwd+bwd ms':>11}")
    for count in args.counts:
        scene = random_scene(count, args.size, args.size, seed=count, hard_cases=False,
                             pixel_size=args.pixel_size).to(args.device)
        results = {}
        for backend in _backends(args.device):
            if backend == "torch" and count > args.torch_max:
                continue  # the reference is slow and memory-hungry at large counts: skipped above --torch-max
            fwd = _time_ms(_raster_call(backend, scene, args.size, False), args.device, args.warmup, args.repeats)
            both = _time_ms(_raster_call(backend, scene, args.size, True), args.device, args.warmup, args.repeats)
            results[backend] = (fwd, both)
            print(f"{count:>10} {backend:>8} {fwd:>11.2f} {both:>11.2f}")
        ours = "cuda" if args.device == "cuda" else "cpp"
        base = "gsplat" if args.device == "cuda" else "torch"
        pairs = _pairs(scene, args.size, ours) if ours in results else None
        if pairs:
            print(f"{'':>10} {pairs} (tile, Gaussian) pairs; {ours} forward {results[ours][0] * 1e6 / pairs:.0f} ns a pair")
        if ours in results and base in results:
            ratio = (results[ours][0] / results[base][0], results[ours][1] / results[base][1])
            print(f"{'':>10} {ours}/{base}: forward {ratio[0]:.2f}x, fwd+bwd {ratio[1]:.2f}x")
        else:
            ratio = None
        cells = " | ".join(f"{results[b][0]:.1f} / {results[b][1]:.1f}" if b in results else "n/a"
                           for b in ("torch", "cpp", "cuda", "gsplat"))
        ratio_cell = f"{ratio[0]:.2f} / {ratio[1]:.2f} ({ours}/{base})" if ratio else "n/a"
        pair_cell = f"{pairs}, {results[ours][0] * 1e6 / pairs:.0f} ns" if pairs else "n/a"
        rows.append(f"| {args.date} | {args.size}x{args.size}, {count} Gaussians | {cells} | {ratio_cell} | {pair_cell} | "
                    f"{args.device}: {args.machine} | `{args.command}` |")
    if args.write:
        for row in rows:
            append_row(RASTER_TABLE, row)


FRAME_VARIANTS = ("torch", "cpp", "cuda", "cuda no-sync", "cuda graph")
"""Columns of the frame table: the backends, then our kernels with a PairBudget (no host sync in a
frame) and that frame captured once as a CUDA graph and replayed."""


def bench_frame(args) -> None:
    import numpy as np

    from gsavatar.drive import build_drive, load_speech
    from gsavatar.model.io import load_run
    from gsavatar.render import PairBudget

    bundle = load_run(args.run, args.device)
    avatar, subject = bundle.avatar, bundle.subject
    if args.grow_to:
        _grow_face(avatar, args.grow_to)
    # Driven the way `gsavatar render` drives it, from the checkpoint alone (no subject dataset):
    # the given speech, or 8 s of noise (the speed does not depend on what is said).
    if args.audio:
        samples, speech = load_speech(args.audio), args.audio.name
    else:
        samples, speech = 0.1 * np.random.default_rng(0).standard_normal(8 * 16000).astype(np.float32), "8 s noise"
    seq = build_drive(subject, samples, size=args.size)
    inputs = [seq.inputs(k, avatar, device=args.device) for k in range(len(seq))]  # on the device up front
    counts = avatar.num_gaussians()
    print(f"avatar frame at {seq.size}x{seq.size}, {sum(counts.values())} Gaussians {counts}, device {args.device}, "
          f"driven by {speech}; {args.frames} frames per timed batch")
    variants = [b for b in _backends(args.device) if b != "gsplat"]
    if "cuda" in variants:
        variants += ["cuda no-sync", "cuda graph"]
    runners = {}
    for variant in variants:
        try:
            runners[variant] = _frame_runner(variant, avatar, inputs, PairBudget())
        except Exception as exc:  # a variant that cannot run is reported, the others still measured
            print(f"  {variant:>12}: failed: {type(exc).__name__}: {exc}".splitlines()[0])

    def batch(frame):
        return lambda: [frame(k) for k in range(args.frames)]

    timed = _time_interleaved_ms({v: batch(frame) for v, (frame, _) in runners.items()}, args.device, args.warmup,
                                 args.repeats)
    results = {}
    for variant, (_, settle) in runners.items():
        ms = timed[variant] / args.frames
        results[variant] = 1e3 / ms
        print(f"  {variant:>12}: {1e3 / ms:8.1f} frames/s ({ms:.3f} ms)"
              + ("" if settle() else "  WARNING: some frames overflowed their pair budget"))
    if "torch" in results and len(results) > 1:
        print("  against the reference, batches timed in turn: "
              + ", ".join(f"{v} {r / results['torch']:.2f}x" for v, r in results.items() if v != "torch"))
    if args.write:
        grown = ", face Gaussians split to this count" if args.grow_to else ""
        cells = " | ".join(f"{results[v]:.1f}" if v in results else "n/a" for v in FRAME_VARIANTS)
        append_row(FRAME_TABLE, f"| {args.date} | {args.run} ({sum(counts.values())} Gaussians{grown}), {seq.size}x{seq.size} | "
                                f"{cells} | {args.device}: {args.machine} | `{args.command}` |")


def _grow_face(avatar, total: int) -> None:
    """Split face Gaussians as densification does (two samples from each, at 1/1.6 of its scale,
    3DGS's rule) until the avatar has ``total``: a larger avatar of the same look, for timing."""
    from gsavatar.model.gaussians import PARAM_NAMES
    from gsavatar.tracking.camera import quat_to_matrix

    face = avatar.gaussians["face"]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        while sum(avatar.num_gaussians().values()) < total:
            missing = total - sum(avatar.num_gaussians().values())
            split = torch.randperm(len(face), generator=generator)[:missing].to(face.means.device)
            p = {n: face.params[n].detach() for n in PARAM_NAMES}
            scales = torch.exp(p["log_scales"][split]).repeat(2, 1)
            noise = torch.randn(scales.shape, generator=generator).to(scales.device) * scales
            offset = torch.einsum("nij,nj->ni", quat_to_matrix(p["quats"][split]).repeat(2, 1, 1), noise)
            keep = torch.ones(len(face), dtype=torch.bool, device=split.device)
            keep[split] = False
            for n in PARAM_NAMES:
                pair = p[n][split].repeat(2, *([1] * (p[n].ndim - 1)))
                if n == "means":
                    pair = pair + offset
                elif n == "log_scales":
                    pair = pair - torch.log(torch.tensor(1.6))
                face.params[n] = torch.nn.Parameter(torch.cat([p[n][keep], pair]))


def _frame_runner(variant: str, avatar, inputs: list, budget):
    """``(frame(k), settle())`` for one column of the frame table; ``settle`` says whether every
    budgeted frame got all its (tile, Gaussian) pairs (True where the frames settle themselves)."""
    from gsavatar.render import unsettled_pair_budget

    if variant in ("torch", "cpp", "cuda"):
        @torch.no_grad()
        def frame(k):
            avatar(inputs[k % len(inputs)], backend=variant)

        return frame, lambda: True
    if variant.endswith(" no-sync"):  # "cuda no-sync" (and "cpp no-sync", to try this code on a CPU)
        backend = variant.split()[0]
        with torch.no_grad(), unsettled_pair_budget(budget):  # size the budget on the whole drive first
            for k in range(len(inputs)):
                avatar(inputs[k], backend=backend)
        budget.settle()

        @torch.no_grad()
        def frame(k):
            with unsettled_pair_budget(budget):
                avatar(inputs[k % len(inputs)], backend=backend)

        return frame, budget.settle
    if variant == "cuda graph":
        return _graph_frame(avatar, inputs, budget), budget.settle
    raise ValueError(variant)


def _graph_frame(avatar, inputs: list, budget):
    """The budgeted frame captured once as a CUDA graph; a frame copies its inputs into the
    captured ones and replays (no Python, no launches, no synchronisation per frame)."""
    import dataclasses

    from gsavatar.render import get_backend, unsettled_pair_budget

    backend = get_backend("cuda", inputs[0].viewmat.device)
    with torch.no_grad(), unsettled_pair_budget(budget):
        for k in range(len(inputs)):
            avatar(inputs[k], backend=backend)
    budget.settle()
    fields = [f.name for f in dataclasses.fields(inputs[0]) if isinstance(getattr(inputs[0], f.name), torch.Tensor)]
    for f in fields:
        if any(not isinstance(getattr(x, f), torch.Tensor) or getattr(x, f).shape != getattr(inputs[0], f).shape
               for x in inputs):
            raise ValueError(f"FrameInputs.{f} changes type or shape within the drive: cannot replay one graph")
    static = dataclasses.replace(inputs[0], **{f: getattr(inputs[0], f).clone() for f in fields})
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # Warm-up on a side stream, as torch.cuda.graph asks; never settled inside (no host sync in the graph).
    with torch.no_grad(), unsettled_pair_budget(budget), torch.cuda.stream(side):
        for _ in range(3):
            avatar(static, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), unsettled_pair_budget(budget), torch.cuda.graph(graph):
        avatar(static, backend=backend)

    def frame(k):
        src = inputs[k % len(inputs)]
        for f in fields:
            getattr(static, f).copy_(getattr(src, f), non_blocking=True)
        graph.replay()

    return frame


def bench_train(args) -> None:
    from gsavatar.config import load_preset
    from gsavatar.train.trainer import train

    preset = args.preset or ("default" if args.device == "cuda" else "cpu-tiny")
    results = {}
    for backend in [b for b in _backends(args.device) if b != "gsplat"]:
        cfg = dataclasses.replace(load_preset(preset), backend=backend, device=args.device)
        if args.size:
            cfg = dataclasses.replace(cfg, render_size=args.size)

        def run(iterations: int, cfg=cfg) -> float:
            if args.stage:
                stage = next(s for s in cfg.stages if s.name == args.stage)
                stages = [dataclasses.replace(stage, iterations=iterations,
                                              static_iterations=min(iterations, stage.static_iterations))]
                limited = dataclasses.replace(cfg, stages=stages)
            else:
                limited = _limit_iterations(cfg, iterations)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                train(args.subject, Path(tmp) / "run", limited, show_progress=False)
                return time.perf_counter() - start

        if args.stage:  # the stage's own rate: two lengths, set-up and evaluation cancel out
            seconds = run(2 * args.iterations) - run(args.iterations)
            note = f"{args.iterations} more iterations of the {args.stage} stage took {seconds:.1f} s"
        else:
            seconds = run(args.iterations)
            note = f"{seconds:.1f} s for {args.iterations}, set-up and evaluation included"
        results[backend] = args.iterations / seconds
        print(f"  {backend:>6}: {results[backend]:.2f} iterations/s ({note})")
    if "cpp" in results and "torch" in results:
        print(f"  cpp / torch: {results['cpp'] / results['torch']:.2f}x")
    if args.write:
        cells = " | ".join(f"{results[b]:.2f}" if b in results else "n/a" for b in ("torch", "cpp", "cuda"))
        loop = f"{preset} {args.stage} stage" if args.stage else f"{preset} loop"
        loop += f" at {args.size} px" if args.size else ""
        append_row(TRAIN_TABLE, f"| {args.date} | {args.subject}, {loop}, {args.iterations} iterations | "
                                f"{cells} | {args.device}: {args.machine} | `{args.command}` |")


def _limit_iterations(cfg, total: int):
    """The preset's stages scaled so that they add up to ``total`` iterations."""
    stages = cfg.stages
    scale = total / sum(s.iterations for s in stages)
    scaled = []
    for s in stages:
        iterations = max(1, round(s.iterations * scale))
        scaled.append(dataclasses.replace(s, iterations=iterations,
                                          static_iterations=min(iterations, round(s.static_iterations * scale))))
    return dataclasses.replace(cfg, stages=scaled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    raster = sub.add_parser("raster")
    raster.add_argument("--counts", type=int, nargs="+", default=[10000, 50000, 200000])
    raster.add_argument("--pixel-size", type=float, default=3.0, help="typical Gaussian size in pixels")
    raster.add_argument("--torch-max", type=int, default=50000, help="skip the torch reference above this count")
    frame = sub.add_parser("frame")
    frame.add_argument("run", type=Path, help="run directory (or avatar.pt): the checkpoint is all it needs")
    frame.add_argument("--audio", type=Path, default=None, help="speech to drive it (default: 8 s of noise)")
    frame.add_argument("--frames", type=int, default=10, help="frames per timed batch (one sync per batch)")
    frame.add_argument("--grow-to", type=int, default=0,
                       help="split face Gaussians (densification's rule) until the avatar has this many")
    train_p = sub.add_parser("train")
    train_p.add_argument("subject", type=Path)
    train_p.add_argument("--iterations", type=int, default=200)
    train_p.add_argument("--preset", default=None, help="default on a GPU, cpu-tiny on the CPU")
    train_p.add_argument("--stage", default=None,
                         help="time this stage alone: the difference of a run of 2N and one of N iterations")
    for p in (raster, frame, train_p):
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--size", type=int, default=None if p is not raster else 512,
                       help="image size (frame: the avatar's trained size; train: the preset's render size)")
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--repeats", type=int, default=10)
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the reference, the networks)")
        p.add_argument("--raster-threads", type=int, default=0,
                       help="threads of our CPU rasterizer (0: every core, its default)")
        p.add_argument("--write", action="store_true", help="append rows to BENCHMARKS.md")
        p.add_argument("--note", default="", help="added to the machine column")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    like_the_cli()
    from gsavatar.render import available_backends, set_cpu_raster_threads

    if "cpp" in available_backends():
        set_cpu_raster_threads(args.raster_threads)
    import os

    raster_threads = args.raster_threads or len(os.sched_getaffinity(0))
    args.command = "python bench/bench_kernels.py " + " ".join(sys.argv[1:]).replace(" --write", "")
    args.machine = machine() + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "") + \
        (f", {args.note}" if args.note else "") + f", {args.threads} torch thread(s)" + \
        (f", {raster_threads} cpp raster thread(s)" if args.device == "cpu" else "")
    args.date = datetime.date.today().isoformat()
    {"raster": bench_raster, "frame": bench_frame, "train": bench_train}[args.what](args)


if __name__ == "__main__":
    main()
