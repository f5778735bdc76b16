"""Progress for long work (calibration batches, per-layer loops, passes), silent unless useful.

:func:`progress` wraps an iterable. It draws a ``tqdm`` bar on stderr when

* stderr is a terminal (``sys.stderr.isatty()``), and
* progress is enabled (the module-level switch :data:`ENABLED`, which the CLI turns off for
  ``--quiet`` and ``--json``; :func:`set_enabled` / :func:`disabled` change it).

Bars are transient (``leave=False``): they vanish when done, so the report stays clean.

When stderr is **not** a terminal (a CI log, a file, a pipe) and plain lines are on
(:data:`PLAIN`, which the CLI turns on unless ``--quiet``; off by default for library use), it
prints plain stage lines instead, e.g. ``calibration 5/16 batches (12 s)``, throttled so that a
loop of thousands of items prints a handful of lines: nothing until the work has run
:data:`FIRST_LINE_SECONDS` (short runs stay silent), then at most one line per
:data:`THROTTLE_SECONDS` per loop, and a last ``.../16 batches done`` line for a loop that printed
any. :func:`stage` prints one such line for a step (``pass 2/3: nm``) under the same rule.
Otherwise :func:`progress` returns the iterable itself: no overhead, nothing printed.

Usage::

    from onnxprune.progress import progress

    for batch in progress(batches, total=n, desc="calibration"):
        ...
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

#: Global switch: False silences every bar (set by the CLI for ``--quiet``/``--json``).
ENABLED: bool = True
#: Plain lines on a non-terminal stderr (the CLI sets it unless ``--quiet``).
PLAIN: bool = False
#: Seconds of work (since :func:`set_plain` turned lines on) before the first plain line.
FIRST_LINE_SECONDS = 2.0
#: At most one plain line per loop per this many seconds.
THROTTLE_SECONDS = 10.0
#: Seconds clock of the plain lines (replaceable in tests).
clock = time.monotonic
_started: float = 0.0


def set_enabled(enabled: bool) -> None:
    """Turn progress bars on or off for this process."""
    global ENABLED
    ENABLED = bool(enabled)


def set_plain(enabled: bool) -> None:
    """Turn plain progress lines (non-terminal stderr) on or off; on starts the first-line clock."""
    global PLAIN, _started
    PLAIN = bool(enabled)
    _started = clock()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Silence progress bars and plain lines inside a ``with`` block (restores the previous state)."""
    global ENABLED, PLAIN
    previous = ENABLED, PLAIN
    ENABLED = PLAIN = False
    try:
        yield
    finally:
        ENABLED, PLAIN = previous


def _stderr_is_tty() -> bool:
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def active() -> bool:
    """True if a bar would be drawn now: enabled and stderr is a terminal."""
    return ENABLED and _stderr_is_tty()


def plain_active() -> bool:
    """True if plain lines would be printed: :data:`PLAIN` on and stderr not a terminal."""
    return PLAIN and sys.stderr is not None and not _stderr_is_tty()


def _line(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):  # a closed stderr must not stop the work
        pass


def _plural(unit: str) -> str:
    if unit.endswith(("s", "x", "ch", "sh")):
        return unit + "es"
    return unit + "s"


def stage(message: str) -> None:
    """One plain line for a step of the work (``pass 2/3: nm``), once the work has run a while."""
    if plain_active() and clock() - _started >= FIRST_LINE_SECONDS:
        _line(f"{message} ({clock() - _started:.0f} s)")


def _plain_lines(iterable: Iterable[T], total: int | None, desc: str | None, unit: str) -> Iterator[T]:
    """Yield the items; print throttled ``desc n/total units`` lines (module docstring)."""
    label = desc or "working"
    last: float | None = None
    n = 0

    def count() -> str:
        return f"{n}/{total}" if total is not None else f"{n}"

    for item in iterable:
        yield item
        n += 1
        now = clock()
        due = now - _started >= FIRST_LINE_SECONDS if last is None else now - last >= THROTTLE_SECONDS
        if due and (total is None or n < total):
            _line(f"{label} {count()} {_plural(unit)} ({now - _started:.0f} s)")
            last = now
    if last is not None:
        _line(f"{label} {count()} {_plural(unit)} done ({clock() - _started:.0f} s)")


def progress(iterable: Iterable[T], total: int | None = None, desc: str | None = None,
             unit: str = "it") -> Iterable[T]:
    """Wrap ``iterable`` in a progress bar when one is useful, else return it unchanged.

    Args:
        iterable: What to iterate over.
        total: Number of items (taken from ``len(iterable)`` when it has one).
        desc: Short label shown before the bar (e.g. ``"calibration"``).
        unit: Name of one item (``"batch"``, ``"layer"``).

    Returns:
        An iterable yielding the same items in the same order.
    """
    if not active():
        if not plain_active():
            return iterable
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        return _plain_lines(iterable, total, desc, unit)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


__all__ = ["ENABLED", "FIRST_LINE_SECONDS", "PLAIN", "THROTTLE_SECONDS", "active", "disabled", "plain_active",
           "progress", "set_enabled", "set_plain", "stage"]
