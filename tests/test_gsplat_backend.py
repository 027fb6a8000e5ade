"""The "gsplat" rasterizer backend (``gsavatar.render._gsplat``) against the PyTorch reference.

gsplat's CUDA ops need a GPU, but the adapter takes its five stage functions as an argument. On
CPU it runs on gsplat's own pure-PyTorch twins of projection, SH, tile binning and offsets, plus a
small compositor written here to gsplat's per-pixel rule (its PyTorch compositor calls a CUDA op).
That checks everything the adapter decides: the camera and pixel conventions gsplat receives, SH
and depth as channels, the background, the means2d tensor whose gradient densification reads,
and the radii and visibility it reports. On a GPU the same comparison runs on gsplat's CUDA ops.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import avatar_frame_with_grads, driven_avatar

from gsavatar.errors import InputError
from gsavatar.render import _gsplat, check_backend, rasterize
from gsavatar.render.synthetic import random_scene

_NO_GSPLAT = None if importlib.util.find_spec("gsplat") else "gsplat is not installed (pip install gsplat==1.5.3 packaging)"
needs_gsplat = pytest.mark.skipif(_NO_GSPLAT is not None, reason=f"{_NO_GSPLAT}")


def _twin_rasterize_to_pixels(means2d, conics, colors, opacities, width, height, tile_size, isect_offsets,
                              flatten_ids, backgrounds=None):
    """gsplat's ``rasterize_to_pixels`` for one image, in PyTorch: each tile's Gaussians in the order
    binning gave them, alpha = min(0.999, o exp(-sigma)), skipped below 1/255, and a pixel stops
    before the Gaussian that would take its transmittance to 1e-4 or below."""
    assert isect_offsets.shape[0] == 1 and means2d.shape[0] == 1
    n = means2d.shape[1]
    tiles_y, tiles_x = isect_offsets.shape[1:]
    starts = isect_offsets.flatten().long().tolist()
    ends = starts[1:] + [flatten_ids.numel()]
    channels = colors.shape[-1]
    rows = []
    for ty in range(tiles_y):
        row = []
        for tx in range(tiles_x):
            t = ty * tiles_x + tx
            ids = flatten_ids[starts[t]:ends[t]].long() % n
            ys = torch.arange(ty * tile_size, min((ty + 1) * tile_size, height), dtype=means2d.dtype)
            xs = torch.arange(tx * tile_size, min((tx + 1) * tile_size, width), dtype=means2d.dtype)
            pix = torch.stack(torch.meshgrid(xs + 0.5, ys + 0.5, indexing="xy"), -1).reshape(-1, 1, 2)
            d = means2d[0, ids][None] - pix  # [P, M, 2]
            a, b, c = conics[0, ids].unbind(-1)
            sigma = 0.5 * (a * d[..., 0] ** 2 + c * d[..., 1] ** 2) + b * d[..., 0] * d[..., 1]
            alpha = torch.clamp_max(opacities[0, ids] * torch.exp(-sigma), 0.999)
            alpha = torch.where((sigma >= 0) & (alpha >= 1.0 / 255.0), alpha, torch.zeros_like(alpha))
            kept = torch.cumprod((torch.cumprod(1 - alpha, 1) > 1e-4).to(alpha.dtype), 1)
            alpha = alpha * kept
            before = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
            weights = alpha * before  # [P, M]
            image = weights @ colors[0, ids]
            acc = weights.sum(1, keepdim=True)
            if backgrounds is not None:
                image = image + (1 - acc) * backgrounds[0]
            row.append(torch.cat([image, acc], -1).reshape(len(ys), len(xs), channels + 1))
        rows.append(torch.cat(row, 1))
    out = torch.cat(rows, 0)[None]
    return out[..., :channels], out[..., channels:]


def _cpu_twin_ops() -> _gsplat.GsplatOps:
    """gsplat's PyTorch twins behind the signatures of its CUDA ops (gsplat 1.5.3)."""
    from gsplat.cuda import _torch_impl as twin

    def projection(means, covars, quats, scales, viewmats, Ks, width, height, *, eps2d, near_plane, far_plane,
                   packed, opacities):
        assert covars is None and not packed and opacities.shape == means.shape[:1]
        covars, _ = twin._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
        return twin._fully_fused_projection(means, covars, viewmats, Ks, width, height, eps2d, near_plane, far_plane)

    def spherical_harmonics(degree, dirs, coeffs, masks=None):
        rgb = twin._spherical_harmonics(degree, dirs, coeffs)
        return rgb if masks is None else rgb * masks[:, None]

    def isect_tiles(means2d, radii, depths, tile_size, tiles_x, tiles_y, *, packed, n_images):
        assert not packed and n_images == means2d.shape[0]
        return twin._isect_tiles(means2d, radii, depths, tile_size, tiles_x, tiles_y)

    return _gsplat.GsplatOps(projection, spherical_harmonics, isect_tiles, twin._isect_offset_encode,
                             _twin_rasterize_to_pixels)


