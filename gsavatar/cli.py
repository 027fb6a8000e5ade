"""The ``gsavatar`` command: parses arguments and calls one function per subcommand.

A subcommand appears here only once it works. User errors are printed as one line
(``error: ...``) with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Literal

import tyro

from gsavatar.config import PreprocessConfig, check_frame_size, check_number
from gsavatar.errors import BatchFailed, GsavatarError, InputError, Terminated


@dataclasses.dataclass
class Preprocess:
    """Turn a talking-head video into a subject dataset (frames, landmarks, masks, background, audio features).

    Writes SUBJECT_DIR/manifest.json and preprocess_report.json. Re-running skips stages
    whose inputs are unchanged.
    """

    video: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="VIDEO")]
    """Input video (any container/codec FFmpeg reads), with the speaker's audio track, at least 5 s."""
    out: Annotated[Path, tyro.conf.arg(aliases=["-o"], metavar="SUBJECT_DIR")]
    """Subject dataset directory to create or update."""
    size: int = 512
    """Working resolution (square crop resized to SIZE x SIZE)."""
    audio_features: tuple[str, ...] = PreprocessConfig.audio_features
    """Audio feature kinds to extract: logmel (built in), phonemes (a multilingual phoneme
    recogniser, offline), whisper (Whisper tiny.en encoder, offline), hubert / wav2vec2 (local
    weights: the directory in $GSAVATAR_HUBERT_MODEL / $GSAVATAR_WAV2VEC2_MODEL)."""

    def __call__(self) -> None:
        from gsavatar.data.preprocess import preprocess

        cfg = PreprocessConfig(size=self.size, audio_features=tuple(self.audio_features))
        report = preprocess(self.video, self.out, cfg)
        print(f"subject dataset ready: {self.out}  ({report['num_frames']} frames, face in "
              f"{100 * report['face_fraction']:.1f}%, {report['total_wall_s']:.1f} s)")


@dataclasses.dataclass
class Track:
    """Fit the subject's 3D face model: head pose and expression per frame, identity shape and focal length.

    Reads SUBJECT_DIR (from gsavatar preprocess, which also runs this step), writes
    tracking.npz and tracking_report.json (reprojection error in pixels, pose jitter, focal
    length, wall time) and updates the manifest. Skipped when already up to date.
    """

    subject: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="SUBJECT_DIR")]
    """Subject dataset made by gsavatar preprocess."""
    overlay: Annotated[Path | None, tyro.conf.arg(metavar="OUT.mp4")] = None
    """Also write a video of the fitted model drawn over the frames, with the audio."""
    focal: float | None = None
    """Focal length in pixels at the working size, if known (default: estimated from the video)."""
    expression_components: int = 32
    """Size of the expression basis learned from the subject."""
    force: bool = False
    """Re-run tracking even if it is up to date."""

    def __call__(self) -> None:
        from gsavatar.config import TrackingConfig
        from gsavatar.data.dataset import SubjectDataset
        from gsavatar.data.preprocess import track

        if self.overlay is not None:
            from gsavatar.files import check_output_file

            check_output_file(self.overlay, ".mp4")
        if self.focal is not None and not self.focal > 0:
            raise InputError(f"--focal must be a positive number of pixels (got {self.focal})")
        cfg = TrackingConfig(focal_px=self.focal, expression_components=self.expression_components)
        m = track(self.subject, cfg, force=self.force)
        print(f"tracking: reprojection RMSE {m['reprojection_rmse_px']:.2f} px (rigid points "
              f"{m['reprojection_rmse_rigid_px']:.2f} px), jitter {m['jitter_translation_mm']:.2f} mm / "
              f"{m['jitter_rotation_deg']:.2f} deg, focal {m['focal_px']:.0f} px ({m['fov_x_deg']:.0f} deg field of view)")
        if self.overlay is not None:
            from gsavatar.tracking.overlay import write_overlay

            dataset = SubjectDataset(self.subject)
            write_overlay(dataset, dataset.tracking, self.overlay)
            print(f"overlay: {self.overlay}")


