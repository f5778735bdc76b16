"""Tests of the ``fp16`` pass: numerics on ONNX Runtime CPU, masks, range checks, graph plumbing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from models import build_cnn, build_mlp, build_transformer_block, random_inputs
from onnxprune.check import compare, run_model
from onnxprune.errors import PipelineError
from onnxprune.ir.load import from_proto

F16 = TensorProto.FLOAT16
F32 = TensorProto.FLOAT


def _fp16(proto: onnx.ModelProto, spec: str = "fp16") -> onnxprune.OptimizeResult:
    return onnxprune.optimize(from_proto(proto), spec)


def _stats(res: onnxprune.OptimizeResult) -> dict:
    return res.report.passes[0].stats


def _init_types(model: onnxprune.Model) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


@pytest.mark.parametrize("builder", [build_mlp, build_cnn, build_transformer_block])
def test_builders_drift_small_and_io_kept(builder) -> None:
    proto = builder()
    res = _fp16(proto)
    out = res.model
    assert [i.type.tensor_type.elem_type for i in out.graph.input] == \
        [i.type.tensor_type.elem_type for i in proto.graph.input]
    assert all(o.type.tensor_type.elem_type == F32 for o in out.graph.output)
    st = _stats(res)
    assert st["nodes_fp16"] > 0 and st["initializers_converted"] > 0 and st["zeros_preserved"]
    # every weight of a Conv/MatMul/Gemm is float16 now
    types = _init_types(out)
    gemm_weights = {n.input[1] for n in out.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")}
    assert gemm_weights and all(types[w] == F16 for w in gemm_weights if w in types)
    onnx.checker.check_model(out.proto)
    check = compare(from_proto(proto), out, feeds=random_inputs(proto))
    for o in check.outputs:
        assert o.max_rel < 5e-3, (o.name, o.max_rel)
        assert o.cosine > 0.9999


def test_sensitive_ops_stay_fp32() -> None:
    res = _fp16(build_transformer_block())
    st = _stats(res)
    assert st["kept_ops"].get("Softmax", 0) >= 1
    assert st["kept_ops"].get("LayerNormalization", 0) >= 1
    m = res.model
    inferred = onnx.shape_inference.infer_shapes(m.proto)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update(_init_types(m))
    for n in m.graph.node:
        if n.op_type in ("Softmax", "LayerNormalization"):
            assert types[n.input[0]] == F32 and types[n.output[0]] == F32
        if n.op_type == "MatMul":
            assert types[n.output[0]] == F16


def test_keep_io_types_false_makes_fp16_io() -> None:
    proto = build_mlp()
    res = _fp16(proto, "fp16(keep_io_types=false)")
    m = res.model
    assert m.graph.input[0].type.tensor_type.elem_type == F16
    assert m.graph.output[0].type.tensor_type.elem_type == F16
    feeds = {k: v.astype(np.float16) for k, v in random_inputs(proto).items()}
    got = run_model(m, feeds)["logits"]
    ref = run_model(from_proto(proto), random_inputs(proto))["logits"]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=2e-2, atol=2e-2)


def _mm_model(w: np.ndarray, extra_nodes=(), extra_inits=(), out_name: str = "y") -> onnx.ModelProto:
    k, n = w.shape
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm")] + list(extra_nodes)
    if not extra_nodes:
        nodes.append(helper.make_node("Relu", ["h"], [out_name], name="relu"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", F32, ["b", k])],
        [helper.make_tensor_value_info(out_name, F32, ["b", n])],
        [numpy_helper.from_array(w, "w")] + list(extra_inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_nm_masks_survive_exactly() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32) * 0.1
    g = w.T.reshape(16, 8, 4)  # 2:4 along K (axis 0 of w)
    order = np.argsort(np.abs(g), axis=2)
    np.put_along_axis(g, order[:, :, :2], 0.0, axis=2)
    w = np.ascontiguousarray(g.reshape(16, 32).T)
    res = _fp16(_mm_model(w))
    w16 = res.model.get_array("w")
    assert w16.dtype == np.float16
    np.testing.assert_array_equal(w16 == 0, w == 0)
    st = _stats(res)
    assert st["flushed_to_zero"] == 0 and st["zeros_preserved"]


def test_flush_to_zero_is_counted_and_warned() -> None:
    w = np.full((8, 8), 0.5, dtype=np.float32)
    w[0, :3] = 1e-9  # below 2**-25: becomes 0 in float16
    w[1, 0] = 1e-6  # subnormal in float16, stays non-zero
    res = _fp16(_mm_model(w))
    st = _stats(res)
    assert st["flushed_to_zero"] == 3
    assert st["subnormal_values"] >= 1
    assert any("became 0" in msg for msg in res.report.warnings)
    w16 = res.model.get_array("w")
    assert int(np.count_nonzero(w16 == 0)) == 3 and w16[1, 0] != 0


def _scale_model(value: float) -> onnx.ModelProto:
    w = np.eye(4, dtype=np.float32)
    big = numpy_helper.from_array(np.array([value, 1.0, 1.0, 1.0], dtype=np.float32), "scale")
    nodes = [helper.make_node("Mul", ["h", "scale"], ["s"], name="mul_big"),
             helper.make_node("Relu", ["s"], ["y"], name="relu")]
    return _mm_model(w, nodes, [big])


def test_out_of_range_constant_kept_fp32_by_default() -> None:
    proto = _scale_model(1e6)
    res = _fp16(proto)
    st = _stats(res)
    assert "scale" in st["kept_constants"] and "beyond float16 range" in st["kept_constants"]["scale"]
    assert _init_types(res.model)["scale"] == F32
    assert st["kept_ops"] == {"Mul": 1}
    x = {"x": np.array([[1e-3, 1.0, 2.0, 3.0]], dtype=np.float32)}
    got = run_model(res.model, x)["y"]
    ref = run_model(from_proto(proto), x)["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-3)  # 1e3, not inf


def test_out_of_range_constant_clamped_on_request() -> None:
    res = _fp16(_scale_model(1e6), "fp16(clamp=true)")
    st = _stats(res)
    assert st["values_clamped"] == 1 and not st["kept_constants"]
    scale = res.model.get_array("scale")
    assert scale.dtype == np.float16 and float(scale[0]) == 65504.0


def test_tiny_epsilon_constant_stays_fp32() -> None:
    w = np.eye(4, dtype=np.float32)
    eps = numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "eps")
    nodes = [helper.make_node("Mul", ["h", "h"], ["sq"], name="sq"),
             helper.make_node("Add", ["sq", "eps"], ["v"], name="add_eps"),
             helper.make_node("Sqrt", ["v"], ["y"], name="sqrt")]
    proto = _mm_model(w, nodes, [eps])
    res = _fp16(proto)
    st = _stats(res)
    assert "eps" in st["kept_constants"] and "flush" in st["kept_constants"]["eps"]
    x = {"x": np.zeros((1, 4), dtype=np.float32)}
    y = run_model(res.model, x)["y"]
    np.testing.assert_allclose(y, np.full((1, 4), 1e-6), rtol=1e-2)  # sqrt(eps) survived


def test_cast_to_float_becomes_fp16_and_int_inputs_untouched() -> None:
    nodes = [helper.make_node("Cast", ["ids"], ["f"], name="cast", to=F32),
             helper.make_node("MatMul", ["f", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 4])],
                              [helper.make_tensor_value_info("y", F32, [2, 3])],
                              [numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    res = _fp16(proto)
    cast = next(n for n in res.model.graph.node if n.name == "cast")
    assert helper.get_attribute_value(cast.attribute[0]) == F16
    assert res.model.graph.input[0].type.tensor_type.elem_type == TensorProto.INT64
    feeds = {"ids": np.array([[1, 2, 3, 4], [0, 1, 0, 1]], dtype=np.int64)}
    np.testing.assert_allclose(run_model(res.model, feeds)["y"], run_model(from_proto(proto), feeds)["y"], rtol=2e-3)


def test_shared_initializer_and_output_read_inside_graph() -> None:
    # w feeds a float16 MatMul and a kept Softmax path; the graph output h is also read by Softmax
    w = np.random.default_rng(2).standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Softmax", ["h"], ["s"], name="sm", axis=-1),
             helper.make_node("Add", ["s", "w"], ["z"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [4, 4])],
                              [helper.make_tensor_value_info("h", F32, [4, 4]),
                               helper.make_tensor_value_info("z", F32, [4, 4])],
                              [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    res = _fp16(proto)
    assert [o.name for o in res.model.graph.output] == ["h", "z"]
    assert all(o.type.tensor_type.elem_type == F32 for o in res.model.graph.output)
    x = {"x": np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)}
    got, ref = run_model(res.model, x), run_model(from_proto(proto), x)
    for k in ("h", "z"):
        np.testing.assert_allclose(got[k], ref[k], rtol=5e-3, atol=5e-3)


def test_subgraph_outer_reference_gets_fp32_cast() -> None:
    then_g = helper.make_graph([helper.make_node("Add", ["h", "h"], ["t"], name="then_add")], "then", [],
                               [helper.make_tensor_value_info("t", F32, [2, 2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e"], name="else_neg")], "else", [],
                               [helper.make_tensor_value_info("e", F32, [2, 2])])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [2, 2]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", F32, [2, 2])],
                              [numpy_helper.from_array(np.eye(2, dtype=np.float32) * 3, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    res = _fp16(proto)
    st = _stats(res)
    assert st["kept_reasons"].get("has a subgraph") == 1
    x = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    for c in (True, False):
        feeds = {"x": x, "cond": np.array(c)}
        np.testing.assert_allclose(run_model(res.model, feeds)["y"], run_model(from_proto(proto), feeds)["y"])


def test_block_list_options() -> None:
    proto = build_transformer_block()
    res = _fp16(proto, "fp16(op_block_list='default;Erf')")
    assert "Erf" in _stats(res)["kept_ops"] or not any(n.op_type == "Erf" for n in proto.graph.node)
    res = _fp16(proto, "fp16(op_block_list=none)")
    assert _stats(res)["kept_ops"].get("Softmax", 0) == 0
    res = _fp16(proto, "fp16(node_block_list='.*')")
    assert _stats(res)["nodes_fp16"] == 0 or _stats(res)["nodes_fp32"] > 0
    with pytest.raises(PipelineError, match="NoSuchOp"):
        _fp16(proto, "fp16(op_block_list='NoSuchOp')")
    with pytest.raises(PipelineError, match="node_block_list"):
        _fp16(proto, "fp16(node_block_list='(')")


def test_second_run_changes_nothing() -> None:
    res = _fp16(build_transformer_block())
    again = onnxprune.optimize(res.model, "fp16")
    assert again.report.passes[0].modified is False
    assert len(again.model.graph.node) == len(res.model.graph.node)


def test_custom_op_output_keeps_downstream_fp32() -> None:
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((8, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Gelu", ["h"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("MatMul", ["g", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [2, 8])],
                              [helper.make_tensor_value_info("y", F32, [2, 8])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 8
    res = _fp16(proto)
    st = _stats(res)
    assert st["kept_reasons"].get("domain com.microsoft") == 1
    assert any("no inferred type" in r for r in st["kept_reasons"])
    types = _init_types(res.model)
    assert types["w1"] == F16 and types["w2"] == F32
    x = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    np.testing.assert_allclose(run_model(res.model, x)["y"], run_model(from_proto(proto), x)["y"], rtol=1e-2, atol=1e-2)


def test_fp16_keeps_float_math_that_computes_a_length() -> None:
    """A TTS-style length ``Cast(Ceil(x * scale))`` stays float32: in float16 100.02 rounds to 100.0."""
    import onnxruntime as ort
    from onnxprune.passes.precision import Fp16Options, convert_fp16

    from onnxprune.ir.model import Model

    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["d"], name="dur"),
        helper.make_node("Ceil", ["d"], ["dc"], name="ceil"),
        helper.make_node("Cast", ["dc"], ["n"], name="to_int", to=TensorProto.INT64),
        helper.make_node("Squeeze", ["n"], ["ns"], name="sq"),
        helper.make_node("Range", ["zero", "ns", "one"], ["r"], name="range"),
        helper.make_node("Cast", ["r"], ["rf"], name="to_f", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x2", "w"], ["h"], name="mm"),
        helper.make_node("ReduceMean", ["h"], ["hm"], name="rm", keepdims=0),
        helper.make_node("Mul", ["rf", "hm"], ["y"], name="out"),
    ]
    inits = [numpy_helper.from_array(np.array([1.0], np.float32), "scale"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.full((4, 4), 0.5, np.float32), "w")]
    graph = helper.make_graph(nodes, "len", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
                                             helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["L"])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    feeds = {"x": np.array([100.02], np.float32), "x2": np.ones((1, 4), np.float32)}
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    model = Model(proto)
    stats = convert_fp16(model, Fp16Options())
    out = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert ref.shape == out.shape == (101,)
    assert any("cast to integers" in r for r in stats["kept_reasons"])
    assert model.graph.node[[n.name for n in model.graph.node].index("mm")].op_type == "MatMul"
    assert stats["nodes_fp16"] >= 1  # the MatMul still runs in float16
