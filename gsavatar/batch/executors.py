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
from gsavatar.batch.steps import StepOutcome, StepPreempted, StepSpec, node_name, one_line, read_marker, run_step
from gsavatar.errors import InputError, MissingDependencyError

INSTALL_HINT = "pip install 'gsavatar[cluster]'"
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
"""A local Ray instance's shared-memory object store: steps pass small specs and outcomes only
(Ray's default takes 30% of the RAM)."""
PROBE_TIMEOUT_S = 120.0
"""How long each node has to show that it can write the output root."""


CONNECT_TIMEOUT_S = 10.0
"""How long a cluster's HOST:PORT has to accept a connection (Ray itself waits minutes for a head
that is not there)."""


def _check_reachable(address: str) -> None:
    """One line now for a HOST:PORT (or ray://HOST:PORT) that nothing answers at; ``auto`` is Ray's."""
    import socket

    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if address == "auto" or not host:
        return
    if not port.isdigit():
        raise InputError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise InputError(f"cannot reach the Ray cluster at {address}: nothing answers at {hostport} "
                         f"({e.strerror or type(e).__name__})") from None


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

    def training_device(self, resources: BatchResources) -> str:
        """The device type training gets here (what ``preset = "auto"`` resolves by)."""
        from gsavatar.runtime import resolve_device

        return resolve_device("auto").type

    def close(self) -> None:
        self._pending.clear()


class RayExecutor:
    """Steps as Ray tasks that declare their CPUs, GPUs (where the cluster has any) and memory, so
    that Ray places them; a task whose worker process or node died is run again up to
    ``resources.retries`` times (the step resumes from what its folder holds)."""

    starts_on_submit = False

    def __init__(self, address: str | None, output: Path, resources: BatchResources, max_parallel: int | None = None):
        import signal

        import ray

        self._ray = ray
        self.resources = resources
        self.max_parallel = max_parallel
        self._specs: dict[Hashable, StepSpec] = {}
        address = address or os.environ.get("RAY_ADDRESS") or None
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        if address is None:  # "local": a new instance even where `ray start` runs one on this machine
            kwargs.update(address="local", object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        else:
            _check_reachable(address)
            kwargs.update(address=address)
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            what = "start a local Ray instance" if address is None else f"reach the Ray cluster at {address}"
            raise InputError(f"cannot {what}: {one_line(e)}") from None
        finally:
            # ray.init puts its own SIGTERM handler in (sys.exit); the command's, which unwinds
            # like Ctrl-C and leaves a report behind, stays.
            if sigterm is not None and signal.getsignal(signal.SIGTERM) is not sigterm:
                signal.signal(signal.SIGTERM, sigterm)
        try:
            self._remote = ray.remote(run_step)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            self._node_resources = [n.get("Resources", {}) for n in nodes]
            self.has_gpus = any(r.get("GPU", 0) > 0 for r in self._node_resources)
            cpus = sum(r.get("CPU", 0) for r in self._node_resources)
            gpus = sum(r.get("GPU", 0) for r in self._node_resources)
            where = "a local Ray instance" if address is None else f"the Ray cluster at {address}"
            self.description = (f"{where}: {len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs"
                                + (f", at most {max_parallel} steps at once" if max_parallel else ""))
            self._check_output_shared(output, nodes)
            for kind in ("preprocess", "train", "render"):
                self._check_fits(kind, getattr(resources, kind))
        except BaseException:
            ray.shutdown()
            raise

    def _demand(self, resources: StepResources) -> dict[str, float]:
        """What a step asks Ray for: GPUs only where the cluster has some."""
        need = {"CPU": resources.cpus, "memory": resources.memory_gb * 2**30}
        if self.has_gpus and resources.gpus > 0:
            need["GPU"] = resources.gpus
        return need

    def _check_fits(self, kind: str, resources: StepResources) -> None:
        """A step no node can hold would wait forever: one line now instead."""
        need = self._demand(resources)
        if not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in self._node_resources):
            text = ", ".join(f"{v / 2**30:g} GB memory" if k == "memory" else f"{v:g} {k}" + ("" if v == 1 else "s")
                             for k, v in need.items())
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
                .remote(str(output), f"{token}-{n['NodeID'][:12]}"): n for n in nodes}
        ready, late = self._ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        answers, problem = [], None
        for ref in ready:
            try:
                answers.append(self._ray.get(ref))
            except self._ray.exceptions.RayError as e:
                problem = problem or (f"node {refs[ref].get('NodeManagerAddress', '?')} cannot run gsavatar's steps "
                                      f"(is gsavatar installed there, in the same version?): {one_line(e)}")
        if late:
            names = ", ".join(refs[r].get("NodeManagerAddress", "?") for r in late)
            problem = problem or f"node(s) {names} did not answer within {PROBE_TIMEOUT_S:.0f} s (checking they can write {output})"
        for host, probe_file, written, error in answers:
            path = Path(probe_file)
            try:
                seen = path.read_text()
                path.unlink()
            except OSError:
                seen = None
            if error:
                problem = problem or (f"node {host} cannot write the batch output {output} ({error}); "
                                      f"it must be a shared filesystem mounted at the same path on every node")
            elif seen != written:
                problem = problem or (f"node {host} wrote {path} but {node_name()} does not see it: the batch output "
                                      f"must be a shared filesystem mounted at the same path on every node")
        if problem:
            raise InputError(problem)

    def training_device(self, resources: BatchResources) -> str:
        """The device type a train step gets on this cluster (what ``preset = "auto"`` resolves by)."""
        return "cuda" if self.has_gpus and resources.train.gpus > 0 else "cpu"

    def submit(self, spec: StepSpec, resources: StepResources) -> Hashable:
        need = self._demand(resources)
        spec = dataclasses.replace(spec, cpus=resources.cpus, in_worker=True)
        ref = self._remote.options(
            num_cpus=need["CPU"], num_gpus=need.get("GPU", 0.0), memory=int(need["memory"]),
            max_retries=self.resources.retries, retry_exceptions=[StepPreempted], name=f"{spec.kind}:{spec.job.name}",
        ).remote(spec)
        self._specs[ref] = spec
        return ref

    def wait(self, handles: list[Hashable], timeout_s: float) -> list[tuple[Hashable, StepOutcome]]:
        ready, _ = self._ray.wait(handles, num_returns=1, timeout=timeout_s)
        return [(ref, self._outcome(ref)) for ref in ready]

    def _outcome(self, ref) -> StepOutcome:
        errors = self._ray.exceptions
        spec = self._specs.pop(ref)
        try:
            return self._ray.get(ref)
        except errors.RayError as e:  # not the step's own error (those come back as outcomes)
            marker = read_marker(spec.folder) or {}
            if isinstance(e, (errors.WorkerCrashedError, errors.NodeDiedError, errors.OutOfMemoryError)):
                tries = self.resources.retries + 1
                reason = f"its worker died {tries} time{'s' if tries > 1 else ''} ({one_line(e)[:200]})"
            else:
                reason = one_line(e.cause if isinstance(e, errors.RayTaskError) and e.cause is not None else e)
            return StepOutcome(False, reason, {}, marker.get("node", ""), 0.0, int(marker.get("attempt", 1)),
                               bool(marker.get("resumed")))

    def close(self) -> None:
        """Disconnect (a local instance ends, and its steps with it: they resume on the next run)."""
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
    return RayExecutor(address, output, resources, max_parallel)
