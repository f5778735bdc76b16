"""onnxprune.bench: interleaved latency A/B on ONNX Runtime CPU, and the ``onnxprune bench`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.bench import (
    MIN_RUNS,
    Timing,
    flops,
    interleaved,
    measure,
    speedup,
    timing_of,
)
from onnxprune.errors import CheckError


def _mlp(width: int, layers: int = 2, dim: int = 32, seed: int = 0) -> onnx.ModelProto:
    """x[batch, dim] -> (MatMul width, Relu) x layers -> MatMul dim."""
    rng = np.random.default_rng(seed)
    nodes, inits, t, k = [], [], "x", dim
    for i in range(layers):
        w = numpy_helper.from_array(rng.standard_normal((k, width)).astype(np.float32) * 0.1, f"w{i}")
        inits.append(w)
        nodes += [helper.make_node("MatMul", [t, f"w{i}"], [f"m{i}"], name=f"/layer{i}/MatMul"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        t, k = f"r{i}", width
    inits.append(numpy_helper.from_array(rng.standard_normal((k, dim)).astype(np.float32) * 0.1, "wo"))
    nodes.append(helper.make_node("MatMul", [t, "wo"], ["y"], name="/out/MatMul"))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


FEEDS = {"x": np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)}


def test_timing_statistics_and_speedup() -> None:
    t = timing_of([0.004, 0.001, 0.002, 0.003, 0.005])
    assert (t.median_ms, t.q1_ms, t.q3_ms, t.runs) == pytest.approx((3.0, 2.0, 4.0, 5))
    assert t.iqr_ms == pytest.approx(2.0)
    assert speedup(Timing(10.0, 9, 11, 3), Timing(4.0, 3, 5, 3)) == pytest.approx(2.5)
    assert speedup(Timing(1.0, 1, 1, 3), Timing(0.0, 0, 0, 3)) == math.inf


def test_interleaved_order_warmup_and_max_seconds() -> None:
    calls: list[str] = []
    runners = [lambda n=n: calls.append(n) for n in "ABC"]
    samples = interleaved(runners, warmup=2, runs=4)
    assert calls == list("ABC") * 2 + list("ABC") * 4  # warm-up each, then A, B, C, A, B, C, ...
    assert [len(s) for s in samples] == [4, 4, 4]
    # max_seconds caps the timed part, but every runner gets MIN_RUNS rounds
    ticks = iter(range(10_000))
    capped = interleaved(runners[:2], warmup=0, runs=100, max_seconds=0.5, clock=lambda: float(next(ticks)))
    assert [len(s) for s in capped] == [MIN_RUNS, MIN_RUNS]
    with pytest.raises(ValueError):
        interleaved(runners, runs=0)


def test_measure_two_models_ratio_finite(tmp_path: Path) -> None:
    wide, narrow = _mlp(512, seed=0), _mlp(16, seed=0)
    path = tmp_path / "wide.onnx"
    onnx.save(wide, path)
    # a path, a ModelProto and a loaded Model are all accepted
    ta, tb, tc = measure([path, narrow, onnxprune.load(path)], FEEDS, threads=1, warmup=1, runs=5)
    assert all(t.runs == 5 and 0 < t.q1_ms <= t.median_ms <= t.q3_ms for t in (ta, tb, tc))
    r = speedup(ta, tb)
    assert math.isfinite(r) and r > 0
    assert flops(wide, {"batch": 4}) == 2 * 4 * (32 * 512 + 512 * 512 + 512 * 32)
    assert flops(path, {"batch": 4}) > 20 * flops(narrow, {"batch": 4})


def test_measure_external_data_model_and_fp16_inputs(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    onnxprune.save(onnxprune.Model(_mlp(256)), path, external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    model = onnxprune.load(path)
    assert model.external, "weights should be memory-mapped from the external data file"
    half = onnxprune.optimize(model, "fp16(keep_io_types=false)").model
    assert half.proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    ta, tb = measure([model, half], FEEDS, threads=1, warmup=1, runs=3)  # float32 feeds cast for the fp16 model
    assert ta.runs == tb.runs == 3 and ta.median_ms > 0 and tb.median_ms > 0


def test_measure_bad_feeds_is_a_clear_error() -> None:
    with pytest.raises(CheckError, match="'x' missing"):
        measure([_mlp(8)], {"y": FEEDS["x"]}, runs=1)
    with pytest.raises(CheckError, match="cannot run"):
        measure([_mlp(8)], {"x": np.zeros((4, 7), np.float32)}, runs=1)


def test_cli_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onnxprune.cli import main

    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_mlp(512), a)
    onnx.save(_mlp(16), b)
    assert main(["bench", str(a), str(b), "--threads", "1", "--runs", "4", "--warmup", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("inputs: RANDOM (synthesised from the graph): x [1, 32]; threads 1")
    assert str(a) in lines[1] and "4 runs" in lines[1] and str(b) in lines[2]
    assert lines[3].startswith("  speedup A/B ")
    np.savez(tmp_path / "in.npz", **FEEDS)
    assert main(["bench", str(a), str(b), "--inputs", str(tmp_path / "in.npz"), "--runs", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["synthesized_inputs"] is False and doc["inputs"] == {"x": [4, 32]}
    assert [m["runs"] for m in doc["models"]] == [3, 3] and math.isfinite(doc["speedup"]) and doc["speedup"] > 0
    assert main(["bench", str(a), str(b), str(a), "--runs", "3", "--json"]) == 0  # each against the first
    ratios = json.loads(capsys.readouterr().out)["speedup_vs_first"]
    assert len(ratios) == 3 and ratios[0] == 1.0 and all(math.isfinite(r) and r > 0 for r in ratios)
    assert main(["bench", str(a), str(b), str(a), "--runs", "3"]) == 0
    assert "speedup A/C" in capsys.readouterr().out
    assert main(["bench", str(a), "--runs", "3", "--dim", "batch=8"]) == 0  # one model: no ratio
    out = capsys.readouterr().out
    assert "x [8, 32]" in out and "speedup" not in out
    assert main(["bench", str(a), "--dim", "nope=3"]) == 2  # a dim the model lacks is an error
    assert "nope" in capsys.readouterr().err


def test_optimize_bench_times_input_against_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onnxprune.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_mlp(64), src)
    assert main(["optimize", str(src), "--passes", "ffn(ratio=0.5)", "-o", str(out), "--bench", "--bench-runs", "3"]) == 0
    text = capsys.readouterr().out
    assert "latency (ONNX Runtime CPU), A = input, B = output" in text and "speedup A/B" in text
    assert f"A {src}" in text and f"B {out}" in text and out.exists()