def _render(backend, scene, width, height, sh_degree, background, grads_out, ops=None):
    leaves = [t.requires_grad_(i < 5) for i, t in enumerate(t.clone() for t in scene)]
    kwargs = dict(sh_degree=sh_degree, background=background, near=0.01, far=1e3, eps2d=0.3, tile_size=16)
    if backend == "gsplat":
        out = _gsplat.rasterize_gsplat(*leaves, width, height, ops=ops, **kwargs)
    else:
        out = rasterize(*leaves, width, height, backend="torch", **kwargs)
    color, alpha, depth, means2d, radii, visible = out
    means2d.retain_grad()
    g_color, g_alpha, g_depth = grads_out
    ((color * g_color).sum() + (alpha * g_alpha).sum() + (depth * g_depth).sum()).backward()
    return out, [t.grad for t in leaves[:5]] + [means2d.grad]


CASES = [
    # (Gaussians, width, height, sh_degree, background): one tile row and a ragged edge; SH 2 with
    # a background; Gaussians straddling tiles and the border in all of them.
    (60, 40, 24, None, False),
    (150, 64, 48, 2, True),
]


def _comparable_scene(n, width, height, sh_degree, seed):
    """A random scene, Gaussians straddling the border and centred just off the image included
    (both rasterizers keep every Gaussian whose 1/255 contour reaches the image). Opacities stay
    below 0.99, so the alpha caps (gsplat 0.999, ours 0.99) never act."""
    scene = random_scene(n, width, height, seed=seed, sh=sh_degree is not None, hard_cases=False)
    return scene._replace(opacities=scene.opacities.clamp_max(0.9))


def _compare(device, dtype, ops, n, width, height, sh_degree, with_background, seed, against="torch"):
    """The backend on ``device`` in ``dtype`` against, in float64 on CPU, the reference
    (``against="torch"``) or the adapter on gsplat's PyTorch twins (``"twins"``: gsplat's own rules,
    for scenes crowded enough that its early stop matters)."""
    scene = _comparable_scene(n, width, height, sh_degree, seed).to(torch.float64)
    background = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64) if with_background else None
    g = torch.Generator().manual_seed(seed)
    grads_out = [torch.randn(height, width, 3, generator=g), torch.randn(height, width, 1, generator=g),
                 0.1 * torch.randn(height, width, 1, generator=g)]
    ref, ref_grads = _render("torch" if against == "torch" else "gsplat", scene, width, height, sh_degree, background,
                             [x.double() for x in grads_out], None if against == "torch" else _cpu_twin_ops())
    there = dict(device=device, dtype=dtype)
    out, grads = _render("gsplat", scene.to(**there), width, height, sh_degree,
                         None if background is None else background.to(**there), [x.to(**there) for x in grads_out],
                         ops)
    out = [t.detach().cpu().to(torch.float64) if t.is_floating_point() else t.cpu() for t in out]
    grads = [None if t is None else t.cpu().to(torch.float64) for t in grads]
    # gsplat draws a subset of ours: it also culls faint Gaussians whose 1/255 contour misses the
    # image (those contribute nothing to ours either; the images below show it).
    drawn = out[5]
    assert int(drawn.sum()) > 0.5 * len(drawn) and bool((drawn <= ref[5]).all())
    assert out[4].dtype == torch.long and bool(((out[4] > 0) == drawn).all())
    tol = 1e-10 if dtype == torch.float64 else 1e-3  # float64: the same arithmetic in another order
    torch.testing.assert_close(out[3][drawn], ref[3][drawn].detach(), rtol=0, atol=tol)
    for name, i in (("color", 0), ("alpha", 1), ("depth", 2)):
        diff = (out[i] - ref[i].detach()).abs()
        assert diff.max() < tol * (3 if name == "depth" else 1), f"{name}: max difference {diff.max():.2e}"
    for name, got, want in zip(("means", "quats", "scales", "opacities", "colors", "means2d"), grads, ref_grads):
        assert got is not None, f"no gradient for {name}"
        got, want = got[drawn], want[drawn]  # gsplat gives no gradient to what it did not draw
        err = (got - want).norm() / want.norm().clamp_min(1e-12)
        assert err < 2 * tol, f"{name} gradient: relative error {err:.2e}"


@needs_gsplat
@pytest.mark.parametrize("n, width, height, sh_degree, with_background", CASES)
def test_adapter_on_gsplat_twins_matches_reference(n, width, height, sh_degree, with_background):
    _compare("cpu", torch.float64, _cpu_twin_ops(), n, width, height, sh_degree, with_background, seed=n)


@needs_gsplat
def test_twins_stop_where_gsplat_stops():
    """In a crowded frame gsplat stops a pixel before the Gaussian that takes its transmittance to
    1e-4 or below, and the reference composites everything: they differ by what was left out."""
    with pytest.raises(AssertionError, match="color: max difference"):
        _compare("cpu", torch.float64, _cpu_twin_ops(), *CROWDED, seed=1)


CROWDED = (3000, 128, 96, 3, True)

