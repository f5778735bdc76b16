"""Pooling, padding, resizing, reductions and Softmax.

Pools (Max/Average/Lp and their Global forms) act per channel: axes 0 and 1 keep their layouts,
spatial axes are opaque. Pad and Resize/Upsample keep layouts when they leave the channel axis
alone (pads 0, scale 1; a ``sizes`` entry naming the channel count is a shape edit). Reductions
and Softmax over non-channel axes keep the remaining layouts (ReduceMean over h, w is the
squeeze-excitation pattern); over a channel axis they depend on the channel count, so the space
is blocked (or approximate with ``allow_approximate``).
"""

from __future__ import annotations

import onnx

from onnxprune.analysis.channels.state import Analysis
from onnxprune.analysis.heads.engine import Engine
from onnxprune.analysis.heads.state import Ann, Blocked, axes_of
from onnxprune.analysis.rules import register
from onnxprune.analysis.rules.common import (
    axes_input,
    has_channels,
    opaque,
    reduce_axes,
)
from onnxprune.ir.graph import attr, attr_dict
from onnxprune.ir.ops import NORMALIZING, POOLS, REDUCE


@register(POOLS)
def pool(a: Analysis, node: onnx.NodeProto) -> None:
    """Per-channel pooling."""
    lay = a.layout(node.input[0])
    y = node.output[0]
    if lay is None:
        a.set_layout(y, opaque(a, y))
        return
    for k in range(2, len(lay)):
        if lay[k]:
            a.block(lay[k], f"{node.op_type} node {node.name!r}: channels on a spatial axis")
    a.set_layout(y, list(lay[:2]) + [() for _ in lay[2:]])
    if len(node.output) > 1 and node.output[1]:
        a.set_layout(node.output[1], opaque(a, node.output[1]))
        a.block(lay, f"MaxPool node {node.name!r}: its indices output encodes the channel count")


@register("Pad")
def pad(a: Analysis, node: onnx.NodeProto) -> None:
    """Pad: the channel axis must not be padded."""
    lay = a.layout(node.input[0])
    y = node.output[0]
    if lay is None or not has_channels(lay):
        a.set_layout(y, lay)
        return
    r = len(lay)
    pads = attr(node, "pads") if a.opset < 11 else (
        a.small_const(node.input[1]) if len(node.input) > 1 and node.input[1] else None)
    axes = axes_input(a, node, 3, "__none__") if a.opset >= 18 else None
    if pads is None or axes is ...:
        a.block(lay, f"Pad node {node.name!r}: pads not constant")
        a.set_layout(y, lay)
        return
    pads = [int(v) for v in (pads.reshape(-1) if hasattr(pads, "reshape") else pads)]
    axes_l = [k % r for k in axes] if axes else list(range(r))
    n = len(axes_l)
    for i, k in enumerate(axes_l):
        if lay[k] and (pads[i] != 0 or pads[i + n] != 0):
            a.block(lay[k], f"Pad node {node.name!r}: pads the channel axis")
    a.set_layout(y, lay)


@register(["Resize", "Upsample"])
def resize(a: Analysis, node: onnx.NodeProto) -> None:
    """Resize/Upsample: channel axes must have scale 1; a ``sizes`` entry becomes a shape edit."""
    lay = a.layout(node.input[0])
    y = node.output[0]
    if lay is None or not has_channels(lay):
        a.set_layout(y, lay)
        return
    where = f"{node.op_type} node {node.name!r}"
    r = len(lay)
    axes = attr(node, "axes")
    axes_l = [k % r for k in axes] if axes else list(range(r))
    scales = None
    if node.op_type == "Upsample":
        scales = attr(node, "scales") if a.opset < 9 else a.small_const(node.input[1])
    else:
        idx = 1 if a.opset == 10 else 2
        if len(node.input) > idx and node.input[idx]:
            scales = a.small_const(node.input[idx])
            if scales is not None and scales.size == 0:
                scales = None
    sizes_name = node.input[3] if node.op_type == "Resize" and len(node.input) > 3 else ""
    sizes = a.small_const(sizes_name) if sizes_name else None
    for i, k in enumerate(axes_l):
        if not lay[k]:
            continue
        if scales is not None:
            if float(list(scales.reshape(-1) if hasattr(scales, "reshape") else scales)[i]) != 1.0:
                a.block(lay[k], f"{where}: scales the channel axis")
        elif sizes is not None:
            a.add_edit(lay[k], "initializer", sizes_name, i)
        else:
            a.block(lay[k], f"{where}: scales/sizes not constant")
    a.set_layout(y, lay)


