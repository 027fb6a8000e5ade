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
