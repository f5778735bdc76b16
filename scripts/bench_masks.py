#!/usr/bin/env python3
"""Benchmark the 2:4 pass end to end (load, mask, save) against ``polygraphy surgeon prune``.

Each tool runs in its own child process, so every peak-RSS number is that process's own
(``os.wait4`` rusage ``ru_maxrss``) and the two runs do not share caches or imports:

* **onnxprune**: ``onnxprune.load`` -> ``optimize(model, "nm(n=2,m=4)", inplace=True)`` (the
  pass plus the manager's checker and shape inference) -> ``onnxprune.save``; the child also
  reports the time of each phase;
* **polygraphy** (only when ``polygraphy`` is importable): ``polygraphy surgeon prune MODEL -o OUT``.

Wall and CPU (user + system) times are the children's whole lives (interpreter start and imports
included) for both, so the ratios are fair; on a busy machine the CPU-time ratio is the steadier. Afterwards both outputs are checked for 2:4 along K with onnxprune's own
``inspect_nm`` (the polygraphy output too, as a cross-check of the axes).

Targets (issue 3): at least 30x faster than polygraphy, peak memory below 1.5x the model file size.

Usage::

    python scripts/bench_masks.py MODEL.onnx [--out OUT.onnx] [--no-polygraphy] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _file_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _run_child(cmd: list[str]) -> tuple[float, int, int, str, float]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes, exit code, stdout, CPU seconds)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, proc.returncode, text, usage.ru_utime + usage.ru_stime


def worker(model: str, out: str) -> None:
    """Child process: load, nm(2:4), save; print phase times and own peak RSS as JSON."""
    t0 = time.perf_counter()
    import onnxprune

    t_import = time.perf_counter()
    m = onnxprune.load(model)
    t_load = time.perf_counter()
    res = onnxprune.optimize(m, "nm(n=2,m=4)", inplace=True)
    t_pass = time.perf_counter()
    onnxprune.save(res.model, out)
    t_save = time.perf_counter()
    stats = res.report.passes[0].stats
    print(json.dumps({
        "import_s": t_import - t0, "load_s": t_load - t_import, "mask_s": t_pass - t_load,
        "pass_only_s": res.report.passes[0].seconds, "save_s": t_save - t_pass,
        "weights_pruned": stats.get("weights_pruned"), "params": stats.get("params"),
        "nnz_after": stats.get("nnz_after"),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


def _nm_summary(path: Path) -> dict[str, Any]:
    import onnxprune
    from onnxprune.tensorrt.eligibility import inspect_nm

    return inspect_nm(onnxprune.load(path), 2, 4)["summary"]


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description="time nm(n=2,m=4) end to end vs polygraphy surgeon prune")
    p.add_argument("model")
    p.add_argument("--out", help="output of the onnxprune run (default: a temp file)")
    p.add_argument("--no-polygraphy", action="store_true", help="skip the polygraphy comparison")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        worker(*a._worker)
        return 0
    model = Path(a.model)
    size = _file_size(model)
    tmp = tempfile.TemporaryDirectory(prefix="bench-masks-", dir=str(Path(a.out).parent) if a.out else None)
    out = Path(a.out) if a.out else Path(tmp.name) / "onnxprune.onnx"
    result: dict[str, Any] = {"model": str(model), "model_bytes": size}

    wall, rss, rc, text, cpu = _run_child([sys.executable, __file__, a.model, "--_worker", str(model), str(out)])
    if rc != 0:
        print(text, file=sys.stderr)
        print(f"error: onnxprune run failed (exit {rc})", file=sys.stderr)
        return 1
    inner = json.loads(text.strip().splitlines()[-1])
    result["onnxprune"] = {"wall_s": wall, "cpu_s": cpu, "peak_rss": rss, "rss_over_file": rss / size, **inner,
                           "nm_check": _nm_summary(out)}

    have_poly = importlib.util.find_spec("polygraphy") is not None
    if have_poly and not a.no_polygraphy:
        poly_out = Path(tmp.name) / "polygraphy.onnx"
        exe = Path(sys.executable).with_name("polygraphy")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "polygraphy"]
        wall_p, rss_p, rc_p, text_p, cpu_p = _run_child(cmd + ["surgeon", "prune", str(model), "-o", str(poly_out)])
        if rc_p != 0:
            result["polygraphy"] = {"error": text_p.strip().splitlines()[-5:]}
        else:
            result["polygraphy"] = {"wall_s": wall_p, "cpu_s": cpu_p, "peak_rss": rss_p, "rss_over_file": rss_p / size,
                                    "nm_check": _nm_summary(poly_out)}
            result["speedup"] = wall_p / wall
            result["speedup_cpu"] = cpu_p / cpu
    elif not have_poly:
        result["polygraphy"] = {"error": "polygraphy is not installed (pip install polygraphy)"}

    if a.json:
        print(json.dumps(result, indent=2))
    else:
        o = result["onnxprune"]
        print(f"model {model} ({size / 1e6:.1f} MB)")
        print(f"onnxprune nm(2:4): {o['wall_s']:.2f} s wall, {o['cpu_s']:.2f} s CPU (import {o['import_s']:.2f}, load {o['load_s']:.2f}, "
              f"mask+verify {o['mask_s']:.2f} [pass {o['pass_only_s']:.2f}], save {o['save_s']:.2f}); "
              f"peak RSS {rss / 1e6:.0f} MB = {o['rss_over_file']:.2f}x file; "
              f"{o['weights_pruned']} weights; 2:4 ok {o['nm_check']['ok']}, violate {o['nm_check']['violates']}, "
              f"skipped {o['nm_check']['skipped']}")
        pg = result.get("polygraphy", {})
        if "wall_s" in pg:
            print(f"polygraphy surgeon prune: {pg['wall_s']:.2f} s wall, {pg['cpu_s']:.2f} s CPU; peak RSS {pg['peak_rss'] / 1e6:.0f} MB = "
                  f"{pg['rss_over_file']:.2f}x file; 2:4 ok {pg['nm_check']['ok']}, "
                  f"violate {pg['nm_check']['violates']}")
            print(f"speedup: {result['speedup']:.1f}x wall, {result['speedup_cpu']:.1f}x CPU time (target >= 30x); memory target (< 1.5x file): "
                  f"{'met' if o['rss_over_file'] < 1.5 else 'NOT met'}")
        elif pg:
            print(f"polygraphy: {pg['error']}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
