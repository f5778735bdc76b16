"""Tests of the Wanda criterion (onnxprune.criteria.wanda.wanda_prune) and the OWL allocation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models import build_transformer_block
from onnxprune.analysis.weights import find_weights, to_kn
from onnxprune.criteria.masks import nm_groups_ok
from onnxprune.criteria.owl import outlier_ratio, owl_sparsities, weighted_mean
from onnxprune.criteria.wanda import wanda_prune, wanda_scores
from onnxprune.errors import CalibrationError, PipelineError
from onnxprune.ir.load import from_proto


def _layer(K: int = 16, N: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((K, N)).astype(np.float32)
    sumsq = np.exp(rng.standard_normal(K)) * 10
    return W, sumsq


def test_unstructured_mask_equals_brute_force_ranking() -> None:
    W, sumsq = _layer()
    K, N = W.shape
    new, mask = wanda_prune(W, sumsq, sparsity=0.5)
    norms = np.sqrt(sumsq)
    for n in range(N):  # brute force: rank every weight of the column by |W|·‖X‖ with Python sorting
        scores = [(abs(float(W[k, n])) * float(norms[k]), k) for k in range(K)]
        pruned = {k for _, k in sorted(scores)[: K // 2]}
        assert {k for k in range(K) if not mask[k, n]} == pruned
    assert np.array_equal(new, np.where(mask, W, 0))
    assert (mask.sum(0) == K - K // 2).all()  # per output column


def test_nm_mask_equals_brute_force_and_holds() -> None:
    W, sumsq = _layer(K=16, N=7, seed=3)
    new, mask = wanda_prune(W, sumsq, nm=(2, 4))
    assert nm_groups_ok(new, 2, 4)
    s = wanda_scores(W, sumsq)
    for g, n in itertools.product(range(4), range(7)):
        rows = range(4 * g, 4 * g + 4)
        best = sorted(rows, key=lambda k: -s[k, n])[:2]
        assert {k for k in rows if mask[k, n]} == set(best)


def test_activation_norm_changes_the_choice() -> None:
    # equal |W| everywhere: only the activations decide; low-norm channels go first
    W = np.ones((8, 3), np.float32)
    sumsq = np.array([9, 1, 4, 16, 0.25, 25, 36, 0.5])
    _, mask = wanda_prune(W, sumsq, sparsity=0.5)
    assert set(np.flatnonzero(~mask[:, 0])) == {1, 4, 7, 2}


def test_keep_mask_zeros_stay_zero_and_count() -> None:
    W, sumsq = _layer(K=8, N=4)
    keep = np.ones_like(W, dtype=bool)
    keep[0, :] = False
    new, mask = wanda_prune(W, sumsq, sparsity=0.5, keep_mask=keep)
    assert not mask[0].any() and (new[0] == 0).all()
    assert (mask.sum(0) == 4).all()


def test_bad_args() -> None:
    W, sumsq = _layer()
    with pytest.raises(PipelineError, match="exactly one"):
        wanda_prune(W, sumsq)
    with pytest.raises(PipelineError, match="K = 16"):
        wanda_prune(W, sumsq[:3], sparsity=0.5)
    with pytest.raises(PipelineError, match="0 < n < m"):
        wanda_prune(W, sumsq, nm=(4, 4))


def test_owl_allocation_mean_and_caps() -> None:
    ratios = {"a": 0.01, "b": 0.05, "c": 0.02, "d": 0.03}
    sizes = {"a": 100, "b": 400, "c": 300, "d": 50}
    s = owl_sparsities(ratios, sizes, 0.6, lam=0.1)
    assert weighted_mean(s, sizes) == pytest.approx(0.6, abs=1e-9)
    assert all(0.5 - 1e-12 <= v <= 0.7 + 1e-12 for v in s.values())
    assert s["b"] < s["d"] < s["c"] < s["a"]  # more outliers -> less sparsity
    assert owl_sparsities({"a": 0.1, "b": 0.1}, {"a": 1, "b": 2}, 0.5) == {"a": 0.5, "b": 0.5}
    scores = np.array([1.0] * 99 + [1000.0])
    assert outlier_ratio(scores, 5) == pytest.approx(0.01)


def _calib(seed: int = 0, n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.ones((4, 8), np.int64)
        mask[1, 5:] = 0
        out.append({"input_ids": rng.integers(0, 100, (4, 8)).astype(np.int64), "attention_mask": mask})
    return out


def test_masks_owl_allocation_and_errors() -> None:
    from onnxprune import optimize

    model = from_proto(build_transformer_block(layers=2))
    weights = [w for w in find_weights(model) if not w.skip_reason]
    res = optimize(model, "masks(sparsity=0.6,criterion=wanda,allocation=owl,owl_lambda=0.1)", calibration=_calib())
    pruned = res.model
    achieved = {w.name: float((to_kn(pruned.get_array(w.name), w) == 0).mean()) for w in weights}
    sizes = {w.name: w.size for w in weights}
    # per-layer targets differ (OWL), their parameter-weighted mean is the global target
    assert len(set(np.round(list(achieved.values()), 2))) > 1
    assert weighted_mean(achieved, sizes) == pytest.approx(0.6, abs=0.02)
    assert all(0.6 - 0.1 - 1e-6 - 1.0 / w.shape[0] <= achieved[w.name] <= 0.6 + 0.1 + 1e-6 for w in weights)
    with pytest.raises(CalibrationError, match="needs calibration data"):
        optimize(from_proto(build_transformer_block(layers=2)), "masks(sparsity=0.5,criterion=wanda)")
    with pytest.raises(PipelineError, match="owl"):
        optimize(from_proto(build_transformer_block(layers=2)),
                 "masks(sparsity=0.5,criterion=wanda,allocation=owl,scope=global)", calibration=_calib())


def test_optimize_masks_wanda_end_to_end() -> None:
    from onnxprune import optimize

    dense = from_proto(build_transformer_block(layers=2))
    feeds = _calib()
    res = optimize(dense, "masks(sparsity=0.5,criterion=wanda)", calibration=feeds)
    st = res.report.passes[0].stats
    assert st["weights_targeted"] == 12 and st["sparsity_after"] == pytest.approx(0.5)
    # layer 0's Q reads the embedding rows of the real (unpadded) tokens: compute Wanda directly
    E = dense.get_array("embeddings.word_embeddings.weight").astype(np.float64)
    X = np.concatenate([E[f["input_ids"][f["attention_mask"].astype(bool)]] for f in feeds])
    W = dense.get_array("layer0.attn.q.weight")
    want, _ = wanda_prune(W, (X ** 2).sum(0), sparsity=0.5)
    np.testing.assert_array_equal(res.model.get_array("layer0.attn.q.weight"), want)
    # OWL through the pass: layers differ, the parameter-weighted mean stays at the target
    res = optimize(dense, "masks(sparsity=0.5,criterion=wanda,allocation=owl,owl_lambda=0.1)", calibration=feeds)
    st = res.report.passes[0].stats
    assert st["sparsity_after"] == pytest.approx(0.5, abs=0.01)
    per = [1 - v["nnz_after"] / v["size"] for v in st["weights"].values()]
    assert max(per) - min(per) > 0.05 and all(0.39 <= p <= 0.61 for p in per)
    with pytest.raises(CalibrationError):
        optimize(dense, "masks(criterion=wanda)")
    with pytest.raises(PipelineError, match="scope=layer"):
        optimize(dense, "masks(criterion=wanda,scope=global,allocation=owl)", calibration=feeds)


def test_masks_global_scope_wanda_uses_collected_stats() -> None:
    from onnxprune import optimize

    dense = from_proto(build_transformer_block(layers=2))
    res = optimize(dense, "masks(sparsity=0.6,criterion=wanda,scope=global)", calibration=_calib())
    st = res.report.passes[0].stats
    assert st["sparsity_after"] == pytest.approx(0.6, abs=0.01)
    per = [1 - v["nnz_after"] / v["size"] for v in st["weights"].values()]
    assert max(per) - min(per) > 0.01  # global ranking: layers end up at different sparsities


def test_owl_blocks_share_one_sparsity() -> None:
    from onnxprune.passes.masks import owl_for_weights

    from onnxprune.criteria.owl import block_keys

    model = from_proto(build_transformer_block(layers=2))
    weights = [w for w in find_weights(model) if not w.skip_reason]
    keys = block_keys(weights, r"layer(\d+)\.")
    assert set(keys.values()) == {"block:0", "block:1"}
    with pytest.raises(PipelineError, match="owl_blocks"):
        block_keys(weights, "(")
    goal = owl_for_weights(model, weights, _calib(), 0.6, lam=0.1, blocks=r"layer(\d+)\.")
    per_block = {keys[n]: set() for n in goal}
    for n, v in goal.items():
        per_block[keys[n]].add(round(v, 9))
    assert all(len(v) == 1 for v in per_block.values())
    assert weighted_mean(goal, {w.name: w.size for w in weights}) == pytest.approx(0.6, abs=1e-6)
    assert sorted(round(next(iter(v)), 6) for v in per_block.values()) == [0.5, 0.7]  # two blocks: the caps


def test_cnn_conv_paths() -> None:
    """Conv weights: Wanda's K rows are input channels with Σ x_c² over (B, H, W); grouped convs are
    skipped with a reason; SparseGPT N:M runs through the Conv/Gemm paths."""
    from models import build_cnn, random_inputs
    from onnxprune import optimize

    proto = build_cnn()
    dense = from_proto(proto)
    feeds = [random_inputs(proto, batch=2, seed=s) for s in range(3)]
    res = optimize(dense, "masks(sparsity=0.5,criterion=wanda)", calibration=feeds)
    st = res.report.passes[0].stats
    assert any("grouped Conv" in r for r in st["skipped"].values())
    x = np.concatenate([f["input"] for f in feeds]).astype(np.float64)  # stem.conv reads the graph input
    sumsq = (x ** 2).sum(axis=(0, 2, 3))
    info = next(w for w in find_weights(dense) if w.name == "stem.conv.weight")
    want, _ = wanda_prune(to_kn(dense.get_array(info.name), info), sumsq, sparsity=0.5)
    np.testing.assert_array_equal(to_kn(res.model.get_array(info.name), info), want)
    res = optimize(dense, "nm(n=2,m=4,criterion=sparsegpt)", calibration=feeds)
    st = res.report.passes[0].stats
    assert st["weights_pruned"] >= 3
    for name in st["weights"]:
        w = next(i for i in find_weights(res.model) if i.name == name)
        assert nm_groups_ok(to_kn(res.model.get_array(name), w), 2, 4)
