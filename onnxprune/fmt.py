"""Text formatting shared by the reports and the ``inspect`` tables (no other dependencies)."""

from __future__ import annotations

from typing import Any


def fmt_int(n: int | None) -> str:
    """``1,234,567`` (``-`` for None)."""
    return "-" if n is None else f"{n:,}"


def fmt_bytes(n: int | None) -> str:
    """``12.34 MiB``: binary units, labelled as such (``-`` for None)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
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


class Footnotes:
    """Long texts that would repeat on every row of a table, printed once below it.

    ``ref(text)`` returns the text itself when it is short, else a ``[n]`` marker (the same marker
    for the same text); :meth:`lines` are the numbered footnotes, in first-use order.
    """

    def __init__(self, inline_max: int = 40) -> None:
        self.inline_max = inline_max
        self._notes: dict[str, int] = {}

    def ref(self, text: str) -> str:
        """``text`` when at most ``inline_max`` characters, else its footnote marker ``[n]``."""
        if len(text) <= self.inline_max:
            return text
        if text not in self._notes:
            self._notes[text] = len(self._notes) + 1
        return f"[{self._notes[text]}]"

    def lines(self) -> list[str]:
        """``[n] text`` for every footnote."""
        return [f"[{i}] {t}" for t, i in self._notes.items()]

    def join(self, reasons: list[str]) -> str:
        """``reasons`` joined for one table cell, each long one replaced by its marker."""
        return "; ".join(self.ref(r) for r in reasons)
