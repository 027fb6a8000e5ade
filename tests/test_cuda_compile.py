"""Compile check of cuda/ without a GPU: every .cu to an object file for sm_80 and sm_90 with nvcc,
and every C++ source with the CUDA paths enabled (-DGSA_WITH_CUDA) against torch's headers.

Linking and running need a GPU machine (tests/test_kernels_*.py); this catches what a CPU machine
can: syntax, types, device-code restrictions, and host code that only the CUDA build compiles.
Also what each build compiles (gsavatar.kernels.compiled_files), which is what its cache key hashes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import emulated
import pytest

from gsavatar import kernels
from gsavatar.kernels import BUILDS, CUDA_SOURCES, HOST_SOURCES, SOURCE_DIR

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
    """A new kernel file must be added to gsavatar.kernels' source lists (else it is never built),
    every header of cuda/ is compiled by the CUDA build, and the emulator's files (tests/cuda_emulator/)
    are the test build's alone."""
    on_disk = {p.name for p in SOURCE_DIR.iterdir() if p.suffix in (".cu", ".cpp")}
    assert on_disk == set(HOST_SOURCES) | set(CUDA_SOURCES)
    headers = {p.resolve() for p in SOURCE_DIR.iterdir() if p.suffix == ".h"}
    assert headers and headers <= set(kernels.compiled_files(BUILDS["cuda"]))
    emulator = {p.name for p in emulated.EMULATOR_DIR.iterdir() if p.suffix in (".cu", ".cpp", ".h")}
    assert emulator == {"cuda_emulator.h", "emulated_kernels.cpp", "cuda_emulator_checks.cpp"}
    assert {p.name for p in emulated.BUILD.sources} == set(HOST_SOURCES) | {"emulated_kernels.cpp"}
    # The emulated build compiles the CUDA kernels themselves (emulated_kernels.cpp includes them).
    emulated_files = {p.resolve() for p in kernels.compiled_files(emulated.BUILD)}
    assert {(SOURCE_DIR / n).resolve() for n in CUDA_SOURCES} <= emulated_files
    assert (emulated.EMULATOR_DIR / "cuda_emulator.h").resolve() in emulated_files


def test_the_public_builds_compile_only_the_kernel_sources():
    """What the cache key of the "cpp" and "cuda" builds hashes: their sources and the headers they
    include (raster_math.h and the like), all in cuda/; never the test emulator."""
    for name in ("cpp", "cuda"):
        files = [p.resolve() for p in kernels.compiled_files(BUILDS[name])]
        assert all(p.parent == SOURCE_DIR.resolve() for p in files), (name, files)
        names = {p.name for p in files}
        assert "cuda_emulator.h" not in names and "emulated_kernels.cpp" not in names
        assert {"raster_math.h", "hashgrid_math.h", "gsa_common.h", "raster.h", "hashgrid.h"} <= names, (name, names)
        assert set(HOST_SOURCES) <= names
        assert (set(CUDA_SOURCES) <= names) == (name == "cuda")


def _copied_builds(tmp_path: Path) -> tuple[Path, Path, dict[str, kernels.Build]]:
    """cuda/ and tests/cuda_emulator/ copied under ``tmp_path``, with the three builds made from the copies."""
    sources, emulator = tmp_path / "cuda", tmp_path / "cuda_emulator"
    shutil.copytree(SOURCE_DIR, sources)
    shutil.copytree(emulated.EMULATOR_DIR, emulator)

    def moved(b: kernels.Build) -> kernels.Build:
        where = {SOURCE_DIR.resolve(): sources, emulated.EMULATOR_DIR.resolve(): emulator}
        return dataclasses.replace(b, sources=tuple(where[p.resolve().parent] / p.name for p in b.sources),
                                   include_dirs=tuple(where[p.resolve()] for p in b.include_dirs))

    return sources, emulator, {"cpp": moved(BUILDS["cpp"]), "cuda": moved(BUILDS["cuda"]),
                               "emulated": moved(emulated.BUILD)}


def test_build_cache_key_follows_exactly_what_a_build_compiles(tmp_path):
    """Editing the test emulator (tests/cuda_emulator/cuda_emulator.h) rebuilds the emulated build
    only; editing a header the kernels include (raster_math.h, hashgrid_math.h) rebuilds them all."""
    sources, emulator, builds = _copied_builds(tmp_path)
    keys = {name: kernels._build_key(b) for name, b in builds.items()}
    assert keys == {name: kernels._build_key(b) for name, b in builds.items()}  # stable
    assert len(set(keys.values())) == 3

    def edit(path: Path) -> dict[str, bool]:
        """Which builds' keys change when ``path`` changes."""
        before = {name: kernels._build_key(b) for name, b in builds.items()}
        path.write_text(path.read_text() + "\n// edited\n")
        return {name: kernels._build_key(b) != before[name] for name, b in builds.items()}

    assert edit(emulator / "cuda_emulator.h") == {"cpp": False, "cuda": False, "emulated": True}
    assert edit(emulator / "emulated_kernels.cpp") == {"cpp": False, "cuda": False, "emulated": True}
    assert edit(emulator / "cuda_emulator_checks.cpp") == {"cpp": False, "cuda": False, "emulated": False}
    assert edit(sources / "raster_math.h") == {"cpp": True, "cuda": True, "emulated": True}
    assert edit(sources / "hashgrid_math.h") == {"cpp": True, "cuda": True, "emulated": True}
    assert edit(sources / "raster_kernels.cu") == {"cpp": False, "cuda": True, "emulated": True}
    # Files that no build compiles change nothing.
    assert edit(sources / "README.md") == {"cpp": False, "cuda": False, "emulated": False}


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
