"""``com.microsoft`` ``MatMulNBits``: ``Y = X @ Wᵀ`` with a block-quantised constant ``W [N, K]``.

Its weight is seen through the logical ``[N, K]`` axes of :mod:`onnxprune.analysis.nbits`
(axis 0 = output rows, axis 1 = input positions). Channel analysis: like a MatMul with a constant
weight -- the input's last-axis segments become ``"in"`` slices of K, the output's last axis a new
space owning the rows N (and the bias). Removing input positions is only possible in whole
quantisation blocks, which :func:`~onnxprune.analysis.removal.plan_problems` checks (a group that
would split a block is refused with that reason). Head/FFN engine: the exit of a stream
contracting over the last axis (:meth:`~onnxprune.analysis.heads.engine.Engine.exit_nbits`).
"""

from __future__ import annotations

import onnx

from onnxprune.analysis.channels.state import Analysis
from onnxprune.analysis.heads.engine import Engine
from onnxprune.analysis.heads.state import Ann, Blocked
from onnxprune.analysis.nbits import nbits_of, support_problem
from onnxprune.analysis.rules import register
from onnxprune.analysis.rules.common import opaque


@register("MatMulNBits", domain="com.microsoft")
def nbits_channels(a: Analysis, node: onnx.NodeProto) -> None:
    """MatMulNBits with a constant weight: K slices in, a new space of N rows out."""
    x, y = node.input[0], node.output[0]
    lay = a.layout(x)
    w = nbits_of(a.model, node)
    problem = "weight or scales are not constant" if w is None else support_problem(a.model, w)
    if lay is None or problem or len(lay) < 2:
        a.block(lay, f"MatMulNBits node {node.name!r}: {problem or 'input rank unknown'}")
        a.set_layout(y, opaque(a, y))
        return
    assert w is not None
    a.add_slices(lay[-1], w.weight, 1, "in")
    a.add_probe(x, len(lay) - 1, lay[-1])
    out_n = a.new_space(node, 0, w.N, y)
    a.add_slices(out_n, w.weight, 0, "out")
    if w.bias:
        a.add_slices(out_n, w.bias, 0, "out", "bias")
    a.set_layout(y, list(lay[:-1]) + [out_n])


@register("MatMulNBits", domain="com.microsoft", analysis="heads")
def heads_nbits(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    """Heads or FFN neurons on the input's last axis: the block's exit (output / down projection)."""
    by_k = dict(annotated)
    if set(by_k) != {0}:
        raise Blocked("the annotated tensor is not MatMulNBits' input A")
    if by_k[0].axis != len(eng.need_shape(node.input[0])) - 1:
        raise Blocked("MatMulNBits contracts over the last axis, which does not carry the annotation")
    eng.exit_nbits(node, by_k[0], c)
