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
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Callable, Hashable

from gsavatar.batch.jobs import BatchJobs, RenderJob, SubjectJob
from gsavatar.batch.steps import StepOutcome, StepSpec, job_hash, node_name, one_line, probe_output, read_marker, train_config, up_to_date
from gsavatar.data.io import atomic_write_json
from gsavatar.errors import GsavatarError, InputError
from gsavatar.files import exclusive_lock

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
    resumed: bool = False
    """A step went on from what an interrupted run (or a killed worker) left in the job's folder."""
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
    """One line when the output root cannot be written from here (before any work starts)."""
    _, probe, _, error = probe_output(str(root), f"driver-{os.getpid()}")
    if error:
        raise InputError(f"cannot write the batch output {root} from {node_name()} ({error})")
    Path(probe).unlink(missing_ok=True)


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
            retried = (f", attempt {r.attempts}" if r.attempts > 1 else "") + (", resumed" if r.resumed else "")
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


def _plan(jobs: BatchJobs, training_device: str) -> list[_Job]:
    """Each job's steps; ``preset = "auto"`` resolved once, here, for the device training gets."""
    from gsavatar.config import auto_preset

    plan: list[_Job] = []
    for job in jobs.subjects:
        if job.preset == "auto":
            job = dataclasses.replace(job, preset=auto_preset(training_device))
        steps = ("preprocess", "train") if job.video.is_file() else ("train",)
        plan.append(_Job(job, len(plan) + 1, JobResult(job.name, "train"), jobs.output / job.name, steps))
    for job in jobs.renders:
        run_dir = job.run if job.run is not None else jobs.output / job.subject
        plan.append(_Job(job, len(plan) + 1, JobResult(job.name, "render"), jobs.output / job.name, ("render",), run_dir))
    return plan


def _changed_settings(values: dict, defaults: dict) -> dict:
    """The settings of ``values`` that differ from ``defaults`` (nested tables compared key by key)."""
    out = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            inner = _changed_settings(value, default)
            if inner:
                out[key] = inner
        elif value != default:
            out[key] = value
    return out


def _key(j: _Job) -> str:
    """The job's hash; a subject's includes the training settings that differ from TrainConfig's
    defaults (an edited preset file trains again, a setting added to gsavatar at its default does
    not make finished jobs train again)."""
    from gsavatar.config import TrainConfig

    if isinstance(j.job, SubjectJob):
        settings = _changed_settings(dataclasses.asdict(train_config(j.job)), dataclasses.asdict(TrainConfig()))
        return job_hash(j.job, extra=json.dumps(settings, sort_keys=True, default=str))
    return job_hash(j.job, j.run_dir)


def run_batch(jobs: BatchJobs, executor=None, log: Callable[[str], None] | None = print,
              jobs_file: Path | None = None) -> list[JobResult]:
    """Run every job of ``jobs`` on ``executor`` (default: in this process; the caller closes it);
    returns the results (also in ``OUTPUT/batch_report.json``). ``log`` receives each state line;
    None prints them above a progress bar on a terminal."""
    from gsavatar.batch.executors import InProcessExecutor

    check_writable(jobs.output)
    executor = executor or InProcessExecutor()
    # One driver per output root (two would run the same steps side by side).
    with exclusive_lock(jobs.output / ".batch.lock", f"another gsavatar batch is running on {jobs.output}; "
                                                     f"wait for it to finish"):
        return _Driver(jobs, executor, log, jobs_file).run()


