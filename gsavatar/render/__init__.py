"""Differentiable Gaussian rasterization (see :mod:`gsavatar.render.rasterize` for the conventions)."""

from gsavatar.render._compiled import PairBudget
from gsavatar.render.rasterize import (
    Projection,
    RasterOutput,
    available_backends,
    check_backend,
    eval_sh,
    project_gaussians,
    rasterize,
    resolve_backend,
)

__all__ = ["PairBudget", "Projection", "RasterOutput", "available_backends", "check_backend", "eval_sh", "project_gaussians", "rasterize", "resolve_backend"]
