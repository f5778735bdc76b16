"""Tests of TensorRT emission helpers, the ``tensorrt`` pass and the device proof script.

Everything that does not need TensorRT or a GPU runs everywhere; the engine build is an
integration test that skips (with the reason) where ``tensorrt`` or a CUDA GPU is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


sgc = _load_script("sparse_gemm_check")


# ====================================================================== device script (CPU parts)
def _gemm_model(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    w_mm = sgc.prune_rows_24(rng.standard_normal((16, 8)).astype(np.float32)).T.copy()  # [K=8, N=16]
    w_gemm = sgc.prune_rows_24(rng.standard_normal((8, 16)).astype(np.float32))  # B [N=8, K=16], transB
    # Conv [N=8, C=8, 3, 3] with 2:4 along C
    c = rng.standard_normal((8, 3, 3, 8)).astype(np.float32)  # [N, kh, kw, C]
    c = sgc.prune_rows_24(c.reshape(8 * 9, 8)).reshape(8, 3, 3, 8)
    w_conv = np.ascontiguousarray(np.moveaxis(c, -1, 1))  # [N, C, kh, kw]
    w_dw = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    w_dense = rng.standard_normal((8, 8)).astype(np.float32)  # not 2:4
    nodes = [
        helper.make_node("MatMul", ["x", "w_mm"], ["a"], name="mm"),
        helper.make_node("Gemm", ["a", "w_gemm"], ["b"], name="gemm", transB=1),
        helper.make_node("MatMul", ["b", "w_dense"], ["c"], name="mm_dense"),
        helper.make_node("MatMul", ["c", "c"], ["d"], name="mm_dyn"),
        helper.make_node("Conv", ["img", "w_conv"], ["e"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["e", "w_dw"], ["f"], name="dw", group=8, pads=[1, 1, 1, 1]),
    ]
    inits = {"w_mm": w_mm, "w_gemm": w_gemm, "w_dense": w_dense, "w_conv": w_conv, "w_dw": w_dw}
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 8]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 8, 5, 5])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [8, 8]),
         helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 8, 5, 5])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / "gemms.onnx"
    onnx.save(model, str(path))
    return path, inits


def test_find_gemm_weights_layouts(tmp_path: Path) -> None:
    path, inits = _gemm_model(tmp_path)
    weights, skipped = sgc.find_gemm_weights(path)
    by_node = {w.node: w for w in weights}
    assert set(by_node) == {"mm", "gemm", "mm_dense", "conv"}
    assert (by_node["mm"].K, by_node["mm"].N) == (8, 16)
    np.testing.assert_array_equal(by_node["mm"].wt, inits["w_mm"].T)
    assert (by_node["gemm"].K, by_node["gemm"].N) == (16, 8)
    np.testing.assert_array_equal(by_node["gemm"].wt, inits["w_gemm"])
    assert (by_node["conv"].K, by_node["conv"].N) == (72, 8)
    # conv rows are [kh, kw, C] with C innermost: the 2:4 groups along C stay contiguous
    assert sgc.is_nm_rows(by_node["conv"].wt)
    assert sgc.is_nm_rows(by_node["mm"].wt) and sgc.is_nm_rows(by_node["gemm"].wt)
    assert not sgc.is_nm_rows(by_node["mm_dense"].wt)
    reasons = {s["node"]: s["reason"] for s in skipped}
    assert "not a constant" in reasons["mm_dyn"]
    assert "grouped" in reasons["dw"]


def test_prune_rows_and_random_24() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 12)).astype(np.float32)
    p = sgc.prune_rows_24(w)
    g = p.reshape(6, 3, 4)
    assert (np.count_nonzero(g, axis=2) == 2).all()
    # the kept ones are the two largest magnitudes of each group
    kept = np.sort(np.abs(g), axis=2)[:, :, 2:]
    np.testing.assert_array_equal(kept, np.sort(np.abs(w.reshape(6, 3, 4)), axis=2)[:, :, 2:])
    r = sgc.random_24(rng, 8, 16)
    assert r.shape == (8, 16) and sgc.is_nm_rows(r) and np.count_nonzero(r) == 8 * 8
    assert not sgc.is_nm_rows(np.ones((2, 6)))  # K % 4 != 0


def test_select_weights_rejects_and_prunes(tmp_path: Path) -> None:
    path, _ = _gemm_model(tmp_path)
    weights, _ = sgc.find_gemm_weights(path)
    args = sgc.build_parser().parse_args(["x.onnx"])
    chosen, rejected = sgc.select_weights(weights, args)
    assert {w.node for w in chosen} == {"mm", "gemm", "conv"}
    assert any("not 2:4" in r["reason"] for r in rejected)
    args = sgc.build_parser().parse_args(["x.onnx", "--prune"])
    weights, _ = sgc.find_gemm_weights(path)
    chosen, _ = sgc.select_weights(weights, args)
    assert {w.node for w in chosen} == {"mm", "gemm", "mm_dense", "conv"}
    assert all(sgc.is_nm_rows(w.wt) for w in chosen)


def test_summarize_flop_weighted() -> None:
    r1 = sgc.LayerResult("a", "MatMul", 4, 4, 8, flops=100.0, dense_us=10.0, sparse_us=5.0, ok=True)
    r2 = sgc.LayerResult("b", "MatMul", 4, 4, 8, flops=300.0, dense_us=30.0, sparse_us=60.0, ok=True)
    r3 = sgc.LayerResult("c", "MatMul", 4, 4, 8, flops=300.0, error="boom")
    s = sgc.summarize([r1, r2, r3])["8"]
    assert s["layers"] == 2
    assert s["flop_weighted_speedup"] == pytest.approx((100 * 2.0 + 300 * 0.5) / 400)
    assert s["time_speedup"] == pytest.approx(40.0 / 65.0)
    table = sgc.format_table([r1, r2, r3])
    assert "error: boom" in table and "2.000" in table


# ---------------------------------------------------------------- a CPU stand-in for torch.cuda
class _Event:
    def __init__(self, enable_timing: bool = False) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: _Event) -> float:
        return (other.t - self.t) * 1000.0


class _Graph:
    fail = False

    def replay(self) -> None:
        pass


class _FakeCuda:
    Event = _Event
    CUDAGraph = _Graph

    class Stream:
        def wait_stream(self, other: Any) -> None:
            pass

    def is_available(self) -> bool:
        return True

    def current_stream(self) -> Any:
        return self.Stream()

    def stream(self, s: Any) -> Any:
        return contextlib.nullcontext()

    def graph(self, g: _Graph) -> Any:
        if g.fail:
            raise RuntimeError("capture not supported")
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_name(self, i: int = 0) -> str:
        return "fake"


class _FakeTorch:
    """Real torch on CPU, with cuda and cuSPARSELt replaced by stand-ins (dense maths)."""

    def __init__(self) -> None:
        import torch

        self._t = torch
        self.cuda = _FakeCuda()
        self.sparse_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def device(self, *a: Any) -> Any:
        return self._t.device("cpu")

    def Generator(self, device: Any = None) -> Any:  # noqa: N802
        return self._t.Generator()

    def _cslt_compress(self, w: Any) -> Any:
        assert w.dim() == 2 and w.shape[1] % 4 == 0
        return w.clone()

    def _cslt_sparse_mm(self, a: Any, b: Any, bias: Any = None, alpha: Any = None, out_dtype: Any = None,
                        transpose_result: bool = False, alg_id: int = 0) -> Any:
        self.sparse_calls += 1
        y = a.double() @ b.double()
        return y.to(out_dtype or a.dtype)

    def _cslt_sparse_mm_search(self, a: Any, b: Any) -> int:
        return 0

    def _int_mm(self, a: Any, b: Any) -> Any:
        return (a.double() @ b.double()).to(self._t.int32)


@pytest.fixture()
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> _FakeTorch:
    pytest.importorskip("torch")
    fake = _FakeTorch()
    monkeypatch.setattr(sgc, "_torch", lambda: fake)
    return fake


def test_run_layer_logic_on_cpu_stand_in(fake_torch: _FakeTorch) -> None:
    rng = np.random.default_rng(0)
    w = sgc.GemmWeight("w", "node", "MatMul", 16, 8, sgc.random_24(rng, 8, 16))
    args = sgc.build_parser().parse_args(["--self-test", "--int8", "--target-ms", "0.1", "--repeats", "1",
                                          "--inner", "2"])
    r = sgc.run_layer(fake_torch, w, 32, {}, args)
    assert r.dense_us is not None and r.sparse_us is not None and r.speedup is not None
    assert r.ok is True and r.max_err is not None and r.max_err < 1e-2
    assert r.sparse_variant.startswith("cslt:") and "cuda-graph" in r.timing
    assert r.int8 is not None and "error" not in r.int8, r.int8
    assert r.int8["max_err"] == pytest.approx(0.0, abs=1e-6)
    assert fake_torch.sparse_calls > 0


def test_time_cuda_graph_falls_back_to_eager(fake_torch: _FakeTorch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Graph, "fail", True)
    calls = []
    t, how = sgc.time_cuda_graph(fake_torch, lambda: calls.append(1), inner=2, target_ms=0.1, repeats=2)
    assert how.startswith("eager") and "capture not supported" in how
    assert t >= 0 and len(calls) >= 100


def test_main_writes_json_with_stand_in(fake_torch: _FakeTorch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _gemm_model(tmp_path)
    out = tmp_path / "res.json"
    rc = sgc.main([str(path), "--tokens", "16,32", "--json", str(out), "--target-ms", "0.1", "--repeats", "1",
                   "--inner", "2", "--dedupe"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["tokens"] == [16, 32]
    assert len(doc["layers"]) == 2 * 3  # mm, gemm, conv at two token counts
    assert set(doc["summary"]) == {"16", "32"}
    assert all(layer["ok"] for layer in doc["layers"])
    assert any("not 2:4" in r["reason"] for r in doc["rejected"])
    text = capsys.readouterr().out
    assert "FLOP-weighted speedup" in text


def test_main_without_gpu_reports_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_gpu() -> Any:
        raise RuntimeError("CUDA is not available")

    monkeypatch.setattr(sgc, "_torch", no_gpu)
    out = tmp_path / "r.json"
    assert sgc.main(["--self-test", "--json", str(out)]) == 1
    doc = json.loads(out.read_text())
    assert "CUDA is not available" in doc["error"]
    assert doc["layers"] == []


def test_onnxprune_finder_matches_builtin(tmp_path: Path) -> None:
    pytest.importorskip("onnxprune.analysis.weights")
    path, _ = _gemm_model(tmp_path)
    built, _ = sgc.find_gemm_weights(path)
    via, skipped, finder = sgc.load_weights(path, "onnxprune")
    assert finder == "onnxprune"
    a = {w.node: w for w in built if w.node != "mm_dense"}
    b = {w.node: w for w in via if w.node != "mm_dense"}
    assert set(a) == set(b) == {"mm", "gemm", "conv"}
    for node in a:
        assert (a[node].K, a[node].N) == (b[node].K, b[node].N)
        np.testing.assert_array_equal(a[node].wt, b[node].wt)
    assert any("group" in s["reason"] for s in skipped)
