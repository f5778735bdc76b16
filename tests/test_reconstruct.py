"""Tests of the layer-wise least-squares re-fit (onnxprune.criteria.reconstruct) against direct lstsq."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune.criteria.reconstruct as rc
from onnxprune.criteria.reconstruct import layer_errors, refit
from onnxprune.errors import PipelineError


def _layer(K: int = 24, N: int = 10, T: int = 300, noise: float = 0.3, seed: int = 0):
    """Correlated dense inputs X_d, perturbed pruned inputs X_p, a weight and a random mask."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)) / np.sqrt(K) + np.eye(K)
    Xd = rng.standard_normal((T, K)) @ mix * np.exp(rng.standard_normal(K))
    Xp = Xd + noise * rng.standard_normal((T, K))
    W = rng.standard_normal((K, N))
    M = rng.random((K, N)) > 0.5
    return Xd, Xp, W, M


def _lstsq(Xd: np.ndarray, Xp: np.ndarray, W: np.ndarray, M: np.ndarray) -> np.ndarray:
    ref = np.zeros((Xp.shape[1], W.shape[1]))
    for n in range(W.shape[1]):
        S = M[:, n]
        ref[S, n] = np.linalg.lstsq(Xp[:, S], Xd @ W[:, n], rcond=None)[0]
    return ref


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_masked_refit_equals_lstsq(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rc, "_BATCH_BYTES", 8 * 12 * 12 * 3)  # several padded batches in `direct`
    Xd, Xp, W, M = _layer()
    Wn, info = refit(W, M, Xp.T @ Xp, Xp.T @ Xd, Xd.T @ Xd, damp=0.0, method=method, tol=1e-12, max_iter=500)
    ref = _lstsq(Xd, Xp, W, M)
    np.testing.assert_allclose(Wn, ref, rtol=1e-6, atol=1e-8)
    assert not Wn[~M].any()
    # the reported errors are the real ones
    assert info.err_after == pytest.approx(np.linalg.norm(Xd @ W - Xp @ Wn) ** 2, rel=1e-9)
    assert info.err_before == pytest.approx(np.linalg.norm(Xd @ W - Xp @ (W * M)) ** 2, rel=1e-9)
    assert info.reference == pytest.approx(np.linalg.norm(Xd @ W) ** 2, rel=1e-9)
    assert info.err_after < info.err_before and info.improved == W.shape[1]


def test_parallel_refit_without_cross_term() -> None:
    """C=None: the pruned layer sees the dense inputs; the solution is lstsq on X_d."""
    Xd, _, W, M = _layer(seed=1)
    Wn, info = refit(W, M, Xd.T @ Xd, damp=0.0, method="direct")
    np.testing.assert_allclose(Wn, _lstsq(Xd, Xd, W, M), rtol=1e-6, atol=1e-8)
    assert info.rel_after < info.rel_before


def test_row_structured_refit_one_solve() -> None:
    """Removed input rows (every output keeps the same rows): one shared solve, K < Kd."""
    Xd, Xp, W, _ = _layer(K=20, N=7, seed=2)
    keep = np.sort(np.random.default_rng(3).choice(20, 12, replace=False))
    Xk = Xp[:, keep]
    for mask in (None, np.ones((12, 7), dtype=bool)):
        Wn, info = refit(W, mask, Xk.T @ Xk, Xk.T @ Xd, Xd.T @ Xd, W0=W[keep], damp=0.0, method="auto")
        assert info.method == "direct" and Wn.shape == (12, 7)
        np.testing.assert_allclose(Wn, np.linalg.lstsq(Xk, Xd @ W, rcond=None)[0], rtol=1e-6, atol=1e-8)
        assert info.err_after == pytest.approx(np.linalg.norm(Xd @ W - Xk @ Wn) ** 2, rel=1e-9)


def test_shared_and_single_kept_sets_mixed() -> None:
    """N:M-like columns sharing patterns and unique columns in one weight."""
    Xd, Xp, W, M = _layer(K=16, N=12, seed=4)
    M[:, :6] = M[:, [0]]  # six outputs share one kept set
    Wn, _ = refit(W, M, Xp.T @ Xp, Xp.T @ Xd, Xd.T @ Xd, damp=0.0, method="direct")
    np.testing.assert_allclose(Wn, _lstsq(Xd, Xp, W, M), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_never_increases_the_error(method: str) -> None:
    """A heavily damped re-fit is worse than an already optimal start: every output keeps W0."""
    Xd, Xp, W, M = _layer(seed=5)
    G, C, D = Xp.T @ Xp, Xp.T @ Xd, Xd.T @ Xd
    best = _lstsq(Xd, Xp, W, M)
    Wn, info = refit(W, M, G, C, D, W0=best, damp=100.0, method=method)
    np.testing.assert_array_equal(Wn, best)
    assert info.improved == 0 and info.err_after == info.err_before
    # with a mixed start (half the outputs optimal), only the others change
    start = np.where(np.arange(W.shape[1]) < 5, best, W * M)
    Wn, info = refit(W, M, G, C, D, W0=start, damp=0.01, method=method)
    per0 = layer_errors(start, C @ W, G, np.einsum("kn,kn->n", W, D @ W))
    per1 = layer_errors(Wn, C @ W, G, np.einsum("kn,kn->n", W, D @ W))
    assert np.all(per1 <= per0 + 1e-9) and info.err_after < info.err_before


def test_dead_inputs_keep_their_value_and_dtype() -> None:
    Xd, Xp, W, M = _layer(seed=6)
    Xp[:, 3] = 0.0
    W32 = W.astype(np.float32)
    Wn, _ = refit(W32, M, Xp.T @ Xp, Xp.T @ Xd, Xd.T @ Xd, method="cg")
    assert Wn.dtype == np.float32
    np.testing.assert_array_equal(Wn[3], (W32 * M)[3])


def test_bad_shapes_raise() -> None:
    Xd, Xp, W, M = _layer(K=8, N=4, seed=7)
    G = Xp.T @ Xp
    with pytest.raises(PipelineError, match="D"):
        refit(W, M, G, Xp.T @ Xd)
    with pytest.raises(PipelineError, match="mask shape"):
        refit(W, M[:, :2], G)
    with pytest.raises(PipelineError, match="W0"):
        refit(W, None, G[:4, :4], (Xp.T @ Xd)[:4], Xd.T @ Xd)
    with pytest.raises(PipelineError, match="method"):
        refit(W, M, G, method="qr")
    with pytest.raises(PipelineError, match="damp"):
        refit(W, M, G, damp=-1.0)
