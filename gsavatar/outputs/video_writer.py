"""Write an H.264 + AAC mp4 through PyAV.

Frames are encoded as they arrive (nothing is held in RAM). The file is written under a
temporary name and renamed into place when complete, so an interrupted write never leaves a
playable-looking but truncated mp4 behind.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from gsavatar.data.timebase import SAMPLE_RATE
from gsavatar.files import remove_quietly


def write_mp4(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: int = 25,
    audio: np.ndarray | None = None,
    audio_rate: int = SAMPLE_RATE,
    timestamps: Sequence[float] | None = None,
    crf: int = 18,
    codec: str = "libx264",
    preset: str = "veryfast",
    aac_rate: int | None = None,
) -> Path:
    """Encode RGB uint8 frames (H, W, 3) to ``path``, muxing mono float ``audio`` as AAC.

    ``timestamps`` (seconds, one per frame) makes a variable-frame-rate file; by default frame
    ``k`` is shown at ``k / fps``. Width and height must be even (H.264 with yuv420p).
    ``aac_rate`` resamples the audio to that rate for the AAC track (default: ``audio_rate``).

    Audio/video sync: audio sample 0 plays at video time 0. FFmpeg's AAC encoder emits 1024
    samples of encoder delay ("priming") first; the mp4 muxer records it in an edit list (the
    first packet has pts -1024), and decoders drop it, so nothing needs shifting here (checked
    with clicks: < 0.1 ms off). At the end, the last AAC frame is padded up to 1024 samples;
    the muxer gives that packet its true duration, so the stream's duration is the exact audio
    length, but a decoder that ignores the end trim plays up to 1023 samples of extra silence:
    64 ms at 16 kHz, more than one 25 fps frame. Renders therefore pass ``aac_rate=48000``,
    where that tail is at most 21 ms (and 48 kHz AAC is what every player expects).
    """
    import av

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    # A fine time base lets arbitrary (VFR) timestamps be represented exactly enough.
    time_base = Fraction(1, 90000) if timestamps is not None else Fraction(1, fps)
    try:
        with av.open(str(tmp), "w", format="mp4") as out:
            vs = None
            if audio is not None:
                enc_rate = int(aac_rate or audio_rate)
                ast = out.add_stream("aac", rate=enc_rate, layout="mono")
                # swresample compensates its filter delay: resampled audio stays aligned to the sample.
                resampler = av.AudioResampler(format="fltp", layout="mono", rate=enc_rate) if enc_rate != audio_rate else None
            for i, image in enumerate(frames):
                if vs is None:
                    h, w = image.shape[:2]
                    vs = out.add_stream(codec, rate=fps)
                    vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
                    vs.time_base = time_base
                    vs.codec_context.time_base = time_base
                    if codec == "libx264":
                        vs.options = {"crf": str(crf), "preset": preset}
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image, dtype=np.uint8), format="rgb24")
                t = timestamps[i] if timestamps is not None else i / fps
                frame.pts = int(round(t / time_base))
                frame.time_base = time_base
                out.mux(vs.encode(frame))
            if vs is None:
                raise ValueError("write_mp4 needs at least one frame")
            out.mux(vs.encode(None))
            if audio is not None:
                samples = np.clip(np.asarray(audio, np.float32), -1, 1).reshape(1, -1)
                block = 1024
                for start in range(0, samples.shape[1], block):
                    af = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + block]), format="fltp", layout="mono")
                    af.sample_rate = audio_rate
                    af.pts = start
                    af.time_base = Fraction(1, audio_rate)
                    for part in (resampler.resample(af) if resampler is not None else [af]):
                        out.mux(ast.encode(part))
                for part in (resampler.resample(None) if resampler is not None else []):
                    out.mux(ast.encode(part))
                out.mux(ast.encode(None))
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    return path
