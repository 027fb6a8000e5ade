"""Compile check of cuda/ without a GPU: every .cu to an object file for sm_80 and sm_90 with nvcc,
and every C++ source with the CUDA paths enabled (-DGSA_WITH_CUDA) against torch's headers.

Linking and running need a GPU machine (tests/test_kernels_*.py); this catches what a CPU machine
can: syntax, types, device-code restrictions, and host code that only the CUDA build compiles.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from gsavatar.kernels import CUDA_SOURCES, EMULATED_SOURCES, HOST_SOURCES, SOURCE_DIR

NVCC = shutil.which("nvcc") or (str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
CXX = shutil.which("g++") or shutil.which("c++")
ARCHS = ("80", "90")


def _cuda_include() -> Path:
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    candidates += [Path(NVCC).resolve().parent.parent / "include", Path("/usr/local/cuda/include")]
    for c in candidates:
        if (c / "cuda_runtime.h").is_file():
            return c
    pytest.skip(f"cuda_runtime.h not found in {', '.join(map(str, candidates))}")


def test_every_source_is_in_a_build():
    """A new kernel file must be added to gsavatar.kernels' source lists (else it is never built)."""
    on_disk = {p.name for p in SOURCE_DIR.iterdir() if p.suffix in (".cu", ".cpp")}
    assert on_disk == set(HOST_SOURCES) | set(CUDA_SOURCES) | set(EMULATED_SOURCES)


@pytest.mark.skipif(NVCC is None or not Path(NVCC).exists(), reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_source_compiles_for_sm80_and_sm90(source, tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, "-c", "-std=c++17", "-O3", "-DGSA_WITH_CUDA", *gencode, "-I", str(SOURCE_DIR),
           str(SOURCE_DIR / source), "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0


@pytest.mark.skipif(NVCC is None or not Path(NVCC).exists() or CXX is None, reason="needs nvcc's headers and g++")
def test_host_sources_compile_with_the_cuda_paths_enabled():
    import torch

    torch_include = Path(torch.__file__).parent / "include"
    flags = ["-std=c++20", "-fsyntax-only", "-DGSA_WITH_CUDA",
             # One generated header of c10/cuda is absent from CPU wheels; this define skips it.
             "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=gsavatar_compile_check",
             "-I", str(SOURCE_DIR), "-I", str(_cuda_include()), "-I", str(torch_include),
             "-I", str(torch_include / "torch" / "csrc" / "api" / "include"), "-I", sysconfig.get_paths()["include"]]
    # Only the ops files have CUDA-only code, through kernel_dispatch.h (bindings.cpp is compiled by
    # the CPU build anyway). torch's headers take ~15 s per file to parse: run the files side by side.
    sources = [s for s in HOST_SOURCES if '#include "kernel_dispatch.h"' in (SOURCE_DIR / s).read_text()]
    assert sources
    jobs = {s: subprocess.Popen([CXX, *flags, str(SOURCE_DIR / s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for s in sources}
    failures = []
    for source, job in jobs.items():
        _, err = job.communicate(timeout=600)
        errors = [line for line in err.splitlines() if "error" in line]
        if job.returncode != 0:
            failures.append(f"{source}:\n" + "\n".join(errors[:20] or err.splitlines()[-20:]))
    assert not failures, "\n".join(failures)
