"""Weight analysis: which initializer feeds which Conv / ConvTranspose / MatMul / Gemm, and where K lies.

For every Conv, ConvTranspose, MatMul and Gemm, each operand that traces back to a constant
initializer (``Model.is_constant``) through a chain of ``Transpose``, ``Cast``, ``Identity``,
``Reshape`` (with a constant target shape) and ``DequantizeLinear`` is a *weight*. The consumer
fixes the reduction axis K and output axis N in the layout the consumer sees:

* Conv ``W [N, C/g, kh, kw]``: K = 1 (N:M groups run along C for each ``(n, kh, kw)``), N = 0;
* ConvTranspose ``W [C_in, C_out/g, kh, kw]``: K = 0, N = 1;
* MatMul ``x @ W`` with ``W [..., K, N]``: K = -2, N = -1 (a 2-D ``[K, N]`` weight: K = 0);
  mirrored ``W @ x`` with ``W [..., M, K]``: K = -1, N = -2; a 1-D operand is its own K;
* Gemm ``B``: ``[K, N]`` (K = 0) or, with ``transB=1``, ``[N, K]`` (K = 1); a constant ``A``:
  ``[M, K]`` (K = 1) or, with ``transA=1``, ``[K, M]`` (K = 0).

These consumer axes are mapped back through the chain to the initializer's own layout: a
``Transpose(perm)`` maps output axis ``i`` to input axis ``perm[i]``; Cast, Identity and
DequantizeLinear keep axes; a ``Reshape`` keeps an axis only when it is carried over whole (same
size and same product of the sizes before it), otherwise the axis is unmappable and the weight is
reported with a ``skip_reason``. A per-axis ``DequantizeLinear`` records its scale/zero-point
initializers and its axis in the initializer's layout (:class:`QuantInfo`).

An initializer read by several weight consumers is one :class:`WeightInfo` with several users; if
their K (or N) axes disagree the weight carries a ``conflict`` message instead of a guess. One
that is also the data of a ``Gather`` (an embedding, e.g. a tied LM head) gets a ``skip_reason``.

:func:`to_kn` / :func:`from_kn` turn a weight into a 2-D ``[K, rest]`` array (K on axis 0, all
other axes flattened, in order, on axis 1) and back; every criterion works in that layout.

Weights held by ``Constant`` nodes (Paddle2ONNX) are not initializers, so :func:`find_weights`
does not see them; :func:`constant_node_weights` names them and :func:`hoist_constant_weights`
turns them into initializers (exactly: same name, type and bytes). The mask passes and
``inspect`` do that first, so such weights are weights everywhere.

Preconditions: the model passed the checker (names are unique). Nothing here reads weight
values except the ``inspect_*`` helpers, Reshape targets and DequantizeLinear scales (to tell
per-tensor from per-axis quantization).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.fmt import Footnotes, shorten
from onnxprune.ir.constants import hoist_constants, is_constant_node
from onnxprune.ir.graph import attr, graph_outer_reads, node_subgraphs
from onnxprune.ir.model import Model
from onnxprune.summary import FLOAT_TYPES, count_nonzero

#: Op types that carry a weight, and the ops a weight may pass through on its way there.
WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


PASS_THROUGH = ("Transpose", "Cast", "Identity", "Reshape", "DequantizeLinear")


#: Cache key of :func:`find_weights` in a ``PassContext``.
ANALYSIS_KEY = "weights"


@dataclass
class QuantInfo:
    """A DequantizeLinear between the (integer) initializer and its consumer.

    Attributes:
        node: Name of the DequantizeLinear node.
        scale: Name of the scale tensor.
        zero_point: Name of the zero-point tensor, or None (zero point 0).
        axis: Quantization axis in the initializer's layout for per-axis quantization; None for
            per-tensor.
    """

    node: str
    scale: str
    zero_point: str | None
    axis: int | None


@dataclass
class WeightInfo:
    """One constant weight of a Conv / ConvTranspose / MatMul / Gemm.

    Attributes:
        name: The initializer.
        nodes: Names of the consuming weight ops.
        op_type: Op type of the (first) consumer.
        shape: Shape of the initializer.
        dtype: numpy dtype name of the initializer (``int8`` behind DequantizeLinear).
        k_axis: Reduction axis K in the initializer's own layout (None if unmappable).
        n_axis: Output axis N in the initializer's layout (None for 1-D weights or unmappable).
        group: The Conv/ConvTranspose ``group`` attribute (1 otherwise).
        via: Op types between the initializer and the consumer, initializer side first.
        conflict: Why the consumers disagree on the axes, or None.
        skip_reason: Why passes leave this weight alone by default, or None.
        quant: The DequantizeLinear in the chain, if any.
        other_uses: ``"op_type:node"`` of consumers of the initializer (or of its chain) that are
            not weight ops.
    """

    name: str
    nodes: list[str]
    op_type: str
    shape: tuple[int, ...]
    dtype: str
    k_axis: int | None
    n_axis: int | None
    group: int = 1
    via: list[str] = field(default_factory=list)
    conflict: str | None = None
    skip_reason: str | None = None
    quant: QuantInfo | None = None
    other_uses: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def k(self) -> int | None:
        """Length of the K axis."""
        return None if self.k_axis is None else int(self.shape[self.k_axis])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A node's name, or ``op_type#index`` when it has none."""
    return node.name or f"{node.op_type}#{index}"


