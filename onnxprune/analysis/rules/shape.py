"""Layout ops: Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Concat, Split, Slice, Expand, Gather, Tile.

Merging axes ``[C, h, w] -> [C*h*w]`` (Flatten, Reshape) gives channel ``c`` the block
``c*h*w + arange(h*w)``; splitting an axis back (``[C*h*w] -> [C, h, w]``) is the inverse. A split
of a channel axis into several non-trivial axes (heads x head_dim, channel shuffle) is blocked.
Concat shifts offsets by the sizes of the preceding inputs; Split and Slice take sub-ranges (a
range that cuts a space in the middle makes the analysis restart with that space cut in two). The
constants that shrink -- Reshape targets, Split sizes, Slice bounds, Expand shapes -- are recorded
as shape edits.
"""

from __future__ import annotations

from math import prod

import numpy as np
import onnx

from onnxprune.analysis.channels.state import Analysis, AxisLayout, Segment
from onnxprune.analysis.heads.engine import Engine
from onnxprune.analysis.heads.state import Ann, Blocked, axes_of, factor_axis
from onnxprune.analysis.rules import register
from onnxprune.analysis.rules.common import axes_input, has_channels, opaque
from onnxprune.ir.graph import attr, attr_dict

MAX_REPLICAS = 256


def merge(a: Analysis, where: str, lays: list[AxisLayout], sizes: list[int | None]) -> AxisLayout | None:
    """Layout of one axis made by merging axes (row-major); None if it cannot be expressed."""
    carrying = [i for i, ax in enumerate(lays) if ax]
    if not carrying:
        return ()
    if len(carrying) > 1:
        return None
    i = carrying[0]
    inner_sizes, outer_sizes = sizes[i + 1:], sizes[:i]
    if any(s is None for s in inner_sizes + outer_sizes) or sizes[i] is None:
        return None
    inner, outer = prod(inner_sizes), prod(outer_sizes)  # type: ignore[arg-type]
    if outer > MAX_REPLICAS:
        return None
    out = []
    for p in range(outer):
        for s in lays[i]:
            out.append(Segment(p * sizes[i] * inner + s.offset * inner, s.space, s.block * inner))  # type: ignore[operator]
    return tuple(out)


