#!/usr/bin/env python3
"""Proof on hardware: time every 2:4-eligible GEMM of a pruned ONNX model on sparse tensor cores.

For each constant GEMM weight of the model the layer computes ``y = x @ W`` with ``W`` of shape
``[K, N]`` (K the reduction axis). Sparse tensor cores need the 2:4 pattern along K: in every
group of four consecutive K-indices at most two weights are non-zero. cuSPARSELt takes the sparse
operand first, so the layer is run transposed::

    yᵀ[N, M] = Wᵀ[N, K] @ xᵀ[K, M]          (Wᵀ compressed once with torch._cslt_compress)

Weights found (no onnxprune needed; plain ``onnx`` + ``numpy``):

* ``MatMul(x, W)`` with ``W`` a 2-D initializer (optionally through ``Transpose`` / ``Cast``):
  ``Wᵀ = W.T``.
* ``Gemm(x, B)``: ``Wᵀ = B`` if ``transB`` else ``B.T``.
* ``Conv`` with ``group == 1`` and weight ``[N, C, kh, kw]``: the implicit GEMM has
  ``K = kh*kw*C``; the weight is laid out as ``[N, kh, kw, C]`` → ``[N, kh*kw*C]`` so that the
  2:4 groups along ``C`` (what TensorRT requires, ``C % 4 == 0``) are contiguous along K.

Per weight and token count ``M`` (``--tokens``): FP16 (``--dtype bf16``: BF16) dense GEMM (``torch.mm``, the faster of
``x @ W`` and ``Wᵀ @ xᵀ``) versus the cuSPARSELt sparse GEMM (plan compressed once, algorithm
picked with ``torch._cslt_sparse_mm_search`` when available); the sparse result is checked
against the dense one (max |Δ| / max |y_dense| ≤ ``--rtol``). Timing is kernel time: each GEMM
is captured ``--inner`` times in a CUDA graph, the graph is replayed until ``--target-ms`` of GPU
time has passed, CUDA events bracket the replays and the median of ``--repeats`` blocks is kept
(eager ``_cslt_sparse_mm`` calls carry ~0.4 ms host set-up that would swamp small GEMMs). With
``--int8`` an INT8 sparse GEMM (column-major dense operand, as cuSPARSELt requires) is timed and
checked too, against ``torch._int_mm`` (not a fair dense INT8 baseline, reported for reference);
INT8 failures are recorded, never fatal.

Summary per token count: ``flop_weighted_speedup = Σ F_i·s_i / Σ F_i`` (``s_i`` = dense/sparse
time of layer i, ``F_i = 2·M·K·N``) and ``time_speedup = Σ dense_i / Σ sparse_i`` (end-to-end
GEMM time of the model's eligible layers).

``--self-test`` needs no model: random 2:4 weights of BERT-base (768×768, 768×3072, 3072×768) and
Llama-7B (4096×4096, 4096×11008, 11008×4096) shapes.

Requires on the GPU side: PyTorch with CUDA and cuSPARSELt (``torch._cslt_compress``); falls back
to ``torch.sparse.to_sparse_semi_structured`` when the private ops are missing. The model-reading
part needs only ``onnx`` and ``numpy`` and runs on any machine (``--list`` prints the eligible
weights without touching a GPU).

Example::

    PYTHONPATH=. python scripts/sparse_gemm_check.py bert24.onnx --tokens 512,4096,16384 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

BERT_SHAPES: list[tuple[str, int, int]] = [
    ("bert.qkvo", 768, 768),
    ("bert.ffn_up", 768, 3072),
    ("bert.ffn_down", 3072, 768),
]
LLAMA_SHAPES: list[tuple[str, int, int]] = [
    ("llama7b.attn", 4096, 4096),
    ("llama7b.ffn_up", 4096, 11008),
    ("llama7b.ffn_down", 11008, 4096),
]


# ---------------------------------------------------------------------- weights (CPU only)
@dataclass
class GemmWeight:
    """One constant GEMM weight in the sparse-operand layout.

    Attributes:
        name: Initializer name.
        node: Name (or op#index) of the consuming node.
        op: ``MatMul``, ``Gemm`` or ``Conv``.
        K: Reduction size.
        N: Output size.
        wt: ``[N, K]`` float array (the sparse operand ``Wᵀ``), 2:4 groups along the last axis.
        note: How the weight was laid out.
    """

    name: str
    node: str
    op: str
    K: int
    N: int
    wt: np.ndarray = field(repr=False)
    note: str = ""


def is_nm_rows(wt: np.ndarray, n: int = 2, m: int = 4) -> bool:
    """True if every group of ``m`` consecutive entries along the last axis has ≤ ``n`` non-zeros."""
    if wt.ndim != 2 or wt.shape[1] % m:
        return False
    groups = np.asarray(wt).reshape(wt.shape[0], wt.shape[1] // m, m)
    return bool((np.count_nonzero(groups, axis=2) <= n).all())


def prune_rows_24(wt: np.ndarray) -> np.ndarray:
    """Magnitude 2:4 along the last axis (keep the two largest |w| of every 4); returns a copy."""
    rows, k = wt.shape
    if k % 4:
        raise ValueError(f"K={k} is not a multiple of 4")
    g = np.array(wt, dtype=np.float32).reshape(rows, k // 4, 4)
    order = np.argsort(np.abs(g), axis=2)
    np.put_along_axis(g, order[:, :, :2], 0.0, axis=2)
    return g.reshape(rows, k)


def random_24(rng: np.random.Generator, n: int, k: int, scale: float | None = None) -> np.ndarray:
    """A random ``[n, k]`` float32 weight with exactly 2 non-zeros per 4 along the last axis."""
    scale = scale if scale is not None else 1.0 / math.sqrt(k)
    if k % 4:
        raise ValueError(f"K={k} is not a multiple of 4")
    w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(scale)
    patterns = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=bool)
    mask = patterns[rng.integers(0, 6, size=(n, k // 4))].reshape(n, k)
    w[~mask] = 0.0
    w[mask & (w == 0)] = np.float32(scale)  # keep exactly two non-zeros per group
    return w


def _const_source(name: str, inits: dict[str, Any], producers: dict[str, Any]) -> tuple[str | None, list[str]]:
    """Follow ``Transpose``/``Cast``/``Identity`` back to an initializer; returns (init, ops)."""
    ops: list[str] = []
    cur = name
    for _ in range(4):
        if cur in inits:
            return cur, ops
        node = producers.get(cur)
        if node is None or node.op_type not in ("Transpose", "Cast", "Identity"):
            return None, ops
        if node.op_type == "Transpose":
            perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
            if perm and perm[0] != [1, 0]:
                return None, ops
            ops.append("Transpose")
        cur = node.input[0]
    return None, ops


def find_gemm_weights(model_path: str | os.PathLike[str]) -> tuple[list[GemmWeight], list[dict[str, str]]]:
    """Read an ONNX model and return its constant GEMM weights (sparse-operand layout).

    Returns:
        The weights, and the skipped layers as ``{"node", "op", "reason"}`` dicts.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=True)
    graph = model.graph
    graph_inputs = {i.name for i in graph.input}
    inits = {t.name: t for t in graph.initializer if t.name not in graph_inputs}
    producers = {o: n for n in graph.node for o in n.output}
    # Constant nodes count as initializers
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    inits[n.output[0]] = a.t
    out: list[GemmWeight] = []
    skipped: list[dict[str, str]] = []
    arrays: dict[str, np.ndarray] = {}

    def arr(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    for idx, node in enumerate(graph.node):
        label = node.name or f"{node.op_type}#{idx}"
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        src, via = _const_source(node.input[1], inits, producers)
        if src is None:
            skipped.append({"node": label, "op": node.op_type, "reason": "weight is not a constant"})
            continue
        w = arr(src)
        if w.dtype.kind != "f":
            skipped.append({"node": label, "op": node.op_type, "reason": f"weight dtype {w.dtype} (quantized?)"})
            continue
        if "Transpose" in via:
            w = w.T
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMul":
            if w.ndim != 2:
                skipped.append({"node": label, "op": "MatMul", "reason": f"weight rank {w.ndim} (not 2-D)"})
                continue
            wt, note = w.T, "W[K,N] -> W.T"
        elif node.op_type == "Gemm":
            if w.ndim != 2:
                skipped.append({"node": label, "op": "Gemm", "reason": f"weight rank {w.ndim}"})
                continue
            if int(attrs.get("transA", 0)):
                skipped.append({"node": label, "op": "Gemm", "reason": "transA=1"})
                continue
            trans_b = int(attrs.get("transB", 0))
            wt, note = (w, "B[N,K] (transB)") if trans_b else (w.T, "B[K,N] -> B.T")
        else:
            if int(attrs.get("group", 1)) != 1:
                skipped.append({"node": label, "op": "Conv", "reason": f"grouped conv (group={attrs.get('group')})"})
                continue
            if w.ndim < 3:
                skipped.append({"node": label, "op": "Conv", "reason": f"weight rank {w.ndim}"})
                continue
            n_out, c_in = w.shape[0], w.shape[1]
            # [N, C, *k] -> [N, *k, C] -> [N, prod(k)*C]: 2:4 groups along C become contiguous
            wt = np.moveaxis(w, 1, -1).reshape(n_out, -1)
            note = f"Conv [N,C,k..] -> [N,k..,C], C={c_in}"
        wt = np.ascontiguousarray(wt)
        out.append(GemmWeight(src, label, node.op_type, int(wt.shape[1]), int(wt.shape[0]), wt, note))
    return out, skipped


def find_gemm_weights_onnxprune(model_path: str | os.PathLike[str]) -> tuple[list[GemmWeight], list[dict[str, str]]]:
    """The same as :func:`find_gemm_weights`, through ``onnxprune.analysis.weights``.

    That analysis also traces weights through Reshape and DequantizeLinear and merges shared
    initializers. The weight is laid out with N first and K last (``[N, ..., K]`` flattened to
    ``[N, rest]``), so for Conv the rows are ``(kh, kw, C)`` with C innermost.

    Raises:
        ImportError: onnxprune is not importable.
    """
    import onnxprune
    from onnxprune.analysis.weights import find_weights
    from onnxprune.tensorrt.eligibility import trt_sparse_reason

    model = onnxprune.load(model_path)
    out: list[GemmWeight] = []
    skipped: list[dict[str, str]] = []
    for info in find_weights(model):
        label = info.nodes[0] if info.nodes else info.name
        found = trt_sparse_reason(info)
        reason = found.message if found else None
        if reason is None and info.op_type not in ("MatMul", "Gemm", "Conv"):
            reason = f"{info.op_type} is not timed here"
        if reason is None and (info.n_axis is None or info.quant is not None or not info.dtype.startswith(("float", "bfloat"))):
            reason = "no N axis" if info.n_axis is None else f"weight dtype {info.dtype} (quantized?)"
        if reason is not None or info.k_axis is None or info.n_axis is None:
            skipped.append({"node": label, "op": info.op_type, "reason": reason or "no K/N axis"})
            continue
        arr = np.asarray(model.get_array(info.name))
        moved = np.moveaxis(arr, [info.n_axis, info.k_axis], [0, -1])
        wt = np.ascontiguousarray(moved.reshape(moved.shape[0], -1), dtype=np.float32)
        note = f"onnxprune: shape {list(info.shape)} K axis {info.k_axis} N axis {info.n_axis}"
        if len(info.shape) > 2:
            note += " (rows: spatial..., K innermost)"
        out.append(GemmWeight(info.name, label, info.op_type, int(wt.shape[1]), int(wt.shape[0]), wt, note))
    return out, skipped


def load_weights(model_path: str | os.PathLike[str], finder: str = "auto") -> tuple[list[GemmWeight], list[dict[str, str]], str]:
    """Find the weights with onnxprune's analysis (``auto``: when importable) or the built-in finder."""
    if finder in ("auto", "onnxprune"):
        try:
            weights, skipped = find_gemm_weights_onnxprune(model_path)
            return weights, skipped, "onnxprune"
        except ImportError:
            if finder == "onnxprune":
                raise
    weights, skipped = find_gemm_weights(model_path)
    return weights, skipped, "builtin"


def display_name(w: GemmWeight) -> str:
    """A readable layer name: the node name without exporter wrapper prefixes."""
    name = w.node or w.name
    for prefix in ("/inner/", "/model/"):
        if name.startswith(prefix):
            name = "/" + name[len(prefix):]
    return name


def self_test_weights(seed: int = 0, shapes: list[tuple[str, int, int]] | None = None) -> list[GemmWeight]:
    """Random 2:4 weights for the BERT-base and Llama-7B GEMM shapes."""
    rng = np.random.default_rng(seed)
    out = []
    for name, k, n in shapes or (BERT_SHAPES + LLAMA_SHAPES):
        out.append(GemmWeight(name, name, "MatMul", k, n, random_24(rng, n, k), "random 2:4"))
    return out


# ---------------------------------------------------------------------- results
@dataclass
class LayerResult:
    """One layer at one token count."""

    name: str
    op: str
    K: int
    N: int
    M: int
    flops: float
    dense_us: float | None = None
    sparse_us: float | None = None
    speedup: float | None = None
    max_err: float | None = None
    ok: bool | None = None
    dense_variant: str = ""
    sparse_variant: str = ""
    timing: str = ""
    int8: dict[str, Any] | None = None
    error: str | None = None


def summarize(results: list[LayerResult]) -> dict[str, dict[str, Any]]:
    """Per token count: FLOP-weighted and total-time speedups over the layers that ran."""
    by_m: dict[int, list[LayerResult]] = {}
    for r in results:
        if r.dense_us and r.sparse_us:
            by_m.setdefault(r.M, []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for m, rs in sorted(by_m.items()):
        flops = np.array([r.flops for r in rs])
        sp = np.array([r.dense_us / r.sparse_us for r in rs])
        dense = sum(r.dense_us for r in rs)
        sparse = sum(r.sparse_us for r in rs)
        out[str(m)] = {
            "layers": len(rs),
            "flop_weighted_speedup": float((flops * sp).sum() / flops.sum()),
            "time_speedup": float(dense / sparse),
            "dense_us_total": float(dense),
            "sparse_us_total": float(sparse),
            "min_speedup": float(sp.min()),
            "max_speedup": float(sp.max()),
            "all_ok": all(bool(r.ok) for r in rs),
        }
    return out


def format_table(results: list[LayerResult]) -> str:
    """Per-layer table."""
    head = (f"{'layer':<44} {'K':>6} {'N':>6} {'M':>6} {'dense µs':>10} {'sparse µs':>10} "
            f"{'speedup':>8} {'max err':>9} {'int8 µs':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        name = r.name if len(r.name) <= 44 else "..." + r.name[-41:]
        if r.error and r.sparse_us is None:
            lines.append(f"{name:<44} {r.K:>6} {r.N:>6} {r.M:>6}  error: {r.error[:80]}")
            continue
        d = f"{r.dense_us:10.2f}" if r.dense_us else f"{'-':>10}"
        s = f"{r.sparse_us:10.2f}" if r.sparse_us else f"{'-':>10}"
        speed = r.speedup or (r.dense_us / r.sparse_us if r.dense_us and r.sparse_us else None)
        sp = f"{speed:8.3f}" if speed else f"{'-':>8}"
        e = f"{r.max_err:9.2e}" if r.max_err is not None else f"{'-':>9}"
        i8 = r.int8.get("sparse_us") if r.int8 else None
        i8s = f"{i8:9.2f}" if isinstance(i8, float) else f"{'-':>9}"
        flag = "" if r.ok in (True, None) else "  MISMATCH"
        lines.append(f"{name:<44} {r.K:>6} {r.N:>6} {r.M:>6} {d} {s} {sp} {e} {i8s}{flag}")
    return "\n".join(lines)


def format_markdown(doc: dict[str, Any]) -> str:
    """A README-ready markdown summary of a results document: per distinct (K, N) and M the median
    dense/sparse kernel time and speedup, then the FLOP-weighted speedup per M, with the device."""
    env = doc.get("env", {})
    layers = [r for r in doc.get("layers", []) if r.get("dense_us") and r.get("sparse_us")]
    groups: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for r in layers:
        groups.setdefault((r["K"], r["N"], r["M"]), []).append(r)
    lines = [f"Device: {env.get('device', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
             f"cuSPARSELt {env.get('cusparselt', '?')}; source: {doc.get('source', '?')}; "
             f"{str(doc.get('options', {}).get('dtype', 'fp16')).upper()}, kernel time from "
             "CUDA-graph replays.", "",
             "| K x N | layers | M (tokens) | dense µs | 2:4 sparse µs | speedup | max rel err |",
             "|---|---|---|---|---|---|---|"]
    for (k, n, m), rs in sorted(groups.items()):
        d = statistics.median(r["dense_us"] for r in rs)
        sp = statistics.median(r["sparse_us"] for r in rs)
        err = max(r["max_err"] or 0.0 for r in rs)
        lines.append(f"| {k}x{n} | {len(rs)} | {m} | {d:.1f} | {sp:.1f} | {d / sp:.2f} | {err:.1e} |")
    lines += ["", "| M (tokens) | FLOP-weighted speedup | total GEMM time dense / sparse µs |", "|---|---|---|"]
    for m, srow in doc.get("summary", {}).items():
        lines.append(f"| {m} | {srow['flop_weighted_speedup']:.2f} | {srow['dense_us_total']:.0f} / "
                     f"{srow['sparse_us_total']:.0f} ({srow['time_speedup']:.2f}x) |")
    return "\n".join(lines)


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
    """Summary lines per token count."""
    lines = []
    for m, s in summary.items():
        lines.append(f"M={m:>6}: {s['layers']} layers, FLOP-weighted speedup {s['flop_weighted_speedup']:.3f}, "
                     f"total GEMM time {s['dense_us_total']:.1f} µs dense / {s['sparse_us_total']:.1f} µs sparse "
                     f"= {s['time_speedup']:.3f}x (per-layer {s['min_speedup']:.2f}..{s['max_speedup']:.2f}), "
                     f"all checks ok: {s['all_ok']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- GPU side
def _torch() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available: this check needs an NVIDIA GPU with sparse tensor cores")
    return torch


def environment() -> dict[str, Any]:
    """What ran the check."""
    env: dict[str, Any] = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name(0)
            env["capability"] = list(torch.cuda.get_device_capability(0))
        try:
            env["cusparselt"] = torch.backends.cusparselt.version()
        except Exception:  # noqa: BLE001
            env["cusparselt"] = None
        env["has_cslt"] = hasattr(torch, "_cslt_compress")
        env["fp16_reduced_precision_reduction"] = bool(torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction)
    except ImportError:
        env["torch"] = None
    return env


def time_cuda_graph(torch: Any, fn: Callable[[], Any], inner: int, target_ms: float, repeats: int) -> tuple[float, str]:
    """Microseconds per call of ``fn``: CUDA-graph capture of ``inner`` calls, replayed.

    Falls back to eager timing with events (marked ``eager``) if capture fails.
    """
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    cur.wait_stream(side)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        est = max(start.elapsed_time(end), 1e-3)
        reps = int(min(5000, max(3, math.ceil(target_ms / est))))
        samples = []
        for _ in range(repeats):
            start.record()
            for _ in range(reps):
                graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1000.0 / (reps * inner))
        del graph
        return statistics.median(samples), f"cuda-graph {inner}x{reps}x{repeats}"
    except Exception as exc:  # noqa: BLE001
        torch.cuda.synchronize()
        n = 50
        samples = []
        for _ in range(repeats):
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1000.0 / n)
        return statistics.median(samples), f"eager (graph capture failed: {type(exc).__name__}: {exc})"[:200]


class SparseOperand:
    """A compressed 2:4 operand ``Wᵀ[N, K]`` and how to multiply it by a dense ``[K, M]``.

    A *plan* is the keyword arguments of ``torch._cslt_sparse_mm`` that select the kernel:
    ``{}`` (cuSPARSELt's default algorithm) or what ``torch._C._cusparselt.mm_search`` (or the
    older ``torch._cslt_sparse_mm_search``, which reports only the algorithm id) found best.
    """

    def __init__(self, torch: Any, wt16: Any) -> None:
        self.torch = torch
        self.backend = "cslt" if hasattr(torch, "_cslt_compress") else "semi_structured"
        if self.backend == "cslt":
            self.packed = torch._cslt_compress(wt16)
        else:
            from torch.sparse import to_sparse_semi_structured

            self.packed = to_sparse_semi_structured(wt16)
        self._argnames = self._schema_args(torch)

    @staticmethod
    def _schema_args(torch: Any) -> set[str]:
        try:
            schemas = torch._C._jit_get_schemas_for_operator("aten::_cslt_sparse_mm")
            return {a.name for a in schemas[0].arguments}
        except Exception:  # noqa: BLE001
            return {"alg_id"}

    def mm(self, b: Any, plan: dict[str, Any] | None = None) -> Any:
        """``Wᵀ @ b`` with the kernel chosen by ``plan``."""
        if self.backend == "cslt":
            return self.torch._cslt_sparse_mm(self.packed, b, **(plan or {}))
        return self.torch.mm(self.packed, b)

    def search(self, b: Any) -> dict[str, Any]:
        """The best plan for this operand pair ({} if no search is available or it fails)."""
        if self.backend != "cslt":
            return {}
        mm_search = getattr(getattr(getattr(self.torch, "_C", None), "_cusparselt", None), "mm_search", None)
        if mm_search is not None:
            try:
                found = tuple(mm_search(self.packed, b, None, None, None, False))
                plan: dict[str, Any] = {"alg_id": int(found[0])}
                if len(found) > 1 and "split_k" in self._argnames:
                    plan["split_k"] = int(found[1])
                if len(found) > 2:
                    if "split_k_mode" in self._argnames:
                        plan["split_k_mode"] = int(found[2])
                    elif "split_k_one_kernel" in self._argnames:
                        plan["split_k_one_kernel"] = bool(found[2])
                self.mm(b, plan)  # the plan must run
                return plan
            except Exception:  # noqa: BLE001 - fall back to the older search
                pass
        if hasattr(self.torch, "_cslt_sparse_mm_search"):
            try:
                return {"alg_id": int(self.torch._cslt_sparse_mm_search(self.packed, b))}
            except Exception:  # noqa: BLE001
                return {}
        return {}


def _plan_label(plan: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in plan.items()) or "default"


def _dtype(torch: Any, name: str) -> Any:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _rel_err(torch: Any, got: Any, ref: Any) -> float:
    ref32 = ref.float()
    scale = ref32.abs().max().item()
    diff = (got.float() - ref32).abs().max().item()
    return diff / scale if scale > 0 else diff


def run_layer(torch: Any, w: GemmWeight, m: int, xs: dict[tuple[int, int], Any], args: argparse.Namespace) -> LayerResult:
    """Verify and time one weight at ``m`` tokens."""
    res = LayerResult(display_name(w), w.op, w.K, w.N, m, 2.0 * m * w.K * w.N)
    dev = torch.device("cuda")
    dt = _dtype(torch, getattr(args, "dtype", "fp16"))
    wt = torch.from_numpy(np.array(w.wt, dtype=np.float32)).to(dev, dt)
    key = (m, w.K)
    if key not in xs:
        gen = torch.Generator(device=dev).manual_seed(1234 + m + w.K)
        xs[key] = torch.randn(m, w.K, device=dev, dtype=dt, generator=gen)
    x = xs[key]
    xt = x.t()  # [K, M] column-major view
    w_kn = wt.t().contiguous()  # [K, N]
    # dense: best of the two orientations
    y_dense_t = torch.mm(wt, xt)  # [N, M]
    out_a = torch.empty(m, w.N, device=dev, dtype=dt)
    out_b = torch.empty(w.N, m, device=dev, dtype=dt)
    t_a, how_a = time_cuda_graph(torch, lambda: torch.mm(x, w_kn, out=out_a), args.inner, args.target_ms, args.repeats)
    t_b, how_b = time_cuda_graph(torch, lambda: torch.mm(wt, xt, out=out_b), args.inner, args.target_ms, args.repeats)
    res.dense_us, res.dense_variant = (t_a, "x@W") if t_a <= t_b else (t_b, "Wt@xt")
    timings = [how_a, how_b]
    del out_a, out_b
    # sparse
    sp = SparseOperand(torch, wt)
    best: tuple[float, str] | None = None
    errs: list[str] = []
    err_val: float | None = None
    layouts = [("xt_view", xt), ("xt_contig", None)]
    for lname, b in layouts:
        try:
            if b is None:
                b = xt.contiguous()
            plans: list[dict[str, Any]] = [{}]
            if args.search:
                found = sp.search(b)
                if found and found != {"alg_id": 0}:
                    plans.append(found)
            for plan in plans:
                y = sp.mm(b, plan)
                e = _rel_err(torch, y, y_dense_t)
                err_val = e if err_val is None else max(err_val, e)
                t, how = time_cuda_graph(torch, lambda bb=b, pl=plan: sp.mm(bb, pl), args.inner, args.target_ms,
                                         args.repeats)
                timings.append(how)
                if best is None or t < best[0]:
                    best = (t, f"{sp.backend}:{lname}:{_plan_label(plan)}")
        except Exception as exc:  # noqa: BLE001
            errs.append(f"{lname}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    if best is not None:
        res.sparse_us, res.sparse_variant = best
        res.speedup = res.dense_us / res.sparse_us if res.dense_us else None
        res.max_err = err_val
        res.ok = err_val is not None and err_val <= args.rtol
    if errs:
        res.error = "; ".join(errs)
    res.timing = timings[0] if all(t == timings[0] for t in timings) else " | ".join(sorted(set(timings)))
    if args.int8:
        res.int8 = run_int8(torch, w, m, args)
    del sp
    return res


def verify_layer(torch: Any, w: GemmWeight, m: int, xs: dict[tuple[int, int], Any], dtype: str = "fp16") -> float:
    """max |sparse - dense| / max |dense| of one weight at ``m`` tokens (no timing)."""
    dev = torch.device("cuda")
    dt = _dtype(torch, dtype)
    wt = torch.from_numpy(np.array(w.wt, dtype=np.float32)).to(dev, dt)
    key = (m, w.K)
    if key not in xs:
        gen = torch.Generator(device=dev).manual_seed(1234 + m + w.K)
        xs[key] = torch.randn(m, w.K, device=dev, dtype=dt, generator=gen)
    xt = xs[key].t()
    ref = torch.mm(wt, xt)
    sp = SparseOperand(torch, wt)
    try:
        y = sp.mm(xt)
    except Exception:  # noqa: BLE001 - some builds want a contiguous dense operand
        y = sp.mm(xt.contiguous())
    return _rel_err(torch, y, ref)


def run_int8(torch: Any, w: GemmWeight, m: int, args: argparse.Namespace) -> dict[str, Any]:
    """INT8 sparse GEMM (column-major dense operand); errors are returned, not raised."""
    out: dict[str, Any] = {}
    try:
        dev = torch.device("cuda")
        wt = torch.from_numpy(np.array(w.wt, dtype=np.float32)).to(dev)
        scale = wt.abs().max().clamp(min=1e-12) / 127.0
        wq = torch.round(wt / scale).clamp(-127, 127).to(torch.int8).contiguous()  # zeros stay zeros
        gen = torch.Generator(device=dev).manual_seed(99 + m)
        xq = torch.randint(-64, 64, (m, w.K), device=dev, dtype=torch.int8, generator=gen)
        xqt = xq.t()  # [K, M] column-major (required by cuSPARSELt for INT8)
        packed = torch._cslt_compress(wq)
        y = None
        for od in (torch.int32, None, torch.float16):
            try:
                y = torch._cslt_sparse_mm(packed, xqt, out_dtype=od) if od is not None else \
                    torch._cslt_sparse_mm(packed, xqt)
                out["out_dtype"] = str(od or y.dtype)
                break
            except Exception as exc:  # noqa: BLE001
                out.setdefault("tries", []).append(f"{od}: {type(exc).__name__}: {str(exc)[:120]}")
        if y is None:
            out["error"] = "no INT8 output type worked"
            return out
        ref = (wq.float() @ xqt.float())  # exact while |sum| < 2^24
        if y.dtype == torch.int8:
            ref = ref.clamp(-128, 127)
        out["max_err"] = _rel_err(torch, y, ref)
        od_final = y.dtype
        t, how = time_cuda_graph(
            torch, lambda: torch._cslt_sparse_mm(packed, xqt, out_dtype=od_final)
            if od_final != torch.int8 else torch._cslt_sparse_mm(packed, xqt),
            args.inner, args.target_ms, args.repeats)
        out["sparse_us"] = t
        out["sparse_tops_dense_equiv"] = 2.0 * m * w.K * w.N / (t * 1e-6) / 1e12
        out["timing"] = how
        try:
            wkn = wq.t().contiguous()
            ti, _ = time_cuda_graph(torch, lambda: torch._int_mm(xq, wkn), args.inner, args.target_ms, args.repeats)
            out["int_mm_us"] = ti
            out["note"] = "torch._int_mm is not a fair dense INT8 baseline"
        except Exception as exc:  # noqa: BLE001
            out["int_mm_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return out


# ---------------------------------------------------------------------- driver
def _parse_tokens(text: str) -> list[int]:
    try:
        toks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--tokens expects comma-separated integers, got {text!r}") from None
    if not toks or any(t <= 0 for t in toks):
        raise SystemExit(f"--tokens expects positive integers, got {text!r}")
    return toks


def select_weights(weights: list[GemmWeight], args: argparse.Namespace) -> tuple[list[GemmWeight], list[dict[str, Any]]]:
    """Keep weights that are (or, with ``--prune``, are made) 2:4 along K; report the rest."""
    keep, rejected = [], []
    for w in weights:
        if w.K % 4 or w.N % 8:
            rejected.append({"name": w.name, "K": w.K, "N": w.N,
                             "reason": f"K % 4 = {w.K % 4}, N % 8 = {w.N % 8} (cuSPARSELt needs K%4 == 0 and N%8 == 0)"})
            continue
        if args.exclude and re.search(args.exclude, display_name(w)):
            rejected.append({"name": w.name, "K": w.K, "N": w.N, "reason": f"matches --exclude {args.exclude!r}"})
            continue
        if w.K < args.min_k or w.N < args.min_n:
            rejected.append({"name": w.name, "K": w.K, "N": w.N, "reason": "below --min-k/--min-n"})
            continue
        if not is_nm_rows(w.wt):
            if args.prune:
                w.wt = prune_rows_24(w.wt)
                w.note += "; pruned 2:4 by this script (--prune)"
            else:
                rejected.append({"name": w.name, "K": w.K, "N": w.N, "reason": "not 2:4 along K (use --prune to force)"})
                continue
        keep.append(w)
    if args.max_layers:
        keep = keep[: args.max_layers]
    return keep, rejected


def _write_json(path: str | None, doc: dict[str, Any]) -> None:
    if not path:
        return
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, p)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="pruned .onnx (2:4 along K)")
    p.add_argument("--self-test", action="store_true", help="random 2:4 weights of BERT-base and Llama-7B shapes")
    p.add_argument("--tokens", default="512,4096,16384", help="comma-separated token counts M")
    p.add_argument("--json", help="write results here (updated after every layer)")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="floating-point GEMM type")
    p.add_argument("--int8", action="store_true", help="also time INT8 sparse GEMMs (failures reported)")
    p.add_argument("--no-search", dest="search", action="store_false", help="skip cuSPARSELt algorithm search")
    p.add_argument("--prune", action="store_true", help="make non-2:4 weights 2:4 (magnitude) instead of skipping")
    p.add_argument("--dedupe", action="store_true", help="time each distinct (K,N) once (all weights still listed)")
    p.add_argument("--max-layers", type=int, default=0, help="time at most this many weights (0: all)")
    p.add_argument("--exclude", default="", help="regex on layer names to leave out (e.g. 'pooler': the BERT "
                   "pooler sees one row per sequence, not --tokens rows)")
    p.add_argument("--min-k", type=int, default=0)
    p.add_argument("--min-n", type=int, default=0)
    p.add_argument("--inner", type=int, default=20, help="GEMMs per captured CUDA graph")
    p.add_argument("--target-ms", type=float, default=20.0, help="GPU time per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks (median kept)")
    p.add_argument("--rtol", type=float, default=2e-2, help="max |sparse-dense| / max |dense| accepted")
    p.add_argument("--finder", choices=("auto", "onnxprune", "builtin"), default="auto",
                   help="weight finder: onnxprune.analysis.weights (auto: when importable) or the built-in one")
    p.add_argument("--from-json", metavar="PATH", help="print the markdown summary of an earlier --json result and exit")
    p.add_argument("--list", action="store_true", help="list eligible weights and exit (no GPU needed)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.from_json:
        print(format_markdown(json.loads(Path(args.from_json).read_text())))
        return 0
    tokens = _parse_tokens(args.tokens)
    if args.self_test:
        weights, skipped, source = self_test_weights(), [], "self-test"
    elif args.model:
        weights, skipped, finder = load_weights(args.model, args.finder)
        source = str(args.model)
        print(f"weights found with the {finder} finder", flush=True)
    else:
        print("give a model path or --self-test", file=sys.stderr)
        return 2
    chosen, rejected = select_weights(weights, args)
    print(f"{source}: {len(weights)} constant GEMM weights, {len(chosen)} 2:4-eligible, "
          f"{len(rejected)} rejected, {len(skipped)} layers skipped", flush=True)
    for r in rejected[:20]:
        print(f"  rejected {r['name']} [{r['K']}x{r['N']}]: {r['reason']}")
    if len(rejected) > 20:
        print(f"  ... {len(rejected) - 20} more rejected")
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[f"{s['op']}: {s['reason']}"] = reasons.get(f"{s['op']}: {s['reason']}", 0) + 1
    for why, cnt in sorted(reasons.items()):
        print(f"  skipped {cnt} x {why}")
    if args.list:
        for w in chosen:
            print(f"  {display_name(w):<56} {w.op:<7} K={w.K:<6} N={w.N:<6} {w.note}")
        return 0
    doc: dict[str, Any] = {"source": source, "tokens": tokens, "env": environment(),
                           "options": {k: v for k, v in vars(args).items()},
                           "rejected": rejected, "skipped": skipped, "layers": [], "summary": {}}
    try:
        torch = _torch()
    except Exception as exc:  # noqa: BLE001
        doc["error"] = str(exc)
        _write_json(args.json, doc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"device: {doc['env'].get('device')}  torch {doc['env'].get('torch')}  cuda {doc['env'].get('cuda')}  "
          f"cuSPARSELt {doc['env'].get('cusparselt')}", flush=True)
    results: list[LayerResult] = []
    t0 = time.perf_counter()
    for m in tokens:
        xs: dict[tuple[int, int], Any] = {}
        seen: dict[tuple[int, int], LayerResult] = {}
        for w in chosen:
            if args.dedupe and (w.K, w.N) in seen:
                ref = seen[(w.K, w.N)]
                r = LayerResult(**{**asdict(ref), "name": display_name(w), "op": w.op})
                r.timing = f"timing copied from {ref.name} (--dedupe)"
                try:  # the result is still checked for this weight
                    r.max_err = verify_layer(torch, w, m, xs, args.dtype)
                    r.ok = r.max_err <= args.rtol
                except Exception as exc:  # noqa: BLE001
                    r.ok, r.error = False, f"verify: {type(exc).__name__}: {str(exc)[:160]}"
            else:
                try:
                    r = run_layer(torch, w, m, xs, args)
                except Exception as exc:  # noqa: BLE001
                    r = LayerResult(display_name(w), w.op, w.K, w.N, m, 2.0 * m * w.K * w.N,
                                    error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
                    if os.environ.get("SPARSE_CHECK_DEBUG"):
                        traceback.print_exc()
                    if "out of memory" in str(exc).lower():
                        torch.cuda.empty_cache()
                seen[(w.K, w.N)] = r
            results.append(r)
            sp = f"{r.speedup:.3f}x" if r.speedup else "-"
            print(f"  M={m:<6} {r.name[-50:]:<50} K={w.K:<6} N={w.N:<6} dense {r.dense_us or 0:9.2f} µs  "
                  f"sparse {r.sparse_us or 0:9.2f} µs  {sp:>7}  err {r.max_err if r.max_err is not None else '-'}"
                  f"{'  ERROR ' + r.error if r.error else ''}", flush=True)
            doc["layers"] = [asdict(x) for x in results]
            doc["summary"] = summarize(results)
            doc["seconds"] = time.perf_counter() - t0
            _write_json(args.json, doc)
        del xs
        torch.cuda.empty_cache()
    print()
    print(format_table(results))
    print()
    print(format_summary(doc["summary"]))
    print()
    print(format_markdown(doc))
    failed = [r for r in results if r.ok is False]
    if failed:
        print(f"\n{len(failed)} layer(s) exceeded rtol={args.rtol}", file=sys.stderr)
    return 0 if results and not failed and any(r.sparse_us for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