_NO_GSPLAT_CUDA = _gsplat.missing_requirements()
needs_gsplat_cuda = pytest.mark.skipif(_NO_GSPLAT_CUDA is not None, reason=f"{_NO_GSPLAT_CUDA}")


@needs_gsplat_cuda
@pytest.mark.parametrize("n, width, height, sh_degree, with_background", CASES)
def test_gsplat_backend_on_cuda_matches_reference(n, width, height, sh_degree, with_background):
    """rasterize(backend="gsplat") on gsplat's CUDA ops (float32) against the reference."""
    _compare("cuda", torch.float32, None, n, width, height, sh_degree, with_background, seed=n)


@needs_gsplat_cuda
def test_gsplat_backend_on_cuda_matches_its_twins_when_crowded():
    _compare("cuda", torch.float32, None, *CROWDED, seed=1, against="twins")


def test_unavailable_gsplat_backend_says_why():
    scene = random_scene(10, 16, 16, seed=0)
    if _gsplat.missing_requirements() is not None:
        with pytest.raises(InputError, match=r"backend 'gsplat' cannot run here: gsplat (is not installed|rasterizes "
                                             r"on CUDA devices only)"):
            rasterize(*scene, 16, 16, backend="gsplat")
    else:  # a GPU machine with gsplat: CPU tensors are the mistake
        with pytest.raises(InputError, match=r"backend 'gsplat' runs on cuda tensors, not cpu"):
            rasterize(*scene, 16, 16, backend="gsplat")


def test_check_backend_refuses_before_any_work():
    with pytest.raises(InputError, match=r"unknown backend 'opengl' \(known: auto, torch, cpp, cuda, gsplat; "
                                         r"available here: torch"):
        check_backend("opengl", "cpu")
    assert check_backend("auto", "cpu") == "auto" and check_backend("torch", "cpu") == "torch"
    with pytest.raises(InputError, match=r"backend 'gsplat' (cannot run here|runs on cuda tensors, not cpu)"):
        check_backend("gsplat", "cpu")


@pytest.fixture
def gsplat_backend_on(monkeypatch):
    """``device -> calls``: makes ``backend="gsplat"`` run there: gsplat's CUDA ops on CUDA, the
    PyTorch twins on CPU (registered in place of the CUDA ops for the test's duration); ``calls``
    (CPU only) grows by one per image the adapter renders on the twins."""
    import dataclasses

    from gsavatar.render import backends

    def use(device):
        calls = []
        if device == "cpu":
            twins, adapter = _cpu_twin_ops(), _gsplat.rasterize_gsplat

            def on_twins(*args, **kwargs):
                calls.append(args[0].device)
                return adapter(*args, ops=twins, **kwargs)

            monkeypatch.setattr(_gsplat, "missing_requirements", lambda: None)
            monkeypatch.setattr(_gsplat, "rasterize_gsplat", on_twins)
            monkeypatch.setitem(backends._NAMED, "gsplat",
                                dataclasses.replace(backends._NAMED["gsplat"], device_types=("cpu",)))
        return calls

    return use


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=needs_gsplat),
    pytest.param("cuda", marks=needs_gsplat_cuda),
])
def test_trained_avatar_trains_alike_through_gsplat(avatar_file, gsplat_backend_on, device):
    """A whole avatar frame (deformation nets -> face, mouth and torso branches -> composite) through
    the gsplat backend against the reference: the image, the gradients training follows, and the
    screen-space gradients densification reads. A trained avatar has opaque Gaussians, where the
    alpha caps differ (gsplat 0.999, ours 0.99), so the image is compared with a margin and the
    gradients by direction (cpu-tiny on the twins: cosines above 0.99999)."""
    on_twins = gsplat_backend_on(device)
    avatar, inputs = driven_avatar(avatar_file, device)
    results = avatar_frame_with_grads(avatar, inputs, ("torch", "gsplat"))
    if device == "cpu":  # the three branches went through the adapter
        assert len(on_twins) == 3
    (ref, ref_grads), (ours, our_grads) = results["torch"], results["gsplat"]
    assert set(ours.branches) == {"face", "mouth", "torso"}
    diff = (ours.image - ref.image).abs()
    # cpu-tiny avatar on the twins: mean 4e-6, max 9e-4. A larger avatar has more saturated pixels.
    assert diff.mean() < 1e-3 and diff.max() < 0.05, (float(diff.mean()), float(diff.max()))
    assert set(our_grads) == set(ref_grads) and len(ref_grads) > 10

    def cosine(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))

    for name, g in ref_grads.items():
        if g.norm() > 1e-6 * max(r.norm() for r in ref_grads.values()):
            assert cosine(our_grads[name], g) > 0.99, f"{name}: gradient cosine {cosine(our_grads[name], g):.4f}"
    for b, r in ref.branches.items():
        drawn = ours.branches[b].radii > 0
        assert cosine(ours.branches[b].means2d.grad[drawn], r.means2d.grad[drawn]) > 0.99, b
