"""The browser viewer (gsavatar view): its clock, camera mapping, audio and upload checks, and a
real-browser test in headless Chromium (skipped, with the reason, when Chromium or Selenium is absent)."""

from __future__ import annotations

import base64
import io
import math
import re
import shutil
import socket
import tempfile
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tone

from gsavatar.drive import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from gsavatar.errors import InputError
from gsavatar.viewer.core import (
    AUDIO_ELEMENT_ID,
    FRAME_OVERLAY_ID,
    PlayClock,
    UploadGate,
    audio_html,
    camera_from_pose,
    frame_at,
    frame_overlay_html,
    initial_camera,
    tracked_fov,
    upload_label,
    validate_upload,
    view_intrinsics,
    wav_bytes,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


class FakeTime:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- the play clock ---------------------------------------------------------------------------
def test_frame_at_is_floor_of_time_times_25():
    n = 100_000
    for k in range(0, n, 7):
        assert frame_at(k / FPS, n) == k  # exactly on a frame boundary despite float rounding
    rng = np.random.default_rng(0)
    for t in rng.uniform(0, 3000, 2000):
        assert frame_at(t, n) == math.floor(t * 25)
    assert frame_at(-1.0, 10) == 0 and frame_at(99.0, 10) == 9


def test_play_clock_maps_wall_time_to_frames_without_drift():
    now = FakeTime()
    clock = PlayClock(num_frames=3000, now=now)  # 120 s
    clock.play(start_frame=40, delay=0.1)
    assert clock.playing and clock.frame() == 40
    now.t += 0.05  # still holding the start frame while the browser starts the sound
    assert clock.frame() == 40 and clock.time() == pytest.approx(40 / 25)
    now.t += 0.05
    # However late the renderer asks, the frame is floor(t * 25) of the wall clock: no drift.
    for step in np.random.default_rng(1).uniform(0.001, 0.37, 300):  # a slow, irregular renderer
        now.t += step
        t = 40 / 25 + (now.t - 100.1)
        if t >= clock.duration:
            break
        assert clock.frame() == math.floor(t * 25 + 1e-9)
        assert clock.frame(lookahead=0.2) == min(2999, math.floor((t + 0.2) * 25 + 1e-9))
        assert 0 < clock.time_to_next_frame() <= 1 / 25 + 1e-9
    stopped_on = clock.pause()
    assert not clock.playing and stopped_on == clock.frame()
    now.t += 5.0
    assert clock.frame() == stopped_on  # paused: time stands still
    clock.seek(10)
    assert clock.frame() == 10 and clock.time() == pytest.approx(0.4)
    clock.play()
    now.t += clock.duration
    assert clock.ended()
    assert abs(clock.origin_epoch() - (time.time() - (now.t - clock._origin_wall))) < 0.05


# -- camera mapping ---------------------------------------------------------------------------
def _look_at_pose(position, target, up=(0.0, -1.0, 0.0)):
    """A camera-to-world pose in viser's convention (OpenCV axes: z forward, y down)."""
    position, target = np.asarray(position, float), np.asarray(target, float)
    z = (target - position) / np.linalg.norm(target - position)
    x = np.cross(-np.asarray(up, float), z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z], 1)
    w = math.sqrt(max(0.0, 1 + np.trace(R))) / 2
    wxyz = np.array([w, (R[2, 1] - R[1, 2]) / (4 * w), (R[0, 2] - R[2, 0]) / (4 * w), (R[1, 0] - R[0, 1]) / (4 * w)])
    return wxyz, position, R


def test_camera_from_pose_inverts_the_browser_pose():
    # The tracked camera itself: identity, exactly.
    assert np.array_equal(camera_from_pose((1, 0, 0, 0), (0, 0, 0)), np.eye(4))
    assert np.array_equal(camera_from_pose((1, 0, 0, 1e-9), (1e-9, 0, 0)), np.eye(4))
    # A camera moved to the side, looking at the head: the head lands on its optical axis,
    # at the distance between them, and world points map like the inverse of [R | t].
    head = np.array([0.0, 0.02, 0.7])
    wxyz, position, R = _look_at_pose([0.3, -0.1, 0.2], head)
    cam = camera_from_pose(wxyz, position)
    p = cam @ np.append(head, 1)
    assert np.allclose(p[:2], 0, atol=1e-9) and p[2] == pytest.approx(np.linalg.norm(head - position))
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = R, position
    assert np.allclose(cam @ pose, np.eye(4), atol=1e-9)


