"""Random Gaussian scenes for the rasterizer's parity tests and benchmarks (no files, seeded)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class Scene(NamedTuple):
    means: Tensor  # [G, 3]
    quats: Tensor  # [G, 4]
    scales: Tensor  # [G, 3]
    opacities: Tensor  # [G]
    colors: Tensor  # [G, 3] RGB, or [G, 16, 3] SH coefficients when made with sh=True
    viewmat: Tensor  # [4, 4]
    K: Tensor  # [3, 3]

    def to(self, *args, **kwargs) -> "Scene":
        return Scene(*(t.to(*args, **kwargs) for t in self))


def random_scene(n: int, width: int, height: int, *, seed: int = 0, sh: bool = False, pixel_size: float = 4.0,
                 hard_cases: bool = True) -> Scene:
    """``n`` Gaussians in front of a slightly rotated camera with an off-centre principal point.

    Centres spread a little beyond the image (so Gaussians straddle its border and tile borders);
    sizes are log-uniform around ``pixel_size`` pixels (sub-pixel to several tiles). With
    ``hard_cases``: every 11th has zero opacity, every 13th opacity 1 (alpha hits the 0.99 cap),
    every 7th is flat (a zero scale), every 17th has all scales zero, every 19th lies behind the
    camera and every 23rd far outside the field of view.
    """
    g = torch.Generator().manual_seed(seed)
    focal = 1.1 * max(width, height)
    depth = torch.empty(n).uniform_(2.0, 4.0, generator=g)
    u = torch.empty(n).uniform_(-0.1 * width, 1.1 * width, generator=g)
    v = torch.empty(n).uniform_(-0.1 * height, 1.1 * height, generator=g)
    cx, cy = width / 2 + 3.3, height / 2 - 2.1
    cam = torch.stack([(u - cx) * depth / focal, (v - cy) * depth / focal, depth], -1)
    angle = 0.2
    rot = torch.tensor([[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0],
                        [-math.sin(angle), 0.0, math.cos(angle)]])
    trans = torch.tensor([0.1, -0.05, 0.2])
    viewmat = torch.eye(4)
    viewmat[:3, :3], viewmat[:3, 3] = rot, trans
    means = (cam - trans) @ rot  # world = R^T (cam - t)
    quats = torch.randn(n, 4, generator=g)
    pixels = torch.exp(torch.empty(n, 3).uniform_(math.log(pixel_size / 8), math.log(pixel_size * 4), generator=g))
    scales = pixels * depth[:, None] / focal
    opacities = torch.rand(n, generator=g) * 0.95 + 0.02
    colors = torch.randn(n, 16, 3, generator=g) * 0.3 if sh else torch.rand(n, 3, generator=g)
    if hard_cases:
        opacities[::11] = 0.0
        opacities[::13] = 1.0
        scales[::7, 2] = 0.0
        scales[::17] = 0.0
        means[::19] = (torch.tensor([0.0, 0.0, -1.0]) - trans) @ rot
        means[::23] = (torch.tensor([50.0, -40.0, 3.0]) - trans) @ rot
    K = torch.tensor([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])
    return Scene(means, quats, scales, opacities, colors, viewmat, K)
