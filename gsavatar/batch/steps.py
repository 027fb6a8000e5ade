"""The steps of a batch job, run wherever an executor places them (this process, or a Ray worker on
any node of a cluster): ``preprocess`` (a subject given as a video), ``train``, ``render``.

A step writes under the batch's output root, which every node sees at the same path (and reads
its inputs, which must be there too). It returns a :class:`StepOutcome`; an error inside the step comes back as the outcome's
one-line reason instead of being raised, so an executor retries only steps whose worker process
died. Each job's folder holds:

    job.json           the job entry's hash and whether the job completed (what "up to date" means)
    .batch-step.json   the step working there now: node, process id, attempt (read by the driver
                       to say where a step runs and that a retried one resumes)
    batch-<step>.log   a step's own output, when it ran in a worker process
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from gsavatar.batch.jobs import RenderJob, SubjectJob
from gsavatar.data.io import atomic_write_json
from gsavatar.errors import GsavatarError, StoppedBySignal

JOB_FILE = "job.json"
STEP_MARKER = ".batch-step.json"


class StepPreempted(Exception):
    """A step in a worker stopped by SIGTERM after saving its state: the executor runs it again
    (within the retry bound), and it resumes."""


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One step to run: everything a worker on another node needs (it pickles)."""

    job: SubjectJob | RenderJob
    kind: str
    """preprocess | train | render"""
    folder: Path
    """The job's folder under the output root."""
    key: str
    """The job's hash (:func:`job_hash`), recorded in job.json."""
    first: bool
    """The job's first step: an entry that changed since the folder was made starts over here."""
    final: bool
    """The job's last step: it marks the job complete."""
    batch_id: str
    """One run of ``gsavatar batch``: attempts of a step are counted within it."""
    run_dir: Path | None = None
    """render: the trained run it draws."""
    cpus: float | None = None
    """torch's thread count (the CPUs the step was given); None keeps this process's."""
    in_worker: bool = False
    """It runs in a worker process of its own: its stdout and stderr go to ``<folder>/batch-<kind>.log``,
    and a stop by SIGTERM raises :class:`StepPreempted` (in the batch's own process it stops the batch)."""


@dataclasses.dataclass
class StepOutcome:
    """What a step reports back to the driver."""

    ok: bool
    reason: str | None
    figures: dict
    node: str
    wall_s: float
    attempt: int
    resumed: bool


def job_hash(job: SubjectJob | RenderJob, run_dir: Path | None = None, extra: str = "") -> str:
    """What defines a job's outputs: its entry, ``extra`` (a subject's training configuration) and,
    for a render, the avatar file it draws (so a render of a subject trained again is made again)."""
    text = json.dumps(dataclasses.asdict(job), sort_keys=True, default=str) + extra
    if run_dir is not None:
        try:
            st = (run_dir / "avatar.pt").stat()
            text += f"|{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            text += "|no avatar"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def job_outputs(job: SubjectJob | RenderJob, folder: Path) -> list[Path]:
    """The files a finished job leaves in its folder."""
    if isinstance(job, SubjectJob):
        return [folder / "avatar.pt"]
    return [folder / f"{p.stem}.mp4" for p in job.speech]  # one mp4 per speech file (names differ: jobs.py)


def up_to_date(job: SubjectJob | RenderJob, folder: Path, key: str) -> bool:
    """The folder holds this very entry's finished outputs."""
    record = _read_json(folder / JOB_FILE) or {}
    return record.get("hash") == key and record.get("complete", True) and all(p.is_file() for p in job_outputs(job, folder))


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if isinstance(e, GsavatarError) and text else f"{type(e).__name__}: {text[0] if text else ''}"


