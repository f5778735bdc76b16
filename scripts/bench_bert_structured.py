#!/usr/bin/env python3
"""ONNX Runtime CPU latency of BERT-base after head/FFN removal, beside a BERT built narrow.

Exports BERT-base from ``BertConfig()`` (random weights; latency does not depend on the values),
a BERT whose FFN is built narrow from the start (``intermediate_size=1536``), prunes the dense
export with onnxprune (``ffn(ratio=0.5)``, ``heads(ratio=0.25),ffn(ratio=0.25)``,
``heads(ratio=0.5)``) and times every model against the dense one with
``scripts/bench_latency.py``'s interleaved median (same threads, warm-up). The question it
answers: does a structurally pruned graph run as fast as the same architecture built narrow?

Usage::

    python scripts/bench_bert_structured.py OUTDIR [--threads 2] [--runs 50] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

PIPELINES = {
    "ffn50": "ffn(ratio=0.5)",
    "heads25_ffn25": "heads(ratio=0.25),ffn(ratio=0.25)",
    "heads50": "heads(ratio=0.5)",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    from bench_latency import bench
    from export_hf import export_model

    import onnxprune

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    dense = export_model("bert", out / "bert_base.onnx", size="base")
    models = {"narrow_ffn1536": export_model("bert", out / "bert_narrow_ffn1536.onnx", size="base",
                                             config={"intermediate_size": 1536})}
    for name, spec in PIPELINES.items():
        t0 = time.perf_counter()
        result = onnxprune.optimize(onnxprune.load(dense), spec, inplace=True)
        path = out / f"bert_{name}.onnx"
        onnxprune.save(result.model, path)
        print(f"{name}: {spec} in {time.perf_counter() - t0:.1f} s, params "
              f"{result.report.before.parameters:,} -> {result.report.after.parameters:,}", flush=True)
        models[name] = path
    dims = {"batch": 1, "seq": args.seq}
    rows = []
    for name, path in models.items():
        r = bench(str(dense), str(path), threads=args.threads, runs=args.runs, dims=dims)
        r["name"] = name
        rows.append(r)
        print(f"{name:<16} dense {r['latency_a']['median_ms']:7.2f} ms  model {r['latency_b']['median_ms']:7.2f} ms  "
              f"speedup {r['speedup']:.3f}x  FLOPs ratio {r['flops_ratio']:.3f}x", flush=True)
    r = bench(str(models["narrow_ffn1536"]), str(models["ffn50"]), threads=args.threads, runs=args.runs, dims=dims)
    print(f"built-narrow FFN 1536 vs ffn(ratio=0.5): {r['speedup']:.3f}x (1.0 = equally fast)", flush=True)
    rows.append({"name": "narrow_vs_ffn50", **r})
    (out / "bench_bert_structured.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
