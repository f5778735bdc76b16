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

:func:`prune_with_calibration` is the model-level driver the ``masks``/``nm`` passes call: it
collects statistics (parallel or sequential, see :mod:`onnxprune.analysis.calibration`),
optionally allocates per-layer sparsities (:mod:`onnxprune.allocation`), prunes every weight in
its ``[K, N]`` view and writes it back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxprune.errors import PipelineError
from onnxprune.progress import progress

__all__ = ["apply_keep_mask", "nm_groups_ok", "prune_with_calibration", "sparsegpt_prune", "wanda_prune",
           "wanda_scores"]


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
        W[dead, :] = 0.0
    damp = percdamp * float(np.mean(np.diag(H)))
    H[np.diag_indices_from(H)] += damp
    # Upper Cholesky factor of H⁻¹ with one factorisation: with J the reversal permutation,
    # chol(J H J) = M gives H = R Rᵀ for the upper-triangular R = J M J, so H⁻¹ = R⁻ᵀ R⁻¹ and
    # U = R⁻¹ (upper, positive diagonal) satisfies H⁻¹ = UᵀU.
    for attempt in range(6):
        try:
            M = np.linalg.cholesky(H[::-1, ::-1])
            break
        except np.linalg.LinAlgError:
            # numerically indefinite: add more dampening and retry
            H[np.diag_indices_from(H)] += max(damp, 1e-8) * (10.0 ** attempt)
    else:  # pragma: no cover - only for pathological inputs
        raise PipelineError("sparsegpt: the Hessian is not positive definite even after dampening")
    R = np.ascontiguousarray(M[::-1, ::-1])
    return _upper_inverse(R)


def _upper_inverse(R: np.ndarray) -> np.ndarray:
    """Inverse of an upper-triangular matrix (LAPACK ``trtri`` when SciPy is present)."""
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover - numpy fallback (LU; slower, same result)
        return np.triu(np.linalg.inv(R))
    inv, info = lapack.dtrtri(R, lower=0)
    if info != 0:  # pragma: no cover - singular only if the factorisation failed
        return np.triu(np.linalg.inv(R))
    return np.triu(inv)


def _single_thread_blas() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread (``threadpoolctl``, when installed) for the many small products.

    SparseGPT issues thousands of small BLAS/LAPACK calls; a multi-threaded BLAS spends more time
    synchronising its threads than computing (measured on 2 shared cores: 3.4 s vs 0.04 s for a
    384×384 layer). Without ``threadpoolctl`` this is a no-op.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


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
    with _single_thread_blas():
        return _sparsegpt(W_kn, H, sparsity, nm, blocksize, percdamp, keep_mask)


