"""The Gemm form: constant-weight MatMuls rewritten as 2-D ``Gemm(transB=1)`` for TensorRT.

ONNX ``Gemm`` multiplies 2-D matrices only, ``Y = A · Bᵀ + C`` with ``transB=1``. A constant-weight
``MatMul`` ``Y = X · W`` with ``X [d₁, …, d_{r-1}, K]`` (r >= 2) and ``W [K, N]`` is the same product
row by row, so for every such node:

* ``r == 2``: ``Y = Gemm(X, Wᵀ, transB=1)``;
* ``r > 2``: ``X₂ = Reshape(X, [-1, K])`` (``[d₁·…·d_{r-1}, K]``), ``Y₂ = Gemm(X₂, Wᵀ, transB=1)``
  and ``Y = Reshape(Y₂, Concat(Shape(X)[:-1], [N]))``; the target is built from ``Shape(X)`` at run
  time, so dynamic batch and sequence axes keep working (a ``0`` in a Reshape target would copy
  the 2-D tensor's own axis, not ``X``'s, so it cannot be used here);
* the weight is stored transposed, ``Wᵀ [N, K]`` (the ``[out, in]`` layout of a fully connected
  layer; K stays the reduction axis, now axis 1, so 2:4 along K is unchanged); an initializer read
  only by rewritten MatMuls is replaced in place, one read elsewhere too gets a transposed copy;
* a bias ``Add(Y, b)`` (either operand order) that directly follows, is ``Y``'s only reader, and
  whose constant ``b`` has ``N`` elements along the last axis (shape ``[N]``, ``[1, …, 1, N]``) or
  one element, is folded into Gemm's ``C`` (``b`` reshaped to ``[N]`` or ``[1]``; C broadcasts to
  ``[M, N]``) and the Add is removed.

A ``Gemm`` that already has a constant 2-D ``B`` with ``transB=0`` (GPT-2's ``Conv1D`` exports as
``Gemm(X₂, W [K, N], C)`` between Reshapes) gets ``Wᵀ`` and ``transB=1``: every constant-weight GEMM
ends in the same ``[N, K]`` layout.

Nodes reading the same ``X`` (Q, K, V projections) share one ``Reshape`` and one ``Shape`` of it.
Output tensor names are kept (the final Reshape, or the Gemm, writes the MatMul's or the folded
Add's output), so graph outputs, value infos and downstream readers are untouched.

The result equals the MatMul form up to float rounding (the same products, summed by another
kernel). Skipped, with a reason: a weight that is not a 2-D floating initializer (a graph input,
behind Cast / DequantizeLinear / Transpose), an activation of rank < 2 or unknown rank, element
types that differ, a constant first operand (``W @ x``), opset < 11 (Gemm's optional ``C``, Slice
with inputs), and nodes in subgraphs (only the main graph is rewritten).

Preconditions: the model passed the checker (unique names); shape inference gives the
activation's rank (the pass manager keeps value infos up to date).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxprune.analysis.heads.prepare import fresh_name
from onnxprune.ir.graph import attr, make_shell, node_outer_reads, replace_nodes
from onnxprune.ir.model import Model

log = logging.getLogger(__name__)

#: Element types Gemm computes that a weight may have (opset 13 adds bfloat16).
GEMM_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)

#: Lowest opset the rewrite emits for (Gemm with optional C, Slice with tensor inputs).
MIN_OPSET = 11


def infer_shapes_types(model: Model) -> tuple[dict[str, list[int | str | None]], dict[str, int]]:
    """Shapes (ints, dim names or None) and element types of the main graph's tensors.

    Shape inference runs on a weight-free shell (``data_prop`` on, not strict); initializers
    contribute their own dims and types. Tensors inference cannot type are absent.
    """
    shell = make_shell(model.proto)
    del shell.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(shell, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is best effort here
        log.debug("shape inference failed: %s", exc)
        inferred = shell
    shapes: dict[str, list[int | str | None]] = {}
    types: dict[str, int] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                               for d in tt.shape.dim]
    for t in model.graph.initializer:
        shapes[t.name] = [int(d) for d in t.dims]
        types[t.name] = t.data_type
    return shapes, types


@dataclass
class Candidate:
    """One MatMul the rewrite turns into a Gemm.

    Attributes:
        index: Position of the MatMul in ``graph.node``.
        node: Its name (or ``MatMul#index``).
        weight: The ``[K, N]`` initializer.
        k: Reduction length. n: Output width. rank: The activation's rank.
    """

    index: int
    node: str
    weight: str
    k: int
    n: int
    rank: int


@dataclass
class GemmFormPlan:
    """What :func:`plan_gemm_form` found: the MatMuls to rewrite and why the others stay.

    ``flip`` lists the indices of Gemms with a constant 2-D ``B`` and ``transB=0`` (GPT-2's
    ``Conv1D`` exports so): their weight is stored transposed and ``transB`` set to 1, so every
    constant-weight GEMM ends in the same ``[N, K]`` layout.
    """

    candidates: list[Candidate] = field(default_factory=list)
    flip: list[int] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # node label -> reason


def _label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def plan_gemm_form(model: Model, shapes: dict[str, list[int | str | None]] | None = None,
                   types: dict[str, int] | None = None) -> GemmFormPlan:
    """Which main-graph MatMuls :func:`apply_gemm_form` would rewrite (nothing is changed).

    Args:
        model: The model.
        shapes, types: From :func:`infer_shapes_types` (computed when not given).
    """
    if shapes is None or types is None:
        shapes, types = infer_shapes_types(model)
    plan = GemmFormPlan()
    opset = model.opset
    inits = model.initializer_map()
    for idx, node in enumerate(model.graph.node):
        if node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and len(node.input) > 1 \
                and model.is_constant(node.input[1]) and not attr(node, "transB", 0) \
                and len(inits[node.input[1]].dims) == 2 and inits[node.input[1]].data_type in GEMM_FLOAT_TYPES:
            plan.flip.append(idx)
            continue
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        lbl = _label(node, idx)
        a, w = node.input[0], node.input[1]
        why = None
        if opset < MIN_OPSET:
            why = f"opset {opset} < {MIN_OPSET}"
        elif model.is_constant(a) and not model.is_constant(w):
            why = "constant first operand (W @ x)"
        elif not model.is_constant(w):
            why = "second operand is not a constant initializer (activation x activation, or behind Cast/DQ)"
        elif len(inits[w].dims) != 2:
            why = f"weight is {len(inits[w].dims)}-D"
        elif inits[w].data_type not in GEMM_FLOAT_TYPES:
            why = f"weight type {TensorProto.DataType.Name(inits[w].data_type)} is not a float Gemm type"
        elif types.get(a) not in (None, inits[w].data_type):
            why = "activation and weight element types differ"
        else:
            rank = len(shapes[a]) if a in shapes else None
            if rank is None:
                why = "activation rank unknown (shape inference)"
            elif rank < 2:
                why = f"activation rank {rank} < 2"
        if why is not None:
            plan.skipped[lbl] = why
            continue
        k, n = (int(d) for d in inits[w].dims)
        plan.candidates.append(Candidate(idx, lbl, w, k, n, len(shapes[a])))
    return plan


def _bias_of(model: Model, out: str, n: int, rank: int, readers: dict[str, list[onnx.NodeProto]],
             graph_outputs: set[str]) -> tuple[onnx.NodeProto, str] | None:
    """The Add that directly follows ``out`` with a constant bias Gemm's C can hold, if any."""
    users = readers.get(out, [])
    if len(users) != 1 or out in graph_outputs:
        return None
    add = users[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None
    other = add.input[1] if add.input[0] == out else add.input[0]
    if other == out or not model.is_constant(other):
        return None
    t = model.initializer(other)
    dims = [int(d) for d in t.dims]
    if len(dims) > rank:
        return None
    size = int(np.prod(dims)) if dims else 1
    if size == 1 or (dims and dims[-1] == n and size == n):
        return add, other
    return None


def apply_gemm_form(model: Model, plan: GemmFormPlan | None = None) -> dict[str, Any]:
    """Rewrite the planned MatMuls of ``model`` in place into the Gemm form (see the module doc).

    Returns:
        Stats: ``rewritten`` (count), ``bias_folded`` (Adds folded into C), ``reshaped`` (Gemms
        between Reshapes), ``skipped`` (node label -> reason) and ``by_rank``.
    """
    if plan is None:
        plan = plan_gemm_form(model)
    g = model.graph
    stats: dict[str, Any] = {"rewritten": 0, "bias_folded": 0, "reshaped": 0, "gemm_transb": len(plan.flip),
                             "skipped": dict(plan.skipped), "by_rank": {}}
    if not plan.candidates and not plan.flip:
        return stats
    nodes = list(g.node)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for nd in nodes:
        for x in nd.input:
            readers.setdefault(x, []).append(nd)
    graph_outputs = {o.name for o in g.output}
    sub_reads = {x for nd in nodes for x in node_outer_reads(nd)}
    used = {t.name for t in g.initializer} | {x for nd in nodes for x in (*nd.input, *nd.output)} \
        | {i.name for i in g.input}
    used_nodes = {nd.name for nd in nodes if nd.name}
    rewritten_ids = {id(nodes[c.index]) for c in plan.candidates} | {id(nodes[i]) for i in plan.flip}
    # a weight read only by rewritten nodes (as B) is transposed in place; else a transposed copy
    transposed: dict[str, str] = {}
    for wname in [c.weight for c in plan.candidates] + [nodes[i].input[1] for i in plan.flip]:
        if wname in transposed:
            continue
        others = [r for r in readers.get(wname, []) if id(r) not in rewritten_ids or r.input[0] == wname
                  or wname in r.input[2:]]
        w = np.asarray(model.get_array(wname))
        if not others and wname not in graph_outputs and wname not in sub_reads:
            model.set_array(wname, np.ascontiguousarray(w.T))
            transposed[wname] = wname
        else:
            name = fresh_name(f"{wname}__gemm_t", used)
            model.add_initializer(name, np.ascontiguousarray(w.T))
            transposed[wname] = name
    for i in plan.flip:
        gm = nodes[i]
        gm.input[1] = transposed[gm.input[1]]
        for a in gm.attribute:
            if a.name == "transB":
                gm.attribute.remove(a)
                break
        gm.attribute.append(helper.make_attribute("transB", 1))
    removed: set[int] = set()
    replacement: dict[int, list[onnx.NodeProto]] = {}
    shared: dict[str, tuple[str, str]] = {}  # activation -> (2-D tensor, leading-shape tensor)
    opset = model.opset
    by_rank: Counter[int] = Counter()
    for c in plan.candidates:
        mm = nodes[c.index]
        a, out = mm.input[0], mm.output[0]
        base = mm.name or out
        new: list[onnx.NodeProto] = []
        bias = _bias_of(model, out, c.n, c.rank, readers, graph_outputs)
        if bias is not None and model.initializer(bias[1]).data_type != model.initializer(c.weight).data_type:
            bias = None
        c_input: list[str] = []
        if bias is not None:
            add, b = bias
            barr = np.asarray(model.get_array(b))
            flat = barr.reshape(-1)
            if list(barr.shape) == list(flat.shape) and len(readers.get(b, [])) == 1:
                c_input = [b]
            else:
                bname = fresh_name(f"{b}__gemm_c", used)
                model.add_initializer(bname, np.ascontiguousarray(flat))
                c_input = [bname]
            final_out = add.output[0]
            removed.add(id(add))
            stats["bias_folded"] += 1
        else:
            final_out = out
        gemm_name = fresh_name(f"{base}/Gemm", used_nodes)
        if c.rank == 2:
            new.append(helper.make_node("Gemm", [a, transposed[c.weight], *c_input], [final_out],
                                        name=gemm_name, transB=1))
        else:
            if a not in shared:
                a2 = fresh_name(f"{a}__2d", used)
                lead = fresh_name(f"{a}__lead_shape", used)
                tgt = fresh_name(f"{a}__2d_shape", used)
                model.add_initializer(tgt, np.array([-1, c.k], dtype=np.int64))
                new.append(helper.make_node("Reshape", [a, tgt], [a2], name=fresh_name(f"{base}/Reshape2D", used_nodes)))
                shp = fresh_name(f"{a}__shape", used)
                if opset >= 15:
                    new.append(helper.make_node("Shape", [a], [lead], name=fresh_name(f"{base}/Shape", used_nodes),
                                                start=0, end=-1))
                else:
                    new.append(helper.make_node("Shape", [a], [shp], name=fresh_name(f"{base}/Shape", used_nodes)))
                    s0, s1, ax = (fresh_name(f"{a}__{x}", used) for x in ("starts", "ends", "axes"))
                    model.add_initializer(s0, np.array([0], dtype=np.int64))
                    model.add_initializer(s1, np.array([-1], dtype=np.int64))
                    model.add_initializer(ax, np.array([0], dtype=np.int64))
                    new.append(helper.make_node("Slice", [shp, s0, s1, ax], [lead],
                                                name=fresh_name(f"{base}/SliceShape", used_nodes)))
                shared[a] = (a2, lead)
            a2, lead = shared[a]
            y2 = fresh_name(f"{final_out}__2d", used)
            ncol = fresh_name(f"{final_out}__n", used)
            full = fresh_name(f"{final_out}__shape", used)
            model.add_initializer(ncol, np.array([c.n], dtype=np.int64))
            new.append(helper.make_node("Gemm", [a2, transposed[c.weight], *c_input], [y2], name=gemm_name, transB=1))
            new.append(helper.make_node("Concat", [lead, ncol], [full], name=fresh_name(f"{base}/ShapeOut", used_nodes),
                                        axis=0))
            new.append(helper.make_node("Reshape", [y2, full], [final_out], name=fresh_name(f"{base}/ReshapeBack",
                                                                                      used_nodes)))
            stats["reshaped"] += 1
        replacement[c.index] = new
        by_rank[c.rank] += 1
        stats["rewritten"] += 1
    out_nodes: list[onnx.NodeProto] = []
    for i, nd in enumerate(nodes):
        if i in replacement:
            out_nodes.extend(replacement[i])
        elif id(nd) not in removed:
            out_nodes.append(nd)
    replace_nodes(g, out_nodes)
    # value infos of the removed MatMul outputs (now internal to nothing) would be stale
    gone = {c_out for c in plan.candidates for c_out in nodes[c.index].output}
    produced = {o for nd in g.node for o in nd.output}
    keep = [vi for vi in g.value_info if vi.name not in gone or vi.name in produced]
    del g.value_info[:]
    g.value_info.extend(keep)
    stats["by_rank"] = {str(k): v for k, v in sorted(by_rank.items())}
    return stats
