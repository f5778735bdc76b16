"""Normalisations.

BatchNormalization and InstanceNormalization act per channel (axis 1): their scale, bias and
statistics are ``"param"`` slices and removal is exact. LayerNormalization normalises over
``axes[axis:]``; if a channel space lies on those axes the mean and variance depend on how many
channels there are, so the space is blocked (or, with ``allow_approximate``, marked approximate
and the scale/bias become ``"param"`` slices). GroupNormalization and LpNormalization over channels
are treated the same way, and so are the RMS norms (ONNX Runtime's ai.onnx
``SimplifiedLayerNormalization``, ai.onnx opset-23 ``RMSNormalization``: the mean of squares
depends on the channel count). com.microsoft ``SkipSimplifiedLayerNormalization`` /
``SkipLayerNormalization`` are a residual Add (exact; output 3 is the sum) followed by that norm.
"""

from __future__ import annotations

import onnx

from onnxprune.analysis.channels.state import Analysis, Layout
from onnxprune.analysis.rules import register
from onnxprune.analysis.rules.common import broadcast, has_channels
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
    _normalise(a, node, a.layout(node.input[0]), list(node.input[1:3]))


@register("SimplifiedLayerNormalization")  # ONNX Runtime's RMS norm, in the ai.onnx domain
@register("RMSNormalization", since=23)
def rmsnorm(a: Analysis, node: onnx.NodeProto) -> None:
    """RMS norm ``x / sqrt(mean(x²) + eps) * scale`` over ``axis..rank-1``: inexact if channels lie there."""
    _normalise(a, node, a.layout(node.input[0]), list(node.input[1:2]))


@register(["SkipSimplifiedLayerNormalization", "SkipLayerNormalization"], domain="com.microsoft")
def skip_norm(a: Analysis, node: onnx.NodeProto) -> None:
    """``s = input + skip (+ bias)``; output 0 = norm(s) over the last axis, output 3 = ``s``.

    The sum is a residual Add (the operands' spaces are unified, exactly); output 3 carries it on
    unchanged, so residual groups continue through it. The normalised output 0, when something
    reads it, is inexact over channels, like LayerNormalization. Outputs 1 and 2 (mean, inverse std) carry no channels.
    """
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    lay = broadcast(a, node, list(node.input[:2]))
    bias = node.input[3 if simplified else 4] if len(node.input) > (3 if simplified else 4) else ""
    if bias and lay:
        if a.is_const(bias):
            a.add_slices(lay[-1], bias, 0, "param", "bias")
        else:
            a.block(lay, f"{node.op_type} node {node.name!r}: bias {bias!r} is not constant")
    params = [node.input[2]] + ([node.input[3]] if not simplified and len(node.input) > 3 else [])
    used = node.output[0] and (node.output[0] in {o.name for o in a.model.graph.output}
                               or any(node.output[0] in n.input for n in a.model.graph.node))
    if used:
        _normalise(a, node, lay, params, axis=-1, extra_outputs=(1, 2))
    else:  # nothing reads the normalised output: gamma/beta only have to shrink with the sum
        _normalise(a, node, None, params, axis=-1, extra_outputs=(1, 2))
        for p in params:
            if lay and p and a.is_const(p):
                a.add_slices(lay[-1], p, 0, "param", "ln")
    if len(node.output) > 3 and node.output[3]:
        a.set_layout(node.output[3], lay)


def _normalise(a: Analysis, node: onnx.NodeProto, lay: Layout, params: list[str], axis: int | None = None,
               extra_outputs: tuple[int, ...] | None = None) -> None:
    """Output 0 of a normalisation of ``lay`` over ``axis..rank-1`` (the ``axis`` attribute by default).

    Channels on the normalised axes make removal inexact (blocked, or approximate with their
    ``params`` as ``"param"`` slices); the statistics outputs (``extra_outputs``, default every
    output after the first) carry no channels.
    """
    for k in extra_outputs if extra_outputs is not None else range(1, len(node.output)):
        if k < len(node.output) and node.output[k]:
            a.set_layout(node.output[k], None)
    if lay is None:
        a.set_layout(node.output[0], None)
        return
    r = len(lay)
    ax0 = int(attr(node, "axis", -1) if axis is None else axis) % r
    normed = lay[ax0:]
    if any(normed):
        a.inexact(normed, f"{node.op_type} node {node.name!r} normalises over the channel axis")
        if a.allow_approximate:
            for k, axl in enumerate(normed):
                for p in params:
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
