"""Multiresolution hash-grid encoding (Instant-NGP, Mueller et al. 2022) and a tri-plane encoder.

The PyTorch code below is the reference implementation. Our compiled kernels
(``cuda/hashgrid_*``, see :mod:`gsavatar.kernels`) implement the same contract, which is kept small
and written down here:

Levels
    ``L = num_levels`` grids of resolution ``N_l = floor(base * b**l)``, ``l = 0 .. L-1``, with the
    growth factor ``b = exp((ln max - ln base) / (L - 1))`` (``b = 1`` for a single level), so
    ``N_0 = base_resolution`` and ``N_{L-1} = max_resolution``. Level ``l`` has vertices at integer
    coordinates ``0 .. N_l`` along each axis; an input ``x`` in ``[0, 1]`` sits at ``x * N_l``.

Table
    One parameter ``table`` of shape ``[L, T, F]`` (``T = 2**log2_table_size``,
    ``F = features_per_level``): row ``l`` is level ``l``'s table. A level is *dense* when its
    ``(N_l + 1)**dim`` vertices fit in ``T``: vertex ``(i, j[, k])`` then uses entry
    ``i + j*(N_l+1) [+ k*(N_l+1)**2]`` and the entries past ``(N_l + 1)**dim`` are unused (they keep
    their initial values and get zero gradients; a flat layout would save them, the fixed shape
    keeps indexing and the kernel simple). Otherwise the level is *hashed*: vertex ``c`` uses entry
    ``(c_0*1 XOR c_1*2654435761 [XOR c_2*805459861]) mod T``, computed in int64; only the low
    ``log2_table_size`` bits are kept, which are the same as with the paper's uint32 arithmetic.
    Since ``N_l`` grows with ``l``, the dense levels are always a prefix of the levels.

Interpolation
    Bilinear (2-D) or trilinear (3-D) over the cell's ``2**dim`` corners. The cell is
    ``floor(x * N_l)`` clamped to ``N_l - 1`` (so ``x = 1`` is the far vertex of the last cell) and
    the weights are products of ``1 - f`` / ``f`` of the fractional position ``f``. Corner order
    (used by :meth:`HashGrid.corner_indices`): corner ``k`` takes the upper vertex along axis ``d``
    when bit ``dim - 1 - d`` of ``k`` is set, i.e. axis 0 varies slowest.

Output
    ``[..., L*F]``, level-major (level 0's ``F`` features first), in the table's dtype.
    Differentiable w.r.t. the table and w.r.t. ``x`` (through the weights; piecewise constant in
    each cell, undefined on cell borders where the one-sided values differ). Positions are computed
    in float32 (float64 for a float64 table); for ``max_resolution`` well above ``2**16`` float32
    no longer resolves the fractional position finely.

Backends
    ``forward(x, backend=None)``: the reference code below, or, given a
    :class:`gsavatar.render.Backend` (which the render layer chooses), its kernels for the inputs
    they take (float32 tables, at most 64 levels and 8 features; first use builds them). Their
    backward is not differentiable again (no second-order gradients).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from gsavatar.config import HashGridConfig, _is_int
from gsavatar.errors import InputError

__all__ = ["HASH_PRIMES", "HashGrid", "HashGridConfig", "TriPlaneEncoder", "dense_index", "hash_index"]

HASH_PRIMES = (1, 2654435761, 805459861)
"""Per-axis multipliers of the spatial hash (Instant-NGP, section 3)."""

def dense_index(coords: Tensor, resolution: int) -> Tensor:
    """Dense table entry of integer vertex coordinates ``coords`` [..., dim] (each in ``0..resolution``)."""
    coords = coords.long()
    index = torch.zeros(coords.shape[:-1], dtype=torch.long, device=coords.device)
    for d in range(coords.shape[-1]):
        index += coords[..., d] * (resolution + 1) ** d
    return index


def hash_index(coords: Tensor, log2_table_size: int) -> Tensor:
    """Hashed table entry of integer vertex coordinates ``coords`` [..., dim], in ``[0, 2**log2_table_size)``."""
    coords = coords.long()
    index = torch.zeros(coords.shape[:-1], dtype=torch.long, device=coords.device)
    for d in range(coords.shape[-1]):
        index ^= coords[..., d] * HASH_PRIMES[d]
    return index & ((1 << log2_table_size) - 1)


class HashGrid(nn.Module):
    """A ``dim``-dimensional (2 or 3) multiresolution hash grid over ``[0, 1]**dim``.

    ``forward(x)``: ``x`` [..., dim] (clamped to ``[0, 1]``) -> features [..., output_dim] in the
    table's dtype, ``output_dim = num_levels * features_per_level``. See the module docstring for
    the exact indexing and interpolation rules and for ``backend``.
    """

    output_dim: int

    def __init__(self, dim: int, cfg: HashGridConfig):
        super().__init__()
        if not _is_int(dim) or dim not in (2, 3):
            raise InputError(f"HashGrid dim must be 2 or 3 (got {dim!r})")
        cfg.validate()
        self.dim = dim
        self.cfg = dataclasses.replace(cfg)
        self.table_size = 1 << cfg.log2_table_size
        self.resolutions = cfg.resolutions()
        self.dense = [(n + 1) ** dim <= self.table_size for n in self.resolutions]
        self.num_dense = sum(self.dense)  # the dense levels are a prefix (resolutions grow)
        self.output_dim = cfg.num_levels * cfg.features_per_level

        self.table = nn.Parameter(torch.empty(cfg.num_levels, self.table_size, cfg.features_per_level))
        nn.init.uniform_(self.table, -cfg.init_scale, cfg.init_scale)

        # Per level and axis: the index step of one vertex along that axis ((N+1)**d when dense, the
        # hash prime when hashed), and each level's first entry in the flattened table.
        strides = [[(n + 1) ** d if dense else HASH_PRIMES[d] for d in range(dim)]
                   for n, dense in zip(self.resolutions, self.dense)]
        self.register_buffer("_strides", torch.tensor(strides, dtype=torch.long), persistent=False)
        self.register_buffer("_offsets", torch.arange(cfg.num_levels, dtype=torch.long) * self.table_size,
                             persistent=False)
        # Integer, so that module.half() / .double() leave the resolutions exact.
        self.register_buffer("_res", torch.tensor(self.resolutions, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, levels={self.cfg.num_levels}, features={self.cfg.features_per_level}, "
                f"table=2^{self.cfg.log2_table_size}, resolutions={self.resolutions[0]}..{self.resolutions[-1]}, "
                f"dense_levels={self.num_dense}")

    def vertex_index(self, level: int, coords: Tensor) -> Tensor:
        """Entry of level ``level``'s table row used by integer vertex coordinates ``coords`` [..., dim]."""
        if coords.shape[-1] != self.dim:
            raise InputError(f"vertex coordinates must have shape [..., {self.dim}] (got {tuple(coords.shape)})")
        if self.dense[level]:
            return dense_index(coords, self.resolutions[level])
        return hash_index(coords, self.cfg.log2_table_size)

    def _cells(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Flat table indices [C, L, P] of the cells' ``C = 2**dim`` corners and the fractional positions [dim, L, P].

        Corner-major layout: every elementwise op below runs over contiguous ``[L, P]`` rows, and
        broadcasting only ever happens over the small leading corner axes (fast on CPU).
        """
        cdtype = torch.promote_types(self.table.dtype, torch.float32)
        res = self._res.to(cdtype)[:, None]                     # [L, 1]
        xt = x.to(cdtype).clamp(0.0, 1.0).t().contiguous()      # [dim, P]
        pos = xt[:, None, :] * res                              # [dim, L, P]
        with torch.no_grad():
            # NaN inputs would give garbage indices; index with 0 there and let the NaN reach the output.
            cell = torch.minimum(torch.floor(pos.nan_to_num(0.0)), res - 1)
        frac = pos - cell
        cell = cell.long()

        L, P = cell.shape[1], cell.shape[2]
        mask = self.table_size - 1
        # Per axis: the (lower, upper) vertex's contribution to the index, [2, L, P]. Dense pieces
        # are < T already, so masking them too is a no-op; the level offset (a multiple of T) goes
        # into axis 0 and survives both the sum (dense) and the XOR with the masked others (hashed).
        pieces = []
        for d in range(self.dim):
            step = self._strides[:, d, None]                     # [L, 1]
            lo = cell[d] * step
            piece = torch.stack([lo, lo + step]).bitwise_and_(mask)
            if d == 0:
                piece += self._offsets[:, None]
            pieces.append(piece)
        idx = torch.empty(*([2] * self.dim), L, P, dtype=torch.long, device=x.device)
        k = self.num_dense
        for start, stop, op in ((0, k, torch.add), (k, L, torch.bitwise_xor)):
            if start == stop:
                continue
            acc = pieces[0][:, start:stop]
            for d in range(1, self.dim):
                other = pieces[d][:, start:stop].view(*([1] * d), 2, stop - start, P)
                acc = op(acc.unsqueeze(d), other, out=idx[..., start:stop, :] if d == self.dim - 1 else None)
        return idx.view(1 << self.dim, L, P), frac

    def corner_indices(self, x: Tensor) -> Tensor:
        """Flat indices into ``table.view(-1, F)`` of the ``2**dim`` corners per level: [..., L, 2**dim]."""
        x2 = self._check(x)
        idx, _ = self._cells(x2)
        return idx.permute(2, 1, 0).reshape(*x.shape[:-1], *idx.shape[1::-1])

    def _check(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise InputError(f"HashGrid input must be a tensor (got {type(x).__name__})")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise InputError(f"HashGrid({self.dim}) input must have shape [..., {self.dim}] (got {tuple(x.shape)})")
        return x.reshape(-1, self.dim)

    def forward(self, x: Tensor, backend=None) -> Tensor:
        """Features of ``x``; ``backend`` (a :class:`gsavatar.render.Backend`, None: the reference) may
        run them on our kernels."""
        x2 = self._check(x)
        if backend is not None:
            out = backend.encode_hash_grid(x2, self.table, self.resolutions)
            if out is not None:
                return out.view(*x.shape[:-1], self.output_dim)
        F = self.cfg.features_per_level
        idx, frac = self._cells(x2)                              # [C, L, P], [dim, L, P]
        C, L, P = idx.shape

        # Corner weights: outer product over axes of (1 - f, f), axis 0 slowest (matches idx).
        weight = None
        for d in range(self.dim):
            wd = torch.stack([1 - frac[d], frac[d]])             # [2, L, P]
            weight = wd if weight is None else weight.unsqueeze(d) * wd.view(*([1] * d), 2, L, P)
        weight = weight.reshape(C, L, P).to(self.table.dtype)

        if F == 1:
            values = self.table.view(-1).index_select(0, idx.view(-1)).view(C, L, P)
            out = (values * weight).sum(0).t()                   # [P, L]
        else:
            values = self.table.view(-1, F).index_select(0, idx.view(-1)).view(C, L, P, F)
            out = (values * weight.unsqueeze(-1)).sum(0).transpose(0, 1)  # [P, L, F]
        return out.reshape(*x.shape[:-1], L * F)


class TriPlaneEncoder(nn.Module):
    """Three 2-D hash grids over the ``(x, y)``, ``(y, z)`` and ``(x, z)`` planes of a box.

    ``forward(xyz)``: ``xyz`` [..., 3] in world units, clamped to ``[-bound, bound]`` and mapped to
    ``[0, 1]`` by ``(xyz + bound) / (2 * bound)`` -> the three planes' features concatenated in
    that order, [..., output_dim] with ``output_dim = 3 * num_levels * features_per_level``.
    ``forward(xyz, backend)`` passes ``backend`` to the planes (:class:`HashGrid`).
    """

    PLANES = ((0, 1), (1, 2), (0, 2))
    """Axes of each plane, in output order: (x, y), (y, z), (x, z)."""

    output_dim: int

    def __init__(self, cfg: HashGridConfig, bound: float):
        super().__init__()
        if not (isinstance(bound, (int, float)) and not isinstance(bound, bool)
                and math.isfinite(bound) and bound > 0):
            raise InputError(f"TriPlaneEncoder bound must be a finite number > 0 (got {bound!r})")
        self.bound = float(bound)
        self.planes = nn.ModuleList(HashGrid(2, cfg) for _ in self.PLANES)
        self.output_dim = sum(p.output_dim for p in self.planes)

    def extra_repr(self) -> str:
        return f"bound={self.bound}, planes=(xy, yz, xz)"

    def normalize(self, xyz: Tensor) -> Tensor:
        """World coordinates [..., 3] -> ``[0, 1]**3`` (clamped)."""
        if not isinstance(xyz, Tensor) or xyz.dim() < 1 or xyz.shape[-1] != 3:
            shape = tuple(xyz.shape) if isinstance(xyz, Tensor) else type(xyz).__name__
            raise InputError(f"TriPlaneEncoder input must have shape [..., 3] (got {shape})")
        return ((xyz + self.bound) / (2 * self.bound)).clamp(0.0, 1.0)

    def forward(self, xyz: Tensor, backend=None) -> Tensor:
        u = self.normalize(xyz)
        # Slices, not u[..., [i, j]]: indexing a CUDA tensor with a Python list copies the list to
        # the GPU and waits for it, a host synchronisation per plane every frame.
        return torch.cat([grid(u[..., slice(i, j + 1, j - i)], backend) for grid, (i, j) in zip(self.planes, self.PLANES)],
                         dim=-1)
