"""Running a batch: each job in turn, in this process, one folder per job under the output root.

A job whose folder holds its outputs made from the same job entry (``job.json`` keeps a hash of
the entry) is skipped as up to date; an interrupted training resumes from its checkpoint; a job
that fails is reported with a one-line reason and the others go on (a render of a failed subject
fails with that reason). ``batch_report.json`` is rewritten after every change of state.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import socket
import time
from pathlib import Path
from typing import Callable

from gsavatar.batch.jobs import BatchJobs, RenderJob, SubjectJob
from gsavatar.data.io import atomic_write_json
from gsavatar.errors import GsavatarError, InputError

REPORT = "batch_report.json"
JOB_FILE = "job.json"


@dataclasses.dataclass
class JobResult:
    """One job's line in the report."""

    name: str
    kind: str  # "train" | "render"
    state: str = "pending"  # pending | running | done | skipped | failed
    reason: str | None = None
    wall_s: float = 0.0
    node: str = ""
    figures: dict = dataclasses.field(default_factory=dict)


def job_hash(job: SubjectJob | RenderJob, run_dir: Path | None = None) -> str:
    """What defines a job's outputs: its entry and, for a render, the avatar file it draws (so a
    render of a subject trained again is made again)."""
    text = json.dumps(dataclasses.asdict(job), sort_keys=True, default=str)
    if run_dir is not None:
        try:
            st = (run_dir / "avatar.pt").stat()
            text += f"|{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            text += "|no avatar"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _recorded_hash(folder: Path) -> str | None:
    try:
        return json.loads((folder / JOB_FILE).read_text()).get("hash")
    except (OSError, ValueError):
        return None


def check_writable(root: Path) -> None:
    """One line when the output root cannot be written (before any work starts)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-check-{socket.gethostname()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write the batch output {root} from {socket.gethostname()} ({e.strerror or e})") from None


def _up_to_date(folder: Path, key: str, outputs: list[Path]) -> bool:
    return _recorded_hash(folder) == key and all(p.is_file() for p in outputs)


def _train_config(job: SubjectJob):
    from gsavatar.config import auto_preset, load_preset, scale_iterations
    from gsavatar.runtime import resolve_device

    preset = auto_preset(resolve_device("auto").type) if job.preset == "auto" else job.preset
    cfg = scale_iterations(load_preset(preset), job.iterations_scale)
    if job.seed is not None:
        cfg = dataclasses.replace(cfg, seed=job.seed)
    return cfg.validate()


def run_train(job: SubjectJob, folder: Path) -> dict:
    """Train (resuming an interrupted run of the same entry; starting over when the entry changed)."""
    from gsavatar.train.run import train_command

    recorded = _recorded_hash(folder)
    changed = recorded is not None and recorded != job_hash(job)
    summary = train_command(job.video, folder, _train_config(job), force=changed)
    return {"test_psnr": summary.get("test_psnr"), "test_psnr_face": summary.get("test_psnr_face"),
            "train_min": round(summary["wall_s"] / 60, 2)}


def speech_outputs(job: RenderJob, folder: Path) -> list[Path]:
    """One mp4 per speech file, named after it (numbered where two share a name)."""
    stems = [p.stem for p in job.speech]
    return [folder / (f"{s}.mp4" if stems.count(s) == 1 else f"{s}_{i}.mp4") for i, s in enumerate(stems)]


def run_render(job: RenderJob, folder: Path, run_dir: Path) -> dict:
    from gsavatar.drive import DriveConfig
    from gsavatar.outputs.render_video import render_video

    frames = 0
    for speech, out in zip(job.speech, speech_outputs(job, folder)):
        r = render_video(run_dir, speech, out, DriveConfig(camera=job.camera), size=job.size, background=job.background)
        frames += int(r["frames"])
    return {"videos": len(job.speech), "frames": frames}


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if isinstance(e, GsavatarError) and text else f"{type(e).__name__}: {text[0] if text else ''}"


def run_batch(jobs: BatchJobs, log: Callable[[str], None] = print, jobs_file: Path | None = None) -> list[JobResult]:
    """Run every job of ``jobs`` in turn (subjects first: renders depend on them); returns the results
    (also written to ``OUTPUT/batch_report.json``)."""
    check_writable(jobs.output)
    node = socket.gethostname()
    results = [JobResult(j.name, "train") for j in jobs.subjects] + [JobResult(j.name, "render") for j in jobs.renders]
    by_name = {r.name: r for r in results}
    started = datetime.datetime.now().isoformat(timespec="seconds")

    def report() -> None:
        counts = {state: sum(r.state == state for r in results) for state in ("done", "skipped", "failed")}
        atomic_write_json(jobs.output / REPORT, {"jobs_file": str(jobs_file) if jobs_file else None, "started": started,
                                                  **counts, "jobs": [dataclasses.asdict(r) for r in results]})

    def step(k: int, job, outputs: list[Path], work: Callable[[Path], dict], run_dir: Path | None = None) -> None:
        result, folder = by_name[job.name], jobs.output / job.name
        prefix = f"batch [{k}/{len(results)}] {job.name} ({result.kind})"
        result.node = node
        if _up_to_date(folder, job_hash(job, run_dir), outputs):
            result.state, result.reason = "skipped", "up to date"
            log(f"{prefix}: skipped, up to date")
            report()
            return
        result.state = "running"
        report()
        log(f"{prefix}: running")
        start = time.perf_counter()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            result.figures = work(folder)
            entry = json.loads(json.dumps(dataclasses.asdict(job), default=str))
            atomic_write_json(folder / JOB_FILE, {"hash": job_hash(job, run_dir), "job": entry})
            result.state = "done"
        except KeyboardInterrupt:
            result.state, result.reason = "failed", "interrupted"
            report()
            raise
        except Exception as e:  # noqa: BLE001 (a failed job is reported; the others go on)
            result.state, result.reason = "failed", one_line(e)
        result.wall_s = round(time.perf_counter() - start, 2)
        figures = ", ".join(f"{k} {v}" for k, v in result.figures.items())
        log(f"{prefix}: {result.state} in {result.wall_s:.1f} s" + (f" ({figures})" if result.state == "done" and figures else "")
            + (f": {result.reason}" if result.reason else ""))
        report()

    k = 0
    for job in jobs.subjects:
        k += 1
        folder = jobs.output / job.name
        step(k, job, [folder / "avatar.pt"], lambda f, job=job: run_train(job, f))
    for job in jobs.renders:
        k += 1
        folder = jobs.output / job.name
        if job.subject is not None and by_name[job.subject].state == "failed":
            r = by_name[job.name]
            r.state, r.reason, r.node = "failed", f"its subject {job.subject} failed", node
            log(f"batch [{k}/{len(results)}] {job.name} (render): failed: {r.reason}")
            report()
            continue
        run_dir = job.run if job.run is not None else jobs.output / job.subject
        step(k, job, speech_outputs(job, folder), lambda f, job=job, run_dir=run_dir: run_render(job, f, run_dir), run_dir)
    return results
