"""gsavatar batch: the job file; batches that preprocess, train and render in this process and on a
local Ray instance; a failing job that fails alone; a killed worker retried and resumed; a re-run
that skips what is done."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import SHARED_DATA, tone

from gsavatar.errors import InputError, MissingDependencyError

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="the Ray tests need ray (pip install 'gsavatar[cluster]')")


def write_jobs(tmp_path, body: str):
    path = tmp_path / "jobs.toml"
    path.write_text(body)
    return path


def good_and_bad_subject_jobs(tmp_path, good: str, video, preset: str, scale: float, bad: str, bad_video: str):
    """A job file: subject ``good`` (its video, preset, iteration scale) and subject ``bad`` (a
    video that fails), each with a render ``<name>_hello`` of hello.wav (written here)."""
    from gsavatar.data.video import write_wav

    write_wav(tmp_path / "hello.wav", tone(1.0))
    return write_jobs(tmp_path, f'''output = "out"
[[subject]]
name = "{good}"
video = "{video}"
preset = "{preset}"
iterations_scale = {scale}

[[subject]]
name = "{bad}"
video = "{bad_video}"
preset = "cpu-tiny"

[[render]]
name = "{good}_hello"
subject = "{good}"
speech = ["hello.wav"]
size = 64

[[render]]
name = "{bad}_hello"
subject = "{bad}"
speech = ["hello.wav"]
''')


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
    ('output = "out"\n[[subject]]\nname = "a"\nvideo = "v.mp4"\n[resources.train]\ncpus = 0\n', "resources.train.cpus must be"),
    ('output = "out"\n[[subject]]\nname = "a"\nvideo = "v.mp4"\n[resources.train]\ndisks = 1\n', "unknown key"),
    ('output = "out"\n[[subject]]\nname = "a"\nvideo = "v.mp4"\n[resources]\nretries = 1.5\n', "retries must be a whole"),
    ('output = "out"\n[[subject]]\nname = "a"\nvideo = "v.mp4"\n[resources]\nlab = 1\n', "unknown key"),
    ('output = "out"\n[[subject]]\nname = "Anna"\nvideo = "v.mp4"\n[[render]]\nname = "anna"\nrun = "r"\nspeech = ["s.wav"]\n',
     "ignoring case"),
    ('output = "out"\n[[subject]]\nname = "a"\nvideo = "v.mp4"\n[[render]]\nname = "r"\nrun = "out/a"\nspeech = ["s.wav"]\n',
     "write subject = 'a'"),
    ('output = "out"\n[[render]]\nname = "r"\nrun = "x"\nspeech = ["one/s.wav", "two/s.m4a"]\n', "share a name"),
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
    preset = load_jobs(write_jobs(tmp_path, 'output = "out"\n[[subject]]\nname = "a"\nvideo = "v.mp4"\npreset = "p.toml"\n'))
    assert preset.subjects[0].preset == str(tmp_path / "p.toml")


def test_resources_override_only_what_the_file_names(tmp_path):
    from gsavatar.batch import BatchResources, load_jobs

    jobs = load_jobs(write_jobs(tmp_path, 'output = "out"\n[[subject]]\nname = "a"\nvideo = "v.mp4"\n'
                                          '[resources]\nretries = 0\n[resources.train]\ncpus = 4\nmemory_gb = 16\n'))
    default = BatchResources()
    assert jobs.resources.retries == 0 and jobs.resources.render == default.render
    assert (jobs.resources.train.cpus, jobs.resources.train.memory_gb, jobs.resources.train.gpus) == (4, 16, default.train.gpus)


def test_without_ray_the_batch_runs_in_process_and_says_how_to_install_it(tmp_path, monkeypatch):
    from gsavatar.batch import BatchResources, InProcessExecutor, make_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    lines = []
    assert isinstance(make_executor(tmp_path, BatchResources(), log=lines.append), InProcessExecutor)
    assert "gsavatar[cluster]" in lines[0]
    with pytest.raises(MissingDependencyError, match="--address needs Ray"):
        make_executor(tmp_path, BatchResources(), address="auto")


def test_an_output_root_that_cannot_be_written_is_one_line_before_any_work(tmp_path):
    (tmp_path / "taken").write_text("a file where the output folder should go")
    jobs = write_jobs(tmp_path, 'output = "taken/out"\n[[render]]\nname = "r"\nrun = "x"\nspeech = ["s.wav"]\n')
    r = subprocess.run([sys.executable, "-m", "gsavatar", "batch", str(jobs), "--in-process"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: cannot write the batch output")


def test_a_second_batch_on_the_same_output_is_one_line(tmp_path):
    import fcntl

    jobs = write_jobs(tmp_path, 'output = "out"\n[[render]]\nname = "r"\nrun = "x"\nspeech = ["s.wav"]\n')
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / ".batch.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = subprocess.run([sys.executable, "-m", "gsavatar", "batch", str(jobs), "--in-process"], capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 2 and "another gsavatar batch is running on" in r.stderr, r.stderr


def test_each_node_probe_writes_the_output_root_or_says_why(tmp_path):
    """The probe each node runs before a Ray batch: it writes a token the driver then reads back."""
    from gsavatar.batch.steps import probe_output

    host, path, written, error = probe_output(str(tmp_path / "out"), "token")
    assert error is None and open(path).read() == written == "token"
    (tmp_path / "file").write_text("")
    _, _, _, error = probe_output(str(tmp_path / "file" / "out"), "token")
    assert error  # a file stands where the folder should be


def test_in_process_batch_trains_renders_fails_alone_and_skips_on_rerun(demo_subject, tmp_path):
    """Two subjects (one whose video does not exist) and a render of each: the good subject trains
    and renders, the bad one and its render fail with their reasons, the command exits 1; run again,
    everything done is skipped."""
    import av

    jobs = good_and_bad_subject_jobs(tmp_path, "demo", demo_subject[0], "cpu-tiny", 0.02, "missing", "no-such-video.mp4")
    cmd = [sys.executable, "-m", "gsavatar", "batch", str(jobs), "--in-process"]
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


QUICK_PRESET = 'base = "cpu-tiny"\ncheckpoint_every = 5\n'
"""cpu-tiny with a checkpoint every 5 iterations: a worker killed early in training has one to resume from."""


def kill_worker_once_it_has_a_checkpoint(folder, batch: subprocess.Popen, timeout_s: float = 300.0) -> dict:
    """SIGKILL the process training in ``folder`` once its first checkpoint is written."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and batch.poll() is None:
        try:
            marker = json.loads((folder / ".batch-step.json").read_text())
        except (OSError, ValueError):
            marker = None
        if marker and marker["step"] == "train" and (folder / "checkpoint.pt").is_file():
            os.kill(marker["pid"], signal.SIGKILL)
            return marker
        time.sleep(0.05)
    out, err = batch.communicate(timeout=60) if batch.poll() is not None else ("", "")
    raise AssertionError(f"no training with a checkpoint in {folder} within {timeout_s:.0f} s: {out}{err}")


