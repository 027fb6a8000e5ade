"""Our compiled kernels (the sources are in ``cuda/``, shipped inside the package), built on first use.

One set of sources, two builds of the same extension, named like the backends that use them
(:mod:`gsavatar.render.backends`):

``"cuda"``
    The CUDA kernels (``cuda/*.cu``) with the binding file, for CUDA tensors. Built the first time
    a CUDA tensor needs them (about 1-2 minutes with ``nvcc``; a message says so), then cached.
``"cpp"``
    The CPU path, for CPU tensors: our CPU rasterizer (``cuda/raster_host.cpp``: tiles over all
    cores with OpenMP, pixels in SIMD lanes, built for the CPU it runs on) around the kernels'
    own projection code (``cuda/raster_math.h``), and the hash-grid kernels' per-element math in
    C++ loops. This build needs only a C++ compiler and ninja (about a minute with gcc).

:func:`build` makes any other :class:`Build` of these sources (the test suite adds one that runs
the CUDA kernels on a CPU emulator of the CUDA thread model). None is needed to import gsavatar or
to use the PyTorch reference path. The build directory is ``$GSAVATAR_KERNEL_CACHE`` (default
``~/.cache/gsavatar/kernels``), one subfolder per build keyed by a hash of exactly what that build
compiles (its sources and the headers they include), the flags, torch and Python versions, so a
changed source rebuilds only the builds that compile it and an unchanged one loads in about a
second. Nothing is ever written into the source tree.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.resources
import json
import os
import re
import shutil
import sys
import threading
import types
from pathlib import Path

from gsavatar.errors import MissingDependencyError


def _source_dir() -> Path:
    if os.environ.get("GSAVATAR_KERNEL_SOURCES"):
        return Path(os.environ["GSAVATAR_KERNEL_SOURCES"])
    try:
        return Path(str(importlib.resources.files("gsavatar.kernel_sources")))
    except ModuleNotFoundError:  # a checkout used through PYTHONPATH, not installed: nothing maps cuda/
        return Path(__file__).resolve().parents[1] / "cuda"


SOURCE_DIR = _source_dir()
"""Where the kernel sources live: the repository's ``cuda/`` folder, installed as the package
``gsavatar.kernel_sources`` (a real folder: the compiler reads it); ``$GSAVATAR_KERNEL_SOURCES`` overrides it."""

HOST_SOURCES = ("bindings.cpp", "raster_ops.cpp", "raster_host.cpp", "hashgrid_ops.cpp")
"""Compiled into every build: the one binding file, the tensor-level ops and the CPU path."""
CUDA_SOURCES = ("raster_kernels.cu", "hashgrid_kernels.cu")
"""Compiled into the ``"cuda"`` build only."""


@dataclasses.dataclass(frozen=True)
class Build:
    """One build of the extension: what it compiles and for which tensors."""

    name: str
    """Its name (a backend name for the builds :func:`load` makes)."""
    sources: tuple[Path, ...]
    """Files compiled (``.cpp`` / ``.cu``)."""
    include_dirs: tuple[Path, ...]
    """Where ``#include "..."`` is resolved, in order."""
    defines: tuple[str, ...] = ()
    """Preprocessor flags (``-D...``) of this build."""
    with_cuda: bool = False
    """Compiled with nvcc and linked against the CUDA runtime."""
    device_type: str = "cpu"
    """The torch device type of the tensors its kernels take."""
    what: str = "kernels"
    """Said in the one-time compile message."""


BUILDS = {
    "cpp": Build("cpp", tuple(SOURCE_DIR / n for n in HOST_SOURCES), (SOURCE_DIR,), (), False, "cpu",
                 "CPU rasterizer and kernels (about a minute"),
    "cuda": Build("cuda", tuple(SOURCE_DIR / n for n in HOST_SOURCES + CUDA_SOURCES), (SOURCE_DIR,),
                  ("-DGSA_WITH_CUDA",), True, "cuda", "CUDA kernels with nvcc (about 1-2 minutes"),
}
"""The builds :func:`load` makes by name; see the module docstring."""
KINDS = tuple(BUILDS)

