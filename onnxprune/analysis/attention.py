"""Attention heads and FFN neurons as prunable groups, found in exported ONNX graphs.

**What is found.** Multi-head attention in the decomposed forms torch.onnx writes (legacy and
dynamo exporters), fused Q/K/V projections (one MatMul/Gemm, then Split or last-axis Slices),
grouped-query and multi-query attention (K/V heads repeated by ``Unsqueeze -> Expand|Tile ->
Reshape``), rotary embeddings (rotate-half on the head dimension), and the fused operators
``com.microsoft`` ``Attention`` / ``MultiHeadAttention`` / ``GroupQueryAttention`` and ai.onnx
opset-23 ``Attention`` (3-D inputs with ``q_num_heads``/``kv_num_heads``, or 4-D inputs).
Feed-forward blocks (up projection, element-wise activation, optional gate, down projection) are
found by the same engine. Blocked, with the reason: KV-cache inputs/outputs (graph I/O would
change shape), heads tiled non-consecutively, any op without a rule that reads a head-carrying
tensor, shape elements computed in ways that cannot be rewritten, shared weights.

**How (head factors).** Every tensor that carries heads gets an annotation ``(axis, o, n, b)``:
axis ``axis`` of length ``o * n * b`` holds ``n`` heads as its middle factor (``o`` outer, ``b``
inner elements per head). Annotations start at *split reshapes* ``[..., n*D] -> [..., n, D]``
and are carried forward in topological order with per-op rules, using static shapes from ONNX
shape inference on a copy whose dynamic input dims are set to fixed values:

* Transpose / Unsqueeze / Squeeze move the axis; element-wise ops keep it (other operands must
  broadcast over it, or be per-head constants); Softmax / Reduce / Slice / Split / Concat must not
  act on it; a MatMul whose operands both carry heads on a batch axis is an attention *core* and
  joins their streams;
* a Reshape keeps the factor if it lies within one output axis: with ``pre = prod(I[:axis]) * o``
  the new axis ``j`` satisfies ``prod(O[:j]) | pre`` and ``pre * n | prod(O[:j+1])``. This covers
  ``[B,S,H,D] -> [B,S,H*D]`` (the exit, ``b = D``), ``[B,H,S,D] -> [B*H,S,D]`` (``o = B``) and
  the GQA repeat ``[B,Hkv,g,S,D] -> [B,Hkv*g,S,D]`` (``n = Hkv``, ``b = g``);
* the *exit* is a MatMul/Gemm with a constant weight that contracts over an annotated last axis
  with ``o = 1`` (the output projection).

Streams joined by cores form one block. Its prunable unit count is ``W = min n`` over the block
(the KV heads for GQA: each owns ``Hq / Hkv`` query heads); every annotated axis then owns
``len / W`` consecutive positions per unit. The block becomes a
:class:`~onnxprune.analysis.removal.PruneGroup`: Q/K/V projection columns and biases (traced back
from the split reshapes through Add, Split, last-axis-keeping Reshapes, to MatMul/Gemm),
output-projection rows (role ``in``), per-head constants, and a :class:`ShapeEdit` for every
literal shape element that holds a head count or ``H*D`` (Reshape targets, Concat-built shape
pieces, Expand shapes, Split sizes, ``num_heads``-style attributes). Elements that are ``-1``, a
``0`` copy of an annotated axis, or a ``Shape`` of an annotated tensor update themselves.
Anything that cannot be accounted for blocks the group with a reason; nothing is guessed.

**Exactness.** Removing unit ``u`` equals zeroing its output-projection rows: heads never mix
(softmax and the score/context MatMuls are per head), so the other heads' outputs are unchanged.
For FFN groups (``n = N`` intermediate neurons, every op element-wise per neuron) removal equals
zeroing the down projection's input rows.

Preconditions: a topologically sorted graph with static head and channel counts; the model
should go through :func:`prepare_model` first (it names nodes, turns Constant nodes and
``Identity(initializer)`` into initializers and gives each consumer its own copy of small shared
initializers, so shape edits never touch a constant used elsewhere).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.analysis.removal import ParamSlice, PruneGroup, ShapeEdit
from onnxprune.model import Model, _shell

log = logging.getLogger(__name__)

__all__ = ["AttentionAnalysis", "analyze", "find_ffn_groups", "find_groups", "find_head_groups", "prepare_model",
           "static_shapes", "DEFAULT_DIMS"]

#: Values given to dynamic input dimensions for static shape inference (axis 0, other axes).
DEFAULT_DIMS = (2, 7)
#: Initializers up to this many elements are copied per consumer by :func:`prepare_model`.
PRIVATIZE_MAX_ELEMS = 1 << 16
INT64_MAX = np.iinfo(np.int64).max

UNARY = {"Identity", "Cast", "Neg", "Sqrt", "Relu", "Erf", "Tanh", "Sigmoid", "Exp", "Log",
         "Reciprocal", "Abs", "IsNaN", "IsInf", "Not", "Sign", "Softplus", "Gelu", "LeakyRelu",
         "Elu", "Selu", "HardSigmoid", "HardSwish", "Mish", "Sin", "Cos", "Floor", "Ceil", "Round",
         "Dropout", "Celu", "ThresholdedRelu", "Softsign"}
BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater",
             "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "Clip", "PRelu", "BitShift"}
ACTIVATIONS = {"Relu", "Erf", "Tanh", "Sigmoid", "Gelu", "Softplus", "LeakyRelu", "Elu", "Selu",
               "HardSigmoid", "HardSwish", "Mish", "Celu", "FastGelu", "BiasGelu", "QuickGelu"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
          "ReduceSumSquare", "ReduceLogSumExp"}
SHAPE_ONLY = {"Shape", "Size"}
FUSED_MS = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}


# ---------------------------------------------------------------------- preparation
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
            arr = _constant_value(node)
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
        kept = [onnx.NodeProto() for _ in keep]
        for dst, src in zip(kept, keep):
            dst.CopyFrom(src)
        del graph.node[:]
        graph.node.extend(kept)
    changes += _privatize_shape_inputs(model)
    changes += _privatize(model)
    return changes


#: Inputs that hold a shape-like int vector a head/neuron group may have to edit.
SHAPE_SLOTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "Split": (1,), "Slice": (1, 2)}
#: Ops of the small int subgraphs that build such vectors (cloned per consumer).
SHAPE_OPS = {"Concat", "Unsqueeze", "Squeeze", "Cast", "Gather", "Slice", "Mul", "Div", "Add", "Sub", "Where",
             "Equal", "Reshape", "ConstantOfShape", "Identity", "Abs", "Max", "Min"}


def _privatize_shape_inputs(model: Model) -> int:
    """Give every shape-slot reader its own copy of a computed shape vector read by several nodes.

    Exporters build one ``Concat(...)`` shape and feed it to several Reshape/Expand nodes (K and
    V, or every layer). A group edits literal pieces of such a vector, so each reader gets a
    clone of the int subgraph (up to ``Shape`` nodes and initializers, which
    :func:`_privatize` copies afterwards).
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
                        fresh = _fresh(f"{o}__c", taken)
                        new.output[i] = fresh
                        memo[o] = fresh
                new.name = _fresh(f"{src.name}__c", taken)
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
        copies = [onnx.NodeProto() for _ in order]
        for dst, src in zip(copies, order):
            dst.CopyFrom(src)
        del graph.node[:]
        graph.node.extend(copies)
    return changes


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}{k}"
    taken.add(name)
    return name


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return numpy_helper.to_array(a.t)
        if a.name == "value_ints":
            return np.asarray(list(a.ints), dtype=np.int64)
        if a.name == "value_int":
            return np.asarray(a.i, dtype=np.int64)
        if a.name == "value_floats":
            return np.asarray(list(a.floats), dtype=np.float32)
        if a.name == "value_float":
            return np.asarray(a.f, dtype=np.float32)
    return None


