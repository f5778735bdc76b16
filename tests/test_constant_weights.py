"""Weights held by ``Constant`` nodes (Paddle2ONNX style) and quantized weights are weights everywhere.

Issue 12, classes 5 and 6: ``masks``/``nm`` used to say "no prunable weight" on every Paddle2ONNX
model and ``inspect`` said ``parameters 0``; int8 weights behind DequantizeLinear, MatMulInteger
and MatMulNBits were not counted (or were counted against 0 instead of their zero point).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.analysis.weights import (
    constant_node_weights,
    find_weights,
    hoist_constant_weights,
)
from onnxprune.cli import main
from onnxprune.ir.constants import hoist_constants
from onnxprune.ir.model import Model
from onnxprune.summary import count_parameters, summarize


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _paddle_like(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> MatMul(Transpose(W)) + bias, every constant a Constant node."""
    rng = np.random.default_rng(seed)
    w_conv = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w_fc = rng.standard_normal((10, 8 * 4 * 4)).astype(np.float32)  # [N, K], transposed in the graph
    bias = rng.standard_normal(10).astype(np.float32)

    def const(name: str, arr: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], name=f"c_{name}", value=numpy_helper.from_array(arr))

    nodes = [
        const("conv_w", w_conv), const("fc_w", w_fc), const("fc_b", bias),
        const("shape", np.array([1, -1], dtype=np.int64)),
        helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
        helper.make_node("Transpose", ["fc_w"], ["fc_wt"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["f", "fc_wt"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "fc_b"], ["y"], name="bias"),
    ]
    graph = helper.make_graph(nodes, "paddle_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_constant_node_weights_are_found_and_hoisted_exactly() -> None:
    proto = _paddle_like()
    model = Model(proto)
    assert find_weights(model) == []  # the bug: nothing to prune
    assert set(constant_node_weights(model)) == {"conv_w", "fc_w"}
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 4, 4, 4)).astype(np.float32)}
    before = _run(proto, feeds)[0]
    assert sorted(hoist_constant_weights(model)) == ["conv_w", "fc_w"]
    assert {w.name for w in find_weights(model)} == {"conv_w", "fc_w"}
    onnx.checker.check_model(model.proto)
    np.testing.assert_array_equal(_run(model.proto, feeds)[0], before)  # exact: same bytes
    # the untouched Constants (bias, shape) stay nodes
    assert sorted(n.output[0] for n in model.graph.node if n.op_type == "Constant") == ["fc_b", "shape"]


def test_hoist_constants_keeps_graph_outputs_and_value_ints() -> None:
    nodes = [helper.make_node("Constant", [], ["k"], value_ints=[2, 3]),
             helper.make_node("Constant", [], ["out"], value_float=1.5)]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert hoist_constants(model) == ["k"]
    np.testing.assert_array_equal(model.get_array("k"), [2, 3])
    assert [n.output[0] for n in model.graph.node] == ["out"]


def test_summary_counts_constant_node_parameters() -> None:
    model = Model(_paddle_like())
    s = summarize(model)
    expected = 8 * 4 * 9 + 10 * 128 + 10
    assert s.parameters == expected == count_parameters(model)
    assert s.in_constant_nodes == expected
    assert s.weight_bytes >= expected * 4
    hoist_constant_weights(model)
    assert summarize(model).parameters == expected  # moving a tensor does not change the count


