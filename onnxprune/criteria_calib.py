"""Calibration-aware one-shot pruning of one weight: Wanda and SparseGPT on ``[K, N]`` weights.

All functions take the weight as ``W_kn`` of shape ``[K, N]``: ``y = x @ W_kn`` with ``x`` of
shape ``[T, K]`` (``T`` calibration tokens). ``K`` is the reduction axis, ``N`` the outputs.

**Wanda** (Sun et al. 2023). With ``s_k = sum_t x[t, k]^2`` the per-input-channel sum of squares,
the score of a weight is ``S[k, n] = |W[k, n]| * sqrt(s_k)``. Scores are compared within each
output column ``n`` (the paper's "per output" comparison group): unstructured sparsity ``p``
zeroes the ``floor(p*K)`` lowest scores of every column; N:M keeps the ``n`` highest scores of every
group of ``m`` consecutive rows along ``K``. The kept weights are not changed.

**SparseGPT** (Frantar & Alistarh 2023). The layer-wise problem is
``min ||X W - X Ŵ||²`` subject to the mask, with Hessian ``H = 2 XᵀX`` ``[K, K]``. In the paper's
layout the weight is ``[rows = N outputs, cols = K inputs]``; we work on ``Wᵀ`` internally.

1. Dead inputs (``H[k, k] == 0``) get ``H[k, k] = 1`` and ``W[k, :] = 0``.
2. Dampening: ``H += percdamp * mean(diag H) * I``.
3. ``U = chol(H⁻¹)`` upper-triangular (``H⁻¹ = UᵀU``); ``U`` replaces ``H⁻¹`` in the OBS updates.
4. Columns (input channels ``k``) are processed in blocks of ``blocksize``. In each block the mask
   is chosen adaptively from the *current* (already updated) weights with the OBS saliency
   ``w² / U[k, k]²``: for unstructured sparsity the lowest ``p`` share of the block (over all
   outputs at once, as the reference code does); for N:M the ``m - n`` lowest of every group of
   ``m`` consecutive input channels, per output.
5. Column by column, pruned weights are zeroed and the error ``e = (w - q) / U[k, k]`` is
   propagated to the not-yet-processed columns: ``W[:, k:] -= e ⊗ U[k, k:]`` (inside the block),
   then ``W[:, end:] -= E @ U[block, end:]`` for the rest. So the *kept* weights change.

The loop over columns is over ``K`` (a few thousand at most for the layers we target); every step
is a vectorised rank-1 update over all outputs.

Preconditions: ``W_kn`` is 2-D float; ``sumsq_k`` has ``K`` non-negative entries; ``H`` is
``[K, K]`` symmetric positive semi-definite (e.g. ``XᵀX`` accumulated in float64);
``0 <= sparsity < 1``; for N:M ``0 < n < m``. When ``K % m != 0`` the trailing partial group is
left dense (it cannot hold an N:M pattern).
"""

from __future__ import annotations

import numpy as np

from onnxprune.errors import PipelineError

__all__ = ["apply_keep_mask", "nm_groups_ok", "sparsegpt_prune", "wanda_prune", "wanda_scores"]


def _check_args(W_kn: np.ndarray, sparsity: float | None, nm: tuple[int, int] | None, what: str) -> None:
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


