"""Image math shared by training and scoring, on ``[H, W, C]`` tensors in [0, 1]: SSIM, masked
means, MSE and PSNR (training's losses and eval's metrics are the same arithmetic), and the
float -> uint8 conversion of every image the package writes or sends."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


@lru_cache(maxsize=8)
def _gaussian_kernel(size: int, sigma: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim_map(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM ``[H, W, 1]`` (Wang et al. 2004: Gaussian window 11 / 1.5, C1 = 0.01^2, C2 = 0.03^2), channel mean."""
    c = a.shape[-1]
    x = torch.stack([a, b]).permute(0, 3, 1, 2)  # [2, C, H, W]
    g = _gaussian_kernel(window, sigma, a.dtype, str(a.device))
    pad = window // 2

    def blur(t):  # separable Gaussian, reflect-free zero padding as in the reference implementation
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(t.shape[1], 1, 1, window), padding=(0, pad), groups=t.shape[1])
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(t.shape[1], 1, window, 1), padding=(pad, 0), groups=t.shape[1])

    stats = blur(torch.cat([x[0], x[1], x[0] * x[0], x[1] * x[1], x[0] * x[1]], dim=0)[None])[0]
    mu_a, mu_b, aa, bb, ab = stats.split(c)
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=0)[..., None]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x [H, W, C]`` over pixels where ``mask [H, W, 1]`` > 0 (all pixels if None)."""
    if mask is None:
        return x.mean()
    w = mask.expand_as(x)
    return (x * w).sum() / w.sum().clamp_min(1.0)


def mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return masked_mean((a - b) ** 2, mask)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB for images in [0, 1] (inside ``mask`` if given)."""
    m = float(mse(a.detach().float().clamp(0, 1), b.detach().float(), mask))
    return 10 * math.log10(1.0 / max(m, 1e-12))




def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[H, W, 3]`` float in [0, 1] -> uint8 (rounded)."""
    return (image.detach().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """uint8 RGB ``[H, W, 3]`` -> JPEG bytes (OpenCV, which the preprocess extra brings)."""
    import cv2

    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()
