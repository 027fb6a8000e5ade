"""The one place that decides how Gaussians are rasterized and hash grids are encoded.

A :class:`Backend` names one implementation of both operations, and a name means the same
everywhere (training, rendering, eval, the viewer, the hash grid and the rasterizer):

``"torch"``
    The PyTorch reference (``_torch_impl`` and :class:`gsavatar.model.encoding.HashGrid`'s own
    code), on any device and dtype.
``"cpp"``
    Our CPU rasterizer (the ``cpp`` build of :mod:`gsavatar.kernels`: tiles over every core, its
    own thread count, see :func:`set_cpu_raster_threads`; pixels in SIMD lanes) and the hash-grid
    kernels' host loops; float32 CPU tensors.
``"cuda"``
    Our CUDA kernels (the ``cuda`` build), float32 CUDA tensors.
``"gsplat"``
    gsplat's CUDA rasterizer (a cross-check of ours); its hash grid is the reference (gsplat has none).
``"auto"``
    Resolved per device by :func:`get_backend`: our compiled backend for the device (``"cpp"`` on a
    CPU, ``"cuda"`` on a GPU), but only after a one-time self-check at first use (a small scene and
    a small hash grid against the reference, forward and gradients). If it cannot be built (no
    compiler) or the self-check fails: one warning, then gsplat on a GPU where it is installed,
    else the reference: never silently wrong pixels. Chosen by ``"auto"``, a compiled backend
    hands inputs it does not take (float64, a camera that needs gradients) to the reference.

Pair budgets (how the compiled backends size their (tile, Gaussian) buffers without waiting for
the GPU) are made here too: :func:`rasterize_layers` renders a frame for reading back with this
thread's budget, settles it and renders again what did not fit; training frames are binned exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from gsavatar import kernels
from gsavatar.config import BACKEND_NAMES as BACKEND_CHOICES
from gsavatar.errors import InputError


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the rasterizer and the hash grid (see the module docstring)."""

    name: str
    """What it is called (``"torch"``, ``"cpp"``, ``"cuda"``, ``"gsplat"``)."""
    rasterizer: str
    """``"torch"`` (the reference), ``"compiled"`` (our kernels) or ``"gsplat"``."""
    device_types: tuple[str, ...]
    """Torch device types whose tensors it takes."""
    build: kernels.Build | None = None
    """Our kernels' build behind ``"compiled"`` (and behind the hash grid when set)."""
    strict: bool = True
    """Named explicitly: inputs it cannot take are errors. False when ``"auto"`` chose it: the hash
    grid then falls back to the reference for inputs the kernels do not take (float64, too many levels)."""
    budgeted: bool = False
    """Frames read back at once bin with a :class:`PairBudget` (sized from earlier frames) instead of
    the exact count: where reading the count would make the host wait for the device (CUDA)."""

    @property
    def compiled(self) -> bool:
        return self.rasterizer == "compiled"

    def missing_requirements(self) -> str | None:
        """Why it cannot run here (one line), or None. Cheap: builds nothing."""
        if self.rasterizer == "gsplat":
            from gsavatar.render import _gsplat

            return _gsplat.missing_requirements()
        return None if self.build is None else kernels.missing_requirements(self.build)

    def extension(self):
        """Our compiled kernels (built on first use)."""
        return kernels.build(self.build)

    # -- the hash grid ------------------------------------------------------------------------
    def encode_hash_grid(self, x: Tensor, table: Tensor, resolutions: list[int]) -> Tensor | None:
        """Hash-grid features of ``x [P, dim]`` by our kernels, or None where the reference should run."""
        if self.build is None:
            return None
        want = self.build.device_type
        usable = x.device.type == want and table.device.type == want and table.dtype == torch.float32
        if not usable:
            if not self.strict:
                return None
            if table.dtype != torch.float32:
                raise InputError(f"HashGrid on backend {self.name!r} needs a float32 table (got {table.dtype}); "
                                 f"use backend 'torch'")
            raise InputError(f"HashGrid on backend {self.name!r} needs {want} tensors "
                             f"(input on {x.device}, table on {table.device})")
        ext = self.extension()
        if not self.strict and (len(resolutions) > ext.hashgrid_max_levels
                                or table.shape[-1] > ext.hashgrid_max_features):
            return None
        from gsavatar.render._compiled import hash_grid_compiled

        return hash_grid_compiled(x, table, ext, resolutions)

    # -- compositing --------------------------------------------------------------------------
    def over(self, color: Tensor, alpha: Tensor, under: Tensor) -> Tensor:
        """A premultiplied layer over an image: ``color + (1 - alpha) * under`` (``[H, W, 3]``,
        ``alpha [H, W, 1]``). On our CPU build without gradients, one pass over every core (the
        layers are strided views of the batch: elementwise torch ops on them take several passes)."""
        if (self.build is not None and self.build.device_type == "cpu" and not torch.is_grad_enabled()
                and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (color, alpha, under))):
            return self.extension().over(color, alpha, under)
        return torch.addcmul(color, 1 - alpha, under)

    # -- the rasterizer -----------------------------------------------------------------------
    def rasterize_image(self, means, quats, scales, opacities, colors, viewmat, K, width, height, *, sh_degree,
                        background, near, far, eps2d, tile_size):
        """One image; the signature and outputs of ``_torch_impl.rasterize_torch``."""
        if self.rasterizer == "torch":
            from gsavatar.render import _torch_impl

            if tile_size is None:  # 8: about 1.5x faster on CPU than 16, the same image
                tile_size = 8 if means.device.type == "cpu" else 16
            return _torch_impl.rasterize_torch(means, quats, scales, opacities, colors, viewmat, K, width, height,
                                               sh_degree=sh_degree, background=background, near=near, far=far,
                                               eps2d=eps2d, tile_size=tile_size)
        if self.rasterizer == "gsplat":
            from gsavatar.render import _gsplat

            return _gsplat.rasterize_gsplat(means, quats, scales, opacities, colors, viewmat, K, width, height,
                                            sh_degree=sh_degree, background=background, near=near, far=far,
                                            eps2d=eps2d, tile_size=tile_size or 16)
        from gsavatar.render import _compiled

        if not self.strict and not _compiled_takes([LayerGaussians(means, quats, scales, opacities, colors, 0, viewmat)],
                                                   K):
            return TORCH.rasterize_image(means, quats, scales, opacities, colors, viewmat, K, width, height,
                                         sh_degree=sh_degree, background=background, near=near, far=far, eps2d=eps2d,
                                         tile_size=tile_size)
        return _compiled.rasterize_image(self.extension(), self.name, self.build.device_type, means, quats, scales,
                                         opacities, colors, viewmat, K, width, height, sh_degree=sh_degree,
                                         background=background, near=near, far=far, eps2d=eps2d)


