"""The avatar: three Gaussian branches, their deformation networks, and the layered composite.

    C = C_face + (1 - A_face) * (C_mouth + (1 - A_mouth) * C_back),
    C_back = C_torso + (1 - A_torso) * background

Face and mouth Gaussians live in the canonical head frame (metres, see
gsavatar.tracking.camera) and are seen through the tracked head pose; torso Gaussians live in
the camera frame and move with the head pose through their own network, so any length of
audio can be rendered. The background is a buffer (the subject's clean plate) that any image
can replace at render time. This module knows nothing of files or training.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import nn

from gsavatar.config import AvatarConfig
from gsavatar.kernels import KIND_OF_BACKEND
from gsavatar.model.deformation import FaceDeformer, MouthDeformer, TorsoDeformer
from gsavatar.model.gaussians import GaussianSet

BRANCHES = ("face", "mouth", "torso")
LAYERS = ("face", "mouth", "torso", "background")


@dataclasses.dataclass
class FrameInputs:
    """What one rendered frame needs (all tensors on the avatar's device)."""

    viewmat: torch.Tensor  # [4, 4] head frame -> camera (OpenCV)
    K: torch.Tensor  # [3, 3] intrinsics in pixels at (width, height)
    width: int
    height: int
    audio: torch.Tensor  # [neighbours, 2r+1, S, D] raw audio feature windows (see audio_context)
    blink: torch.Tensor  # [] 0 open .. 1 closed
    pose: torch.Tensor  # [6] head axis-angle (rad) and translation (m), i.e. the camera's view of the head
    background: torch.Tensor | None = None  # [H, W, 3] in [0, 1]; None: the avatar's own plate
    back: torch.Tensor | None = None  # [H, W, 3]: use this instead of rendering torso + background
    camera: torch.Tensor | None = None  # [4, 4] rigid transform of camera-frame points (a novel view); None: identity


class BranchRender(NamedTuple):
    color: torch.Tensor  # [H, W, 3] premultiplied
    alpha: torch.Tensor  # [H, W, 1]
    means2d: torch.Tensor  # [G, 2] (retain_grad for densification)
    radii: torch.Tensor  # [G]
    offsets: torch.Tensor | None  # [G, 3] position offsets in network units (None when not deformed)


class AvatarRender(NamedTuple):
    image: torch.Tensor  # [H, W, 3] the full composite
    back: torch.Tensor  # [H, W, 3] torso over background (or the given ``back``)
    branches: dict  # name -> BranchRender for the branches rendered


def audio_context(features: torch.Tensor, index: int, radius: int, neighbours: int) -> torch.Tensor:
    """Windows ``[neighbours, 2*radius+1, S, D]`` for frames ``index - neighbours//2 ...`` (edges replicated)."""
    n = features.shape[0]
    centres = torch.arange(neighbours, device=features.device) + (index - neighbours // 2)
    offsets = torch.arange(-radius, radius + 1, device=features.device)
    return features[(centres[:, None] + offsets[None, :]).clamp(0, n - 1)]


class Avatar(nn.Module):
    def __init__(self, cfg: AvatarConfig, feature_dim: int, steps_per_frame: int, face: GaussianSet, mouth: GaussianSet, torso: GaussianSet,
                 background: torch.Tensor, audio_mean: torch.Tensor, audio_std: torch.Tensor,
                 pose_mean: torch.Tensor, pose_scale: torch.Tensor, torso_centre: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.steps_per_frame = steps_per_frame
        audio_steps = (2 * cfg.audio_window_radius + 1) * steps_per_frame
        self.gaussians = nn.ModuleDict({"face": face, "mouth": mouth, "torso": torso})
        self.face_deformer = FaceDeformer(cfg.face, feature_dim, audio_steps, cfg.audio_smoothing_frames, cfg.audio_dim, cfg.blink_dim, cfg.hash_bound)
        self.mouth_deformer = MouthDeformer(cfg.mouth, feature_dim, audio_steps, cfg.audio_smoothing_frames, cfg.audio_dim, cfg.hash_bound)
        self.torso_deformer = TorsoDeformer(cfg.torso, bound=0.6)
        self.register_buffer("background", background)  # [H, W, 3] float in [0, 1]
        self.register_buffer("audio_mean", audio_mean)  # [D]
        self.register_buffer("audio_std", audio_std)  # [D]
        self.register_buffer("pose_mean", pose_mean)  # [6]
        self.register_buffer("pose_scale", pose_scale)  # [6]
        self.register_buffer("torso_centre", torso_centre)  # [3] camera frame

    def deformers(self) -> dict[str, nn.Module]:
        return {"face": self.face_deformer, "mouth": self.mouth_deformer, "torso": self.torso_deformer}

    def normalise_audio(self, audio: torch.Tensor) -> torch.Tensor:
        return (audio - self.audio_mean) / self.audio_std

    def face_offsets(self, xyz: torch.Tensor, inputs: FrameInputs):
        """Face-net offsets at arbitrary canonical points (the trainer also queries landmarks)."""
        return self.face_deformer(xyz, self.normalise_audio(inputs.audio), inputs.blink)

    def deformed(self, branch: str, inputs: FrameInputs, deform: bool = True):
        """``(means, quats, scales, opacities, sh, offsets)`` of a branch for one frame."""
        g: GaussianSet = self.gaussians[branch]
        means, quats, log_scales, offsets = g.means, g.quats, g.log_scales, None
        if deform and branch == "face":
            offsets, d_quat, d_scale = self.face_offsets(means.detach(), inputs)
            means = means + offsets * self.face_deformer.position_scale
            quats = quats + d_quat
            log_scales = log_scales + d_scale
        elif deform and branch == "mouth":
            offsets = self.mouth_deformer(means.detach(), self.normalise_audio(inputs.audio))
            means = means + offsets * self.mouth_deformer.position_scale
        elif deform and branch == "torso":
            pose = (inputs.pose - self.pose_mean) / self.pose_scale
            offsets = self.torso_deformer(means.detach(), self.torso_centre, pose)
            means = means + offsets * self.torso_deformer.position_scale
        return means, quats, torch.exp(log_scales), g.opacities, g.sh, offsets

    @staticmethod
    def branch_viewmat(branch: str, inputs: FrameInputs) -> torch.Tensor:
        """World-to-camera matrix of a branch: the torso lives in the camera frame, face and mouth in
        the head frame; a novel-view ``camera`` moves every branch alike."""
        v = inputs.viewmat
        camera = inputs.camera if inputs.camera is not None else torch.eye(4, dtype=v.dtype, device=v.device)
        return camera if branch == "torso" else camera @ v

    def render_branch(self, branch: str, inputs: FrameInputs, deform: bool = True, backend: str = "torch") -> BranchRender:
        from gsavatar.render import rasterize

        means, quats, scales, opacities, sh, offsets = self.deformed(branch, inputs, deform)
        viewmat = self.branch_viewmat(branch, inputs)
        g: GaussianSet = self.gaussians[branch]
        out = rasterize(means, quats, scales, opacities, sh, viewmat, inputs.K, inputs.width, inputs.height,
                        sh_degree=g.sh_degree, backend=backend,
                        tile_size=8 if means.device.type == "cpu" else 16)  # 8: ~1.5x faster on CPU, same image
        return BranchRender(out.color, out.alpha, out.means2d, out.radii, offsets)

    def render_branches_together(self, branches: list[str], inputs: FrameInputs, deform: dict[str, bool],
                                 backend: str, pair_budget=None) -> dict[str, BranchRender]:
        """Each branch into its own layer in one pass of the compiled kernels (one binning, one sort,
        one compositing launch and one host synchronisation for all of them, none with a
        ``pair_budget``)."""
        from gsavatar.render._compiled import Group, rasterize_groups

        groups, offsets = [], []
        for b in branches:
            means, quats, scales, opacities, sh, off = self.deformed(b, inputs, deform[b])
            groups.append(Group(means, quats, scales, opacities, sh, self.gaussians[b].sh_degree,
                                self.branch_viewmat(b, inputs)))
            offsets.append(off)
        layers = rasterize_groups(KIND_OF_BACKEND[backend], groups, inputs.K, inputs.width, inputs.height,
                                  pair_budget=pair_budget)
        return {b: BranchRender(color, alpha, means2d, radii, off)
                for b, (color, alpha, _depth, means2d, radii, _vis), off in zip(branches, layers, offsets)}

    def background_image(self, inputs: FrameInputs) -> torch.Tensor:
        bg = inputs.background if inputs.background is not None else self.background
        if bg.shape[0] != inputs.height or bg.shape[1] != inputs.width:
            bg = nn.functional.interpolate(bg.permute(2, 0, 1)[None], size=(inputs.height, inputs.width),
                                           mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        return bg

    def forward(self, inputs: FrameInputs, layers=LAYERS, deform: bool | dict = True, backend: str = "auto",
                pair_budget=None) -> AvatarRender:
        """Render one frame. ``layers`` picks what is drawn; ``deform`` may be a per-branch dict;
        ``backend`` is the rasterizer's (``"auto"``: our CUDA kernels on a GPU, else the reference).
        ``pair_budget`` (a :class:`gsavatar.render.PairBudget`, compiled backends with several
        branches) makes the frame free of host synchronisations: call its ``settle()`` when reading
        the frames back and render again those that did not fit."""
        from gsavatar.render import resolve_backend

        unknown = set(layers) - set(LAYERS)
        if unknown:
            raise ValueError(f"unknown layers {sorted(unknown)}; choose from {LAYERS}")
        backend = resolve_backend(backend, self.background.device)
        h, w = inputs.height, inputs.width
        zeros = inputs.viewmat.new_zeros(h, w, 3)
        wanted = [b for b in BRANCHES if b in layers and not (b == "torso" and inputs.back is not None)]
        deform_of = {b: deform.get(b, True) if isinstance(deform, dict) else deform for b in wanted}
        if backend in KIND_OF_BACKEND and len(wanted) > 1:  # a compiled backend: one pass for all
            renders = self.render_branches_together(wanted, inputs, deform_of, backend, pair_budget)
        else:
            renders = {b: self.render_branch(b, inputs, deform_of[b], backend) for b in wanted}
        if inputs.back is not None:
            back = inputs.back
        else:
            back = self.background_image(inputs) if "background" in layers else zeros
            if "torso" in renders:
                back = renders["torso"].color + (1 - renders["torso"].alpha) * back
        image = back
        for b in ("mouth", "face"):
            if b in renders:
                image = renders[b].color + (1 - renders[b].alpha) * image
        return AvatarRender(image, back, renders)

    def render_settled(self, inputs: FrameInputs, pair_budget, **kwargs) -> AvatarRender:
        """``forward`` with ``pair_budget``, settled at once, for callers that read each frame back
        anyway: the frame makes no host synchronisation mid-frame, and settling waits for the GPU
        just as reading the pixels would. A frame that needed more (tile, Gaussian) pairs than the
        budget gave is rendered again, the budget grown."""
        out = self(inputs, pair_budget=pair_budget, **kwargs)
        if pair_budget is None or pair_budget.settle():
            return out
        out = self(inputs, pair_budget=pair_budget, **kwargs)
        pair_budget.settle()  # grown past this frame's need, so it fitted; clear its record
        return out

    def num_gaussians(self) -> dict[str, int]:
        return {b: len(self.gaussians[b]) for b in BRANCHES}
