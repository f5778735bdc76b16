"""Forward propagation of head/neuron annotations over a graph (:class:`Engine`).

Annotations ``(axis, o, n, b)`` start at split reshapes ``[..., n*D] -> [..., n, D]`` (heads)
or at projections (FFN, :mod:`~onnxprune.analysis.heads.ffn_blocks`) and are carried forward in
topological order by one rule per op type (:data:`PROPAGATION_RULES`). Rules use static shapes
and raise :class:`~onnxprune.analysis.heads.state.Blocked` when a node cannot be accounted
for. Streams that meet (attention cores, binary element-wise ops) are merged by union-find.
Fused attention operators are in :mod:`~onnxprune.analysis.heads.fused`; group assembly in
:mod:`~onnxprune.analysis.heads.assemble`.

Reshape rule: with ``pre = prod(I[:axis]) * o``, output axis ``j`` keeps the factor whole iff
``prod(O[:j]) | pre`` and ``pre * n | prod(O[:j+1])`` (:func:`factor_axis`).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from onnxprune.analysis.heads.assemble import GroupAssembly
from onnxprune.analysis.heads.ffn_blocks import FfnStarts
from onnxprune.analysis.heads.fused import FusedAttentionRules
from onnxprune.analysis.heads.shapes import static_shapes
from onnxprune.analysis.heads.state import (
    ACTIVATIONS,
    BROADCAST,
    FUSED_MS,
    REDUCE,
    SHAPE_ONLY,
    UNARY,
    Ann,
    Blocked,
    Comp,
    attr_dict,
)
from onnxprune.ir.model import Model

#: Op type -> name of the engine method that propagates annotations through it.
PROPAGATION_RULES: dict[str, str] = {
    **{op: "elementwise" for op in UNARY | ACTIVATIONS | BROADCAST},
    "Transpose": "transpose",
    "Reshape": "reshape",
    "Unsqueeze": "squeeze",
    "Squeeze": "squeeze",
    **{op: "reduce" for op in ("Softmax", "LogSoftmax", "Hardmax", *REDUCE)},
    "MatMul": "matmul",
    "Gemm": "gemm",
    "Expand": "expand",
    "Tile": "tile",
    "Slice": "slice",
    "Split": "split",
    "Concat": "concat",
    "Attention": "attention23_4d",
}


class Engine(FfnStarts, FusedAttentionRules, GroupAssembly):
    """Forward propagation of head/neuron annotations over one graph."""

    def __init__(self, model: Model, mode: str, shapes: dict[str, list[int] | None] | None = None) -> None:
        self.model = model
        self.mode = mode  # "heads" | "ffn"
        self.graph = model.graph
        self.shapes = shapes if shapes is not None else static_shapes(model)
        self.inits = model.initializer_map()
        self.graph_inputs = model.graph_input_names()
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers[i].append(node)
        self.outputs = {o.name for o in self.graph.output}
        self.nodes = {n.name: n for n in self.graph.node}
        self.ann: dict[str, Ann] = {}
        self.parent: list[int] = []
        self.comps: list[Comp] = []

    # ------------------------------------------------------------------ helpers
    def const(self, name: str) -> np.ndarray | None:
        """Value of a constant initializer (None if not constant)."""
        if name and name in self.inits and name not in self.graph_inputs:
            return np.asarray(self.model.get_array(name))
        return None

    def shape(self, name: str) -> list[int] | None:
        s = self.shapes.get(name)
        if s is None or any(d is None for d in s):
            return None
        return list(s)  # type: ignore[arg-type]

    def new_comp(self, kind: str) -> int:
        self.parent.append(len(self.parent))
        self.comps.append(Comp(kind))
        return len(self.parent) - 1

    def find(self, c: int) -> int:
        while self.parent[c] != c:
            self.parent[c] = self.parent[self.parent[c]]
            c = self.parent[c]
        return c

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        self.parent[rb] = ra
        ca, cb = self.comps[ra], self.comps[rb]
        for f in ("streams", "shape_refs", "params", "attr_edits", "exits", "split_refs", "blocked", "members"):
            getattr(ca, f).extend(getattr(cb, f))
        ca.ns |= cb.ns
        ca.cores += cb.cores
        ca.activations += cb.activations
        ca.channel_tensors.update(cb.channel_tensors)
        ca.path_nodes |= cb.path_nodes
        return ra

    def comp(self, c: int) -> Comp:
        return self.comps[self.find(c)]

    def block(self, c: int, reason: str) -> None:
        self.comp(c).blocked.append(reason)

    def set_ann(self, tensor: str, ann: Ann, node: onnx.NodeProto) -> None:
        c = self.comp(ann.comp)
        self.ann[tensor] = ann
        c.ns.add(ann.n)
        c.channel_tensors[tensor] = ann.axis
        c.path_nodes.add(node.name)
        if tensor in self.outputs:
            c.blocked.append(f"graph output {tensor!r} carries the {self._what()} (its shape would change)")

    def _what(self) -> str:
        return "heads" if self.mode == "heads" else "FFN neurons"

    # ------------------------------------------------------------------ starts
    def start_heads(self, node: onnx.NodeProto) -> None:
        """A Reshape ``[..., n*D] -> [..., n, D]`` starts a head stream."""
        if node.op_type != "Reshape" or node.input[0] in self.ann:
            return
        i, o = self.shape(node.input[0]), self.shape(node.output[0])
        if not i or not o or len(o) != len(i) + 1 or len(o) < 3:
            return
        n, d = o[-2], o[-1]
        if n < 2 or d < 2 or n * d != i[-1] or int(np.prod(o[:-2])) != int(np.prod(i[:-1])):
            return
        c = self.new_comp("heads")
        comp = self.comps[c]
        comp.streams.append((node.input[0], 0, i[-1], node.name))
        comp.members.append(f"split {node.name}: {n} heads x {d}")
        comp.shape_refs.append((node.name, 1, len(o) - 2, o[-2], "reshape"))
        comp.path_nodes.add(node.name)
        self.set_ann(node.output[0], Ann(len(o) - 2, 1, n, 1, c), node)

    def _check_weight_shared(self, c: int, init: str, node: onnx.NodeProto) -> None:
        users = {n.name for n in self.consumers.get(init, [])}
        if len(users) > 1:
            self.block(c, f"weight {init!r} of {node.name} is shared with {sorted(users - {node.name})[:3]}")

    # ------------------------------------------------------------------ propagation
    def run(self) -> None:
        for node in self.graph.node:
            annotated = [(k, self.ann[x]) for k, x in enumerate(node.input) if x in self.ann]
            if annotated:
                self.visit(node, annotated)
            elif self.mode == "heads" and node.op_type in FUSED_MS | {"Attention"}:
                self.fused(node)
            if self.mode == "heads":
                self.start_heads(node)
            else:
                self.start_ffn(node)

    def visit(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]]) -> None:
        c = annotated[0][1].comp
        for _, a in annotated[1:]:
            c = self.union(c, a.comp)
        comp = self.comp(c)
        comp.path_nodes.add(node.name)
        op = node.op_type
        where = f"{op} {node.name!r}"
        if node.domain not in ("", "ai.onnx") and not (node.domain == "com.microsoft" and op in ACTIVATIONS):
            self.block(c, f"{where} ({node.domain}) consumes a tensor carrying the {self._what()}")
            return
        if op in ACTIVATIONS:
            comp.activations += 1
        try:
            if op in SHAPE_ONLY:
                return
            rule = PROPAGATION_RULES.get(op)
            if rule is None:
                self.block(c, f"{where} consumes a tensor carrying the {self._what()} (no rule for {op})")
            else:
                getattr(self, rule)(node, annotated, c)
        except Blocked as exc:
            self.block(c, f"{where}: {exc}")

    def _need(self, name: str) -> list[int]:
        s = self.shape(name)
        if s is None:
            raise Blocked(f"static shape of {name!r} unknown")
        return s

    def _out(self, node: onnx.NodeProto, ann: Ann, c: int, k: int = 0) -> None:
        self.set_ann(node.output[k], Ann(ann.axis, ann.o, ann.n, ann.b, self.find(c)), node)

    def _ffn_axis_ok(self, ann: Ann, rank: int) -> None:
        if self.mode == "ffn" and (ann.axis != rank - 1 or ann.o != 1 or ann.b != 1):
            raise Blocked("FFN neurons must stay whole on the last axis")

    def elementwise(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        out = self._need(node.output[0])
        rank = len(out)
        ax_out = None
        fine: Ann | None = None
        for k, a in annotated:
            r = len(self._need(node.input[k]))
            ax = a.axis + rank - r
            if ax_out is None:
                ax_out = ax
            if ax != ax_out or a.o != annotated[0][1].o or a.n * a.b != annotated[0][1].n * annotated[0][1].b:
                raise Blocked("operands carry the heads on different axes or factors")
            if fine is None or a.n > fine.n:
                fine = a
        assert fine is not None and ax_out is not None
        length = out[ax_out]
        ann_inputs = {k for k, _ in annotated}
        for k, name in enumerate(node.input):
            if not name or k in ann_inputs:
                continue
            s = self._need(name)
            al = ax_out - (rank - len(s))
            if al < 0 or s[al] == 1:
                continue
            value = self.const(name)
            if value is None or s[al] != length:
                raise Blocked(f"operand {name!r} varies along the {self._what()} axis and is not a constant")
            if fine.o != 1:
                raise Blocked(f"per-channel constant {name!r} with an outer factor")
            users = {n.name for n in self.consumers.get(name, [])}
            if len(users) > 1:
                raise Blocked(f"per-channel constant {name!r} is shared")
            tag = "bias" if node.op_type in ("Add", "Sub") else "param"
            self.comp(c).params.append((name, al, 0, length, "out" if tag == "bias" else "param", tag))
        self._ffn_axis_ok(fine, rank)
        self._out(node, Ann(ax_out, fine.o, fine.n, fine.b, c), c)

    def transpose(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        ann = annotated[0][1]
        rank = len(self._need(node.input[0]))
        perm = attr_dict(node).get("perm") or list(reversed(range(rank)))
        new = Ann(list(perm).index(ann.axis), ann.o, ann.n, ann.b, c)
        self._ffn_axis_ok(new, rank)
        self._out(node, new, c)

    def reshape(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        if annotated[0][0] != 0:
            raise Blocked("the shape input is derived from annotated data")
        ann = annotated[0][1]
        i, o = self._need(node.input[0]), self._need(node.output[0])
        pre = int(np.prod(i[: ann.axis], dtype=np.int64)) * ann.o
        j = factor_axis(o, pre, ann.n)
        if j is None:
            raise Blocked(f"reshape {i} -> {o} splits the {self._what()} across axes")
        p_j = int(np.prod(o[:j], dtype=np.int64))
        new = Ann(j, pre // p_j, ann.n, p_j * o[j] // (pre * ann.n), c)
        self._ffn_axis_ok(new, len(o))
        self.comp(c).shape_refs.append((node.name, 1, j, o[j], "reshape"))
        self._out(node, new, c)

    def squeeze(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        ann = annotated[0][1]
        i, o = self._need(node.input[0]), self._need(node.output[0])
        axes = axes_of(self, node, 1)
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
        self._ffn_axis_ok(new, len(o))
        self._out(node, new, c)

    def reduce(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        ann = annotated[0][1]
        i = self._need(node.input[0])
        rank = len(i)
        attrs = attr_dict(node)
        if node.op_type in ("Softmax", "LogSoftmax", "Hardmax"):
            default = -1 if self.model.opset >= 13 else 1
            axis = int(attrs.get("axis", default)) % rank
            if axis == ann.axis or (self.model.opset < 13 and axis <= ann.axis):
                raise Blocked("normalises over the annotated axis")
            self._ffn_axis_ok(ann, rank)
            self._out(node, ann, c)
            return
        axes = axes_of(self, node, 1)
        if axes is None:
            raise Blocked("reduces over all axes")
        axes = sorted(a % rank for a in axes)
        if ann.axis in axes:
            raise Blocked("reduces over the annotated axis")
        keepdims = int(attrs.get("keepdims", 1))
        new_axis = ann.axis if keepdims else ann.axis - sum(1 for a in axes if a < ann.axis)
        new = Ann(new_axis, ann.o, ann.n, ann.b, c)
        self._ffn_axis_ok(new, rank if keepdims else rank - len(axes))
        self._out(node, new, c)

    def matmul(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        a_shape, b_shape = self._need(node.input[0]), self._need(node.input[1])
        out = self._need(node.output[0])
        ra, rb, rank = len(a_shape), len(b_shape), len(out)
        by_k = dict(annotated)
        if 0 in by_k and by_k[0].axis == ra - 1 and 1 not in by_k:
            self.exit(node, by_k[0], node.input[1], 0, c)
            return
        if self.mode == "ffn":
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
            self.comp(c).cores += 1  # an attention core, prunable or not: report it
            (_, a), (_, b) = annotated
            if a.o != b.o or a.n * a.b != b.n * b.b or max(a.n, b.n) % min(a.n, b.n):
                raise Blocked(f"head factors disagree ({a.n}x{a.b} vs {b.n}x{b.b})")
        fine = max((a for _, a in annotated), key=lambda a: a.n)
        self._out(node, Ann(ax, fine.o, fine.n, fine.b, c), c)

    def gemm(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        attrs = attr_dict(node)
        by_k = dict(annotated)
        if 0 in by_k and len(by_k) == 1 and by_k[0].axis == 1 and not attrs.get("transA", 0):
            self.exit(node, by_k[0], node.input[1], 1 if attrs.get("transB", 0) else 0, c)
            return
        raise Blocked("Gemm operand carries the annotated axis in an unsupported place")

    def exit(self, node: onnx.NodeProto, ann: Ann, weight: str, w_axis: int, c: int) -> None:
        w = self.const(weight)
        if w is None or w.ndim != 2:
            raise Blocked("contracts over the annotated axis with a non-constant operand")
        if ann.o != 1:
            raise Blocked("the projection input interleaves heads with an outer factor")
        length = ann.n * ann.b
        if w.shape[w_axis] != length:
            raise Blocked(f"weight {weight!r} has {w.shape[w_axis]} rows, expected {length}")
        comp = self.comp(c)
        comp.params.append((weight, w_axis, 0, length, "in", "weight"))
        comp.exits.append((node.name, node.input[0], length))
        comp.members.append(f"exit {node.name} ({weight})")
        self._check_weight_shared(c, weight, node)

    def expand(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        if annotated[0][0] != 0:
            raise Blocked("the expand shape is derived from annotated data")
        ann = annotated[0][1]
        i, o = self._need(node.input[0]), self._need(node.output[0])
        ax = ann.axis + len(o) - len(i)
        if o[ax] != i[ann.axis]:
            raise Blocked("broadcasts along the annotated axis")
        shape_len = int(np.prod(self._need(node.input[1])))
        pos = ax - (len(o) - shape_len)
        if pos >= 0:
            self.comp(c).shape_refs.append((node.name, 1, pos, o[ax], "expand"))
        new = Ann(ax, ann.o, ann.n, ann.b, c)
        self._ffn_axis_ok(new, len(o))
        self._out(node, new, c)

    def tile(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        ann = annotated[0][1]
        reps = self.const(node.input[1])
        if annotated[0][0] != 0 or reps is None:
            raise Blocked("repeats are not constant")
        if int(reps.reshape(-1)[ann.axis]) != 1:
            raise Blocked("tiles the annotated axis (non-consecutive head repeat)")
        self._out(node, ann, c)

    def slice(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        ann = annotated[0][1]
        if annotated[0][0] != 0:
            raise Blocked("slice bounds are derived from annotated data")
        i = self._need(node.input[0])
        o = self._need(node.output[0])
        if o[ann.axis] != i[ann.axis]:
            raise Blocked("slices the annotated axis")
        self._ffn_axis_ok(ann, len(i))
        self._out(node, ann, c)

    def split(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        ann = annotated[0][1]
        rank = len(self._need(node.input[0]))
        axis = int(attr_dict(node).get("axis", 0)) % rank
        if axis == ann.axis or annotated[0][0] != 0:
            raise Blocked("splits the annotated axis")
        self._ffn_axis_ok(ann, rank)
        for k, o in enumerate(node.output):
            if o:
                self._out(node, ann, c, k)

    def concat(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        ann = annotated[0][1]
        rank = len(self._need(node.output[0]))
        axis = int(attr_dict(node).get("axis", 0)) % rank
        if axis == ann.axis:
            raise Blocked("concatenates along the annotated axis")
        if len(annotated) != len([x for x in node.input if x]):
            raise Blocked("concatenates annotated with other data (e.g. a KV cache)")
        if any(a.axis != ann.axis or a.n * a.b != ann.n * ann.b or a.o != ann.o for _, a in annotated):
            raise Blocked("operands carry the heads differently")
        self._ffn_axis_ok(ann, rank)
        fine = max((a for _, a in annotated), key=lambda a: a.n)
        self._out(node, Ann(ann.axis, fine.o, fine.n, fine.b, c), c)


def axes_of(eng: Engine, node: onnx.NodeProto, input_index: int) -> list[int] | None:
    attrs = attr_dict(node)
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(node.input) > input_index and node.input[input_index]:
        v = eng.const(node.input[input_index])
        return None if v is None else [int(a) for a in v.reshape(-1)]
    return None


def factor_axis(o: list[int], pre: int, n: int) -> int | None:
    """Output axis that holds the head factor ``[pre, pre * n)`` whole (None if split)."""
    p = 1
    cands = []
    for j, d in enumerate(o):
        if pre % p == 0 and (p * d) % (pre * n) == 0:
            cands.append(j)
        p *= d
    if not cands:
        return None
    wide = [j for j in cands if o[j] > 1]
    return wide[0] if wide else cands[0]