def _db(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


@dataclasses.dataclass
class Train:
    """Train an avatar on a talking-head video or a subject dataset (preprocessing and tracking run first when needed).

    Writes RUN_DIR/avatar.pt (the trained avatar), summary.json (time, Gaussians per branch,
    test-split PSNR), train.log and a resumable checkpoint.pt: if a run is killed, the same
    command resumes it where it stopped.
    """

    input: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="VIDEO_OR_SUBJECT")]
    """A video file (preprocessed into RUN_DIR/subject) or a subject dataset directory from gsavatar preprocess."""
    out: Annotated[Path, tyro.conf.arg(aliases=["-o"], metavar="RUN_DIR")]
    """Run directory for the avatar, logs and checkpoints."""
    preset: str = "auto"
    """Training preset: a name in configs/ (cpu-tiny: minutes on a CPU, 128 px; cpu-30min: about 30 min on 2
    cores, 256 px; cpu-512: the same at 512 px, under an hour; live: cpu-30min reading 88 ms of audio ahead, for
    gsavatar live; default: GPU, 512 px), a .toml path, or auto (default on a CUDA device, cpu-30min on a CPU)."""
    iterations_scale: float = 1.0
    """Multiply every stage's iterations by this (e.g. 0.5 for a quicker, rougher avatar)."""
    render_size: int | None = None
    """Training resolution in pixels (default: the preset's)."""
    seed: int | None = None
    """Random seed (default: the preset's, 0; CPU training is deterministic for a given seed)."""
    device: str | None = None
    """auto | cpu | cuda (default: the preset's, auto)."""
    backend: str | None = None
    """Rendering backend: auto (our compiled rasterizer for the device, CPU or GPU, once it passes a
    self-check, else the PyTorch reference) | torch | cuda | cpp | gsplat (gsplat's CUDA rasterizer, to cross-check ours; pip install
    gsplat==1.5.3 packaging) (default: the preset's, auto)."""
    force: bool = False
    """Discard an existing run in RUN_DIR and start again."""

    def config(self):
        """The resolved TrainConfig (preset, then the flags), with a line saying what ``auto`` picked
        or warning that a GPU preset is about to train on a CPU (None when there is nothing to say)."""
        from gsavatar.config import AUTO_PRESET, auto_preset, load_preset, scale_iterations
        from gsavatar.runtime import resolve_device

        note = None
        preset = self.preset
        if preset == "auto":
            device = resolve_device(self.device or "auto")
            preset = auto_preset(device.type)
            where = "the CUDA device" if device.type == "cuda" else "a CPU: no CUDA device"
            note = f"preset auto: {preset} (for {where}; --preset NAME chooses another)"
        cfg = load_preset(preset)
        cfg = dataclasses.replace(cfg, seed=cfg.seed if self.seed is None else self.seed,
                                  device=self.device or cfg.device, render_size=self.render_size or cfg.render_size,
                                  backend=self.backend or cfg.backend)
        check_number("--iterations-scale", self.iterations_scale, 0.0, 100.0, low_open=True)
        cfg = scale_iterations(cfg, self.iterations_scale)
        cfg.validate()  # a bad setting fails now, not after preprocessing a video
        if preset == AUTO_PRESET["cuda"] and resolve_device(cfg.device).type == "cpu":
            note = (f"note: preset {preset} is meant for a GPU and would train for more than a day on this CPU; "
                    f"--preset {AUTO_PRESET['cpu']} takes about 30 min on 2 cores")
        return cfg, note

    def __call__(self) -> None:
        from gsavatar.train.run import train_command

        cfg, note = self.config()
        if note:
            print(note, flush=True)
        summary = train_command(self.input, self.out, cfg, force=self.force)
        g = summary["gaussians"]
        print(f"avatar: {self.out / 'avatar.pt'}  ({summary['wall_s'] / 60:.1f} min, Gaussians face {g['face']}, "
              f"mouth {g['mouth']}, torso {g['torso']}; test PSNR {_db(summary['test_psnr'])} dB, "
              f"face {_db(summary['test_psnr_face'])} dB)")


