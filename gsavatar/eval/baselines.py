"""Trivial baselines and the one scoring loop every method goes through.

A figure means little without a reference: an avatar must beat (a) the mean training frame
and (b) the training frame whose audio is nearest to the test frame's audio, both scored on
the same test frames, at the same resolution and with the same masks as the avatar.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from gsavatar.train.data import TrainingData
from gsavatar.train.losses import mse


def score(predict: Callable[[int], torch.Tensor], data: TrainingData, indices=None) -> dict:
    """PSNR (dB) over the test split, full frame and inside the face mask: mean MSE over frames, then dB."""
    idx = data.test_indices if indices is None else np.asarray(indices)
    full, face = [], []
    for i in idx:
        frame = data.frame(int(i))
        image = predict(int(i)).clamp(0, 1)
        full.append(float(mse(image, frame.image)))
        if float(frame.face.sum()) > 0:  # a frame without a face mask has no face score (not a perfect one)
            face.append(float(mse(image, frame.image, frame.face)))
    db = lambda e: 10 * math.log10(1 / max(float(np.mean(e)), 1e-12)) if e else None  # noqa: E731
    return {"psnr": db(full), "psnr_face": db(face), "frames": len(idx)}


def avatar_predictor(avatar, cfg, data: TrainingData, audio: torch.Tensor | None = None,
                     true_torso: bool = False) -> Callable[[int], torch.Tensor]:
    """Render frame ``index`` with the avatar (its tracked camera, pose and blink), driven by
    ``audio`` (``[N, S, D]`` features; default: the subject's own). ``true_torso``: draw only the
    face and mouth, over the frame itself with its (dilated) head replaced by the background
    plate, i.e. the truth's own torso and background: the protocol of methods that paste the
    torso from the video (TalkingGaussian, ER-NeRF), whose published figures it compares with."""
    from gsavatar.model.avatar import audio_context

    from gsavatar.render import PairBudget

    a = cfg.avatar
    budget = PairBudget()

    @torch.no_grad()
    def predict(index: int) -> torch.Tensor:
        back = data.frame(index).back if true_torso else None
        inputs = data.inputs(index, a.audio_smoothing_frames, a.audio_window_radius, back=back)
        if audio is not None:
            inputs.audio = audio_context(audio, index, a.audio_window_radius, a.audio_smoothing_frames)
        return avatar.render_settled(inputs, budget).image.clamp(0, 1)

    return predict


def mean_frame(data: TrainingData) -> Callable[[int], torch.Tensor]:
    """Predict every frame as the mean training frame."""
    total = None
    for i in data.train_indices:
        img = data.frame(int(i)).image
        total = img.clone() if total is None else total.add_(img)
    mean = total / len(data.train_indices)
    return lambda index: mean


def nearest_training_frames(data: TrainingData, features: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """For each frame of ``features [M, S, D]``, the training frame whose normalised audio features
    over frames +-``radius`` are nearest (Euclidean)."""
    norm = lambda f: ((f.to(data.audio.device) - data.audio_mean) / data.audio_std).flatten(1)  # noqa: E731
    offsets = torch.arange(-radius, radius + 1, device=data.audio.device)

    def windows(feats, idx):
        return feats[(idx[:, None] + offsets).clamp(0, feats.shape[0] - 1)].flatten(1)

    own = norm(data.audio)
    train = torch.as_tensor(data.train_indices, device=data.audio.device)
    query = norm(features)
    chosen = [torch.cdist(windows(query, rows), windows(own, train)).argmin(1)
              for rows in torch.arange(query.shape[0], device=query.device).split(256)]
    return train[torch.cat(chosen)]


def nearest_audio_frame(data: TrainingData, radius: int = 2) -> Callable[[int], torch.Tensor]:
    """Predict a frame as the training frame whose normalised audio features (frames +-radius) are nearest."""
    chosen = nearest_training_frames(data, data.audio, radius)
    return lambda index: data.frame(int(chosen[index])).image
