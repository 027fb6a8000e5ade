"""Every use the viewer makes of viser's private internals, in one place.

viser has no public API for four things the viewer needs:

* looking at an upload's start message and parts *before* viser buffers them (to refuse a file
  from the size it announces, see :func:`gsavatar.viewer.server.install_upload_gate`);
* acknowledging a refused transfer to the tab that sent it (its upload button stays disabled
  until its upload is acknowledged);
* taking down the notification viser's page shows for an upload (the page names it itself);
* refusing what a websocket client sends that viser cannot take (:func:`guard_incoming`): viser
  lets the exception of a frame it cannot decode, or of a message handler, escape into the
  websockets library and asyncio, which log it with a traceback (and drop the connection).

All four go through the websocket layer under :class:`viser.ViserServer`: the server's message
dispatcher (``ViserServer._websock_server``, its raw connections and its dispatch method), a
tab's connection (``ClientHandle._websock_connection``) and viser's message classes
(``viser._messages``). None of these is covered by viser's compatibility promises, so the viewer
pins the range it was tested with (:data:`TESTED_RANGE`, the same as the ``viewer`` extra in
pyproject.toml), checks at start that they are all there (:func:`require_internals`), and
tests/test_viser_compat.py checks each of them against the installed viser, on a real server and
a real connection. Nothing outside this module touches a private viser name.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, Callable

from gsavatar.errors import MissingDependencyError

TESTED_RANGE = ">=1.1.1,<1.2"
"""The viser versions these internals were checked against (the ``viewer`` extra's pin)."""

MESSAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "FileTransferStartUpload": ("source_component_uuid", "transfer_uuid", "filename", "size_bytes", "part_count"),
    "FileTransferPart": ("source_component_uuid", "transfer_uuid", "part_index", "content"),
    "FileTransferPartAck": ("source_component_uuid", "transfer_uuid", "transferred_bytes", "total_bytes"),
    "RemoveNotificationMessage": ("uuid",),
}
"""The classes of ``viser._messages`` used here, with the fields read or set on them."""


def viser_version() -> str:
    """The installed viser's version ("not installed" without one)."""
    try:
        import viser
    except ImportError:
        return "not installed"
    return str(getattr(viser, "__version__", "unknown"))


def _messages():
    """viser's message classes (``viser._messages``): the wire format of every websocket message.
    Dataclasses; the ones in :data:`MESSAGE_FIELDS` are built or changed here."""
    from viser import _messages

    return _messages


def _sets_attribute(cls: type, name: str) -> bool:
    """Whether ``cls.__init__`` assigns an attribute called ``name`` (looked up in its compiled
    code: an instance attribute cannot be seen on the class itself)."""
    init = inspect.unwrap(getattr(cls, "__init__", None))
    code = getattr(init, "__code__", None)
    return code is not None and name in code.co_names


def missing_internals() -> list[str]:
    """What of the internals used here the installed viser lacks: ``[]`` when all are present.

    Checked without starting a server:

    * ``viser._messages`` and, in it, each class of :data:`MESSAGE_FIELDS` as a mutable dataclass
      with those fields (the upload gate rewrites fields of the messages it is shown);
    * ``ViserServer.__init__`` setting ``_websock_server``, and ``ClientHandle.__init__`` setting
      ``_websock_connection``;
    * ``viser.infra.WebsockServer.register_handler``, ``.on_client_connect``,
      ``.on_client_disconnect`` and ``._handle_incoming_message``, ``WebsockServer.__init__``
      setting ``_live_connections``, and ``viser.infra.WebsockClientConnection.queue_message``;
    * ``viser._messages.Message.deserialize`` (what viser decodes each incoming frame with).
    """
    try:
        import viser
    except ImportError:
        return ["viser"]
    missing: list[str] = []
    try:
        messages = _messages()
    except ImportError:
        missing.append("viser._messages")
    else:
        for name, fields in MESSAGE_FIELDS.items():
            cls = getattr(messages, name, None)
            if cls is None or not dataclasses.is_dataclass(cls):
                missing.append(f"viser._messages.{name}")
                continue
            have = {f.name for f in dataclasses.fields(cls)}
            missing += [f"viser._messages.{name}.{f}" for f in fields if f not in have]
            if getattr(getattr(cls, "__dataclass_params__", None), "frozen", False):
                missing.append(f"viser._messages.{name} (now frozen)")
    for cls, attr in ((getattr(viser, "ViserServer", None), "_websock_server"),
                      (getattr(viser, "ClientHandle", None), "_websock_connection")):
        if cls is None or not _sets_attribute(cls, attr):
            missing.append(f"viser.{getattr(cls, '__name__', '?')}.{attr}")
    try:
        from viser import infra
    except ImportError:
        missing.append("viser.infra")
    else:
        for cls_name, method in (("WebsockServer", "register_handler"), ("WebsockServer", "on_client_connect"),
                                 ("WebsockServer", "on_client_disconnect"),
                                 ("WebsockServer", "_handle_incoming_message"),
                                 ("WebsockClientConnection", "queue_message"),
                                 ("WebsockClientConnection", "_handle_incoming_message")):
            if not callable(getattr(getattr(infra, cls_name, None), method, None)):
                missing.append(f"viser.infra.{cls_name}.{method}")
        ws_server = getattr(infra, "WebsockServer", None)
        if ws_server is not None and not _sets_attribute(ws_server, "_live_connections"):
            missing.append("viser.infra.WebsockServer._live_connections")
    if "viser._messages" not in missing and not callable(getattr(getattr(_messages(), "Message", None), "deserialize", None)):
        missing.append("viser._messages.Message.deserialize")
    return missing