@dataclasses.dataclass
class Render:
    """Render a trained avatar speaking any audio file to an mp4 (H.264 video, AAC audio, in sync).

    The video has round(audio seconds x 25) frames at 25 fps; frame k shows the mouth for audio
    [k/25, (k+1)/25) s. Head motion and blinks come from the training video (looped without
    jumps), the camera from --camera.
    """

    run: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """Run directory from gsavatar train (its avatar.pt; checkpoint.pt if training has not finished)."""
    audio: Annotated[Path, tyro.conf.arg(metavar="SPEECH")]
    """Speech to drive the avatar: wav, mp3, m4a, mp4 (its audio track)... at any sample rate."""
    out: Annotated[Path, tyro.conf.arg(aliases=["-o"], metavar="OUT.mp4")]
    """Output video; its directory must exist. Written atomically (nothing appears if rendering fails)."""
    pose: Literal["loop", "still"] = "loop"
    """Head motion: loop (the training video's, played back and forth) or still (its median pose)."""
    blink: Literal["track", "generate", "none"] = "track"
    """Blinks: track (the training video's, with the looped motion), generate (random, at a human rate) or none."""
    camera: Annotated[str, tyro.conf.arg(metavar="train|orbit|zoom|PATH.json")] = "train"
    """Camera path: train (the tracked camera), orbit (sways +-30 deg around the head), zoom (slow push-in),
    or a JSON file {"keyframes": [{"t": 0, "yaw": 0, "pitch": 0, "roll": 0, "zoom": 1}, ...]} (seconds, degrees)."""
    size: Annotated[int | None, tyro.conf.arg(metavar="N")] = None
    """Output width and height in pixels, even (default: the resolution the avatar was trained at)."""
    frames_dir: Annotated[Path | None, tyro.conf.arg(metavar="DIR")] = None
    """Also write every frame as DIR/frame_00000.png, frame_00001.png, ..."""
    background: Annotated[Path | None, tyro.conf.arg(metavar="IMAGE")] = None
    """Replace the background plate with this image (png, jpg...; resized to the output size)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    max_seconds: float = 600.0
    """Refuse audio longer than this many seconds."""
    cpu_threads: int = -1
    """torch CPU threads: -1 uses the trained preset's (1 for the CPU presets: faster on a busy machine), 0 torch's default."""
    seed: int = 0
    """Seed of the generated blinks (--blink generate)."""

    def __call__(self) -> None:
        from gsavatar.drive import DriveConfig
        from gsavatar.outputs.render_video import render_video

        drive = DriveConfig(pose=self.pose, blink=self.blink, camera=self.camera, seed=self.seed)
        r = render_video(self.run, self.audio, self.out, drive, size=self.size, frames_dir=self.frames_dir,
                         background=self.background, device=self.device, max_seconds=self.max_seconds,
                         cpu_threads=self.cpu_threads)
        print(f"video: {r['out']}  ({r['frames']} frames, {r['seconds']:.2f} s at {r['size']} px; rendered at "
              f"{r['render_fps']:.1f} frames/s, {r['end_to_end_fps']:.1f} frames/s with encoding, {r['total_s']:.1f} s in all)")


@dataclasses.dataclass
class Export:
    """Export the avatar's 3D Gaussians as a standard 3D Gaussian Splatting PLY (SuperSplat, antimatter15/splat...).

    Face, mouth and torso go into one file in the head frame (metres, OpenCV axes: y down);
    a vertex property 'branch' (0 face, 1 mouth, 2 torso) and header comments say which is which.
    """

    run: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """Run directory from gsavatar train."""
    out: Annotated[Path, tyro.conf.arg(aliases=["-o"], metavar="AVATAR.ply")]
    """Output PLY file; its directory must exist. Written atomically."""
    frame: Annotated[int | None, tyro.conf.arg(metavar="K")] = None
    """Export the Gaussians deformed for output frame K (default: the canonical, undeformed avatar)."""
    audio: Annotated[Path | None, tyro.conf.arg(metavar="SPEECH")] = None
    """With --frame: drive the avatar with this speech file (default: the training video's own audio, if
    its subject dataset still exists)."""

    def __call__(self) -> None:
        from gsavatar.outputs.ply import export_ply

        r = export_ply(self.run, self.out, frame=self.frame, audio=self.audio)
        g = r["gaussians"]
        print(f"ply: {r['out']}  ({sum(g.values())} Gaussians: face {g['face']}, mouth {g['mouth']}, torso {g['torso']}; "
              f"SH degree {r['sh_degree']}; " + ("canonical" if r["frame"] is None else f"frame {r['frame']}") + ")")


@dataclasses.dataclass
class Demo:
    """Make the built-in synthetic demo subject (scikit-image's astronaut speaking synthetic speech), preprocess it and train an avatar.

    Writes OUT/demo.mp4 (H.264 + AAC), the subject dataset OUT/subject (unless
    --no-preprocess), a cpu-tiny avatar in OUT/run (unless --no-train; a few minutes on a CPU)
    and OUT/avatar_orbit.mp4: the avatar speaking new synthetic words (OUT/novel_speech.wav)
    seen from an orbiting camera.
    """

    out: Annotated[Path, tyro.conf.arg(aliases=["-o"], metavar="DIR")] = Path("demo")
    """Directory for demo.mp4 and the subject dataset."""
    duration: float = 8.0
    """Length of the demo video in seconds."""
    size: int = 512
    """Resolution of the demo video and of the subject dataset."""
    seed: int = 0
    """Random seed of the synthetic speech."""
    preprocess: bool = True
    """Also run preprocessing on the demo video (OUT/subject)."""
    train: bool = True
    """Also train an avatar on the demo subject (OUT/run; needs preprocessing)."""
    preset: str = "cpu-tiny"
    """Training preset for the demo avatar."""

    def __call__(self) -> None:
        from gsavatar.data.synthetic import make_synthetic_subject

        self.out.mkdir(parents=True, exist_ok=True)
        subject = make_synthetic_subject(self.out / "demo.mp4", duration_s=self.duration, size=self.size, seed=self.seed)
        print(f"demo video: {subject.video_path} ({subject.num_frames} frames)")
        if self.preprocess:
            Preprocess(subject.video_path, self.out / "subject", size=self.size)()
            if self.train:
                Train(self.out / "subject", self.out / "run", preset=self.preset)()
                self._render_novel_speech()

    def _render_novel_speech(self) -> None:
        """The trained avatar speaking words it never heard, seen from an orbiting camera."""
        import numpy as np

        from gsavatar.data.synthetic import synthesize_speech
        from gsavatar.data.video import SAMPLE_RATE, write_wav

        speech, _ = synthesize_speech(min(self.duration, 8.0), SAMPLE_RATE, np.random.default_rng(self.seed + 1000))
        write_wav(self.out / "novel_speech.wav", speech)
        Render(self.out / "run", audio=self.out / "novel_speech.wav", out=self.out / "avatar_orbit.mp4", camera="orbit")()


@dataclasses.dataclass
class Eval:
    """Score a trained avatar on its held-out test split (the last 1/11 of frames) against two baselines.

    Image metrics (PSNR, SSIM, LPIPS when its weights are on disk), LMD from an independent
    landmark detector (dlib's 68 points), mouth- and eye-opening correlation with the truth,
    the audio-visual offset (also for any --audio file, no reference video needed) and the
    frame rate. Prints a table (or JSON) and writes RUN_DIR/eval.json.
    """

    run: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """Run directory made by gsavatar train (holds avatar.pt)."""
    audio: tuple[Path, ...] = ()
    """Speech files (wav, mp3, m4a, mp4...) to drive the avatar with and measure lip-sync on."""
    subject: Path | None = None
    """The subject dataset, if it moved since training (default: the path recorded in the avatar)."""
    max_frames: int = 0
    """Score only the first MAX_FRAMES test frames (0: all)."""
    baselines: bool = True
    """Also score the mean-frame and nearest-audio-frame baselines (--no-baselines to skip)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    json: bool = False
    """Print the JSON result instead of the table."""

    def __call__(self) -> None:
        import json as _json

        from gsavatar.config import EvalConfig
        from gsavatar.eval.evaluate import evaluate_run, format_table

        cfg = EvalConfig(audio=tuple(str(a) for a in self.audio), max_frames=self.max_frames, baselines=self.baselines,
                         device=self.device)
        result = evaluate_run(self.run, cfg, self.subject, progress=not self.json)
        print(_json.dumps(result, indent=2, default=str) if self.json else format_table(result))
        if not self.json:
            print(f"written: {self.run / 'eval.json'}")

@dataclasses.dataclass
class View:
    """Open a trained avatar in the browser (viser): orbit and zoom with the mouse, play, pause and scrub
    the timeline with the sound in sync, upload other speech, toggle layers and the Gaussian centres.

    Runs until Ctrl-C. Binds 127.0.0.1 (this machine only) unless --host says otherwise; each
    browser tab has its own camera, timeline and render thread. Speech uploaded in the page: up to
    20 MiB and 120 s; a larger file is refused from the size its upload announces, before its bytes
    are kept.
    """

    run: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """Run directory from gsavatar train (its avatar.pt), or the avatar.pt file itself."""
    audio: Annotated[Path | None, tyro.conf.arg(metavar="SPEECH")] = None
    """Speech to drive the avatar (any file FFmpeg reads, up to 300 s; default: the first 10 s of the subject's own audio)."""
    port: int = 8080
    """Port to serve on (if taken, the next free one is used and printed)."""
    host: str = "127.0.0.1"
    """Interface to bind: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface: anyone on the network can connect)."""
    size: Annotated[int | None, tyro.conf.arg(metavar="N")] = None
    """Render about N x N pixels per frame (default: the avatar's training size)."""
    device: str = "auto"
    """auto | cpu | cuda."""

    def __call__(self) -> None:
        from gsavatar.viewer import serve

        if not 0 <= self.port < 65536:
            raise InputError(f"--port must be between 0 and 65535 (got {self.port})")
        if self.size is not None:
            check_frame_size(self.size)
        serve(self.run, self.audio, host=self.host, port=self.port, size=self.size, device=self.device)


@dataclasses.dataclass
class Live:
    """Serve a trained avatar live: a client streams speech in over a WebSocket, a chunk at a time,
    and gets frames back at 25 a second, each with the audio it shows (an idle avatar while no
    speech arrives). A browser page (viser, --page-port) has a microphone button: speak, and the
    avatar speaks it back.

    The protocol is documented in gsavatar/live/protocol.py; viewer/live_client.py (also
    ``python -m gsavatar.viewer_examples.live_client``) streams a speech file and writes what comes
    back to an mp4. Latency is set by how far ahead of a frame the avatar reads audio: an avatar
    trained with ``--preset live`` reads 88 ms ahead, the other presets 288 ms. Runs until Ctrl-C;
    binds 127.0.0.1 (this machine only) unless --host says otherwise.
    """

    run: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """Run directory from gsavatar train (its avatar.pt), or the avatar.pt file itself."""
    port: int = 8765
    """WebSocket port."""
    host: str = "127.0.0.1"
    """Interface to bind: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface: anyone on the network can connect)."""
    size: Annotated[int | None, tyro.conf.arg(metavar="N")] = None
    """Frames of N x N pixels (default: the avatar's training size)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    max_clients: int = 4
    """Streams served at once (each costs a share of the frame rate)."""
    page_port: int = 8080
    """Port of the browser page with the microphone button (the viewer extra)."""
    page: bool = True
    """Serve the browser page too (--no-page: the WebSocket only)."""

    def __call__(self) -> None:
        from gsavatar.live.server import serve

        if not 0 <= self.port < 65536:
            raise InputError(f"--port must be between 0 and 65535 (got {self.port})")
        if not 1 <= self.max_clients <= 64:
            raise InputError(f"--max-clients must be between 1 and 64 (got {self.max_clients})")
        if self.size is not None:
            check_frame_size(self.size)
        if not 0 <= self.page_port < 65536:
            raise InputError(f"--page-port must be between 0 and 65535 (got {self.page_port})")
        serve(self.run, host=self.host, port=self.port, size=self.size, device=self.device, max_clients=self.max_clients,
              page_port=self.page_port if self.page else None)


@dataclasses.dataclass
class Batch:
    """Train several avatars and render many videos from one job file (TOML), on Ray.

    The file lists [[subject]] entries (a video or subject dataset, a preset) and [[render]] entries
    (a subject of the file or a trained run, speech files, camera, size, background); the format is
    in gsavatar/batch/jobs.py. Each step (preprocess, train, render) is a Ray task that asks for the
    CPUs, GPUs and memory it needs, on a local Ray instance started for the batch or, with
    --address, on a cluster (the output folder must then be on a filesystem every node shares).
    Without Ray installed (pip install 'gsavatar[cluster]') the jobs run one after another in this
    process. Each job gets a folder under the file's ``output``; ``batch_report.json`` there says
    per job: done, skipped (up to date) or failed with a one-line reason, its wall time, node and
    figures. Running the same file again skips what is done and resumes what was interrupted
    (training from its checkpoint). A failed job does not stop the others; the exit status is 1
    when any failed.
    """

    jobs: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="JOBS.toml")]
    """The job file."""
    address: str | None = None
    """A Ray cluster to run on: auto (the cluster started on this machine with ``ray start``) or
    ray://HOST:PORT; by default a local Ray instance is started for the batch (also: $RAY_ADDRESS)."""
    max_parallel: int | None = None
    """At most this many steps at once (by default as many as the cluster's resources hold)."""
    in_process: bool = False
    """Run the steps one after another in this process, without Ray."""

    def __call__(self) -> None:
        from gsavatar.batch import load_jobs, make_executor, run_batch
        from gsavatar.batch.runner import REPORT

        if self.max_parallel is not None and self.max_parallel < 1:
            raise InputError(f"--max-parallel must be at least 1 (got {self.max_parallel})")
        jobs = load_jobs(self.jobs)
        executor = make_executor(jobs.output, jobs.resources, self.address, self.in_process, self.max_parallel)
        try:
            results = run_batch(jobs, executor, log=None, jobs_file=self.jobs)
        finally:
            executor.close()
        failed = [r for r in results if r.state == "failed"]
        done = sum(r.state == "done" for r in results)
        skipped = sum(r.state == "skipped" for r in results)
        print(f"batch: {done} done, {skipped} skipped, {len(failed)} failed; report: {jobs.output / REPORT}")
        if failed:
            raise BatchFailed(f"{len(failed)} of {len(results)} jobs failed: "
                              + "; ".join(f"{r.name}: {r.reason}" for r in failed[:3]) + ("; ..." if len(failed) > 3 else ""))


COMMANDS = {
    "preprocess": Preprocess,
    "track": Track,
    "train": Train,
    "render": Render,
    "export": Export,
    "eval": Eval,
    "view": View,
    "live": Live,
    "batch": Batch,
    "demo": Demo,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gsavatar`` console script."""
    command = tyro.extras.subcommand_cli_from_dict(
        COMMANDS, args=argv, prog="gsavatar",
        description="gsavatar: audio-driven 3D Gaussian-splatting talking-head avatars.",
    )
    from gsavatar.runtime import keep_freed_memory

    keep_freed_memory()  # the CLI owns its process: frames reuse their buffers' pages
    try:
        with _sigterm_as_interrupt():
            command()
    except GsavatarError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return Terminated.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread, so every command
    cleans up on it as on Ctrl-C (temporary outputs removed, finished work kept). Commands with
    handlers of their own (training checkpoints the current iteration first) install them inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(_signum, _frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
