"""The test-only build of our CUDA kernels on the CPU emulator of the CUDA thread model, and the
rendering backend that runs it (never a public backend: tests pass it to ``rasterize``/``HashGrid``).

The CUDA kernels themselves (``cuda/*.cu``) are compiled as C++ against ``cuda_emulator/cuda_emulator.h``
(blocks one after another, a block's threads as fibers that meet at barriers and warp operations, in
a seeded shuffled order between them), for CPU tensors: the kernels' arithmetic and their thread
logic (indexing, launch configurations, shared-memory batches, barriers, warp shuffles and votes,
atomics, the pair sort). Very slow: small scenes only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gsavatar import kernels
from gsavatar.render import Backend

EMULATOR_DIR = Path(__file__).resolve().parent / "cuda_emulator"

BUILD = kernels.Build(
    "emulated", tuple(kernels.SOURCE_DIR / n for n in kernels.HOST_SOURCES) + (EMULATOR_DIR / "emulated_kernels.cpp",),
    (kernels.SOURCE_DIR, EMULATOR_DIR), ("-DGSA_EMULATE_CUDA",), False, "cpu",
    "CUDA kernels for the CPU emulator, for tests (about a minute")
BACKEND = Backend("emulated", "compiled", ("cpu",), BUILD, budgeted=True)  # binning as on a GPU


def missing_requirements() -> str | None:
    """Why the emulated build cannot run here, or None. On a GPU machine the CUDA cases run the same
    kernels for real, so the emulated ones skip there."""
    if not sys.platform.startswith("linux"):
        return "the CUDA emulator needs Linux (its fibers use mmap and, off x86-64, ucontext)"
    if kernels.missing_requirements("cuda") is None:
        return "the CUDA cases run these kernels on this machine's GPU"
    return kernels.missing_requirements(BUILD)
