"""Progress of long command-line runs (``attnlib check``, ``attnlib bench``) on stderr, no dependency.

On a terminal: one line redrawn in place (a bar, ``done/total``, elapsed time and what runs now), cleared
before any other output. When stderr is not a terminal (a log, CI, a pipe): a plain line at most every
``interval`` seconds, so short runs print nothing and long ones show they are alive.
"""
from __future__ import annotations

import shutil
import sys
import time


class Progress:
    def __init__(self, total: int, label: str, *, stream=None, interval: float = 30.0, enabled: bool = True):
        self.total = max(int(total), 1)
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.enabled = enabled
        self.tty = enabled and _isatty(self.stream)
        self.done = 0
        self.status = ""
        self._t0 = time.perf_counter()
        self._last_line = self._t0
        self._shown = False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def update(self, status: str = "", advance: int = 0) -> None:
        """Say what runs now (``status``) and count ``advance`` finished steps."""
        self.done = min(self.total, self.done + advance)
        if status:
            self.status = status
        if not self.enabled:
            return
        if self.tty:
            self._draw()
        elif time.perf_counter() - self._last_line >= self.interval:
            self._last_line = time.perf_counter()
            print(f"{self.label}: {self.done}/{self.total} {self.status} ({self.elapsed:.0f} s)",
                  file=self.stream, flush=True)

    def clear(self) -> None:
        """Remove the bar (terminal only) so other output starts on a clean line; the next update redraws."""
        if self.tty and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False

    def print(self, *args, **kwargs) -> None:
        """``print`` to stdout (by default) without tearing the bar."""
        self.clear()
        print(*args, **kwargs)
        if self.tty:
            sys.stdout.flush()
            self._draw()

    def close(self) -> None:
        self.clear()

    def _draw(self) -> None:
        width = shutil.get_terminal_size((80, 20)).columns
        frac = self.done / self.total
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        line = f"{self.label} [{bar}] {self.done}/{self.total} {self.elapsed:5.0f}s {self.status}"
        self.stream.write("\r\033[K" + line[: max(width - 1, 10)])
        self.stream.flush()
        self._shown = True


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
