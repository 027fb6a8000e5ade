"""``AvatarConfig.mouth_follows = "lips"``: the inside of the mouth reads the motion the face net
predicts for the lips, learns to follow it without moving it, renders the same through the
render-time cache, and is saved and loaded with its anchors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_same_image_but_cutoff_flips, driven_avatar

from gsavatar.errors import InputError


def _lips_avatar(avatar_file):
    """(avatar, config, checkpoint): the trained avatar with a mouth that follows the lips instead,
    its mouth net random (so that it moves). Any canonical points serve as anchors here: the
    face's first 21 Gaussians, as many as the lips and chin give a trained avatar."""
    from gsavatar.data.landmarks import MOUTH_ANCHORS
    from gsavatar.model.avatar import Avatar
    from gsavatar.model.io import load_checkpoint, load_run

    bundle, ckpt = load_run(avatar_file), load_checkpoint(avatar_file)
    cfg = dataclasses.replace(bundle.config, avatar=dataclasses.replace(bundle.config.avatar, mouth_follows="lips"))
    a, g = bundle.avatar, bundle.avatar.gaussians
    anchors = g["face"].means[:len(MOUTH_ANCHORS)].detach().clone()
    avatar = Avatar(cfg.avatar, bundle.subject.audio, g["face"], g["mouth"], g["torso"], a.background, a.audio_mean,
                    a.audio_std, a.pose_mean, a.pose_scale, a.torso_centre, lip_anchors=anchors)
    missing, unexpected = avatar.load_state_dict(
        {k: v for k, v in ckpt.model.items() if not k.startswith("mouth_deformer.")}, strict=False)
    assert not unexpected and all(k.startswith("mouth_deformer.") or k == "lip_anchors" for k in missing)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in avatar.mouth_deformer.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    return avatar.eval(), cfg, ckpt


def _mouth_offsets(avatar, inputs) -> torch.Tensor:
    with torch.no_grad():
        *_, offsets = avatar.deformed("mouth", inputs, backend="torch")
    return offsets


def test_the_mouth_moves_only_as_the_face_moves_the_lips(avatar_file):
    avatar, _, _ = _lips_avatar(avatar_file)
    inputs = driven_avatar(avatar_file, "cpu")[1]
    other = dataclasses.replace(inputs, audio=inputs.audio.flip(0) + 1.0)  # other speech, same frame otherwise
    # A trained face moves the lips with the audio, and the mouth moves with them.
    assert (avatar.lip_motion(inputs) - avatar.lip_motion(other)).abs().max() > 1e-3
    assert (_mouth_offsets(avatar, inputs) - _mouth_offsets(avatar, other)).abs().max() > 1e-4
    # A face that moves nothing (its last layer zeroed) leaves the inside of the mouth where it is
    # for any speech: the mouth hears nothing by itself.
    with torch.no_grad():
        avatar.face_deformer.decoder[-1].weight.zero_()
        avatar.face_deformer.decoder[-1].bias.zero_()
    assert avatar.lip_motion(inputs).abs().max() == 0
    assert torch.equal(_mouth_offsets(avatar, inputs), _mouth_offsets(avatar, other))


def test_the_mouth_learns_to_follow_the_lips_never_to_move_them(avatar_file):
    avatar, _, _ = _lips_avatar(avatar_file)
    inputs = driven_avatar(avatar_file, "cpu")[1]
    avatar.zero_grad()
    with torch.enable_grad():
        *_, offsets = avatar.deformed("mouth", inputs, backend="torch")
        offsets.square().sum().backward()
    assert avatar.mouth_deformer.lips.weight.grad.abs().max() > 0
    assert all(p.grad is None for p in avatar.face_deformer.parameters())


def test_cached_frames_equal_uncached_frames_and_the_avatar_round_trips(avatar_file, tmp_path):
    from gsavatar.model.io import load_run, save_checkpoint

    avatar, cfg, ckpt = _lips_avatar(avatar_file)
    inputs = driven_avatar(avatar_file, "cpu")[1]
    with torch.no_grad():
        cached = avatar(inputs, backend="torch").image
        assert any(key[0] == "lip_anchors" for key in avatar._canonical_cache)
    with torch.enable_grad():  # nothing cached while gradients are recorded
        uncached = avatar(inputs, backend="torch").image.detach()
    # The first layer's sum is split in parts on the cached path: equal up to float32 rounding, see
    # test_canonical_cache.py.
    assert_same_image_but_cutoff_flips(cached, uncached, "cached frame of a mouth that follows the lips")

    path = tmp_path / "lips.pt"
    save_checkpoint(dataclasses.replace(ckpt, config=dataclasses.asdict(cfg), model=avatar.state_dict()), path)
    loaded = load_run(path)
    assert loaded.avatar.mouth_deformer.follows == "lips"
    assert torch.equal(loaded.avatar.lip_anchors, avatar.lip_anchors)
    with torch.no_grad():
        assert torch.equal(loaded.avatar(inputs, backend="torch").image, cached)


def test_a_mouth_that_follows_the_lips_without_anchors_is_one_line(avatar_file, tmp_path):
    from gsavatar.model.io import load_run, save_checkpoint

    avatar, cfg, ckpt = _lips_avatar(avatar_file)
    state = {k: v for k, v in avatar.state_dict().items() if k != "lip_anchors"}
    path = tmp_path / "no_anchors.pt"
    save_checkpoint(dataclasses.replace(ckpt, config=dataclasses.asdict(cfg), model=state), path)
    with pytest.raises(InputError, match="needs the lips' canonical anchors"):
        load_run(path)


def test_an_unknown_mouth_setting_is_one_line():
    from gsavatar.config import TrainConfig

    cfg = TrainConfig()
    cfg = dataclasses.replace(cfg, avatar=dataclasses.replace(cfg.avatar, mouth_follows="jaw"))
    with pytest.raises(InputError, match=r"^avatar.mouth_follows must be one of audio, lips \(got 'jaw'\)$"):
        cfg.validate()
