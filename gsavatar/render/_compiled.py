"""Our compiled kernels behind the ``"cuda"`` and ``"cpp"`` backends (:mod:`gsavatar.render.backends`):
the rasterizer and the hash grid, as autograd functions over the extension built by
:mod:`gsavatar.kernels` (every function here takes that extension, so any build of the same
sources runs through the same code).

The rasterizer runs through two autograd functions that mirror the reference's stages (``_torch_impl``):

* :class:`_Project` = ``_fully_fused_projection`` + ``_spherical_harmonics`` (one kernel each way),
* binning = ``_isect_tiles`` + ``_isect_offset_encode`` (no gradient; one host synchronisation for
  the number of (tile, Gaussian) pairs, as in every tile rasterizer, unless a :class:`PairBudget`
  sizes the buffers from earlier frames),
* :class:`_Composite` = ``_rasterize_to_pixels`` (one kernel each way).

They render a *batch* of images in one pass: every Gaussian carries the index of the camera (and
output image) it belongs to, so the avatar's face and mouth branches share one binning, one sort
and one compositing launch (:func:`rasterize_batch`).

Differences from the ``"torch"`` reference, all deliberate:

* float32 only; ``viewmat`` and ``K`` are constants (no gradient: the trainer never optimises them);
* a pixel stops compositing after the Gaussian that takes its transmittance below
  ``min_transmittance`` (1e-4, 3DGS's threshold), so what it leaves out weighs less than 1e-4 in
  total (3DGS stops *before* that Gaussian, which can drop up to 100 times more).
  ``min_transmittance=0`` composites everything, like the reference (the parity tests use it);
* tiles are always 16 x 16 (``tile_size`` is ignored; the image does not depend on it).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gsavatar.errors import InputError

MIN_TRANSMITTANCE = 1e-4
"""Default early-stop threshold of the compiled backends (3DGS's value)."""


class _Project(torch.autograd.Function):
    """EWA projection and SH colours of every Gaussian; gradients to means, quats, scales and SH."""

    @staticmethod
    def forward(ctx, means, quats, scales, sh, ext, sh_degree, image_ids, viewmats, Ks, width, height, eps2d, near,
                far):
        means, quats, scales = means.contiguous(), quats.contiguous(), scales.contiguous()
        sh = sh.contiguous() if sh is not None else None
        degree = sh_degree if sh is not None else 0
        means2d, conics, cov2d, depths, radii, colors = ext.project_forward(
            means, quats, scales, sh, degree, image_ids, viewmats, Ks, width, height, eps2d, near, far)
        # The cameras are saved too, so that changing them in place before backward() is caught.
        ctx.save_for_backward(means, quats, scales, radii, image_ids, viewmats, Ks, *([sh] if sh is not None else []))
        ctx.settings = (ext, degree, width, height, eps2d, near, far)
        ctx.mark_non_differentiable(cov2d, radii)
        return means2d, conics, depths, colors, cov2d, radii

    @staticmethod
    @once_differentiable
    def backward(ctx, v_means2d, v_conics, v_depths, v_colors, _v_cov2d, _v_radii):
        means, quats, scales, radii, image_ids, viewmats, Ks, *rest = ctx.saved_tensors
        sh = rest[0] if rest else None
        ext, degree, width, height, eps2d, near, far = ctx.settings
        v_means, v_quats, v_scales, v_sh = ext.project_backward(
            means, quats, scales, sh, degree, image_ids, viewmats, Ks, width, height, eps2d, near, far, radii,
            v_means2d.contiguous(), v_conics.contiguous(), v_depths.contiguous(),
            v_colors.contiguous() if sh is not None else None)
        return (v_means, v_quats, v_scales, v_sh if sh is not None else None) + (None,) * 10


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of the binned Gaussians: ``(sum_i w_i f_i [B,H,W,C], 1 - T [B,H,W,1])``."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, ext, tile_offsets, gauss_ids, images, width, height,
                min_transmittance):
        means2d, conics = means2d.contiguous(), conics.contiguous()
        opacities, features = opacities.contiguous(), features.contiguous()
        image, T, last = ext.rasterize_forward(means2d, conics, opacities, features, tile_offsets, gauss_ids, images,
                                               width, height, min_transmittance)
        ctx.save_for_backward(means2d, conics, opacities, features, tile_offsets, gauss_ids, image, T, last)
        ctx.settings = (ext, width, height)
        return image, (1 - T).unsqueeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, v_image, v_alpha):
        ext, width, height = ctx.settings
        grads = ext.rasterize_backward(*ctx.saved_tensors, v_image.contiguous(), v_alpha[..., 0].contiguous(), width,
                                       height)
        return tuple(grads) + (None,) * 7


