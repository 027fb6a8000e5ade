"""Our compiled kernels (the sources are in ``cuda/`` at the repository root), built on first use.

One set of sources, three builds of the same extension:

``"cuda"``
    The CUDA kernels (``cuda/*.cu``) with the binding file, for CUDA tensors. Built the first time
    a CUDA tensor needs them (about 1-2 minutes with ``nvcc``; a message says so), then cached.
``"cpu"``
    The *host twins* of the same kernels: every kernel's per-element math lives in ``__host__
    __device__`` functions in ``cuda/*_math.h``, and ``cuda/*_ops.cpp`` runs it in plain C++ loops
    over CPU tensors. This build needs only a C++ compiler and ninja (about a minute with gcc). It
    lets the CPU machines test the kernels' arithmetic against the PyTorch reference; the CUDA
    build differs from it only in how work is spread over threads.
``"emulated"``
    For tests on machines without a GPU: the CUDA kernels themselves (``cuda/*.cu``), compiled as
    C++ against a CPU emulator of the CUDA thread model (``cuda/cuda_emulator.h``: blocks one after
    another, a block's threads as fibers that meet at barriers and warp operations, in a shuffled
    order between them), for CPU tensors. Where the host twins check the kernels' arithmetic, this
    checks their thread logic: indexing, launch configurations, shared-memory batches, barriers,
    warp shuffles and votes, atomics, the pair sort. Very slow (small scenes only); never picked
    automatically.

None is needed to import gsavatar or to use the PyTorch reference path. The build directory is
``$GSAVATAR_KERNEL_CACHE`` (default ``~/.cache/gsavatar/kernels``), one subfolder per build keyed by
a hash of the sources, torch and Python versions, so a changed source or a new torch rebuilds and an
unchanged one loads in about a second. Nothing is ever written into the source tree.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import threading
import types
from pathlib import Path

from gsavatar.errors import MissingDependencyError

SOURCE_DIR = Path(os.environ.get("GSAVATAR_KERNEL_SOURCES", Path(__file__).resolve().parent.parent / "cuda"))
"""Where the kernel sources live: the repository's ``cuda/`` folder (``$GSAVATAR_KERNEL_SOURCES`` overrides it)."""

HOST_SOURCES = ("bindings.cpp", "raster_ops.cpp", "hashgrid_ops.cpp")
"""Compiled into every build: the one binding file and the tensor-level ops with their host twins."""
CUDA_SOURCES = ("raster_kernels.cu", "hashgrid_kernels.cu")
"""Compiled into the ``"cuda"`` build only."""
EMULATED_SOURCES = ("emulated_kernels.cpp",)
"""Compiled into the ``"emulated"`` build only (it includes the ``.cu`` files, compiled as C++)."""
KINDS = ("cpu", "cuda", "emulated")
"""The builds :func:`load` makes; see the module docstring."""
_DEFINES = {"cpu": [], "cuda": ["-DGSA_WITH_CUDA"], "emulated": ["-DGSA_EMULATE_CUDA"]}
KIND_OF_BACKEND = {"cuda": "cuda", "cpp": "cpu", "emulated": "emulated"}
"""Backend name of the compiled rasterizer and hash grid (``"cpp"``: the host twins) -> build."""
DEVICE_OF_KIND = {"cuda": "cuda", "cpu": "cpu", "emulated": "cpu"}
"""Build -> the torch device type of the tensors it takes."""

# (torch's builder adds -std=c++20 itself.) No --use_fast_math: the parity tests hold the kernels to
# float32 tolerances of the PyTorch reference.
_CXX_FLAGS = ["-O3"]
_NVCC_FLAGS = ["-O3", "-lineinfo"]

_lock = threading.Lock()
_loaded: dict[str, types.ModuleType] = {}
_failed: dict[str, str] = {}


class KernelBuildError(MissingDependencyError):
    """The compiled kernels cannot be built or loaded here (the message says why, in one line)."""


def cache_root() -> Path:
    return Path(os.environ.get("GSAVATAR_KERNEL_CACHE", Path.home() / ".cache" / "gsavatar" / "kernels"))


def _sources(kind: str) -> list[Path]:
    names = HOST_SOURCES + {"cuda": CUDA_SOURCES, "emulated": EMULATED_SOURCES}.get(kind, ())
    return [SOURCE_DIR / n for n in names]


