"""Pure-PyTorch reference implementation of the Gaussian rasterizer (the ``"torch"`` backend).

The pipeline is split into the same stages as a fused CUDA rasterizer (gsplat's op names), so
that a compiled backend can replace them one at a time and be tested against this one:

==========================  ==============================  =================================
function here               mirrors the CUDA op             differentiable by
==========================  ==============================  =================================
``_spherical_harmonics``    ``spherical_harmonics``         autograd
``_fully_fused_projection`` ``fully_fused_projection``      autograd
``_isect_tiles``            ``isect_tiles``                 (integer binning, no gradient)
``_isect_offset_encode``    ``isect_offset_encode``         (integer binning, no gradient)
``_rasterize_to_pixels``    ``rasterize_to_pixels``         hand-written backward
==========================  ==============================  =================================

Only the per-pixel stage has a hand-written backward: it is where all the time goes, and the
closed-form gradient needs far fewer passes over the [pixels x Gaussians] work tensors than
autograd would record (and none of them has to be kept from the forward pass: the backward
recomputes alpha and transmittance chunk by chunk, as the CUDA kernels do). Everything per
Gaussian (projection, SH) goes through autograd, which also gives the gradients with respect to
``viewmat`` and ``K`` for free.

Compositing is exact for the truncation rule "skip a contribution whose alpha is below 1/255":
each Gaussian is binned to every tile that holds a pixel where its alpha can reach 1/255 (the
ellipse ``d^T Sigma^-1 d <= 2 ln(255 o)``, not a fixed 3-sigma box), so the image does not depend
on the tile size and equals the dense all-pixels-by-all-Gaussians sum (projection culls a
Gaussian off the image only when its 3.33-sigma reach misses it: no 1/255 contour reaches
further). There is no early termination when transmittance drops below 1e-4 (3DGS stops there):
the reference composites every binned Gaussian, which keeps it a smooth function of its inputs;
what 3DGS would drop weighs less than 1e-4 in total.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from gsavatar.tracking.camera import quat_to_matrix

ALPHA_MIN = 1.0 / 255.0  # contributions with a smaller alpha are skipped
ALPHA_MAX = 0.99  # alpha is capped here so that transmittance never reaches zero
# Padding entries in a tile's Gaussian list get this log-opacity: exp() of it is exactly 0.
_PAD_LOG_OPACITY = -1.0e4
_LOG_ALPHA_FLOOR = math.log(ALPHA_MIN) - 1.0  # exp() of it is below ALPHA_MIN
_LOG_ALPHA_MAX = math.log(ALPHA_MAX)
# Culling reach in sigmas: just beyond sqrt(2 ln 255) = 3.3290, where a Gaussian of opacity 1 falls
# to 1/255 (gsplat's 3.33 too, so both draw the same Gaussians).
CULL_SIGMAS = 3.33
# Upper bound on the elements of one [tiles, pixels, gaussians] work tensor. About eight of them are
# alive at once; at 2^18 (1 MiB in float32) they stay in cache and in reused heap memory, which on
# CPU is worth more than the Python overhead of more, smaller batches.
CHUNK_ELEMENTS = 1 << 18

# Real spherical-harmonics basis constants as used by 3DGS.
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
         1.445305721320277, -0.5900435899266435)


# --------------------------------------------------------------------------------------------
# Spherical harmonics
# --------------------------------------------------------------------------------------------

def _sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """The ``(degree + 1)^2`` real SH basis functions at unit directions ``dirs [G, 3]`` -> ``[G, K]``."""
    x, y, z = dirs.unbind(-1)
    basis = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        basis += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        basis += [SH_C2[0] * x * y, SH_C2[1] * y * z, SH_C2[2] * (2 * zz - xx - yy), SH_C2[3] * x * z,
                  SH_C2[4] * (xx - yy)]
    if degree >= 3:
        basis += [SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * x * y * z, SH_C3[2] * y * (4 * zz - xx - yy),
                  SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy),
                  SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3 * yy)]
    return torch.stack(basis, -1)


def _spherical_harmonics(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Mirrors the CUDA op ``spherical_harmonics``: raw SH value per Gaussian.

    ``dirs [G, 3]`` (any length; normalised here), ``coeffs [G, K, 3]`` with ``K >= (degree+1)^2``
    (only the first ``(degree+1)^2`` are used, so a model can raise its active degree during
    training without reshaping its parameters). Returns ``[G, 3]`` *without* the ``+0.5`` offset
    and clamp that turn it into a colour.
    """
    n = (degree + 1) ** 2
    # A zero direction (Gaussian exactly at the camera centre) gives a zero vector, not NaN.
    norm = (dirs * dirs).sum(-1, keepdim=True).clamp_min(1e-20).sqrt()
    basis = _sh_basis(degree, dirs / norm)
    return torch.einsum("gk,gkc->gc", basis, coeffs[:, :n, :])


