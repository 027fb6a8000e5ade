"""Packaging: configs/, cuda/ and viewer/ stay at the repository root but install inside the package
(``gsavatar.presets``, ``gsavatar.kernel_sources``, ``gsavatar.viewer_examples``), so a wheel works
like the editable install. Builds the wheel from a copy of the sources (no build isolation: offline,
a few seconds) and runs the unpacked copy from a folder outside the repository."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SUFFIXES = (".cu", ".cpp", ".h", ".cuh")
MAPPED = {"configs": "gsavatar/presets", "cuda": "gsavatar/kernel_sources", "viewer": "gsavatar/viewer_examples"}
"""Repository folder -> where it lies in an installed package (pyproject.toml's package-dir)."""
SOURCES = ("pyproject.toml", "README.md", "gsavatar", *MAPPED)


def _kernel_sources(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file() and p.suffix in KERNEL_SUFFIXES}


def _expected_files() -> set[str]:
    """Every file of the repository that a wheel must carry, as its path inside the wheel."""
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gsavatar").rglob("*.py")
                if "__pycache__" not in p.parts}
    expected |= {f"{MAPPED['configs']}/{p.name}" for p in (ROOT / "configs").glob("*.toml")}
    expected |= {f"{MAPPED['cuda']}/{name}" for name in _kernel_sources(ROOT / "cuda")}
    expected |= {f"{MAPPED['viewer']}/{p.name}" for p in (ROOT / "viewer").glob("*.py")}
    expected |= {f"{MAPPED[d]}/__init__.py" for d in MAPPED}
    return expected


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GSAVATAR_KERNEL_SOURCES")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """A copy of the files the build reads (a copy: the build writes build/ and *.egg-info next to
    the sources, and a stale build/ could leak deleted files into the wheel)."""
    src = tmp_path_factory.mktemp("packaging") / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    return src


@pytest.fixture(scope="module")
def wheel(sources) -> Path:
    """The wheel ``pip wheel`` builds from the copied sources."""
    spec = importlib.util.find_spec("setuptools")
    if spec is None:
        pytest.skip("setuptools is not installed: no wheel can be built without build isolation "
                    "(pip install setuptools)")
    from importlib.metadata import version

    if int(version("setuptools").split(".")[0]) < 68:
        pytest.skip(f"setuptools {version('setuptools')} is older than the build's setuptools>=68")
    src, tmp = sources, sources.parent
    dist = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), "."]
    proc = subprocess.run(cmd, cwd=src, env=_clean_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheels = list(dist.glob("gsavatar-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked, as an installer lays it out in site-packages (a pure-Python wheel)."""
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


def _run_from(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Python with the unpacked wheel first on sys.path, run outside the repository. PYTHONPATH
    entries come before site-packages and the editable install's finder runs after the path
    finder, so ``gsavatar`` and its mapped subpackages resolve to the unpacked copy."""
    env = _clean_env()
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_wheel_carries_presets_kernel_sources_and_viewer_example(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_expected_files() - names)
    assert not missing, (f"missing from the wheel: {missing} (a new subpackage of gsavatar/ must be listed in "
                         "pyproject.toml's [tool.setuptools] packages; data files need a package-data pattern)")
    assert {f"{MAPPED['configs']}/cpu-tiny.toml", f"{MAPPED['cuda']}/bindings.cpp",
            f"{MAPPED['viewer']}/view_run.py"} <= names
    # Nothing of the repository's top level beyond the package: the mapped folders live inside it.
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"gsavatar"}


def test_unpacked_wheel_loads_presets_and_finds_kernel_sources(unpacked, tmp_path):
    script = textwrap.dedent("""
        import json
        import gsavatar, gsavatar.config as config, gsavatar.kernels as kernels
        cfg = config.load_preset("cpu-tiny")
        print(json.dumps({
            "package": gsavatar.__file__,
            "presets_dir": str(config.presets_dir()),
            "presets": config.available_presets(),
            "config": type(cfg).__name__,
            "source_dir": str(kernels.SOURCE_DIR),
            "source_dir_is_dir": kernels.SOURCE_DIR.is_dir(),
            "sources": sorted(p.name for p in kernels.SOURCE_DIR.iterdir()),
        }))
    """)
    proc = _run_from(unpacked, "-c", script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    site = unpacked.resolve()
    assert Path(got["package"]).resolve().is_relative_to(site), got["package"]
    assert Path(got["presets_dir"]).resolve() == site / MAPPED["configs"]
    assert got["presets"] == sorted(p.stem for p in (ROOT / "configs").glob("*.toml"))
    assert got["config"] == "TrainConfig"
    assert Path(got["source_dir"]).resolve() == site / MAPPED["cuda"] and got["source_dir_is_dir"]
    assert _kernel_sources(ROOT / "cuda") <= set(got["sources"])


def test_unpacked_wheel_runs_the_cli_and_the_viewer_example(unpacked, tmp_path):
    proc = _run_from(unpacked, "-m", "gsavatar", "train", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cpu-tiny" in proc.stdout and "--preset" in proc.stdout
    proc = _run_from(unpacked, "-m", "gsavatar.viewer_examples.view_run", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run_dir" in proc.stdout and "--port" in proc.stdout


def test_installed_package_resolves_the_mapped_folders():
    """In the environment the tests run in (the editable install: setuptools' editable finder maps
    the subpackages onto the repository's folders), the mapped packages resolve to real folders."""
    from gsavatar import config, kernels

    presets = importlib.resources.files("gsavatar.presets")
    assert (sorted(p.name for p in presets.iterdir() if p.name.endswith(".toml"))
            == sorted(p.name for p in (ROOT / "configs").glob("*.toml")))
    assert type(config.load_preset("cpu-tiny")).__name__ == "TrainConfig"
    assert importlib.resources.files("gsavatar.viewer_examples").joinpath("view_run.py").is_file()
    if "GSAVATAR_KERNEL_SOURCES" not in os.environ:
        assert kernels.SOURCE_DIR.is_dir()
        assert _kernel_sources(kernels.SOURCE_DIR) == _kernel_sources(ROOT / "cuda")


def test_checkout_on_pythonpath_without_an_install_finds_its_folders(sources, tmp_path):
    """A checkout used through PYTHONPATH with nothing installed (as bench/gpu_*.sh run): no finder
    maps the subpackages, so presets and kernel sources come from the folders beside gsavatar/.
    ``-S``: no site-packages, so the editable install's finder is not there either."""
    script = ("import json, gsavatar.config as c, gsavatar.kernels as k; c.load_preset('cpu-tiny'); "
              "print(json.dumps([str(c.presets_dir()), str(k.SOURCE_DIR)]))")
    env = _clean_env()
    env["PYTHONPATH"] = str(sources)
    proc = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    presets, source_dir = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(presets).resolve() == sources.resolve() / "configs"
    assert Path(source_dir).resolve() == sources.resolve() / "cuda"
