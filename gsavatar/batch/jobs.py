"""The batch job file (TOML): subjects to preprocess and train, renders to produce.

    output = "batch_out"              # one folder per job under it, and batch_report.json

    [[subject]]
    name = "anna"                     # letters, digits, - and _; the job's folder
    video = "anna.mp4"                # a talking-head video, or a subject dataset directory
    preset = "cpu-30min"              # optional: auto, cpu-tiny, cpu-30min, ..., a .toml path
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
class BatchJobs:
    output: Path
    subjects: tuple[SubjectJob, ...]
    renders: tuple[RenderJob, ...]


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
    unknown = set(data) - {"output", "subject", "render"}
    if unknown:
        raise InputError(f"{path.name}: unknown key(s) {', '.join(sorted(unknown))} (known: output, subject, render)")
    output = _path(base, data.get("output"), f"{path.name}: output")
    subjects = tuple(_entry(SubjectJob, raw, f"subject {i + 1}", base, ("video",))
                     for i, raw in enumerate(data.get("subject", [])))
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
    names = [j.name for j in (*subjects, *renders)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"{path.name}: job names must differ (repeated: {', '.join(repeated)})")
    known = {s.name for s in subjects}
    for r in renders:
        if (r.subject is None) == (r.run is None):
            raise InputError(f"render {r.name}: give either subject (a subject of this file) or run (a trained run)")
        if r.subject is not None and r.subject not in known:
            raise InputError(f"render {r.name}: no subject named {r.subject!r} in {path.name}")
    if not names:
        raise InputError(f"{path.name} lists no [[subject]] or [[render]] jobs")
    return BatchJobs(output, subjects, tuple(renders))
