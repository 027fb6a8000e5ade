"""Live: speech streamed in a chunk at a time, the avatar speaking it back at 25 frames per second.

:mod:`gsavatar.live.stream` is the core (a Python API); :mod:`gsavatar.live.protocol` the
WebSocket wire format; :mod:`gsavatar.live.server` the WebSocket server behind ``gsavatar live``.
"""

from gsavatar.live.stream import BacklogError, LiveAvatar, LiveConfig, LiveFrame, LiveStream, as_float_pcm

__all__ = ["BacklogError", "LiveAvatar", "LiveConfig", "LiveFrame", "LiveStream", "as_float_pcm"]
