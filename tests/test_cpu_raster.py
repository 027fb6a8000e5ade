"""The CPU rasterizer (cuda/raster_host.cpp, the ``"cpp"`` backend) beyond the parity tests it shares
with the other compiled backends in test_kernels_raster.py: its exp, its threading (deterministic
for a thread count, the image independent of it, the gradients as good with any count) and
batched images at several sizes."""

from __future__ import annotations

import math

import pytest
import torch

from gsavatar import kernels
from gsavatar.render import _compiled, rasterize, set_cpu_raster_threads
from gsavatar.render.synthetic import random_scene

_MISSING = kernels.missing_requirements("cpp")
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"CPU rasterizer: {_MISSING}")


@pytest.fixture(scope="module")
def ext():
    return kernels.load("cpp")


def test_fast_exp_error_is_within_its_stated_bound(ext):
    """Every float32 in [fast_exp_min, 0] spaced 2^-14 apart (5.7 million, each exponent range many
    times over) and the edges: relative error against float64's exp at most the stated bound."""
    bound = ext.fast_exp_max_rel_error
    assert 0 < bound < 2.5e-7  # under two float32 ulps: the reference's own exp is within one
    x = torch.arange(ext.fast_exp_min, 0.0, 2.0**-14, dtype=torch.float64).float()
    x = torch.cat([x, torch.tensor([0.0, -0.0, -1e-30, -1e-7, ext.fast_exp_min, -0.5 * math.log(2)])])
    got, want = ext.fast_exp(x).double(), x.double().exp()
    rel = ((got - want) / want).abs()
    assert rel.max().item() <= bound, f"largest relative error {rel.max().item():.3e} at x = {x[rel.argmax()].item()}"
    assert ext.fast_exp(torch.tensor([0.0])).item() == 1.0
    # Below the range: clamped (far below 1/255, so an alpha there is skipped either way); NaN stays NaN.
    low = ext.fast_exp(torch.tensor([-200.0, -1e30, float("-inf")]))
    assert torch.allclose(low.double(), torch.tensor(ext.fast_exp_min, dtype=torch.float64).exp(), rtol=bound)
    assert torch.isnan(ext.fast_exp(torch.tensor([float("nan")]))).all()
    assert ext.simd_lanes in (4, 8, 16)


def test_cpu_raster_threads_are_set_and_checked(ext):
    from gsavatar.errors import InputError

    try:
        set_cpu_raster_threads(3)
        assert ext.cpu_threads() == 3
        set_cpu_raster_threads(0)
        assert ext.cpu_threads() >= 1  # every processor this process may use
        for bad in (-1, 1.5, "2", True, 5000):
            with pytest.raises(InputError, match="threads must be an int"):
                set_cpu_raster_threads(bad)
    finally:
        set_cpu_raster_threads(0)


def _frame(scene, width, height, threads, images=1, min_transmittance=0.0):
    """Colour, alpha, depth of ``images`` copies of ``scene`` (each moved a little) in one batch, and
    the gradients of a fixed weighting of them, rendered with ``threads`` threads."""
    set_cpu_raster_threads(threads)
    try:
        n = len(scene.means)
        shift = torch.tensor([0.03, -0.02, 0.0])
        leaves = [torch.cat([t + k * shift if i == 0 else t for k in range(images)]).requires_grad_(True)
                  for i, t in enumerate(scene[:5])]
        ids = torch.arange(images, dtype=torch.int32).repeat_interleave(n)
        color, alpha, depth, means2d, radii, _ = _compiled.rasterize_batch(
            kernels.load("cpp"), "cpp", "cpu", *leaves, ids, scene.viewmat.expand(images, 4, 4).contiguous(),
            scene.K.expand(images, 3, 3).contiguous(), width, height, sh_degree=None,
            min_transmittance=min_transmittance)
        means2d.retain_grad()
        g = torch.Generator().manual_seed(1)
        weights = [torch.randn(t.shape, generator=g) for t in (color, alpha, depth)]
        sum(((t * w).sum() for t, w in zip((color, alpha, depth), weights))).backward()
        return [color.detach(), alpha.detach(), depth.detach(), radii], [t.grad for t in leaves] + [means2d.grad]
    finally:
        set_cpu_raster_threads(0)


