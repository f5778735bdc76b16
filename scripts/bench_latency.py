"""Time two ONNX models on ONNX Runtime CPU and compare latency with FLOPs.

Usage::

    python scripts/bench_latency.py A.onnx B.onnx [--threads 2] [--runs 30] [--warmup 5]
                                    [--dim batch=1 --dim h=224 ...] [--inputs data.npz] [--json]

Both models get sessions with the same options (intra-op threads, sequential execution, all graph
optimisations) and the same inputs. After ``--warmup`` runs of each, the runs are interleaved
(A, B, A, B, ...) so drift in machine load hits both alike; the median of each is reported with
the interquartile range, plus ``speedup = median(A) / median(B)`` beside the FLOPs ratio.

FLOPs count multiply-adds as 2 and cover Conv (``2*N*C_out*prod(out_spatial)*C_in/group*
prod(kernel)``), ConvTranspose, Gemm (``2*M*N*K``) and MatMul (``2*batch*M*N*K``), with shapes from
ONNX shape inference after fixing the inputs' dynamic dims.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from math import prod
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort


def _fixed_inputs(model: onnx.ModelProto, dims: dict[str, int]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                d.dim_value = dims.get(d.dim_param, 1 if i == 0 else 224)
    return m


def flops(path: str, dims: dict[str, int]) -> int:
    """Multiply-add FLOPs (x2) of Conv/ConvTranspose/Gemm/MatMul for the given input dims."""
    model = onnx.load(path, load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(_fixed_inputs(model, dims))
    g = inferred.graph
    shapes: dict[str, list[int]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    total = 0
    for n in g.node:
        ins = [shapes.get(x) for x in n.input]
        out = shapes.get(n.output[0]) if n.output else None
        if not out or any(v == 0 for v in out):
            continue
        if n.op_type in ("Conv", "ConvTranspose") and ins[1]:
            w = ins[1]
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            if n.op_type == "Conv":
                total += 2 * prod(out) * w[1] * prod(w[2:])
            else:
                x = ins[0] or []  # every input element meets C_out/group * prod(kernel) weights
                total += 2 * prod(x) * w[1] * prod(w[2:]) if x else 0
        elif n.op_type == "Gemm" and ins[0] and ins[1]:
            trans_a = next((a.i for a in n.attribute if a.name == "transA"), 0)
            k = ins[0][0] if trans_a else ins[0][1]
            total += 2 * prod(out) * k
        elif n.op_type == "MatMul" and ins[0]:
            total += 2 * prod(out) * ins[0][-1]
    return int(total)


def _session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _feeds(sess: ort.InferenceSession, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else dims.get(str(d), 1 if k == 0 else 224) for k, d in enumerate(i.shape)]
        if "float" in i.type:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float16 if "16" in i.type else np.float32)
        else:
            feeds[i.name] = np.ones(shape, dtype=np.int64)
    return feeds


def bench(a: str, b: str, threads: int = 2, runs: int = 30, warmup: int = 5,
          dims: dict[str, int] | None = None, inputs: str | None = None) -> dict[str, Any]:
    """Interleaved median latency of two models; returns a JSON-ready dict."""
    dims = dims or {}
    sa, sb = _session(a, threads), _session(b, threads)
    if inputs:
        with np.load(inputs) as data:
            feeds = {k: data[k] for k in data.files}
    else:
        feeds = _feeds(sa, dims)
    for _ in range(warmup):
        sa.run(None, feeds)
        sb.run(None, feeds)
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(runs):
        for sess, acc in ((sa, ta), (sb, tb)):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            acc.append(time.perf_counter() - t0)
    fa, fb = flops(a, dims), flops(b, dims)

    def stats(t: list[float]) -> dict[str, float]:
        q = statistics.quantiles(t, n=4)
        return {"median_ms": 1e3 * statistics.median(t), "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2]}

    ma, mb = statistics.median(ta), statistics.median(tb)
    return {"a": a, "b": b, "threads": threads, "runs": runs, "warmup": warmup,
            "inputs": {k: list(v.shape) for k, v in feeds.items()},
            "latency_a": stats(ta), "latency_b": stats(tb), "speedup": ma / mb,
            "gflops_a": fa / 1e9, "gflops_b": fb / 1e9, "flops_ratio": fa / fb if fb else float("nan")}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="reference model (e.g. dense)")
    p.add_argument("b", help="candidate model (e.g. pruned)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dim", action="append", default=[], help="dynamic dim value, NAME=VALUE")
    p.add_argument("--inputs", help=".npz with the inputs")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    dims = {}
    for d in args.dim:
        k, _, v = d.partition("=")
        dims[k] = int(v)
    r = bench(args.a, args.b, args.threads, args.runs, args.warmup, dims, args.inputs)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    la, lb = r["latency_a"], r["latency_b"]
    print(f"inputs {r['inputs']}  threads {r['threads']}  runs {r['runs']} (interleaved, {r['warmup']} warm-up)")
    print(f"A {r['a']}: {la['median_ms']:.2f} ms  [IQR {la['q1_ms']:.2f}-{la['q3_ms']:.2f}]  {r['gflops_a']:.3f} GFLOPs")
    print(f"B {r['b']}: {lb['median_ms']:.2f} ms  [IQR {lb['q1_ms']:.2f}-{lb['q3_ms']:.2f}]  {r['gflops_b']:.3f} GFLOPs")
    print(f"latency ratio A/B {r['speedup']:.3f}x   FLOPs ratio A/B {r['flops_ratio']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
