"""Batches of jobs: avatars to train and videos to render, listed in one TOML file
(:mod:`gsavatar.batch.jobs`) and run one after another with a report (:mod:`gsavatar.batch.runner`)."""

from gsavatar.batch.jobs import BatchJobs, RenderJob, SubjectJob, load_jobs
from gsavatar.batch.runner import JobResult, run_batch

__all__ = ["BatchJobs", "JobResult", "RenderJob", "SubjectJob", "load_jobs", "run_batch"]
