"""Pass ``fp16``: convert float32 computation and weights to float16, keeping sensitive ops in float32.

TensorRT 11 builds networks strongly typed: an FP32 ONNX file builds an FP32 engine and gets no
sparse (or any FP16) tensor-core tactics, so the precision must be in the ONNX itself.

**What runs in float16.** Every node runs in float16 unless it is *kept* in float32:

* its op type is in ``op_block_list`` (default :data:`DEFAULT_OP_BLOCK_LIST`: normalisations,
  Softmax/LogSoftmax, reductions whose sums outgrow float16, large-range ``Pow``/``Exp``/``Log``,
  and ops with poor float16 support such as ``Resize``, ``TopK``, ``Range``, ``CumSum``);
* its name matches the regex ``node_block_list``;
* it is outside the default ONNX domain, carries a subgraph (If/Loop/Scan), has no schema, or
  reads a tensor whose type shape inference cannot tell (e.g. a custom op's output);
* it reads a constant that has to stay float32 (below);
* its float result is (transitively) cast to an integer type: a float computation ending in
  ``Cast(to=INT64)`` computes a count (a TTS duration, an output length, an index), and float16
  rounding would change that integer and with it an output's *shape*.

For a float16 node, each input whose type parameter (from the op schema, e.g. ``T``) admits
``tensor(float16)`` and whose tensor is float32 is fed in float16; outputs bound to such a
parameter become float16. Inputs with a fixed float type (``Resize`` scales) keep it. ``Cast(to=
FLOAT)`` becomes ``Cast(to=FLOAT16)``; ``Constant``/``ConstantOfShape`` values are converted.
Wherever a tensor's producer and consumer disagree, one ``Cast`` per (tensor, type) is inserted
just before its first consumer. Subgraph nodes (kept float32) read outer-scope tensors through
float32 Casts, renamed inside the subgraph.

**Constants.** A float32 initializer (or ``Constant`` value) is converted only if a float16 node
reads it; one read only by float32 nodes stays float32. Range check: values with |x| > 65504
(float16 max; infinities excepted) are clamped to ±65504 when ``clamp=true``; otherwise the
constant stays float32 and its readers run in float32 (reported). Underflow: a non-zero value
with |x| < 2⁻²⁵ becomes 0 in float16 (*flush to zero*); small constants (≤ 16 elements, e.g. a
LayerNorm epsilon) that would lose a non-zero value stay float32; in larger tensors the flushed
values are counted and reported (a warning) — they change a sparsity mask. Zeros stay zeros
(float16(0) = 0): every zero of a converted weight is checked to survive, so N:M masks stay intact.

**Graph boundary.** With ``keep_io_types=true`` float32 graph inputs and outputs keep their type:
inputs are cast to float16 before their first float16 consumer, and a float16 output ``y`` is
produced as ``y_fp16`` and cast back to float32 under its own name. With ``false`` float32 inputs
and the outputs of float16 nodes become float16 (an output of a node kept in float32 stays float32).

Preconditions: the graph is topologically sorted (every model that passed the checker). Stats:
``nodes_fp16``, ``nodes_fp32`` with ``kept_ops`` (op -> count) and ``kept_reasons``, ``casts_added``,
``initializers_converted``/``_kept``, ``kept_constants`` (name -> reason), ``values_clamped``,
``flushed_to_zero``, ``subnormal_values``, ``zeros_preserved``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxprune.analysis.weights import weight_labels
from onnxprune.errors import PipelineError
from onnxprune.ir.graph import make_shell, node_outer_reads, node_subgraphs
from onnxprune.ir.model import Model
from onnxprune.pipeline.base import Pass, PassContext, PassResult
from onnxprune.pipeline.registry import register_pass

log = logging.getLogger(__name__)

F32 = TensorProto.FLOAT
F16 = TensorProto.FLOAT16
FP16_MAX = 65504.0
#: Below half the smallest float16 subnormal (2**-24) a value rounds to zero.
FP16_FLUSH = 2.0 ** -25
#: Constants this small that would lose a non-zero value stay float32 (epsilons and the like).
SMALL_CONSTANT = 16

DEFAULT_OP_BLOCK_LIST: tuple[str, ...] = (
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "LpNormalization",
    "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd",
    "Pow", "Exp", "Log",
    "CumSum", "Range", "Resize", "Upsample", "TopK", "NonMaxSuppression", "RoiAlign",
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
)


def _expand_block_list(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        item = item.strip()
        if not item or item.lower() == "none":
            continue
        if item.lower() == "default":
            out.extend(DEFAULT_OP_BLOCK_LIST)
        else:
            out.append(item)
    return list(dict.fromkeys(out))


@dataclass
class Fp16Options:
    """Options of ``fp16``."""

    keep_io_types: bool = field(default=True, metadata={
        "help": "keep float32 graph inputs/outputs (Casts at the boundary)"})
    op_block_list: list[str] = field(default_factory=lambda: ["default"], metadata={
        "help": "op types kept in float32, ';'-separated; 'default' expands to the built-in list, "
                "'none' keeps nothing (e.g. 'default;Erf')"})
    node_block_list: str = field(default="", metadata={
        "help": "regex (re.search) on node names kept in float32"})
    clamp: bool = field(default=False, metadata={
        "help": "clamp constants beyond ±65504 to ±65504 instead of keeping them float32"})

    def validate(self) -> None:
        """Check the regex."""
        if self.node_block_list:
            try:
                re.compile(self.node_block_list)
            except re.error as exc:
                raise ValueError(f"option node_block_list: invalid regex {self.node_block_list!r}: {exc}") from None


# ---------------------------------------------------------------------- schema helpers
def _schema(node: onnx.NodeProto, opset: int) -> Any | None:
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except Exception:  # noqa: BLE001 - SchemaError for unknown ops
        return None


def _formal_params(formals: list[Any], count: int) -> list[str]:
    """Type string (``T`` or ``tensor(float)``) of each actual slot, variadic last formal repeated."""
    out = []
    for i in range(count):
        if i < len(formals):
            out.append(formals[i].type_str)
        elif formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
            out.append(formals[-1].type_str)
        else:
            out.append("")
    return out


def _allowed(schema: Any, type_str: str) -> set[str]:
    for tc in schema.type_constraints:
        if tc.type_param_str == type_str:
            return set(tc.allowed_type_strs)
    return {type_str} if type_str.startswith("tensor(") or type_str.startswith("seq(") else set()


def _infer_types(model: Model) -> dict[str, int]:
    """Element type of every typed tensor of the main graph (inputs, initializers, inferred)."""
    types: dict[str, int] = {}
    shell = make_shell(model.proto)
    del shell.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(shell, strict_mode=False)
    except Exception:  # noqa: BLE001 - fall back to what the file declares
        inferred = shell
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    types[n.output[0]] = a.t.data_type
    return types


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return bool(node_subgraphs(node))


def _rename_in_subgraphs(node: onnx.NodeProto, mapping: dict[str, str]) -> None:
    """Rename outer-scope references inside every subgraph of ``node`` (recursively)."""
    for sub in node_subgraphs(node):
        for n in sub.node:
            for i, x in enumerate(n.input):
                if x in mapping:
                    n.input[i] = mapping[x]
            _rename_in_subgraphs(n, mapping)
        for o in sub.output:
            if o.name in mapping:
                o.name = mapping[o.name]


# ---------------------------------------------------------------------- constant conversion
@dataclass
class _ConstPlan:
    """What happens to one float32 constant."""

    keep_fp32: bool = False
    reason: str = ""
    clamped: int = 0
    flushed: int = 0
    subnormal: int = 0
    value16: np.ndarray | None = None


def _plan_constant(arr: np.ndarray, clamp: bool, keep_value: bool = True) -> _ConstPlan:
    """Range and underflow check of one float32 array; with ``keep_value`` the float16 value too.

    Initializers are planned without keeping the value (so a large model never holds every
    converted weight at once) and converted again, one at a time, when they are replaced.
    """
    plan = _ConstPlan()
    a = np.asarray(arr, dtype=np.float32)
    finite = np.isfinite(a)
    over = finite & (np.abs(a) > FP16_MAX)
    n_over = int(np.count_nonzero(over))
    if n_over:
        if not clamp:
            plan.keep_fp32 = True
            plan.reason = f"{n_over} value(s) beyond float16 range (max |x| {float(np.abs(a[over]).max()):.3g})"
            return plan
        a = np.where(over, np.sign(a) * np.float32(FP16_MAX), a)
        plan.clamped = n_over
    with np.errstate(over="ignore"):
        a16 = a.astype(np.float16)
    nz32 = a != 0
    nz16 = a16 != 0
    plan.flushed = int(np.count_nonzero(nz32 & ~nz16))
    if plan.flushed and a.size <= SMALL_CONSTANT:
        plan.keep_fp32 = True
        plan.reason = f"{plan.flushed} non-zero value(s) would flush to 0 in float16 (e.g. an epsilon)"
        return plan
    plan.subnormal = int(np.count_nonzero(nz16 & (np.abs(a16) < np.float16(6.104e-05))))
    # zeros must survive exactly (masks): float16(0) == 0, checked anyway
    if int(np.count_nonzero(~nz32 & nz16)):
        raise AssertionError("a zero became non-zero in float16")  # pragma: no cover - impossible
    plan.value16 = a16 if keep_value else None
    return plan


# ---------------------------------------------------------------------- the pass
class _Namer:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used: set[str] = {i.name for i in graph.input} | {o.name for o in graph.output}
        self.used |= {t.name for t in graph.initializer}
        for n in graph.node:
            self.used.update(n.output)
            self.used.add(n.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


#: Element types a ``Cast`` turns a float into when it computes a count, a length or an index.
_INTEGER_TYPES = frozenset({TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
                            TensorProto.UINT64, TensorProto.UINT32, TensorProto.UINT16, TensorProto.UINT8,
                            TensorProto.BOOL})


def _integer_feeding(nodes: list[onnx.NodeProto], orig: dict[str, int]) -> dict[int, str]:
    """Nodes whose float32 results are (transitively) cast to an integer type, with that Cast's label.

    A float computation that ends in ``Cast(to=INT64)`` computes a count (a TTS duration, an output
    length, an index): float16 rounding changes the integer and with it an output's shape. Such
    nodes stay float32. The walk goes backwards from each float-to-integer Cast through the
    producers of float32 inputs only, so a float chain that starts from an integer shape
    (``Shape -> Cast(float) -> Mul -> Floor -> Cast(int64)``) keeps only its few float nodes.
    """
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    out: dict[int, str] = {}
    for i, n in enumerate(nodes):
        if n.op_type != "Cast" or not n.input or orig.get(n.input[0]) != F32:
            continue
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        if to not in _INTEGER_TYPES:
            continue
        label = n.name or f"Cast#{i}"
        stack = [n.input[0]]
        while stack:
            j = producer.get(stack.pop())
            if j is None or j in out:
                continue
            out[j] = label
            stack.extend(x for x in nodes[j].input if x and orig.get(x) == F32)
    return out


def convert_fp16(model: Model, opts: Fp16Options) -> dict[str, Any]:
    """Convert ``model`` in place; returns the statistics (see the module docstring)."""
    graph = model.graph
    opset = model.opset
    block_ops = set(_expand_block_list(opts.op_block_list))
    node_rx = re.compile(opts.node_block_list) if opts.node_block_list else None
    orig = _infer_types(model)
    graph_inputs = {i.name for i in graph.input}
    inits = {t.name: t for t in graph.initializer if t.name not in graph_inputs}
    const_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output
                   and any(a.name == "value" and a.type == onnx.AttributeProto.TENSOR for a in n.attribute)}
    f32_consts = [n for n in inits if inits[n].data_type == F32] + [n for n, c in const_nodes.items()
                                                                      if orig.get(n) == F32]

    def const_array(name: str) -> np.ndarray:
        if name in inits:
            return np.asarray(model.get_array(name))
        attr = next(a for a in const_nodes[name].attribute if a.name == "value")
        return numpy_helper.to_array(attr.t)

    plans: dict[str, _ConstPlan] = {name: _plan_constant(const_array(name), opts.clamp, keep_value=name not in inits)
                                    for name in f32_consts}

    # ---- phase 1: which nodes run in float16, and which params they convert
    nodes = list(graph.node)
    schemas = [_schema(n, opset) for n in nodes]
    int_feeding = _integer_feeding(nodes, orig)
    fp16_node: list[bool] = []
    keep_reason: list[str] = []
    conv_params: list[set[str]] = []
    for node, schema in zip(nodes, schemas):
        reason = ""
        if node.op_type in block_ops:
            reason = f"op {node.op_type} in op_block_list"
        elif node_rx is not None and node.name and node_rx.search(node.name):
            reason = "name matches node_block_list"
        elif node.domain not in ("", "ai.onnx"):
            reason = f"domain {node.domain}"
        elif _has_subgraph(node):
            reason = "has a subgraph"
        elif schema is None:
            reason = "no schema"
        elif len(fp16_node) in int_feeding:
            reason = f"computes float values cast to integers by {int_feeding[len(fp16_node)]} (lengths, indices)"
        else:
            untyped = next((x for x in node.input if x and x not in orig), None)
            if untyped is not None:  # e.g. the output of a custom-domain op: stay safe in float32
                reason = f"input {untyped} has no inferred type"
        params: set[str] = set()
        if not reason and node.op_type not in ("Constant", "Cast"):  # Cast takes any input type as is
            in_params = _formal_params(list(schema.inputs), len(node.input))
            for x, p in zip(node.input, in_params):
                if x and orig.get(x) == F32 and "tensor(float16)" in _allowed(schema, p) and not p.startswith("tensor("):
                    params.add(p)
            for x, p in zip(node.input, in_params):
                if x in plans and plans[x].keep_fp32 and p in params:
                    reason = f"reads float32-only constant {x}"
                    break
        fp16_node.append(not reason)
        keep_reason.append(reason)
        conv_params.append(params)

    # constants: convert if a float16 node reads them in a converted slot
    consumers: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for idx, (node, schema) in enumerate(zip(nodes, schemas)):
        if schema is None:
            continue
        for x, p in zip(node.input, _formal_params(list(schema.inputs), len(node.input))):
            if x:
                consumers[x].append((idx, p))
    convert_const = {name for name, plan in plans.items() if not plan.keep_fp32 and any(
        fp16_node[i] and p in conv_params[i] for i, p in consumers.get(name, []))}

    # ---- phase 2: rewrite
    namer = _Namer(graph)
    cur: dict[str, int] = {}
    changes = Counter()
    all_inits = {t.name for t in graph.initializer}  # an initializer that is also an input keeps its type
    for i in graph.input:
        t = orig.get(i.name)
        if t == F32 and not opts.keep_io_types and i.name not in all_inits:
            i.type.tensor_type.elem_type = F16
            cur[i.name] = F16
            changes["io"] += 1
        elif t is not None:
            cur[i.name] = t
    for name in inits:
        cur[name] = F16 if name in convert_const else inits[name].data_type
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []
    n_casts = 0

    def typed(name: str, want: int) -> str:
        nonlocal n_casts
        have = cur.get(name)
        if have is None or have == want or have not in (F16, F32) or want not in (F16, F32):
            return name
        key = (name, want)
        if key not in casts:
            out = namer(f"{name}_{'fp16' if want == F16 else 'fp32'}")
            new_nodes.append(onnx.helper.make_node("Cast", [name], [out], to=want,
                                                   name=namer(f"{out}_cast")))
            cur[out] = want
            casts[key] = out
            n_casts += 1
        return casts[key]

    kept_ops: Counter[str] = Counter()
    kept_reasons: Counter[str] = Counter()
    for idx, (node, schema) in enumerate(zip(nodes, schemas)):
        if node.op_type == "Constant":
            out = node.output[0]
            if out in convert_const and plans[out].value16 is not None:
                attr = next(a for a in node.attribute if a.name == "value")
                attr.t.CopyFrom(numpy_helper.from_array(plans[out].value16, attr.t.name))
                cur[out] = F16
                changes["constants"] += 1
            elif out in orig:
                cur[out] = orig[out]
            new_nodes.append(node)
            continue
        if not fp16_node[idx]:
            kept_ops[node.op_type] += 1
            kept_reasons[keep_reason[idx]] += 1
            for i, x in enumerate(node.input):
                if x and orig.get(x) in (F32, F16):
                    node.input[i] = typed(x, orig[x])
            if _has_subgraph(node):
                mapping = {}
                for x in sorted(node_outer_reads(node)):
                    if orig.get(x) == F32 and cur.get(x) == F16:
                        mapping[x] = typed(x, F32)
                if mapping:
                    _rename_in_subgraphs(node, mapping)
            for o in node.output:
                if o and o in orig:
                    cur[o] = orig[o]
            new_nodes.append(node)
            continue
        params = conv_params[idx]
        in_params = _formal_params(list(schema.inputs), len(node.input))
        for i, (x, p) in enumerate(zip(node.input, in_params)):
            if not x:
                continue
            if p in params and orig.get(x) == F32:
                node.input[i] = typed(x, F16)
            elif orig.get(x) in (F32, F16):
                node.input[i] = typed(x, orig[x])
        out_params = _formal_params(list(schema.outputs), len(node.output))
        for o, p in zip(node.output, out_params):
            if not o:
                continue
            if p in params and orig.get(o) == F32:
                cur[o] = F16
            elif o in orig:
                cur[o] = orig[o]
        if node.op_type == "Cast":
            to = next((a for a in node.attribute if a.name == "to"), None)
            # an up-cast from float16 is deliberate (e.g. one this pass added before): keep it
            if to is not None and to.i == F32 and orig.get(node.input[0]) != F16:
                to.i = F16
                cur[node.output[0]] = F16
                changes["cast_flips"] += 1
        elif node.op_type == "ConstantOfShape":
            val = next((a for a in node.attribute if a.name == "value"), None)
            if val is not None and val.t.data_type == F32:
                plan = _plan_constant(numpy_helper.to_array(val.t), opts.clamp)
                if plan.value16 is not None:
                    val.t.CopyFrom(numpy_helper.from_array(plan.value16, val.t.name))
                    cur[node.output[0]] = F16
                    changes["constants"] += 1
        new_nodes.append(node)

    # ---- graph outputs
    tail: list[onnx.NodeProto] = []
    for out in graph.output:
        if orig.get(out.name) != F32 or cur.get(out.name) != F16:
            continue
        if not opts.keep_io_types:
            out.type.tensor_type.elem_type = F16
            changes["io"] += 1
            continue
        inner = namer(f"{out.name}_fp16")
        for n in new_nodes:
            for i, x in enumerate(n.output):
                if x == out.name:
                    n.output[i] = inner
            for i, x in enumerate(n.input):
                if x == out.name:
                    n.input[i] = inner
            if _has_subgraph(n):
                _rename_in_subgraphs(n, {out.name: inner})
        tail.append(onnx.helper.make_node("Cast", [inner], [out.name], to=F32, name=namer(f"{out.name}_cast")))
        n_casts += 1
    del graph.node[:]
    graph.node.extend(new_nodes + tail)

    # ---- initializers
    stats_flushed = stats_sub = stats_clamped = 0
    converted = 0
    zeros_ok = True
    for name in sorted(convert_const):
        plan = plans[name]
        stats_flushed += plan.flushed
        stats_sub += plan.subnormal
        stats_clamped += plan.clamped
        if name in inits:
            arr = const_array(name)
            value16 = _plan_constant(arr, opts.clamp).value16
            assert value16 is not None  # planned as convertible above
            before_zeros = int(arr.size - np.count_nonzero(arr))
            del arr
            model.set_array(name, value16)
            zeros_ok &= int(value16.size - np.count_nonzero(value16)) == before_zeros + plan.flushed
            del value16
            converted += 1
    total_changes = int(sum(changes.values()) + n_casts + converted)
    if total_changes:
        del graph.value_info[:]  # stale float32 types; the pass manager re-infers them
    kept_constants = {n: p.reason for n, p in plans.items() if p.keep_fp32}
    return {
        "nodes_fp16": sum(1 for i, n in enumerate(nodes) if fp16_node[i] and n.op_type != "Constant"),
        "nodes_fp32": sum(kept_ops.values()),
        "kept_ops": dict(kept_ops),
        "kept_reasons": dict(kept_reasons),
        "casts_added": n_casts,
        "initializers_converted": converted,
        "initializers_kept_fp32": sum(1 for n in inits if inits[n].data_type == F32 and n not in convert_const),
        "constants_converted": sum(1 for n in convert_const if n in const_nodes),
        "kept_constants": kept_constants,
        "values_clamped": stats_clamped,
        "flushed_to_zero": stats_flushed,
        "subnormal_values": stats_sub,
        "zeros_preserved": zeros_ok,
        "changes": total_changes,
    }


@register_pass
class Fp16Pass(Pass):
    """Convert float32 weights and computation to float16 (sensitive ops stay float32)."""

    name = "fp16"
    description = "convert float32 weights and computation to float16, sensitive ops kept float32 (for TensorRT)"
    Options = Fp16Options
    preserves = ()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Convert ``model`` in place."""
        opts: Fp16Options = self.options
        if not any(t.data_type == F32 for t in model.graph.initializer) and not any(
                i.type.tensor_type.elem_type == F32 for i in model.graph.input):
            if not any(n.op_type == "Constant" for n in model.graph.node):
                return PassResult(model, False, {"nodes_fp16": 0, "note": "no float32 tensors"})
        unknown = [op for op in _expand_block_list(opts.op_block_list) if not onnx.defs.has(op)]
        if unknown:
            raise PipelineError(f"fp16: option op_block_list names unknown op type(s) {', '.join(unknown)}")
        stats = convert_fp16(model, opts)
        if stats["flushed_to_zero"]:
            ctx.warn(f"fp16: {stats['flushed_to_zero']} non-zero weight value(s) below 2^-25 became 0 in float16 "
                     "(the sparsity pattern gained these zeros)")
        kept = sorted(stats["kept_constants"].items())[:10]
        labels = weight_labels(model, [name for name, _ in kept])
        for name, why in kept:
            ctx.warn(f"fp16: constant {labels[name]} kept float32: {why}")
        return PassResult(model, stats.pop("changes") > 0, stats)


__all__ = ["DEFAULT_OP_BLOCK_LIST", "Fp16Options", "Fp16Pass", "convert_fp16"]
