"""The criteria registry: score, mask and apply one ``[K, N]`` weight by criterion name.

:func:`prune_weight_kn` is the per-weight step every mask pass calls. ``magnitude`` needs no
statistics; ``wanda`` needs the per-input-channel sum of squares ``sumsq[K]``; ``sparsegpt`` the
Hessian ``H = XᵀX`` ``[K, K]`` (both from :mod:`onnxprune.analysis.calibration`). A new criterion
is one function and one entry in :data:`CRITERIA`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxprune.criteria.masks import (
    apply_keep_mask,
    apply_mask,
    column_topk_mask,
    magnitude_scores,
    mask_from_scores,
)
from onnxprune.criteria.sparsegpt import sparsegpt_prune
from onnxprune.criteria.wanda import wanda_prune
from onnxprune.errors import CalibrationError, PipelineError

CRITERIA = ("magnitude", "wanda", "sparsegpt")


def prune_weight_kn(
    W_kn: np.ndarray,
    *,
    criterion: str,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    keep_mask_kn: np.ndarray | None = None,
    stats: Any = None,
    options: Any = None,
) -> np.ndarray:
    """Prune one ``[K, N]`` weight; the single per-weight step of the ``masks`` and ``nm`` passes.

    Args:
        W_kn: The weight with K on axis 0 (see :func:`onnxprune.analysis.weights.to_kn`).
        criterion: ``magnitude``, ``wanda`` or ``sparsegpt``.
        sparsity: Unstructured share to prune (``magnitude``: exactly ``floor(sparsity * size)`` per
            weight, or ``floor(sparsity * K)`` per output column when ``options.scope == "row"``).
        nm: ``(n, m)`` for N:M along K (``K % m == 0``).
        keep_mask_kn: Bool ``[K, N]``; False positions are pruned first and never revived.
        stats: Calibration statistics of this weight's input (wanda / sparsegpt).
        options: The pass options (criterion-specific settings such as ``blocksize``).

    Returns:
        The new ``[K, N]`` weight in ``W_kn``'s dtype.

    Raises:
        PipelineError: neither or both of ``sparsity``/``nm``, unknown criterion.
        CalibrationError: a calibration criterion without statistics.
    """
    if (sparsity is None) == (nm is None):
        raise PipelineError("prune_weight_kn: give exactly one of sparsity or nm")
    if criterion not in CRITERIA:
        raise PipelineError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if criterion == "magnitude":
        scores = magnitude_scores(W_kn)
        if sparsity is not None and getattr(options, "scope", None) == "row":  # per output, along K
            mask = column_topk_mask(apply_keep_mask(scores, keep_mask_kn), sparsity)
            if keep_mask_kn is not None:
                mask &= keep_mask_kn
        else:
            mask = mask_from_scores(scores, sparsity=sparsity, nm=nm, keep_mask=keep_mask_kn)
        return apply_mask(W_kn, mask)
    if stats is None:
        raise CalibrationError(f"criterion {criterion} needs calibration data (--calib FILE.npz)")

    if criterion == "wanda":
        sumsq = stats["sumsq"] if isinstance(stats, dict) else stats
        new, _ = wanda_prune(W_kn, sumsq, sparsity=sparsity, nm=nm, keep_mask=keep_mask_kn)
        return new
    H = stats["H"] if isinstance(stats, dict) else stats
    kwargs = {}
    for key in ("blocksize", "percdamp", "backend"):
        if options is not None and hasattr(options, key):
            kwargs[key] = getattr(options, key)
    new, _ = sparsegpt_prune(W_kn, H, sparsity=sparsity, nm=nm, keep_mask=keep_mask_kn, **kwargs)
    return new
