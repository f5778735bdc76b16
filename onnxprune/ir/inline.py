"""Graph rewrites that cleanup needs: inline constant-condition ``If`` nodes, share Identity'd weights.

:func:`inline_constant_ifs` replaces every ``If`` whose condition is a known constant by the nodes
of the branch it takes, in every scope (nested branches, Loop/Scan bodies):

* the branch's nodes are inserted **at the If's position**, so a topologically sorted graph
  stays sorted (a branch reads only names defined before the If, which read them too);
* a branch-local name (node output, branch initializer) defined anywhere else in the model is
  renamed to a fresh one, in the branch and in every subgraph below it that reads it
  (names a nested subgraph defines itself shadow and are left alone); node names that clash
  with the scope they move into are renamed too;
* branch output ``k`` becomes the If's output ``k``: the local tensor is renamed to it when a
  branch node produces it; when the branch output is an outer-scope name, a branch initializer,
  or a name already mapped to another output, an ``Identity`` produces it (a graph output must
  stay defined under its name);
* branch initializers move to the scope the If lived in; the inlined nodes are examined again,
  so Ifs nested in the taken branch are inlined as well when their condition is constant.

The condition is constant when it is a (non-overridable) initializer or the output of a
``Constant`` node of the If's scope or of an enclosing one.

:func:`share_identity_initializers` removes ``Identity(initializer)`` nodes by renaming every use
of their output to the initializer itself (one shared tensor instead of a folded copy per
Identity), except where the output is a graph output.

Preconditions: names are unique within each scope and the graph is topologically sorted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.ir.graph import node_subgraphs, replace_nodes


def _defined(graph: onnx.GraphProto) -> list[str]:
    names = [i.name for i in graph.input] + [t.name for t in graph.initializer]
    names += [t.values.name for t in graph.sparse_initializer]
    for n in graph.node:
        names.extend(o for o in n.output if o)
    return names


def _count_definitions(graph: onnx.GraphProto, counts: Counter[str]) -> None:
    counts.update(_defined(graph))
    for n in graph.node:
        for g in node_subgraphs(n):
            _count_definitions(g, counts)


def rename_reads(graph: onnx.GraphProto, mapping: Mapping[str, str]) -> None:
    """Rename reads of outer-scope names in ``graph`` and its subgraphs (local definitions shadow)."""
    local = set(_defined(graph))
    live = {k: v for k, v in mapping.items() if k not in local}
    if not live:
        return
    _rename_node_reads(graph.node, live)
    for o in graph.output:
        if o.name in live:
            o.name = live[o.name]


def _rename_node_reads(nodes: Iterable[onnx.NodeProto], mapping: Mapping[str, str]) -> None:
    for n in nodes:
        for i, x in enumerate(n.input):
            if x in mapping:
                n.input[i] = mapping[x]
        for g in node_subgraphs(n):
            rename_reads(g, mapping)


def _constant_value(graph: onnx.GraphProto, protected: Collection[str]) -> dict[str, np.ndarray]:
    """Small (<= 1 element) constants of one scope: initializers and Constant outputs."""
    values = {}
    for t in graph.initializer:
        if t.name not in protected and int(np.prod(t.dims)) <= 1 and t.data_location != onnx.TensorProto.EXTERNAL:
            values[t.name] = numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.output and n.output[0]:
            for a in n.attribute:
                if a.name == "value" and int(np.prod(a.t.dims)) <= 1:
                    values[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "value_int":
                    values[n.output[0]] = np.asarray(a.i)
    return values


class _Inliner:
    def __init__(self, model_graph: onnx.GraphProto) -> None:
        self.counts: Counter[str] = Counter()
        _count_definitions(model_graph, self.counts)
        self.inlined = 0

    def fresh(self, name: str) -> str:
        k = 1
        while f"{name}__{k}" in self.counts:
            k += 1
        new = f"{name}__{k}"
        self.counts[new] += 1
        return new

    def graph(self, graph: onnx.GraphProto, outer: Mapping[str, np.ndarray], protected: Collection[str]) -> None:
        consts = {**outer, **_constant_value(graph, protected)}
        node_names = Counter(n.name for n in graph.node if n.name)
        pending = list(reversed(graph.node))
        out: list[onnx.NodeProto] = []
        changed = False
        while pending:
            node = pending.pop()
            cond = consts.get(node.input[0]) if node.op_type == "If" and node.input else None
            if cond is not None and cond.size == 1:
                branch = next(a.g for a in node.attribute if a.name == ("then_branch" if bool(cond.ravel()[0])
                                                                        else "else_branch"))
                nodes, inits = self.branch(node, branch, node_names)
                graph.initializer.extend(inits)
                consts.update({t.name: numpy_helper.to_array(t) for t in inits if int(np.prod(t.dims)) <= 1})
                for n in nodes:
                    if n.op_type == "Constant":
                        consts.update(_constant_value(_one_node_graph(n), ()))
                pending.extend(reversed(nodes))
                self.inlined += 1
                changed = True
                continue
            for g in node_subgraphs(node):
                self.graph(g, consts, ())
            out.append(node)
        if changed:
            replace_nodes(graph, out)

    def branch(self, node: onnx.NodeProto, branch: onnx.GraphProto,
               node_names: Counter[str]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """The branch's nodes and initializers, renamed for the If's scope."""
        produced = {o for n in branch.node for o in n.output if o}
        local = set(_defined(branch))
        mapping: dict[str, str] = {}
        extra: list[onnx.NodeProto] = []
        for b, y in zip(branch.output, node.output):
            if y and b.name in produced and b.name not in mapping:
                mapping[b.name] = y
        for name in local:
            if name not in mapping and self.counts[name] > 1:
                mapping[name] = self.fresh(name)
        nodes = []
        for src in branch.node:
            n = onnx.NodeProto()
            n.CopyFrom(src)
            _rename_node_reads([n], mapping)
            for i, x in enumerate(n.output):
                n.output[i] = mapping.get(x, x)
            n.name = self.node_name(n.name, node_names) if n.name else n.name
            nodes.append(n)
        for k, (b, y) in enumerate(zip(branch.output, node.output)):
            if y and mapping.get(b.name) != y:
                extra.append(onnx.helper.make_node("Identity", [mapping.get(b.name, b.name)], [y],
                                                   name=self.node_name(f"{node.name or 'If'}/output_{k}", node_names)))
        inits = []
        for t in branch.initializer:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            c.name = mapping.get(t.name, t.name)
            inits.append(c)
        return nodes + extra, inits

    def node_name(self, name: str, taken: Counter[str]) -> str:
        new, k = name, 1
        while new in taken:
            new, k = f"{name}__{k}", k + 1
        taken[new] += 1
        return new


def _one_node_graph(node: onnx.NodeProto) -> onnx.GraphProto:
    g = onnx.GraphProto()
    g.node.append(node)
    return g


def inline_constant_ifs(graph: onnx.GraphProto, protected: Collection[str] = (),
                        constants: Mapping[str, np.ndarray] | None = None) -> int:
    """Inline every constant-condition ``If`` of ``graph`` (in place, all scopes); return how many.

    Args:
        graph: The main graph.
        protected: Initializers that are not constants (they are also graph inputs).
        constants: Extra known scalar values (e.g. initializers kept out of ``graph``).
    """
    inliner = _Inliner(graph)
    inliner.graph(graph, {k: v for k, v in (constants or {}).items() if k not in protected}, protected)
    return inliner.inlined


def share_identity_initializers(graph: onnx.GraphProto, initializers: Collection[str]) -> int:
    """Drop ``Identity`` nodes that read one of ``initializers``; their readers read the initializer.

    An Identity whose output is a graph output is kept (the output keeps its name). Returns the
    number of Identity nodes removed.
    """
    outputs = {o.name for o in graph.output}
    mapping: dict[str, str] = {}
    keep = []
    for n in graph.node:
        if n.op_type == "Identity" and n.input and n.input[0] in initializers and n.output[0] not in outputs:
            mapping[n.output[0]] = n.input[0]
        else:
            keep.append(n)
    if not mapping:
        return 0
    replace_nodes(graph, keep)
    _rename_node_reads(graph.node, mapping)
    return len(mapping)


__all__ = ["inline_constant_ifs", "rename_reads", "share_identity_initializers"]
