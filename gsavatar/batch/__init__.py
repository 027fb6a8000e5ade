"""Batches of jobs: avatars to train and videos to render, listed in one TOML file
(:mod:`gsavatar.batch.jobs`), split into steps (:mod:`gsavatar.batch.steps`) that run on Ray or in
this process (:mod:`gsavatar.batch.executors`), driven with a report (:mod:`gsavatar.batch.runner`)."""

from gsavatar.batch.executors import InProcessExecutor, RayExecutor, make_executor
from gsavatar.batch.jobs import BatchJobs, BatchResources, RenderJob, StepResources, SubjectJob, load_jobs
from gsavatar.batch.runner import JobResult, run_batch

__all__ = ["BatchJobs", "BatchResources", "InProcessExecutor", "JobResult", "RayExecutor", "RenderJob", "StepResources",
           "SubjectJob", "load_jobs", "make_executor", "run_batch"]
