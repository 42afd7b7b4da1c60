"""Progress of a long loop that a person can watch: done / total, rate, time left.

:class:`ProgressMeter` counts items (images) and reports to a ``log`` callable (a Dagster step's
``context.log.info``; a plain ``print``) at most once per ``every_s`` seconds, on crossing each
``every_fraction`` of the total, and once at the end, so a run log shows a handful of lines, not
one per batch. The rate is the average since the first item was counted; the time left assumes it holds.

A console bar is shown only where a command asked for one: ``nfhm demo`` runs the catalog inside
:func:`console_progress`, and a stage asks :func:`console_bar` for a bar (a tqdm bar on a terminal,
throttled lines like the log's on a pipe or file). Runs started from the Dagster UI or a schedule
have no console: their progress is the log lines.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
from typing import Callable, Iterator, Protocol, TextIO


class Bar(Protocol):
    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


def format_duration(seconds: float | None) -> str:
    """``m:ss`` under an hour, ``h:mm:ss`` from one hour on; ``?`` when unknown (None, nan, inf)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressMeter:
    """Counts ``total`` items under ``label``; see the module docstring for when it reports.

    ``clock`` (seconds, monotonic) is a parameter so the throttling can be checked with a clock that
    steps when told. ``bar`` (anything with ``update(n)`` and ``close()``, e.g. :func:`console_bar`)
    is advanced with every update.
    """

    def __init__(self, total: int, *, label: str, unit: str = "images", log: Callable[[str], object] | None = None,
                 bar: Bar | None = None, every_s: float = 10.0, every_fraction: float = 0.25,
                 clock: Callable[[], float] = time.monotonic):
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total, self.label, self.unit = int(total), label, unit
        self.log, self.bar, self.every_s, self.every_fraction, self.clock = log, bar, every_s, every_fraction, clock
        self.done = 0
        self.started = clock()
        self._last_line_at = self.started
        self._last_step = 0
        self._closed = False

    # -- figures ------------------------------------------------------------------------------
    @property
    def elapsed_s(self) -> float:
        return max(0.0, self.clock() - self.started)

    @property
    def rate(self) -> float:
        """Items per second since the start; nan before any item or any time has passed."""
        elapsed = self.elapsed_s
        return self.done / elapsed if self.done and elapsed > 0 else float("nan")

    @property
    def eta_s(self) -> float:
        """Seconds left at the current rate (0 when done; nan while the rate is unknown)."""
        if self.done >= self.total:
            return 0.0
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else float("nan")

    def line(self) -> str:
        """``label: done/total unit (pct %), rate unit/s, ETA m:ss``."""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f} %), "
                f"{_rate(self.rate)} {self.unit}/s, ETA {format_duration(self.eta_s)}")

    def final_line(self) -> str:
        return (f"{self.label}: {self.done}/{self.total} {self.unit} in {format_duration(self.elapsed_s)}, "
                f"{_rate(self.rate)} {self.unit}/s")

    # -- counting -----------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done (after a batch); report if it is time to."""
        self.done += int(n)
        if self.bar is not None:
            self.bar.update(int(n))
        if self.log is None or self.done >= self.total:
            return  # the last line is close()'s
        now = self.clock()
        step = int(self.done / self.total / self.every_fraction) if self.total and self.every_fraction > 0 else 0
        if now - self._last_line_at >= self.every_s or step > self._last_step:
            self._last_line_at, self._last_step = now, step
            self.log(self.line())

    def close(self) -> None:
        """Report the final figures (once), and close the bar."""
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log(self.final_line())


def _rate(rate: float) -> str:
    return f"{rate:.1f}" if math.isfinite(rate) else "?"


# -- the console bar of `nfhm demo` -----------------------------------------------------------------
_console: TextIO | None = None


@contextlib.contextmanager
def console_progress(stream: TextIO | None = None) -> Iterator[None]:
    """Inside the block, :func:`console_bar` gives bars on ``stream``. Stages run in this process
    (``dagster.materialize`` executes in-process), so they see it.

    Default: a duplicate of stderr's file descriptor, taken on entry. Dagster captures a step's
    output into its compute logs by pointing descriptors 1 and 2 at files while the step runs; the
    bar belongs on the person's terminal (where the duplicate still points), not in those logs.
    """
    global _console
    owned = None
    if stream is None:
        try:
            owned = stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding="utf-8",
                                       errors="replace")
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):  # no real stderr (a notebook)
            stream = sys.stderr
    saved, _console = _console, stream
    try:
        yield
    finally:
        _console = saved
        if owned is not None:
            owned.close()


def console_bar(total: int, label: str) -> Bar | None:
    """A bar for ``total`` images on the console of :func:`console_progress`, or None outside it.

    On a terminal: a tqdm bar (done/total, images/s, elapsed<left). Elsewhere (a pipe, a CI log)
    the carriage returns of a bar would pile up, so it prints a :class:`ProgressMeter`'s lines."""
    stream = _console
    if stream is None or total <= 0:
        return None
    if _is_terminal(stream):
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with the ML libraries; without it, lines as on a pipe
            pass
        else:
            # A terminal that reports no width (some CI ptys) would get an empty bar from tqdm.
            width = {"dynamic_ncols": True} if _columns(stream) else {"ncols": 100}
            return tqdm(total=total, desc=label, unit="img", file=stream, leave=True, mininterval=0.5, **width)
    return ProgressMeter(total, label=label, log=lambda text: print(text, file=stream, flush=True))


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0
