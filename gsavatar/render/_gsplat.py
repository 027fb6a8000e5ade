"""The ``"gsplat"`` rasterizer backend: gsplat's CUDA ops behind :func:`gsavatar.render.rasterize`.

A second, independent GPU rasterizer: a cross-check for our kernels (train or render the same
avatar with both), and a way to run on a GPU where our kernels do not build. Written against
gsplat 1.5.3 (``pip install gsplat==1.5.3 packaging``; it JIT-compiles its own CUDA on first use).

It composes gsplat's public stage functions, as ``gsplat.rasterization`` does, rather than
calling ``gsplat.rasterization`` itself. That one returns the screen-space means batched per
camera (``[1, G, 2]``), and a slice of it is not on the path to the image, so ``retain_grad()``
on it would see no gradient. Here the ``[G, 2]`` tensor handed back as ``means2d`` is the one the
compositing consumes, which is what densification needs (see ``RasterOutput``).

Differences from the ``"torch"`` reference, all gsplat's own:

* float32 CUDA tensors only; ``viewmat`` and ``K`` get no gradient;
* alpha is capped at 0.999 (ours 0.99), and a pixel stops compositing *before* the Gaussian that
  would take its transmittance to 1e-4 or below (3DGS's rule);
* ``radii`` is gsplat's: the larger half-side of the axis-aligned box it bins (3.33 sigma, less for
  faint Gaussians; ours: 3 sigma along the major axis); ``visible`` is ``radii > 0``. Both keep
  every Gaussian whose 1/255 contour reaches the image (ours culls beyond 3.33 sigma along the
  major axis, a superset of gsplat's box), so the images agree at the border too.

:class:`GsplatOps` names the five stage functions, so the adapter runs with other
implementations of the same signatures: the CPU tests pass gsplat's pure-PyTorch twins.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from gsavatar.errors import InputError

INSTALL_HINT = "pip install gsplat==1.5.3 packaging"


class GsplatOps(NamedTuple):
    """gsplat's stage functions (``gsplat.<name>``, the signatures of gsplat 1.5.3)."""

    fully_fused_projection: Callable[..., tuple]
    spherical_harmonics: Callable[..., Tensor]
    isect_tiles: Callable[..., tuple]
    isect_offset_encode: Callable[..., Tensor]
    rasterize_to_pixels: Callable[..., tuple]


def missing_requirements() -> str | None:
    """Why the backend cannot run here (None when it can)."""
    if importlib.util.find_spec("gsplat") is None:
        return f"gsplat is not installed ({INSTALL_HINT})"
    if not torch.cuda.is_available():
        return "gsplat rasterizes on CUDA devices only, and there is none here"
    return None


def cuda_ops() -> GsplatOps:
    import gsplat

    return GsplatOps(gsplat.fully_fused_projection, gsplat.spherical_harmonics, gsplat.isect_tiles,
                     gsplat.isect_offset_encode, gsplat.rasterize_to_pixels)


def rasterize_gsplat(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
                     viewmat: Tensor, K: Tensor, width: int, height: int, *, sh_degree: int | None,
                     background: Tensor | None, near: float, far: float, eps2d: float, tile_size: int,
                     ops: GsplatOps | None = None) -> tuple[Tensor, ...]:
    """``rasterize_torch``'s signature and outputs, computed by gsplat (``ops``: its CUDA ops by default)."""
    if ops is None:
        if means.device.type != "cuda" or means.dtype != torch.float32:
            raise InputError(f"rasterize: the gsplat backend needs float32 CUDA tensors (got {means.dtype} on "
                             f"{means.device})")
        ops = cuda_ops()
    if viewmat.requires_grad or K.requires_grad:
        raise InputError("rasterize: the gsplat backend treats the camera as a constant (viewmat and K must not "
                         "require grad; use backend='torch' to optimise them)")
    viewmats, Ks = viewmat[None], K[None]  # one camera
    radii, projected, depths, conics, _ = ops.fully_fused_projection(
        means, None, quats, scales, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near, far_plane=far,
        packed=False, opacities=opacities)
    means2d = projected[0]  # handed back; the stages below consume this very tensor
    batched = means2d[None]
    drawn = (radii[0] > 0).all(-1) if radii.dim() == 3 else radii[0] > 0  # [G, 2] since gsplat 1.5, [G] before
    if sh_degree is None:
        rgb = colors
    else:
        camera_centre = -viewmat[:3, :3].T @ viewmat[:3, 3]
        rgb = ops.spherical_harmonics(sh_degree, means - camera_centre, colors, masks=drawn)
        rgb = torch.clamp_min(rgb + 0.5, 0.0)
    # Depth rides along as a fourth channel (gsplat's "RGB+D": sum_i w_i z_i, our convention).
    features = torch.cat([rgb, depths[0][:, None]], dim=-1)[None]
    backgrounds = None if background is None else torch.cat([background, background.new_zeros(1)])[None]
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    _, isect_ids, flatten_ids = ops.isect_tiles(batched, radii, depths, tile_size, tiles_x, tiles_y, packed=False,
                                                n_images=1)
    offsets = ops.isect_offset_encode(isect_ids, 1, tiles_x, tiles_y).reshape(1, tiles_y, tiles_x)
    image, alpha = ops.rasterize_to_pixels(batched, conics, features, opacities[None], width, height, tile_size,
                                           offsets, flatten_ids, backgrounds=backgrounds)
    radii_out = (radii[0].amax(-1) if radii.dim() == 3 else radii[0]).long() * drawn
    return image[0, ..., :3], alpha[0], image[0, ..., 3:], means2d, radii_out, drawn
