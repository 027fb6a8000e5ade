"""Live streaming (``gsavatar live``): latency, sustained rate, drift and fidelity to offline.

    python bench/bench_live.py RUN_DIR --audio SPEECH [--seconds 60] [--sustain 300] [--write]

The server runs in this process (as ``gsavatar live`` runs it: one torch thread, the CPU
rasterizer on every core); a WebSocket client in the same process streams SPEECH (looped as
needed) in 20 ms chunks at the pace of speech, as a microphone or a text-to-speech engine would.

* latency: for each chunk, from the moment its first sample reached the server to the moment the
  frame that shows that sample was drawn (ready to send): median and p95 over ``--seconds``.
  The floor is the avatar's reach into the future (``lookahead``) plus up to one frame.
* rate: frames received per second over ``--sustain`` seconds, and the share sent without a
  picture (the server was late and kept the audio going).
* drift: how much later the speech is shown at the end of the sustained stream than at its start,
  in frames (silence written for audio that arrived late delays everything after it).
* offline r: the mouth opening (dlib's 68 landmarks, as ``gsavatar eval``) of the live frames as
  drawn against an offline render of the same timeline audio (the frames' own audio) with the
  same avatar, over the latency stream's frames that carried a picture; also of the frames as
  sent (after JPEG), beside the offline frames after the same JPEG (the measure's own noise:
  dlib's landmarks jitter on JPEG artefacts).

The last line is ``live: latency median <ms> ms p95 <ms> ms, <fps> frames/s, drift <frames>
frames, offline r <r>``. ``--write`` appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, like_the_cli, machine  # noqa: E402

TABLE = "## Live streaming (`gsavatar live`)"


async def stream(url: str, samples: np.ndarray, chunk_ms: float) -> tuple[list, float]:
    """Stream ``samples`` at real time; returns the frame messages and the wall time from the first
    frame to the last."""
    from websockets.asyncio.client import connect

    from gsavatar.live import protocol

    pcm = (np.clip(samples, -1, 1) * 32767).round().astype("<i2")
    chunk = int(16000 * chunk_ms / 1000)
    frames, times = [], []
    async with connect(url, max_size=2**24) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "format": "s16le"}))
        assert json.loads(await ws.recv())["type"] == "ready"

        async def send() -> None:
            t0 = time.monotonic()
            for i in range(0, len(pcm), chunk):
                await ws.send(pcm[i:i + chunk].tobytes())
                await asyncio.sleep(max(0.0, t0 + (i + chunk) / 16000 - time.monotonic()))
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send())
        async for message in ws:
            if isinstance(message, bytes):
                frames.append(protocol.decode_frame(message))
                times.append(time.monotonic())
            elif json.loads(message).get("type") in ("ended", "error"):
                break
        await sender
    return frames, times[-1] - times[0]


def ended_stream(server, count: int):
    """The stream of the ``count``-th session to end (the server files it just after the close)."""
    end = time.monotonic() + 10
    while len(server.ended) < count and time.monotonic() < end:
        time.sleep(0.05)
    return server.ended[count - 1].stream


def mouth_openings(images) -> np.ndarray:
    """dlib mouth opening per image (NaN where no face is found)."""
    import torch

    from gsavatar.eval import landmarks68
    from gsavatar.eval.metrics import mouth_opening

    out, box = [], None
    for image in images:
        t = torch.from_numpy(image).float() / 255
        box = landmarks68.detect_face(t) or box
        pts = landmarks68.landmarks(t, box) if box is not None else None
        out.append(mouth_opening(pts) if pts is not None else np.nan)
    return np.asarray(out)


def fidelity(live, frames, drawn: dict) -> dict:
    """The live frames against an offline render of their own audio: mouth-opening r of the drawn
    images (before JPEG), of the images as sent (after JPEG), and, for scale, of the offline
    images themselves after the same JPEG (dlib's jitter on JPEG artefacts); mean |difference|."""
    import cv2
    import torch

    from gsavatar.drive import build_drive
    from gsavatar.eval.metrics import pearson
    from gsavatar.imaging import to_uint8

    def jpeg(image: np.ndarray) -> np.ndarray:
        data = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 85])[1]
        return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])

    audio = np.concatenate([f.audio for f in frames]).astype(np.float32) / 32767
    drive = build_drive(live.subject, audio, live.config.drive, size=live.size)
    keep = [k for k, f in enumerate(frames) if f.jpeg is not None and k in drawn and k < len(drive) - live.lookahead_frames]
    sent = [np.ascontiguousarray(cv2.imdecode(np.frombuffer(frames[k].jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1])
            for k in keep]
    with torch.no_grad():
        offline = [to_uint8(live.avatar(drive.inputs(k, live.avatar)).image) for k in keep]
    o = mouth_openings(offline)
    out = {"frames": len(keep),
           "diff": float(np.mean([np.abs(drawn[k].astype(np.int16) - im.astype(np.int16)).mean() for k, im in zip(keep, offline)]))}
    for name, images in (("drawn", [drawn[k] for k in keep]), ("sent", sent), ("floor", [jpeg(im) for im in offline])):
        m = mouth_openings(images)
        ok = np.isfinite(m) & np.isfinite(o)
        out[name] = pearson(m[ok], o[ok])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run directory (avatar.pt) of an avatar conditioned on log-mel")
    ap.add_argument("--audio", type=Path, required=True, help="speech to stream (looped to the lengths asked)")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the latency stream")
    ap.add_argument("--sustain", type=float, default=300.0, help="length of the sustained stream (0: skip)")
    ap.add_argument("--chunk-ms", type=float, default=20.0)
    ap.add_argument("--size", type=int, default=None, help="frame size (default: the avatar's training size)")
    ap.add_argument("--write", action="store_true", help="append a row to BENCHMARKS.md")
    args = ap.parse_args()
    like_the_cli()

    import torch

    from gsavatar.drive import load_speech
    from gsavatar.live import LiveAvatar, LiveConfig
    from gsavatar.live.server import LiveServer, ServerOptions

    torch.set_num_threads(1)
    speech = load_speech(args.audio, max_seconds=3600)

    def looped(seconds: float) -> np.ndarray:
        n = int(seconds * 16000)
        return np.tile(speech, n // len(speech) + 1)[:n]

    live = LiveAvatar(args.run, LiveConfig(size=args.size))
    print(f"avatar reads {1000 * live.lookahead_seconds:.1f} ms ahead ({live.lookahead_frames} frames + the "
          f"feature window), frames {live.size}x{live.size}", flush=True)
    drawn: dict[int, np.ndarray] = {}
    record = {"on": True}

    def keep(_info, frame) -> None:  # the first stream's drawn images, before JPEG
        if record["on"] and frame.image is not None:
            drawn[frame.index] = frame.image

    with LiveServer(live, ServerOptions(port=0), log=lambda *_: None, on_frame=keep) as server:
        frames, _ = asyncio.run(stream(server.url, looped(args.seconds), args.chunk_ms))
        record["on"] = False
        first = ended_stream(server, 1)
        lat = 1000 * np.asarray(first.latencies)
        median, p95 = float(np.median(lat)), float(np.percentile(lat, 95))
        print(f"latency over {args.seconds:g} s ({len(lat)} chunks): median {median:.0f} ms, p95 {p95:.0f} ms; "
              f"{sum(f.jpeg is None for f in frames)} of {len(frames)} frames without a picture", flush=True)
        fid = fidelity(live, frames, drawn)
        r = fid["drawn"]
        print(f"fidelity over {fid['frames']} frames, mouth opening (dlib) against the offline render of the same audio: "
              f"r {fid['drawn']:.3f} as drawn (mean |difference| {fid['diff']:.3f} of 255), {fid['sent']:.3f} as sent "
              f"(JPEG 85; the offline frames after the same JPEG: {fid['floor']:.3f}, dlib's jitter)", flush=True)
        fps, drift, no_picture = float("nan"), float("nan"), float("nan")
        if args.sustain > 0:
            sustained, wall = asyncio.run(stream(server.url, looped(args.sustain), args.chunk_ms))
            s = ended_stream(server, 2)
            lats = np.asarray(s.latencies)
            n10 = max(1, int(10 * 1000 / args.chunk_ms))
            drift = float(np.median(lats[-n10:]) - np.median(lats[n10:2 * n10])) * 25  # frames, second 10 s vs last 10 s
            fps = (len(sustained) - 1) / wall
            no_picture = sum(f.jpeg is None for f in sustained) / len(sustained)
            print(f"sustained {args.sustain:g} s: {fps:.2f} frames/s, {100 * no_picture:.1f}% without a picture, "
                  f"silence written for late audio {s.silence_written / 640:.1f} frames (the start's included), "
                  f"latency median first 10 s {1000 * np.median(lats[n10:2 * n10]):.0f} ms, last 10 s "
                  f"{1000 * np.median(lats[-n10:]):.0f} ms", flush=True)
    line = (f"live: latency median {median:.0f} ms p95 {p95:.0f} ms, {fps:.2f} frames/s, drift {drift:.2f} frames, "
            f"offline r {r:.3f}")
    print(line)
    if args.write:
        row = (f"| {datetime.date.today()} | {args.run} ({live.size} px; reads {1000 * live.lookahead_seconds:.0f} ms ahead) | "
               f"{median:.0f} / {p95:.0f} | {fps:.2f} ({100 * no_picture:.1f}% without a picture) | {drift:.2f} | {r:.3f} | "
               f"cpu: {machine()} | `python bench/bench_live.py {args.run} --audio {args.audio} --seconds {args.seconds:g} "
               f"--sustain {args.sustain:g}` |")
        append_row(TABLE, row)


if __name__ == "__main__":
    main()
