"""Channel dependency analysis: which channels must be removed together.

Every tensor axis gets a *layout*: a tuple of :class:`Segment` entries, each saying that
positions ``offset + c*block + arange(block)`` of the axis belong to channel ``c`` of a *channel
space* (the output channels of one Conv, the hidden units of one MatMul). Positions covered by
no segment are opaque (batch, spatial, sequence, or channels of a graph input). Handlers (one
module per op family in :mod:`onnxprune.analysis.rules`) compute output layouts from input
layouts in topological order:

* Conv / ConvTranspose / Gemm / MatMul with a constant weight start a new space on their output
  channel axis (weight out-slice, bias) and record the weight's reduction slice (``"in"``) for
  every segment on their input's channel axis; a depthwise Conv ties input to output;
* element-wise ops unify the spaces of their operands (union-find: residual groups form here),
  broadcasting included; constant operands that vary along a channel axis become ``"param"``
  slices (PRelu slopes, per-channel Mul/Add constants, quantisation scales);
* Concat shifts segment offsets, Split/Slice take sub-ranges, Transpose permutes axes,
  Reshape/Flatten merge axes (channel ``c`` then owns a block of ``h*w`` features) and record
  the Reshape/Split/Slice constants that shrink (:class:`~onnxprune.analysis.removal.ShapeEdit`).

A Split/Slice/misaligned Add that cuts a space in the middle makes the analysis restart with
that space pre-cut into atoms (at most :data:`MAX_ROUNDS` rounds). A union-find class of spaces is
a :class:`~onnxprune.analysis.removal.PruneGroup`. A group is blocked (with the reason) when it
reaches an op without a handler, a graph output, a non-per-channel op (LayerNorm/Softmax/Reduce
over the channel axis: inexact, prunable only with ``allow_approximate``), or an operand that
cannot shrink. Initializer axes shared by several spaces unify those spaces.

Preconditions: a topologically sorted graph; static channel dimensions (batch and spatial dims
may be symbolic). :func:`prepare` (run by :func:`build_groups`) names nodes, turns Constant nodes
into initializers, makes equal Splits explicit and unshares shape constants; it never changes what
the model computes.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

from onnxprune.analysis.channels.prepare import infer_shapes, prepare
from onnxprune.analysis.channels.state import Analysis, Restart
from onnxprune.analysis.removal import ParamSlice, PruneGroup, ShapeEdit
from onnxprune.analysis.rules import lookup
from onnxprune.fmt import Footnotes, shorten
from onnxprune.ir.graph import node_outer_reads
from onnxprune.ir.model import Model

log = logging.getLogger(__name__)


MAX_ROUNDS = 32


# ---------------------------------------------------------------------- propagation
def _run_round(model: Model, shapes: dict[str, list[int | None] | None],
               cuts: dict[tuple[str, int], set[int]], allow_approximate: bool, frozen: bool = False) -> Analysis:
    a = Analysis(model, shapes, cuts, allow_approximate)
    a.frozen = frozen
    for node in model.graph.node:
        handler = lookup(node.domain, node.op_type, a.opset)
        for x in node_outer_reads(node):
            a.block(a.layout(x), f"read inside a subgraph of {node.op_type} node {node.name!r}")
        if handler is None:
            for x in node.input:
                a.block(a.layout(x), f"{node.op_type} node {node.name!r} has no channel handler")
            continue
        try:
            handler(a, node)
        except Exception as exc:  # a handler bug must not guess: block what reaches the node
            log.debug("handler for %s node %s failed", node.op_type, node.name, exc_info=True)
            for x in node.input:
                a.block(a.layout(x), f"{node.op_type} node {node.name!r}: handler failed ({type(exc).__name__}: {exc})")
            for o in node.output:
                a.block(a.layouts.get(o), f"{node.op_type} node {node.name!r}: handler failed")
                a.layouts[o] = None if a.rank(o) is None else [() for _ in range(a.rank(o) or 0)]
    for o in model.graph.output:
        a.block(a.layout(o.name), f"reaches graph output {o.name!r}")
    if a._new_cuts:
        raise Restart
    return a


def analyze(model: Model, allow_approximate: bool = False) -> Analysis:
    """Propagate layouts until no new cuts are needed; return the final round's state."""
    shapes = infer_shapes(model)
    cuts: dict[tuple[str, int], set[int]] = {}
    for i in range(MAX_ROUNDS):
        try:
            a = _run_round(model, shapes, cuts, allow_approximate)
            log.debug("dependency analysis converged after %d round(s)", i + 1)
            return a
        except Restart:
            continue
    log.warning("dependency analysis: channel cuts did not converge in %d rounds; blocking the rest", MAX_ROUNDS)
    return _run_round(model, shapes, cuts, allow_approximate, frozen=True)


def _unify_shared(a: Analysis) -> None:
    """Spaces owning the same positions of one initializer axis must shrink together."""
    by_axis: dict[tuple[str, int], list[tuple[int, ParamSlice]]] = defaultdict(list)
    for sid, sl in a.slices.items():
        for s in sl:
            by_axis[(s.initializer, s.axis)].append((sid, s))
    for entries in by_axis.values():
        if len(entries) < 2:
            continue
        spans = sorted(((s.offset, s.offset + s.step * a.width(sid), sid, s) for sid, s in entries),
                       key=lambda e: (e[0], e[1]))
        for (lo1, hi1, s1, p1), (lo2, hi2, s2, p2) in zip(spans, spans[1:]):
            if lo2 >= hi1:
                continue
            if (lo1, hi1, p1.block, p1.step) == (lo2, hi2, p2.block, p2.step) and a.width(s1) == a.width(s2):
                a.union(s1, s2)
            else:
                a.block_spaces([s1, s2], f"initializer {p1.initializer!r} is shared with overlapping channel ranges")