def _build_key(kind: str) -> str:
    import torch

    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.glob("*")):
        if path.suffix in (".h", ".cuh", ".cpp", ".cu"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    digest.update(f"{torch.__version__}|{sys.version_info[:3]}|{_CXX_FLAGS}|{_NVCC_FLAGS}".encode())
    if kind == "cuda":
        # torch compiles for the visible GPUs' architectures (or TORCH_CUDA_ARCH_LIST): a cache
        # built on another GPU generation would fail at launch with "no kernel image".
        capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        digest.update(f"{os.environ.get('TORCH_CUDA_ARCH_LIST')}|{capabilities}".encode())
    return f"gsavatar_kernels_{kind}_{digest.hexdigest()[:12]}"


def missing_requirements(kind: str) -> str | None:
    """Why the ``kind`` build cannot be made here (one line), or None when it can. Cheap: builds nothing."""
    if kind not in KINDS:
        return f"unknown kernel build {kind!r} (choose one of {', '.join(KINDS)})"
    if kind == "emulated" and not sys.platform.startswith("linux"):
        return "the CUDA emulator needs Linux (its fibers use mmap and, off x86-64, ucontext)"
    missing = [p.name for p in _sources(kind) if not p.is_file()]
    if missing:
        return f"kernel sources not found in {SOURCE_DIR} ({', '.join(missing)}); install gsavatar from its repository (pip install -e .)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary on PATH only in some layouts)
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        return "no C++ compiler found (install g++)"
    if kind == "cuda":
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
    """The compiled extension for ``kind`` (one of :data:`KINDS`), building it on first use.

    Raises :class:`KernelBuildError` (one line) when it cannot be built here; the failure is
    remembered, so a failing build is tried once per process.
    """
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _failed:
            raise KernelBuildError(_failed[kind])
        reason = missing_requirements(kind)
        if reason is not None:
            _failed[kind] = f"cannot build the {kind} kernels: {reason}"
            raise KernelBuildError(_failed[kind])
        from torch.utils import cpp_extension

        _ensure_ninja_on_path()
        name = _build_key(kind)
        cache_root().mkdir(parents=True, exist_ok=True)
        # Across processes too: another process's build in progress is never judged or discarded.
        with open(cache_root() / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return _load_locked(kind, name, cpp_extension)


def _load_locked(kind: str, name: str, cpp_extension) -> types.ModuleType:
    """:func:`load`'s work, under both locks."""
    build_dir = cache_root() / name
    if build_dir.exists() and not cached_build_is_trusted(build_dir):
        # A build killed mid-link leaves a broken .so that ninja takes as up to date, and loading
        # it kills the process (SIGBUS): never trust one that no successful load vouched for.
        shutil.rmtree(build_dir, ignore_errors=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not any(build_dir.glob(f"{name}*.so"))
    if fresh:
        what = {"cuda": "CUDA kernels with nvcc (about 1-2 minutes",
                "cpu": "CPU twins of the kernels (about a minute",
                "emulated": "CUDA kernels for the CPU emulator, for tests (about a minute"}[kind]
        print(f"gsavatar: compiling the {what}, once; cached in {build_dir})", file=sys.stderr, flush=True)
    defines = _DEFINES[kind]
    try:
        module = cpp_extension.load(
            name=name, sources=[str(p) for p in _sources(kind)], build_directory=str(build_dir),
            extra_cflags=_CXX_FLAGS + defines, extra_cuda_cflags=_NVCC_FLAGS + defines,
            extra_include_paths=[str(SOURCE_DIR)], with_cuda=kind == "cuda", verbose=False)
    except Exception as exc:  # compiler errors arrive as RuntimeError / CalledProcessError
        last = [line for line in str(exc).strip().splitlines() if line.strip()]
        _failed[kind] = (f"building the {kind} kernels failed ({last[-1][:200] if last else type(exc).__name__}); "
                         f"build log in {build_dir}")
        raise KernelBuildError(_failed[kind]) from exc
    _vouch_for(build_dir, Path(module.__file__))
    if fresh:
        print(f"gsavatar: {kind} kernels ready", file=sys.stderr, flush=True)
    _loaded[kind] = module
    return module


def available(kind: str) -> bool:
    """Whether ``load(kind)`` can be expected to work (cheap; does not build)."""
    return kind in _loaded or (kind not in _failed and missing_requirements(kind) is None)
