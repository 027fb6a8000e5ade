"""Subject data: decoding, landmarks, masks, background plate, signals, audio features, and
the on-disk subject dataset that every later stage reads through :mod:`gsavatar.data.dataset`.

Submodules import their heavy dependencies (PyAV, mediapipe, opencv) lazily.
"""
