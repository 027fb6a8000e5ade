"""Live streaming: streamed features and frames against offline, pacing and idling, the WebSocket
server and its example client, and what bad clients get."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_image_but_cutoff_flips

ROOT = Path(__file__).resolve().parents[1]


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Bursts of noisy harmonics with pauses: onsets and silences, like speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    envelope = (np.sin(2 * np.pi * 2.3 * t) > 0.2) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t) ** 2)
    voice = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 1100), 1))
    return (0.25 * envelope * (voice + 0.3 * rng.standard_normal(t.size))).astype(np.float32).clip(-1, 1)


# -- streamed features ------------------------------------------------------------------------
def test_logmel_stream_equals_offline_features_for_any_chunking():
    from gsavatar.data.audio_features import LogMelExtractor

    ex = LogMelExtractor()
    x = speechlike(3.0)
    n = len(x) // 640
    offline = ex.extract(x, n)
    rng = np.random.default_rng(1)
    for sizes in ([1, 7, 640], [159, 161], [5000]):
        stream, got, i = ex.stream(), [], 0
        while i < len(x):
            c = int(rng.choice(sizes))
            got.append(stream.push(x[i:i + c]))
            i += c
            assert stream._buffer.size < 640 + 2 * ex.PAD + max(sizes)  # only what the next frame needs
        got = np.concatenate(got)
        # Every frame but the last (its window reaches 120 samples past the audio) is complete.
        assert got.shape == (n - 1, 4, 80) and stream.frames_done == n - 1
        # Each mel energy is a float32 sum of 201 non-negative terms whose order BLAS may pick by batch
        # size: relative error <= 201 * 2^-24 each way, i.e. 201 * 2^-24 / ln(10) in log10 units.
        bound = 2 * 201 * 2.0**-24 / math.log(10) + 2 * 2.0**-24 * 10
        assert np.abs(got - offline[: n - 1]).max() <= bound


def test_features_that_cannot_stream_say_so():
    from types import SimpleNamespace

    from gsavatar.data.audio_features import AudioFeatureExtractor
    from gsavatar.errors import InputError

    with pytest.raises(InputError, match="whisper features cannot be streamed.*logmel.*--preset live"):
        AudioFeatureExtractor.stream(SimpleNamespace(kind="whisper"))


def test_live_preset_reads_two_frames_ahead():
    from gsavatar.config import load_preset

    live, base = load_preset("live"), load_preset("cpu-30min")
    assert live.avatar.audio_reach() == (13, 2) and base.avatar.audio_reach() == (8, 7)
    assert live.avatar.audio_feature == "logmel"
    assert [s.name for s in live.stages] == [s.name for s in base.stages] and live.render_size == base.render_size


def test_preset_base_cycle_is_an_error(tmp_path):
    from gsavatar.config import load_preset
    from gsavatar.errors import InputError

    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(f'base = "{b}"\n')
    b.write_text(f'base = "{a}"\n')
    with pytest.raises(InputError, match="without cycles"):
        load_preset(str(a))


# -- endless motion ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(avatar_file):
    return avatar_file


@pytest.mark.parametrize("mode", [{}, {"blink": "generate"}, {"pose": "still"}, {"blink": "none"}])
def test_endless_motion_equals_the_offline_drive(tiny_run, mode):
    from gsavatar.config import DriveConfig
    from gsavatar.drive import EndlessMotion, blink_sequence, pose_sequence
    from gsavatar.model.io import load_run

    subject = load_run(tiny_run).subject
    cfg = DriveConfig(**mode)
    n = 3 * len(range(*subject.train)) + 7  # past two turn-arounds of the ping-pong loop
    viewmats, poses, src = pose_sequence(subject, n, cfg)
    blinks = blink_sequence(subject, n, src, cfg)
    motion = EndlessMotion(subject, cfg)
    tail = math.ceil(3 * cfg.pose_smoothing_frames)  # the drive's last frames see its end
    for k in range(n - tail):
        viewmat, pose, blink = motion.at(k)
        assert torch.allclose(pose, poses[k], atol=1e-6) and torch.allclose(viewmat, viewmats[k], atol=1e-6)
        assert float(blink) == float(blinks[k])


# -- the stream -------------------------------------------------------------------------------
def lopsided_avatar(src: Path, dst: Path) -> Path:
    """``src`` with its audio window made lopsided (6 frames back, 2 ahead, neighbours all before):
    the same network shapes as the symmetric 4 + 4 window, so the weights load unchanged."""
    from gsavatar.model.io import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(src)
    avatar = dict(ckpt.config["avatar"], audio_window_radius=6, audio_window_future=2, audio_smoothing_future=0)
    assert ckpt.config["avatar"]["audio_window_radius"] == 4 and avatar["audio_smoothing_frames"] == 8
    save_checkpoint(dataclasses.replace(ckpt, config=dict(ckpt.config, avatar=avatar)), dst)
    return dst


@pytest.fixture(scope="module")
def lopsided_run(tiny_run, tmp_path_factory):
    return lopsided_avatar(tiny_run, tmp_path_factory.mktemp("lopsided") / "avatar.pt")


@pytest.mark.parametrize("which", ["symmetric", "lopsided"])
def test_stream_frames_equal_offline_render_where_the_window_is_complete(tiny_run, lopsided_run, which):
    from gsavatar.drive import build_drive, frame_count
    from gsavatar.live import LiveAvatar

    live = LiveAvatar(tiny_run if which == "symmetric" else lopsided_run)
    assert (live.past_frames, live.lookahead_frames) == ((8, 7) if which == "symmetric" else (13, 2))
    x = speechlike(2.0, seed=3)
    stream = live.open()
    rng = np.random.default_rng(0)
    frames, i = [], 0
    pcm16 = (x * 32767).round().astype(np.int16)
    while i < len(x):
        c = int(rng.integers(50, 1500))
        stream.push(pcm16[i:i + c])  # int16 in: scaled by 1/32768
        frames += stream.ready_frames()
        i = min(i + c, len(x))
        # Frames come out as soon as their reach has arrived, not later.
        assert stream.next_index == max(0, (i - live.right_context) // 640 - live.lookahead_frames)
    frames += stream.finish()
    n = frame_count(x)
    assert [f.index for f in frames] == list(range(n)) and not any(f.filled for f in frames)
    np.testing.assert_array_equal(np.concatenate([f.audio for f in frames])[: len(x)], pcm16.astype(np.float32) / 32768)
    drive = build_drive(live.subject, pcm16.astype(np.float32) / 32768)
    with torch.no_grad():
        for k in range(0, n - live.lookahead_frames, 5):  # past there an offline drive replicates its last frame
            want = live.avatar(drive.inputs(k, live.avatar)).image
            got = torch.from_numpy(frames[k].image).float() / 255
            assert_same_image_but_cutoff_flips(got, (want.clamp(0, 1) * 255 + 0.5).floor() / 255, f"frame {k}", atol=1.5 / 255)
    # Bounded memory: the samples of frames not shown yet (the reach padded by finish), the features still read.
    assert stream._timeline.size <= (live.lookahead_frames + 1) * 640 + live.right_context
    assert len(stream._feats) <= live.past_frames + live.lookahead_frames + 2


def test_idle_stream_fills_silence_and_late_audio_goes_after_it(tiny_run):
    from gsavatar.live import LiveAvatar

    live = LiveAvatar(tiny_run)
    stream = live.open()
    idle = [stream.next_frame(draw=k % 4 == 0) for k in range(10)]  # no audio at all: the avatar idles
    assert all(f.filled or f.index > 0 for f in idle) and all(np.all(f.audio == 0) for f in idle)
    assert idle[0].image is not None and idle[1].image is None
    written = stream.samples
    assert written == (10 + live.lookahead_frames) * 640 + live.right_context  # exactly the reach of the last frame
    x = speechlike(1.0) + 0.01  # no zero samples: where it lands is plain to see
    stream.push(x[:200])  # the start of the speech, too little for the next frame, which is due now
    late = stream.next_frame(draw=False)
    stream.push(x[200:])
    more = [late] + [stream.next_frame(draw=False) for _ in range(40)]
    audio = np.concatenate([f.audio for f in idle + more])
    # The silence the due frame needed goes before the late chunk, after what frames already read:
    # nothing read is rewritten, the speech is not cut, nothing is lost.
    begins = written + 640 - 200
    assert not np.any(audio[:begins])
    np.testing.assert_array_equal(audio[begins: begins + 20 * 640], x[: 20 * 640])
    assert late.filled and [f.index for f in idle + more] == list(range(51))


def test_queued_chunks_keep_their_places_and_arrival_times(tiny_run):
    from gsavatar.live import LiveAvatar

    stream = LiveAvatar(tiny_run).open()
    for n, t in ((100, 1.0), (200, 2.0), (300, 3.0)):
        stream.push(np.full(n, 0.1, np.float32), arrived=t)
    stream.next_frame(draw=False)  # due before the reach arrived: silence first, then the three chunks
    short = stream._needed(0) - 600
    assert list(stream.arrivals) == [(short, 1.0), (short + 100, 2.0), (short + 300, 3.0)]
    assert stream.samples == stream._needed(0) and stream.silence_written == short


def test_stream_refuses_bad_audio_with_one_line(tiny_run):
    from gsavatar.errors import InputError
    from gsavatar.live import BacklogError, LiveAvatar, LiveConfig

    live = LiveAvatar(tiny_run, LiveConfig(max_backlog_seconds=2.0))
    stream = live.open()
    for bad, match in [(np.zeros((2, 10), np.float32), "mono"), (np.zeros(10, np.int32), "int16 or float"),
                       (np.array([0.1, np.nan], np.float32), "NaN"), (np.full(10, 300.0, np.float32), "integer samples sent as float")]:
        with pytest.raises(InputError, match=match):
            stream.push(bad)
    stream.push(np.zeros(16000, np.float32))
    with pytest.raises(BacklogError, match="faster than real time"):
        stream.push(np.zeros(16000 + 640, np.float32))
    assert stream.backlog_seconds() == 1.0  # the refused chunk left nothing behind
    with pytest.raises(InputError, match="sample rate"):
        live.open(4000)


def test_other_sample_rates_are_resampled(tiny_run):
    from gsavatar.live import LiveAvatar

    live = LiveAvatar(tiny_run)
    t = np.arange(48000 * 2) / 48000
    tone48 = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stream = live.open(48000)
    for i in range(0, tone48.size, 4800):
        stream.push(tone48[i:i + 4800])
    stream.end()
    assert abs(stream.samples - 32000) <= 64  # two seconds at 16 kHz (the resampler's delay flushed)
    got = stream._timeline[8000:24000]  # one second from the middle (nothing drawn yet, nothing dropped)
    spectrum = np.abs(np.fft.rfft(got))
    assert abs(np.argmax(spectrum) * 16000 / got.size - 440) <= 1  # the tone, at its pitch
    assert np.sqrt(np.mean(got**2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.02)  # and its level


# -- the WebSocket server ---------------------------------------------------------------------
websockets = pytest.importorskip("websockets", reason="the live server needs websockets (the live extra)")


@pytest.fixture(scope="module")
def server(tiny_run):
    from gsavatar.live import LiveAvatar, LiveConfig
    from gsavatar.live.server import LiveServer, ServerOptions

    live = LiveAvatar(tiny_run, LiveConfig(max_backlog_seconds=3.0))
    options = ServerOptions(port=0, max_clients=3, max_message_bytes=64 * 1024, start_timeout_s=1.0)
    with LiveServer(live, options, log=lambda line: None) as srv:
        yield srv


def client_module():
    sys.path.insert(0, str(ROOT / "viewer"))
    import live_client

    return live_client


def test_example_client_streams_a_file_and_writes_an_mp4(server, tmp_path):
    import av

    from gsavatar.data.video import write_wav

    live_client = client_module()
    x = speechlike(2.0, seed=5)
    wav = tmp_path / "speech.wav"
    write_wav(wav, x)
    out = tmp_path / "live.mp4"
    assert live_client.main([server.url, str(wav), "-o", str(out), "--quiet"]) == 0
    with av.open(str(out)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        assert (video.codec_context.name, audio.codec_context.name) == ("h264", "aac")
        assert video.codec_context.width == server.live.size
        n = sum(1 for _ in c.decode(video=0))
    assert n >= 50  # two seconds of speech (after the idle start)
    assert live_client.main(["ws://127.0.0.1:1", str(wav), "-o", str(tmp_path / "x.mp4"), "--quiet"]) == 2


def test_frames_carry_the_sent_audio_in_order(server):
    from gsavatar.live.protocol import decode_frame  # noqa: F401 (the client decodes with it)

    live_client = client_module()
    x = speechlike(1.5, seed=6)
    # Sent ahead of real time (within the backlog limit), so no chunk is late on a busy machine and
    # the only silence written is the idle start's.
    frames, messages = asyncio.run(live_client.stream_file(server.url, x, chunk_ms=30, pace=3.0, verbose=False))
    ready, ended = messages[0], messages[-1]
    assert ready["type"] == "ready" and ready["fps"] == 25 and ready["lookahead_ms"] == pytest.approx(
        1000 * server.live.lookahead_seconds, abs=0.1)
    assert ended == {"type": "ended", "frames": len(frames)}
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(f.span == (640 * f.index, 640 * (f.index + 1)) for f in frames)
    audio = np.concatenate([f.audio for f in frames]).astype(np.float32) / 32767
    start = int(np.flatnonzero(np.abs(audio) > 0)[0])
    sent = np.flatnonzero(np.abs(x) > 0)[0]
    # The speech comes back whole and in order (s16 rounding twice), after the idle frames' silence.
    np.testing.assert_allclose(audio[start - sent: start - sent + len(x)], x, atol=2.0 / 32767)
    assert frames[0].filled and frames[0].jpeg is not None


async def _talk(url, *messages, expect_close=True, wait=3.0):
    """Send ``messages`` (str or bytes); return the JSON messages received and the close code."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    got, code = [], None
    async with connect(url, max_size=2**24) as ws:
        try:
            for m in messages:
                await ws.send(m)
        except ConnectionClosed:  # the server may close before all is sent: read what it said
            pass
        try:
            end = time.monotonic() + wait
            while time.monotonic() < end:
                m = await asyncio.wait_for(ws.recv(), end - time.monotonic())
                if isinstance(m, str):
                    got.append(json.loads(m))
        except (ConnectionClosed, TimeoutError):
            pass
        code = ws.close_code if expect_close else None
    return got, code


