"""Forward propagation of head/neuron annotations over a graph (:class:`Engine`).

Annotations ``(axis, o, n, b)`` start at split reshapes ``[..., n*D] -> [..., n, D]`` (heads)
or at projections (FFN, :mod:`~onnxprune.analysis.heads.ffn_blocks`) and are carried forward in
topological order by the ``"heads"`` rules of the one per-op registry
(:mod:`onnxprune.analysis.rules`, one file per op family). Rules use static shapes
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
from onnxprune.analysis.heads.state import Ann, Blocked, Comp
from onnxprune.analysis.kvcache import declared_dims, is_cache_name
from onnxprune.analysis.nbits import nbits_of, support_problem
from onnxprune.analysis.rules import lookup
from onnxprune.ir.model import Model
from onnxprune.ir.ops import ACTIVATIONS, FUSED_ATTENTION_MS


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
        for f in ("streams", "shape_refs", "params", "attr_edits", "exits", "split_refs", "io", "align", "blocked",
                  "members"):
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
        if tensor in self.outputs and not self._cache_output(tensor, ann):
            c.blocked.append(f"graph output {tensor!r} carries the {self.what()} (its shape would change)")

    def _cache_output(self, tensor: str, ann: Ann) -> bool:
        """A present KV-cache graph output carrying whole heads: record its I/O rewrite (True)."""
        dims = declared_dims(self.model, tensor)
        length = ann.o * ann.n * ann.b
        if self.mode != "heads" or ann.o != 1 or not is_cache_name(tensor, "output") or (
                dims is not None and (len(dims) <= ann.axis or dims[ann.axis] != length)):
            return False
        self.comp(ann.comp).io.append((tensor, ann.axis, length, "output"))
        return True

    def cache_input(self, node: onnx.NodeProto, name: str, ann: Ann) -> None:
        """``name`` (concatenated with a head stream by ``node``) must be a past KV-cache graph input
        holding the same heads on the same axis; its declared shape then shrinks with them.

        Raises:
            Blocked: it is anything else.
        """
        dims = declared_dims(self.model, name)
        length = ann.o * ann.n * ann.b
        if (self.mode != "heads" or name not in self.graph_inputs or name in self.inits
                or not is_cache_name(name, "input")):
            raise Blocked(f"concatenates the heads with {name!r}, which is not a past KV-cache graph input")
        if ann.o != 1 or dims is None or len(dims) <= ann.axis or dims[ann.axis] != length:
            raise Blocked(f"past cache {name!r} declares {dims}, not {length} heads on axis {ann.axis}")
        others = [n for n in self.consumers.get(name, []) if n.name != node.name]
        if others:
            raise Blocked(f"past cache {name!r} is also read by {others[0].op_type} {others[0].name!r}")
        self.comp(ann.comp).io.append((name, ann.axis, length, "input"))

    def what(self) -> str:
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
            elif self.mode == "heads" and node.op_type in FUSED_ATTENTION_MS:
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
        rule = lookup(node.domain, op, self.model.opset, analysis="heads")
        if rule is None and node.domain not in ("", "ai.onnx"):
            self.block(c, f"{where} ({node.domain}) consumes a tensor carrying the {self.what()}")
            return
        if op in ACTIVATIONS:
            comp.activations += 1
        if rule is None:
            self.block(c, f"{where} consumes a tensor carrying the {self.what()} (no rule for {op})")
            return
        try:
            rule(self, node, annotated, c)
        except Blocked as exc:
            self.block(c, f"{where}: {exc}")

    def need_shape(self, name: str) -> list[int]:
        s = self.shape(name)
        if s is None:
            raise Blocked(f"static shape of {name!r} unknown")
        return s

    def emit(self, node: onnx.NodeProto, ann: Ann, c: int, k: int = 0) -> None:
        self.set_ann(node.output[k], Ann(ann.axis, ann.o, ann.n, ann.b, self.find(c)), node)

    def check_ffn_axis(self, ann: Ann, rank: int) -> None:
        if self.mode == "ffn" and (ann.axis != rank - 1 or ann.o != 1 or ann.b != 1):
            raise Blocked("FFN neurons must stay whole on the last axis")

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

    def exit_nbits(self, node: onnx.NodeProto, ann: Ann, c: int) -> None:
        """A ``MatMulNBits`` contracting over the annotated last axis: its K blocks are the exit.

        Removal along K must drop whole quantisation blocks, so the block size is recorded
        (:meth:`~onnxprune.analysis.heads.assemble.GroupAssembly.assemble` aligns the units to it).
        """
        w = nbits_of(self.model, node)
        if w is None:
            raise Blocked("MatMulNBits weight or scales are not constant initializers")
        problem = support_problem(self.model, w)
        if problem:
            raise Blocked(problem)
        if ann.o != 1:
            raise Blocked("the projection input interleaves heads with an outer factor")
        length = ann.n * ann.b
        if w.K != length:
            raise Blocked(f"MatMulNBits K={w.K}, expected {length}")
        comp = self.comp(c)
        comp.params.append((w.weight, 1, 0, length, "in", "weight"))
        comp.exits.append((node.name, node.input[0], length))
        comp.align.append((node.name, length, w.block_size))
        comp.members.append(f"exit {node.name} ({w.weight}, {w.bits}-bit, block {w.block_size})")
        self._check_weight_shared(c, w.weight, node)
