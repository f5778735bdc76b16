"""Model normalisation before attention/FFN group search (:func:`prepare_model`).

Holds :func:`prepare_model` and its helpers. After it runs, every node has a unique name,
``Constant`` nodes and ``Identity(initializer)`` are initializers, every reader of a computed
shape vector (``Concat``-built Reshape/Expand/Tile/Split/Slice inputs) has its own clone of the
small int subgraph, and every initializer of at most :data:`PRIVATIZE_MAX_ELEMS` elements has
one reader per copy, except float weights (two or more axes longer than 1), which stay shared
(blocks sharing a weight are blocked). Copies that stay identical after a removal are merged back
by :func:`onnxprune.analysis.removal.reshare`. Finally
:func:`onnxprune.analysis.removal.privatize_shape_sources` clones intermediate shape nodes still
shared between two chains (``Unsqueeze`` of one piece read by two Concats). Shape edits made by a
group therefore never touch a constant used elsewhere; where one still would (a graph input, a
subgraph read), :func:`~onnxprune.analysis.removal.plan_problems` blocks the group. Graph inputs and graph outputs are never renamed or privatised.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from onnxprune.analysis.removal import privatize_shape_sources
from onnxprune.ir.constants import constant_value
from onnxprune.ir.graph import replace_nodes
from onnxprune.ir.model import Model
from onnxprune.summary import FLOAT_TYPES

#: Initializers up to this many elements are copied per consumer by :func:`prepare_model`.
PRIVATIZE_MAX_ELEMS = 1 << 16


def prepare_model(model: Model) -> int:
    """Normalise ``model`` in place so that groups can name every constant they edit.

    * unnamed nodes get unique names;
    * ``Constant`` nodes holding a tensor / ints / floats become initializers;
    * ``Identity`` of an initializer becomes a copy of it under the Identity's output name;
    * an initializer of at most :data:`PRIVATIZE_MAX_ELEMS` elements read by several nodes (or
      twice by one node) is copied so that each read has its own (graph outputs keep theirs).

    Returns:
        The number of changes made (0: the model was already normalised).
    """
    graph = model.graph
    changes = 0
    used_names = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            base = f"{node.op_type}_{i}"
            name, k = base, 0
            while name in used_names:
                k += 1
                name = f"{base}_{k}"
            node.name = name
            used_names.add(name)
            changes += 1
    inits = model.initializer_map()
    graph_inputs = model.graph_input_names()
    keep: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            arr = constant_value(node)
            if arr is not None:
                model.add_initializer(node.output[0], arr)
                changes += 1
                continue
        if (node.op_type == "Identity" and node.input and node.input[0] in inits
                and node.input[0] not in graph_inputs
                and node.output[0] not in {o.name for o in graph.output}):
            model.add_initializer(node.output[0], np.asarray(model.get_array(node.input[0])))
            changes += 1
            continue
        keep.append(node)
    if len(keep) != len(graph.node):
        replace_nodes(graph, keep)
    changes += privatize_shape_inputs(model)
    changes += privatize(model)
    changes += privatize_shape_sources(model, SHAPE_SLOTS)  # shared intermediates the above leave
    return changes


#: Inputs that hold a shape-like int vector a head/neuron group may have to edit.
SHAPE_SLOTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "Split": (1,), "Slice": (1, 2)}


#: Ops of the small int subgraphs that build such vectors (cloned per consumer).
SHAPE_OPS = {"Concat", "Unsqueeze", "Squeeze", "Cast", "Gather", "Slice", "Mul", "Div", "Add", "Sub", "Where",
             "Equal", "Reshape", "ConstantOfShape", "Identity", "Abs", "Max", "Min"}


def privatize_shape_inputs(model: Model) -> int:
    """Give every shape-slot reader its own copy of a computed shape vector read by several nodes.

    Exporters build one ``Concat(...)`` shape and feed it to several Reshape/Expand nodes (K and
    V, or every layer). A group edits literal pieces of such a vector, so each reader gets a
    clone of the int subgraph (up to ``Shape`` nodes and initializers, which
    :func:`privatize` copies afterwards).
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    readers: dict[str, int] = defaultdict(int)
    for n in graph.node:
        for x in n.input:
            if x:
                readers[x] += 1
    taken = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer} | {
        n.name for n in graph.node}
    inserts: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []
    changes = 0
    seen_first: set[str] = set()
    for node in graph.node:
        for slot in SHAPE_SLOTS.get(node.op_type, ()):
            if slot >= len(node.input) or not node.input[slot]:
                continue
            t = node.input[slot]
            p = producer.get(t)
            if p is None or p.op_type not in SHAPE_OPS or readers[t] < 2:
                continue
            if t not in seen_first:
                seen_first.add(t)  # the first reader keeps the original
                continue
            clones: list[onnx.NodeProto] = []
            memo: dict[str, str] = {}

            def clone(name: str, depth: int = 0) -> str:
                src = producer.get(name)
                if src is None or src.op_type not in SHAPE_OPS or depth > 12:
                    return name
                if name in memo:
                    return memo[name]
                new = onnx.NodeProto()
                new.CopyFrom(src)
                for i, x in enumerate(src.input):
                    if x:
                        new.input[i] = clone(x, depth + 1)
                for i, o in enumerate(src.output):
                    if o:
                        fresh = fresh_name(f"{o}__c", taken)
                        new.output[i] = fresh
                        memo[o] = fresh
                new.name = fresh_name(f"{src.name}__c", taken)
                clones.append(new)
                return memo[name]

            node.input[slot] = clone(t)
            inserts.append((node, clones))
            changes += len(clones)
    if inserts:
        order: list[onnx.NodeProto] = []
        pending: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        for n, c in inserts:
            pending[id(n)].extend(c)
        for n in graph.node:
            if id(n) in pending:
                order.extend(pending[id(n)])
            order.append(n)
        replace_nodes(graph, order)
    return changes


def fresh_name(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}{k}"
    taken.add(name)
    return name


def privatize(model: Model) -> int:
    """Copy each small shared initializer per reader (float weights excepted); returns the copies made."""
    graph = model.graph
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in graph.initializer}
    graph_inputs = model.graph_input_names()
    uses: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for ni, node in enumerate(graph.node):
        for ii, name in enumerate(node.input):
            if name in sizes and name not in graph_inputs:
                uses[name].append((ni, ii))
    taken = set(sizes) | {o for n in graph.node for o in n.output}
    # float weights (two or more axes longer than 1) stay shared: the engine then blocks the
    # blocks that share them instead of pruning two copies differently (which grows the model)
    tied = {t.name for t in graph.initializer if t.data_type in FLOAT_TYPES and sum(int(d) > 1 for d in t.dims) > 1}
    changes = 0
    for name, refs in uses.items():
        if len(refs) < 2 or sizes[name] > PRIVATIZE_MAX_ELEMS or name in tied:
            continue
        value = np.asarray(model.get_array(name))
        for k, (ni, ii) in enumerate(refs[1:], start=1):
            new = f"{name}__p{k}"
            while new in taken:
                new += "_"
            taken.add(new)
            model.add_initializer(new, value)
            graph.node[ni].input[ii] = new
            changes += 1
    return changes
