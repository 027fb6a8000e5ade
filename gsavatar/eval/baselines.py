"""Trivial baselines and the one scoring loop every method goes through.

A figure means little without a reference: an avatar must beat (a) the mean training frame
and (b) the training frame whose audio is nearest to the test frame's audio, both scored on
the same test frames, at the same resolution and with the same masks as the avatar.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from gsavatar.data.frames import SubjectFrames
from gsavatar.eval.metrics import mse, psnr_from_mse
from gsavatar.model.audio import audio_windows


def score(predict: Callable[[int], torch.Tensor], data: SubjectFrames, indices=None) -> dict:
    """PSNR (dB) over the test split, full frame and inside the face mask: mean MSE over frames, then dB."""
    idx = data.test_indices if indices is None else np.asarray(indices)
    full, face = [], []
    for i in idx:
        frame = data.frame(int(i))
        image = predict(int(i)).clamp(0, 1)
        full.append(mse(image, frame.image))
        if float(frame.face.sum()) > 0:  # a frame without a face mask has no face score (not a perfect one)
            face.append(mse(image, frame.image, frame.face))
    return {"psnr": psnr_from_mse(full), "psnr_face": psnr_from_mse(face), "frames": len(idx)}


def score_test_split(avatar, data: SubjectFrames, indices=None) -> dict:
    """The avatar's test-split PSNR, full frame and inside the face mask (``indices``: a subset of
    frames), scored exactly as :func:`gsavatar.eval.evaluate_run` and the baselines are."""
    return score(avatar_predictor(avatar, data), data, indices)


def avatar_predictor(avatar, data: SubjectFrames, audio: torch.Tensor | None = None,
                     true_torso: bool = False) -> Callable[[int], torch.Tensor]:
    """Render frame ``index`` with the avatar (its tracked camera, pose and blink), driven by
    ``audio`` (``[N, S, D]`` features; default: the subject's own). ``true_torso``: draw only the
    face and mouth, over the frame itself with its (dilated) head replaced by the background
    plate, i.e. the truth's own torso and background: the protocol of methods that paste the
    torso from the video (TalkingGaussian, ER-NeRF), whose published figures it compares with."""
    @torch.no_grad()
    def predict(index: int) -> torch.Tensor:
        back = data.frame(index).back if true_torso else None
        return avatar(data.inputs(index, avatar, back=back, audio=audio)).image.clamp(0, 1)

    return predict


def mean_frame(data: SubjectFrames) -> Callable[[int], torch.Tensor]:
    """Predict every frame as the mean training frame."""
    total = None
    for i in data.train_indices:
        img = data.frame(int(i)).image
        total = img.clone() if total is None else total.add_(img)
    mean = total / len(data.train_indices)
    return lambda index: mean


def nearest_training_frames(data: SubjectFrames, features: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """For each frame of ``features [M, S, D]``, the training frame whose normalised audio features
    over frames +-``radius`` are nearest (Euclidean)."""
    norm = lambda f: ((f.to(data.audio.device) - data.audio_mean) / data.audio_std).flatten(1)  # noqa: E731

    def windows(feats, idx):
        return audio_windows(feats, idx, radius, radius).flatten(1)

    own = norm(data.audio)
    train = torch.as_tensor(data.train_indices, device=data.audio.device)
    query = norm(features)
    chosen = [torch.cdist(windows(query, rows), windows(own, train)).argmin(1)
              for rows in torch.arange(query.shape[0], device=query.device).split(256)]
    return train[torch.cat(chosen)]


def nearest_audio_frame(data: SubjectFrames, radius: int = 2) -> Callable[[int], torch.Tensor]:
    """Predict a frame as the training frame whose normalised audio features (frames +-radius) are nearest."""
    chosen = nearest_training_frames(data, data.audio, radius)
    return lambda index: data.frame(int(chosen[index])).image
