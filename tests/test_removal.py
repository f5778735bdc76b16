"""Unit tests of the removal representation (positions, merging, shape edits, masked twin)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune.analysis.removal import (
    ParamSlice,
    PruneGroup,
    ShapeEdit,
    apply_removal,
    mask_group,
    positions,
)
from onnxprune.errors import PassError
from onnxprune.ir.load import from_proto
from onnxprune.ir.model import Model


def _model(inits: dict[str, np.ndarray], nodes: list[onnx.NodeProto] | None = None) -> Model:
    g = helper.make_graph(nodes or [], "g", [], [], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return from_proto(helper.make_model(g))


def test_positions_offset_block_stride() -> None:
    s = ParamSlice("w", 0, "in", offset=2, block=3)
    assert positions(s, np.array([0, 2])).tolist() == [2, 3, 4, 8, 9, 10]
    s2 = ParamSlice("w", 0, "in", offset=1, block=2, stride=5)
    assert positions(s2, np.array([1])).tolist() == [6, 7]


def test_apply_removal_merges_slices_on_one_axis() -> None:
    w = np.arange(24, dtype=np.float32).reshape(6, 4)
    m = _model({"w": w})
    g1 = PruneGroup("a", 2, [ParamSlice("w", 0, "out", 0)])
    g2 = PruneGroup("b", 4, [ParamSlice("w", 0, "out", 2)])
    g3 = PruneGroup("c", 4, [ParamSlice("w", 1, "in", 0)])
    stats = apply_removal(m, [(g1, np.array([1])), (g2, np.array([0, 3])), (g3, np.array([2]))])
    out = m.get_array("w")
    np.testing.assert_array_equal(out, w[[0, 3, 4]][:, [0, 1, 3]])
    assert stats["params_removed"] == 24 - 9
    assert stats["channels_removed"] == 4


def test_shape_edits_initializer_and_attributes() -> None:
    node = helper.make_node("Split", ["x"], ["p", "q"], name="sp", axis=1, split=[4, 6])
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=6)
    m = _model({"shp": np.array([-1, 12, 5], dtype=np.int64)}, [node, conv])
    g = PruneGroup("a", 6, [], [ShapeEdit("initializer", "shp", 1, 2), ShapeEdit("attribute", "sp", "split[1]", 1),
                                ShapeEdit("attribute", "dw", "group", 1)])
    apply_removal(m, [(g, np.array([0, 5]))])
    assert m.get_array("shp").tolist() == [-1, 8, 5]
    attrs = {a.name: helper.get_attribute_value(a) for n in m.graph.node for a in n.attribute}
    assert list(attrs["split"]) == [4, 4]
    assert attrs["group"] == 4


def test_bad_channel_indices_raise() -> None:
    m = _model({"w": np.ones((3, 2), np.float32)})
    g = PruneGroup("a", 3, [ParamSlice("w", 0, "out")])
    with pytest.raises(PassError, match="out of range"):
        apply_removal(m, [(g, np.array([3]))])
    with pytest.raises(PassError, match="cannot remove all"):
        apply_removal(m, [(g, np.array([0, 1, 2]))])


def test_shape_edit_refuses_non_positive() -> None:
    m = _model({"shp": np.array([2], dtype=np.int64), "w": np.ones((4,), np.float32)})
    g = PruneGroup("a", 4, [ParamSlice("w", 0, "out")], [ShapeEdit("initializer", "shp", 0, 1)])
    with pytest.raises(PassError, match="would drop"):
        apply_removal(m, [(g, np.array([0, 1]))])


def test_mask_group_zeroes_only_in_slices() -> None:
    w_out = np.ones((4, 3), np.float32)
    w_in = np.ones((5, 4, 2), np.float32)
    m = _model({"wo": w_out, "wi": w_in})
    g = PruneGroup("a", 2, [ParamSlice("wo", 0, "out", 0, 2), ParamSlice("wi", 1, "in", 0, 2)])
    mask_group(m, g, np.array([1]))
    np.testing.assert_array_equal(m.get_array("wo"), w_out)
    wi = m.get_array("wi")
    assert (wi[:, 2:] == 0).all() and (wi[:, :2] == 1).all()


def test_value_info_cleared() -> None:
    m = _model({"w": np.ones((3,), np.float32)})
    m.graph.value_info.append(helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [3]))
    apply_removal(m, [(PruneGroup("a", 3, [ParamSlice("w", 0, "out")]), np.array([0]))])
    assert len(m.graph.value_info) == 0 and m.get_array("w").shape == (2,)
