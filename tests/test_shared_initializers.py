"""Shared initializers (tf2onnx-style de-duplication) never make a pruned model larger (issue 12, class 3).

Exporters store one tensor for every reader of equal values: one zero bias for many Convs, one
scale for many Muls, one shape constant for many Reshapes, one weight for tied layers. The
analyses copy per-channel constants per reader; after a removal the copies that stayed identical
are merged back, shared weights stay shared (their readers are tied), and a pass that removes
nothing returns the input model byte for byte.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.attention import attention_feeds, build_attention
from onnxprune.analysis.removal import reshare
from onnxprune.check import run_model
from onnxprune.ir.load import from_proto
from onnxprune.pipeline.base import PassContext
from onnxprune.pipeline.manager import PassManager
from onnxprune.pipeline.spec import parse_pipeline
from onnxprune.summary import count_parameters


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def shared_cnn(seed: int = 0) -> onnx.ModelProto:
    """Two conv branches sharing a zero bias, a scale, a shift, a 1x1 weight and a Reshape target."""
    rng = np.random.default_rng(seed)
    c = 8
    inits = [
        _init("w1", rng.normal(size=(c, 3, 3, 3))),
        _init("w2a", rng.normal(size=(c, c, 3, 3))),
        _init("w2b", rng.normal(size=(c, c, 3, 3))),
        _init("w_tied", rng.normal(size=(c, c, 1, 1))),   # one weight read by two Convs
        _init("zeros", np.zeros(c)),                       # one zero bias read by five Convs
        _init("scale", rng.uniform(0.5, 1.5, size=(1, c, 1, 1))),
        _init("shift", rng.normal(size=(1, c, 1, 1))),
        _init("fc_a", rng.normal(size=(c, 4))),
        _init("fc_b", rng.normal(size=(c, 4))),
        numpy_helper.from_array(np.array([1, c], dtype=np.int64), "flat_shape"),  # read by two Reshapes
    ]
    conv = dict(pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", "w1", "zeros"], ["c1"], **conv),
        helper.make_node("Relu", ["c1"], ["r1"]),
    ]
    for b in ("a", "b"):
        nodes += [
            helper.make_node("Conv", ["r1", f"w2{b}", "zeros"], [f"c2{b}"], **conv),
            helper.make_node("Mul", [f"c2{b}", "scale"], [f"m{b}"]),
            helper.make_node("Add", [f"m{b}", "shift"], [f"s{b}"]),
            helper.make_node("Relu", [f"s{b}"], [f"r2{b}"]),
            helper.make_node("Conv", [f"r2{b}", "w_tied", "zeros"], [f"c3{b}"]),
            helper.make_node("GlobalAveragePool", [f"c3{b}"], [f"p{b}"]),
            helper.make_node("Reshape", [f"p{b}", "flat_shape"], [f"f{b}"]),
            helper.make_node("MatMul", [f"f{b}", f"fc_{b}"], [f"y{b}"]),
        ]
    nodes.append(helper.make_node("Add", ["ya", "yb"], ["y"]))
    g = helper.make_graph(nodes, "shared_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def shared_mlp(seed: int = 0) -> onnx.ModelProto:
    """Two FFN blocks sharing their up bias, their (zero) down bias and nothing else."""
    rng = np.random.default_rng(seed)
    d, h = 8, 16
    inits = [_init("b_up", rng.normal(size=h)), _init("b_down", np.zeros(d))]
    nodes = []
    x = "x"
    for i in range(2):
        inits += [_init(f"up{i}", rng.normal(size=(d, h))), _init(f"down{i}", rng.normal(size=(h, d)))]
        nodes += [
            helper.make_node("MatMul", [x, f"up{i}"], [f"u{i}"]),
            helper.make_node("Add", [f"u{i}", "b_up"], [f"ub{i}"]),
            helper.make_node("Relu", [f"ub{i}"], [f"a{i}"]),
            helper.make_node("MatMul", [f"a{i}", f"down{i}"], [f"dn{i}"]),
            helper.make_node("Add", [f"dn{i}", "b_down"], [f"db{i}"]),
            helper.make_node("Add", [f"db{i}", x], [f"h{i}"]),
        ]
        x = f"h{i}"
    g = helper.make_graph(nodes, "shared_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, d])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, 4, d])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def shared_attention() -> onnx.ModelProto:
    """The builder's attention block with one shared Q/K/V bias and one shared Reshape target."""
    proto = build_attention()
    inits = {t.name: t for t in proto.graph.initializer}
    assert numpy_helper.to_array(inits["c6"]).tolist() == numpy_helper.to_array(inits["c8"]).tolist()
    rename = {"c3": "c1", "c5": "c1", "c7": "c6", "c8": "c6"}
    for n in proto.graph.node:
        for i, x in enumerate(n.input):
            n.input[i] = rename.get(x, x)
    kept = [t for t in proto.graph.initializer if t.name not in rename]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto


