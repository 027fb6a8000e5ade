"""gsavatar batch: the job file, a batch that trains and renders, a failing job that fails alone,
and a re-run that skips what is done."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import tone

from gsavatar.errors import InputError


def write_jobs(tmp_path, body: str):
    path = tmp_path / "jobs.toml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("body, error", [
    ('output = "out"\n', "lists no"),
    ('output = "out"\n[[subject]]\nname = "a b"\nvideo = "v.mp4"\n', "name must be"),
    ('output = "out"\n[[subject]]\nname = "a"\nvideo = "v.mp4"\ncolour = 1\n', "unknown key"),
    ('output = "out"\n[[subject]]\nname = "a"\nvideo = "v.mp4"\n[[render]]\nname = "a"\nsubject = "a"\nspeech = ["s.wav"]\n',
     "must differ"),
    ('output = "out"\n[[render]]\nname = "r"\nsubject = "nobody"\nspeech = ["s.wav"]\n', "no subject named"),
    ('output = "out"\n[[render]]\nname = "r"\nspeech = ["s.wav"]\n', "either subject"),
    ('output = "out"\n[[render]]\nname = "r"\nrun = "x"\nspeech = []\n', "speech must be"),
    ("output = [\n", "not valid TOML"),
    ('output = "out"\n[[subject]]\nname = "a"\nvideo = "v.mp4"\niterations_scale = 0\n', "iterations_scale must be"),
])
def test_bad_job_files_are_one_line_errors(tmp_path, body, error):
    from gsavatar.batch import load_jobs

    with pytest.raises(InputError, match=error):
        load_jobs(write_jobs(tmp_path, body))


def test_relative_paths_are_taken_from_the_job_file(tmp_path):
    from gsavatar.batch import load_jobs

    jobs = load_jobs(write_jobs(tmp_path, 'output = "out"\n[[subject]]\nname = "a"\nvideo = "v.mp4"\n'
                                          '[[render]]\nname = "r"\nsubject = "a"\nspeech = "s.wav"\n'))
    assert jobs.output == tmp_path / "out" and jobs.subjects[0].video == tmp_path / "v.mp4"
    assert jobs.renders[0].speech == (tmp_path / "s.wav",)


def test_batch_trains_renders_fails_alone_and_skips_on_rerun(demo_subject, tmp_path):
    """Two subjects (one whose video does not exist) and a render of each: the good subject trains
    and renders, the bad one and its render fail with their reasons, the command exits 1; run again,
    everything done is skipped."""
    import av

    from gsavatar.data.video import write_wav

    write_wav(tmp_path / "hello.wav", tone(1.0))
    jobs = write_jobs(tmp_path, f'''output = "out"
[[subject]]
name = "demo"
video = "{demo_subject[0]}"
preset = "cpu-tiny"
iterations_scale = 0.02

[[subject]]
name = "missing"
video = "no-such-video.mp4"
preset = "cpu-tiny"

[[render]]
name = "demo_hello"
subject = "demo"
speech = ["hello.wav"]
size = 64

[[render]]
name = "missing_hello"
subject = "missing"
speech = ["hello.wav"]
''')
    cmd = [sys.executable, "-m", "gsavatar", "batch", str(jobs)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 1, first.stderr
    assert first.stderr.strip().splitlines()[-1].startswith("error: 2 of 4 jobs failed")  # after the progress lines
    report = json.loads((tmp_path / "out" / "batch_report.json").read_text())
    states = {j["name"]: (j["state"], j["reason"]) for j in report["jobs"]}
    assert states["demo"] == ("done", None) and states["demo_hello"] == ("done", None)
    assert states["missing"][0] == "failed" and "no-such-video.mp4" in states["missing"][1]
    assert states["missing_hello"] == ("failed", "its subject missing failed")
    assert (report["done"], report["failed"]) == (2, 2)
    assert "test_psnr" in next(j for j in report["jobs"] if j["name"] == "demo")["figures"]
    with av.open(str(tmp_path / "out" / "demo_hello" / "hello.mp4")) as c:
        assert c.streams.video[0].codec_context.width == 64 and c.streams.audio
    assert "batch [3/4] demo_hello (render): done" in first.stdout

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1
    report = json.loads((tmp_path / "out" / "batch_report.json").read_text())
    states = {j["name"]: j["state"] for j in report["jobs"]}
    assert states == {"demo": "skipped", "demo_hello": "skipped", "missing": "failed", "missing_hello": "failed"}
    assert "demo (train): skipped, up to date" in again.stdout

    # An edited subject entry trains again from scratch, and its render, now of another avatar, is made again.
    jobs.write_text(jobs.read_text().replace("iterations_scale = 0.02", "iterations_scale = 0.03"))
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    states = {j["name"]: j["state"] for j in json.loads((tmp_path / "out" / "batch_report.json").read_text())["jobs"]}
    assert third.returncode == 1 and states["demo"] == "done" and states["demo_hello"] == "done", third.stdout
