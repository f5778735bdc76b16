"""Which GEMM-like layers TensorRT could run on sparse tensor cores, and what share of the FLOPs.

For every Conv / ConvTranspose / MatMul / Gemm node the report gives its constant weight (found by
:mod:`onnxprune.analysis.weights`), the weight's shape and dtype, the compute dtype (the node's
inferred output type), ``K`` (reduction length) and ``N``, whether the weight is 2:4 along K, and
whether TensorRT could pick a sparse kernel for it. ``form`` is the op TensorRT's ONNX parser
sees (``MatMul``, ``Gemm``, ``Conv``, ``ConvTranspose``); ``summary["forms"]`` counts them and
``summary["gemm_form_candidates"]`` the constant-weight MatMuls that ``tensorrt(gemm_form=true)``
would rewrite as ``Gemm`` (:mod:`onnxprune.tensorrt.gemm_form`). TensorRT's rules (see docs/FACTS):

* a constant weight (a MatMul of two activations, e.g. attention scores, never runs sparse);
* Convolution weights ``[N, C, kh, kw]`` 2:4 along C with ``C % 4 == 0`` and ``group == 1``
  (grouped and depthwise convolutions are never considered); MatMul / Gemm with a constant 2-D
  weight, 2:4 along its reduction axis (``K % 4 == 0``); ConvTranspose is not a documented
  sparse layer;
* FP16, BF16, INT8 (Q/DQ) or FP8 math: TensorRT 11 networks are strongly typed, so an FP32 ONNX
  builds FP32 layers and gets no sparse tactics (run the ``fp16`` pass first);
* ``BuilderFlag.SPARSE_WEIGHTS`` at build time; TensorRT then times dense and sparse kernels and
  keeps the faster, so eligibility is necessary, not sufficient.

``eligible`` is true when every rule holds *and* the weight is 2:4 along K. Layers with
``K·N < 4096·4096`` (Conv: ``K = C·kh·kw``) get the note ``small``: on an H100 (cuSPARSELt 0.8, FP16) BERT-base-sized
GEMMs ran 0.7–1.15× dense and Llama-7B-sized ones 1.1–1.5×, so small layers rarely gain.

FLOPs: ``2 · prod(output shape) · K`` per layer (Conv: ``K = C/group · kh · kw``), from shape
inference with symbolic dims resolved by ``dims`` (name -> value); unresolved dims count as 1 on
axis 0 (batch) and :data:`DEFAULT_DIM` elsewhere. ``eligible_flops_share`` is the eligible layers'
share of the total over all listed layers (attention's activation-activation MatMuls included).

Preconditions: the model passed the checker. Weight values are read only for the 2:4 check.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis.quant import quant_zero_points
from onnxprune.analysis.weights import (
    WEIGHT_OPS,
    WeightInfo,
    find_weights,
    node_label,
    to_kn,
)
from onnxprune.criteria.masks import is_nm
from onnxprune.errors import PipelineError, Reason
from onnxprune.fmt import Footnotes, shorten
from onnxprune.ir.graph import attr
from onnxprune.ir.model import Model
from onnxprune.tensorrt.gemm_form import infer_shapes_types, plan_gemm_form

log = logging.getLogger(__name__)


#: Value of a symbolic dimension (other than axis 0) when computing FLOPs.
DEFAULT_DIM = 128




SPARSE_DTYPES = {"float16": "FP16", "bfloat16": "BF16", "int8": "INT8", "float8e4m3fn": "FP8",
                 "float8e5m2": "FP8", "float8e4m3fnuz": "FP8", "float8e5m2fnuz": "FP8"}


STRONGLY_TYPED_NOTE = ("TensorRT 11 is strongly typed: an FP32 ONNX builds FP32 layers and gets no sparse "
                       "tactics; convert with the fp16 pass first")


def _dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _resolve(shape: list[int | str | None] | None, dims: Mapping[str, int]) -> tuple[int | None, list[str]]:
    """Product of a shape with symbolic dims substituted; also which dims were assumed."""
    if shape is None:
        return None, []
    total, assumed = 1, []
    for axis, d in enumerate(shape):
        if isinstance(d, int) and d > 0:
            total *= d
        elif isinstance(d, str) and d in dims:
            total *= int(dims[d])
        else:
            v = 1 if axis == 0 else DEFAULT_DIM
            named = isinstance(d, str) and not d.startswith("unk__")
            assumed.append(f"{d}={v}" if named else f"unnamed dims on axis {'0' if axis == 0 else '>0'}={v}")
            total *= v
    return total, assumed


def _weight_of(node_lbl: str, by_node: dict[str, list[WeightInfo]]) -> WeightInfo | None:
    infos = by_node.get(node_lbl, [])
    return infos[0] if infos else None


def _is_24(model: Model, info: WeightInfo) -> bool | None:
    if info.k_axis is None or (info.k or 0) % 4:
        return None
    arr = np.asarray(model.get_array(info.name))
    if info.quant is not None:
        arr = (arr != quant_zero_points(model, info)).astype(np.int8)
    kn = to_kn(arr, info)
    nz = (kn != 0).reshape(kn.shape[0] // 4, 4, -1)
    return bool((nz.sum(axis=1) <= 2).all())


def inspect_tensorrt(model: Model, dims: Mapping[str, int] | None = None) -> dict[str, Any]:
    """TensorRT sparse-tensor-core eligibility of every Conv/ConvTranspose/MatMul/Gemm.

    Args:
        model: The model.
        dims: Values of symbolic dimensions for the FLOP count.

    Returns:
        ``{"layers": [...], "summary": {...}, "notes": [...]}``; each layer has ``node``,
        ``op_type``, ``weight``, ``weight_shape``, ``weight_dtype``, ``compute_dtype``, ``K``, ``N``,
        ``nm_24``, ``eligible`` (bool), ``reasons`` (why not), ``notes`` and ``flops``.
    """
    dims = dict(dims or {})
    shapes, types = infer_shapes_types(model)
    gemm_plan = plan_gemm_form(model, shapes, types)
    to_gemm = {c.node for c in gemm_plan.candidates}
    by_node: dict[str, list[WeightInfo]] = {}
    for info in find_weights(model):
        for lbl in info.nodes:
            by_node.setdefault(lbl, []).append(info)
    nm_cache: dict[str, bool | None] = {}
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    reshape_src = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Reshape" and n.output}
    consumers_of: dict[str, set[str]] = {}
    for n in model.graph.node:
        for x in n.input:
            consumers_of.setdefault(x, set()).update(n.output)

    def weight_chain(info: WeightInfo) -> set[str]:
        """The initializer and the tensors its pass-through chain produces."""
        chain, frontier = {info.name}, [info.name]
        while frontier:
            t = frontier.pop()
            for o in consumers_of.get(t, ()):
                if producers.get(o) in ("Transpose", "Cast", "Identity", "Reshape", "DequantizeLinear") and o not in chain:
                    chain.add(o)
                    frontier.append(o)
        return chain

    layers: list[dict[str, Any]] = []
    assumed_all: set[str] = set()
    for idx, node in enumerate(model.graph.node):
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        lbl = node_label(node, idx)
        info = _weight_of(lbl, by_node)
        out_type = types.get(node.output[0]) if node.output else None
        compute = _dtype_name(out_type) if out_type else None
        reasons: list[str] = []
        codes: list[str] = []
        notes: list[str] = []
        entry: dict[str, Any] = {"node": lbl, "op_type": node.op_type, "form": node.op_type, "weight": None,
                                 "weight_shape": None,
                                 "weight_dtype": None, "compute_dtype": compute, "K": None, "N": None,
                                 "group": int(attr(node, "group", 1)), "nm_24": None}
        k_len: int | None = None
        if info is None:
            reasons.append("dynamic weight: no constant operand (activation x activation)")
            codes.append("dynamic_weight")
            a = shapes.get(node.input[0]) if node.input else None
            if node.op_type == "MatMul" and a and isinstance(a[-1], int) and a[-1] > 0:
                k_len = a[-1]
        else:
            entry.update(weight=info.name, weight_shape=list(info.shape), weight_dtype=info.dtype,
                         K=info.k, N=(int(info.shape[info.n_axis]) if info.n_axis is not None else None))
            k_len = info.k
            if info.via:
                notes.append("via " + ">".join(info.via))
            for r in weight_sparse_reasons(info):
                reasons.append(r.message)
                codes.append(r.code)
            if info.quant is not None:
                act = next((x for x in node.input[:2] if x and x not in weight_chain(info)), None)
                if act is not None and producers.get(act) == "DequantizeLinear":
                    compute = "int8"
                    entry["compute_dtype"] = "int8 (Q/DQ)"
                else:
                    notes.append("weight-only quantization: the activation is not quantized, so the layer "
                                 f"computes in {compute}")
            if compute not in SPARSE_DTYPES:
                if compute == "float32":
                    reasons.append("FP32 math: " + STRONGLY_TYPED_NOTE)
                    codes.append("fp32_math")
                else:
                    reasons.append(f"{compute or 'unknown'} math: sparse kernels need FP16, BF16, INT8 or FP8")
                    codes.append("compute_dtype")
            if node.op_type == "MatMul" and info.k_axis is not None and info.k_axis == len(info.shape) - 1 \
                    and len(info.shape) == 2:
                notes.append("constant is the first MatMul operand (W @ x)")
            if info.name not in nm_cache:
                nm_cache[info.name] = _is_24(model, info) if info.k_axis is not None else None
            entry["nm_24"] = nm_cache[info.name]
            if lbl in to_gemm:
                notes.append("tensorrt(gemm_form=true) rewrites it as Gemm(transB=1)")
            entry["small"] = is_small(info)
            if entry["small"]:
                notes.append("small: K*N < 4096*4096, sparse kernels rarely beat dense here")
        structural = not reasons
        entry["eligible"] = bool(structural and entry["nm_24"])
        if structural and entry["nm_24"] is False:
            reasons.append("weight is not 2:4 along K (run nm(n=2,m=4))")
            codes.append("not_24")
        entry["reasons"] = reasons
        entry["reason_codes"] = codes
        entry["notes"] = notes
        entry["structurally_eligible"] = structural
        flops = None
        out_shape = shapes.get(node.output[0]) if node.output else None
        out_elems, assumed = _resolve(out_shape, dims)
        src = reshape_src.get(node.input[0]) if node.op_type == "Gemm" and assumed and node.input else None
        if src is not None and entry["N"] and shapes.get(src):  # the Gemm form: M = prod(x.shape[:-1])
            rows, src_assumed = _resolve(shapes[src][:-1], dims)
            if rows is not None:
                out_elems, assumed = rows * entry["N"], src_assumed
        if node.op_type in ("Conv", "ConvTranspose") and info is not None and len(info.shape) >= 3:
            k_len = int(np.prod(info.shape[1:])) if node.op_type == "Conv" else int(np.prod(info.shape[1:]))
        if out_elems is not None and k_len:
            flops = 2.0 * out_elems * k_len
            assumed_all.update(assumed)
        entry["flops"] = flops
        layers.append(entry)
    total = sum(e["flops"] or 0.0 for e in layers)
    elig = sum(e["flops"] or 0.0 for e in layers if e["eligible"])
    struct = sum(e["flops"] or 0.0 for e in layers if e["structurally_eligible"])
    notes = []
    if any("fp32_math" in e["reason_codes"] for e in layers):
        notes.append(STRONGLY_TYPED_NOTE)
    if assumed_all:
        notes.append("FLOPs assume symbolic dims " + ", ".join(sorted(assumed_all)) + " (pass dims to change)")
    summary = {
        "layers": len(layers),
        "eligible": sum(1 for e in layers if e["eligible"]),
        "structurally_eligible": sum(1 for e in layers if e["structurally_eligible"]),
        "small_eligible": sum(1 for e in layers if e["eligible"] and e.get("small")),
        "total_flops": total,
        "eligible_flops": elig,
        "eligible_flops_share": (elig / total) if total else 0.0,
        "structural_flops_share": (struct / total) if total else 0.0,
        "forms": dict(sorted(Counter(e["form"] for e in layers).items())),
        "gemm_form_candidates": len(gemm_plan.candidates),
    }
    return {"layers": layers, "summary": summary, "notes": notes}



def format_tensorrt(data: dict[str, Any]) -> str:
    """Text table of :func:`inspect_tensorrt`."""
    s = data["summary"]
    lines = [f"TensorRT sparse tensor cores: {s['eligible']} of {s['layers']} GEMM-like layers eligible "
             f"({s['eligible_flops_share']:.1%} of FLOPs; {s['structurally_eligible']} would be with 2:4 weights, "
             f"{s['structural_flops_share']:.1%} of FLOPs; {s['small_eligible']} eligible but small)"]
    forms = s.get("forms") or {}
    if forms:
        lines.append("layer forms (what TensorRT's ONNX parser sees): " + ", ".join(f"{v} {k}" for k, v in forms.items())
                     + (f"; tensorrt(gemm_form=true) would rewrite {s['gemm_form_candidates']} constant-weight MatMul(s) "
                        "as Gemm" if s.get("gemm_form_candidates") else ""))
    if not data["layers"]:
        return "\n".join(lines)
    head = f"{'node':<46} {'form':<8} {'weight shape':<16} {'dtype':<9} {'K':>6} {'N':>6} {'2:4':<4} {'sparse':<7} why / notes"
    lines += [head, "-" * len(head)]
    footnotes = Footnotes()  # a 200-character reason shared by every row is printed once, below
    for e in data["layers"]:
        nm = "-" if e["nm_24"] is None else ("yes" if e["nm_24"] else "no")
        k = "-" if e["K"] is None else str(e["K"])
        n = "-" if e["N"] is None else str(e["N"])
        why = footnotes.join(e["reasons"] + e["notes"])
        dtype = (e["compute_dtype"] or "?")[:9]
        lines.append(f"{shorten(e['node'], 46):<46} {e.get('form', e['op_type']):<8} {str(e['weight_shape'] or '-'):<16} "
                     f"{dtype:<9} {k:>6} {n:>6} {nm:<4} {'YES' if e['eligible'] else 'no':<7} {why}".rstrip())
    lines += footnotes.lines()
    for note in data.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- inspect
def weight_sparse_reasons(info: WeightInfo) -> list[Reason]:
    """THE weight-level rule: every reason TensorRT could not run this weight on sparse tensor cores.

    TensorRT needs a Conv / MatMul / Gemm with a constant weight, 2:4 along K with ``K % 4 == 0``,
    no grouped convolution, and (for MatMul) a 2-D weight. ConvTranspose is not a documented
    sparse layer. Empty list: structurally eligible (the compute dtype is checked per node by
    :func:`inspect_tensorrt`).
    """
    out: list[Reason] = []
    if info.op_type not in ("Conv", "MatMul", "Gemm", "ConvTranspose"):
        return [Reason("not_gemm", f"{info.op_type} is not a GEMM-like op")]
    if info.op_type == "ConvTranspose":
        out.append(Reason("conv_transpose", "ConvTranspose is not a documented TensorRT sparse layer"))
    if info.op_type in ("Conv", "ConvTranspose") and info.group > 1:
        out.append(Reason("grouped_conv", f"grouped convolution (group={info.group}) is never run sparse"))
    if info.op_type == "MatMul" and len(info.shape) != 2:
        out.append(Reason("matmul_nd", f"MatMul weight is {len(info.shape)}-D (TensorRT needs a constant 2-D weight)"))
    if info.conflict:
        out.append(Reason("axis_conflict", info.conflict))
    if info.k_axis is None:
        out.append(Reason("no_k_axis", "K axis not traceable" + (f" ({info.skip_reason})" if info.skip_reason else "")))
    elif (info.k or 0) % 4:
        out.append(Reason("k_not_multiple_of_4", f"K={info.k} is not a multiple of 4"))
    return out


def trt_sparse_reason(info: WeightInfo) -> Reason | None:
    """The first of :func:`weight_sparse_reasons` (None: structurally eligible)."""
    reasons = weight_sparse_reasons(info)
    return reasons[0] if reasons else None


def is_small(info: WeightInfo) -> bool:
    """Below :data:`SPARSE_BENEFIT_MIN_KN` (``K*N`` = the weight's size, for Conv the implicit GEMM's)."""
    return info.size < SPARSE_BENEFIT_MIN_KN


def inspect_nm(model: Model, n: int, m: int) -> dict[str, Any]:
    """Check every weight for N:M sparsity along K, and TensorRT sparse-tensor-core eligibility.

    Eligibility is :func:`inspect_tensorrt`'s answer for the layers that read the weight (every
    one must be structurally eligible, FP32 math included), so ``inspect --nm`` and
    ``inspect --tensorrt`` never disagree: an FP32 file has no eligible weight under strongly-typed
    TensorRT, whatever its sparsity; ``tensorrt_fp32_math`` counts the weights that the ``fp16``
    pass would make eligible.

    Returns:
        ``{"n", "m", "weights": [...], "summary": {...}, "tensorrt": [...]}``. Each weight entry
        has ``status`` (``ok`` / ``violates`` / ``skipped``), ``violating_groups``, ``groups``,
        ``first_violations`` (element indices in the initializer's layout) and ``reason``.

    Raises:
        PipelineError: ``n``/``m`` out of range.
    """
    if m < 2 or n < 1 or n >= m:
        raise PipelineError(f"--nm {n}:{m}: need 1 <= N < M and M >= 2")
    layers_of: dict[str, list[dict[str, Any]]] = {}
    for layer in inspect_tensorrt(model)["layers"]:  # THE rule, so both inspect modes give one answer
        if layer["weight"] is not None:
            layers_of.setdefault(layer["weight"], []).append(layer)
    entries = []
    trt = []
    counts = {"ok": 0, "violates": 0, "skipped": 0}
    for w in find_weights(model):
        e: dict[str, Any] = {"name": w.name, "nodes": w.nodes, "op_type": w.op_type, "shape": list(w.shape),
                             "k_axis": w.k_axis,
                             "k": w.k, "status": "skipped", "groups": 0, "violating_groups": 0,
                             "first_violations": [], "reason": None}
        if w.k_axis is None or w.conflict:
            e["reason"] = w.conflict or w.skip_reason or "K axis not traceable"
        elif (w.k or 0) % m:
            e["reason"] = f"K={w.k} is not a multiple of {m}"
        else:
            arr = model.get_array(w.name)
            if w.quant is not None:
                arr = _quant_zero_mask(model, w, arr)
            ok, bad, first = is_nm(to_kn(np.asarray(arr), w), n, m)
            e["groups"] = int(w.size // m)
            e["violating_groups"] = int(bad)
            e["first_violations"] = [_kn_to_index(k_idx, col, w) for k_idx, col in first]
            e["status"] = "ok" if ok else "violates"
        counts[e["status"]] += 1
        entries.append(e)
        layers = layers_of.get(w.name, [])
        failing = next((x for x in layers if not x["structurally_eligible"]), None)
        eligible = bool(layers) and failing is None
        reason, code = (failing["reasons"][0], failing["reason_codes"][0]) if failing else (None, None)
        if not layers:
            reason, code = "no GEMM-like layer reads it", "not_gemm"
        trt.append({"name": w.name, "op_type": w.op_type, "nodes": w.nodes, "shape": list(w.shape),
                    "compute_dtype": layers[0]["compute_dtype"] if layers else None,
                    "eligible": eligible, "reason": reason, "reason_code": code, "nm_ok": e["status"] == "ok",
                    "fp32_math": any("fp32_math" in x["reason_codes"] for x in layers),
                    "size_note": _size_note(w) if eligible else None})
    summary = dict(counts)
    summary["weights"] = len(entries)
    summary["tensorrt_eligible"] = sum(1 for t in trt if t["eligible"])
    summary["tensorrt_eligible_and_sparse"] = sum(1 for t in trt if t["eligible"] and t["nm_ok"])
    summary["tensorrt_fp32_math"] = sum(1 for t in trt if t["fp32_math"])
    return {"n": n, "m": m, "weights": entries, "summary": summary, "tensorrt": trt}


#: Below this K·N a 2:4 GEMM measured no better than dense on H100 (see FACTS.md: BERT-base
#: 768x3072 layers gained 0-15% at 4k-16k tokens and lost at 512; 4096x4096 gained 1.1-1.4x).
SPARSE_BENEFIT_MIN_KN = 4096 * 4096


def _size_note(w: WeightInfo) -> str:
    if not is_small(w):
        return "large enough to gain from 2:4 (~1.1-1.5x on H100 at many tokens)"
    return "small (K*N < 4096^2): expect little or no 2:4 speedup (BERT-base-sized layers: 0.5-1.15x)"


def _quant_zero_mask(model: Model, w: WeightInfo, q: np.ndarray) -> np.ndarray:
    """For an integer weight behind DequantizeLinear: 1 where the dequantized value is non-zero."""
    zp = quant_zero_points(model, w)
    return (np.asarray(q) != zp).astype(np.int8)


def _kn_to_index(k_idx: int, col: int, w: WeightInfo) -> list[int]:
    """Element index in the initializer layout of ``[k_idx, col]`` in the ``to_kn`` layout."""
    assert w.k_axis is not None
    rest = tuple(s for i, s in enumerate(w.shape) if i != w.k_axis)
    rest_idx = list(np.unravel_index(col, rest)) if rest else []
    idx = [int(v) for v in rest_idx]
    idx.insert(w.k_axis, int(k_idx))
    return idx


def format_nm(data: dict[str, Any]) -> str:
    """Text report of :func:`inspect_nm`."""
    n, m, s = data["n"], data["m"], data["summary"]
    lines = [f"{n}:{m} sparsity along K: {s['ok']} ok, {s['violates']} violate, {s['skipped']} skipped "
             f"(of {s['weights']} weights)"]
    if data["weights"]:
        head = (f"{'node':<48} {'initializer':<28} {'shape':<18} {'K':>6} {'status':<9} {'bad groups':>12}  "
                "detail")
        lines += [head, "-" * len(head)]
        skip_notes = Footnotes()
        for e in data["weights"]:
            if e["status"] == "violates":
                detail = "first at " + ", ".join(str(v) for v in e["first_violations"][:3])
                bad = f"{e['violating_groups']}/{e['groups']}"
            elif e["status"] == "ok":
                detail, bad = "", f"0/{e['groups']}"
            else:
                detail, bad = skip_notes.ref(e["reason"] or ""), "-"
            k = "-" if e["k"] is None else str(e["k"])
            node = e["nodes"][0] if e.get("nodes") else "-"
            lines.append(f"{shorten(node, 48):<48} {shorten(e['name'], 28):<28} {str(e['shape']):<18} {k:>6} "
                         f"{e['status']:<9} {bad:>12}  {detail}".rstrip())
        lines += skip_notes.lines()
    lines.append("")
    lines.append(f"TensorRT sparse tensor cores (the rule of `inspect --tensorrt`: constant weight, K % 4 == 0, "
                 f"no grouped Conv, FP16/BF16/INT8/FP8 math): {s['tensorrt_eligible']} of {len(data['tensorrt'])} "
                 f"weights eligible, {s['tensorrt_eligible_and_sparse']} eligible and {n}:{m}")
    if s.get("tensorrt_fp32_math"):
        lines.append(f"  {s['tensorrt_fp32_math']} compute in FP32, which no sparse kernel takes: "
                     f"{STRONGLY_TYPED_NOTE}")
    notes = Footnotes()
    for t in data["tensorrt"]:
        state = "eligible" if t["eligible"] else "no"
        extra = ((f"{n}:{m} ok" if t["nm_ok"] else f"not {n}:{m}") + f"; {t['size_note']}") if t["eligible"] \
            else notes.ref("FP32 math (see above)" if t["reason_code"] == "fp32_math" else t["reason"] or "")
        lines.append(f"  {shorten(t['nodes'][0] if t['nodes'] else t['name'], 48):<48} {t['op_type']:<8} "
                     f"{str(t['shape']):<14} {state:<8} {extra}".rstrip())
    lines += notes.lines()
    return "\n".join(lines)
