"""Tests of the mask maths (onnxprune.criteria.masks) and the ``masks`` / ``nm`` passes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxprune
from models import build_mlp, random_inputs
from onnxprune.check import run_model
from onnxprune.cli import main
from onnxprune.criteria.masks import is_nm, nm_mask, topk_mask
from onnxprune.criteria.registry import prune_weight_kn
from onnxprune.errors import CalibrationError, PassError, PipelineError
from onnxprune.ir.load import from_proto
from onnxprune.pipeline.base import PassContext
from onnxprune.pipeline.registry import get_pass

# ---------------------------------------------------------------------- the maths


def test_topk_mask_exact_count_and_index_tiebreak():
    s = np.array([3.0, 1.0, 1.0, 1.0, 0.5, 2.0])
    keep = topk_mask(s, 0.5)  # prune 3: 0.5, then the first two of the tied 1.0s
    np.testing.assert_array_equal(keep, [True, False, False, True, False, True])
    assert topk_mask(s, 0.0).all() and not topk_mask(s, 1.0).any()
    with pytest.raises(PipelineError):
        topk_mask(s, 1.5)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 200), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_topk_mask_matches_sorted_reference(size, sparsity, seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 5, size).astype(np.float32)  # many ties
    keep = topk_mask(s, sparsity)
    k = int(np.floor(sparsity * size))
    ref = np.ones(size, bool)
    ref[np.argsort(s, kind="stable")[:k]] = False
    np.testing.assert_array_equal(keep, ref)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 8), (5, 16), (1, 2)]), st.integers(1, 4), st.integers(1, 5),
       st.integers(0, 2**31 - 1))
def test_nm_mask_matches_argsort_reference(nm, groups, cols, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 3, (groups * m, cols)).astype(np.float32)  # ties
    keep = nm_mask(s, n, m)
    g = s.reshape(groups, m, cols)
    ref = np.zeros(g.shape, bool)
    order = np.argsort(-g, axis=1, kind="stable")
    np.put_along_axis(ref, order[:, :n], True, axis=1)
    np.testing.assert_array_equal(keep, ref.reshape(s.shape))
    assert (keep.reshape(groups, m, cols).sum(axis=1) == n).all()


def test_nm_mask_rejects_bad_shapes():
    with pytest.raises(PipelineError, match="multiple of m=4"):
        nm_mask(np.ones((6, 2)), 2, 4)
    with pytest.raises(PipelineError):
        nm_mask(np.ones((8, 2)), 4, 4)


def test_is_nm_reports_offending_element():
    a = np.zeros((8, 3))
    a[[0, 1], 0] = 1
    a[[4, 5, 6], 2] = 1  # group 1 of column 2 has three non-zeros: row 6 breaks 2:4
    ok, bad, first = is_nm(a, 2, 4)
    assert (ok, bad, first) == (False, 1, [(6, 2)])
    assert is_nm(a[:, :2], 2, 4) == (True, 0, [])


def test_prune_weight_kn_magnitude_persistence_and_dtype():
    W = np.arange(1, 17, dtype=np.float16).reshape(8, 2)
    keep = np.ones_like(W, bool)
    keep[7, 1] = False  # the largest weight is already pruned
    out = prune_weight_kn(W, criterion="magnitude", nm=(2, 4), keep_mask_kn=keep)
    assert out.dtype == np.float16 and out[7, 1] == 0
    assert is_nm(out, 2, 4)[0]
    assert out[6, 1] != 0 and out[5, 1] != 0  # the next two largest of that group survive
    with pytest.raises(CalibrationError):
        prune_weight_kn(W, criterion="wanda", sparsity=0.5)
    with pytest.raises(PipelineError):
        prune_weight_kn(W, criterion="magnitude")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int8])
def test_apply_mask_bit_exact(dtype):
    from onnxprune.criteria.masks import apply_mask

    rng = np.random.default_rng(0)
    W = (rng.standard_normal((8, 6)) * 50).astype(dtype)
    if np.dtype(dtype).kind != "i":
        W[0, :3] = [np.nan, np.inf, -0.0]
    keep = rng.random((8, 6)) < 0.5
    keep[0, :3] = [True, True, False]
    for w, k in ((W, keep), (W.T, keep.T)):  # contiguous and transposed views
        out = apply_mask(w, k)
        ref = np.where(k, w, np.zeros((), w.dtype))
        assert out.dtype == w.dtype
        bits = lambda a: np.ascontiguousarray(a).view(np.uint8)  # noqa: E731  (compare bit patterns)
        np.testing.assert_array_equal(bits(out), bits(ref))


# ---------------------------------------------------------------------- test models
RNG = np.random.default_rng(1)
#: initializer -> the axis K lies on, worked out by hand from the op semantics
EXPECTED_K = {"Wmm": 0, "G0": 0, "G1": 1, "L": 1, "CW": 1, "Wc": 0}


def _vi(name: str, shape: list[int], dtype: int = T.FLOAT) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, dtype, shape)


def zoo_model() -> onnx.ModelProto:
    """MatMul x@W and W@x, Gemm transB 0/1, Conv, and a GPT-2 Conv1D-style [K, N] MatMul + bias."""
    f = lambda *s: (RNG.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    inits = {"Wmm": f(16, 24), "G0": f(24, 16), "G1": f(8, 16), "L": f(8, 16), "CW": f(16, 8, 3, 3),
             "Wc": f(16, 32), "Wc.bias": f(32), "G0.bias": f(16)}
    nodes = [h.make_node("MatMul", ["x", "Wmm"], ["a"], name="mm"),
             h.make_node("Gemm", ["a", "G0", "G0.bias"], ["b"], name="gemm0"),
             h.make_node("Gemm", ["b", "G1"], ["c"], name="gemm1", transB=1),
             h.make_node("Transpose", ["b"], ["bt"], name="tr", perm=[1, 0]),
             h.make_node("MatMul", ["L", "bt"], ["d"], name="left"),
             h.make_node("Conv", ["img", "CW"], ["e"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("MatMul", ["seq", "Wc"], ["f0"], name="c_attn"),
             h.make_node("Add", ["f0", "Wc.bias"], ["f"], name="c_attn.add")]
    g = h.make_graph(nodes, "zoo", [_vi("x", [2, 16]), _vi("img", [1, 8, 5, 5]), _vi("seq", [2, 3, 16])],
                     [_vi("c", [2, 8]), _vi("d", [8, 2]), _vi("e", [1, 16, 5, 5]), _vi("f", [2, 3, 32])],
                     [nh.from_array(v, k) for k, v in inits.items()])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m


def zoo_feeds() -> dict[str, np.ndarray]:
    r = np.random.default_rng(2)
    return {"x": r.standard_normal((2, 16)).astype(np.float32),
            "img": r.standard_normal((1, 8, 5, 5)).astype(np.float32),
            "seq": r.standard_normal((2, 3, 16)).astype(np.float32)}


def _arrays(model: onnxprune.Model) -> dict[str, np.ndarray]:
    return {t.name: np.array(model.get_array(t.name)) for t in model.graph.initializer}


def _twin(proto: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The original model with the given weights substituted by hand."""
    twin = onnx.ModelProto()
    twin.CopyFrom(proto)
    for t in twin.graph.initializer:
        if t.name in weights:
            t.CopyFrom(nh.from_array(weights[t.name], t.name))
    return twin