def _privatize(model: Model) -> int:
    graph = model.graph
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in graph.initializer}
    graph_inputs = model.graph_input_names()
    uses: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for ni, node in enumerate(graph.node):
        for ii, name in enumerate(node.input):
            if name in sizes and name not in graph_inputs:
                uses[name].append((ni, ii))
    taken = set(sizes) | {o for n in graph.node for o in n.output}
    changes = 0
    for name, refs in uses.items():
        if len(refs) < 2 or sizes[name] > PRIVATIZE_MAX_ELEMS:
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


# ---------------------------------------------------------------------- shapes
def static_shapes(model: Model, dims: dict[str, int] | None = None,
                  run_missing: bool = True) -> dict[str, list[int] | None]:
    """Static shapes of every tensor, with dynamic input dims fixed.

    A dynamic dim named ``d`` takes ``dims[d]`` if given, else :data:`DEFAULT_DIMS` (axis 0 or
    other axes; the first value seen for a name is reused). Dims that inference cannot resolve
    come back as ``None`` entries inside the list; unknown ranks as ``None``. With
    ``run_missing``, tensors that inference leaves open are measured on one ONNX Runtime run
    (external weights are read; meant for models that fit in memory).
    """
    shell = _shell(model.proto)
    dims = dict(dims or {})
    inits = {t.name for t in shell.graph.initializer}
    for vi in shell.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            key = d.dim_param or f"{vi.name}:{axis}"
            if key not in dims:
                dims[key] = DEFAULT_DIMS[0] if axis == 0 else DEFAULT_DIMS[1]
            d.Clear()
            d.dim_value = dims[key]
    del shell.graph.value_info[:]
    for o in shell.graph.output:  # let inference fill the outputs from scratch
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(shell, strict_mode=False, data_prop=True)
    except Exception as exc:  # pragma: no cover - inference failures are model specific
        log.warning("shape inference failed: %s", exc)
        inferred = shell
    out: dict[str, list[int] | None] = {}
    vis = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    for vi in vis:
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape"):
            out.setdefault(vi.name, None)
            continue
        out[vi.name] = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]
    for t in model.graph.initializer:
        out[t.name] = [int(d) for d in t.dims]
    produced = [o for n in model.graph.node for o in n.output if o]
    missing = [o for o in produced if out.get(o) is None or any(d is None for d in out[o] or [])]
    if missing and run_missing:
        out.update(_shapes_from_ort(model, shell, missing))
    return out


