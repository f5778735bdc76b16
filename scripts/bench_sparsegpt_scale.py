#!/usr/bin/env python3
"""SparseGPT 2:4 on a large Llama-style model: wall, CPU, peak RSS per backend (issue 17).

Each backend runs in its own process (peak RSS is per process): ``onnxprune.optimize`` with
``nm(n=2,m=4,criterion=sparsegpt,backend=B,...)`` on the model, calibration ``--batches`` ×
``--batch`` sequences of ``--seq`` random token ids. The child writes its timings and, for the
comparison between backends, layer 0's and the last layer's pruned weights (``.npz``); the parent
prints one JSON document (and writes it to ``--out``) with, per backend, wall / CPU seconds, peak
RSS, the pass's seconds, and, against the first backend, the share of equal masks and the largest
relative weight difference.

Usage::

    python scripts/make_llama.py 1.5b /tmp/llm-models/llama-1.5b.onnx
    python scripts/bench_sparsegpt_scale.py /tmp/llm-models/llama-1.5b.onnx --backends torch:cuda numpy \\
        --out /tmp/sparsegpt_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> int:
    import onnxprune
    from onnxprune.criteria.backend import resolve

    rng = np.random.default_rng(0)
    calib = [{"input_ids": rng.integers(0, args.vocab, (args.batch, args.seq)).astype(np.int64)}
             for _ in range(args.batches)]
    spec = (f"nm(n=2,m=4,criterion=sparsegpt,backend={args.backend},max_memory={args.max_memory}"
            + (f",exclude={args.exclude}" if args.exclude else "") + ")")
    t0, c0 = time.perf_counter(), time.process_time()
    model = onnxprune.load(args.model)
    result = onnxprune.optimize(model, spec, calibration=calib, inplace=True, verify=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = result.report.passes[0].stats
    names = [t.name for t in model.graph.initializer if t.name in stats.get("weights", {})]
    keep = [n for n in names if ".0." in n or "layers.0" in n or "layer0" in n][:7] + names[-2:]
    np.savez(args.dump, **{n.replace("/", "_"): np.asarray(model.get_array(n)) for n in keep})
    info = {"backend": args.backend, "resolved": str(resolve(args.backend)), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "pass_s": round(float(result.report.passes[0].seconds), 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
            "weights_pruned": stats.get("weights_pruned"), "sparsity_after": stats.get("sparsity_after"),
            "calibration_tokens": args.batches * args.batch * args.seq, "spec": spec}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    except ImportError:
        pass
    info["cpus"] = os.cpu_count()
    Path(args.dump + ".json").write_text(json.dumps(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--backends", nargs="+", default=["auto"])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-memory", default="auto")
    p.add_argument("--exclude", default="lm_head", help="regex of weights left dense (default lm_head)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per backend")
    p.add_argument("--out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--dump", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    rows = []
    ref: dict[str, np.ndarray] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.backends:
            dump = str(Path(tmp) / f"{b.replace(':', '_')}.npz")
            cmd = [sys.executable, __file__, args.model, "--child", "--backend", b, "--dump", dump,
                   "--batches", str(args.batches), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--vocab", str(args.vocab), "--max-memory", args.max_memory, "--exclude", args.exclude]
            try:
                done = subprocess.run(cmd, timeout=args.timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
            except subprocess.TimeoutExpired:
                rows.append({"backend": b, "error": f"not finished in {args.timeout} s"})
                continue
            if done.returncode != 0:
                rows.append({"backend": b, "error": f"exit {done.returncode}"})
                continue
            row = json.loads(Path(dump + ".json").read_text())
            with np.load(dump) as z:
                got = {k: z[k] for k in z.files}
            if ref is None:
                ref = got
            else:
                same = [float(np.mean((got[k] == 0) == (ref[k] == 0))) for k in ref]
                rel = [float(np.max(np.abs(got[k] - ref[k])) / max(float(np.max(np.abs(ref[k]))), 1e-30))
                       for k in ref]
                row["vs_first"] = {"weights_compared": len(ref), "mask_agreement_min": round(min(same), 6),
                                   "max_rel_diff": float(f"{max(rel):.3g}")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {"model": args.model, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