class _Graph:
    """Producer / consumer maps and constant lookup for one model."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.inits = model.initializer_map()
        self.inputs = model.graph_input_names()
        self.producer: dict[str, tuple[int, onnx.NodeProto]] = {}
        self.consumers: dict[str, list[tuple[int, onnx.NodeProto]]] = defaultdict(list)
        for i, node in enumerate(model.graph.node):
            for o in node.output:
                if o:
                    self.producer[o] = (i, node)
            for x in node.input:
                if x:
                    self.consumers[x].append((i, node))

    def is_constant(self, name: str) -> bool:
        return name in self.inits and name not in self.inputs

    def const_value(self, name: str) -> np.ndarray | None:
        """Value of a small constant (initializer or Constant node output), else None."""
        if self.is_constant(name):
            return self.model.get_array(name)
        prod = self.producer.get(name)
        if prod is not None and prod[1].op_type == "Constant":
            for a in prod[1].attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.inits[name].dims)


def _reshape_target(in_shape: tuple[int, ...], target: np.ndarray, allowzero: int) -> tuple[int, ...] | None:
    shape = [int(v) for v in target.reshape(-1)]
    out: list[int] = []
    for i, v in enumerate(shape):
        if v == 0 and not allowzero:
            if i >= len(in_shape):
                return None
            out.append(in_shape[i])
        else:
            out.append(v)
    total = int(np.prod(in_shape, dtype=np.int64))
    if out.count(-1) == 1:
        known = int(np.prod([v for v in out if v != -1], dtype=np.int64))
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    if out.count(-1) or int(np.prod(out, dtype=np.int64)) != total:
        return None
    return tuple(out)


def _reshape_axis_map(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[int | None]:
    """For each output axis, the input axis it carries over whole (same size, same prefix product)."""
    in_pref = np.concatenate([[1], np.cumprod(in_shape, dtype=np.int64)]) if in_shape else np.array([1])
    result: list[int | None] = []
    for k, size in enumerate(out_shape):
        before = int(np.prod(out_shape[:k], dtype=np.int64))
        match = None
        for j, s in enumerate(in_shape):
            if s == size and int(in_pref[j]) == before:
                match = j
                break
        result.append(match)
    return result


@dataclass
class _Trace:
    """Result of walking from a consumer operand back to an initializer."""

    init: str
    via: list[str]
    via_nodes: list[str]
    axis_map: list[int | None]  # consumer-operand axis -> initializer axis
    quant: QuantInfo | None
    problem: str | None


def _trace(g: _Graph, tensor: str) -> _Trace | None:
    """Walk back from ``tensor`` through pass-through ops to a constant initializer.

    Returns None if the tensor is not (a view of) a constant.
    """
    chain: list[tuple[int, onnx.NodeProto]] = []
    cur = tensor
    while not g.is_constant(cur):
        prod = g.producer.get(cur)
        if prod is None or prod[1].op_type not in PASS_THROUGH or not prod[1].input:
            return None
        node = prod[1]
        if node.op_type == "Reshape" and (len(node.input) < 2 or g.const_value(node.input[1]) is None):
            return None
        chain.append(prod)
        cur = node.input[0]
        if len(chain) > 32:
            return None
    chain.reverse()  # initializer side first
    shape = g.shape_of(cur)
    fwd: list[int | None] = list(range(len(shape)))
    problem = None
    quant = None
    for idx, node in chain:
        op = node.op_type
        if op == "Transpose":
            perm = attr(node, "perm", None) or list(reversed(range(len(shape))))
            fwd = [fwd[p] for p in perm]
            shape = tuple(shape[p] for p in perm)
        elif op == "Reshape":
            target = g.const_value(node.input[1])
            out_shape = _reshape_target(shape, np.asarray(target), int(attr(node, "allowzero", 0)))
            if out_shape is None:
                return None
            amap = _reshape_axis_map(shape, out_shape)
            fwd = [fwd[j] if j is not None else None for j in amap]
            shape = out_shape
        elif op == "DequantizeLinear":
            axis = None
            scale = node.input[1]
            scale_val = g.const_value(scale)
            if scale_val is None:
                problem = f"DequantizeLinear {node_label(node, idx)} has a non-constant scale"
            elif scale_val.size > 1:
                a = int(attr(node, "axis", 1))
                a = a + len(shape) if a < 0 else a
                axis = fwd[a] if 0 <= a < len(fwd) else None
                if axis is None:
                    problem = f"DequantizeLinear {node_label(node, idx)}: quantization axis not traceable"
            zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if zp is not None and g.const_value(zp) is None:
                problem = f"DequantizeLinear {node_label(node, idx)} has a non-constant zero point"
            if quant is not None:
                problem = "two DequantizeLinear nodes in one weight chain"
            quant = QuantInfo(node_label(node, idx), scale, zp, axis)
    return _Trace(cur, [n.op_type for _, n in chain], [node_label(n, i) for i, n in chain], fwd, quant, problem)


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _consumer_axes(node: onnx.NodeProto, slot: int, rank: int) -> tuple[int | None, int | None] | None:
    """(K, N) axes of operand ``slot`` in the layout the consumer sees; None if not a weight slot."""
    op = node.op_type
    if op == "Conv":
        return (1, 0) if slot == 1 and rank >= 2 else None
    if op == "ConvTranspose":
        return (0, 1) if slot == 1 and rank >= 2 else None
    if op == "MatMul":
        if rank == 1:
            return (0, None)
        if slot == 1:
            return (rank - 2, rank - 1)
        if slot == 0:
            return (rank - 1, rank - 2)
        return None
    if op == "Gemm":
        if rank != 2:
            return None
        if slot == 1:
            return (1, 0) if int(attr(node, "transB", 0)) else (0, 1)
        if slot == 0:
            return (0, 1) if int(attr(node, "transA", 0)) else (1, 0)
    return None


def _chain_tensors(g: _Graph, init: str) -> set[str]:
    """The initializer and every tensor derived from it through pass-through ops."""
    seen = {init}
    stack = [init]
    while stack:
        t = stack.pop()
        for _, node in g.consumers.get(t, []):
            if node.op_type in PASS_THROUGH and node.input and node.input[0] == t:
                for o in node.output:
                    if o and o not in seen:
                        seen.add(o)
                        stack.append(o)
    return seen


def _weight_slots(node: onnx.NodeProto) -> list[int]:
    """Input slots of a weight op that may hold a weight (none for other ops)."""
    if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
        return []
    slots = (1,) if node.op_type in ("Conv", "ConvTranspose") else (0, 1)
    return [s for s in slots if s < len(node.input) and node.input[s]]


def find_weights(model: Model) -> list[WeightInfo]:
    """Every constant weight of a Conv / ConvTranspose / MatMul / Gemm, in graph order.

    Args:
        model: The model.

    Returns:
        One :class:`WeightInfo` per initializer (shared initializers list all their consumers).
    """
    g = _Graph(model)
    found: dict[str, WeightInfo] = {}
    axes_seen: dict[str, list[tuple[str, int | None, int | None]]] = defaultdict(list)
    for idx, node in enumerate(model.graph.node):
        for slot in _weight_slots(node):
            tr = _trace(g, node.input[slot])
            if tr is None:
                continue
            init_shape = g.shape_of(tr.init)
            rank = len(tr.axis_map)
            axes = _consumer_axes(node, slot, rank)
            if axes is None:
                continue
            k_c, n_c = axes
            k_axis = tr.axis_map[k_c] if k_c is not None else None
            n_axis = tr.axis_map[n_c] if n_c is not None else None
            label = node_label(node, idx)
            axes_seen[tr.init].append((label, k_axis, n_axis))
            info = found.get(tr.init)
            if info is None:
                tensor = g.inits[tr.init]
                info = WeightInfo(
                    name=tr.init, nodes=[label], op_type=node.op_type, shape=init_shape,
                    dtype=np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).name,
                    k_axis=k_axis, n_axis=n_axis,
                    group=int(attr(node, "group", 1)) if node.op_type in ("Conv", "ConvTranspose") else 1,
                    via=tr.via, quant=tr.quant,
                )
                reasons = []
                if tr.problem:
                    reasons.append(tr.problem)
                if k_axis is None:
                    reasons.append(f"its K axis is not traceable through {'/'.join(tr.via) or 'the graph'}")
                if len(init_shape) < 2:
                    reasons.append("1-D weight (bias-like)")
                info.skip_reason = "; ".join(reasons) or None
                found[tr.init] = info
            elif label not in info.nodes:
                info.nodes.append(label)
    weight_nodes = {n for info in found.values() for n in info.nodes}
    for name, info in found.items():
        seen = axes_seen[name]
        distinct = {(k, n) for _, k, n in seen}
        if len(distinct) > 1:
            info.conflict = "consumers disagree on the axes: " + ", ".join(
                f"{lbl} K={k} N={n}" for lbl, k, n in seen)
        chain = _chain_tensors(g, name)
        others = []
        for t in chain:
            for i, node in g.consumers.get(t, []):
                lbl = node_label(node, i)
                if node.op_type in PASS_THROUGH and node.input[0] == t:
                    continue
                if lbl in weight_nodes and node.op_type in WEIGHT_OPS:
                    continue
                others.append(f"{node.op_type}:{lbl}")
        info.other_uses = sorted(set(others))
        if any(o.startswith("Gather:") for o in info.other_uses):
            reason = "embedding (also Gather data)"
            info.skip_reason = f"{info.skip_reason}; {reason}" if info.skip_reason else reason
    return list(found.values())


def constant_node_weights(model: Model) -> list[str]:
    """Outputs of ``Constant`` nodes that would be weights if they were initializers.

    A weight slot (see :func:`find_weights`) traced back through pass-through ops that ends at a
    ``Constant`` node names that node's output; so do the Constant side inputs of that chain (a
    Reshape target, a DequantizeLinear scale or zero point), which the weight passes read too.

    Returns:
        Constant output names, in the order they were found.
    """
    producer = {o: n for n in model.graph.node for o in n.output if o}
    found: dict[str, None] = {}
    for node in model.graph.node:
        for slot in _weight_slots(node):
            cur, side = node.input[slot], []
            for _ in range(33):
                p = producer.get(cur)
                if p is None:
                    break
                if is_constant_node(p):
                    for name in [cur, *side]:
                        found.setdefault(name, None)
                    break
                if p.op_type not in PASS_THROUGH or not p.input:
                    break
                side.extend(x for x in p.input[1:] if x and x in producer and is_constant_node(producer[x]))
                cur = p.input[0]
    return list(found)


def hoist_constant_weights(model: Model) -> list[str]:
    """Turn the ``Constant`` nodes that hold weights into initializers, in place (exact).

    Returns:
        The tensors that became initializers (empty when the model has none).
    """
    names = constant_node_weights(model)
    return hoist_constants(model, names) if names else []


#: Control-flow ops whose bodies the sparsity passes do not prune.
SUBGRAPH_OPS_TEXT = "If/Loop/Scan"


def is_weight_tensor(t: onnx.TensorProto) -> bool:
    """A floating-point tensor of more than one element (what a sparsity pass could change)."""
    return t.data_type in FLOAT_TYPES and int(np.prod(t.dims, dtype=np.int64)) > 1


def subgraph_reads(model: Model) -> dict[str, str]:
    """Main-graph initializers whose value an If/Loop/Scan body reads, with the label of that node.

    A body reading a tensor derived from an initializer through pass-through ops (Transpose, Cast,
    Identity, Reshape, DequantizeLinear) counts as reading the initializer: changing the
    initializer would change what the body computes.

    Returns:
        ``{initializer name: label of a main-graph node whose body reads it}``.
    """
    g = _Graph(model)
    read_by: dict[str, str] = {}
    for idx, node in enumerate(model.graph.node):
        subs = node_subgraphs(node)
        if not subs:
            continue
        label = node_label(node, idx)
        for sub in subs:
            for name in graph_outer_reads(sub):
                read_by.setdefault(name, label)
    if not read_by:
        return {}
    out: dict[str, str] = {}
    for name in g.inits:
        if not g.is_constant(name):
            continue
        for t in sorted(_chain_tensors(g, name)):
            if t in read_by:
                out[name] = read_by[t]
                break
    return out


def subgraph_initializers(model: Model) -> dict[str, str]:
    """Floating-point initializers (more than one element) stored inside If/Loop/Scan bodies.

    Returns:
        ``{initializer name: label of the main-graph node whose body (or nested body) holds it}``.
    """
    out: dict[str, str] = {}
    for idx, node in enumerate(model.graph.node):
        label = node_label(node, idx)
        stack = node_subgraphs(node)
        while stack:
            sub = stack.pop(0)
            for t in sub.initializer:
                if is_weight_tensor(t):
                    out.setdefault(t.name, label)
            for n in sub.node:
                stack.extend(node_subgraphs(n))
    return out


def subgraph_weights(model: Model) -> dict[str, str]:
    """Floating-point initializers (more than one element) an If/Loop/Scan body uses: main-graph ones
    the body reads (:func:`subgraph_reads`) and those stored in a body (:func:`subgraph_initializers`).

    Returns:
        ``{initializer name: label of the main-graph node with the body}``.
    """
    inits = model.initializer_map()
    out = {name: label for name, label in subgraph_reads(model).items() if is_weight_tensor(inits[name])}
    for name, label in subgraph_initializers(model).items():
        out.setdefault(name, label)
    return out


def subgraph_skip_reason(label: str) -> str:
    """The ``skipped`` reason of a weight read inside the body of main-graph node ``label``."""
    return f"read inside an {SUBGRAPH_OPS_TEXT} body (node {label}); subgraphs are not pruned"


def weight_nodes(model: Model) -> dict[str, str]:
    """The node a user knows each initializer by: initializer name -> consuming node's name.

    Exported graphs name weights after nothing (``onnx::MatMul_922``) but name the nodes after
    the module (``/encoder/layer.3/intermediate/dense/MatMul``). A Conv/MatMul/Gemm weight maps
    to its (first) weight op, also through Transpose/Cast/DequantizeLinear chains
    (:func:`find_weights`); any other initializer to the first node that reads it directly.
    Nodes without a name are ``op_type#index``. Initializers nobody reads are absent.
    """
    out = {w.name: w.nodes[0] for w in find_weights(model) if w.nodes}
    inits = model.initializer_map()
    for idx, node in enumerate(model.graph.node):
        for x in node.input:
            if x in inits and x not in out:
                out[x] = node_label(node, idx)
    return out


def weight_label(name: str, node: str | None) -> str:
    """A weight as a user reads it: ``node (initializer)``, or the initializer alone when its name
    already starts with the node's name (``layer0.q.weight`` of node ``layer0.q``) or has no node."""
    if not node or node == name or name.startswith(node):
        return name
    return f"{node} ({name})"


