"""Graph utilities shared by every pass and analysis: shells, topological order, subgraph reads, attributes.

* :func:`shell` — a copy of the model without large initializers (their values replaced by graph
  inputs of the same type and shape), cheap to hand to shape inference or ONNX Runtime;
* :func:`topo_order` / :func:`toposort_inplace` — Kahn's algorithm over the node list, where a
  node with subgraphs (``If``/``Loop``/``Scan``) also depends on every outer-scope name its
  subgraphs read (:func:`node_outer_reads`);
* :func:`attr` — one node attribute as a Python value, with a default.

Preconditions: names are unique within a graph (``validate_graph`` checks it on load).
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

import onnx

from onnxprune.ir.tensors import nbytes


def duplicate_node_name(graph: onnx.GraphProto) -> str | None:
    """The first non-empty node name used twice in ``graph`` (each subgraph is its own scope)."""
    seen: set[str] = set()
    for node in graph.node:
        if node.name and node.name in seen:
            return node.name
        seen.add(node.name)
        for g in node_subgraphs(node):
            inner = duplicate_node_name(g)
            if inner:
                return inner
    return None


def replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Make ``nodes`` (some of them held by ``graph``) the node list of ``graph``.

    The nodes are copied first: clearing ``graph.node`` would invalidate the ones it holds.
    """
    kept = [onnx.NodeProto() for _ in nodes]
    for dst, src in zip(kept, nodes):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(kept)


def dedupe_node_names(graph: onnx.GraphProto) -> int:
    """Rename nodes whose non-empty name an earlier node of the same scope already uses.

    Node names carry no semantics (tensors are wired by tensor names), so ``name`` becomes
    ``name__2``, ``name__3``, ... (skipping names in use); subgraphs are their own scopes.

    Returns:
        Number of nodes renamed (in all scopes).
    """
    used = {n.name for n in graph.node if n.name}
    seen: set[str] = set()
    renamed = 0
    for node in graph.node:
        if node.name and node.name in seen:
            k = 2
            while f"{node.name}__{k}" in used:
                k += 1
            node.name = f"{node.name}__{k}"
            used.add(node.name)
            renamed += 1
        seen.add(node.name)
        for g in node_subgraphs(node):
            renamed += dedupe_node_names(g)
    return renamed


def first_line(msg: str, limit: int = 300) -> str:
    return msg[:limit] + ("..." if len(msg) > limit else "")


SMALL_TENSOR_BYTES = 1 << 16


def shell_input(t: onnx.TensorProto, force: Collection[str] = ()) -> bool:
    """Whether :func:`make_shell` presents initializer ``t`` as a graph input instead of carrying it."""
    return t.name in force or t.data_location == onnx.TensorProto.EXTERNAL or nbytes(t) > SMALL_TENSOR_BYTES


def make_shell(proto: onnx.ModelProto, force_inputs: Collection[str] = ()) -> onnx.ModelProto:
    """A cheap stand-in for checking: large or external initializers become graph inputs.

    The checker and shape inference only need the weights' types and shapes, plus the values of
    small constants (Reshape targets and the like), so large weights are not copied.
    ``force_inputs`` names initializers to present as inputs whatever their size.
    """
    inits = list(proto.graph.initializer)
    shell = copy_without_initializers(proto)
    declared = {i.name for i in shell.graph.input}
    for t in inits:
        if not shell_input(t, force_inputs):
            shell.graph.initializer.append(t)
        elif t.name not in declared:
            shell.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return shell


def copy_without_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Copy a model, leaving out the main graph's initializers (no weight bytes are copied)."""
    out = onnx.ModelProto()
    _copy_fields(proto, out, skip="graph")
    _copy_fields(proto.graph, out.graph, skip="initializer")
    if not out.HasField("graph"):
        out.graph.SetInParent()
    return out


def is_repeated(fd: object) -> bool:
    rep = getattr(fd, "is_repeated", None)
    if rep is not None:
        return bool(rep)
    return fd.label == fd.LABEL_REPEATED  # type: ignore[attr-defined]