class PairBudget:
    """Sizes the (tile, Gaussian) pair buffers of a sequence of frames, so a frame never waits for the GPU.

    How many pairs a frame bins is known only on the device, after projection; reading it back
    stalls the host until the GPU has caught up (the one synchronisation of an unbudgeted frame,
    which also rules out capturing the frame as a CUDA graph). Consecutive frames of one avatar
    need similar numbers, so the budget gives each frame the largest number seen so far times
    ``headroom``, and keeps on the device, updated in place, the largest number needed and the
    largest shortfall. :meth:`settle` (one synchronisation, when the caller reads its frames
    anyway) says whether every frame since the last call fitted, and grows the budget; a frame
    that did not fit lost some of its Gaussians and must be rendered again.
    The first frame, with nothing to go by, is binned exactly (it synchronises once).
    """

    def __init__(self, headroom: float = 1.25):
        if not headroom >= 1.0:
            raise ValueError(f"PairBudget: headroom must be >= 1 (got {headroom})")
        self.headroom = float(headroom)
        self.capacity: int | None = None
        self._state: Tensor | None = None  # [2] int64 on the device: peak pairs needed, worst shortfall

    def take(self) -> int:
        """The capacity for the next frame; -1: bin exactly (the budget has not seen a frame yet)."""
        return -1 if self.capacity is None else self.capacity

    def record(self, needed: Tensor, capacity: int) -> None:
        """Note a frame's pairs (``needed``, ``[1]`` int64 on the device) binned with ``capacity``."""
        if self._state is None:
            self._state = torch.zeros(2, dtype=torch.long, device=needed.device)
        elif self._state.device != needed.device:
            raise ValueError(f"a PairBudget serves one device: it budgets {self._state.device}, "
                             f"this frame is on {needed.device}")
        if capacity < 0:
            shortfall = torch.zeros_like(needed)
            if self.capacity is None:  # exact binning has synchronised already: the read is free
                self.capacity = self._with_headroom(int(needed.item()))
        else:
            shortfall = needed - capacity
        # In place, so that replays of a captured CUDA graph keep updating the same tensor.
        torch.maximum(self._state, torch.cat([needed, shortfall]), out=self._state)

    def settle(self) -> bool:
        """True if every frame recorded since the last call got all its pairs (synchronises once)."""
        if self._state is None:
            return True
        peak, shortfall = self._state.tolist()
        self._state.zero_()
        # Grow before the limit is hit: keep the headroom over the largest frame seen.
        self.capacity = max(self.capacity or 0, self._with_headroom(peak))
        return shortfall <= 0

    def _with_headroom(self, pairs: int) -> int:
        return max(1024, int(pairs * self.headroom) + 1)


def _check(backend: str, want: str, tensors: dict[str, Tensor]) -> None:
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise InputError(f"rasterize: the {backend!r} backend takes float32 only ({name} is {t.dtype}); "
                             f"use backend='torch' for float64")
        if t.device.type != want:
            raise InputError(f"rasterize: the {backend!r} backend needs {want} tensors ({name} is on {t.device})")
    for name in ("viewmats", "Ks"):
        if tensors[name].requires_grad:
            raise InputError(f"rasterize: the {backend!r} backend treats the camera as a constant "
                             f"({name[:-1]} requires grad); use backend='torch' to optimise cameras")


def rasterize_batch(ext, backend: str, device_type: str, means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
                    image_ids: Tensor, viewmats: Tensor, Ks: Tensor, width: int, height: int, *,
                    sh_degree: int | None, near: float = 0.01, far: float = 1e3, eps2d: float = 0.3,
                    min_transmittance: float | None = None, group_sizes: list[int] | None = None,
                    pair_budget: PairBudget | None = None, with_depth: bool = True) -> tuple[Tensor, ...]:
    """Render ``B = len(viewmats)`` images at once; Gaussian ``i`` is drawn only into image ``image_ids[i]``.

    Inputs as :func:`gsavatar.render.rasterize` (colours ``[G, 3]`` or SH ``[G, K, 3]`` with
    ``sh_degree``), plus ``image_ids [G]`` (int) and per-image ``viewmats [B, 4, 4]``, ``Ks [B, 3, 3]``.
    Returns ``(color [B,H,W,3], alpha [B,H,W,1], depth [B,H,W,1], means2d [G,2], radii [G] long,
    visible [G] bool)``; colours are premultiplied, without background. With ``group_sizes`` (the
    Gaussians come in consecutive groups of these sizes), ``means2d``, ``radii`` and ``visible`` are
    tuples with one tensor per group, and ``retain_grad()`` works on each ``means2d`` part.
    With ``pair_budget`` the binning does not synchronise (see :class:`PairBudget`). Without
    ``with_depth`` the depth image is not composited (``None``; a quarter less to write).
    """
    _check(backend, device_type, {"means": means, "quats": quats, "scales": scales, "opacities": opacities, "colors": colors,
                  "viewmats": viewmats, "Ks": Ks})
    if min_transmittance is None:
        min_transmittance = MIN_TRANSMITTANCE
    images = int(viewmats.shape[0])
    ids = image_ids.to(device=means.device, dtype=torch.int32).contiguous()
    viewmats, Ks = viewmats.detach().contiguous(), Ks.detach().contiguous()
    sh = colors if sh_degree is not None else None
    means2d, conics, depths, sh_colors, cov2d, radii = _Project.apply(
        means, quats, scales, sh, ext, sh_degree, ids, viewmats, Ks, width, height, eps2d, near, far)
    rgb = sh_colors if sh is not None else colors
    features = torch.cat([rgb, depths[:, None]], 1) if with_depth else rgb
    capacity = pair_budget.take() if pair_budget is not None else -1
    tile_offsets, gauss_ids, pairs = ext.isect_tiles(means2d.detach(), cov2d, opacities.detach().contiguous(),
                                                     depths.detach(), radii, ids, images, width, height, capacity)
    if pair_budget is not None:
        pair_budget.record(pairs, capacity)
    if group_sizes is not None:
        # Split, then join again: the compositing consumes the parts, so each part gets its gradient.
        parts = means2d.split(group_sizes)
        means2d = torch.cat(parts)
    image, alpha = _Composite.apply(means2d, conics, opacities, features, ext, tile_offsets, gauss_ids, images, width,
                                    height, float(min_transmittance))
    radii = radii.long()
    color, depth = (image[..., :3], image[..., 3:]) if with_depth else (image, None)
    if group_sizes is None:
        return color, alpha, depth, means2d, radii, radii > 0
    radii_parts = radii.split(group_sizes)
    return color, alpha, depth, parts, radii_parts, tuple(r > 0 for r in radii_parts)


