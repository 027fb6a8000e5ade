"""Process-level settings shared by the entry points (train, render, eval, view): which torch
device to use, and how many CPU threads torch may use while one of them runs."""

from __future__ import annotations

import functools

import torch

from gsavatar.errors import InputError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but CUDA is not available")
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown device '{name}' (auto, cpu or cuda)")
    return torch.device(name)


def restores_torch_threads(fn):
    """Decorator for entry points that set torch's CPU thread count for their own work (a preset's
    ``cpu_threads``): the caller's count is back when ``fn`` returns or raises, so a library caller
    (a notebook, the test suite) is not left on one thread for the rest of its process."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def keep_freed_memory() -> None:
    """Let freed buffers of a few MB be reused instead of handed back to the system (glibc only).

    A frame allocates the same large tensors every time (images, per-Gaussian activations). glibc
    serves blocks above its mmap threshold (128 KiB at first) with fresh pages from the kernel and
    unmaps them on free, so each frame pays a page fault per 4 KiB touched (a few milliseconds a
    frame at 512x512 on a 2-core machine). With a 32 MiB threshold and trimming only above 256 MiB
    free, those blocks come from the heap and are reused; the process keeps its peak footprint.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 256 << 20)