def weight_labels(model: Model, names: Any) -> dict[str, str]:
    """:func:`weight_label` for each of ``names`` (an iterable of initializer names), in order."""
    nodes = weight_nodes(model)
    return {n: weight_label(n, nodes.get(n)) for n in names}


def weight_map(model: Model) -> dict[str, WeightInfo]:
    """:func:`find_weights` as a dict keyed by initializer name."""
    return {w.name: w for w in find_weights(model)}


def get_weights(ctx: Any, model: Model) -> list[WeightInfo]:
    """:func:`find_weights`, cached in a ``PassContext`` under :data:`ANALYSIS_KEY`."""
    return ctx.get_analysis(ANALYSIS_KEY, lambda: find_weights(model))


# ---------------------------------------------------------------------- layout helpers
def to_kn(arr: np.ndarray, info: WeightInfo) -> np.ndarray:
    """A 2-D ``[K, rest]`` view (or copy) of a weight: K on axis 0, the other axes flattened.

    The other axes keep their relative order; for Conv ``[N, C, kh, kw]`` the columns are
    ``(n, kh, kw)`` in C order, so N:M groups along axis 0 are groups along C.

    Raises:
        ValueError: the weight has no traceable K axis or ``arr`` has the wrong rank.
    """
    if info.k_axis is None:
        raise ValueError(f"weight {info.name!r} has no traceable K axis")
    if arr.ndim != len(info.shape):
        raise ValueError(f"weight {info.name!r}: expected rank {len(info.shape)}, got {arr.ndim}")
    moved = np.moveaxis(arr, info.k_axis, 0)
    return moved.reshape(moved.shape[0], -1)


