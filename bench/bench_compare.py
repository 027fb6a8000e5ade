"""Compare this checkout with another revision on one benchmark, in one run, as ratios.

Timings on a shared machine swing with load, so the two trees are measured in alternation
(base, this, base, this, ...) and each variant's median rate is compared:

    git worktree add ../base REVISION
    python bench/bench_compare.py --base ../base --rounds 3 -- frame RUN --device cpu --size 512
    python bench/bench_compare.py --base ../base --rounds 3 -- train SUBJECT --device cpu --iterations 150

Everything after ``--`` is passed to ``bench/bench_kernels.py`` of each tree, which runs with
that tree's package first on ``PYTHONPATH``. ``--write`` appends one row per variant to
BENCHMARKS.md's "Revisions compared" table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TABLE = "## Revisions compared (`bench/bench_compare.py`)"
RATE = re.compile(r"^\s+(\S[^:]*):\s+([\d.]+) (frames/s|iterations/s)", re.MULTILINE)


def run_tree(tree: Path, args: list[str]) -> dict[str, tuple[float, str]]:
    """``{variant: (rate, unit)}`` printed by ``tree``'s bench_kernels.py."""
    env = dict(os.environ, PYTHONPATH=str(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(tree / "bench" / "bench_kernels.py"), *args], env=env, cwd=tree,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{tree}: bench_kernels.py failed:\n{out.stderr[-2000:]}")
    return {m[1].strip(): (float(m[2]), m[3]) for m in RATE.finditer(out.stdout)}


def revision(tree: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() + ("+changes" if subprocess.run(
                                  ["git", "-C", str(tree), "status", "--porcelain", "--", ".", ":!BENCHMARKS.md"], capture_output=True,
                                  text=True).stdout.strip() else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return tree.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a checkout of the revision to compare with")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each tree")
    ap.add_argument("--write", action="store_true", help="append rows to BENCHMARKS.md")
    ap.add_argument("--note", default="", help="added to the machine column")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then bench_kernels.py's arguments")
    args = ap.parse_args()
    bench = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    if not bench:
        ap.error("give bench_kernels.py's arguments after --")
    trees = {"base": args.base.resolve(), "this": ROOT}
    rates: dict[str, dict[str, list[float]]] = {"base": {}, "this": {}}
    units: dict[str, str] = {}
    for r in range(args.rounds):
        for name, tree in trees.items():
            for variant, (rate, unit) in run_tree(tree, bench).items():
                rates[name].setdefault(variant, []).append(rate)
                units[variant] = unit
            print(f"round {r + 1}/{args.rounds} {name}: " + ", ".join(
                f"{v} {rs[-1]:.2f}" for v, rs in rates[name].items()), flush=True)
    labels = {name: revision(tree) for name, tree in trees.items()}
    print(f"\nmedians of {args.rounds} alternating runs: base {labels['base']} vs this {labels['this']}")
    for variant in rates["this"]:
        if variant not in rates["base"]:
            continue
        base, this = statistics.median(rates["base"][variant]), statistics.median(rates["this"][variant])
        spread = max(rates["this"][variant]) / min(rates["this"][variant])
        print(f"  {variant:>12}: base {base:.2f}, this {this:.2f} {units[variant]}: ratio {this / base:.3f} "
              f"(this tree's own max/min over the rounds: {spread:.2f})")
        if args.write:
            command = "python bench/bench_compare.py --base BASE --rounds " + f"{args.rounds} -- " + " ".join(bench)
            append_row(TABLE, f"| {datetime.date.today()} | {' '.join(bench[:2])} | {variant} | {labels['base']} | "
                              f"{labels['this']} | {base:.2f} | {this:.2f} {units[variant]} | {this / base:.3f} | "
                              f"{machine()}{', ' + args.note if args.note else ''} | `{command}` |")


if __name__ == "__main__":
    main()
