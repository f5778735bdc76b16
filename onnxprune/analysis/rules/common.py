"""Helpers shared by the channel rules: pass-through, broadcasting, opaque outputs.
"""

from __future__ import annotations

from typing import Any

import onnx

from onnxprune.analysis.channels.state import Analysis, AxisLayout, Layout
from onnxprune.ir.graph import attr


def opaque(a: Analysis, name: str) -> Layout:
    """An all-opaque layout of the tensor's rank."""
    r = a.rank(name)
    return None if r is None else [() for _ in range(r)]


def passthrough(a: Analysis, node: onnx.NodeProto, src: int = 0) -> None:
    """Output 0 has the layout of input ``src``; other outputs are opaque (blocked if used with channels)."""
    a.set_layout(node.output[0], a.layout(node.input[src]))


def has_channels(layout: Layout) -> bool:
    """True if any axis of the layout carries a channel segment."""
    return bool(layout) and any(bool(ax) for ax in layout)  # type: ignore[union-attr]


def broadcast(a: Analysis, node: onnx.NodeProto, inputs: list[str]) -> Layout:
    """Layout of an element-wise result (numpy broadcasting), recording unions and param slices.

    Non-constant operands are unified axis by axis. A constant operand that varies along an axis
    carrying channels becomes a ``"param"`` slice. A non-constant operand that is opaque and
    larger than 1 on such an axis blocks the channels (it cannot shrink with them).
    """
    inputs = [x for x in inputs if x]
    ranks = [a.rank(x) for x in inputs]
    if any(r is None for r in ranks):
        for x in inputs:
            a.block(a.layout(x), f"{node.op_type} node {node.name!r}: operand of unknown rank")
        return None
    out_rank = max(ranks) if ranks else 0  # type: ignore[type-var]
    result: list[AxisLayout] = []
    for j in range(out_rank):
        ax: AxisLayout = ()
        for x, r in zip(inputs, ranks):
            k = j - (out_rank - r)  # type: ignore[operator]
            if k < 0 or a.is_const(x):
                continue
            ax = a.unify_axes(ax, a.layout(x)[k], f"{node.op_type} node {node.name!r}")  # type: ignore[index]
        if ax:
            for x, r in zip(inputs, ranks):
                k = j - (out_rank - r)  # type: ignore[operator]
                if k < 0:
                    continue
                d = a.dims(x)[k]  # type: ignore[index]
                if a.is_const(x):
                    if d != 1:
                        a.add_slices(ax, x, k, "param", "const")
                elif not a.layout(x)[k] and d != 1:  # type: ignore[index]
                    a.block(ax, f"{node.op_type} node {node.name!r}: combined with {x!r}, whose axis "
                                f"{k} cannot shrink")
        result.append(ax)
    return result


def reduce_axes(a: Analysis, node: onnx.NodeProto, name: str, axes: list[int] | None, keepdims: bool,
                what: str) -> Layout:
    """Layout after reducing ``axes`` of ``name`` (all axes if None); inexact if channels are reduced."""
    lay = a.layout(name)
    if lay is None:
        return None
    r = len(lay)
    axes_n = sorted({x % r for x in axes}) if axes is not None else list(range(r))
    for x in axes_n:
        if lay[x]:
            a.inexact(lay[x], f"{what} node {node.name!r} reduces over the channel axis")
    out: list[AxisLayout] = []
    for i, ax in enumerate(lay):
        if i in axes_n:
            if keepdims:
                out.append(())
        else:
            out.append(ax)
    return out


def axes_input(a: Analysis, node: onnx.NodeProto, index: int, attr_name: str = "axes") -> list[int] | None | Any:
    """Axes from an attribute (older opsets) or a constant input (newer); ``...`` if not constant."""
    v = attr(node, attr_name)
    if v is not None:
        return list(v)
    if index < len(node.input) and node.input[index]:
        c = a.small_const(node.input[index])
        if c is None:
            return ...
        return [int(x) for x in c.reshape(-1)]
    return None
