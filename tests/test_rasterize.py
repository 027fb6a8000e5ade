"""The pure-PyTorch Gaussian rasterizer: gradients, analytic values, ordering, tiling, culling, validation."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings

import pytest
import torch

from gsavatar.errors import InputError
from gsavatar.render import (
    BACKEND_CHOICES,
    LayerGaussians,
    _torch_impl,
    available_backends,
    backends,
    check_backend,
    eval_sh,
    get_backend,
    project_gaussians,
    rasterize,
    rasterize_layers,
)

F64 = torch.float64


def camera(width: int, height: int, focal: float, dtype=F64, device="cpu"):
    """Identity pose, principal point at the image centre (pixel-centre convention: (W/2, H/2))."""
    viewmat = torch.eye(4, dtype=dtype, device=device)
    K = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=dtype, device=device)
    return viewmat, K


def random_scene(n: int, width: int, height: int, focal: float, seed: int, dtype=F64, margin_px: float = 0.0,
                 px_scale=(0.8, 2.5), opacity=(0.2, 0.9), depth=(2.0, 4.0)):
    """``n`` Gaussians whose centres project inside the image shrunk by ``margin_px`` (negative: beyond it)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.empty(n, dtype=dtype).uniform_(*depth, generator=g)
    u = torch.empty(n, dtype=dtype).uniform_(margin_px, width - margin_px, generator=g)
    v = torch.empty(n, dtype=dtype).uniform_(margin_px, height - margin_px, generator=g)
    means = torch.stack([(u - width / 2) * z / focal, (v - height / 2) * z / focal, z], -1)
    quats = torch.randn(n, 4, dtype=dtype, generator=g)
    # Anisotropic scales of about px_scale pixels at the Gaussian's depth.
    scales = torch.empty(n, 3, dtype=dtype).uniform_(*px_scale, generator=g) * z[:, None] / focal
    opacities = torch.empty(n, dtype=dtype).uniform_(*opacity, generator=g)
    colors = torch.rand(n, 3, dtype=dtype, generator=g)
    return means, quats, scales, opacities, colors


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Independent of the implementation: via the Hamilton product q v q*."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, v = q[:, :1], q[:, 1:]
    eye = torch.eye(3, dtype=q.dtype).expand(len(q), 3, 3)
    # Rotating each basis vector e: e + 2w (v x e) + 2 v x (v x e).
    cols = []
    for k in range(3):
        e = eye[:, :, k]
        c1 = torch.cross(v, e, dim=-1)
        cols.append(e + 2 * w * c1 + 2 * torch.cross(v, c1, dim=-1))
    return torch.stack(cols, -1)


def dense_render(means, quats, scales, opacities, colors, viewmat, K, width, height, eps2d=0.3, keep=None):
    """All pixels x all Gaussians, no tiling, no culling except ``keep``: the maths of 3DGS written plainly."""
    if keep is not None:
        means, quats, scales, opacities, colors = (x[keep] for x in (means, quats, scales, opacities, colors))
    rot = viewmat[:3, :3]
    cam = means @ rot.T + viewmat[:3, 3]
    x, y, z = cam.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    uv = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
    zero = torch.zeros_like(z)
    jac = torch.stack([fx / z, zero, -fx * x / z**2, zero, fy / z, -fy * y / z**2], -1).reshape(-1, 2, 3)
    rs = quat_to_matrix(quats) @ torch.diag_embed(scales)
    cov3 = rs @ rs.transpose(1, 2)
    cov2 = jac @ rot @ cov3 @ rot.T @ jac.transpose(1, 2) + eps2d * torch.eye(2, dtype=means.dtype)
    inv = torch.linalg.inv(cov2)
    jj, ii = torch.meshgrid(torch.arange(width, dtype=means.dtype), torch.arange(height, dtype=means.dtype),
                            indexing="xy")
    pix = torch.stack([jj, ii], -1).reshape(-1, 2) + 0.5
    d = pix[:, None, :] - uv[None]
    m = torch.einsum("pgi,gij,pgj->pg", d, inv, d)
    a = (opacities * torch.exp(-0.5 * m)).clamp(max=0.99)
    a = torch.where(a > 1 / 255, a, torch.zeros_like(a))
    order = torch.argsort(z)
    a, c, zs = a[:, order], colors[order], z[order]
    trans = torch.cumprod(1 - a, 1)
    w = a * torch.cat([torch.ones_like(trans[:, :1]), trans[:, :-1]], 1)
    shape = (height, width)
    return (w @ c).reshape(*shape, 3), w.sum(1).reshape(*shape, 1), (w @ zs).reshape(*shape, 1)


def raw_log_alpha(means, quats, scales, opacities, viewmat, K, width, height):
    """``log(o exp(-d^T Sigma^-1 d / 2))`` of every Gaussian at every pixel, before skip and cap: ``[H*W, G]``."""
    proj = project_gaussians(means, quats, scales, viewmat, K, width, height)
    jj, ii = torch.meshgrid(torch.arange(width, dtype=F64), torch.arange(height, dtype=F64), indexing="xy")
    pix = torch.stack([jj, ii], -1).reshape(-1, 1, 2) + 0.5
    d = pix - proj.means2d.detach()
    a, b, c = proj.conics.detach().unbind(-1)
    return opacities.detach().log() - 0.5 * (a * d[..., 0] ** 2 + 2 * b * d[..., 0] * d[..., 1] + c * d[..., 1] ** 2)