def _assert_masked_twin(proto: onnx.ModelProto, result: onnxprune.Model, feeds: dict[str, np.ndarray]) -> None:
    """Every weight is the original times its own non-zero mask; ORT outputs equal the hand-made twin."""
    before = _arrays(from_proto(proto))
    after = _arrays(result)
    assert before.keys() == after.keys()
    by_hand = {}
    for name, w in before.items():
        assert after[name].dtype == w.dtype and after[name].shape == w.shape
        by_hand[name] = np.where(after[name] != 0, w, np.zeros((), w.dtype))
        np.testing.assert_array_equal(after[name], by_hand[name])
    out = run_model(result, feeds)
    ref = run_model(from_proto(_twin(proto, by_hand)), feeds)
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=1e-6)


def _run(proto: onnx.ModelProto, spec: str, **kw) -> onnxprune.OptimizeResult:
    return onnxprune.optimize(from_proto(proto), spec, **kw)


# ---------------------------------------------------------------------- nm
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_along_k_for_every_op(n, m):
    proto = zoo_model()
    res = _run(proto, f"nm(n={n},m={m})")
    arrays = _arrays(res.model)
    for name, axis in EXPECTED_K.items():
        w = np.moveaxis(arrays[name], axis, 0)
        counts = (w.reshape(w.shape[0] // m, m, -1) != 0).sum(axis=1)
        assert (counts == n).all(), f"{name}: not {n}:{m} along axis {axis}"
    for bias in ("Wc.bias", "G0.bias"):  # not weights: untouched
        assert np.count_nonzero(arrays[bias]) == arrays[bias].size
    _assert_masked_twin(proto, res.model, zoo_feeds())
    stats = res.report.passes[0].stats
    assert stats["weights_pruned"] == len(EXPECTED_K)
    assert stats["nnz_after"] * m == stats["nnz_before"] * n


def test_nm_skips_k_not_multiple_with_reason():
    W = RNG.standard_normal((6, 4)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g", [_vi("x", [1, 6])],
                     [_vi("y", [1, 4])], [nh.from_array(W, "W")])
    res = _run(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), "nm(n=2,m=4)")
    stats = res.report.passes[0].stats
    assert not res.report.passes[0].modified
    assert "K=6 is not a multiple of m=4" in stats["skipped"]["W"]
    assert any("K=6" in w for w in res.report.warnings)
    np.testing.assert_array_equal(res.model.get_array("W"), W)


# ---------------------------------------------------------------------- masks
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_masks_layer_sparsity_exact(sparsity):
    proto = zoo_model()
    res = _run(proto, f"masks(sparsity={sparsity})")
    arrays = _arrays(res.model)
    for name in EXPECTED_K:
        w = arrays[name]
        assert abs((1 - np.count_nonzero(w) / w.size) - sparsity) <= 1 / w.size, name
        assert np.count_nonzero(w) == w.size - int(np.floor(sparsity * w.size))
    for bias in ("Wc.bias", "G0.bias"):
        assert np.count_nonzero(arrays[bias]) == arrays[bias].size
    _assert_masked_twin(proto, res.model, zoo_feeds())


def test_masks_global_scope_normalises_scale():
    proto = zoo_model()
    for t in proto.graph.initializer:  # make one layer 1000x smaller: raw magnitude would empty it
        if t.name == "G1":
            t.CopyFrom(nh.from_array(nh.to_array(t) * 1e-3, "G1"))
    res = _run(proto, "masks(sparsity=0.6,scope=global)")
    arrays = _arrays(res.model)
    total = sum(arrays[n].size for n in EXPECTED_K)
    nnz = sum(np.count_nonzero(arrays[n]) for n in EXPECTED_K)
    assert total - nnz == int(np.floor(0.6 * total))
    for name in EXPECTED_K:
        assert 0.35 < 1 - np.count_nonzero(arrays[name]) / arrays[name].size < 0.85, name
    _assert_masked_twin(proto, res.model, zoo_feeds())


def test_masks_global_guard_keeps_min_share():
    proto = zoo_model()
    for t in proto.graph.initializer:  # one huge weight dominates the RMS: the rest would all go
        if t.name == "L":
            a = np.full((8, 16), 1e-4, np.float32)
            a[0, 0] = 1e3
            t.CopyFrom(nh.from_array(a, "L"))
    res = _run(proto, "masks(sparsity=0.5,scope=global,min_keep=0.25)")
    assert np.count_nonzero(res.model.get_array("L")) == 32
    assert any("min_keep" in w for w in res.report.warnings)


def test_persistence_masks_then_nm_then_masks():
    proto = zoo_model()
    model = from_proto(proto)
    r1 = onnxprune.optimize(model, "masks(sparsity=0.3)")
    zeros1 = {n: np.array(r1.model.get_array(n)) == 0 for n in EXPECTED_K}
    r2 = onnxprune.optimize(r1.model, "nm(n=2,m=4)")
    for name, axis in EXPECTED_K.items():
        w = np.array(r2.model.get_array(name))
        assert (w[zeros1[name]] == 0).all(), f"{name}: a zero came back"
        moved = np.moveaxis(w, axis, 0)
        assert ((moved.reshape(-1, 4, moved[0].size) != 0).sum(axis=1) <= 2).all()
    r3 = onnxprune.optimize(r2.model, "masks(sparsity=0.3)")  # lower target: nothing revived
    for name in EXPECTED_K:
        a, b = np.array(r2.model.get_array(name)), np.array(r3.model.get_array(name))
        np.testing.assert_array_equal(a, b)
    assert not r3.report.passes[0].modified
    r4 = onnxprune.optimize(r2.model, "masks(sparsity=0.75)")  # existing zeros count towards the target
    for name in EXPECTED_K:
        w = np.array(r4.model.get_array(name))
        assert np.count_nonzero(w) == w.size - int(np.floor(0.75 * w.size))
        assert (w[np.array(r2.model.get_array(name)) == 0] == 0).all()


def test_include_exclude_and_overrides():
    proto = zoo_model()
    res = _run(proto, "masks(sparsity=0.5,include='^G')")
    stats = res.report.passes[0].stats
    assert set(stats["weights"]) == {"G0", "G1", "G0.bias"}  # include admits the bias explicitly
    assert np.count_nonzero(res.model.get_array("G0.bias")) == 8
    assert np.count_nonzero(res.model.get_array("Wmm")) == 16 * 24
    res = _run(proto, "masks(sparsity=0.5,exclude='conv|left')")
    stats = res.report.passes[0].stats
    assert "excluded" in stats["skipped"]["CW"] and "excluded" in stats["skipped"]["L"]
    assert np.count_nonzero(res.model.get_array("CW")) == res.model.get_array("CW").size
    res = _run(proto, "masks(sparsity=0.5,min_params=300)")
    assert set(res.report.passes[0].stats["weights"]) == {"Wmm", "G0", "CW", "Wc"}
    ctx_over = {"masks": {"^G0$": {"sparsity": 0.9}, "^Wc$": {"skip": True}}}
    res = _run(proto, "masks(sparsity=0.5)", recipe_overrides=ctx_over)
    g0 = res.model.get_array("G0")
    assert np.count_nonzero(g0) == g0.size - int(0.9 * g0.size)
    assert np.count_nonzero(res.model.get_array("Wc")) == 16 * 32
    with pytest.raises(PipelineError, match="sparsity"):
        _run(proto, "masks(sparsity=0.5)", recipe_overrides={"masks": {"G0": {"sparsity": 2.0}}})


@pytest.mark.parametrize("spec,match", [
    ("masks(sparsity=1.0)", "sparsity"), ("masks(sparsity=-0.1)", "sparsity"), ("nm(n=4,m=4)", "less than"),
    ("nm(n=2,m=1)", "m"), ("nm(n=0,m=4)", "n"), ("masks(criterion=foo)", "criterion"),
    ("masks(include='(')", "regular expression"), ("masks(scope=global,criterion=sparsegpt)", "global"),
])
def test_bad_options(spec, match):
    with pytest.raises(PipelineError, match=match):
        onnxprune.parse_pipeline(spec)


def test_include_matching_nothing_and_no_weights():
    with pytest.raises(PassError, match="nomatch"):
        _run(zoo_model(), "nm(include=nomatch)")
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"], name="r")], "g", [_vi("x", [2])], [_vi("y", [2])])
    res = _run(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), "masks(sparsity=0.5)")
    assert not res.report.passes[0].modified
    assert any("no prunable weight" in w for w in res.report.warnings)


