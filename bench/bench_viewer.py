"""The viewer's server-side frame rate (``gsavatar view``): render + JPEG encode (+ send).

    python bench/bench_viewer.py RUN_DIR [--size 512] [--seconds 20] [--no-browser] [--write]

Two measurements at SIZE x SIZE:

* render + encode: the viewer's own code path (FrameRenderer.render, then
  set_background_image: viser's JPEG encoder, quality 90) over consecutive frames, the camera
  orbiting slowly, one torch thread; no client connected (encoded and queued, not sent).
* with a client: the viewer served to headless Chromium (a square canvas, so frames are SIZE x
  SIZE), Play pressed, frames actually rendered, encoded and sent per second during playback
  (frames the clock skipped are dropped, as in use), and the CPU that Chromium and the server
  took per frame; ``--compare-background`` repeats it with frames sent as viser's background
  image (which keeps the page's WebGL scene re-rendering). Chromium draws the page with software
  WebGL on the same CPU, so on a small machine this figure is lower than a real user would get
  with the browser on a GPU. Skipped without /usr/bin/chromium or selenium.

--write appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, like_the_cli, machine  # noqa: E402

TABLE = "## Viewer (`gsavatar view`)"


def render_encode(viewer, seconds: float) -> dict:
    import numpy as np

    from gsavatar.drive import orbit_transform
    from gsavatar.viewer.core import tracked_fov

    drive, r = viewer.drive, viewer.renderer
    centre = np.array(viewer.initial["look_at"])
    fov = tracked_fov(drive.K, drive.size)
    r.render(drive, 0, None, fov)  # warm-up
    times, encode, k = [], [], 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        cam = orbit_transform(centre, 10 * np.sin(k / 20), 3 * np.sin(k / 31))
        t0 = time.perf_counter()
        image = r.render(drive, k % len(drive), cam, fov)
        t1 = time.perf_counter()
        # What a tab's render thread does with a frame (public API; with no client connected it is
        # encoded and queued, not sent).
        viewer.server.scene.set_background_image(image, format="jpeg", jpeg_quality=viewer.options.jpeg_quality)
        t2 = time.perf_counter()
        times.append(t2 - t0)
        encode.append(t2 - t1)
        k += 1
    viewer.server.scene.set_background_image(None)
    return {"frames": k, "fps": k / sum(times), "ms": 1000 * float(np.mean(times)), "encode_ms": 1000 * float(np.mean(encode)),
            "shape": image.shape}


def cpu_seconds(name_part: str | None) -> float:
    """CPU time (user + system) so far of the processes whose name contains ``name_part``, or of
    this process (None): Linux /proc, processes that end meanwhile are missed."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    pids = ["self"] if name_part is None else [p for p in os.listdir("/proc") if p.isdigit()]
    total = 0.0
    for pid in pids:
        try:
            if name_part is not None and name_part not in Path(f"/proc/{pid}/comm").read_text():
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def with_browser(viewer, seconds: float) -> dict | None:
    if not Path("/usr/bin/chromium").exists() or not Path("/usr/bin/chromedriver").exists():
        print("no /usr/bin/chromium: skipping the measurement with a client")
        return None
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
    except ImportError:
        print("no selenium: skipping the measurement with a client")
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio",
                 "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=700,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
    try:
        driver.get(viewer.url)
        end = time.monotonic() + 120
        while time.monotonic() < end and not viewer.sessions:
            time.sleep(0.2)
        session = next(iter(viewer.sessions.values()))
        rect = driver.find_element(By.TAG_NAME, "canvas").rect
        size = driver.get_window_size()
        driver.set_window_size(size["width"], size["height"] + int(rect["width"] - rect["height"]))
        while time.monotonic() < end and abs(session.aspect - 1) > 1e-3:
            time.sleep(0.2)
        time.sleep(2.0)
        session.loop_box.value = True
        session.toggle_play()
        time.sleep(1.0)
        n0, t0, b0, s0 = session.frames_sent, time.monotonic(), cpu_seconds("chrom"), cpu_seconds(None)
        time.sleep(seconds)
        n1, t1, b1, s1 = session.frames_sent, time.monotonic(), cpu_seconds("chrom"), cpu_seconds(None)
        session.toggle_play()
        shape = session.last_image.shape
        fps = (n1 - n0) / (t1 - t0)
        frames = max(1, n1 - n0)
        return {"fps": fps, "shape": shape, "shown": fps / 25.0, "render_ms": 1000 * session._render_s,
                "browser_cores": (b1 - b0) / (t1 - t0), "server_cores": (s1 - s0) / (t1 - t0),
                "browser_ms": 1000 * (b1 - b0) / frames, "server_ms": 1000 * (s1 - s0) / frames}
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run directory (avatar.pt)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each measurement")
    ap.add_argument("--no-browser", action="store_true", help="skip the measurement with headless Chromium")
    ap.add_argument("--raster-threads", type=int, default=0,
                    help="threads of our CPU rasterizer (0: every core, the viewer's default)")
    ap.add_argument("--compare-background", action="store_true",
                    help="also measure the page with frames sent as viser's background image (the old transport)")
    ap.add_argument("--write", action="store_true", help="append a row to BENCHMARKS.md")
    args = ap.parse_args()
    like_the_cli()

    import torch

    from gsavatar.render import available_backends, set_cpu_raster_threads
    from gsavatar.viewer.server import start_viewer

    torch.set_num_threads(1)
    if "cpp" in available_backends():
        set_cpu_raster_threads(args.raster_threads)
    viewer = start_viewer(args.run, port=0, size=args.size, device="cpu", verbose=False, render_slots=1)
    try:
        g = viewer.avatar.num_gaussians()
        local = render_encode(viewer, args.seconds)
        print(f"render + encode: {local['fps']:.2f} frames/s ({local['ms']:.0f} ms a frame, JPEG {local['encode_ms']:.1f} ms) "
              f"at {local['shape'][1]}x{local['shape'][0]}, {local['frames']} frames")
        client = None if args.no_browser else with_browser(viewer, args.seconds)
        if client and args.compare_background:  # the same page with frames as viser's background image
            import dataclasses

            overlay_options = viewer.options
            viewer.options = dataclasses.replace(overlay_options, frame_overlay=False)
            old = with_browser(viewer, args.seconds)
            viewer.options = overlay_options
            print(f"frames as viser's background image instead: {old['fps']:.2f} frames/s; Chromium "
                  f"{old['browser_cores']:.2f} cores ({old['browser_ms']:.0f} ms a frame), the server "
                  f"{old['server_cores']:.2f} cores ({old['server_ms']:.0f} ms a frame); overlay / background "
                  f"{client['fps'] / old['fps']:.2f}x")
        if client:
            print(f"with headless Chromium: {client['fps']:.2f} frames/s rendered, encoded and sent during playback at "
                  f"{client['shape'][1]}x{client['shape'][0]} ({100 * client['shown']:.0f}% of the 25 fps timeline shown)")
            print(f"CPU during playback: Chromium {client['browser_cores']:.2f} cores ({client['browser_ms']:.0f} ms a "
                  f"frame), the server {client['server_cores']:.2f} cores ({client['server_ms']:.0f} ms a frame); "
                  f"two cores allow at most {2000 / (client['browser_ms'] + client['server_ms']):.1f} frames/s at these costs")
    finally:
        viewer.stop()
    if args.write:
        subject_dir = Path(viewer.subject.subject_dir or "?")
        subject = f"{subject_dir.parent.name}/{subject_dir.name}" if subject_dir.name == "subject" else subject_dir.name
        with_client = (f"{client['fps']:.2f}" if client else "not measured")
        row = (f"| {datetime.date.today()} | {args.run} ({subject}, trained at {viewer.subject.render_size} px) | "
               f"{g['face']} / {g['mouth']} / {g['torso']} | {local['shape'][1]}x{local['shape'][0]} | {local['fps']:.2f} "
               f"({local['ms']:.0f} ms, JPEG {local['encode_ms']:.1f} ms) | {with_client} | "
               f"cpu, 1 torch thread: {machine()}, shared | `python bench/bench_viewer.py {args.run} --size {args.size} "
               f"--seconds {args.seconds:g}` |")
        append_row(TABLE, row)


if __name__ == "__main__":
    main()
