"""Progress of a run: a tqdm bar on a terminal, plain lines on stderr elsewhere.

``Progress(total, done=0, progress=None)``:

=============  ==============================================================================
``True``       show progress: a bar when stderr is a terminal, else a line every ``interval``
``False``      nothing
``None``       a bar when stderr is a terminal, else nothing (library calls); ``distjac run``
               passes True where the user gave no flag, so that nohup, cluster scripts and
               ``ray job submit`` logs get lines (``--no-progress`` turns them off)
=============  ==============================================================================

A line reads::

    distjac: 12,288/20,000 rows (61%), 4,210 rows/s, ETA 1.8 s, 12/20 shards, 1 retried

Rows done count from the run's start (rows already finished by an earlier run are shown
as done, not as speed), and include the rows done so far of the shards in flight
(``set_in_flight``, from the workers' progress: NOTE [progress within a shard] in
distjac.shard), so the bar and the lines move within a long shard. Lines go out at most
every ``interval`` seconds (10 by default, ``DISTJAC_PROGRESS_INTERVAL`` in the
environment), from ``update`` calls and from a background timer, so a long shard does not
silence the log; and one last line at ``close()``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import IO, Any

__all__ = ["DEFAULT_INTERVAL_S", "Progress"]

DEFAULT_INTERVAL_S = 10.0


def _interval_from_env() -> float:
    try:
        value = float(os.environ.get("DISTJAC_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value > 0 else DEFAULT_INTERVAL_S


def format_duration(s: float) -> str:
    """Seconds as people read them: 4.2 s, 3 min 05 s, 2 h 10 min."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


class Progress:
    """Rows done of a run, shown as a bar or as lines (see the module docstring).

    Args:
        total: rows of the whole job.
        done: rows already finished when the run starts (resumed shards).
        progress: True, False or None (see the module docstring).
        interval: seconds between lines (None: ``DISTJAC_PROGRESS_INTERVAL`` or 10).
        shards: shards of the job (None: not shown); ``update(rows, shards=1)`` counts them.
        shards_done: shards already finished.
        file: where to write (default: sys.stderr).
        desc: the lines' and bar's prefix.

    Use as a context manager, or call ``close()``.
    """

    def __init__(self, total: int, done: int = 0, progress: bool | None = None, *,
                 interval: float | None = None, shards: int | None = None, shards_done: int = 0,
                 file: IO[str] | None = None, desc: str = "distjac"):
        self.file = file if file is not None else sys.stderr
        self.total = int(total)
        self.done = int(done)
        self.shards, self.shards_done = shards, int(shards_done)
        self.retries = 0
        self.in_flight = 0.0  # rows done so far of the shards in flight
        self._bar_n = self._shown = self.done  # what the bar shows; the most shown yet
        self.desc = desc
        self.interval = float(interval) if interval is not None else _interval_from_env()
        tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.mode = "off" if progress is False else ("bar" if tty else ("lines" if progress else "off"))
        self._start_done = self.done
        self._t0 = time.monotonic()
        self._last_line = self._t0
        self._lock = threading.Lock()
        self._closed = False
        self._bar: Any = None
        self._timer: threading.Thread | None = None
        self._stop = threading.Event()
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, unit="rows", unit_scale=True, dynamic_ncols=True,
                             file=self.file, desc=desc)
        elif self.mode == "lines":
            self._timer = threading.Thread(target=self._tick, name="distjac-progress", daemon=True)
            self._timer.start()

    # ------------------------------------------------------------------ API

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def shown(self) -> int:
        """Rows shown as done: finished shards' rows plus the rows in flight done so far;
        never less than shown before (a shard lost with its worker is redone, not
        subtracted from the display)."""
        self._shown = max(self._shown, min(self.total, self.done + int(self.in_flight)))
        return self._shown

    def update(self, rows: int, *, shards: int = 0) -> None:
        """``rows`` more rows (and ``shards`` more shards) are done."""
        with self._lock:
            self.done += int(rows)
            self.shards_done += int(shards)
            # The finished shard's part of the rows in flight (at most its rows) is gone
            # from them until the next report says what is left.
            self.in_flight = max(0.0, self.in_flight - int(rows))
            self._refresh()

    def set_in_flight(self, rows: float) -> None:
        """The rows done so far of the shards still running (a poll of the runners)."""
        with self._lock:
            self.in_flight = max(0.0, float(rows))
            self._refresh()

    def _refresh(self) -> None:
        if self._bar is not None:
            shown = self.shown
            if shown != self._bar_n:
                self._bar.update(shown - self._bar_n)
                self._bar_n = shown
            self._postfix()
        elif self.mode == "lines" and time.monotonic() - self._last_line >= self.interval:
            self._line()

    def set_retries(self, n: int) -> None:
        """Shards retried so far (after a worker died, a timeout, ...)."""
        with self._lock:
            self.retries = int(n)
            if self._bar is not None:
                self._postfix()

    def close(self) -> None:
        """Stop the timer; a last line (lines mode) or close the bar."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            if self._bar is not None:
                self._bar.close()
            elif self.mode == "lines":
                self._line()
        if self._timer is not None:
            self._timer.join(timeout=1.0)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _postfix(self) -> None:
        extra = {}
        if self.shards is not None:
            extra["shards"] = f"{self.shards_done}/{self.shards}"
        if self.retries:
            extra["retried"] = self.retries
        if extra:
            self._bar.set_postfix(extra, refresh=False)

    def line(self) -> str:
        """The progress line as it would be written now."""
        now = time.monotonic()
        elapsed = now - self._t0
        done = self.shown
        new = done - self._start_done
        rate = new / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        parts = [f"{done:,}/{self.total:,} rows{pct}"]
        if new > 0:
            parts.append(f"{rate:,.0f} rows/s")
        elif self.done < self.total:
            parts.append("starting")  # (a run whose rows were all done before says nothing of speed)
        if self.done >= self.total:
            parts.append(f"done in {format_duration(elapsed)}")
        elif rate > 0:
            parts.append(f"ETA {format_duration((self.total - done) / rate)}")
        if self.shards is not None:
            parts.append(f"{self.shards_done}/{self.shards} shards")
        if self.retries:
            parts.append(f"{self.retries} retried")
        return f"{self.desc}: " + ", ".join(parts)

    def _line(self) -> None:
        self._last_line = time.monotonic()
        try:
            print(self.line(), file=self.file, flush=True)
        except (OSError, ValueError):  # stderr closed (a pipe gone): stop writing
            self.mode = "off"

    def _tick(self) -> None:
        while not self._stop.wait(min(self.interval, 1.0)):
            with self._lock:
                if self._closed or self.mode != "lines":
                    return
                if time.monotonic() - self._last_line >= self.interval:
                    self._line()
