"""Conv and ConvTranspose.

Conv ``Y[n,m] = sum_c W[m,c] * X[n,c] + B[m]`` (group 1): the input's channel segments become
``"in"`` slices of ``W`` axis 1; the output axis 1 is a new space owning ``W`` axis 0 and ``B``.
Depthwise (``group == C_in``, ``W`` ``[C_in*k, 1, ...]``): output channel ``c*k + j`` only reads
input channel ``c``, so the output carries the input's spaces with ``block*k`` and ``W``/``B`` are
``"param"`` slices; the ``group`` attribute shrinks by one per removed channel. Other grouped
convolutions block their input and output (channels must shrink evenly per group).
ConvTranspose is the same with ``W`` ``[C_in, C_out/group, ...]``.
"""

from __future__ import annotations

import onnx

from onnxprune.analysis.channels.state import Analysis, AxisLayout, Segment
from onnxprune.analysis.rules import register
from onnxprune.ir.graph import attr


def _rest_opaque(a: Analysis, node: onnx.NodeProto, x_lay: list[AxisLayout]) -> None:
    for i, ax in enumerate(x_lay):
        if i != 1 and ax:
            a.block(ax, f"{node.op_type} node {node.name!r}: channels on a non-channel axis {i}")


def _conv_like(a: Analysis, node: onnx.NodeProto, transpose: bool) -> None:
    x, w = node.input[0], node.input[1]
    b = node.input[2] if len(node.input) > 2 else ""
    x_lay = a.layout(x)
    wd = a.dims(w)
    y = node.output[0]
    if x_lay is None or wd is None or not a.resolves_to_const(w) or (b and not a.resolves_to_const(b)):
        a.block(x_lay, f"{node.op_type} node {node.name!r}: weight or bias is not constant")
        a.set_layout(y, [() for _ in range(len(wd))] if wd else None)
        return
    _rest_opaque(a, node, x_lay)
    group = int(attr(node, "group", 1))
    xd = a.dims(x)
    cin = xd[1] if xd and len(xd) > 1 else None
    out_axis_w = 1 if transpose else 0
    in_axis_w = 0 if transpose else 1
    per_group_in = wd[in_axis_w] if not transpose else wd[0] // group
    rank = len(x_lay)
    out: list[AxisLayout] = [() for _ in range(rank)]
    if group == 1:
        a.weight_slices(w, in_axis_w, x_lay[1], "in")
        a.add_probe(x, 1, x_lay[1])
        width = wd[out_axis_w] * (group if transpose else 1)
        out[1] = a.new_space(node, 0, int(width), y)
        a.weight_slices(w, out_axis_w, out[1], "out")
        if b:
            a.weight_slices(b, 0, out[1], "out", "bias")
    elif cin is not None and group == cin and (per_group_in == 1 if not transpose else True):
        mult = (wd[0] // group) if not transpose else wd[1]
        if transpose and wd[0] != group:
            a.block(x_lay[1], f"ConvTranspose node {node.name!r}: unsupported grouping")
            out[1] = a.new_space(node, 0, int(wd[1] * group), y)
            a.block(out[1], f"ConvTranspose node {node.name!r}: unsupported grouping")
        else:
            out[1] = tuple(Segment(s.offset * mult, s.space, s.block * mult) for s in x_lay[1])
            a.weight_slices(w, 0, out[1] if not transpose else x_lay[1], "param", "depthwise")
            if b:
                a.weight_slices(b, 0, out[1], "param", "bias")
            a.add_edit(x_lay[1], "attribute", node.name, "group", 1)
    elif not transpose and cin is not None and cin % group == 0 and wd[0] % group == 0:
        _grouped_input(a, node, x, x_lay[1], group, cin // group)
        cout_g = wd[0] // group
        atoms = a.new_space(node, 0, int(cout_g), y)
        out[1] = tuple(Segment(g * cout_g + s.offset, s.space, 1) for g in range(group) for s in atoms)
        a.weight_slices(w, 0, out[1], "out")
        if b:
            a.weight_slices(b, 0, out[1], "out", "bias")
    else:
        a.block(x_lay[1], f"{node.op_type} node {node.name!r}: grouped (group={group}) input channels must "
                          "shrink evenly per group")
        width = wd[out_axis_w] * (group if transpose else 1)
        out[1] = a.new_space(node, 0, int(width), y)
        a.block(out[1], f"{node.op_type} node {node.name!r}: grouped (group={group}) output channels must "
                        "shrink evenly per group")
    a.set_layout(y, out)


def _grouped_input(a: Analysis, node: onnx.NodeProto, x: str, ax: AxisLayout, group: int, cin_g: int) -> None:
    """Grouped conv input: every group must carry the same channel structure; tie them.

    Group ``g`` reads positions ``[g*cin_g, (g+1)*cin_g)``. Segments are cut at group boundaries,
    and the spaces at the same local place in every group are unified, so a removal takes the same
    local channels from each group (the weight's axis 1 is shared by all groups).
    """
    where = f"Conv node {node.name!r} (group={group})"
    if not ax:
        return
    per_group = a.align_periods(ax, cin_g, group)
    if per_group is None:
        if not a._new_cuts:
            a.block(ax, f"{where}: groups carry different channel layouts, so they cannot shrink evenly")
        return
    a.weight_slices(node.input[1], 1, tuple(per_group[0]), "in")
    a.add_probe(x, 1, ax)


@register("Conv")
def conv(a: Analysis, node: onnx.NodeProto) -> None:
    """Conv: regular, depthwise, grouped (blocked)."""
    _conv_like(a, node, transpose=False)


@register("ConvTranspose")
def conv_transpose(a: Analysis, node: onnx.NodeProto) -> None:
    """ConvTranspose: regular, depthwise, grouped (blocked)."""
    _conv_like(a, node, transpose=True)
