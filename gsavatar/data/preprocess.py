"""``gsavatar preprocess``: a talking-head video -> a cached, on-disk subject dataset.

The pipeline is a list of :class:`Stage` objects run in order. Each stage declares what its
result depends on (config fields, other stages); the hash of that plus the source file's hash
is the stage's *key*. A stage whose key matches the manifest's record and whose outputs exist
is skipped. Every output is written atomically (temp + rename), the manifest is rewritten
after each stage, and ``manifest["complete"]`` is set only at the very end, so an interrupted
or failed run never leaves a dataset that :class:`~gsavatar.data.dataset.SubjectDataset`
would trust.
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gsavatar import __version__
from gsavatar.config import PreprocessConfig, TrackingConfig, check_frame_size
from gsavatar.data.dataset import MANIFEST_VERSION, frame_name, read_manifest
from gsavatar.data.io import (
    atomic_directory,
    atomic_save_npz,
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    stable_hash,
)
from gsavatar.data.video import FPS, SAMPLE_RATE, DecodeStats, decode_audio, iter_frames, probe_video, write_wav
from gsavatar.errors import IncompleteDatasetError, InputError, MissingDependencyError, StoppedBySignal, Terminated
from gsavatar.files import check_creatable_dir, remove_quietly


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(total: int, desc: str):
    from gsavatar.progress import progress

    # A bar on a terminal; a few plain lines in logs and CI.
    return progress(total=total or None, desc=f"{desc:<15}", unit="frame", leave=False)


@dataclasses.dataclass
class Context:
    """What the stages share during one run."""

    video: Path
    out: Path
    cfg: PreprocessConfig
    source_sha256: str
    manifest: dict
    results: dict = dataclasses.field(default_factory=dict)  # stage name -> its result dict
    model_load_s: float = 0.0  # one-time model loading, reported apart from per-frame work

    @property
    def num_frames(self) -> int:
        return int(self.results["scan"]["num_frames"])

    def load_model(self, factory: Callable):
        t = time.perf_counter()
        model = factory()
        self.model_load_s += time.perf_counter() - t
        return model


@dataclasses.dataclass(frozen=True)
class Stage:
    """One preprocessing step: ``run`` writes ``outputs`` and returns a JSON-able result."""

    name: str
    run: Callable[[Context], dict]
    outputs: tuple[str, ...]
    config_fields: tuple[str, ...] = ()  # PreprocessConfig fields the result depends on
    depends: tuple[str, ...] = ()  # earlier stages whose results it reads
    version: int = 1  # bump when the stage's code changes what it writes


def _prefetch(load: Callable[[int], np.ndarray], indices, depth: int = 4) -> Iterator[np.ndarray]:
    """``load(i)`` for each index, read ahead on one thread but never more than ``depth`` items
    ahead (``Executor.map`` would queue every result and hold a long video in RAM)."""
    from collections import deque

    with ThreadPoolExecutor(1) as pool:
        queue: deque = deque()
        for i in indices:
            queue.append(pool.submit(load, i))
            if len(queue) > depth:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()


class _BackgroundWriter:
    """Runs write calls on one thread, at most ``depth`` outstanding (bounded memory); any
    failure (an exception or a False return, as cv2.imwrite gives) is raised at the latest on close."""

    def __init__(self, depth: int = 8):
        self._pool = ThreadPoolExecutor(1)
        self._pending: list = []
        self._depth = depth

    def submit(self, fn: Callable, *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        if len(self._pending) > self._depth:
            self._check(self._pending.pop(0))

    @staticmethod
    def _check(future) -> None:
        if future.result() is False:
            raise OSError("a write to the subject dataset failed (disk full or not writable?)")

    def __enter__(self) -> "_BackgroundWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                for future in self._pending:
                    self._check(future)
        finally:
            self._pool.shutdown(wait=True)


def _read_frames(ctx: Context, indices=None) -> Iterator[np.ndarray]:
    """Stored frames as RGB, read ahead on a thread (cv2 releases the GIL while decoding)."""
    import cv2

    indices = range(ctx.num_frames) if indices is None else indices
    load = lambda i: np.ascontiguousarray(cv2.imread(str(ctx.out / "frames" / frame_name(i, "jpg")))[..., ::-1])  # noqa: E731
    yield from _prefetch(load, indices)


# ----------------------------------------------------------------------------- stages
def _stage_scan(ctx: Context) -> dict:
    """Probe the file, track the face on downscaled frames, and choose the fixed crop."""
    from gsavatar.data.crop import compute_crop
    from gsavatar.data.landmarks import FaceDetector

    cfg, name = ctx.cfg, ctx.video.name
    info = probe_video(ctx.video)
    if not info.has_audio:
        raise InputError(f"{name} has no audio track (an audio-driven avatar needs speech)")
    if 0 < info.duration_s < cfg.min_duration_s:
        raise InputError(f"{name} is {info.duration_s:.1f} s long; at least {cfg.min_duration_s:g} s of speech is needed")
    scale = min(1.0, cfg.max_source_side / max(info.width, info.height))
    sw, sh = max(2, int(round(info.width * scale / 2)) * 2), max(2, int(round(info.height * scale / 2)) * 2)
    detector = ctx.load_model(FaceDetector)
    stats = DecodeStats()
    boxes, found, multi = [], [], 0
    previous = None
    expected = int(info.duration_s * FPS) or None
    stride = cfg.scan_stride
    with _progress(expected or 0, "scan") as bar:
        for k, frame in iter_frames(ctx.video, lambda f: f, stats):
            bar.update()
            if k % stride:
                continue  # the crop needs the face track, not every frame of it
            small = frame.to_ndarray(format="rgb24", width=sw, height=sh)
            candidates = detector(small) / scale
            multi += len(candidates) > 1
            if len(candidates):
                centres = 0.5 * (candidates[:, :2] + candidates[:, 2:])
                pick = 0 if previous is None else int(np.argmin(np.linalg.norm(centres - previous, axis=1)))
                previous = centres[pick]
                boxes.append(candidates[pick])
            else:
                boxes.append(np.full(4, np.nan, np.float32))
            found.append(len(candidates) > 0)
    detector.close()
    n = stats.output_frames
    if n == 0:
        raise InputError(f"{name} has no decodable video frames")
    if stats.errors or (info.duration_s > 0 and stats.decoded_duration_s < 0.9 * info.duration_s):
        raise InputError(f"{name} looks truncated or corrupt: {stats.decoded_duration_s:.1f} s of "
                         f"{info.duration_s:.1f} s decoded{f' ({stats.errors})' if stats.errors else ''}")
    if n < cfg.min_duration_s * FPS:
        raise InputError(f"{name} is {n / FPS:.1f} s long; at least {cfg.min_duration_s:g} s of speech is needed")
    found = np.asarray(found)
    if not found.any():
        raise InputError(f"no face found in {name}")
    if multi > 0.05 * len(found):
        _log(f"warning: more than one face in {multi} of {len(found)} scanned frames of {name}; keeping the largest consistent track")
    crop = compute_crop(np.asarray(boxes)[found], info.width, info.height, cfg.crop_face_scale, cfg.crop_face_centre)
    result = {
        "num_frames": n, "t0": stats.t0, "crop": crop.to_dict(),
        "source": {"width": info.width, "height": info.height, "duration_s": info.duration_s,
                   "video_codec": info.video_codec, "audio_codec": info.audio_codec,
                   "average_fps": info.average_fps, "source_frames": stats.source_frames},
        "scanned_frames": int(len(found)), "scan_face_frames": int(found.sum()), "multi_face_frames": int(multi),
    }
    atomic_write_json(ctx.out / "scan.json", {**result, "face_boxes": np.asarray(boxes).round(1).tolist()})
    return result


def _stage_frames(ctx: Context) -> dict:
    """Decode again, cut the fixed crop, resize, stream JPEGs to disk; decode the audio."""
    import cv2

    scan, size = ctx.results["scan"], ctx.cfg.size
    c = scan["crop"]
    x0, y0, side = c["x0"], c["y0"], c["side"]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC

    def crop_resize(frame) -> np.ndarray:
        image = frame.to_ndarray(format="rgb24")[y0:y0 + side, x0:x0 + side]
        return cv2.resize(image, (size, size), interpolation=interp)

    def write(path: Path, image: np.ndarray) -> None:
        ok, buf = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, ctx.cfg.jpeg_quality])
        path.write_bytes(buf.tobytes())

    n = scan["num_frames"]
    stats = DecodeStats()
    with atomic_directory(ctx.out / "frames") as tmp, _progress(n, "frames") as bar:
        with _BackgroundWriter() as writer:
            for k, image in iter_frames(ctx.video, crop_resize, stats, max_frames=n):
                writer.submit(write, tmp / frame_name(k, "jpg"), image)
                bar.update()
        if stats.output_frames != n:
            raise InputError(f"{ctx.video.name}: second decoding pass gave {stats.output_frames} frames, first gave {n}")
    audio, real_seconds = decode_audio(ctx.video, scan["t0"], n)
    tmp_wav = ctx.out / ".audio.wav.tmp"
    try:
        write_wav(tmp_wav, audio)
        tmp_wav.replace(ctx.out / "audio.wav")
    except BaseException:
        remove_quietly(tmp_wav)
        raise
    if real_seconds < n / FPS - 0.5:
        _log(f"warning: the audio track is {real_seconds:.1f} s, the video {n / FPS:.1f} s; the rest is silence")
    return {"audio_seconds": real_seconds, "audio_samples": int(audio.size)}


def _stage_landmarks(ctx: Context) -> dict:
    """FaceMesh (478 points, tracking mode) and the person matte on every stored frame.

    The two MediaPipe graphs run side by side on the two threads (each frame is read once);
    landmark dropouts are interpolated and flagged. Writes landmarks.npz and matte/ (uint8
    person probability PNGs).
    """
    import cv2

    from gsavatar.data.landmarks import NUM_LANDMARKS, FaceMeshTracker, choose_face, interpolate_dropouts
    from gsavatar.data.masks import PersonSegmenter

    n = ctx.num_frames
    # Tracking mode only skips re-detection once it holds max_faces faces, so ask for a second
    # face only when the scan saw more than one (it costs about 50% more per frame).
    max_faces = 2 if ctx.results["scan"]["multi_face_frames"] else 1
    mesh = ctx.load_model(lambda: FaceMeshTracker(max_faces=max_faces))
    segmenter = ctx.load_model(PersonSegmenter)
    landmarks = np.zeros((n, NUM_LANDMARKS, 3), np.float32)
    detected = np.zeros(n, bool)
    multi, previous = 0, None
    write_png = lambda path, image: cv2.imwrite(str(path), image)  # noqa: E731
    with (atomic_directory(ctx.out / "matte") as tmp, ThreadPoolExecutor(1) as seg_pool,
          _BackgroundWriter() as writer, _progress(n, "landmarks+matte") as bar):
        for k, image in enumerate(_read_frames(ctx)):
            matte = seg_pool.submit(segmenter, image)
            faces = mesh(image)
            multi += len(faces) > 1
            face = choose_face(faces, previous)
            if face is not None:
                landmarks[k], detected[k], previous = face, True, face[:, :2].mean(0)
            alpha = (np.clip(matte.result(), 0, 1) * 255).round().astype(np.uint8)
            writer.submit(write_png, tmp / frame_name(k, "png"), alpha)
            bar.update()
    mesh.close()
    segmenter.close()
    fraction = detected.mean()
    if fraction < ctx.cfg.min_face_fraction:
        raise InputError(f"face landmarks found in only {100 * fraction:.0f}% of the frames of {ctx.video.name}")
    landmarks, interpolated, valid = interpolate_dropouts(landmarks, detected, ctx.cfg.max_interpolated_gap)
    atomic_save_npz(ctx.out / "landmarks.npz", landmarks=landmarks, detected=detected,
                    interpolated=interpolated, valid=valid)
    return {"detected_frames": int(detected.sum()), "interpolated_frames": int(interpolated.sum()),
            "invalid_frames": int((~valid).sum()), "multi_face_frames": int(multi)}


def _stage_masks(ctx: Context) -> dict:
    """Person matte + landmark polygons -> one bit-field label PNG per frame."""
    import cv2

    from gsavatar.data.masks import MOUTH, label_map

    n = ctx.num_frames
    landmarks = np.load(ctx.out / "landmarks.npz")["landmarks"]
    read = lambda k: cv2.imread(str(ctx.out / "matte" / frame_name(k, "png")), cv2.IMREAD_UNCHANGED)  # noqa: E731
    mouth_pixels = 0
    write_png = lambda path, image: cv2.imwrite(str(path), image)  # noqa: E731
    with atomic_directory(ctx.out / "masks") as tmp, _BackgroundWriter() as writer, _progress(n, "masks") as bar:
        for k, matte in enumerate(_prefetch(read, range(n))):
            labels = label_map(matte.astype(np.float32) / 255.0, landmarks[k])
            mouth_pixels += int(np.count_nonzero(labels & MOUTH))
            writer.submit(write_png, tmp / frame_name(k, "png"), labels)
            bar.update()
    return {"mean_mouth_pixels": mouth_pixels / n}


def _stage_background(ctx: Context) -> dict:
    """Temporal median of background pixels over evenly sampled frames, holes filled."""
    import cv2

    from gsavatar.data.masks import PERSON, background_plate

    n = ctx.num_frames
    indices = np.unique(np.linspace(0, n - 1, min(n, ctx.cfg.background_samples)).round().astype(int))
    frames = np.stack(list(_read_frames(ctx, indices)))
    person = np.stack([cv2.imread(str(ctx.out / "masks" / frame_name(i, "png")), cv2.IMREAD_UNCHANGED) & PERSON > 0
                       for i in indices])
    plate, unseen = background_plate(frames, person)
    ok, buf = cv2.imencode(".png", plate[..., ::-1])
    atomic_write_bytes(ctx.out / "background.png", buf.tobytes())
    return {"sampled_frames": int(len(indices)), "filled_fraction": round(unseen, 4)}


def _stage_signals(ctx: Context) -> dict:
    """Eye blink (normalised EAR) and mouth opening per frame."""
    from gsavatar.data.signals import blink_signal, eye_aspect_ratio, mouth_opening

    data = np.load(ctx.out / "landmarks.npz")
    ear = eye_aspect_ratio(data["landmarks"]).astype(np.float32)
    blink = blink_signal(ear, data["valid"])
    mouth = mouth_opening(data["landmarks"])
    atomic_save_npz(ctx.out / "signals.npz", blink=blink, ear=ear, mouth_open=mouth)
    return {"blink_mean": float(blink.mean()), "mouth_open_mean": float(mouth.mean())}


def _stage_audio_features(ctx: Context) -> dict:
    """Each configured audio feature kind, aligned to frames: features/<kind>.npy [N, S, D]."""
    from gsavatar.data.audio_features import make_extractor
    from gsavatar.data.video import read_wav

    wav, rate = read_wav(ctx.out / "audio.wav")
    assert rate == SAMPLE_RATE
    described = {}
    with atomic_directory(ctx.out / "features") as tmp:
        for kind in ctx.cfg.audio_features:
            extractor = ctx.load_model(lambda kind=kind: make_extractor(kind))
            t = time.perf_counter()
            features = extractor.extract(wav, ctx.num_frames)
            np.save(tmp / f"{kind}.npy", features.astype(np.float32))
            described[kind] = {"shape": list(features.shape), "extract_s": round(time.perf_counter() - t, 3),
                               **extractor.describe()}
    return {"kinds": described}


def _stage_tracking(ctx: Context) -> dict:
    """Learn the subject's morphable model and fit pose, expression and focal length to the
    landmark tracks: tracking.npz and tracking_report.json (see gsavatar.tracking)."""
    from gsavatar.tracking.camera import principal_point_in_crop
    from gsavatar.tracking.tracker import track_landmarks

    scan, size = ctx.results["scan"], ctx.cfg.size
    principal = principal_point_in_crop(scan["source"]["width"], scan["source"]["height"], scan["crop"], size)
    with np.load(ctx.out / "landmarks.npz") as data:
        landmarks, valid = data["landmarks"], data["valid"]
    t = time.perf_counter()
    bars: dict = {}

    def progress(step: str, done: int, total: int) -> None:
        if step not in bars:
            for bar in bars.values():
                bar.close()
            bars[step] = _progress(total, f"track: {step}")
        bars[step].update_to(done)

    try:
        result = track_landmarks(landmarks, valid, size, principal, ctx.cfg.tracking, progress)
    finally:
        for bar in bars.values():
            bar.close()
    wall = time.perf_counter() - t
    if result.focal_at_search_limit:
        _log(f"warning: the focal length search ended at its limit ({result.focal:.0f} px): the video shows too "
             "little head rotation to measure perspective. The fit is still good; pass --focal if you know it.")
    result.save(ctx.out / "tracking.npz")
    metrics = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.metrics().items()}
    report = {**metrics, "num_frames": result.num_frames, "valid_frames": int(valid.sum()),
              "principal_point_px": [round(c, 2) for c in principal], "size": size,
              "expression_components": result.model.num_expression,
              "explained_expression_variance": round(result.explained_variance, 5),
              "focal_search": {str(f): s for f, s in result.focal_search.items()},
              "focal_at_search_limit": result.focal_at_search_limit,
              "timings_s": result.timings, "wall_s": round(wall, 3)}
    atomic_write_json(ctx.out / "tracking_report.json", report)
    return metrics


STAGES: tuple[Stage, ...] = (
    Stage("scan", _stage_scan, ("scan.json",),
          ("min_duration_s", "max_source_side", "scan_stride", "crop_face_scale", "crop_face_centre")),
    Stage("frames", _stage_frames, ("frames", "audio.wav"), ("size", "jpeg_quality"), ("scan",)),
    Stage("landmarks", _stage_landmarks, ("landmarks.npz", "matte"), ("max_interpolated_gap", "min_face_fraction"),
          ("frames",)),
    Stage("masks", _stage_masks, ("masks",), (), ("frames", "landmarks")),
    Stage("background", _stage_background, ("background.png",), ("background_samples",), ("masks",)),
    Stage("signals", _stage_signals, ("signals.npz",), (), ("landmarks",)),
    Stage("audio_features", _stage_audio_features, ("features",), ("audio_features",), ("frames",)),
    Stage("tracking", _stage_tracking, ("tracking.npz", "tracking_report.json"), ("size", "tracking"),
          ("scan", "landmarks")),
)


# ----------------------------------------------------------------------------- driver
def _check_output_dir(out: Path) -> bool:
    """Refuse to write into a non-empty folder that is not a subject dataset, or one this user cannot
    write (or create). Returns created."""
    check_creatable_dir(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and read_manifest(out) is None:
            raise InputError(f"{out} is not empty and is not a gsavatar subject dataset; choose another -o")
        return False
    out.mkdir(parents=True)
    return True


def _jsonable(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _stage_key(stage: Stage, ctx: Context, keys: dict[str, str]) -> str:
    return stable_hash({
        "stage": stage.name, "version": stage.version, "source": ctx.source_sha256,
        "config": {f: _jsonable(getattr(ctx.cfg, f)) for f in stage.config_fields},
        "upstream": {d: keys[d] for d in stage.depends},
    })


def _remove_leftovers(out: Path, outputs: tuple[str, ...]) -> None:
    """Remove the temporaries of ``outputs`` that a killed run (SIGKILL, power loss) could not: an
    interrupted run removes its own, but a killed one leaves them (a stage's frames can be gigabytes)."""
    for name in outputs:
        for stale in [*out.glob(f".{name}.*tmp*"), out / f".{name}.old"]:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                remove_quietly(stale)


def _run_stage(stage: Stage, ctx: Context, key: str, force: bool = False) -> dict:
    """Run ``stage`` unless its manifest record has this key and its outputs exist; keeps the
    manifest current (record marked not-done before, done with its result after). Returns the
    stage's entry for the report."""
    manifest, out = ctx.manifest, ctx.out
    record = manifest["stages"].get(stage.name, {})
    if (not force and record.get("done") and record.get("key") == key
            and all((out / o).exists() for o in stage.outputs)):
        ctx.results[stage.name] = record["result"]
        _log(f"  {stage.name:<15} up to date, skipped")
        return {"wall_s": 0.0, "skipped": True}
    manifest["stages"][stage.name] = {"done": False, "key": key}
    atomic_write_json(out / "manifest.json", manifest)
    _remove_leftovers(out, stage.outputs)
    t = time.perf_counter()
    load_before = ctx.model_load_s
    result = stage.run(ctx)
    wall = time.perf_counter() - t
    ctx.results[stage.name] = result
    manifest["stages"][stage.name] = {"done": True, "key": key, "result": result, "wall_s": round(wall, 3)}
    atomic_write_json(out / "manifest.json", manifest)
    _log(f"  {stage.name:<15} done in {wall:6.1f} s")
    return {"wall_s": round(wall, 3), "model_load_s": round(ctx.model_load_s - load_before, 3), "skipped": False}


def track(subject_dir: str | Path, cfg: TrackingConfig | None = None, force: bool = False) -> dict:
    """(Re)run only the tracking stage on an existing subject dataset (``gsavatar track``).

    Returns the tracking stage's result (the metrics of tracking_report.json). The dataset is
    marked incomplete while tracking runs, so an interrupted run is never trusted.
    """
    out = Path(subject_dir)
    manifest = read_manifest(out)
    if manifest is None or manifest.get("format") != "gsavatar-subject":
        raise InputError(f"{out} is not a subject dataset (no readable manifest.json); run gsavatar preprocess first")
    stage = next(s for s in STAGES if s.name == "tracking")
    records = manifest.get("stages", {})
    upstream = [s.name for s in STAGES if s.name != "tracking"]
    unfinished = [name for name in upstream if not records.get(name, {}).get("done")]
    if unfinished or "source" not in manifest:
        raise IncompleteDatasetError(f"{out} is incomplete (unfinished stages: {', '.join(unfinished) or 'unknown'}); "
                                     "re-run gsavatar preprocess")
    cfg = cfg or TrackingConfig()
    pcfg = PreprocessConfig(size=int(manifest["size"]), tracking=cfg)
    ctx = Context(Path(manifest["source"]["path"]), out, pcfg, manifest["source"]["sha256"], manifest,
                  results={name: records[name]["result"] for name in upstream})
    keys = {name: records[name]["key"] for name in upstream}
    manifest["complete"] = False  # written only if the stage actually runs
    _run_stage(stage, ctx, _stage_key(stage, ctx, keys), force)
    manifest.setdefault("config", {})["tracking"] = dataclasses.asdict(cfg)
    manifest["stages"] = {s.name: manifest["stages"][s.name] for s in STAGES}
    manifest["complete"] = True
    atomic_write_json(out / "manifest.json", manifest)
    return ctx.results["tracking"]


def preprocess(video: str | Path, out: str | Path, cfg: PreprocessConfig | None = None) -> dict:
    """Run (or resume) every stage for ``video`` into ``out``; returns the report dict.

    Interrupted (Ctrl-C, or SIGTERM as the command line raises it) or failed, it keeps the stages
    that finished, so the same call resumes; an interrupt is reported as
    :class:`~gsavatar.errors.StoppedBySignal` saying what was kept.
    """
    cfg = cfg or PreprocessConfig()
    video, out = Path(video), Path(out)
    if not video.is_file():
        raise InputError(f"no such file: {video}")
    check_frame_size(cfg.size, minimum=64)  # tracking and masks need a face of some size
    from gsavatar.data.audio_features import available_kinds, check_available

    unknown = [k for k in cfg.audio_features if k not in available_kinds()]
    if unknown:
        hint = (" (a combination such as logmel+whisper is not stored: store each kind, then train with "
                "[avatar] audio_feature = \"logmel+whisper\")") if any("+" in k for k in unknown) else ""
        raise InputError(f"unknown audio feature kind(s) {unknown}; known: {', '.join(available_kinds())}{hint}")
    for kind in cfg.audio_features:  # a missing package or model fails now, not after the long stages
        try:
            check_available(kind)
        except MissingDependencyError as e:
            raise MissingDependencyError(f"{e} (or leave '{kind}' out of --audio-features)") from None
    created = _check_output_dir(out)
    t_start = time.perf_counter()
    report_stages: dict = {}  # stages finished (run or up to date) in this run, in order
    running = None
    try:
        manifest = read_manifest(out) or {}
        ctx = Context(video, out, cfg, file_sha256(video), manifest)
        manifest.update({"format": "gsavatar-subject", "version": MANIFEST_VERSION, "gsavatar": __version__,
                         "complete": False})
        manifest.setdefault("stages", {})
        atomic_write_json(out / "manifest.json", manifest)
        keys: dict[str, str] = {}
        for stage in STAGES:
            running = stage.name
            keys[stage.name] = _stage_key(stage, ctx, keys)
            report_stages[stage.name] = _run_stage(stage, ctx, keys[stage.name])
        running = None
        # Drop records of stages that no longer exist, then publish the dataset as complete.
        manifest["stages"] = {s.name: manifest["stages"][s.name] for s in STAGES}
        report = _finish(ctx, report_stages, time.perf_counter() - t_start)
        return report
    except BaseException as e:
        # The unfinished stage's temporaries are already gone (the atomic writers remove their own);
        # finished stages and the manifest recording them stay, so the same call resumes. Only a
        # folder this run created and finished nothing in is removed.
        removed = created and not report_stages
        if removed:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM as the command line raises it
            raise _stopped(e, out, running, list(report_stages), removed) from e
        raise


def _stopped(e: KeyboardInterrupt, out: Path, running: str | None, finished: list[str], removed: bool) -> StoppedBySignal:
    """The one-line report of an interrupted run: what was kept, and that the same command resumes."""
    signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
    where = f"during the {running} stage" if running else "while writing the report"
    if removed:
        kept = f"nothing had finished, {out} removed: run the same command to start again"
    elif finished:
        kept = f"kept the finished stages ({', '.join(finished)}) in {out}: run the same command to resume"
    else:
        kept = f"no stage had finished yet in {out}: run the same command to resume"
    return StoppedBySignal(f"preprocessing stopped by {signum.name} {where}; {kept}", signum)


def _finish(ctx: Context, report_stages: dict, total_s: float) -> dict:
    cfg, res, n = ctx.cfg, ctx.results, ctx.num_frames
    n_test = int(round(n * cfg.test_fraction))
    features = res["audio_features"]["kinds"]
    ctx.manifest.update({
        "source": {"path": str(ctx.video.resolve()), "name": ctx.video.name, "sha256": ctx.source_sha256,
                   **res["scan"]["source"]},
        "fps": FPS, "sample_rate": SAMPLE_RATE, "num_frames": n, "size": cfg.size,
        "crop": res["scan"]["crop"], "t0": res["scan"]["t0"],
        "split": {"train": [0, n - n_test], "test": [n - n_test, n], "test_fraction": cfg.test_fraction},
        "audio_features": {k: {"shape": v["shape"], "dim": v["dim"], "steps_per_frame": v["steps_per_frame"],
                               "description": v} for k, v in features.items()},
        "config": dataclasses.asdict(cfg),
    })
    detected = res["landmarks"]["detected_frames"]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "video": ctx.video.name, "num_frames": n, "size": cfg.size, "crop": res["scan"]["crop"],
        "frames_with_face": detected, "face_fraction": round(detected / n, 4),
        "interpolated_frames": res["landmarks"]["interpolated_frames"],
        "multi_face_frames": res["scan"]["multi_face_frames"],
        "stages": report_stages,
        "total_wall_s": round(total_s, 3),
        "model_load_s": round(ctx.model_load_s, 3),
        "wall_s_excluding_model_load": round(total_s - ctx.model_load_s, 3),
        "peak_rss_mb": round(peak_rss_mb, 1),
    }
    atomic_write_json(ctx.out / "preprocess_report.json", report)
    ctx.manifest["complete"] = True
    atomic_write_json(ctx.out / "manifest.json", ctx.manifest)
    return report
