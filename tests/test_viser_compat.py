"""The viser internals the viewer relies on (gsavatar/viewer/_viser_compat.py), checked against the
installed viser on a real server and a real websocket connection.

These tests fail, never skip, when a viser release moves or reshapes one of them: the remedy is
to adapt _viser_compat.py and widen the tested range (here and in pyproject.toml's ``viewer``
extra), or to install a viser in the range. They skip only when viser is not installed.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
import time
from pathlib import Path

import pytest

viser = pytest.importorskip("viser", reason="viser is not installed (pip install 'gsavatar[viewer]'): nothing to check")

from gsavatar.errors import MissingDependencyError  # noqa: E402
from gsavatar.viewer import _viser_compat as compat  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def server_and_tab():
    """A real viser server and one tab connected to it over a websocket (no browser): the tab
    sends viser's first camera message, which makes it a connected client."""
    from viser import _messages
    from websockets.sync.client import connect

    server = viser.ViserServer(host="127.0.0.1", port=_free_port(), verbose=False)
    ws = None
    try:
        ws = connect(f"ws://127.0.0.1:{server.get_port()}", subprotocols=[f"viser-v{viser.__version__}"],
                     max_size=None, open_timeout=20)

        def drain() -> None:  # read (and drop) what the server sends
            try:
                for _ in ws:
                    pass
            except Exception:  # closed
                pass

        threading.Thread(target=drain, daemon=True).start()

        def send(message) -> None:
            import msgspec

            ws.send(msgspec.msgpack.encode(message.as_serializable_dict()))

        send(_messages.ViewerCameraMessage(wxyz=(1.0, 0.0, 0.0, 0.0), position=(0.0, 0.0, 0.0), fov=0.8, near=0.01,
                                           far=100.0, image_height=400, image_width=400, look_at=(0.0, 0.0, 1.0),
                                           up_direction=(0.0, -1.0, 0.0)))
        client = _wait(lambda: next(iter(server.get_clients().values()), None), timeout=30, what="the tab to connect")
        yield server, client, send
    finally:
        if ws is not None:
            ws.close()
        server.stop()


def test_the_installed_viser_has_every_internal_the_viewer_uses():
    missing = compat.missing_internals()
    assert not missing, (f"viser {viser.__version__} lacks internals gsavatar/viewer/_viser_compat.py uses: {missing} "
                         f"(tested range {compat.TESTED_RANGE})")
    compat.require_internals()  # and the viewer's start-up check agrees


def test_the_message_classes_have_the_fields_used():
    from viser import _messages

    for name, fields in compat.MESSAGE_FIELDS.items():
        cls = getattr(_messages, name, None)
        assert cls is not None, f"viser._messages.{name} is gone (viser {viser.__version__})"
        assert dataclasses.is_dataclass(cls), f"viser._messages.{name} is no longer a dataclass"
        have = {f.name for f in dataclasses.fields(cls)}
        assert set(fields) <= have, f"viser._messages.{name} lost fields {sorted(set(fields) - have)}"
        assert not cls.__dataclass_params__.frozen, f"viser._messages.{name} is frozen: the upload gate rewrites its fields"
    start, part, ack = compat.upload_message_classes()
    assert (start.__name__, part.__name__, ack.__name__) == ("FileTransferStartUpload", "FileTransferPart",
                                                             "FileTransferPartAck")


def test_a_real_server_and_connection_have_the_private_attributes(server_and_tab):
    server, client, _ = server_and_tab
    ws_server = getattr(server, "_websock_server", None)
    assert ws_server is not None, "ViserServer._websock_server is gone"
    assert callable(getattr(ws_server, "register_handler", None)), "ViserServer._websock_server.register_handler is gone"
    conn = getattr(client, "_websock_connection", None)
    assert conn is not None, "ClientHandle._websock_connection is gone"
    assert callable(getattr(conn, "queue_message", None)), "ClientHandle._websock_connection.queue_message is gone"
    assert callable(getattr(conn, "register_handler", None))
    # The functions built on them run against this server without error.
    _, _, ack = compat.upload_message_classes()
    assert compat.acknowledge_upload(client, "button", "transfer", 10)
    assert compat.remove_notification(client, "upload-transfer")
    assert compat.send_to_client(client, ack(source_component_uuid=None, transfer_uuid="t", transferred_bytes=0,
                                             total_bytes=0))


def test_server_handlers_see_a_message_before_the_tab_and_can_change_it(server_and_tab):
    """The upload gate's premise: a handler registered through register_server_handler runs before
    the handlers on the tab's connection (where the tab's GUI listens), on the same message object."""
    from viser import _messages

    server, client, send = server_and_tab
    seen: list[tuple[str, str]] = []

    def on_server(client_id, message) -> None:
        seen.append(("server", message.filename))
        message.filename = "changed.wav"

    def on_tab(client_id, message) -> None:
        seen.append(("tab", message.filename))

    compat.register_server_handler(server, _messages.FileTransferStartUpload, on_server)
    client._websock_connection.register_handler(_messages.FileTransferStartUpload, on_tab)
    send(_messages.FileTransferStartUpload(source_component_uuid="nobody", transfer_uuid="t1", filename="a.wav",
                                           mime_type="audio/wav", part_count=0, size_bytes=0))
    _wait(lambda: len(seen) == 2, timeout=20, what="both handlers")
    assert seen == [("server", "a.wav"), ("tab", "changed.wav")]


def test_viewer_start_fails_in_one_line_without_the_internals(monkeypatch):
    monkeypatch.setattr(compat, "missing_internals", lambda: ["viser.ViserServer._websock_server"])
    with pytest.raises(MissingDependencyError) as e:
        compat.require_internals()
    msg = str(e.value)
    assert "\n" not in msg and viser.__version__ in msg and compat.TESTED_RANGE in msg and "_websock_server" in msg

    from gsavatar.viewer.server import Viewer

    with pytest.raises(MissingDependencyError, match=re.escape(compat.TESTED_RANGE)):
        Viewer("no-such-run")  # before the run is even looked for


def test_the_pin_in_pyproject_is_the_tested_range():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["viewer"] == [f"viser{compat.TESTED_RANGE}"]
    low, high = re.fullmatch(r">=([\d.]+),<([\d.]+)", compat.TESTED_RANGE).groups()
    version = tuple(int(x) for x in re.findall(r"\d+", viser.__version__)[:3])
    assert tuple(int(x) for x in low.split(".")) <= version < tuple(int(x) for x in high.split(".")), (
        f"viser {viser.__version__} is outside the tested range {compat.TESTED_RANGE}: run these tests against it "
        "and widen the range (here and in pyproject.toml) if they pass")
