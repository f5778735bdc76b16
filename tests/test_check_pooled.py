"""Mean-pooled cosine in the check path (sentence-embedding drift)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.check import compare, mean_pooled_cosine
from onnxprune.cli import main
from models import build_transformer_block, random_inputs


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
    assert main(["check", str(path), str(out), "--inputs", str(tmp_path / "in.npz"), "--pool", "mean"]) == 0
