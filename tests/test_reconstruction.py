"""Structured reconstruction: ``reconstruct=true`` and ``criterion=reconstruction`` on heads / ffn / channels.

Oracles: a direct ``np.linalg.lstsq`` on the consumer's calibration inputs (with a ones column
for the bias), brute-force single removals for the greedy order, the calibration error of the
plain removal (the re-fit may never be worse), and ONNX Runtime running the result.
"""

from __future__ import annotations

import numpy as np
import onnx

from models import build_cnn, build_transformer_block, random_inputs
from models.attention import E, GraphBuilder
from onnxprune import optimize
from onnxprune.check import run_model
from onnxprune.criteria.structured import allocate, reconstruction_order
from onnxprune.ir.model import Model


def _mlp(hidden: int = 24, seed: int = 3) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    h = g.n1("Relu", [g.linear("x", E, hidden)])
    return g.model(g.linear(h, hidden, E))


def _weights(proto: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(W_up, b_up, W_down, b_down)`` of :func:`_mlp` in graph order."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    mm = [n for n in proto.graph.node if n.op_type == "MatMul"]
    add = [n for n in proto.graph.node if n.op_type == "Add"]
    return (inits[mm[0].input[1]], inits[add[0].input[1]], inits[mm[1].input[1]], inits[add[1].input[1]])


def _calib(seed: int = 0, batches: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 8, E)).astype(np.float32)} for _ in range(batches)]


def test_order_first_pick_and_cost_match_brute_force_lstsq() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 10)) @ rng.standard_normal((10, 10))
    W = rng.standard_normal((10, 4))
    units = np.arange(10).reshape(5, 2)  # five units of two rows each
    order, costs = reconstruction_order(X.T @ X, W, units, 3, percdamp=0.0, steps=0)
    brute = []
    for u in range(5):
        keep = np.setdiff1d(np.arange(10), units[u])
        sol = np.linalg.lstsq(X[:, keep], X @ W, rcond=None)[0]
        brute.append(float(np.sum((X @ W - X[:, keep] @ sol) ** 2)))
    assert order[0] == int(np.argmin(brute))
    np.testing.assert_allclose(costs[0], min(brute), rtol=1e-6)
    removed = units[order].reshape(-1)  # the cumulative cost is the lstsq error of the final set
    keep = np.setdiff1d(np.arange(10), removed)
    sol = np.linalg.lstsq(X[:, keep], X @ W, rcond=None)[0]
    np.testing.assert_allclose(costs[-1], np.sum((X @ W - X[:, keep] @ sol) ** 2), rtol=1e-6)
    assert np.all(np.diff(costs) >= 0)


def test_allocate_follows_the_smallest_marginal_error() -> None:
    flat, steep = np.array([0.1, 0.2, 0.3, 0.4]), np.array([1.0, 2.0, 3.0, 4.0])
    assert allocate([flat, steep], 4, [4, 4]) == [4, 0]
    assert allocate([flat, np.array([0.05, 0.5, 5.0, 50.0])], 3, [4, 4]) == [2, 1]


def test_ffn_reconstruct_equals_direct_lstsq() -> None:
    proto = _mlp()
    calib = _calib()
    res = optimize(Model(proto), "ffn(ratio=0.5,reconstruct=true,damp=0)", calibration=calib)
    wu, bu, wd, bd = _weights(proto)
    X = np.concatenate([np.maximum(f["x"].reshape(-1, E).astype(np.float64) @ wu + bu, 0) for f in calib])
    m = res.model
    up, down = [n for n in m.graph.node if n.op_type == "MatMul"]
    bias_add = next(n for n in m.graph.node if n.op_type == "Add" and down.output[0] in n.input)
    new_up = m.get_array(up.input[1])
    keep = [k for k in range(24) if np.any(np.all(np.isclose(new_up, wu[:, [k]]), axis=0))]
    assert len(keep) == 12 and new_up.shape == (E, 12)
    Xa = np.hstack([X[:, keep], np.ones((X.shape[0], 1))])
    sol = np.linalg.lstsq(Xa, X @ wd + bd, rcond=None)[0]
    np.testing.assert_allclose(m.get_array(down.input[1]), sol[:-1], rtol=2e-3, atol=2e-4)
    bias = next(x for x in bias_add.input if x != down.output[0])
    np.testing.assert_allclose(m.get_array(bias), sol[-1], rtol=2e-3, atol=2e-4)


