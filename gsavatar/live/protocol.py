"""The live WebSocket protocol (version 1): what a client and ``gsavatar live`` say to each other.

One WebSocket connection is one stream. Text messages are JSON objects with a ``type``; binary
messages are audio (client to server) or frames (server to client).

Client to server:

* ``{"type": "start", "sample_rate": 16000, "format": "s16le"}`` first, once. ``format`` is
  ``s16le`` (signed 16-bit) or ``f32le`` (32-bit float in [-1, 1]), mono, little-endian;
  ``sample_rate`` 8000 to 192000 (resampled to 16 kHz). Optional ``jpeg_quality`` (30 to 95).
* binary: PCM in that format, any length up to ``max_message_bytes`` that is a whole number of
  samples. Send at the pace of speech: more than ``max_backlog_seconds`` of audio waiting to be
  shown is refused (an ``error`` message; the chunk is dropped).
* ``{"type": "end"}``: no more audio; the server sends the frames that show the rest of it,
  then ``ended`` and closes.
* or, instead of ``start``, ``{"type": "webrtc-offer", "sdp": "..."}``: a WebRTC call (the
  ``webrtc`` extra; :mod:`gsavatar.live.webrtc`). The server answers ``{"type":
  "webrtc-answer", "sdp": "..."}``; audio and frames then flow over the peer connection, and this
  socket carries only ``end`` and errors.

Server to client:

* ``{"type": "ready", "protocol": 1, "fps": 25, "sample_rate": 16000, "width", "height",
  "lookahead_ms", "max_message_bytes", "max_backlog_seconds"}`` after ``start``.
* binary frames, 25 a second from ``ready`` on (idle frames while no speech arrives): a
  :data:`FRAME_HEADER` (magic ``GSAF``, version, flags, frame index, the span of 16 kHz samples
  of the stream's timeline the frame shows, the byte lengths of the audio and image parts), then
  that span's audio as s16le (640 samples), then a JPEG (absent when the flag
  :data:`FLAG_IMAGE` is clear: the server was late and the client keeps showing the last image;
  the audio is always there, so sound and picture stay in step).
* ``{"type": "error", "message": "...", "fatal": true|false}``: fatal errors close the stream.
* ``{"type": "ended", "frames": N}`` after ``end``, once the audio has all been shown.

Frame k shows the samples [640 k, 640 (k + 1)) of the stream's timeline: the client's audio in
the order sent, with silence where the server had to draw a frame before its audio arrived
(flag :data:`FLAG_FILLED`). Concatenating the frames' audio gives the sound of the video.
"""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np

from gsavatar.errors import InputError

PROTOCOL_VERSION = 1
FRAME_MAGIC = b"GSAF"
FRAME_HEADER = struct.Struct("<4sBBxxQqqII")
"""magic, version, flags, (2 pad bytes), index, span start, span end, audio bytes, image bytes."""
FLAG_IMAGE = 1
"""The frame message carries a JPEG."""
FLAG_FILLED = 2
"""Some of the frame's audio is silence the server wrote because the client's audio was late."""
PCM_FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
MAX_CONTROL_BYTES = 64 * 1024
"""Longest JSON control message accepted (a WebRTC offer is a few KB of SDP)."""


@dataclasses.dataclass(frozen=True)
class StartRequest:
    """A client's ``start`` message, checked."""

    sample_rate: int
    format: str
    jpeg_quality: int | None = None


@dataclasses.dataclass(frozen=True)
class FrameMessage:
    """A decoded frame message."""

    index: int
    span: tuple[int, int]
    audio: np.ndarray  # int16 [640]
    jpeg: bytes | None
    filled: bool


def parse_control(text: str | bytes) -> dict:
    """A JSON control message as a dict with a string ``type``; one-line :class:`InputError` otherwise."""
    if len(text) > MAX_CONTROL_BYTES:
        raise InputError(f"control message of {len(text)} bytes, over the limit of {MAX_CONTROL_BYTES}")
    try:
        msg = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("a text message must be a JSON object (see the protocol)") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise InputError('a control message must be a JSON object with a "type"')
    return msg


def parse_start(msg: dict) -> StartRequest:
    from gsavatar.live.stream import MAX_INPUT_RATE, MIN_INPUT_RATE

    if msg.get("type") != "start":
        raise InputError(f'the first message must be {{"type": "start", ...}} (got type {msg.get("type")!r})')
    unknown = set(msg) - {"type", "sample_rate", "format", "jpeg_quality"}
    if unknown:
        raise InputError(f"unknown start field(s): {', '.join(sorted(unknown))}")
    rate, fmt, quality = msg.get("sample_rate", 16000), msg.get("format", "s16le"), msg.get("jpeg_quality")
    if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE:
        raise InputError(f"sample_rate must be an integer from {MIN_INPUT_RATE} to {MAX_INPUT_RATE} (got {rate!r})")
    if fmt not in PCM_FORMATS:
        raise InputError(f"format must be one of {', '.join(PCM_FORMATS)} (got {fmt!r})")
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int) or not 30 <= quality <= 95):
        raise InputError(f"jpeg_quality must be an integer from 30 to 95 (got {quality!r})")
    return StartRequest(rate, fmt, quality)


def decode_pcm(data: bytes, fmt: str) -> np.ndarray:
    """A binary audio message as int16 or float32 samples (checked: whole samples)."""
    dtype = PCM_FORMATS[fmt]
    if len(data) % dtype.itemsize:
        raise InputError(f"{len(data)} bytes is not a whole number of {fmt} samples ({dtype.itemsize} bytes each)")
    return np.frombuffer(data, dtype).astype(dtype.newbyteorder("="))


def encode_frame(index: int, span: tuple[int, int], audio: np.ndarray, jpeg: bytes | None, filled: bool) -> bytes:
    """A frame message: header, the span's audio as s16le, the JPEG (if any)."""
    pcm = (np.clip(np.asarray(audio, np.float32), -1, 1) * 32767.0).round().astype("<i2").tobytes()
    image = jpeg or b""
    flags = (FLAG_IMAGE if jpeg else 0) | (FLAG_FILLED if filled else 0)
    return FRAME_HEADER.pack(FRAME_MAGIC, PROTOCOL_VERSION, flags, index, span[0], span[1], len(pcm), len(image)) + pcm + image


def decode_frame(data: bytes) -> FrameMessage:
    """A frame message from the server (:class:`InputError` if it is not one)."""
    if len(data) < FRAME_HEADER.size:
        raise InputError("a frame message is shorter than its header")
    magic, version, flags, index, start, end, n_audio, n_image = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC or version != PROTOCOL_VERSION:
        raise InputError(f"not a version-{PROTOCOL_VERSION} frame message")
    if FRAME_HEADER.size + n_audio + n_image != len(data):
        raise InputError("a frame message's lengths do not add up")
    audio = np.frombuffer(data, "<i2", count=n_audio // 2, offset=FRAME_HEADER.size).astype(np.int16)
    jpeg = data[FRAME_HEADER.size + n_audio:] if flags & FLAG_IMAGE else None
    return FrameMessage(int(index), (int(start), int(end)), audio, jpeg, bool(flags & FLAG_FILLED))
