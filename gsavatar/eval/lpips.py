"""LPIPS (Zhang et al. 2018, AlexNet variant, v0.1) from weight files already on disk.

The ``lpips`` package builds its backbone through torchvision, which has no CPU build on our
machines, and fetches the backbone weights at run time, which we never do. So the network is
written out here (AlexNet's five conv stages, unit-normalised activations, squared difference,
the learned 1x1 "linear" heads, spatial mean, summed over stages), and its two weight files are
looked for locally:

- the AlexNet backbone: torchvision's ``alexnet-owt-7be5be79.pth`` (keys ``features.N.*``), in
  ``$GSAVATAR_LPIPS_DIR`` or torch's hub cache (``torch.hub.get_dir()/checkpoints``);
- the linear heads: ``alex.pth`` of LPIPS v0.1 (keys ``lin0.model.1.weight`` ...), in
  ``$GSAVATAR_LPIPS_DIR`` or the installed ``lpips`` package's ``weights/v0.1`` folder.

When either is missing, LPIPS is reported as unavailable with the reason; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

BACKBONE_FILE = "alexnet-owt-7be5be79.pth"
HEADS_FILE = "alex.pth"
# Input normalisation of LPIPS (inputs scaled to [-1, 1] first).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
CHANNELS = (64, 192, 384, 256, 256)


class AlexLPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        # (index in torchvision's `features`, conv): stage outputs are taken after each ReLU.
        self.convs = nn.ModuleDict({
            "0": nn.Conv2d(3, 64, 11, stride=4, padding=2), "3": nn.Conv2d(64, 192, 5, padding=2),
            "6": nn.Conv2d(192, 384, 3, padding=1), "8": nn.Conv2d(384, 256, 3, padding=1),
            "10": nn.Conv2d(256, 256, 3, padding=1),
        })
        self.heads = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        pool = nn.functional.max_pool2d
        relu = nn.functional.relu
        c = self.convs
        h1 = relu(c["0"](x))
        h2 = relu(c["3"](pool(h1, 3, 2)))
        h3 = relu(c["6"](pool(h2, 3, 2)))
        h4 = relu(c["8"](h3))
        h5 = relu(c["10"](h4))
        return [h1, h2, h3, h4, h5]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance of ``[B, 3, H, W]`` images in [0, 1] -> ``[B]``."""
        fa = self.stages(((a * 2 - 1) - self.shift) / self.scale)
        fb = self.stages(((b * 2 - 1) - self.shift) / self.scale)
        total = 0
        for x, y, head in zip(fa, fb, self.heads):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + head((x - y) ** 2).mean((2, 3))
        return total[:, 0]

    def load_weights(self, backbone: dict, heads: dict) -> None:
        for key, conv in self.convs.items():
            conv.weight.data.copy_(backbone[f"features.{key}.weight"])
            conv.bias.data.copy_(backbone[f"features.{key}.bias"])
        for i, head in enumerate(self.heads):
            head.weight.data.copy_(heads[f"lin{i}.model.1.weight"])


def weight_paths() -> tuple[Path | None, Path | None]:
    dirs = [Path(os.environ["GSAVATAR_LPIPS_DIR"])] if os.environ.get("GSAVATAR_LPIPS_DIR") else []
    backbone_dirs = dirs + [Path(torch.hub.get_dir()) / "checkpoints"]
    heads_dirs = list(dirs)
    spec = importlib.util.find_spec("lpips")
    if spec is not None and spec.origin:
        heads_dirs.append(Path(spec.origin).parent / "weights" / "v0.1")
    find = lambda ds, name: next((d / name for d in ds if (d / name).is_file()), None)  # noqa: E731
    return find(backbone_dirs, BACKBONE_FILE), find(heads_dirs, HEADS_FILE)


def load_lpips(device) -> tuple[AlexLPIPS | None, str]:
    """``(network in eval mode, note)``, or ``(None, why)`` when the weight files are not on disk."""
    backbone, heads = weight_paths()
    if backbone is None or heads is None:
        missing = [n for n, p in ((BACKBONE_FILE, backbone), (HEADS_FILE, heads)) if p is None]
        return None, (f"LPIPS not computed: {' and '.join(missing)} not found locally (put them in $GSAVATAR_LPIPS_DIR; "
                      "nothing is downloaded)")
    net = AlexLPIPS()
    net.load_weights(torch.load(backbone, map_location="cpu", weights_only=True),
                     torch.load(heads, map_location="cpu", weights_only=True))
    for p in net.parameters():
        p.requires_grad_(False)  # a fixed metric (also when used as a training loss)
    return net.to(device).eval(), f"LPIPS AlexNet v0.1 from {backbone} and {heads}"


def lpips_function(device) -> tuple[Callable[[torch.Tensor, torch.Tensor], float] | None, str]:
    """``(fn(pred [H,W,3], truth [H,W,3]) -> float, note)``; fn is None when the weights are not on disk."""
    net, note = load_lpips(device)
    if net is None:
        return None, note

    @torch.no_grad()
    def fn(pred: torch.Tensor, truth: torch.Tensor) -> float:
        return float(net(pred.permute(2, 0, 1)[None].float(), truth.permute(2, 0, 1)[None].float())[0])

    return fn, note