@register(sorted(REDUCE))
def reduce(a: Analysis, node: onnx.NodeProto) -> None:
    """Reductions: over spatial axes keep the channel layout; over channels inexact."""
    axes = axes_input(a, node, 1)
    keep = bool(attr(node, "keepdims", 1))
    lay = a.layout(node.input[0])
    if axes is ...:
        a.block(lay, f"{node.op_type} node {node.name!r}: axes not constant")
        a.set_layout(node.output[0], opaque(a, node.output[0]))
        return
    if axes == [] and attr(node, "noop_with_empty_axes", 0):
        a.set_layout(node.output[0], lay)
        return
    a.set_layout(node.output[0], reduce_axes(a, node, node.input[0], axes or None, keep, node.op_type))


@register(["ArgMax", "ArgMin"])
def argmax(a: Analysis, node: onnx.NodeProto) -> None:
    """ArgMax/ArgMin: over channels the index itself changes, so blocked."""
    lay = a.layout(node.input[0])
    if lay is None:
        a.set_layout(node.output[0], None)
        return
    ax = int(attr(node, "axis", 0)) % len(lay)
    if lay[ax]:
        a.block(lay[ax], f"{node.op_type} node {node.name!r}: indexes along the channel axis")
    keep = bool(attr(node, "keepdims", 1))
    out = [() if k == ax else axl for k, axl in enumerate(lay) if keep or k != ax]
    a.set_layout(node.output[0], out)


@register(sorted(NORMALIZING))
def softmax(a: Analysis, node: onnx.NodeProto) -> None:
    """Softmax over non-channel axes is per-channel; over channels it is inexact."""
    lay = a.layout(node.input[0])
    if lay is None:
        a.set_layout(node.output[0], None)
        return
    r = len(lay)
    if a.opset >= 13:
        axes = [int(attr(node, "axis", -1)) % r]
    else:
        axes = list(range(int(attr(node, "axis", 1)) % r, r))
    for k in axes:
        if lay[k]:
            a.inexact(lay[k], f"{node.op_type} node {node.name!r} normalises over the channel axis")
    a.set_layout(node.output[0], lay)


# ---------------------------------------------------------------------- head / FFN annotations
@register(sorted(NORMALIZING | REDUCE), analysis="heads")
def heads_reduce(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    ann = annotated[0][1]
    i = eng.need_shape(node.input[0])
    rank = len(i)
    attrs = attr_dict(node)
    if node.op_type in ("Softmax", "LogSoftmax", "Hardmax"):
        default = -1 if eng.model.opset >= 13 else 1
        axis = int(attrs.get("axis", default)) % rank
        if axis == ann.axis or (eng.model.opset < 13 and axis <= ann.axis):
            raise Blocked("normalises over the annotated axis")
        eng.check_ffn_axis(ann, rank)
        eng.emit(node, ann, c)
        return
    axes = axes_of(node, 1, eng.const)
    if axes is None:
        raise Blocked("reduces over all axes")
    axes = sorted(a % rank for a in axes)
    if ann.axis in axes:
        raise Blocked("reduces over the annotated axis")
    keepdims = int(attrs.get("keepdims", 1))
    new_axis = ann.axis if keepdims else ann.axis - sum(1 for a in axes if a < ann.axis)
    new = Ann(new_axis, ann.o, ann.n, ann.b, c)
    eng.check_ffn_axis(new, rank if keepdims else rank - len(axes))
    eng.emit(node, new, c)
