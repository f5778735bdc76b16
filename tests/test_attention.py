"""Attention-head analysis: block finding, shape edits, and masked-twin exactness.

For every attention form (decomposed MHA from ``models.build_transformer_block``, fused QKV with
Split, grouped-query attention with Expand, rotary embeddings, ``com.microsoft``
MultiHeadAttention / Attention / GroupQueryAttention, opset-23 Attention) the group found must
(1) have the right width and (2) satisfy the oracle: removing heads gives the same ONNX Runtime
outputs as the masked twin (output-projection rows of those heads zeroed), while the masked twin
differs from the dense model (so the check is not vacuous).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from models import build_transformer_block
from models.attention import (
    attention_feeds,
    build_attention,
    build_ms_attention,
    build_ms_gqa,
    build_ms_mha,
    build_onnx_attention,
    build_onnx_attention_4d,
    check_masked_twin,
)
from onnxprune.analysis.heads.groups import (
    find_head_groups,
)
from onnxprune.analysis.heads.prepare import prepare_model
from onnxprune.analysis.removal import apply_removal
from onnxprune.check import run_model
from onnxprune.ir.model import Model


# ---------------------------------------------------------------------- tests
def test_decomposed_mha_from_builder() -> None:
    proto = build_transformer_block(layers=2)
    model = Model(proto)
    prepare_model(model)
    groups = find_head_groups(model)
    assert len(groups) == 2 and all(g.width == 4 and g.prunable for g in groups)
    edits = {(e.target, e.index): e.per_channel for e in groups[0].shape_edits}
    assert edits == {("layer0.attn.q.reshape.shape", 2): 1, ("layer0.attn.k.reshape.shape", 2): 1,
                     ("layer0.attn.v.reshape.shape", 2): 1, ("layer0.attn.context.reshape.shape", 2): 16}
    roles = {(s.initializer, s.role, s.block) for s in groups[0].slices}
    assert ("layer0.attn.out.weight", "in", 16) in roles and ("layer0.attn.q.weight", "out", 16) in roles
    check_masked_twin(proto, [0, 2], 4)


@pytest.mark.parametrize("remove", [[1], [0, 3]])
def test_separate_qkv(remove: list[int]) -> None:
    check_masked_twin(build_attention(), remove, 4)


def test_fused_qkv_split() -> None:
    proto = build_attention(fused=True)
    model = Model(proto)
    prepare_model(model)
    (g,) = find_head_groups(model)
    offsets = sorted(s.offset for s in g.slices if s.tag == "weight" and s.role == "out")
    assert offsets == [0, 32, 64]
    split_sizes = next(n for n in model.graph.node if n.op_type == "Split").input[1]
    assert {e.index: e.per_channel for e in g.shape_edits if e.target == split_sizes} == {0: 8, 1: 8, 2: 8}
    check_masked_twin(proto, [2], 4)


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (6, 2)])
def test_fused_qkv_slice(hq: int, hkv: int) -> None:
    proto = build_attention(hq=hq, hkv=hkv, fused="slice")
    model = Model(proto)
    prepare_model(model)
    (g,) = find_head_groups(model)
    assert g.prunable, g.blocked
    check_masked_twin(proto, [1], hkv)


def test_gqa_expand_removes_kv_head_with_its_query_group() -> None:
    proto = build_attention(hq=4, hkv=2)
    model = Model(proto)
    prepare_model(model)
    (g,) = find_head_groups(model)
    assert g.width == 2
    blocks = {s.block for s in g.slices if s.tag == "weight"}
    assert blocks == {8, 16}  # K/V: one head of 8; Q and output rows: two query heads of 8
    check_masked_twin(proto, [1], 2)


def test_gqa_tile_repeat() -> None:
    check_masked_twin(build_attention(hq=8, hkv=2, repeat="tile"), [1], 2)


def test_gqa_fused_with_rotary() -> None:
    check_masked_twin(build_attention(hq=6, hkv=2, fused=True, rotary=True), [0], 2)


def test_rotary_mha() -> None:
    check_masked_twin(build_attention(rotary=True), [1, 2], 4)


def test_ms_multihead_attention() -> None:
    proto = build_ms_mha()
    model = Model(proto)
    prepare_model(model)
    (g,) = find_head_groups(model)
    assert any(e.kind == "attribute" and e.index == "num_heads" and e.per_channel == 1 for e in g.shape_edits)
    check_masked_twin(proto, [1, 3], 4)


def test_ms_multihead_attention_packed_bias() -> None:
    proto = build_ms_mha(packed_bias=True)
    model = Model(proto)
    prepare_model(model)
    (g,) = find_head_groups(model)
    assert sorted(s.offset for s in g.slices if s.tag == "bias") == [0, 32, 64]
    check_masked_twin(proto, [2], 4)


def test_ms_attention_packed_weights() -> None:
    proto = build_ms_attention()
    model = Model(proto)
    prepare_model(model)
    (g,) = find_head_groups(model)
    packed = sorted(s.offset for s in g.slices if s.role == "out" and s.tag == "weight")
    assert packed == [0, 32, 64]
    check_masked_twin(proto, [0], 4)


def test_ms_group_query_attention() -> None:
    proto = build_ms_gqa()
    model = Model(proto)
    prepare_model(model)
    (g,) = find_head_groups(model)
    edits = {e.index: e.per_channel for e in g.shape_edits if e.kind == "attribute"}
    assert edits == {"num_heads": 2, "kv_num_heads": 1}
    check_masked_twin(proto, [0], 2)


def test_onnx_opset23_attention() -> None:
    check_masked_twin(build_onnx_attention(), [1], 2)


@pytest.mark.parametrize("hkv", [4, 2])
def test_onnx_opset23_attention_4d(hkv: int) -> None:
    check_masked_twin(build_onnx_attention_4d(hkv=hkv), [0], hkv)


def test_head_with_zero_v_and_output_is_removed_without_change() -> None:
    proto = build_transformer_block(layers=1)
    model = Model(proto)
    prepare_model(model)
    (g,) = find_head_groups(model)
    for name, axis in (("layer0.attn.v.weight", 1), ("layer0.attn.v.bias", 0), ("layer0.attn.out.weight", 0)):
        arr = np.array(model.get_array(name))
        idx = [slice(None)] * arr.ndim
        idx[axis] = slice(16, 32)  # head 1
        arr[tuple(idx)] = 0
        model.set_array(name, arr)
    feeds = attention_feeds(proto)
    dense = run_model(model, feeds)
    pruned = model.copy()
    apply_removal(pruned, [(g, np.array([1]))])
    assert pruned.get_array("layer0.attn.out.weight").shape == (48, 64)
    assert pruned.get_array("layer0.attn.context.reshape.shape").tolist() == [0, 0, 48]
    out = run_model(pruned, feeds)
    np.testing.assert_allclose(out["last_hidden_state"], dense["last_hidden_state"], atol=1e-5)


def test_graph_output_carrying_heads_blocks_the_group() -> None:
    proto = build_attention()
    probs = next(n for n in proto.graph.node if n.op_type == "Softmax").output[0]
    proto.graph.output.append(helper.make_tensor_value_info(probs, TensorProto.FLOAT, None))
    model = Model(proto)
    prepare_model(model)
    (g,) = find_head_groups(model)
    assert not g.prunable and probs in g.blocked


def test_head_mixing_op_blocks_with_reason() -> None:
    proto = build_attention()
    sm = next(n for n in proto.graph.node if n.op_type == "Softmax")
    sm.attribute[0].i = 1  # softmax over the heads axis mixes heads
    model = Model(proto)
    prepare_model(model)
    (g,) = find_head_groups(model)
    assert not g.prunable and "Softmax" in g.blocked


def test_shared_shape_constant_is_privatized() -> None:
    proto = build_attention()
    shapes = [n for n in proto.graph.node if n.op_type == "Reshape"][:3]
    for n in shapes[1:]:
        n.input[1] = shapes[0].input[1]  # Q, K and V share one target [0, 0, 4, 8]
    model = Model(proto)
    assert prepare_model(model) >= 2
    (g,) = find_head_groups(model)
    targets = [e.target for e in g.shape_edits if e.per_channel == 1]
    assert len(set(targets)) == 3
    check_masked_twin(proto, [1], 4)