def test_calibration_criterion_without_data():
    with pytest.raises(CalibrationError, match="calibration"):
        _run(zoo_model(), "nm(criterion=wanda)")


def test_embedding_left_alone_unless_included():
    E = RNG.standard_normal((10, 16)).astype(np.float32)
    g = h.make_graph([h.make_node("Gather", ["E", "ids"], ["e"], name="emb"),
                      h.make_node("MatMul", ["e", "W"], ["y"], name="mm")], "g",
                     [_vi("ids", [3], T.INT64)], [_vi("y", [3, 8])],
                     [nh.from_array(E, "E"), nh.from_array(RNG.standard_normal((16, 8)).astype(np.float32), "W")])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    res = _run(proto, "masks(sparsity=0.5)")
    np.testing.assert_array_equal(res.model.get_array("E"), E)
    assert np.count_nonzero(res.model.get_array("W")) == 64
    res = _run(proto, "masks(sparsity=0.5,include='^E$')")
    assert np.count_nonzero(res.model.get_array("E")) == 80


# ---------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype,np_dtype", [(T.FLOAT16, np.float16), (T.BFLOAT16, ml_dtypes.bfloat16)])
def test_low_precision_weights_keep_their_dtype(tmp_path, dtype, np_dtype):
    W = RNG.standard_normal((16, 8)).astype(np_dtype)
    g = h.make_graph([h.make_node("Cast", ["W"], ["Wf"], to=T.FLOAT, name="cast"),
                      h.make_node("MatMul", ["x", "Wf"], ["y"], name="mm")], "g", [_vi("x", [2, 16])],
                     [_vi("y", [2, 8])], [nh.from_array(W, "W")])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    res = _run(proto, "nm(n=2,m=4)")
    out = tmp_path / "m.onnx"
    onnxprune.save(res.model, out)
    saved = onnx.load(str(out))
    (t,) = [t for t in saved.graph.initializer if t.name == "W"]
    assert t.data_type == dtype
    arr = nh.to_array(t)
    assert arr.dtype == np_dtype
    assert ((arr.reshape(4, 4, 8) != 0).sum(axis=1) == 2).all()
    kept = arr != 0
    np.testing.assert_array_equal(arr[kept], W[kept])
    # the kept ones are the two largest of each group
    mag = np.abs(W.astype(np.float32)).reshape(4, 4, 8)
    assert (np.sort(mag, axis=1)[:, 2:, :].sum() == pytest.approx(np.abs(arr.astype(np.float32)).sum()))
    _assert_masked_twin(proto, res.model, {"x": np.ones((2, 16), np.float32)})