def require_internals() -> None:
    """Raise :class:`~gsavatar.errors.MissingDependencyError` (one line naming the installed viser
    version, the tested range and what is missing) unless :func:`missing_internals` is empty.
    The viewer calls it before it starts viser's server."""
    missing = missing_internals()
    if missing:
        raise MissingDependencyError(
            f"viser {viser_version()} lacks internals the viewer relies on ({', '.join(missing)}); the viewer is "
            f"tested with viser{TESTED_RANGE}: pip install 'viser{TESTED_RANGE}'")


def upload_message_classes() -> tuple[type, type, type]:
    """``(FileTransferStartUpload, FileTransferPart, FileTransferPartAck)`` from ``viser._messages``:
    the start of an upload (file name, ``size_bytes``, ``part_count``), one of its parts and the
    acknowledgement the server sends back. Public viser offers uploads only once complete."""
    m = _messages()
    return m.FileTransferStartUpload, m.FileTransferPart, m.FileTransferPartAck


def register_server_handler(server, message_cls: type, callback: Callable[[int, Any], None]) -> None:
    """Have ``callback(client_id, message)`` called for each ``message_cls`` message from any tab.

    Relies on ``server._websock_server.register_handler`` and on the order in which viser's
    websocket server dispatches an incoming message: to the handlers registered on the server
    first, then to those on the tab's connection (``handle_incoming`` in viser/infra/_infra.py
    creates the two tasks in that order, with the same message object). A tab's own GUI
    (``client.gui``) listens on the connection, so such a handler sees, and may change, a message
    before the tab's GUI handles it.
    """
    server._websock_server.register_handler(message_cls, callback)


def send_to_client(client, message) -> bool:
    """Queue a raw viser message for one tab; False where the tab has no connection (any more).
    Relies on ``client._websock_connection.queue_message``: viser sends a tab only what its
    public handles produce."""
    conn = getattr(client, "_websock_connection", None)
    if conn is None:
        return False
    conn.queue_message(message)
    return True


def acknowledge_upload(client, source: str, transfer: str, size: int) -> bool:
    """Tell ``client`` that upload ``transfer`` from button ``source`` is complete (``size`` bytes), which
    re-enables that button in the page (a ``FileTransferPartAck`` with all bytes transferred)."""
    _, _, ack = upload_message_classes()
    size = max(0, int(size))
    return send_to_client(client, ack(source_component_uuid=source, transfer_uuid=transfer, transferred_bytes=size,
                                      total_bytes=size))


def remove_notification(client, uuid: str) -> bool:
    """Take down the page's notification called ``uuid`` (a ``RemoveNotificationMessage``); one the
    page does not show is ignored. For notifications the page made itself, such as an upload's
    (``"upload-" + transfer id`` in viser's ``UploadButton.tsx``), which have no handle."""
    return send_to_client(client, _messages().RemoveNotificationMessage(uuid=uuid))


def one_line(text: object, limit: int = 200) -> str:
    """``text`` (which a client may have chosen) fit for one line of the server's log: control
    characters (terminal escapes, line breaks) become spaces, at most ``limit`` characters."""
    out = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _address(connection) -> str:
    """The host a raw websocket connection comes from (``remote_address`` of websockets' connection)."""
    address = getattr(connection, "remote_address", None)
    if isinstance(address, (tuple, list)) and address:
        return str(address[0])
    return str(address) if address else "an unknown address"


def undecodable(raw: object) -> str | None:
    """Why viser could not decode the websocket frame ``raw`` into a message, or None where it can.

    Decoded exactly as viser's receive loop does (``viser._messages.Message.deserialize``, the
    class viser's server gives its websocket server): a frame that passes here cannot raise there.
    The reasons are one line each; they may quote what the client sent (see :func:`one_line`)."""
    if isinstance(raw, str):
        return "a text frame (viser's messages are binary MessagePack)"
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return f"a frame of type {type(raw).__name__}"
    import msgspec

    try:
        mapping = msgspec.msgpack.decode(raw)
    except Exception as e:
        return f"not MessagePack ({e})"
    if not isinstance(mapping, dict) or not isinstance(mapping.get("type"), str):
        return "not a viser message (no message type)"
    message_cls = _messages().Message
    name = mapping["type"]
    known = getattr(message_cls, "_subclass_from_type_string", None)  # viser's own type table; else deserialize says
    if callable(known) and name not in known():
        return f"unknown message type {name!r}"
    try:
        message_cls.deserialize(bytes(raw))
    except Exception as e:
        return f"a malformed {name} ({type(e).__name__}: {e})"
    return None


