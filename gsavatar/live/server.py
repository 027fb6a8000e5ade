"""The live WebSocket server: one stream per connection, frames paced at 25 a second.

The protocol is in :mod:`gsavatar.live.protocol`. The server runs its own asyncio loop in a
background thread (so the viser page of ``gsavatar live`` can share the process); frames are drawn
on a small thread pool, so a slow client never holds up another. Each connection is bounded: its
messages (``max_message_bytes``), the audio it may queue (``LiveConfig.max_backlog_seconds``),
the time it may take to start and to read its frames; a client that breaks a rule gets one
``error`` message saying which, and a client that goes away releases its stream at once.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import threading
import time

from gsavatar.data.timebase import FPS, SAMPLE_RATE
from gsavatar.errors import InputError
from gsavatar.imaging import encode_jpeg
from gsavatar.live import protocol
from gsavatar.live.stream import BacklogError, LiveAvatar, LiveStream


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """Where the server listens and what it allows each client."""

    host: str = "127.0.0.1"
    """Interface to bind (127.0.0.1: this machine only; 0.0.0.0 to serve a network)."""
    port: int = 8765
    """TCP port (0: any free port)."""
    max_clients: int = 4
    """Streams served at once; more connections are refused with a message."""
    max_message_bytes: int = 256 * 1024
    """Longest message a client may send (8 s of 16 kHz s16le audio); longer ones close the stream."""
    start_timeout_s: float = 10.0
    """A connection that sends no ``start`` message within this is closed."""
    send_timeout_s: float = 5.0
    """A client that has not taken a frame for this long is taken to be gone and is closed."""
    jpeg_quality: int = 85
    """JPEG quality of the frames (a client may ask for another in ``start``)."""


@dataclasses.dataclass
class SessionInfo:
    """What the server knows of one connected stream (read by tests and the bench)."""

    stream: LiveStream
    peer: str
    frames_sent: int = 0
    frames_skipped: int = 0
    ending: bool = False
    errors: list[str] = dataclasses.field(default_factory=list)


class LiveServer:
    """Serves ``live`` over WebSocket; :meth:`start` returns once it listens."""

    def __init__(self, live: LiveAvatar, options: ServerOptions | None = None, log=print, on_frame=None):
        self.live = live
        self.options = options or ServerOptions()
        self.log = log
        self.on_frame = on_frame  # called with (SessionInfo, LiveFrame) for each frame drawn (a recorder, a monitor)
        self.sessions: dict[int, SessionInfo] = {}
        self.ended: collections.deque[SessionInfo] = collections.deque(maxlen=16)  # the latest streams that ended
        self.port = self.options.port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, live.config.render_slots),
                                                           thread_name_prefix="gsavatar-live-draw")

    @property
    def url(self) -> str:
        return f"ws://{self.options.host}:{self.port}"

    def start(self) -> "LiveServer":
        self._thread = threading.Thread(target=self._run, name="gsavatar-live-server", daemon=True)
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise InputError(f"cannot serve on {self.options.host}:{self.options.port}: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # noqa: BLE001 (reported by start())
            self._error = e
            self._started.set()

    async def _serve(self) -> None:
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        o = self.options
        async with serve(self._handle, o.host, o.port, max_size=o.max_message_bytes, max_queue=16,
                         ping_interval=10, ping_timeout=10, close_timeout=2) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._started.set()
            await self._stop.wait()

    async def _send_json(self, ws, **msg) -> None:
        await asyncio.wait_for(ws.send(json.dumps(msg)), self.options.send_timeout_s)

    async def _fatal(self, ws, message: str, code: int = 1008) -> None:
        self.log(f"live: closed {_peer(ws)}: {message}")
        try:
            await self._send_json(ws, type="error", message=message, fatal=True)
            await ws.close(code, message[:120])
        except Exception:  # noqa: BLE001 (the client may be gone already)
            pass

    async def _handle(self, ws) -> None:
        peer = _peer(ws)
        if len(self.sessions) >= self.options.max_clients:
            await self._fatal(ws, f"server busy: {self.options.max_clients} streams already", code=1013)
            return
        try:
            first = await asyncio.wait_for(ws.recv(), self.options.start_timeout_s)
            if isinstance(first, bytes):
                raise InputError('the first message must be {"type": "start", ...} (got binary data)')
            control = protocol.parse_control(first)
            if control["type"] == "webrtc-offer":
                await self._handle_webrtc(ws, peer, control)
                return
            start = protocol.parse_start(control)
            stream = self.live.open(start.sample_rate)
            self.log(f"live: stream from {peer} ({start.sample_rate} Hz {start.format})")
        except TimeoutError:
            await self._fatal(ws, f"no start message within {self.options.start_timeout_s:g} s")
            return
        except InputError as e:
            await self._fatal(ws, str(e))
            return
        except Exception:  # noqa: BLE001 (closed before starting)
            return
        key = id(ws)
        info = SessionInfo(stream, peer)
        self.sessions[key] = info
        quality = start.jpeg_quality or self.options.jpeg_quality
        pacer = None
        try:
            await self._send_json(ws, type="ready", protocol=protocol.PROTOCOL_VERSION, fps=FPS, sample_rate=SAMPLE_RATE,
                                  width=self.live.size, height=self.live.size,
                                  lookahead_ms=round(1000 * self.live.lookahead_seconds, 1),
                                  max_message_bytes=self.options.max_message_bytes,
                                  max_backlog_seconds=self.live.config.max_backlog_seconds)
            pacer = asyncio.create_task(self._pace(ws, info, quality))
            await self._receive(ws, info, start.format, pacer)
        except Exception:  # noqa: BLE001 (a connection that breaks ends its stream, nothing more)
            pass
        finally:
            if pacer is not None:
                pacer.cancel()
                try:
                    await pacer
                except BaseException:  # noqa: BLE001
                    pass
            self.sessions.pop(key, None)
            self.ended.append(info)
            self.log(f"live: stream from {peer} ended ({info.frames_sent} frames, {info.frames_skipped} without a picture, "
                     f"{len(info.errors)} errors)")

    async def _handle_webrtc(self, ws, peer: str, offer: dict) -> None:
        """A call (gsavatar.live.webrtc): media over the peer connection, this socket for control."""
        from gsavatar.errors import MissingDependencyError
        from gsavatar.live.webrtc import OPUS_RATE, WebRtcPeer

        loop = asyncio.get_running_loop()
        stream = self.live.open(OPUS_RATE)
        try:
            call = WebRtcPeer(stream, lambda draw: loop.run_in_executor(self._pool, stream.next_frame, draw))
        except MissingDependencyError as e:
            raise InputError(str(e)) from None
        key = id(ws)
        info = SessionInfo(stream, peer)
        self.sessions[key] = info
        try:
            answer = await call.answer(offer.get("sdp"))
            await self._send_json(ws, type="webrtc-answer", sdp=answer, fps=FPS,
                                  lookahead_ms=round(1000 * self.live.lookahead_seconds, 1))
            async for message in ws:
                if isinstance(message, bytes):
                    raise InputError("audio goes over the WebRTC connection in a call, not this socket")
                if protocol.parse_control(message)["type"] == "end":
                    break
                raise InputError('in a call this socket takes only {"type": "end"}')
        except InputError as e:
            info.errors.append(str(e))
            await self._fatal(ws, str(e))
        except Exception:  # noqa: BLE001 (a broken connection ends the call)
            pass
        finally:
            info.frames_sent = call.frames_sent
            await call.close()
            self.sessions.pop(key, None)
            self.ended.append(info)
            self.log(f"live: call from {peer} ended ({call.frames_sent} frames)")

    async def _receive(self, ws, info: SessionInfo, fmt: str, pacer: asyncio.Task) -> None:
        async for message in ws:
            try:
                if isinstance(message, bytes):
                    info.stream.push(protocol.decode_pcm(message, fmt), arrived=time.monotonic())
                    continue
                control = protocol.parse_control(message)
                if control["type"] == "end":
                    info.ending = True
                    info.stream.end()
                else:
                    raise InputError(f"unknown message type {control['type']!r} (start once, then audio and end)")
            except BacklogError as e:
                info.errors.append(str(e))
                await self._send_json(ws, type="error", message=str(e), fatal=False)
            except InputError as e:
                info.errors.append(str(e))
                await self._fatal(ws, str(e))
                return
            if pacer.done():
                return

    async def _pace(self, ws, info: SessionInfo, quality: int) -> None:
        loop = asyncio.get_running_loop()
        stream = info.stream
        t0 = time.monotonic()
        while True:
            k = stream.next_index
            if info.ending and k >= stream.end():
                await self._send_json(ws, type="ended", frames=k)
                await ws.close(1000, "ended")
                return
            delay = t0 + k / FPS - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            draw = time.monotonic() - (t0 + k / FPS) < 1.0 / FPS  # over a frame late: send its audio, skip the picture
            frame = await loop.run_in_executor(self._pool, stream.next_frame, draw)
            if self.on_frame is not None:
                self.on_frame(info, frame)
            jpeg = None if frame.image is None else await loop.run_in_executor(self._pool, encode_jpeg, frame.image, quality)
            try:
                await asyncio.wait_for(ws.send(protocol.encode_frame(frame.index, frame.span, frame.audio, jpeg, frame.filled)),
                                       self.options.send_timeout_s)
            except TimeoutError:  # a client that takes no frames holds a stream for nothing
                await ws.close(1008, f"no frame taken for {self.options.send_timeout_s:g} s")
                return
            info.frames_sent += 1
            info.frames_skipped += frame.image is None


def serve(run, *, host: str = "127.0.0.1", port: int = 8765, size: int | None = None, device: str = "auto",
          max_clients: int = 4, page_port: int | None = 8080) -> None:
    """Serve ``run`` live until Ctrl-C (the ``gsavatar live`` command); ``page_port``: also the
    browser page with a microphone button there (None: the WebSocket only)."""
    import torch

    from gsavatar.live.stream import LiveConfig
    from gsavatar.runtime import resolve_device

    torch.set_num_threads(1)  # the networks' small ops; the CPU rasterizer uses every core
    live = LiveAvatar(run, LiveConfig(size=size), device=resolve_device(device))
    server = LiveServer(live, ServerOptions(host=host, port=port, max_clients=max_clients)).start()
    page = None
    try:
        ahead = 1000 * live.lookahead_seconds
        if page_port is not None:
            from gsavatar.live.page import LivePage

            page = LivePage(server.port, ahead, host=host, port=page_port)
            print(f"gsavatar live: open {page.url} in a browser and press the microphone button", flush=True)
        print(f"WebSocket: {server.url} (protocol: gsavatar/live/protocol.py; example client: "
              f"python -m gsavatar.viewer_examples.live_client {server.url} speech.wav); Ctrl-C stops it", flush=True)
        print(f"the avatar reads {ahead:.0f} ms of audio ahead of each frame: the floor of its latency"
              + ("" if ahead <= 150 else " (an avatar trained with --preset live reads 88 ms ahead)"), flush=True)
        while True:
            time.sleep(3600)
    finally:
        if page is not None:
            page.stop()
        server.stop()
        print("live server stopped")


def _peer(ws) -> str:
    address = getattr(ws, "remote_address", None)
    return f"{address[0]}:{address[1]}" if address else "?"
