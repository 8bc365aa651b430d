"""Progress output: plain periodic lines off a terminal (CI logs), a bar with a total on one, and status
lines that never land inside a running bar."""

import io
import re
import sys

import pytest

from ptqaudit import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A stand-in for time.monotonic that the test moves forward."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    return fake


def test_off_a_terminal_a_line_at_most_every_period_and_one_at_the_end(capsys, clock, monkeypatch):
    monkeypatch.delenv(progress.PERIOD_ENV, raising=False)
    bar = progress.Progress(100, "searching", "policy")
    for seconds in (10, 20, 31, 45, 50, 62):  # a step at each of these times since the start
        clock.now = 1000.0 + seconds
        bar.update(10)
    clock.now = 1000.0 + 70
    bar.update(10)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    # period 30 s: lines at 31 s (30 done) and 62 s (60 done), then the end of the stage at 70 s (70 done)
    assert lines == ["searching: 30/100 policy (30%), elapsed 31s, ETA 1m12s",
                     "searching: 60/100 policy (60%), elapsed 1m02s, ETA 41s",
                     "searching: 70/100 policy (70%), elapsed 1m10s, ETA 30s"]


def test_period_from_the_environment_and_short_stages_end_quietly(capsys, clock, monkeypatch):
    monkeypatch.setenv(progress.PERIOD_ENV, "0")
    with progress.Progress(3, "verify", "batch") as bar:
        for _ in range(3):
            bar.update()
    assert capsys.readouterr().err.splitlines() == [f"verify: {n}/3 batch ({round(100 * n / 3)}%), elapsed 0s"
                                                    + (", ETA 0s" if n < 3 else "") for n in (1, 2, 3)]
    monkeypatch.setenv(progress.PERIOD_ENV, "30")
    with progress.Progress(3, "quick", "batch") as bar:  # under SHORT_STAGE_S and no line yet: nothing
        bar.update(3)
    assert capsys.readouterr().err == ""
    with pytest.raises(RuntimeError):  # a stage ended by an error ends silently: the error says why
        for _ in progress.track(range(5), "failing", "img"):
            clock.now += 60
            raise RuntimeError("broken image")
    assert capsys.readouterr().err == ""


def test_disabled_progress_prints_nothing(capsys, monkeypatch):
    monkeypatch.setenv(progress.PERIOD_ENV, "0")
    assert list(progress.track([1, 2, 3], "hidden", enabled=False)) == [1, 2, 3]
    assert capsys.readouterr() == ("", "")


def test_on_a_terminal_a_bar_with_its_total_and_status_lines_outside_it(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress.Progress(27, "exhaustive search, worst case", "policy")
    bar.update(5)
    progress.write("verifying 3 worst-case candidates on ORT", err=True)
    bar.update(22)
    bar.close()
    output = terminal.getvalue()
    assert re.search(r"exhaustive search, worst case: +\d+%\|.*\| \d+/27 ", output)  # a total, always
    assert "\rverifying 3 worst-case candidates on ORT\n" in output  # the bar is cleared first, then redrawn
    assert output.endswith("\r")  # the bar is cleared when the stage ends (leave=False)


def test_duration():
    assert [progress.duration(s) for s in (0, 42.4, 60, 185, 3599, 3720)] == ["0s", "42s", "1m00s", "3m05s",
                                                                              "59m59s", "1h02m"]