def _calib_error(model: Model, ref: Model, calib: list[dict[str, np.ndarray]], out: str) -> float:
    return float(sum(np.sum((run_model(model, f)[out].astype(np.float64) - run_model(ref, f)[out]) ** 2)
                     for f in calib))


def test_reconstruct_never_increases_the_calibration_error() -> None:
    proto = _mlp(hidden=32, seed=7)
    calib = _calib(1, 3)
    dense = Model(proto)
    for spec in ("ffn(ratio=0.25)", "ffn(ratio=0.5,criterion=weighted)", "ffn(ratio=0.75,criterion=reconstruction)"):
        plain = optimize(dense, spec, calibration=calib)
        rec = optimize(dense, spec[:-1] + ",reconstruct=true)", calibration=calib)
        st = rec.report.passes[0].stats
        assert st["refitted"] == 1 and st["refit_rel_error_after"] <= st["refit_rel_error_before"]
        assert _calib_error(rec.model, dense, calib, "y") <= _calib_error(plain.model, dense, calib, "y") * (1 + 1e-5)


def test_reconstruction_criterion_beats_norms_on_calibration_data() -> None:
    proto = _mlp(hidden=32, seed=11)
    calib = _calib(2, 3)
    dense = Model(proto)
    errs = {c: _calib_error(optimize(dense, f"ffn(ratio=0.5,criterion={c},reconstruct=true)", calibration=calib).model,
                            dense, calib, "y") for c in ("l2", "weighted", "reconstruction")}
    assert errs["reconstruction"] <= min(errs["l2"], errs["weighted"])


def test_heads_and_ffn_reconstruct_give_valid_graphs_closer_to_dense() -> None:
    proto = build_transformer_block(layers=2, ffn=64)
    rng_feeds = [random_inputs(proto, batch=8, seq=16, seed=s) for s in range(4)]
    dense = Model(proto)
    held = random_inputs(proto, batch=8, seq=16, seed=99)
    ref = run_model(dense, held)["last_hidden_state"]
    errs = {}
    for extra in ("", ",reconstruct=true", ",reconstruct=true,sequential=true"):
        spec = (f"heads(ratio=0.5,criterion=reconstruction{extra}),"
                f"ffn(ratio=0.5,criterion=reconstruction{extra},scope=global)")
        res = optimize(dense, spec, calibration=rng_feeds)
        assert all(p.stats.get("twin_check", "ok") == "ok" for p in res.report.passes if p.name in ("heads", "ffn"))
        out = run_model(res.model, held)["last_hidden_state"]
        assert out.shape == ref.shape and np.isfinite(out).all()
        errs[extra] = float(np.abs(out - ref).mean())
    assert errs[",reconstruct=true"] < errs[""] and errs[",reconstruct=true,sequential=true"] < errs[""]


def test_channels_reconstruct_cnn_valid_and_each_layer_no_worse() -> None:
    proto = build_cnn(width=16, size=16)
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    dense = Model(proto)
    plain = optimize(dense, "channels(ratio=0.3)", calibration=calib)
    rec = optimize(dense, "channels(ratio=0.3,reconstruct=true)", calibration=calib)
    st = rec.report.passes[0].stats
    assert st["twin_check"] == "ok" and st["refitted"] >= 2 and st["biases_compensated"] >= 1
    for before, after in ((r["rel_before"], r["rel_after"]) for r in st["refit_layers"].values()):
        assert after <= before + 1e-12
    assert rec.model.get_array("classifier.weight").shape == plain.model.get_array("classifier.weight").shape
    assert _calib_error(rec.model, dense, calib, "logits") < _calib_error(plain.model, dense, calib, "logits")
    seq = optimize(dense, "channels(ratio=0.3,reconstruct=true,sequential=true)", calibration=calib)
    st = seq.report.passes[0].stats
    assert st["twin_check"] == "ok" and st["refitted"] >= 2
    for before, after in ((r["rel_before"], r["rel_after"]) for r in st["refit_layers"].values()):
        assert after <= before + 1e-12
    assert _calib_error(seq.model, dense, calib, "logits") < _calib_error(plain.model, dense, calib, "logits")
