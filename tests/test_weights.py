"""Tests of onnxprune.analysis.weights: which initializer feeds which op, along which axis K lies."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxprune.analysis.weights import (
    WeightInfo,
    find_weights,
    format_weights,
    from_kn,
    inspect_weights,
    to_kn,
    weight_map,
)
from onnxprune.ir.load import from_proto
from onnxprune.tensorrt.eligibility import format_nm, inspect_nm

RNG = np.random.default_rng(0)


def _f(shape: tuple[int, ...]) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], inputs: dict[str, list[int]],
           outputs: list[str], graph_inputs_extra: list[str] = ()) -> onnx.ModelProto:
    ins = [h.make_tensor_value_info(k, T.FLOAT, v) for k, v in inputs.items()]
    ins += [h.make_tensor_value_info(k, h.np_dtype_to_tensor_dtype(inits[k].dtype), list(inits[k].shape))
            for k in graph_inputs_extra]
    g = h.make_graph(nodes, "g", ins, [h.make_tensor_value_info(o, T.FLOAT, None) for o in outputs],
                     [nh.from_array(v, k) for k, v in inits.items()])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    return m


def _weights(proto: onnx.ModelProto) -> dict[str, WeightInfo]:
    return weight_map(from_proto(proto))


def test_conv_and_convtranspose_axes():
    m = _model([h.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
                h.make_node("Conv", ["y", "G"], ["z"], name="gconv", group=2),
                h.make_node("ConvTranspose", ["z", "D"], ["o"], name="deconv")],
               {"W": _f((8, 4, 3, 3)), "G": _f((8, 4, 1, 1)), "D": _f((8, 6, 2, 2))},
               {"x": [1, 4, 5, 5]}, ["o"])
    w = _weights(m)
    assert (w["W"].k_axis, w["W"].n_axis, w["W"].group, w["W"].op_type) == (1, 0, 1, "Conv")
    assert (w["G"].k_axis, w["G"].group) == (1, 2)
    assert (w["D"].k_axis, w["D"].n_axis, w["D"].op_type) == (0, 1, "ConvTranspose")


def test_matmul_both_orientations_and_batched():
    m = _model([h.make_node("MatMul", ["x", "W"], ["y"], name="xw"),      # [2,16]@[16,8]
                h.make_node("MatMul", ["L", "y"], ["z"], name="lw"),      # [5,2]@[2,8]
                h.make_node("MatMul", ["x3", "B3"], ["b"], name="bmm")],  # [3,2,16]@[3,16,4]
               {"W": _f((16, 8)), "L": _f((5, 2)), "B3": _f((3, 16, 4))},
               {"x": [2, 16], "x3": [3, 2, 16]}, ["z", "b"])
    w = _weights(m)
    assert (w["W"].k_axis, w["W"].n_axis) == (0, 1)
    assert (w["L"].k_axis, w["L"].n_axis) == (1, 0)
    assert (w["B3"].k_axis, w["B3"].n_axis) == (1, 2)


@pytest.mark.parametrize("trans_b,shape,k", [(0, (16, 8), 0), (1, (8, 16), 1)])
def test_gemm_transb(trans_b, shape, k):
    m = _model([h.make_node("Gemm", ["x", "B"], ["y"], name="gemm", transB=trans_b)],
               {"B": _f(shape)}, {"x": [2, 16]}, ["y"])
    assert _weights(m)["B"].k_axis == k


@pytest.mark.parametrize("trans_a,shape,k", [(0, (4, 16), 1), (1, (16, 4), 0)])
def test_gemm_constant_a(trans_a, shape, k):
    m = _model([h.make_node("Gemm", ["A", "x"], ["y"], name="gemm", transA=trans_a)],
               {"A": _f(shape)}, {"x": [16, 3]}, ["y"])
    assert _weights(m)["A"].k_axis == k


def test_transpose_cast_chain_maps_axis_back():
    m = _model([h.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="t"),
                h.make_node("Cast", ["Wt"], ["Wc"], to=T.FLOAT, name="c"),
                h.make_node("MatMul", ["x", "Wc"], ["y"], name="mm")],
               {"W": _f((8, 16))}, {"x": [2, 16]}, ["y"])
    w = _weights(m)["W"]
    assert w.k_axis == 1 and w.n_axis == 0
    assert w.via == ["Transpose", "Cast"]


def test_reshape_of_constant():
    shp = np.array([16, 8], np.int64)
    ok = _model([h.make_node("Reshape", ["W", "s"], ["Wr"], name="r"), h.make_node("MatMul", ["x", "Wr"], ["y"])],
                {"W": _f((1, 16, 8)), "s": shp}, {"x": [2, 16]}, ["y"])
    w = _weights(ok)["W"]
    assert (w.k_axis, w.n_axis, w.skip_reason, w.via) == (1, 2, None, ["Reshape"])
    merged = _model([h.make_node("Reshape", ["W", "s"], ["Wr"], name="r"), h.make_node("MatMul", ["x", "Wr"], ["y"])],
                    {"W": _f((2, 8, 8)), "s": shp}, {"x": [2, 16]}, ["y"])
    w = _weights(merged)["W"]
    assert w.k_axis is None and "not traceable" in w.skip_reason


def test_dequantize_linear_per_axis():
    q = RNG.integers(-100, 100, (16, 8)).astype(np.int8)
    m = _model([h.make_node("DequantizeLinear", ["Wq", "sc", "zp"], ["Wd"], axis=1, name="dq"),
                h.make_node("Transpose", ["Wd"], ["Wt"], perm=[1, 0], name="t"),
                h.make_node("Gemm", ["x", "Wt"], ["y"], transB=1, name="g")],
               {"Wq": q, "sc": np.full(8, 0.01, np.float32), "zp": np.arange(8, dtype=np.int8)},
               {"x": [2, 16]}, ["y"])
    w = _weights(m)["Wq"]
    assert w.dtype == "int8" and w.k_axis == 0 and w.n_axis == 1
    assert w.quant is not None and w.quant.axis == 1 and w.quant.zero_point == "zp"


def test_shared_initializer_conflict_and_agreement():
    m = _model([h.make_node("MatMul", ["x", "S"], ["a"], name="m1"), h.make_node("MatMul", ["S", "a"], ["b"], name="m2"),
                h.make_node("MatMul", ["x", "P"], ["c"], name="p1"), h.make_node("MatMul", ["c", "P"], ["d"], name="p2")],
               {"S": _f((8, 8)), "P": _f((8, 8))}, {"x": [8, 8]}, ["b", "d"])
    w = _weights(m)
    assert w["S"].conflict is not None and "m1" in w["S"].conflict and "m2" in w["S"].conflict
    assert w["P"].conflict is None and w["P"].nodes == ["p1", "p2"]


def test_tied_embedding_and_overridable_initializer():
    ids = h.make_tensor_value_info("ids", T.INT64, [2])
    E = _f((10, 8))
    g = h.make_graph([h.make_node("Gather", ["E", "ids"], ["e"], name="emb"),
                      h.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="t"),
                      h.make_node("MatMul", ["e", "Et"], ["logits"], name="lm_head"),
                      h.make_node("MatMul", ["e", "V"], ["v"], name="mv")],
                     "g", [ids, h.make_tensor_value_info("V", T.FLOAT, [8, 4])],
                     [h.make_tensor_value_info("logits", T.FLOAT, None), h.make_tensor_value_info("v", T.FLOAT, None)],
                     [nh.from_array(E, "E"), nh.from_array(_f((8, 4)), "V")])
    w = _weights(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))
    assert "V" not in w  # an initializer that is also a graph input may be overridden: not a constant
    assert w["E"].k_axis == 1 and "embedding" in w["E"].skip_reason
    assert any(u.startswith("Gather:") for u in w["E"].other_uses)


def test_activation_operands_are_not_weights():
    m = _model([h.make_node("MatMul", ["x", "y"], ["z"], name="act")], {}, {"x": [2, 3], "y": [3, 4]}, ["z"])
    assert find_weights(from_proto(m)) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.data())
def test_to_kn_from_kn_inverse(shape, data):
    k = data.draw(st.integers(0, len(shape) - 1))
    arr = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    info = WeightInfo("w", ["n"], "MatMul", tuple(shape), "float32", k, None)
    kn = to_kn(arr, info)
    assert kn.shape == (shape[k], arr.size // shape[k])
    # row i of the [K, rest] view holds exactly the slice arr[..., i, ...] along K
    for i in range(shape[k]):
        np.testing.assert_array_equal(np.sort(kn[i]), np.sort(np.take(arr, i, axis=k).reshape(-1)))
    np.testing.assert_array_equal(from_kn(kn, info), arr)
    np.testing.assert_array_equal(from_kn(kn.copy(), info, tuple(shape)), arr)


def test_to_kn_conv_groups_run_along_c():
    W = np.arange(2 * 4 * 3 * 3).reshape(2, 4, 3, 3)
    info = WeightInfo("w", ["c"], "Conv", W.shape, "int64", 1, 0)
    kn = to_kn(W, info)
    # column j = (n, kh, kw); going down a column walks C for fixed (n, kh, kw)
    np.testing.assert_array_equal(kn[:, 0], W[0, :, 0, 0])
    np.testing.assert_array_equal(kn[:, 9 + 4], W[1, :, 1, 1])


def test_inspect_weights_and_nm():
    W = _f((16, 8))
    W.reshape(4, 4, 8)[:, :2, :] = 0  # 2:4 along axis 0
    C = _f((8, 4, 3, 3))  # not 2:4
    m = _model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
                h.make_node("Conv", ["img", "C"], ["z"], name="conv"),
                h.make_node("Conv", ["img", "Cg"], ["zg"], name="gconv", group=2),
                h.make_node("Conv", ["img3", "C3"], ["z3"], name="conv3")],
               {"W": W, "C": C, "Cg": _f((8, 2, 1, 1)), "C3": _f((4, 3, 1, 1))},
               {"x": [2, 16], "img": [1, 4, 5, 5], "img3": [1, 3, 5, 5]}, ["y", "z", "zg", "z3"])
    model = from_proto(m)
    rows = {r["name"]: r for r in inspect_weights(model)}
    assert rows["W"]["sparsity"] == pytest.approx(0.5) and rows["C"]["k_axis"] == 1
    text = format_weights(inspect_weights(model))
    assert "W" in text and "group=2" in text
    data = inspect_nm(model, 2, 4)
    by = {e["name"]: e for e in data["weights"]}
    assert by["W"]["status"] == "ok"
    assert by["C"]["status"] == "violates" and by["C"]["violating_groups"] == 8 * 3 * 3
    idx = by["C"]["first_violations"][0]
    assert len(idx) == 4 and C[tuple(idx)] != 0
    assert by["C3"]["status"] == "skipped" and "multiple of 4" in by["C3"]["reason"]
    trt = {t["name"]: t for t in data["tensorrt"]}
    # FP32 math: strongly-typed TensorRT runs no sparse kernel, whatever the weights (inspect --tensorrt's rule)
    assert not trt["W"]["eligible"] and trt["W"]["reason_code"] == "fp32_math"
    assert not trt["Cg"]["eligible"] and "grouped" in trt["Cg"]["reason"]
    assert trt["W"]["size_note"] is None and trt["Cg"]["size_note"] is None
    assert data["summary"]["tensorrt_eligible_and_sparse"] == 0
    out = format_nm(data)
    assert "1 ok" in out and "TensorRT" in out and "grouped convolution" in out
    for t in m.graph.initializer:  # the same graph in FP16 math
        t.CopyFrom(nh.from_array(nh.to_array(t).astype(np.float16), t.name))
    for v in [*m.graph.input, *m.graph.output]:
        v.type.tensor_type.elem_type = T.FLOAT16
    half = inspect_nm(from_proto(m), 2, 4)
    trt = {t["name"]: t for t in half["tensorrt"]}
    assert trt["W"]["eligible"] and trt["C"]["eligible"] and not trt["Cg"]["eligible"]
    assert trt["W"]["size_note"].startswith("small")
    assert half["summary"]["tensorrt_eligible_and_sparse"] == 1
