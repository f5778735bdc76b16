"""Shared state of the attention/FFN engine: op-type sets, annotations, candidate blocks.

* :class:`Ann` -- heads (or FFN neurons) on one tensor axis of length ``o * n * b``: ``n``
  units as the middle factor, ``o`` outer and ``b`` inner elements per unit;
* :class:`Comp` -- one candidate block (attention or FFN), merged by union-find;
* :class:`Blocked` -- raised by a rule that cannot account for a node (message = reason);
* :func:`axes_of`, :func:`factor_axis` -- helpers of the propagation rules (in
  :mod:`onnxprune.analysis.rules`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.ir.graph import attr_dict


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
    io: list[tuple[str, int, int, str]] = field(default_factory=list)  # graph input/output, axis, length, kind
    align: list[tuple[str, int, int]] = field(default_factory=list)  # MatMulNBits node, K length, block_size
    cores: int = 0
    activations: int = 0
    blocked: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    channel_tensors: dict[str, int] = field(default_factory=dict)  # tensor -> axis that shrinks
    path_nodes: set[str] = field(default_factory=set)


class Blocked(Exception):
    """A rule cannot account for a node; the message is the reason."""


def axes_of(node: onnx.NodeProto, input_index: int, const: Callable[[str], np.ndarray | None]) -> list[int] | None:
    """Axes of a Squeeze/Unsqueeze/Reduce: the attribute (old opsets) or the constant input ``input_index``."""
    attrs = attr_dict(node)
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(node.input) > input_index and node.input[input_index]:
        v = const(node.input[input_index])
        return None if v is None else [int(a) for a in v.reshape(-1)]
    return None


def factor_axis(o: list[int], pre: int, n: int) -> int | None:
    """Output axis that holds the head factor ``[pre, pre * n)`` whole (None if split)."""
    p = 1
    cands = []
    for j, d in enumerate(o):
        if pre % p == 0 and (p * d) % (pre * n) == 0:
            cands.append(j)
        p *= d
    if not cands:
        return None
    wide = [j for j in cands if o[j] > 1]
    return wide[0] if wide else cands[0]
