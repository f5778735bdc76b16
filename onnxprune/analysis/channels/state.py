"""The state of the channel dependency analysis: segments, layouts, spaces, the :class:`Analysis`.

A tensor axis has a *layout*: a tuple of :class:`Segment` entries, each saying that positions
``offset + c*block + arange(block)`` of the axis belong to channel ``c`` of a *channel space*.
Spaces are merged by union-find (:meth:`Analysis.union`); the per-op rules in
:mod:`onnxprune.analysis.rules` read and write this state. See
:mod:`onnxprune.analysis.channels.groups` for the algorithm.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis.removal import ParamSlice, ShapeEdit
from onnxprune.ir.graph import attr
from onnxprune.ir.model import Model


@dataclass(frozen=True)
class Segment:
    """Channel ``c`` of ``space`` owns positions ``offset + c*block + arange(block)`` of an axis."""

    offset: int
    space: int
    block: int = 1


AxisLayout = tuple[Segment, ...]


Layout = list[AxisLayout] | None  # None: unknown rank


class Restart(Exception):
    """Raised when a space needs new cuts; the analysis reruns."""


@dataclass
class Space:
    key: tuple[str, int]
    start: int
    width: int
    desc: str


class Analysis:
    """State of one propagation round (used by the channel rules in :mod:`onnxprune.analysis.rules`).

    Attributes:
        model: The model.
        opset: Its ``ai.onnx`` opset.
        allow_approximate: Let LayerNorm/Softmax/Reduce over channels pass (marked approximate).
    """

    def __init__(self, model: Model, shapes: dict[str, list[int | None] | None],
                 cuts: dict[tuple[str, int], set[int]], allow_approximate: bool) -> None:
        self.model = model
        self.opset = model.opset
        self.allow_approximate = allow_approximate
        self._shapes = shapes
        self._cuts = cuts
        self._new_cuts = False
        self.frozen = False
        self._inits = {t.name: t for t in model.graph.initializer}
        # IR < 4 lists every initializer among the inputs by convention: they are still constants
        self._graph_inputs = {i.name for i in model.graph.input} if model.proto.ir_version >= 4 else set()
        self._const_cache: dict[str, np.ndarray] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for n in model.graph.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
        self.layouts: dict[str, Layout] = {}
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.slices: dict[int, list[ParamSlice]] = defaultdict(list)
        self.edits: dict[int, list[ShapeEdit]] = defaultdict(list)
        self.reasons: dict[int, list[str]] = defaultdict(list)
        self.approx: dict[int, list[str]] = defaultdict(list)
        self.members: dict[int, list[str]] = defaultdict(list)
        self.probes: dict[int, list[tuple[str, int, int, int]]] = defaultdict(list)

    # ------------------------------------------------------------------ tensors
    def dims(self, name: str) -> list[int | None] | None:
        """Static dims of a tensor (None entries for symbolic ones); None if the rank is unknown."""
        if name in self._inits:
            return [int(d) for d in self._inits[name].dims]
        return self._shapes.get(name)

    def rank(self, name: str) -> int | None:
        """Rank of a tensor, if known."""
        d = self.dims(name)
        return None if d is None else len(d)

    def is_const(self, name: str) -> bool:
        """True for an initializer that is not a graph input."""
        return name in self._inits and name not in self._graph_inputs

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (None if not constant)."""
        if not name or not self.is_const(name):
            return None
        if name not in self._const_cache:
            self._const_cache[name] = np.asarray(self.model.get_array(name))
        return self._const_cache[name]

    def small_const(self, name: str) -> np.ndarray | None:
        """The value of a constant with at most 64 elements (shape constants, scalars)."""
        if not name or not self.is_const(name):
            return None
        if int(np.prod(self._inits[name].dims, dtype=np.int64)) > 64:
            return None
        return self.const(name)

    def layout(self, name: str) -> Layout:
        """The layout of a tensor (opaque if none was set)."""
        if not name:
            return None
        if name in self.layouts:
            return self.layouts[name]
        r = self.rank(name)
        return None if r is None else [() for _ in range(r)]

    def set_layout(self, name: str, layout: Layout) -> None:
        """Set an output's layout (records membership for inspection)."""
        if not name:
            return
        self.layouts[name] = layout
        for ax in layout or []:
            for seg in ax:
                m = self.members[seg.space]
                if len(m) < 12 and name not in m:
                    m.append(name)

    # ------------------------------------------------------------------ spaces
    def find(self, s: int) -> int:
        """Union-find root of space ``s``."""
        p = self.parent
        while p[s] != s:
            p[s] = p[p[s]]
            s = p[s]
        return s

    def union(self, a: int, b: int) -> None:
        """Unify two spaces (they must have the same width)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.spaces[a].width != self.spaces[b].width:
            self.block_spaces([a, b], "spaces of different widths meet")
        self.parent[rb] = ra

    def new_space(self, node: onnx.NodeProto, index: int, width: int, desc: str) -> AxisLayout:
        """Create the channel space(s) of a producer's output axis, split at recorded cuts."""
        key = (node.name, index)
        bounds = sorted({0, width} | {c for c in self._cuts.get(key, set()) if 0 < c < width})
        segs = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            sid = len(self.spaces)
            self.spaces.append(Space(key, lo, hi - lo, desc if len(bounds) == 2 else f"{desc}[{lo}:{hi}]"))
            self.parent.append(sid)
            segs.append(Segment(lo, sid, 1))
        return tuple(segs)

    def width(self, s: int) -> int:
        """Width of a space."""
        return self.spaces[s].width

    def cut(self, seg: Segment, local: int) -> None:
        """Request a cut of ``seg``'s space before its channel ``local``; the round then reruns."""
        sp = self.spaces[seg.space]
        if self.frozen:
            self.block_spaces([seg.space], f"would need a cut at channel {local} (cut limit reached)")
            return
        self._cuts.setdefault(sp.key, set()).add(sp.start + local)
        self._new_cuts = True

    def align_periods(self, ax: AxisLayout, period: int, count: int) -> list[list[Segment]] | None:
        """Split ``ax`` into ``count`` periods of ``period`` positions with the same structure.

        Cuts segments at period boundaries and at every local boundary seen in any period (the
        round then reruns). Returns the per-period segments (offsets local to the period), or None
        if cuts were requested or the periods cannot be made alike.
        """
        local: set[int] = set()
        for seg in ax:
            end = seg.offset + seg.block * self.width(seg.space)
            base = (seg.offset // period) * period
            local.update({seg.offset - base, min(end - base, period)})
        need = False
        for seg in ax:
            end = seg.offset + seg.block * self.width(seg.space)
            base = (seg.offset // period) * period
            cuts = {base + b for b in local} | {base + period * k for k in range(1, count)}
            for p in sorted(cuts):
                if seg.offset < p < end:
                    if (p - seg.offset) % seg.block:
                        return None
                    self.cut(seg, (p - seg.offset) // seg.block)
                    need = True
        if need:
            return None
        periods: list[list[Segment]] = [[] for _ in range(count)]
        for seg in ax:
            k = seg.offset // period
            if k >= count:
                return None
            periods[k].append(Segment(seg.offset % period, seg.space, seg.block))
        shape0 = [(s.offset, s.block, self.width(s.space)) for s in periods[0]]
        if any([(s.offset, s.block, self.width(s.space)) for s in pg] != shape0 for pg in periods[1:]):
            return None
        for pg in periods[1:]:
            for s0, s1 in zip(periods[0], pg):
                self.union(s0.space, s1.space)
        return periods

    def block_spaces(self, spaces: Any, reason: str) -> None:
        """Mark spaces (by id) as not prunable with ``reason``."""
        for s in spaces:
            r = self.reasons[s]
            if reason not in r:
                r.append(reason)

    def block(self, layout: Layout | AxisLayout, reason: str) -> None:
        """Block every space found in a layout (a tensor layout or one axis)."""
        self.block_spaces(spaces_of(layout), reason)

    def mark_approx(self, layout: Layout | AxisLayout, reason: str) -> None:
        """Mark every space in a layout approximate (only valid with allow_approximate)."""
        for s in spaces_of(layout):
            if reason not in self.approx[s]:
                self.approx[s].append(reason)

    def inexact(self, layout: Layout | AxisLayout, reason: str) -> None:
        """An op whose result depends on the channel count: approximate if allowed, else block."""
        if self.allow_approximate:
            self.mark_approx(layout, reason)
        else:
            self.block(layout, reason + " (removal is inexact; allow_approximate=true prunes anyway)")

    def add_slices(self, axis_layout: AxisLayout, init: str, axis: int, role: str, tag: str = "") -> None:
        """Record a parameter slice of ``init`` on ``axis`` for every segment of ``axis_layout``."""
        for seg in axis_layout:
            self.slices[seg.space].append(ParamSlice(init, axis, role, seg.offset, seg.block, None, tag))  # type: ignore[arg-type]

    def add_probe(self, tensor: str, axis: int, axis_layout: AxisLayout) -> None:
        """Record that readers see ``axis_layout``'s channels on ``axis`` of ``tensor``."""
        for seg in axis_layout:
            pr = self.probes[seg.space]
            if len(pr) < 4:
                pr.append((tensor, axis, seg.offset, seg.block))

    def add_edit(self, axis_layout: AxisLayout, kind: str, target: str, index: int | str, scale: int = 1) -> None:
        """Record a shape constant shrinking by ``block*scale`` per removed channel of each segment."""
        for seg in axis_layout:
            self.edits[seg.space].append(ShapeEdit(kind, target, index, seg.block * scale))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ helpers for the rules
    def unify_axes(self, a: AxisLayout, b: AxisLayout, where: str) -> AxisLayout:
        """Unify two layouts of the same axis (element-wise operands); returns the result."""
        if not a:
            return b
        if not b:
            return a
        if [(s.offset, s.block, self.width(s.space)) for s in a] == \
                [(s.offset, s.block, self.width(s.space)) for s in b]:
            for x, y in zip(a, b):
                self.union(x.space, y.space)
            return a
        # misaligned: cut where the other side has a boundary, if that is inside a segment
        for src, dst in ((a, b), (b, a)):
            bounds = {s.offset for s in src} | {s.offset + s.block * self.width(s.space) for s in src}
            for seg in dst:
                end = seg.offset + seg.block * self.width(seg.space)
                for p in bounds:
                    if seg.offset < p < end and (p - seg.offset) % seg.block == 0:
                        self.cut(seg, (p - seg.offset) // seg.block)
        if self._new_cuts and not self.frozen:
            return a
        self.block(a + b, f"{where}: channel layouts of the operands do not line up")
        return a

    def weight_slices(self, name: str, axis: int, axis_layout: AxisLayout, role: str, tag: str = "") -> bool:
        """Record slices on the initializer(s) behind weight tensor ``name`` (logical ``axis``).

        Follows Identity, Cast, Transpose and DequantizeLinear (whose per-channel scale and zero
        point along ``axis`` become ``"param"`` slices). Returns False if ``name`` is not constant.
        """
        if not axis_layout:
            return self.resolves_to_const(name)
        if self.is_const(name):
            r = len(self._inits[name].dims)
            self.add_slices(axis_layout, name, axis % max(r, 1), role, tag)
            return True
        node = self.producer.get(name)
        if node is None:
            return False
        if node.op_type in ("Identity", "Cast"):
            return self.weight_slices(node.input[0], axis, axis_layout, role, tag)
        if node.op_type == "Transpose":
            r = self.rank(node.input[0])
            if r is None:
                return False
            perm = attr(node, "perm", list(reversed(range(r))))
            return self.weight_slices(node.input[0], perm[axis % r], axis_layout, role, tag)
        if node.op_type == "DequantizeLinear":
            r = self.rank(node.input[0])
            if r is None or not self.weight_slices(node.input[0], axis, axis_layout, role, tag):
                return False
            q_axis = attr(node, "axis", 1) % r
            for extra in node.input[1:3]:
                d = self.dims(extra) if extra else None
                if d and len(d) == 1 and d[0] and d[0] > 1 and q_axis == axis % r:
                    self.add_slices(axis_layout, extra, 0, "param", "quant")
            return True
        return False

    def resolves_to_const(self, name: str) -> bool:
        """True if ``name`` is a constant or a constant seen through Identity/Cast/Transpose/DQ."""
        if self.is_const(name):
            return True
        node = self.producer.get(name)
        if node is None or node.op_type not in ("Identity", "Cast", "Transpose", "DequantizeLinear"):
            return False
        return all(self.resolves_to_const(x) for x in node.input if x)

    def int_sources(self, name: str) -> list[tuple[str, int, int] | None] | None:
        """Where each element of a 1-D int tensor comes from: ``(initializer, index, value)``,
        or None for a run-time value; None overall if the length is unknown."""
        if self.is_const(name):
            v = self.small_const(name)
            if v is None or v.ndim > 1:
                return None
            return [(name, i, int(x)) for i, x in enumerate(v.reshape(-1))]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Concat":
            out: list[tuple[str, int, int] | None] = []
            for x in node.input:
                s = self.int_sources(x)
                if s is None:
                    return None
                out.extend(s)
            return out
        if node is not None and node.op_type in ("Identity", "Cast", "Unsqueeze", "Squeeze"):
            s = self.int_sources(node.input[0])
            if s is not None:
                return s
        d = self.dims(name)
        if d is None or len(d) != 1 or d[0] is None:
            return None
        return [None] * d[0]


def spaces_of(layout: Layout | AxisLayout) -> list[int]:
    """Space ids in a tensor layout or an axis layout."""
    if not layout:
        return []
    out: list[int] = []
    for item in layout:
        if isinstance(item, Segment):
            out.append(item.space)
        else:
            out.extend(s.space for s in item)
    return out
