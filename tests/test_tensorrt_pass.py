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


def test_self_test_weights_are_24() -> None:
    ws = sgc.self_test_weights(shapes=[("a", 64, 32), ("b", 32, 64)])
    assert [(w.K, w.N) for w in ws] == [(64, 32), (32, 64)]
    assert all(w.wt.shape == (w.N, w.K) and sgc.is_nm_rows(w.wt) and np.count_nonzero(w.wt) == w.wt.size // 2
               for w in ws)


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
        self.plans_seen: list[dict[str, Any]] = []
        fake = self

        class _C:
            _jit_get_schemas_for_operator = staticmethod(torch._C._jit_get_schemas_for_operator)

            class _cusparselt:  # noqa: N801 - mirrors torch._C._cusparselt
                @staticmethod
                def mm_search(a: Any, b: Any, bias: Any, alpha: Any, out_dtype: Any, transpose: bool) -> tuple:
                    fake.searched = True
                    return (3, 2, 1, 10)

        self._C = _C

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
                        transpose_result: bool = False, alg_id: int = 0, split_k: int = 1,
                        split_k_mode: int = -1) -> Any:
        self.sparse_calls += 1
        self.plans_seen.append({"alg_id": alg_id, "split_k": split_k, "split_k_mode": split_k_mode})
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
    assert {"alg_id": 3, "split_k": 2, "split_k_mode": 1} in fake_torch.plans_seen  # the searched plan ran


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
    path, _ = _gemm_model(tmp_path)
    assert sgc.main([str(path), "--json", str(out)]) == 1
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


# ====================================================================== trt_support: pure helpers
from enum import IntEnum  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune.errors import PassError, PipelineError  # noqa: E402
from onnxprune.ir.load import from_proto  # noqa: E402
from onnxprune.pipeline.registry import get_pass  # noqa: E402
from onnxprune.tensorrt.trtexec import (
    DEFAULT_BATCH,
    DEFAULT_DIM,
    BuildSettings,
    derive_profile,
    parse_builder_log,
    parse_inspector,
    parse_shapes,
    sparsity_summary,
    trtexec_args,
)


def test_parse_shapes_forms() -> None:
    p = parse_shapes("input_ids:1x16/8x128/32x512; mask:2x8")
    assert p["input_ids"] == ((1, 16), (8, 128), (32, 512))
    assert p["mask"] == ((2, 8), (2, 8), (2, 8))
    assert parse_shapes("") == {}
    assert parse_shapes("in:0:1,3/2,3/4,3")["in:0"] == ((1, 3), (2, 3), (4, 3))


@pytest.mark.parametrize("text, match", [
    ("input_ids", "name:min/opt/max"),
    ("x:1x2/3", "expected min/opt/max"),
    ("x:1xa/1x2/1x3", "not a shape"),
    ("x:1x0/1x2/1x3", "positive"),
    ("x:4x2/1x2/8x2", "min <= opt <= max"),
    ("x:1x2/1x2x3/1x2", "different ranks"),
    ("x:1x2;x:1x2", "given twice"),
])
def test_parse_shapes_errors_name_the_input(text: str, match: str) -> None:
    with pytest.raises(PipelineError, match=match):
        parse_shapes(text)


def test_pass_option_validation() -> None:
    cls = get_pass("tensorrt")
    with pytest.raises(PipelineError, match="min <= opt <= max"):
        cls(shapes="x:4/2/8")
    with pytest.raises(PipelineError, match="opt_level"):
        cls(opt_level=7)
    with pytest.raises(PipelineError, match="workspace_mb"):
        cls(workspace_mb=0)
    p = onnxprune.parse_pipeline("tensorrt(engine=/tmp/a.engine,sparse=false,workspace_mb=512,opt_level=5,"
                                 "shapes='x:1x4/2x4/8x4',timing_cache=/tmp/tc,emit_trtexec=true)")[0]
    assert p.options.sparse is False and p.options.workspace_mb == 512 and p.options.opt_level == 5
    assert p.options.shapes == "x:1x4/2x4/8x4" and p.options.emit_trtexec is True


