"""The batch job file (TOML): subjects to preprocess and train, renders to produce.

    output = "batch_out"              # one folder per job under it, and batch_report.json

    [[subject]]
    name = "anna"                     # letters, digits, - and _; the job's folder
    video = "anna.mp4"                # a talking-head video, or a subject dataset directory
    preset = "cpu-30min"              # optional: auto, cpu-tiny, cpu-30min, ..., a .toml file
    iterations_scale = 1.0            # optional
    seed = 0                          # optional

    [[render]]
    name = "anna_news"
    subject = "anna"                  # a subject of this file (waits for its training) ...
    # run = "runs/anna"               # ... or a run trained before
    speech = ["news.wav", "hello.m4a"]  # one mp4 per speech file
    camera = "train"                  # optional: train, orbit, zoom or a keyframe JSON
    size = 512                        # optional
    background = "studio.png"         # optional

    [resources]                       # optional
    retries = 2                       # a step whose worker died runs again at most this often
    [resources.train]                 # per step (preprocess, train, render): what it asks Ray
    cpus = 1                          # for; the defaults are in BatchResources
    gpus = 1                          # asked for only where the cluster has GPUs
    memory_gb = 4

Relative paths are taken from the job file's folder. Every mistake is a one-line InputError
naming the entry and the key.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from gsavatar.errors import InputError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class SubjectJob:
    """Preprocess (when given a video) and train one avatar into ``OUTPUT/name``."""

    name: str
    video: Path
    preset: str = "auto"
    iterations_scale: float = 1.0
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class RenderJob:
    """Render one mp4 per speech file into ``OUTPUT/name``."""

    name: str
    speech: tuple[Path, ...]
    subject: str | None = None
    run: Path | None = None
    camera: str = "train"
    size: int | None = None
    background: Path | None = None


@dataclasses.dataclass(frozen=True)
class StepResources:
    """What one step asks the cluster for, so that Ray places it on a node that has it (Ray counts
    these; it does not enforce them: a step declared with 1 CPU runs torch on 1 thread)."""

    cpus: float = 1.0
    gpus: float = 0.0
    """GPUs per step, asked for only where the cluster has GPUs (elsewhere the step runs on CPU)."""
    memory_gb: float = 2.0


@dataclasses.dataclass(frozen=True)
class BatchResources:
    """Per-step resources and the retry bound. The defaults: preprocessing is CPU work (video
    decoding, landmarks); the CPU presets train on one thread; training and rendering take a whole
    GPU where there is one."""

    preprocess: StepResources = StepResources(cpus=1.0, gpus=0.0, memory_gb=2.0)
    train: StepResources = StepResources(cpus=1.0, gpus=1.0, memory_gb=4.0)
    render: StepResources = StepResources(cpus=1.0, gpus=1.0, memory_gb=2.0)
    retries: int = 2
    """How many times a step whose worker process (or node) died, or that SIGTERM stopped (a node
    drained), is run again; an error in the step itself (a bad input) is not retried."""


@dataclasses.dataclass(frozen=True)
class BatchJobs:
    output: Path
    subjects: tuple[SubjectJob, ...]
    renders: tuple[RenderJob, ...]
    resources: BatchResources = BatchResources()


def _number(value, where: str, low: float, high: float, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not low <= value <= high:
        kind = "a whole number" if integer else "a number"
        raise InputError(f"{where} must be {kind} in [{low:g}, {high:g}] (got {value!r})")
    return value


def _resources(raw, name: str) -> BatchResources:
    if raw is None:
        return BatchResources()
    if not isinstance(raw, dict):
        raise InputError(f"{name}: resources must be a table")
    steps = {f.name for f in dataclasses.fields(BatchResources)} - {"retries"}
    unknown = set(raw) - steps - {"retries"}
    if unknown:
        raise InputError(f"{name}: unknown key(s) in resources: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(steps))}, retries)")
    out = BatchResources()
    if "retries" in raw:
        out = dataclasses.replace(out, retries=_number(raw["retries"], f"{name}: resources.retries", 0, 10, integer=True))
    for step in sorted(steps & set(raw)):
        table = raw[step]
        where = f"{name}: resources.{step}"
        if not isinstance(table, dict):
            raise InputError(f"{where} must be a table (cpus, gpus, memory_gb)")
        bad = set(table) - {"cpus", "gpus", "memory_gb"}
        if bad:
            raise InputError(f"{where}: unknown key(s) {', '.join(sorted(bad))} (known: cpus, gpus, memory_gb)")
        current = getattr(out, step)
        values = {k: float(_number(v, f"{where}.{k}", 0 if k == "gpus" else 0.01, 1024)) for k, v in table.items()}
        out = dataclasses.replace(out, **{step: dataclasses.replace(current, **values)})
    return out


def _path(base: Path, value, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise InputError(f"{where} must be a path (a non-empty string)")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _entry(cls, raw, where: str, base: Path, paths: tuple[str, ...]):
    if not isinstance(raw, dict):
        raise InputError(f"{where} must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(fields)})")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise InputError(f"{where}: name must be letters, digits, - and _ (got {name!r})")
    values = dict(raw)
    for key in paths:
        if key in values:
            values[key] = _path(base, values[key], f"{where} ({name}) {key}")
    try:
        return cls(**values)
    except TypeError as e:
        raise InputError(f"{where} ({name}): {e}") from None


def load_jobs(path: str | Path) -> BatchJobs:
    """Read and check a job file (see the module docstring)."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such job file: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path.name} is not valid TOML: {e}") from None
    base = path.resolve().parent
    unknown = set(data) - {"output", "subject", "render", "resources"}
    if unknown:
        raise InputError(f"{path.name}: unknown key(s) {', '.join(sorted(unknown))} (known: output, subject, render, resources)")
    output = _path(base, data.get("output"), f"{path.name}: output")
    subjects = tuple(_entry(SubjectJob, raw, f"subject {i + 1}", base, ("video",))
                     for i, raw in enumerate(data.get("subject", [])))
    # A preset given as a file is found from the job file's folder too, whichever node reads it.
    subjects = tuple(dataclasses.replace(j, preset=str(_path(base, j.preset, f"subject {j.name} preset")))
                     if isinstance(j.preset, str) and j.preset.endswith(".toml") else j for j in subjects)
    renders = []
    for i, raw in enumerate(data.get("render", [])):
        if isinstance(raw, dict) and isinstance(raw.get("speech"), str):
            raw = dict(raw, speech=[raw["speech"]])
        speech = raw.get("speech") if isinstance(raw, dict) else None
        if not isinstance(speech, list) or not speech:
            raise InputError(f"render {i + 1}: speech must be a list of audio files")
        job = _entry(RenderJob, dict(raw, speech="-"), f"render {i + 1}", base, ("run", "background"))
        renders.append(dataclasses.replace(job, speech=tuple(_path(base, s, f"render {i + 1} ({job.name}) speech")
                                                               for s in speech)))
    for j in subjects:
        k = j.iterations_scale
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 100:
            raise InputError(f"subject {j.name}: iterations_scale must be a number in (0, 100] (got {k!r})")
    resources = _resources(data.get("resources"), path.name)
    names = [j.name.casefold() for j in (*subjects, *renders)]  # folders: one name on a case-blind filesystem
    repeated = sorted({j.name for j in (*subjects, *renders) if names.count(j.name.casefold()) > 1})
    if repeated:
        raise InputError(f"{path.name}: job names must differ, ignoring case (repeated: {', '.join(repeated)})")
    known = {s.name for s in subjects}
    trained_here = {(output / s.name).resolve(): s.name for s in subjects}
    for r in renders:
        if (r.subject is None) == (r.run is None):
            raise InputError(f"render {r.name}: give either subject (a subject of this file) or run (a trained run)")
        if r.subject is not None and r.subject not in known:
            raise InputError(f"render {r.name}: no subject named {r.subject!r} in {path.name}")
        if r.run is not None and r.run.resolve() in trained_here:
            raise InputError(f"render {r.name}: run is the folder of subject {trained_here[r.run.resolve()]} of this "
                             f"file; write subject = {trained_here[r.run.resolve()]!r} so that it waits for the training")
        stems = [p.stem for p in r.speech]
        shared = sorted({s for s in stems if stems.count(s) > 1})
        if shared:
            raise InputError(f"render {r.name}: speech files share a name ({', '.join(shared)}); each gives "
                             f"OUTPUT/{r.name}/<name>.mp4, so rename one or put it in another render")
    if not names:
        raise InputError(f"{path.name} lists no [[subject]] or [[render]] jobs")
    return BatchJobs(output, subjects, tuple(renders), resources)