START = json.dumps({"type": "start", "sample_rate": 16000, "format": "s16le"})


@pytest.mark.parametrize("messages, error", [
    ((b"\x00\x01",), "first message must be"),
    (("hello",), "must be a JSON object"),
    ((json.dumps({"type": "start", "sample_rate": 44}),), "sample_rate must be"),
    ((json.dumps({"type": "start", "format": "mp3"}),), "format must be one of"),
    ((json.dumps({"type": "start", "volume": 3}),), "unknown start field"),
    ((START, b"\x00\x01\x02"), "not a whole number of s16le samples"),
    ((START, json.dumps({"type": "dance"})), "unknown message type"),
    ((START, "[1, 2"), "must be a JSON object"),
])
def test_bad_clients_get_one_error_and_are_closed(server, messages, error):
    got, code = asyncio.run(_talk(server.url, *messages))
    errors = [m for m in got if m["type"] == "error"]
    assert len(errors) == 1 and error in errors[0]["message"] and errors[0]["fatal"], got
    assert code == 1008


def test_bad_webrtc_offer_is_refused(server):
    pytest.importorskip("aiortc", reason="WebRTC needs aiortc (pip install 'gsavatar[webrtc]')")
    for offer in ("hello", "v=0\r\nnot really an offer\r\n"):
        got, code = asyncio.run(_talk(server.url, json.dumps({"type": "webrtc-offer", "sdp": offer})))
        errors = [m for m in got if m["type"] == "error"]
        assert len(errors) == 1 and "offer" in errors[0]["message"] and code == 1008, got
    end = time.monotonic() + 5
    while server.sessions and time.monotonic() < end:
        time.sleep(0.05)
    assert not server.sessions


