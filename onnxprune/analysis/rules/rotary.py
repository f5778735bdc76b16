"""``RotaryEmbedding`` (ai.onnx opset 23 and ``com.microsoft``): rotates each head on its own.

The cos/sin tables depend on the position and the index inside a head, never on which head, so
whole heads pass unchanged. 3-D inputs ``[B, S, H*D]`` between a projection and a fused attention
op are traced back from the attention op
(:meth:`~onnxprune.analysis.heads.assemble.GroupAssembly.walk_back`, which also shrinks
``num_heads``); here the head engine meets 4-D inputs that already carry heads: ai.onnx
``[B, H, S, D]`` (heads on axis 1) and com.microsoft ``[B, S, H, D]`` (axis 2). Channel analysis
has no rule: the rotation mixes channel pairs inside a head, so channel groups block there.
"""

from __future__ import annotations

import onnx

from onnxprune.analysis.heads.engine import Engine
from onnxprune.analysis.heads.state import Ann, Blocked
from onnxprune.analysis.rules import register
from onnxprune.ir.graph import attr_dict


def _rotary(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int, head_axis: int) -> None:
    by_k = dict(annotated)
    if set(by_k) != {0}:
        raise Blocked("a rotary table or position input carries the heads")
    a = by_k[0]
    if len(eng.need_shape(node.input[0])) != 4 or a.axis != head_axis:
        raise Blocked(f"heads must lie on axis {head_axis} of a 4-D input")
    heads = int(attr_dict(node).get("num_heads", 0))
    if heads:
        eng.comp(c).attr_edits.append((node.name, "num_heads", heads))
    eng.emit(node, a, c)


@register("RotaryEmbedding", since=23, analysis="heads")
def heads_rotary_onnx(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    """ai.onnx RotaryEmbedding on ``[B, H, S, D]``."""
    _rotary(eng, node, annotated, c, 1)


@register("RotaryEmbedding", domain="com.microsoft", analysis="heads")
def heads_rotary_ms(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    """com.microsoft RotaryEmbedding on ``[B, S, H, D]``."""
    _rotary(eng, node, annotated, c, 2)