def _column_topk_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask zeroing the ``floor(sparsity*K)`` lowest scores of every column."""
    K = scores.shape[0]
    n_prune = int(np.floor(sparsity * K))
    mask = np.ones(scores.shape, dtype=bool)
    if n_prune == 0:
        return mask
    idx = np.argpartition(scores, n_prune - 1, axis=0)[:n_prune]
    np.put_along_axis(mask, idx, False, axis=0)
    return mask


def _nm_mask_along_k(scores: np.ndarray, n: int, m: int) -> np.ndarray:
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
    _check_args(W_kn, sparsity, nm, "wanda")
    scores = apply_keep_mask(wanda_scores(W_kn, sumsq_k), keep_mask)
    mask = _column_topk_mask(scores, sparsity) if nm is None else _nm_mask_along_k(scores, *nm)
    if keep_mask is not None:
        mask &= keep_mask
    return np.where(mask, W_kn, 0).astype(W_kn.dtype), mask


def _prepare_hinv(H: np.ndarray, W: np.ndarray, percdamp: float) -> np.ndarray:
    """Dead-input handling, dampening and the upper Cholesky factor of H⁻¹ (changes ``W``)."""
    H = np.array(H, dtype=np.float64, copy=True)
    diag = np.diag(H).copy()
    dead = diag <= 0
    if dead.any():
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    damp = percdamp * float(np.mean(np.diag(H)))
    H[np.diag_indices_from(H)] += damp
    for attempt in range(6):
        try:
            L = np.linalg.cholesky(H)
            break
        except np.linalg.LinAlgError:
            # numerically indefinite: add more dampening and retry
            H[np.diag_indices_from(H)] += max(damp, 1e-8) * (10.0 ** attempt)
    else:  # pragma: no cover - only for pathological inputs
        raise PipelineError("sparsegpt: the Hessian is not positive definite even after dampening")
    # H⁻¹ = L⁻ᵀ L⁻¹; its upper Cholesky factor U satisfies H⁻¹ = UᵀU.
    Linv = np.linalg.solve(L, np.eye(L.shape[0]))  # lower triangular
    Hinv = Linv.T @ Linv
    return np.linalg.cholesky(Hinv).T


def sparsegpt_prune(
    W_kn: np.ndarray,
    H: np.ndarray,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    keep_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Prune a ``[K, N]`` weight with SparseGPT (OBS with error propagation).

    Args:
        W_kn: The weight, ``[K, N]``.
        H: ``[K, K]`` Hessian proxy ``XᵀX`` (the factor 2 cancels; scaling does not matter).
        sparsity: Unstructured share to zero (per block of ``blocksize`` input channels).
        nm: ``(n, m)`` pattern along K.
        blocksize: Input channels per lazy-update block (rounded up to a multiple of ``m``).
        percdamp: Dampening as a share of the mean Hessian diagonal.
        keep_mask: Optional ``[K, N]`` bool; False positions are pruned first.

    Returns:
        ``(updated and pruned weight with W's dtype, keep-mask [K, N] bool)``.

    Raises:
        PipelineError: bad shapes, pattern or options.
    """
    _check_args(W_kn, sparsity, nm, "sparsegpt")
    K, N = W_kn.shape
    if H.shape != (K, K):
        raise PipelineError(f"sparsegpt: Hessian shape {list(H.shape)} does not match K = {K}")
    if blocksize < 1:
        raise PipelineError(f"sparsegpt: blocksize must be >= 1, got {blocksize}")
    if percdamp < 0:
        raise PipelineError(f"sparsegpt: percdamp must be >= 0, got {percdamp}")
    if nm is not None:
        n, m = nm
        blocksize = -(-blocksize // m) * m
        full = (K // m) * m
    W = W_kn.astype(np.float64).T.copy()  # paper layout [rows = N, cols = K]
    forced = None if keep_mask is None else ~keep_mask.T
    U = _prepare_hinv(H, W, percdamp)
    mask = np.zeros((N, K), dtype=bool)  # True = pruned
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = np.diag(U1)
        m1 = np.zeros(W1.shape, dtype=bool)
        f1 = None if forced is None else forced[:, i1:i2]
        if nm is None:
            sal = W1 ** 2 / d1[None, :] ** 2
            if f1 is not None:
                sal = np.where(f1, -np.inf, sal)
            n_prune = int(sal.size * sparsity)
            if n_prune:
                flat = np.argpartition(sal.ravel(), n_prune - 1)[:n_prune]
                m1.ravel()[flat] = True
        for i in range(i2 - i1):
            col = i1 + i
            if nm is not None and i % m == 0 and col + m <= full:
                sal = W1[:, i:i + m] ** 2 / d1[None, i:i + m] ** 2
                if f1 is not None:
                    sal = np.where(f1[:, i:i + m], -np.inf, sal)
                low = np.argsort(sal, axis=1, kind="stable")[:, : m - n]
                np.put_along_axis(m1[:, i:i + m], low, True, axis=1)
            w = W1[:, i]
            q = np.where(m1[:, i], 0.0, w)
            Q1[:, i] = q
            err = (w - q) / d1[i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = m1
        if i2 < K:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if forced is not None:
        mask |= forced
        W[mask] = 0.0
    keep = ~mask.T
    return np.ascontiguousarray(W.T).astype(W_kn.dtype), keep
