"""Rules for the ONNX ``Attention`` operator (opset 23): heads on 4-D inputs ``[B, H, S, D]``.

The channel analysis has no rule for it (channels never cross an attention core); the head
engine's rule is :meth:`~onnxprune.analysis.heads.fused.FusedAttentionRules.attention23_4d`.
The ``com.microsoft`` fused attention ops are handled where heads start
(:meth:`~onnxprune.analysis.heads.fused.FusedAttentionRules.fused`).
"""

from __future__ import annotations

import onnx

from onnxprune.analysis.heads.engine import Engine
from onnxprune.analysis.heads.state import Ann
from onnxprune.analysis.rules import register


@register("Attention", since=23, analysis="heads")
def heads_attention(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    """Annotated 4-D Q/K/V reach an ``Attention`` node: carry the heads to its output."""
    eng.attention23_4d(node, annotated, c)