def _copy_fields(src: object, dst: object, skip: str) -> None:
    for fd, value in src.ListFields():  # type: ignore[attr-defined]
        if fd.name == skip:
            continue
        if is_repeated(fd):
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def is_toposortable(graph: onnx.GraphProto, available: set[str]) -> bool:
    return topo_order(graph, available) is not None


def topo_order(graph: onnx.GraphProto, available: set[str]) -> list[int] | None:
    order = _topo_order_partial(graph, available)
    return order if len(order) == len(graph.node) else None


def node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs a node holds in its attributes (If branches, Loop/Scan bodies)."""
    subs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            subs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            subs.extend(attr.graphs)
    return subs


def graph_outer_reads(sub: onnx.GraphProto) -> list[str]:
    """Names a (sub)graph reads from enclosing scopes, nested subgraphs included, in first-use order."""
    local = {x.name for x in sub.input} | {t.name for t in sub.initializer}
    for n in sub.node:
        local.update(n.output)
    names: list[str] = []
    for n in sub.node:
        names.extend(x for x in n.input if x and x not in local)
        names.extend(x for x in node_outer_reads(n) if x not in local)
    return list(dict.fromkeys(names))


def node_outer_reads(node: onnx.NodeProto) -> list[str]:
    """Names the subgraphs of ``node`` read from the scope ``node`` lives in (first-use order)."""
    names: list[str] = []
    for sub in node_subgraphs(node):
        names.extend(graph_outer_reads(sub))
    return list(dict.fromkeys(names))


def _outer_scope_names(graph: onnx.GraphProto) -> dict[int, list[str]]:
    """For nodes with subgraphs: names the subgraphs read from the enclosing scope."""
    result: dict[int, list[str]] = {}
    for i, node in enumerate(graph.node):
        names = node_outer_reads(node)
        if names:
            result[i] = names
    return result


def unsortable_reason(graph: onnx.GraphProto, available: set[str]) -> str:
    """Why a graph cannot be sorted: an input nobody provides, or else a cycle (named)."""
    produced = set(available)
    for node in graph.node:
        produced.update(o for o in node.output if o)
    outer = _outer_scope_names(graph)
    for i, node in enumerate(graph.node):
        for x in [*node.input, *outer.get(i, ())]:
            if x and x not in produced:
                return (f"node {node.name or node.op_type!r} reads tensor {x!r}, which no node, graph input "
                        "or initializer provides")
    order = set(_topo_order_partial(graph, available))
    stuck = [graph.node[i].name or graph.node[i].op_type for i in range(len(graph.node)) if i not in order]
    return (f"the graph has a cycle through node(s) {', '.join(repr(n) for n in stuck[:5])}"
            + (" ..." if len(stuck) > 5 else ""))


def _topo_order_partial(graph: onnx.GraphProto, available: set[str]) -> list[int]:
    """Kahn's algorithm: indices of the nodes that can be ordered (all of them unless there is a cycle
    or an input nobody provides). Ties keep the original node order, so sorting is deterministic."""
    import heapq

    outer = _outer_scope_names(graph)
    waiting: dict[str, list[int]] = {}
    missing = [0] * len(graph.node)
    for i, node in enumerate(graph.node):
        needed = {x for x in [*node.input, *outer.get(i, ())] if x and x not in available}
        missing[i] = len(needed)
        for x in needed:
            waiting.setdefault(x, []).append(i)
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order: list[int] = []
    done: set[str] = set()
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for o in graph.node[i].output:
            if not o or o in done:
                continue
            done.add(o)
            for j in waiting.get(o, ()):
                missing[j] -= 1
                if missing[j] == 0:
                    heapq.heappush(ready, j)
    return order


def toposort_inplace(graph: onnx.GraphProto, available: set[str]) -> None:
    order = topo_order(graph, available)
    assert order is not None
    nodes = [copy.deepcopy(graph.node[i]) for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """Attribute value of a node (``default`` if absent)."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def attr_dict(node: onnx.NodeProto) -> dict[str, Any]:
    """Every attribute of a node as ``name -> Python value``."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