@needs_ray
def test_ray_batch_preprocesses_trains_renders_retries_a_killed_worker_and_skips(demo_video, tmp_path):
    """On a local Ray instance, two steps at a time: the synthetic video is preprocessed, trained
    (its worker killed mid-training: Ray runs the step again and it resumes from the checkpoint) and
    rendered; a subject whose video is not a video fails alone with its reason, and so does its render;
    run again, what is done is skipped."""
    import av

    (tmp_path / "quick.toml").write_text(QUICK_PRESET)
    (tmp_path / "broken.mp4").write_text("not a video")
    jobs = good_and_bad_subject_jobs(tmp_path, "synth", demo_video.video_path, "quick.toml", 0.1, "broken", "broken.mp4")
    cmd = [sys.executable, "-m", "gsavatar", "batch", str(jobs), "--max-parallel", "2"]
    batch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed = kill_worker_once_it_has_a_checkpoint(tmp_path / "out" / "synth", batch)
        stdout, stderr = batch.communicate(timeout=600)
    finally:
        batch.kill()
    assert batch.returncode == 1, stderr
    assert "a local Ray instance" in stdout.splitlines()[0]
    report = json.loads((tmp_path / "out" / "batch_report.json").read_text())
    states = {j["name"]: j for j in report["jobs"]}
    assert states["synth"]["state"] == "done" and states["synth"]["attempts"] == 2, stdout
    assert states["synth_hello"]["state"] == "done" and states["synth_hello"]["figures"]["frames"] == 25
    assert states["broken"]["state"] == "failed" and "broken.mp4 is not a readable video" in states["broken"]["reason"]
    assert states["broken_hello"]["reason"] == "its subject broken failed"
    assert "batch [1/4] synth (train): preprocess done" in stdout
    assert "synth (train): train running on" in stdout
    assert "(attempt 2, after its worker died or was stopped, resuming from what it left)" in stdout
    train_log = (tmp_path / "out" / "synth" / "train.log").read_text()
    assert "resuming from" in train_log and f"pid {killed['pid']}" in (tmp_path / "out" / "synth" / "batch-train.log").read_text()
    with av.open(str(tmp_path / "out" / "synth_hello" / "hello.mp4")) as c:
        assert c.streams.video[0].codec_context.width == 64 and c.streams.audio

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1
    states = {j["name"]: j["state"] for j in json.loads((tmp_path / "out" / "batch_report.json").read_text())["jobs"]}
    assert states == {"synth": "skipped", "synth_hello": "skipped", "broken": "failed", "broken_hello": "failed"}