def test_derive_profile_defaults_and_shared_dims() -> None:
    inputs = [("input_ids", ["batch", "seq"]), ("attention_mask", ["batch", "seq"]),
              ("image", [1, 3, None, None]), ("static", [2, 4])]
    prof = derive_profile(inputs)
    assert prof["input_ids"] == ((DEFAULT_BATCH[0], DEFAULT_DIM[0]), (DEFAULT_BATCH[1], DEFAULT_DIM[1]),
                                 (DEFAULT_BATCH[2], DEFAULT_DIM[2]))
    assert prof["image"][0] == (1, 3, DEFAULT_DIM[0], DEFAULT_DIM[0])
    assert prof["image"][2] == (1, 3, DEFAULT_DIM[2], DEFAULT_DIM[2])
    assert "static" not in prof
    # a shape given for one input fixes the symbolic dims it shares with the others
    prof = derive_profile(inputs, parse_shapes("input_ids:1x16/8x128/32x512"))
    assert prof["attention_mask"] == prof["input_ids"] == ((1, 16), (8, 128), (32, 512))


def test_derive_profile_errors() -> None:
    inputs = [("x", ["batch", 3, "h", "w"])]
    with pytest.raises(PipelineError, match="unknown input.*nope.*inputs are x"):
        derive_profile(inputs, parse_shapes("nope:1"))
    with pytest.raises(PipelineError, match="rank 4"):
        derive_profile(inputs, parse_shapes("x:1x3/1x3/1x3"))
    with pytest.raises(PipelineError, match="axis 1 is fixed at 3"):
        derive_profile(inputs, parse_shapes("x:1x4x8x8/1x4x8x8/1x4x8x8"))


def test_trtexec_command_flags_and_quoting() -> None:
    s = BuildSettings(onnx_path="m.onnx", engine_path="m.engine", workspace_mb=2048, opt_level=4,
                      profile={"in:0": ((1, 8), (4, 64), (8, 128)), "mask": ((1, 8), (4, 64), (8, 128))},
                      timing_cache="tc.bin", layer_info_path="m.engine.layers.json")
    args = trtexec_args(s)
    assert args[:3] == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.engine"]
    for flag in ("--sparsity=enable", "--stronglyTyped", "--memPoolSize=workspace:2048M",
                 "--builderOptimizationLevel=4", "--minShapes='in:0':1x8,mask:1x8",
                 "--optShapes='in:0':4x64,mask:4x64", "--maxShapes='in:0':8x128,mask:8x128",
                 "--timingCacheFile=tc.bin", "--profilingVerbosity=detailed",
                 "--exportLayerInfo=m.engine.layers.json"):
        assert flag in args
    s2 = BuildSettings(onnx_path="m.onnx", engine_path="m.engine", sparse=False)
    a2 = trtexec_args(s2)
    assert "--sparsity=enable" not in a2 and not any(a.startswith("--minShapes") for a in a2)


SAMPLE_LOG = """\
[11/25/2026-10:01:02] [I] [TRT] Local timing cache in use.
[11/25/2026-10:01:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: /encoder/layer.0/attention/self/query/MatMul, /encoder/layer.0/intermediate/dense/MatMul, conv1 + relu1
[11/25/2026-10:01:09] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: /encoder/layer.0/intermediate/dense/MatMul
[11/25/2026-10:01:09] [W] [TRT] something unrelated
"""

SAMPLE_INSPECTOR = {
    "Layers": [
        {"Name": "/encoder/layer.0/attention/self/query/MatMul", "LayerType": "gemm", "HasSparseWeights": 1,
         "TacticName": "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1"},
        {"Name": "/encoder/layer.0/intermediate/dense/MatMul", "LayerType": "gemm", "HasSparseWeights": 1,
         "TacticName": "sm90_xmma_sparse_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64"},
        {"Name": "conv1 + relu1", "LayerType": "CaskConvolution", "HasSparseWeights": 1,
         "TacticName": "sm80_xmma_fprop_sparse_conv_f16f16_f16f16_f16_nhwckrsc_nhwc"},
        {"Name": "softmax", "LayerType": "Softmax", "TacticName": "0x3e8"},
    ],
    "Bindings": ["input_ids", "last_hidden_state"],
}


def test_parse_builder_log_sample() -> None:
    facts = parse_builder_log(SAMPLE_LOG.splitlines() + [SAMPLE_LOG])  # duplicates collapse
    assert facts["eligible"] == ["/encoder/layer.0/attention/self/query/MatMul",
                                 "/encoder/layer.0/intermediate/dense/MatMul", "conv1 + relu1"]
    assert facts["picked_sparse"] == ["/encoder/layer.0/intermediate/dense/MatMul"]
    assert parse_builder_log(["nothing here"]) == {"eligible": [], "picked_sparse": []}


