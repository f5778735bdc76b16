"""Gemm and MatMul.

``Y = A @ B (+ C)`` with a constant ``B`` ``[K, N]`` (``[N, K]`` when ``transB``): the segments
on ``A``'s reduction axis become ``"in"`` slices of ``B``'s K axis (a Flatten before a Gemm gives
blocks of ``h*w`` rows); the output's last axis is a new space owning ``B``'s N axis and the bias.
MatMul with a constant 2-D ``B`` does the same over ``A``'s last axis, with any leading axes passed
through (so ``x @ W1 -> Gelu -> @ W2`` forms an FFN group). A MatMul of two activations passes the
non-contracted axes through and blocks channels on the contracted axis.
"""

from __future__ import annotations

import onnx

from onnxprune.analysis.channels.state import Analysis, AxisLayout
from onnxprune.analysis.heads.engine import Engine
from onnxprune.analysis.heads.state import Ann, Blocked
from onnxprune.analysis.rules import register
from onnxprune.analysis.rules.common import opaque
from onnxprune.ir.graph import attr, attr_dict


@register("Gemm")
def gemm(a: Analysis, node: onnx.NodeProto) -> None:
    """Gemm with a constant B."""
    x, w = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 else ""
    ta, tb = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    lay = a.layout(x)
    wd = a.dims(w)
    y = node.output[0]
    if lay is None or wd is None or len(wd) != 2 or not a.resolves_to_const(w):
        a.block(lay, f"Gemm node {node.name!r}: B is not a constant matrix")
        a.block(a.layout(w), f"Gemm node {node.name!r}: multiplied by an activation")
        a.set_layout(y, opaque(a, y) or [(), ()])
        return
    k_axis, m_axis = (0, 1) if ta else (1, 0)
    a.weight_slices(w, 1 if tb else 0, lay[k_axis], "in")
    a.add_probe(x, k_axis, lay[k_axis])
    n = wd[0] if tb else wd[1]
    out_n = a.new_space(node, 0, int(n), y)
    a.weight_slices(w, 0 if tb else 1, out_n, "out")
    if c:
        cd = a.dims(c)
        if a.is_const(c) and cd is not None:
            if cd and cd[-1] == n and n != 1:
                a.add_slices(out_n, c, len(cd) - 1, "out", "bias")
            if len(cd) == 2 and cd[0] not in (1, None) and lay[m_axis]:
                a.block(lay[m_axis], f"Gemm node {node.name!r}: bias varies along the row axis")
        else:
            a.block(out_n, f"Gemm node {node.name!r}: bias C is not constant")
            a.block(a.layout(c), f"Gemm node {node.name!r}: added as Gemm bias")
    a.set_layout(y, [lay[m_axis], out_n])


@register("MatMul")
def matmul(a: Analysis, node: onnx.NodeProto) -> None:
    """MatMul: constant 2-D right operand starts a space; otherwise batch axes pass through."""
    x, w = node.input[0], node.input[1]
    y = node.output[0]
    lx, lw = a.layout(x), a.layout(w)
    wd = a.dims(w)
    if lx is None or lw is None:
        a.block(lx, f"MatMul node {node.name!r}: operand of unknown rank")
        a.block(lw, f"MatMul node {node.name!r}: operand of unknown rank")
        a.set_layout(y, opaque(a, y))
        return
    if a.resolves_to_const(w) and wd is not None and len(wd) == 2 and len(lx) >= 1:
        a.weight_slices(w, 0, lx[-1], "in")
        a.add_probe(x, len(lx) - 1, lx[-1])
        out_n = a.new_space(node, 0, int(wd[1]), y)
        a.weight_slices(w, 1, out_n, "out")
        if len(lx) == 1:
            a.set_layout(y, [])
            a.block(out_n, f"MatMul node {node.name!r}: 1-D input")
            return
        a.set_layout(y, list(lx[:-1]) + [out_n])
        return
    if len(lx) < 2 or len(lw) < 2:
        a.block(lx, f"MatMul node {node.name!r}: vector operand")
        a.block(lw, f"MatMul node {node.name!r}: vector operand")
        a.set_layout(y, opaque(a, y))
        return
    where = f"MatMul node {node.name!r}"
    a.block(lx[-1], f"{where}: contracted against an activation")
    a.block(lw[-2], f"{where}: contracted against an activation")
    if a.is_const(x) or a.is_const(w):
        a.block(lx, f"{where}: constant left operand")
        a.block(lw, f"{where}: constant left operand")
        a.set_layout(y, opaque(a, y))
        return
    # batch axes broadcast like element-wise ops
    rank = max(len(lx), len(lw))
    bx, bw = list(lx[:-2]), list(lw[:-2])
    batch: list[AxisLayout] = []
    nb = rank - 2
    for j in range(nb):
        kx, kw = j - (nb - len(bx)), j - (nb - len(bw))
        ax = bx[kx] if kx >= 0 else ()
        if kw >= 0:
            ax = a.unify_axes(ax, bw[kw], where)
        batch.append(ax)
    a.set_layout(y, batch + [lx[-2], lw[-1]])


# ---------------------------------------------------------------------- head / FFN annotations
@register("MatMul", analysis="heads")
def heads_matmul(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    a_shape, b_shape = eng.need_shape(node.input[0]), eng.need_shape(node.input[1])
    out = eng.need_shape(node.output[0])
    ra, rb, rank = len(a_shape), len(b_shape), len(out)
    by_k = dict(annotated)
    if 0 in by_k and by_k[0].axis == ra - 1 and 1 not in by_k:
        eng.exit(node, by_k[0], node.input[1], 0, c)
        return
    if eng.mode == "ffn":
        raise Blocked("FFN neurons reach a MatMul other than the down projection")
    axes = []
    for k, a in annotated:
        r = ra if k == 0 else rb
        if a.axis >= r - 2:
            raise Blocked("the annotated axis is a matrix axis of a MatMul")
        axes.append(a.axis + rank - r)
    if len(set(axes)) != 1:
        raise Blocked("MatMul operands carry heads on different axes")
    ax = axes[0]
    if len(annotated) == 1:
        k = 1 - annotated[0][0]
        other = b_shape if k == 1 else a_shape
        al = ax - (rank - len(other))
        if al >= 0 and other[al] != 1:
            raise Blocked("the other MatMul operand varies along the heads axis")
    else:
        eng.comp(c).cores += 1  # an attention core, prunable or not: report it
        (_, a), (_, b) = annotated
        if a.o != b.o or a.n * a.b != b.n * b.b or max(a.n, b.n) % min(a.n, b.n):
            raise Blocked(f"head factors disagree ({a.n}x{a.b} vs {b.n}x{b.b})")
    fine = max((a for _, a in annotated), key=lambda a: a.n)
    eng.emit(node, Ann(ax, fine.o, fine.n, fine.b, c), c)


@register("Gemm", analysis="heads")
def heads_gemm(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    attrs = attr_dict(node)
    by_k = dict(annotated)
    if 0 in by_k and len(by_k) == 1 and by_k[0].axis == 1 and not attrs.get("transA", 0):
        eng.exit(node, by_k[0], node.input[1], 1 if attrs.get("transB", 0) else 0, c)
        return
    raise Blocked("Gemm operand carries the annotated axis in an unsupported place")
