"""Tests of SparseGPT (onnxprune.criteria.sparsegpt.sparsegpt_prune) and the model-level driver."""

from __future__ import annotations

import numpy as np
import pytest

from models import build_transformer_block
from onnxprune import optimize
from onnxprune.analysis.weights import find_weights, to_kn
from onnxprune.check import compare
from onnxprune.criteria.masks import nm_groups_ok
from onnxprune.criteria.registry import prune_weight_kn
from onnxprune.criteria.sparsegpt import _prepare_hinv, sparsegpt_prune
from onnxprune.criteria.wanda import wanda_prune
from onnxprune.errors import PipelineError
from onnxprune.ir.load import from_proto


def _correlated(T: int = 3000, K: int = 96, N: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs with strongly correlated channels of unequal scale, and a random weight."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)) * 0.4 + np.eye(K)
    X = (rng.standard_normal((T, K)) @ mix) * np.exp(0.7 * rng.standard_normal(K))
    W = rng.standard_normal((K, N)).astype(np.float32)
    return X, W


def _err(X: np.ndarray, W: np.ndarray, Wh: np.ndarray) -> float:
    return float(np.linalg.norm(X @ W.astype(np.float64) - X @ Wh.astype(np.float64)))


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"nm": (2, 4)}])
def test_reconstruction_error_below_magnitude_and_wanda(pattern: dict) -> None:
    X, W = _correlated()
    H = X.T @ X
    sumsq = (X ** 2).sum(0)
    Ws, keep = sparsegpt_prune(W, H, blocksize=32, **pattern)
    Ww, _ = wanda_prune(W, sumsq, **pattern)
    Wm, _ = wanda_prune(W, np.ones(W.shape[0]), **pattern)  # magnitude, same comparison groups
    e_s, e_w, e_m = _err(X, W, Ws), _err(X, W, Ww), _err(X, W, Wm)
    assert e_s < e_w < e_m
    want = 0.5 if "nm" in pattern else pattern["sparsity"]
    assert float((Ws == 0).mean()) == pytest.approx(want, abs=1e-3)
    assert np.array_equal(Ws != 0, keep)
    # kept weights were updated (error propagation), not just masked
    assert not np.allclose(Ws[keep], W[keep])
    if "nm" in pattern:
        assert nm_groups_ok(Ws, 2, 4)
        K, N = W.shape
        assert ((Ws.reshape(K // 4, 4, N) != 0).sum(1) == 2).all()  # exactly 2 of 4


def test_update_equals_direct_least_squares_for_one_pruned_input() -> None:
    # Pruning the first input channel (for every output) is one OBS step whose update reaches every
    # other row through U's first row, so it must equal the least-squares refit of the remaining
    # rows: argmin_V ||X W - X[:, 1:] V||.
    X, W = _correlated(T=500, K=8, N=3, seed=1)
    keep = np.ones_like(W, dtype=bool)
    keep[0, :] = False  # forced first; sparsity 1/8 prunes only that row
    Ws, _ = sparsegpt_prune(W, X.T @ X, sparsity=1 / 8, blocksize=8, percdamp=0.0, keep_mask=keep)
    ls, *_ = np.linalg.lstsq(X[:, 1:], X @ W.astype(np.float64), rcond=None)
    assert (Ws[0] == 0).all()
    np.testing.assert_allclose(Ws[1:], ls, rtol=1e-4, atol=1e-4)


def test_hinv_factor_is_upper_cholesky_of_inverse() -> None:
    X, W = _correlated(T=400, K=20, N=2)
    H = X.T @ X
    U = _prepare_hinv(H, W.astype(np.float64).copy(), 0.01)
    Hd = H + 0.01 * np.mean(np.diag(H)) * np.eye(20)
    assert np.allclose(np.tril(U, -1), 0)
    np.testing.assert_allclose(U.T @ U, np.linalg.inv(Hd), rtol=1e-6, atol=1e-10)


def test_dead_inputs_and_options() -> None:
    X, W = _correlated(T=500, K=16, N=4)
    X[:, 3] = 0.0
    Ws, _ = sparsegpt_prune(W, X.T @ X, sparsity=0.25, blocksize=5)
    assert (Ws[3] == 0).all()
    assert np.isfinite(Ws).all()
    with pytest.raises(PipelineError, match="Hessian shape"):
        sparsegpt_prune(W, np.eye(3), sparsity=0.5)
    with pytest.raises(PipelineError, match="blocksize"):
        sparsegpt_prune(W, np.eye(16), sparsity=0.5, blocksize=0)


def test_prune_weight_kn_dispatches_to_sparsegpt() -> None:
    X, W = _correlated(T=500, K=16, N=4)
    H = X.T @ X
    a = prune_weight_kn(W, criterion="sparsegpt", nm=(2, 4), stats={"H": H, "sumsq": np.diag(H)})
    b, _ = sparsegpt_prune(W, H, nm=(2, 4))
    np.testing.assert_array_equal(a, b)


def _feeds(seed: int, n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.ones((4, 12), np.int64)
        mask[0, 8:] = 0
        out.append({"input_ids": rng.integers(0, 100, (4, 12)).astype(np.int64), "attention_mask": mask})
    return out


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_driver_on_transformer_beats_magnitude(mode: str) -> None:
    dense = from_proto(build_transformer_block(layers=2))
    weights = [w for w in find_weights(dense) if not w.skip_reason]
    held = {k: np.concatenate([f[k] for f in _feeds(7, 2)]) for k in ("input_ids", "attention_mask")}

    def cos(model) -> float:
        return compare(dense, model, feeds=held).outputs[0].cosine

    res = optimize(dense.copy(), f"nm(n=2,m=4,criterion=sparsegpt,mode={mode})", calibration=_feeds(0))
    sg = res.model
    assert res.report.passes[0].stats["weights_pruned"] == len(weights)
    mag = dense.copy()
    for w in weights:
        mag.set_array(w.name, prune_weight_kn(to_kn(mag.get_array(w.name), w), criterion="magnitude", nm=(2, 4))
                      .reshape(w.shape))
    for w in weights:
        assert nm_groups_ok(to_kn(sg.get_array(w.name), w), 2, 4)
        assert float((sg.get_array(w.name) == 0).mean()) == pytest.approx(0.5)
    assert cos(sg) > cos(mag)


def test_optimize_nm_sparsegpt_end_to_end(tmp_path) -> None:
    from onnxprune import optimize
    from onnxprune.errors import CalibrationError

    dense = from_proto(build_transformer_block(layers=2))
    feeds = _feeds(0)
    path = tmp_path / "calib.npz"
    np.savez(path, **{k: np.concatenate([f[k] for f in feeds]) for k in ("input_ids", "attention_mask")})
    held = {k: np.concatenate([f[k] for f in _feeds(7, 2)]) for k in ("input_ids", "attention_mask")}
    results = {}
    for spec in ("nm(n=2,m=4,criterion=sparsegpt)", "nm(n=2,m=4,criterion=sparsegpt,mode=sequential,blocksize=32)",
                 "nm(n=2,m=4)"):
        res = optimize(dense, spec, calibration=str(path), calibration_batch=4)
        st = res.report.passes[0].stats
        assert st["weights_targeted"] == 12 and st["sparsity_after"] == pytest.approx(0.5)
        for w in find_weights(res.model):
            if not w.skip_reason:
                assert nm_groups_ok(to_kn(res.model.get_array(w.name), w), 2, 4)
        results[spec] = compare(dense, res.model, feeds=held).outputs[0].cosine
    assert results["nm(n=2,m=4,criterion=sparsegpt)"] > results["nm(n=2,m=4)"]
    assert results["nm(n=2,m=4,criterion=sparsegpt,mode=sequential,blocksize=32)"] > results["nm(n=2,m=4)"]
    with pytest.raises(CalibrationError, match="calibration data"):
        optimize(dense, "nm(criterion=sparsegpt)")