def _shapes_from_ort(model: Model, shell: onnx.ModelProto, names: list[str]) -> dict[str, list[int]]:
    """Shapes of ``names`` from one ONNX Runtime run on neutral inputs of the fixed dims.

    Float inputs are standard normal, ``*mask*`` integer inputs ones, other integer inputs
    zeros (valid token / position ids for any vocabulary).
    """
    import onnxruntime as ort

    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    del proto.graph.value_info[:]
    existing = {o.name for o in proto.graph.output}
    for n in names:
        if n not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=n))
    feeds: dict[str, np.ndarray] = {}
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    for vi in shell.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [int(d.dim_value) for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_ or "mask" in vi.name.lower():
            feeds[vi.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if model.external:  # external weights: go through a file next to copies of the refs
            with Model(proto, model.path, model.base_dir, dict(model.external)).as_file() as path:
                sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        else:
            sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = sess.run(names, feeds)
    except Exception as exc:  # the model may not run on neutral inputs; shapes stay unknown
        log.info("shape capture on ONNX Runtime failed: %s", exc)
        return {}
    return {n: [int(d) for d in np.shape(v)] for n, v in zip(names, outs)}


# ---------------------------------------------------------------------- engine state
@dataclass
class Ann:
    """Heads (or neurons) on one tensor axis: ``len(axis) = o * n * b``; ``n`` is the middle factor."""

    axis: int
    o: int
    n: int
    b: int
    comp: int


@dataclass
class _Comp:
    """One candidate block (attention or FFN), merged by union-find."""

    kind: str
    streams: list[tuple[str, int, int, str]] = field(default_factory=list)  # (tensor, offset, length, start)
    ns: set[int] = field(default_factory=set)
    shape_refs: list[tuple[str, int, int, int, str]] = field(default_factory=list)  # node, input, pos, contrib, how
    params: list[tuple[str, int, int, int, str, str]] = field(default_factory=list)  # init, axis, off, len, role, tag
    attr_edits: list[tuple[str, str, int]] = field(default_factory=list)  # node, attr index, value
    exits: list[tuple[str, str, int]] = field(default_factory=list)  # node, exit input tensor, exit length
    split_refs: list[tuple[str, int, int]] = field(default_factory=list)  # split node, output k, contrib
    cores: int = 0
    activations: int = 0
    blocked: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    channel_tensors: dict[str, int] = field(default_factory=dict)  # tensor -> axis that shrinks
    path_nodes: set[str] = field(default_factory=set)


class _Engine:
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
        self.comps: list[_Comp] = []

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
        self.comps.append(_Comp(kind))
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

    def comp(self, c: int) -> _Comp:
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

    def start_ffn(self, node: onnx.NodeProto) -> None:
        """A MatMul/Gemm with a constant 2-D weight starts an FFN stream on its output."""
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            return
        w = self.const(node.input[1]) if len(node.input) > 1 else None
        if w is None or w.ndim != 2 or self.const(node.input[0]) is not None:
            return
        attrs = _attrs(node)
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            return
        axis = 0 if node.op_type == "Gemm" and attrs.get("transB", 0) else 1
        out = self.shape(node.output[0])
        if not out:
            return
        n = w.shape[axis]
        if n < 2 or out[-1] != n:
            return
        c = self.new_comp("ffn")
        comp = self.comps[c]
        comp.members.append(f"up {node.name}: {n} neurons")
        comp.params.append((node.input[1], axis, 0, n, "out", "weight"))
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            cb = self.const(node.input[2])
            if cb is None:
                comp.blocked.append(f"Gemm {node.name}: bias is not a constant")
            elif cb.size > 1:
                comp.params.append((node.input[2], cb.ndim - 1, 0, n, "out", "bias"))
        comp.path_nodes.add(node.name)
        self._check_weight_shared(c, node.input[1], node)
        self.set_ann(node.output[0], Ann(len(out) - 1, 1, n, 1, c), node)

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
            if op in UNARY or op in ACTIVATIONS or op in BROADCAST:
                self.elementwise(node, annotated, c)
            elif op == "Transpose":
                self.transpose(node, annotated[0][1], c)
            elif op == "Reshape":
                self.reshape(node, annotated, c)
            elif op in ("Unsqueeze", "Squeeze"):
                self.squeeze(node, annotated, c)
            elif op in ("Softmax", "LogSoftmax", "Hardmax") or op in REDUCE:
                self.reduce(node, annotated, c)
            elif op == "MatMul":
                self.matmul(node, annotated, c)
            elif op == "Gemm":
                self.gemm(node, annotated, c)
            elif op == "Expand":
                self.expand(node, annotated, c)
            elif op == "Tile":
                self.tile(node, annotated, c)
            elif op == "Slice":
                self.slice(node, annotated, c)
            elif op == "Split":
                self.split(node, annotated, c)
            elif op == "Concat":
                self.concat(node, annotated, c)
            elif op == "Attention":
                self.attention23_4d(node, annotated, c)
            else:
                self.block(c, f"{where} consumes a tensor carrying the {self._what()} (no rule for {op})")
        except _Blocked as exc:
            self.block(c, f"{where}: {exc}")

    def _need(self, name: str) -> list[int]:
        s = self.shape(name)
        if s is None:
            raise _Blocked(f"static shape of {name!r} unknown")
        return s

    def _out(self, node: onnx.NodeProto, ann: Ann, c: int, k: int = 0) -> None:
        self.set_ann(node.output[k], Ann(ann.axis, ann.o, ann.n, ann.b, self.find(c)), node)

    def _ffn_axis_ok(self, ann: Ann, rank: int) -> None:
        if self.mode == "ffn" and (ann.axis != rank - 1 or ann.o != 1 or ann.b != 1):
            raise _Blocked("FFN neurons must stay whole on the last axis")

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
                raise _Blocked("operands carry the heads on different axes or factors")
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
                raise _Blocked(f"operand {name!r} varies along the {self._what()} axis and is not a constant")
            if fine.o != 1:
                raise _Blocked(f"per-channel constant {name!r} with an outer factor")
            users = {n.name for n in self.consumers.get(name, [])}
            if len(users) > 1:
                raise _Blocked(f"per-channel constant {name!r} is shared")
            tag = "bias" if node.op_type in ("Add", "Sub") else "param"
            self.comp(c).params.append((name, al, 0, length, "out" if tag == "bias" else "param", tag))
        self._ffn_axis_ok(fine, rank)
        self._out(node, Ann(ax_out, fine.o, fine.n, fine.b, c), c)

    def transpose(self, node: onnx.NodeProto, ann: Ann, c: int) -> None:
        rank = len(self._need(node.input[0]))
        perm = _attrs(node).get("perm") or list(reversed(range(rank)))
        new = Ann(list(perm).index(ann.axis), ann.o, ann.n, ann.b, c)
        self._ffn_axis_ok(new, rank)
        self._out(node, new, c)

    def reshape(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        if annotated[0][0] != 0:
            raise _Blocked("the shape input is derived from annotated data")
        ann = annotated[0][1]
        i, o = self._need(node.input[0]), self._need(node.output[0])
        pre = int(np.prod(i[: ann.axis], dtype=np.int64)) * ann.o
        j = _factor_axis(o, pre, ann.n)
        if j is None:
            raise _Blocked(f"reshape {i} -> {o} splits the {self._what()} across axes")
        p_j = int(np.prod(o[:j], dtype=np.int64))
        new = Ann(j, pre // p_j, ann.n, p_j * o[j] // (pre * ann.n), c)
        self._ffn_axis_ok(new, len(o))
        self.comp(c).shape_refs.append((node.name, 1, j, o[j], "reshape"))
        self._out(node, new, c)

    def squeeze(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        ann = annotated[0][1]
        i, o = self._need(node.input[0]), self._need(node.output[0])
        axes = _axes_of(self, node, 1)
        if node.op_type == "Unsqueeze":
            if axes is None:
                raise _Blocked("axes not constant")
            axes = sorted(a % len(o) for a in axes)
            keep = [k for k in range(len(o)) if k not in axes]
            new_axis = keep[ann.axis]
        else:
            if axes is None:
                axes = [k for k, d in enumerate(i) if d == 1]
            axes = sorted(a % len(i) for a in axes)
            if ann.axis in axes:
                raise _Blocked("squeezes the annotated axis")
            new_axis = ann.axis - sum(1 for a in axes if a < ann.axis)
        new = Ann(new_axis, ann.o, ann.n, ann.b, c)
        self._ffn_axis_ok(new, len(o))
        self._out(node, new, c)

    def reduce(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        ann = annotated[0][1]
        i = self._need(node.input[0])
        rank = len(i)
        attrs = _attrs(node)
        if node.op_type in ("Softmax", "LogSoftmax", "Hardmax"):
            default = -1 if self.model.opset >= 13 else 1
            axis = int(attrs.get("axis", default)) % rank
            if axis == ann.axis or (self.model.opset < 13 and axis <= ann.axis):
                raise _Blocked("normalises over the annotated axis")
            self._ffn_axis_ok(ann, rank)
            self._out(node, ann, c)
            return
        axes = _axes_of(self, node, 1)
        if axes is None:
            raise _Blocked("reduces over all axes")
        axes = sorted(a % rank for a in axes)
        if ann.axis in axes:
            raise _Blocked("reduces over the annotated axis")
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
            raise _Blocked("FFN neurons reach a MatMul other than the down projection")
        axes = []
        for k, a in annotated:
            r = ra if k == 0 else rb
            if a.axis >= r - 2:
                raise _Blocked("the annotated axis is a matrix axis of a MatMul")
            axes.append(a.axis + rank - r)
        if len(set(axes)) != 1:
            raise _Blocked("MatMul operands carry heads on different axes")
        ax = axes[0]
        if len(annotated) == 1:
            k = 1 - annotated[0][0]
            other = b_shape if k == 1 else a_shape
            al = ax - (rank - len(other))
            if al >= 0 and other[al] != 1:
                raise _Blocked("the other MatMul operand varies along the heads axis")
        else:
            self.comp(c).cores += 1  # an attention core, prunable or not: report it
            (_, a), (_, b) = annotated
            if a.o != b.o or a.n * a.b != b.n * b.b or max(a.n, b.n) % min(a.n, b.n):
                raise _Blocked(f"head factors disagree ({a.n}x{a.b} vs {b.n}x{b.b})")
        fine = max((a for _, a in annotated), key=lambda a: a.n)
        self._out(node, Ann(ax, fine.o, fine.n, fine.b, c), c)

    def gemm(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        attrs = _attrs(node)
        by_k = dict(annotated)
        if 0 in by_k and len(by_k) == 1 and by_k[0].axis == 1 and not attrs.get("transA", 0):
            self.exit(node, by_k[0], node.input[1], 1 if attrs.get("transB", 0) else 0, c)
            return
        raise _Blocked("Gemm operand carries the annotated axis in an unsupported place")

    def exit(self, node: onnx.NodeProto, ann: Ann, weight: str, w_axis: int, c: int) -> None:
        w = self.const(weight)
        if w is None or w.ndim != 2:
            raise _Blocked("contracts over the annotated axis with a non-constant operand")
        if ann.o != 1:
            raise _Blocked("the projection input interleaves heads with an outer factor")
        length = ann.n * ann.b
        if w.shape[w_axis] != length:
            raise _Blocked(f"weight {weight!r} has {w.shape[w_axis]} rows, expected {length}")
        comp = self.comp(c)
        comp.params.append((weight, w_axis, 0, length, "in", "weight"))
        comp.exits.append((node.name, node.input[0], length))
        comp.members.append(f"exit {node.name} ({weight})")
        self._check_weight_shared(c, weight, node)

    def expand(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        if annotated[0][0] != 0:
            raise _Blocked("the expand shape is derived from annotated data")
        ann = annotated[0][1]
        i, o = self._need(node.input[0]), self._need(node.output[0])
        ax = ann.axis + len(o) - len(i)
        if o[ax] != i[ann.axis]:
            raise _Blocked("broadcasts along the annotated axis")
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
            raise _Blocked("repeats are not constant")
        if int(reps.reshape(-1)[ann.axis]) != 1:
            raise _Blocked("tiles the annotated axis (non-consecutive head repeat)")
        self._out(node, ann, c)

    def slice(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        ann = annotated[0][1]
        if annotated[0][0] != 0:
            raise _Blocked("slice bounds are derived from annotated data")
        i = self._need(node.input[0])
        o = self._need(node.output[0])
        if o[ann.axis] != i[ann.axis]:
            raise _Blocked("slices the annotated axis")
        self._ffn_axis_ok(ann, len(i))
        self._out(node, ann, c)

    def split(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        ann = annotated[0][1]
        rank = len(self._need(node.input[0]))
        axis = int(_attrs(node).get("axis", 0)) % rank
        if axis == ann.axis or annotated[0][0] != 0:
            raise _Blocked("splits the annotated axis")
        self._ffn_axis_ok(ann, rank)
        for k, o in enumerate(node.output):
            if o:
                self._out(node, ann, c, k)

    def concat(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        ann = annotated[0][1]
        rank = len(self._need(node.output[0]))
        axis = int(_attrs(node).get("axis", 0)) % rank
        if axis == ann.axis:
            raise _Blocked("concatenates along the annotated axis")
        if len(annotated) != len([x for x in node.input if x]):
            raise _Blocked("concatenates annotated with other data (e.g. a KV cache)")
        if any(a.axis != ann.axis or a.n * a.b != ann.n * ann.b or a.o != ann.o for _, a in annotated):
            raise _Blocked("operands carry the heads differently")
        self._ffn_axis_ok(ann, rank)
        fine = max((a for _, a in annotated), key=lambda a: a.n)
        self._out(node, Ann(ann.axis, fine.o, fine.n, fine.b, c), c)

    # ------------------------------------------------------------------ fused operators
    def attention23_4d(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        by_k = dict(annotated)
        self.comp(c).cores += 1  # an attention block, prunable or not: report it
        if self.mode != "heads" or set(by_k) != {0, 1, 2}:
            raise _Blocked("only Q, K and V may carry heads")
        for k, a in by_k.items():
            if len(self._need(node.input[k])) != 4 or a.axis != 1 or a.o != 1:
                raise _Blocked("4-D Attention inputs must carry the heads on axis 1")
        if len(node.input) > 3 and node.input[3]:
            m = self._need(node.input[3])
            if len(m) == 4 and m[1] != 1:
                raise _Blocked("the attention mask varies per head")
        if any(x for x in node.input[4:6]):
            raise _Blocked("past key/value inputs carry heads")
        if any(o and (self.consumers.get(o) or o in self.outputs) for o in node.output[1:]):
            raise _Blocked("present key/value outputs are used")
        q = by_k[0]
        q_len = q.n * q.b
        fine = q
        for a in (by_k[1], by_k[2]):
            kv_len = a.n * a.b
            if q_len % kv_len:  # the op maps query head i to KV head i // (q_len / kv_len)
                raise _Blocked("query heads are not a multiple of the KV heads")
            if max(q.n, a.n) % min(q.n, a.n):
                raise _Blocked(f"head factors disagree ({q.n} vs {a.n})")
            if a.n > fine.n:
                fine = Ann(1, 1, a.n, a.b * (q_len // kv_len), c)
        self._out(node, fine, c)

    def fused(self, node: onnx.NodeProto) -> None:
        """Fused attention with packed/3-D inputs: streams come in, heads go out on output 0."""
        dom, op = node.domain, node.op_type
        attrs = _attrs(node)
        ms = dom == "com.microsoft"
        if not ms and not (dom in ("", "ai.onnx") and op == "Attention"):
            return
        c = self.new_comp("heads")
        comp = self.comps[c]
        comp.path_nodes.add(node.name)
        comp.members.append(f"fused {dom or 'ai.onnx'}.{op} {node.name}")
        comp.cores += 1
        try:
            self._fused(node, attrs, ms, c)
        except _Blocked as exc:
            comp.blocked.append(f"{op} {node.name!r}: {exc}")

    def _fused(self, node: onnx.NodeProto, attrs: dict[str, Any], ms: bool, c: int) -> None:
        comp = self.comp(c)
        op = node.op_type
        out = self._need(node.output[0])
        if any(o and (self.consumers.get(o) or o in self.outputs) for o in node.output[1:]):
            raise _Blocked("present key/value outputs are used")
        if ms and op == "Attention":
            hq = int(attrs["num_heads"])
            w = self.const(node.input[1])
            if w is None or w.ndim != 2:
                raise _Blocked("packed weights are not a constant 2-D initializer")
            sizes = list(attrs.get("qkv_hidden_sizes") or [w.shape[1] // 3] * 3)
            if sum(sizes) != w.shape[1] or any(s % hq for s in sizes):
                raise _Blocked("qkv_hidden_sizes do not match the packed weight")
            if any(x for x in node.input[4:]) and len(node.input) > 4 and node.input[4]:
                raise _Blocked("past state input carries heads")
            self._check_weight_shared(c, node.input[1], node)
            off = 0
            for s in sizes:
                comp.params.append((node.input[1], 1, off, s, "out", "weight"))
                if len(node.input) > 2 and node.input[2]:
                    if self.const(node.input[2]) is None:
                        raise _Blocked("packed bias is not constant")
                    comp.params.append((node.input[2], 0, off, s, "out", "bias"))
                off += s
            comp.attr_edits.append((node.name, "num_heads", hq))
            if "qkv_hidden_sizes" in attrs:
                for k, s in enumerate(sizes):
                    comp.attr_edits.append((node.name, f"qkv_hidden_sizes[{k}]", s))
            comp.ns.add(hq)
            self.set_ann(node.output[0], Ann(len(out) - 1, 1, hq, out[-1] // hq, c), node)
            return
        if op == "MultiHeadAttention":
            hq = hkv = int(attrs["num_heads"])
            q, k, v = (node.input[i] if len(node.input) > i else "" for i in range(3))
            if not k or not v or len(self._need(q)) != 3 or len(self._need(k)) != 3 or len(self._need(v)) != 3:
                raise _Blocked("only separate 3-D query/key/value inputs are supported")
            bias = node.input[3] if len(node.input) > 3 else ""
            if bias:
                if self.const(bias) is None:
                    raise _Blocked("packed bias is not constant")
                sq, sk = self._need(q)[-1], self._need(k)[-1]
                sv = self._need(v)[-1]
                for off, s in ((0, sq), (sq, sk), (sq + sk, sv)):
                    comp.params.append((bias, 0, off, s, "out", "bias"))
            if len(node.input) > 5 and node.input[5]:
                ab = self._need(node.input[5])
                if len(ab) == 4 and ab[1] != 1:
                    raise _Blocked("attention_bias varies per head")
            if any(x for x in node.input[6:8]):
                raise _Blocked("past key/value inputs carry heads")
            comp.attr_edits.append((node.name, "num_heads", hq))
        elif op == "GroupQueryAttention":
            hq, hkv = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
            q, k, v = (node.input[i] if len(node.input) > i else "" for i in range(3))
            if not k or not v:
                raise _Blocked("packed QKV input is not supported")
            if any(x for x in node.input[3:5]):
                raise _Blocked("past key/value inputs carry heads")
            if attrs.get("do_rotary", 0) and len(node.input) > 7 and node.input[7]:
                pass  # cos/sin caches are per position and head_dim, shared by all heads
            comp.attr_edits.append((node.name, "num_heads", hq))
            comp.attr_edits.append((node.name, "kv_num_heads", hkv))
        else:  # ai.onnx Attention with 3-D inputs
            q, k, v = node.input[0], node.input[1], node.input[2]
            if len(self._need(q)) != 3:
                return  # 4-D form: handled by propagation (attention23_4d)
            hq, hkv = int(attrs.get("q_num_heads", 0)), int(attrs.get("kv_num_heads", 0))
            if not hq or not hkv:
                raise _Blocked("3-D Attention without q_num_heads/kv_num_heads")
            if len(node.input) > 3 and node.input[3]:
                m = self._need(node.input[3])
                if len(m) == 4 and m[1] != 1:
                    raise _Blocked("the attention mask varies per head")
            if any(x for x in node.input[4:6]):
                raise _Blocked("past key/value inputs carry heads")
            comp.attr_edits.append((node.name, "q_num_heads", hq))
            comp.attr_edits.append((node.name, "kv_num_heads", hkv))
        if hq % hkv:
            raise _Blocked("query heads are not a multiple of the KV heads")
        for name, heads in ((q, hq), (k, hkv), (v, hkv)):
            length = self._need(name)[-1]
            if length % heads:
                raise _Blocked(f"input {name!r} width {length} is not a multiple of {heads} heads")
            comp.streams.append((name, 0, length, node.name))
        comp.ns |= {hq, hkv}
        self.set_ann(node.output[0], Ann(len(out) - 1, 1, hq, out[-1] // hq, c), node)

    # ------------------------------------------------------------------ assembly
    def groups(self) -> list[PruneGroup]:
        roots = sorted({self.find(c) for c in range(len(self.parent))})
        out = []
        for r in roots:
            comp = self.comps[r]
            if self.mode == "heads" and comp.cores == 0:
                continue
            if self.mode == "ffn" and comp.activations == 0:
                continue
            out.append(self.assemble(comp))
        return out

    def assemble(self, comp: _Comp) -> PruneGroup:
        blocked = list(comp.blocked)
        width = min(comp.ns) if comp.ns else 0
        name = _group_name(comp, self.mode)
        group = PruneGroup(name=name, width=width, members=list(comp.members))
        if width < 1 or any(n % width for n in comp.ns):
            blocked.append(f"head counts {sorted(comp.ns)} have no common unit")
            width = max(width, 1)
        if not comp.exits:
            blocked.append("no output projection (MatMul/Gemm with a constant weight) found")
        slices: list[ParamSlice] = []
        edits: dict[tuple[str, str, int | str], int] = defaultdict(int)
        split_cov: dict[str, dict[int, int]] = defaultdict(dict)
        self._slice_cov: dict[str, list[tuple[str, int, int, int]]] = defaultdict(list)
        back_refs: dict[tuple[str, int, int], int] = defaultdict(int)
        path = set(comp.path_nodes)
        for tensor, offset, length, start in comp.streams:
            try:
                self.walk_back(comp, tensor, offset, length, width, slices, split_cov, back_refs, path, start)
            except _Blocked as exc:
                blocked.append(f"projection of {start!r}: {exc}")
        for init, axis, off, length, role, tag in comp.params:
            if length % width:
                blocked.append(f"{init!r}: {length} channels are not a multiple of {width} units")
                continue
            slices.append(ParamSlice(init, axis, role, off, length // width, None, tag))  # type: ignore[arg-type]
        for node_name, idx, pos, contrib, how in comp.shape_refs:
            try:
                self.shape_edit(comp, node_name, idx, pos, contrib, width, how, edits)
            except _Blocked as exc:
                blocked.append(f"{how} {node_name!r}: {exc}")
        for (node_name, idx, pos), contrib in back_refs.items():
            node = self.nodes[node_name]
            total = self._need(node.output[0])[pos]
            if contrib != total:
                blocked.append(f"reshape {node_name!r} carries {total} channels but the block owns {contrib}")
                continue
            try:
                self.shape_edit(comp, node_name, idx, pos, contrib, width, "reshape", edits)
            except _Blocked as exc:
                blocked.append(f"reshape {node_name!r}: {exc}")
        for source, pieces in self._slice_cov.items():
            self._slice_edits(source, pieces, width, edits, blocked)
        for split_name, cov in split_cov.items():
            node = self.nodes[split_name]
            outs = [o for o in node.output]
            if set(cov) != set(range(len(outs))):
                blocked.append(f"Split {split_name!r} has outputs outside the block")
                continue
            sizes_input = node.input[1] if len(node.input) > 1 and node.input[1] else ""
            attrs = _attrs(node)
            for k, contrib in cov.items():
                if contrib % width:
                    blocked.append(f"Split {split_name!r} output {k}: {contrib} not a multiple of {width}")
                elif sizes_input:
                    if self.const(sizes_input) is None:
                        blocked.append(f"Split {split_name!r}: sizes are not constant")
                    else:
                        edits[("initializer", sizes_input, k)] += contrib // width
                elif "split" in attrs:
                    edits[("attribute", split_name, f"split[{k}]")] += contrib // width
            if not sizes_input and "split" not in attrs and len(set(cov.values())) != 1:
                blocked.append(f"Split {split_name!r} splits equally but its outputs shrink unequally")
        for node_name, attr, value in comp.attr_edits:
            if value % width:
                blocked.append(f"{node_name!r} {attr}={value} is not a multiple of {width}")
            else:
                edits[("attribute", node_name, attr)] += value // width
        self._check_consumers(comp, path, blocked)
        group.slices = _dedupe(slices)
        group.shape_edits = [ShapeEdit(k, t, i, pc) for (k, t, i), pc in edits.items() if pc]  # type: ignore[arg-type]
        group.width = width
        group.blocked = "; ".join(dict.fromkeys(blocked)) if blocked else None
        return group

    def walk_back(self, comp: _Comp, tensor: str, offset: int, length: int, width: int,
                  slices: list[ParamSlice], split_cov: dict[str, dict[int, int]],
                  back_refs: dict[tuple[str, int, int], int], path: set[str], start: str) -> None:
        if length % width:
            raise _Blocked(f"{length} channels are not a multiple of {width} units")
        block = length // width
        cur = tensor
        for _ in range(64):
            node = self.producer.get(cur)
            if node is None:
                raise _Blocked(f"{cur!r} is not produced by a projection")
            path.add(node.name)
            comp.channel_tensors.setdefault(cur, len(self._need(cur)) - 1)
            op = node.op_type
            if op in ("Identity", "Cast"):
                cur = node.input[0]
            elif op == "Add":
                consts = [x for x in node.input if self.const(x) is not None]
                others = [x for x in node.input if self.const(x) is None]
                if len(consts) != 1 or len(others) != 1:
                    raise _Blocked(f"Add {node.name!r} is not projection + constant bias")
                bias = self.const(consts[0])
                assert bias is not None
                if bias.size > 1:
                    if bias.shape[-1] != self._need(cur)[-1] or bias.size != bias.shape[-1]:
                        raise _Blocked(f"bias {consts[0]!r} is not per channel")
                    if len(self.consumers.get(consts[0], [])) > 1:
                        raise _Blocked(f"bias {consts[0]!r} is shared")
                    slices.append(ParamSlice(consts[0], bias.ndim - 1, "out", offset, block, None, "bias"))
                cur = others[0]
            elif op == "MatMul":
                w = self.const(node.input[1])
                if w is None or w.ndim != 2 or self.const(node.input[0]) is not None:
                    raise _Blocked(f"MatMul {node.name!r} has no constant 2-D weight")
                self._raise_if_shared(node.input[1], node)
                slices.append(ParamSlice(node.input[1], 1, "out", offset, block, None, "weight"))
                return
            elif op == "Gemm":
                attrs = _attrs(node)
                w = self.const(node.input[1])
                if w is None or attrs.get("transA", 0):
                    raise _Blocked(f"Gemm {node.name!r} has no constant weight")
                self._raise_if_shared(node.input[1], node)
                slices.append(ParamSlice(node.input[1], 0 if attrs.get("transB", 0) else 1, "out", offset, block,
                                         None, "weight"))
                if len(node.input) > 2 and node.input[2]:
                    cb = self.const(node.input[2])
                    if cb is None:
                        raise _Blocked(f"Gemm {node.name!r} bias is not constant")
                    if cb.size > 1:
                        slices.append(ParamSlice(node.input[2], cb.ndim - 1, "out", offset, block, None, "bias"))
                return
            elif op == "Split":
                rank = len(self._need(node.input[0]))
                if int(_attrs(node).get("axis", 0)) % rank != rank - 1:
                    raise _Blocked(f"Split {node.name!r} is not along the channel axis")
                k = list(node.output).index(cur)
                sizes = [self._need(o)[-1] for o in node.output]
                offset += sum(sizes[:k])
                split_cov[node.name][k] = split_cov[node.name].get(k, 0) + length
                cur = node.input[0]
            elif op == "Slice":
                start_, end_ = self._last_axis_slice(node)
                self._slice_cov[node.input[0]].append((node.name, start_, end_, length))
                offset += start_
                cur = node.input[0]
            elif op == "Reshape":
                i, o = self._need(node.input[0]), self._need(node.output[0])
                if i[-1] != o[-1]:
                    raise _Blocked(f"Reshape {node.name!r} changes the channel axis")
                back_refs[(node.name, 1, len(o) - 1)] += length
                cur = node.input[0]
            else:
                raise _Blocked(f"cannot trace through {op} {node.name!r}")
        raise _Blocked("projection chain too long")

    def _last_axis_slice(self, node: onnx.NodeProto) -> tuple[int, int]:
        """``(start, end)`` of a step-1 Slice along the last axis with constant bounds."""
        dims = self._need(node.input[0])
        rank = len(dims)
        consts = [self.const(x) if len(node.input) > k and node.input[k] else None for k, x in
                  ((k, node.input[k] if len(node.input) > k else "") for k in range(5))]
        starts, ends = consts[1], consts[2]
        axes = consts[3] if consts[3] is not None else (np.arange(len(starts)) if starts is not None else None)
        if starts is None or ends is None or axes is None:
            raise _Blocked(f"Slice {node.name!r} bounds are not constant")
        axes = [int(a) % rank for a in axes.reshape(-1)]
        if axes != [rank - 1] or (consts[4] is not None and int(consts[4].reshape(-1)[0]) != 1):
            raise _Blocked(f"Slice {node.name!r} is not a step-1 slice of the channel axis only")
        total = dims[-1]
        start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
        start = min(max(start + total if start < 0 else start, 0), total)
        end = min(max(end + total if end < 0 else end, 0), total)
        return start, end

    def _slice_edits(self, source: str, pieces: list[tuple[str, int, int, int]], width: int,
                     edits: dict[tuple[str, str, int | str], int], blocked: list[str]) -> None:
        """Slices of one fused projection: every channel must belong to a piece; bounds shift."""
        total = self._need(source)[-1]
        spans = sorted({(a, b, c) for _, a, b, c in pieces})
        covered = 0
        for a, b, c in spans:
            if a != covered or b - a != c:
                blocked.append(f"slices of {source!r} do not tile it into head-aligned pieces")
                return
            covered = b
        other = [n for n in self.consumers.get(source, []) if n.op_type != "Slice" and n.op_type not in SHAPE_ONLY]
        if covered != total or other:
            blocked.append(f"fused projection {source!r} has channels outside the attention block")
            return
        for name, a, b, _ in dict.fromkeys(pieces):
            node = self.nodes[name]
            before_start = sum(c // width for s0, e0, c in spans if e0 <= a)
            before_end = sum(c // width for s0, e0, c in spans if e0 <= b)
            for slot, shift, value in ((1, before_start, a), (2, before_end, b)):
                raw = int(self.const(node.input[slot]).reshape(-1)[0])
                if raw < 0:
                    blocked.append(f"Slice {name!r}: bound {raw} counts from the end of a shrinking axis")
                    continue
                if shift == 0 or raw >= (1 << 31):
                    continue  # 0 stays 0; "to the end" (INT_MAX) needs no edit
                edits[("initializer", node.input[slot], 0)] += shift

    def _raise_if_shared(self, init: str, node: onnx.NodeProto) -> None:
        users = {n.name for n in self.consumers.get(init, [])}
        if len(users) > 1:
            raise _Blocked(f"weight {init!r} of {node.name} is shared with {sorted(users - {node.name})[:3]}")

    def shape_edit(self, comp: _Comp, node_name: str, idx: int, pos: int, contrib: int, width: int, how: str,
                   edits: dict[tuple[str, str, int | str], int]) -> None:
        node = self.nodes[node_name]
        src = _element_source(self, node.input[idx], pos)
        if src is None:
            raise _Blocked(f"cannot resolve element {pos} of its shape input")
        kind = src[0]
        if kind == "const":
            _, init, flat, value = src
            if how == "reshape" and value == -1:
                return
            if how == "expand" and value == 1:
                return
            if how == "reshape" and value == 0 and not _attrs(node).get("allowzero", 0):
                src_axis = comp.channel_tensors.get(node.input[0])
                if src_axis == pos:
                    return
                raise _Blocked(f"shape element {pos} copies an input dim that does not carry the heads")
            if value != contrib:
                raise _Blocked(f"shape element {pos} is {value}, expected {contrib}")
            if contrib % width:
                raise _Blocked(f"{contrib} is not a multiple of {width} units")
            edits[("initializer", init, flat)] += contrib // width
            return
        _, tensor, axis = src
        if comp.channel_tensors.get(tensor) == axis:
            return
        raise _Blocked(f"shape element {pos} is read from {tensor!r} axis {axis}, which does not shrink with the block")

    def _check_consumers(self, comp: _Comp, path: set[str], blocked: list[str]) -> None:
        for tensor in comp.channel_tensors:
            if tensor in self.outputs and tensor not in self.ann:
                blocked.append(f"graph output {tensor!r} carries the {self._what()}")
            for user in self.consumers.get(tensor, []):
                if user.name not in path and user.op_type not in SHAPE_ONLY:
                    blocked.append(f"{tensor!r} is also read by {user.op_type} {user.name!r}")


class _Blocked(Exception):
    """A rule cannot account for a node; the message is the reason."""


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _axes_of(eng: _Engine, node: onnx.NodeProto, input_index: int) -> list[int] | None:
    attrs = _attrs(node)
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(node.input) > input_index and node.input[input_index]:
        v = eng.const(node.input[input_index])
        return None if v is None else [int(a) for a in v.reshape(-1)]
    return None


def _factor_axis(o: list[int], pre: int, n: int) -> int | None:
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


def _element_source(eng: _Engine, tensor: str, pos: int, depth: int = 0) -> tuple | None:
    """Where element ``pos`` of a 1-D int tensor comes from.

    Returns ``("const", initializer, flat_index, value)``, ``("shape", tensor, axis)`` or None.
    """
    if depth > 16:
        return None
    value = eng.const(tensor)
    if value is not None:
        flat = value.reshape(-1)
        if pos >= flat.size:
            return None
        return ("const", tensor, pos, int(flat[pos]))
    node = eng.producer.get(tensor)
    if node is None:
        return None
    op = node.op_type
    if op == "Concat":
        start = 0
        for x in node.input:
            s = eng.shape(x)
            n = int(np.prod(s)) if s is not None else None
            if n is None:
                return None
            if pos < start + n:
                return _element_source(eng, x, pos - start, depth + 1)
            start += n
        return None
    if op in ("Unsqueeze", "Cast", "Identity", "Squeeze", "Reshape"):
        return _element_source(eng, node.input[0], pos, depth + 1)
    if op == "Slice" and len(node.input) >= 3:
        starts = eng.const(node.input[1])
        steps = eng.const(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        length = eng.shape(node.input[0])
        if starts is None or length is None or len(length) != 1 or (steps is not None and int(steps[0]) != 1):
            return None
        first = int(starts.reshape(-1)[0])
        first = min(max(first + length[0] if first < 0 else first, 0), length[0])
        return _element_source(eng, node.input[0], first + pos, depth + 1)
    if op == "Where" and len(node.input) == 3:
        # torch's expand(-1 -> keep) idiom: Where(x == -1, ones, x); the data element is x's
        return _element_source(eng, node.input[2], pos, depth + 1)
    if op in ("Mul", "Div") and len(node.input) == 2:
        # shape-of-annotated * constant shrinks in proportion (e.g. Hkv * n_rep); constants don't
        consts = [eng.const(x) for x in node.input]
        k = 0 if consts[0] is None else 1
        if consts[1 - k] is None or consts[1 - k].size != 1 or (op == "Div" and k == 1):
            return None
        inner = _element_source(eng, node.input[k], pos if eng.shape(node.input[k]) != [] else 0, depth + 1)
        return inner if inner is not None and inner[0] == "shape" else None
    if op == "Shape":
        attrs = _attrs(node)
        rank = len(eng._need(node.input[0])) if eng.shape(node.input[0]) else None
        start = int(attrs.get("start", 0))
        if start < 0 and rank is not None:
            start += rank
        return ("shape", node.input[0], start + pos)
    if op == "Gather":
        idx = eng.const(node.input[1])
        data = eng.producer.get(node.input[0])
        if idx is None or data is None or data.op_type != "Shape":
            return None
        flat = idx.reshape(-1)
        if pos >= flat.size:
            return None
        rank = max(1, int(np.prod(eng.shape(node.input[0]) or [1])))  # length of the Shape vector
        return _element_source(eng, node.input[0], int(flat[pos]) % rank, depth + 1)
    return None


def _dedupe(slices: list[ParamSlice]) -> list[ParamSlice]:
    return list(dict.fromkeys(slices))


def _group_name(comp: _Comp, mode: str) -> str:
    if comp.exits:
        return f"{mode}:{comp.exits[0][0]}"
    if comp.streams:
        return f"{mode}:{comp.streams[0][3]}"
    return f"{mode}:{comp.members[0] if comp.members else '?'}"


# ---------------------------------------------------------------------- public API
@dataclass
class AttentionAnalysis:
    """Groups found in a model.

    Attributes:
        heads: One group per attention block (prunable or blocked with a reason).
        ffn: One group per feed-forward block.
        exits: Group name -> (exit node name, its input tensor) for calibration and compensation.
    """

    heads: list[PruneGroup]
    ffn: list[PruneGroup]
    exits: dict[str, list[tuple[str, str]]]


def find_groups(model: Model, mode: str, shapes: dict[str, list[int] | None] | None = None
                ) -> tuple[list[PruneGroup], dict[str, list[tuple[str, str]]]]:
    """Groups of one kind (``"heads"`` or ``"ffn"``) and, per group name, its exits.

    An exit is ``(node name, input tensor)`` of the projection that reads the group's channels
    (the output projection for heads, the down projection for FFNs): the tensor whose mean
    activations drive the ``activation`` criterion and bias compensation.
    """
    if mode not in ("heads", "ffn"):
        raise ValueError(f"mode must be heads or ffn, not {mode!r}")
    return _run(model, mode, shapes if shapes is not None else static_shapes(model))


def _run(model: Model, mode: str, shapes: dict[str, list[int] | None]) -> tuple[list[PruneGroup], dict]:
    eng = _Engine(model, mode, shapes)
    eng.run()
    groups = eng.groups()
    exits: dict[str, list[tuple[str, str]]] = {}
    roots = {eng.find(c) for c in range(len(eng.parent))}
    by_name = {}
    for r in roots:
        comp = eng.comps[r]
        by_name[_group_name(comp, mode)] = [(n, t) for n, t, _ in comp.exits]
    for g in groups:
        exits[g.name] = by_name.get(g.name, [])
    return groups, exits


def find_head_groups(model: Model, shapes: dict[str, list[int] | None] | None = None) -> list[PruneGroup]:
    """Attention-head groups of ``model`` (call :func:`prepare_model` first)."""
    return _run(model, "heads", shapes if shapes is not None else static_shapes(model))[0]


def find_ffn_groups(model: Model, shapes: dict[str, list[int] | None] | None = None) -> list[PruneGroup]:
    """FFN-neuron groups of ``model`` (call :func:`prepare_model` first)."""
    return _run(model, "ffn", shapes if shapes is not None else static_shapes(model))[0]


def analyze(model: Model, dims: dict[str, int] | None = None) -> AttentionAnalysis:
    """Heads and FFN groups of ``model`` with their exits (call :func:`prepare_model` first)."""
    shapes = static_shapes(model, dims)
    heads, ex1 = _run(model, "heads", shapes)
    ffn, ex2 = _run(model, "ffn", shapes)
    return AttentionAnalysis(heads, ffn, {**ex1, **ex2})