def test_parse_inspector_forms_and_summary() -> None:
    layers = parse_inspector(json.dumps(SAMPLE_INSPECTOR))
    by = {layer["name"]: layer for layer in layers}
    assert by["/encoder/layer.0/attention/self/query/MatMul"]["has_sparse_weights"] is True
    assert by["/encoder/layer.0/attention/self/query/MatMul"]["sparse_tactic"] is False
    assert by["/encoder/layer.0/intermediate/dense/MatMul"]["sparse_tactic"] is True
    assert by["softmax"]["has_sparse_weights"] is None
    # per-layer JSON strings (get_layer_information) and bare names (non-detailed verbosity)
    per_layer = parse_inspector([json.dumps(x) for x in SAMPLE_INSPECTOR["Layers"]])
    assert [x["name"] for x in per_layer] == [x["name"] for x in layers]
    names_only = parse_inspector({"Layers": ["a", "b"]})
    assert [x["name"] for x in names_only] == ["a", "b"] and names_only[0]["has_sparse_weights"] is None
    with pytest.raises(ValueError):
        parse_inspector(42)
    summary = sparsity_summary(parse_builder_log([SAMPLE_LOG]), layers)
    assert summary["eligible_count"] == 3
    assert summary["sparse_layers"] == ["/encoder/layer.0/intermediate/dense/MatMul", "conv1 + relu1"]
    assert summary["eligible_not_sparse"] == ["/encoder/layer.0/attention/self/query/MatMul"]


# ====================================================================== the pass without TensorRT
def _fp16_24_mlp() -> onnxprune.Model:
    from models import build_mlp

    res = onnxprune.optimize(from_proto(build_mlp()), "nm(n=2,m=4),fp16")
    return res.model


def _no_trt(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxprune.passes.tensorrt as tp

    def missing() -> Any:
        raise ImportError("No module named 'tensorrt'")

    monkeypatch.setattr(tp, "import_tensorrt", missing)


def test_missing_tensorrt_raises_with_trtexec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_trt(monkeypatch)
    model = _fp16_24_mlp()
    with pytest.raises(PassError) as info:
        onnxprune.optimize(model, f"tensorrt(engine={tmp_path / 'm.engine'})",
                           options={"output_path": str(tmp_path / "m.onnx")})
    msg = str(info.value)
    assert "not importable" in msg and "no engine was built" in msg and "\n" not in msg
    # the command names an ONNX file that exists and holds the model the pass saw (the pipeline's
    # output m.onnx is never written when the pass fails)
    onnx_file = tmp_path / "m.trt.onnx"
    assert f"trtexec --onnx={onnx_file} --saveEngine={tmp_path / 'm.engine'} --sparsity=enable" in msg
    assert f"wrote {onnx_file}" in msg and not (tmp_path / "m.onnx").exists()
    written = onnx.load(str(onnx_file))
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in model.proto.graph.node]
    assert {t.name for t in written.graph.initializer} == {t.name for t in model.proto.graph.initializer}
    assert "--minShapes=input:1x" in msg and "--profilingVerbosity=detailed" in msg
    assert not (tmp_path / "m.engine").exists()


def test_emit_trtexec_warns_and_leaves_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_trt(monkeypatch)
    model = _fp16_24_mlp()
    before = model.proto.SerializeToString()
    res = onnxprune.optimize(model, "tensorrt(emit_trtexec=true)", options={"output_path": str(tmp_path / "o.onnx")})
    rec = res.report.passes[0]
    assert rec.modified is False and rec.stats["built"] is False
    onnx_file = tmp_path / "o.trt.onnx"
    assert rec.stats["trtexec"].startswith(f"trtexec --onnx={onnx_file} --saveEngine={tmp_path / 'o.engine'}")
    assert rec.stats["trtexec_onnx"] == str(onnx_file) and onnx.load(str(onnx_file)).graph.node
    assert rec.stats["onnx_eligible"] >= 1
    assert any("no engine built" in w for w in res.report.warnings)
    assert res.model.proto.SerializeToString() == before


