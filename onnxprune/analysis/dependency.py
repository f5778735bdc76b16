"""Channel dependency analysis: which channels must be removed together.

Every tensor axis gets a *layout*: a tuple of :class:`Segment` entries, each saying that
positions ``offset + c*block + arange(block)`` of the axis belong to channel ``c`` of a *channel
space* (the output channels of one Conv, the hidden units of one MatMul). Positions covered by
no segment are opaque (batch, spatial, sequence, or channels of a graph input). Handlers (one
module per op family in :mod:`onnxprune.analysis.handlers`) compute output layouts from input
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
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis.handlers import lookup
from onnxprune.analysis.removal import ParamSlice, PruneGroup, ShapeEdit
from onnxprune.model import Model, _shell

log = logging.getLogger(__name__)

MAX_ROUNDS = 32


@dataclass(frozen=True)
class Segment:
    """Channel ``c`` of ``space`` owns positions ``offset + c*block + arange(block)`` of an axis."""

    offset: int
    space: int
    block: int = 1


AxisLayout = tuple[Segment, ...]
Layout = list[AxisLayout] | None  # None: unknown rank


class _Restart(Exception):
    """Raised when a space needs new cuts; the analysis reruns."""


@dataclass
class _Space:
    key: tuple[str, int]
    start: int
    width: int
    desc: str


class Analysis:
    """State of one propagation round (used by the handlers).

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
        self.spaces: list[_Space] = []
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
            self.spaces.append(_Space(key, lo, hi - lo, desc if len(bounds) == 2 else f"{desc}[{lo}:{hi}]"))
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

    # ------------------------------------------------------------------ helpers for handlers
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


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """Attribute value of a node (``default`` if absent)."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# ---------------------------------------------------------------------- preparation
#: Shared float constants up to this size are duplicated per use by :func:`prepare`.
UNSHARE_MAX_ELEMENTS = 1 << 22
_SHAPE_INPUTS = {"Reshape": (1,), "Split": (1,), "Slice": (1, 2, 3, 4), "Resize": (3,), "Expand": (1,)}


def _infer_shapes(model: Model) -> dict[str, list[int | None] | None]:
    shell = _shell(model.proto)
    shell.ir_version = max(shell.ir_version, 4)  # IR 3 inference ignores initializers not listed as inputs
    try:
        inferred = onnx.shape_inference.infer_shapes(shell, data_prop=True)
    except Exception as exc:  # inference is best effort here
        log.debug("shape inference failed: %s", exc)
        inferred = shell
    shapes = _read_shapes(inferred.graph)
    try:  # ONNX Runtime's symbolic inference resolves more (e.g. -1 in attention Reshapes)
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        from onnxprune.model import scratch_cwd

        with scratch_cwd():  # on incomplete inference ORT dumps sym_shape_infer_temp.onnx into the cwd
            sym = _read_shapes(SymbolicShapeInference.infer_shapes(shell, auto_merge=True).graph)
    except Exception as exc:  # optional: unknown ops or exotic graphs
        log.debug("symbolic shape inference failed: %s", exc)
        sym = {}
    for name, dims in sym.items():
        cur = shapes.get(name)
        if dims is None:
            continue
        if cur is None or len(cur) != len(dims):
            if cur is None:
                shapes[name] = dims
            continue
        shapes[name] = [c if c is not None else d for c, d in zip(cur, dims)]
    return shapes


def _read_shapes(g: onnx.GraphProto) -> dict[str, list[int | None] | None]:
    shapes: dict[str, list[int | None] | None] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            shapes[vi.name] = None
            continue
        shapes[vi.name] = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]
    return shapes


def prepare(model: Model) -> bool:
    """Make a model ready for analysis without changing what it computes.

    Names unnamed nodes, turns ``Constant`` nodes into initializers, folds small constant
    subgraphs, gives equal Splits explicit sizes, gives each shape-constant input (Reshape target,
    Split sizes, Slice bounds, Resize sizes, Expand shape) its own initializer, and duplicates
    float constants (up to :data:`UNSHARE_MAX_ELEMENTS`) that several nodes read, so exporter
    de-duplication of equal tensors does not tie unrelated channels. Returns True if anything
    changed.
    """
    g = model.graph
    changed = False
    names = {n.name for n in g.node if n.name}
    inits = {t.name for t in g.initializer}
    counter = 0

    def fresh(base: str) -> str:
        nonlocal counter
        while True:
            counter += 1
            cand = f"{base}_{counter}"
            if cand not in names and cand not in inits:
                return cand

    for n in g.node:
        if not n.name:
            n.name = fresh(n.op_type)
            names.add(n.name)
            changed = True
    seen: set[str] = set()
    for n in g.node:  # duplicate node names break attribute edits
        if n.name in seen:
            n.name = fresh(n.name)
            changed = True
        seen.add(n.name)
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value" \
                and n.output[0] not in {o.name for o in g.output}:
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
            inits.add(t.name)
            changed = True
        else:
            keep.append(n)
    if len(keep) != len(g.node):
        copies = []
        for n in keep:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            copies.append(c)
        del g.node[:]
        g.node.extend(copies)
    changed |= _fold_constants(model)
    changed |= _explicit_splits(model, fresh)
    uses: dict[str, int] = defaultdict(int)
    for n in g.node:
        for x in n.input:
            uses[x] += 1
    # float constants used by several nodes (exporters dedupe equal tensors, e.g. zero biases):
    # give each use its own copy so unrelated channel spaces are not tied together
    for n in g.node:
        for i, x in enumerate(n.input):
            t = model.initializer(x) if uses.get(x, 0) > 1 and x in inits else None
            if t is None or x in model.graph_input_names() or \
                    onnx.helper.tensor_dtype_to_np_dtype(t.data_type).kind != "f" or \
                    not 1 < int(np.prod(t.dims, dtype=np.int64)) <= UNSHARE_MAX_ELEMENTS:  # scalars carry no channels
                continue
            new = fresh(x)
            model.add_initializer(new, np.asarray(model.get_array(x)))
            inits.add(new)
            uses[x] -= 1
            n.input[i] = new
            changed = True
    for n in g.node:
        for i in _SHAPE_INPUTS.get(n.op_type, ()):
            if i < len(n.input) and n.input[i] in inits and uses[n.input[i]] > 1 and \
                    n.input[i] not in model.graph_input_names():
                old = n.input[i]
                new = fresh(old)
                model.add_initializer(new, np.asarray(model.get_array(old)))
                inits.add(new)
                uses[old] -= 1
                n.input[i] = new
                changed = True
    return changed


#: Ops never folded: folding would dequantise or copy weights, or depends on run-time state.
_NO_FOLD = {"DequantizeLinear", "QuantizeLinear", "RandomNormal", "RandomUniform", "RandomNormalLike",
            "RandomUniformLike", "Multinomial", "Bernoulli", "Loop", "If", "Scan"}
FOLD_MAX_ELEMENTS = 1 << 20


def _fold_constants(model: Model) -> bool:
    """Replace nodes whose inputs are all small constants by initializers (e.g. Unsqueeze of a
    BN scale), so per-channel constants reach the handlers as initializers."""
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    consts = {t.name for t in g.initializer} - (model.graph_input_names() if model.proto.ir_version >= 4 else set())
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in g.initializer}
    outputs = {o.name for o in g.output}
    folded: list[int] = []
    opset = [onnx.helper.make_opsetid(i.domain, i.version) for i in model.proto.opset_import]
    for idx, n in enumerate(g.node):
        ins = [x for x in n.input if x]
        if n.domain not in ("", "ai.onnx") or n.op_type in _NO_FOLD or not ins or any(x not in consts for x in ins) \
                or any(o in outputs for o in n.output) or sum(sizes.get(x, 0) for x in ins) > FOLD_MAX_ELEMENTS \
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            continue
        try:
            sub = onnx.helper.make_model(
                onnx.helper.make_graph([n], "fold", [], [onnx.helper.make_empty_tensor_value_info(o) for o in n.output if o],
                                       [model.initializer(x) for x in dict.fromkeys(ins)]),
                opset_imports=opset)
            vals = ReferenceEvaluator(sub).run(None, {})
        except Exception:  # an op the reference evaluator cannot run: leave it
            continue
        for o, v in zip([o for o in n.output if o], vals):
            arr = np.asarray(v)
            model.add_initializer(o, arr)
            consts.add(o)
            sizes[o] = int(arr.size)
        folded.append(idx)
    for idx in reversed(folded):
        del g.node[idx]
    return bool(folded)


def _explicit_splits(model: Model, fresh: Any) -> bool:
    g = model.graph
    opset = model.opset
    todo = [n for n in g.node if n.op_type == "Split"]
    if not todo:
        return False
    shapes = _infer_shapes(model)
    changed = False
    for n in todo:
        has_sizes = (len(n.input) > 1 and n.input[1]) if opset >= 13 else attr(n, "split") is not None
        if has_sizes:
            continue
        d = shapes.get(n.input[0])
        if d is None:
            continue
        ax = attr(n, "axis", 0) % len(d)
        size = d[ax]
        k = len(n.output)
        if size is None:
            continue
        if opset >= 18 and attr(n, "num_outputs") is not None:
            chunk = -(-size // k)
            sizes = [chunk] * (k - 1) + [size - chunk * (k - 1)]
        else:
            if size % k:
                continue
            sizes = [size // k] * k
        if opset >= 13:
            name = fresh(f"{n.name}.split")
            model.add_initializer(name, np.array(sizes, dtype=np.int64))
            while len(n.input) < 2:
                n.input.append("")
            n.input[1] = name
            for i, a in enumerate(n.attribute):
                if a.name == "num_outputs":
                    del n.attribute[i]
                    break
        else:
            n.attribute.append(onnx.helper.make_attribute("split", sizes))
        changed = True
    return changed


# ---------------------------------------------------------------------- propagation
def _run_round(model: Model, shapes: dict[str, list[int | None] | None],
               cuts: dict[tuple[str, int], set[int]], allow_approximate: bool, frozen: bool = False) -> Analysis:
    from onnxprune.model import node_outer_reads

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
        raise _Restart
    return a


def analyze(model: Model, allow_approximate: bool = False) -> Analysis:
    """Propagate layouts until no new cuts are needed; return the final round's state."""
    shapes = _infer_shapes(model)
    cuts: dict[tuple[str, int], set[int]] = {}
    for i in range(MAX_ROUNDS):
        try:
            a = _run_round(model, shapes, cuts, allow_approximate)
            log.debug("dependency analysis converged after %d round(s)", i + 1)
            return a
        except _Restart:
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


def format_groups(data: dict[str, Any]) -> str:
    """A terminal table of :func:`inspect_groups` output."""
    head = f"{'group':<32} {'width':>6}  {'members':<44} status"
    lines = [f"channel groups: {data['total']} ({data['prunable']} prunable)", head, "-" * (len(head) + 20)]
    for r in data["groups"]:
        name = r["group"].removesuffix("_output_0")
        name = name if len(name) <= 32 else name[:10] + "..." + name[-19:]
        mem = ", ".join(m.rsplit("/", 1)[-1] for m in r["members"][1:]) or r["group"]
        mem = mem if len(mem) <= 44 else mem[:41] + "..."
        status = "prunable" + (" (approximate)" if r["approximate"] else "") if r["prunable"] else \
            f"blocked: {r['reason']}"
        lines.append(f"{name:<32} {r['width']:>6}  {mem:<44} {status}")
    return "\n".join(lines)


__all__ = ["Analysis", "AxisLayout", "Layout", "Segment", "analyze", "attr", "build_groups", "format_groups",
           "groups_from", "inspect_groups", "prepare", "spaces_of"]
