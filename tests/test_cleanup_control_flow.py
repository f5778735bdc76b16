"""cleanup on control flow: constant-condition If inlining (order, names, outputs) and shared Identity'd weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.check import run_model
from onnxprune.ir.inline import inline_constant_ifs, share_identity_initializers
from onnxprune.ir.load import from_proto
from onnxprune.pipeline.manager import PassManager
from onnxprune.pipeline.spec import parse_pipeline

F = TensorProto.FLOAT


def _vi(name: str, shape: list[int | str] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, shape if shape is not None else [2, 3])


def _const_bool(name: str, value: bool) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"c_{name}",
                            value=numpy_helper.from_array(np.array(value), name))


def _model(nodes: list[onnx.NodeProto], outputs: list[str], inits: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [_vi("x")], [_vi(o) for o in outputs], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _cleanup(proto: onnx.ModelProto) -> onnx.ModelProto:
    out, _ = PassManager(parse_pipeline("cleanup")).run(from_proto(onnx.ModelProto.FromString(
        proto.SerializeToString())))
    onnx.checker.check_model(out.proto)
    return out.proto


X = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)


def _same_outputs(a: onnx.ModelProto | dict[str, np.ndarray], b: onnx.ModelProto) -> None:
    """``b`` gives ``a``'s outputs on ``X`` (``a``: a model, or the expected outputs)."""
    ra = a if isinstance(a, dict) else run_model(from_proto(a), {"x": X})
    rb = run_model(from_proto(b), {"x": X})
    assert ra.keys() == rb.keys()
    for k in ra:
        np.testing.assert_allclose(ra[k], rb[k], atol=1e-6)


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def test_if_output_that_is_a_graph_output_stays_defined() -> None:
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"], name="relu")], "then", [], [_vi("t")])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="neg")], "else", [], [_vi("e")])
    nodes = [_const_bool("cond", True),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other)]
    proto = _model(nodes, ["y"])
    out = _cleanup(proto)
    assert "If" not in _ops(out)
    assert [o.name for o in out.graph.output] == ["y"]
    _same_outputs(proto, out)


def test_branch_output_from_outer_scope_gets_an_identity() -> None:
    # the taken branch hands back an outer tensor unchanged: the If's output must still be produced
    # (ONNX Runtime refuses such an input, so the expected outputs are computed here)
    then = helper.make_graph([], "then", [], [_vi("a")])
    other = helper.make_graph([helper.make_node("Neg", ["a"], ["e"], name="neg")], "else", [], [_vi("e")])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"), _const_bool("cond", True),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other),
             helper.make_node("Add", ["a", "y"], ["z"], name="add")]
    proto = _model(nodes, ["y", "z"])
    out = _cleanup(proto)
    assert "If" not in _ops(out)
    assert {o.name for o in out.graph.output} == {"y", "z"}
    r = np.maximum(X, 0)
    _same_outputs({"y": r, "z": r + r}, out)


def test_local_names_clashing_across_scopes_are_renamed() -> None:
    # two Ifs whose branches both define 'h' (legal: sibling scopes); node names clash with the outer graph
    def branch(op: str, out: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("Neg", ["x"], ["h"], name="n1"),
                                  helper.make_node(op, ["h"], [out], name="n2")], f"b{out}", [], [_vi(out)])

    other = helper.make_graph([helper.make_node("Relu", ["x"], ["e"], name="n3")], "else", [], [_vi("e")])
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="n1"), _const_bool("cond", True),
             helper.make_node("If", ["cond"], ["y1"], name="if1", then_branch=branch("Abs", "t1"), else_branch=other),
             helper.make_node("If", ["cond"], ["y2"], name="if2", then_branch=branch("Exp", "t2"), else_branch=other),
             helper.make_node("Add", ["s", "y1"], ["a"], name="n2"), helper.make_node("Add", ["a", "y2"], ["z"], name="n4")]
    proto = _model(nodes, ["z"])
    graph = onnx.GraphProto.FromString(proto.graph.SerializeToString())
    assert inline_constant_ifs(graph) == 2
    names = [o for n in graph.node for o in n.output]
    assert len(names) == len(set(names)) and len({n.name for n in graph.node}) == len(graph.node)
    out = _cleanup(proto)
    _same_outputs(proto, out)


