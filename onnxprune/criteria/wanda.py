"""Calibration-aware one-shot pruning of one weight: Wanda on ``[K, N]`` weights.

All functions take the weight as ``W_kn`` of shape ``[K, N]``: ``y = x @ W_kn`` with ``x`` of
shape ``[T, K]`` (``T`` calibration tokens). ``K`` is the reduction axis, ``N`` the outputs.

**Wanda** (Sun et al. 2023). With ``s_k = sum_t x[t, k]^2`` the per-input-channel sum of squares,
the score of a weight is ``S[k, n] = |W[k, n]| * sqrt(s_k)``. Scores are compared within each
output column ``n`` (the paper's "per output" comparison group): unstructured sparsity ``p``
zeroes the ``floor(p*K)`` lowest scores of every column; N:M keeps the ``n`` highest scores of every
group of ``m`` consecutive rows along ``K``. The kept weights are not changed.
"""

from __future__ import annotations

import numpy as np

from onnxprune.criteria.masks import (
    apply_keep_mask,
    check_args,
    column_topk_mask,
    nm_mask_along_k,
)
from onnxprune.errors import PipelineError


def wanda_scores(W_kn: np.ndarray, sumsq_k: np.ndarray) -> np.ndarray:
    """Wanda importance ``|W[k, n]| * sqrt(sumsq_k[k])`` (float64, shape ``[K, N]``)."""
    sumsq_k = np.asarray(sumsq_k, dtype=np.float64)
    if sumsq_k.shape != (W_kn.shape[0],):
        raise PipelineError(f"wanda: activation statistics have shape {list(sumsq_k.shape)}, "
                            f"the weight has K = {W_kn.shape[0]}")
    return np.abs(W_kn.astype(np.float64)) * np.sqrt(np.maximum(sumsq_k, 0.0))[:, None]


def wanda_prune(
    W_kn: np.ndarray,
    sumsq_k: np.ndarray,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    keep_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Prune a ``[K, N]`` weight with the Wanda criterion.

    Args:
        W_kn: The weight, ``[K, N]``.
        sumsq_k: Per-input-channel sum of squared activations over the calibration tokens, ``[K]``.
        sparsity: Unstructured share to zero in every output column.
        nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive weights along K.
        keep_mask: Optional ``[K, N]`` bool; False positions are pruned first.

    Returns:
        ``(pruned weight with W's dtype, keep-mask [K, N] bool)``.

    Raises:
        PipelineError: bad shapes or pattern.
    """
    check_args(W_kn, sparsity, nm, "wanda")
    scores = apply_keep_mask(wanda_scores(W_kn, sumsq_k), keep_mask)
    mask = column_topk_mask(scores, sparsity) if nm is None else nm_mask_along_k(scores, *nm)
    if keep_mask is not None:
        mask &= keep_mask
    return np.where(mask, W_kn, 0).astype(W_kn.dtype), mask