def alpha_margin(means, quats, scales, opacities, viewmat, K, width, height):
    """Smallest distance of any pixel's log-alpha from the skip / cap thresholds (gradcheck premise)."""
    log_alpha = raw_log_alpha(means, quats, scales, opacities, viewmat, K, width, height)
    return min((log_alpha - math.log(1 / 255)).abs().min().item(), (log_alpha - math.log(0.99)).abs().min().item())


# ---------------------------------------------------------------------------------------------
# 1. gradcheck
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sh_degree", [None, 2])
def test_gradcheck(sh_degree):
    width, height, focal = 12, 10, 14.0
    means, quats, scales, opacities, colors = random_scene(4, width, height, focal, seed=6, margin_px=3.0,
                                                           px_scale=(0.9, 1.8), opacity=(0.4, 0.9))
    viewmat, K = camera(width, height, focal)
    # A rotated, translated camera so that viewmat's gradient is not a special case.
    viewmat[:3, :3] = torch.tensor([[1, 0, 0], [0, math.cos(0.1), -math.sin(0.1)],
                                    [0, math.sin(0.1), math.cos(0.1)]], dtype=F64)
    viewmat[:3, 3] = torch.tensor([0.02, -0.03, 0.05], dtype=F64)
    if sh_degree is not None:
        colors = torch.randn(4, 9, 3, dtype=F64, generator=torch.Generator().manual_seed(4)) * 0.3
    # The seed is chosen so that no pixel's log-alpha is within 1e-2 of the skip or cap thresholds,
    # where the image is not differentiable; tile_size=4 makes every Gaussian straddle tiles.
    assert alpha_margin(means, quats, scales, opacities, viewmat, K, width, height) > 1e-2
    inputs = [x.clone().requires_grad_() for x in (means, quats, scales, opacities, colors, viewmat)]

    def render(m, q, s, o, c, v):
        out = rasterize(m, q, s, o, c, v, K, width, height, sh_degree=sh_degree, tile_size=4)
        return out.color, out.alpha, out.depth

    assert rasterize(*inputs[:6], K, width, height, sh_degree=sh_degree, tile_size=4).visible.all()
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_intrinsics_and_background():
    width, height, focal = 8, 8, 10.0
    means, quats, scales, opacities, colors = random_scene(3, width, height, focal, seed=5, margin_px=2.5,
                                                           opacity=(0.4, 0.9))
    viewmat, K = camera(width, height, focal)
    assert alpha_margin(means, quats, scales, opacities, viewmat, K, width, height) > 1e-2
    K = K.clone().requires_grad_()
    background = torch.tensor([0.2, 0.5, 0.9], dtype=F64, requires_grad=True)

    def render(k, bg):
        out = rasterize(means, quats, scales, opacities, colors, viewmat, k, width, height, background=bg,
                        tile_size=4)
        return out.color, out.depth

    assert torch.autograd.gradcheck(render, (K, background), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# 2. Analytic values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_single_isotropic_gaussian_matches_closed_form(dtype):
    width, height, focal, z, s, o = 40, 30, 50.0, 2.0, 0.06, 0.7
    viewmat = torch.eye(4, dtype=dtype)
    cx, cy = 20.3, 12.8  # projected centre (the Gaussian is on the optical axis)
    K = torch.tensor([[focal, 0, cx], [0, focal, cy], [0, 0, 1]], dtype=dtype)
    color = torch.tensor([[0.2, 0.6, 0.9]], dtype=dtype)
    out = rasterize(torch.tensor([[0.0, 0.0, z]], dtype=dtype), torch.tensor([[1.0, 0, 0, 0]], dtype=dtype),
                    torch.full((1, 3), s, dtype=dtype), torch.tensor([o], dtype=dtype), color, viewmat, K, width,
                    height)
    var = (focal * s / z) ** 2 + 0.3  # sigma_px^2 + eps2d
    assert out.radii.item() == math.ceil(3 * math.sqrt(var))
    torch.testing.assert_close(out.means2d, torch.tensor([[cx, cy]], dtype=dtype))
    for row, col in [(12, 20), (12, 21), (15, 18), (10, 22)]:
        d2 = (col + 0.5 - cx) ** 2 + (row + 0.5 - cy) ** 2
        expected = o * math.exp(-0.5 * d2 / var)
        assert expected > 1 / 255
        torch.testing.assert_close(out.alpha[row, col, 0].item(), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.color[row, col], expected * color[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.depth[row, col, 0].item(), expected * z, rtol=1e-5, atol=1e-7)
    # Far from the centre alpha drops below 1/255 and the pixel is empty.
    assert out.alpha[0, 0].item() == 0 and out.alpha[29, 39].item() == 0


def test_projection_clamps_the_jacobian_beyond_the_field_of_view():
    """As 3DGS: x/z is clamped to 1.3 tan(fov/2) (centred principal point) when linearising."""
    viewmat, K = camera(20, 20, 20.0)
    s, z = 0.1, 2.0
    means = torch.tensor([[2.0 * z, 0.2 * z, z]], dtype=F64)  # x/z = 2, beyond the limit 1.3 * 0.5
    proj = project_gaussians(means, torch.tensor([[1.0, 0, 0, 0]], dtype=F64), torch.full((1, 3), s, dtype=F64),
                             viewmat, K, 20, 20)
    f_z = 20.0 / z
    expected = [f_z**2 * s**2 * (1 + 0.65**2) + 0.3, f_z**2 * s**2 * 0.65 * 0.2, f_z**2 * s**2 * (1 + 0.2**2) + 0.3]
    torch.testing.assert_close(proj.cov2d[0], torch.tensor(expected, dtype=F64))
    torch.testing.assert_close(proj.means2d[0], torch.tensor([50.0, 14.0], dtype=F64))
    assert not proj.visible[0] and proj.radii[0] == 0


def test_sh_colour_depends_on_view_direction():
    """Degree 1: only the z-basis coefficient set, so the colour is C0 c0 + C1 z c2 + 0.5 along the view ray."""
    viewmat, K = camera(16, 16, 20.0)
    coeffs = torch.zeros(1, 4, 3, dtype=F64)
    coeffs[0, 0] = torch.tensor([0.1, 0.2, 0.3])
    coeffs[0, 2] = torch.tensor([0.4, -0.2, 0.0])
    args = (torch.tensor([[0.0, 0.0, 2.0]], dtype=F64), torch.tensor([[1.0, 0, 0, 0]], dtype=F64),
            torch.full((1, 3), 0.1, dtype=F64), torch.tensor([0.9], dtype=F64), coeffs, viewmat, K, 16, 16)
    out = rasterize(*args, sh_degree=1)
    expected = _torch_impl.SH_C0 * coeffs[0, 0] + _torch_impl.SH_C1 * coeffs[0, 2] + 0.5
    torch.testing.assert_close(out.color[8, 8] / out.alpha[8, 8], expected)
    # Looking from behind (camera rotated 180 degrees about y, on the other side) flips z.
    back = torch.diag(torch.tensor([-1.0, 1, -1, 1], dtype=F64))
    back[2, 3] = 4.0
    out = rasterize(*args[:5], back, K, 16, 16, sh_degree=1)
    expected = _torch_impl.SH_C0 * coeffs[0, 0] - _torch_impl.SH_C1 * coeffs[0, 2] + 0.5
    torch.testing.assert_close(out.color[8, 8] / out.alpha[8, 8], expected)


def test_sh_basis_is_orthonormal():
    """The 16 basis functions integrate to the identity over the sphere (catches a wrong constant or sign)."""
    n = 20000
    i = torch.arange(n, dtype=F64) + 0.5
    zs = 1 - 2 * i / n
    phi = math.pi * (1 + 5**0.5) * i
    r = (1 - zs**2).sqrt()
    dirs = torch.stack([r * torch.cos(phi), r * torch.sin(phi), zs], -1)
    values = []
    for k in range(16):
        coeffs = torch.zeros(n, 16, 3, dtype=F64)
        coeffs[:, k, 0] = 1
        values.append(eval_sh(3, coeffs, dirs)[:, 0])
    basis = torch.stack(values, -1)
    gram = basis.T @ basis * (4 * math.pi / n)
    torch.testing.assert_close(gram, torch.eye(16, dtype=F64), atol=2e-3, rtol=0)


# ---------------------------------------------------------------------------------------------
# 3. Depth ordering
# ---------------------------------------------------------------------------------------------

def test_nearer_gaussian_dominates_regardless_of_input_order():
    viewmat, K = camera(24, 24, 30.0)
    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0]], dtype=F64)
    quats = torch.tensor([[1.0, 0, 0, 0]] * 2, dtype=F64)
    scales = torch.tensor([[0.2] * 3, [0.3] * 3], dtype=F64)
    opacities = torch.tensor([0.95, 0.95], dtype=F64)
    colors = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]], dtype=F64)  # near: red, far: blue

    def centre(order, ms=means):
        return rasterize(ms[order], quats[order], scales[order], opacities[order], colors[order], viewmat, K,
                         24, 24).color[12, 12]

    red_first, blue_first = centre([0, 1]), centre([1, 0])
    torch.testing.assert_close(red_first, blue_first)
    assert red_first[0] > 0.9 and red_first[2] < 0.1
    # Both footprints have variance (30 * 0.2 / 2)^2 + 0.3 = 9.3 px^2; the pixel centre is (0.5, 0.5) off.
    a = 0.95 * math.exp(-0.5 * 0.5 / 9.3)
    torch.testing.assert_close(red_first, torch.tensor([a, 0, (1 - a) * a], dtype=F64))
    swapped = means.clone()
    swapped[:, 2] = swapped[[1, 0], 2]  # now blue is nearer
    for order in ([0, 1], [1, 0]):
        result = centre(order, swapped)
        assert result[2] > 0.9 and result[0] < 0.1