def groups_from(a: Analysis) -> list[PruneGroup]:
    """Collect union-find classes into groups."""
    _unify_shared(a)
    classes: dict[int, list[int]] = defaultdict(list)
    for sid in range(len(a.spaces)):
        classes[a.find(sid)].append(sid)
    groups: list[PruneGroup] = []
    for root, sids in classes.items():
        slices_d: dict[ParamSlice, None] = {}
        edits: list[ShapeEdit] = []
        reasons_d: dict[str, None] = {}
        approx_d: dict[str, None] = {}
        members_d: dict[str, None] = {}
        probes_d: dict[tuple[str, int, int, int], None] = {}
        for s in sids:
            probes_d.update(dict.fromkeys(a.probes.get(s, [])))
            slices_d.update(dict.fromkeys(a.slices.get(s, [])))
            edits.extend(a.edits.get(s, []))
            reasons_d.update(dict.fromkeys(a.reasons.get(s, [])))
            approx_d.update(dict.fromkeys(a.approx.get(s, [])))
            members_d[a.spaces[s].desc] = None
            members_d.update(dict.fromkeys(a.members.get(s, [])))
        slices, reasons, approx = list(slices_d), list(reasons_d), list(approx_d)
        members, probes = list(members_d)[:40], list(probes_d)
        sp = a.spaces[min(sids)]
        blocked = "; ".join(reasons[:3]) if reasons else None
        if blocked is None and not any(p.role == "in" for p in slices):
            blocked = "no reader consumes these channels"
        groups.append(PruneGroup(name=sp.desc, width=sp.width, slices=slices, shape_edits=edits,
                                 blocked=blocked, approximate=bool(approx) and blocked is None,
                                 members=members, probes=probes))
    return groups


def build_groups(model: Model, allow_approximate: bool = False, *, prepare_model: bool = True) -> list[PruneGroup]:
    """The channel groups of a model (the public entry point).

    Args:
        model: The model; :func:`prepare` runs on it first (in place, semantics unchanged).
        allow_approximate: Let groups pass through LayerNorm/Softmax/Reduce over channels.
        prepare_model: Run :func:`prepare` (set False if the caller already did).

    Returns:
        One :class:`PruneGroup` per set of channels that must be removed together, prunable or
        blocked with the reason. Cache with ``ctx.get_analysis(f"dependency:{allow_approximate}",
        lambda: build_groups(model, allow_approximate))``.
    """
    if prepare_model:
        prepare(model)
    return groups_from(analyze(model, allow_approximate))


# ---------------------------------------------------------------------- inspection
def inspect_groups(model: Model, allow_approximate: bool = False) -> dict[str, Any]:
    """JSON-ready description of the groups (for ``onnxprune inspect --groups``)."""
    work = model.copy()
    groups = build_groups(work, allow_approximate)
    rows = []
    for g in groups:
        rows.append({"group": g.name, "width": g.width, "prunable": g.prunable, "approximate": g.approximate,
                     "reason": g.blocked, "members": g.members,
                     "initializers": sorted({s.initializer for s in g.slices})})
    return {"groups": rows, "total": len(rows), "prunable": sum(r["prunable"] for r in rows)}


def _common_prefix(names: list[str]) -> str:
    """The longest prefix up to a ``/`` that every name shares (``""`` for fewer than two names)."""
    if len(names) < 2:
        return ""
    prefix = os.path.commonprefix(names)
    return prefix[:prefix.rfind("/") + 1]


def format_groups(data: dict[str, Any]) -> str:
    """A terminal table of :func:`inspect_groups` output.

    Group names are never cut in the middle (where ``layer.3`` sits): the prefix all groups share
    is printed once above the table and dropped from the rows, and what is left is shortened
    from the left only; blocked reasons are footnoted once below the table.
    """
    names = [r["group"].removesuffix("_output_0").replace("_output_0[", "[") for r in data["groups"]]
    prefix = _common_prefix(names)
    width = min(max([len(n) - len(prefix) for n in names] + [5]), 64)
    notes = Footnotes()
    head = f"{'group':<{width}} {'width':>6}  {'members':<44} status"
    lines = [f"channel groups: {data['total']} ({data['prunable']} prunable)"]
    if prefix:
        lines.append(f"(group names below start with {prefix})")
    lines += [head, "-" * (len(head) + 20)]
    for r, full in zip(data["groups"], names):
        name = shorten(full[len(prefix):], width)
        mem = ", ".join(m.rsplit("/", 1)[-1] for m in r["members"][1:]) or r["group"]
        mem = mem if len(mem) <= 44 else mem[:41] + "..."
        status = "prunable" + (" (approximate)" if r["approximate"] else "") if r["prunable"] else \
            f"blocked: {notes.ref(r['reason'] or '?')}"
        lines.append(f"{name:<{width}} {r['width']:>6}  {mem:<44} {status}")
    return "\n".join(lines + notes.lines())
