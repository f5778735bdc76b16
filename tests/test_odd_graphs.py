"""Odd but valid graphs: control flow, custom ops, many opsets, FP16/BF16, QDQ, shared weights,
dynamic dims, external data, ``--inplace``.

Every case runs ``cleanup`` (through the CLI or the API) and compares the result with the input on
ONNX Runtime; the sparsifying passes (``masks``, ``nm``, when registered) must either prune a weight
or report it as skipped, never break the graph.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from models import build_cnn, build_mlp, build_transformer_block, random_inputs
from onnxprune.check import run_model
from onnxprune.cli import main
from onnxprune.errors import OnnxPruneError
from onnxprune.ir.load import from_proto

RNG = np.random.default_rng(0)


def _init(name: str, shape: tuple[int, ...], dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(dtype), name)


def _roundtrip_cleanup(proto: onnx.ModelProto, feeds_list: list[dict[str, np.ndarray]],
                       spec: str = "cleanup") -> onnxprune.Model:
    """Run ``spec`` and check every feed gives identical outputs on ORT (cleanup must be exact)."""
    model = from_proto(proto)
    result = onnxprune.optimize(model, spec)
    onnx.checker.check_model(result.model.proto, full_check=True)
    for feeds in feeds_list:
        ref = run_model(model, feeds)
        got = run_model(result.model, feeds)
        assert ref.keys() == got.keys()
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-6)
    return result.model


def _sparsifiers() -> list[str]:
    have = onnxprune.registered_passes()
    return [s for s in ("masks(sparsity=0.5)", "nm(n=2,m=4)") if s.split("(")[0] in have]


def _sparsify_or_skip(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], weight: str) -> None:
    """Each sparsifier prunes ``weight`` or names it as skipped (in its stats or the report's warnings,
    where :func:`onnxprune.api.subgraph_weights` lists weights used inside If/Loop/Scan bodies);
    the result always runs on ORT."""
    for spec in _sparsifiers():
        model = from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
        try:
            result = onnxprune.optimize(model, spec)
        except OnnxPruneError as exc:  # a clear refusal is allowed
            assert str(exc)
            continue
        out = run_model(result.model, feeds)
        assert all(np.all(np.isfinite(v)) for v in out.values())
        text = repr(result.report.passes[0].stats) + repr(result.report.warnings)
        pruned = _subgraph_or_main_nnz(result.model.proto, weight) < _subgraph_or_main_nnz(proto, weight)
        assert pruned or weight in text, f"{spec}: {weight} neither pruned nor reported ({text[:300]})"


def _subgraph_or_main_nnz(proto: onnx.ModelProto, name: str) -> int:
    def walk(g: onnx.GraphProto) -> int | None:
        for t in g.initializer:
            if t.name == name:
                return int(np.count_nonzero(numpy_helper.to_array(t)))
        for n in g.node:
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    found = walk(sub)
                    if found is not None:
                        return found
        return None

    found = walk(proto.graph)
    assert found is not None, name
    return found


# ---------------------------------------------------------------------- control flow
IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (bool c, float[N, 8] x) => (float[N, 8] y) {
    pre = Relu(x)
    y = If(c) <then_branch = t () => (float[N, 8] a) { h = MatMul(pre, Wsub) a = Add(h, K) },
               else_branch = e () => (float[N, 8] b) { b = MatMul(pre, Wouter) }>
    unused = Sigmoid(x)
}
"""


def _if_model() -> onnx.ModelProto:
    m = onnx.parser.parse_model(IF_MODEL)
    m.graph.initializer.extend([_init("K", (8,)), _init("Wouter", (8, 8)), _init("unused_w", (3,))])
    then = m.graph.node[1].attribute[0].g if m.graph.node[1].attribute[0].name == "then_branch" else \
        m.graph.node[1].attribute[1].g
    then.initializer.append(_init("Wsub", (8, 8)))
    onnx.checker.check_model(m, full_check=True)
    return m


def test_if_subgraph_outer_references_survive_cleanup() -> None:
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    feeds = [{"c": np.array(True), "x": x}, {"c": np.array(False), "x": x}]
    out = _roundtrip_cleanup(_if_model(), feeds)
    names = {t.name for t in out.graph.initializer}
    assert {"K", "Wouter"} <= names and "unused_w" not in names
    assert [n.op_type for n in out.graph.node] == ["Relu", "If"]


