"""The avatar: Gaussians, input encodings, deformation networks, the layered composite
(:mod:`~gsavatar.model.avatar`), its audio input (:mod:`~gsavatar.model.audio`) and its files
(:mod:`~gsavatar.model.io`: the checkpoint format and :func:`~gsavatar.model.io.load_run`)."""
