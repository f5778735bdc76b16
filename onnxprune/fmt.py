"""Text formatting shared by the reports and the ``inspect`` tables (no other dependencies)."""

from __future__ import annotations

from typing import Any


def fmt_int(n: int | None) -> str:
    """``1,234,567`` (``-`` for None)."""
    return "-" if n is None else f"{n:,}"


def fmt_bytes(n: int | None) -> str:
    """``12.34 MB`` in binary units (``-`` for None)."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def shorten(name: str, width: int) -> str:
    """``name``, or ``...`` + its last ``width - 3`` characters when it is longer than ``width``."""
    return name if len(name) <= width else "..." + name[-(width - 3):]


def short_value(v: Any) -> str:
    """A statistic for a one-line report: floats to 4 significant digits."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
