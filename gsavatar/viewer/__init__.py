"""The browser viewer (``gsavatar view``): viser is imported only by :mod:`gsavatar.viewer.server`
(its private internals only by :mod:`gsavatar.viewer._viser_compat`).

    from gsavatar.viewer import start_viewer
    viewer = start_viewer("runs/talk", audio="speech.wav", port=8080)   # returns at once
    print(viewer.url); ...; viewer.stop()
"""

from __future__ import annotations


def start_viewer(*args, **kwargs):
    """See :func:`gsavatar.viewer.server.start_viewer`."""
    from gsavatar.viewer.server import start_viewer as _start

    return _start(*args, **kwargs)


def serve(*args, **kwargs) -> None:
    """See :func:`gsavatar.viewer.server.serve`."""
    from gsavatar.viewer.server import serve as _serve

    return _serve(*args, **kwargs)


__all__ = ["serve", "start_viewer"]