@pytest.mark.parametrize("spec,sparsity", [("masks(sparsity=0.5)", 0.5), ("nm(n=2,m=4)", 0.5)])
def test_mask_passes_prune_constant_node_weights(tmp_path, capsys, spec: str, sparsity: float) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_paddle_like(), src)
    out = tmp_path / "o.onnx"
    rc = main(["optimize", str(src), "-o", str(out), "--passes", spec, "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    stats = report["passes"][0]["stats"]
    assert stats["weights_pruned"] >= 1 and stats["constants_to_initializers"] == 2
    pruned = Model(onnx.load(out))
    w = pruned.get_array("fc_w")
    assert abs((w == 0).mean() - sparsity) < 1e-6
    assert summarize(pruned).parameters == summarize(Model(onnx.load(src))).parameters


def test_inspect_lists_constant_node_weights(tmp_path, capsys) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_paddle_like(), src)
    assert main(["inspect", str(src), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["parameters"] == 8 * 4 * 9 + 10 * 128 + 10
    assert {w["name"] for w in doc["weights"]} == {"conv_w", "fc_w"}


# ---------------------------------------------------------------------- quantized weights
def _qdq_matmul(zp: int = 3, per_axis: bool = True, seed: int = 0) -> onnx.ModelProto:
    """x @ DequantizeLinear(q, scale, zp) with an int8 weight [K=8, N=4]."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-100, 100, size=(8, 4)).astype(np.int8)
    q[:, 0] = zp  # a column of exact zeros (q == zero point)
    scale = np.full(4 if per_axis else (), 0.05, dtype=np.float32)
    zps = np.full(4 if per_axis else (), zp, dtype=np.int8)
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zps, "z")]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=1),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("per_axis", [True, False])
def test_qdq_weights_counted_against_their_zero_point(per_axis: bool) -> None:
    s = summarize(Model(_qdq_matmul(per_axis=per_axis)), per_initializer=True)
    n_scale = 4 if per_axis else 1
    assert s.parameters == 32 + n_scale  # 32 int8 weights + the float scales
    assert s.quantized == 32
    assert s.nonzero == 32 - 8 + n_scale  # the column equal to the zero point is zero
    assert any(r["name"] == "q" and r.get("quantized") == "DequantizeLinear" for r in s.per_initializer)


def test_masks_on_qdq_summary_reports_the_sparsity(tmp_path, capsys) -> None:
    src = tmp_path / "q.onnx"
    onnx.save(_qdq_matmul(zp=0), src)
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--passes", "masks(sparsity=0.5)", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    before, after = report["before"], report["after"]
    assert before["quantized"] == after["quantized"] == 32
    assert after["nonzero"] <= before["nonzero"] - 8  # the summary sees the zeroed int8 weights


def test_matmulinteger_and_matmulnbits_are_counted() -> None:
    rng = np.random.default_rng(0)
    b = rng.integers(8, 255, size=(8, 4)).astype(np.uint8)  # never the zero point 7...
    b[0] = 7
    k, n, block = 32, 3, 16
    vals = rng.integers(9, 16, size=(n, k)).astype(np.uint8)  # never 8...
    vals[:, :5] = 8  # default 4-bit zero point: these dequantize to 0
    packed = (vals[:, 0::2] | (vals[:, 1::2] << 4)).reshape(n, k // block, block // 2)
    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array(7, np.uint8), "bz"),
             numpy_helper.from_array(packed, "nb"), numpy_helper.from_array(np.ones((n * 2,), np.float32), "ns")]
    nodes = [helper.make_node("MatMulInteger", ["a", "b", "", "bz"], ["y1"]),
             helper.make_node("MatMulNBits", ["x", "nb", "ns"], ["y2"], domain="com.microsoft", K=k, N=n, bits=4,
                              block_size=block)]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 8]),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y1", TensorProto.INT32, [2, 4]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, n])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    model = Model(proto)
    s = summarize(model)
    assert s.quantized == 32 + k * n
    assert s.parameters == 32 + k * n + n * 2 == count_parameters(model)
    assert s.nonzero == (32 - 4) + (k * n - 5 * n) + n * 2
    # ONNX Runtime agrees that the zero-point entries contribute nothing
    x = np.zeros((2, k), np.float32)
    x[:, :5] = 1.0
    feeds = {"a": np.ones((2, 8), np.uint8), "x": x}
    np.testing.assert_allclose(_run(proto, feeds)[1], 0.0, atol=1e-6)


def test_masks_on_matmulinteger_model_says_why_nothing_changed(tmp_path, capsys) -> None:
    b = np.arange(32, dtype=np.uint8).reshape(8, 4)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "mi",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 4])],
                              [numpy_helper.from_array(b, "b")])
    src = tmp_path / "mi.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), src)
    assert main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--passes", "masks(sparsity=0.5)"]) == 0
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert "quantized ops (MatMulInteger)" in text and "nothing changed" in text