# --------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ProjectedGaussians:
    """What :func:`_fully_fused_projection` returns (all ``[G, ...]``)."""

    means2d: Tensor  # [G, 2] pixels; meaningless (but finite) where not visible
    conics: Tensor  # [G, 3] (a, b, c) of the inverse 2-D covariance [[a, b], [b, c]]
    cov2d: Tensor  # [G, 3] (xx, xy, yy) of the 2-D covariance, eps2d included
    depths: Tensor  # [G] camera-space z of the means
    radii: Tensor  # [G] long, ceil(3 sqrt(largest eigenvalue)), 0 where not visible
    visible: Tensor  # [G] bool


def _fully_fused_projection(means: Tensor, quats: Tensor, scales: Tensor, viewmat: Tensor, K: Tensor,
                            width: int, height: int, eps2d: float, near: float, far: float) -> ProjectedGaussians:
    """Mirrors the CUDA op ``fully_fused_projection``: EWA projection of 3-D Gaussians to the image.

    ``Sigma = R S S^T R^T``; in the camera ``J W Sigma W^T J^T + eps2d I`` with ``W`` the rotation
    part of ``viewmat`` and ``J`` the Jacobian of the pinhole projection at the camera-space mean.
    """
    rot_v, t_v = viewmat[:3, :3], viewmat[:3, 3]
    p_cam = means @ rot_v.T + t_v
    x, y, depths = p_cam.unbind(-1)
    in_depth = (depths >= near) & (depths <= far)
    # Culled Gaussians still flow through the arithmetic below; a safe depth keeps their (unused)
    # values finite so that the zero gradient they receive does not turn into 0 * inf = NaN.
    z = torch.where(in_depth, depths, torch.ones_like(depths))
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    xz, yz = x / z, y / z
    means2d = torch.stack([fx * xz + cx, fy * yz + cy], -1)

    # The linearisation is clamped a little beyond the field of view (as 3DGS: 1.3 tan(fov/2) for a
    # centred principal point), otherwise Gaussians far off-screen get huge, unstable footprints.
    with torch.no_grad():
        tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
        lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_x, cx / fx + 0.3 * tan_x
        lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_y, cy / fy + 0.3 * tan_y
    xz_c = torch.minimum(torch.maximum(xz, -lim_x_neg), lim_x_pos)
    yz_c = torch.minimum(torch.maximum(yz, -lim_y_neg), lim_y_pos)
    zero = torch.zeros_like(z)
    jac = torch.stack([fx / z, zero, -fx * xz_c / z, zero, fy / z, -fy * yz_c / z], -1).reshape(-1, 2, 3)

    # cov2d = (J W R S)(J W R S)^T: one [G,2,3] factor instead of two 3x3 sandwiches.
    factor = (jac @ rot_v) @ (quat_to_matrix(quats) * scales[:, None, :])
    row0, row1 = factor.unbind(1)
    a = (row0 * row0).sum(-1) + eps2d
    b = (row0 * row1).sum(-1)
    c = (row1 * row1).sum(-1) + eps2d
    det = a * c - b * b
    good_det = det > 0
    det = torch.where(good_det, det, torch.ones_like(det))
    conics = torch.stack([c / det, -b / det, a / det], -1)

    with torch.no_grad():
        mid = 0.5 * (a + c)
        lam_max = mid + (mid * mid - det).clamp_min(0).sqrt()
        sigma_max = lam_max.sqrt()
        radius = torch.nan_to_num(torch.ceil(3 * sigma_max), nan=0.0, posinf=1e9).clamp(0, 1e9)
        # Culled only when even the 1/255 contour of a fully opaque Gaussian (sqrt(2 ln 255) = 3.33
        # sigma) misses the image: a border pixel can still get up to 1/255 of a Gaussian whose
        # 3-sigma box misses, and binning (below) decides exactly which pixels it reaches.
        reach = torch.nan_to_num(torch.ceil(CULL_SIGMAS * sigma_max), nan=0.0, posinf=1e9).clamp(0, 1e9)
        u, v = means2d.detach().unbind(-1)
        on_image = (u + reach > 0) & (u - reach < width) & (v + reach > 0) & (v - reach < height)
        visible = in_depth & good_det & on_image & (radius > 0)
        radii = torch.where(visible, radius, torch.zeros_like(radius)).long()
    return ProjectedGaussians(means2d, conics, torch.stack([a, b, c], -1), depths, radii, visible)


