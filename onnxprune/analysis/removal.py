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

The *masked twin* of a removal zeroes only the ``"in"`` slices: every reader that reduces over
the channel sees zeros there, so (for exact groups) the pruned graph and the masked twin compute
the same outputs. Precondition for exactness: everything between the producer and the readers is
per-channel (the dependency analysis guarantees this unless a group is ``approximate``).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from onnxprune.errors import PassError
from onnxprune.ir.graph import node_outer_reads
from onnxprune.ir.model import Model

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
    for name, cuts in by_init.items():
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
    del model.graph.value_info[:]
    return {"initializers_changed": len(by_init), "shape_edits": len(edits),
            "params_removed": int(params_removed), "channels_removed": n_channels}


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


def plan_problems(model: Model, removals: Iterable[tuple[PruneGroup, np.ndarray]]) -> dict[str, str]:
    """Groups of a removal plan that cannot be applied, with the reason (empty: all can).

    Each group is checked alone (channel indices, slice positions, its shape edits), then the
    groups that pass are accumulated in order and a group whose edits, added to those of the
    groups before it, would drive a shared shape constant to zero or below is refused too. The
    model is not changed; :func:`apply_removal` of the remaining groups then succeeds.
    """
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node if n.name}
    total: dict[tuple[str, str, int | str], int] = defaultdict(int)
    bad: dict[str, str] = {}
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
        reason = _slice_problems(model, group, ch, shapes) or _edit_problems(model, mine, nodes)
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


def reshare(model: Model, original: Iterable[str]) -> int:
    """Merge byte-identical initializers that an analysis copied back into one tensor.

    Args:
        model: The model after a removal.
        original: Initializer names of the model before the analysis copied anything; two of
            these are never merged with each other (the model kept them apart itself).

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
    if not target:
        return 0
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in target:
                n.input[i] = target[x]
    for i in reversed([i for i, t in enumerate(g.initializer) if t.name in target]):
        del g.initializer[i]
    for n in target:
        model.external.pop(n, None)
    return len(target)


def mask_group(model: Model, group: PruneGroup, channels: np.ndarray) -> None:
    """Build the masked twin in place: zero the ``"in"`` slices of ``channels``.

    Every reader that reduces over the group's channels then sees zeros at those channels, which
    is what removal amounts to for exact groups.
    """
    ch = np.unique(np.asarray(channels, dtype=np.int64).reshape(-1))
    if ch.size == 0:
        return
    for s in group.slices:
        if s.role != "in":
            continue
        arr = np.array(model.get_array(s.initializer))
        idx = [slice(None)] * arr.ndim
        idx[s.axis] = positions(s, ch)
        arr[tuple(idx)] = 0
        model.set_array(s.initializer, arr)