TORCH = Backend("torch", "torch", ("cpu", "cuda"))
_NAMED = {
    "torch": TORCH,
    "cpp": Backend("cpp", "compiled", ("cpu",), kernels.BUILDS["cpp"]),
    "cuda": Backend("cuda", "compiled", ("cuda",), kernels.BUILDS["cuda"], budgeted=True),
    "gsplat": Backend("gsplat", "gsplat", ("cuda",)),
}


def set_cpu_raster_threads(count: int) -> None:
    """Threads of the CPU rasterizer (``"cpp"``: projection, binning, compositing); 0, the default,
    uses every processor this process may run on. Separate from torch's thread count, which the
    CPU presets keep at 1 (the networks' small ops are slower on more threads of a busy machine;
    a frame's rasterization is not). Results are deterministic for a given count."""
    if isinstance(count, bool) or not (isinstance(count, int) and 0 <= count <= 4096):
        raise InputError(f"the CPU rasterizer's threads must be an int in [0, 4096] (got {count!r})")
    _NAMED["cpp"].extension().set_cpu_threads(count)


def available_backends() -> list[str]:
    """Names of the backends that can run here (``"torch"`` always)."""
    return [name for name, b in _NAMED.items() if b.missing_requirements() is None]


def check_backend(name: str | Backend, device: torch.device | str) -> str | Backend:
    """``name`` if it can run on ``device``, else a one-line :class:`InputError` saying why not
    (unknown name, missing requirement, wrong device type). ``"auto"`` always passes (it falls back
    to the reference). Cheap: builds nothing, so entry points call it before any long work."""
    if isinstance(name, str) and name == "auto":
        return name
    if isinstance(name, str) and name not in _NAMED:
        raise InputError(f"unknown backend {name!r} (known: {', '.join(BACKEND_CHOICES)}; "
                         f"available here: {', '.join(available_backends())})")
    backend = _NAMED[name] if isinstance(name, str) else name
    why = backend.missing_requirements()
    if why is not None:
        raise InputError(f"backend {backend.name!r} cannot run here: {why} "
                         f"(available here: {', '.join(available_backends())})")
    device_type = torch.device(device).type
    if device_type not in backend.device_types:
        raise InputError(f"backend {backend.name!r} runs on {' or '.join(backend.device_types)} tensors, not {device_type}")
    return name