# (torch's builder adds -std=c++20 itself.) No --use_fast_math: the parity tests hold the kernels to
# float32 tolerances of the PyTorch reference. The host code is built for the CPU it runs on (the
# CPU rasterizer's SIMD width follows: AVX-512, AVX2 or SSE), so the cache key includes that CPU's
# instruction sets; -ffp-contract=off keeps a*b+c two roundings as in the reference (fused
# multiply-adds would move, for example, a radius across an integer). -fopenmp: at::parallel_for
# spreads work over torch's threads only in code compiled with OpenMP (else it runs in one thread);
# the extension then shares the OpenMP runtime torch has loaded (the same libgomp.so.1).
_CXX_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
_LD_FLAGS = ["-fopenmp"]
_NVCC_FLAGS = ["-O3", "-lineinfo"]

_lock = threading.Lock()
_loaded: dict[str, types.ModuleType] = {}
_failed: dict[str, str] = {}


class KernelBuildError(MissingDependencyError):
    """The compiled kernels cannot be built or loaded here (the message says why, in one line)."""


def cache_root() -> Path:
    return Path(os.environ.get("GSAVATAR_KERNEL_CACHE", Path.home() / ".cache" / "gsavatar" / "kernels"))


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def compiled_files(b: Build) -> list[Path]:
    """The build's sources and every header they include (transitively, whatever the ``#if``s say),
    resolved in its include directories: exactly what the build can compile."""
    seen: dict[Path, None] = {}
    todo = list(b.sources)
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen[path] = None
        for name in _INCLUDE.findall(path.read_text(errors="replace")):
            for folder in (path.parent, *b.include_dirs):
                if (folder / name).is_file():
                    todo.append((folder / name).resolve())
                    break
    return sorted(seen, key=str)


def _build_key(b: Build) -> str:
    import torch

    digest = hashlib.sha256()
    for path in compiled_files(b):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(f"{torch.__version__}|{sys.version_info[:3]}|{_CXX_FLAGS}|{_LD_FLAGS}|{_NVCC_FLAGS}|{b.defines}".encode())
    digest.update(cpu_instruction_sets().encode())  # -march=native: a build for one CPU may not run on another
    if b.with_cuda:
        # torch compiles for the visible GPUs' architectures (or TORCH_CUDA_ARCH_LIST): a cache
        # built on another GPU generation would fail at launch with "no kernel image".
        capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        digest.update(f"{os.environ.get('TORCH_CUDA_ARCH_LIST')}|{capabilities}".encode())
    return f"gsavatar_kernels_{b.name}_{digest.hexdigest()[:12]}"


