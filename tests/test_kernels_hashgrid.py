"""Our hash-grid kernels (cuda/hashgrid_*) against the PyTorch reference (gsavatar.model.encoding).

Run on "cpp" (the host twin: the kernels' math in C++ loops, built with a C++ compiler), on
"cuda" (the CUDA kernels; skipped without a CUDA device) and on "emulated" (the tests' own backend,
tests/emulated.py: the CUDA kernels themselves on CPU tensors, run by the CPU emulator of the CUDA
thread model). Each grid is called with the backend (``grid(x, backend)``, as the render layer
calls it). Forward values, table and input gradients
under random output gradients, for dense, mixed and hashed levels, points on cell borders, on the
domain's faces and outside it. The gradients are compared with the float32 reference: a float64
reference would put points within an ulp of a cell border into the other cell.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings

import emulated
import pytest
import torch

from gsavatar import kernels
from gsavatar.errors import InputError
from gsavatar.model.encoding import HashGrid, HashGridConfig, TriPlaneEncoder
from gsavatar.render import backends, get_backend

# (config, dense levels in 2-D, in 3-D): the counts make sure each case covers what its name says.
CONFIGS = {
    "dense": (HashGridConfig(num_levels=2, log2_table_size=12, base_resolution=4, max_resolution=8), 2, 2),
    "mixed": (HashGridConfig(num_levels=5, log2_table_size=10, base_resolution=4, max_resolution=64), 3, 2),
    "hashed": (HashGridConfig(num_levels=3, log2_table_size=4, base_resolution=16, max_resolution=256), 0, 0),
    "single": (HashGridConfig(num_levels=1, log2_table_size=8, base_resolution=12, max_resolution=12), 1, 0),
}

BACKEND_OF = {"cpp": backends._NAMED["cpp"], "cuda": backends._NAMED["cuda"], "emulated": emulated.BACKEND}
"""Each case's :class:`~gsavatar.render.Backend` (named explicitly, so strict: never the reference)."""


@pytest.fixture(scope="module", params=["cpp", "cuda", "emulated"])
def build(request):
    """A kernel build's backend ("cpp": host twin, "cuda": CUDA kernels, "emulated": the CUDA kernels
    on the CPU emulator), built once (then cached on disk)."""
    backend = BACKEND_OF[request.param]
    reason = emulated.missing_requirements() if request.param == "emulated" else kernels.missing_requirements(
        request.param)
    if reason is not None:
        pytest.skip(f"{request.param} kernels: {reason}")
    backend.extension()
    return backend


@pytest.fixture(scope="module")
def cpu_ext():
    reason = kernels.missing_requirements("cpp")
    if reason is not None:
        pytest.skip(f"cpp kernels: {reason}")
    return kernels.load("cpp")


def device_of(backend) -> str:
    return backend.build.device_type


def grid_pair(dim: int, cfg: HashGridConfig, device: str, seed: int = 0) -> tuple[HashGrid, HashGrid]:
    """(reference, kernel) grids with the same float32 table, entries in [-1, 1]."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(cfg, init_scale=1.0)
    ref = HashGrid(dim, cfg).to(device)
    ours = HashGrid(dim, cfg).to(device)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def hard_points(grid: HashGrid, n: int = 200, seed: int = 0) -> torch.Tensor:
    """Random points in [0, 1] plus the hard ones: cell borders and vertices of every level, the
    domain's faces (0 and 1) and points outside it (clamped)."""
    g = torch.Generator().manual_seed(seed)
    dim = grid.dim
    parts = [torch.rand(n, dim, generator=g)]
    for res in grid.resolutions:
        border = torch.rand(20, dim, generator=g)
        border[:, 0] = torch.randint(0, res + 1, (20,), generator=g) / res      # one coordinate on a border
        parts += [border, torch.randint(0, res + 1, (20, dim), generator=g) / res]  # vertices
    faces = torch.tensor([[0.0] * dim, [1.0] * dim, [0.0, 1.0, 0.5][:dim], [1.0, 0.3, 0.0][:dim]])
    outside = torch.tensor([[-0.5, 0.5, 1.5][:dim], [1.25, -1e-3, 0.7][:dim], [-2.0] * dim, [3.0] * dim])
    return torch.cat(parts + [faces, outside])


