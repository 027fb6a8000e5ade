"""Where a batch's steps run: as Ray tasks (a local Ray instance started for the batch, or a
cluster), or one after another in this process when Ray is not installed or not wanted.

Both take a :class:`~gsavatar.batch.steps.StepSpec` and give back a
:class:`~gsavatar.batch.steps.StepOutcome`; the driver (:mod:`gsavatar.batch.runner`) decides
what runs when. :func:`make_executor` is the one place that chooses.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from pathlib import Path
from typing import Callable, Hashable

from gsavatar.batch.jobs import BatchResources, StepResources
from gsavatar.batch.steps import StepOutcome, StepSpec, node_name, one_line, run_step
from gsavatar.errors import InputError, MissingDependencyError

INSTALL_HINT = "pip install 'gsavatar[cluster]'"
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
"""A local Ray instance's shared-memory object store: steps pass small specs and outcomes only
(Ray's default takes 30% of the RAM)."""
PROBE_TIMEOUT_S = 120.0
"""How long each node has to show that it can write the output root."""


class InProcessExecutor:
    """Each step in this process, in the order submitted, when the driver waits for it."""

    description = "in this process, one step at a time"
    max_parallel = 1
    starts_on_submit = True

    def __init__(self):
        self._pending: dict[int, StepSpec] = {}
        self._next = 0

    def submit(self, spec: StepSpec, resources: StepResources) -> Hashable:
        self._next += 1
        self._pending[self._next] = spec
        return self._next

    def wait(self, handles: list[Hashable], timeout_s: float) -> list[tuple[Hashable, StepOutcome]]:
        handle = handles[0]
        return [(handle, run_step(self._pending.pop(handle)))]

    def close(self, cancel: bool = False) -> None:
        self._pending.clear()


class RayExecutor:
    """Steps as Ray tasks that declare their CPUs, GPUs (where the cluster has any) and memory, so
    that Ray places them; a task whose worker process or node died is run again up to
    ``resources.retries`` times (the step resumes from what its folder holds)."""

    starts_on_submit = False

    def __init__(self, address: str | None, output: Path, resources: BatchResources,
                 max_parallel: int | None = None, num_cpus: int | None = None):
        import ray

        self._ray = ray
        self.resources = resources
        self.max_parallel = max_parallel
        local = address is None and not os.environ.get("RAY_ADDRESS")
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        if local:
            kwargs.update(object_store_memory=LOCAL_OBJECT_STORE_BYTES, num_cpus=num_cpus)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise InputError(f"cannot reach the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        try:
            self._remote = ray.remote(run_step)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            self._node_resources = [n.get("Resources", {}) for n in nodes]
            self.has_gpus = any(r.get("GPU", 0) > 0 for r in self._node_resources)
            cpus = sum(r.get("CPU", 0) for r in self._node_resources)
            gpus = sum(r.get("GPU", 0) for r in self._node_resources)
            where = "a local Ray instance" if local else f"the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}"
            self.description = (f"{where}: {len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs"
                                + (f", at most {max_parallel} steps at once" if max_parallel else ""))
            self._check_output_shared(output, nodes)
            for kind in ("preprocess", "train", "render"):
                self._check_fits(kind, getattr(resources, kind))
        except BaseException:
            ray.shutdown()
            raise

    def _demand(self, resources: StepResources) -> dict[str, float]:
        need = {"CPU": resources.cpus, "memory": resources.memory_gb * 2**30}
        if self.has_gpus and resources.gpus > 0:
            need["GPU"] = resources.gpus
        return need

    def _check_fits(self, kind: str, resources: StepResources) -> None:
        """A step no node can hold would wait forever: one line now instead."""
        need = self._demand(resources)
        if not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in self._node_resources):
            text = ", ".join(f"{v / 2**30:g} GB memory" if k == "memory" else f"{v:g} {k}s" for k, v in need.items())
            raise InputError(f"no node of the Ray cluster has what a {kind} step asks for ({text}); "
                             f"lower [resources.{kind}] in the job file")

    def _check_output_shared(self, output: Path, nodes: list[dict]) -> None:
        """Every node must write the output root, and what it writes must be what this machine
        reads there: one shared filesystem mounted at the same path everywhere."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from gsavatar.batch.steps import probe_output

        probe = self._ray.remote(probe_output)
        token = uuid.uuid4().hex[:12]
        refs = {probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(output), token): n for n in nodes}
        ready, late = self._ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        if late:
            names = ", ".join(refs[r].get("NodeManagerAddress", "?") for r in late)
            raise InputError(f"node(s) {names} did not answer within {PROBE_TIMEOUT_S:.0f} s (checking they can write {output})")
        for ref in ready:
            host, probe_file, error = self._ray.get(ref)
            if error:
                raise InputError(f"node {host} cannot write the batch output {output} ({error}); "
                                 f"it must be a shared filesystem mounted at the same path on every node")
            path = Path(probe_file)
            try:
                seen = path.read_text()
                path.unlink()
            except OSError:
                seen = None
            if seen != token:
                raise InputError(f"node {host} wrote {path} but {node_name()} does not see it: the batch output "
                                 f"must be a shared filesystem mounted at the same path on every node")

    def submit(self, spec: StepSpec, resources: StepResources) -> Hashable:
        gpus = resources.gpus if self.has_gpus else 0.0
        spec = dataclasses.replace(spec, cpus=resources.cpus, in_worker=True)
        return self._remote.options(
            num_cpus=resources.cpus, num_gpus=gpus, memory=int(resources.memory_gb * 2**30),
            max_retries=self.resources.retries, retry_exceptions=False, name=f"{spec.kind}:{spec.job.name}",
        ).remote(spec)

    def wait(self, handles: list[Hashable], timeout_s: float) -> list[tuple[Hashable, StepOutcome]]:
        ready, _ = self._ray.wait(handles, num_returns=1, timeout=timeout_s)
        out = []
        for ref in ready:
            try:
                outcome = self._ray.get(ref)
            except self._ray.exceptions.RayTaskError as e:  # raised past run_step: not a step's own error
                outcome = StepOutcome(False, one_line(e.cause if e.cause is not None else e), {}, "", 0.0, 1, False)
            except self._ray.exceptions.RayError as e:  # its worker process or node died, retries included
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                tries = self.resources.retries + 1
                outcome = StepOutcome(False, f"its worker died {tries} time{'s' if tries > 1 else ''} "
                                      f"({type(e).__name__}: {first[:200]})", {}, "", 0.0, tries, False)
            out.append((ref, outcome))
        return out

    def close(self, cancel: bool = False) -> None:
        self._ray.shutdown()


def make_executor(output: Path, resources: BatchResources, address: str | None = None, in_process: bool = False,
                  max_parallel: int | None = None, log: Callable[[str], None] = print):
    """Ray when it is installed (a local instance, or the cluster at ``address``), else this process."""
    if in_process:
        if address:
            raise InputError("--address sends the jobs to a Ray cluster; it cannot go with --in-process")
        if max_parallel and max_parallel > 1:
            log("batch: --in-process runs one step at a time; --max-parallel is for Ray")
        return InProcessExecutor()
    try:
        import ray  # noqa: F401
    except ImportError:
        if address:
            raise MissingDependencyError(f"--address needs Ray: {INSTALL_HINT}") from None
        log(f"batch: Ray is not installed, so the jobs run one after another in this process ({INSTALL_HINT} "
            "runs them in parallel, here or on a cluster)")
        return InProcessExecutor()
    return RayExecutor(None if address in (None, "") else address, output, resources, max_parallel)