def cpu_instruction_sets() -> str:
    """The instruction-set flags of this machine's CPU (Linux ``/proc/cpuinfo``), sorted; else the
    platform's processor name."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}"


def missing_requirements(kind: str | Build) -> str | None:
    """Why the build cannot be made here (one line), or None when it can. Cheap: builds nothing."""
    if isinstance(kind, str):
        if kind not in BUILDS:
            return f"unknown kernel build {kind!r} (choose one of {', '.join(KINDS)})"
        kind = BUILDS[kind]
    missing = [p.name for p in kind.sources if not p.is_file()]
    if missing:
        return f"kernel sources not found ({', '.join(missing)} in {kind.sources[0].parent}); reinstall gsavatar"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary on PATH only in some layouts)
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        return "no C++ compiler found (install g++)"
    if kind.with_cuda:
        import torch
        from torch.utils import cpp_extension

        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if torch.version.cuda is None:
            return "this torch build has no CUDA support"
        if cpp_extension.CUDA_HOME is None:
            return "nvcc / CUDA_HOME not found (install the CUDA toolkit or set CUDA_HOME)"
    return None


def _ensure_ninja_on_path() -> None:
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except (ImportError, AttributeError):
        pass


_MARKER = "gsavatar-loaded.json"


def _vouch_for(build_dir: Path, library: Path) -> None:
    """Record (atomically) that ``library`` loaded: its name, size and modification time."""
    st = library.stat()
    tmp = build_dir / (_MARKER + ".tmp")
    tmp.write_text(json.dumps({"library": library.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, build_dir / _MARKER)


def cached_build_is_trusted(build_dir: Path) -> bool:
    """Whether a build folder holds no library yet, or exactly the one a successful load vouched for."""
    libraries = list(build_dir.glob("*.so"))
    if not libraries:
        return True  # nothing that could be loaded: ninja builds into it
    try:
        record = json.loads((build_dir / _MARKER).read_text())
        st = (build_dir / record["library"]).stat()
        return st.st_size == record["size"] and st.st_mtime_ns == record["mtime_ns"] and len(libraries) == 1
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load(kind: str) -> types.ModuleType:
    """The compiled extension of build ``kind`` (one of :data:`KINDS`), building it on first use."""
    if kind not in BUILDS:
        raise KernelBuildError(f"cannot build the {kind} kernels: {missing_requirements(kind)}")
    return build(BUILDS[kind])


def build(b: Build) -> types.ModuleType:
    """The compiled extension of ``b``, building it on first use.

    Raises :class:`KernelBuildError` (one line) when it cannot be built here; the failure is
    remembered, so a failing build is tried once per process.
    """
    with _lock:
        if b.name in _loaded:
            return _loaded[b.name]
        if b.name in _failed:
            raise KernelBuildError(_failed[b.name])
        reason = missing_requirements(b)
        if reason is not None:
            _failed[b.name] = f"cannot build the {b.name} kernels: {reason}"
            raise KernelBuildError(_failed[b.name])
        from torch.utils import cpp_extension

        _ensure_ninja_on_path()
        name = _build_key(b)
        cache_root().mkdir(parents=True, exist_ok=True)
        # Across processes too: another process's build in progress is never judged or discarded.
        with open(cache_root() / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return _load_locked(b, name, cpp_extension)


def _load_locked(b: Build, name: str, cpp_extension) -> types.ModuleType:
    """:func:`build`'s work, under both locks."""
    build_dir = cache_root() / name
    if build_dir.exists() and not cached_build_is_trusted(build_dir):
        # A build killed mid-link leaves a broken .so that ninja takes as up to date, and loading
        # it kills the process (SIGBUS): never trust one that no successful load vouched for.
        shutil.rmtree(build_dir, ignore_errors=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not any(build_dir.glob(f"{name}*.so"))
    if fresh:
        print(f"gsavatar: compiling the {b.what}, once; cached in {build_dir})", file=sys.stderr, flush=True)
    defines = list(b.defines)
    try:
        module = cpp_extension.load(
            name=name, sources=[str(p) for p in b.sources], build_directory=str(build_dir),
            extra_cflags=_CXX_FLAGS + defines, extra_cuda_cflags=_NVCC_FLAGS + defines, extra_ldflags=_LD_FLAGS,
            extra_include_paths=[str(p) for p in b.include_dirs], with_cuda=b.with_cuda, verbose=False)
    except Exception as exc:  # compiler errors arrive as RuntimeError / CalledProcessError
        last = [line for line in str(exc).strip().splitlines() if line.strip()]
        _failed[b.name] = (f"building the {b.name} kernels failed ({last[-1][:200] if last else type(exc).__name__}); "
                           f"build log in {build_dir}")
        raise KernelBuildError(_failed[b.name]) from exc
    _vouch_for(build_dir, Path(module.__file__))
    if fresh:
        print(f"gsavatar: {b.name} kernels ready", file=sys.stderr, flush=True)
    _loaded[b.name] = module
    return module


def available(kind: str | Build) -> bool:
    """Whether the build can be expected to load (cheap; does not build)."""
    name = kind if isinstance(kind, str) else kind.name
    return name in _loaded or (name not in _failed and missing_requirements(kind) is None)
