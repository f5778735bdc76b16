"""Rules for cumulative ops (``CumSum``): a running sum along one axis, element-wise elsewhere.

``y[..., i, ...] = Σ_{j <= i} x[..., j, ...]`` along ``axis`` (the second input, a constant
scalar). Along any other axis the op is per-element, so channels and heads pass through
unchanged; a running sum *along* the channel (or head) axis mixes channels and blocks.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.analysis.channels.state import Analysis
from onnxprune.analysis.heads.engine import Engine
from onnxprune.analysis.heads.state import Ann, Blocked
from onnxprune.analysis.rules import register


def _axis(const: np.ndarray | None, rank: int) -> int | None:
    return None if const is None or const.size != 1 else int(const.reshape(-1)[0]) % rank


@register("CumSum", since=11)
def cumsum(a: Analysis, node: onnx.NodeProto) -> None:
    """Channels pass through unless the sum runs along a channel axis (then that space is blocked)."""
    lay = a.layout(node.input[0])
    if lay is None:
        a.set_layout(node.output[0], None)
        return
    ax = _axis(a.const(node.input[1]), len(lay))
    if ax is None:
        a.block(lay, f"CumSum node {node.name!r}: axis not constant")
    elif lay[ax]:
        a.block(lay[ax], f"CumSum node {node.name!r}: sums along the channel axis")
    a.set_layout(node.output[0], lay)


@register("CumSum", since=11, analysis="heads")
def heads_cumsum(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    """Heads/neurons pass through unless the sum runs along their axis."""
    k, ann = annotated[0]
    if k != 0:
        raise Blocked("the CumSum axis is derived from annotated data")
    rank = len(eng.need_shape(node.input[0]))
    ax = _axis(eng.const(node.input[1]), rank)
    if ax is None or ax == ann.axis:
        raise Blocked("sums along the annotated axis" if ax is not None else "axis not constant")
    eng.check_ffn_axis(ann, rank)
    eng.emit(node, ann, c)
