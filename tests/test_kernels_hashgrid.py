"""Our hash-grid kernels (cuda/hashgrid_*) against the PyTorch reference (gsavatar.model.encoding).

Run on "cpu" (the host twin: the kernels' math in C++ loops, built with a C++ compiler), on
"cuda" (the CUDA kernels; skipped without a CUDA device) and on "emulated" (the CUDA kernels
themselves on CPU tensors, run by the CPU emulator of the CUDA thread model). Forward values, table and input gradients
under random output gradients, for dense, mixed and hashed levels, points on cell borders, on the
domain's faces and outside it. The gradients are compared with the float32 reference: a float64
reference would put points within an ulp of a cell border into the other cell.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch

from gsavatar import kernels
from gsavatar.errors import InputError
from gsavatar.model import encoding
from gsavatar.model.encoding import HashGrid, HashGridConfig, TriPlaneEncoder

# (config, dense levels in 2-D, in 3-D): the counts make sure each case covers what its name says.
CONFIGS = {
    "dense": (HashGridConfig(num_levels=2, log2_table_size=12, base_resolution=4, max_resolution=8), 2, 2),
    "mixed": (HashGridConfig(num_levels=5, log2_table_size=10, base_resolution=4, max_resolution=64), 3, 2),
    "hashed": (HashGridConfig(num_levels=3, log2_table_size=4, base_resolution=16, max_resolution=256), 0, 0),
    "single": (HashGridConfig(num_levels=1, log2_table_size=8, base_resolution=12, max_resolution=12), 1, 0),
}


@pytest.fixture(scope="module", params=["cpu", "cuda", "emulated"])
def build(request):
    """A kernel build ("cpu": host twin, "cuda": CUDA kernels, "emulated": the CUDA kernels on the
    CPU emulator), built once (then cached on disk)."""
    reason = kernels.missing_requirements(request.param)
    if request.param == "emulated" and reason is None and kernels.missing_requirements("cuda") is None:
        reason = "the CUDA cases run these kernels on this machine's GPU"
    if reason is not None:
        pytest.skip(f"{request.param} kernels: {reason}")
    kernels.load(request.param)
    return request.param


@pytest.fixture(scope="module")
def cpu_ext():
    reason = kernels.missing_requirements("cpu")
    if reason is not None:
        pytest.skip(f"cpu kernels: {reason}")
    return kernels.load("cpu")


BACKEND_OF = {"cpu": "cpp", "cuda": "cuda", "emulated": "emulated"}  # kernel build -> HashGrid backend name
DEVICE_OF = {"cpu": "cpu", "cuda": "cuda", "emulated": "cpu"}  # kernel build -> torch device


def grid_pair(dim: int, cfg: HashGridConfig, backend: str, device: str, seed: int = 0) -> tuple[HashGrid, HashGrid]:
    """(reference, kernel) grids with the same float32 table, entries in [-1, 1]."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(cfg, init_scale=1.0)
    ref = HashGrid(dim, cfg, backend="torch").to(device)
    ours = HashGrid(dim, cfg, backend=BACKEND_OF[backend]).to(device)
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


def run(grid: HashGrid, x: torch.Tensor, grad_out: torch.Tensor):
    """Forward value and the gradients of sum(out * grad_out) w.r.t. the table and x."""
    x = x.clone().requires_grad_()
    grid.zero_grad(set_to_none=True)
    out = grid(x)
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
    device = DEVICE_OF[build]
    ref, ours = grid_pair(dim, dataclasses.replace(cfg, features_per_level=features), build, device)
    assert ref.num_dense == dense[dim - 2]
    x = hard_points(ref).to(device)
    grad_out = torch.randn(len(x), ref.output_dim, generator=torch.Generator().manual_seed(1)).to(device)
    out_ref, table_ref, x_ref = run(ref, x, grad_out)
    out, table_grad, x_grad = run(ours, x, grad_out)
    assert out.shape == out_ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    assert_matches(table_grad, table_ref)
    assert_matches(x_grad, x_ref)
    # Outside [0, 1] the clamp stops the input gradient; on the faces it passes.
    outside = (x < 0) | (x > 1)
    assert (x_grad[outside] == 0).all() and (x_grad[~outside] != 0).any()


def test_avatar_settings_match_reference(build):
    # The face deformer's planes: 12 levels, 2^17 entries, 10 dense and 2 hashed levels in 2-D.
    device = DEVICE_OF[build]
    ref, ours = grid_pair(2, HashGridConfig(), build, device)
    assert ref.num_dense == 10
    x = hard_points(ref, n=500).to(device)
    grad_out = torch.randn(len(x), ref.output_dim, generator=torch.Generator().manual_seed(2)).to(device)
    for got, want in zip(run(ours, x, grad_out), run(ref, x, grad_out)):
        assert_matches(got, want)