def test_nested_ifs_and_branch_initializers_in_topological_order() -> None:
    # outer If (constant) -> taken branch holds an initializer and another constant If whose branch
    # reads a value computed earlier in the outer branch; nodes after the If use its outputs
    w = numpy_helper.from_array(np.full((2, 3), 2.0, np.float32), "w")
    inner_then = helper.make_graph([helper.make_node("Mul", ["p", "w"], ["q"], name="mul")], "ithen", [], [_vi("q")])
    inner_else = helper.make_graph([helper.make_node("Identity", ["p"], ["pi"], name="idp")], "ielse", [], [_vi("pi")])
    then = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["p"], name="relu"), _const_bool("c2", True),
         helper.make_node("If", ["c2"], ["r"], name="inner", then_branch=inner_then, else_branch=inner_else),
         helper.make_node("Add", ["r", "p"], ["t"], name="add_in")],
        "then", [], [_vi("t"), _vi("r")], [w])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="neg"),
                               helper.make_node("Neg", ["e"], ["e2"], name="neg2")], "else", [], [_vi("e"), _vi("e2")])
    nodes = [_const_bool("c1", True),
             helper.make_node("If", ["c1"], ["y", "y2"], name="outer", then_branch=then, else_branch=other),
             helper.make_node("Sub", ["y", "y2"], ["z"], name="sub")]
    proto = _model(nodes, ["z", "y2"])
    out = _cleanup(proto)
    assert "If" not in _ops(out)
    _same_outputs(proto, out)


