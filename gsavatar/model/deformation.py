"""Deformation networks: audio (+ blink, + head pose) -> per-Gaussian offsets.

Face: tri-plane hash features of each canonical centre; an audio feature (encoded window,
then smoothed by attention over neighbouring frames) and a blink feature, each multiplied
channel-wise by a "region attention" gate computed from the spatial features; a decoder MLP
-> offsets of position, rotation (added to the quaternion) and log-scale.
Mouth: the same with one frame code (audio, or the face's predicted lip motion), position offsets only.
Torso: camera-frame Gaussians; hash features + the head pose -> position offsets.
Each ``forward`` takes the render layer's ``backend`` (None: the reference), which runs the hash grids.

For rendering, each net splits into what does not depend on the frame (:meth:`canonical`: the
spatial features of the canonical centres, the region-attention gates, the decoder's first layer
on the spatial features) and what does (:meth:`from_canonical`: the audio conditioner, the
rest of the decoder); ``from_canonical(canonical(xyz), ...)`` equals ``forward(xyz, ...)`` up
to float rounding (the first layer's sum is split in parts). The avatar keeps the canonical part
while its parameters do not change (see :class:`gsavatar.model.avatar.Avatar`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gsavatar.config import BranchConfig
from gsavatar.model.encoding import HashGrid, TriPlaneEncoder


def mlp(inp: int, hidden: int, out: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = inp
    for _ in range(layers - 1):
        mods += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    mods.append(nn.Linear(width, out))
    return nn.Sequential(*mods)


def _first_layer_part(layer: nn.Linear, x: torch.Tensor, start: int) -> torch.Tensor:
    """``x @ W[:, start:start + x.shape[1]]^T``: the part of ``layer`` that reads inputs ``start...``."""
    return x @ layer.weight[:, start:start + x.shape[1]].t()


def _first_layer_on_spatial(layer: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """The part of ``layer`` that reads the spatial features ``h`` (its first inputs), with its bias."""
    return torch.addmm(layer.bias, h, layer.weight[:, :h.shape[1]].t())


def _first_layer_gated(layer: nn.Linear, c: "CanonicalFeatures", frame: torch.Tensor) -> torch.Tensor:
    """The first layer's output for gated frame inputs ``c.gates * frame`` (its last inputs):
    ``c.first + (c.gates * frame) @ W_gated^T``, computed as ``c.gates @ (frame * W_gated^T)`` so
    that the per-Gaussian product is never formed (one multiply-add over the Gaussians)."""
    start = layer.in_features - frame.shape[0]
    return torch.addmm(c.first, c.gates, frame[:, None] * layer.weight[:, start:].t())


def _rest_of_decoder(decoder: nn.Sequential, first: torch.Tensor) -> torch.Tensor:
    """The decoder after its first linear layer, from that layer's output."""
    return decoder[1:](first)


@dataclasses.dataclass(frozen=True)
class CanonicalFeatures:
    """What a deformation net computes from the canonical centres alone (the same every frame)."""

    first: torch.Tensor  # [G, hidden] the decoder's first layer on the spatial features, with its bias
    gates: torch.Tensor | None = None  # [G, K] region attention of the K frame inputs (audio, then blink)


class AudioEncoder(nn.Module):
    """Feature window ``[B, W, S, D]`` (W frames x S steps of D-dim features) -> ``[B, out]``.

    A strided 1-D conv net over time (channels = feature dims), then a linear layer over the
    flattened time axis: it learns where in the window to look (a mean over the window would
    blur syllables, which last 5-8 frames).
    """

    def __init__(self, feature_dim: int, out_dim: int, steps: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(feature_dim, 64, 3, stride=2, padding=1), nn.LeakyReLU(0.02, inplace=True),
            nn.Conv1d(64, 64, 3, stride=2, padding=1), nn.LeakyReLU(0.02, inplace=True),
            nn.Conv1d(64, 64, 3, stride=1, padding=1), nn.LeakyReLU(0.02, inplace=True),
        )
        reduced = (steps + 1) // 2
        reduced = (reduced + 1) // 2
        self.head = nn.Linear(64 * reduced, out_dim)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        b, w, s, d = window.shape
        x = window.reshape(b, w * s, d).transpose(1, 2)  # [B, D, T]
        return self.head(self.net(x).flatten(1))


