"""Calibration-aware one-shot pruning of one weight: SparseGPT on ``[K, N]`` weights.

All functions take the weight as ``W_kn`` of shape ``[K, N]``: ``y = x @ W_kn`` with ``x`` of
shape ``[T, K]`` (``T`` calibration tokens). ``K`` is the reduction axis, ``N`` the outputs.

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

import contextlib
from typing import Any

import numpy as np

from onnxprune.criteria.backend import Backend, resolve
from onnxprune.criteria.masks import check_args
from onnxprune.errors import PipelineError


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
    del H  # memory: at most two K×K float64 arrays at a time
    R = np.ascontiguousarray(M[::-1, ::-1])
    del M
    return _upper_inverse(R)


def _upper_inverse(R: np.ndarray) -> np.ndarray:
    """Inverse of an upper-triangular matrix (LAPACK ``trtri`` when SciPy is present)."""
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover - numpy fallback (LU; slower, same result)
        return np.triu(np.linalg.inv(R))
    inv, info = lapack.dtrtri(R, lower=0, overwrite_c=1)
    if info != 0:  # pragma: no cover - singular only if the factorisation failed
        return np.triu(np.linalg.inv(R))
    return inv  # trtri leaves the (zero) lower triangle of R as it is


def single_thread_blas() -> contextlib.AbstractContextManager[Any]:
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
    backend: str | Backend | None = "numpy",
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
        backend: ``numpy``, ``torch`` (CUDA when available), ``auto``... (:mod:`onnxprune.criteria.backend`);
            float64 in each, equal to float tolerance.

    Returns:
        ``(updated and pruned weight with W's dtype, keep-mask [K, N] bool)``.

    Raises:
        PipelineError: bad shapes, pattern or options.
    """
    check_args(W_kn, sparsity, nm, "sparsegpt")
    K, N = W_kn.shape
    if H.shape != (K, K):
        raise PipelineError(f"sparsegpt: Hessian shape {list(H.shape)} does not match K = {K}")
    if blocksize < 1:
        raise PipelineError(f"sparsegpt: blocksize must be >= 1, got {blocksize}")
    if percdamp < 0:
        raise PipelineError(f"sparsegpt: percdamp must be >= 0, got {percdamp}")
    be = resolve(backend)
    if be.kind == "torch":
        return _sparsegpt_torch(W_kn, H, sparsity, nm, blocksize, percdamp, keep_mask, be.device)
    if K * max(K, N) >= MULTI_THREAD_ELEMENTS:  # large products: BLAS threads pay for themselves
        return _sparsegpt(W_kn, H, sparsity, nm, blocksize, percdamp, keep_mask)
    with single_thread_blas():
        return _sparsegpt(W_kn, H, sparsity, nm, blocksize, percdamp, keep_mask)


#: ``K · max(K, N)`` from which the numpy solve keeps the BLAS threads (a 2048×2048 layer and up;
#: below it thread synchronisation costs more than it gives, see :func:`single_thread_blas`).
MULTI_THREAD_ELEMENTS = 2048 * 2048


class _NumpyOps:
    """The array calls of :func:`_obs_loop` on numpy."""

    where = staticmethod(np.where)

    @staticmethod
    def copy(a: Any) -> Any:
        return a.copy()

    @staticmethod
    def zeros_like(a: Any) -> Any:
        return np.zeros_like(a)

    @staticmethod
    def size(a: Any) -> int:
        return int(a.size)

    @staticmethod
    def diag(a: Any) -> Any:
        return np.diag(a).copy()

    @staticmethod
    def mark_lowest(mask: Any, sal: Any, count: int) -> None:
        """Set ``mask`` True at the ``count`` smallest entries of ``sal`` (over all of it)."""
        flat = np.argpartition(sal.ravel(), count - 1)[:count]
        mask[np.unravel_index(flat, mask.shape)] = True

    @staticmethod
    def mark_lowest_rows(mask: Any, sal: Any, count: int) -> None:
        """Set ``mask`` True at the ``count`` smallest entries of every column of ``sal`` (stable order)."""
        low = np.argsort(sal, axis=0, kind="stable")[:count]
        np.put_along_axis(mask, low, True, axis=0)


