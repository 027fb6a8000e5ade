"""Our rasterizer kernels (cuda/) against the PyTorch reference, forward and backward.

The ``"cpp"`` backend is our CPU rasterizer (cuda/raster_host.cpp: the kernels' projection, its own
SIMD compositing); the ``"emulated"`` backend (the tests' own, ``tests/emulated.py``) runs the CUDA
kernels themselves on a CPU emulator of the CUDA thread model, so on a CPU machine their arithmetic
and thread logic (blocks, shared-memory batches, barriers, warp reductions, atomics, the sort) are
checked. On a
GPU the same tests run the CUDA build. The reference runs in float64, so the tolerances measure the kernels' float32
rounding only. gsplat is a further cross-check where it is installed (GPU only).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import emulated
import pytest
import torch
from conftest import avatar_frame_with_grads, driven_avatar

from gsavatar import kernels
from gsavatar.errors import InputError
from gsavatar.render import _compiled, backends, rasterize
from gsavatar.render.synthetic import random_scene

_CPU_MISSING = kernels.missing_requirements("cpp")
_CUDA_MISSING = kernels.missing_requirements("cuda")
# On a GPU machine the "cuda" cases run the same kernels for real; the emulated ones are for CPU machines.
_EMULATED_MISSING = emulated.missing_requirements()

BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(_CPU_MISSING is not None, reason=f"CPU rasterizer: {_CPU_MISSING}")),
    pytest.param("cuda", marks=pytest.mark.skipif(_CUDA_MISSING is not None, reason=f"CUDA kernels: {_CUDA_MISSING}")),
    # The CUDA kernels themselves, run by the CPU emulator of the CUDA thread model.
    pytest.param("emulated", marks=pytest.mark.skipif(_EMULATED_MISSING is not None,
                                                      reason=f"emulated CUDA kernels: {_EMULATED_MISSING}")),
]
DEVICE = {"cpp": "cpu", "cuda": "cuda", "emulated": "cpu"}
BACKEND = {"cpp": backends._NAMED["cpp"], "cuda": backends._NAMED["cuda"], "emulated": emulated.BACKEND}
"""The :class:`~gsavatar.render.Backend` of each case (the emulated one is the tests' own)."""


def _entry(backend: str):
    """What a caller passes as ``backend=``: the public name, or the tests' own Backend object."""
    return emulated.BACKEND if backend == "emulated" else backend


def _ours(backend: str) -> tuple:
    """``(extension, backend name, device type)``: how ``_compiled``'s functions are called for it."""
    b = BACKEND[backend]
    return b.extension(), b.name, b.build.device_type


def _render(backend, scene, width, height, sh_degree, grads_out, dtype, device, **kwargs):
    """Render with gradients; returns the outputs and the gradients of the five Gaussian inputs and means2d."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_(i < 5) for i, t in enumerate(scene)]
    if backend == "torch":
        out = rasterize(*leaves, width, height, sh_degree=sh_degree, backend="torch", tile_size=8)
    else:
        out = _compiled.rasterize_image(*_ours(backend), *leaves, width, height, sh_degree=sh_degree,
                                        background=None, near=0.01, far=1e3, eps2d=0.3, **kwargs)
    color, alpha, depth, means2d, radii, visible = out
    means2d.retain_grad()
    g_color, g_alpha, g_depth = (g.to(device=device, dtype=dtype) for g in grads_out)
    ((color * g_color).sum() + (alpha * g_alpha).sum() + (depth * g_depth).sum()).backward()
    grads = [t.grad for t in leaves[:5]] + [means2d.grad]
    return [color, alpha, depth, means2d, radii, visible], grads


def _random_grads(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(height, width, 3, generator=g), torch.randn(height, width, 1, generator=g),
            0.1 * torch.randn(height, width, 1, generator=g))


CASES = [
    # (Gaussians, width, height, sh_degree): one tile; sizes that are not multiples of 16; SH 0..3;
    # a crowded frame where many Gaussians overlap every pixel.
    (40, 16, 16, None),
    (300, 37, 29, 0),
    (500, 70, 53, 1),
    (800, 96, 64, 2),
    (600, 64, 80, 3),
    (3000, 128, 128, None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, width, height, sh_degree", CASES)
def test_matches_reference_forward_and_backward(backend, n, width, height, sh_degree):
    scene = random_scene(n, width, height, seed=n + width, sh=sh_degree is not None)
    grads_out = _random_grads(width, height, seed=n)
    ref, ref_grads = _render("torch", scene, width, height, sh_degree, grads_out, torch.float64, "cpu")
    # The reference's own float32 error sets the scale of what float32 rounding can do on this scene.
    ref32, ref32_grads = _render("torch", scene, width, height, sh_degree, grads_out, torch.float32, "cpu")
    out, grads = _render(backend, scene, width, height, sh_degree, grads_out, torch.float32, DEVICE[backend],
                         min_transmittance=0.0)
    visible = ref[5]
    assert 0 < int(visible.sum()) < n  # the hard cases culled some, most are drawn
    assert torch.equal(out[5].cpu(), visible)
    assert torch.equal(out[4].cpu(), ref[4])

    def check(name, a, b, b32, floor):
        # floor: relative to the largest value (observed 1e-7 .. 8e-6); or 4x the float32 reference's error.
        tol = max(floor * max(1.0 if name in ("color", "alpha", "depth", "means2d") else 0.0, b.abs().max().item()),
                  4 * (b32.double() - b).abs().max().item())
        torch.testing.assert_close(a.cpu().double(), b, rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")

    for name, i in (("color", 0), ("alpha", 1), ("depth", 2)):
        check(name, out[i], ref[i], ref32[i], 4e-6)
    check("means2d", out[3][visible], ref[3][visible], ref32[3][visible], 4e-6)
    names = ("means", "quats", "scales", "opacities", "colors", "means2d")
    for name, a, b, b32 in zip(names, grads, ref_grads, ref32_grads):
        if name == "means2d":
            a, b, b32 = a[visible.to(a.device)], b[visible], b32[visible]
        assert b.abs().max() > 0, name
        check(f"grad {name}", a, b, b32, 5e-5)
    # Culled Gaussians get exactly zero gradients.
    assert (grads[0][~visible.to(grads[0].device)] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_border_gaussians_are_culled_as_by_the_reference(backend):
    """Gaussians centred off the image whose 3-sigma square misses it but whose 1/255 contour
    reaches it are drawn, those beyond 3.33 sigma are culled: the same set and image as the reference."""
    from test_rasterize import border_scene, camera

    width, height, focal = 96, 80, 60.0
    scene = [t.float() for t in (*border_scene(width, height, focal), *camera(width, height, focal))]
    grads_out = _random_grads(width, height, seed=7)
    ref, ref_grads = _render("torch", scene, width, height, None, grads_out, torch.float64, "cpu")
    out, grads = _render(backend, scene, width, height, None, grads_out, torch.float32, DEVICE[backend],
                         min_transmittance=0.0)
    assert ref[5].tolist() == [True] * 4 + [False] * 4
    assert torch.equal(out[5].cpu(), ref[5]) and torch.equal(out[4].cpu(), ref[4])
    assert ref[1].max() > 0.005
    for i in range(3):
        torch.testing.assert_close(out[i].cpu().double(), ref[i], rtol=0, atol=1e-6)
    for name, a, b in zip(("means", "quats", "scales", "opacities", "colors"), grads, ref_grads):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_early_stop_leaves_out_less_than_its_threshold(backend):
    """With the default min_transmittance (1e-4) the image differs from the full composite by less than that."""
    width = height = 64
    scene = random_scene(4000, width, height, seed=3, pixel_size=10.0)  # deep stacks: most pixels stop early
    grads_out = _random_grads(width, height, seed=4)
    full, _ = _render(backend, scene, width, height, None, grads_out, torch.float32, DEVICE[backend],
                      min_transmittance=0.0)
    early, grads = _render(backend, scene, width, height, None, grads_out, torch.float32, DEVICE[backend])
    stopped = (1 - full[1]) < 1e-4
    assert stopped.float().mean() > 0.3  # the test exercises the early stop
    assert (early[1] - full[1]).abs().max() < 1e-4 + 1e-6
    assert (early[0] - full[0]).abs().max() < 1e-4 * scene.colors.max() + 1e-6
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_images_equal_separate_renders(backend):
    """Two Gaussian sets seen by two cameras in one call (the avatar's face and mouth) = two calls."""
    device = DEVICE[backend]
    ours = _ours(backend)
    width, height = 48, 40
    scenes = [random_scene(400, width, height, seed=s, sh=True) for s in (10, 11)]
    scenes[1] = scenes[1]._replace(viewmat=torch.eye(4))
    sh_degree = 2
    leaves = [[t.to(device).requires_grad_(i < 5) for i, t in enumerate(sc)] for sc in scenes]
    cat = [torch.cat([leaves[0][i], leaves[1][i]]) for i in range(5)]
    ids = torch.cat([torch.zeros(400), torch.ones(400)]).int().to(device)
    viewmats = torch.stack([leaves[0][5], leaves[1][5]])
    Ks = torch.stack([leaves[0][6], leaves[1][6]])
    color, alpha, depth, *_ = _compiled.rasterize_batch(*ours, *cat, ids, viewmats, Ks, width, height,
                                                        sh_degree=sh_degree)
    weights = torch.randn(2, height, width, 3, device=device)
    (color * weights).sum().backward()
    batched_grads = [t.grad.clone() for t in leaves[0][:5] + leaves[1][:5]]
    for t in leaves[0][:5] + leaves[1][:5]:
        t.grad = None
    for k in range(2):
        c1, a1, d1, *_ = _compiled.rasterize_image(*ours, *leaves[k], width, height, sh_degree=sh_degree,
                                                   background=None, near=0.01, far=1e3, eps2d=0.3)
        torch.testing.assert_close(color[k], c1, rtol=0, atol=1e-6)
        torch.testing.assert_close(alpha[k], a1, rtol=0, atol=1e-6)
        torch.testing.assert_close(depth[k], d1, rtol=0, atol=1e-5)
        (c1 * weights[k]).sum().backward()
    separate = [t.grad for t in leaves[0][:5] + leaves[1][:5]]
    for a, b in zip(batched_grads, separate):
        # The CUDA backward sums with float atomics in whatever order the threads arrive (the
        # emulator shuffles it too), so the two runs differ by summation order: ~1e-5 of the largest.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_background_and_entry_point(backend):
    """``rasterize(..., backend=...)`` validates and composites the background like the reference."""
    width, height = 32, 24
    scene = random_scene(200, width, height, seed=5)
    bg = torch.tensor([0.2, 0.5, 0.9])
    ref = rasterize(*scene, width, height, background=bg, backend="torch")
    out = rasterize(*scene.to(DEVICE[backend]), width, height, background=bg.to(DEVICE[backend]),
                    backend=_entry(backend))
    # Default early stop: within 1e-4 of the full composite.
    torch.testing.assert_close(out.color.cpu(), ref.color, rtol=0, atol=2e-4)
    torch.testing.assert_close(out.alpha.cpu(), ref.alpha, rtol=0, atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_backends_reject_what_they_do_not_support(backend):
    device = DEVICE[backend]
    scene = random_scene(20, 16, 16, seed=1).to(device)
    with pytest.raises(InputError, match="float32 only"):
        rasterize(*scene.to(torch.float64), 16, 16, backend=_entry(backend))
    viewmat = scene.viewmat.clone().requires_grad_(True)
    with pytest.raises(InputError, match="camera as a constant"):
        rasterize(*scene[:5], viewmat, scene.K, 16, 16, backend=_entry(backend))


@pytest.mark.skipif(_CPU_MISSING is not None, reason=f"CPU rasterizer: {_CPU_MISSING}")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_twin_backend_rejects_cuda_tensors():
    scene = random_scene(20, 16, 16, seed=1).to("cuda")
    with pytest.raises(InputError, match="backend .cpp. runs on cpu tensors, not cuda"):
        rasterize(*scene, 16, 16, backend="cpp")


def _gsplat_missing() -> str | None:
    if _CUDA_MISSING is not None:
        return f"CUDA kernels: {_CUDA_MISSING}"
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return "gsplat is not installed"
    return None


@pytest.mark.skipif(_gsplat_missing() is not None, reason=f"{_gsplat_missing()}")
def test_cuda_agrees_with_gsplat():
    """gsplat's rasterization on the same scene. It caps alpha at 0.999 (ours 0.99) and bins a 3-sigma
    square (ours: wherever alpha can exceed 1/255), so opacities stay below 0.99 and the comparison is
    by mean and by a loose maximum."""
    import gsplat

    width, height = 96, 64
    scene = random_scene(2000, width, height, seed=8, hard_cases=False).to("cuda")
    scene = scene._replace(opacities=scene.opacities.clamp_max(0.9))
    ours = rasterize(*scene, width, height, backend="cuda")
    colors, alphas, _ = gsplat.rasterization(scene.means, scene.quats, scene.scales, scene.opacities, scene.colors,
                                             scene.viewmat[None], scene.K[None], width, height, near_plane=0.01,
                                             far_plane=1e3, eps2d=0.3, packed=False)
    diff = (ours.color - colors[0]).abs()
    assert diff.mean() < 2e-3 and diff.max() < 0.05
    assert (ours.alpha - alphas[0]).abs().mean() < 2e-3


def _in_float64(avatar, inputs):
    """A float64 copy of ``avatar`` and ``inputs`` (the reference backend runs in any float dtype)."""
    import copy

    def wider(value):
        return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    return copy.deepcopy(avatar).double(), dataclasses.replace(
        inputs, **{f.name: wider(getattr(inputs, f.name)) for f in dataclasses.fields(inputs)})


def _summation_order_bound(frame) -> float:
    """How far (relative) a float32 gradient may move when the rasterizer sums in another order.

    Each pixel's backward pass walks its Gaussians back to front and divides the transmittance back
    out; a rounding error (unit roundoff ``u`` = 2^-24) made there is magnified by up to
    1 / (1 - alpha_max) = 100. A gradient then sums such per-pixel terms over the frame's G Gaussians;
    rounding errors of different summation orders add as a random walk, hence sqrt(G) rather than G
    (the worst case, G u, assumes every rounding goes the same way)."""
    from gsavatar.render._torch_impl import ALPHA_MAX

    unit_roundoff = 2.0**-24
    gaussians = sum(b.radii.shape[0] for b in frame.branches.values())
    return unit_roundoff / (1.0 - ALPHA_MAX) * gaussians**0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("min_transmittance, early_stop_allowance", [(0.0, 0.0), (_compiled.MIN_TRANSMITTANCE, 1e-2)])
def test_trained_avatar_renders_the_same_through_the_kernels(avatar_file, monkeypatch, backend, min_transmittance,
                                                              early_stop_allowance):
    """The whole frame (deformation nets -> all three branches in one kernel pass -> composite) through
    the kernels matches the reference backend, and so do the training gradients, the screen-space
    gradients the densification reads and the radii.

    This compares summation orders: both backends run in float32 and add the same terms in different
    orders, so neither is exact. The truth is the reference run in float64; each float32 gradient's
    error against it must stay within twice the float32 reference's own error (the part the two share:
    the deformation nets run the same torch code, so a badly conditioned gradient is off in both)
    plus :func:`_summation_order_bound` (the part the kernel's order adds). With the default early
    stop, Gaussians hidden behind an opaque layer lose their last tiny gradients by design: hence the
    ``early_stop_allowance``."""
    avatar, inputs = driven_avatar(avatar_file, DEVICE[backend])
    monkeypatch.setattr(_compiled, "MIN_TRANSMITTANCE", min_transmittance)  # the default the frame gets
    results = avatar_frame_with_grads(avatar, inputs, ("torch", _entry(backend)))
    (ref, ref_grads), (ours, our_grads) = results["torch"], results[_entry(backend)]
    truth, true_grads = avatar_frame_with_grads(*_in_float64(avatar, inputs), ("torch",))["torch"]
    assert set(ours.branches) == {"face", "mouth", "torso"}
    torch.testing.assert_close(ours.image, ref.image, rtol=0, atol=5e-4)  # early stop: < 1e-4 per layer
    assert (ours.image - ref.image).abs().mean() < 1e-5
    assert set(our_grads) == set(ref_grads) == set(true_grads) and len(ref_grads) > 10
    tolerance = _summation_order_bound(ref) + early_stop_allowance
    largest = max(g.norm() for g in true_grads.values())

    def errors(g32: torch.Tensor, g32_ref: torch.Tensor, g64: torch.Tensor, floor: torch.Tensor) -> tuple[float, float]:
        scale = torch.maximum(g64.norm(), floor)
        return float((g32.double() - g64).norm() / scale), float((g32_ref.double() - g64).norm() / scale)

    for name, g64 in true_grads.items():
        # Some gradients are zero in exact arithmetic (a softmax's shared bias): compare those to the largest.
        ours_err, ref_err = errors(our_grads[name], ref_grads[name], g64, 1e-4 * largest)
        assert ours_err <= 2 * ref_err + tolerance, \
            f"{name}: relative error {ours_err:.2e} (float32 reference {ref_err:.2e}, allowed {2 * ref_err + tolerance:.2e})"
    for b, r in ref.branches.items():
        assert torch.equal(ours.branches[b].radii, r.radii)
        g64 = truth.branches[b].means2d.grad
        ours_err, ref_err = errors(ours.branches[b].means2d.grad, r.means2d.grad, g64, torch.zeros((), dtype=g64.dtype))
        assert ours_err <= 2 * ref_err + tolerance, f"{b} means2d grad: {ours_err:.2e} (reference {ref_err:.2e})"


def _host_syncs(fn) -> list[str]:
    """Messages of the host synchronisations ``fn()`` makes (torch's sync debug mode)."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.skipif(_CUDA_MISSING is not None, reason=f"CUDA kernels: {_CUDA_MISSING}")
def test_avatar_frame_synchronises_with_the_host_once_or_never_with_an_unsettled_pair_budget(avatar_file):
    """The whole frame on the GPU (deformation, all branches in one kernel pass, composite) waits for
    the device once: binned exactly (a training frame), for the number of (tile, Gaussian) pairs
    that sizes the sort; read back at once, to settle this thread's pair budget. Inside
    ``unsettled_pair_budget`` with a PairBudget that has seen a frame, never."""
    from gsavatar.render import PairBudget, unsettled_pair_budget

    avatar, inputs = driven_avatar(avatar_file, "cuda")
    budget = PairBudget()
    with torch.no_grad():
        avatar(inputs, backend="cuda")  # builds / loads the kernels, warms up the caches and this thread's budget
        with unsettled_pair_budget(budget):
            avatar(inputs, backend="cuda")  # the budget's first frame: exact
        assert budget.settle()
        settled = _host_syncs(lambda: avatar(inputs, backend="cuda"))
        with unsettled_pair_budget(budget):
            budgeted = _host_syncs(lambda: avatar(inputs, backend="cuda"))
    avatar(inputs, backend="cuda")  # warm-up: a frame whose parameters need grad is binned exactly
    exact = _host_syncs(lambda: avatar(inputs, backend="cuda"))
    assert len(exact) <= 1, exact
    assert len(settled) <= 1, settled
    assert budgeted == [], budgeted
    assert budget.settle()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_image_id_without_a_camera_culls_the_gaussian(backend):
    """Gaussians whose image id has no camera are culled (never read past the cameras)."""
    device = DEVICE[backend]
    scene = random_scene(50, 32, 32, seed=2, hard_cases=False).to(device)
    ids = torch.zeros(50, dtype=torch.int32, device=device)
    ids[::5] = 7  # only one camera
    ids[1::5] = -1
    color, alpha, depth, means2d, radii, visible = _compiled.rasterize_batch(
        *_ours(backend), *scene[:5], ids, scene.viewmat[None], scene.K[None], 32, 32,
        sh_degree=None)
    assert not visible[ids != 0].any() and visible[ids == 0].any()
    kept = ids == 0
    ref = rasterize(*(t[kept] for t in scene[:5]), scene.viewmat, scene.K, 32, 32, backend=_entry(backend))
    torch.testing.assert_close(color[0], ref.color, rtol=0, atol=1e-6)


@pytest.mark.skipif(_CPU_MISSING is not None, reason=f"CPU rasterizer: {_CPU_MISSING}")
def test_a_cached_build_is_trusted_only_as_it_was_loaded(tmp_path):
    """A build killed mid-link leaves a broken .so (loading it kills the process with SIGBUS): the
    cache trusts only the library a successful load vouched for, else load() rebuilds from scratch."""
    import shutil

    module = kernels.load("cpp")
    built = Path(module.__file__).parent
    assert kernels.cached_build_is_trusted(built)
    copy = tmp_path / built.name
    shutil.copytree(built, copy)  # copy2: sizes and modification times kept
    assert kernels.cached_build_is_trusted(copy)
    library = copy / Path(module.__file__).name
    stamp = library.stat()
    library.write_bytes(library.read_bytes()[:4096])  # what an interrupted link leaves
    os.utime(library, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # ninja would call it up to date
    assert not kernels.cached_build_is_trusted(copy)
    (copy / "gsavatar-loaded.json").unlink()
    assert not kernels.cached_build_is_trusted(copy)  # a library nobody vouched for
    library.unlink()
    assert kernels.cached_build_is_trusted(copy)  # nothing loadable: ninja builds into it


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pair_budget_bins_without_the_count_and_reports_what_did_not_fit(backend):
    """A budgeted frame bins into buffers sized from earlier frames: the same image as exact
    binning when it fits; when it does not, the lists are cut at the capacity, settle() says so and
    grows the budget past the need, and the frame rendered again is exact."""
    from gsavatar.render import PairBudget

    device = DEVICE[backend]
    ours = _ours(backend)
    scene = random_scene(600, 64, 48, seed=5, hard_cases=False).to(device)
    ids = torch.zeros(600, dtype=torch.int32, device=device)

    def render(budget):
        return _compiled.rasterize_batch(*ours, *scene[:5], ids, scene.viewmat[None], scene.K[None], 64, 48,
                                         sh_degree=None, pair_budget=budget)[0]

    exact = render(None)
    budget = PairBudget(headroom=1.5)
    torch.testing.assert_close(render(budget), exact, rtol=0, atol=0)  # first frame: exact binning
    needed = budget.capacity / 1.5
    assert budget.settle() and budget.capacity >= needed
    torch.testing.assert_close(render(budget), exact, rtol=0, atol=0)  # budgeted, fits
    assert budget.settle()

    budget.capacity = int(needed // 3)
    cut = render(budget)
    assert (cut - exact).abs().max() > 0.05, "a third of the pairs cannot give the same image"
    assert not budget.settle()
    assert budget.capacity >= needed
    torch.testing.assert_close(render(budget), exact, rtol=0, atol=0)
    assert budget.settle()

    # The op itself: lists end at the capacity, and the count it reports is the full need.
    ext = ours[0]
    means2d, conics, depths, colors, cov2d, radii = _compiled._Project.apply(
        *scene[:3], None, ext, None, ids, scene.viewmat[None].contiguous(), scene.K[None].contiguous(), 64, 48,
        0.3, 0.01, 1e3)
    for capacity in (-1, 100):
        offsets, gauss_ids, pairs = ext.isect_tiles(means2d, cov2d, scene.opacities.contiguous(), depths, radii, ids,
                                                    1, 64, 48, capacity)
        assert int(pairs) == round(needed)
        assert len(gauss_ids) == (round(needed) if capacity < 0 else capacity)
        assert int(offsets[-1]) == min(round(needed), len(gauss_ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frame_that_did_not_fit_its_pair_budget_is_rendered_again(avatar_file, monkeypatch, backend):
    """What `gsavatar render`, `view` and `eval` get: on a GPU a frame read back at once is binned
    with this thread's pair budget; when that is far too small, rasterize_layers renders the frame
    again, so the image equals the exactly binned frame and the budget has grown. On the CPU
    rasterizer (the count is at hand) every frame is binned exactly, once."""
    avatar, inputs = driven_avatar(avatar_file, DEVICE[backend])
    exact = avatar(inputs, backend=_entry(backend)).image.detach()  # parameters need grad: binned exactly
    passes = []
    real = _compiled.rasterize_groups

    def counted(*args, **kwargs):
        passes.append(kwargs["pair_budget"])
        return real(*args, **kwargs)

    if not BACKEND[backend].budgeted:
        monkeypatch.setattr(_compiled, "rasterize_groups", counted)
        with torch.no_grad():
            image = avatar(inputs, backend=_entry(backend)).image
        assert passes == [None]
        # (Without gradients the deformation nets run from their cached canonical part: rounding apart, the same.)
        torch.testing.assert_close(image, exact, rtol=0, atol=1e-5)
        return

    with torch.no_grad():
        avatar(inputs, backend=_entry(backend))  # this thread's budget has seen a frame
        budget = backends._frame_budget(BACKEND[backend])
        assert budget.capacity is not None and budget.capacity > 64
        budget.capacity = 1
        monkeypatch.setattr(_compiled, "rasterize_groups", counted)
        settled = avatar(inputs, backend=_entry(backend)).image
    assert len(passes) == 2 and all(p is budget for p in passes)  # cut, then rendered again
    torch.testing.assert_close(settled, exact, rtol=0, atol=1e-5)  # (rounding of the cached deformation, as above)
    assert budget.capacity > 64
    assert budget.settle()  # the second pass fitted


def test_pair_budget_rejects_headroom_below_one_and_a_second_device():
    from gsavatar.render import PairBudget

    with pytest.raises(ValueError, match="headroom"):
        PairBudget(headroom=0.5)
    budget = PairBudget()
    budget.record(torch.tensor([5]), 10)
    with pytest.raises(ValueError, match="one device"):
        budget.record(torch.tensor([5], device="meta"), 10)
    assert budget.settle()


# -- the dispatcher's self-check (what "auto" runs before it uses our kernels on a GPU) ------------------
class _WrongBackward:
    """An extension whose compositing gradients are 1 % too large (everything else passes through)."""

    def __init__(self, ext):
        self._ext = ext

    def __getattr__(self, name):
        return getattr(self._ext, name)

    def rasterize_backward(self, *args):
        return tuple(None if g is None else g * 1.01 for g in self._ext.rasterize_backward(*args))


def _brighter(real):
    """``_compiled.rasterize_groups`` with every layer's colour 1 % too bright."""
    def rasterize_groups(*args, **kwargs):
        return [(color * 1.01, *rest) for color, *rest in real(*args, **kwargs)]

    return rasterize_groups


@pytest.mark.skipif(_CPU_MISSING is not None, reason=f"CPU rasterizer: {_CPU_MISSING}")
def test_self_check_passes_on_the_host_twins_and_catches_wrong_kernels(monkeypatch):
    """The self-check (a small scene and hash grid against the reference, forward and gradients)
    passes on the CPU rasterizer, and names what differs when the kernels are wrong."""
    cpp = backends.get_backend("cpp", "cpu")
    assert backends.self_check(cpp, "cpu") is None
    with monkeypatch.context() as m:
        m.setattr(_compiled, "rasterize_groups", _brighter(_compiled.rasterize_groups))
        assert backends.self_check(cpp, "cpu") == "the self-check's colour differs from the reference"
    with monkeypatch.context() as m:
        real_build = kernels.build
        m.setattr(kernels, "build", lambda b: _WrongBackward(real_build(b)))
        assert backends.self_check(cpp, "cpu") == "the self-check's means differs from the reference"
    with monkeypatch.context() as m:
        real_grid = _compiled.hash_grid_compiled
        m.setattr(_compiled, "hash_grid_compiled", lambda *args: real_grid(*args) * 1.01)
        assert backends.self_check(cpp, "cpu") == "the self-check's hash-grid features differ from the reference"
    assert backends.self_check(cpp, "cpu") is None


@pytest.mark.skipif(_CPU_MISSING is not None, reason=f"CPU rasterizer: {_CPU_MISSING}")
def test_wrong_kernels_are_not_chosen_by_auto(monkeypatch):
    """``_choose`` (how "auto" decides, here for the CPU rasterizer; on a GPU the same for ours):
    kernels that fail the self-check give one RuntimeWarning and the fallback (gsplat where it can
    run, else the reference), which then renders exactly as the reference; working ones are chosen."""
    cpp = dataclasses.replace(backends.get_backend("cpp", "cpu"), strict=False)
    assert backends._choose(cpp, torch.device("cpu")) is cpp
    monkeypatch.setattr(_compiled, "rasterize_groups", _brighter(_compiled.rasterize_groups))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = backends._choose(cpp, torch.device("cpu"))
    assert [(w.category, str(w.message)) for w in caught] == [(
        RuntimeWarning, "gsavatar: not using our CPU rasterizer (the self-check's colour differs from the reference); "
                        "rendering with the PyTorch reference instead")]
    fallback = backends.TORCH  # gsplat runs on a GPU only
    assert chosen == dataclasses.replace(fallback, strict=False)
    scene = random_scene(200, 32, 24, seed=5)
    ours = rasterize(*scene, 32, 24, backend=chosen)
    ref = rasterize(*scene, 32, 24, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
