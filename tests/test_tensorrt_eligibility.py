"""Tests of ``inspect_tensorrt``: which layers TensorRT could run on sparse tensor cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from models import build_cnn, build_transformer_block
from onnxprune.ir.load import from_proto
from onnxprune.tensorrt.eligibility import format_tensorrt, inspect_tensorrt

F16 = TensorProto.FLOAT16
F32 = TensorProto.FLOAT


def _prune24_axis0(w: np.ndarray) -> np.ndarray:
    """2:4 along axis 0 of a 2-D array (magnitude)."""
    k, n = w.shape
    g = w.T.reshape(n, k // 4, 4).copy()
    order = np.argsort(np.abs(g), axis=2)
    np.put_along_axis(g, order[:, :, :2], 0, axis=2)
    return np.ascontiguousarray(g.reshape(n, k).T)


def _model(dtype: int = F16, k: int = 8, prune: bool = True, conv_group: int = 1) -> onnxprune.Model:
    np_t = np.float16 if dtype == F16 else np.float32
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, 16)).astype(np.float32)
    if prune and k % 4 == 0:
        w = _prune24_axis0(w)
    cw = rng.standard_normal((8, 8 // conv_group, 3, 3)).astype(np.float32)
    if prune:  # 2:4 along C: view as [C, N*kh*kw]
        if conv_group == 1:
            cw = np.moveaxis(_prune24_axis0(np.moveaxis(cw, 1, 0).reshape(8, -1)).reshape(8, 8, 3, 3), 0, 1)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("MatMul", ["h", "hT"], ["att"], name="qk"),
        helper.make_node("Conv", ["img", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1], group=conv_group),
    ]
    nodes.insert(1, helper.make_node("Transpose", ["h"], ["hT"], name="tr", perm=[1, 0]))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", dtype, [4, k]),
         helper.make_tensor_value_info("img", dtype, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("att", dtype, [4, 4]),
         helper.make_tensor_value_info("c", dtype, [1, 8, 6, 6])],
        [numpy_helper.from_array(w.astype(np_t), "w"), numpy_helper.from_array(cw.astype(np_t), "cw")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return from_proto(proto)


def _by_node(data: dict) -> dict[str, dict]:
    return {e["node"]: e for e in data["layers"]}


def test_fp16_24_layers_eligible_and_flops_share() -> None:
    data = inspect_tensorrt(_model())
    layers = _by_node(data)
    assert layers["fc"]["eligible"] is True and layers["fc"]["nm_24"] is True
    assert (layers["fc"]["K"], layers["fc"]["N"]) == (8, 16)
    assert layers["conv"]["eligible"] is True and layers["conv"]["K"] == 8
    assert layers["qk"]["eligible"] is False
    assert any("dynamic weight" in r for r in layers["qk"]["reasons"])
    # FLOPs: fc 2*4*16*8, qk 2*4*4*16, conv 2*(8*6*6)*(8*3*3)
    fc, qk, conv = 2 * 4 * 16 * 8, 2 * 4 * 4 * 16, 2 * 8 * 36 * 72
    assert layers["fc"]["flops"] == fc and layers["qk"]["flops"] == qk and layers["conv"]["flops"] == conv
    assert data["summary"]["eligible_flops_share"] == pytest.approx((fc + conv) / (fc + qk + conv))
    assert data["summary"]["eligible"] == 2
    assert all(isinstance(e["eligible"], bool) for e in data["layers"])
    json.dumps(data)  # JSON-ready
    assert any("small" in n for n in layers["fc"]["notes"])


def test_fp32_model_not_eligible_strongly_typed_reason() -> None:
    data = inspect_tensorrt(_model(dtype=F32))
    fc = _by_node(data)["fc"]
    assert fc["eligible"] is False and fc["nm_24"] is True
    assert any("strongly typed" in r for r in fc["reasons"])
    assert data["summary"]["eligible"] == 0
    assert any("strongly typed" in n for n in data["notes"])
    assert "strongly typed" in format_tensorrt(data)


def test_dense_weights_structurally_eligible_only() -> None:
    data = inspect_tensorrt(_model(prune=False))
    fc = _by_node(data)["fc"]
    assert fc["structurally_eligible"] is True and fc["eligible"] is False and fc["nm_24"] is False
    assert any("not 2:4" in r for r in fc["reasons"])
    assert data["summary"]["structural_flops_share"] > data["summary"]["eligible_flops_share"] == 0.0


def test_k_not_multiple_of_4_and_grouped_conv() -> None:
    data = inspect_tensorrt(_model(k=6, conv_group=2))
    layers = _by_node(data)
    assert any("K=6 is not a multiple of 4" in r for r in layers["fc"]["reasons"])
    assert layers["fc"]["nm_24"] is None and layers["fc"]["eligible"] is False
    assert any("grouped convolution" in r for r in layers["conv"]["reasons"])


def test_cnn_builder_reports_grouped_and_depthwise() -> None:
    proto = build_cnn()
    res = onnxprune.optimize(from_proto(proto), "nm(n=2,m=4),fp16")
    data = inspect_tensorrt(res.model)
    grouped = [e for e in data["layers"] if e["op_type"] == "Conv" and e["group"] > 1]
    assert grouped and all(not e["eligible"] for e in grouped)
    assert any(e["eligible"] for e in data["layers"] if e["op_type"] == "Conv")
    text = format_tensorrt(data)
    assert "TensorRT sparse tensor cores:" in text and "grouped convolution" in text


def test_transformer_every_projection_eligible_after_nm_and_fp16() -> None:
    proto = build_transformer_block()
    res = onnxprune.optimize(from_proto(proto), "nm(n=2,m=4),fp16")
    data = inspect_tensorrt(res.model)
    with_weight = [e for e in data["layers"] if e["weight"] is not None and e["op_type"] in ("MatMul", "Gemm")]
    assert len(with_weight) >= 6  # Q, K, V, O, FFN up, FFN down
    bad = [(e["node"], e["reasons"]) for e in with_weight if not e["eligible"]]
    assert not bad
    dynamic = [e for e in data["layers"] if e["weight"] is None]
    assert dynamic and not any(e["eligible"] for e in dynamic)
    assert 0.0 < data["summary"]["eligible_flops_share"] < 1.0


def test_dims_change_flops() -> None:
    proto = build_transformer_block()
    m = from_proto(proto)
    a = inspect_tensorrt(m, dims={"batch": 1, "seq": 16})
    b = inspect_tensorrt(m, dims={"batch": 1, "seq": 64})
    fa = {e["node"]: e["flops"] for e in a["layers"]}
    fb = {e["node"]: e["flops"] for e in b["layers"]}
    lin = next(e["node"] for e in a["layers"] if e["weight"] is not None)
    assert fb[lin] == pytest.approx(4 * fa[lin])


def test_cli_inspect_tensorrt_json(tmp_path: Path) -> None:
    res = onnxprune.optimize(from_proto(build_transformer_block()), "nm(n=2,m=4),fp16")
    path = tmp_path / "t.onnx"
    onnxprune.save(res.model, path)
    out = subprocess.run([sys.executable, "-m", "onnxprune", "inspect", str(path), "--tensorrt", "--json"],
                         capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout)
    assert doc["tensorrt"]["summary"]["eligible"] >= 6
    assert all(isinstance(e["eligible"], bool) for e in doc["tensorrt"]["layers"])
    txt = subprocess.run([sys.executable, "-m", "onnxprune", "inspect", str(path), "--tensorrt"],
                         capture_output=True, text=True, check=True).stdout
    assert "TensorRT sparse tensor cores:" in txt


def _dq_model(quantize_activation: bool) -> onnxprune.Model:
    rng = np.random.default_rng(1)
    q = _prune24_axis0(rng.integers(-100, 100, size=(8, 16)).astype(np.float32)).astype(np.int8)
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(np.array(0.02, dtype=np.float32), "ws"),
             numpy_helper.from_array(np.array(0.1, dtype=np.float32), "xs"),
             numpy_helper.from_array(np.array(0, dtype=np.int8), "xz")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="dq_w")]
    act = "x"
    if quantize_activation:
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x")]
        act = "xd"
    nodes.append(helper.make_node("MatMul", [act, "w"], ["y"], name="fc"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [4, 8])],
                              [helper.make_tensor_value_info("y", F32, [4, 16])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return from_proto(proto)


def test_int8_qdq_eligible_weight_only_not() -> None:
    fc = _by_node(inspect_tensorrt(_dq_model(True)))["fc"]
    assert fc["compute_dtype"] == "int8 (Q/DQ)" and fc["nm_24"] is True and fc["eligible"] is True
    fc = _by_node(inspect_tensorrt(_dq_model(False)))["fc"]
    assert fc["eligible"] is False and any("weight-only" in n for n in fc["notes"])
    assert any("FP32 math" in r for r in fc["reasons"])


# ---------------------------------------------------------------------- one rule, one answer (issue 15, point 7)
def _nm_and_trt(model: onnxprune.Model) -> tuple[dict, dict]:
    from onnxprune.tensorrt.eligibility import inspect_nm

    return inspect_nm(model, 2, 4), inspect_tensorrt(model)


@pytest.mark.parametrize("pipeline", ["nm(n=2,m=4)", "nm(n=2,m=4),fp16"])
def test_inspect_nm_and_tensorrt_give_one_answer(pipeline: str) -> None:
    """`inspect --nm 2:4` once said 72 layers were TensorRT-eligible where `inspect --tensorrt` said 0
    of 96 on the same FP32 file: both now apply the one rule, FP32 math (strongly typed) included."""
    model = onnxprune.optimize(from_proto(build_transformer_block(layers=2)), pipeline).model
    nm, trt = _nm_and_trt(model)
    layers = [x for x in trt["layers"] if x["weight"] is not None]
    assert len(layers) == len(nm["tensorrt"]) == 12  # one GEMM per weight here
    assert nm["summary"]["tensorrt_eligible"] == trt["summary"]["structurally_eligible"]
    assert nm["summary"]["tensorrt_eligible_and_sparse"] == trt["summary"]["eligible"]
    if pipeline.endswith("fp16"):
        assert trt["summary"]["eligible"] == 12 and nm["summary"]["tensorrt_fp32_math"] == 0
    else:
        assert trt["summary"]["eligible"] == nm["summary"]["tensorrt_eligible"] == 0
        assert nm["summary"]["tensorrt_fp32_math"] == 12
        assert {t["reason_code"] for t in nm["tensorrt"]} == {"fp32_math"}


def test_cli_inspect_nm_says_fp32_why(tmp_path: Path) -> None:
    from onnxprune.cli import main

    src = tmp_path / "m.onnx"
    onnxprune.save(onnxprune.optimize(from_proto(build_transformer_block()), "nm(n=2,m=4)").model, src)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["inspect", str(src), "--nm", "2:4"]) == 0
    text = buf.getvalue()
    assert "0 of 6 weights eligible, 0 eligible and 2:4" in text
    assert "6 compute in FP32" in text and "strongly typed" in text and "fp16 pass" in text
    assert text.count("strongly typed") == 1  # said once, not on every row
    assert "layer0.attn.q" in text  # rows by node name


def test_nm_warns_only_about_weights_it_masked() -> None:
    """The demo warned that its grouped Conv was masked (and would not run sparse) although
    sparsegpt had skipped it: the warning now lists only masked weights, the skip is said."""
    from importlib import resources

    src = Path(str(resources.files("onnxprune") / "data" / "demo_cnn.onnx"))
    rng = np.random.default_rng(1)
    calib = [{"input": rng.standard_normal((8, 3, 32, 32)).astype(np.float32)}]
    res = onnxprune.optimize(onnxprune.load(src), "nm(n=2,m=4,criterion=sparsegpt)", calibration=calib)
    st = res.report.passes[0].stats
    assert "gconv.conv.weight" in st["skipped"] and "gconv.conv.weight" not in st["not_tensorrt_sparse"]
    arr = res.model.get_array("gconv.conv.weight")
    assert np.count_nonzero(arr) == arr.size  # really left dense
    assert not any("TensorRT will not run sparse" in w and "gconv" in w for w in res.report.warnings)
    assert any("left dense by the criterion" in w and "gconv.conv.weight" in w for w in res.report.warnings)
    # with magnitude the grouped Conv is masked, and then the warning is true and stays
    res = onnxprune.optimize(onnxprune.load(src), "nm(n=2,m=4)")
    st = res.report.passes[0].stats
    assert "grouped" in st["not_tensorrt_sparse"]["gconv.conv.weight"]
    assert any("TensorRT will not run sparse" in w and "gconv" in w for w in res.report.warnings)