def node_name() -> str:
    """The machine's name; in a process connected to Ray (a worker, or the driver) with the start
    of its Ray node id (nodes of one machine, or machines that share a name, stay apart in the
    report)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"
        except Exception:  # noqa: BLE001 (a name is only for the report)
            pass
    return socket.gethostname()


def _record(spec: StepSpec, complete: bool) -> None:
    entry = json.loads(json.dumps(dataclasses.asdict(spec.job), default=str))
    atomic_write_json(spec.folder / JOB_FILE, {"hash": spec.key, "complete": complete, "job": entry})


def _start_over_if_changed(spec: StepSpec) -> None:
    """A job entry edited since its folder was made: a subject trains again from scratch (its
    checkpoint belongs to other settings); the new hash is recorded at once, so that a retry of
    this step, or a later run of the batch, resumes instead of starting over again."""
    record = _read_json(spec.folder / JOB_FILE)
    if record is not None and record.get("hash") == spec.key:
        return
    if record is not None and isinstance(spec.job, SubjectJob):
        from gsavatar.train.run import clear_run

        clear_run(spec.folder)
    _record(spec, complete=False)


def _mark_start(spec: StepSpec, resumed: bool) -> int:
    previous = _read_json(spec.folder / STEP_MARKER) or {}
    same = previous.get("batch") == spec.batch_id and previous.get("step") == spec.kind
    attempt = int(previous.get("attempt", 0)) + 1 if same else 1
    atomic_write_json(spec.folder / STEP_MARKER, {
        "batch": spec.batch_id, "step": spec.kind, "attempt": attempt, "node": node_name(), "pid": os.getpid(),
        "resumed": resumed, "started": datetime.datetime.now().isoformat(timespec="seconds")})
    return attempt


def read_marker(folder: Path) -> dict | None:
    """The step working in ``folder`` now (see the module's doc), or None."""
    return _read_json(folder / STEP_MARKER)


def _resumes(spec: StepSpec) -> bool:
    if spec.kind == "train":
        return (spec.folder / "checkpoint.pt").is_file()
    if spec.kind == "preprocess":
        return (spec.folder / "subject" / "manifest.json").is_file()
    return False


def train_config(job: SubjectJob):
    """The training configuration of a subject job (its preset, iteration scale and seed); the
    driver has resolved ``preset = "auto"`` already (for the device training gets, once)."""
    from gsavatar.config import load_preset, scale_iterations

    cfg = scale_iterations(load_preset(job.preset), job.iterations_scale)
    if job.seed is not None:
        cfg = dataclasses.replace(cfg, seed=job.seed)
    return cfg.validate()


def _preprocess(spec: StepSpec) -> dict:
    from gsavatar.train.run import prepare_subject

    subject = prepare_subject(spec.job.video, spec.folder, train_config(spec.job).render_size)
    manifest = _read_json(subject / "manifest.json") or {}
    return {"frames": manifest.get("num_frames")} if manifest.get("num_frames") else {}


def _train(spec: StepSpec) -> dict:
    from gsavatar.train.run import train_command

    summary = train_command(spec.job.video, spec.folder, train_config(spec.job))
    decibels = {k: None if summary.get(k) is None else round(float(summary[k]), 2) for k in ("test_psnr", "test_psnr_face")}
    return {**decibels, "train_min": round(summary["wall_s"] / 60, 2)}


def _render(spec: StepSpec) -> dict:
    from gsavatar.drive import DriveConfig
    from gsavatar.outputs.render_video import render_video

    job = spec.job
    frames = 0
    for speech, out in zip(job.speech, job_outputs(job, spec.folder)):
        r = render_video(spec.run_dir, speech, out, DriveConfig(camera=job.camera), size=job.size,
                         background=job.background, device="auto")
        frames += int(r["frames"])
    return {"videos": len(job.speech), "frames": frames}


STEP_WORK = {"preprocess": _preprocess, "train": _train, "render": _render}


@contextlib.contextmanager
def _step_output(spec: StepSpec):
    if not spec.in_worker:
        yield
        return
    with open(spec.folder / f"batch-{spec.kind}.log", "a", buffering=1) as f, \
            contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"--- {spec.kind} on {node_name()} (pid {os.getpid()}), "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}", flush=True)
        yield


def use_cpus(count: int) -> None:
    """Threads for torch and for our CPU rasterizer (which by default takes every core, and two
    steps placed on one node side by side would then fight over them)."""
    import torch

    from gsavatar import kernels

    torch.set_num_threads(count)
    if kernels.available("cpp"):
        from gsavatar.render import set_cpu_raster_threads

        set_cpu_raster_threads(count)


def run_step(spec: StepSpec) -> StepOutcome:
    """Run one step here (see the module's doc); never raises for an error of the step itself."""
    import torch

    start = time.perf_counter()
    threads = torch.get_num_threads()
    resumed, attempt = False, 1
    try:
        spec.folder.mkdir(parents=True, exist_ok=True)
        if spec.first:
            _start_over_if_changed(spec)
        resumed = _resumes(spec)
        attempt = _mark_start(spec, resumed)
        with _step_output(spec):
            if spec.cpus is not None:
                use_cpus(max(1, int(spec.cpus)))  # may build our kernels the first time: its note goes in the log
            figures = STEP_WORK[spec.kind](spec)
        if spec.final:
            _record(spec, complete=True)
        ok, reason = True, None
    except StoppedBySignal as e:
        if spec.in_worker:  # its node is going away (a drain, an eviction): run it again elsewhere
            raise StepPreempted(one_line(e)) from None
        raise
    except Exception as e:  # noqa: BLE001 (a failed step is reported; the batch goes on)
        figures, ok, reason = {}, False, one_line(e)
    finally:
        torch.set_num_threads(threads)
    return StepOutcome(ok, reason, figures, node_name(), round(time.perf_counter() - start, 2), attempt, resumed)


def probe_output(root: str, token: str) -> tuple[str, str, str, str | None]:
    """On one node: write ``token`` to a probe file under ``root``; returns (node, the file, what
    was written, an error or None). The driver then reads the file back, which shows that it shares
    the node's filesystem."""
    host = node_name()
    path = Path(root) / f".batch-probe-{token}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token)
    except OSError as e:
        return host, str(path), token, e.strerror or str(e)
    return host, str(path), token, None