def test_if_subgraph_weights_pruned_or_reported() -> None:
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    _sparsify_or_skip(_if_model(), {"c": np.array(True), "x": x}, "Wsub")
    _sparsify_or_skip(_if_model(), {"c": np.array(False), "x": x}, "Wouter")


LOOP_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 8] x) => (float[1, 8] y) {
    cond = Constant <value = bool {1}> ()
    y = Loop(T, cond, x) <body = body (int64 i, bool c, float[1, 8] h) => (bool c2, float[1, 8] h2) {
        c2 = Identity(c)
        m = MatMul(h, W)
        h2 = Tanh(m)
    }>
}
"""


def test_loop_body_reading_outer_weight() -> None:
    m = onnx.parser.parse_model(LOOP_MODEL)
    m.graph.initializer.extend([numpy_helper.from_array(np.array(3, np.int64), "T"), _init("W", (8, 8))])
    onnx.checker.check_model(m, full_check=True)
    x = RNG.standard_normal((1, 8)).astype(np.float32)
    out = _roundtrip_cleanup(m, [{"x": x}])
    assert {t.name for t in out.graph.initializer} >= {"T", "W"}


def test_loop_body_weight_pruned_or_reported() -> None:
    m = onnx.parser.parse_model(LOOP_MODEL)
    m.graph.initializer.extend([numpy_helper.from_array(np.array(3, np.int64), "T"), _init("W", (8, 8))])
    _sparsify_or_skip(m, {"x": RNG.standard_normal((1, 8)).astype(np.float32)}, "W")


def _skipped_and_unchanged(proto: onnx.ModelProto, spec: str, weights: list[str]) -> dict[str, str]:
    """Run ``spec``; each of ``weights`` must be in the pass's ``skipped`` stats as a subgraph weight
    and keep its exact value. Returns the ``skipped`` dict."""
    result = onnxprune.optimize(from_proto(onnx.ModelProto.FromString(proto.SerializeToString())), spec)
    skipped = result.report.passes[0].stats["skipped"]
    for w in weights:
        assert "If/Loop/Scan body" in skipped.get(w, ""), (spec, w, skipped)
        assert "subgraphs are not pruned" in skipped[w]
        assert _subgraph_or_main_nnz(result.model.proto, w) == _subgraph_or_main_nnz(proto, w)
    return skipped


@pytest.mark.parametrize("spec", ["masks(sparsity=0.5)", "nm(n=2,m=4)"])
def test_subgraph_weights_listed_in_pass_stats(spec: str) -> None:
    skipped = _skipped_and_unchanged(_if_model(), spec, ["Wsub", "Wouter"])
    assert "(node " in skipped["Wsub"]
    m = onnx.parser.parse_model(LOOP_MODEL)
    m.graph.initializer.extend([numpy_helper.from_array(np.array(3, np.int64), "T"), _init("W", (8, 8))])
    _skipped_and_unchanged(m, spec, ["W"])


SHARED_IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (bool c, float[N, 8] x) => (float[N, 8] y) {
    a = MatMul(x, Wshared)
    b = MatMul(a, Wmain)
    Wt = Transpose <perm = [1, 0]> (Wchain)
    d = MatMul(b, Wt)
    y = If(c) <then_branch = t () => (float[N, 8] p) { p = MatMul(d, Wshared) },
               else_branch = e () => (float[N, 8] q) { q = MatMul(d, Wt) }>
}
"""


@pytest.mark.parametrize("spec", ["masks(sparsity=0.5)", "nm(n=2,m=4)", "masks(sparsity=0.5,scope=global)",
                                  "masks(sparsity=0.5,include=W)"])
def test_main_graph_weight_also_read_by_subgraph_is_skipped(spec: str) -> None:
    """A weight of a main-graph MatMul that a body also reads (directly, or through a Transpose) is
    left alone; the main-only weight is still pruned; outputs stay finite on ORT."""
    m = onnx.parser.parse_model(SHARED_IF_MODEL)
    m.graph.initializer.extend([_init("Wshared", (8, 8)), _init("Wmain", (8, 8)), _init("Wchain", (8, 8))])
    onnx.checker.check_model(m, full_check=True)
    result = onnxprune.optimize(from_proto(onnx.ModelProto.FromString(m.SerializeToString())), spec)
    skipped = result.report.passes[0].stats["skipped"]
    for w in ("Wshared", "Wchain"):
        assert "If/Loop/Scan body" in skipped.get(w, ""), (w, skipped)
        assert _subgraph_or_main_nnz(result.model.proto, w) == 64
    assert _subgraph_or_main_nnz(result.model.proto, "Wmain") < 64
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    for c in (True, False):
        out = run_model(result.model, {"c": np.array(c), "x": x})
        assert all(np.all(np.isfinite(v)) for v in out.values())


