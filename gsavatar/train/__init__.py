"""Training: the staged loop (stages as data), losses, densification strategy, sampler and initialisation.

It reads the subject through :mod:`gsavatar.data.frames`, writes avatars with
:mod:`gsavatar.model.io` and scores its result with :func:`gsavatar.eval.score_test_split`.
"""
