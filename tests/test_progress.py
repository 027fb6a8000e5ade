"""gsavatar.progress: a bar on a terminal, a few plain lines anywhere else, nothing when disabled."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from gsavatar.progress import LINE_INTERVAL_S, LINE_MIN_INTERVAL_S, progress


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_long_loop_off_a_terminal_writes_a_few_whole_lines(capsys):
    assert not sys.stderr.isatty()  # capsys: stderr is not a terminal
    for _ in progress(range(1000), desc="render", unit="frame"):
        pass
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and "\x1b" not in err
    assert 1 <= len(lines) <= 12, lines
    assert all(re.fullmatch(r"render: \d+/1000 \(\d+%\) .*", line) for line in lines), lines
    assert lines[-1].startswith("render: 1000/1000 (100%)"), lines


def test_work_done_within_the_minimum_interval_writes_only_its_last_line():
    clock, out = FakeClock(), io.StringIO()
    with progress(total=18, desc="avatar", unit="frame", file=out, clock=clock) as bar:
        for _ in range(18):
            clock.t += 0.05
            bar.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("avatar: 18/18 (100%)"), lines


def test_lines_follow_tenths_and_the_time_interval():
    clock, out = FakeClock(), io.StringIO()
    bar = progress(total=400, desc="train", unit="it", file=out, clock=clock)
    for _ in range(39):
        clock.t += 0.1
        bar.update()
    assert out.getvalue() == ""  # under a tenth, well under the interval: nothing yet
    clock.t += 0.1
    bar.update()
    line = out.getvalue().splitlines()[-1]
    assert line == "train: 40/400 (10%) 10.0 it/s, eta 36 s", line
    # Slow steps: a line each LINE_INTERVAL_S even though no new tenth is reached.
    clock.t += LINE_INTERVAL_S + 1
    bar.set_postfix(loss="0.1234")
    bar.update()
    assert out.getvalue().splitlines()[-1].startswith("train: 41/400 (10%)")
    assert out.getvalue().splitlines()[-1].endswith("[loss=0.1234]")
    assert len(out.getvalue().splitlines()) == 2
    clock.t += 1
    bar.update()  # neither a new tenth nor the interval
    assert len(out.getvalue().splitlines()) == 2
    bar.update(50)  # 92: a new tenth, but only a second after the last line
    assert len(out.getvalue().splitlines()) == 2
    clock.t += LINE_MIN_INTERVAL_S
    bar.update(50)  # 142: past 20% and 30% at once: one line
    assert len(out.getvalue().splitlines()) == 3
    bar.update()
    bar.close()
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("train: 143/400 (36%)") and ", in " in last, last  # the final line at close
    bar.close()
    assert len(out.getvalue().splitlines()) == 4


def test_no_total_only_the_interval_applies_and_absolute_counts_work():
    clock, out = FakeClock(), io.StringIO()
    with progress(desc="scan", unit="frame", file=out, clock=clock) as bar:
        for k in range(1, 500):
            bar.update_to(k)
        assert out.getvalue() == ""
        clock.t += LINE_INTERVAL_S
        bar.update_to(500)
        assert out.getvalue().splitlines() == ["scan: 500 frame 16.7 frame/s"]
    assert len(out.getvalue().splitlines()) == 1  # nothing moved since: no extra line at close


def test_a_resumed_count_is_not_in_the_rate():
    clock, out = FakeClock(), io.StringIO()
    with progress(total=100, initial=50, desc="fit", file=out, clock=clock) as bar:
        clock.t += 10
        bar.update(10)
    assert out.getvalue().splitlines()[0] == "fit: 60/100 (60%) 1.0 it/s, eta 40 s"


def test_disabled_writes_nothing(capsys):
    out = io.StringIO()
    items = list(progress(range(1000), desc="x", enabled=False, file=out))
    with progress(total=10, enabled=False, file=out) as bar:
        bar.update(10)
        bar.set_postfix(a=1)
    assert items == list(range(1000)) and out.getvalue() == "" and capsys.readouterr().err == ""
    for _ in progress(range(5), enabled=False):
        pass
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_tqdm_bar():
    term = FakeTerminal()
    with progress(total=5, desc="eval", file=term) as bar:
        for _ in range(5):
            bar.update()
    assert bar._bar is not None and "5/5" in term.getvalue()


def test_log_lines_written_through_a_bar_stay_whole_above_it():
    """A batch's state lines on the terminal that shows its bar: each on a line of its own, and the
    bar drawn again below it; without a bar, plain lines."""
    term = FakeTerminal()
    with progress(total=3, desc="batch", unit="job", file=term) as bar:
        bar.update()
        bar.write("batch [1/3] anna (train): done", file=term)
        bar.update()
    text = term.getvalue()
    assert "\rbatch [1/3] anna (train): done\n" in text  # the bar cleared (carriage return), then the line
    assert "1/3" in text.split("anna (train): done")[1]  # the bar drawn again right after the line
    plain = io.StringIO()
    with progress(total=3, file=plain, enabled=False) as quiet:
        quiet.write("a line", file=plain)
    assert plain.getvalue() == "a line\n"


def test_a_command_piped_to_a_log_gets_no_carriage_returns():
    code = ("from gsavatar.progress import progress\n"
            "for _ in progress(range(300), desc='eval', unit='frame'):\n"
            "    pass\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr and 1 <= len(p.stderr.splitlines()) <= 12, p.stderr
    assert p.stderr.splitlines()[-1].startswith("eval: 300/300 (100%)")
