"""Tests of ``scripts/compare_peer.py``'s measurement plumbing (no peer tool needed).

A job runs in a subprocess of this project's interpreter: it must write the pruned model and
report CPU seconds and the child's own peak RSS; parameter counting must ignore initializers no
node reads (the peer leaves the unpruned originals behind); the verdict must name the tool that
is ahead and say so plainly when it is the peer.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from models import build_mlp

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_compare_peer", ROOT / "scripts" / "compare_peer.py")
assert _spec and _spec.loader
cp = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cp
_spec.loader.exec_module(cp)


def test_job_subprocess_prunes_and_reports_cpu_and_own_rss(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    onnx.save(build_mlp(), str(src))
    dense_nz = cp.nonzero_params(src)
    ballast = np.ones(256 * 1024 * 1024, dtype=np.uint8)  # a large parent must not inflate the child's RSS
    out = tmp_path / "pruned.onnx"
    res = cp.measure(sys.executable, {"tool": "onnxprune", "spec": "masks(sparsity=0.5)", "calibrated": False,
                                      "model": str(src), "out": str(out)}, 120, tmp_path / "job.log")
    assert "error" not in res, res
    assert out.exists() and res["cpu_s"] > 0
    own = cp._vmhwm_kb("self") / 1024
    assert ballast[-1] == 1 and own > 256
    assert 0 < res["rss_mb"] < own  # ru_maxrss would report at least the parent's size here
    removed = dense_nz - cp.nonzero_params(out)
    assert 0 < removed < dense_nz
    bad = cp.measure(sys.executable, {"tool": "onnxprune", "spec": "masks(sparsity=2)", "calibrated": False,
                                      "model": str(src), "out": str(tmp_path / "bad.onnx")}, 120, tmp_path / "bad.log")
    assert bad["error"].startswith("exit ")


def test_nonzero_params_ignores_dead_initializers(tmp_path: Path) -> None:
    proto = build_mlp()
    before = tmp_path / "a.onnx"
    onnx.save(proto, str(before))
    n = cp.nonzero_params(before)
    proto.graph.initializer.append(numpy_helper.from_array(np.ones((100, 100), dtype=np.float32), "left_behind"))
    after = tmp_path / "b.onnx"
    onnx.save(proto, str(after))
    assert cp.nonzero_params(after) == n


def test_verdicts_name_the_leader() -> None:
    data = {"name": "M", "desc": "d"}

    def row(task: str, tool: str, cos: float, removed: float = 0.5) -> dict:
        return {"task": task, "tool": tool, "label": f"{tool}-{cos}", "cosine": cos, "removed": removed,
                "valid": "ok", "cpu_s": 1.0, "rss_mb": 10.0}

    rows = [row("a", "onnxprune", 0.9), row("a", "onnxsim", 0.8),
            row("b", "onnxprune", 0.8), row("b", "onnxsim", 0.9),
            row("c", "onnxprune", 0.9), row("c", "onnxsim", 1.0, removed=0.0),  # removed nothing: does not count
            row("d", "onnxprune", 0.9001), row("d", "onnxsim", 0.9)]
    text = cp.table([(data, rows)], "v")
    verdicts = {ln.split(",")[1].split(":")[0].strip(): ln for ln in text.splitlines() if ln.startswith("* M,")}
    assert verdicts["a"].split(": ")[1].startswith("onnxprune ahead")
    assert "**onnxsim ahead**" in verdicts["b"]
    assert "onnxsim produced no pruned valid model" in verdicts["c"]
    assert "equal" in verdicts["d"]