def test_engine_path_required_without_any_path(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_trt(monkeypatch)
    with pytest.raises(PipelineError, match="engine=PATH"):
        onnxprune.optimize(_fp16_24_mlp(), "tensorrt")


def test_cli_emit_trtexec(tmp_path: Path) -> None:
    import subprocess

    from models import build_mlp

    src = tmp_path / "mlp.onnx"
    onnx.save(build_mlp(), str(src))
    out = tmp_path / "mlp.24.onnx"
    r = subprocess.run([sys.executable, "-m", "onnxprune", "optimize", str(src), "-o", str(out),
                        "--passes", "nm(n=2,m=4),fp16", "--emit-trtexec"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("trtexec "))
    assert f"--onnx={out}" in line and "--sparsity=enable" in line and "--saveEngine=" in line
    assert out.exists()


# ---------------------------------------------------------------- build_engine against a stand-in API
class _Sev(IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class _FakeTRT:
    """Records the calls the pass makes on the TensorRT API (shapes of the real one)."""

    def __init__(self, version: str = "10.8.0") -> None:
        self.__version__ = version
        self.calls: dict[str, Any] = {}
        fake = self

        class ILogger:
            Severity = _Sev

            def __init__(self) -> None:
                pass

        self.ILogger = ILogger
        self.NetworkDefinitionCreationFlag = SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
        self.BuilderFlag = SimpleNamespace(SPARSE_WEIGHTS="SPARSE_WEIGHTS")
        self.ProfilingVerbosity = SimpleNamespace(DETAILED="DETAILED")
        self.LayerInformationFormat = SimpleNamespace(JSON="JSON")

        class Network:
            def __init__(self) -> None:
                self.inputs: list[Any] = []

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, i: int) -> Any:
                return self.inputs[i]

        class Parser:
            def __init__(self, network: Any, logger: Any) -> None:
                self.network = network
                self.num_errors = 0

            def parse_from_file(self, path: str) -> bool:
                m = onnx.load(path)
                fake.calls["parsed"] = path
                for vi in m.graph.input:
                    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
                    self.network.inputs.append(SimpleNamespace(name=vi.name, shape=dims))
                return True

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.calls["pool"] = (pool, size)

            def set_flag(self, flag: str) -> None:
                fake.calls.setdefault("flags", []).append(flag)

            def create_timing_cache(self, data: bytes) -> Any:
                fake.calls["cache_in"] = data
                return SimpleNamespace(serialize=lambda: b"CACHE")

            def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> None:
                self.cache = cache

            def get_timing_cache(self) -> Any:
                return self.cache

            def add_optimization_profile(self, p: Any) -> None:
                fake.calls["profile"] = p.shapes

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, Any] = {}

            def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Builder:
            def __init__(self, logger: Any) -> None:
                self.logger = logger

            def create_network(self, flags: int) -> Any:
                fake.calls["network_flags"] = flags
                return Network()

            def create_builder_config(self) -> Any:
                return Config()

            def create_optimization_profile(self) -> Any:
                return Profile()

            def build_serialized_network(self, network: Any, config: Any) -> Any:
                fake.calls["opt_level"] = config.builder_optimization_level
                fake.calls["verbosity"] = config.profiling_verbosity
                for line in SAMPLE_LOG.splitlines():
                    self.logger.log(_Sev.INFO, line.split("[TRT] ")[-1])
                return b"ENGINE"

        class Runtime:
            def __init__(self, logger: Any) -> None:
                pass

            def deserialize_cuda_engine(self, blob: bytes) -> Any:
                inspector = SimpleNamespace(get_engine_information=lambda fmt: json.dumps(SAMPLE_INSPECTOR))
                return SimpleNamespace(create_engine_inspector=lambda: inspector)

        self.Builder = Builder
        self.OnnxParser = Parser
        self.Runtime = Runtime


@pytest.mark.parametrize("version, explicit_batch", [("10.8.0", False), ("8.6.1", True)])
def test_build_engine_api_sequence_with_stand_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 version: str, explicit_batch: bool) -> None:
    import onnxprune.passes.tensorrt as tp

    fake = _FakeTRT(version)
    monkeypatch.setattr(tp, "import_tensorrt", lambda: fake)
    engine = tmp_path / "m.engine"
    cache = tmp_path / "tc.bin"
    cache.write_bytes(b"OLD")
    model = _fp16_24_mlp()
    width = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    res = onnxprune.optimize(model, f"tensorrt(engine={engine},workspace_mb=256,opt_level=4,"
                                    f"shapes='input:2x{width}/4x{width}/8x{width}',timing_cache={cache})")
    rec = res.report.passes[0]
    assert rec.modified is False and rec.stats["built"] is True
    assert engine.read_bytes() == b"ENGINE" and cache.read_bytes() == b"CACHE"
    assert json.loads(Path(str(engine) + ".layers.json").read_text()) == SAMPLE_INSPECTOR
    c = fake.calls
    assert c["cache_in"] == b"OLD"
    assert c["pool"] == ("WORKSPACE", 256 << 20) and c["flags"] == ["SPARSE_WEIGHTS"]
    assert c["opt_level"] == 4 and c["verbosity"] == "DETAILED"
    assert c["profile"] == {"input": ((2, width), (4, width), (8, width))}
    assert bool(c["network_flags"] & 1) is explicit_batch and c["network_flags"] & 2
    assert rec.stats["sparse_count"] == 2 and rec.stats["eligible_count"] == 3
    assert rec.stats["tensorrt_version"] == version