@pytest.mark.parametrize("width, height, images", [(512, 512, 1), (200, 130, 3), (16, 16, 2)])
def test_same_thread_count_same_bits_and_images_independent_of_threads(width, height, images):
    """Run twice with 2 threads: every output and gradient bit for bit. With 1 and 3 threads: the
    same images bit for bit (each pixel's steps do not depend on how tiles are shared out)."""
    scene = random_scene(4000 if width >= 200 else 300, width, height, seed=width + images, pixel_size=6.0)
    first, first_grads = _frame(scene, width, height, 2, images)
    again, again_grads = _frame(scene, width, height, 2, images)
    for a, b in zip(first + first_grads, again + again_grads):
        assert torch.equal(a, b)
    assert first[1].max() > 0.5  # something was drawn
    for threads in (1, 3):
        out, _ = _frame(scene, width, height, threads, images)
        for a, b in zip(out, first):
            assert torch.equal(a, b), threads


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gradients_match_the_reference_with_any_thread_count(threads):
    """The gradients with 1, 2 and 3 threads (each Gaussian's per-tile sums added in per-thread
    groups) against the float64 reference: as close as the float32 reference itself, or within
    the floor of test_kernels_raster's parity test (relative to the largest value)."""
    width = height = 160
    scene = random_scene(1500, width, height, seed=threads, pixel_size=6.0)
    g = torch.Generator().manual_seed(threads)
    weights = torch.randn(height, width, 3, generator=g), torch.randn(height, width, 1, generator=g)

    def grads(dtype, backend, n_threads=1):
        set_cpu_raster_threads(n_threads)
        try:
            leaves = [t.to(dtype).requires_grad_(i < 5) for i, t in enumerate(scene)]
            out = rasterize(*leaves, width, height, backend=backend)
            ((out.color * weights[0].to(dtype)).sum() + (out.alpha * weights[1].to(dtype)).sum()).backward()
            return [t.grad for t in leaves[:5]]
        finally:
            set_cpu_raster_threads(0)

    truth, ref32, ours = grads(torch.float64, "torch"), grads(torch.float32, "torch"), grads(torch.float32, "cpp", threads)
    for name, a, b, b32 in zip(("means", "quats", "scales", "opacities", "colors"), ours, truth, ref32):
        # A Gaussian's gradient sums its pixels' float32 terms (at most a few thousand here: boxes of
        # ~40 x 40 pixels), whatever the grouping into threads: rounding errors that add as a random
        # walk, sqrt(n) u ~ 4e-6 of the sum of magnitudes; 5e-5 of the largest gradient leaves >10x.
        # Or 4x the float32 reference's own error, where the scene is badly conditioned.
        tol = max(5e-5 * b.abs().max().item(), 4 * (b32.double() - b).abs().max().item())
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tol, msg=lambda m, name=name: f"{threads} threads, {name}: {m}")


def test_batched_frames_equal_separate_frames_at_512():
    """Three images in one batch (the avatar's face, mouth and torso layers) equal three renders."""
    scene = random_scene(3000, 512, 512, seed=4, pixel_size=8.0)
    batch, _ = _frame(scene, 512, 512, 2, images=3, min_transmittance=_compiled.MIN_TRANSMITTANCE)
    shift = torch.tensor([0.03, -0.02, 0.0])
    for k in range(3):
        moved = scene._replace(means=scene.means + k * shift)
        single, _ = _frame(moved, 512, 512, 2, images=1, min_transmittance=_compiled.MIN_TRANSMITTANCE)
        for a, b in zip(single[:3], batch[:3]):
            assert torch.equal(a[0], b[k])


def test_over_composites_strided_layers_like_the_reference():
    """``Backend.over`` on the CPU build (no gradients): one pass over views of a layer batch equals
    ``color + (1 - alpha) * under`` (the same two roundings); with gradients it is that expression."""
    from gsavatar.render import get_backend

    cpp = get_backend("cpp", "cpu")
    g = torch.Generator().manual_seed(3)
    batch, T = torch.rand(3, 37, 29, 4, generator=g), torch.rand(3, 37, 29, generator=g)
    color, alpha, under = batch[1, ..., :3], (1 - T[1]).unsqueeze(-1), torch.rand(29, 37, 3, generator=g).transpose(0, 1)
    with torch.no_grad():
        out = cpp.over(color, alpha, under)
    assert out.is_contiguous() and torch.equal(out, color + (1 - alpha) * under)
    color.requires_grad_(True)
    blended = cpp.over(color, alpha, under)
    blended.sum().backward()
    assert torch.equal(color.grad, torch.ones_like(color))
