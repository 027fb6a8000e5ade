"""A set of 3D Gaussians as trainable tensors (no optimizer, no files: see gsavatar.train)."""

from __future__ import annotations

import torch
from torch import nn

SH_C0 = 0.28209479177387814  # degree-0 real spherical harmonic: colour = SH_C0 * sh0 + 0.5

# Parameter names, in the order the optimizer groups and the densification strategy use them.
PARAM_NAMES = ("means", "quats", "log_scales", "opacity_logits", "sh0", "shN")


def rgb_to_sh0(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - 0.5) / SH_C0


def inverse_sigmoid(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(1e-6, 1 - 1e-6)
    return torch.log(x / (1 - x))


class GaussianSet(nn.Module):
    """``G`` Gaussians: centre, rotation (quaternion w,x,y,z), log-scale, opacity logit and SH colour.

    The parameters live in ``self.params`` (a ParameterDict keyed by :data:`PARAM_NAMES`) so
    that densification can replace them without knowing the module.
    """

    def __init__(self, means: torch.Tensor, rgb: torch.Tensor, scale: float | torch.Tensor, opacity: float,
                 sh_degree: int):
        super().__init__()
        g = means.shape[0]
        self.sh_degree = int(sh_degree)
        scales = torch.as_tensor(scale, dtype=means.dtype).expand(g).clone() if not torch.is_tensor(scale) or scale.ndim == 0 else scale
        quats = torch.zeros(g, 4, dtype=means.dtype)
        quats[:, 0] = 1
        self.params = nn.ParameterDict({
            "means": nn.Parameter(means.clone()),
            "quats": nn.Parameter(quats),
            "log_scales": nn.Parameter(torch.log(scales)[:, None].repeat(1, 3)),
            "opacity_logits": nn.Parameter(inverse_sigmoid(torch.full((g,), float(opacity), dtype=means.dtype))),
            "sh0": nn.Parameter(rgb_to_sh0(rgb)[:, None, :].clone()),
            "shN": nn.Parameter(torch.zeros(g, (self.sh_degree + 1) ** 2 - 1, 3, dtype=means.dtype)),
        })

    @classmethod
    def empty(cls, num: int, sh_degree: int) -> "GaussianSet":
        """Placeholder of the right shapes, to load a state dict into."""
        return cls(torch.zeros(num, 3), torch.full((num, 3), 0.5), 1.0, 0.5, sh_degree)

    def __len__(self) -> int:
        return self.params["means"].shape[0]

    @property
    def means(self) -> torch.Tensor:
        return self.params["means"]

    @property
    def quats(self) -> torch.Tensor:
        return self.params["quats"]

    @property
    def log_scales(self) -> torch.Tensor:
        return self.params["log_scales"]

    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.params["opacity_logits"])

    @property
    def sh(self) -> torch.Tensor:
        """``[G, (d+1)^2, 3]`` SH coefficients."""
        return torch.cat([self.params["sh0"], self.params["shN"]], dim=1)

    @property
    def rgb(self) -> torch.Tensor:
        """View-independent colour (degree 0 only), ``[G, 3]``."""
        return self.params["sh0"][:, 0] * SH_C0 + 0.5



def sample_triangles(vertices: torch.Tensor, triangles: torch.Tensor, count: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` points uniformly on a triangle mesh: returns (points [count, 3], triangle index [count])."""
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    area = 0.5 * torch.linalg.norm(torch.cross(b - a, c - a, dim=-1), dim=-1)
    tri = torch.multinomial(area / area.sum(), count, replacement=True, generator=generator)
    u, v = torch.rand(count, generator=generator), torch.rand(count, generator=generator)
    flip = u + v > 1
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    points = a[tri] + u[:, None] * (b[tri] - a[tri]) + v[:, None] * (c[tri] - a[tri])
    return points, tri


def nearest_neighbour_scale(points: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Mean distance to the ``k`` nearest other points (3DGS's initial scale rule), chunked."""
    out = []
    for chunk in points.split(2048):
        d = torch.cdist(chunk, points)
        d = d.topk(k + 1, largest=False).values[:, 1:]
        out.append(d.mean(dim=1))
    return torch.cat(out).clamp_min(1e-5)