def _run(proto: onnx.ModelProto, spec: str):  # noqa: ANN202
    model = from_proto(proto)
    before = count_parameters(model)
    out, records = PassManager(parse_pipeline(spec)).run(model, PassContext())
    return before, out, records[-1]


@pytest.mark.parametrize("spec", ["channels(ratio=0.3)", "channels(ratio=0.1)", "channels(ratio=0.5,scope=global)"])
def test_channels_on_shared_cnn_never_grows(spec: str) -> None:
    before, model, rec = _run(shared_cnn(), spec)
    assert rec.stats["channels_removed"] > 0
    assert count_parameters(model) < before
    # the zero bias is one tensor per distinct width, never one per Conv
    zero_biases = [t for t in model.graph.initializer if t.name.startswith("zeros")]
    assert len(zero_biases) <= len({tuple(t.dims) for t in zero_biases})
    # the tied 1x1 weight stays one tensor read by both Convs
    readers = [n for n in model.graph.node if n.op_type == "Conv" and "w_tied" in n.input]
    assert len(readers) == 2


@pytest.mark.parametrize("spec", ["ffn(ratio=0.25)", "ffn(ratio=0.5)"])
def test_ffn_on_shared_mlp_never_grows(spec: str) -> None:
    proto = shared_mlp()
    before, model, rec = _run(proto, spec)
    assert rec.modified and count_parameters(model) < before
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 4, 8)).astype(np.float32)}
    assert all(v.shape == (2, 4, 8) for v in run_model(model, feeds).values())


def test_heads_on_shared_attention_never_grows() -> None:
    proto = shared_attention()
    before, model, rec = _run(proto, "heads(ratio=0.5)")
    assert rec.stats["units_removed"] > 0
    assert count_parameters(model) < before
    feeds = attention_feeds(proto)
    assert all(v.shape == (2, 8, 32) or v.ndim for v in run_model(model, feeds).values())
    # Q/K/V lose the same heads: their shared bias stays one tensor
    producers = {o: n for n in model.graph.node for o in n.output}
    biases = {n.input[1] for n in model.graph.node if n.op_type == "Add" and n.input[0] in producers
              and producers[n.input[0]].op_type == "MatMul" and producers[n.input[0]].input[0] == "x"}
    assert biases == {"c1"}


@pytest.mark.parametrize("builder,spec", [(shared_cnn, "channels(ratio=0)"), (shared_cnn, "heads(ratio=0.5)"),
                                          (shared_cnn, "ffn(ratio=0.5)"), (shared_mlp, "heads(ratio=0.5)"),
                                          (shared_mlp, "ffn(ratio=0)"), (shared_attention, "heads(ratio=0)"),
                                          (shared_attention, "channels(ratio=0.3)")])
def test_pass_that_prunes_nothing_leaves_model_byte_identical(builder, spec: str) -> None:  # noqa: ANN001
    proto = builder()
    reference = proto.SerializeToString()
    before, model, rec = _run(proto, spec)
    if rec.modified:  # channels on the attention block may legitimately prune something
        assert count_parameters(model) <= before
        return
    assert model.proto.SerializeToString() == reference
    assert count_parameters(model) == before


def test_heads_with_nothing_to_prune_says_why() -> None:
    ctx = PassContext()
    _, records = PassManager(parse_pipeline("heads(ratio=0.5)")).run(from_proto(shared_mlp()), ctx)
    assert records[-1].stats["blocks_found"] == 0 and not records[-1].modified
    assert any("no Softmax attention pattern found" in w for w in ctx.warnings)


def test_reshare_merges_identical_copies_only() -> None:
    proto = shared_cnn()
    model = from_proto(proto)
    original = {t.name for t in model.graph.initializer}
    zeros = np.zeros(8, np.float32)
    model.add_initializer("zeros_copy", zeros)
    model.add_initializer("scale_copy", np.ones(8, np.float32))  # differs from everything: stays
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input[1] == "w2a":
            n.input[2] = "zeros_copy"
    assert reshare(model, original) == 1
    assert model.initializer("zeros_copy") is None and model.initializer("scale_copy") is not None
    assert all(n.input[2] == "zeros" for n in model.graph.node if n.op_type == "Conv")