def test_oversized_message_and_silent_client_are_closed(server):
    _, code = asyncio.run(_talk(server.url, START, b"\x00" * (64 * 1024 + 2)))
    assert code == 1009  # "message too big", the WebSocket close code that says so
    got, code = asyncio.run(_talk(server.url, wait=3.0))  # never sends start
    assert got[0]["message"].startswith("no start message within 1 s") and code == 1008


def test_too_fast_client_is_refused_while_another_is_served(server):
    live_client = client_module()

    async def both():
        flood = bytes(16000 * 2 * 2)  # 2 s of audio per message, sent as fast as possible
        slow = asyncio.create_task(live_client.stream_file(server.url, speechlike(1.0, seed=8), verbose=False))
        fast = asyncio.create_task(_talk(server.url, START, *[flood] * 4, wait=1.5))
        return await slow, await fast

    (frames, messages), (got, _) = asyncio.run(both())
    refusals = [m for m in got if m["type"] == "error"]
    assert refusals and all(not m["fatal"] and "faster than real time" in m["message"] for m in refusals)
    assert messages[-1]["type"] == "ended" and len(frames) >= 25


def test_vanished_clients_release_their_streams_and_busy_server_says_so(server):
    from websockets.asyncio.client import connect

    async def scenario():
        held = [await connect(server.url) for _ in range(3)]
        for ws in held:
            await ws.send(START)
            assert json.loads(await ws.recv())["type"] == "ready"
        refused, code = await _talk(server.url, START)
        for ws in held:
            await ws.close()
        return refused, code

    refused, code = asyncio.run(scenario())
    assert "server busy" in refused[0]["message"] and code == 1013
    end = time.monotonic() + 5
    while server.sessions and time.monotonic() < end:
        time.sleep(0.05)
    assert not server.sessions