SCAN_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4] s0, float[5, 4] xs) => (float[4] s, float[5, 4] ys) {
    s, ys = Scan(s0, xs) <num_scan_inputs = 1, body = body (float[4] st, float[4] xt) => (float[4] st2, float[4] yt) {
        t = Mul(xt, K)
        st2 = Add(st, t)
        yt = Identity(st2)
    }>
}
"""


def test_scan_body_reading_outer_constant() -> None:
    m = onnx.parser.parse_model(SCAN_MODEL)
    m.graph.initializer.append(_init("K", (4,)))
    onnx.checker.check_model(m, full_check=True)
    feeds = {"s0": np.zeros(4, np.float32), "xs": RNG.standard_normal((5, 4)).astype(np.float32)}
    out = _roundtrip_cleanup(m, [feeds])
    assert [t.name for t in out.graph.initializer] == ["K"]


def test_nested_subgraph_outer_reference() -> None:
    """An If inside a Loop body reads an outer initializer two scopes up."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool c, float[2] x) => (float[2] y) {
        cond = Constant <value = bool {1}> ()
        y = Loop(T, cond, x) <body = body (int64 i, bool cc, float[2] h) => (bool c2, float[2] h2) {
            c2 = Identity(cc)
            h2 = If(c) <then_branch = t () => (float[2] a) { a = Add(h, Deep) },
                        else_branch = e () => (float[2] b) { b = Identity(h) }>
        }>
    }
    """
    m = onnx.parser.parse_model(text)
    m.graph.initializer.extend([numpy_helper.from_array(np.array(2, np.int64), "T"), _init("Deep", (2,))])
    onnx.checker.check_model(m, full_check=True)
    x = np.ones(2, np.float32)
    out = _roundtrip_cleanup(m, [{"c": np.array(True), "x": x}, {"c": np.array(False), "x": x}])
    assert "Deep" in {t.name for t in out.graph.initializer}
    assert onnxprune.pipeline.manager.remove_dead_code(out) == 0


# ---------------------------------------------------------------------- custom ops, functions
def test_custom_domain_op_left_alone(tmp_path: Path) -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
    g (float[N, 8] X) => (float[N, 4] Y) {
        H = MatMul(X, W)
        Z = com.example.Foo <alpha = 0.5> (H)
        Y = Relu(Z)
    }
    """
    m = onnx.parser.parse_model(text)
    m.graph.initializer.append(_init("W", (8, 4)))
    src = tmp_path / "custom.onnx"
    onnx.save(m, src)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "--passes", "cleanup", "-o", str(out), "-q"]) == 0
    got = onnx.load(out)
    foo = [n for n in got.graph.node if n.op_type == "Foo"]
    assert len(foo) == 1 and foo[0].domain == "com.example" and foo[0].attribute[0].f == 0.5
    assert {(o.domain, o.version) for o in got.opset_import} == {("", 17), ("com.example", 1)}


