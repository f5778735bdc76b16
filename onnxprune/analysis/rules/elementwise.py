"""Element-wise ops and activations.

Unary ops (activations, Cast, Dropout, Identity) act per element: the output has the input's
layout. Binary and variadic ops (Add, Sub, Mul, Div, Sum, Max, Min, Mean, Pow, Where, PRelu...)
broadcast: the spaces of non-constant operands are unified axis by axis (a residual Add ties both
branches into one group), and a constant operand that varies along a channel axis (a PRelu slope,
a per-channel scale) becomes a ``"param"`` slice. Shape and Size read no values and produce opaque
outputs. Quantize/DequantizeLinear on activations are element-wise with a per-channel scale.
"""

from __future__ import annotations

import onnx

from onnxprune.analysis.channels.state import Analysis
from onnxprune.analysis.heads.engine import Engine
from onnxprune.analysis.heads.state import Ann, Blocked
from onnxprune.analysis.rules import register
from onnxprune.analysis.rules.common import broadcast, has_channels, passthrough
from onnxprune.ir.graph import attr
from onnxprune.ir.ops import ACTIVATIONS, BINARY, SHAPE_ONLY, UNARY


@register(sorted(UNARY))
def unary(a: Analysis, node: onnx.NodeProto) -> None:
    """Per-element ops: the output keeps the input's layout (Dropout's mask too)."""
    passthrough(a, node)
    for o in node.output[1:]:
        a.set_layout(o, a.layout(node.input[0]))


@register("Clip")
def clip(a: Analysis, node: onnx.NodeProto) -> None:
    """Clip: min/max are scalars (opset 11+ inputs) or attributes."""
    lay = a.layout(node.input[0])
    for bound in node.input[1:]:
        if bound and not a.is_const(bound):
            d = a.dims(bound)
            if d not in ([], [1]):
                a.block(lay, f"Clip node {node.name!r}: non-scalar bound")
    a.set_layout(node.output[0], lay)


@register(sorted(BINARY))
def binary(a: Analysis, node: onnx.NodeProto) -> None:
    """Broadcasting element-wise ops (residual Add unifies its operands)."""
    a.set_layout(node.output[0], broadcast(a, node, list(node.input)))


@register(sorted(SHAPE_ONLY))
def shape_of(a: Analysis, node: onnx.NodeProto) -> None:
    """Shape/Size read no values: opaque output, no block (run-time shapes follow the pruned model)."""
    a.set_layout(node.output[0], [()] if node.op_type == "Shape" else [])


@register(["QuantizeLinear", "DequantizeLinear"])
def quant(a: Analysis, node: onnx.NodeProto) -> None:
    """(De)quantisation of an activation: element-wise with a per-tensor or per-axis scale."""
    lay = a.layout(node.input[0])
    if lay is None or not has_channels(lay):
        a.set_layout(node.output[0], lay)
        return
    r = len(lay)
    axis = int(attr(node, "axis", 1)) % r
    for p in node.input[1:3]:
        if not p:
            continue
        d = a.dims(p)
        if d is None:
            a.block(lay, f"{node.op_type} node {node.name!r}: scale of unknown shape")
        elif len(d) == 1 and d[0] not in (1, None):
            if not a.is_const(p):
                a.block(lay, f"{node.op_type} node {node.name!r}: scale is not constant")
            else:
                a.add_slices(lay[axis], p, 0, "param", "quant")
        elif len(d) > 1:
            a.block(lay, f"{node.op_type} node {node.name!r}: blocked quantisation is not supported")
    a.set_layout(node.output[0], lay)


# ---------------------------------------------------------------------- head / FFN annotations
@register(sorted(UNARY | ACTIVATIONS | BINARY | {"Clip"}), analysis="heads")
@register(sorted(ACTIVATIONS), domain="com.microsoft", analysis="heads")
def heads_elementwise(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    out = eng.need_shape(node.output[0])
    rank = len(out)
    ax_out = None
    fine: Ann | None = None
    for k, a in annotated:
        r = len(eng.need_shape(node.input[k]))
        ax = a.axis + rank - r
        if ax_out is None:
            ax_out = ax
        if ax != ax_out or a.o != annotated[0][1].o or a.n * a.b != annotated[0][1].n * annotated[0][1].b:
            raise Blocked("operands carry the heads on different axes or factors")
        if fine is None or a.n > fine.n:
            fine = a
    assert fine is not None and ax_out is not None
    length = out[ax_out]
    ann_inputs = {k for k, _ in annotated}
    for k, name in enumerate(node.input):
        if not name or k in ann_inputs:
            continue
        s = eng.need_shape(name)
        al = ax_out - (rank - len(s))
        if al < 0 or s[al] == 1:
            continue
        value = eng.const(name)
        if value is None or s[al] != length:
            raise Blocked(f"operand {name!r} varies along the {eng.what()} axis and is not a constant")
        if fine.o != 1:
            raise Blocked(f"per-channel constant {name!r} with an outer factor")
        users = {n.name for n in eng.consumers.get(name, [])}
        if len(users) > 1:
            raise Blocked(f"per-channel constant {name!r} is shared")
        tag = "bias" if node.op_type in ("Add", "Sub") else "param"
        eng.comp(c).params.append((name, al, 0, length, "out" if tag == "bias" else "param", tag))
    eng.check_ffn_axis(fine, rank)
    eng.emit(node, Ann(ax_out, fine.o, fine.n, fine.b, c), c)


@register(sorted(SHAPE_ONLY), analysis="heads")
def heads_shape_only(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    """Shape/Size read only the shape: nothing to carry, nothing to block."""
