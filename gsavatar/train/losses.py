"""Training losses on ``[H, W, C]`` tensors in [0, 1] (the shared arithmetic is in :mod:`gsavatar.imaging`)."""

from __future__ import annotations

import torch

from gsavatar.imaging import ssim_map


def photometric(render: torch.Tensor, target: torch.Tensor, ssim_weight: float,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - w) L1 + w (1 - SSIM), per-pixel ``weight [H, W, 1]`` (None: uniform)."""
    l1 = (render - target).abs()
    loss = (1 - ssim_weight) * l1.mean(dim=-1, keepdim=True)
    if ssim_weight > 0:
        loss = loss + ssim_weight * (1 - ssim_map(render, target))
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


def lpips_if_available(device):
    """The LPIPS network (AlexNet v0.1, images ``[B, 3, H, W]`` in [0, 1]) if its weight files are on
    disk, else None (:func:`gsavatar.eval.load_lpips`). Nothing is ever downloaded."""
    from gsavatar.eval import load_lpips

    return load_lpips(device)[0]
