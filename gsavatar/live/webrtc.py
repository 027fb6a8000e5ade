"""WebRTC out (the ``webrtc`` extra: aiortc): one audio + video peer connection per client.

Signalling rides on the live WebSocket: instead of ``start``, a client's first message is
``{"type": "webrtc-offer", "sdp": "..."}``, a complete offer (ICE candidates gathered, no
trickle) with an audio track to send (the speech: a microphone, a text-to-speech engine) and
video and audio to receive. The server replies ``{"type": "webrtc-answer", "sdp": "..."}`` and
from then on the media flows over the peer connection: the client's audio (Opus, decoded at
48 kHz) goes into a :class:`~gsavatar.live.stream.LiveStream`, and the avatar comes back as a
25 fps video track and an audio track carrying each frame's own samples, so a browser or an
agent framework plays them as one synchronised stream. The WebSocket stays open for errors and
``end``; closing it ends the call. Only host candidates are used (no STUN or TURN servers: the
server reaches nothing outside); across networks put a TURN relay in front.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import numpy as np

from gsavatar.data.timebase import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from gsavatar.errors import InputError, MissingDependencyError
from gsavatar.live.stream import LiveStream

OPUS_RATE = 48000
"""The rate aiortc decodes a client's Opus audio at: the stream's input rate."""
QUEUE_FRAMES = 10
"""Frames a track may hold for a slow sender before the oldest is dropped (0.4 s)."""


def require_aiortc():
    try:
        import aiortc
    except ImportError:
        raise MissingDependencyError("WebRTC needs aiortc: pip install 'gsavatar[webrtc]'") from None
    return aiortc


class _QueueTrack:
    """A media track whose frames the pacer puts in a bounded queue (oldest dropped when full)."""

    def __init__(self, kind: str):
        from aiortc import MediaStreamTrack

        class Track(MediaStreamTrack):
            def __init__(inner):
                super().__init__()
                inner.kind = kind
                inner.queue = asyncio.Queue(QUEUE_FRAMES)

            async def recv(inner):
                return await inner.queue.get()

        Track.kind = kind
        self.track = Track()

    def put(self, frame) -> None:
        q = self.track.queue
        if q.full():
            q.get_nowait()
        q.put_nowait(frame)


class WebRtcPeer:
    """The server's side of one client's call."""

    def __init__(self, stream: LiveStream, draw, log=print):
        aiortc = require_aiortc()
        self.stream = stream
        self._draw = draw  # async callable: draw=bool -> LiveFrame (on the server's drawing pool)
        self.log = log
        self.pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
        self.video = _QueueTrack("video")
        self.audio = _QueueTrack("audio")
        self.frames_sent = 0
        self.samples_heard = 0
        self._tasks: list[asyncio.Task] = []
        self.pc.on("track", self._on_track)

    def _on_track(self, track) -> None:
        if track.kind == "audio":
            self._tasks.append(asyncio.ensure_future(self._listen(track)))

    async def _listen(self, track) -> None:
        """The client's audio into the stream (mono float at 48 kHz)."""
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if frame.sample_rate != OPUS_RATE:
                raise InputError(f"WebRTC audio at {frame.sample_rate} Hz (expected {OPUS_RATE})")
            pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).astype(np.float32).mean(1) / 32768.0
            self.stream.push(pcm)
            self.samples_heard += pcm.size

    async def answer(self, offer_sdp: str) -> str:
        """Take the client's offer; returns the complete answer (ICE gathered)."""
        from aiortc import RTCSessionDescription

        if not isinstance(offer_sdp, str) or not offer_sdp.startswith("v=0") or len(offer_sdp) > 64 * 1024:
            raise InputError("webrtc-offer needs an SDP offer (a string starting with v=0, at most 64 KiB)")
        self.pc.addTrack(self.video.track)
        self.pc.addTrack(self.audio.track)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except (ValueError, KeyError, AttributeError) as e:  # aiortc's verdicts on a malformed offer
            raise InputError(f"the WebRTC offer was refused ({type(e).__name__}: {e})") from None
        self._tasks.append(asyncio.ensure_future(self._pace()))
        return self.pc.localDescription.sdp

    async def _pace(self) -> None:
        """25 frames a second into the tracks, each frame's audio with it."""
        import av

        t0 = time.monotonic()
        video_base, audio_base = fractions.Fraction(1, 90000), fractions.Fraction(1, SAMPLE_RATE)
        while self.pc.connectionState not in ("closed", "failed"):
            k = self.stream.next_index
            delay = t0 + k / FPS - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            frame = await self._draw(time.monotonic() - (t0 + k / FPS) < 1.0 / FPS)
            if frame.image is not None:
                video = av.VideoFrame.from_ndarray(frame.image, format="rgb24")
                video.pts, video.time_base = k * 90000 // FPS, video_base
                self.video.put(video)
            pcm = (np.clip(frame.audio, -1, 1) * 32767).round().astype(np.int16)[None]
            audio = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            audio.sample_rate, audio.pts, audio.time_base = SAMPLE_RATE, k * SAMPLES_PER_FRAME, audio_base
            self.audio.put(audio)
            self.frames_sent += 1

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pc.close()
