"""``gsavatar view``: a trained avatar in the browser (viser), driven by speech, seen from any camera.

Each browser tab is a *session* with its own controls (timeline, play/pause, layers, upload),
its own camera and its own render thread; the avatar and the default speech track are shared
(read-only; at most ``render_slots`` renders run at once).

Camera. viser's world frame is the tracked camera's OpenCV frame (x right, y down, z
forward; scene up = -y). A tab starts at the tracked camera: at the origin, looking down +z
at the head's depth (the orbit pivot), up -y, the tracked vertical field of view. Every
camera update from the browser is a camera-to-world pose; our ``camera`` transform (which
acts on tracked-camera-frame points, see :mod:`gsavatar.drive`) is its inverse. The image is
drawn at the canvas's aspect ratio and field of view (the browser stretches the background
image over the canvas) with about SIZE^2 pixels; untouched, a square canvas renders exactly
what ``camera=None`` renders. Gaussian centres are drawn by the browser itself as a point
cloud in the same world frame (face and mouth centres through the frame's head pose).

Audio/video sync. viser has no audio widget and runs no scripts in its HTML, so the server
owns the clock (:class:`~gsavatar.viewer.core.PlayClock`: timeline time = start position +
wall time since Play). On Play the session replaces the tab's HTML with an autoplaying
``<audio>`` element whose source is the track *from the current frame on* (a WAV data URI
sliced at sample 640 k for frame k: sample-exact, no reliance on media fragments), and starts
the clock ``audio_latency_s`` later (the browser's time to decode and start the sound). The
render thread then always renders ``floor((clock + render latency) * 25)``: when rendering is
slower than 25 fps frames are dropped, never delayed, so the picture cannot drift from the
sound; the render-latency lookahead (a running mean of render + encode time) aims each frame
at the moment it reaches the screen. Pause, a timeline scrub, a new upload or the end of the
track replace the element with a silent one (no source), which stops the sound. Chrome allows
the autoplay because the Play click is a user gesture on the page. The element has no native
controls on purpose: they could pause or seek the sound behind the server clock's back
(a "Sound" checkbox mutes instead).

Uploads are decoded (the type is judged by decoding, not by the name or the MIME type the
browser announces: the button's ``audio/*,video/*`` only filters the browser's file picker),
limited in size and length, and refused with a message in the page; the server keeps running.
The size limit acts on the transfer's start message, before the file's bytes arrive
(:func:`install_upload_gate`): viser would otherwise hold the whole file in memory before
anything could look at it.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gsavatar.drive import FPS, SAMPLE_RATE, SpeechFeaturizer, head_centre, load_speech, silence_note
from gsavatar.errors import InputError, MissingDependencyError
from gsavatar.imaging import encode_jpeg
from gsavatar.viewer import _viser_compat
from gsavatar.viewer.core import (
    LAYERS,
    MAX_AUDIO_SECONDS,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_SECONDS,
    FrameRenderer,
    PlayClock,
    UploadGate,
    audio_html,
    camera_from_pose,
    default_audio,
    frame_overlay_html,
    initial_camera,
    make_drive,
    public_text,
    upload_label,
    validate_upload,
)

# A tab that closes while its frame is on the way: nothing to tell anyone.
warnings.filterwarnings("ignore", message=r"Queued a \w+ on a closed connection")


@dataclasses.dataclass
class ViewerOptions:
    """Settings of a viewer server."""

    host: str = "127.0.0.1"
    """Interface to bind (127.0.0.1: this machine only; 0.0.0.0: every interface)."""
    port: int = 8080
    """Port (0: any free port; if taken, viser tries the next ones)."""
    size: int | None = None
    """Render size: about SIZE x SIZE pixels per frame (default: the avatar's training size)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    """Largest upload accepted; a bigger one is refused from the size its transfer announces, before its bytes arrive."""
    max_upload_seconds: float = MAX_UPLOAD_SECONDS
    """Longest uploaded speech accepted (checked by decoding it)."""
    jpeg_quality: int = 90
    frame_overlay: bool = True
    """Show frames in a 2-D canvas over the 3D view (cheap for the browser); False: as viser's
    background image (its WebGL scene then re-renders continuously). The Gaussian-centres view
    always uses the background image, so the points are drawn over the frame."""
    render_slots: int = 1
    """How many frames may render at once (all tabs together); the CPU rasterizer spreads each
    frame's tiles over every core, so one at a time keeps the cores busy."""
    audio_latency_s: float = 0.1
    """The clock holds the start frame this long after Play while the browser starts the sound."""
    audio_follows_clock: bool = True
    """Give the <audio> element an onplaying handler that seeks it to the server clock when it starts."""
    verbose: bool = True


class Session:
    """One browser tab: its controls, camera, play clock and render thread."""

    def __init__(self, viewer: "Viewer", client):
        self.viewer = viewer
        self.client = client
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.stopped = False
        self.drive = viewer.drive
        self.drive_version = 0  # bumped by each upload (part of the "already on screen?" key)
        self.samples = viewer.samples
        self.audio_label = viewer.audio_label
        self.audio_note = viewer.audio_note  # a notice about the track (it is silent), or None
        self.clock = PlayClock(len(self.drive))
        self.frame = 0  # shown while paused
        self.camera: np.ndarray | None = None  # world -> browser camera, None until the first update
        self.fov: float | None = None
        self.aspect = 1.0
        self.camera_updates = 0
        self.frames_sent = 0
        self.last_image: np.ndarray | None = None
        self.last_frame = -1
        self.last_camera: np.ndarray | None = None
        self.upload_messages: list[str] = []  # each upload's verdict: "ok: ..." or the refusal shown
        self.upload_notes: list[str] = []  # notices about accepted uploads (a silent file)
        self._last_key = None
        self._render_s = 0.0  # running mean of render + encode + send
        self._fps_times: list[float] = []
        self._centres_shown = False
        self._build_gui()
        client.camera.on_update(self._on_camera)
        if client.camera.update_timestamp:  # the camera message that announced the tab
            self._on_camera(client.camera)
        self.thread = threading.Thread(target=self._loop, name=f"gsavatar-view-{client.client_id}", daemon=True)
        self.thread.start()

    # -- GUI --------------------------------------------------------------------------------
    def _build_gui(self) -> None:
        gui = self.client.gui
        v = self.viewer
        g = v.avatar.num_gaussians()
        gui.add_markdown(f"**gsavatar** · {_md(v.run_name)} · Gaussians face {g['face']}, mouth {g['mouth']}, torso {g['torso']}")
        self.stats_md = gui.add_markdown("FPS: -")
        with gui.add_folder("Playback"):
            self.play_button = gui.add_button("Play", icon=None)
            self.frame_slider = gui.add_slider("Frame", min=0, max=max(1, len(self.drive) - 1), step=1, initial_value=0)
            self.loop_box = gui.add_checkbox("Loop", initial_value=False)
            self.sound_box = gui.add_checkbox("Sound", initial_value=True)
            self.time_md = gui.add_markdown(self._time_text(0))
            self.audio = gui.add_html(audio_html(None, 0, playing=False))
        with gui.add_folder("Layers"):
            self.layer_boxes = {name: gui.add_checkbox(name.capitalize(), initial_value=True) for name in LAYERS}
            self.centres_box = gui.add_checkbox("Gaussian centres", initial_value=False)
        with gui.add_folder("Speech"):
            self.audio_md = gui.add_markdown(self._audio_text())
            self.upload = gui.add_upload_button(
                "Upload speech", mime_type="audio/*,video/*",
                hint=f"any audio or video file FFmpeg reads, up to {v.options.max_upload_bytes / 2**20:g} MB "
                     f"and {v.options.max_upload_seconds:g} s")
        with gui.add_folder("View"):
            self.reset_button = gui.add_button("Reset to tracked camera")
        self.frame_html = gui.add_html(frame_overlay_html(None))  # an invisible <img>: see frame_overlay_html
        self._overlay_shown = False

        self.play_button.on_click(lambda event: self.toggle_play())
        self.frame_slider.on_update(self._on_scrub)
        self.sound_box.on_update(lambda event: self._on_sound())
        for box in (*self.layer_boxes.values(), self.centres_box):
            box.on_update(lambda event: self.wake.set())
        self.upload.on_upload(self._on_upload)
        self.reset_button.on_click(lambda event: self.reset_camera())

    def _audio_text(self, refused: str | None = None) -> str:
        """The Speech folder's text: the track driving the tab, with the notice about it (it is silent)
        and, first, an upload just refused."""
        text = f"Driving audio: {_md(self.audio_label)}"
        if self.audio_note:
            text = f"**Note:** {_md(self.audio_note)}\n\n{text}"
        if refused:
            text = f"**Upload refused:** {_md(refused)}\n\n{text}"
        return text

    def _time_text(self, frame: int) -> str:
        return f"{frame / FPS:6.2f} s / {len(self.drive) / FPS:.2f} s (frame {frame} of {len(self.drive)})"

    def _set_audio(self, playing: bool, start_frame: int = 0) -> None:
        origin = self.clock.origin_epoch() if playing and self.viewer.options.audio_follows_clock else None
        self.audio.content = audio_html(self.samples, start_frame, playing=playing, muted=not self.sound_box.value,
                                        origin_epoch=origin)

    # -- events (viser's callback threads) ----------------------------------------------------
    def _on_camera(self, camera) -> None:
        try:
            cam = camera_from_pose(camera.wxyz, camera.position)
            fov = float(camera.fov)
            aspect = float(camera.aspect) if camera.image_height else 1.0
        except Exception:  # a camera message before the client has a size: ignore
            return
        with self.lock:
            self.camera, self.fov, self.aspect = cam, fov, aspect
            self.camera_updates += 1
        self.wake.set()

    def _on_scrub(self, event) -> None:
        if event.client is None:  # our own update while playing
            return
        with self.lock:
            if self.clock.playing:
                self._pause_locked()
            self.frame = int(round(self.frame_slider.value))
            self.clock.seek(self.frame)
            self.time_md.content = self._time_text(self.frame)
        self.wake.set()

    def _on_sound(self) -> None:
        with self.lock:
            if self.clock.playing:  # restart the sound from where the picture is, with the new setting
                frame = self.clock.frame()
                self.clock.play(frame, delay=self.viewer.options.audio_latency_s)
                self._set_audio(True, frame)

    def refuse_upload(self, msg: str) -> None:
        """Tell the page (a line in the Speech folder and a notification) that an upload was refused,
        and take down viser's own notice for that transfer, which says the file "uploaded
        successfully" (the bytes did arrive, or a refused transfer was acknowledged to release the
        button) or would spin for ever (a transfer whose parts are being dropped)."""
        msg = public_text(msg)  # built from the user's file name already; never a path of this machine
        self.upload_messages.append(msg)
        self.audio_md.content = self._audio_text(refused=msg)
        for tell in (lambda: hide_upload_notice(self.client, self.viewer.upload_gate.latest_transfer(self.client.client_id)),
                     lambda: self.client.add_notification("Upload refused", msg, color="red", auto_close_seconds=10.0)):
            try:  # each on its own: a tab that has just closed, or a viser without the private hook
                tell()
            except Exception:
                pass

    def _on_upload(self, event) -> None:
        file = self.upload.value
        try:
            # The size was checked on the transfer's announcement already (UploadGate); checked
            # again here on what arrived, in case this viser could not take the early check.
            samples = validate_upload(file.name, file.content, self.viewer.options.max_upload_bytes,
                                      self.viewer.options.max_upload_seconds)
            self.audio_md.content = f"Decoding features of **{_md(upload_label(file.name))}** ..."
            drive = make_drive(self.viewer.subject, samples, self.viewer.size, self.viewer.featurizer)
        except InputError as e:  # a bad file: one line naming it as the user did
            self.refuse_upload(str(e))
            return
        except Exception as e:  # a failure in feature extraction: the details (paths, perhaps) stay in the server's log
            self.viewer.log(f"tab {self.client.client_id}: upload {upload_label(file.name)} failed: {type(e).__name__}: {e}")
            self.refuse_upload(f"{upload_label(file.name)} could not be used ({type(e).__name__})")
            return
        note = silence_note(samples, upload_label(file.name))  # silence is a legitimate drive: accepted, said once
        with self.lock:
            self._pause_locked()
            self.drive, self.samples = drive, samples
            self.drive_version += 1
            self.audio_label = f"{upload_label(file.name)} ({len(samples) / SAMPLE_RATE:.1f} s, uploaded)"
            self.clock = PlayClock(len(drive))
            self.frame = 0
            self.frame_slider.max = max(1, len(drive) - 1)
            self.frame_slider.value = 0
            self.time_md.content = self._time_text(0)
            self.audio_note = note
            self.upload_messages.append(f"ok: {self.audio_label}")
            if note:
                self.upload_notes.append(note)
        self.audio_md.content = self._audio_text()
        if note:
            try:
                self.client.add_notification("Silent upload", note, color="yellow", auto_close_seconds=10.0)
            except Exception:  # a tab that has just closed
                pass
        self.wake.set()

    # -- actions ----------------------------------------------------------------------------
    def toggle_play(self) -> None:
        with self.lock:
            if self.clock.playing:
                self._pause_locked()
            else:
                start = 0 if self.frame >= len(self.drive) - 1 else self.frame
                self._play_locked(start)
        self.wake.set()

    def _play_locked(self, start: int) -> None:
        self.clock.play(start, delay=self.viewer.options.audio_latency_s)
        self._set_audio(True, start)
        self.play_button.label = "Pause"

    def _pause_locked(self) -> None:
        if self.clock.playing:
            self.frame = min(self.clock.pause(), len(self.drive) - 1)
        self._set_audio(False, self.frame)
        self.play_button.label = "Play"
        self.frame_slider.value = self.frame
        self.time_md.content = self._time_text(self.frame)

    def reset_camera(self) -> None:
        init = self.viewer.initial
        cam = self.client.camera
        cam.up_direction = init["up"]
        cam.position = init["position"]
        cam.look_at = init["look_at"]
        cam.fov = init["fov"]

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()

    # -- the render loop --------------------------------------------------------------------
    def _state(self):
        """What to draw now, and how long to wait if it is already on screen."""
        with self.lock:
            wait = 0.5
            if self.clock.playing:
                if self.clock.ended():
                    if self.loop_box.value:
                        self._play_locked(0)
                    else:
                        self.clock.pause()
                        self.frame = len(self.drive) - 1
                        self._pause_locked()
                if self.clock.playing:
                    self.frame = self.clock.frame(lookahead=self._render_s)
                    wait = max(0.002, self.clock.time_to_next_frame())
            layers = tuple(name for name, box in self.layer_boxes.items() if box.value)
            camera = None if self.camera is None else self.camera.copy()
            key = (self.drive_version, self.frame, None if camera is None else camera.tobytes(), self.fov, self.aspect, layers,
                   bool(self.centres_box.value))
            return key, self.drive, self.frame, camera, self.fov, self.aspect, layers, bool(self.centres_box.value), wait

    def _loop(self) -> None:
        torch.set_num_threads(1)  # the networks' small ops; the CPU rasterizer uses every core
        while not self.stopped and not self.viewer.stopped:
            try:
                key, drive, frame, camera, fov, aspect, layers, centres, wait = self._state()
                if key == self._last_key:
                    self.wake.wait(wait)
                    self.wake.clear()
                    continue
                self._draw(drive, frame, camera, fov, aspect, layers, centres)
                self._last_key = key
            except Exception as e:  # a failed frame must not kill the tab's renderer
                if self.stopped or self.viewer.stopped:
                    break
                self.viewer.log(f"render error in tab {self.client.client_id}: {type(e).__name__}: {e}")
                self._last_key = None
                time.sleep(0.5)

    def _draw(self, drive, frame, camera, fov, aspect, layers, centres) -> None:
        t0 = time.perf_counter()
        image = self.viewer.renderer.render(drive, frame, camera, fov, aspect, layers)
        quality = self.viewer.options.jpeg_quality
        if self.viewer.options.frame_overlay and not centres:
            self.frame_html.content = frame_overlay_html(encode_jpeg(image, quality))
            if not self._overlay_shown:
                self.client.scene.set_background_image(None)
                self._overlay_shown = True
        else:
            self.client.scene.set_background_image(image, format="jpeg", jpeg_quality=quality)
            if self._overlay_shown:
                self.frame_html.content = frame_overlay_html(None)
                self._overlay_shown = False
        if centres:
            pts, cols = self.viewer.renderer.centres(drive, frame)
            self.client.scene.add_point_cloud("/gaussian_centres", pts, cols, point_size=0.001, point_shape="circle",
                                              precision="float32", point_shading="flat")
            self._centres_shown = True
        elif self._centres_shown:
            self.client.scene.remove_by_name("/gaussian_centres")
            self._centres_shown = False
        dt = time.perf_counter() - t0
        now = time.monotonic()
        with self.lock:
            self.last_image, self.last_frame, self.last_camera = image, frame, camera
            self.frames_sent += 1
            self._render_s = dt if self.frames_sent == 1 else 0.8 * self._render_s + 0.2 * dt
            self._fps_times = [t for t in self._fps_times if now - t < 2.0] + [now]
            if self.clock.playing:
                self.frame_slider.value = frame
            if len(self._fps_times) == 1 or now - getattr(self, "_stats_at", 0.0) > 0.5:
                self._stats_at = now
                span = self._fps_times[-1] - self._fps_times[0]
                fps = (len(self._fps_times) - 1) / span if span > 0 else 0.0
                self.stats_md.content = (f"FPS: **{fps:.1f}** · render {1000 * self._render_s:.0f} ms · "
                                         f"{image.shape[1]}x{image.shape[0]} px")
                self.time_md.content = self._time_text(frame)

    def fps(self) -> float:
        with self.lock:
            ts = [t for t in self._fps_times if time.monotonic() - t < 2.0]
        return (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 0.0


REFUSED_UPLOAD_SOURCE = "gsavatar-refused-upload"
"""What a refused transfer's start message names as its upload button instead: no GUI element has this id."""


def hide_upload_notice(client, transfer_id: str | None) -> None:
    """Take down the notification viser's page shows for an upload (progress, then "uploaded
    successfully"). viser's client (checked against 1.1.1, ``UploadButton.tsx``) names it
    ``"upload-" + transfer id``; removing a name the page does not show does nothing."""
    if transfer_id is None:
        return
    _viser_compat.remove_notification(client, f"upload-{transfer_id}")


def install_upload_gate(server, gate: UploadGate, on_refused: Callable[[int, str], None]) -> bool:
    """Show ``gate`` each upload message before viser buffers it; False where this viser offers no way to.

    viser (checked against 1.1.1) has no public upload hook that runs before the file is
    complete: ``add_upload_button`` takes no size limit, the browser's ``accept`` filter only
    concerns types, and ``on_upload`` fires once every part has been joined in memory
    (``GuiApi._handle_file_transfer_part`` / ``_finish_file_upload`` in viser/_gui_api.py).
    What it does offer is its (private) message-handler API: the websocket server hands each
    incoming message first to the handlers registered on the server itself, then to those
    registered on the tab's connection, and a tab's own GUI (``client.gui``, which holds our
    upload buttons) listens on the connection (see
    :func:`gsavatar.viewer._viser_compat.register_server_handler`). A handler registered on the
    server therefore sees a transfer's start message
    (``FileTransferStartUpload``: file name, ``size_bytes``, ``part_count``) and each part
    (``FileTransferPart``) before the tab's GUI does, and can make viser ignore them through the
    early returns of viser's own handlers:

    * a refused start names :data:`REFUSED_UPLOAD_SOURCE` as its button, so viser's start handler
      returns without creating the transfer's buffer, and its part handler returns at once for
      parts of a transfer it does not know: nothing is accumulated;
    * a part the gate drops gets part index -1, which viser's part handler discards as out of range.

    A refused transfer is acknowledged as complete (``FileTransferPartAck``) so that the tab's
    upload button, which stays disabled until its upload is acknowledged, is usable again, and
    ``on_refused(client_id, message)`` is called (on viser's event loop: hand work elsewhere).
    Only messages sent to client-scoped upload buttons are gated this way: the server's own GUI
    listens on the server and sees them before this handler.
    """
    if _viser_compat.missing_internals():
        return False
    start_cls, part_cls, _ = _viser_compat.upload_message_classes()

    def refused(client_id: int, why: str) -> None:
        try:
            on_refused(client_id, why)
        except Exception:  # telling the page must not break viser's dispatch of this message
            pass

    def acknowledge(client_id: int, source: str, transfer: str, size: int) -> None:
        client = server.get_clients().get(client_id)
        if client is not None:
            _viser_compat.acknowledge_upload(client, source, transfer, size)

    def on_start(client_id, message) -> None:
        if message.source_component_uuid is None:
            return
        try:
            why = gate.start(client_id, message.transfer_uuid, message.filename, message.size_bytes, message.part_count)
        except Exception as e:  # a malformed announcement: refuse rather than let viser buffer it
            why = f"{upload_label(getattr(message, 'filename', None))} was refused ({type(e).__name__})"
        if why is None:
            return
        source = message.source_component_uuid
        message.source_component_uuid = REFUSED_UPLOAD_SOURCE  # viser's own start handler, which runs next, ignores it
        try:
            acknowledge(client_id, source, message.transfer_uuid, int(message.size_bytes))
        except Exception:
            pass
        refused(client_id, why)

    def on_part(client_id, message) -> None:
        try:
            keep, why = gate.part(client_id, message.transfer_uuid, int(message.part_index), len(message.content))
        except Exception:
            keep, why = False, None
        if not keep:
            message.part_index = -1  # out of range: viser's own part handler drops it
        if why is not None:
            refused(client_id, why)

    _viser_compat.register_server_handler(server, start_cls, on_start)
    _viser_compat.register_server_handler(server, part_cls, on_part)
    return True


def _md(text: str) -> str:
    """Escape text for viser's markdown."""
    return "".join("\\" + c if c in "\\`*_{}[]()#+-.!|<>" else c for c in str(text))


class Viewer:
    """A running viewer; :func:`start_viewer` makes one. ``stop()`` ends it."""

    def __init__(self, run: str | Path, audio: str | Path | None = None, options: ViewerOptions | None = None):
        try:
            import viser
        except ImportError:
            raise MissingDependencyError("the viewer needs viser: pip install 'gsavatar[viewer]'") from None
        _viser_compat.require_internals()  # a viser without the internals used: one clear line, before any work
        from gsavatar.model.io import load_run
        from gsavatar.runtime import resolve_device

        self.options = options = options or ViewerOptions()
        self.stopped = False
        self.device = resolve_device(options.device)
        bundle = load_run(run, self.device)
        path = bundle.path
        self.run_name = path.parent.name if path.name in ("avatar.pt", "checkpoint.pt") else path.name
        self.avatar, self.cfg, self.subject = bundle.avatar, bundle.config, bundle.subject
        self.size = int(options.size or self.subject.render_size)
        self.audio_note: str | None = None  # told the page with the track: a silent --audio file
        if audio is not None:
            self.samples = load_speech(audio, max_seconds=MAX_AUDIO_SECONDS)
            self.audio_label = f"{upload_label(Path(audio).name)} ({len(self.samples) / SAMPLE_RATE:.1f} s)"
            self.audio_note = silence_note(self.samples, upload_label(Path(audio).name))
            if self.audio_note and options.verbose:
                print(f"note: {self.audio_note}")
        else:
            self.samples, self.audio_label = default_audio(self.subject)
            if not self.samples.any() and options.verbose:  # the folder is named here, on the server only
                print(f"note: driving with {self.audio_label.split(' (')[0]}: the subject dataset "
                      f"{self.subject.subject_dir} is not available (upload speech or pass --audio)")
        self.featurizer = SpeechFeaturizer(self.subject.audio)  # one audio extractor for the start and every upload
        self.drive = make_drive(self.subject, self.samples, self.size, self.featurizer)
        self.renderer = FrameRenderer(self.avatar, self.cfg, self.subject, self.device, options.render_slots)
        self.initial = initial_camera(self.drive.K, self.drive.size, head_centre(self.subject))
        self.sessions: dict[int, Session] = {}
        self._threads: list[threading.Thread] = []  # every tab's render thread, closed tabs included
        self._sessions_lock = threading.Lock()
        self._stop_event = threading.Event()

        self.server = viser.ViserServer(host=options.host, port=options.port, label="gsavatar", verbose=False)
        self.upload_gate = UploadGate(options.max_upload_bytes)
        self._upload_notices = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gsavatar-upload")
        self.upload_gate_installed = install_upload_gate(self.server, self.upload_gate, self._upload_refused)
        if not self.upload_gate_installed:
            self.log("note: this viser version gives no early look at uploads; their size is checked once received")
        # What a client sends that viser cannot take is refused in one line each, never a traceback.
        _viser_compat.guard_incoming(self.server, lambda host, why: self.refused("message", host, why))
        self._handshakes = _viser_compat.HandshakeFailures(self.port, lambda host, why: self.refused("connection", host, why))
        self.server.scene.set_up_direction("-y")
        cam = self.server.initial_camera
        cam.up = self.initial["up"]
        cam.position = self.initial["position"]
        cam.look_at = self.initial["look_at"]
        cam.fov = self.initial["fov"]
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)

    @property
    def host(self) -> str:
        return self.options.host

    @property
    def port(self) -> int:
        return int(self.server.get_port())

    @property
    def url(self) -> str:
        host = "localhost" if self.options.host in ("0.0.0.0", "::") else self.options.host
        return f"http://{host}:{self.port}"

    def log(self, text: str) -> None:
        if self.options.verbose:
            print(text, flush=True)

    def refused(self, what: str, host: str, why: str) -> None:
        """One line on stderr for a connection or message refused from ``host`` (whatever ``verbose``
        says: a client sent something no viser page sends). Called on viser's event loop."""
        print(f"viewer: refused a {what} from {_viser_compat.one_line(host, 64)}: {_viser_compat.one_line(why)}",
              file=sys.stderr, flush=True)

    def _connect(self, client) -> None:
        session = Session(self, client)
        with self._sessions_lock:
            self.sessions[client.client_id] = session
            self._threads = [t for t in self._threads if t.is_alive()] + [session.thread]
        self.log(f"tab {client.client_id} connected ({len(self.sessions)} open)")

    def _upload_refused(self, client_id: int, msg: str) -> None:
        """The upload gate refused a transfer (called on viser's event loop)."""
        with self._sessions_lock:
            session = self.sessions.get(client_id)
        self.log(f"tab {client_id}: upload refused: {msg}")
        if session is not None and not self.stopped:
            try:
                self._upload_notices.submit(session.refuse_upload, msg)
            except RuntimeError:  # stopping
                pass

    def _disconnect(self, client) -> None:
        self.upload_gate.forget_client(client.client_id)
        with self._sessions_lock:
            session = self.sessions.pop(client.client_id, None)
        if session is not None:
            session.stop()
            self.log(f"tab {client.client_id} closed ({len(self.sessions)} open)")

    def stop(self) -> None:
        """Stop every render thread and the web server (idempotent)."""
        if self.stopped:
            return
        self.stopped = True
        with self._sessions_lock:
            sessions, threads = list(self.sessions.values()), list(self._threads)
        for s in sessions:
            s.stop()
        self._upload_notices.shutdown(wait=False, cancel_futures=True)
        self.server.stop()
        self._handshakes.remove()
        for t in threads:  # a render thread still inside torch at interpreter exit aborts the process
            t.join(timeout=10.0)
        self._stop_event.set()

    def wait(self) -> None:
        """Block until :meth:`stop` (or Ctrl-C, which stops the viewer)."""
        try:
            while not self._stop_event.wait(0.5):
                pass
        except KeyboardInterrupt:
            self.stop()

    def __enter__(self) -> "Viewer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_viewer(run: str | Path, audio: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 8080,
                 size: int | None = None, device: str = "auto", **options) -> Viewer:
    """Start a viewer server in background threads and return its handle (``.url``, ``.stop()``)."""
    return Viewer(run, audio, ViewerOptions(host=host, port=port, size=size, device=device, **options))


def serve(run: str | Path, audio: str | Path | None = None, **kwargs) -> None:
    """Run the viewer until Ctrl-C (the ``gsavatar view`` command)."""
    torch.set_num_threads(1)
    viewer = start_viewer(run, audio, **kwargs)
    print(f"gsavatar viewer: open {viewer.url} in a browser (Ctrl-C stops it)", flush=True)
    try:
        viewer.wait()
    finally:
        viewer.stop()
    print("viewer stopped")