def rasterize_groups(ext, backend: str, device_type: str, groups: list, K: Tensor, width: int, height: int, *,
                     near: float = 0.01, far: float = 1e3, eps2d: float = 0.3, min_transmittance: float | None = None,
                     pair_budget: PairBudget | None = None) -> list[tuple[Tensor, ...]]:
    """Each group into its own image, all in one projection, binning and compositing pass.

    ``groups``: :class:`gsavatar.render.backends.LayerGaussians`.
    Returns per group ``(color [H,W,3], alpha [H,W,1], means2d, radii, visible)`` (no depth: the
    layers do not need it).
    Groups with fewer SH coefficients are padded with zeros, which leaves their colours unchanged.
    """
    coeffs = max(g.sh.shape[1] for g in groups)
    sh = torch.cat([torch.nn.functional.pad(g.sh, (0, 0, 0, coeffs - g.sh.shape[1])) for g in groups])
    sizes = [len(g.means) for g in groups]
    ids = torch.cat([torch.full((n,), k, dtype=torch.int32, device=K.device) for k, n in enumerate(sizes)])
    color, alpha, depth, means2d, radii, visible = rasterize_batch(
        ext, backend, device_type, torch.cat([g.means for g in groups]), torch.cat([g.quats for g in groups]),
        torch.cat([g.scales for g in groups]), torch.cat([g.opacities for g in groups]), sh, ids,
        torch.stack([g.viewmat for g in groups]), K.expand(len(groups), 3, 3), width, height,
        sh_degree=max(g.sh_degree for g in groups), near=near, far=far, eps2d=eps2d,
        min_transmittance=min_transmittance, group_sizes=sizes, pair_budget=pair_budget, with_depth=False)
    return [(color[k], alpha[k], means2d[k], radii[k], visible[k]) for k in range(len(groups))]


def rasterize_image(ext, backend: str, device_type: str, means, quats, scales, opacities, colors, viewmat, K, width,
                    height, *, sh_degree, background, near, far, eps2d, min_transmittance: float | None = None):
    """A single image, with the reference's signature and outputs (the backend's ``rasterize``)."""
    ids = torch.zeros(len(means), dtype=torch.int32, device=means.device)
    color, alpha, depth, means2d, radii, visible = rasterize_batch(
        ext, backend, device_type, means, quats, scales, opacities, colors, ids, viewmat[None], K[None], width,
        height, sh_degree=sh_degree, near=near, far=far, eps2d=eps2d, min_transmittance=min_transmittance)
    color, alpha, depth = color[0], alpha[0], depth[0]
    if background is not None:
        color = color + (1 - alpha) * background
    return color, alpha, depth, means2d, radii, visible


class _CompiledHashGrid(torch.autograd.Function):
    """:class:`gsavatar.model.encoding.HashGrid`'s forward and backward by our kernels (float32)."""

    @staticmethod
    def forward(ctx, x: Tensor, table: Tensor, ext, resolutions: list[int]) -> Tensor:
        ctx.ext, ctx.resolutions = ext, resolutions
        ctx.save_for_backward(x, table)
        return ext.hashgrid_forward(x, table, resolutions)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, table = ctx.saved_tensors
        grad_table, grad_x = ctx.ext.hashgrid_backward(grad_out, x, table, ctx.resolutions, ctx.needs_input_grad[0])
        return grad_x, grad_table if ctx.needs_input_grad[1] else None, None, None


def hash_grid_compiled(x: Tensor, table: Tensor, ext, resolutions: list[int]) -> Tensor:
    """Features ``[P, L*F]`` of ``x [P, dim]`` from ``table [L, T, F]`` (the reference's contract)."""
    return _CompiledHashGrid.apply(x.to(torch.float32).contiguous(), table, ext, resolutions)