def test_qdq_int8_masked_to_zero_point():
    q = RNG.integers(-100, 100, (16, 8)).astype(np.int8)
    zp = np.arange(-4, 4, dtype=np.int8)
    scale = np.linspace(0.01, 0.1, 8).astype(np.float32)
    g = h.make_graph([h.make_node("DequantizeLinear", ["Wq", "sc", "zp"], ["Wd"], axis=1, name="dq"),
                      h.make_node("MatMul", ["x", "Wd"], ["y"], name="mm")], "g", [_vi("x", [2, 16])],
                     [_vi("y", [2, 8])], [nh.from_array(q, "Wq"), nh.from_array(scale, "sc"), nh.from_array(zp, "zp")])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    for spec in ("nm(n=2,m=4)", "masks(sparsity=0.5)"):
        res = _run(proto, spec)
        new = np.array(res.model.get_array("Wq"))
        assert new.dtype == np.int8
        pruned = new != q
        assert (new[pruned] == np.broadcast_to(zp, q.shape)[pruned]).all()
        deq = (new.astype(np.float32) - zp) * scale
        if spec.startswith("nm"):
            assert ((deq.reshape(4, 4, 8) != 0).sum(axis=1) <= 2).all()
        else:
            assert np.count_nonzero(deq) <= 64
        # ORT result == the original model with q set to its zero point where pruned, by hand
        x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
        by_hand = np.where(deq != 0, q, np.broadcast_to(zp, q.shape)).astype(np.int8)
        twin = run_model(from_proto(_twin(proto, {"Wq": by_hand})), {"x": x})["y"]
        np.testing.assert_array_equal(run_model(res.model, {"x": x})["y"], twin)
        # and ~= x @ dequantized weight (ORT may fuse DQ+MatMul into an integer kernel: loose tolerance)
        np.testing.assert_allclose(twin, x @ deq, rtol=0.05, atol=0.3)
        assert res.report.passes[0].stats["weights"]["Wq"]["nnz_after"] == np.count_nonzero(deq)


