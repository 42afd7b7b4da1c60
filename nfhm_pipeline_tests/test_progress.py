"""Progress a person can watch (issue 14 item 5): done / total, rate, time left, reported often
enough to follow and rarely enough to read. Time is a clock that moves only when the test says."""
from __future__ import annotations

import io
import math

import pytest

from nfhm_pipeline.progress import ProgressMeter, console_bar, console_progress, format_duration


class SteppingClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("seconds, text", [
    (0, "0:00"), (7.4, "0:07"), (59.6, "1:00"), (125, "2:05"), (3599, "59:59"), (3600, "1:00:00"),
    (3 * 3600 + 62, "3:01:02"), (float("nan"), "?"), (float("inf"), "?"), (None, "?"), (-1, "?"),
])
def test_durations_read_as_clock_times(seconds, text):
    assert format_duration(seconds) == text


def test_rate_and_time_left_follow_the_images_done():
    clock = SteppingClock()
    meter = ProgressMeter(1000, label="ds/m", clock=clock)
    assert math.isnan(meter.rate) and math.isnan(meter.eta_s)  # nothing counted yet
    clock.now += 4.0
    meter.update(200)
    assert meter.rate == pytest.approx(50.0)  # 200 images in 4 s
    assert meter.eta_s == pytest.approx(16.0)  # 800 left at 50/s
    assert meter.line() == "ds/m: 200/1000 images (20 %), 50.0 images/s, ETA 0:16"
    clock.now += 16.0
    meter.update(800)
    assert meter.eta_s == 0.0
    assert meter.final_line() == "ds/m: 1000/1000 images in 0:20, 50.0 images/s"


def test_log_lines_come_every_quarter_or_every_ten_seconds_not_every_batch():
    clock, lines = SteppingClock(), []
    meter = ProgressMeter(1000, label="ds/m", log=lines.append, clock=clock)
    for _ in range(24):  # 240 images, 0.125 s per batch of 10: below a quarter, under 10 s
        clock.now += 0.125
        meter.update(10)
    assert lines == []
    clock.now += 0.125
    meter.update(10)  # 250 in 3.125 s: the first quarter
    assert lines == ["ds/m: 250/1000 images (25 %), 80.0 images/s, ETA 0:09"]
    clock.now += 10.0  # a slow batch: ten seconds since the last line
    meter.update(10)
    assert len(lines) == 2 and lines[-1].startswith("ds/m: 260/1000 images (26 %)")
    clock.now += 0.5
    meter.update(10)
    assert len(lines) == 2  # neither a new quarter nor ten seconds
    meter.update(730)  # the end is close()'s line, not a progress line
    assert len(lines) == 2
    meter.close()
    meter.close()  # once
    assert lines[2:] == ["ds/m: 1000/1000 images in 0:14, 73.4 images/s"]  # 13.625 s


def test_a_run_with_nothing_to_count_reports_once_and_never_divides_by_zero():
    lines = []
    meter = ProgressMeter(0, label="ds/m", log=lines.append, clock=SteppingClock())
    meter.close()
    assert lines == ["ds/m: 0/0 images in 0:00, ? images/s"]
    with pytest.raises(ValueError):
        ProgressMeter(-1, label="x")


def test_the_bar_is_advanced_with_every_batch():
    class Counter:
        def __init__(self):
            self.n, self.closed = 0, False

        def update(self, n=1):
            self.n += n

        def close(self):
            self.closed = True

    bar = Counter()
    meter = ProgressMeter(30, label="x", bar=bar, clock=SteppingClock())
    for _ in range(3):
        meter.update(10)
    meter.close()
    assert bar.n == 30 and bar.closed


def test_no_console_bar_outside_a_command_that_asks_for_one():
    assert console_bar(10, "ds/m") is None


def test_off_a_terminal_the_console_gets_plain_lines_not_carriage_returns():
    stream = io.StringIO()  # a pipe or a CI log: not a terminal
    with console_progress(stream):
        bar = console_bar(4, "ds/m")
        for _ in range(4):
            bar.update(1)
        bar.close()
    assert console_bar(4, "ds/m") is None  # only inside the block
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("ds/m: 1/4 images (25 %)") and lines[-1].startswith("ds/m: 4/4 images in ")


def test_on_a_terminal_the_console_gets_a_bar_with_count_rate_and_time_left():
    tqdm = pytest.importorskip("tqdm")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with console_progress(stream):
        bar = console_bar(8, "ds/m")
        assert isinstance(bar, tqdm.tqdm)
        for _ in range(4):
            bar.update(2)
        bar.close()
    final = stream.getvalue().split("\r")[-1]
    assert final.startswith("ds/m: 100%") and "8/8" in final and "img/s" in final