class AudioAttention(nn.Module):
    """Blend the encoded audio of ``K`` neighbouring frames ``[B, K, C] -> [B, C]`` with learned weights.

    The scores start with a learnable prior peaked on the centre frame: uniform weights at
    the start would average a whole syllable away and the net would have to unlearn it.
    """

    def __init__(self, dim: int, frames: int):
        super().__init__()
        self.score = nn.Sequential(nn.Conv1d(dim, 16, 3, padding=1), nn.LeakyReLU(0.02, inplace=True),
                                   nn.Conv1d(16, 1, 3, padding=1))
        offset = torch.arange(frames, dtype=torch.float32) - frames // 2
        self.prior = nn.Parameter(-offset**2)  # log-weights: e^-1 for the next frames, e^-4 two away

    def forward(self, encoded: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(encoded.transpose(1, 2)) + self.prior, dim=2)  # [B, 1, K]
        return (weights.transpose(1, 2) * encoded).sum(dim=1)


class AudioConditioner(nn.Module):
    """Audio windows of ``K`` neighbouring frames ``[K, W, S, D]`` -> one smoothed feature ``[C]``."""

    def __init__(self, feature_dim: int, out_dim: int, steps: int, frames: int):
        super().__init__()
        self.encoder = AudioEncoder(feature_dim, out_dim, steps)
        self.attention = AudioAttention(out_dim, frames)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.attention(self.encoder(windows)[None])[0]


class FaceDeformer(nn.Module):
    """Canonical centres ``[G, 3]`` + audio + blink -> (d_position [G,3] m, d_quat [G,4], d_log_scale [G,3])."""

    def __init__(self, cfg: BranchConfig, feature_dim: int, audio_steps: int, audio_frames: int, audio_dim: int,
                 blink_dim: int, bound: float):
        super().__init__()
        self.position_scale = cfg.position_scale
        self.spatial = TriPlaneEncoder(cfg.hash, bound)
        f = self.spatial.output_dim
        self.audio = AudioConditioner(feature_dim, audio_dim, audio_steps, audio_frames)
        self.blink = nn.Linear(1, blink_dim)
        self.audio_gate = mlp(f, 32, audio_dim, 2)  # region attention
        self.blink_gate = mlp(f, 32, blink_dim, 2)
        self.decoder = mlp(f + audio_dim + blink_dim, cfg.hidden, 10, cfg.layers)
        nn.init.zeros_(self.decoder[-1].weight)  # start from the canonical shape
        nn.init.zeros_(self.decoder[-1].bias)

    def forward(self, xyz: torch.Tensor, audio_windows: torch.Tensor, blink: torch.Tensor, backend=None):
        h = self.spatial(xyz, backend)
        a = self.audio(audio_windows)  # [C]
        e = self.blink(blink.reshape(1, 1))  # [1, E]
        a = torch.sigmoid(self.audio_gate(h)) * a[None]
        e = torch.sigmoid(self.blink_gate(h)) * e
        out = self.decoder(torch.cat([h, a, e], dim=1))
        return out[:, :3], out[:, 3:7], out[:, 7:10]

    def canonical(self, xyz: torch.Tensor, backend=None) -> CanonicalFeatures:
        h = self.spatial(xyz, backend)
        gates = torch.cat([torch.sigmoid(self.audio_gate(h)), torch.sigmoid(self.blink_gate(h))], dim=1)
        return CanonicalFeatures(_first_layer_on_spatial(self.decoder[0], h), gates)

    def from_canonical(self, c: CanonicalFeatures, audio_windows: torch.Tensor, blink: torch.Tensor):
        """:meth:`forward` from :meth:`canonical`'s features."""
        frame = torch.cat([self.audio(audio_windows), self.blink(blink.reshape(1, 1))[0]])
        out = _rest_of_decoder(self.decoder, _first_layer_gated(self.decoder[0], c, frame))
        return out[:, :3], out[:, 3:7], out[:, 7:10]