def get_backend(name: str | Backend, device: torch.device | str) -> Backend:
    """The :class:`Backend` that ``name`` stands for on ``device`` (``"auto"`` resolved, see the
    module docstring); raises :class:`InputError` for a backend that cannot run there."""
    if isinstance(name, Backend):
        check_backend(name, device)
        return name
    if name != "auto":
        check_backend(name, device)
        return _NAMED[name]
    device = torch.device(device)
    if device.type == "cuda":
        key = str(device if device.index is not None else torch.device("cuda", torch.cuda.current_device()))
        return _auto(key, _NAMED["cuda"], device)
    if device.type == "cpu":
        return _auto("cpu", _NAMED["cpp"], device)
    return TORCH


# -- auto: our compiled backend for the device, after a self-check ---------------------------------
_auto_lock = threading.Lock()
_auto_choice: dict[str, Backend] = {}


def _auto(key: str, ours: Backend, device: torch.device) -> Backend:
    with _auto_lock:
        if key not in _auto_choice:
            _auto_choice[key] = _choose(dataclasses.replace(ours, strict=False), device)
        return _auto_choice[key]


def _choose(ours: Backend, device: torch.device) -> Backend:
    problem = ours.missing_requirements()
    if problem is None:
        try:
            ours.extension()  # built (or loaded) first: a build that fails is the reason given
            problem = self_check(ours, device)
        except kernels.KernelBuildError as exc:
            problem = str(exc)
    if problem is None:
        return ours
    gsplat = _NAMED["gsplat"]
    fallback = gsplat if device.type in gsplat.device_types and gsplat.missing_requirements() is None else TORCH
    what = "CUDA kernels" if device.type == "cuda" else "CPU rasterizer"
    warnings.warn(f"gsavatar: not using our {what} ({problem}); rendering with "
                  f"{'gsplat' if fallback is not TORCH else 'the PyTorch reference'} instead", RuntimeWarning,
                  stacklevel=3)
    return dataclasses.replace(fallback, strict=False)


def self_check(backend: Backend, device: torch.device | str) -> str | None:
    """None if ``backend`` agrees with the reference on a small scene and a small hash grid (forward
    and gradients, float32 tolerances) on ``device``; else one line saying what differs. Records
    gradients whatever the caller's mode (``auto`` is often first resolved under ``no_grad``)."""
    with torch.enable_grad():
        return _self_check(backend, device)


