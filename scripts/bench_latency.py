"""Time two ONNX models on ONNX Runtime CPU and compare latency with FLOPs (a wrapper of ``onnxprune.bench``).

Usage::

    python scripts/bench_latency.py A.onnx B.onnx [--threads 2] [--runs 30] [--warmup 5]
                                    [--dim batch=1 --dim h=224 ...] [--inputs data.npz] [--json]

The timing (same session options, warm-up, interleaved A/B runs, median and IQR) and the FLOPs
count live in :mod:`onnxprune.bench`; inputs are ``--inputs`` or synthesised by
:func:`onnxprune.check.synthesize_feeds`. ``onnxprune bench`` is the same measurement from the CLI;
this script adds the FLOPs ratio and keeps the dict that ``bench_bert_structured.py`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import onnx

from onnxprune.bench import flops, measure, speedup
from onnxprune.check import load_feeds, make_session, synthesize_feeds


def bench(a: str, b: str, threads: int = 2, runs: int = 30, warmup: int = 5,
          dims: dict[str, int] | None = None, inputs: str | None = None) -> dict[str, Any]:
    """Interleaved median latency of two models; returns a JSON-ready dict."""
    dims = dims or {}
    hints = onnx.load(a, load_external_data=False)
    feeds = load_feeds(inputs) if inputs else synthesize_feeds(make_session(a, threads), hints, dims)[0]
    ta, tb = measure([a, b], feeds, threads=threads, warmup=warmup, runs=runs)
    fa, fb = flops(a, dims), flops(b, dims)
    return {"a": a, "b": b, "threads": threads, "runs": runs, "warmup": warmup,
            "inputs": {k: list(v.shape) for k, v in feeds.items()},
            "latency_a": ta.to_dict(), "latency_b": tb.to_dict(), "speedup": speedup(ta, tb),
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