def test_view_intrinsics_match_the_canvas():
    K = torch.tensor([[546.2, 0, 127.75], [0, 546.2, 127.75], [0, 0, 1]])
    fov = tracked_fov(K, 256)
    K2, w, h = view_intrinsics(K, 256, fov, aspect=1.0)
    assert (w, h) == (256, 256) and torch.equal(K2, K)  # untouched square view: the tracked camera
    K3, w, h = view_intrinsics(K, 256, fov, aspect=16 / 9)
    assert w / h == pytest.approx(16 / 9, rel=0.03) and abs(w * h - 256 * 256) < 0.05 * 256 * 256
    assert 2 * math.atan(h / (2 * float(K3[1, 1]))) == pytest.approx(fov)  # same vertical field of view
    K4, _, _ = view_intrinsics(K, 256, fov / 2, aspect=1.0)  # zoomed in
    assert float(K4[0, 0]) > 2 * 546.2
    init = initial_camera(K, 256, np.array([0.0, 0.03, 0.68]))
    assert init["position"] == (0.0, 0.0, 0.0) and init["look_at"] == (0.0, 0.0, 0.68) and init["up"] == (0.0, -1.0, 0.0)
    assert init["fov"] == pytest.approx(fov)


# -- audio and uploads ------------------------------------------------------------------------
def _decode_wav(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32767.0


def test_audio_html_plays_from_the_frame_sample_exactly():
    samples = tone(3.0)
    paused = audio_html(samples, 30, playing=False)
    assert f'id="{AUDIO_ELEMENT_ID}"' in paused and "src=" not in paused and "autoplay" not in paused
    html = audio_html(samples, 30, playing=True, origin_epoch=1234.5)
    assert "autoplay" in html and 'data-start-frame="30"' in html and "controls" not in html
    assert "<script" not in html and "onplaying=" in html and "1234.500" in html
    data = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)", html).group(1))
    decoded = _decode_wav(data)
    expected = np.round(np.clip(samples[30 * SAMPLES_PER_FRAME:], -1, 1) * 32767) / 32767
    assert decoded.shape == expected.shape and np.allclose(decoded, expected, atol=1e-6)
    assert "muted" in audio_html(samples, 0, playing=True, muted=True)


def test_frame_overlay_html_carries_the_jpeg_and_draws_it_in_the_overlay():
    jpeg = bytes(range(256)) * 3
    html = frame_overlay_html(jpeg)
    assert f"data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}" in html and 'style="display:none"' in html
    assert f"getElementById('{FRAME_OVERLAY_ID}')" in html and "drawImage(this,0,0)" in html
    assert "pointer-events:none" in html and '"' not in html.split('onload="', 1)[1][:-2]  # one attribute, unbroken
    hide = frame_overlay_html(None)
    assert "display='none'" in hide and "drawImage" not in hide


def test_upload_validation(tmp_path):
    good = wav_bytes(tone(1.5))
    samples = validate_upload("speech.wav", good)
    assert abs(len(samples) - int(1.5 * SAMPLE_RATE)) < SAMPLES_PER_FRAME
    # The type is judged by decoding, not by the name.
    assert len(validate_upload("speech.txt", good)) == len(samples)
    with pytest.raises(InputError, match="not a readable audio file|no audio"):
        validate_upload("speech.wav", np.random.default_rng(0).bytes(50_000))
    with pytest.raises(InputError, match="empty"):
        validate_upload("speech.wav", b"")
    with pytest.raises(InputError, match="upload limit"):
        validate_upload("speech.wav", good, max_bytes=len(good) - 1)
    with pytest.raises(InputError, match="limit of 120 s"):
        validate_upload("long.wav", wav_bytes(np.zeros(int(121 * SAMPLE_RATE), np.float32)))
    with pytest.raises(InputError, match="at least"):
        validate_upload("short.wav", wav_bytes(np.zeros(800, np.float32)))
    with pytest.raises(InputError) as err:  # one line naming the user's file, not our temporary copy
        validate_upload("bad.mp3", b"ID3" + bytes(3000))
    assert "\n" not in str(err.value) and "bad.mp3" in str(err.value) and "gsavatar-upload" not in str(err.value)
    assert upload_label("C:\\x/../a\nb.wav") == "a?b.wav" and upload_label("") == "upload"
    assert len(upload_label("x" * 500 + ".wav")) == 80


MIB = 2**20


