"""Why ``heads`` recognised no attention block: one reason per Softmax attention candidate.

A *candidate* is a ``MatMul -> Softmax -> MatMul`` chain: the score MatMul produces the Softmax
input (through element-wise scaling, masking, casts and Q/DQ pairs), the context MatMul reads
the Softmax output (through casts, Dropout and Q/DQ pairs). The engine
(:mod:`~onnxprune.analysis.heads.engine`) starts a head stream only at a *split reshape*
``[..., n*D] -> [..., n, D]`` with static shapes, ``n >= 2`` and ``D >= 2``. For each candidate
:func:`why_no_heads` walks back from the Q, K and V operands through ops that keep heads apart
(Transpose, Squeeze/Unsqueeze, Slice/Gather/Split, scaling, casts, Q/DQ) to the first Reshape and
says why that Reshape does not start a stream (or that no Reshape splits the operand at all).

Read-only: the model is not changed. Used by ``passes/heads.py`` for its stats and warning.
"""

from __future__ import annotations

from collections import defaultdict

import onnx

from onnxprune.ir.model import Model

#: The message when the graph has no Softmax attention candidate at all.
NO_SOFTMAX = "no Softmax attention pattern found"

#: Ops between the score MatMul and the Softmax (scaling, masking, casts, Q/DQ).
_SCORE_PATH = {"Add", "Mul", "Div", "Sub", "Where", "Cast", "Identity", "DequantizeLinear", "QuantizeLinear"}
#: Ops between the Softmax and the context MatMul.
_PROB_PATH = {"Cast", "Identity", "Dropout", "DequantizeLinear", "QuantizeLinear", "Mul", "Where"}
#: Ops walked through from a Q/K/V operand back to its split Reshape.
_OPERAND_PATH = {"Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Split", "Mul", "Div", "Add", "Cast",
                 "Identity", "DequantizeLinear", "QuantizeLinear", "Sub", "Neg", "Concat"}
_MAX_DEPTH = 16


def why_no_heads(model: Model, shapes: dict[str, list[int] | None]) -> list[dict[str, str]]:
    """One ``{"softmax", "score", "context", "reason"}`` entry per attention candidate.

    Args:
        model: The (prepared) model the head engine ran on.
        shapes: Static shapes as the engine saw them (:func:`~onnxprune.analysis.heads.shapes.static_shapes`).

    Returns:
        The candidates in graph order (empty: no ``MatMul -> Softmax -> MatMul`` chain at all).
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for x in n.input:
            if x:
                consumers[x].append(n)
    consts = {t.name for t in g.initializer} - model.graph_input_names()

    def back_to(t: str, ops: set[str], target: str) -> onnx.NodeProto | None:
        for _ in range(_MAX_DEPTH):
            p = producer.get(t)
            if p is None:
                return None
            if p.op_type == target:
                return p
            if p.op_type not in ops:
                return None
            t = next((x for x in p.input if x and x not in consts and x in producer), "")
        return None

    def forward_to(t: str, ops: set[str], target: str) -> onnx.NodeProto | None:
        for _ in range(_MAX_DEPTH):
            users = consumers.get(t, [])
            hit = next((u for u in users if u.op_type == target), None)
            if hit is not None:
                return hit
            nxt = next((u for u in users if u.op_type in ops), None)
            if nxt is None:
                return None
            t = nxt.output[0]
        return None

    out: list[dict[str, str]] = []
    for sm in g.node:
        if sm.op_type != "Softmax":
            continue
        score = back_to(sm.input[0], _SCORE_PATH, "MatMul")
        context = forward_to(sm.output[0], _PROB_PATH, "MatMul")
        if score is None or context is None:
            continue
        operands = [("Q", score.input[0]), ("K", score.input[1]), ("V", context.input[1])]
        reason = next((r for r in (_operand_reason(role, t, producer, shapes) for role, t in operands) if r),
                      "Q, K and V are split into heads, yet no block formed (propagation stopped before the output "
                      "projection)")
        out.append({"softmax": sm.name, "score": score.name, "context": context.name, "reason": reason})
    return out


def _operand_reason(role: str, tensor: str, producer: dict[str, onnx.NodeProto],
                    shapes: dict[str, list[int] | None]) -> str | None:
    """Why the operand ``tensor`` does not come from a split reshape (None: it does)."""
    t = tensor
    last = "a graph input or constant"
    for _ in range(_MAX_DEPTH):
        p = producer.get(t)
        if p is None:
            break
        if p.op_type == "Reshape":
            return _reshape_reason(role, p, shapes)
        last = f"{p.op_type} {p.name!r}"
        if p.op_type not in _OPERAND_PATH:
            break
        t = p.input[0]
    return f"{role} is not split into heads by a Reshape (walking back it reaches {last})"


def _reshape_reason(role: str, node: onnx.NodeProto, shapes: dict[str, list[int] | None]) -> str | None:
    """Why Reshape ``node`` does not start a head stream, as the engine's ``start_heads`` decides."""
    i, o = shapes.get(node.input[0]), shapes.get(node.output[0])
    where = f"{role} Reshape {node.name!r}"
    for name, s in ((node.input[0], i), (node.output[0], o)):
        if s is None or any(d is None for d in s):
            return f"{where}: static shape of {name!r} unknown ({s if s is not None else 'no shape'})"
    assert i is not None and o is not None
    if len(o) == len(i) + 2 and len(i) >= 1 and o[-3] * o[-2] * o[-1] == i[-1]:
        return (f"{where} splits {i} into {o}: Q, K and V heads in one reshape "
                f"([..., {o[-3]}*n*D] -> [..., {o[-3]}, n, D]) is not supported")
    if len(o) != len(i) + 1 or len(o) < 3:
        return f"{where} maps {i} to {o}, not [..., n*D] -> [..., n, D]"
    n, d = o[-2], o[-1]
    if n * d != i[-1]:
        return f"{where} maps {i} to {o}: the last axis {i[-1]} is not n*D = {n}*{d}"
    if n < 2:
        return f"{where}: a single head ({o})"
    if d < 2:
        return f"{where}: head size {d} < 2 ({o})"
    return None
