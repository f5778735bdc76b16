"""Which units (channels, heads, FFN neurons) a structured pass removes: ONE selection rule.

Input: one score vector per group (higher = more important); output: the sorted indices to
remove from each group. Both ``channels`` and ``heads``/``ffn`` call :func:`select`.

* **Per group** (``scope="layer"``): ``n = floor(ratio * width + 1/2)`` units (the nearest
  integer to the requested share) are removed.
* **Global** (``scope="global"``): scores are divided by their group's mean (so groups of
  different scale compare), and the ``round(ratio * Σ width)`` lowest normalised units over all
  groups are removed greedily in ascending order, skipping a unit whose removal would leave its
  group with fewer than ``min_keep``.

Then, per group, the kept width ``k = width - n`` is rounded **up** to a multiple of
``round_to`` (when ``width >= round_to``; never below ``round_to``) and clamped to
``[min_keep, width]``; at least one unit always stays. Within a group the lowest scores go first,
ties broken by index (stable sort), so the result is deterministic.

Preconditions: ``0 <= ratio < 1``; ``min_keep >= 1``; ``round_to >= 1``; scores are finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def kept_width(width: int, n_remove: int, *, min_keep: int = 1, round_to: int = 1) -> int:
    """Width a group keeps after removing ``n_remove`` units, with rounding and the floor applied."""
    keep = width - n_remove
    if round_to > 1 and width >= round_to:
        keep = min(width, int(np.ceil(keep / round_to)) * round_to)
        keep = max(keep, round_to)
    return min(width, max(keep, min_keep, 1))


def select(scores: Sequence[np.ndarray], ratio: float, *, scope: str = "layer", min_keep: int = 1,
           round_to: int = 1) -> list[np.ndarray]:
    """Indices to remove from each group (sorted, int64), lowest scores first.

    Args:
        scores: One 1-D score vector per group (its length is the group's width).
        ratio: Share of units to remove (per group, or over all groups for ``scope="global"``).
        scope: ``layer`` (per group) or ``global``.
        min_keep: Fewest units any group keeps.
        round_to: Kept widths are multiples of this (rounded up).

    Returns:
        One sorted ``int64`` index array per group (empty when nothing is removed).

    Raises:
        ValueError: bad ``scope`` or ``ratio``.
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be layer or global, not {scope!r}")
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    widths = [len(s) for s in scores]
    if scope == "global" and scores:
        n_rm = _global_counts([np.asarray(s, dtype=np.float64) for s in scores], ratio, min_keep)
    else:
        n_rm = [int(np.floor(ratio * w + 0.5)) for w in widths]
    out = []
    for s, w, n in zip(scores, widths, n_rm):
        n = w - kept_width(w, n, min_keep=min_keep, round_to=round_to)
        order = np.argsort(np.asarray(s), kind="stable")
        out.append(np.sort(order[:n]).astype(np.int64) if n > 0 else np.zeros(0, np.int64))
    return out


def _global_counts(scores: list[np.ndarray], ratio: float, min_keep: int) -> list[int]:
    widths = [len(s) for s in scores]
    total = int(np.floor(ratio * sum(widths) + 0.5))
    norm = np.concatenate([s / m if (m := s.mean()) > 0 else s for s in scores]) if scores else np.zeros(0)
    owner = np.concatenate([np.full(w, i) for i, w in enumerate(widths)])
    counts = [0] * len(scores)
    for j in np.argsort(norm, kind="stable"):
        if total == 0:
            break
        g = owner[j]
        if widths[g] - counts[g] - 1 < max(min_keep, 1):
            continue
        counts[g] += 1
        total -= 1
    return counts