# --------------------------------------------------------------------------------------------
# Tile binning (no gradient)
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def _isect_tiles(means2d: Tensor, cov2d: Tensor, opacities: Tensor, depths: Tensor, visible: Tensor,
                 width: int, height: int, tile_size: int) -> tuple[Tensor, Tensor]:
    """Mirrors the CUDA op ``isect_tiles``: every (tile, Gaussian) pair, sorted by tile then depth.

    A visible Gaussian of opacity ``o`` is binned to each tile holding a pixel centre inside the
    bounding box of the ellipse where ``o exp(-d^T Sigma^-1 d / 2) > 1/255``. Returns
    ``(tile_ids [P], gauss_ids [P])`` (long).
    """
    tiles_x = (width + tile_size - 1) // tile_size
    binnable = visible & (opacities > ALPHA_MIN)
    k = (2 * torch.log(opacities.clamp_min(ALPHA_MIN) / ALPHA_MIN)).sqrt()
    # A hair of slack so that rounding never drops a pixel whose alpha just clears the threshold.
    half_x = k * cov2d[:, 0].clamp_min(0).sqrt() * (1 + 1e-4) + 1e-3
    half_y = k * cov2d[:, 2].clamp_min(0).sqrt() * (1 + 1e-4) + 1e-3
    u, v = means2d.unbind(-1)
    # Pixel (row i, col j) has its centre at (j + 0.5, i + 0.5): the covered columns are the j with
    # u - half_x <= j + 0.5 <= u + half_x, clipped to the image.
    big = float(max(width, height) + 1)
    j0 = torch.ceil((u - half_x - 0.5).clamp(-1, big)).long().clamp_min(0)
    j1 = torch.floor((u + half_x - 0.5).clamp(-1, big)).long().clamp_max(width - 1)
    i0 = torch.ceil((v - half_y - 0.5).clamp(-1, big)).long().clamp_min(0)
    i1 = torch.floor((v + half_y - 0.5).clamp(-1, big)).long().clamp_max(height - 1)
    binnable &= (j1 >= j0) & (i1 >= i0)
    tx0, ty0 = j0 // tile_size, i0 // tile_size
    nx = torch.where(binnable, j1 // tile_size - tx0 + 1, 0)
    ny = torch.where(binnable, i1 // tile_size - ty0 + 1, 0)
    counts = nx * ny

    n_pairs = int(counts.sum())  # host sync: the number of pairs sizes everything below
    gauss = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=n_pairs)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(n_pairs, device=counts.device) - first[gauss]
    tile = (ty0[gauss] + local // nx[gauss]) * tiles_x + tx0[gauss] + local % nx[gauss]

    # Sort by (tile, depth) with one key; ties in depth keep the input order.
    depth_rank = torch.empty_like(counts)
    depth_rank[torch.sort(depths, stable=True).indices] = torch.arange(len(depths), device=depths.device)
    order = torch.sort(tile * len(depths) + depth_rank[gauss]).indices
    return tile[order], gauss[order]


@torch.no_grad()
def _isect_offset_encode(tile_ids: Tensor, n_tiles: int) -> tuple[Tensor, Tensor]:
    """Mirrors the CUDA op ``isect_offset_encode``: ``(first pair index, pair count)`` per tile."""
    counts = torch.bincount(tile_ids, minlength=n_tiles)
    return torch.cumsum(counts, 0) - counts, counts


@dataclasses.dataclass
class TileBatch:
    """Tiles rasterized together: their Gaussian lists padded to a common length."""

    tile_ids: Tensor  # [B] long
    gauss_ids: Tensor  # [B, N] long, depth-sorted; padding is G (a dummy Gaussian with alpha 0)
    centres: Tensor  # [B, 2] pixel coordinates (x, y) of each tile's centre
    chunk: int  # Gaussians per pass over the list (N is split when B * pixels * N is too large)


@torch.no_grad()
def _plan_batches(tile_ids: Tensor, gauss_ids: Tensor, n_gaussians: int, width: int, height: int,
                  tile_size: int, dtype: torch.dtype, max_elements: int | None = None) -> list[TileBatch]:
    """Group the non-empty tiles into batches of similar list length (few padding entries).

    Tiles are taken longest list first; each batch holds as many as fit in ``max_elements``
    (default :data:`CHUNK_ELEMENTS`) work-tensor entries at the length of its first (longest)
    list. A single tile whose list alone exceeds that is processed in chunks along the list.
    """
    max_elements = CHUNK_ELEMENTS if max_elements is None else max_elements
    tiles_x = (width + tile_size - 1) // tile_size
    tiles_y = (height + tile_size - 1) // tile_size
    offsets, counts = _isect_offset_encode(tile_ids, tiles_x * tiles_y)
    pixels = tile_size * tile_size
    counts_host = counts.cpu()
    order = torch.sort(counts_host, descending=True, stable=True).indices
    order = order[counts_host[order] > 0].tolist()
    counts_list = counts_host.tolist()
    device = tile_ids.device
    batches: list[TileBatch] = []
    start = 0
    while start < len(order):
        longest = counts_list[order[start]]
        size = max(1, max_elements // (pixels * longest))
        tiles = torch.tensor(order[start:start + size], device=device)
        start += size
        slots = torch.arange(longest, device=device)
        index = (offsets[tiles, None] + slots).clamp_max(len(gauss_ids) - 1)
        ids = torch.where(slots < counts[tiles, None], gauss_ids[index], n_gaussians)
        centres = (torch.stack([tiles % tiles_x, tiles // tiles_x], -1).to(dtype) + 0.5) * tile_size
        chunk = max(1, max_elements // (len(tiles) * pixels))
        batches.append(TileBatch(tiles, ids, centres, chunk))
    return batches


# --------------------------------------------------------------------------------------------
# Per-pixel compositing
# --------------------------------------------------------------------------------------------
#
# Layout: a batch of B tiles, each with a depth-sorted list of n Gaussians (padded), is processed
# as [B, P, n] tensors (P = tile_size^2 pixels, row-major), so that the scans over the list
# (transmittance, suffix sums) run along the contiguous last dimension. The forward pass keeps
# nothing of that size for the backward pass: it recomputes alpha and transmittance per chunk
# (like the CUDA kernels), which is cheaper than holding on to fresh memory on CPU and keeps the
# memory bounded by the chunk size.

def _local_pixel_coords(tile_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Pixel centres of a tile relative to the tile's centre, ``[ts]`` (the same along x and y)."""
    return torch.arange(tile_size, dtype=dtype, device=device) + (0.5 - tile_size / 2)


def _tile_alpha(params: Tensor, centres: Tensor, local: Tensor, capped: bool) -> Tensor:
    """Alpha of each Gaussian at each pixel of each tile: ``[B, ts*ts, n]`` (pixels row-major).

    ``params [B, n, 6]`` holds ``(u, v, a, b, c, log o)``; ``centres [B, 2]`` the tiles' centres.
    The exponent ``log o - (a dx^2 + 2 b dx dy + c dy^2) / 2`` is separable except for the cross
    term, so it is assembled from per-row and per-column pieces in two passes over the big tensor.
    ``capped``: whether any Gaussian has an opacity of 0.99 or more (else alpha cannot reach the cap).
    """
    dx = local[None, :, None] - (params[:, None, :, 0] - centres[:, 0, None, None])  # [B, ts(col), n]
    dy = local[None, :, None] - (params[:, None, :, 1] - centres[:, 1, None, None])  # [B, ts(row), n]
    a, b, c, log_o = params[:, None, :, 2], params[:, None, :, 3], params[:, None, :, 4], params[:, None, :, 5]
    per_row = log_o - 0.5 * c * dy * dy
    per_col = -0.5 * a * dx * dx
    power = per_row[:, :, None, :] + per_col[:, None, :, :]  # [B, ts(row), ts(col), n]
    power.addcmul_((b * dy)[:, :, None, :], dx[:, None, :, :], value=-1)
    # Far from a Gaussian exp() underflows to denormals, which is ~15x slower on x86; anything below
    # the floor is skipped anyway, so clamp first.
    alpha = power.clamp_min_(_LOG_ALPHA_FLOOR).exp_()
    if capped:
        alpha.clamp_max_(ALPHA_MAX)
    F.threshold_(alpha, ALPHA_MIN, 0.0)  # alpha <= 1/255 -> skipped
    return alpha.view(alpha.shape[0], -1, alpha.shape[-1])


def _composite_chunk(params: Tensor, centres: Tensor, local: Tensor, trans: Tensor,
                     capped: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Alpha, transmittance and weights of one chunk of the tiles' lists.

    ``trans [B, P, 1]``: transmittance in front of the chunk. Returns ``alpha [B, P, n]``, the
    weights ``w_i = alpha_i T_i`` ``[B, P, n]`` and the transmittance behind the chunk ``[B, P, 1]``
    (the last two are views of one buffer: fewer fresh allocations, which are costly on CPU).
    """
    alpha = _tile_alpha(params, centres, local, capped)
    buffer = alpha.new_empty(*alpha.shape[:2], alpha.shape[2] + 1)
    buffer[..., :1] = trans
    torch.sub(alpha.new_ones(()), alpha, out=buffer[..., 1:])
    buffer.cumprod_(-1)  # [..., i]: transmittance in front of Gaussian i; [..., n]: behind the chunk
    return alpha, buffer[..., :-1].mul_(alpha), buffer[..., -1:]


def _pack_params(means2d: Tensor, conics: Tensor, opacities: Tensor) -> Tensor:
    """``[G + 1, 6]`` rows ``(u, v, a, b, c, log o)``; the last row is the padding Gaussian."""
    log_o = torch.log(opacities.clamp_min(ALPHA_MIN))  # only Gaussians with o > 1/255 are binned
    pad = means2d.new_tensor([[0.0, 0.0, 1.0, 0.0, 1.0, _PAD_LOG_OPACITY]])
    return torch.cat([torch.cat([means2d, conics, log_o[:, None]], 1), pad])


def _to_tiles(image: Tensor, tile_size: int) -> Tensor:
    """``[H, W, C]`` -> ``[n_tiles, C, ts*ts]`` (zero-padded to whole tiles)."""
    height, width, channels = image.shape
    ty, tx = -(-height // tile_size), -(-width // tile_size)
    image = F.pad(image, (0, 0, 0, tx * tile_size - width, 0, ty * tile_size - height))
    image = image.view(ty, tile_size, tx, tile_size, channels).permute(0, 2, 4, 1, 3)
    return image.reshape(ty * tx, channels, tile_size * tile_size)


def _from_tiles(tiles: Tensor, width: int, height: int, tile_size: int) -> Tensor:
    """Inverse of :func:`_to_tiles`: ``[n_tiles, C, ts*ts]`` -> ``[H, W, C]``."""
    ty, tx = -(-height // tile_size), -(-width // tile_size)
    channels = tiles.shape[1]
    image = tiles.view(ty, tx, channels, tile_size, tile_size).permute(0, 3, 1, 4, 2)
    return image.reshape(ty * tile_size, tx * tile_size, channels)[:height, :width]


class _RasterizeToPixels(torch.autograd.Function):
    """Front-to-back alpha compositing of depth-sorted Gaussians, per tile, with a closed-form backward.

    Per pixel with the list's alphas ``a_i`` and transmittance ``T_i = prod_{j<i}(1-a_j)`` in front
    of each: ``w_i = a_i T_i``, ``out = sum_i w_i f_i`` and ``alpha = 1 - T_N``. With
    ``v_i = g_out . f_i + g_alpha`` the gradient is ``dL/da_i = T_i v_i - (sum_{j>i} w_j v_j) / (1 - a_i)``,
    and ``a_i = o exp(power)`` gives ``dL/dpower_i = a_i dL/da_i`` where ``a_i`` is neither skipped
    nor capped. The power's gradients reduce over a tile's pixels to six moments
    ``sum_p g_p {1, x, y, x^2, y^2, xy}`` (one matrix product), from which the gradients of
    ``u, v, a, b, c, log o`` follow in closed form.
    """

    @staticmethod
    def forward(ctx, means2d: Tensor, conics: Tensor, features: Tensor, opacities: Tensor,
                batches: list[TileBatch], width: int, height: int, tile_size: int) -> tuple[Tensor, Tensor]:
        channels = features.shape[1]
        n_tiles = -(-width // tile_size) * -(-height // tile_size)
        pixels = tile_size * tile_size
        local = _local_pixel_coords(tile_size, features.dtype, features.device)
        params = _pack_params(means2d, conics, opacities)
        feats_t = torch.cat([features, features.new_zeros(1, channels)]).T.contiguous()  # [C, G + 1]
        out_tiles = features.new_zeros(n_tiles, channels, pixels)
        trans_tiles = features.new_ones(n_tiles, 1, pixels)
        chunk_state: list[list[tuple[Tensor, bool]]] = []  # per chunk: transmittance in front, capped
        for batch in batches:
            n_batch, n_list = batch.gauss_ids.shape
            ids = batch.gauss_ids.reshape(-1)
            prm = params.index_select(0, ids).view(n_batch, n_list, 6)
            f_t = feats_t.index_select(1, ids).view(channels, n_batch, n_list).transpose(0, 1)  # [B, C, n]
            trans = features.new_ones(n_batch, pixels, 1)
            acc = features.new_zeros(n_batch, channels, pixels)
            states = []
            for lo in range(0, n_list, batch.chunk):
                sl = slice(lo, lo + batch.chunk)
                capped = bool(prm[:, sl, 5].max() >= _LOG_ALPHA_MAX)  # (one host sync per chunk)
                states.append((trans.clone(), capped))  # (a copy: a view would keep the chunk's buffer alive)
                _, weights, trans = _composite_chunk(prm[:, sl], batch.centres, local, trans, capped)
                acc.baddbmm_(f_t[:, :, sl], weights.transpose(1, 2))  # [B, C, P]
            chunk_state.append(states)
            out_tiles.index_copy_(0, batch.tile_ids, acc)
            trans_tiles.index_copy_(0, batch.tile_ids, trans.transpose(1, 2))
        ctx.batches, ctx.chunk_state, ctx.params, ctx.feats_t = batches, chunk_state, params, feats_t
        ctx.tile_size = tile_size
        ctx.save_for_backward(opacities)
        image = _from_tiles(out_tiles, width, height, tile_size)
        alpha_image = 1 - _from_tiles(trans_tiles, width, height, tile_size)
        return image, alpha_image

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_image: Tensor, grad_alpha: Tensor):
        (opacities,) = ctx.saved_tensors
        tile_size, params, feats_t = ctx.tile_size, ctx.params, ctx.feats_t
        channels = feats_t.shape[0]
        dtype, device = params.dtype, params.device
        local = _local_pixel_coords(tile_size, dtype, device)
        # The six moments' weights per pixel (row-major): 1, x, y, x^2, y^2, xy about the tile centre.
        y, x = torch.meshgrid(local, local, indexing="ij")
        x, y = x.reshape(-1), y.reshape(-1)
        basis = torch.stack([torch.ones_like(x), x, y, x * x, y * y, x * y])  # [6, P]
        grad_tiles = _to_tiles(grad_image.contiguous(), tile_size)  # [T, C, P]
        grad_alpha_tiles = _to_tiles(grad_alpha.contiguous(), tile_size)  # [T, 1, P]
        grad_params = torch.zeros_like(params)
        grad_feats_t = torch.zeros_like(feats_t)
        for batch, states in zip(ctx.batches, ctx.chunk_state):
            n_batch, n_list = batch.gauss_ids.shape
            ids = batch.gauss_ids.reshape(-1)
            prm = params.index_select(0, ids).view(n_batch, n_list, 6)
            f_t = feats_t.index_select(1, ids).view(channels, n_batch, n_list).transpose(0, 1)  # [B, C, n]
            g_out_t = grad_tiles.index_select(0, batch.tile_ids)  # [B, C, P]
            g_alpha = grad_alpha_tiles.index_select(0, batch.tile_ids).transpose(1, 2)  # [B, P, 1]
            later = torch.zeros_like(g_alpha)  # sum of w_j v_j over the chunks behind this one
            for index in reversed(range(len(states))):
                trans, capped = states[index]
                sl = slice(index * batch.chunk, (index + 1) * batch.chunk)
                p = prm[:, sl]
                alpha, weights, _ = _composite_chunk(p, batch.centres, local, trans, capped)
                wv = torch.baddbmm(g_alpha, g_out_t.transpose(1, 2), f_t[:, :, sl]).mul_(weights)  # w_i v_i
                behind = torch.cumsum(wv, -1)
                total = behind[..., -1:].clone()
                behind = torch.sub(total + later, behind, out=behind)  # sum_{j>i} w_j v_j
                later = later + total
                # dL/dpower = a_i T_i v_i - a_i / (1 - a_i) sum_{j>i} w_j v_j
                ratio = torch.sub(alpha.new_ones(()), alpha)
                g_power = wv.addcmul_(torch.div(alpha, ratio, out=ratio), behind, value=-1)
                if capped:  # zero where alpha sits at the cap (sign() is cheaper than a boolean mask here)
                    g_power.mul_(torch.sub(alpha.new_tensor(ALPHA_MAX), alpha).sign_())
                g_f_t = torch.bmm(g_out_t, weights)  # [B, C, n]

                # power = log o - (a dx^2 + 2 b dx dy + c dy^2) / 2 with dx = x - u', dy = y - v'
                # (pixel and mean relative to the tile centre).
                m1, mx, my, mxx, myy, mxy = torch.matmul(basis, g_power).unbind(1)  # [B, n] each
                u = p[..., 0] - batch.centres[:, :1]
                v = p[..., 1] - batch.centres[:, 1:]
                s_dx, s_dy = mx - u * m1, my - v * m1
                s_dxx = mxx - 2 * u * mx + u * u * m1
                s_dyy = myy - 2 * v * my + v * v * m1
                s_dxy = mxy - u * my - v * mx + u * v * m1
                a, b, c = p[..., 2], p[..., 3], p[..., 4]
                grad = torch.stack([a * s_dx + b * s_dy, b * s_dx + c * s_dy,
                                    -0.5 * s_dxx, -s_dxy, -0.5 * s_dyy, m1], -1)
                sub_ids = batch.gauss_ids[:, sl].reshape(-1)
                grad_params.index_add_(0, sub_ids, grad.reshape(-1, 6))
                grad_feats_t.index_add_(1, sub_ids, g_f_t.transpose(0, 1).reshape(channels, -1))
        grad_params = grad_params[:-1]
        grad_feats = grad_feats_t[:, :-1].T
        # d log(o) / do = 1 / o; Gaussians with o <= 1/255 were never binned and have zero gradient.
        grad_opacities = grad_params[:, 5] / opacities.clamp_min(ALPHA_MIN)
        return grad_params[:, :2], grad_params[:, 2:5], grad_feats, grad_opacities, None, None, None, None


def _rasterize_to_pixels(means2d: Tensor, conics: Tensor, features: Tensor, opacities: Tensor,
                         batches: list[TileBatch], width: int, height: int, tile_size: int) -> tuple[Tensor, Tensor]:
    """Mirrors the CUDA op ``rasterize_to_pixels``: ``(sum_i w_i f_i [H, W, C], 1 - T [H, W, 1])``."""
    return _RasterizeToPixels.apply(means2d, conics, features, opacities, batches, width, height, tile_size)


# --------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------

def rasterize_torch(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
                    viewmat: Tensor, K: Tensor, width: int, height: int, *, sh_degree: int | None,
                    background: Tensor | None, near: float, far: float, eps2d: float,
                    tile_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The ``"torch"`` backend; inputs already validated. Returns the fields of ``RasterOutput``."""
    proj = _fully_fused_projection(means, quats, scales, viewmat, K, width, height, eps2d, near, far)
    if sh_degree is not None:
        # Camera centre -R^T t (viewmat is rigid); directions from the camera to each Gaussian.
        cam_centre = -viewmat[:3, :3].T @ viewmat[:3, 3]
        colors = (_spherical_harmonics(sh_degree, means - cam_centre, colors) + 0.5).clamp_min(0)
    features = torch.cat([colors, proj.depths[:, None]], 1)
    tile_ids, gauss_ids = _isect_tiles(proj.means2d.detach(), proj.cov2d.detach(), opacities.detach(),
                                       proj.depths.detach(), proj.visible, width, height, tile_size)
    batches = _plan_batches(tile_ids, gauss_ids, len(means), width, height, tile_size, means.dtype)
    image, alpha = _rasterize_to_pixels(proj.means2d, proj.conics, features, opacities, batches, width, height,
                                        tile_size)
    color, depth = image[..., :3], image[..., 3:]
    if background is not None:
        color = color + (1 - alpha) * background
    return color, alpha, depth, proj.means2d, proj.radii, proj.visible