def test_upload_gate_refuses_from_the_announced_size():
    """The gate's verdicts, without viser: what a transfer's start message and its parts get."""
    gate = UploadGate(max_bytes=MIB)
    # Over the limit: refused from the announcement alone; every part of it is then dropped.
    why = gate.start(1, "big", "huge.wav", 200 * MIB, 400)
    assert why == "huge.wav is 200.0 MB, over the upload limit of 1 MB"
    assert [gate.part(1, "big", i, 512 * 1024) for i in range(3)] == [(False, None)] * 3
    assert gate.dropped_parts == 3 and gate.dropped_bytes == 3 * 512 * 1024
    assert "1048577 bytes, over the upload limit of 1048576 bytes" in gate.start(1, "b2", "a.wav", MIB + 1, 3)
    # Inconsistent announcements: refused too.
    for size, parts in ((-1, 1), (1000, 0), (1000, -1), (100_000, 500)):
        assert "announced" in gate.start(1, f"odd{size}{parts}", "x.wav", size, parts)
    # Within the limit: accepted; its parts are kept until the last one, which ends the transfer.
    assert gate.start(1, "ok", "speech.wav", 700_000, 2) is None and gate.in_flight(1) == 700_000
    # ... and while it arrives, the same tab cannot start another that would take it over the limit.
    assert "still arriving" in gate.start(1, "ok2", "more.wav", 600_000, 2)
    assert gate.start(2, "other-tab", "speech.wav", 600_000, 2) is None  # another tab has its own budget
    assert gate.part(2, "ok", 1, 100) == (False, None)  # a part for someone else's transfer
    assert gate.part(1, "ok", 0, 512 * 1024) == (True, None)
    assert gate.part(1, "ok", 0, 512 * 1024) == (False, None)  # a repeat
    assert gate.part(1, "ok", 5, 10) == (False, None)  # out of range
    assert gate.part(1, "ok", 1, 700_000 - 512 * 1024) == (True, None)
    assert gate.in_flight(1) == 0
    assert gate.start(1, "ok", "again.wav", 10, 1) is None  # a finished transfer's id is forgotten
    assert gate.part(1, "ok", 0, 10) == (True, None)
    # A client that sends more than it announced: that part is dropped and the transfer refused.
    assert gate.start(1, "liar", "small.wav", 1000, 1) is None
    keep, why = gate.part(1, "liar", 0, 512 * 1024)
    assert not keep and why == "small.wav was refused: it sent more than the 1000 bytes it announced"
    assert gate.part(1, "liar", 0, 10) == (False, None)
    # A reused transfer id is refused; an empty file passes (viser completes it, the decoder refuses it).
    assert "already used" in gate.start(1, "liar", "again.wav", 10, 1)
    assert gate.start(1, "empty", "empty.wav", 0, 0) is None
    # Parts of transfers the gate never saw are viser's business.
    assert gate.part(1, "unknown", 0, 10) == (True, None)
    # Refused transfers' records are bounded and go when their parts have come, or the tab closes.
    assert gate.start(3, "r", "big.wav", 2 * MIB, 2) and gate.part(3, "r", 0, 1) == (False, None)
    assert gate.part(3, "r", 1, 1) == (False, None) and gate.part(3, "r", 2, 1) == (True, None)
    for i in range(200):
        gate.start(4, f"spam{i}", "big.wav", 2 * MIB, 4)
    assert gate.pending() <= gate.max_refused_per_client + 20
    assert gate.latest_transfer(4) == "spam199" and gate.latest_transfer(3) == "r"
    gate.forget_client(1), gate.forget_client(2), gate.forget_client(4)
    assert gate.pending() == 0 and gate.in_flight(1) == 0
    assert gate.latest_transfer(4) is None