def _sparsegpt(W_kn: np.ndarray, H: np.ndarray, sparsity: float | None, nm: tuple[int, int] | None,
               blocksize: int, percdamp: float, keep_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The SparseGPT loop of :func:`sparsegpt_prune` (arguments already checked)."""
    K, N = W_kn.shape
    if nm is not None:
        n, m = nm
        blocksize = -(-blocksize // m) * m
        full = (K // m) * m
    W = W_kn.astype(np.float64)  # rows = input channels k (the paper's columns), cols = outputs
    forced = None if keep_mask is None else ~keep_mask
    U = _prepare_hinv(H, W, percdamp)
    pruned = np.zeros((K, N), dtype=bool)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = np.diag(U1).copy()
        m1 = pruned[i1:i2]  # view: written in place
        f1 = None if forced is None else forced[i1:i2]
        if nm is None:
            sal = W1 ** 2 / d1[:, None] ** 2
            if f1 is not None:
                sal = np.where(f1, -np.inf, sal)
            n_prune = int(sal.size * sparsity)
            if n_prune:
                flat = np.argpartition(sal.ravel(), n_prune - 1)[:n_prune]
                m1[np.unravel_index(flat, m1.shape)] = True
        for i in range(i2 - i1):
            col = i1 + i
            if nm is not None and i % m == 0 and col + m <= full:
                sal = W1[i:i + m] ** 2 / d1[i:i + m, None] ** 2
                if f1 is not None:
                    sal = np.where(f1[i:i + m], -np.inf, sal)
                low = np.argsort(sal, axis=0, kind="stable")[: m - n]
                np.put_along_axis(m1[i:i + m], low, True, axis=0)
            w = W1[i]
            err = np.where(m1[i], w, 0.0) / d1[i]  # (w - q) / d with q = w masked
            W1[i:] -= U1[i, i:, None] * err[None, :]
            W1[i] = np.where(m1[i], 0.0, W1[i])
            E1[i] = err
        W[i1:i2] = W1
        if i2 < K:
            W[i2:] -= U[i1:i2, i2:].T @ E1
    if forced is not None:
        pruned |= forced
    W[pruned] = 0.0
    keep = ~pruned
    return W.astype(W_kn.dtype), keep


# ---------------------------------------------------------------------- model-level driver
def prune_with_calibration(
    model: Any,
    weights: Sequence[Any],
    calib: Any,
    *,
    criterion: str,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    mode: str = "parallel",
    blocksize: int = 128,
    percdamp: float = 0.01,
    allocation: str = "uniform",
    owl_lambda: float = 0.08,
    owl_m: float = 5.0,
    mask_input: str | None = "auto",
    chunk_bytes: int | None = None,
    sparsities: Mapping[str, float] | None = None,
    stage_group: int = 1,
    owl_blocks: str | None = None,
) -> dict[str, Any]:
    """Prune ``weights`` of ``model`` in place with ``wanda`` or ``sparsegpt``.

    Statistics come from :func:`onnxprune.analysis.calibration.calibration_stages` (``parallel``:
    one pass over the dense model; ``sequential``: one pass per depth stage on the model pruned so
    far). Existing zeros of a weight are kept zero and count towards its target. With
    ``allocation="owl"`` (unstructured only) every weight gets its own sparsity from
    :func:`onnxprune.allocation.owl_sparsities`, computed from Wanda scores on the dense model
    (one extra sums-of-squares pass unless the statistics are already at hand).

    Args:
        model: The :class:`~onnxprune.model.Model` (changed in place).
        weights: :class:`~onnxprune.analysis.weights.WeightInfo` of the weights to prune.
        calib: :class:`~onnxprune.analysis.calibration.CalibrationData`, or anything its ``from_any``
            takes (None raises).
        criterion: ``wanda`` or ``sparsegpt``.
        sparsity: Global unstructured target (or give ``nm``).
        nm: ``(n, m)`` pattern along K.
        mode: ``parallel`` or ``sequential``.
        blocksize: SparseGPT block of input channels.
        percdamp: SparseGPT dampening share of the mean Hessian diagonal.
        allocation: ``uniform`` or ``owl``.
        owl_lambda: OWL's maximal deviation from the target.
        owl_m: OWL's outlier threshold (multiple of the layer mean score).
        owl_blocks: Regex grouping weights into OWL blocks (see
            :func:`onnxprune.allocation.block_keys`); None: every weight on its own.
        mask_input: Attention-mask input name, ``auto`` or None.
        chunk_bytes: Accumulator budget per calibration pass (default 1 GiB).
        sparsities: Explicit per-weight sparsities (override ``sparsity`` and ``allocation``).
        stage_group: Sequential mode: depth stages per calibration pass (1 = one pass per stage;
            4 = one per BERT layer).

    Returns:
        ``{"sparsity": {weight: achieved}, "target": {weight: target}, "skipped": {weight: reason},
        "stages": int, "calibration_s": float, "prune_s": float}``.

    Raises:
        CalibrationError: no calibration data, or data ONNX Runtime cannot run.
        PipelineError: bad criterion, mode, allocation or pattern.
    """
    import time

    from onnxprune.allocation import ALLOCATIONS, owl_for_weights
    from onnxprune.analysis.calibration import (
        DEFAULT_CHUNK_BYTES,
        CalibrationData,
        calib_targets,
        calibration_stages,
    )
    from onnxprune.analysis.weights import from_kn, to_kn
    from onnxprune.errors import CalibrationError

    if criterion not in ("wanda", "sparsegpt"):
        raise PipelineError(f"prune_with_calibration: criterion must be wanda or sparsegpt, got {criterion!r}")
    if calib is None:
        raise CalibrationError(f"criterion {criterion} needs calibration data (--calib DATA.npz, or "
                               "optimize(..., calibration=...))")
    if mode not in ("parallel", "sequential"):
        raise PipelineError(f"mode must be parallel or sequential, got {mode!r}")
    if not isinstance(calib, CalibrationData):
        calib = CalibrationData.from_any(calib, model)
    if allocation not in ALLOCATIONS:
        raise PipelineError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if allocation != "uniform" and nm is not None:
        raise PipelineError("allocation=owl applies to unstructured sparsity, not to N:M patterns")
    chunk = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    skipped: dict[str, str] = {}
    usable = []
    for w in weights:
        if w.k_axis is None or w.conflict:
            skipped[w.name] = w.conflict or "K axis not traceable"
        elif w.quant is not None:
            skipped[w.name] = "quantized weight (DequantizeLinear) is not supported by calibration criteria"
        else:
            usable.append(w)
    targets = calib_targets(model, usable)
    for t in targets:
        if t.skip_reason:
            skipped[t.weight] = t.skip_reason
    info = {w.name: w for w in usable}
    targets = [t for t in targets if not t.skip_reason]
    kind = "hessian" if criterion == "sparsegpt" else "sumsq"
    t_cal = 0.0
    t0 = time.perf_counter()
    goal: dict[str, float] = {}
    if sparsities is not None:
        goal = {t.weight: float(sparsities.get(t.weight, sparsity or 0.0)) for t in targets}
    elif nm is None:
        if sparsity is None:
            raise PipelineError("give sparsity or nm")
        goal = {t.weight: float(sparsity) for t in targets}
        if allocation == "owl" and targets:
            goal.update(owl_for_weights(model, [info[t.weight] for t in targets], calib, float(sparsity),
                                        lam=owl_lambda, m=owl_m, blocks=owl_blocks,
                                        token_mask_input=mask_input))
    t_cal += time.perf_counter() - t0
    achieved: dict[str, float] = {}
    t_prune = 0.0
    n_stages = 0
    stages = calibration_stages(model, targets, calib, kind=kind, mode=mode, token_mask_input=mask_input,
                                chunk_bytes=chunk, stage_group=stage_group)
    while True:
        t0 = time.perf_counter()
        try:
            stage, stats = next(stages)
        except StopIteration:
            break
        t_cal += time.perf_counter() - t0
        n_stages += 1
        t0 = time.perf_counter()
        for t in progress(stage, total=len(stage), desc=f"{criterion} pruning", unit="layer"):
            w = info[t.weight]
            s = stats.get(t.weight)
            if s is None:
                skipped[t.weight] = "inconsistent statistics across its consumers"
                continue
            arr = np.asarray(model.get_array(t.weight))
            W_kn = to_kn(arr, w)
            zeros = W_kn == 0
            keep = ~zeros if zeros.any() else None
            sp = None if nm is not None else goal[t.weight]
            if criterion == "wanda":
                new_kn, _ = wanda_prune(W_kn, s["sumsq"], sparsity=sp, nm=nm, keep_mask=keep)
            else:
                new_kn, _ = sparsegpt_prune(W_kn, s["H"], sparsity=sp, nm=nm, blocksize=blocksize,
                                            percdamp=percdamp, keep_mask=keep)
            model.set_array(t.weight, from_kn(new_kn, w).astype(arr.dtype))
            achieved[t.weight] = float(np.count_nonzero(new_kn == 0)) / new_kn.size
        t_prune += time.perf_counter() - t0
    return {"sparsity": achieved, "target": goal, "skipped": skipped, "stages": n_stages,
            "calibration_s": round(t_cal, 3), "prune_s": round(t_prune, 3)}
