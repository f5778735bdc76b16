"""Run onnxprune on trained ONNX models that PyPI wheels ship, and report what it did to them.

The corpus is real graphs nobody here wrote (Paddle2ONNX OCR, Silero VAD with nested ``If``,
all-MiniLM-L6-v2, ...). For every ``.onnx`` inside the given wheels and every pipeline, the script
runs the CLI exactly as a user would (``onnxprune optimize IN -o OUT --passes SPEC``), then checks
what a user needs: the exit code, that ONNX Runtime loads the output, that its output shapes
match the input model's, and how far its outputs moved on random inputs (worst cosine over the
outputs), plus parameters before/after. It installs nothing: give wheel files (``pip download
--no-deps NAME`` fetches them) or folders holding ``.onnx`` files.

Usage::

    pip download --no-deps -d /tmp/wheels rapidocr-onnxruntime silero-vad
    python scripts/real_models.py /tmp/wheels/*.whl [--passes SPEC ...] [--json OUT.json]

Random inputs are a weak fidelity check (a pruned model can keep cosine 1.0 on noise and still
lose accuracy); the point here is robustness: no crash, no broken file, no silent no-op.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

DEFAULT_PASSES = ["cleanup", "masks(sparsity=0.5)", "nm(n=2,m=4)", "channels(ratio=0.3)",
                  "heads(ratio=0.25)", "ffn(ratio=0.25)", "fp16"]


def collect_models(sources: list[str], work: Path) -> list[Path]:
    """Every ``.onnx`` in the given wheels (extracted under ``work``) or folders."""
    out: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.suffix == ".whl":
            with zipfile.ZipFile(p) as z:
                for name in z.namelist():
                    if name.endswith(".onnx"):
                        z.extract(name, work / p.stem)
                        out.append(work / p.stem / name)
        elif p.is_dir():
            out.extend(sorted(p.rglob("*.onnx")))
        elif p.suffix == ".onnx":
            out.append(p)
    return out


def run_case(model: Path, spec: str, work: Path) -> dict[str, Any]:
    """One CLI run and the checks on its output."""
    from onnxprune.check import compare
    from onnxprune.ir.load import load
    from onnxprune.summary import count_parameters

    out = work / f"{model.stem}.{abs(hash(spec)) % 10**8}.onnx"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxprune", "optimize", str(model), "-o", str(out), "--passes",
                           spec, "-q"], capture_output=True, text=True)
    row: dict[str, Any] = {"model": model.name, "passes": spec, "exit": proc.returncode,
                           "seconds": round(time.perf_counter() - t0, 2)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        row["verdict"] = "refused" if proc.returncode == 2 else "crashed"
        return row
    row["params_before"] = count_parameters(load(model))
    row["params_after"] = count_parameters(load(out))
    try:
        compare(model, model)
    except Exception as exc:  # noqa: BLE001 - the input itself does not run on synthesized inputs
        row["verdict"] = "unchecked (the input model does not run on synthesized inputs)"
        row["error"] = " ".join(str(exc).split())[:160]
        return row
    try:
        res = compare(model, out)
        row["shapes_match"] = all(o.shape_a == o.shape_b for o in res.outputs)
        row["min_cosine"] = round(min((o.cosine for o in res.outputs), default=1.0), 6)
        row["verdict"] = "ok" if row["shapes_match"] else "BROKEN (output shape changed)"
    except Exception as exc:  # noqa: BLE001 - a written model that does not run is the finding
        row["verdict"] = "BROKEN (written, but does not run)"
        row["error"] = " ".join(str(exc).split())[:200]
    return row


def main(argv: list[str] | None = None) -> int:
    """Run every pipeline on every model and print one table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", help="wheel files, folders or .onnx files")
    ap.add_argument("--passes", nargs="*", default=DEFAULT_PASSES, help="pipelines to run (one per run)")
    ap.add_argument("--json", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onnxprune-real-") as tmp:
        work = Path(tmp)
        models = collect_models(args.sources, work)
        rows = [run_case(m, spec, work) for m in models for spec in args.passes]
    print("| model | passes | exit | verdict | params before -> after | min cosine | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        params = f"{r.get('params_before', '-'):,} -> {r.get('params_after', '-'):,}" if "params_after" in r else "-"
        detail = r.get("error", "")
        print(f"| {r['model']} | `{r['passes']}` | {r['exit']} | {r['verdict']}{': ' + detail if detail else ''} "
              f"| {params} | {r.get('min_cosine', '-')} | {r['seconds']} |")
    bad = [r for r in rows if r["verdict"].startswith(("BROKEN", "crashed"))]
    unchecked = sum(r["verdict"].startswith("unchecked") for r in rows)
    print(f"\n{len(models)} models, {len(rows)} runs: {sum(r['verdict'] == 'ok' for r in rows)} ok, "
          f"{sum(r['verdict'] == 'refused' for r in rows)} refused with a message, {unchecked} written but "
          f"unchecked, {len(bad)} broken or crashed")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
