"""Model I/O: round trips keep everything the graph does not hold; external data is memory-mapped."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
import onnxprune.cli
import onnxprune.ir.save as save_mod
from onnxprune.check import run_model
from onnxprune.errors import ModelLoadError, ModelSaveError
from onnxprune.ir.load import from_proto, load
from onnxprune.ir.save import save


def _rich_model() -> onnx.ModelProto:
    """A model with metadata, doc strings, a custom opset, a model-local function and its use."""
    text = """
    <ir_version: 8, opset_import: ["" : 17, "local" : 1], producer_name: "unit-test",
     producer_version: "9.9", domain: "org.example", model_version: 3, doc_string: "model doc">
    agraph (float[N, 8] X) => (float[N, 4] Y) {
        H = local.Scaled(X)
        Y = MatMul(H, W)
    }
    <domain: "local", opset_import: ["" : 17]>
    Scaled (x) => (y) {
        two = Constant <value = float {2.0}> ()
        y = Mul(x, two)
    }
    """
    m = onnx.parser.parse_model(text)
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "W")
    w.doc_string = "weight doc"
    m.graph.initializer.append(w)
    m.graph.doc_string = "graph doc"
    m.graph.node[1].doc_string = "node doc"
    helper.set_model_props(m, {"author": "me", "license": "MIT"})
    onnx.checker.check_model(m, full_check=True)
    return m


def test_round_trip_keeps_model_fields(tmp_path: Path) -> None:
    src = tmp_path / "rich.onnx"
    onnx.save(_rich_model(), src)
    m = load(src)
    out = tmp_path / "out.onnx"
    save(m, out)
    a, b = onnx.load(src), onnx.load(out)
    assert b.producer_name == "unit-test" and b.producer_version == "9.9"
    assert b.domain == "org.example" and b.model_version == 3 and b.doc_string == "model doc"
    assert b.ir_version == a.ir_version
    assert {(o.domain, o.version) for o in b.opset_import} == {("", 17), ("local", 1)}
    assert {p.key: p.value for p in b.metadata_props} == {"author": "me", "license": "MIT"}
    assert [f.name for f in b.functions] == ["Scaled"] and b.functions[0] == a.functions[0]
    assert b.graph.doc_string == "graph doc" and b.graph.node[1].doc_string == "node doc"
    assert b.graph.initializer[0].doc_string == "weight doc"
    assert b.graph == a.graph  # nothing else in the graph moved either


def test_round_trip_through_cleanup_keeps_functions(tmp_path: Path) -> None:
    src = tmp_path / "rich.onnx"
    onnx.save(_rich_model(), src)
    out = tmp_path / "out.onnx"
    assert onnxprune.cli.main(["optimize", str(src), "--passes", "cleanup", "-o", str(out), "-q"]) == 0
    b = onnx.load(out)
    assert [f.name for f in b.functions] == ["Scaled"]
    assert {p.key for p in b.metadata_props} == {"author", "license"}
    assert b.producer_name == "unit-test"
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(str(out), {"X": x})["Y"], run_model(str(src), {"X": x})["Y"], rtol=1e-6)


def _save_external(tmp_path: Path, name: str = "ext.onnx") -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    arrays = {"W0": rng.standard_normal((64, 64)).astype(np.float32),
              "W1": rng.standard_normal((64, 32)).astype(np.float32)}
    m = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["X", "W0"], ["H"]), helper.make_node("MatMul", ["H", "W1"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", 32])],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()]), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / name
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location=name + ".bin",
              size_threshold=0)
    return path, arrays


def test_external_data_is_memory_mapped(tmp_path: Path) -> None:
    path, arrays = _save_external(tmp_path)
    m = load(path)
    assert set(m.external) == {"W0", "W1"}
    w0 = m.get_array("W0")
    assert isinstance(w0, np.memmap) and not w0.flags.writeable
    np.testing.assert_array_equal(w0, arrays["W0"])
    assert not m.proto.graph.initializer[0].raw_data  # nothing read into the proto


def test_external_resave_and_reload(tmp_path: Path) -> None:
    """External in, external out (memory-mapped source), then re-saved again from the new copy."""
    path, arrays = _save_external(tmp_path)
    m = load(path)
    out1 = tmp_path / "a" / "m.onnx"
    out1.parent.mkdir()
    save(m, out1)
    assert (out1.parent / "m.onnx.data").is_file()
    m2 = load(out1)
    assert isinstance(m2.get_array("W1"), np.memmap)
    m2.set_array("W1", np.zeros((64, 32), np.float32))
    out2 = tmp_path / "b.onnx"
    save(m2, out2)
    m3 = load(out2)
    np.testing.assert_array_equal(m3.get_array("W0"), arrays["W0"])
    assert not np.any(m3.get_array("W1"))
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(run_model(str(out1), {"X": x})["Y"], run_model(str(path), {"X": x})["Y"], rtol=1e-6)


def test_refuses_to_overwrite_input_external_data(tmp_path: Path) -> None:
    """Saving out.onnx would rewrite out.onnx.data, which is where the input's weights live."""
    path, _ = _save_external(tmp_path, "in.onnx")
    proto = onnx.load(path, load_external_data=False)
    (tmp_path / "in.onnx.bin").rename(tmp_path / "out.onnx.data")
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "out.onnx.data"
    onnx.save(proto, path)
    m = load(path)
    before = (tmp_path / "out.onnx.data").read_bytes()
    with pytest.raises(ModelSaveError, match="external data"):
        save(m, tmp_path / "out.onnx")
    with pytest.raises(ModelSaveError, match="inplace"):
        save(m, path)
    assert (tmp_path / "out.onnx.data").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx.data"]