def guard_incoming(server, refused: Callable[[str, str], None]) -> None:
    """Refuse what websocket clients send that viser cannot take, with ``refused(host, reason)`` (at
    most one call per connection) instead of a traceback in the server's log.

    viser (checked against 1.1.1) decodes each incoming frame in its receive loop
    (``_message_consumer`` in viser/infra/_infra.py) and dispatches the message to handler tasks
    (``WebsockMessageHandler._handle_incoming_message``, once on the server, once on the tab's
    connection). A frame it cannot decode (bytes that are not MessagePack, a text frame, an
    unknown message type, missing or extra fields) raises out of the connection's handler, which
    the websockets library logs as "connection handler failed" with a traceback before closing
    the connection; a handler that raises on a message it did decode (a GUI update naming a
    property its element lacks, a value of the wrong type) leaves asyncio to log "Task exception
    was never retrieved" with a traceback. Here:

    * each new connection's raw websocket (``WebsockServer._live_connections[client_id]``, set
      before the connect callbacks of ``WebsockServer.on_client_connect``, which run before the
      receive loop starts) gets a ``recv`` that checks every frame with :func:`undecodable`
      before viser's loop sees it; a frame viser could not decode is refused and the connection
      closed (code 1003 for a text frame, 1007 for any other), which viser's loop takes as the
      client going away;
    * the dispatch of the server and of each connection is wrapped, so that a handler's exception
      is refused instead of logged (the connection stays open: the message was a viser message).

    Only the first refusal of a connection is reported (a client that keeps sending such messages
    adds no more lines). ``refused`` is called on viser's event loop; it must not block.
    """
    ws_server = server._websock_server
    reported: set[int] = set()

    def report(client_id: int, connection, reason: str) -> None:
        if client_id in reported:
            return
        reported.add(client_id)
        try:
            refused(_address(connection), one_line(reason))
        except Exception:  # telling the operator must not break viser's loop
            pass

    def guarded(dispatch, connection_of: Callable[[int], Any]):
        async def dispatch_guarded(client_id, message) -> None:
            try:
                await dispatch(client_id, message)
            except Exception as e:
                report(client_id, connection_of(client_id), f"{type(message).__name__} failed in viser's handler "
                                                            f"({type(e).__name__}: {e})")
        return dispatch_guarded

    def live(client_id: int):
        return ws_server._live_connections.get(client_id)

    def on_connect(conn) -> None:
        client_id = conn.client_id
        reported.discard(client_id)
        connection = live(client_id)
        conn._handle_incoming_message = guarded(conn._handle_incoming_message, lambda _: connection)
        if connection is None:
            return
        recv = connection.recv

        async def recv_checked(*args, **kwargs):
            raw = await recv(*args, **kwargs)
            why = undecodable(raw)
            if why is None:
                return raw
            report(client_id, connection, why)
            await connection.close(1003 if isinstance(raw, str) else 1007, "not a viser message")
            return await recv(*args, **kwargs)  # raises ConnectionClosed: viser's loop ends quietly

        connection.recv = recv_checked

    ws_server._handle_incoming_message = guarded(ws_server._handle_incoming_message, live)
    ws_server.on_client_connect(on_connect)
    ws_server.on_client_disconnect(lambda conn: reported.discard(conn.client_id))


class HandshakeFailures(logging.Filter):
    """Turns the websockets library's log record of a failed opening handshake on one port (a
    request that is not HTTP, or a malformed one) into ``refused(host, reason)``, one line, instead
    of a traceback; :meth:`remove` takes it off again.

    The websockets library (which viser serves with) logs such a failure as "opening handshake
    failed" with the exception, on the ``websockets.server`` logger, with the connection as the
    record's ``websocket`` attribute. viser itself drops these records (a filter it adds to that
    logger), but only once its HTTP handler has run for a first request; before that each one
    prints a traceback. This filter goes first, so that a refused connection is still reported.
    """

    MESSAGE = "opening handshake failed"
    LOGGER = "websockets.server"

    def __init__(self, port: int, refused: Callable[[str, str], None]):
        super().__init__()
        self.port = int(port)
        self.refused = refused
        self.logger = logging.getLogger(self.LOGGER)
        self.logger.filters.insert(0, self)  # ahead of viser's own filter, which drops these records unseen

    def filter(self, record: logging.LogRecord) -> bool:
        connection = getattr(record, "websocket", None)
        local = getattr(connection, "local_address", None)
        try:
            ours = record.getMessage() == self.MESSAGE and local is not None and int(local[1]) == self.port
        except Exception:
            ours = False
        if not ours:
            return True
        error = record.exc_info[1] if record.exc_info else None
        reason = "the opening handshake failed"
        if error is not None:
            chain, parts = error, []
            while chain is not None and len(parts) < 3:
                parts.append(str(chain) or type(chain).__name__)
                chain = chain.__cause__
            reason = "; ".join(parts)
        try:
            self.refused(_address(connection), one_line(reason))
        except Exception:
            pass
        return False

    def remove(self) -> None:
        self.logger.removeFilter(self)