class _Driver:
    """Puts each job's next step on the executor as soon as it may run (a render once its subject
    is trained), at most ``executor.max_parallel`` at once, and turns what comes back into state
    lines and the report."""

    def __init__(self, jobs: BatchJobs, executor, log, jobs_file):
        self.jobs, self.executor = jobs, executor
        self.plan = _plan(jobs, executor.training_device(jobs.resources))
        self.reporter = _Reporter(jobs, [j.result for j in self.plan], log, jobs_file, executor.description)
        self.waiting: dict[str, list[_Job]] = collections.defaultdict(list)  # renders by the subject they draw
        self.queue: collections.deque[_Job] = collections.deque()
        self.running: dict[Hashable, _Job] = {}
        self.batch_id = uuid.uuid4().hex[:12]

    def run(self) -> list[JobResult]:
        report = self.reporter
        report.line(f"batch: {len(self.plan)} jobs on {self.executor.description}")
        report.write()
        try:
            for j in self.plan:
                if isinstance(j.job, RenderJob) and j.job.subject is not None:
                    self.waiting[j.job.subject].append(j)
            for j in self.plan:
                if not (isinstance(j.job, RenderJob) and j.job.subject is not None):
                    self.start_job(j)
            limit = self.executor.max_parallel
            while self.queue or self.running:
                while self.queue and (limit is None or len(self.running) < limit):
                    self.submit(self.queue.popleft())
                ended = self.executor.wait(list(self.running), POLL_S)
                self.poll_markers()  # first, so that a step's "running" line comes before its end
                for handle, outcome in ended:
                    self.step_ended(self.running.pop(handle), outcome)
        except BaseException:
            for j in self.plan:  # stopped (Ctrl-C, SIGTERM, an error of the driver): say where each job was
                if j.result.state in ("running", "pending"):
                    j.result.reason = "interrupted" if j.result.state == "running" else "not started (the batch was stopped)"
                    j.result.state = "failed"
            raise
        finally:
            report.write()
            report.close()
        return report.results

    def finish_job(self, j: _Job, state: str, reason: str | None = None) -> None:
        j.result.state, j.result.reason = state, reason
        self.reporter.finished(j)
        if isinstance(j.job, SubjectJob):
            for render in self.waiting.pop(j.job.name, []):
                if state == "failed":
                    render.result.node = node_name()
                    self.finish_job(render, "failed", f"its subject {j.job.name} failed")
                else:
                    self.start_job(render)

    def start_job(self, j: _Job) -> None:
        try:
            j.key = _key(j)
        except GsavatarError as e:  # a preset that does not load: this job fails, the others go on
            self.finish_job(j, "failed", one_line(e))
            return
        if up_to_date(j.job, j.folder, j.key):
            self.finish_job(j, "skipped", "up to date")
        else:
            self.queue.append(j)

    def submit(self, j: _Job) -> None:
        kind = j.steps[j.at]
        spec = StepSpec(j.job, kind, j.folder, j.key, first=j.at == 0, final=j.at == len(j.steps) - 1,
                        batch_id=self.batch_id, run_dir=j.run_dir)
        self.running[self.executor.submit(spec, getattr(self.jobs.resources, kind))] = j
        j.result.state, j.attempt_logged = "running", 0
        if self.executor.starts_on_submit:
            j.attempt_logged = 1
            self.reporter.job_line(j, f"{kind} running on {node_name()}")
        else:
            self.reporter.job_line(j, f"{kind} queued")
        self.reporter.write()

    def step_ended(self, j: _Job, outcome: StepOutcome) -> None:
        r = j.result
        r.wall_s = round(r.wall_s + outcome.wall_s, 2)
        r.node = outcome.node or r.node
        r.attempts = max(r.attempts, outcome.attempt)
        r.resumed = r.resumed or outcome.resumed
        if not outcome.ok:
            self.finish_job(j, "failed", outcome.reason)
            return
        r.figures.update(outcome.figures)
        j.at += 1
        if j.at < len(j.steps):
            self.reporter.job_line(j, f"{j.steps[j.at - 1]} done in {outcome.wall_s:.1f} s")
            self.queue.appendleft(j)  # a job under way goes before jobs not started
        else:
            self.finish_job(j, "done")

    def poll_markers(self) -> None:
        """A step that started, or started again after its worker died, says so (Ray only: in
        this process a step starts when submitted)."""
        for j in self.running.values():
            m = read_marker(j.folder)
            if not m or m.get("batch") != self.batch_id or m.get("step") != j.steps[j.at]:
                continue
            attempt = int(m.get("attempt", 1))
            if attempt > j.attempt_logged:
                j.attempt_logged = attempt
                resumes = ", resuming from what it left" if m.get("resumed") else ""
                note = (f" (attempt {attempt}, after its worker died or was stopped{resumes})" if attempt > 1
                        else " (resuming from what an earlier run left)" if resumes else "")
                self.reporter.job_line(j, f"{j.steps[j.at]} running on {m.get('node', '?')}{note}")
