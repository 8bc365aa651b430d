"""Progress of long loops: a tqdm bar with a total on a terminal, periodic plain lines on stderr elsewhere
(CI logs), and status lines that never land inside a running bar."""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

PERIOD_ENV = "PTQAUDIT_PROGRESS_PERIOD"
DEFAULT_PERIOD_S = 30.0  # off a terminal: at most one progress line per stage this often
SHORT_STAGE_S = 2.0  # off a terminal, a stage shorter than this that printed no line ends without one

T = TypeVar("T")


def period_seconds() -> float:
    """Seconds between plain progress lines ($PTQAUDIT_PROGRESS_PERIOD, default 30; 0: every step)."""
    try:
        return max(0.0, float(os.environ.get(PERIOD_ENV, DEFAULT_PERIOD_S)))
    except ValueError:
        return DEFAULT_PERIOD_S


def duration(seconds: float) -> str:
    """A short human duration: 42s, 3m05s, 1h02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def write(message: str, err: bool = False) -> None:
    """Print a status line on stdout (stderr with err) without breaking a running bar: the bar is
    cleared, the line written, the bar drawn again below it."""
    tqdm.write(message, file=sys.stderr if err else sys.stdout)
    (sys.stderr if err else sys.stdout).flush()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """One stage's progress towards its total, in the place it can be seen: on a terminal a tqdm bar
    (cleared when the stage ends), elsewhere a plain line on stderr at most every period_seconds(), and
    one when a stage of SHORT_STAGE_S or more ends. A stage ended by an error ends silently (the error
    says why). Disabled (enabled=False, --no-progress): silent."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True,
                 iterable: Iterable | None = None, unit_scale: bool = False):
        self.desc, self.unit, self.unit_scale, self.n, self.postfix = desc, unit, unit_scale, 0, ""
        self._total = total  # None only where the size cannot be known (a download without Content-Length)
        self._iterable = iterable
        self._started = self._last_line = time.monotonic()
        self._n_shown = 0  # the count the last plain line showed
        terminal = enabled and _is_terminal(sys.stderr)
        self._bar = (tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=False, file=sys.stderr)
                     if terminal else None)
        self._lines = enabled and not terminal
        self._closed = False

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, total: int) -> None:
        self._total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and time.monotonic() - self._last_line >= period_seconds():
            self._line()

    def set_postfix_str(self, text: str) -> None:
        """A short status shown after the counts (the bar's postfix, the end of each line)."""
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def close(self, failed: bool = False) -> None:
        """End the stage: clear the bar, or write its last line unless it failed, was short or said it all."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif (self._lines and not failed and self.n != self._n_shown
              and (self._n_shown or time.monotonic() - self._started >= SHORT_STAGE_S)):
            self._line()

    def __iter__(self) -> Iterator:
        completed = False
        try:
            for item in self._iterable:
                yield item
                self.update()
            completed = True
        finally:
            self.close(failed=not completed)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, error_type, *_) -> None:
        self.close(failed=error_type is not None)

    def _count(self, n: int) -> str:
        return tqdm.format_sizeof(n) if self.unit_scale else f"{n:,}"

    def _line(self) -> None:
        now = time.monotonic()
        self._last_line, self._n_shown = now, self.n
        elapsed = now - self._started
        if self._total:
            text = (f"{self.desc}: {self._count(self.n)}/{self._count(self._total)} {self.unit} "
                    f"({100 * self.n / self._total:.0f}%), elapsed {duration(elapsed)}")
            if 0 < self.n < self._total:
                text += f", ETA {duration(elapsed * (self._total - self.n) / self.n)}"
        else:
            text = f"{self.desc}: {self._count(self.n)} {self.unit}, elapsed {duration(elapsed)}"
        write(text + (f"; {self.postfix}" if self.postfix else ""), err=True)


def track(iterable: Iterable[T], desc: str, unit: str = "it", enabled: bool = True, total: int | None = None) -> Progress:
    """Iterate with progress; total defaults to len(iterable)."""
    return Progress(len(iterable) if total is None else total, desc, unit, enabled, iterable)
