"""Mean-pooled cosine in the check path (sentence-embedding drift)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from models import build_transformer_block, random_inputs
from onnxprune.check import compare, mean_pooled_cosine
from onnxprune.cli import main


def test_mean_pooled_cosine_matches_direct_computation() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5, 8))
    b = a + 0.3 * rng.standard_normal((3, 5, 8))
    mask = np.ones((3, 5), dtype=np.int64)
    mask[1, 3:] = 0
    got = mean_pooled_cosine(a, b, mask)
    want = []
    for i in range(3):
        keep = mask[i] > 0
        pa, pb = a[i, keep].mean(0), b[i, keep].mean(0)
        want.append(pa @ pb / np.linalg.norm(pa) / np.linalg.norm(pb))
    assert got == pytest.approx(float(np.mean(want)), abs=1e-12)
    # padding must not count: changing padded positions leaves the value unchanged
    b2 = b.copy()
    b2[1, 3:] += 100.0
    assert mean_pooled_cosine(a, b2, mask) == pytest.approx(got, abs=1e-12)
    assert mean_pooled_cosine(a, b2, None) < got


def test_compare_reports_pooled_cosine(tmp_path) -> None:
    proto = build_transformer_block(seed=0)
    path = tmp_path / "t.onnx"
    onnx.save(proto, path)
    model = onnxprune.load(path)
    pruned = onnxprune.optimize(model, "masks(sparsity=0.6)").model
    feeds = random_inputs(proto, batch=2, seq=8)
    same = compare(model, model, feeds=feeds, pool="mean")
    assert same.outputs[0].pooled_cosine == pytest.approx(1.0, abs=1e-9)
    res = compare(model, pruned, feeds=feeds, pool="mean")
    pc = res.outputs[0].pooled_cosine
    assert pc is not None and 0.0 < pc < 1.0 - 1e-6
    np.savez(tmp_path / "in.npz", **feeds)
    out = tmp_path / "p.onnxprune.onnx"
    onnxprune.save(pruned, out)
    args = ["check", str(path), str(out), "--inputs", str(tmp_path / "in.npz"), "--pool", "mean"]
    # 60% masks on a random block miss the default 0.99 gate on the pooled cosine: exit 1 with a verdict
    assert main(args) == 1
    assert main([*args, "--min-cos", f"{pc - 1e-3:.6f}", "--min-top1", "none"]) == 0  # pooled cosine passes
    assert main([*args, "--min-cos", f"{pc + 1e-3:.6f}", "--min-top1", "none"]) == 1


def test_neighbour_agreement_and_sentence_embeddings(tmp_path) -> None:
    from onnxprune.check import make_session, neighbour_agreement, sentence_embeddings

    rng = np.random.default_rng(1)
    e = rng.standard_normal((40, 6))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert neighbour_agreement(e, e, k=5) == 1.0
    perm = rng.permutation(6)
    assert neighbour_agreement(e, e[:, perm], k=5) == 1.0  # rotations of the space keep neighbours
    noisy = e + 2.0 * rng.standard_normal(e.shape)
    assert neighbour_agreement(e, noisy, k=5) < 0.9
    proto = build_transformer_block(seed=0)
    path = tmp_path / "t.onnx"
    onnx.save(proto, path)
    feeds = [random_inputs(proto, batch=2, seq=8, seed=s) for s in range(3)]
    emb = sentence_embeddings(make_session(onnxprune.load(path)), feeds)
    assert emb.shape == (6, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-9)