def test_cli_live_help_and_errors():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "gsavatar", "live", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "WebSocket" in out.stdout and "--preset live" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "gsavatar", "live", "no-such-run"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


# -- the browser page -------------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def test_page_script_is_inlined_without_comments():
    from gsavatar.live.page import button_html, page_script

    js = page_script(8765)
    assert "__WS_PORT__" not in js and ':8765"' in js and '"ws://"' in js
    assert not any(line.strip().startswith("//") for line in js.splitlines())
    assert 'onclick="' in button_html(8765) and '"ws://"' not in button_html(8765)  # quotes escaped in the attribute


@pytest.mark.parametrize("button, state", [("gsavatar-live-mic", "gsavatarLive"), ("gsavatar-live-call", "gsavatarCall")],
                         ids=["websocket", "webrtc"])
def test_page_streams_the_microphone_and_shows_the_avatar(server, tmp_path, button, state):
    """Headless Chromium with a fake microphone playing a speech-like wav. The microphone button
    streams it over the WebSocket and draws the frames that come back with their audio; the call
    button makes a WebRTC call (aiortc) whose video the page plays."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("viser", reason="the page needs viser (pip install 'gsavatar[viewer]')")
    if state == "gsavatarCall":
        pytest.importorskip("aiortc", reason="WebRTC needs aiortc (pip install 'gsavatar[webrtc]')")
        from aioice.ice import get_host_addresses

        if not get_host_addresses(use_ipv4=True, use_ipv6=True):
            pytest.skip("no network interface but loopback: aiortc gathers no host candidate to call on")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from gsavatar.data.video import write_wav
    from gsavatar.live.page import LivePage

    wav = tmp_path / "mic.wav"
    write_wav(wav, speechlike(3.0, seed=9))
    page = LivePage(server.port, 1000 * server.live.lookahead_seconds, port=0)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
                 "--mute-audio", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=900,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(page.url)
        end = time.monotonic() + 60
        element = None
        while element is None and time.monotonic() < end:
            found = driver.find_elements(By.ID, button)
            element = found[0] if found else time.sleep(0.2)
        assert element is not None, f"the button {button} never appeared"
        element.click()
        shown = {}
        while time.monotonic() < end:
            shown = driver.execute_script(f"return window.{state} && {{shown: window.{state}.framesShown, "
                                          f"errors: window.{state}.errors}}") or {{}}
            if shown.get("shown", 0) > 40 or shown.get("errors"):
                break
            time.sleep(0.2)
        assert shown.get("shown", 0) > 40 and not shown.get("errors"), shown
        streams = [s.stream for s in server.sessions.values()]
        assert len(streams) == 1
        # The microphone's audio (the wav, resampled from the browser's rate) reached the server.
        assert streams[0].received_samples > 16000 and streams[0].received_peak > 0.2
        element.click()  # stop: the page ends its stream
        end = time.monotonic() + 20
        while server.sessions and time.monotonic() < end:
            time.sleep(0.1)
        assert not server.sessions
    finally:
        driver.quit()
        page.stop()
