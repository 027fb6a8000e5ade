"""Running a batch: the driver that puts each job's steps on an executor, one folder per job under
the output root.

A subject job is ``preprocess`` (when given a video) then ``train``; a render job is ``render``,
started once the subject it draws is trained. A job whose folder holds the outputs of the same
entry (``job.json``) is skipped as up to date; an interrupted step resumes from what its folder
holds (training from its checkpoint); a job that fails is reported with a one-line reason and the
others go on (a render of a failed subject fails with that reason). Every change of a job's state
is one log line (also appended to ``OUTPUT/batch.log``), ``batch_report.json`` is rewritten after
each, and on a terminal a bar counts the finished jobs.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import sys
import uuid
from pathlib import Path
from typing import Callable, Hashable

from gsavatar.batch.jobs import BatchJobs, RenderJob, SubjectJob
from gsavatar.batch.steps import StepOutcome, StepSpec, job_hash, node_name, read_marker, up_to_date
from gsavatar.data.io import atomic_write_json
from gsavatar.errors import InputError, StoppedBySignal

REPORT = "batch_report.json"
LOG = "batch.log"
POLL_S = 1.0
"""How often the driver looks for steps that started or were retried (their folders' markers)."""


@dataclasses.dataclass
class JobResult:
    """One job's line in the report."""

    name: str
    kind: str  # "train" | "render"
    state: str = "pending"  # pending | running | done | skipped | failed
    reason: str | None = None
    wall_s: float = 0.0
    node: str = ""
    attempts: int = 0
    figures: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Job:
    """The driver's view of one job: its steps, the one it is at, its result."""

    job: SubjectJob | RenderJob
    index: int
    result: JobResult
    folder: Path
    steps: tuple[str, ...]
    run_dir: Path | None = None
    key: str = ""
    at: int = 0
    attempt_logged: int = 0


def check_writable(root: Path) -> None:
    """One line when the output root cannot be written (before any work starts)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-check-{node_name()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write the batch output {root} from {node_name()} ({e.strerror or e})") from None


class _Reporter:
    """Job state lines (stdout and OUTPUT/batch.log), the report file, the bar of finished jobs."""

    def __init__(self, jobs: BatchJobs, results: list[JobResult], log: Callable[[str], None] | None,
                 jobs_file: Path | None, workers: str):
        from gsavatar.progress import progress

        self.jobs, self.results, self.jobs_file, self.workers = jobs, results, jobs_file, workers
        self.started = datetime.datetime.now().isoformat(timespec="seconds")
        self._log = log
        self.bar = progress(total=len(results), desc="batch", unit="job", enabled=log is None and sys.stderr.isatty(),
                            leave=False)

    def line(self, text: str) -> None:
        stamp = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
        try:
            with open(self.jobs.output / LOG, "a") as f:
                f.write(f"{stamp} {text}\n")
        except OSError:
            pass
        if self._log is not None:
            self._log(text)
        else:
            self.bar.write(text)

    def job_line(self, j: _Job, text: str) -> None:
        self.line(f"batch [{j.index}/{len(self.results)}] {j.job.name} ({j.result.kind}): {text}")

    def finished(self, j: _Job) -> None:
        r = j.result
        if r.state == "done":
            figures = ", ".join(f"{k} {v}" for k, v in r.figures.items() if v is not None)
            retried = f", attempt {r.attempts}" if r.attempts > 1 else ""
            self.job_line(j, f"done in {r.wall_s:.1f} s on {r.node}{retried}" + (f" ({figures})" if figures else ""))
        elif r.state == "skipped":
            self.job_line(j, "skipped, up to date")
        else:
            self.job_line(j, f"failed: {r.reason}")
        self.bar.update()
        self.write()

    def write(self) -> None:
        counts = {state: sum(r.state == state for r in self.results) for state in ("done", "skipped", "failed")}
        atomic_write_json(self.jobs.output / REPORT, {
            "jobs_file": str(self.jobs_file) if self.jobs_file else None, "started": self.started,
            "workers": self.workers, **counts, "jobs": [dataclasses.asdict(r) for r in self.results]})

    def close(self) -> None:
        self.bar.close()


def _plan(jobs: BatchJobs) -> list[_Job]:
    out: list[_Job] = []
    for job in jobs.subjects:
        steps = ("preprocess", "train") if job.video.is_file() else ("train",)
        out.append(_Job(job, len(out) + 1, JobResult(job.name, "train"), jobs.output / job.name, steps))
    for job in jobs.renders:
        run_dir = job.run if job.run is not None else jobs.output / job.subject
        out.append(_Job(job, len(out) + 1, JobResult(job.name, "render"), jobs.output / job.name, ("render",), run_dir))
    return out


def run_batch(jobs: BatchJobs, executor=None, log: Callable[[str], None] | None = print,
              jobs_file: Path | None = None) -> list[JobResult]:
    """Run every job of ``jobs`` on ``executor`` (default: in this process); returns the results
    (also in ``OUTPUT/batch_report.json``). ``log`` receives each state line; None prints them above
    a progress bar on a terminal."""
    from gsavatar.batch.executors import InProcessExecutor

    check_writable(jobs.output)
    executor = executor or InProcessExecutor()
    plan = _plan(jobs)
    results = [j.result for j in plan]
    waiting: dict[str, list[_Job]] = collections.defaultdict(list)  # renders by the subject they draw
    queue: collections.deque[_Job] = collections.deque()
    running: dict[Hashable, _Job] = {}
    batch_id = uuid.uuid4().hex[:12]
    out = _Reporter(jobs, results, log, jobs_file, executor.description)
    out.line(f"batch: {len(plan)} jobs on {executor.description}")
    out.write()

    def end(j: _Job, state: str, reason: str | None = None) -> None:
        j.result.state, j.result.reason = state, reason
        out.finished(j)
        if isinstance(j.job, SubjectJob):
            for render in waiting.pop(j.job.name, []):
                if state == "failed":
                    render.result.node = node_name()
                    end(render, "failed", f"its subject {j.job.name} failed")
                else:
                    begin(render)

    def begin(j: _Job) -> None:
        j.key = job_hash(j.job, j.run_dir)
        if up_to_date(j.job, j.folder, j.key):
            end(j, "skipped", "up to date")
        else:
            queue.append(j)

    def submit(j: _Job) -> None:
        kind = j.steps[j.at]
        spec = StepSpec(j.job, kind, j.folder, j.key, first=j.at == 0, final=j.at == len(j.steps) - 1,
                        batch_id=batch_id, run_dir=j.run_dir)
        running[executor.submit(spec, getattr(jobs.resources, kind))] = j
        j.result.state, j.attempt_logged = "running", 0
        if executor.starts_on_submit:
            j.attempt_logged = 1
            out.job_line(j, f"{kind} running on {node_name()}")
        else:
            out.job_line(j, f"{kind} queued")
        out.write()

    def step_ended(j: _Job, outcome: StepOutcome) -> None:
        r = j.result
        r.wall_s = round(r.wall_s + outcome.wall_s, 2)
        r.node = outcome.node or r.node
        r.attempts = max(r.attempts, outcome.attempt)
        if not outcome.ok:
            end(j, "failed", outcome.reason)
            return
        r.figures.update(outcome.figures)
        j.at += 1
        if j.at < len(j.steps):
            out.job_line(j, f"{j.steps[j.at - 1]} done in {outcome.wall_s:.1f} s")
            queue.appendleft(j)  # a job under way goes before jobs not started
        else:
            end(j, "done")

    def poll_markers() -> None:
        for j in running.values():
            m = read_marker(j.folder)
            if not m or m.get("batch") != batch_id or m.get("step") != j.steps[j.at]:
                continue
            attempt = int(m.get("attempt", 1))
            if attempt > j.attempt_logged:
                j.attempt_logged = attempt
                retry = f" (attempt {attempt}: its worker died{', resuming from what it left' if m.get('resumed') else ''})" \
                    if attempt > 1 else (" (resuming from what an earlier run left)" if m.get("resumed") else "")
                out.job_line(j, f"{j.steps[j.at]} running on {m.get('node', '?')}{retry}")

    for j in plan:
        if isinstance(j.job, RenderJob) and j.job.subject is not None:
            waiting[j.job.subject].append(j)
    for j in plan:
        if not (isinstance(j.job, RenderJob) and j.job.subject is not None):
            begin(j)
    limit = executor.max_parallel
    try:
        while queue or running:
            while queue and (limit is None or len(running) < limit):
                submit(queue.popleft())
            ended = executor.wait(list(running), POLL_S)
            poll_markers()  # first, so that a step's "running" line comes before its end
            for handle, outcome in ended:
                step_ended(running.pop(handle), outcome)
    except (KeyboardInterrupt, StoppedBySignal):
        executor.close(cancel=True)
        for j in running.values():
            j.result.state, j.result.reason = "failed", "interrupted"
        out.write()
        out.close()
        raise
    out.close()
    return results
