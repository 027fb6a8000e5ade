"""The avatar: three Gaussian branches, their deformation networks, and the layered composite.

    C = C_face + (1 - A_face) * (C_mouth + (1 - A_mouth) * C_back),
    C_back = C_torso + (1 - A_torso) * background

Face and mouth Gaussians live in the canonical head frame (metres, see
gsavatar.tracking.camera) and are seen through the tracked head pose; torso Gaussians live in
the camera frame and move with the head pose through their own network, so any length of
audio can be rendered. The background is a buffer (the subject's clean plate) that any image
can replace at render time. This module knows nothing of files, training or rendering
backends: it deforms each branch's Gaussians and composites the layers that
:func:`gsavatar.render.rasterize_layers` draws with the backend it is given.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import nn

from gsavatar.config import AvatarConfig
from gsavatar.model.audio import AudioSpec, audio_windows
from gsavatar.model.deformation import CanonicalFeatures, FaceDeformer, MouthDeformer, TorsoDeformer
from gsavatar.model.gaussians import GaussianSet
from gsavatar.render import LayerGaussians, get_backend, rasterize_layers

BRANCHES = ("face", "mouth", "torso")
LAYERS = ("face", "mouth", "torso", "background")


@dataclasses.dataclass
class FrameInputs:
    """What one rendered frame needs (all tensors on the avatar's device)."""

    viewmat: torch.Tensor  # [4, 4] head frame -> camera (OpenCV)
    K: torch.Tensor  # [3, 3] intrinsics in pixels at (width, height)
    width: int
    height: int
    audio: torch.Tensor  # [neighbours, 2r+1, S, D] raw audio feature windows (see Avatar.audio_input)
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


def _resized(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``image [H, W, 3]`` resized bilinearly to ``height`` x ``width``."""
    return nn.functional.interpolate(image.permute(2, 0, 1)[None], size=(height, width), mode="bilinear",
                                     align_corners=False)[0].permute(1, 2, 0)


@dataclasses.dataclass(frozen=True)
class CanonicalBranch:
    """What a branch's frame costs without the frame: its net's :class:`CanonicalFeatures` and the
    activations of its canonical Gaussians (scales where no net changes them)."""

    features: CanonicalFeatures
    scales: torch.Tensor  # exp(log_scales)
    opacities: torch.Tensor
    sh: torch.Tensor


class Avatar(nn.Module):
    """The avatar; ``audio_spec`` says which audio features drive it (:meth:`audio_input` cuts them).

    Rendering without gradients (``torch.no_grad()``: render, eval, the viewer) computes what does
    not depend on the frame once (:class:`CanonicalBranch`) and keeps it while no parameter or
    buffer changes: the key is each tensor's storage, shape and version counter, which every
    in-place update (an optimizer step, ``copy_``, ``load_state_dict``) and every replacement
    (densification) changes. Only writes through ``.data`` escape it (gsavatar makes none). With
    gradients recorded (training) nothing is cached.
    """

    def __init__(self, cfg: AvatarConfig, audio_spec: AudioSpec, face: GaussianSet, mouth: GaussianSet,
                 torso: GaussianSet, background: torch.Tensor, audio_mean: torch.Tensor, audio_std: torch.Tensor,
                 pose_mean: torch.Tensor, pose_scale: torch.Tensor, torso_centre: torch.Tensor,
                 lip_anchors: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.audio_spec = audio_spec
        feature_dim = audio_spec.feature_dim
        audio_steps = (sum(cfg.audio_window()) + 1) * audio_spec.steps_per_frame
        self.gaussians = nn.ModuleDict({"face": face, "mouth": mouth, "torso": torso})
        self.face_deformer = FaceDeformer(cfg.face, feature_dim, audio_steps, cfg.audio_smoothing_frames, cfg.audio_dim,
                                          cfg.blink_dim, cfg.hash_bound)
        if cfg.mouth_follows == "lips" and lip_anchors is None:
            raise ValueError("an avatar whose mouth follows the lips needs the lips' canonical anchors")
        self.mouth_deformer = MouthDeformer(
            cfg.mouth, cfg.mouth_follows, cfg.audio_dim, cfg.hash_bound,
            motion_dim=0 if lip_anchors is None else lip_anchors.numel(),
            feature_dim=feature_dim, audio_steps=audio_steps, audio_frames=cfg.audio_smoothing_frames)
        self.torso_deformer = TorsoDeformer(cfg.torso, bound=0.6)
        self.register_buffer("background", background)  # [H, W, 3] float in [0, 1]
        self.register_buffer("audio_mean", audio_mean)  # [D]
        self.register_buffer("audio_std", audio_std)  # [D]
        self.register_buffer("pose_mean", pose_mean)  # [6]
        self.register_buffer("pose_scale", pose_scale)  # [6]
        self.register_buffer("torso_centre", torso_centre)  # [3] camera frame
        if cfg.mouth_follows == "lips":
            # [A, 3] canonical points of the lips and chin (gsavatar.data.landmarks.MOUTH_ANCHORS): where the
            # face net's motion is read for the mouth net (see lip_motion)
            self.register_buffer("lip_anchors", lip_anchors)
        self._canonical_cache: dict[tuple, CanonicalBranch | CanonicalFeatures | torch.Tensor] = {}
        self._canonical_key: tuple | None = None

    def deformers(self) -> dict[str, nn.Module]:
        return {"face": self.face_deformer, "mouth": self.mouth_deformer, "torso": self.torso_deformer}

    # -- inputs -----------------------------------------------------------------------------
    def audio_input(self, features: torch.Tensor, index: int) -> torch.Tensor:
        """The model's audio input for frame ``index`` of ``features [N, S, D]`` (raw features made by
        :attr:`audio_spec`'s extractor): ``[neighbours, past + 1 + future, S, D]``, edges replicated.
        The one place a window is cut; normalisation happens inside the avatar."""
        before, after = self.cfg.audio_neighbours()
        centres = torch.arange(-before, after + 1, device=features.device) + index
        return audio_windows(features, centres, *self.cfg.audio_window())

    def frame_inputs(self, features: torch.Tensor, index: int, *, viewmat: torch.Tensor, K: torch.Tensor, size: int,
                     blink: torch.Tensor, pose: torch.Tensor, back: torch.Tensor | None = None,
                     background: torch.Tensor | None = None, camera: torch.Tensor | None = None) -> FrameInputs:
        """:class:`FrameInputs` of frame ``index`` driven by ``features [N, S, D]`` (square ``size``)."""
        return FrameInputs(viewmat=viewmat, K=K, width=size, height=size, audio=self.audio_input(features, index),
                           blink=blink, pose=pose, background=background, back=back, camera=camera)

    def normalise_audio(self, audio: torch.Tensor) -> torch.Tensor:
        return (audio - self.audio_mean) / self.audio_std

    # -- deformation --------------------------------------------------------------------------
    def face_offsets(self, xyz: torch.Tensor, inputs: FrameInputs, backend="torch"):
        """Face-net offsets at arbitrary canonical points (the trainer also queries landmarks)."""
        backend = get_backend(backend, xyz.device)
        return self.face_deformer(xyz, self.normalise_audio(inputs.audio), inputs.blink, backend)

    def lip_motion(self, inputs: FrameInputs, backend="torch", cached: bool = False) -> torch.Tensor:
        """``[3A]`` the face net's motion of :attr:`lip_anchors` (cm) for one frame, without gradients:
        what the mouth net reads, so the mouth learns to follow the lips, never to move them.
        ``cached``: the cache is known to be current (no gradients recorded)."""
        backend = get_backend(backend, self.lip_anchors.device)
        audio = self.normalise_audio(inputs.audio)
        with torch.no_grad():
            if cached:
                key = ("lip_anchors", backend.name)
                if key not in self._canonical_cache:
                    self._canonical_cache[key] = self.face_deformer.canonical(self.lip_anchors, backend)
                offsets, _, _ = self.face_deformer.from_canonical(self._canonical_cache[key], audio, inputs.blink)
            else:
                offsets, _, _ = self.face_deformer(self.lip_anchors, audio, inputs.blink, backend)
        return (offsets * (self.face_deformer.position_scale * 100)).flatten()

    def mouth_code(self, inputs: FrameInputs, backend="torch", cached: bool = False) -> torch.Tensor:
        """The mouth net's frame code: from the audio or the lips' motion (``AvatarConfig.mouth_follows``)."""
        if self.mouth_deformer.follows == "lips":
            return self.mouth_deformer.code(lip_motion=self.lip_motion(inputs, backend, cached))
        return self.mouth_deformer.code(audio_windows=self.normalise_audio(inputs.audio))

    def canonical(self, branch: str, backend) -> CanonicalBranch | None:
        """The branch's frame-independent part for ``backend`` (computed once while nothing changes,
        see the class docstring), or None while gradients are recorded."""
        if torch.is_grad_enabled():
            return None
        self._refresh_cache()
        return self._canonical(branch, backend)

    def _canonical(self, branch: str, backend) -> CanonicalBranch:
        """:meth:`canonical` once the cache is known to be current (one check a frame, not one a branch)."""
        key = (branch, backend.name)
        if key not in self._canonical_cache:
            g: GaussianSet = self.gaussians[branch]
            xyz = g.means
            if branch == "torso":
                features = self.torso_deformer.canonical(xyz, self.torso_centre, backend)
            else:
                features = self.deformers()[branch].canonical(xyz, backend)
            self._canonical_cache[key] = CanonicalBranch(features, torch.exp(g.log_scales), g.opacities, g.sh)
        return self._canonical_cache[key]

    def _refresh_cache(self) -> None:
        """Empty the cache when anything it depends on has changed: every parameter's and buffer's
        storage, version counter, shape and dtype."""
        key = tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in (*self.parameters(), *self.buffers()))
        if key != self._canonical_key:
            self._canonical_cache, self._canonical_key = {}, key

    def deformed(self, branch: str, inputs: FrameInputs, deform: bool = True, backend="torch"):
        """``(means, quats, scales, opacities, sh, offsets)`` of a branch for one frame."""
        backend = get_backend(backend, self.background.device)
        return self._deformed(branch, inputs, deform, backend, self.canonical(branch, backend))

    def _deformed(self, branch: str, inputs: FrameInputs, deform: bool, backend, cached: CanonicalBranch | None):
        """:meth:`deformed` with the branch's canonical part (None: compute everything)."""
        g: GaussianSet = self.gaussians[branch]
        means, quats, log_scales, offsets = g.means, g.quats, g.log_scales, None
        scales = cached.scales if cached is not None else None
        if deform and branch == "face":
            if cached is None:
                offsets, d_quat, d_scale = self.face_offsets(means.detach(), inputs, backend)
            else:
                offsets, d_quat, d_scale = self.face_deformer.from_canonical(
                    cached.features, self.normalise_audio(inputs.audio), inputs.blink)
            means = means + offsets * self.face_deformer.position_scale
            quats = quats + d_quat
            scales = torch.exp(log_scales + d_scale)
        elif deform and branch == "mouth":
            code = self.mouth_code(inputs, backend, cached is not None)
            offsets = (self.mouth_deformer(means.detach(), code, backend) if cached is None
                       else self.mouth_deformer.from_canonical(cached.features, code))
            means = means + offsets * self.mouth_deformer.position_scale
        elif deform and branch == "torso":
            pose = (inputs.pose - self.pose_mean) / self.pose_scale
            offsets = (self.torso_deformer(means.detach(), self.torso_centre, pose, backend) if cached is None
                       else self.torso_deformer.from_canonical(cached.features, pose))
            means = means + offsets * self.torso_deformer.position_scale
        if cached is None:
            return means, quats, torch.exp(log_scales) if scales is None else scales, g.opacities, g.sh, offsets
        return means, quats, scales, cached.opacities, cached.sh, offsets

    @staticmethod
    def branch_viewmat(branch: str, inputs: FrameInputs) -> torch.Tensor:
        """World-to-camera matrix of a branch: the torso lives in the camera frame, face and mouth in
        the head frame; a novel-view ``camera`` moves every branch alike."""
        v = inputs.viewmat
        camera = inputs.camera if inputs.camera is not None else torch.eye(4, dtype=v.dtype, device=v.device)
        return camera if branch == "torso" else camera @ v

    def background_image(self, inputs: FrameInputs) -> torch.Tensor:
        cacheable = not torch.is_grad_enabled()
        if cacheable:
            self._refresh_cache()
        return self._background_image(inputs, cacheable)

    def _background_image(self, inputs: FrameInputs, cacheable: bool) -> torch.Tensor:
        """:meth:`background_image`; ``cacheable``: no gradients and the cache known to be current
        (the plate is resized once for each size)."""
        bg = inputs.background if inputs.background is not None else self.background
        if bg.shape[0] == inputs.height and bg.shape[1] == inputs.width:
            return bg
        if inputs.background is not None or not cacheable:
            return _resized(bg, inputs.height, inputs.width)
        key = ("background", inputs.height, inputs.width)
        if key not in self._canonical_cache:
            self._canonical_cache[key] = _resized(bg, inputs.height, inputs.width)
        return self._canonical_cache[key]

    def forward(self, inputs: FrameInputs, layers=LAYERS, deform: bool | dict = True, backend="auto") -> AvatarRender:
        """Render one frame. ``layers`` picks what is drawn; ``deform`` may be a per-branch dict;
        ``backend`` is the render layer's (a name or a :class:`gsavatar.render.Backend`; ``"auto"``
        lets it choose for the avatar's device)."""
        unknown = set(layers) - set(LAYERS)
        if unknown:
            raise ValueError(f"unknown layers {sorted(unknown)}; choose from {LAYERS}")
        backend = get_backend(backend, self.background.device)
        h, w = inputs.height, inputs.width
        cached = not torch.is_grad_enabled()
        if cached:
            self._refresh_cache()  # once for the whole frame
        wanted = [b for b in BRANCHES if b in layers and not (b == "torso" and inputs.back is not None)]
        gaussians, offsets = [], []
        for b in wanted:
            means, quats, scales, opacities, sh, off = self._deformed(
                b, inputs, deform.get(b, True) if isinstance(deform, dict) else deform, backend,
                self._canonical(b, backend) if cached else None)
            gaussians.append(LayerGaussians(means, quats, scales, opacities, sh, self.gaussians[b].sh_degree,
                                            self.branch_viewmat(b, inputs)))
            offsets.append(off)
        drawn = rasterize_layers(gaussians, inputs.K, w, h, backend)
        renders = {b: BranchRender(layer.color, layer.alpha, layer.means2d, layer.radii, off)
                   for b, layer, off in zip(wanted, drawn, offsets)}
        if inputs.back is not None:
            back = inputs.back
        else:
            back = self._background_image(inputs, cached) if "background" in layers else inputs.viewmat.new_zeros(h, w, 3)
            if "torso" in renders:
                back = backend.over(renders["torso"].color, renders["torso"].alpha, back)
        image = back
        for b in ("mouth", "face"):
            if b in renders:
                image = backend.over(renders[b].color, renders[b].alpha, image)
        return AvatarRender(image, back, renders)

    def num_gaussians(self) -> dict[str, int]:
        return {b: len(self.gaussians[b]) for b in BRANCHES}
