"""Dead-structure removal (``criterion=dead``): exactly-zero units go, with zero error, nothing else."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from models import random_inputs
from models.cnn import build_cnn
from models.transformer import build_transformer_block
from onnxprune.ir.load import from_proto


def _zero(proto: onnx.ModelProto, name: str, index: tuple) -> onnx.ModelProto:
    for t in proto.graph.initializer:
        if t.name == name:
            arr = numpy_helper.to_array(t).copy()
            arr[index] = 0
            t.CopyFrom(numpy_helper.from_array(arr, name))
            return proto
    raise KeyError(name)



def _outputs(model, feeds):
    import onnxruntime as ort

    proto = model.proto if hasattr(model, "proto") else model
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _check_exact(dense: onnx.ModelProto, spec: str, feeds: dict) -> tuple[object, dict]:
    res = onnxprune.optimize(from_proto(dense), spec)
    for a, b in zip(_outputs(dense, feeds), _outputs(res.model, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    return res.model, res.report.passes[-1].stats


def test_dead_ffn_neurons_and_head_removed_exactly() -> None:
    proto = build_transformer_block(layers=1, hidden=64, heads=4, ffn=128)
    _zero(proto, "layer0.ffn.down.weight", (np.array([5, 9, 100]),))
    _zero(proto, "layer0.attn.out.weight", (slice(16, 32),))  # head 1's rows of the output projection
    feeds = random_inputs(proto, seed=1)
    model, stats = _check_exact(proto, "ffn(criterion=dead)", feeds)
    assert stats["units_removed"] == 3
    assert model.get_array("layer0.ffn.down.weight").shape[0] == 125
    model, stats = _check_exact(proto, "heads(criterion=dead)", feeds)
    assert stats["units_removed"] == 1
    assert model.get_array("layer0.attn.out.weight").shape[0] == 48


def test_dead_channels_removed_exactly_and_live_models_untouched() -> None:
    proto = build_cnn()
    _zero(proto, "block1.conv2.weight", (slice(None), np.array([3, 7])))
    feeds = random_inputs(proto, seed=2)
    model, stats = _check_exact(proto, "channels(criterion=dead)", feeds)
    assert stats["channels_removed"] == 2
    assert model.get_array("block1.conv2.weight").shape[1] == 14
    # a model with no exactly-zero unit: nothing removed, whatever the ratio says
    live = build_transformer_block(layers=1)
    for spec in ("ffn(criterion=dead,ratio=0.5)", "heads(criterion=dead)", "channels(criterion=dead)"):
        res = onnxprune.optimize(from_proto(live), spec)
        assert not res.report.passes[-1].modified, spec


def test_nearly_zero_is_not_dead() -> None:
    proto = build_transformer_block(layers=1)
    _zero(proto, "layer0.ffn.down.weight", (np.array([5]),))
    for t in proto.graph.initializer:
        if t.name == "layer0.ffn.down.weight":
            arr = numpy_helper.to_array(t).copy()
            arr[5, 0] = 1e-30  # one live weight keeps the neuron alive
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    res = onnxprune.optimize(from_proto(proto), "ffn(criterion=dead)")
    assert not res.report.passes[-1].modified


@pytest.mark.parametrize("spec", ["ffn(criterion=dead)"])
def test_dead_needs_no_calibration(spec: str) -> None:
    proto = build_transformer_block(layers=1)
    _zero(proto, "layer0.ffn.down.weight", (np.array([0, 1]),))
    res = onnxprune.optimize(from_proto(proto), spec)  # no calibration given: must not ask for any
    assert res.report.passes[-1].stats["units_removed"] == 2
