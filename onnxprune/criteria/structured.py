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


# ---------------------------------------------------------------------- reconstruction-error selection
def reconstruction_order(G: np.ndarray, W: np.ndarray, units: np.ndarray, n_max: int, *,
                         percdamp: float = 0.01, steps: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Greedy removal order of units by the output error their removal leaves after a re-fit.

    The layer is ``y = x W`` with ``x [T, K]`` and ``W [K, N]`` (rows = the consumer's inputs; a
    bias is a row whose input is the constant 1 and belongs to no unit). With ``G = XᵀX`` and
    ``H = G + λ·mean(diag G)·I``, removing the rows ``R`` and re-fitting the others by least
    squares raises ``‖X W − X W'‖²`` (``H``-weighted) by the Optimal Brain Surgeon quantity
    ``tr(W_Rᵀ [(H⁻¹)_RR]⁻¹ W_R)``. Greedily (ZipLM): pick the unit with the lowest cost, then
    apply its re-fit to the other rows, ``W ← W − H⁻¹[:, R] [(H⁻¹)_RR]⁻¹ W_R``, and remove it
    from the inverse, ``H⁻¹ ← H⁻¹ − H⁻¹[:, R] [(H⁻¹)_RR]⁻¹ H⁻¹[R, :]`` (exactly the inverse of
    ``H`` restricted to the rows left). To bound the cost, each of at most ``steps`` rounds removes
    the ``ceil(n_max / steps)`` cheapest units together (their joint cost and update are exact;
    ``steps=0`` removes one unit per round, the pure greedy). The first ``n`` entries of the order
    are the choice for every ``n <= n_max``; ``costs[n-1]`` is the error after removing them
    (exact at the end of each round, split within a round in proportion to the units' own costs).

    Args:
        G: ``[K, K]`` symmetric positive semi-definite Gram matrix of the consumer's inputs.
        W: ``[K, N]`` weight (a bias row included if there is one).
        units: ``[U, b]`` int rows owned by each unit (``b`` rows per unit, disjoint).
        n_max: Units to order (``0 <= n_max < U``).
        percdamp: ``λ`` above.
        steps: Rounds (see above); 0 = one unit per round.

    Returns:
        ``(order [n_max] int64, costs [n_max] float64)``.

    Raises:
        ValueError: shapes that do not fit, ``n_max`` out of range.
    """
    G = np.asarray(G, dtype=np.float64)
    W = np.array(W, dtype=np.float64, copy=True)
    units = np.asarray(units, dtype=np.int64)
    if units.ndim == 1:
        units = units[:, None]
    k = W.shape[0]
    if G.shape != (k, k) or units.size == 0 or units.min() < 0 or units.max() >= k:
        raise ValueError(f"reconstruction_order: G {G.shape}, W {W.shape} and unit rows do not fit")
    n_units, b = units.shape
    if not 0 <= n_max < n_units:
        raise ValueError(f"reconstruction_order: n_max must be in [0, {n_units}), got {n_max}")
    H = G.copy()
    H[np.diag_indices_from(H)] += percdamp * max(float(np.mean(np.diag(G))), 1e-12)
    Hinv = np.linalg.inv(H)
    alive = np.ones(n_units, dtype=bool)
    order = np.zeros(n_max, dtype=np.int64)
    costs = np.zeros(n_max, dtype=np.float64)
    per_step = max(1, -(-n_max // steps)) if steps else 1
    done, total = 0, 0.0
    while done < n_max:
        live = np.flatnonzero(alive)
        idx = units[live]                                     # [A, b]
        if b == 1:
            cost = np.einsum("an,an->a", W[idx[:, 0]], W[idx[:, 0]]) / np.maximum(Hinv[idx[:, 0], idx[:, 0]], 1e-300)
        else:
            blocks = Hinv[idx[:, :, None], idx[:, None, :]]   # [A, b, b]
            wb = W[idx]                                       # [A, b, N]
            cost = np.einsum("abn,abn->a", wb, np.linalg.solve(blocks + 1e-12 * np.eye(b), wb))
        take = min(per_step, n_max - done)
        pick = np.argsort(cost, kind="stable")[:take]
        chosen = live[pick]
        rows = units[chosen].reshape(-1)
        inv_rr = np.linalg.inv(Hinv[np.ix_(rows, rows)] + 1e-12 * np.eye(rows.size))
        left = Hinv[:, rows] @ inv_rr                         # [K, |R|]
        joint = max(float(np.einsum("rn,rn->", W[rows], inv_rr @ W[rows])), 0.0)
        W -= left @ W[rows]
        Hinv -= left @ Hinv[rows, :]
        W[rows] = 0.0
        Hinv[rows, :] = 0.0
        Hinv[:, rows] = 0.0
        alive[chosen] = False
        share = np.maximum(cost[pick], 0.0)
        share = np.cumsum(share) / share.sum() if share.sum() > 0 else np.arange(1, take + 1) / take
        order[done:done + take] = chosen
        costs[done:done + take] = total + joint * share
        total += joint
        done += take
    return order, costs


def allocate(curves: Sequence[np.ndarray], total: int, caps: Sequence[int]) -> list[int]:
    """Units to remove per group under one global count, by the smallest marginal error.

    ``curves[g][n-1]`` is group ``g``'s (normalised) error after removing ``n`` units. Starting
    from zero everywhere, the next unit goes to the group whose error grows least
    (``curves[g][n] − curves[g][n−1]``), never beyond ``caps[g]`` (``<= len(curves[g])``).
    Exact when every curve is convex; greedy otherwise.

    Returns:
        Units to remove per group (sums to ``min(total, Σ caps)``).
    """
    counts = [0] * len(curves)
    prev = [0.0] * len(curves)
    for _ in range(min(total, int(sum(caps)))):
        best, gain = -1, np.inf
        for g, c in enumerate(curves):
            n = counts[g]
            if n < caps[g] and c[n] - prev[g] < gain:
                best, gain = g, float(c[n] - prev[g])
        if best < 0:
            break
        prev[best] = float(curves[best][counts[best]])
        counts[best] += 1
    return counts