# ---------------------------------------------------------------------- CLI
def test_cli_optimize_check_and_inspect(tmp_path, capsys):
    src = tmp_path / "zoo.onnx"
    onnx.save(zoo_model(), str(src))
    out = tmp_path / "zoo.24.onnx"
    # random weights and inputs: 2:4 costs more than the default 0.99 cosine gate, so loosen it
    assert main(["optimize", str(src), "-o", str(out), "--passes", "nm(n=2,m=4)", "--check",
                 "--min-cos", "0.5", "--min-top1", "none"]) == 0
    text = capsys.readouterr().out
    assert "max_abs" in text and "nm" in text and out.is_file()
    assert main(["inspect", str(out), "--nm", "2:4"]) == 0
    text = capsys.readouterr().out
    assert "2:4 sparsity along K: 6 ok, 0 violate, 0 skipped" in text
    assert "TensorRT" in text
    assert main(["inspect", str(src), "--nm", "2:4"]) == 0
    assert "0 ok, 6 violate" in capsys.readouterr().out
    assert main(["optimize", str(src), "-o", str(tmp_path / "x.onnx"), "--passes", "nm(n=4,m=2)"]) == 2
    assert "less than" in capsys.readouterr().err


def test_pass_run_directly_reports_stats():
    model = from_proto(zoo_model())
    res = get_pass("masks")(sparsity=0.5).run(model, PassContext())
    w = res.stats["weights"]["CW"]
    assert w["size"] == 16 * 8 * 9 and w["nnz_before"] == w["size"] and w["nnz_after"] == w["size"] // 2
    assert res.stats["params"] == sum(v["size"] for v in res.stats["weights"].values())


