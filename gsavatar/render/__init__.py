"""Differentiable Gaussian rasterization and the backends behind it (see :mod:`gsavatar.render.rasterize`
for the conventions and :mod:`gsavatar.render.backends` for what each backend runs)."""

from gsavatar.render._compiled import PairBudget
from gsavatar.render.backends import (
    BACKEND_CHOICES,
    Backend,
    Layer,
    LayerGaussians,
    available_backends,
    check_backend,
    get_backend,
    rasterize_layers,
    set_cpu_raster_threads,
    unsettled_pair_budget,
)
from gsavatar.render.rasterize import Projection, RasterOutput, eval_sh, project_gaussians, rasterize

__all__ = ["BACKEND_CHOICES", "Backend", "Layer", "LayerGaussians", "PairBudget", "Projection", "RasterOutput",
           "available_backends", "check_backend", "eval_sh", "get_backend", "project_gaussians", "rasterize",
           "rasterize_layers", "set_cpu_raster_threads", "unsettled_pair_budget"]
