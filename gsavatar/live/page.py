"""The browser page of ``gsavatar live``: a viser page with a microphone button.

The button's handler (``page.js``, inlined: viser runs inline handlers, not ``<script>``
elements) opens the live WebSocket from the browser, streams the microphone to it and draws the
frames that come back over the page, their audio played in step. The page is one more client of
the same protocol; the server does not know it from any other.
"""

from __future__ import annotations

import html
import re
from importlib.resources import files

STATUS_ID = "gsavatar-live-status"


def page_script(ws_port: int, name: str = "page.js") -> str:
    """``name`` (page.js: the microphone over the WebSocket; webrtc.js: a WebRTC call) for a live
    server on ``ws_port``, fit for an inline handler (comments dropped)."""
    source = files("gsavatar.live").joinpath(name).read_text()
    lines = []
    for line in source.splitlines():
        if line.strip().startswith("//"):
            continue
        lines.append(re.sub(r"\s+//\s.*$", "", line))  # trailing comments (never "ws://": no space before it)
    return "\n".join(lines).replace("__WS_PORT__", str(int(ws_port)))


BUTTON_STYLE = "width:100%;padding:8px;font-size:1em;margin-top:4px"


def button_html(ws_port: int, webrtc: bool = False) -> str:
    """The page's buttons: the microphone over the WebSocket, a WebRTC call (``webrtc``), the status line."""
    mic = html.escape(page_script(ws_port), quote=True)
    out = f'<button id="gsavatar-live-mic" style="{BUTTON_STYLE}" onclick="{mic}">Start microphone</button>'
    if webrtc:
        call = html.escape(page_script(ws_port, "webrtc.js"), quote=True)
        out += f'<button id="gsavatar-live-call" style="{BUTTON_STYLE}" onclick="{call}">Start a WebRTC call</button>'
    return out + f'<div id="{STATUS_ID}" style="margin-top:6px;opacity:0.8">idle</div>'


def webrtc_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("aiortc") is not None


class LivePage:
    """The viser page (``host``, ``port``) that talks to the live server on ``ws_port``."""

    def __init__(self, ws_port: int, lookahead_ms: float, host: str = "127.0.0.1", port: int = 8080):
        import viser

        self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.server.gui.configure_theme(control_width="large", show_logo=False)
        self.server.gui.add_markdown(
            "**gsavatar live**: press the button and speak; the avatar speaks it back "
            f"(it reads {lookahead_ms:.0f} ms of speech ahead of each frame). Headphones avoid an echo.")
        self.server.gui.add_html(button_html(ws_port, webrtc=webrtc_available()))

    @property
    def url(self) -> str:
        return f"http://{self.server.get_host()}:{self.server.get_port()}"

    def stop(self) -> None:
        self.server.stop()