# ---------------------------------------------------------------------- torch-exported models (slow)
def _hand_k_axes(proto: onnx.ModelProto) -> dict[str, int]:
    """K axis per directly-consumed GEMM weight, from the op definitions (independent of the analysis)."""
    inits = {t.name for t in proto.graph.initializer}
    axes = {}
    for n in proto.graph.node:
        attrs = {a.name: h.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "MatMul" and n.input[1] in inits:
            axes[n.input[1]] = 0
        elif n.op_type == "Gemm" and n.input[1] in inits:
            axes[n.input[1]] = 1 if attrs.get("transB", 0) else 0
        elif n.op_type == "Conv" and n.input[1] in inits:
            axes[n.input[1]] = 1
    return axes


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from scripts.export_hf import export_model

    d = tmp_path_factory.mktemp("hf")
    return {kind: export_model(kind, d / f"{kind}.onnx", size="tiny", seq=8, image=32)
            for kind in ("bert", "gpt2", "resnet")}


def _hf_feeds(model: onnxprune.Model) -> dict[str, np.ndarray]:
    from onnxprune.check import make_session, random_feeds

    return random_feeds(make_session(model), dims={"batch": 2, "seq": 8, "height": 32, "width": 32}, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "gpt2", "resnet"])
def test_exported_models_nm_24_every_eligible_weight(exported, kind):
    model = onnxprune.load(exported[kind])
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    before = _arrays(model)
    axes = _hand_k_axes(proto)
    assert axes, "the export should have GEMM weights"
    res = onnxprune.optimize(model, "nm(n=2,m=4)", check=True)
    after = _arrays(res.model)
    eligible = {n: a for n, a in axes.items() if before[n].shape[a] % 4 == 0}
    assert len(eligible) >= (5 if kind == "resnet" else 8)
    for name, arr in after.items():
        if name in eligible:
            w = np.moveaxis(arr, eligible[name], 0)
            assert ((w.reshape(w.shape[0] // 4, 4, -1) != 0).sum(axis=1) == 2).all(), name
        else:
            np.testing.assert_array_equal(arr, before[name], err_msg=f"{name} should be untouched")
    skipped = res.report.passes[0].stats["skipped"]
    assert set(axes) - set(eligible) <= set(skipped)  # e.g. the RGB stem conv (K=3), with a reason
    assert res.report.check is not None and res.report.check.outputs[0].max_abs > 0
    _assert_masked_twin(proto, res.model, _hf_feeds(res.model))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_exported_models_masks_exact_per_weight(exported, kind):
    model = onnxprune.load(exported[kind])
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    res = onnxprune.optimize(model, "masks(sparsity=0.6)")
    stats = res.report.passes[0].stats["weights"]
    assert set(stats) == set(_hand_k_axes(proto))
    for name in stats:
        w = np.array(res.model.get_array(name))
        assert abs((1 - np.count_nonzero(w) / w.size) - 0.6) <= 1 / w.size, name
    _assert_masked_twin(proto, res.model, _hf_feeds(res.model))


def test_cnn_builder_grouped_and_depthwise():
    from models import build_cnn, random_inputs

    proto = build_cnn()
    res = _run(proto, "nm(n=2,m=4)")
    stats = res.report.passes[0].stats
    assert "K=3" in stats["skipped"]["stem.conv.weight"] and "K=1" in stats["skipped"]["dw.conv.weight"]
    assert "grouped" in stats["not_tensorrt_sparse"]["gconv.conv.weight"]  # masked, but marked
    g = np.array(res.model.get_array("gconv.conv.weight"))  # [32, 16, 3, 3], group 2: 2:4 along C/g
    assert ((np.moveaxis(g, 1, 0).reshape(4, 4, -1) != 0).sum(axis=1) == 2).all()
    _assert_masked_twin(proto, res.model, random_inputs(proto))


# ---------------------------------------------------------------------- the large-model path
@pytest.fixture()
def streamed(monkeypatch):
    """Make onnxprune.load take its large-file path (streamed parse, raw data mapped) for small files."""
    import onnxprune.ir.load as load_mod

    monkeypatch.setattr(load_mod, "STREAM_PARSE_BYTES", 0)
    monkeypatch.setattr(load_mod, "INLINE_REF_BYTES", 1024)


def test_streamed_load_masks_and_single_file_save(tmp_path, streamed):
    from models import build_transformer_block, random_inputs

    proto = build_transformer_block(hidden=64, ffn=128, layers=2)
    src = tmp_path / "m.onnx"
    onnx.save(proto, str(src))
    model = onnxprune.load(src)
    assert any(r.inline for r in model.external.values())  # big raw data stays in the file, mapped
    for t in proto.graph.initializer:
        np.testing.assert_array_equal(model.get_array(t.name), nh.to_array(t))
    res = onnxprune.optimize(model, "nm(n=2,m=4)", inplace=True)
    out = tmp_path / "out.onnx"
    onnxprune.save(res.model, out)
    assert not (tmp_path / "out.onnx.data").exists()  # the input was one file: so is the output
    saved = onnx.load(str(out))
    assert all(t.data_location == T.DEFAULT for t in saved.graph.initializer)
    _assert_masked_twin(proto, onnxprune.load(out), random_inputs(proto))
    onnxprune.save(res.model, src, inplace=True)  # over the file the weights are mapped from
    again = onnxprune.load(src)
    for t in saved.graph.initializer:
        np.testing.assert_array_equal(again.get_array(t.name), nh.to_array(t))


def test_streamed_load_rejects_truncated_file(tmp_path, streamed):
    from models import build_transformer_block

    src = tmp_path / "t.onnx"
    data = build_transformer_block().SerializeToString()
    src.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(onnxprune.errors.ModelLoadError, match="corrupt or truncated"):
        onnxprune.load(src)


def test_bench_script_runs_on_a_small_model(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from models import build_transformer_block

    src = tmp_path / "m.onnx"
    onnx.save(build_transformer_block(hidden=64, ffn=128), str(src))
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_masks.py"
    out = subprocess.run([sys.executable, str(script), str(src), "--no-polygraphy", "--json",
                          "--out", str(tmp_path / "o.onnx")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    o = doc["onnxprune"]
    assert o["weights_pruned"] == 6 and o["nm_check"]["ok"] == 6 and o["nm_check"]["violates"] == 0
    assert o["wall_s"] > 0 and o["peak_rss"] > 0


def test_cli_recipe_layer_overrides(tmp_path, capsys):
    src = tmp_path / "zoo.onnx"
    onnx.save(zoo_model(), str(src))
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "masks"\nsparsity = 0.5\n[pass.layers]\n"^G0$" = { sparsity = 0.9 }\n'
                      '"^Wc$" = { skip = true }\n')
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--recipe", str(recipe), "-q"]) == 0
    m = onnxprune.load(out)
    g0, wmm = m.get_array("G0"), m.get_array("Wmm")
    assert np.count_nonzero(g0) == g0.size - int(0.9 * g0.size)
    assert np.count_nonzero(wmm) == wmm.size // 2
    assert np.count_nonzero(m.get_array("Wc")) == 16 * 32


@pytest.mark.parametrize("spec", ["masks(sparsity=0.5)", "masks(sparsity=0.5,scope=global)", "nm(n=2,m=4)"])
def test_progress_bars_do_not_change_results(monkeypatch, capsys, spec):
    """With bars drawn (as on a terminal) the per-layer loops give the same weights as without."""
    from onnxprune import progress

    data = zoo_model().SerializeToString()
    quiet = _arrays(_run(onnx.ModelProto.FromString(data), spec).model)
    monkeypatch.setattr(progress, "active", lambda: True)
    drawn = _arrays(_run(onnx.ModelProto.FromString(data), spec).model)
    assert quiet.keys() == drawn.keys()
    for name in quiet:
        np.testing.assert_array_equal(drawn[name], quiet[name])
    assert "layer" in capsys.readouterr().err  # tqdm drew (and cleared) a bar


def test_masks_scope_row_prunes_every_output_to_the_target() -> None:
    from onnxprune import optimize
    from onnxprune.analysis.weights import find_weights, to_kn

    proto = build_mlp()
    dense = from_proto(proto)
    weights = [w for w in find_weights(dense) if not w.skip_reason]
    row = optimize(from_proto(proto), "masks(sparsity=0.5,scope=row)").model
    layer = optimize(from_proto(proto), "masks(sparsity=0.5)").model
    uneven = 0
    for w in weights:
        K = w.k
        zeros_row = (to_kn(np.asarray(row.get_array(w.name)), w) == 0).sum(axis=0)
        assert (zeros_row == K // 2).all(), (w.name, zeros_row)
        zeros_layer = (to_kn(np.asarray(layer.get_array(w.name)), w) == 0).sum(axis=0)
        uneven += int((zeros_layer != K // 2).any())
        # the kept weights of each output are its largest by magnitude
        W = np.abs(to_kn(np.asarray(dense.get_array(w.name)), w))
        kept = to_kn(np.asarray(row.get_array(w.name)), w) != 0
        assert (np.where(kept, W, np.inf).min(axis=0) >= np.where(kept, -np.inf, W).max(axis=0)).all()
    assert uneven > 0  # per-layer ranking does not give every output the same count
    with pytest.raises(PipelineError, match="scope=row"):
        optimize(from_proto(proto), "masks(sparsity=0.5,scope=row,criterion=wanda)", calibration=[random_inputs(proto)])
