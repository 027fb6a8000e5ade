"""Adaptive density control (clone, split, prune) as a strategy separate from the model.

The strategy holds no tensors itself: its state is an explicit dict (saved in checkpoints)
and the optimizer surgery is done by small pure functions, so the Gaussian set never owns
an optimizer. Hooks: :meth:`DensifyStrategy.before_backward` (keep the screen-space
gradient) and :meth:`DensifyStrategy.after_backward` (accumulate, then densify/prune on
schedule).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from gsavatar.config import DensifyConfig
from gsavatar.model.gaussians import PARAM_NAMES, GaussianSet
from gsavatar.tracking.camera import quat_to_matrix


def _replace_params(gaussians: GaussianSet, optimizer: torch.optim.Optimizer,
                    param_fn: Callable[[str, torch.Tensor], torch.Tensor],
                    state_fn: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Swap every Gaussian parameter for ``param_fn(name, p)`` and its Adam moments for ``state_fn(key, v)``."""
    by_param = {id(p): name for name, p in gaussians.params.items()}
    for group in optimizer.param_groups:
        old = group["params"][0]
        name = by_param[id(old)]
        new = torch.nn.Parameter(param_fn(name, old.detach()), requires_grad=old.requires_grad)
        state = optimizer.state.pop(old, None)
        if state:
            optimizer.state[new] = {k: (state_fn(k, v) if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in state.items()}
        group["params"] = [new]
        gaussians.params[name] = new


def select(gaussians: GaussianSet, optimizer: torch.optim.Optimizer, keep: torch.Tensor) -> None:
    """Keep only the Gaussians where ``keep`` is true."""
    _replace_params(gaussians, optimizer, lambda n, p: p[keep], lambda k, v: v[keep])


def append(gaussians: GaussianSet, optimizer: torch.optim.Optimizer, new: dict[str, torch.Tensor]) -> None:
    """Append Gaussians (``new[name]`` per parameter); their Adam moments start at zero."""
    _replace_params(gaussians, optimizer, lambda n, p: torch.cat([p, new[n]]),
                    lambda k, v: torch.cat([v, v.new_zeros((len(new["means"]),) + v.shape[1:])]))


@dataclasses.dataclass
class DensifyStrategy:
    """Clone small Gaussians and split large ones where the screen-space gradient is high; prune transparent ones."""

    cfg: DensifyConfig
    max_gaussians: int

    def initial_state(self, num: int, device) -> dict[str, torch.Tensor]:
        return {"grad2d": torch.zeros(num, device=device), "count": torch.zeros(num, device=device)}

    def before_backward(self, means2d: torch.Tensor) -> None:
        if means2d.requires_grad:
            means2d.retain_grad()

    def after_backward(self, state: dict, gaussians: GaussianSet, optimizer: torch.optim.Optimizer,
                       means2d: torch.Tensor, radii: torch.Tensor, width: int, height: int,
                       step: int, stage_iterations: int, generator: torch.Generator) -> dict | None:
        """Accumulate statistics; on schedule, densify and prune. Returns a summary when it acted."""
        cfg = self.cfg
        stop = int(cfg.stop_fraction * stage_iterations)
        if step >= stop or means2d.grad is None:
            return None
        grad = means2d.grad.detach() * torch.tensor([width / 2, height / 2], device=means2d.device)  # NDC units
        seen = radii > 0
        state["grad2d"][seen] += grad[seen].norm(dim=-1)
        state["count"][seen] += 1
        summary = None
        if step >= cfg.start and step % cfg.every == 0:
            summary = self.densify_and_prune(state, gaussians, optimizer, generator)
            for k in state:
                state[k] = torch.zeros(len(gaussians), device=state[k].device)
        if cfg.reset_opacity_every and step > 0 and step % cfg.reset_opacity_every == 0:
            self.reset_opacity(gaussians, optimizer)
            summary = {**(summary or {}), "opacity_reset": True}
        return summary

    def densify_and_prune(self, state, gaussians, optimizer, generator) -> dict:
        cfg = self.cfg
        avg = state["grad2d"] / state["count"].clamp_min(1)
        high = avg > cfg.grad_threshold
        budget = max(0, self.max_gaussians - len(gaussians))
        if int(high.sum()) > budget:  # keep only the strongest within the budget
            order = torch.argsort(avg, descending=True)[:budget]
            high = torch.zeros_like(high)
            high[order] = True
        big = torch.exp(gaussians.log_scales.detach()).max(dim=1).values > cfg.split_scale
        clone, split = high & ~big, high & big
        n_clone, n_split = int(clone.sum()), int(split.sum())
        with torch.no_grad():
            p = {n: gaussians.params[n].detach() for n in PARAM_NAMES}
            new = {n: torch.cat([p[n][clone], p[n][split], p[n][split]]) for n in PARAM_NAMES}
            if n_split:
                # Two samples from each split Gaussian, at 1/1.6 of its scale (3DGS).
                scales = torch.exp(p["log_scales"][split]).repeat(2, 1)
                rot = quat_to_matrix(p["quats"][split]).repeat(2, 1, 1)
                # A CPU generator: the same stream on any device.
                noise = torch.randn(scales.shape, generator=generator).to(scales.device) * scales
                offset = torch.einsum("nij,nj->ni", rot, noise)
                new["means"][n_clone:] = new["means"][n_clone:] + offset
                new["log_scales"][n_clone:] = new["log_scales"][n_clone:] - torch.log(torch.tensor(1.6))
            append(gaussians, optimizer, new)
            # Remove the split originals and the (nearly) transparent ones.
            keep = torch.cat([~split, torch.ones(n_clone + 2 * n_split, dtype=torch.bool, device=split.device)])
            keep &= torch.sigmoid(gaussians.params["opacity_logits"].detach()) > cfg.prune_opacity
            n_pruned = int((~keep).sum()) - n_split
            select(gaussians, optimizer, keep)
        return {"cloned": n_clone, "split": n_split, "pruned": n_pruned, "total": len(gaussians)}

    def reset_opacity(self, gaussians: GaussianSet, optimizer: torch.optim.Optimizer) -> None:
        """Clamp opacities to at most 0.01 so that useless Gaussians can be pruned (3DGS)."""
        limit = float(torch.log(torch.tensor(0.01 / 0.99)))
        _replace_params(gaussians, optimizer,
                        lambda n, p: p.clamp_max(limit) if n == "opacity_logits" else p,
                        lambda k, v: v)
        for group in optimizer.param_groups:  # fresh moments for the reset opacities
            p = group["params"][0]
            if p is gaussians.params["opacity_logits"] and p in optimizer.state:
                for v in optimizer.state[p].values():
                    if torch.is_tensor(v) and v.ndim > 0:
                        v.zero_()