class _TorchOps:
    """The array calls of :func:`_obs_loop` on torch (any device)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.where = torch.where

    @staticmethod
    def copy(a: Any) -> Any:
        return a.clone()

    def zeros_like(self, a: Any) -> Any:
        return self.torch.zeros_like(a)

    @staticmethod
    def size(a: Any) -> int:
        return int(a.numel())

    def diag(self, a: Any) -> Any:
        return self.torch.diagonal(a).clone()

    def mark_lowest(self, mask: Any, sal: Any, count: int) -> None:
        flat = self.torch.topk(sal.flatten(), count, largest=False).indices
        mask.view(-1)[flat] = True

    def mark_lowest_rows(self, mask: Any, sal: Any, count: int) -> None:
        low = self.torch.argsort(sal, dim=0, stable=True)[:count]
        mask.scatter_(0, low, True)


def _obs_loop(xp: Any, W: Any, U: Any, pruned: Any, forced: Any, sparsity: float | None,
              nm: tuple[int, int] | None, blocksize: int) -> None:
    """Steps 4-5 of the module docstring on ``W`` ``[K, N]`` float64 (numpy or torch, changed in place).

    ``U`` is the upper Cholesky factor of ``H⁻¹``, ``pruned`` the ``[K, N]`` bool mask (written in place),
    ``forced`` the positions pruned first (or None); ``xp`` the array calls (:class:`_NumpyOps`,
    :class:`_TorchOps`), so both backends run the same operations in the same order.
    """
    K = W.shape[0]
    if nm is not None:
        n, m = nm
        blocksize = -(-blocksize // m) * m
        full = (K // m) * m
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = xp.copy(W[i1:i2])
        E1 = xp.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = xp.diag(U1)
        m1 = pruned[i1:i2]  # view: written in place
        f1 = None if forced is None else forced[i1:i2]
        if nm is None:
            sal = W1 ** 2 / d1[:, None] ** 2
            if f1 is not None:
                sal = xp.where(f1, -np.inf, sal)
            n_prune = int(xp.size(sal) * sparsity)
            if n_prune:
                xp.mark_lowest(m1, sal, n_prune)
        for i in range(i2 - i1):
            col = i1 + i
            if nm is not None and i % m == 0 and col + m <= full:
                sal = W1[i:i + m] ** 2 / d1[i:i + m, None] ** 2
                if f1 is not None:
                    sal = xp.where(f1[i:i + m], -np.inf, sal)
                xp.mark_lowest_rows(m1[i:i + m], sal, m - n)
            err = xp.where(m1[i], W1[i], 0.0) / d1[i]  # (w - q) / d with q = w masked
            W1[i:] -= U1[i, i:, None] * err[None, :]
            W1[i] = xp.where(m1[i], 0.0, W1[i])
            E1[i] = err
        W[i1:i2] = W1
        if i2 < K:
            W[i2:] -= U[i1:i2, i2:].T @ E1
    if forced is not None:
        pruned |= forced
    W[pruned] = 0.0


def _sparsegpt_torch(W_kn: np.ndarray, H: np.ndarray, sparsity: float | None, nm: tuple[int, int] | None,
                     blocksize: int, percdamp: float, keep_mask: np.ndarray | None,
                     device: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_sparsegpt` in PyTorch (float64 on ``device``): the same steps, operation for operation."""
    import torch

    K, N = W_kn.shape
    W = torch.from_numpy(np.ascontiguousarray(W_kn, dtype=np.float64)).to(device)
    Hd = torch.from_numpy(np.ascontiguousarray(H, dtype=np.float64)).to(device).clone()
    dead = torch.nonzero(torch.diagonal(Hd) <= 0).flatten()
    if dead.numel():
        Hd[dead, dead] = 1.0
        W[dead, :] = 0.0
    damp = percdamp * float(torch.diagonal(Hd).mean())
    Hd.diagonal().add_(damp)
    for attempt in range(6):
        M, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
        if int(info) == 0:
            break
        Hd.diagonal().add_(max(damp, 1e-8) * (10.0 ** attempt))
    else:  # pragma: no cover - only for pathological inputs
        raise PipelineError("sparsegpt: the Hessian is not positive definite even after dampening")
    del Hd
    R = M.flip(0, 1)
    U = torch.linalg.solve_triangular(R, torch.eye(K, dtype=torch.float64, device=device), upper=True)
    del M, R
    forced = None if keep_mask is None else ~torch.from_numpy(np.ascontiguousarray(keep_mask)).to(device)
    pruned = torch.zeros((K, N), dtype=torch.bool, device=device)
    _obs_loop(_TorchOps(), W, U, pruned, forced, sparsity, nm, blocksize)
    return W.cpu().numpy().astype(W_kn.dtype), ~pruned.cpu().numpy()


def _sparsegpt(W_kn: np.ndarray, H: np.ndarray, sparsity: float | None, nm: tuple[int, int] | None,
               blocksize: int, percdamp: float, keep_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The SparseGPT loop of :func:`sparsegpt_prune` (arguments already checked)."""
    K, N = W_kn.shape
    W = W_kn.astype(np.float64)  # rows = input channels k (the paper's columns), cols = outputs
    forced = None if keep_mask is None else ~keep_mask
    U = _prepare_hinv(H, W, percdamp)
    pruned = np.zeros((K, N), dtype=bool)
    _obs_loop(_NumpyOps(), W, U, pruned, forced, sparsity, nm, blocksize)
    return W.astype(W_kn.dtype), ~pruned
