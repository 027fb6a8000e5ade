"""The command line: help texts and the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from gsavatar.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_subcommand_help_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    doc_first_line = COMMANDS[command].__doc__.strip().splitlines()[0]
    assert doc_first_line.split()[0] in text and "--help" in text


def test_top_level_help_lists_every_command_of_the_contract(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("preprocess", "track", "train", "eval", "render", "view", "export", "demo"):
        assert command in COMMANDS and command in text


def test_preprocess_help_spells_the_contract(capsys):
    with pytest.raises(SystemExit):
        main(["preprocess", "--help"])
    text = capsys.readouterr().out
    assert "VIDEO" in text and "-o SUBJECT_DIR" in text and "--size" in text


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "gsavatar", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "preprocess" in result.stdout


@pytest.mark.skipif(shutil.which("gsavatar") is None, reason="package not installed (pip install -e .)")
def test_console_script_reports_errors_in_one_line(tmp_path):
    result = subprocess.run(["gsavatar", "preprocess", str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: no such file: {tmp_path / 'missing.mp4'}"]


def test_import_does_not_load_heavy_dependencies():
    code = ("import sys, gsavatar, gsavatar.cli, gsavatar.data.dataset, gsavatar.data.audio_features; "
            "heavy = [m for m in ('mediapipe', 'av', 'cv2', 'faster_whisper', 'transformers', 'viser') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