class _RawTab:
    """A viser tab without a browser: a websocket client that speaks viser's wire format.

    It sends what viser's browser client sends (msgpack messages; the first camera message makes
    the tab a connected client) and decodes what the server sends back (16-byte header, zstd
    msgpack) on a reader thread.
    """

    def __init__(self, port: int):
        import threading

        import viser
        from websockets.sync.client import connect

        self.received: list[dict] = []
        self.ws = connect(f"ws://127.0.0.1:{port}", subprotocols=[f"viser-v{viser.__version__}"], max_size=None,
                          open_timeout=20)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        from viser import _messages

        self.send(_messages.ViewerCameraMessage(wxyz=(1.0, 0.0, 0.0, 0.0), position=(0.0, 0.0, 0.0), fov=0.8, near=0.01,
                                                far=100.0, image_height=400, image_width=400,
                                                look_at=(0.0, 0.0, 1.0), up_direction=(0.0, -1.0, 0.0)))

    def _read(self) -> None:
        import msgspec
        import zstandard

        try:
            for raw in self.ws:
                n, m = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:16], "little")
                inner = zstandard.ZstdDecompressor().decompress(raw[16:16 + m], max_output_size=n)
                self.received.extend(msgspec.msgpack.decode(inner)["messages"])
        except Exception:  # closed
            pass

    def send(self, message) -> None:
        import msgspec

        self.ws.send(msgspec.msgpack.encode(message.as_serializable_dict()))

    def of_type(self, name: str) -> list[dict]:
        return [m for m in list(self.received) if m.get("type") == name]

    def upload_button(self, label: str) -> str:
        found = _wait(lambda: [m for m in self.of_type("GuiUploadButtonMessage") if m["props"]["label"] == label],
                      timeout=30, what=f"the {label!r} button")
        return found[0]["uuid"]

    def upload(self, button: str, transfer: str, name: str, size: int, parts: list[bytes]) -> None:
        """What viser's client sends for a file: a start announcing ``size`` bytes in 512 KiB parts, then
        the parts, unasked (``parts`` may be only the first few)."""
        from viser import _messages

        self.send(_messages.FileTransferStartUpload(source_component_uuid=button, transfer_uuid=transfer, filename=name,
                                                    mime_type="audio/wav", part_count=-(-size // (512 * 1024)),
                                                    size_bytes=size))
        for i, content in enumerate(parts):
            self.send(_messages.FileTransferPart(source_component_uuid=button, transfer_uuid=transfer, part_index=i,
                                                 content=content))

    def acks(self, transfer: str) -> list[dict]:
        return [m for m in self.of_type("FileTransferPartAck") if m["transfer_uuid"] == transfer]

    def close(self) -> None:
        self.ws.close()
        self.reader.join(timeout=10)


def test_oversized_upload_is_refused_before_its_parts_are_buffered():
    """Against the installed viser, without a browser: the announcement alone refuses a file over the
    limit, so viser never buffers its parts (they are dropped as they come), the tab's upload
    button is released by an acknowledgement, and accepted uploads still arrive whole."""
    viser = pytest.importorskip("viser", reason="the viewer needs viser (pip install 'gsavatar[viewer]')")
    from gsavatar.viewer.server import install_upload_gate

    server = viser.ViserServer(host="127.0.0.1", port=_free_port(), verbose=False)
    tab = None
    try:
        gate = UploadGate(max_bytes=MIB)
        refused, uploads, clients = [], [], {}
        assert install_upload_gate(server, gate, lambda client_id, msg: refused.append((client_id, msg)))

        def connect(client):  # as the viewer does: a client-scoped upload button per tab
            button = client.gui.add_upload_button("Upload speech", mime_type="audio/*,video/*")
            button.on_upload(lambda event: uploads.append(button.value))
            clients[client.client_id] = client

        server.on_client_connect(connect)
        tab = _RawTab(server.get_port())
        button = tab.upload_button("Upload speech")
        client = next(iter(clients.values()))
        buffers = client.gui._current_file_upload_states  # viser's per-transfer part buffers (looked at, never touched)

        # 64 MB announced in 128 parts of 512 KiB; the first three follow the start unasked.
        part = bytes(512 * 1024)
        tab.upload(button, "t-big", "huge.wav", 64 * MIB, [part] * 3)
        _wait(lambda: gate.dropped_parts == 3, timeout=20, what="the refused transfer's parts to be dropped")
        assert refused == [(client.client_id, "huge.wav is 64.0 MB, over the upload limit of 1 MB")]
        assert "t-big" not in buffers and not buffers, "viser buffered a refused transfer"
        time.sleep(0.5)  # (nothing late either)
        assert not buffers and not uploads
        ack = _wait(lambda: tab.acks("t-big"), timeout=20, what="the refusal's acknowledgement")[-1]
        assert ack["source_component_uuid"] == button and ack["transferred_bytes"] == ack["total_bytes"] == 64 * MIB
        assert not uploads

        # A client that announces little and sends more: the part is dropped, the transfer refused.
        tab.upload(button, "t-liar", "small.wav", 1000, [part])
        _wait(lambda: len(refused) == 2, timeout=20, what="the lying transfer's refusal")
        assert "more than the 1000 bytes" in refused[-1][1]
        assert buffers["t-liar"]["parts"] == {} and gate.dropped_parts == 4  # held nothing of it

        # Within the limit: viser receives it whole and the upload callback runs.
        content = np.random.default_rng(0).bytes(700_000)
        tab.upload(button, "t-ok", "speech.wav", len(content), [content[:512 * 1024], content[512 * 1024:]])
        _wait(lambda: uploads, timeout=20, what="the accepted upload")
        assert uploads[0].name == "speech.wav" and uploads[0].content == content and "t-ok" not in buffers
        # The acknowledgement and the callback travel separately: wait for the one the test reads.
        _wait(lambda: any(a["transferred_bytes"] == len(content) for a in tab.acks("t-ok")), timeout=20,
              what="the accepted upload's last acknowledgement")
        assert len(refused) == 2

        # A closed tab's transfers are forgotten (the viewer calls forget_client on disconnect).
        gate.forget_client(client.client_id)
        assert gate.pending() == 0
    finally:
        if tab is not None:
            tab.close()
        server.stop()


# -- command line and server defaults ---------------------------------------------------------
def test_view_command_defaults_to_localhost(tmp_path, capsys):
    from gsavatar.cli import COMMANDS, main
    from gsavatar.viewer.server import ViewerOptions

    assert COMMANDS["view"].host == "127.0.0.1" and ViewerOptions().host == "127.0.0.1"
    import inspect

    from gsavatar.viewer.server import start_viewer

    assert inspect.signature(start_viewer).parameters["host"].default == "127.0.0.1"
    assert main(["view", str(tmp_path / "missing_run")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing_run" in err[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outside_address() -> str | None:
    """A non-loopback address of this machine, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
            addr = s.getsockname()[0]
        return None if addr.startswith("127.") else addr
    except OSError:
        return None


def test_initial_view_renders_like_the_tracked_camera_and_server_binds_localhost(trained):
    pytest.importorskip("viser", reason="the viewer needs viser (pip install 'gsavatar[viewer]')")
    from gsavatar.viewer.server import start_viewer

    torch.set_num_threads(1)
    _, run, _ = trained
    viewer = start_viewer(run, port=_free_port(), device="cpu", verbose=False)
    try:
        # The browser's initial camera (what viser reports before any drag) maps to camera=None.
        init = viewer.initial
        wxyz, position, _ = _look_at_pose(init["position"], init["look_at"], init["up"])
        camera = camera_from_pose(wxyz, position)
        assert np.array_equal(camera, np.eye(4))
        drive, avatar = viewer.drive, viewer.avatar
        with torch.no_grad():
            reference = avatar(drive.inputs(7, avatar)).image
        reference = (reference.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
        image = viewer.renderer.render(drive, 7, camera, init["fov"], aspect=1.0)
        assert np.array_equal(image, reference)
        # A turned camera draws something else; layers switch off.
        turned = viewer.renderer.render(drive, 7, camera_from_pose(*_look_at_pose([0.2, 0, 0], init["look_at"])[:2]),
                                        init["fov"])
        assert np.abs(turned.astype(int) - reference).mean() > 3
        no_face = viewer.renderer.render(drive, 7, camera, init["fov"], layers=("torso", "background"))
        assert np.abs(no_face.astype(int) - reference).mean() > 1
        pts, cols = viewer.renderer.centres(drive, 7)
        g = avatar.num_gaussians()
        assert pts.shape == (g["face"] + g["mouth"], 3) and cols.shape == pts.shape
        assert abs(np.median(pts[:, 2]) - init["look_at"][2]) < 0.3 * init["look_at"][2]  # in front of the camera, at the head
        # Served on 127.0.0.1 only.
        assert viewer.host == "127.0.0.1" and viewer.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(viewer.url, timeout=10) as r:
            assert r.status == 200
        outside = _outside_address()
        if outside is not None:
            with pytest.raises(OSError):
                socket.create_connection((outside, viewer.port), timeout=2).close()
    finally:
        viewer.stop()


def test_viewer_refuses_an_oversized_upload_in_the_page(trained):
    """The viewer wires the gate: a tab announcing a file over --max-upload-bytes gets the refusal in
    its Speech folder and as a notification, viser buffers nothing, and the tab keeps working."""
    pytest.importorskip("viser", reason="the viewer needs viser (pip install 'gsavatar[viewer]')")
    from gsavatar.viewer.server import start_viewer

    torch.set_num_threads(1)
    _, run, _ = trained
    viewer = start_viewer(run, port=_free_port(), device="cpu", verbose=False, max_upload_bytes=MIB)
    tab = None
    try:
        assert viewer.upload_gate_installed
        tab = _RawTab(viewer.port)
        session = _wait(lambda: _session(viewer), timeout=60, what="the tab's session")
        button = tab.upload_button("Upload speech")
        tab.upload(button, "t-big", "huge.wav", 300 * MIB, [bytes(512 * 1024)] * 2)
        _wait(lambda: session.upload_messages, timeout=20, what="the refusal")
        assert session.upload_messages == ["huge.wav is 300.0 MB, over the upload limit of 1 MB"]
        _wait(lambda: "Upload refused" in session.audio_md.content, timeout=20, what="the refusal in the Speech folder")
        _wait(lambda: [m for m in tab.of_type("NotificationShowMessage") if m["props"]["title"] == "Upload refused"],
              timeout=20, what="the refusal's notification")
        _wait(lambda: viewer.upload_gate.dropped_parts == 2, timeout=20, what="the parts to be dropped")
        assert not session.client.gui._current_file_upload_states  # viser held none of it
        assert tab.acks("t-big") and len(session.drive) == len(viewer.drive)  # button released, track unchanged
        # viser's page would say the acknowledged file "uploaded successfully": that notice is taken down.
        removed = _wait(lambda: [i for i, m in enumerate(tab.received) if m.get("type") == "RemoveNotificationMessage"
                                 and m["uuid"] == "upload-t-big"], timeout=20, what="viser's upload notice taken down")
        ack = next(i for i, m in enumerate(tab.received) if m.get("type") == "FileTransferPartAck"
                   and m["transfer_uuid"] == "t-big")
        assert ack < removed[0]
        # The tab keeps working: a good upload within the limit drives it.
        speech = wav_bytes(tone(2.0, freq=300.0))
        parts = [speech[i:i + 512 * 1024] for i in range(0, len(speech), 512 * 1024)]
        tab.upload(button, "t-ok", "speech.wav", len(speech), parts)
        _wait(lambda: len(session.upload_messages) >= 2, timeout=90, what="the good upload's verdict")
        assert session.upload_messages[-1].startswith("ok: speech.wav"), session.upload_messages[-1]
        assert len(session.drive) == 50
        assert not [m for m in tab.of_type("RemoveNotificationMessage") if m["uuid"] == "upload-t-ok"]
        assert viewer.upload_gate.pending() == 1  # the refused transfer, whose parts are still to come
        tab.close()
        tab = None
        _wait(lambda: viewer.upload_gate.pending() == 0, timeout=20, what="the closed tab's transfers to be forgotten")
    finally:
        if tab is not None:
            tab.close()
        viewer.stop()


# -- the real browser -------------------------------------------------------------------------
def _require_browser():
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    pytest.importorskip("viser", reason="the viewer needs viser (pip install 'gsavatar[viewer]')")


@pytest.fixture(scope="session")
def browser_available():
    """Skips before the (slow) trained-avatar fixture is built when there is no browser to drive."""
    _require_browser()


def _browser_or_skip():
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gsavatar-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required", "--mute-audio",
                 f"--user-data-dir={profile}", "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    return driver, profile


def _wait(predicate, timeout: float = 90.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _canvas_shot(driver) -> np.ndarray:
    from PIL import Image
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.TAG_NAME, "canvas")
    return np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB")).astype(np.float32)


def _png(data_url: str | None) -> np.ndarray:
    from PIL import Image

    assert data_url and data_url.startswith("data:image/png;base64,"), "no frame overlay in the page"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")).astype(np.float32)


def _resized(image: np.ndarray, shape) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BILINEAR)).astype(np.float32)


def _region(a: np.ndarray) -> np.ndarray:
    """The part of the canvas that holds the head, clear of the GUI panel (right) and notices (top left)."""
    h, w = a.shape[:2]
    return a[int(0.25 * h): int(0.95 * h), int(0.1 * w): int(0.55 * w)]


def _matches(shot: np.ndarray, image: np.ndarray) -> tuple[float, float]:
    """(mean absolute difference, correlation) between a screenshot and a server render, in the head region."""
    a, b = _region(shot), _region(_resized(image, shot.shape))
    return float(np.abs(a - b).mean()), float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _session(viewer, index: int = 0):
    sessions = list(viewer.sessions.values())
    return sessions[index] if len(sessions) > index else None


def _fresh_frame(session, after: int, camera_changed_from=None):
    def ok():
        with session.lock:
            if session.frames_sent <= after or session.last_image is None:
                return None
            if camera_changed_from is not None and (session.last_camera is None
                                                     or np.allclose(session.last_camera, camera_changed_from)):
                return None
            return session.frames_sent
    return ok


def test_viewer_in_headless_chromium(browser_available, trained, tmp_path):
    driver, profile = _browser_or_skip()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from gsavatar.viewer.server import start_viewer

    torch.set_num_threads(1)
    _, run, _ = trained
    speech = tmp_path / "speech.wav"  # long enough that playback cannot end while a slow machine clicks
    speech.write_bytes(wav_bytes(tone(40.0, freq=180.0) * (0.6 + 0.4 * np.sin(np.arange(40 * SAMPLE_RATE) / 900.0))))
    viewer = start_viewer(run, speech, port=_free_port(), device="cpu", verbose=False, max_upload_bytes=5 * MIB)
    try:
        driver.get(viewer.url)
        _wait(lambda: driver.find_elements(By.TAG_NAME, "canvas"), what="the viser canvas")
        s1 = _wait(lambda: _session(viewer), what="the tab's session")
        # Make the canvas square, so the untouched view is exactly the tracked camera's image.
        rect = driver.find_element(By.TAG_NAME, "canvas").rect
        size = driver.get_window_size()
        driver.set_window_size(size["width"], size["height"] + int(rect["width"] - rect["height"]))
        _wait(lambda: abs(s1.aspect - 1.0) < 1e-3 and s1.camera is not None, what="a square canvas")
        _wait(lambda: s1.last_image is not None and s1.last_image.shape[:2] == (viewer.size, viewer.size)
              and s1.last_camera is not None and np.array_equal(s1.last_camera, np.eye(4)), what="the tracked view")
        assert np.array_equal(s1.camera, np.eye(4)), "the initial browser camera is not the tracked camera"
        with torch.no_grad():
            tracked = viewer.avatar(viewer.drive.inputs(s1.last_frame, viewer.avatar)).image
        tracked = (tracked.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
        assert np.array_equal(s1.last_image, tracked)  # untouched view == camera=None render
        time.sleep(1.0)  # let the texture reach the screen

        # The avatar's pixels are on the page: the screenshot matches the server's render, not a blank canvas.
        shot1 = _canvas_shot(driver)
        mad, corr = _matches(shot1, s1.last_image)
        assert corr > 0.9 and mad < 20, f"screenshot does not show the avatar (difference {mad:.1f}, correlation {corr:.3f})"
        assert _region(shot1).std() > 10, "the canvas region is flat"
        # Drawn in the frame overlay (a 2-D canvas over viser's WebGL one), exactly the render but for JPEG.
        overlay_js = (f"var o = document.getElementById('{FRAME_OVERLAY_ID}'); "
                      "return o && o.style.display !== 'none' ? o.toDataURL('image/png') : null")
        overlay = _png(driver.execute_script(overlay_js))
        assert overlay.shape == s1.last_image.shape and np.abs(overlay - s1.last_image).mean() < 3
        # The Gaussian centres are scene points: that view goes back to viser's background image.
        sent = s1.frames_sent
        s1.centres_box.value = True
        _wait(lambda: s1.frames_sent > sent and driver.execute_script(overlay_js) is None, timeout=30,
              what="the overlay to give way to the centres view")
        sent = s1.frames_sent
        s1.centres_box.value = False
        _wait(lambda: s1.frames_sent > sent and driver.execute_script(overlay_js), timeout=30, what="the overlay back")

        # The audio element is in the page; Play starts it and the picture runs with the server clock.
        assert driver.execute_script(f"return document.getElementById('{AUDIO_ELEMENT_ID}') !== null")
        play = _wait(lambda: [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Play"],
                     what="the Play button")[0]
        play.click()
        _wait(lambda: s1.clock.playing, timeout=30, what="the clock to start")
        state = _wait(lambda: driver.execute_script(
            f"var a = document.getElementById('{AUDIO_ELEMENT_ID}');"
            "return a && a.dataset.state === 'playing' && !a.paused && a.currentTime > 1.0 ?"
            " [a.currentTime, Date.now() / 1000 - parseFloat(a.dataset.origin)] : null"), timeout=30,
            what="the audio to play")
        offset = state[0] - state[1]  # the sound's position against the server clock, both read in the page
        assert abs(offset) < 0.15, f"audio is {offset:+.3f} s off the server clock"
        sent = s1.frames_sent
        _wait(lambda: s1.frames_sent >= sent + 2, timeout=30, what="frames while playing")
        assert s1.last_frame > 0
        pause = _wait(lambda: [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Pause"],
                      what="the Pause button")[0]
        pause.click()
        _wait(lambda: not s1.clock.playing, timeout=30, what="the pause")
        _wait(lambda: driver.execute_script(
            f"var a = document.getElementById('{AUDIO_ELEMENT_ID}'); return a && a.dataset.state === 'paused'"),
            timeout=30, what="the paused audio element")
        time.sleep(1.0)
        _wait(_fresh_frame(s1, 0), what="a frame")
        before = s1.last_image.copy()
        shot_before = _canvas_shot(driver)

        # A drag on the canvas orbits the camera: the server sees it and renders another view.
        updates, sent = s1.camera_updates, s1.frames_sent
        canvas = driver.find_element(By.TAG_NAME, "canvas")
        ActionChains(driver).move_to_element_with_offset(canvas, -int(canvas.rect["width"] * 0.2), 0).click_and_hold() \
            .move_by_offset(15, 0).move_by_offset(15, 0).move_by_offset(15, 5).release().perform()
        _wait(lambda: s1.camera_updates > updates, timeout=30, what="a camera update from the drag")
        _wait(_fresh_frame(s1, sent, camera_changed_from=np.eye(4)), what="a frame for the new camera")
        time.sleep(1.5)
        with s1.lock:
            after = s1.last_image.copy()
        shot_after = _canvas_shot(driver)
        assert not np.array_equal(s1.last_camera, np.eye(4))
        assert np.abs(_region(shot_after) - _region(shot_before)).mean() > 3, "the page did not change after the drag"
        mad, corr = _matches(shot_after, after)
        assert corr > 0.85, f"the new view on the page does not match the server's render (correlation {corr:.3f})"
        assert _matches(shot_after, before)[1] < corr

        # Uploads: bad bytes and too long are refused with a message in the page; the server keeps serving.
        upload = driver.find_element(By.CSS_SELECTOR, "input[type=file]")
        bad = tmp_path / "not_audio.wav"
        bad.write_bytes(np.random.default_rng(0).bytes(40_000))
        upload.send_keys(str(bad))
        _wait(lambda: s1.upload_messages, timeout=60, what="the bad upload's verdict")
        assert "not a readable audio file" in s1.upload_messages[-1] or "no audio" in s1.upload_messages[-1]
        _wait(lambda: "Upload refused" in driver.find_element(By.TAG_NAME, "body").text, timeout=30,
              what="the refusal in the page")
        # Beside it, viser's own notice for the transfer ("File uploaded successfully", which stays up
        # for 4 s on its own) is gone.
        _wait(lambda: "uploaded successfully" not in driver.find_element(By.TAG_NAME, "body").text, timeout=2.5,
              what="viser's upload notice to be taken down")
        long = tmp_path / "long.wav"
        long.write_bytes(wav_bytes(np.zeros(int(125 * SAMPLE_RATE), np.float32)))
        upload.send_keys(str(long))
        _wait(lambda: len(s1.upload_messages) >= 2, timeout=60, what="the long upload's verdict")
        assert "limit of 120 s" in s1.upload_messages[-1]
        # Over the size limit: refused from the transfer's announcement; the button is released at once.
        big = tmp_path / "big.wav"
        big.write_bytes(bytes(8 * MIB))
        upload.send_keys(str(big))
        _wait(lambda: len(s1.upload_messages) >= 3, timeout=60, what="the big upload's verdict")
        assert s1.upload_messages[-1] == "big.wav is 8.0 MB, over the upload limit of 5 MB"
        button = driver.find_element(By.XPATH, "//button[normalize-space()='Upload speech']")
        _wait(lambda: button.is_enabled(), timeout=30, what="the upload button to be released")
        assert not s1.client.gui._current_file_upload_states
        good = tmp_path / "speech.m4a.bin"  # any name: the type comes from decoding
        good.write_bytes(wav_bytes(tone(2.0, freq=300.0)))
        upload.send_keys(str(good))
        _wait(lambda: len(s1.upload_messages) >= 4, timeout=90, what="the good upload's verdict")
        assert s1.upload_messages[-1].startswith("ok:"), s1.upload_messages[-1]
        assert len(s1.drive) == 50 and s1.frame_slider.max == 49
        sent = s1.frames_sent
        _wait(_fresh_frame(s1, sent - 1), what="a frame after the uploads")

        # A second tab works beside the first, with its own session and camera.
        first = driver.current_window_handle
        driver.switch_to.new_window("tab")
        driver.get(viewer.url)
        s2 = _wait(lambda: _session(viewer, 1), what="the second tab's session")
        _wait(lambda: s2.last_image is not None and s2.camera is not None, what="the second tab's first frame")
        _wait(_fresh_frame(s2, 0), what="the second tab's frame")
        time.sleep(1.5)
        shot2 = _canvas_shot(driver)
        with s2.lock:
            image2 = s2.last_image.copy()
        mad, corr = _matches(shot2, image2)
        assert corr > 0.85, f"second tab does not show the avatar (correlation {corr:.3f})"
        assert len(s2.drive) != len(s1.drive)  # the upload belonged to the first tab only
        driver.switch_to.window(first)
        updates = s1.camera_updates
        canvas = driver.find_element(By.TAG_NAME, "canvas")
        ActionChains(driver).move_to_element_with_offset(canvas, -int(canvas.rect["width"] * 0.2), 0).click_and_hold() \
            .move_by_offset(-20, 0).move_by_offset(-20, 0).release().perform()
        _wait(lambda: s1.camera_updates > updates, timeout=30, what="the first tab's camera after the second opened")
        assert len(viewer.sessions) == 2
    except AssertionError as e:  # say where the server was, for a failure seen only on a loaded machine
        raise AssertionError(f"{e}\nviewer state: {_viewer_state(viewer)}") from None
    finally:
        driver.quit()
        viewer.stop()
        shutil.rmtree(profile, ignore_errors=True)


def _viewer_state(viewer) -> str:
    parts = []
    for cid, s in list(viewer.sessions.items()):
        parts.append(f"tab {cid}: frames_sent={s.frames_sent} last_frame={s.last_frame} playing={s.clock.playing} "
                     f"camera_updates={s.camera_updates} aspect={s.aspect:.3f} uploads={s.upload_messages!r}")
    return "; ".join(parts) or "no tab connected"
