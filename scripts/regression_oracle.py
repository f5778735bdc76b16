#!/usr/bin/env python3
"""Regression oracle: run a fixed set of pipelines and record what they produce.

Every pass (with and without calibration) runs on every small test model (``models/``), the
bundled demo model and tiny torch exports of BERT, GPT-2 and ResNet (random weights, fixed seed;
exported once into the work folder so both runs read the very same input files). For each run the
oracle records the SHA-256 of the output file (or the error text when the run fails on purpose),
and the report's numbers with timings and paths removed; ``inspect`` runs record their JSON.

Usage::

    python scripts/regression_oracle.py record BASELINE.json [--work DIR]
    python scripts/regression_oracle.py compare BASELINE.json [--work DIR]
    python scripts/regression_oracle.py append BASELINE.json [--work DIR]   # record new cases only

``compare`` re-runs everything and prints each case whose file hash or numbers differ; it exits 1
when any differ. A restructure that must not change behaviour must compare clean.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import BUILDERS, random_inputs  # noqa: E402

#: Pipelines run on every model; ``{calib}`` marks the ones that get calibration data.
PIPELINES: list[tuple[str, bool]] = [
    ("cleanup", False),
    ("masks(sparsity=0.5)", False),
    ("masks(sparsity=0.6,scope=global)", False),
    ("masks(sparsity=0.5,criterion=wanda)", True),
    ("masks(sparsity=0.5,criterion=sparsegpt)", True),
    ("masks(sparsity=0.5,criterion=wanda,mode=sequential)", True),
    ("masks(sparsity=0.5,criterion=wanda,allocation=owl)", True),
    ("nm(n=2,m=4)", False),
    ("nm(n=2,m=4,criterion=wanda)", True),
    ("nm(n=2,m=4,criterion=sparsegpt)", True),
    ("nm(n=2,m=4,criterion=sparsegpt,mode=sequential)", True),
    ("channels(ratio=0.3)", False),
    ("channels(ratio=0.3,criterion=l1,scope=global)", False),
    ("channels(ratio=0.3,criterion=bn_scale)", False),
    ("channels(ratio=0.3,criterion=activation)", True),
    ("channels(ratio=0.5,round_to=4,min_keep=2)", False),
    ("heads(ratio=0.5)", False),
    ("heads(ratio=0.5,criterion=activation,compensate=true)", True),
    ("heads(ratio=0.5,criterion=weighted,scope=global)", True),
    ("ffn(ratio=0.25)", False),
    ("ffn(ratio=0.25,criterion=activation,compensate=true)", True),
    ("ffn(ratio=0.5,criterion=weighted,round_to=4)", True),
    ("heads(ratio=0.25),ffn(ratio=0.25),nm(n=2,m=4)", False),
    ("channels(ratio=0.3),nm(n=2,m=4),fp16", False),
    ("fp16", False),
    ("fp16(keep_io_types=false)", False),
    ("nm(n=2,m=4),fp16,tensorrt(emit_trtexec=true)", False),
    ("masks(sparsity=0.5,scope=row)", False),
    ("masks(sparsity=0.5,criterion=sparsegpt,refit=true)", True),
    ("heads(ratio=0.25,criterion=reconstruction,reconstruct=true,scope=global),"
     "ffn(ratio=0.25,criterion=reconstruction,reconstruct=true,scope=global)", True),
    ("channels(ratio=0.3,criterion=activation,reconstruct=true,sequential=true)", True),
    ("nm(n=2,m=4),fp16,tensorrt(gemm_form=true,emit_trtexec=true)", False),
]

#: Decoder graphs in the forms ONNX Runtime GenAI's model builder writes (``models/llm.py``: GQA with
#: a KV cache, RoPE, 4-bit MatMulNBits); only :data:`LLM_PIPELINES` run on them (appended cases).
LLM_MODELS: dict[str, dict[str, str]] = {"llm_gqa_nbits": {"qkv": "packed"},
                                         "llm_rotary_ms": {"qkv": "separate", "rotary": "ms"}}
LLM_PIPELINES: list[str] = ["heads(ratio=0.25),ffn(ratio=0.25)", "nm(n=2,m=4)"]

INSPECT: list[list[str]] = [["--json"], ["--json", "--groups"], ["--json", "--tensorrt"], ["--json", "--nm", "2:4"]]

_VOLATILE = {"seconds", "total_seconds", "wall_seconds", "path", "time", "elapsed", "engine"}


def _digest(rows: Any) -> dict[str, Any]:
    """A per-initializer listing as its row count and SHA-256 (the rows themselves would make the
    baseline ~4x larger; any change still shows)."""
    text = json.dumps(_scrub(rows), sort_keys=True, default=str)
    return {"rows": len(rows), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _scrub(value: Any) -> Any:
    """Drop timings and paths (they differ between runs) from report JSON; digest per-initializer rows."""
    if isinstance(value, dict):
        return {k: (_digest(v) if k == "per_initializer" and isinstance(v, list) else _scrub(v))
                for k, v in value.items() if k not in _VOLATILE and not k.endswith("_s")}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, str) and ("/" in value):
        return Path(value).name if len(value) < 300 else value
    return value


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted([path, *path.parent.glob(path.name + ".data")]):
        digest.update(p.read_bytes())
    return digest.hexdigest()


def _models(work: Path) -> dict[str, tuple[Path, Path]]:
    """Write (once) every model and its calibration file; return name -> (model, calib)."""
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, Path]] = {}
    protos: dict[str, onnx.ModelProto] = {name: build() for name, build in BUILDERS.items()}
    demo = ROOT / "onnxprune" / "data" / "demo_cnn.onnx"
    protos["demo"] = onnx.load(str(demo))
    for kind in ("bert", "gpt2", "resnet"):
        path = work / f"hf_{kind}.onnx"
        if not path.exists():
            try:
                sys.path.insert(0, str(ROOT / "scripts"))
                from export_hf import export_model

                export_model(kind, path, size="tiny", seed=0)
            except Exception as exc:  # noqa: BLE001 - torch missing: skip these models
                print(f"skip {kind}: {exc}", file=sys.stderr)
                continue
        protos[f"hf_{kind}"] = onnx.load(str(path))
    for name, proto in protos.items():
        path = work / f"{name}.onnx"
        if not path.exists():
            onnx.save(proto, str(path))
        calib = work / f"{name}_calib.npz"
        if not calib.exists():
            feeds = [_feed(proto, seed) for seed in range(4)]
            np.savez(calib, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
        out[name] = (path, calib)
    return out


def _feed(proto: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    try:
        return random_inputs(proto, batch=2, seq=8, seed=seed)
    except ValueError:
        rng = np.random.default_rng(seed)
        feed = {}
        for value in proto.graph.input:
            dims = [d.dim_value if d.dim_value > 0 else (2 if i == 0 else 8)
                    for i, d in enumerate(value.type.tensor_type.shape.dim)]
            if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
                if len(dims) == 4:
                    dims[2:] = [d if d > 8 else 32 for d in dims[2:]]
                feed[value.name] = rng.standard_normal(dims).astype(np.float32)
            elif "mask" in value.name:
                feed[value.name] = np.ones(dims, np.int64)
            else:
                feed[value.name] = rng.integers(0, 50, dims).astype(np.int64)
        return feed


def _cli(argv: list[str]) -> tuple[int, str]:
    from onnxprune.cli import main

    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return int(code or 0), buf_out.getvalue() + ("\n" + buf_err.getvalue() if code else "")


def run_all(work: Path) -> dict[str, Any]:
    """Run every case; return case key -> recorded result."""
    results: dict[str, Any] = {}
    outdir = work / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    for name, (path, calib) in _models(work).items():
        for flags in INSPECT:
            code, text = _cli(["inspect", str(path), *flags])
            key = f"{name} inspect {' '.join(flags)}"
            try:
                results[key] = {"code": code, "json": _scrub(json.loads(text))}
            except json.JSONDecodeError:
                results[key] = {"code": code, "text": text.strip().splitlines()[-1:] if text else []}
        for i, (spec, wants_calib) in enumerate(PIPELINES):
            results[f"{name} {spec}{' +calib' if wants_calib else ''}"] = _run_case(
                name, path, outdir / f"{name}_{i}.onnx", spec, calib if wants_calib else None)
    results.update(_run_llm(work, outdir))
    return results


def _run_llm(work: Path, outdir: Path) -> dict[str, Any]:
    """The decoder cases (:data:`LLM_MODELS` x :data:`LLM_PIPELINES`), keyed like the others."""
    from models.llm import build_llm_decoder

    results: dict[str, Any] = {}
    for name, kwargs in LLM_MODELS.items():
        path = work / f"{name}.onnx"
        if not path.exists():
            onnx.save(build_llm_decoder(**kwargs), str(path))
        for i, spec in enumerate(LLM_PIPELINES):
            results[f"{name} {spec}"] = _run_case(name, path, outdir / f"{name}_{i}.onnx", spec)
    return results


def _run_case(name: str, path: Path, out: Path, spec: str, calib: Path | None = None) -> dict[str, Any]:
    """One ``optimize --passes spec`` run: exit code, output hash, scrubbed JSON report (or the last line)."""
    for p in out.parent.glob(out.name + "*"):
        p.unlink()
    argv = ["optimize", str(path), "-o", str(out), "--passes", spec, "--json"]
    if calib is not None:
        argv += ["--calib", str(calib)]
    code, text = _cli(argv)
    entry: dict[str, Any] = {"code": code}
    if out.exists():
        entry["sha256"] = _sha(out)
    try:
        entry["report"] = _scrub(json.loads(text))
    except json.JSONDecodeError:
        entry["text"] = [line for line in text.strip().splitlines() if line][-1:]
    print(f"{name:10s} {spec:60s} code={code} {entry.get('sha256', '-')[:12]}", file=sys.stderr)
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("record", "compare", "append"),
                   help="append: add the cases the baseline lacks, leaving its other entries as they are")
    p.add_argument("baseline")
    p.add_argument("--work", default="/tmp/onnxprune-oracle")
    args = p.parse_args(argv)
    results = run_all(Path(args.work))
    if args.mode == "record":
        Path(args.baseline).write_text(json.dumps(results, indent=1, sort_keys=True))
        print(f"recorded {len(results)} cases in {args.baseline}")
        return 0
    base = json.loads(Path(args.baseline).read_text())
    if args.mode == "append":
        new = {k: v for k, v in results.items() if k not in base}
        Path(args.baseline).write_text(json.dumps({**base, **new}, indent=1, sort_keys=True))
        print(f"appended {len(new)} cases to {args.baseline} ({len(base)} kept as they were)")
        return 0
    diffs = [k for k in sorted(set(base) | set(results)) if base.get(k) != results.get(k)]
    for k in diffs:
        print(f"DIFF {k}")
        b, r = base.get(k, {}), results.get(k, {})
        for field in sorted(set(b) | set(r)):
            if b.get(field) != r.get(field):
                print(f"   {field}: {str(b.get(field))[:300]}\n   {' ' * len(field)}  {str(r.get(field))[:300]}")
    print(f"{len(results)} cases, {len(diffs)} differ")
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
