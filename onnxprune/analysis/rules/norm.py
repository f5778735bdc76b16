"""Normalisations.

BatchNormalization and InstanceNormalization act per channel (axis 1): their scale, bias and
statistics are ``"param"`` slices and removal is exact. LayerNormalization normalises over
``axes[axis:]``; if a channel space lies on those axes the mean and variance depend on how many
channels there are, so the space is blocked (or, with ``allow_approximate``, marked approximate
and the scale/bias become ``"param"`` slices). GroupNormalization and LpNormalization over channels
are treated the same way.
"""

from __future__ import annotations

import onnx

from onnxprune.analysis.channels.state import Analysis
from onnxprune.analysis.rules import register
from onnxprune.analysis.rules.common import has_channels
from onnxprune.ir.graph import attr


def _per_channel(a: Analysis, node: onnx.NodeProto, params: list[tuple[int, str]]) -> None:
    lay = a.layout(node.input[0])
    if lay is None or len(lay) < 2:
        a.block(lay, f"{node.op_type} node {node.name!r}: input rank unknown")
        a.set_layout(node.output[0], lay)
        return
    for i, ax in enumerate(lay):
        if i != 1 and ax:
            a.block(ax, f"{node.op_type} node {node.name!r}: channels on axis {i}")
    for idx, tag in params:
        if idx < len(node.input) and node.input[idx]:
            name = node.input[idx]
            if a.is_const(name):
                a.add_slices(lay[1], name, 0, "param", tag)
            else:
                a.block(lay[1], f"{node.op_type} node {node.name!r}: parameter {name!r} is not constant")
    a.set_layout(node.output[0], lay)
    for extra in node.output[1:]:
        if extra:
            a.set_layout(extra, None)
            a.block(lay[1], f"{node.op_type} node {node.name!r}: training-mode outputs")


@register("BatchNormalization")
def batchnorm(a: Analysis, node: onnx.NodeProto) -> None:
    """BatchNormalization: per-channel scale, bias, mean, var."""
    _per_channel(a, node, [(1, "bn_scale"), (2, "bn_bias"), (3, "bn_mean"), (4, "bn_var")])


@register("InstanceNormalization")
def instancenorm(a: Analysis, node: onnx.NodeProto) -> None:
    """InstanceNormalization: per-channel scale and bias."""
    _per_channel(a, node, [(1, "in_scale"), (2, "in_bias")])


@register("LayerNormalization")
def layernorm(a: Analysis, node: onnx.NodeProto) -> None:
    """LayerNormalization over ``axis..rank-1``: inexact if channels lie there."""
    lay = a.layout(node.input[0])
    for o in node.output[1:]:
        if o:
            a.set_layout(o, None)
    if lay is None:
        a.set_layout(node.output[0], None)
        return
    r = len(lay)
    ax0 = int(attr(node, "axis", -1)) % r
    normed = lay[ax0:]
    if any(normed):
        a.inexact(normed, f"LayerNormalization node {node.name!r} normalises over the channel axis")
        if a.allow_approximate:
            for k, axl in enumerate(normed):
                for p in node.input[1:3]:
                    if not p:
                        continue
                    pd = a.dims(p)
                    if pd is None:
                        continue
                    pk = k - (len(normed) - len(pd))
                    if pk >= 0 and pd[pk] != 1 and a.is_const(p):
                        a.add_slices(axl, p, pk, "param", "ln")
    a.set_layout(node.output[0], lay)


@register(["GroupNormalization", "LpNormalization", "MeanVarianceNormalization", "LRN"])
def other_norms(a: Analysis, node: onnx.NodeProto) -> None:
    """Norms that mix channels: blocked when channels pass through them."""
    lay = a.layout(node.input[0])
    if has_channels(lay):
        a.block(lay, f"{node.op_type} node {node.name!r} mixes channels (removal is inexact)")
    a.set_layout(node.output[0], lay)