def split_axis(a: Analysis, where: str, ax: AxisLayout, sizes: list[int | None]) -> list[AxisLayout] | None:
    """Layouts of axes ``sizes`` made by splitting one axis; None if channels would straddle axes.

    Channels may land on one axis ``t`` when every segment's offset and block are multiples of
    ``inner = prod(sizes[t+1:])``. If the axes before ``t`` are larger than 1, the layout must be
    periodic with period ``sizes[t]*inner`` (a channel shuffle ``[G*K] -> [G, K]`` after a grouped
    conv): the spaces at the same place of every period are unified and the result carries one
    period.
    """
    if not ax:
        return [() for _ in sizes]
    if any(s is None for s in sizes):
        return None
    for t in range(len(sizes) - 1, -1, -1):
        inner = prod(sizes[t + 1:])  # type: ignore[arg-type]
        if not all(s.offset % inner == 0 and s.block % inner == 0 for s in ax):
            continue
        out: list[AxisLayout] = [() for _ in sizes]
        outer = prod(sizes[:t])  # type: ignore[arg-type]
        if outer == 1:
            out[t] = tuple(Segment(s.offset // inner, s.space, s.block // inner) for s in ax)
            return out
        period = sizes[t] * inner  # type: ignore[operator]
        periods = a.align_periods(ax, period, outer)
        if periods is None:
            return None
        out[t] = tuple(Segment(s.offset // inner, s.space, s.block // inner) for s in periods[0])
        return out
    return None


def _pair_axes(ind: list[int | None], outd: list[int | None]) -> list[tuple[list[int], list[int]]] | None:
    """Group input and output axes whose products match (row-major reshape)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ind) or j < len(outd):
        if i >= len(ind) or j >= len(outd):
            if groups and all((ind[k] == 1) for k in range(i, len(ind))) and \
                    all(outd[k] == 1 for k in range(j, len(outd))):
                groups[-1][0].extend(range(i, len(ind)))
                groups[-1][1].extend(range(j, len(outd)))
                return groups
            return None
        if ind[i] is None or outd[j] is None:
            if ind[i] is None and outd[j] is None:
                groups.append(([i], [j]))
                i += 1
                j += 1
                continue
            return None
        gi, gj, pi, pj = [i], [j], ind[i], outd[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:  # type: ignore[operator]
                if i >= len(ind) or ind[i] is None:
                    return None
                pi *= ind[i]  # type: ignore[operator]
                gi.append(i)
                i += 1
            else:
                if j >= len(outd) or outd[j] is None:
                    return None
                pj *= outd[j]  # type: ignore[operator]
                gj.append(j)
                j += 1
        while i < len(ind) and ind[i] == 1 and (j >= len(outd) or outd[j] != 1):
            gi.append(i)
            i += 1
        while j < len(outd) and outd[j] == 1 and (i >= len(ind) or ind[i] != 1):
            gj.append(j)
            j += 1
        groups.append((gi, gj))
    return groups


def _reshape_to(a: Analysis, node: onnx.NodeProto, x: str, y: str, outd: list[int | None] | None,
                sources: list[tuple[str, int, int] | None] | None) -> None:
    lay = a.layout(x)
    ind = a.dims(x)
    where = f"{node.op_type} node {node.name!r}"
    if not has_channels(lay):
        a.set_layout(y, [() for _ in outd] if outd is not None else None)
        return
    if ind is None or outd is None:
        a.block(lay, f"{where}: shapes unknown")
        a.set_layout(y, [() for _ in outd] if outd is not None else None)
        return
    groups = _pair_axes(ind, outd)
    if groups is None:
        a.block(lay, f"{where}: cannot relate input and output axes")
        a.set_layout(y, [() for _ in outd])
        return
    out: list[AxisLayout] = [() for _ in outd]
    for gi, gj in groups:
        lays = [lay[k] for k in gi]  # type: ignore[index]
        if not any(lays):
            continue
        gi_n = [k for k in gi if ind[k] != 1 or lay[k]]  # type: ignore[index]
        gj_n = [k for k in gj if outd[k] != 1]
        res: list[AxisLayout] | None
        if len(gj_n) <= 1:
            merged = merge(a, where, [lay[k] for k in gi_n], [ind[k] for k in gi_n])  # type: ignore[index]
            if merged is None:
                res = None
            else:
                res = [() for _ in gj]
                res[gj.index(gj_n[0]) if gj_n else 0] = merged
        elif len(gi_n) == 1:
            res = split_axis(a, where, lay[gi_n[0]], [outd[k] for k in gj])  # type: ignore[index]
        else:
            res = None
        if res is None:
            a.block(lays, f"{where}: splits or mixes a channel axis (heads, channel shuffle) - not supported")
            continue
        for k, axl in zip(gj, res):
            out[k] = axl
    for j, axl in enumerate(out):
        if not axl or sources is None:
            continue
        src = sources[j] if j < len(sources) else None
        if src is None:
            continue
        name, idx, val = src
        if val > 0:
            a.add_edit(axl, "initializer", name, idx)
        elif val == 0 and not (j < len(lay) and lay[j] == axl):  # type: ignore[arg-type]
            a.block(axl, f"{where}: target copies (0) a dim that changes meaning")
    a.set_layout(y, out)


@register("Reshape", since=5)
def reshape(a: Analysis, node: onnx.NodeProto) -> None:
    """Reshape with a constant (or Concat-of-constants/shape) target."""
    x, y = node.input[0], node.output[0]
    outd = a.dims(y)
    src = a.int_sources(node.input[1])
    if outd is None and src is not None and all(s is not None and s[2] > 0 for s in src):
        outd = [s[2] for s in src]  # type: ignore[index]
    elif outd is not None and src is not None and len(src) == len(outd):
        ind = a.dims(x) or []
        outd = list(outd)
        for j, sj in enumerate(src):  # fill dims inference left symbolic from literal targets
            if outd[j] is None and sj is not None:
                if sj[2] > 0:
                    outd[j] = sj[2]
                elif sj[2] == 0 and j < len(ind):
                    outd[j] = ind[j]
        # one -1 entry: solve it when the remaining unknown dims pair up with the input's
        minus = [j for j, sj in enumerate(src) if sj is not None and sj[2] == -1 and outd[j] is None]
        if len(minus) == 1 and ind and sum(d is None for d in ind) == sum(d is None for d in outd) - 1:
            known_in = prod(d for d in ind if d is not None)
            known_out = prod(d for j, d in enumerate(outd) if d is not None)
            if known_out and known_in % known_out == 0:
                outd[minus[0]] = known_in // known_out
    if has_channels(a.layout(x)) and src is None:
        a.block(a.layout(x), f"Reshape node {node.name!r}: target shape is computed at run time")
    _reshape_to(a, node, x, y, outd, src)


@register("Flatten")
def flatten(a: Analysis, node: onnx.NodeProto) -> None:
    """Flatten to 2-D at ``axis``."""
    x, y = node.input[0], node.output[0]
    lay, ind = a.layout(x), a.dims(x)
    if lay is None or ind is None:
        a.block(lay, f"Flatten node {node.name!r}: rank unknown")
        a.set_layout(y, [(), ()])
        return
    ax = int(attr(node, "axis", 1)) % (len(ind) + 1)
    out = []
    for part in (range(0, ax), range(ax, len(ind))):
        m = merge(a, "", [lay[k] for k in part], [ind[k] for k in part])
        if m is None:
            a.block([lay[k] for k in part], f"Flatten node {node.name!r}: cannot merge channel axes")
            m = ()
        out.append(m)
    a.set_layout(y, out)


@register("Transpose")
def transpose(a: Analysis, node: onnx.NodeProto) -> None:
    """Permute axis layouts."""
    lay = a.layout(node.input[0])
    if lay is None:
        a.set_layout(node.output[0], None)
        return
    perm = attr(node, "perm", list(reversed(range(len(lay)))))
    a.set_layout(node.output[0], [lay[p] for p in perm])


@register("Squeeze")
def squeeze(a: Analysis, node: onnx.NodeProto) -> None:
    """Remove size-1 axes."""
    lay, d = a.layout(node.input[0]), a.dims(node.input[0])
    axes = axes_input(a, node, 1)
    if lay is None or d is None or axes is ...:
        a.block(lay, f"Squeeze node {node.name!r}: axes unknown")
        a.set_layout(node.output[0], opaque(a, node.output[0]))
        return
    r = len(lay)
    drop = {k % r for k in axes} if axes is not None else {k for k in range(r) if d[k] == 1}
    for k in drop:
        if lay[k]:
            a.block(lay[k], f"Squeeze node {node.name!r}: squeezes a channel axis of width 1")
    a.set_layout(node.output[0], [ax for k, ax in enumerate(lay) if k not in drop])


@register("Unsqueeze")
def unsqueeze(a: Analysis, node: onnx.NodeProto) -> None:
    """Insert size-1 axes."""
    lay = a.layout(node.input[0])
    axes = axes_input(a, node, 1)
    if lay is None or axes is ... or axes is None:
        a.block(lay, f"Unsqueeze node {node.name!r}: axes unknown")
        a.set_layout(node.output[0], opaque(a, node.output[0]))
        return
    r = len(lay) + len(axes)
    ins = {k % r for k in axes}
    it = iter(lay)
    a.set_layout(node.output[0], [() if k in ins else next(it) for k in range(r)])


@register("Concat")
def concat(a: Analysis, node: onnx.NodeProto) -> None:
    """Concatenate: offsets shift on the concat axis, other axes unify."""
    ins = [x for x in node.input if x]
    lays = [a.layout(x) for x in ins]
    where = f"Concat node {node.name!r}"
    if any(lay is None for lay in lays):
        for lay in lays:
            a.block(lay, f"{where}: operand of unknown rank")
        a.set_layout(node.output[0], opaque(a, node.output[0]))
        return
    r = len(lays[0])  # type: ignore[arg-type]
    ax = int(attr(node, "axis", 0)) % max(r, 1)
    out: list[AxisLayout] = []
    for k in range(r):
        if k == ax:
            segs: list[Segment] = []
            off = 0
            for x, lay in zip(ins, lays):
                for s in lay[k]:  # type: ignore[index]
                    if off is None:
                        a.block(lay[k], f"{where}: input sizes on the concat axis unknown")  # type: ignore[index]
                        break
                    segs.append(Segment(off + s.offset, s.space, s.block))
                size = (a.dims(x) or [None] * r)[k]
                off = None if off is None or size is None else off + size
            out.append(tuple(segs))
        else:
            res: AxisLayout = ()
            for lay in lays:
                res = a.unify_axes(res, lay[k], where)  # type: ignore[index]
            out.append(res)
    a.set_layout(node.output[0], out)


def _sub_range(a: Analysis, where: str, axl: AxisLayout, lo: int, hi: int) -> AxisLayout:
    """Segments of ``axl`` inside ``[lo, hi)``, shifted by ``-lo`` (cuts straddling segments)."""
    out = []
    for s in axl:
        end = s.offset + s.block * a.width(s.space)
        if end <= lo or s.offset >= hi:
            continue
        if s.offset >= lo and end <= hi:
            out.append(Segment(s.offset - lo, s.space, s.block))
            continue
        for p in (lo, hi):
            if s.offset < p < end:
                if (p - s.offset) % s.block:
                    a.block([s], f"{where}: range cuts inside a channel block")
                    break
                a.cut(s, (p - s.offset) // s.block)
    return tuple(out)


@register("Split")
def split(a: Analysis, node: onnx.NodeProto) -> None:
    """Split with explicit sizes (``prepare`` makes equal splits explicit)."""
    lay, d = a.layout(node.input[0]), a.dims(node.input[0])
    where = f"Split node {node.name!r}"
    if lay is None or d is None:
        a.block(lay, f"{where}: rank unknown")
        for o in node.output:
            a.set_layout(o, opaque(a, o))
        return
    r = len(lay)
    ax = int(attr(node, "axis", 0)) % r
    sizes_attr = attr(node, "split")
    if sizes_attr is not None:
        sizes = [int(v) for v in sizes_attr]
        where_sizes: list[tuple[str, str, int | str]] = [("attribute", node.name, f"split[{i}]")
                                                         for i in range(len(sizes))]
    elif len(node.input) > 1 and node.input[1] and a.small_const(node.input[1]) is not None:
        sizes = [int(v) for v in a.small_const(node.input[1]).reshape(-1)]  # type: ignore[union-attr]
        where_sizes = [("initializer", node.input[1], i) for i in range(len(sizes))]
    else:
        if lay[ax]:
            a.block(lay[ax], f"{where}: split sizes unknown")
        sizes, where_sizes = [], []
    off = 0
    for i, o in enumerate(node.output):
        if not sizes:
            a.set_layout(o, [() if k == ax else lay[k] for k in range(r)])
            continue
        sub = _sub_range(a, where, lay[ax], off, off + sizes[i])
        if sub:
            kind, target, index = where_sizes[i]
            a.add_edit(sub, kind, target, index)
        a.set_layout(o, [sub if k == ax else lay[k] for k in range(r)])
        off += sizes[i]


@register("Slice", since=10)
def slice_(a: Analysis, node: onnx.NodeProto) -> None:
    """Slice with constant starts/ends/axes/steps (inputs)."""
    _slice(a, node, [a.int_sources(x) if len(node.input) > i and x else None
                     for i, x in ((1, node.input[1]), (2, node.input[2] if len(node.input) > 2 else ""))],
           axes_input(a, node, 3, "__none__"),
           a.small_const(node.input[4]) if len(node.input) > 4 and node.input[4] else None)


@register("Slice", until=9)
def slice_attr(a: Analysis, node: onnx.NodeProto) -> None:
    """Slice with attributes (opset < 10)."""
    starts, ends = attr(node, "starts"), attr(node, "ends")
    srcs = [[("@" + node.name, i, int(v)) for i, v in enumerate(starts)],
            [("@" + node.name, i, int(v)) for i, v in enumerate(ends)]]
    _slice(a, node, srcs, attr(node, "axes"), None)  # type: ignore[arg-type]


def _slice(a: Analysis, node: onnx.NodeProto, srcs: list, axes: object, steps: object) -> None:
    lay, d = a.layout(node.input[0]), a.dims(node.input[0])
    where = f"Slice node {node.name!r}"
    y = node.output[0]
    starts, ends = srcs
    if lay is None or d is None or starts is None or ends is None or axes is ... or \
            any(s is None for s in starts + ends):
        if has_channels(lay):
            a.block(lay, f"{where}: bounds not constant")
        a.set_layout(y, opaque(a, y))
        return
    r = len(lay)
    axes_l = [k % r for k in axes] if axes is not None else list(range(len(starts)))  # type: ignore[union-attr]
    out = list(lay)
    for i, k in enumerate(axes_l):
        if not lay[k]:
            continue
        step = int(steps.reshape(-1)[i]) if steps is not None else 1  # type: ignore[union-attr]
        size = d[k]
        s_name, s_idx, s_val = starts[i]
        e_name, e_idx, e_val = ends[i]
        if step != 1 or size is None or s_val < 0 or e_val < 0:
            a.block(lay[k], f"{where}: step or negative bounds on a channel axis")
            continue
        lo, hi = min(s_val, size), min(e_val, size)
        sub = _sub_range(a, where, lay[k], lo, hi)
        before = tuple(s for s in lay[k] if s.offset + s.block * a.width(s.space) <= lo)
        upto = tuple(s for s in lay[k] if s.offset + s.block * a.width(s.space) <= hi)
        for bounds, name, idx, val in ((before, s_name, s_idx, s_val), (upto, e_name, e_idx, e_val)):
            if not bounds or val >= size and bounds is upto:
                continue
            if name.startswith("@"):
                which = "starts" if bounds is before else "ends"
                a.add_edit(bounds, "attribute", node.name, f"{which}[{idx}]")
            else:
                a.add_edit(bounds, "initializer", name, idx)
        out[k] = sub
    a.set_layout(y, out)


@register("Expand", since=8)
def expand(a: Analysis, node: onnx.NodeProto) -> None:
    """Broadcast to a shape: a channel axis must be kept (1) or named exactly (then edited)."""
    lay = a.layout(node.input[0])
    src = a.int_sources(node.input[1])
    y = node.output[0]
    if lay is None or src is None:
        a.block(lay, f"Expand node {node.name!r}: shape unknown")
        a.set_layout(y, opaque(a, y))
        return
    r = max(len(lay), len(src))
    out: list[AxisLayout] = []
    for j in range(r):
        k = j - (r - len(lay))
        axl = lay[k] if k >= 0 else ()
        sk = j - (r - len(src))
        if axl and sk >= 0 and src[sk] is not None and src[sk][2] > 1:  # type: ignore[index]
            name, idx, _ = src[sk]  # type: ignore[misc]
            a.add_edit(axl, "initializer", name, idx)
        out.append(axl)
    a.set_layout(y, out)


@register("Gather")
def gather(a: Analysis, node: onnx.NodeProto) -> None:
    """Gather along a non-channel axis (e.g. a token position); blocked on a channel axis."""
    lay, ilay = a.layout(node.input[0]), a.layout(node.input[1])
    y = node.output[0]
    a.block(ilay, f"Gather node {node.name!r}: channels used as indices")
    if lay is None or ilay is None:
        a.block(lay, f"Gather node {node.name!r}: rank unknown")
        a.set_layout(y, opaque(a, y))
        return
    ax = int(attr(node, "axis", 0)) % max(len(lay), 1)
    if lay[ax]:
        a.block(lay[ax], f"Gather node {node.name!r}: gathers along a channel axis")
    out = list(lay[:ax]) + [() for _ in ilay] + list(lay[ax + 1:])
    dd = a.dims(node.input[0])
    if a.is_const(node.input[0]) and dd and len(dd) == 2 and ax == 0 and dd[1] and dd[1] > 1:
        # embedding lookup: the table's columns are a channel space (the hidden size)
        out[-1] = a.new_space(node, 0, int(dd[1]), y)
        a.add_slices(out[-1], node.input[0], 1, "out", "embedding")
    a.set_layout(y, out)


@register("Tile")
def tile(a: Analysis, node: onnx.NodeProto) -> None:
    """Tile: a channel axis must have repeat 1."""
    lay = a.layout(node.input[0])
    reps = a.small_const(node.input[1])
    if lay is None or reps is None:
        a.block(lay, f"Tile node {node.name!r}: repeats unknown")
        a.set_layout(node.output[0], opaque(a, node.output[0]))
        return
    out = []
    for k, axl in enumerate(lay):
        if axl and int(reps.reshape(-1)[k]) != 1:
            a.block(axl, f"Tile node {node.name!r}: repeats a channel axis")
            axl = ()
        out.append(axl)
    a.set_layout(node.output[0], out)


# ---------------------------------------------------------------------- head / FFN annotations
@register("Transpose", analysis="heads")
def heads_transpose(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    ann = annotated[0][1]
    rank = len(eng.need_shape(node.input[0]))
    perm = attr_dict(node).get("perm") or list(reversed(range(rank)))
    new = Ann(list(perm).index(ann.axis), ann.o, ann.n, ann.b, c)
    eng.check_ffn_axis(new, rank)
    eng.emit(node, new, c)


@register("Reshape", analysis="heads")
def heads_reshape(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    if annotated[0][0] != 0:
        raise Blocked("the shape input is derived from annotated data")
    ann = annotated[0][1]
    i, o = eng.need_shape(node.input[0]), eng.need_shape(node.output[0])
    pre = int(np.prod(i[: ann.axis], dtype=np.int64)) * ann.o
    j = factor_axis(o, pre, ann.n)
    if j is None:
        raise Blocked(f"reshape {i} -> {o} splits the {eng.what()} across axes")
    p_j = int(np.prod(o[:j], dtype=np.int64))
    new = Ann(j, pre // p_j, ann.n, p_j * o[j] // (pre * ann.n), c)
    eng.check_ffn_axis(new, len(o))
    eng.comp(c).shape_refs.append((node.name, 1, j, o[j], "reshape"))
    eng.emit(node, new, c)


@register(["Squeeze", "Unsqueeze"], analysis="heads")
def heads_squeeze(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    ann = annotated[0][1]
    i, o = eng.need_shape(node.input[0]), eng.need_shape(node.output[0])
    axes = axes_of(node, 1, eng.const)
    if node.op_type == "Unsqueeze":
        if axes is None:
            raise Blocked("axes not constant")
        axes = sorted(a % len(o) for a in axes)
        keep = [k for k in range(len(o)) if k not in axes]
        new_axis = keep[ann.axis]
    else:
        if axes is None:
            axes = [k for k, d in enumerate(i) if d == 1]
        axes = sorted(a % len(i) for a in axes)
        if ann.axis in axes:
            raise Blocked("squeezes the annotated axis")
        new_axis = ann.axis - sum(1 for a in axes if a < ann.axis)
    new = Ann(new_axis, ann.o, ann.n, ann.b, c)
    eng.check_ffn_axis(new, len(o))
    eng.emit(node, new, c)


@register("Expand", analysis="heads")
def heads_expand(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    if annotated[0][0] != 0:
        raise Blocked("the expand shape is derived from annotated data")
    ann = annotated[0][1]
    i, o = eng.need_shape(node.input[0]), eng.need_shape(node.output[0])
    ax = ann.axis + len(o) - len(i)
    if o[ax] != i[ann.axis]:
        raise Blocked("broadcasts along the annotated axis")
    shape_len = int(np.prod(eng.need_shape(node.input[1])))
    pos = ax - (len(o) - shape_len)
    if pos >= 0:
        eng.comp(c).shape_refs.append((node.name, 1, pos, o[ax], "expand"))
    new = Ann(ax, ann.o, ann.n, ann.b, c)
    eng.check_ffn_axis(new, len(o))
    eng.emit(node, new, c)


@register("Tile", analysis="heads")
def heads_tile(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    ann = annotated[0][1]
    reps = eng.const(node.input[1])
    if annotated[0][0] != 0 or reps is None:
        raise Blocked("repeats are not constant")
    if int(reps.reshape(-1)[ann.axis]) != 1:
        raise Blocked("tiles the annotated axis (non-consecutive head repeat)")
    eng.emit(node, ann, c)


@register("Slice", analysis="heads")
def heads_slice(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    ann = annotated[0][1]
    if annotated[0][0] != 0:
        raise Blocked("slice bounds are derived from annotated data")
    i = eng.need_shape(node.input[0])
    o = eng.need_shape(node.output[0])
    if o[ann.axis] != i[ann.axis]:
        raise Blocked("slices the annotated axis")
    eng.check_ffn_axis(ann, len(i))
    eng.emit(node, ann, c)


@register("Split", analysis="heads")
def heads_split(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    ann = annotated[0][1]
    rank = len(eng.need_shape(node.input[0]))
    axis = int(attr_dict(node).get("axis", 0)) % rank
    if axis == ann.axis or annotated[0][0] != 0:
        raise Blocked("splits the annotated axis")
    eng.check_ffn_axis(ann, rank)
    for k, o in enumerate(node.output):
        if o:
            eng.emit(node, ann, c, k)


@register("Concat", analysis="heads")
def heads_concat(eng: Engine, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
    """Heads pass a Concat along another axis; an unannotated operand must be a past KV-cache graph
    input with the same heads (:meth:`~onnxprune.analysis.heads.engine.Engine.cache_input`)."""
    ann = annotated[0][1]
    rank = len(eng.need_shape(node.output[0]))
    axis = int(attr_dict(node).get("axis", 0)) % rank
    if axis == ann.axis:
        raise Blocked("concatenates along the annotated axis")
    others = [x for k, x in enumerate(node.input) if x and k not in dict(annotated)]
    for x in others:  # a past KV cache graph input grows by the new keys/values: it shrinks with the heads
        eng.cache_input(node, x, ann)
    if any(a.axis != ann.axis or a.n * a.b != ann.n * ann.b or a.o != ann.o for _, a in annotated):
        raise Blocked("operands carry the heads differently")
    eng.check_ffn_axis(ann, rank)
    fine = max((a for _, a in annotated), key=lambda a: a.n)
    eng.emit(node, Ann(ann.axis, fine.o, fine.n, fine.b, c), c)
