"""Shared state of the attention/FFN engine: op-type sets, annotations, candidate blocks.

* :class:`Ann` -- heads (or FFN neurons) on one tensor axis of length ``o * n * b``: ``n``
  units as the middle factor, ``o`` outer and ``b`` inner elements per unit;
* :class:`Comp` -- one candidate block (attention or FFN), merged by union-find;
* :class:`Blocked` -- raised by a rule that cannot account for a node (message = reason);
* the op-type sets the propagation rules dispatch on, and small attribute helpers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

UNARY = {"Identity", "Cast", "Neg", "Sqrt", "Relu", "Erf", "Tanh", "Sigmoid", "Exp", "Log",
         "Reciprocal", "Abs", "IsNaN", "IsInf", "Not", "Sign", "Softplus", "Gelu", "LeakyRelu",
         "Elu", "Selu", "HardSigmoid", "HardSwish", "Mish", "Sin", "Cos", "Floor", "Ceil", "Round",
         "Dropout", "Celu", "ThresholdedRelu", "Softsign"}


BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater",
             "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "Clip", "PRelu", "BitShift"}


ACTIVATIONS = {"Relu", "Erf", "Tanh", "Sigmoid", "Gelu", "Softplus", "LeakyRelu", "Elu", "Selu",
               "HardSigmoid", "HardSwish", "Mish", "Celu", "FastGelu", "BiasGelu", "QuickGelu"}


REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
          "ReduceSumSquare", "ReduceLogSumExp"}


SHAPE_ONLY = {"Shape", "Size"}


FUSED_MS = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}


@dataclass
class Ann:
    """Heads (or neurons) on one tensor axis: ``len(axis) = o * n * b``; ``n`` is the middle factor."""

    axis: int
    o: int
    n: int
    b: int
    comp: int


@dataclass
class Comp:
    """One candidate block (attention or FFN), merged by union-find."""

    kind: str
    streams: list[tuple[str, int, int, str]] = field(default_factory=list)  # (tensor, offset, length, start)
    ns: set[int] = field(default_factory=set)
    shape_refs: list[tuple[str, int, int, int, str]] = field(default_factory=list)  # node, input, pos, contrib, how
    params: list[tuple[str, int, int, int, str, str]] = field(default_factory=list)  # init, axis, off, len, role, tag
    attr_edits: list[tuple[str, str, int]] = field(default_factory=list)  # node, attr index, value
    exits: list[tuple[str, str, int]] = field(default_factory=list)  # node, exit input tensor, exit length
    split_refs: list[tuple[str, int, int]] = field(default_factory=list)  # split node, output k, contrib
    cores: int = 0
    activations: int = 0
    blocked: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    channel_tensors: dict[str, int] = field(default_factory=dict)  # tensor -> axis that shrinks
    path_nodes: set[str] = field(default_factory=set)


class Blocked(Exception):
    """A rule cannot account for a node; the message is the reason."""


def attr_dict(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