class MouthDeformer(nn.Module):
    """Canonical centres + one frame code -> position offsets (network units; times ``position_scale`` = metres).

    ``follows="audio"``: the code comes from the mouth's own audio encoder, learnt from pixels alone.
    ``"lips"``: it is read from the face net's predicted motion of the lips and chin (``motion_dim``
    numbers, see :meth:`gsavatar.model.avatar.Avatar.lip_motion`), so teeth and cavity move with the
    lips the face draws, whatever the speech.
    """

    def __init__(self, cfg: BranchConfig, follows: str, code_dim: int, bound: float, *, motion_dim: int = 0,
                 feature_dim: int = 0, audio_steps: int = 0, audio_frames: int = 0):
        super().__init__()
        self.position_scale = cfg.position_scale
        self.follows = follows
        self.spatial = TriPlaneEncoder(cfg.hash, bound)
        f = self.spatial.output_dim
        if follows == "lips":
            self.lips = nn.Linear(motion_dim, code_dim)
        else:
            self.audio = AudioConditioner(feature_dim, code_dim, audio_steps, audio_frames)
        self.audio_gate = mlp(f, 32, code_dim, 2)  # region attention (named so in every saved avatar)
        self.decoder = mlp(f + code_dim, cfg.hidden, 3, cfg.layers)
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

    def code(self, lip_motion: torch.Tensor | None = None, audio_windows: torch.Tensor | None = None) -> torch.Tensor:
        """The frame code ``[C]``: from ``lip_motion [motion_dim]`` or normalised ``audio_windows``, as the net follows."""
        return self.lips(lip_motion) if self.follows == "lips" else self.audio(audio_windows)

    def forward(self, xyz: torch.Tensor, code: torch.Tensor, backend=None) -> torch.Tensor:
        h = self.spatial(xyz, backend)
        return self.decoder(torch.cat([h, torch.sigmoid(self.audio_gate(h)) * code[None]], dim=1))

    def canonical(self, xyz: torch.Tensor, backend=None) -> CanonicalFeatures:
        h = self.spatial(xyz, backend)
        return CanonicalFeatures(_first_layer_on_spatial(self.decoder[0], h), torch.sigmoid(self.audio_gate(h)))

    def from_canonical(self, c: CanonicalFeatures, code: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` from :meth:`canonical`'s features."""
        return _rest_of_decoder(self.decoder, _first_layer_gated(self.decoder[0], c, code))


class TorsoDeformer(nn.Module):
    """Camera-frame centres + head pose (axis-angle, translation relative to the mean pose) -> position offsets."""

    POSE_DIM = 6

    def __init__(self, cfg: BranchConfig, bound: float):
        super().__init__()
        self.position_scale = cfg.position_scale
        self.bound = bound
        self.spatial = HashGrid(3, cfg.hash)
        self.decoder = mlp(self.spatial.output_dim + self.POSE_DIM, cfg.hidden, 3, cfg.layers)
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

    def forward(self, xyz: torch.Tensor, centre: torch.Tensor, pose: torch.Tensor, backend=None) -> torch.Tensor:
        h = self.spatial(self._unit(xyz, centre), backend)
        return self.decoder(torch.cat([h, pose.reshape(1, -1).expand(len(xyz), -1)], dim=1))

    def _unit(self, xyz: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        return ((xyz - centre) / (2 * self.bound) + 0.5).clamp(0, 1)

    def canonical(self, xyz: torch.Tensor, centre: torch.Tensor, backend=None) -> CanonicalFeatures:
        h = self.spatial(self._unit(xyz, centre), backend)
        return CanonicalFeatures(_first_layer_on_spatial(self.decoder[0], h))

    def from_canonical(self, c: CanonicalFeatures, pose: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` from :meth:`canonical`'s features (the pose adds one vector to the first layer)."""
        f = self.decoder[0].in_features - self.POSE_DIM
        return _rest_of_decoder(self.decoder, c.first + _first_layer_part(self.decoder[0], pose.reshape(1, -1), f))
