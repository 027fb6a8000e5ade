"""Progress of long commands: a live bar on a terminal, plain log lines anywhere else.

    from gsavatar.progress import progress

    for frame in progress(frames, desc="render", unit="frame"):
        ...
    with progress(total=n, desc="train") as bar:
        ...
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update()

Where the stream (stderr by default) is a terminal, a tqdm bar redraws itself in place.
Anywhere else (a pipe, a log file, CI) carriage-return redraws would only fill the log, so
the reporter writes whole lines instead, such as::

    render: 40/400 (10%) 12.3 frame/s, eta 29 s [loss=0.0123]

one each time another tenth of the total is done (at least :data:`LINE_MIN_INTERVAL_S` after
the previous line) or :data:`LINE_INTERVAL_S` seconds have passed since the last line, whichever
comes first, and a last line when the work ends
(``... (100%) 12.3 frame/s, in 32 s``). Without a known total only the time interval applies.
``enabled=False`` makes a reporter that does nothing.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import IO, Callable, Iterable, Iterator

LINE_INTERVAL_S = 30.0
"""Off a terminal: longest time between two lines while work advances."""
LINE_FRACTION = 0.1
"""Off a terminal: a line each time this fraction of the total is done..."""
LINE_MIN_INTERVAL_S = 2.0
"""...but not sooner than this after the last line (work that takes a second or two gets its last line only)."""


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # a closed or unusual stream
        return False


def _duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 100:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _rate(per_s: float, unit: str) -> str:
    if per_s >= 1 or per_s == 0:
        return f"{per_s:.1f} {unit}/s" if per_s < 100 else f"{per_s:.0f} {unit}/s"
    return f"{1 / per_s:.1f} s/{unit}"


class Progress:
    """The object :func:`progress` returns: ``update(n)``, ``update_to(n)``, ``set_postfix(**kw)``,
    ``close()``; iterating over it yields the wrapped iterable's items and counts each one; as a
    context manager it closes on exit. ``n`` is the count done so far."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, leave: bool = True, initial: int = 0, file: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable = iterable
        self.total = None if total is None else int(total)
        self.desc = desc.strip()
        self.unit = unit
        self.n = int(initial)
        self.enabled = bool(enabled)
        self.closed = False
        self._file = file if file is not None else sys.stderr
        self._clock = clock
        self._postfix: dict = {}
        self._lock = threading.Lock()
        self._bar = None
        self._start_n = self.n
        self._start = self._last_time = clock()
        self._last_n = self.n  # count at the last line written (lines mode)
        if self.enabled and _is_terminal(self._file):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, leave=leave, file=self._file,
                             dynamic_ncols=True)

    # -- counting ---------------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        """``n`` more steps are done."""
        self.update_to(self.n + n)

    def update_to(self, done: int) -> None:
        """``done`` steps are done in all (for callers that report an absolute count)."""
        if not self.enabled or self.closed:
            self.n = int(done)
            return
        with self._lock:
            step, self.n = int(done) - self.n, int(done)
            if self._bar is not None:
                self._bar.update(step)
            elif self._due():
                self._line()

    def set_postfix(self, **values) -> None:
        """Values shown after the count (a loss, a PSNR...): on the bar, or in brackets on the next line."""
        if not self.enabled or self.closed:
            return
        self._postfix = {k: v for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)

    def close(self) -> None:
        """End the report: the bar is closed; off a terminal a last line is written if the count
        moved since the previous one. Closing twice does nothing."""
        if self.closed:
            return
        self.closed = True
        if not self.enabled:
            return
        with self._lock:
            if self._bar is not None:
                self._bar.close()
            elif self.n != self._last_n:
                self._line(final=True)

    def write(self, text: str, file: IO[str] | None = None) -> None:
        """A log line (on ``file``, default stdout) that leaves the bar whole below it."""
        file = file if file is not None else sys.stdout
        if self._bar is not None and not self.closed:
            from tqdm import tqdm

            tqdm.write(text, file=file)
        else:
            print(text, file=file, flush=True)

    # -- lines mode -------------------------------------------------------------------------------
    def _due(self) -> bool:
        if self.n == self._last_n:
            return False
        if self._clock() - self._last_time >= LINE_INTERVAL_S:
            return True
        if self.total and self._clock() - self._last_time >= LINE_MIN_INTERVAL_S:
            tenth = lambda k: math.floor(k / (self.total * LINE_FRACTION) + 1e-9)  # noqa: E731
            return tenth(self.n) > tenth(self._last_n) or self.n >= self.total
        return False

    def format_line(self, final: bool = False) -> str:
        """The line describing the current state (what lines mode writes)."""
        now = self._clock()
        elapsed = now - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            text = f"{head}{self.n}/{self.total} ({100 * self.n / self.total:.0f}%) {_rate(rate, self.unit)}"
        else:
            text = f"{head}{self.n} {self.unit} {_rate(rate, self.unit)}"
        if final or (self.total and self.n >= self.total):
            text += f", in {_duration(elapsed)}"
        elif self.total and rate > 0:
            text += f", eta {_duration((self.total - self.n) / rate)}"
        if self._postfix:
            text += " [" + ", ".join(f"{k}={v}" for k, v in self._postfix.items()) + "]"
        return text

    def _line(self, final: bool = False) -> None:
        try:
            print(self.format_line(final), file=self._file, flush=True)
        except (OSError, ValueError):  # a closed pipe must not stop the work
            pass
        self._last_n, self._last_time = self.n, self._clock()

    # -- protocol ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("progress(...) without an iterable cannot be iterated over")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("this progress has no total")
        return self.total

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, leave: bool = True, *, initial: int = 0, file: IO[str] | None = None,
             clock: Callable[[], float] = time.monotonic) -> Progress:
    """Report the progress of ``iterable`` (iterate over the result), or of ``total`` steps counted
    with ``update()``: a tqdm bar when ``file`` (default: stderr) is a terminal, plain lines
    otherwise (see the module's doc), nothing when ``enabled`` is false.

    ``total`` defaults to ``len(iterable)`` where there is one; ``initial`` is a count already done
    (a resumed run: it is not counted in the rate); ``leave=False`` clears the bar when it closes
    (lines already written stay); ``clock`` is the time source of lines mode (for tests).
    """
    return Progress(iterable, total, desc, unit, enabled, leave, initial, file, clock)


__all__ = ["LINE_FRACTION", "LINE_INTERVAL_S", "Progress", "progress"]