def _self_check(backend: Backend, device: torch.device | str) -> str | None:
    from gsavatar.config import HashGridConfig
    from gsavatar.render.synthetic import random_scene

    device = torch.device(device)
    scene = random_scene(96, 40, 28, seed=3, sh=True).to(device)
    results = {}
    for b in (TORCH, backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in scene[:5]]
        layers = rasterize_layers([LayerGaussians(*leaves[:4], leaves[4], 2, scene.viewmat)], scene.K, 40, 28, b,
                                  min_transmittance=0.0)
        color, alpha = layers[0].color, layers[0].alpha
        weights = torch.linspace(-1, 1, color.numel(), device=device).view_as(color)
        (color * weights).sum().add(alpha.sum()).backward()
        results[b.name] = [color.detach(), alpha.detach()] + [t.grad for t in leaves]
    for what, ref, got in zip(("colour", "alpha", "means", "quats", "scales", "opacities", "sh"),
                              results["torch"], results[backend.name]):
        scale = max(1.0, float(ref.abs().max()))
        if got is None or not torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * scale):
            return f"the self-check's {what} differs from the reference"
    grid_cfg = HashGridConfig(num_levels=4, log2_table_size=8, base_resolution=4, max_resolution=64, init_scale=0.1)
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(200, 2, generator=gen).to(device)
    table = torch.empty(grid_cfg.num_levels, 1 << grid_cfg.log2_table_size, 1).uniform_(-0.1, 0.1, generator=gen)
    from gsavatar.model.encoding import HashGrid

    grid = HashGrid(2, grid_cfg).to(device)
    with torch.no_grad():
        grid.table.copy_(table.to(device))
    outs = []
    for b in (TORCH, backend):
        grid.table.grad = None
        out = grid(x, backend=b)
        out.mul(torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        outs.append((out.detach(), grid.table.grad.clone()))
    for what, ref, got in zip(("hash-grid features", "hash-grid gradient"), outs[0], outs[1]):
        if not torch.allclose(got, ref, rtol=1e-4, atol=1e-5):
            return f"the self-check's {what} differ from the reference"
    return None


# -- several branches into layers ----------------------------------------------------------------
class LayerGaussians(NamedTuple):
    """The Gaussians drawn into one layer (SH colours), and the camera that sees them."""

    means: Tensor  # [G, 3]
    quats: Tensor  # [G, 4]
    scales: Tensor  # [G, 3] linear
    opacities: Tensor  # [G]
    sh: Tensor  # [G, K, 3]
    sh_degree: int
    viewmat: Tensor  # [4, 4] world -> camera


class Layer(NamedTuple):
    color: Tensor  # [H, W, 3] premultiplied, no background
    alpha: Tensor  # [H, W, 1]
    means2d: Tensor  # [G, 2] (retain_grad() works: densification reads it)
    radii: Tensor  # [G] long


def _compiled_takes(layers: list[LayerGaussians], K: Tensor) -> bool:
    """Whether the compiled backends take these layers (float32, cameras without gradients)."""
    tensors = [K, *(t for g in layers for t in (*g[:5], g.viewmat))]
    return all(t.dtype == torch.float32 for t in tensors) and not (K.requires_grad or any(
        g.viewmat.requires_grad for g in layers))


_budgets = threading.local()  # per thread: {backend name: PairBudget} for frames read back at once


@contextlib.contextmanager
def unsettled_pair_budget(budget):
    """Inside: compiled backends bin with ``budget`` and never settle it (no host synchronisation
    in a frame, e.g. to capture frames as a CUDA graph); the caller calls ``budget.settle()`` and
    renders again the frames that did not fit."""
    previous = getattr(_budgets, "override", None)
    _budgets.override = budget
    try:
        yield budget
    finally:
        _budgets.override = previous


def _frame_budget(backend: Backend):
    from gsavatar.render._compiled import PairBudget

    per_thread = getattr(_budgets, "by_backend", None)
    if per_thread is None:
        per_thread = _budgets.by_backend = {}
    return per_thread.setdefault(backend.name, PairBudget())


def rasterize_layers(layers: list[LayerGaussians], K: Tensor, width: int, height: int, backend: str | Backend,
                     *, min_transmittance: float | None = None) -> list[Layer]:
    """Each entry of ``layers`` into its own premultiplied layer, seen through ``K``.

    On our compiled kernels all layers share one projection, binning and compositing pass; a
    frame that needs no gradient bins with this thread's pair budget (no host synchronisation
    before it is read back), settled at once, the frame rendered again when it did not fit. On
    the reference (and gsplat) each layer is rasterized in turn. ``min_transmittance``: the
    compiled kernels' early stop (None: their default; 0 composites everything, like the reference).
    """
    backend = get_backend(backend, K.device)
    if not layers:
        return []
    if backend.compiled and not backend.strict and not _compiled_takes(layers, K):
        backend = TORCH
    if not backend.compiled:
        out = []
        for g in layers:
            r = backend.rasterize_image(g.means, g.quats, g.scales, g.opacities, g.sh, g.viewmat, K, width, height,
                                        sh_degree=g.sh_degree, background=None, near=0.01, far=1e3, eps2d=0.3,
                                        tile_size=None)
            out.append(Layer(r[0], r[1], r[3], r[4]))
        return out
    from gsavatar.render import _compiled

    def run(budget):
        return _compiled.rasterize_groups(backend.extension(), backend.name, backend.build.device_type, layers, K,
                                          width, height, pair_budget=budget, min_transmittance=min_transmittance)

    override = getattr(_budgets, "override", None)
    if override is not None:
        result = run(override)
    elif not backend.budgeted or (torch.is_grad_enabled() and any(t.requires_grad for g in layers for t in g[:5])):
        # The count is at hand (nothing to wait for), or a training frame: binned exactly (one
        # synchronisation, as every tile rasterizer).
        result = run(None)
    else:
        budget = _frame_budget(backend)
        result = run(budget)
        if not budget.settle():
            result = run(budget)  # grown past this frame's need, so it fits now
            budget.settle()
    return [Layer(c, a, m, r) for c, a, m, r, _v in result]