def test_large_model_switches_to_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(save_mod, "EXTERNAL_DATA_LIMIT", 10_000)
    rng = np.random.default_rng(0)
    m = from_proto(helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W")]),
        opset_imports=[helper.make_opsetid("", 17)]))
    out = tmp_path / "m.onnx"
    save(m, out)
    assert (tmp_path / "m.onnx.data").stat().st_size == 64 * 64 * 4
    assert load(out).external["W"].length == 64 * 64 * 4


def test_over_2gb_external_data_sparse_file(tmp_path: Path) -> None:
    """A 2.25 GB weight in a sparse external file: loads instantly, memory-mapped, values readable."""
    rows, cols = 24_000, 24_000  # 2.3e9 bytes float32
    data = tmp_path / "big.bin"
    with open(data, "wb") as f:
        f.truncate(rows * cols * 4)
    try:
        with open(data, "r+b") as f:
            f.seek((rows * cols - 1) * 4)
            f.write(np.float32(7.0).tobytes())
    except OSError:
        pytest.skip("file system cannot hold a sparse 2.3 GB file")
    w = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[rows, cols], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "big.bin"), ("offset", "0"), ("length", str(rows * cols * 4))):
        e = w.external_data.add()
        e.key, e.value = k, v
    m = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, cols])], [w]),
        opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "big.onnx"
    path.write_bytes(m.SerializeToString())
    model = load(path)
    arr = model.get_array("W")
    assert isinstance(arr, np.memmap) and arr.shape == (rows, cols)
    assert arr[-1, -1] == 7.0 and arr[0, 0] == 0.0
    assert model.weight_bytes() == rows * cols * 4
    assert os.path.getsize(path) < 1000  # the proto itself stays tiny


def test_sparse_storage_round_trip(tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    w[:, (np.arange(32) % 5) != 0] = 0  # 80% zeros: sparse storage is smaller even with int64 indices
    m = from_proto(helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(w, "W")]), opset_imports=[helper.make_opsetid("", 17)]))
    out = tmp_path / "s.onnx"
    save(m, out, sparse_initializers=True)
    assert len(onnx.load(out).graph.sparse_initializer) == 1
    np.testing.assert_array_equal(load(out).get_array("W"), w)


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    p = tmp_path / "x.onnx"
    p.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelLoadError) as info:
        load(p)
    assert "\n" not in str(info.value) and str(p) in str(info.value)


def test_refuses_output_onto_input_external_data(tmp_path: Path) -> None:
    path, _ = _save_external(tmp_path, "in.onnx")
    m = load(path)
    before = (tmp_path / "in.onnx.bin").read_bytes()
    for inplace in (False, True):
        with pytest.raises(ModelSaveError, match="external data file of the input"):
            save(m, tmp_path / "in.onnx.bin", inplace=inplace)
    assert (tmp_path / "in.onnx.bin").read_bytes() == before


@pytest.mark.parametrize("indices, values, words", [
    ([0, 99], [1.0, 2.0], "outside its 32 elements"),
    ([-1], [1.0], "outside its 32 elements"),
    ([0, 1, 2], [1.0, 2.0], "3 indices for 2 values"),
    ([[0, 0], [9, 9]], [1.0, 2.0], "outside its shape [4, 8]"),
    ([[[0]]], [1.0], "indices of shape"),
])
def test_malformed_sparse_initializer(tmp_path: Path, indices: list, values: list, words: str) -> None:
    """Found while probing hostile inputs: bad sparse indices crashed with IndexError/ValueError."""
    m = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8])]), opset_imports=[helper.make_opsetid("", 17)])
    sp = m.graph.sparse_initializer.add()
    sp.values.CopyFrom(numpy_helper.from_array(np.array(values, np.float32), "W"))
    sp.indices.CopyFrom(numpy_helper.from_array(np.array(indices, np.int64), "W_i"))
    sp.dims.extend([4, 8])
    p = tmp_path / "s.onnx"
    p.write_bytes(m.SerializeToString())
    with pytest.raises(ModelLoadError) as info:
        load(p)
    assert words in str(info.value) and "'W'" in str(info.value)


def test_duplicate_node_names_are_renamed_apart_not_refused(tmp_path, caplog) -> None:
    """Node names carry no semantics; silero_vad_openvino_16k (IR 8) has 'F0::anon' x15 and ONNX Runtime runs it."""
    import logging

    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="anon"), helper.make_node("Neg", ["a"], ["b"], name="anon"),
             helper.make_node("Abs", ["b"], ["y"], name="anon")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    p = tmp_path / "dup.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), p)
    with caplog.at_level(logging.WARNING):
        model = onnxprune.load(p)
    assert [n.name for n in model.graph.node] == ["anon", "anon__2", "anon__3"]
    assert "2 node(s) shared a name" in caplog.text
    ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])  # unique now