def test_constant_ifs_inside_a_kept_if_are_inlined_in_place() -> None:
    # the outer If depends on an input (kept); its branches hold constant Ifs (silero_vad's shape)
    inner = [_const_bool("k", False),
             helper.make_node("If", ["k"], ["u"], name="inner",
                              then_branch=helper.make_graph([helper.make_node("Neg", ["x"], ["n"], name="ng")],
                                                            "a", [], [_vi("n")]),
                              else_branch=helper.make_graph([helper.make_node("Abs", ["x"], ["m"], name="ab")],
                                                            "b", [], [_vi("m")])),
             helper.make_node("Relu", ["u"], ["t"], name="relu")]
    then = helper.make_graph(inner, "then", [], [_vi("t")])
    other = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["e"], name="sg")], "else", [], [_vi("e")])
    g = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], name="rs", keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
         helper.make_node("If", ["cond"], ["y"], name="outer", then_branch=then, else_branch=other)],
        "g", [_vi("x")], [_vi("y")], [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = _cleanup(proto)
    kept = [n for n in out.graph.node if n.op_type == "If"]
    assert len(kept) == 1
    body = [a.g for a in kept[0].attribute if a.name == "then_branch"][0]
    assert [n.op_type for n in body.node] == ["Abs", "Relu"]
    _same_outputs(proto, out)


def _parameters(proto: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer)


def test_identity_of_an_initializer_is_shared_not_copied() -> None:
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    nodes = [helper.make_node("Identity", ["w"], [f"w{i}"], name=f"id{i}") for i in range(3)]
    nodes += [helper.make_node("Add", ["x", "w0"], ["a"], name="a0"), helper.make_node("Mul", ["a", "w1"], ["b"], name="a1"),
              helper.make_node("Sub", ["b", "w2"], ["y"], name="a2")]
    proto = _model(nodes, ["y"], [w])
    out = _cleanup(proto)
    assert "Identity" not in _ops(out)
    assert _parameters(out) == _parameters(proto) == 6
    _same_outputs(proto, out)


def test_identity_of_an_initializer_that_is_a_graph_output_is_kept() -> None:
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    nodes = [helper.make_node("Identity", ["w"], ["wy"], name="id"), helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    proto = _model(nodes, ["y", "wy"], [w])
    graph = onnx.GraphProto.FromString(proto.graph.SerializeToString())
    assert share_identity_initializers(graph, {"w"}) == 0
    out = _cleanup(proto)
    assert _parameters(out) <= _parameters(proto)
    _same_outputs(proto, out)


def test_parameters_never_grow_under_cleanup_with_shared_weights() -> None:
    # a weight read through Identity by two convolutions and directly by a third (torch exports)
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Identity", ["w"], ["wa"], name="ida"), helper.make_node("Identity", ["w"], ["wb"], name="idb"),
             helper.make_node("MatMul", ["x", "wa"], ["p"], name="m0"), helper.make_node("MatMul", ["p", "wb"], ["q"], name="m1"),
             helper.make_node("MatMul", ["q", "w"], ["y"], name="m2")]
    proto = _model(nodes, ["y"], [w])
    out = _cleanup(proto)
    assert _parameters(out) <= _parameters(proto)
    _same_outputs(proto, out)


def _weight_branch(name: str, value: float, out: str) -> onnx.GraphProto:
    w = numpy_helper.from_array(np.full((2, 3), value, np.float32), f"w_{name}")
    return helper.make_graph([helper.make_node("Mul", ["x", w.name], [out], name=f"mul_{name}")], name, [],
                             [_vi(out)], [w])


def test_a_constant_if_nested_in_a_runtime_if_is_inlined_and_reported() -> None:
    # the outer If reads a graph input (stays); the inner one, inside its then-branch, has a constant
    # condition: inlining it drops the untaken branch's weight. The main graph keeps its node count,
    # so the pass must still say it modified the model, and the summary must see both the node and
    # the parameter change inside the bodies.
    from onnxprune.summary import summarize

    inner = helper.make_node("If", ["k"], ["t"], name="inner", then_branch=_weight_branch("a", 2.0, "ta"),
                             else_branch=_weight_branch("b", 3.0, "tb"))
    then = helper.make_graph([_const_bool("k", True), inner], "then", [], [_vi("t")])
    other = _weight_branch("c", -1.0, "e")
    g = helper.make_graph([helper.make_node("If", ["flag"], ["y"], name="outer", then_branch=then, else_branch=other)],
                          "g", [_vi("x"), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])], [_vi("y")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    before = summarize(from_proto(proto))
    out, records = PassManager(parse_pipeline("cleanup")).run(from_proto(onnx.ModelProto.FromString(
        proto.SerializeToString())))
    after = summarize(out)
    assert records[0].modified
    assert (before.parameters, after.parameters) == (18, 12)  # three 2x3 weights, then two
    assert (before.in_subgraphs, after.in_subgraphs) == (18, 12)
    assert before.subgraph_nodes > after.subgraph_nodes
    assert before.weight_bytes - after.weight_bytes == 6 * 4
    for flag in (True, False):
        feeds = {"x": X, "flag": np.array(flag)}
        np.testing.assert_array_equal(run_model(from_proto(proto), feeds)["y"], run_model(out, feeds)["y"])


def test_a_folded_constant_of_shape_stays_a_fill_and_cleanup_stays_idempotent() -> None:
    # Shape(x) is static, so the fill folds; as a dense initializer it would count as 6 new parameters
    fill = helper.make_node("ConstantOfShape", ["s"], ["f"], name="fill",
                            value=numpy_helper.from_array(np.array([0.5], np.float32)))
    proto = _model([helper.make_node("Shape", ["x"], ["s"], name="shape"), fill,
                    helper.make_node("Add", ["x", "f"], ["y"], name="add")], ["y"])
    out = _cleanup(proto)
    assert _ops(out) == ["ConstantOfShape", "Add"]
    assert [t.data_type for t in out.graph.initializer] == [TensorProto.INT64]
    from onnxprune.summary import summarize
    assert summarize(from_proto(out)).parameters == 0
    _same_outputs(proto, out)
    _, records = PassManager(parse_pipeline("cleanup")).run(from_proto(out))
    assert not records[0].modified
