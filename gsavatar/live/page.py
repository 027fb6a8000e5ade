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


def page_script(ws_port: int) -> str:
    """``page.js`` for a live server on ``ws_port``, fit for an inline handler (comments dropped)."""
    source = files("gsavatar.live").joinpath("page.js").read_text()
    lines = []
    for line in source.splitlines():
        if line.strip().startswith("//"):
            continue
        lines.append(re.sub(r"\s+//\s.*$", "", line))  # trailing comments (never "ws://": no space before it)
    return "\n".join(lines).replace("__WS_PORT__", str(int(ws_port)))


def button_html(ws_port: int) -> str:
    script = html.escape(page_script(ws_port), quote=True)
    return (f'<button id="gsavatar-live-mic" style="width:100%;padding:8px;font-size:1em" onclick="{script}">'
            f'Start microphone</button><div id="{STATUS_ID}" style="margin-top:6px;opacity:0.8">idle</div>')


class LivePage:
    """The viser page (``host``, ``port``) that talks to the live server on ``ws_port``."""

    def __init__(self, ws_port: int, lookahead_ms: float, host: str = "127.0.0.1", port: int = 8080):
        import viser

        self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.server.gui.configure_theme(control_width="large", show_logo=False)
        self.server.gui.add_markdown(
            "**gsavatar live**: press the button and speak; the avatar speaks it back "
            f"(it reads {lookahead_ms:.0f} ms of speech ahead of each frame). Headphones avoid an echo.")
        self.server.gui.add_html(button_html(ws_port))

    @property
    def url(self) -> str:
        return f"http://{self.server.get_host()}:{self.server.get_port()}"

    def stop(self) -> None:
        self.server.stop()
