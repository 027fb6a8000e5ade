"""Helpers shared by the benchmark scripts: the machine description and BENCHMARKS.md rows."""

from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_AUDIO = ROOT.parent / "shared" / "data" / "audio"
"""The shared speech recordings (radio31_8s.wav, vrt1_5s.wav) beside the repository."""


def like_the_cli() -> None:
    """The process settings the ``gsavatar`` command applies before any work (memory reuse), so a
    benchmark that calls the library in-process measures what the command does."""
    from gsavatar.runtime import keep_freed_memory

    keep_freed_memory()


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GB, Python {platform.python_version()}"


def append_row(table_heading: str, row: str) -> None:
    """Append ``row`` to the end of the table under ``table_heading`` in BENCHMARKS.md."""
    path = ROOT / "BENCHMARKS.md"
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == table_heading)
    end = start + 1
    while end < len(lines) and not lines[end].startswith("## "):
        end += 1
    last = max(i for i in range(start, end) if lines[i].startswith("|"))
    lines.insert(last + 1, row if row.endswith("\n") else row + "\n")
    path.write_text("".join(lines))
    print(f"row appended to BENCHMARKS.md under '{table_heading}'")