def run(grid: HashGrid, x: torch.Tensor, grad_out: torch.Tensor, backend=None):
    """Forward value (on ``backend``; None: the reference) and the gradients of sum(out * grad_out)
    w.r.t. the table and x."""
    x = x.clone().requires_grad_()
    grid.zero_grad(set_to_none=True)
    out = grid(x, backend)
    (out * grad_out).sum().backward()
    return out.detach(), grid.table.grad, x.grad


def assert_matches(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5):
    """float32 agreement; atol scaled by the largest reference value (gradients reach ~1e3)."""
    torch.testing.assert_close(got, ref, rtol=rtol, atol=1e-6 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("features", [1, 2, 4])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dim", [2, 3])
def test_forward_and_gradients_match_reference(build, dim, config, features):
    cfg, *dense = CONFIGS[config]
    device = device_of(build)
    ref, ours = grid_pair(dim, dataclasses.replace(cfg, features_per_level=features), device)
    assert ref.num_dense == dense[dim - 2]
    x = hard_points(ref).to(device)
    grad_out = torch.randn(len(x), ref.output_dim, generator=torch.Generator().manual_seed(1)).to(device)
    out_ref, table_ref, x_ref = run(ref, x, grad_out)
    out, table_grad, x_grad = run(ours, x, grad_out, build)
    assert out.shape == out_ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    assert_matches(table_grad, table_ref)
    assert_matches(x_grad, x_ref)
    # Outside [0, 1] the clamp stops the input gradient; on the faces it passes.
    outside = (x < 0) | (x > 1)
    assert (x_grad[outside] == 0).all() and (x_grad[~outside] != 0).any()


def test_avatar_settings_match_reference(build):
    # The face deformer's planes: 12 levels, 2^17 entries, 10 dense and 2 hashed levels in 2-D.
    device = device_of(build)
    ref, ours = grid_pair(2, HashGridConfig(), device)
    assert ref.num_dense == 10
    x = hard_points(ref, n=500).to(device)
    grad_out = torch.randn(len(x), ref.output_dim, generator=torch.Generator().manual_seed(2)).to(device)
    for got, want in zip(run(ours, x, grad_out, build), run(ref, x, grad_out)):
        assert_matches(got, want)


def test_tri_plane_end_to_end(build):
    cfg = dataclasses.replace(CONFIGS["mixed"][0], features_per_level=2, init_scale=1.0)
    device = device_of(build)
    torch.manual_seed(0)
    ref = TriPlaneEncoder(cfg, bound=0.2).to(device)
    ours = TriPlaneEncoder(cfg, bound=0.2).to(device)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(3)
    xyz = ((torch.rand(300, 3, generator=g) * 2 - 1) * 0.25).to(device)   # some beyond the bound
    grad_out = torch.randn(len(xyz), ref.output_dim, generator=g).to(device)
    results = []
    for enc, backend in ((ref, backends.TORCH), (ours, build)):
        p = xyz.clone().requires_grad_()
        out = enc(p, backend)
        (out * grad_out).sum().backward()
        results.append((out.detach(), p.grad, *(plane.table.grad for plane in enc.planes)))
    for got, want in zip(results[1], results[0]):
        assert_matches(got, want)


def test_only_the_needed_gradients(build):
    device = device_of(build)
    ref, ours = grid_pair(3, CONFIGS["mixed"][0], device)
    grids = ((ours, build), (ref, None))
    x = hard_points(ref).to(device)
    # A frozen table with an input that needs gradients, and the other way round.
    xg = x.clone().requires_grad_()
    for grid in (ref, ours):
        grid.table.requires_grad_(False)
    g, g_ref = (torch.autograd.grad(grid(xg, b).sum(), xg)[0] for grid, b in grids)
    assert_matches(g, g_ref)
    for grid in (ref, ours):
        grid.table.requires_grad_(True)
    t, t_ref = (torch.autograd.grad(grid(x, b).square().sum(), grid.table)[0] for grid, b in grids)
    assert_matches(t, t_ref)
    # Leading batch dimensions, float64 input (converted to float32 as the reference does), no points.
    xb = x[:12].double().view(3, 4, 3)
    assert_matches(ours(xb, build), ref(xb))
    assert ours(xb, build).shape == (3, 4, ours.output_dim) and ours(xb, build).dtype == torch.float32
    assert ours(x[:0], build).shape == (0, ours.output_dim)


def test_host_twin_nan_and_determinism(cpu_ext):
    cpp = get_backend("cpp", "cpu")
    ref, ours = grid_pair(3, CONFIGS["mixed"][0], "cpu")
    nan = torch.tensor([[float("nan"), 0.5, 0.5]])
    assert torch.isnan(ours(nan, cpp)).all() and torch.isnan(ref(nan)).all()
    x = torch.rand(4000, 3, generator=torch.Generator().manual_seed(4))
    grad_out = torch.randn(len(x), ours.output_dim, generator=torch.Generator().manual_seed(5))
    first, second = run(ours, x, grad_out, cpp), run(ours, x, grad_out, cpp)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_op_checks(cpu_ext):
    x, table = torch.rand(5, 2), torch.zeros(2, 16, 1)
    with pytest.raises(RuntimeError, match=r"hashgrid: 2 resolutions expected \(got 1\)"):
        cpu_ext.hashgrid_forward(x, table, [4])
    with pytest.raises(RuntimeError, match=r"hashgrid: 1 to 8 features per level supported \(got 9\)"):
        cpu_ext.hashgrid_forward(x, torch.zeros(2, 16, 9), [4, 8])
    with pytest.raises(RuntimeError, match=r"table size T must be a power of two"):
        cpu_ext.hashgrid_forward(x, torch.zeros(2, 12, 1), [4, 8])
    with pytest.raises(RuntimeError, match=r"x and table must be float32"):
        cpu_ext.hashgrid_forward(x.double(), table, [4, 8])
    with pytest.raises(RuntimeError, match=r"resolutions must be in \[1, 2\^24\] \(got 0\)"):
        cpu_ext.hashgrid_forward(x, table, [0, 8])
    with pytest.raises(RuntimeError, match=r"grad_out must be \[5, 2\]"):
        cpu_ext.hashgrid_backward(torch.zeros(5, 3), x, table, [4, 8], True)


class _Recorder:
    """A stand-in backend that records the hash grids it is asked to encode (and leaves them to the reference)."""

    def __init__(self):
        self.tables = []

    def encode_hash_grid(self, x, table, resolutions):
        self.tables.append(table)
        return None


def test_backend_choice_and_refusals(monkeypatch):
    cfg = HashGridConfig(num_levels=2, log2_table_size=8)
    # Backends are named through the render layer, the same names as for the rasterizer.
    with pytest.raises(InputError, match=r"unknown backend 'gpu' \(known: auto, torch, cpp, cuda, gsplat; "):
        get_backend("gpu", "cpu")
    # Named explicitly (strict), a backend refuses what its kernels cannot take.
    with pytest.raises(InputError, match=r"backend 'cpp' needs a float32 table \(got torch.float64\)"):
        HashGrid(2, cfg).double()(torch.rand(3, 2), backends._NAMED["cpp"])
    with pytest.raises(InputError, match=r"backend 'cuda' needs cuda tensors \(input on cpu, table on cpu\)"):
        HashGrid(2, cfg)(torch.rand(3, 2), backends._NAMED["cuda"])
    # The tri-plane encoder hands its backend to each of its planes.
    enc, recorder = TriPlaneEncoder(cfg, 1.0), _Recorder()
    assert enc(torch.rand(5, 3), recorder).shape == (5, 6)
    assert len(recorder.tables) == 3 and all(t is p.table for t, p in zip(recorder.tables, enc.planes))
    # "auto" on CPU tensors with the reference as the fallback (no compiler): the grid's own code.
    monkeypatch.setattr(backends, "_auto_choice", {"cpu": backends.TORCH})
    auto = get_backend("auto", "cpu")
    grid, x = HashGrid(3, cfg), torch.rand(4, 3)
    assert grid(x, auto).shape == (4, 2)
    assert torch.equal(grid(x, auto), grid(x))


def test_a_backend_chosen_by_auto_leaves_what_its_kernels_cannot_take_to_the_reference(cpu_ext):
    """Chosen by "auto" (strict=False), our kernels hand a float64 table, too many levels or too many
    features back to the reference (named explicitly, the first is an error: see above)."""
    chosen = dataclasses.replace(get_backend("cpp", "cpu"), strict=False)
    x = torch.rand(50, 2, generator=torch.Generator().manual_seed(6))
    small = HashGridConfig(num_levels=2, log2_table_size=8)
    cases = {
        "float32 (kernels)": (HashGrid(2, small), True),
        "float64": (HashGrid(2, small).double(), False),
        "too many levels": (HashGrid(2, dataclasses.replace(small, num_levels=cpu_ext.hashgrid_max_levels + 1,
                                                            max_resolution=64)), False),
        "too many features": (HashGrid(2, dataclasses.replace(small, features_per_level=cpu_ext.hashgrid_max_features + 1)),
                              False),
    }
    for name, (grid, kernels_take_it) in cases.items():
        ours = chosen.encode_hash_grid(x.to(grid.table.dtype), grid.table, grid.resolutions)
        assert (ours is not None) == kernels_take_it, name
        out = grid(x, chosen)
        if kernels_take_it:
            assert torch.equal(out, ours), name
            assert_matches(out, grid(x))
        else:
            assert torch.equal(out, grid(x)), name  # the reference's own code


@pytest.mark.parametrize("device, ours", [("cpu", "CPU rasterizer"), ("cuda", "CUDA kernels")])
def test_auto_warns_once_when_our_build_fails(monkeypatch, device, ours):
    """How "auto" decides (``backends._choose``, run here on CPU tensors for either device type): our
    kernels failing to build give one warning and the fallback (gsplat on a GPU where it is
    installed, else the reference), whose hash grid is the reference's; the choice is made once per
    device (``get_backend("auto", ...)``, here with the build impossible)."""
    def fail(build):
        raise kernels.KernelBuildError("building the kernels failed (test)")

    gsplat_runs = device == "cuda" and backends._NAMED["gsplat"].missing_requirements() is None
    fallback = dataclasses.replace(backends._NAMED["gsplat"] if gsplat_runs else backends.TORCH, strict=False)
    instead = f"rendering with {'gsplat' if gsplat_runs else 'the PyTorch reference'} instead"
    with monkeypatch.context() as m:
        m.setattr(kernels, "missing_requirements", lambda build: None)  # as if it could be built
        m.setattr(kernels, "build", fail)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chosen = backends._choose(dataclasses.replace(backends._NAMED["cpp"], strict=False), torch.device(device))
        assert [(w.category, str(w.message)) for w in caught] == [
            (RuntimeWarning, f"gsavatar: not using our {ours} (building the kernels failed (test)); {instead}")]
        assert chosen == fallback
        grid, x = HashGrid(2, HashGridConfig(num_levels=2)), torch.rand(7, 2)
        assert chosen.encode_hash_grid(x, grid.table, grid.resolutions) is None
        assert torch.equal(grid(x, chosen), grid(x))

    monkeypatch.setattr(backends, "_auto_choice", {})
    monkeypatch.setattr(kernels, "missing_requirements", lambda build: "no compiler (test)")
    name = "cuda:0" if device == "cuda" else "cpu"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = get_backend("auto", name)
        again = get_backend("auto", torch.device(name))
    assert [(w.category, str(w.message)) for w in caught] == [
        (RuntimeWarning, f"gsavatar: not using our {ours} (no compiler (test)); {instead}")]
    assert first is again and first == fallback


def test_auto_uses_the_cuda_kernels_on_cuda():
    reason = kernels.missing_requirements("cuda")
    if reason is not None:
        pytest.skip(f"cuda kernels: {reason}")
    auto = get_backend("auto", "cuda")
    assert auto.name == "cuda" and auto.compiled and not auto.strict  # after its self-check passed
    assert auto.extension() is kernels.load("cuda")
    grid = HashGrid(2, HashGridConfig(num_levels=2)).cuda()
    x = torch.rand(3, 2, device="cuda")
    ours = auto.encode_hash_grid(x, grid.table, grid.resolutions)
    assert ours is not None
    assert_matches(ours, grid(x))
    assert torch.equal(grid(x, auto), ours)
    grid.double()
    assert auto.encode_hash_grid(x, grid.table, grid.resolutions) is None  # float64: the reference
    assert grid(x, auto).dtype == torch.float64


def test_importing_builds_nothing():
    code = ("import gsavatar, gsavatar.model.encoding, gsavatar.render, gsavatar.kernels as k; "
            "assert not k._loaded and not k._failed, (k._loaded, k._failed)")
    subprocess.run([sys.executable, "-c", code], check=True)
