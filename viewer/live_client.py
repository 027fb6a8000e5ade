"""Stream a speech file to a live server and write what comes back to an mp4 (H.264 + AAC).

    gsavatar live runs/talk --no-page &                                   # the server (port 8765)
    python viewer/live_client.py ws://127.0.0.1:8765 speech.wav -o live.mp4
    python -m gsavatar.viewer_examples.live_client ws://127.0.0.1:8765 speech.wav -o live.mp4

It speaks the protocol of :mod:`gsavatar.live.protocol`: a ``start`` message, the audio as
16 kHz s16le in chunks of ``--chunk-ms`` at the pace of speech (as a microphone or a
text-to-speech engine would send it), then ``end``; meanwhile it collects the frames, each with
its picture and the audio it shows, and muxes them once the server says ``ended``. Frames sent
without a picture (the server was late) repeat the previous one. Prints one line per second of
stream and a summary (frames, late pictures, frames over silence the server filled in).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path


async def stream_file(url: str, samples, chunk_ms: float = 20.0, pace: float = 1.0, verbose: bool = True):
    """Send ``samples`` (16 kHz float) to ``url``; returns ``(frames, messages)``: the decoded
    frame messages in order and the server's JSON messages."""
    import numpy as np
    from websockets.asyncio.client import connect

    from gsavatar.live import protocol

    pcm = (np.clip(samples, -1, 1) * 32767).round().astype("<i2")
    chunk = max(1, int(16000 * chunk_ms / 1000))
    frames, messages = [], []
    async with connect(url, max_size=16 * 2**20) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "format": "s16le"}))
        ready = json.loads(await ws.recv())
        messages.append(ready)
        if ready.get("type") != "ready":
            raise RuntimeError(f"server refused the stream: {ready.get('message', ready)}")

        async def send() -> None:
            t0 = time.monotonic()
            for i in range(0, len(pcm), chunk):
                await ws.send(pcm[i:i + chunk].tobytes())
                wait = t0 + (i + chunk) / 16000 / pace - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send())
        async for message in ws:
            if isinstance(message, bytes):
                frames.append(protocol.decode_frame(message))
                if verbose and frames[-1].index % 25 == 24:
                    print(f"live: {len(frames)} frames ({len(frames) / 25:.0f} s)", flush=True)
                continue
            msg = json.loads(message)
            messages.append(msg)
            if msg.get("type") == "error" and msg.get("fatal"):
                raise RuntimeError(f"server: {msg.get('message')}")
            if msg.get("type") == "ended":
                break
        await sender
    return frames, messages


def write_video(frames, path: Path) -> None:
    """The frames' pictures (the previous one where a frame has none) and their audio, as an mp4."""
    import cv2
    import numpy as np

    from gsavatar.outputs.video_writer import write_mp4

    def pictures():
        last = None
        for f in frames:
            if f.jpeg is not None:
                last = cv2.imdecode(np.frombuffer(f.jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
            if last is None:  # the very first frames came without a picture: wait for one
                continue
            yield last

    first = next((i for i, f in enumerate(frames) if f.jpeg is not None), None)
    if first is None:
        raise RuntimeError("no frame carried a picture")
    audio = np.concatenate([f.audio for f in frames[first:]]).astype(np.float32) / 32767.0
    write_mp4(path, pictures(), fps=25, audio=audio, aac_rate=48000)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="the live server, e.g. ws://127.0.0.1:8765")
    ap.add_argument("speech", type=Path, help="any audio file FFmpeg reads")
    ap.add_argument("-o", "--out", type=Path, default=Path("live.mp4"), help="mp4 to write (default live.mp4)")
    ap.add_argument("--chunk-ms", type=float, default=20.0, help="audio per message in milliseconds (default 20)")
    ap.add_argument("--quiet", action="store_true", help="no per-second progress")
    args = ap.parse_args(argv)
    from gsavatar.drive import load_speech
    from gsavatar.errors import InputError

    try:
        samples = load_speech(args.speech, max_seconds=3600)
        frames, _ = asyncio.run(stream_file(args.url, samples, args.chunk_ms, verbose=not args.quiet))
        write_video(frames, args.out)
    except (InputError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    late = sum(f.jpeg is None for f in frames)
    filled = sum(f.filled for f in frames)
    print(f"wrote {args.out}: {len(frames)} frames ({len(frames) / 25:.2f} s), {late} without a picture, "
          f"{filled} over silence filled in for late audio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
