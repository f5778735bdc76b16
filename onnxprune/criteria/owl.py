r"""Non-uniform per-layer sparsity under one global target (OWL: outlier-weighted layer sparsity).

OWL (Yin et al. 2023) observes that layers holding more activation outliers are more sensitive and
should be pruned less. For layer ``l`` with Wanda scores ``A = |W| · ‖X‖₂`` (per input channel),
the *outlier ratio* is

    D_l = share of entries of A_l greater than M · mean(A_l)          (M = ``owl_m``, e.g. 5)

The ratios are rescaled linearly to ``[0, 2λ]`` (``λ`` = ``owl_lambda``) and turned into
sparsities ``s_l = target + λ - scaled_l + c``, so the layer with the most outliers gets the lowest
sparsity. Every ``s_l`` is clipped to ``[target - λ, target + λ]`` (and to ``[0, max_sparsity]``),
and the shift ``c`` is found by bisection so that the **parameter-weighted** mean equals the target:

    Σ_l n_l · s_l / Σ_l n_l = target           (n_l = number of weights of layer l)

(the OWL paper uses the plain mean because its blocks are equal-sized; ours are not). ``uniform``
gives every layer the target. A "layer" may be a block of weights (``owl_blocks``, a regex whose
capture group names the block, e.g. ``layer\.(\d+)/`` for the transformer layers of a BERT
export): the ratio is then taken over the block's concatenated scores and all its weights share
one sparsity, which is the OWL paper's granularity.

Preconditions: ``0 <= target < 1``, ``λ >= 0``, ``M > 0``; every layer has a positive size. The
target must be reachable inside the caps (it always is, since ``target`` itself lies inside them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxprune.errors import PipelineError

ALLOCATIONS = ("uniform", "owl")


def outlier_ratio(scores: np.ndarray, m: float) -> float:
    """Share of ``scores`` above ``m`` times their mean (OWL's layer outlier ratio ``D``)."""
    a = np.asarray(scores, dtype=np.float64)
    if a.size == 0:
        return 0.0
    mean = float(a.mean())
    return float(np.count_nonzero(a > m * mean)) / a.size


def uniform_sparsities(names: list[str], target: float) -> dict[str, float]:
    """Every layer at ``target``."""
    return {n: float(target) for n in names}


def weighted_mean(sparsities: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    """Parameter-weighted mean sparsity."""
    total = sum(sizes[n] for n in sparsities)
    return sum(sparsities[n] * sizes[n] for n in sparsities) / total if total else 0.0


def owl_sparsities(
    ratios: Mapping[str, float],
    sizes: Mapping[str, int],
    target: float,
    lam: float = 0.08,
    max_sparsity: float = 0.99,
) -> dict[str, float]:
    """OWL per-layer sparsities whose parameter-weighted mean is ``target``.

    Args:
        ratios: Layer -> outlier ratio ``D_l`` (see :func:`outlier_ratio`).
        sizes: Layer -> number of weights.
        target: Global sparsity.
        lam: Largest deviation from ``target`` (OWL's λ).
        max_sparsity: Upper cap on any layer's sparsity.

    Returns:
        Layer -> sparsity in ``[target - lam, target + lam] ∩ [0, max_sparsity]``.

    Raises:
        PipelineError: bad target/lambda or a missing size.
    """
    if not 0.0 <= target < 1.0:
        raise PipelineError(f"allocation: target sparsity must be in [0, 1), got {target}")
    if lam < 0:
        raise PipelineError(f"allocation: owl_lambda must be >= 0, got {lam}")
    names = list(ratios)
    if not names:
        return {}
    missing = [n for n in names if sizes.get(n, 0) <= 0]
    if missing:
        raise PipelineError(f"allocation: no size for layer(s) {missing[:3]}")
    d = np.array([ratios[n] for n in names], dtype=np.float64)
    n = np.array([sizes[k] for k in names], dtype=np.float64)
    span = d.max() - d.min()
    if lam == 0 or span <= 0:
        return uniform_sparsities(names, target)
    scaled = (d - d.min()) / span * 2.0 * lam
    base = target + lam - scaled  # most outliers -> target - lam
    lo = max(target - lam, 0.0)
    hi = min(target + lam, max_sparsity)

    def mean_at(c: float) -> float:
        return float(np.clip(base + c, lo, hi) @ n / n.sum())

    a, b = -2.0 * lam - 1.0, 2.0 * lam + 1.0  # mean_at is monotone in c; mean_at(a)=lo, mean_at(b)=hi
    for _ in range(100):
        mid = 0.5 * (a + b)
        if mean_at(mid) < target:
            a = mid
        else:
            b = mid
    s = np.clip(base + 0.5 * (a + b), lo, hi)
    return {k: float(v) for k, v in zip(names, s)}


def block_keys(weights: Sequence[Any], pattern: str | None) -> dict[str, str]:
    """Weight -> block key: the first capture group (or the whole match) of ``pattern`` searched
    in the initializer name, then in its consumer node names; a weight that matches nothing is a
    block of its own. ``pattern=None``: every weight is its own block.

    Raises:
        PipelineError: ``pattern`` is not a valid regular expression.
    """
    if not pattern:
        return {w.name: w.name for w in weights}
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise PipelineError(f"allocation: owl_blocks {pattern!r} is not a valid regular expression: {exc}") from None
    out = {}
    for w in weights:
        key = None
        for text in [w.name, *getattr(w, "nodes", [])]:
            m = rx.search(text)
            if m:
                key = "block:" + (m.group(1) if m.groups() else m.group(0))
                break
        out[w.name] = key or w.name
    return out
