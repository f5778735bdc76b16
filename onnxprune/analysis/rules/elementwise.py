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
from onnxprune.analysis.rules import register
from onnxprune.analysis.rules.common import broadcast, has_channels, passthrough
from onnxprune.ir.graph import attr

UNARY = [
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Softsign", "Gelu", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Sign", "Floor", "Ceil",
    "Round", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Mish",
    "ThresholdedRelu", "Shrink", "Not", "IsNaN", "IsInf", "Cast", "CastLike", "Identity", "Dropout",
    "BitwiseNot", "Swish",
]


BINARY = [
    "Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Mean", "PRelu", "Where", "Equal", "Less",
    "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "BitwiseAnd",
    "BitwiseOr", "BitwiseXor",
]


@register(UNARY)
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


@register(BINARY)
def binary(a: Analysis, node: onnx.NodeProto) -> None:
    """Broadcasting element-wise ops (residual Add unifies its operands)."""
    a.set_layout(node.output[0], broadcast(a, node, list(node.input)))


@register(["Shape", "Size"])
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
