"""Every use the viewer makes of viser's private internals, in one place.

viser has no public API for three things the viewer needs:

* looking at an upload's start message and parts *before* viser buffers them (to refuse a file
  from the size it announces, see :func:`gsavatar.viewer.server.install_upload_gate`);
* acknowledging a refused transfer to the tab that sent it (its upload button stays disabled
  until its upload is acknowledged);
* taking down the notification viser's page shows for an upload (the page names it itself).

All three go through the websocket layer under :class:`viser.ViserServer`: the server's message
dispatcher (``ViserServer._websock_server``), a tab's connection
(``ClientHandle._websock_connection``) and viser's message classes (``viser._messages``). None
of these is covered by viser's compatibility promises, so the viewer pins the range it was
tested with (:data:`TESTED_RANGE`, the same as the ``viewer`` extra in pyproject.toml), checks
at start that they are all there (:func:`require_internals`), and tests/test_viser_compat.py
checks each of them against the installed viser, on a real server and a real connection.
Nothing outside this module touches a private viser name.
"""

from __future__ import annotations

import dataclasses
import inspect
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
    * ``viser.infra.WebsockServer.register_handler`` and
      ``viser.infra.WebsockClientConnection.queue_message``.
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
        for cls_name, method in (("WebsockServer", "register_handler"), ("WebsockClientConnection", "queue_message")):
            if not callable(getattr(getattr(infra, cls_name, None), method, None)):
                missing.append(f"viser.infra.{cls_name}.{method}")
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
