"""``gsavatar render``: a trained avatar driven by any speech file, written as an H.264 + AAC mp4.

    speech --drive.load_speech--> 16 kHz mono --drive.build_drive--> N = round(seconds x 25) frames
    frame k --Avatar.forward--> RGB --write_mp4--> mp4 (frame k shown at k / 25 s, audio from 0 s)

Frame ``k`` owns audio samples ``[640 k, 640 (k + 1))`` and the muxed audio is exactly those
``N x 640`` samples, so picture and sound are in sync from the first frame to the last (the
writer encodes the AAC track at 48 kHz; see :func:`gsavatar.outputs.video_writer.write_mp4`).
Every user error (missing run, unreadable audio, bad camera path or background image, an
output directory that does not exist) is an :class:`InputError` raised before any rendering.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from gsavatar.config import check_frame_size, check_number
from gsavatar.drive import FPS, SAMPLE_RATE, DriveConfig, build_drive, load_keyframes, load_speech, silence_note
from gsavatar.errors import InputError
from gsavatar.files import check_creatable_dir, check_output_file
from gsavatar.imaging import to_uint8
from gsavatar.runtime import resolve_device, restores_torch_threads

DEFAULT_MAX_SECONDS = 600.0
BUILTIN_CAMERAS = ("train", "orbit", "zoom")


def check_camera(camera: str) -> None:
    """Fail early (before audio features are made) on an unknown camera name or a bad keyframe file."""
    if camera in BUILTIN_CAMERAS:
        return
    path = Path(camera)
    if not path.exists() and path.suffix.lower() != ".json":
        raise InputError(f"unknown camera {camera!r} (train, orbit, zoom or a .json keyframe file)")
    load_keyframes(path)


def load_background(path: str | Path, size: int) -> torch.Tensor:
    """An image file as an ``[size, size, 3]`` float tensor in [0, 1] (resized to fill, no crop)."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such background image: {path}")
    image = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR)  # fromfile: any path characters
    if image is None or image.size == 0:
        raise InputError(f"{path.name} is not a readable image (png, jpg, bmp, webp, tiff...)")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if h > size or w > size else cv2.INTER_LINEAR
    image = cv2.resize(image, (size, size), interpolation=interp)
    return torch.from_numpy(image.astype(np.float32) / 255.0)


@contextlib.contextmanager
def rendered_ahead(items: Iterator, depth: int = 2):
    """Iterate ``items`` in a thread of its own, up to ``depth`` ahead of the consumer, so that
    producing (rendering) and consuming (encoding) overlap. Yields the iterator the consumer reads;
    an exception in the producer is raised there, and leaving the block (done, failed or
    interrupted) stops the producer after the item it is on."""
    done = object()
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    failure: list[BaseException] = []

    def put(item) -> bool:
        """Hand ``item`` over unless the consumer has left; whether it was handed over."""
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer
            failure.append(exc)
        finally:
            put(done)

    def consume():
        while True:
            item = buffer.get()
            if item is done:
                if failure:
                    raise failure[0]
                return
            yield item

    producer = threading.Thread(target=produce, name="gsavatar-render", daemon=True)
    producer.start()
    try:
        yield consume()
    finally:
        stop.set()
        producer.join()


@restores_torch_threads
def render_video(run_dir: str | Path, audio_path: str | Path, out_path: str | Path, drive: DriveConfig | None = None,
                 size: int | None = None, frames_dir: str | Path | None = None, background: str | Path | None = None,
                 device: str = "cpu", max_seconds: float = DEFAULT_MAX_SECONDS, progress: bool = True,
                 cpu_threads: int = -1) -> dict:
    """Render the avatar of ``run_dir`` speaking ``audio_path`` to ``out_path`` (mp4); returns a summary dict.

    ``frames_dir`` also receives every frame as ``frame_00000.png`` ...; ``background`` replaces
    the background plate with an image. Nothing is written before the inputs are checked, and
    the mp4 appears only once complete. ``cpu_threads``: torch threads on CPU (-1: the trained
    preset's, 1 for the CPU presets: on a busy 2-core machine more threads are many times slower
    for the networks' small ops; 0: torch's default); the CPU rasterizer uses every core whatever
    this says (:func:`gsavatar.render.set_cpu_raster_threads`). Frames are
    rendered up to two ahead of the encoder, in a thread of their own, so encoding overlaps rendering.
    """
    from gsavatar.model.io import find_avatar_file, load_run
    from gsavatar.outputs.video_writer import write_mp4
    from gsavatar.progress import progress as progress_report

    t_start = time.perf_counter()
    drive = drive or DriveConfig()
    out_path = check_output_file(out_path, ".mp4")
    if frames_dir is not None and Path(frames_dir).exists() and not Path(frames_dir).is_dir():
        raise InputError(f"--frames-dir {frames_dir} exists and is not a directory")
    if frames_dir is not None:
        check_creatable_dir(frames_dir, "--frames-dir")
    check_number("the duration limit (--max-seconds)", max_seconds, 0.0, low_open=True)
    if size is not None:
        check_frame_size(size)
    check_camera(drive.camera)
    dev = resolve_device(device)
    avatar_path = find_avatar_file(run_dir)
    samples = load_speech(audio_path, max_seconds=max_seconds)
    note = silence_note(samples, Path(audio_path).name)
    if note and progress:
        print(f"warning: {note}", file=sys.stderr)
    bundle = load_run(avatar_path, dev)
    avatar, cfg, subject = bundle.avatar, bundle.config, bundle.subject
    threads = cfg.cpu_threads if cpu_threads < 0 else cpu_threads
    if dev.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    render_size = subject.render_size if size is None else check_frame_size(size)
    plate = None if background is None else load_background(background, render_size).to(dev)
    seq = build_drive(subject, samples, drive, size=render_size)
    num = len(seq)
    if frames_dir is not None:
        frames_dir = Path(frames_dir)
        frames_dir.mkdir(parents=True, exist_ok=True)
    t_ready = time.perf_counter()

    render_s = 0.0

    threads = torch.get_num_threads()

    def frames():  # runs in the rendering thread (rendered_ahead)
        nonlocal render_s
        import cv2

        torch.set_num_threads(threads)  # a new thread starts from torch's default: use the caller's
        for k in range(num):
            t = time.perf_counter()
            with torch.no_grad():
                image = to_uint8(avatar(seq.inputs(k, avatar, background=plate, device=dev)).image)
            render_s += time.perf_counter() - t
            if frames_dir is not None:
                cv2.imwrite(str(frames_dir / f"frame_{k:05d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            yield image

    def counted(images):
        bar = progress_report(total=num, desc="render", unit="frame", enabled=progress)
        try:
            for image in images:
                bar.update(1)
                yield image
        finally:
            bar.close()

    with rendered_ahead(frames(), depth=2) as images:
        write_mp4(out_path, counted(images), fps=FPS, audio=seq.samples, audio_rate=SAMPLE_RATE, aac_rate=48000)
    total = time.perf_counter() - t_start
    return {
        "out": str(out_path), "avatar": str(avatar_path), "frames": num, "seconds": num / FPS, "size": render_size,
        "setup_s": t_ready - t_start, "render_s": render_s, "total_s": total,
        "render_fps": num / max(render_s, 1e-9), "end_to_end_fps": num / max(total - (t_ready - t_start), 1e-9),
        "device": str(dev), "cpu_threads": torch.get_num_threads() if dev.type == "cpu" else None,
    }