# ---------------------------------------------------------------------------------------------
# 4. Tiling invariance (and the list chunking)
# ---------------------------------------------------------------------------------------------

def _render_with_grads(scene, viewmat, K, width, height, grads_out, **kwargs):
    inputs = [x.clone().requires_grad_() for x in scene]
    out = rasterize(*inputs, viewmat, K, width, height, **kwargs)
    loss = sum((o * g).sum() for o, g in zip((out.color, out.alpha, out.depth), grads_out))
    loss.backward()
    return [out.color, out.alpha, out.depth] + [x.grad for x in inputs]


def test_tile_size_and_chunking_do_not_change_the_image(monkeypatch):
    width, height, focal = 37, 29, 30.0
    # Centres up to 6 px beyond the border, footprints from 1 to 12 px: Gaussians straddle tiles and edges.
    scene = random_scene(60, width, height, focal, seed=7, margin_px=-6.0, px_scale=(0.5, 4.0), opacity=(0.05, 1.0))
    viewmat, K = camera(width, height, focal)
    g = torch.Generator().manual_seed(8)
    grads_out = [torch.randn(height, width, c, dtype=F64, generator=g) for c in (3, 1, 1)]
    reference = _render_with_grads(scene, viewmat, K, width, height, grads_out, tile_size=16)
    assert reference[1].max() > 0.9
    for tile_size in (4, 8, 64):
        result = _render_with_grads(scene, viewmat, K, width, height, grads_out, tile_size=tile_size)
        for a, b in zip(result, reference):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Tiny work budget: tiles are split along their Gaussian lists, with transmittance carried over.
    monkeypatch.setattr(_torch_impl, "CHUNK_ELEMENTS", 16 * 16 * 3)
    result = _render_with_grads(scene, viewmat, K, width, height, grads_out, tile_size=16)
    for a, b in zip(result, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 5. Dense reference
# ---------------------------------------------------------------------------------------------

def test_matches_dense_reference_forward_and_backward():
    width, height, focal = 32, 24, 28.0
    scene = random_scene(50, width, height, focal, seed=11, margin_px=-2.0, px_scale=(0.6, 3.0), opacity=(0.05, 1.0))
    viewmat, K = camera(width, height, focal)
    viewmat[:3, 3] = torch.tensor([0.05, -0.02, 0.1], dtype=F64)
    # Four fully opaque Gaussians centred near pixel centres, so that alpha hits the 0.99 cap.
    scene[3][:4] = 1.0
    z = scene[0][:4, 2] + viewmat[2, 3]
    uv = torch.tensor([[5.6, 6.45], [12.5, 20.55], [25.4, 3.5], [30.52, 15.5]], dtype=F64)
    scene[0][:4, :2] = (uv - K[:2, 2]) * z[:, None] / focal - viewmat[:2, 3]
    log_alpha = raw_log_alpha(*scene[:4], viewmat, K, width, height)
    assert (log_alpha[:, :4] > math.log(0.99)).any(0).all()
    g = torch.Generator().manual_seed(12)
    grads_out = [torch.randn(height, width, c, dtype=F64, generator=g) for c in (3, 1, 1)]

    inputs = [x.clone().requires_grad_() for x in (*scene, viewmat, K)]
    out = rasterize(*inputs[:7], width, height, tile_size=8)
    assert out.visible.sum() >= 45
    sum((o * gr).sum() for o, gr in zip((out.color, out.alpha, out.depth), grads_out)).backward()

    dense_inputs = [x.clone().requires_grad_() for x in (*scene, viewmat, K)]
    dense = dense_render(*dense_inputs, width, height, keep=out.visible)
    sum((o * gr).sum() for o, gr in zip(dense, grads_out)).backward()

    for name, a, b in zip(("color", "alpha", "depth"), (out.color, out.alpha, out.depth), dense):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    names = ("means", "quats", "scales", "opacities", "colors", "viewmat", "K")
    for name, a, b in zip(names, inputs, dense_inputs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_float32_close_to_float64():
    width, height, focal = 32, 24, 28.0
    scene = random_scene(50, width, height, focal, seed=13, opacity=(0.05, 1.0))
    viewmat, K = camera(width, height, focal)
    out64 = rasterize(*scene, viewmat, K, width, height)
    out32 = rasterize(*(x.float() for x in scene), viewmat.float(), K.float(), width, height)
    assert out32.color.dtype == torch.float32
    for a, b in zip(out32[:3], out64[:3]):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 6. Culling and degenerate inputs
# ---------------------------------------------------------------------------------------------

def test_culled_gaussians_contribute_nothing():
    width, height, focal = 24, 20, 25.0
    viewmat, K = camera(width, height, focal)
    means = torch.tensor([[0.0, 0.0, 2.0],  # visible
                          [0.0, 0.0, -2.0],  # behind the camera
                          [0.0, 0.0, 0.005],  # in front of the camera but before the near plane
                          [50.0, 0.0, 2.0],  # far off-screen
                          [0.1, 0.0, 2.0],  # zero opacity
                          [0.0, 0.0, 2e3]], dtype=F64)  # beyond the far plane
    n = len(means)
    quats = torch.tensor([[1.0, 0, 0, 0]] * n, dtype=F64)
    scales = torch.full((n, 3), 0.2, dtype=F64)
    opacities = torch.tensor([0.8, 0.8, 0.8, 0.8, 0.0, 0.8], dtype=F64)
    colors = torch.rand(n, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    inputs = [x.clone().requires_grad_() for x in (means, quats, scales, opacities, colors)]
    out = rasterize(*inputs, viewmat, K, width, height)
    alone = rasterize(means[:1], quats[:1], scales[:1], opacities[:1], colors[:1], viewmat, K, width, height)
    for a, b in zip(out[:3], alone[:3]):
        torch.testing.assert_close(a.detach(), b)
    assert out.visible.tolist() == [True, False, False, False, True, False]
    assert out.radii[0] > 0 and (out.radii[[1, 2, 3, 5]] == 0).all()
    (out.color.sum() + out.depth.sum() + out.alpha.sum()).backward()
    for x in inputs:
        assert torch.isfinite(x.grad).all()
        assert (x.grad[1:] == 0).all()
    assert (inputs[0].grad[0] != 0).any()


def border_scene(width: int, height: int, focal: float, dtype=F64):
    """Opaque round Gaussians (3.3 px sigma) centred off the image on every side: those at
    ``ceil(3 sigma)`` px beyond an edge have a 3-sigma square that misses the image while their
    1/255 contour still covers pixel centres; those a little beyond ``3.33 sigma`` reach none. The
    image must be large enough (about 70 px) that the projection's Jacobian clamp (1.3 x the half
    field of view) does not act on them, since the dense reference does not clamp."""
    depth, sigma_px = 2.0, 3.3
    edges = [(-1, 0), (1, 0), (0, -1), (0, 1)]  # left, right, top, bottom
    centres = []
    for beyond in (10.0, 12.0):  # ceil(3 * 3.3) = 10 (reached); 12 > 3.33 * 3.3 + 0.5 (not reached)
        for ex, ey in edges:
            u = width / 2 + ex * (width / 2 + beyond)
            v = height / 2 + ey * (height / 2 + beyond) + (3.0 if ex else 0.0)
            centres.append((u, v))
    uv = torch.tensor(centres, dtype=dtype)
    means = torch.cat([(uv - torch.tensor([width / 2, height / 2], dtype=dtype)) * depth / focal,
                       torch.full((len(uv), 1), depth, dtype=dtype)], 1)
    n = len(means)
    quats = torch.tensor([[1.0, 0, 0, 0]] * n, dtype=dtype)
    # Flat along the viewing axis, so that the perspective Jacobian does not stretch them off-axis:
    # exactly sigma_px on screen once eps2d (0.3) is added.
    scales = torch.full((n, 3), math.sqrt(sigma_px**2 - 0.3) * depth / focal, dtype=dtype)
    scales[:, 2] = 0.0
    opacities = torch.full((n,), 0.98, dtype=dtype)
    colors = torch.rand(n, 3, dtype=dtype, generator=torch.Generator().manual_seed(4))
    return means, quats, scales, opacities, colors


def test_border_gaussians_whose_faint_edge_reaches_the_image_are_drawn_exactly():
    """The cull keeps every Gaussian whose 1/255 contour reaches a pixel, so border pixels get the
    exact sum over all Gaussians (a 3-sigma cull would drop up to ~0.005 of an opaque one there)."""
    width, height, focal = 96, 80, 60.0
    scene = border_scene(width, height, focal)
    viewmat, K = camera(width, height, focal)
    proj = project_gaussians(*scene[:3], viewmat, K, width, height)
    u, v = proj.means2d.unbind(-1)
    three_sigma = torch.ceil(3 * proj.cov2d[:, [0, 2]].max(-1).values.sqrt())
    box_meets = (u + three_sigma > 0) & (u - three_sigma < width) & (v + three_sigma > 0) & (v - three_sigma < height)
    assert not box_meets.any()  # a 3-sigma cull would drop every one of them
    reached = raw_log_alpha(*scene[:4], viewmat, K, width, height).max(0).values > math.log(1 / 255)
    assert reached.tolist() == [True] * 4 + [False] * 4

    inputs = [x.clone().requires_grad_() for x in scene]
    out = rasterize(*inputs, viewmat, K, width, height, tile_size=8)
    assert bool(out.visible[:4].all())
    dense_inputs = [x.clone().requires_grad_() for x in scene]
    dense = dense_render(*dense_inputs, viewmat, K, width, height)  # every Gaussian, no cull at all
    assert dense[1].max() > 0.005  # they do reach the image
    g = torch.Generator().manual_seed(5)
    grads_out = [torch.randn(height, width, c, dtype=F64, generator=g) for c in (3, 1, 1)]
    sum((o * gr).sum() for o, gr in zip((out.color, out.alpha, out.depth), grads_out)).backward()
    sum((o * gr).sum() for o, gr in zip(dense, grads_out)).backward()
    for name, a, b in zip(("color", "alpha", "depth"), (out.color, out.alpha, out.depth), dense):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    for name, a, b in zip(("means", "quats", "scales", "opacities", "colors"), inputs, dense_inputs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    assert bool((inputs[0].grad[:4] != 0).any(-1).all())


@pytest.mark.parametrize("eps2d", [0.3, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_degenerate_scales_do_not_produce_nan(eps2d, dtype):
    width, height, focal = 16, 16, 20.0
    viewmat, K = camera(width, height, focal, dtype=dtype)
    # A point-like Gaussian on a pixel centre, a flat disc, and a near-zero quaternion.
    means = torch.tensor([[0.025, 0.025, 2.0], [0.05, 0.0, 2.5]], dtype=dtype, requires_grad=True)
    quats = torch.tensor([[1.0, 0, 0, 0], [0.0, 0.0, 0.0, 1e-30]], dtype=dtype, requires_grad=True)
    scales = torch.tensor([[1e-30, 1e-30, 1e-30], [0.2, 1e-30, 0.1]], dtype=dtype, requires_grad=True)
    opacities = torch.tensor([0.9, 0.9], dtype=dtype, requires_grad=True)
    out = rasterize(means, quats, scales, opacities, torch.ones(2, 3, dtype=dtype), viewmat, K, width, height,
                    eps2d=eps2d)
    (out.color.sum() + out.depth.sum()).backward()
    for x in (*out[:3], means.grad, quats.grad, scales.grad, opacities.grad):
        assert torch.isfinite(x).all()
    if eps2d > 0:  # dilated to splats of variance >= eps2d: both are drawn
        assert out.visible.all() and out.alpha[8, 8, 0] > 0.5
    # (Without dilation a footprint whose determinant rounds to 0 is culled; either way no NaN.)


def test_empty_scene():
    viewmat, K = camera(8, 6, 10.0)
    empty = torch.zeros(0, 3, dtype=F64)
    out = rasterize(empty, torch.zeros(0, 4, dtype=F64), empty, torch.zeros(0, dtype=F64), empty, viewmat, K, 8, 6)
    assert out.color.shape == (6, 8, 3) and out.alpha.abs().sum() == 0 and out.radii.shape == (0,)


# ---------------------------------------------------------------------------------------------
# 7. Background
# ---------------------------------------------------------------------------------------------

def test_background_is_composited_under_the_splats():
    width, height, focal = 20, 16, 20.0
    scene = random_scene(10, width, height, focal, seed=2)
    viewmat, K = camera(width, height, focal)
    background = torch.tensor([0.3, 0.6, 0.1], dtype=F64)
    plain = rasterize(*scene, viewmat, K, width, height)
    over = rasterize(*scene, viewmat, K, width, height, background=background)
    assert 0.05 < plain.alpha.mean() < 0.95
    torch.testing.assert_close(over.color, plain.color + (1 - plain.alpha) * background)
    torch.testing.assert_close(over.alpha, plain.alpha)
    torch.testing.assert_close(over.depth, plain.depth)


# ---------------------------------------------------------------------------------------------
# 8. Validation
# ---------------------------------------------------------------------------------------------

def _good_args():
    scene = random_scene(3, 8, 8, 10.0, seed=0, dtype=torch.float32)
    viewmat, K = camera(8, 8, 10.0, dtype=torch.float32)
    return dict(zip(("means", "quats", "scales", "opacities", "colors", "viewmat", "K"), (*scene, viewmat, K)),
                width=8, height=8)


@pytest.mark.parametrize("change, match", [
    (dict(means=torch.zeros(3, 2)), r"means must have shape \[G, 3\] \(got \[3, 2\]\)"),
    (dict(quats=torch.zeros(2, 4)), r"quats must have shape \[3, 4\] \(got \[2, 4\]\)"),
    (dict(scales=torch.zeros(3, 3, dtype=torch.float64)), r"scales has dtype torch.float64 but means"),
    (dict(opacities=torch.zeros(3, dtype=torch.int64)), r"opacities must be float32 or float64"),
    (dict(colors=torch.zeros(3, 4)), r"colors must have shape \[3, 3\]"),
    (dict(colors=torch.zeros(3, 4, 3), sh_degree=2), r"colors must have shape .*K >= 9 for sh_degree=2"),
    (dict(sh_degree=5), r"sh_degree must be None, 0, 1, 2 or 3"),
    (dict(viewmat=torch.eye(3)), r"viewmat must have shape \[4, 4\]"),
    (dict(K=torch.eye(4)), r"K must have shape \[3, 3\]"),
    (dict(width=0), r"width must be a positive int"),
    (dict(height=7.5), r"height must be a positive int"),
    (dict(background=torch.zeros(4)), r"background must have shape \[3\]"),
    (dict(tile_size=0), r"tile_size must be a positive int"),
    (dict(near=-1.0), r"near < far"),
    (dict(backend="vulkan"), r"rasterize: unknown backend 'vulkan' \(known: auto, torch, cpp, cuda, gsplat; available here: torch"),
    (dict(means=[[0.0, 0.0, 1.0]]), r"means must be a torch.Tensor"),
])
def test_bad_inputs_raise_input_error(change, match):
    args = _good_args()
    args.update(change)
    with pytest.raises(InputError, match=match):
        rasterize(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_raise_input_error():
    args = _good_args()
    args["K"] = args["K"].cuda()
    with pytest.raises(InputError, match="K is on cuda"):
        rasterize(**args)


def test_available_backends():
    assert available_backends()[0] == "torch"
    assert set(available_backends()) <= set(BACKEND_CHOICES) - {"auto"}


# ---------------------------------------------------------------------------------------------
# The dispatcher (gsavatar.render.backends): one meaning per name, for rasterizer and hash grid
# ---------------------------------------------------------------------------------------------

def test_a_backend_name_means_the_same_for_the_rasterizer_and_the_hash_grid():
    """Every name stands for one Backend, which does both the rasterizing and the hash grid: "torch"
    is the reference for both (its hash grid runs the grid's own code), gsplat's hash grid is the
    reference too, "cpp" and "cuda" are the two public builds of our kernels."""
    from gsavatar import kernels
    from gsavatar.model.encoding import HashGrid, HashGridConfig

    assert set(backends._NAMED) == set(BACKEND_CHOICES) - {"auto"}
    assert get_backend("torch", "cpu") is backends.TORCH
    assert backends.TORCH.rasterizer == "torch" and backends.TORCH.build is None
    cpp, cuda, gsplat = (backends._NAMED[n] for n in ("cpp", "cuda", "gsplat"))
    assert (cpp.rasterizer, cpp.build, cpp.device_types) == ("compiled", kernels.BUILDS["cpp"], ("cpu",))
    assert (cuda.rasterizer, cuda.build, cuda.device_types) == ("compiled", kernels.BUILDS["cuda"], ("cuda",))
    assert (gsplat.rasterizer, gsplat.build, gsplat.device_types) == ("gsplat", None, ("cuda",))
    assert all(b.strict and b.name == n for n, b in backends._NAMED.items())  # named: strict
    for name in available_backends():
        b = backends._NAMED[name]
        assert get_backend(name, b.device_types[0]) is b and get_backend(b, b.device_types[0]) is b

    grid = HashGrid(2, HashGridConfig(num_levels=3, log2_table_size=8))
    x = torch.rand(20, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for b in (backends.TORCH, gsplat):
        assert b.encode_hash_grid(x, grid.table, grid.resolutions) is None, b.name  # the reference
        assert torch.equal(grid(x, b), grid(x)), b.name

    means, quats, scales, opacities, colors = random_scene(30, 24, 16, 40.0, seed=3, dtype=torch.float32)
    viewmat, K = camera(24, 16, 40.0, dtype=torch.float32)
    by_name = rasterize(means, quats, scales, opacities, colors, viewmat, K, 24, 16, backend="torch")
    by_object = rasterize(means, quats, scales, opacities, colors, viewmat, K, 24, 16, backend=backends.TORCH)
    assert all(torch.equal(a, b) for a, b in zip(by_name, by_object)) and by_name.alpha.max() > 0.5
    sh = ((colors - 0.5) / _torch_impl.SH_C0)[:, None]  # degree 0: colour = C0 sh + 0.5 = the RGB above
    layer = rasterize_layers([LayerGaussians(means, quats, scales, opacities, sh, 0, viewmat)], K, 24, 16, "torch")[0]
    torch.testing.assert_close(layer.color, by_name.color, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.alpha, by_name.alpha, rtol=0, atol=0)
    assert torch.equal(layer.radii, by_name.radii)


@pytest.mark.parametrize("call", ["get_backend", "check_backend", "rasterize_layers"])
def test_an_unknown_backend_name_is_one_line_input_error(call):
    _, K = camera(8, 8, 10.0, dtype=torch.float32)
    run = {"get_backend": lambda: get_backend("opengl", "cpu"), "check_backend": lambda: check_backend("opengl", "cpu"),
           "rasterize_layers": lambda: rasterize_layers([], K, 8, 8, "opengl")}[call]
    with pytest.raises(InputError) as caught:
        run()
    message = str(caught.value)
    assert "\n" not in message
    assert re.fullmatch(r"unknown backend 'opengl' \(known: auto, torch, cpp, cuda, gsplat; available here: torch(, \w+)*\)",
                        message), message


def test_a_backend_on_the_wrong_device_type_is_input_error():
    """Cheap: nothing is built and no CUDA device is needed to be told."""
    with pytest.raises(InputError, match=r"^backend 'cuda' (cannot run here: |runs on cuda tensors, not cpu)"):
        get_backend("cuda", "cpu")
    with pytest.raises(InputError, match=r"^backend 'cuda' (cannot run here: |runs on cuda tensors, not cpu)"):
        get_backend("cuda", torch.device("cpu"))
    if backends._NAMED["cpp"].missing_requirements() is None:  # else it says why it cannot run at all
        with pytest.raises(InputError, match=r"^backend 'cpp' runs on cpu tensors, not cuda$"):
            get_backend("cpp", "cuda")
        with pytest.raises(InputError, match=r"^backend 'cpp' runs on cpu tensors, not cuda$"):
            get_backend(backends._NAMED["cpp"], "cuda:0")
    with pytest.raises(InputError, match=r"^backend 'torch' runs on cpu or cuda tensors, not meta$"):
        get_backend("torch", "meta")


def test_auto_on_a_gpu_decides_once_per_device(monkeypatch):
    """On a CUDA device "auto" asks for our kernels once per device: here they cannot run (no GPU
    here, or a self-check made to fail), so one RuntimeWarning, then the same fallback every time,
    not strict (its hash grid leaves what the kernels cannot take to the reference)."""
    monkeypatch.setattr(backends, "_auto_choice", {})
    monkeypatch.setattr(backends, "self_check", lambda backend, device: "the self-check failed (test)")
    why = backends._NAMED["cuda"].missing_requirements() or "the self-check failed (test)"
    gsplat_runs = backends._NAMED["gsplat"].missing_requirements() is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = get_backend("auto", "cuda:0")
        again = get_backend("auto", torch.device("cuda", 0))
        other = get_backend("auto", "cuda:1")  # another device decides for itself
    assert [(w.category, str(w.message)) for w in caught] == [(
        RuntimeWarning, f"gsavatar: not using our CUDA kernels ({why}); rendering with "
                        f"{'gsplat' if gsplat_runs else 'the PyTorch reference'} instead")] * 2
    assert first is again and first == other
    assert first == dataclasses.replace(backends._NAMED["gsplat"] if gsplat_runs else backends.TORCH, strict=False)


def test_auto_backend_on_cpu_is_our_cpu_rasterizer_and_the_reference_for_what_it_cannot_take():
    """On CPU tensors "auto" is the CPU rasterizer (it builds where it can, after the self-check):
    float32 renders agree with the reference; float64 inputs and a camera that needs gradients go
    to the reference itself (the same bits)."""
    from gsavatar import kernels

    means, quats, scales, opacities, colors = random_scene(30, 24, 16, 40.0, seed=3, dtype=torch.float32)
    viewmat, K = camera(24, 16, 40.0, dtype=torch.float32)
    chosen = get_backend("auto", "cpu")
    if kernels.missing_requirements("cpp") is None:
        assert chosen == dataclasses.replace(backends._NAMED["cpp"], strict=False)
    auto = rasterize(means, quats, scales, opacities, colors, viewmat, K, 24, 16, backend="auto")
    ref = rasterize(means, quats, scales, opacities, colors, viewmat, K, 24, 16, backend="torch")
    torch.testing.assert_close(auto.color, ref.color, rtol=0, atol=1e-5)
    assert auto.alpha.max() > 0.5
    wide = [t.double() for t in (means, quats, scales, opacities, colors, viewmat, K)]
    assert all(torch.equal(a, b) for a, b in zip(rasterize(*wide, 24, 16, backend="auto"),
                                                  rasterize(*wide, 24, 16, backend="torch")))
    moving = viewmat.clone().requires_grad_(True)
    assert all(torch.equal(a, b) for a, b in zip(
        rasterize(means, quats, scales, opacities, colors, moving, K, 24, 16, backend="auto"),
        rasterize(means, quats, scales, opacities, colors, moving, K, 24, 16, backend="torch")))


# ---------------------------------------------------------------------------------------------
# 9. Screen-space gradients for densification
# ---------------------------------------------------------------------------------------------

def test_means2d_retain_grad():
    width, height, focal = 24, 20, 25.0
    means, quats, scales, opacities, colors = random_scene(8, width, height, focal, seed=21, margin_px=2.0)
    means[-1, 2] = -1.0  # behind the camera
    means[-2, 0] = 40.0  # off-screen
    viewmat, K = camera(width, height, focal)
    means.requires_grad_()
    out = rasterize(means, quats, scales, opacities, colors, viewmat, K, width, height)
    assert out.means2d.requires_grad and not out.means2d.is_leaf
    out.means2d.retain_grad()
    weights = torch.rand(height, width, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    (out.color * weights).sum().backward()
    grad = out.means2d.grad
    assert out.visible.tolist() == [True] * 6 + [False, False]
    assert (grad[:6].norm(dim=-1) > 0).all()
    assert (grad[6:] == 0).all()


# ---------------------------------------------------------------------------------------------
# CUDA (where there is one): the same maths on the device
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    width, height, focal = 40, 30, 30.0
    scene = random_scene(80, width, height, focal, seed=4, margin_px=-3.0)
    viewmat, K = camera(width, height, focal)
    g = torch.Generator().manual_seed(5)
    grads_out = [torch.randn(height, width, c, dtype=F64, generator=g) for c in (3, 1, 1)]
    cpu = _render_with_grads(scene, viewmat, K, width, height, grads_out)
    cuda = _render_with_grads([x.cuda() for x in scene], viewmat.cuda(), K.cuda(), width, height,
                              [x.cuda() for x in grads_out])
    for a, b in zip(cuda, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-10)
