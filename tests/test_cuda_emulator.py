"""The CPU emulator of the CUDA thread model (tests/cuda_emulator/cuda_emulator.h) on small kernels of its own.

tests/test_kernels_*.py run our real kernels on it (the tests' ``"emulated"`` backend, tests/emulated.py); these checks pin
down the emulator itself, so that a kernel bug cannot hide behind an emulator bug: warp shuffles
and votes, barrier counts, shared memory per block, grid and block shapes, atomics, exited threads,
barriers while warp operations are pending, the shuffled thread order (it must expose a missing
barrier), the cub sort it stands in for, and the errors it raises where a GPU's behaviour is
undefined (divergent barriers and warp operations, partial masks and warps, oversized blocks,
nested launches). Both context switches are checked.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import emulated
import pytest
from emulated import EMULATOR_DIR

from gsavatar.kernels import SOURCE_DIR

CXX = shutil.which("g++") or shutil.which("c++")
CHECKS_SOURCE = EMULATOR_DIR / "cuda_emulator_checks.cpp"

pytestmark = [
    pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator needs Linux (ucontext fibers)"),
]


# The context switch: hand-written on x86-64 (what the kernels' build uses there), ucontext elsewhere.
SWITCHES = {"native": [], "ucontext": ["-DGSA_EMU_UCONTEXT"]}


@pytest.fixture(scope="module", params=list(SWITCHES))
def checks(request, tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("emulator") / "checks"
    # -O3 and the include directories of the emulated build (tests/emulated.py): the emulator's
    # header includes the kernels' runtime shim (cuda/emulated_runtime.h).
    includes = [arg for folder in emulated.BUILD.include_dirs for arg in ("-I", str(folder))]
    assert set(emulated.BUILD.include_dirs) == {SOURCE_DIR, EMULATOR_DIR}
    cmd = [CXX, "-std=c++20", "-O3", "-DGSA_EMULATE_CUDA", *SWITCHES[request.param], *includes, str(CHECKS_SOURCE),
           "-o", str(binary)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
    return binary


def _run(checks: Path, name: str) -> str:
    result = subprocess.run([str(checks), name], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("name", ["warp_sum", "shuffle_edge", "votes", "shared_per_block", "grid_shape", "atomics",
                                  "exited_threads_leave_the_barrier", "barrier_while_warp_ops_in_flight",
                                  "shuffled_order_exposes_a_missing_barrier", "sort"])
def test_behaves_as_cuda(checks, name):
    assert _run(checks, name) == "ok"


@pytest.mark.parametrize("name, message", [
    ("divergent_barrier_kinds", "threads of a block wait in different kinds of barrier"),
    ("divergent_warp_op", "a warp operation that not all 32 lanes of the warp reach"),
    ("partial_mask", "warp operations under a partial mask are not emulated"),
    ("partial_warp", "a warp operation that not all 32 lanes of the warp reach"),
    ("throws", "thrown in thread 7"),
    ("oversized_block", "a block of (32, 33, 1) threads"),
    ("different_barrier_sites", "threads of a block wait at different barriers ("),
    ("nested_launch", "a kernel launched from inside a kernel"),
])
def test_reports_what_a_gpu_leaves_undefined(checks, name, message):
    out = _run(checks, name)
    assert out.startswith("error: ") and message in out, out
    if name == "different_barrier_sites":  # both call sites are named
        assert out.count("cuda_emulator_checks.cpp:") == 2, out
