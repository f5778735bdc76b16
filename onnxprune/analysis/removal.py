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

The *masked twin* of a removal zeroes only the ``"in"`` slices: every reader that reduces over
the channel sees zeros there, so (for exact groups) the pruned graph and the masked twin compute
the same outputs. Precondition for exactness: everything between the producer and the readers is
per-channel (the dependency analysis guarantees this unless a group is ``approximate``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from onnxprune.errors import PassError
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