@needs_ray
@pytest.mark.skipif(not (SHARED_DATA / "katiehill_8s.mp4").is_file(), reason="needs the shared recordings (../shared/data)")
def test_ray_batch_on_a_real_clip(tmp_path):
    """A real 8-second recording through preprocessing, training and a render, on Ray."""
    from gsavatar.data.video import write_wav

    write_wav(tmp_path / "hello.wav", tone(0.6))
    jobs = write_jobs(tmp_path, f'''output = "out"
[[subject]]
name = "katie"
video = "{SHARED_DATA / 'katiehill_8s.mp4'}"
preset = "cpu-tiny"
iterations_scale = 0.02

[[render]]
name = "katie_hello"
subject = "katie"
speech = ["hello.wav"]
size = 64
''')
    r = subprocess.run([sys.executable, "-m", "gsavatar", "batch", str(jobs)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "out" / "batch_report.json").read_text())
    assert (report["done"], report["failed"]) == (2, 0)
    katie = next(j for j in report["jobs"] if j["name"] == "katie")
    assert katie["figures"]["test_psnr"] > 10 and katie["figures"]["frames"] > 150
    assert (tmp_path / "out" / "katie_hello" / "hello.mp4").stat().st_size > 0


@needs_ray
def test_ray_batch_spreads_over_the_nodes_of_a_cluster(trained, tmp_path):
    """A two-node Ray cluster (two raylets on this machine, 1 CPU each) reached with --address: each
    node is probed first, and renders that run side by side run on both nodes. (Its GCS address:
    a ray:// client server starts a process per client within 30 s, too tight on a loaded 2-core
    machine for a test.)"""
    from ray.cluster_utils import Cluster

    from gsavatar.data.video import write_wav

    _, run_dir, _ = trained
    write_wav(tmp_path / "hello.wav", tone(2.0))
    renders = "".join(f'[[render]]\nname = "r{i}"\nrun = "{run_dir}"\nspeech = ["hello.wav"]\nsize = 64\n\n' for i in range(4))
    jobs = write_jobs(tmp_path, 'output = "out"\n' + renders)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        address = cluster.address
        r = subprocess.run([sys.executable, "-m", "gsavatar", "batch", str(jobs), "--address", address],
                           capture_output=True, text=True, timeout=600)
    finally:
        cluster.shutdown()
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"the Ray cluster at {address}: 2 node(s), 2 CPUs" in r.stdout
    report = json.loads((tmp_path / "out" / "batch_report.json").read_text())
    assert report["done"] == 4 and len({j["node"] for j in report["jobs"]}) == 2, report["jobs"]
    assert not list((tmp_path / "out").glob(".batch-probe-*"))  # each node's probe file read back and removed


def test_a_subject_hash_follows_its_settings_not_new_defaults(tmp_path):
    """An edited preset changes a subject's hash; TrainConfig growing a setting at its default does not."""
    from gsavatar.batch import load_jobs
    from gsavatar.batch.runner import _changed_settings, _key, _plan

    (tmp_path / "p.toml").write_text('base = "cpu-tiny"\n')
    jobs = load_jobs(write_jobs(tmp_path, 'output = "out"\n[[subject]]\nname = "a"\nvideo = "v"\npreset = "p.toml"\n'))
    before = _key(_plan(jobs, "cpu")[0])
    (tmp_path / "p.toml").write_text('base = "cpu-tiny"\nseed = 3\n')
    assert _key(_plan(jobs, "cpu")[0]) != before
    assert _changed_settings({"a": {"x": 1, "new": 0}, "b": 2}, {"a": {"x": 1, "new": 0}, "b": 2}) == {}
    assert _changed_settings({"a": {"x": 2, "new": 0}}, {"a": {"x": 1, "new": 0}}) == {"a": {"x": 2}}


def test_a_cluster_address_nothing_answers_at_is_one_line_at_once(tmp_path):
    """Ray would wait minutes for a head that is not there; the batch says so in a second."""
    import socket

    from gsavatar.batch.executors import _check_reachable

    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(InputError, match=f"nothing answers at 127.0.0.1:{port}"):
            _check_reachable(address)
    with pytest.raises(InputError, match="expected auto, HOST:PORT"):
        _check_reachable("head:port")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        _check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")  # something answers: no error
    _check_reachable("auto")  # Ray's own lookup
