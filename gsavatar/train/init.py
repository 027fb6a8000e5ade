"""Initial Gaussians and the avatar skeleton, from the subject's tracking and one reference frame.

Starting from the tracked face rather than random points is what lets a CPU run converge in
minutes: face Gaussians start on the landmark surface and on the head silhouette, coloured
from a reference frame; mouth Gaussians fill a box behind the inner lips; torso Gaussians sit
on the torso pixels, in the camera frame, behind the head.
"""

from __future__ import annotations

import numpy as np
import torch

from gsavatar.config import TrainConfig
from gsavatar.data.frames import SubjectFrames
from gsavatar.model.audio import AudioSpec
from gsavatar.model.avatar import Avatar
from gsavatar.model.gaussians import GaussianSet, nearest_neighbour_scale

MOUTH_COLOUR = (0.35, 0.12, 0.13)  # dark red: what an open mouth mostly shows before training


def audio_spec(data: SubjectFrames) -> AudioSpec:
    """The audio features ``data`` trains on, as the avatar records them."""
    description = data.dataset.audio_feature_description(data.audio_kind)
    return AudioSpec(kind=data.audio_kind, extractor=description, feature_dim=int(data.audio.shape[-1]),
                     steps_per_frame=int(data.audio.shape[1]))


def reference_frame(data: SubjectFrames) -> int:
    """A valid training frame with the mouth closed and the head near its median pose."""
    idx = data.train_indices[data.valid[data.train_indices].numpy()]
    if len(idx) == 0:
        idx = data.train_indices
    closed = idx[data.mouth_open[idx] <= np.percentile(data.mouth_open[idx], 30)]
    poses = data.poses[closed].cpu().numpy()
    dist = np.linalg.norm((poses - np.median(poses, 0)) / (poses.std(0) + 1e-6), axis=1)
    return int(closed[np.argmin(dist)])


def _project(points_cam: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    return (points_cam[:, :2] / points_cam[:, 2:3]) * torch.stack([K[0, 0], K[1, 1]]) + torch.stack([K[0, 2], K[1, 2]])


def _back_project(uv: torch.Tensor, z: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    xy = (uv - torch.stack([K[0, 2], K[1, 2]])) / torch.stack([K[0, 0], K[1, 1]]) * z[:, None]
    return torch.cat([xy, z[:, None]], dim=1)


def _sample_colours(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    h, w = image.shape[:2]
    x = uv[:, 0].floor().long().clamp(0, w - 1)
    y = uv[:, 1].floor().long().clamp(0, h - 1)
    return image[y, x]


def _pixels(mask: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` random pixel centres (u, v) inside ``mask [H, W, 1]``."""
    ys, xs = torch.nonzero(mask[..., 0] > 0.5, as_tuple=True)
    if len(ys) == 0:
        return torch.zeros(0, 2)
    pick = torch.randint(len(ys), (count,), generator=gen)
    jitter = torch.rand(count, 2, generator=gen)
    return torch.stack([xs[pick], ys[pick]], dim=1).float() + jitter


def build_avatar(cfg: TrainConfig, data: SubjectFrames, gen: torch.Generator) -> Avatar:
    ref = reference_frame(data)
    frame = data.frame(ref)
    image = frame.image.cpu()
    viewmat = data.viewmats[ref].cpu()
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    K = data.K.cpu()
    a = cfg.avatar

    # Face: half on the landmark surface (random points in triangles of neighbouring
    # landmarks), half on head-mask pixels back-projected to the depth of the nearest landmark.
    mean = data.model_mean.cpu()
    n_surface = a.face.num_gaussians // 2
    knn = torch.cdist(mean, mean).topk(7, largest=False).indices[:, 1:]  # [V, 6]
    i = torch.randint(len(mean), (n_surface,), generator=gen)
    j = knn[i, torch.randint(6, (n_surface,), generator=gen)]
    k = knn[i, torch.randint(6, (n_surface,), generator=gen)]
    w = torch.rand(n_surface, 3, generator=gen) + 1e-3
    w = w / w.sum(1, keepdim=True)
    surface = w[:, :1] * mean[i] + w[:, 1:2] * mean[j] + w[:, 2:] * mean[k]
    lm_cam = mean @ R.T + t
    lm_uv = _project(lm_cam, K)
    head_only = frame.head.cpu() * (1 - frame.mouth_region.cpu())
    uv = _pixels(head_only, a.face.num_gaussians - n_surface, gen)
    nearest = torch.cdist(uv, lm_uv).argmin(dim=1)
    outside = (torch.cdist(uv, lm_uv).min(dim=1).values > 0.02 * data.size).float()
    z = lm_cam[nearest, 2] + 0.01 * outside  # hair and ears sit a little behind the face outline
    silhouette = (_back_project(uv, z, K) - t) @ R  # camera -> head frame
    face_xyz = torch.cat([surface, silhouette])
    face_uv = _project(face_xyz @ R.T + t, K)
    face = GaussianSet(face_xyz, _sample_colours(image, face_uv),
                       nearest_neighbour_scale(face_xyz).clamp(0.3 * a.face.init_scale, 2 * a.face.init_scale),
                       a.face.init_opacity, a.face.sh_degree)

    # Mouth: a box behind the inner lips, tall enough for the jaw to open.
    from gsavatar.data.landmarks import INNER_LIPS, MOUTH_ANCHORS

    lips = mean[INNER_LIPS]
    lo, hi = lips.min(0).values, lips.max(0).values
    width = hi[0] - lo[0]
    box_lo = torch.stack([lo[0] + 0.1 * width, lo[1] - 0.003, hi[2] + 0.002])
    box_hi = torch.stack([hi[0] - 0.1 * width, hi[1] + 0.025, hi[2] + 0.02])
    mouth_xyz = box_lo + torch.rand(a.mouth.num_gaussians, 3, generator=gen) * (box_hi - box_lo)
    mouth_rgb = torch.tensor(MOUTH_COLOUR).expand(len(mouth_xyz), 3)
    mouth = GaussianSet(mouth_xyz, mouth_rgb, a.mouth.init_scale, a.mouth.init_opacity, a.mouth.sh_degree)

    # Torso: torso pixels back-projected a little behind the head, in the camera frame.
    torso_mask = frame.torso.cpu()
    if torso_mask.sum() < 16:  # no torso visible: a few Gaussians below the head, mostly transparent
        torso_mask = torch.zeros_like(torso_mask)
        torso_mask[-max(2, data.size // 8):] = 1
    uv = _pixels(torso_mask, a.torso.num_gaussians, gen)
    depth = float(t[2]) + 0.08
    torso_xyz = _back_project(uv, torch.full((len(uv),), depth), K)
    pixel_m = depth / float(K[0, 0]) * float(torch.sqrt(torso_mask.sum() / len(uv)))
    torso = GaussianSet(torso_xyz, _sample_colours(image, uv), 1.5 * pixel_m, a.torso.init_opacity, a.torso.sh_degree)

    train_poses = data.poses[torch.as_tensor(data.train_indices)]
    pose_mean = train_poses.mean(0).cpu()
    pose_scale = train_poses.std(0).cpu().clamp_min(torch.tensor([0.02, 0.02, 0.02, 0.005, 0.005, 0.005]))
    return Avatar(a, audio_spec(data), face, mouth, torso, data.background.cpu(), data.audio_mean.cpu(),
                  data.audio_std.cpu(), pose_mean, pose_scale, torso_xyz.mean(0),
                  lip_anchors=mean[MOUTH_ANCHORS].clone() if a.mouth_follows == "lips" else None)