def test_tri_plane_end_to_end(build):
    cfg = dataclasses.replace(CONFIGS["mixed"][0], features_per_level=2, init_scale=1.0)
    device = DEVICE_OF[build]
    torch.manual_seed(0)
    ref = TriPlaneEncoder(cfg, bound=0.2, backend="torch").to(device)
    ours = TriPlaneEncoder(cfg, bound=0.2, backend=BACKEND_OF[build]).to(device)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(3)
    xyz = ((torch.rand(300, 3, generator=g) * 2 - 1) * 0.25).to(device)   # some beyond the bound
    grad_out = torch.randn(len(xyz), ref.output_dim, generator=g).to(device)
    results = []
    for enc in (ref, ours):
        p = xyz.clone().requires_grad_()
        out = enc(p)
        (out * grad_out).sum().backward()
        results.append((out.detach(), p.grad, *(plane.table.grad for plane in enc.planes)))
    for got, want in zip(results[1], results[0]):
        assert_matches(got, want)


def test_only_the_needed_gradients(build):
    device = DEVICE_OF[build]
    ref, ours = grid_pair(3, CONFIGS["mixed"][0], build, device)
    x = hard_points(ref).to(device)
    # A frozen table with an input that needs gradients, and the other way round.
    xg = x.clone().requires_grad_()
    for grid in (ref, ours):
        grid.table.requires_grad_(False)
    g, g_ref = (torch.autograd.grad(grid(xg).sum(), xg)[0] for grid in (ours, ref))
    assert_matches(g, g_ref)
    for grid in (ref, ours):
        grid.table.requires_grad_(True)
    t, t_ref = (torch.autograd.grad(grid(x).square().sum(), grid.table)[0] for grid in (ours, ref))
    assert_matches(t, t_ref)
    # Leading batch dimensions, float64 input (converted to float32 as the reference does), no points.
    xb = x[:12].double().view(3, 4, 3)
    assert_matches(ours(xb), ref(xb))
    assert ours(xb).shape == (3, 4, ours.output_dim) and ours(xb).dtype == torch.float32
    assert ours(x[:0]).shape == (0, ours.output_dim)


def test_host_twin_nan_and_determinism(cpu_ext):
    ref, ours = grid_pair(3, CONFIGS["mixed"][0], "cpu", "cpu")
    nan = torch.tensor([[float("nan"), 0.5, 0.5]])
    assert torch.isnan(ours(nan)).all() and torch.isnan(ref(nan)).all()
    x = torch.rand(4000, 3, generator=torch.Generator().manual_seed(4))
    grad_out = torch.randn(len(x), ours.output_dim, generator=torch.Generator().manual_seed(5))
    first, second = run(ours, x, grad_out), run(ours, x, grad_out)
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


def test_backend_choice_and_refusals(monkeypatch):
    cfg = HashGridConfig(num_levels=2, log2_table_size=8)
    with pytest.raises(InputError, match=r"HashGrid backend must be one of auto, torch, cpp, cuda, emulated \(got 'gpu'\)"):
        HashGrid(2, cfg, backend="gpu")
    with pytest.raises(InputError, match=r"backend 'cpp' needs a float32 table \(got torch.float64\)"):
        HashGrid(2, cfg, backend="cpp").double()(torch.rand(3, 2))
    with pytest.raises(InputError, match=r"backend 'cuda' needs cuda tensors \(input on cpu, table on cpu\)"):
        HashGrid(2, cfg, backend="cuda")(torch.rand(3, 2))
    assert all(p.backend == "cpp" for p in TriPlaneEncoder(cfg, 1.0, backend="cpp").planes)
    # "auto" on CPU tensors is the reference: nothing is built.
    monkeypatch.setattr(kernels, "load", lambda kind: pytest.fail("auto must not build kernels for CPU tensors"))
    assert HashGrid(3, cfg)(torch.rand(4, 3)).shape == (4, 2)


def test_auto_warns_once_when_the_cuda_build_fails(monkeypatch):
    def fail(kind):
        raise kernels.KernelBuildError("building the cuda kernels failed (test)")

    monkeypatch.setattr(kernels, "available", lambda kind: True)
    monkeypatch.setattr(kernels, "load", fail)
    encoding._auto_cuda_kernels.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert encoding._auto_cuda_kernels() is None and encoding._auto_cuda_kernels() is None
        assert [str(w.message) for w in caught] == [
            "building the cuda kernels failed (test); HashGrid falls back to the PyTorch reference"]
    finally:
        encoding._auto_cuda_kernels.cache_clear()


def test_auto_uses_the_cuda_kernels_on_cuda():
    reason = kernels.missing_requirements("cuda")
    if reason is not None:
        pytest.skip(f"cuda kernels: {reason}")
    grid = HashGrid(2, HashGridConfig(num_levels=2)).cuda()
    assert grid._kernels(torch.rand(3, 2, device="cuda")) is kernels.load("cuda")
    assert grid.double()._kernels(torch.rand(3, 2, device="cuda")) is None


def test_importing_builds_nothing():
    code = ("import gsavatar, gsavatar.model.encoding, gsavatar.kernels as k; "
            "assert not k._loaded and not k._failed, (k._loaded, k._failed)")
    subprocess.run([sys.executable, "-c", code], check=True)
