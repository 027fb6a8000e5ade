"""The avatar's render-time cache of what a frame does not depend on (``Avatar.canonical``): the same
images as the uncached path, rebuilt whenever a parameter or buffer changes, never used while
gradients are recorded."""

from __future__ import annotations

import torch
from conftest import assert_same_image_but_cutoff_flips, driven_avatar


def _uncached(avatar, inputs):
    """The frame as training computes it (gradients recorded, so nothing is cached), detached."""
    with torch.enable_grad():
        return avatar(inputs, backend="torch").image.detach()


def test_cached_frames_equal_uncached_frames_and_follow_every_change(avatar_file):
    avatar, inputs = driven_avatar(avatar_file, "cpu")
    other = driven_avatar(avatar_file, "cpu")[1]
    other.audio = other.audio.flip(0)  # another frame: other audio, same canonical part
    with torch.no_grad():
        first = avatar(inputs, backend="torch").image
        assert {b for b, _ in avatar._canonical_cache if b in ("face", "mouth", "torso")} == {"face", "mouth", "torso"}
        cache = dict(avatar._canonical_cache)
        second = avatar(other, backend="torch").image
        assert all(avatar._canonical_cache[b] is cache[b] for b in cache)  # reused, not rebuilt
    # The first layer's sum is split into parts: equal up to float32 rounding of the deformation.
    # That moves the offsets by a few ulps (~1e-7 relative), the Gaussians by far less than a
    # thousandth of a pixel, so a colour by < 1e-6 (1e-5 leaves 10x for other CPUs' summation
    # orders), but for Gaussians on the 1/255 cut-off (an avatar trained with an AVX2 build had
    # one after the optimizer step below: 16 pixels up to 1.1e-3).
    for cached, inp in ((first, inputs), (second, other)):
        assert_same_image_but_cutoff_flips(cached, _uncached(avatar, inp), "cached frame")
    assert (first - second).abs().max() > 1e-3  # the audio still moves the face

    # An optimizer step (in place), a replaced parameter (densification) and a changed buffer each
    # invalidate it: the next frame equals the uncached frame of the changed avatar.
    def step():
        optimizer = torch.optim.SGD(avatar.parameters(), lr=1e-2)
        avatar.zero_grad()
        avatar(inputs, backend="torch").image.square().mean().backward()
        optimizer.step()

    def replace():
        face = avatar.gaussians["face"].params
        with torch.no_grad():
            face["opacity_logits"] = torch.nn.Parameter(face["opacity_logits"] - 1.0)

    def buffer():
        with torch.no_grad():
            avatar.audio_mean.add_(0.3)

    for change in (step, replace, buffer):
        with torch.no_grad():
            before = avatar(inputs, backend="torch").image
        change()
        with torch.no_grad():
            after = avatar(inputs, backend="torch").image
        assert_same_image_but_cutoff_flips(after, _uncached(avatar, inputs), change.__name__)
        assert (after - before).abs().max() > 1e-4, change.__name__  # a stale cache would give `before`


def test_nothing_is_cached_while_gradients_are_recorded(avatar_file):
    avatar, inputs = driven_avatar(avatar_file, "cpu")
    image = avatar(inputs, backend="torch").image
    assert avatar._canonical_cache == {} and image.requires_grad
    image.sum().backward()
    assert avatar.face_deformer.decoder[0].weight.grad is not None  # the nets are in the graph