def from_kn(arr2d: np.ndarray, info: WeightInfo, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Inverse of :func:`to_kn`: back to the initializer's layout ``shape`` (default ``info.shape``)."""
    if info.k_axis is None:
        raise ValueError(f"weight {info.name!r} has no traceable K axis")
    shape = tuple(info.shape if shape is None else shape)
    k = info.k_axis
    moved_shape = (shape[k],) + tuple(s for i, s in enumerate(shape) if i != k)
    return np.moveaxis(arr2d.reshape(moved_shape), 0, k)


def inspect_weights(model: Model) -> list[dict[str, Any]]:
    """The prunable-weights table for ``onnxprune inspect``: one dict per weight."""
    rows = []
    for w in find_weights(model):
        arr = model.get_array(w.name)
        nnz = count_nonzero(arr)
        d = w.to_dict()
        d["nnz"] = nnz
        d["sparsity"] = round(1.0 - nnz / w.size, 6) if w.size else 0.0
        d["k"] = w.k
        rows.append(d)
    return rows



def format_weights(data: list[dict[str, Any]]) -> str:
    """Text table of :func:`inspect_weights`: the consuming node first, then the initializer; long
    notes (a skip reason, an axis conflict) are footnoted once below the table."""
    if not data:
        return "prunable weights: none (no Conv/ConvTranspose/MatMul/Gemm with a constant weight)"
    notes_fn = Footnotes()
    head = (f"{'node':<52} {'initializer':<28} {'op':<13} {'shape':<18} {'dtype':<8} {'K ax':>4} {'N ax':>4} "
            f"{'sparsity':>8}  note")
    lines = [f"prunable weights: {len(data)}", head, "-" * len(head)]
    for r in data:
        notes = []
        if r["via"]:
            notes.append("via " + ">".join(r["via"]))
        if r["group"] > 1:
            notes.append(f"group={r['group']}")
        if len(r["nodes"]) > 1:
            notes.append(f"{len(r['nodes'])} consumers")
        if r["conflict"]:
            notes.append("CONFLICT: " + notes_fn.ref(r["conflict"]))
        if r["skip_reason"]:
            notes.append("skip: " + notes_fn.ref(r["skip_reason"]))
        k = "-" if r["k_axis"] is None else str(r["k_axis"])
        n = "-" if r["n_axis"] is None else str(r["n_axis"])
        node = r["nodes"][0] if r["nodes"] else "-"
        lines.append(f"{shorten(node, 52):<52} {shorten(r['name'], 28):<28} {r['op_type']:<13} "
                     f"{str(r['shape']):<18} {r['dtype']:<8} {k:>4} {n:>4} {r['sparsity']:>8.2%}  "
                     f"{'; '.join(notes)}".rstrip())
    return "\n".join(lines + notes_fn.lines())


def match_names(pattern: str | None, info: WeightInfo) -> bool:
    """True if regex ``pattern`` matches (``re.search``) the initializer or a consumer node name."""
    if not pattern:
        return False
    rx = re.compile(pattern)
    return bool(rx.search(info.name) or any(rx.search(n) for n in info.nodes))
