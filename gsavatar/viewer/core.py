"""The viewer's logic that needs no web server: play clock, camera mapping, audio, uploads, frames.

Kept apart from :mod:`gsavatar.viewer.server` (which imports viser) so that it can be tested,
and reused by other front ends, without the optional dependency.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import tempfile
import threading
import time
import wave
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gsavatar.drive import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, DriveConfig, SpeechFeaturizer, build_drive, frame_count, load_speech
from gsavatar.errors import InputError
from gsavatar.imaging import to_uint8
from gsavatar.model.avatar import LAYERS
from gsavatar.model.io import SubjectInfo
from gsavatar.tracking.camera import quat_to_matrix, scale_intrinsics

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_SECONDS = 120.0
MAX_AUDIO_SECONDS = 300.0  # --audio: the whole track travels to the browser (WAV) on every Play
DEFAULT_SECONDS = 10.0
AUDIO_ELEMENT_ID = "gsavatar-audio"


# -- the play clock ---------------------------------------------------------------------------
def frame_at(t: float, num_frames: int, fps: int = FPS) -> int:
    """The frame shown at timeline time ``t`` seconds: ``floor(t * fps)``, clamped to the track.

    Frame k owns [k / fps, (k + 1) / fps), the same time base as the audio (samples
    [640 k, 640 (k + 1))). The tiny epsilon keeps ``frame_at(k / fps) == k`` despite rounding.
    """
    return int(min(max(num_frames - 1, 0), max(0, math.floor(t * fps + 1e-9))))


class PlayClock:
    """The server-owned timeline clock: time = start position + wall time since Play.

    Frames are always chosen from this clock, never counted, so a renderer slower than 25 fps
    drops frames instead of drifting behind the audio. ``now`` is injectable for tests.
    """

    def __init__(self, num_frames: int, fps: int = FPS, now: Callable[[], float] = time.monotonic):
        self.num_frames = int(num_frames)
        self.fps = int(fps)
        self._now = now
        self.playing = False
        self._origin_media = 0.0  # timeline seconds at _origin_wall
        self._origin_wall = 0.0

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def time(self) -> float:
        """Timeline seconds now (not clamped to the track's end; see :meth:`ended`)."""
        if not self.playing:
            return self._origin_media
        return self._origin_media + max(0.0, self._now() - self._origin_wall)

    def frame(self, lookahead: float = 0.0) -> int:
        """The frame to show now (``lookahead``: for the time a frame started now will be on screen)."""
        return frame_at(self.time() + lookahead, self.num_frames, self.fps)

    def play(self, start_frame: int | None = None, delay: float = 0.0) -> None:
        """Run from ``start_frame`` (default: where it stands); the clock holds the start
        position for ``delay`` seconds (the browser's time to start the audio)."""
        if start_frame is not None:
            self.seek(start_frame)
        self._origin_wall = self._now() + max(0.0, delay)
        self.playing = True

    def pause(self) -> int:
        """Stop the clock on the frame it shows; returns that frame."""
        frame = frame_at(self.time(), self.num_frames, self.fps)
        self.playing = False
        self._origin_media = frame / self.fps
        return frame

    def seek(self, frame: int) -> None:
        """Jump to ``frame`` (keeps running if playing)."""
        self._origin_media = min(max(int(frame), 0), max(self.num_frames - 1, 0)) / self.fps
        self._origin_wall = self._now()

    def origin_epoch(self) -> float:
        """Unix time at which the running clock is (or was) at its start position."""
        return time.time() + (self._origin_wall - self._now())

    def ended(self) -> bool:
        return self.playing and self.time() >= self.duration

    def time_to_next_frame(self) -> float:
        """Seconds until the frame shown changes (while playing)."""
        now = self._now()
        if now < self._origin_wall:  # holding the start position
            return self._origin_wall - now + 1.0 / self.fps
        t = self.time()
        return max(0.0, (math.floor(t * self.fps + 1e-9) + 1) / self.fps - t)


# -- camera mapping ---------------------------------------------------------------------------
def camera_from_pose(wxyz, position, snap: float = 1e-6) -> np.ndarray:
    """Our ``camera`` transform (acts on tracked-camera-frame points) from a viser client camera.

    viser reports the browser camera as camera-to-world ``P_world = R p_cam + t`` in the OpenCV
    convention (x right, y down, z forward); the viewer's world frame IS the tracked camera's
    OpenCV frame, so the transform of world points into the browser camera is the inverse,
    ``[R^T | -R^T t]``. Within ``snap`` of the identity it is returned as the exact identity, so
    the untouched initial view renders bit-for-bit like ``camera=None``.
    """
    R = quat_to_matrix(torch.tensor([float(v) for v in wxyz], dtype=torch.float64)).numpy()
    t = np.asarray(position, np.float64).reshape(3)
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    if np.abs(out - np.eye(4)).max() < snap:
        return np.eye(4)
    return out


def tracked_fov(K: torch.Tensor, size: int) -> float:
    """Vertical field of view (radians) of the tracked camera at ``size`` x ``size``."""
    return 2.0 * math.atan(size / (2.0 * float(K[1, 1])))


def initial_camera(K: torch.Tensor, size: int, centre: np.ndarray) -> dict:
    """The browser's initial camera = the tracked camera: at the origin, looking down +z (at
    the head's depth, so orbiting turns about the head), up = -y, the tracked field of view."""
    depth = float(centre[2]) if centre is not None and float(centre[2]) > 1e-3 else 1.0
    return {"position": (0.0, 0.0, 0.0), "look_at": (0.0, 0.0, depth), "up": (0.0, -1.0, 0.0),
            "fov": tracked_fov(K, size)}


def _even(x: float) -> int:
    return max(16, 2 * int(round(x / 2)))


def view_intrinsics(K: torch.Tensor, size: int, fov_y: float | None = None, aspect: float = 1.0,
                    tol: float = 1e-6) -> tuple[torch.Tensor, int, int]:
    """``(K, width, height)`` of the image to draw for a browser camera.

    The browser stretches the background image over its whole canvas, so the image has the
    canvas's aspect ratio and vertical field of view ``fov_y``; it holds about ``size``^2
    pixels whatever the shape. The tracked camera's principal-point offset is kept (in units of
    the focal length), so a square canvas at the tracked field of view gives back ``K`` itself.
    """
    K = K.detach().cpu().float()
    if fov_y is None:
        fov_y = tracked_fov(K, size)
    aspect = float(aspect) if aspect and math.isfinite(aspect) and aspect > 0 else 1.0
    aspect = min(max(aspect, 0.2), 5.0)
    if abs(aspect - 1.0) < 1e-3:
        width = height = size
    else:
        width, height = _even(size * math.sqrt(aspect)), _even(size / math.sqrt(aspect))
    if width == size and height == size and abs(fov_y - tracked_fov(K, size)) <= tol * max(1.0, fov_y):
        return K.clone(), size, size
    f = height / (2.0 * math.tan(min(max(fov_y, 1e-4), math.pi - 1e-3) / 2.0))
    scale = f / float(K[1, 1])
    out = torch.tensor([[f, 0.0, width / 2.0 + (float(K[0, 2]) - size / 2.0) * scale],
                        [0.0, f, height / 2.0 + (float(K[1, 2]) - size / 2.0) * scale],
                        [0.0, 0.0, 1.0]])
    return out, width, height


def view_background(plate: torch.Tensor, K_plate: torch.Tensor, K_view: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The background plate as the view camera sees it: a screen-fixed image at the tracked
    focal length, centred on the principal point, edges extended where the view is wider."""
    hp, wp = plate.shape[:2]
    u = torch.arange(width, dtype=torch.float32) + 0.5
    v = torch.arange(height, dtype=torch.float32) + 0.5
    s = float(K_plate[1, 1]) / float(K_view[1, 1])
    up = (u - float(K_view[0, 2])) * s + float(K_plate[0, 2])
    vp = (v - float(K_view[1, 2])) * s + float(K_plate[1, 2])
    grid = torch.stack(torch.meshgrid(vp / hp * 2 - 1, up / wp * 2 - 1, indexing="ij")[::-1], -1)
    out = torch.nn.functional.grid_sample(plate.permute(2, 0, 1)[None].float(), grid[None].to(plate.device),
                                          mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].permute(1, 2, 0)


# -- audio ------------------------------------------------------------------------------------
def wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM mono WAV of float samples in [-1, 1]."""
    pcm = (np.clip(np.asarray(samples, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def audio_html(samples: np.ndarray | None, start_frame: int = 0, playing: bool = False, muted: bool = False,
               origin_epoch: float | None = None) -> str:
    """The page's ``<audio>`` element (viser runs no ``<script>`` in HTML: the server drives it).

    Playing: an autoplaying element whose source is the track from ``start_frame`` on (sliced
    here, sample-exact: frame k starts at sample 640 k), sent when the server's clock starts.
    ``origin_epoch`` (Unix time at which the server clock passes ``start_frame``) adds one-line
    ``onplaying`` / ``ontimeupdate`` handlers that seek the sound to the server clock once it
    really plays, taking out the browser's start-up latency (inline handlers do run in viser's
    HTML, unlike ``<script>``; where they do not, the server's latency allowance remains). Paused: an element with no source (a tiny
    message; scrubbing while paused sends no audio at all).
    """
    attrs = f'id="{AUDIO_ELEMENT_ID}" data-start-frame="{int(start_frame)}"'
    if muted:
        attrs += " muted"
    if not playing or samples is None:
        return f'<audio {attrs} data-state="paused" preload="none"></audio>'
    clip = samples[int(start_frame) * SAMPLES_PER_FRAME:]
    if origin_epoch is not None:
        # e = where the server clock is minus where the sound is. When off by more than 1.5 frames,
        # seek to the clock plus a lead k that learns the browser's seek latency (each later
        # correction adds the error left by the previous one); not while seeking, 0.4 s apart at
        # least, 5 times at most, so a remote browser with a badly set clock cannot loop.
        fix = (f"if(this.seeking)return;var s=this.dataset,w=Date.now()/1000,d=w-{origin_epoch:.3f},"
               f"e=d-this.currentTime,n=+(s.fixes||0),k=+(s.lead||0);"
               f"if(n<5&&w-(+(s.at||0))>0.4&&d>0&&d<{len(clip) / SAMPLE_RATE:.3f}&&Math.abs(e)>0.06&&Math.abs(e)<2)"
               f"{{if(n>0)k=Math.min(0.5,Math.max(0,k+e));s.fixes=n+1;s.lead=k;s.at=w;this.currentTime=d+k;}}")
        attrs += f' data-origin="{origin_epoch:.3f}" onplaying="{fix}" ontimeupdate="{fix}"'
    data = base64.b64encode(wav_bytes(clip)).decode("ascii")
    return f'<audio {attrs} data-state="playing" autoplay src="data:audio/wav;base64,{data}"></audio>'


FRAME_OVERLAY_ID = "gsavatar-frame"
"""The page's 2-D canvas that shows frames over viser's 3D view."""
# The inline handler of each frame's <img>: create the overlay canvas once, as a sibling of
# viser's WebGL canvas (stacked above it, below the control panel, deaf to the mouse so the camera
# still works), then draw the decoded frame into it.
_OVERLAY_DRAW = (
    "var o=document.getElementById('" + FRAME_OVERLAY_ID + "'),c=document.querySelector('canvas');"
    "if(!o&&c){o=document.createElement('canvas');o.id='" + FRAME_OVERLAY_ID + "';"
    "o.style.cssText='position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none;z-index:2';"
    "c.parentElement.appendChild(o);}"
    "if(o){o.style.display='block';if(o.width!==this.naturalWidth||o.height!==this.naturalHeight)"
    "{o.width=this.naturalWidth;o.height=this.naturalHeight;}o.getContext('2d').drawImage(this,0,0);}"
)
_OVERLAY_HIDE = "var o=document.getElementById('" + FRAME_OVERLAY_ID + "');if(o)o.style.display='none';"
_BLANK_GIF = "data:image/gif;base64,R0lGODlhAQABAAAAACH5BAEKAAEALAAAAAABAAEAAAICTAEAOw=="


def frame_overlay_html(jpeg: bytes | None) -> str:
    """HTML for the page's frame element: a hidden ``<img>`` of the JPEG whose onload draws it in the
    overlay canvas; ``None``: hide the overlay (the view shows viser's scene again).

    Why not viser's background image: each one makes viser's page re-render its WebGL scene for
    the next 250 ms, so at 20-25 frames a second the scene renders all the time; in a browser
    without a GPU that took 70 ms of CPU per frame against 18 ms for this (BENCHMARKS.md, Viewer)."""
    if jpeg is None:
        return f'<img src="{_BLANK_GIF}" style="display:none" onload="{_OVERLAY_HIDE}">'
    data = base64.b64encode(jpeg).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" style="display:none" onload="{_OVERLAY_DRAW}">'


def upload_label(name: str | None, limit: int = 80) -> str:
    """The file name a browser sent, fit for a one-line message: base name (after the last ``/`` or
    ``\\``), no control characters, short."""
    base = re.split(r"[\\/]", str(name or ""))[-1]
    label = "".join(c if c.isprintable() else "?" for c in base).strip() or "upload"
    return label if len(label) <= limit else label[: limit - 3] + "..."


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])(?:~|[A-Za-z]:)?[\\/][^\s'\"`<>|(),;:\[\]]*")
"""An absolute path in a message (POSIX, home-relative or Windows): a separator not preceded by a name."""


def public_text(text: str, replacements: dict[str, str] | None = None, limit: int = 300) -> str:
    """``text`` fit to show a browser: one line, at most ``limit`` characters, nothing of the server's
    file system. ``replacements`` maps a server-side file (its path or name, e.g. an upload's
    temporary copy) to what the user knows it as (the upload's name): an absolute path to that
    file, whatever folder it is reached through, and its bare name become the user's name; any
    other absolute path becomes ``<server path>``."""
    names = {re.split(r"[\\/]", k.rstrip("\\/"))[-1]: v for k, v in (replacements or {}).items() if k.rstrip("\\/")}

    def hide(match: re.Match) -> str:
        return names.get(re.split(r"[\\/]", match.group(0).rstrip("\\/"))[-1], "<server path>")

    out = _ABSOLUTE_PATH.sub(hide, str(text))
    for name in sorted(names, key=len, reverse=True):
        out = out.replace(name, names[name])
    out = " ".join("".join(c if c.isprintable() else " " for c in out).split())
    return out if len(out) <= limit else out[: limit - 3] + "..."


def too_big(label: str, size: int, max_bytes: int) -> str:
    """The one-line refusal of a file of ``size`` bytes (over ``max_bytes``)."""
    if f"{size / 2**20:.1f}" == f"{max_bytes / 2**20:.1f}":  # just over: MB would read as equal
        return f"{label} is {size} bytes, over the upload limit of {max_bytes} bytes"
    return f"{label} is {size / 2**20:.1f} MB, over the upload limit of {max_bytes / 2**20:g} MB"


def validate_upload(name: str, content: bytes, max_bytes: int = MAX_UPLOAD_BYTES,
                    max_seconds: float = MAX_UPLOAD_SECONDS) -> np.ndarray:
    """Decode an uploaded speech file to 16 kHz mono, or raise :class:`InputError` with one line.

    The type is judged by decoding the bytes (FFmpeg probes the content; the name is only
    shown in messages), then size and duration are limited.
    """
    label = upload_label(name)
    if len(content) == 0:
        raise InputError(f"{label} is empty")
    if len(content) > max_bytes:
        raise InputError(too_big(label, len(content), max_bytes))
    fd, tmp = tempfile.mkstemp(prefix="gsavatar-upload-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        try:
            return load_speech(tmp, max_seconds=max_seconds)
        except InputError as e:  # its messages name the temporary copy (or quote FFmpeg, which names its path)
            raise InputError(public_text(str(e), {tmp: label, Path(tmp).name: label})) from None
        except Exception as e:  # anything else the decoder throws at odd bytes: still one line
            raise InputError(f"{label} is not a readable audio file ({type(e).__name__})") from None
    finally:
        os.unlink(tmp)


class UploadGate:
    """Refuses an upload from the size its transfer announces, before the file's bytes arrive.

    A browser uploads a file to viser as one start message (file name, size in bytes, number of
    parts) followed by the parts (512 KiB each from viser's own client), sent without waiting
    for the server; viser keeps the parts of a transfer in memory until the last one and only
    then calls the upload button's callback. :func:`gsavatar.viewer.server.install_upload_gate`
    shows the gate every start and part message *before* viser handles it, and makes viser
    ignore what the gate refuses, so the memory an upload can hold is bounded by ``max_bytes``
    (per tab) instead of by what the client chooses to send:

    * a start announcing more than ``max_bytes`` (or an inconsistent transfer: a negative size,
      parts with under ``min_mean_part_bytes`` bytes on average, or no parts for a non-empty
      file) is refused at once, with the one-line reason :meth:`start` returns; its parts are
      dropped as they arrive;
    * so is a start from a tab whose accepted transfers still arriving would, together with
      this one, exceed ``max_bytes``;
    * an accepted transfer's part is dropped if it is out of range or a repeat, comes from
      another tab, or brings the bytes received past the announced size (a client that lied:
      the transfer is then refused, and never completes).

    The gate is plain bookkeeping (no viser import); the server calls it from viser's event
    loop and :meth:`forget_client` from a disconnect callback, so it takes a lock.
    """

    def __init__(self, max_bytes: int = MAX_UPLOAD_BYTES, min_mean_part_bytes: int = 1024,
                 max_refused_per_client: int = 64):
        self.max_bytes = int(max_bytes)
        self.min_mean_part_bytes = int(min_mean_part_bytes)
        self.max_refused_per_client = int(max_refused_per_client)
        self.dropped_parts = 0
        self.dropped_bytes = 0
        self._transfers: dict[str, dict] = {}  # transfer id -> its record (insertion order: oldest first)
        self._latest: dict[int, str] = {}  # tab -> the transfer it announced last
        self._lock = threading.Lock()

    def start(self, client_id: int, transfer_id: str, name: str | None, size_bytes: int, part_count: int) -> str | None:
        """A transfer announced by tab ``client_id``: None to accept it, else the one-line refusal."""
        label = upload_label(name)
        size, parts = int(size_bytes), int(part_count)
        why = None
        if size > self.max_bytes:
            why = too_big(label, size, self.max_bytes)
        elif size < 0 or parts < 0 or (size > 0 and parts == 0) or parts > max(1, -(-size // self.min_mean_part_bytes)):
            why = f"{label} was refused: its transfer announced {parts} parts for {size} bytes"
        with self._lock:
            self._latest[client_id] = str(transfer_id)
            if why is None and size + self._in_flight_locked(client_id) > self.max_bytes:
                why = f"{label} was refused: another upload from this tab is still arriving (try again when it is done)"
            if transfer_id in self._transfers:  # a reused id: never accepted twice, never forgotten early
                record = self._transfers[transfer_id]
                if record["state"] == "accepted":  # its parts are dropped from now on; viser keeps the ones it has
                    record["state"] = "broken"
                return why or f"{label} was refused: its transfer id was already used"
            if why is None and parts == 0:  # an empty file: viser completes it at once, nothing to follow
                return None
            if why is not None:
                refused = [t for t, r in self._transfers.items() if r["client"] == client_id and r["state"] == "refused"]
                for old in refused[: max(0, len(refused) - self.max_refused_per_client + 1)]:
                    del self._transfers[old]
            self._transfers[transfer_id] = {"client": client_id, "label": label, "size": size, "parts": parts,
                                            "state": "accepted" if why is None else "refused",
                                            "received": 0, "seen": set(), "count": 0}
        return why

    def part(self, client_id: int, transfer_id: str, part_index: int, nbytes: int) -> tuple[bool, str | None]:
        """A part arriving: (keep it?, the one-line refusal if this part showed that the client lied)."""
        with self._lock:
            record = self._transfers.get(transfer_id)
            if record is None:  # not announced through the gate: viser ignores unknown transfers itself
                return True, None
            keep, why = False, None
            if record["client"] != client_id:
                pass
            elif record["state"] == "refused":
                record["count"] += 1
                if record["count"] >= record["parts"]:
                    del self._transfers[transfer_id]
            elif record["state"] == "accepted" and 0 <= part_index < record["parts"] and part_index not in record["seen"]:
                if record["received"] + nbytes > record["size"]:
                    record["state"] = "broken"  # still counted as arriving (viser holds its parts until disconnect)
                    why = (f"{record['label']} was refused: it sent more than the {record['size']} bytes it announced")
                else:
                    keep = True
                    record["received"] += nbytes
                    record["seen"].add(part_index)
                    if len(record["seen"]) == record["parts"]:
                        del self._transfers[transfer_id]
            if not keep:
                self.dropped_parts += 1
                self.dropped_bytes += int(nbytes)
            return keep, why

    def forget_client(self, client_id: int) -> None:
        """A tab closed: its transfers will never finish (viser drops their buffers too)."""
        with self._lock:
            for t in [t for t, r in self._transfers.items() if r["client"] == client_id]:
                del self._transfers[t]
            self._latest.pop(client_id, None)

    def latest_transfer(self, client_id: int) -> str | None:
        """The id of the transfer this tab announced last (its upload button sends one at a time)."""
        with self._lock:
            return self._latest.get(client_id)

    def in_flight(self, client_id: int) -> int:
        """Bytes announced by this tab's accepted transfers that have not finished."""
        with self._lock:
            return self._in_flight_locked(client_id)

    def _in_flight_locked(self, client_id: int) -> int:
        return sum(r["size"] for r in self._transfers.values() if r["client"] == client_id and r["state"] != "refused")

    def pending(self) -> int:
        """How many transfers the gate is tracking (accepted, refused or broken)."""
        with self._lock:
            return len(self._transfers)


def default_audio(subject: SubjectInfo, seconds: float = DEFAULT_SECONDS) -> tuple[np.ndarray, str]:
    """The first ``seconds`` of the subject's own audio if its dataset still exists, else silence;
    with the label the page shows (which names no folder of the server)."""
    subject_dir = subject.subject_dir
    if subject_dir:
        try:
            from gsavatar.data.dataset import SubjectDataset

            samples = SubjectDataset(subject_dir).audio[: int(seconds * SAMPLE_RATE)]
            if samples.size >= SAMPLES_PER_FRAME:
                return np.asarray(samples, np.float32), f"the subject's own audio (first {samples.size / SAMPLE_RATE:.1f} s)"
        except Exception:  # dataset moved or incomplete: fall through to silence
            pass
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32), (
        f"{seconds:g} s of silence (the subject's dataset is not available: upload speech or pass --audio)")


def make_drive(subject: SubjectInfo, samples: np.ndarray, size: int, featurizer: SpeechFeaturizer | None = None):
    """The viewer's :class:`~gsavatar.drive.DriveSequence` (looped pose, tracked blinks, the
    browser's camera instead of a path); ``featurizer``: the viewer's kept audio extractor."""
    if frame_count(samples) < 1:
        raise InputError("the audio is empty")
    return build_drive(subject, samples, DriveConfig(camera="train"), size=size, featurizer=featurizer)


# -- frames -----------------------------------------------------------------------------------
class FrameRenderer:
    """Renders frames of a drive for any browser camera; shared by all clients.

    The avatar is only read (inference under ``torch.no_grad``), so several threads may render
    at once; ``slots`` bounds how many do.
    """

    def __init__(self, avatar, cfg, subject: SubjectInfo, device: str | torch.device = "cpu", slots: int = 2):
        self.avatar, self.cfg, self.subject = avatar, cfg, subject
        self.device = torch.device(device)
        self.slots = threading.BoundedSemaphore(max(1, int(slots)))
        self._bg_cache: dict = {}
        self._bg_lock = threading.Lock()

    def _background(self, K_view: torch.Tensor, width: int, height: int) -> torch.Tensor:
        key = (width, height, tuple(round(float(v), 6) for v in K_view.flatten()))
        with self._bg_lock:
            bg = self._bg_cache.get(key)
            if bg is None:
                plate = self.avatar.background.detach()
                K_plate = scale_intrinsics(self.subject.K, plate.shape[0] / self.subject.render_size)
                bg = view_background(plate, K_plate, K_view, width, height).to(self.device)
                if len(self._bg_cache) > 8:
                    self._bg_cache.clear()
                self._bg_cache[key] = bg
            return bg

    def inputs(self, drive, frame: int, camera: np.ndarray | None = None, fov_y: float | None = None, aspect: float = 1.0):
        """FrameInputs of ``frame`` seen by the browser camera (``camera``: world -> view, 4x4)."""
        import dataclasses

        cam = None if camera is None else torch.as_tensor(np.asarray(camera), dtype=torch.float32)
        inputs = drive.inputs(int(frame), self.avatar, camera=cam, device=self.device)
        K, width, height = view_intrinsics(drive.K, drive.size, fov_y, aspect)
        if width != drive.size or height != drive.size or not torch.equal(K, drive.K.float()):
            inputs = dataclasses.replace(inputs, K=K.to(self.device), width=width, height=height,
                                         background=self._background(K, width, height))
        return inputs

    @torch.no_grad()
    def render(self, drive, frame: int, camera: np.ndarray | None = None, fov_y: float | None = None,
               aspect: float = 1.0, layers=LAYERS) -> np.ndarray:
        """uint8 ``[H, W, 3]``."""
        inputs = self.inputs(drive, frame, camera, fov_y, aspect)
        with self.slots:
            image = self.avatar(inputs, layers=tuple(layers)).image
        return to_uint8(image)

    @torch.no_grad()
    def centres(self, drive, frame: int, branches=("face", "mouth")) -> tuple[np.ndarray, np.ndarray]:
        """Deformed Gaussian centres of the head branches in the world (tracked camera) frame,
        ``(points [N, 3] float32, colours [N, 3] uint8)``: face orange, mouth red."""
        inputs = drive.inputs(int(frame), self.avatar, device=self.device)
        palette = {"face": (255, 170, 40), "mouth": (230, 30, 60), "torso": (60, 160, 255)}
        pts, cols = [], []
        with self.slots:
            for b in branches:
                means = self.avatar.deformed(b, inputs)[0]
                if b != "torso":  # head frame -> tracked camera frame
                    means = means @ inputs.viewmat[:3, :3].T + inputs.viewmat[:3, 3]
                pts.append(means.float().cpu().numpy())
                cols.append(np.tile(np.array(palette[b], np.uint8), (len(means), 1)))
        return np.concatenate(pts).astype(np.float32), np.concatenate(cols)
