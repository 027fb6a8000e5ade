"""Differentiable rasterization of 3-D Gaussians (3DGS / EWA splatting): the one entry point.

Conventions
    Camera: OpenCV, as everywhere in gsavatar (see ``gsavatar.tracking.camera``): ``x`` right,
    ``y`` down, ``z`` forward; ``viewmat`` is the 4x4 *world-to-camera* matrix, ``X_cam = R X + t``.
    ``K`` is the 3x3 pinhole matrix in pixels (``fx, fy, cx, cy``; skew ignored), and
    ``u = fx X_cam / Z_cam + cx``, ``v = fy Y_cam / Z_cam + cy``.

    Pixels: the pixel at (row ``i``, column ``j``) is sampled at its centre ``(u, v) = (j + 0.5, i + 0.5)``
    (gsplat's convention: the image covers ``[0, W] x [0, H]``). The tracked cameras are fitted to
    MediaPipe landmarks stored as ``x * W`` (this same continuous convention), so the trainer
    passes the tracking's ``K`` unchanged (scaled by ``render_size / size``) and stores the ``K``
    it trained with in the checkpoint (``SubjectInfo.K``): render with that one.

    Gaussians: ``means [G, 3]`` in world space; ``quats [G, 4]`` as ``(w, x, y, z)``, normalised
    here; ``scales [G, 3]`` linear (positive) standard deviations along the rotated axes;
    ``opacities [G]`` in ``[0, 1]``; ``colors`` either ``[G, 3]`` RGB or, with ``sh_degree=d``,
    spherical-harmonics coefficients ``[G, K, 3]`` with ``K`` in ``{1, 4, 9, 16}`` and
    ``K >= (d + 1)^2`` (the first ``(d + 1)^2`` are used). The SH colour is
    ``max(eval_sh(d, coeffs, X - camera_centre) + 0.5, 0)``.

Outputs (:class:`RasterOutput`)
    ``color [H, W, 3]`` is the *premultiplied* colour ``sum_i w_i c_i`` (with ``background``:
    ``+ (1 - alpha) * background``), ``alpha [H, W, 1] = sum_i w_i = 1 - T``, ``depth [H, W, 1] =
    sum_i w_i z_i`` (not divided by alpha), with ``w_i = alpha_i prod_{j<i} (1 - alpha_j)`` in order
    of increasing camera ``z``, ``alpha_i = min(0.99, o_i exp(-d^T Sigma_i^-1 d / 2))`` and
    contributions below 1/255 skipped. ``means2d [G, 2]`` are the projected centres (pixels); it
    is the tensor the compositing consumes, so ``out.means2d.retain_grad()`` before ``backward()``
    yields the screen-space gradients used for densification. ``radii [G]`` (long) is
    ``ceil(3 sqrt(largest eigenvalue of the 2-D covariance))``, 0 for culled Gaussians; ``visible
    [G]`` is True for Gaussians with ``near <= z <= far`` whose 3.33-sigma square (the reach of a
    fully opaque Gaussian's 1/255 contour) overlaps the image, so the image is the exact sum over
    all Gaussians, border pixels included.
    Culled Gaussians contribute nothing and get zero gradients. ``means2d`` gradients are in
    pixels (3DGS's densification threshold of 0.0002 is for NDC units: multiply by ``W / 2``, ``H / 2``).

    The image does not depend on ``tile_size`` (each Gaussian is binned to every tile where its
    alpha can reach 1/255); on CPU the torch backend is fastest at ``tile_size=8``.

Backends
    ``backend`` is a name or a :class:`~gsavatar.render.backends.Backend`; see
    :mod:`gsavatar.render.backends` for what each name runs and how ``"auto"`` chooses.
    ``"torch"`` (always available) takes every input differentiable (``viewmat`` and ``K``
    included), float32 or float64; see ``_compiled`` and ``_gsplat`` for how the others differ.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from gsavatar.errors import InputError
from gsavatar.render import _torch_impl
from gsavatar.render.backends import Backend, get_backend


class RasterOutput(NamedTuple):
    color: Tensor  # [H, W, 3] premultiplied colour (+ (1 - alpha) * background if given)
    alpha: Tensor  # [H, W, 1] sum_i w_i = 1 - final transmittance
    depth: Tensor  # [H, W, 1] sum_i w_i z_i (camera z, not normalised by alpha)
    means2d: Tensor  # [G, 2] projected centres in pixels (the tensor used downstream: retain_grad() works)
    radii: Tensor  # [G] long, 3-sigma pixel radius, 0 for culled Gaussians
    visible: Tensor  # [G] bool


class Projection(NamedTuple):
    means2d: Tensor  # [G, 2] pixels (meaningless where not visible)
    conics: Tensor  # [G, 3] (a, b, c) of the inverse 2-D covariance [[a, b], [b, c]]
    cov2d: Tensor  # [G, 3] (xx, xy, yy) of the 2-D covariance, eps2d included
    depths: Tensor  # [G] camera-space z of the means
    radii: Tensor  # [G] long
    visible: Tensor  # [G] bool


def eval_sh(degree: int, coeffs: Tensor, dirs: Tensor) -> Tensor:
    """Real spherical harmonics (3DGS basis) of ``degree`` at ``dirs [G, 3]`` (normalised here).

    ``coeffs [G, K, 3]`` with ``K >= (degree + 1)^2``. Returns the raw value ``[G, 3]``; the
    rasterizer's colour is ``max(value + 0.5, 0)``.
    """
    if degree not in (0, 1, 2, 3):
        raise InputError(f"eval_sh: degree must be 0, 1, 2 or 3 (got {degree!r})")
    if coeffs.ndim != 3 or coeffs.shape[1] < (degree + 1) ** 2 or coeffs.shape[2] != 3:
        raise InputError(f"eval_sh: coeffs must have shape [G, >={(degree + 1) ** 2}, 3] for degree {degree} "
                         f"(got {list(coeffs.shape)})")
    if dirs.shape != (coeffs.shape[0], 3):
        raise InputError(f"eval_sh: dirs must have shape [{coeffs.shape[0]}, 3] (got {list(dirs.shape)})")
    return _torch_impl._spherical_harmonics(degree, dirs, coeffs)


def project_gaussians(means: Tensor, quats: Tensor, scales: Tensor, viewmat: Tensor, K: Tensor, width: int,
                      height: int, *, near: float = 0.01, far: float = 1e3, eps2d: float = 0.3) -> Projection:
    """EWA projection of the Gaussians into the image (the first stage of :func:`rasterize`)."""
    _check_geometry("project_gaussians", means, quats, scales, viewmat, K, width, height)
    p = _torch_impl._fully_fused_projection(means, quats, scales, viewmat, K, int(width), int(height), float(eps2d),
                                            float(near), float(far))
    return Projection(p.means2d, p.conics, p.cov2d, p.depths, p.radii, p.visible)


def rasterize(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor, viewmat: Tensor,
              K: Tensor, width: int, height: int, *, sh_degree: int | None = None, background: Tensor | None = None,
              near: float = 0.01, far: float = 1e3, eps2d: float = 0.3, tile_size: int | None = None,
              backend: str | Backend = "torch") -> RasterOutput:
    """Render ``G`` Gaussians seen by one pinhole camera into a ``height`` x ``width`` image.

    See the module docstring for conventions. ``tile_size`` (None: the backend's choice) does not
    change the image.
    Every floating input may require grad. Raises
    :class:`~gsavatar.errors.InputError` with a one-line message for inputs it cannot use.
    """
    G = _check_geometry("rasterize", means, quats, scales, viewmat, K, width, height)
    _check_tensor("rasterize", "opacities", opacities, (G,), means)
    if sh_degree is None:
        _check_tensor("rasterize", "colors", colors, (G, 3), means, hint=" (RGB; pass sh_degree for SH coefficients)")
    else:
        if sh_degree not in (0, 1, 2, 3):
            raise InputError(f"rasterize: sh_degree must be None, 0, 1, 2 or 3 (got {sh_degree!r})")
        needed = (sh_degree + 1) ** 2
        if colors.ndim != 3 or colors.shape[0] != G or colors.shape[2] != 3 or colors.shape[1] < needed \
                or colors.shape[1] not in (1, 4, 9, 16):
            raise InputError(f"rasterize: colors must have shape [G={G}, K, 3] with K in (1, 4, 9, 16) and "
                             f"K >= {needed} for sh_degree={sh_degree} (got {list(colors.shape)})")
        _check_tensor("rasterize", "colors", colors, tuple(colors.shape), means)
    if background is not None:
        _check_tensor("rasterize", "background", background, (3,), means)
    if tile_size is not None and not (isinstance(tile_size, numbers.Integral) and not isinstance(tile_size, bool)
                                      and tile_size > 0):
        raise InputError(f"rasterize: tile_size must be a positive int (got {tile_size!r})")
    if not 0 < near < far:
        raise InputError(f"rasterize: need 0 < near < far (got near={near!r}, far={far!r})")
    if not eps2d >= 0:
        raise InputError(f"rasterize: eps2d must be >= 0 (got {eps2d!r})")
    try:
        chosen = get_backend(backend, means.device)
    except InputError as exc:
        raise InputError(f"rasterize: {exc}") from None
    result = chosen.rasterize_image(means, quats, scales, opacities, colors, viewmat, K, int(width), int(height),
                                    sh_degree=sh_degree, background=background, near=float(near), far=float(far),
                                    eps2d=float(eps2d), tile_size=None if tile_size is None else int(tile_size))
    return RasterOutput(*result)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _shape_str(shape: tuple) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _check_tensor(fn: str, name: str, x: object, shape: tuple[int, ...], ref: Tensor, hint: str = "") -> None:
    """``x`` is a floating tensor of ``shape`` with ``ref``'s dtype and device."""
    if not isinstance(x, Tensor):
        raise InputError(f"{fn}: {name} must be a torch.Tensor (got {type(x).__name__})")
    if x.dtype not in (torch.float32, torch.float64):
        raise InputError(f"{fn}: {name} must be float32 or float64 (got {x.dtype})")
    if tuple(x.shape) != tuple(shape):
        raise InputError(f"{fn}: {name} must have shape {_shape_str(shape)}{hint} (got {_shape_str(tuple(x.shape))})")
    if x.dtype != ref.dtype:
        raise InputError(f"{fn}: {name} has dtype {x.dtype} but means has {ref.dtype} (all inputs must share one)")
    if x.device != ref.device:
        raise InputError(f"{fn}: {name} is on {x.device} but means is on {ref.device} (all inputs must share one)")


def _check_geometry(fn: str, means: Tensor, quats: Tensor, scales: Tensor, viewmat: Tensor, K: Tensor,
                    width: int, height: int) -> int:
    """Checks the inputs shared by projection and rasterization; returns ``G``."""
    if not isinstance(means, Tensor):
        raise InputError(f"{fn}: means must be a torch.Tensor (got {type(means).__name__})")
    if means.ndim != 2 or means.shape[1] != 3:
        raise InputError(f"{fn}: means must have shape [G, 3] (got {_shape_str(tuple(means.shape))})")
    if means.dtype not in (torch.float32, torch.float64):
        raise InputError(f"{fn}: means must be float32 or float64 (got {means.dtype})")
    G = means.shape[0]
    _check_tensor(fn, "quats", quats, (G, 4), means)
    _check_tensor(fn, "scales", scales, (G, 3), means)
    _check_tensor(fn, "viewmat", viewmat, (4, 4), means)
    _check_tensor(fn, "K", K, (3, 3), means)
    for name, value in (("width", width), ("height", height)):
        if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0):
            raise InputError(f"{fn}: {name} must be a positive int (got {value!r})")
    return G
