"""Structural removal: the shared representation of "delete these channels everywhere".

A :class:`PruneGroup` is a set of channels (or heads) of width ``W`` that must shrink together.
It lists

* :class:`ParamSlice` entries -- for an initializer ``T`` and an axis ``a``, channel ``c`` of
  the group owns the positions ``offset + c * stride + arange(block)`` of axis ``a``
  (``stride`` defaults to ``block``). Roles: ``"out"`` (the producer side: weight output
  channels, biases), ``"in"`` (read as a reduction input by the next Conv / Gemm / MatMul) and
  ``"param"`` (other per-channel parameters: BatchNorm statistics, PRelu slopes, per-channel
  quantisation scales, depthwise weights, per-channel constants);
* :class:`ShapeEdit` entries -- integer constants that shrink linearly with the number of
  removed channels ``n``: ``new = old - per_channel * n`` (Reshape targets, Split sizes, Slice
  bounds, the ``group`` attribute of a depthwise Conv).

Removing channels ``R`` of a group deletes ``positions(s, R)`` from every slice ``s``; all
slices that land on the same ``(initializer, axis)`` (from one group or several) are merged and
deleted with a single ``np.delete``, so the indices always refer to the original tensor.

Before anything is changed, :func:`plan_problems` checks each group's removal on its own and
then all of them together (shape constants stay positive, positions inside their axes, edit
targets exist), so a pass can block the groups whose plan cannot be applied and prune the rest.

Analyses give readers private copies of shared initializers (so unrelated channels are not tied
together); after a removal :func:`reshare` points every reader of byte-identical copies back to one
tensor -- the original name when it is among them -- so only tensors that really differ stay
copied and a pruned model never holds more parameters than the removal left.

**Shape edits must be private.** An edit ``new = old - per_channel * n`` is right for the one
consumer whose channels shrink; any other reader of the constant would see the shrunk value too
(exporters build Reshape targets as ``Concat`` of small shared int pieces -- the dynamo exporter
feeds one ``[head_dim]`` constant to every Q/K/V reshape of every layer -- so two groups, or a group
and an unrelated reader, would edit one tensor and the model comes out wrong with no error).
Therefore :func:`privatize_shape_sources` (run by both preparations) gives every shape input
its own copy of the whole chain it is built from: each shared node of :data:`SHAPE_THROUGH` on the
way is cloned and each shared int initializer copied, for that reader. :func:`plan_problems` then
refuses a group whose initializer edit still reaches more than one reader
(:func:`edit_sharing_problem`: a graph input, a read inside a subgraph, an intermediate that could
not be cloned), and :func:`reshare` merges cloned nodes that end up identical back into one.

The *masked twin* of a removal zeroes only the ``"in"`` slices: every reader that reduces over
the channel sees zeros there, so (for exact groups) the pruned graph and the masked twin compute
the same outputs. Precondition for exactness: everything between the producer and the readers is
per-channel (the dependency analysis guarantees this unless a group is ``approximate``).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from onnxprune.analysis.kvcache import llm_feeds
from onnxprune.analysis.nbits import (
    NBitsWeight,
    element_mask_problem,
    k_removal_problem,
    nbits_weights,
    zero_inputs,
)
from onnxprune.analysis.nbits import remove as nbits_remove
from onnxprune.analysis.nbits import support_problem as nbits_support_problem
from onnxprune.errors import PassError
from onnxprune.ir.graph import node_outer_reads, replace_nodes
from onnxprune.ir.model import Model
from onnxprune.summary import FLOAT_TYPES

Role = Literal["out", "in", "param"]


@dataclass(frozen=True)
class ParamSlice:
    """Where the channels of a group live in one initializer.

    Channel ``c`` owns positions ``offset + c * stride + arange(block)`` on ``axis``.

    Attributes:
        initializer: Initializer name.
        axis: Axis of the initializer (non-negative).
        role: ``"out"``, ``"in"`` or ``"param"`` (see the module docstring).
        offset: Position of channel 0's block.
        block: Positions per channel (``h*w`` after a Flatten, ``head_dim`` for heads).
        stride: Distance between consecutive channels' blocks; ``None`` means ``block``.
        tag: Free-form marker for criteria (``"bn_scale"``, ``"bn_bias"``, ``"bias"``...).
    """

    initializer: str
    axis: int
    role: Role
    offset: int = 0
    block: int = 1
    stride: int | None = None
    tag: str = ""

    @property
    def step(self) -> int:
        """The effective stride."""
        return self.block if self.stride is None else self.stride


@dataclass(frozen=True)
class ShapeEdit:
    """An integer constant that shrinks linearly: ``new = old - per_channel * n_removed``.

    Attributes:
        kind: ``"initializer"`` (an int tensor) or ``"attribute"`` (a node attribute).
        target: Initializer name, or node name for attributes.
        index: Flat element index in the int tensor, or the attribute name; for an ``ints``
            attribute write ``"name[i]"`` to edit element ``i``.
        per_channel: Decrease per removed channel.
    """

    kind: Literal["initializer", "attribute"]
    target: str
    index: int | str
    per_channel: int


@dataclass(frozen=True)
class IOSlice:
    """A graph input or output whose declared shape shrinks with a group (a KV cache's head axis).

    Channel ``c`` owns positions ``offset + c * block + arange(block)`` of ``axis``; removal lowers
    the declared static dim by ``block`` per removed channel, and whoever feeds the graph must
    drop the same positions (:func:`io_kept` says which stay).

    Attributes:
        tensor: Graph input or output name.
        axis: Axis of its declared shape.
        offset: Position of channel 0's block.
        block: Positions per channel.
        kind: ``"input"`` or ``"output"``.
    """

    tensor: str
    axis: int
    offset: int = 0
    block: int = 1
    kind: Literal["input", "output"] = "input"

    @property
    def step(self) -> int:
        return self.block


@dataclass
class PruneGroup:
    """Channels that must be removed together.

    Attributes:
        name: Readable, unique name (usually the first producer's output tensor).
        width: Number of channels.
        slices: Every parameter slice the channels own.
        shape_edits: Every shape constant that shrinks with them.
        blocked: Why the group cannot be pruned (None = prunable).
        approximate: True if removal changes outputs beyond the masked twin (opt-in only).
        members: Readable description of the tensors and nodes in the group.
        probes: Activation tensors whose axis carries the channels, as ``(tensor, axis, offset,
            block)``: channel ``c`` is positions ``offset + c*block + arange(block)``.
    """

    name: str
    width: int
    slices: list[ParamSlice] = field(default_factory=list)
    shape_edits: list[ShapeEdit] = field(default_factory=list)
    blocked: str | None = None
    approximate: bool = False
    members: list[str] = field(default_factory=list)
    #: ``(tensor, axis, offset, block)`` where readers see the channels (for activation criteria).
    probes: list[tuple[str, int, int, int]] = field(default_factory=list)
    #: Graph inputs/outputs whose declared shapes shrink with the group (KV caches).
    io_slices: list[IOSlice] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        """True if the group may be pruned."""
        return self.blocked is None


def positions(s: ParamSlice, channels: np.ndarray) -> np.ndarray:
    """Positions on ``s.axis`` owned by ``channels`` (sorted as given, blocks contiguous)."""
    ch = np.asarray(channels, dtype=np.int64).reshape(-1)
    return (s.offset + ch[:, None] * s.step + np.arange(s.block, dtype=np.int64)[None, :]).reshape(-1)


def _check_channels(group: PruneGroup, channels: np.ndarray) -> np.ndarray:
    ch = np.unique(np.asarray(channels, dtype=np.int64).reshape(-1))
    if ch.size and (ch[0] < 0 or ch[-1] >= group.width):
        raise PassError(f"group {group.name!r}: channel index out of range [0, {group.width})")
    if ch.size >= group.width:
        raise PassError(f"group {group.name!r}: cannot remove all {group.width} channels")
    return ch


def _sync_declared_input(model: Model, name: str, shape: tuple[int, ...]) -> None:
    """IR < 4 models also list initializers as graph inputs: keep the declared shape in step."""
    for inp in model.graph.input:
        if inp.name == name and inp.type.tensor_type.HasField("shape"):
            dims = inp.type.tensor_type.shape.dim
            if len(dims) == len(shape):
                for d, v in zip(dims, shape):
                    d.Clear()
                    d.dim_value = int(v)


def _attr_edit(node: onnx.NodeProto, index: str, delta: int) -> None:
    name, _, rest = index.partition("[")
    for a in node.attribute:
        if a.name != name:
            continue
        if rest:
            i = int(rest.rstrip("]"))
            vals = list(a.ints)
            vals[i] -= delta
            if vals[i] <= 0:
                raise PassError(f"node {node.name!r}: attribute {name}[{i}] would drop to {vals[i]}")
            del a.ints[:]
            a.ints.extend(vals)
        else:
            a.i -= delta
            if a.i <= 0:
                raise PassError(f"node {node.name!r}: attribute {name} would drop to {a.i}")
        return
    raise PassError(f"node {node.name!r} has no attribute {name!r} to rewrite")


def apply_removal(model: Model, removals: Iterable[tuple[PruneGroup, np.ndarray]]) -> dict[str, Any]:
    """Remove channels of several groups from ``model`` in place.

    Args:
        model: The model (the one the groups were computed on).
        removals: ``(group, channel indices)`` pairs; indices refer to the original widths.

    Returns:
        Stats: ``initializers_changed``, ``shape_edits``, ``params_removed``, ``channels_removed``.

    Raises:
        PassError: out-of-range indices, a group emptied, slices that overlap inconsistently, or a
            shape constant that would drop to zero or below.
    """
    removals = list(removals)
    per_axis: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    edits: dict[tuple[str, str, int | str], int] = defaultdict(int)
    n_channels = 0
    for group, channels in removals:
        ch = _check_channels(group, channels)
        if ch.size == 0:
            continue
        n_channels += int(ch.size)
        for s in group.slices:
            per_axis[(s.initializer, s.axis)].append(positions(s, ch))
        for e in group.shape_edits:
            edits[(e.kind, e.target, e.index)] += e.per_channel * int(ch.size)

    by_init: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for (name, axis), pos in per_axis.items():
        by_init[name].append((axis, np.unique(np.concatenate(pos))))
    params_removed = 0
    packed = nbits_weights(model) if by_init else {}
    for name, cuts in by_init.items():
        if name in packed:  # logical axes: 0 = output rows N, 1 = input positions K (whole blocks)
            none = np.zeros(0, dtype=np.int64)
            cut = dict(cuts)
            params_removed += nbits_remove(model, packed[name], cut.get(0, none), cut.get(1, none))
            continue
        arr = np.asarray(model.get_array(name))
        before = arr.size
        for axis, pos in cuts:
            if pos.size and (pos[0] < 0 or pos[-1] >= arr.shape[axis]):
                raise PassError(f"initializer {name!r}: removal positions exceed axis {axis} "
                                f"(size {arr.shape[axis]})")
            arr = np.delete(arr, pos, axis=axis)
        params_removed += before - arr.size
        model.set_array(name, arr)
        _sync_declared_input(model, name, arr.shape)

    nodes = {n.name: n for n in model.graph.node if n.name}
    for (kind, target, index), delta in edits.items():
        if kind == "initializer":
            val = np.array(model.get_array(target))
            flat = val.reshape(-1)
            if flat[int(index)] - delta <= 0:
                raise PassError(f"shape constant {target!r}[{index}] = {flat[int(index)]} would drop to "
                                f"{flat[int(index)] - delta}")
            flat[int(index)] -= delta
            model.set_array(target, flat.reshape(val.shape))
        else:
            node = nodes.get(target)
            if node is None:
                raise PassError(f"no node named {target!r} for a shape edit")
            _attr_edit(node, str(index), delta)
    io_shapes = _rewrite_io(model, io_removed(list(removals)))
    del model.graph.value_info[:]
    return {"initializers_changed": len(by_init), "shape_edits": len(edits),
            "params_removed": int(params_removed), "channels_removed": n_channels, "io_shapes": io_shapes}


def io_removed(removals: Iterable[tuple[PruneGroup, np.ndarray]]) -> dict[str, tuple[int, np.ndarray]]:
    """Per graph input/output that shrinks: ``(axis, removed positions)`` (sorted, unique)."""
    found: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    for group, channels in removals:
        ch = np.unique(np.asarray(channels, dtype=np.int64).reshape(-1))
        if ch.size:
            for s in group.io_slices:
                found[(s.tensor, s.axis)].append(positions(s, ch))  # type: ignore[arg-type]
    return {t: (axis, np.unique(np.concatenate(p))) for (t, axis), p in found.items()}


def _dims_text(dims: Any) -> str:
    return "[" + ", ".join(d.dim_param if d.dim_param else str(d.dim_value) if d.HasField("dim_value") else "?"
                           for d in dims) + "]"


def _rewrite_io(model: Model, removed: dict[str, tuple[int, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Lower the declared static dims of graph inputs/outputs by the positions removed from them.

    Returns per tensor ``{"axis", "before", "after", "removed"}`` (the shapes as text; a symbolic or
    undeclared dim stays as it is).

    Raises:
        PassError: a declared dim would drop to zero or below.
    """
    out: dict[str, dict[str, Any]] = {}
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name not in removed:
            continue
        axis, pos = removed[vi.name]
        tt = vi.type.tensor_type
        dims = tt.shape.dim if vi.type.HasField("tensor_type") and tt.HasField("shape") else None
        before = _dims_text(dims) if dims is not None else "?"
        if dims is not None and axis < len(dims) and dims[axis].HasField("dim_value"):
            new = dims[axis].dim_value - int(pos.size)
            if new <= 0:
                raise PassError(f"graph {vi.name!r}: dim {axis} = {dims[axis].dim_value} would drop to {new}")
            dims[axis].dim_value = new
        out[vi.name] = {"axis": axis, "before": before, "after": _dims_text(dims) if dims is not None else "?",
                        "removed": [int(p) for p in pos]}
    return out


# ---------------------------------------------------------------------- private shape edits
#: Ops that carry elements of an int shape vector to their output unchanged, with the input slots
#: that do (the analyses trace an edited element back to its constant through these).
SHAPE_THROUGH: dict[str, tuple[int, ...] | None] = {
    "Concat": None, "Unsqueeze": (0,), "Squeeze": (0,), "Cast": (0,), "Identity": (0,), "Reshape": (0,),
    "Slice": (0,), "Where": (1, 2)}

#: Int initializers up to this many elements are copied per reader by :func:`privatize_shape_sources`.
SHAPE_PIECE_MAX_ELEMENTS = 1 << 12


def _through(node: onnx.NodeProto, slot: int) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in SHAPE_THROUGH:
        return False
    slots = SHAPE_THROUGH[node.op_type]
    return slots is None or slot in slots


def _fresh(base: str, taken: set[str]) -> str:
    k = 1
    while f"{base}__s{k}" in taken:
        k += 1
    taken.add(f"{base}__s{k}")
    return f"{base}__s{k}"


def privatize_shape_sources(model: Model, slots: Mapping[str, Iterable[int]]) -> int:
    """Give every shape input its own copy of the int chain it is built from.

    Args:
        model: The model, changed in place (topological order kept).
        slots: Per op type, the input slots that hold shape vectors a group may edit (Reshape
            target, Split sizes, Slice bounds, ...).

    For each such input, walking back through the ops of :data:`SHAPE_THROUGH` (the slots that
    carry elements), every tensor read by more than one consumer -- counting graph outputs and
    reads inside subgraphs -- is made private to this path: a node is cloned (just before the node
    that reads it; the clone's outputs get fresh names), an int initializer of at most
    :data:`SHAPE_PIECE_MAX_ELEMENTS` elements is copied. The last reader keeps the original.
    Graph inputs are never copied (:func:`edit_sharing_problem` then blocks a group that edits
    them). Returns the number of nodes cloned plus initializers copied.
    """
    g = model.graph
    nodes = list(g.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    readers: Counter[str] = Counter(x for n in nodes for x in n.input if x)
    for n in nodes:
        readers.update(node_outer_reads(n))
    readers.update(o.name for o in g.output)
    inits = {t.name: t for t in g.initializer}
    ginputs = model.graph_input_names()
    taken = set(inits) | set(producer) | {n.name for n in nodes} | ginputs
    pending: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    changes = 0

    def own(name: str, anchor: int, depth: int) -> str:
        """A name for ``name`` that only the caller reads (clones go before node ``anchor``)."""
        nonlocal changes
        if depth > 32 or not name:
            return name
        t = inits.get(name)
        if t is not None:
            if readers[name] < 2 or name in ginputs or t.data_type in FLOAT_TYPES or \
                    int(np.prod(t.dims, dtype=np.int64)) > SHAPE_PIECE_MAX_ELEMENTS:
                return name
            new = _fresh(name, taken)
            model.add_initializer(new, np.asarray(model.get_array(name)))
            inits[new] = model.initializer(new)  # type: ignore[assignment]
            readers[name] -= 1
            readers[new] = 1
            changes += 1
            return new
        pi = producer.get(name)
        if pi is None:
            return name
        src = nodes[pi]
        if not any(_through(src, k) for k in range(len(src.input))):
            return name
        if readers[name] < 2:  # private already: make what it reads private too
            for k, x in enumerate(src.input):
                if x and _through(src, k):
                    src.input[k] = own(x, pi, depth + 1)
            return name
        clone = onnx.NodeProto()
        clone.CopyFrom(src)
        clone.name = _fresh(src.name or src.op_type, taken)
        readers[name] -= 1
        renamed = name
        for k, o in enumerate(src.output):
            if o:
                clone.output[k] = _fresh(o, taken)
                if o == name:
                    renamed = clone.output[k]
        readers[renamed] = 1
        for k, x in enumerate(clone.input):
            if x:
                readers[x] += 1
                if _through(clone, k):
                    clone.input[k] = own(x, anchor, depth + 1)
        pending[anchor].append(clone)  # after the clones it reads
        changes += 1
        return renamed

    for i, n in enumerate(nodes):
        for k in slots.get(n.op_type, ()):
            if k < len(n.input) and n.input[k] and n.domain in ("", "ai.onnx"):
                n.input[k] = own(n.input[k], i, 0)
    if pending:
        order: list[onnx.NodeProto] = []
        for i, n in enumerate(nodes):
            order.extend(pending.get(i, ()))
            order.append(n)
        replace_nodes(g, order)
    return changes


def _readers(model: Model) -> tuple[dict[str, list[tuple[onnx.NodeProto, int]]], Counter[str]]:
    """Main-graph readers per tensor, and extra reads (graph outputs, subgraphs) per tensor."""
    by: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    extra: Counter[str] = Counter(o.name for o in model.graph.output)
    for n in model.graph.node:
        for k, x in enumerate(n.input):
            if x:
                by[x].append((n, k))
        extra.update(node_outer_reads(n))
    return by, extra


def edit_sharing_problem(model: Model, target: str,
                         reads: tuple[dict[str, list[tuple[onnx.NodeProto, int]]], Counter[str]] | None = None) -> str | None:
    """Why an edit of initializer ``target`` would reach more than one consumer (None: it would not).

    Follows ``target`` forward through the ops of :data:`SHAPE_THROUGH`; the chain must be linear
    (every tensor on it read exactly once, graph outputs and subgraph reads counted), and
    ``target`` must not be a graph input (a caller could feed another value).
    """
    by, extra = reads if reads is not None else _readers(model)
    if target in model.graph_input_names():
        return f"shape constant {target!r} is a graph input"
    todo, seen = [target], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        users = by.get(t, [])
        if len(users) + extra[t] > 1:
            who = ", ".join(f"{n.op_type} {n.name!r}" for n, _ in users[:3]) + (" ..." if len(users) > 3 else "")
            where = "" if t == target else f" through {t!r}"
            more = " and a graph output or subgraph" if extra[t] else ""
            return (f"shape constant {target!r} is shared{where} (read by {who}{more}); "
                    "editing it would change the other readers too")
        for n, k in users:
            if _through(n, k):
                todo.extend(o for o in n.output if o)
    return None


def _edit_problems(model: Model, edits: dict[tuple[str, str, int | str], int],
                   nodes: dict[str, onnx.NodeProto]) -> str | None:
    """Why accumulated shape edits cannot be applied (None: they can)."""
    for (kind, target, index), delta in edits.items():
        if kind == "initializer":
            if model.initializer(target) is None:
                return f"shape constant {target!r} does not exist"
            flat = np.asarray(model.get_array(target)).reshape(-1)
            if not 0 <= int(index) < flat.size:
                return f"shape constant {target!r} has no element {index}"
            if flat[int(index)] - delta <= 0:
                return f"shape constant {target!r}[{index}] = {flat[int(index)]} would drop to {flat[int(index)] - delta}"
            continue
        node = nodes.get(target)
        if node is None:
            return f"no node named {target!r} for a shape edit"
        name, _, rest = str(index).partition("[")
        a = next((a for a in node.attribute if a.name == name), None)
        if a is None:
            return f"node {target!r} has no attribute {name!r} to rewrite"
        val = int(a.ints[int(rest.rstrip("]"))]) if rest and int(rest.rstrip("]")) < len(a.ints) else \
            (int(a.i) if not rest else None)
        if val is None:
            return f"node {target!r}: attribute {index} does not exist"
        if val - delta <= 0:
            return f"node {target!r}: attribute {index} = {val} would drop to {val - delta}"
    return None


def _slice_problems(model: Model, group: PruneGroup, ch: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> str | None:
    for s in group.slices:
        shape = shapes.get(s.initializer)
        if shape is None:
            return f"initializer {s.initializer!r} does not exist"
        if s.axis >= len(shape):
            return f"initializer {s.initializer!r} has no axis {s.axis}"
        pos = positions(s, ch)
        if pos.size and (pos.min() < 0 or pos.max() >= shape[s.axis]):
            return f"initializer {s.initializer!r}: removal positions exceed axis {s.axis} (size {shape[s.axis]})"
    return None


def _nbits_problems(model: Model, group: PruneGroup, ch: np.ndarray, packed: dict[str, NBitsWeight]) -> str | None:
    """Why a group's slices of ``MatMulNBits`` weights cannot be removed (None: they can)."""
    for s in group.slices:
        w = packed.get(s.initializer)
        if w is None:
            continue
        problem = nbits_support_problem(model, w) or (k_removal_problem(w, positions(s, ch)) if s.axis == 1 else None)
        if problem:
            return problem
    return None


def plan_problems(model: Model, removals: Iterable[tuple[PruneGroup, np.ndarray]]) -> dict[str, str]:
    """Groups of a removal plan that cannot be applied, with the reason (empty: all can).

    Each group is checked alone (channel indices, slice positions, its shape edits, and that
    every shape constant it edits is private to one reader: :func:`edit_sharing_problem`), then the
    groups that pass are accumulated in order and a group whose edits, added to those of the
    groups before it, would drive a shared shape constant to zero or below is refused too. The
    model is not changed; :func:`apply_removal` of the remaining groups then succeeds.
    """
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    packed = nbits_weights(model)
    shapes.update({k: (w.N, w.K) for k, w in packed.items()})  # their slices use the logical [N, K] axes
    nodes = {n.name: n for n in model.graph.node if n.name}
    total: dict[tuple[str, str, int | str], int] = defaultdict(int)
    bad: dict[str, str] = {}
    reads = _readers(model)
    sharing: dict[str, str | None] = {}
    for group, channels in removals:
        try:
            ch = _check_channels(group, channels)
        except PassError as exc:
            bad[group.name] = str(exc)
            continue
        if ch.size == 0:
            continue
        mine: dict[tuple[str, str, int | str], int] = defaultdict(int)
        for e in group.shape_edits:
            mine[(e.kind, e.target, e.index)] += e.per_channel * int(ch.size)
        reason = _slice_problems(model, group, ch, shapes) or _nbits_problems(model, group, ch, packed) or \
            _edit_problems(model, mine, nodes)
        for kind, target, _ in mine:
            if reason is None and kind == "initializer" and model.initializer(target) is not None:
                if target not in sharing:
                    sharing[target] = edit_sharing_problem(model, target, reads)
                reason = sharing[target]
        if reason is None:
            joint = {k: total.get(k, 0) + v for k, v in mine.items()}
            reason = _edit_problems(model, joint, nodes)
            if reason is not None:
                reason = f"together with other groups: {reason}"
        if reason is not None:
            bad[group.name] = reason
            continue
        for k, v in mine.items():
            total[k] += v
    return bad


def reshare(model: Model, original: Iterable[str], original_outputs: Iterable[str] | None = None) -> int:
    """Merge byte-identical initializers that an analysis copied back into one tensor.

    Args:
        model: The model after a removal.
        original: Initializer names of the model before the analysis copied anything; two of
            these are never merged with each other (the model kept them apart itself).
        original_outputs: Node output names of the model before the analysis; when given, nodes
            cloned since (:func:`privatize_shape_sources`; none of their outputs is original) that
            compute the same op on the same inputs with the same attributes as an earlier node are
            merged into it, in node order, so clones whose pieces ended up equal disappear.

    Every main-graph reader of a copy (a name not in ``original``) that has the same dtype, shape
    and bytes as another initializer is pointed at one of them -- an original name when there is
    one -- and the copy is deleted. Graph inputs, graph outputs and names read inside subgraphs
    are left alone. Returns the number of initializers removed.
    """
    orig = set(original)
    g = model.graph
    fixed = model.graph_input_names() | {o.name for o in g.output}
    fixed |= {x for n in g.node for x in node_outer_reads(n)}
    buckets: dict[tuple[int, tuple[int, ...]], list[str]] = defaultdict(list)
    for t in g.initializer:
        buckets[(t.data_type, tuple(t.dims))].append(t.name)
    target: dict[str, str] = {}
    for names in buckets.values():
        if len(names) < 2 or all(n in orig for n in names):
            continue
        by_digest: dict[str, list[str]] = defaultdict(list)
        for n in names:
            arr = np.ascontiguousarray(model.get_array(n))
            by_digest[hashlib.sha256(arr.view(np.uint8).reshape(-1) if arr.size else b"").hexdigest()].append(n)
        for same in by_digest.values():
            if len(same) < 2:
                continue
            keep = next((n for n in same if n in orig), same[0])
            for n in same:
                if n != keep and n not in orig and n not in fixed:
                    target[n] = keep
    if target:
        for n in g.node:
            for i, x in enumerate(n.input):
                if x in target:
                    n.input[i] = target[x]
        for i in reversed([i for i, t in enumerate(g.initializer) if t.name in target]):
            del g.initializer[i]
        for n in target:
            model.external.pop(n, None)
    merged = _merge_clones(model, set(original_outputs), fixed) if original_outputs is not None else 0
    return len(target) + merged


def _merge_clones(model: Model, original_outputs: set[str], fixed: set[str]) -> int:
    """Merge cloned shape nodes into an identical earlier node (see :func:`reshare`)."""
    g = model.graph
    seen: dict[tuple[Any, ...], onnx.NodeProto] = {}
    rename: dict[str, str] = {}
    drop: list[int] = []
    for i, n in enumerate(g.node):
        for k, x in enumerate(n.input):
            if x in rename:
                n.input[k] = rename[x]
        if n.domain not in ("", "ai.onnx") or n.op_type not in SHAPE_THROUGH:
            continue
        key = (n.op_type, tuple(n.input), len(n.output),
               tuple(a.SerializeToString(deterministic=True) for a in sorted(n.attribute, key=lambda a: a.name)))
        first = seen.get(key)
        if first is None:
            seen[key] = n
            continue
        if any(o in original_outputs or o in fixed for o in n.output):
            continue
        rename.update({o: f for o, f in zip(n.output, first.output) if o})
        drop.append(i)
    for i in reversed(drop):
        del g.node[i]
    return len(drop)


def mask_group(model: Model, group: PruneGroup, channels: np.ndarray) -> None:
    """Build the masked twin in place: zero the ``"in"`` slices of ``channels``.

    Every reader that reduces over the group's channels then sees zeros at those channels, which
    is what removal amounts to for exact groups.
    """
    ch = np.unique(np.asarray(channels, dtype=np.int64).reshape(-1))
    if ch.size == 0:
        return
    packed = nbits_weights(model)
    for s in group.slices:
        if s.role != "in":
            continue
        if s.initializer in packed:  # whole K blocks get a zero scale, other positions q = zero point
            zero_inputs(model, packed[s.initializer], positions(s, ch))
            continue
        arr = np.array(model.get_array(s.initializer))
        idx = [slice(None)] * arr.ndim
        idx[s.axis] = positions(s, ch)
        arr[tuple(idx)] = 0
        model.set_array(s.initializer, arr)


# ---------------------------------------------------------------------- the in-pass twin check
#: Models with more weight bytes than this are not checked against their masked twin in a pass.
TWIN_CHECK_MAX_BYTES = 50 * 2**20


def masked_twin(model: Model, removals: Iterable[tuple[PruneGroup, np.ndarray]]) -> Model | None:
    """A copy of ``model`` (before :func:`apply_removal`) with every removal masked, or None.

    None when the twin cannot be an oracle: the model holds more than :data:`TWIN_CHECK_MAX_BYTES`
    of weights, a group is approximate, or an ``"in"`` slice lies in a non-float (quantised)
    initializer -- zeroing a quantised value does not zero what it dequantises to.
    """
    removals = list(removals)
    if model.weight_bytes() > TWIN_CHECK_MAX_BYTES or any(g.approximate for g, _ in removals):
        return None
    packed = nbits_weights(model)
    for g, ch in removals:
        for s in g.slices:
            t = model.initializer(s.initializer) if s.role == "in" else None
            if t is not None and s.initializer in packed:
                w = packed[s.initializer]
                if k_removal_problem(w, positions(s, ch)) and element_mask_problem(model, w):
                    return None  # neither whole blocks (zero scale) nor integer zero points (q = zp)
            elif t is not None and t.data_type not in FLOAT_TYPES:
                return None
    twin = model.copy()
    for g, ch in removals:
        mask_group(twin, g, ch)
    return twin


def twin_disagreement(twin: Model, pruned: Model, rtol: float = 1e-3, atol: float = 1e-4,
                      io: Mapping[str, tuple[int, np.ndarray]] | None = None,
                      feeds: Mapping[str, np.ndarray] | None = None) -> tuple[bool | None, str]:
    """Run the masked twin and the pruned model on one feed and compare.

    The feed is ``feeds``, or synthesized (:func:`onnxprune.analysis.kvcache.llm_feeds` for a
    decoder with a KV cache: a random, non-empty past; :func:`onnxprune.check.synthesize_feeds`
    otherwise). ``io`` (:func:`io_removed`) names the graph inputs/outputs the removal shrank:
    the pruned model gets those inputs without the removed positions, and its outputs are compared
    with the twin's outputs without them. Float outputs must agree within
    ``atol + rtol * max|twin output|`` (ten times looser for fp16/bf16 outputs) and every output
    must keep its (reduced) shape. Returns ``(True, "")`` when they agree, ``(False, why)`` when they
    do not (or the pruned model fails where the twin runs), and ``(None, why)`` when the twin itself
    cannot be run (no verdict).
    """
    from onnxprune.check import make_session, run_model, synthesize_feeds

    io = dict(io or {})
    try:
        session = make_session(twin)
        if feeds is None:
            feeds = llm_feeds(twin)
        if feeds is None:
            feeds, outs = synthesize_feeds(session, twin)
        else:
            feeds = dict(feeds)
            outs = session.run(None, feeds)
    except Exception as exc:  # no verdict: the manager's final verification still runs
        return None, f"the masked twin does not run ({' '.join(str(exc).split())[:200]})"
    names = [o.name for o in session.get_outputs()]

    def kept(name: str, arr: np.ndarray) -> np.ndarray:
        if name not in io:
            return arr
        axis, gone = io[name]
        return np.take(arr, np.setdiff1d(np.arange(arr.shape[axis]), gone), axis=axis)

    try:
        got = run_model(pruned, {k: kept(k, np.asarray(v)) for k, v in feeds.items()})
    except Exception as exc:
        return False, f"the pruned model does not run where its masked twin does ({' '.join(str(exc).split())[:200]})"
    for name, a in zip(names, outs):
        a = kept(name, np.asarray(a))
        b = np.asarray(got.get(name))
        if b.shape != a.shape:
            return False, f"output {name!r} has shape {list(b.shape)}, the masked twin {list(a.shape)}"
        if a.dtype.kind != "f" or not a.size:
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        fin = np.isfinite(a64)
        if not np.array_equal(fin, np.isfinite(b64)):
            return False, f"output {name!r} is non-finite where the masked twin is not (or the reverse)"
        if not fin.any():
            continue
        scale = float(np.abs(a64[fin]).max())
        err = float(np.abs(a64[fin] - b64[fin]).max())
        loose = 10.0 if a.dtype.itemsize < 4 else 1.0
        if err > loose * (atol + rtol * scale):
            return False, f"output {name!r} differs from the masked twin by {err:.3g} (outputs up to {scale:.3g})"
    return True, ""


def check_twin(label: str, twin: Model, pruned: Model, groups: list[str], stats: dict[str, Any],
               io: Mapping[str, tuple[int, np.ndarray]] | None = None) -> None:
    """Compare ``pruned`` with its masked ``twin`` on one random feed; raise if they disagree.

    ``io`` (:func:`io_removed`): graph inputs/outputs the removal shrank (KV caches), fed and
    compared without the removed positions. Records ``twin_check`` (``"ok"``, or
    ``"skipped: why"``) and its seconds (``twin_check_s``) in ``stats``.

    Raises:
        PassError: the pruned model disagrees with the masked twin beyond float tolerance (a
            removal edited something it should not have); the message names the groups.
    """
    t0 = time.perf_counter()
    ok, why = twin_disagreement(twin, pruned, io=io)
    stats["twin_check_s"] = round(time.perf_counter() - t0, 3)
    if ok is False:
        shown = ", ".join(groups[:8]) + (f" (+{len(groups) - 8} more)" if len(groups) > 8 else "")
        raise PassError(f"{label}: the pruned model disagrees with its masked twin: {why}; groups pruned: "
                        f"{shown}. Nothing was written; please report this model (skip the check with "
                        f"{label}(verify_twin=false))")
    stats["twin_check"] = "ok" if ok else f"skipped: {why}"
