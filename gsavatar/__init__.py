"""gsavatar: audio-driven 3D Gaussian-splatting talking-head avatars.

The package imports with only numpy (and torch for the model parts); heavy optional
dependencies (mediapipe, PyAV, faster-whisper, transformers, viser) are imported inside the
functions that need them.
"""

__version__ = "0.1.0"

from gsavatar.errors import GsavatarError  # noqa: E402

__all__ = ["GsavatarError", "__version__"]
