"""Wall time, CPU time and peak memory of each pass on large models, through the CLI.

For every model and pass, ``onnxprune optimize MODEL -o OUT --passes PASS`` (``inspect`` for the
``inspect`` row) runs in a subprocess; its rusage comes from ``os.wait4`` on that child alone:
wall seconds, CPU seconds (user + sys) and peak resident set (``ru_maxrss``, which counts touched
pages of memory-mapped files too). Then a separate subprocess verifies the output with ONNX Runtime
(CPU, graph optimisations off, no pre-packing) on ``--tokens`` tokens: it must load, give logits
of the right shape that are all finite; the cosine against the input model's logits (one reference
run per model, same settings) is reported. ONNX Runtime itself holds about the model's weights
(twice that for fp16 on CPU, which computes in fp32), so verification has its own RSS column.
``--no-verify`` skips it (models larger than the machine's memory).

Outputs are written to a scratch folder beside ``--workdir`` and deleted after each row. Results
go to ``results/scale_<date>.json`` (merged by model and pass with an existing file) and ``.md``.

Usage: ``python scripts/bench_scale.py /tmp/llm-models/llama-1.5b.onnx --label "1.5B fp32"``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PASSES = ["inspect", "nm(n=2,m=4)", "masks(sparsity=0.5)", "fp16", "heads(ratio=0.25),ffn(ratio=0.25)"]

VERIFY = r"""
import json, sys, numpy as np, onnxruntime as ort
path, tokens, ref = sys.argv[1], int(sys.argv[2]), sys.argv[3]
so = ort.SessionOptions()
so.log_severity_level = 3
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
so.add_session_config_entry("session.disable_prepacking", "1")
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
ids = (np.arange(tokens, dtype=np.int64) * 7 % 97)[None, :]
y = s.run(None, {s.get_inputs()[0].name: ids})[0].astype(np.float64)
out = {"shape": list(y.shape), "finite": bool(np.isfinite(y).all())}
if ref != "-":
    r = np.load(ref).astype(np.float64)
    out["cosine"] = float((y * r).sum() / (np.linalg.norm(y) * np.linalg.norm(r) + 1e-30))
else:
    np.save(path + ".logits.npy", y)
print(json.dumps(out))
"""


def run_measured(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd``; wall, CPU and peak RSS of that child alone (``os.wait4``), rc, output tail."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read().decode(errors="replace")[-1500:]
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 2),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "peak_rss_gb": round(ru.ru_maxrss / 1e6, 3),
            "timed_out": time.perf_counter() > deadline, "tail": tail}


def verify(path: Path, tokens: int, ref: Path | None, timeout: float) -> dict:
    """Run the model on ONNX Runtime in a subprocess; measured like a pass."""
    r = run_measured([sys.executable, "-c", VERIFY, str(path), str(tokens), str(ref) if ref else "-"], timeout)
    out = {"verify_wall_s": r["wall_s"], "verify_peak_rss_gb": r["peak_rss_gb"], "verify_rc": r["rc"]}
    if r["rc"] == 0:
        out.update(json.loads(r["tail"].strip().splitlines()[-1]))
    else:
        out["verify_error"] = r["tail"][-400:]
    return out


def bench_model(model: Path, label: str, passes: list[str], args: argparse.Namespace) -> list[dict]:
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.workdir))
    try:
        ref = None
        if args.verify:
            info = verify(model, args.tokens, None, args.timeout)
            ref = Path(str(model) + ".logits.npy") if info.get("verify_rc") == 0 else None
            rows.append({"model": label, "pass": "input (ONNX Runtime reference)", **info})
            print(json.dumps(rows[-1]), flush=True)
        for p in passes:
            out = work / "out.onnx"
            if p == "inspect":
                cmd = ["onnxprune", "inspect", str(model)]
            else:
                cmd = ["onnxprune", "optimize", str(model), "-o", str(out), "--passes", p]
            r = run_measured(cmd, args.timeout)
            row = {"model": label, "pass": p, **{k: r[k] for k in ("rc", "wall_s", "cpu_s", "peak_rss_gb")}}
            if r["rc"] != 0:
                row["error"] = r["tail"][-600:]
            if r["timed_out"]:
                row["error"] = f"stopped after {args.timeout} s"
            if p != "inspect" and r["rc"] == 0:
                row["output_gb"] = round(sum(f.stat().st_size for f in work.iterdir()) / 1e9, 3)
                if args.verify:
                    row.update(verify(out, args.tokens, ref, args.timeout))
            rows.append(row)
            print(json.dumps(row), flush=True)
            for f in work.iterdir():
                f.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.verify:
            Path(str(model) + ".logits.npy").unlink(missing_ok=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | pass | wall s | CPU s | peak RSS GB | verified (ORT, RSS GB, cosine vs input) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "verify_rc" in r:
            ok = "yes" if r.get("finite") else ("not finite" if r.get("verify_rc") == 0 else "failed")
            cos = f", cos {r['cosine']:.4f}" if "cosine" in r else ""
            ver = f"{ok} ({r['verify_peak_rss_gb']:.1f}{cos})"
        else:
            ver = "not run"
        if r["pass"].startswith("input"):
            lines.append(f"| {r['model']} | {r['pass']} | {r['verify_wall_s']} | | | {ver} |")
            continue
        status = "" if r.get("rc") == 0 else " **failed**"
        lines.append(f"| {r['model']} | `{r['pass']}`{status} | {r['wall_s']} | {r['cpu_s']} | "
                     f"{r['peak_rss_gb']:.2f} | {ver if r['pass'] != 'inspect' else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--label", action="append", help="label per model (default: file name)")
    p.add_argument("--passes", action="append", help=f"pass to run (repeatable; default {DEFAULT_PASSES})")
    p.add_argument("--tokens", type=int, default=4, help="tokens of the verification input")
    p.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    p.add_argument("--workdir", default=None, help="folder for the outputs (default: beside the model)")
    p.add_argument("--results", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    labels = args.label or [m.name for m in args.models]
    date = dt.date.today().isoformat()
    json_path = args.results / f"scale_{date}.json"
    old = json.loads(json_path.read_text())["rows"] if json_path.exists() else []
    rows = []
    for model, label in zip(args.models, labels):
        args.workdir = args.workdir or str(model.parent)
        rows += bench_model(model, label, args.passes or DEFAULT_PASSES, args)
    keys = {(r["model"], r["pass"]) for r in rows}
    merged = [r for r in old if (r["model"], r["pass"]) not in keys] + rows
    meta = {"date": date, "cpus": os.cpu_count(), "tokens": args.tokens,
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)}
    json_path.write_text(json.dumps({"meta": meta, "rows": merged}, indent=1) + "\n")
    json_path.with_suffix(".md").write_text(
        f"# Scale benchmark {date}\n\n{meta['cpus']} CPUs, {meta['ram_gb']} GB RAM; `python scripts/bench_scale.py`; "
        f"verification on {args.tokens} tokens.\n\n" + markdown(merged))
    print(markdown(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
