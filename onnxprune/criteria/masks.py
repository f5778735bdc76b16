"""Mask maths for unstructured and N:M sparsity, vectorised.

Masks are boolean *keep* masks (True = the weight survives). All functions are pure numpy.

* :func:`topk_mask` — unstructured: prune exactly ``floor(sparsity * size)`` elements, the ones
  with the smallest scores. Ties are broken by flat (C-order) index: among equal scores the lower
  index is pruned first, so the result is deterministic. Cost O(size): one ``np.partition`` to
  find the threshold value, then the ties at the threshold are resolved with a cumulative count.
* :func:`nm_mask` — N:M along axis 0 of a ``[K, N]`` array: for every column and every group of
  ``m`` consecutive rows, keep the ``n`` largest scores (ties: the lower row index is kept).
  For ``m <= 8`` the rank of each element inside its group is computed with ``m²`` vectorised
  comparisons (``rank_i = #{j : s_j > s_i or (s_j == s_i and j < i)}``, keep iff ``rank_i < n``);
  larger ``m`` use a stable argsort along the group axis. Requires ``K % m == 0``.
* :func:`is_nm` — does a ``[K, N]`` array have at most ``n`` non-zeros in every group of ``m``
  consecutive rows? Returns the count of violating groups and the first offending elements.
* :func:`apply_keep_mask`, :func:`column_topk_mask`, :func:`nm_mask_along_k` — the per-column
  variants the calibration criteria (:mod:`~onnxprune.criteria.wanda`,
  :mod:`~onnxprune.criteria.sparsegpt`) share.

Mask persistence: a ``keep_mask_kn`` (the current non-zeros) forces its False positions to be
pruned first (their scores become ``-inf``) and the result is ANDed with it, so a zero never
comes back and existing zeros count towards the target.

Scores are computed in float32 (float16/bfloat16 weights are upcast for scoring only); the
masked weight keeps its own dtype.
"""

from __future__ import annotations

import numpy as np

from onnxprune.errors import PipelineError

_PAIRWISE_MAX_M = 8


def _flat_scores(scores: np.ndarray) -> np.ndarray:
    flat = np.asarray(scores).reshape(-1)
    if flat.dtype.kind != "f" or flat.dtype.itemsize < 4:
        flat = flat.astype(np.float32)
    return flat


def topk_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask pruning exactly ``floor(sparsity * size)`` lowest scores.

    Args:
        scores: Any-shape array of importances (higher = more important; ``-inf`` = prune first).
        sparsity: Share to prune, in ``[0, 1]``.

    Returns:
        Bool array of ``scores.shape``; ties at the threshold are pruned in index order.

    Raises:
        PipelineError: ``sparsity`` outside ``[0, 1]``.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise PipelineError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = _flat_scores(scores)
    size = flat.size
    k = int(np.floor(sparsity * size))
    return _prune_k(flat, k).reshape(np.shape(scores))


def _prune_k(flat: np.ndarray, k: int) -> np.ndarray:
    """Keep-mask over a 1-D score array with exactly ``k`` lowest pruned (index tie-break)."""
    size = flat.size
    if k <= 0:
        return np.ones(size, dtype=bool)
    if k >= size:
        return np.zeros(size, dtype=bool)
    thr = np.partition(flat, k - 1)[k - 1]  # the partitioned copy is freed at once
    keep = flat >= thr
    need = k - (size - int(np.count_nonzero(keep)))  # how many ties to prune, lowest indices first
    if need > 0:
        keep[np.flatnonzero(flat == thr)[:need]] = False
    return keep


