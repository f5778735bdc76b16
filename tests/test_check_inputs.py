"""Synthesized check inputs: what the graph says (Gather tables, shared and forced dims, names), probing, errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.check import (
    FeedSynthesisError,
    compare,
    input_hints,
    larger_feeds,
    make_session,
    synthesize_feeds,
)
from onnxprune.ir.load import from_proto

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           inits: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                             opset_imports=[helper.make_opsetid("", 18)])


def _feeds(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    feeds, _ = synthesize_feeds(make_session(from_proto(proto)), proto)
    return feeds


def test_token_ids_stay_inside_the_gather_table() -> None:
    # ids reach the table through Cast and Unsqueeze; the table has 7 rows (ids up to 99 would crash)
    table = numpy_helper.from_array(np.ones((7, 4), np.float32), "emb")
    nodes = [helper.make_node("Cast", ["ids"], ["c"], to=I64), helper.make_node("Unsqueeze", ["c", "ax"], ["u"]),
             helper.make_node("Gather", ["emb", "u"], ["y"])]
    proto = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", "seq"])],
                   [helper.make_tensor_value_info("y", F, None)],
                   [table, numpy_helper.from_array(np.array([0], np.int64), "ax")])
    assert input_hints(proto).id_bound == {"ids": 7}
    feeds = _feeds(proto)
    assert feeds["ids"].max() < 7 and feeds["ids"].dtype == np.int32


def test_reflect_pad_longer_than_the_default_length_is_probed_past() -> None:
    # audio [batch, samples] with a reflect pad of 64: 16 samples fail, the next candidate runs
    nodes = [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")]
    proto = _model(nodes, [helper.make_tensor_value_info("x", F, ["batch", "samples"])],
                   [helper.make_tensor_value_info("y", F, None)],
                   [numpy_helper.from_array(np.array([0, 64, 0, 64], np.int64), "pads")])
    feeds = _feeds(proto)
    assert feeds["x"].shape[0] == 1 and feeds["x"].shape[1] > 64


def test_shared_symbolic_dims_get_one_value_and_state_inputs_are_zero() -> None:
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("MatMul", ["s", "h"], ["y"])]
    proto = _model(nodes, [helper.make_tensor_value_info("a", F, ["n", "t"]),
                           helper.make_tensor_value_info("b", F, ["n", "t"]),
                           helper.make_tensor_value_info("h", F, ["t", 3])],
                   [helper.make_tensor_value_info("y", F, None)])
    feeds = _feeds(proto)
    assert feeds["a"].shape == feeds["b"].shape and feeds["h"].shape[0] == feeds["a"].shape[1]
    assert not feeds["h"].any()  # 'h' is named like recurrent state


def test_broadcast_against_a_constant_forces_the_dim() -> None:
    bias = numpy_helper.from_array(np.ones((1, 5), np.float32), "bias")
    proto = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "bias"], ["y"])],
                   [helper.make_tensor_value_info("x", F, ["b", "d"])], [helper.make_tensor_value_info("y", F, None)],
                   [bias])
    assert input_hints(proto).forced == {("x", 1): 5}
    assert _feeds(proto)["x"].shape == (1, 5)


def test_sample_rate_image_size_and_unnamed_state_batch() -> None:
    # silero-like: sr scalar, state [2, ?, 4] whose unnamed batch must equal the audio's; an NCHW image
    nodes = [helper.make_node("Cast", ["sr"], ["srf"], to=F), helper.make_node("ReduceSum", ["x"], ["xs"], keepdims=0),
             helper.make_node("Mul", ["state", "srf"], ["y"]), helper.make_node("Identity", ["img"], ["z"])]
    proto = _model(nodes, [helper.make_tensor_value_info("sr", I64, []),
                           helper.make_tensor_value_info("x", F, [None, None]),
                           helper.make_tensor_value_info("state", F, [2, None, 4]),
                           helper.make_tensor_value_info("img", F, ["n", 3, "h", "w"])],
                   [helper.make_tensor_value_info(o, F, None) for o in ("y", "z", "xs")])
    feeds = _feeds(proto)
    assert int(feeds["sr"]) == 16000
    assert feeds["state"].shape == (2, 1, 4) and feeds["x"].shape[0] == 1
    h, w = feeds["img"].shape[2:]
    assert h == w and h >= 64 and h % 32 == 0


def test_a_text_line_image_with_fixed_height_gets_an_image_width() -> None:
    # a recogniser [n, 3, 48, w]: the width is a spatial axis (>= 64), not a length of 16
    proto = _model([helper.make_node("Identity", ["img"], ["z"])],
                   [helper.make_tensor_value_info("img", F, ["n", 3, 48, "w"])], [helper.make_tensor_value_info("z", F, None)])
    assert _feeds(proto)["img"].shape == (1, 3, 48, 64)


def test_larger_feeds_grow_an_axis_and_skip_sizes_the_model_refuses() -> None:
    # audio with a reflect pad of 100: 16 and 64 samples fail, 128 runs; one size up is 256
    nodes = [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")]
    proto = _model(nodes, [helper.make_tensor_value_info("x", F, ["batch", "samples"])],
                   [helper.make_tensor_value_info("y", F, None)],
                   [numpy_helper.from_array(np.array([0, 100, 0, 100], np.int64), "pads")])
    session = make_session(from_proto(proto))
    base = _feeds(proto)
    assert base["x"].shape == (1, 128)
    assert larger_feeds(session, proto, base)["x"].shape == (1, 256)
    # nothing can grow when the user fixed the dims, nor when every dim is static
    assert larger_feeds(session, proto, base, dims={"batch": 1, "samples": 128}) is None
    fixed = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", F, [1, 8])],
                   [helper.make_tensor_value_info("y", F, None)])
    assert larger_feeds(make_session(from_proto(fixed)), fixed, _feeds(fixed)) is None


def test_no_candidate_runs_names_shapes_and_flags() -> None:
    # a Reshape to a fixed 1000 elements: no candidate length gives 1000 values
    proto = _model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                   [helper.make_tensor_value_info("x", F, ["n", "t"])], [helper.make_tensor_value_info("y", F, None)],
                   [numpy_helper.from_array(np.array([1000], np.int64), "shape")])
    with pytest.raises(FeedSynthesisError) as info:
        _feeds(proto)
    msg = str(info.value)
    assert "x [1, 16]" in msg and "x [1, 512]" in msg and "--dim NAME=VALUE" in msg and "--check-inputs" in msg
    # the user's dims win: 1 x 1000 runs
    assert compare(from_proto(proto), from_proto(proto), dims={"t": 1000}).problems() == []