# ---------------------------------------------------------------- integration (real TensorRT + GPU)
def _trt_and_gpu() -> str | None:
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (not installable on these machines; see README.md, 'Known limits')"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU"
    except ImportError:
        pass
    return None


@pytest.mark.slow
def test_integration_builds_sparse_engine(tmp_path: Path) -> None:
    reason = _trt_and_gpu()
    if reason:
        pytest.skip(reason)
    from models import build_mlp

    model = onnxprune.optimize(from_proto(build_mlp()), "nm(n=2,m=4),fp16").model
    engine = tmp_path / "mlp.engine"
    w = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    res = onnxprune.optimize(model, f"tensorrt(engine={engine},shapes='input:1x{w}/64x{w}/256x{w}')")
    stats = res.report.passes[0].stats
    assert stats["built"] is True and engine.stat().st_size > 0
    assert stats["engine_layers"] > 0
    assert isinstance(stats["eligible_layers"], list) and isinstance(stats["sparse_layers"], list)


def test_dedupe_copies_timing_but_checks_each_weight(fake_torch: _FakeTorch, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    ws = [sgc.prune_rows_24(rng.standard_normal((8, 8)).astype(np.float32)).T.copy() for _ in range(3)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"], name=f"mm{i}")
             for i in range(3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("h2", TensorProto.FLOAT, [4, 8])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "three.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "d.json"
    assert sgc.main([str(path), "--tokens", "16", "--json", str(out), "--dedupe", "--target-ms", "0.1",
                     "--repeats", "1", "--inner", "2", "--finder", "builtin"]) == 0
    layers = json.loads(out.read_text())["layers"]
    assert [layer["name"] for layer in layers] == ["mm0", "mm1", "mm2"]
    assert "copied from mm0" in layers[1]["timing"] and layers[1]["dense_us"] == layers[0]["dense_us"]
    assert all(layer["ok"] and layer["max_err"] < 1e-2 for layer in layers)


def test_markdown_from_json(fake_torch: _FakeTorch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _gemm_model(tmp_path)
    out = tmp_path / "res.json"
    assert sgc.main([str(path), "--tokens", "16", "--json", str(out), "--target-ms", "0.1", "--repeats", "1",
                     "--inner", "2"]) == 0
    capsys.readouterr()
    assert sgc.main(["--from-json", str(out)]) == 0
    md = capsys.readouterr().out
    assert md.startswith("Device: ") and "| 8x16 | 1 | 16 |" in md and "| 16 | " in md


def test_run_layer_bf16(fake_torch: _FakeTorch) -> None:
    rng = np.random.default_rng(2)
    w = sgc.GemmWeight("w", "node", "MatMul", 16, 8, sgc.random_24(rng, 8, 16))
    args = sgc.build_parser().parse_args(["--self-test", "--dtype", "bf16", "--target-ms", "0.1", "--repeats", "1",
                                          "--inner", "2"])
    r = sgc.run_layer(fake_torch, w, 32, {}, args)
    assert r.ok is True and r.sparse_us is not None


def test_exclude_regex(tmp_path: Path) -> None:
    path, _ = _gemm_model(tmp_path)
    weights, _ = sgc.find_gemm_weights(path)
    chosen, rejected = sgc.select_weights(weights, sgc.build_parser().parse_args(["x", "--exclude", "^conv$"]))
    assert {w.node for w in chosen} == {"mm", "gemm"}
    assert any("--exclude" in r["reason"] for r in rejected)


def test_fp32_model_warns_strongly_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    from models import build_mlp

    _no_trt(monkeypatch)
    res = onnxprune.optimize(from_proto(build_mlp()), "nm(n=2,m=4),tensorrt(engine=/tmp/x.engine,emit_trtexec=true)")
    assert any("compute in FP32" in w and "fp16 pass" in w for w in res.report.warnings)
    assert res.report.passes[-1].stats["onnx_eligible"] == 0
