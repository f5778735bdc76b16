"""Progress bars for long work (calibration batches, per-layer loops), silent unless useful.

:func:`progress` wraps an iterable. It draws a ``tqdm`` bar on stderr only when

* stderr is a terminal (``sys.stderr.isatty()``), and
* progress is enabled (the module-level switch :data:`ENABLED`, which the CLI turns off for
  ``--quiet`` and ``--json``; :func:`set_enabled` / :func:`disabled` change it).

Otherwise it returns the iterable itself, so there is no overhead and nothing is printed in
scripts, CI logs or pipes. Bars are transient (``leave=False``): they vanish when done, so the
report printed afterwards stays clean.

Usage::

    from onnxprune.progress import progress

    for batch in progress(batches, total=n, desc="calibration"):
        ...
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

#: Global switch: False silences every bar (set by the CLI for ``--quiet``/``--json``).
ENABLED: bool = True


def set_enabled(enabled: bool) -> None:
    """Turn progress bars on or off for this process."""
    global ENABLED
    ENABLED = bool(enabled)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Silence progress bars inside a ``with`` block (restores the previous state)."""
    global ENABLED
    previous = ENABLED
    ENABLED = False
    try:
        yield
    finally:
        ENABLED = previous


def active() -> bool:
    """True if a bar would be drawn now: enabled and stderr is a terminal."""
    if not ENABLED:
        return False
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


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
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


__all__ = ["ENABLED", "active", "disabled", "progress", "set_enabled"]