def test_model_local_function_preserved_through_cleanup() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[N, 8] X) => (float[N, 8] Y) {
        Y = local.Gelu(X)
    }
    <domain: "local", opset_import: ["" : 17]>
    Gelu (x) => (y) {
        half = Constant <value = float {0.5}> ()
        one = Constant <value = float {1.0}> ()
        s = Sigmoid(x)
        y = Mul(x, s)
    }
    """
    m = onnx.parser.parse_model(text)
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    out = _roundtrip_cleanup(m, [{"X": x}])
    assert [f.name for f in out.proto.functions] == ["Gelu"]
    assert out.proto.functions[0] == m.functions[0]


# ---------------------------------------------------------------------- opsets, dtypes
def _ort_max_opset() -> int:
    """Highest ai.onnx opset this onnxruntime accepts (probed with a one-node model)."""
    best = 0
    for v in range(9, 30):
        m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "p",
                                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]),
                              opset_imports=[helper.make_opsetid("", v)])
        m.ir_version = 8
        try:
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            best = v
        except Exception:
            break
    return best


ORT_MAX_OPSET = _ort_max_opset()


@pytest.mark.parametrize("opset", range(9, 24))
def test_cleanup_across_opsets(opset: int) -> None:
    if opset > ORT_MAX_OPSET:
        pytest.skip(f"onnxruntime {ort.__version__} supports ai.onnx opsets up to {ORT_MAX_OPSET}")
    if opset > onnx.defs.onnx_opset_version():
        pytest.skip(f"onnx {onnx.__version__} knows opsets up to {onnx.defs.onnx_opset_version()}")
    protos = [build_mlp(seed=opset, opset=opset), build_cnn(seed=opset, opset=opset)]
    if opset >= 17:  # LayerNormalization
        protos.append(build_transformer_block(seed=opset, opset=opset))
    for proto in protos:
        out = _roundtrip_cleanup(proto, [random_inputs(proto)])
        assert out.opset == opset


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fp16_and_bf16_models(dtype: str) -> None:
    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.BFLOAT16
    w = helper.make_tensor("W", elem, [8, 8], RNG.standard_normal(64).astype(np.float32).tolist())
    if dtype == "float16":
        w = numpy_helper.from_array(RNG.standard_normal((8, 8)).astype(np.float16), "W")
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["X"], ["Xh"], to=elem), helper.make_node("MatMul", ["Xh", "W"], ["H"]),
         helper.make_node("Cast", ["H"], ["Y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", 8])], [w]),
        opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    model = from_proto(m)
    result = onnxprune.optimize(model, "cleanup")
    onnx.checker.check_model(result.model.proto, full_check=True)
    assert result.model.initializer("W").data_type == elem
    assert result.report.before.parameters == 64  # half-precision weights count as parameters
    x = {"X": RNG.standard_normal((2, 8)).astype(np.float32)}
    try:
        ref = run_model(model, x)["Y"]
    except OnnxPruneError:
        pytest.skip(f"onnxruntime CPU has no {dtype} MatMul")
    np.testing.assert_array_equal(run_model(result.model, x)["Y"], ref)
    for spec in _sparsifiers():
        try:
            r = onnxprune.optimize(model, spec)
        except OnnxPruneError:
            continue
        assert r.model.initializer("W").data_type == elem
        run_model(r.model, x)


def test_qdq_per_channel_model() -> None:
    """QuantizeLinear/DequantizeLinear with per-channel weight scales survive cleanup exactly."""
    wq = RNG.integers(-127, 128, (16, 8)).astype(np.int8)
    scale = (RNG.uniform(0.01, 0.02, 16)).astype(np.float32)
    m = helper.make_model(helper.make_graph(
        [helper.make_node("QuantizeLinear", ["X", "xs", "xz"], ["Xq"]),
         helper.make_node("DequantizeLinear", ["Xq", "xs", "xz"], ["Xd"]),
         helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["Wd"], axis=0),
         helper.make_node("Gemm", ["Xd", "Wd"], ["Y"], transB=1)], "qdq",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", 16])],
        [numpy_helper.from_array(wq, "Wq"), numpy_helper.from_array(scale, "ws"),
         numpy_helper.from_array(np.zeros(16, np.int8), "wz"),
         numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
         numpy_helper.from_array(np.array(0, np.int8), "xz")]),
        opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    x = {"X": RNG.standard_normal((3, 8)).astype(np.float32)}
    out = _roundtrip_cleanup(m, [x])
    np.testing.assert_array_equal(out.get_array("Wq"), wq)
    assert [n.op_type for n in out.graph.node].count("DequantizeLinear") == 2
    for spec in _sparsifiers():
        try:
            r = onnxprune.optimize(from_proto(m), spec)
        except OnnxPruneError:
            continue
        got = np.asarray(r.model.get_array("Wq"))
        assert got.dtype == np.int8 and got.shape == wq.shape
        np.testing.assert_allclose(run_model(r.model, x)["Y"].shape, (3, 16))


def test_shared_initializer_two_consumers() -> None:
    m = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["A"]), helper.make_node("MatMul", ["A", "W"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", 8])], [_init("W", (8, 8))]),
        opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = {"X": RNG.standard_normal((2, 8)).astype(np.float32)}
    out = _roundtrip_cleanup(m, [x])
    assert [t.name for t in out.graph.initializer] == ["W"]
    for spec in _sparsifiers():
        r = onnxprune.optimize(from_proto(m), spec)
        assert [t.name for t in r.model.graph.initializer] == ["W"]  # still one shared tensor
        ref = x["X"] @ np.asarray(r.model.get_array("W")) @ np.asarray(r.model.get_array("W"))
        np.testing.assert_allclose(run_model(r.model, x)["Y"], ref, rtol=1e-4, atol=1e-5)


def test_dynamic_batch_and_sequence() -> None:
    proto = build_transformer_block(seed=5)
    feeds = [random_inputs(proto, batch=b, seq=s, seed=b * 10 + s) for b, s in ((1, 3), (2, 8), (4, 17))]
    out = _roundtrip_cleanup(proto, feeds)
    dims = [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]


# ---------------------------------------------------------------------- external data, --inplace
def _external_file(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    proto = build_mlp(seed=7, in_features=64, hidden=(128, 96))
    src = tmp_path / "ext.onnx"
    onnx.save(proto, src, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=1024)
    return src, random_inputs(proto)


def test_external_data_in_external_data_out(tmp_path: Path) -> None:
    src, feeds = _external_file(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    out = out_dir / "m.onnx"
    assert main(["optimize", str(src), "--passes", "cleanup", "-o", str(out), "-q"]) == 0
    assert sorted(os.listdir(out_dir)) == ["m.onnx", "m.onnx.data"]
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    np.testing.assert_allclose(run_model(str(out), feeds)["logits"], run_model(str(src), feeds)["logits"], rtol=1e-6)
    # the output is itself a valid input: reload (memory-mapped) and re-save a second generation
    out2 = out_dir / "m2.onnx"
    assert main(["optimize", str(out), "--passes", "cleanup", "-o", str(out2), "-q"]) == 0
    assert isinstance(onnxprune.load(out2).get_array("fc0.weight"), np.memmap)
    np.testing.assert_allclose(run_model(str(out2), feeds)["logits"], run_model(str(src), feeds)["logits"], rtol=1e-6)


def test_inplace_with_external_data(tmp_path: Path) -> None:
    src, feeds = _external_file(tmp_path)
    ref = run_model(str(src), feeds)["logits"]
    sparse = [s for s in _sparsifiers() if s.startswith("nm")]
    spec = sparse[0] if sparse else "cleanup"
    assert main(["optimize", str(src), "--passes", spec, "--inplace", "-q"]) == 0
    # the input's external data file is rewritten as <name>.onnx.data beside it, nothing else left
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data"]
    got = run_model(str(src), feeds)["logits"]
    if spec == "cleanup":
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    else:
        w = onnxprune.load(src).get_array("fc0.weight")
        assert np.count_nonzero(w) == w.size // 2


def test_subgraph_initializer_with_external_data(tmp_path: Path) -> None:
    """External data inside a subgraph is validated, read inline at load, and saved inline."""
    m = _if_model()
    then = next(a.g for a in m.graph.node[1].attribute if a.name == "then_branch")
    wsub = then.initializer[0]
    arr = numpy_helper.to_array(wsub)
    (tmp_path / "wsub.bin").write_bytes(b"\0" * 16 + arr.tobytes())
    wsub.ClearField("raw_data")
    wsub.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "wsub.bin"), ("offset", "16"), ("length", str(arr.nbytes))):
        e = wsub.external_data.add()
        e.key, e.value = k, v
    src = tmp_path / "if.onnx"
    onnx.save(m, src)
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    feeds = {"c": np.array(True), "x": x}
    ref = run_model(str(src), feeds)["y"]
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    assert main(["optimize", str(src), "--passes", "cleanup", "-o", str(out_dir / "m.onnx"), "-q"]) == 0
    assert os.listdir(out_dir) == ["m.onnx"]  # the small subgraph weight went inline
    np.testing.assert_allclose(run_model(str(out_dir / "m.onnx"), feeds)["y"], ref, rtol=1e-6)


def test_custom_domain_op_blocks_channel_groups() -> None:
    """A channel group that flows through an op without a handler is blocked, with the op named."""
    if "channels" not in onnxprune.registered_passes():
        pytest.skip("channels not registered in this build")
    text = """
    <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
    g (float[N, 8] X) => (float[N, 4] Y) {
        H = MatMul(X, W1)
        R = Relu(H)
        Z = com.example.Foo(R)
        Y = MatMul(Z, W2)
    }
    """
    m = onnx.parser.parse_model(text)
    m.graph.initializer.extend([_init("W1", (8, 16)), _init("W2", (16, 4))])
    r = onnxprune.optimize(from_proto(m), "channels(ratio=0.5)")
    assert [list(t.dims) for t in r.model.graph.initializer] == [[8, 16], [16, 4]]
    assert r.report.passes[0].stats["groups_blocked"] == 1
    assert any("Foo" in w for w in r.report.warnings)


def _qdq_mlp() -> onnx.ModelProto:
    """Three Gemm layers whose int8 weights go through per-channel DequantizeLinear (axis 0)."""
    rng = np.random.default_rng(4)
    nodes, inits, x = [], [], "X"
    dims = [8, 16, 12, 4]
    for i in range(3):
        k, n = dims[i], dims[i + 1]
        inits += [numpy_helper.from_array(rng.integers(-127, 128, (n, k)).astype(np.int8), f"w{i}_q"),
                  numpy_helper.from_array(rng.uniform(0.005, 0.02, n).astype(np.float32), f"w{i}_s"),
                  numpy_helper.from_array(np.zeros(n, np.int8), f"w{i}_z"),
                  numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_s", f"w{i}_z"], [f"w{i}"], axis=0,
                                   name=f"dq{i}"),
                  helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], ["Y" if i == 2 else f"h{i}"], transB=1, name=f"fc{i}")]
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    m = helper.make_model(helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4])], inits),
        opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_qdq_channel_removal_slices_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    """Channel removal through per-channel DequantizeLinear: int8 rows, scales and zero points shrink
    together, and the result equals its masked twin."""
    if "channels" not in onnxprune.registered_passes():
        pytest.skip("channels not registered in this build")
    from test_fuzz import check_masked_twin

    m = _qdq_mlp()
    r = onnxprune.optimize(from_proto(m), "channels(ratio=0.5)")
    dims = {t.name: list(t.dims) for t in r.model.graph.initializer}
    assert dims["w0_q"] == [8, 8] and dims["w0_s"] == [8] and dims["w0_z"] == [8] and dims["w1_q"] == [6, 8]
    assert r.model.initializer("w0_q").data_type == TensorProto.INT8
    assert check_masked_twin(m, "channels", {"ratio": 0.5}, monkeypatch) == "ok"


def test_qdq_masks_keep_int8() -> None:
    m = _qdq_mlp()
    for spec in _sparsifiers():
        r = onnxprune.optimize(from_proto(m), spec)
        w = np.asarray(r.model.get_array("w1_q"))
        assert w.dtype == np.int8 and 0 < np.count_nonzero(w) < w.size
        run_model(r.model, {"X": RNG.standard_normal((2, 8)).astype(np.float32)})


@pytest.mark.parametrize("name", sorted(set(onnxprune.registered_passes()) - {"tensorrt"}))
def test_memory_mapped_input_gives_the_same_result(tmp_path: Path, name: str) -> None:
    """Every pass gives the same weights whether the input's weights are memory-mapped or in the proto."""
    proto = build_cnn(seed=8) if name == "channels" else build_transformer_block(seed=8)
    src = tmp_path / "ext.onnx"
    copy = onnx.ModelProto.FromString(proto.SerializeToString())  # onnx.save converts its argument in place
    onnx.save(copy, src, save_as_external_data=True, location="ext.onnx.data", size_threshold=256)
    mapped = onnxprune.load(src)
    assert mapped.external
    try:
        a = onnxprune.optimize(from_proto(proto), name).model
    except OnnxPruneError as exc:
        pytest.skip(f"{name} refuses the model: {exc}")
    b = onnxprune.optimize(mapped, name).model
    # (the order of initializers may differ: cleanup keeps memory-mapped ones in place)
    assert sorted(t.name for t in a.graph.initializer) == sorted(t.name for t in b.graph.initializer)
    for t in a.graph.initializer:
        np.testing.assert_array_equal(np.asarray(a.get_array(t.name)), np.asarray(b.get_array(t.name)))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]


def test_nonfinite_weights_are_reported() -> None:
    proto = build_mlp(seed=1)
    t = proto.graph.initializer[0]
    a = numpy_helper.to_array(t).copy()
    a.flat[::7] = np.nan
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    for spec in ["cleanup", *_sparsifiers()]:
        r = onnxprune.optimize(from_proto(proto), spec)
        assert r.report.before.nonfinite_weights == [t.name]
        assert any("NaN or Inf" in w and t.name in w for w in r.report.warnings)
    clean = onnxprune.optimize(from_proto(build_mlp(seed=1)), "cleanup")
    assert clean.report.before.nonfinite_weights == []
    assert not [w for w in clean.report.warnings if "NaN" in w]