def nm_mask(scores_kn: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask with the ``n`` largest of every ``m`` consecutive rows, per column.

    Args:
        scores_kn: ``[K, N]`` scores (``-inf`` = prune first).
        n: Kept per group.
        m: Group length along axis 0.

    Returns:
        Bool ``[K, N]``; exactly ``n`` True per group (ties keep the lower row index).

    Raises:
        PipelineError: bad ``n``/``m`` or ``K % m != 0``.
    """
    _check_nm(n, m)
    s = np.asarray(scores_kn)
    if s.ndim != 2:
        raise PipelineError(f"nm_mask expects a 2-D [K, N] array, got shape {list(s.shape)}")
    K, N = s.shape
    if K % m:
        raise PipelineError(f"K={K} is not a multiple of m={m}")
    if s.dtype.kind != "f" or s.dtype.itemsize < 4:
        s = s.astype(np.float32)
    g = s.reshape(K // m, m, N)
    if m <= _PAIRWISE_MAX_M:
        keep = np.empty(g.shape, dtype=bool)
        for i in range(m):  # loops over the m positions of a group, not over weights
            gi = g[:, i, :]
            rank = np.zeros(gi.shape, dtype=np.int8 if m < 127 else np.int32)
            for j in range(m):
                if j == i:
                    continue
                rank += (g[:, j, :] > gi) if j > i else (g[:, j, :] >= gi)
            keep[:, i, :] = rank < n
        return keep.reshape(K, N)
    order = np.argsort(-g, axis=1, kind="stable")
    keep = np.zeros(g.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :n, :], True, axis=1)
    return keep.reshape(K, N)


def _check_nm(n: int, m: int) -> None:
    if m < 2 or n < 1 or n >= m:
        raise PipelineError(f"N:M needs 1 <= n < m and m >= 2, got {n}:{m}")


def is_nm(arr_kn: np.ndarray, n: int, m: int, max_report: int = 5) -> tuple[bool, int, list[tuple[int, int]]]:
    """Check that every group of ``m`` consecutive rows holds at most ``n`` non-zeros per column.

    Args:
        arr_kn: ``[K, N]`` array (``K % m == 0``).
        n: Allowed non-zeros per group.
        m: Group length along axis 0.
        max_report: How many offending elements to return.

    Returns:
        ``(ok, violating_group_count, first_violations)``; each violation is the ``(row, column)``
        of the first non-zero beyond the ``n`` allowed in a violating group, in row-major group
        order.

    Raises:
        PipelineError: bad ``n``/``m`` or ``K % m != 0``.
    """
    _check_nm(n, m)
    a = np.asarray(arr_kn)
    K, N = a.shape
    if K % m:
        raise PipelineError(f"K={K} is not a multiple of m={m}")
    nz = (a != 0).reshape(K // m, m, N)
    counts = nz.sum(axis=1, dtype=np.int32)
    bad = counts > n
    n_bad = int(np.count_nonzero(bad))
    first: list[tuple[int, int]] = []
    if n_bad:
        for gi, col in np.argwhere(bad)[:max_report]:
            within = np.flatnonzero(nz[gi, :, col])[n]
            first.append((int(gi * m + within), int(col)))
    return n_bad == 0, n_bad, first


def magnitude_scores(W: np.ndarray) -> np.ndarray:
    """``|W|`` in float32 (float64 stays float64)."""
    a = np.asarray(W)
    if a.dtype.kind != "f" or a.dtype.itemsize < 4 or a.dtype == np.float16:
        a = a.astype(np.float32)
    return np.abs(a)


def apply_mask(W: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``W`` with the positions where ``keep`` is False set to exactly ``+0`` (``W``'s dtype).

    Bit-exact ``np.where(keep, W, 0)``, computed as an unsigned-integer multiply of ``W``'s bit
    pattern by the mask (about 3x faster; no ``-0.0``, kept NaN/inf stay as they are).
    """
    W = np.asarray(W)
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(W.dtype.itemsize)
    if uint is None or W.dtype.kind not in "fiuV" or W.shape != keep.shape:
        return np.where(keep, W, np.zeros((), dtype=W.dtype))
    return np.multiply(W.view(uint), keep, dtype=uint).view(W.dtype)


def mask_from_scores(
    scores: np.ndarray,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    keep_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Keep-mask from scores for a sparsity target or an N:M pattern, respecting ``keep_mask``."""
    if keep_mask is not None:
        scores = np.where(keep_mask, scores, -np.inf)
    mask = topk_mask(scores, sparsity) if nm is None else nm_mask(scores, *nm)
    if keep_mask is not None:
        mask &= keep_mask
    return mask


def check_args(W_kn: np.ndarray, sparsity: float | None, nm: tuple[int, int] | None, what: str) -> None:
    if W_kn.ndim != 2:
        raise PipelineError(f"{what}: expected a 2-D [K, N] weight, got shape {list(W_kn.shape)}")
    if (sparsity is None) == (nm is None):
        raise PipelineError(f"{what}: give exactly one of sparsity or nm")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise PipelineError(f"{what}: sparsity must be in [0, 1), got {sparsity}")
    if nm is not None:
        n, m = nm
        if not 0 < n < m:
            raise PipelineError(f"{what}: N:M needs 0 < n < m, got {n}:{m}")


def apply_keep_mask(scores: np.ndarray, keep_mask: np.ndarray | None) -> np.ndarray:
    """Scores with positions outside ``keep_mask`` forced to ``-inf`` (pruned first).

    ``keep_mask`` is True where a weight may be kept (e.g. an earlier pass's surviving weights);
    False positions are pruned before any other.
    """
    if keep_mask is None:
        return scores
    if keep_mask.shape != scores.shape:
        raise PipelineError(f"keep_mask shape {list(keep_mask.shape)} does not match weight {list(scores.shape)}")
    return np.where(keep_mask, scores, -np.inf)


def column_topk_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask zeroing the ``floor(sparsity*K)`` lowest scores of every column."""
    K = scores.shape[0]
    n_prune = int(np.floor(sparsity * K))
    mask = np.ones(scores.shape, dtype=bool)
    if n_prune == 0:
        return mask
    idx = np.argpartition(scores, n_prune - 1, axis=0)[:n_prune]
    np.put_along_axis(mask, idx, False, axis=0)
    return mask


def nm_mask_along_k(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask with the ``n`` highest of every ``m`` consecutive rows (per column)."""
    K, N = scores.shape
    full = (K // m) * m
    mask = np.ones(scores.shape, dtype=bool)
    if full == 0:
        return mask
    g = scores[:full].reshape(K // m, m, N)
    order = np.argsort(g, axis=1, kind="stable")  # ascending
    gmask = np.ones(g.shape, dtype=bool)
    np.put_along_axis(gmask, order[:, : m - n, :], False, axis=1)
    mask[:full] = gmask.reshape(full, N)
    return mask


def nm_groups_ok(W_kn: np.ndarray, n: int, m: int) -> bool:
    """True if every full group of ``m`` rows along K has at most ``n`` non-zeros per column."""
    K, N = W_kn.shape
    full = (K // m) * m
    nnz = (W_kn[:full].reshape(K // m, m, N) != 0).sum(axis=1)
    return bool((nnz <= n).all())
