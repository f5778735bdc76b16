"""Tests of the deterministic test-model builders in ``models/``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import (
    BUILDERS,
    build_cnn,
    build_demo_model,
    build_mlp,
    build_transformer_block,
    random_inputs,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "onnxprune" / "data"

Builder = Callable[..., onnx.ModelProto]


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` on ONNX Runtime's CPU provider."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _expected_shape(name: str, batch: int, seq: int) -> tuple[int, ...]:
    """Output shape of the default-sized model ``name``."""
    return {
        "mlp": (batch, 10),
        "cnn": (batch, 10),
        "transformer": (batch, seq, 64),
        "demo": (batch, 10),
    }[name]


ALL_BUILDERS: dict[str, Builder] = {**BUILDERS, "demo": build_demo_model}


def test_builders_registry() -> None:
    assert BUILDERS == {
        "mlp": build_mlp,
        "cnn": build_cnn,
        "transformer": build_transformer_block,
    }


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_full_check_and_versions(name: str) -> None:
    model = ALL_BUILDERS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
@pytest.mark.parametrize("batch", [1, 3])
def test_runs_on_ort(name: str, batch: int) -> None:
    model = ALL_BUILDERS[name]()
    feed = random_inputs(model, batch=batch, seq=5)
    (out,) = _run(model, feed)
    assert out.shape == _expected_shape(name, batch, 5)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    # Activations stay O(1): no exploding or vanishing output.
    assert 0.05 < float(np.sqrt(np.mean(out.astype(np.float64) ** 2))) < 10.0


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_deterministic(name: str) -> None:
    build = ALL_BUILDERS[name]
    first = build(seed=0).SerializeToString()
    assert build(seed=0).SerializeToString() == first
    assert build(seed=1).SerializeToString() != first


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_dynamic_input_dims(name: str) -> None:
    model = ALL_BUILDERS[name]()
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"
        if name == "transformer":
            assert dims[1].dim_param == "seq"


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_names_unique_and_readable(name: str) -> None:
    model = ALL_BUILDERS[name]()
    graph = model.graph
    node_names = [n.name for n in graph.node]
    assert all(node_names)
    assert len(set(node_names)) == len(node_names)
    tensors = [t.name for t in graph.initializer] + [o for n in graph.node for o in n.output]
    duplicates = [t for t, count in Counter(tensors).items() if count > 1]
    assert not duplicates
    for init in graph.initializer:
        owner = init.name.rsplit(".", 1)[0]
        assert owner in node_names or owner.startswith("embeddings."), init.name
    assert [o.name for o in graph.output] == [graph.node[-1].output[0]]


def test_random_inputs_feed() -> None:
    model = build_transformer_block(vocab=7)
    feed = random_inputs(model, batch=3, seq=6, seed=4)
    ids, mask = feed["input_ids"], feed["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64
    assert ids.shape == mask.shape == (3, 6)
    assert ids.min() >= 0 and ids.max() < 7
    expected = np.ones((3, 6), dtype=np.int64)
    expected[1, -1] = 0
    np.testing.assert_array_equal(mask, expected)
    again = random_inputs(model, batch=3, seq=6, seed=4)
    np.testing.assert_array_equal(again["input_ids"], ids)

    x = random_inputs(build_cnn(), batch=2)["input"]
    assert x.shape == (2, 3, 16, 16) and x.dtype == np.float32


def test_mlp_structure() -> None:
    model = build_mlp(in_features=8, hidden=(16, 12, 4), out_features=3)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Gemm", "Relu"] * 3 + ["Gemm"]
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert all(onnx.helper.get_node_attr_value(n, "transB") == 1 for n in gemms)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert shapes["fc0.weight"] == (16, 8)
    assert shapes["classifier.weight"] == (3, 4)
    (out,) = _run(model, random_inputs(model))
    assert out.shape == (2, 3)


@pytest.mark.parametrize("build", [build_cnn, build_demo_model])
def test_cnn_structure(build: Builder) -> None:
    model = build()
    graph = model.graph
    ops = Counter(n.op_type for n in graph.node)
    for op in ("Conv", "BatchNormalization", "Relu", "Add", "Concat", "MaxPool",
               "GlobalAveragePool", "Flatten", "Gemm"):
        assert ops[op] >= 1, op
    weights = {t.name: tuple(t.dims) for t in graph.initializer}
    groups = {
        n.name: next((a.i for a in n.attribute if a.name == "group"), 1)
        for n in graph.node
        if n.op_type == "Conv"
    }
    dw_channels = weights["dw.conv.weight"][0]
    assert groups["dw.conv"] == dw_channels and weights["dw.conv.weight"][1] == 1
    assert weights["pw.conv.weight"][2:] == (1, 1)
    assert groups["gconv.conv"] == 2
    # The residual Add joins the block output with the block input.
    add = next(n for n in graph.node if n.name == "block1.add")
    assert list(add.input) == ["block1.bn2.out", "stem.relu.out"]
    concat = next(n for n in graph.node if n.op_type == "Concat")
    assert list(concat.input) == ["branch_a.relu.out", "branch_b.relu.out"]
    n_params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    assert n_params < 200_000


def test_cnn_sizes() -> None:
    model = build_cnn(in_ch=1, size=8, num_classes=4, width=8)
    onnx.checker.check_model(model, full_check=True)
    (out,) = _run(model, random_inputs(model))
    assert out.shape == (2, 4)


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("layers", [1, 2])
def test_transformer_opsets(opset: int, layers: int) -> None:
    model = build_transformer_block(opset=opset, layers=layers)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    ops = {n.op_type for n in model.graph.node}
    assert ("LayerNormalization" in ops) == (opset >= 17)
    feed = random_inputs(model, batch=2, seq=8)
    (out,) = _run(model, feed)
    assert out.shape == (2, 8, 64)
    assert np.isfinite(out).all()


def test_transformer_decomposed_layernorm_matches() -> None:
    feed = random_inputs(build_transformer_block(), batch=2, seq=8)
    (native,) = _run(build_transformer_block(opset=17, layers=2), feed)
    (decomposed,) = _run(build_transformer_block(opset=13, layers=2), feed)
    np.testing.assert_allclose(native, decomposed, rtol=1e-4, atol=1e-4)


def test_transformer_structure() -> None:
    model = build_transformer_block(hidden=32, heads=2, ffn=48, vocab=11)
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    assert tuple(weights["embeddings.word_embeddings.weight"].dims) == (11, 32)
    for part in ("q", "k", "v", "out"):
        assert tuple(weights[f"layer0.attn.{part}.weight"].dims) == (32, 32)
        assert tuple(weights[f"layer0.attn.{part}.bias"].dims) == (32,)
    assert tuple(weights["layer0.ffn.up.weight"].dims) == (32, 48)
    assert tuple(weights["layer0.ffn.down.weight"].dims) == (48, 32)
    for part in ("q", "k", "v"):
        shape = onnx.numpy_helper.to_array(weights[f"layer0.attn.{part}.reshape.shape"])
        assert shape.tolist() == [0, 0, 2, 16]
    merge = onnx.numpy_helper.to_array(weights["layer0.attn.context.reshape.shape"])
    assert merge.tolist() == [0, 0, 32]
    perms = {
        n.name: list(n.attribute[0].ints) for n in graph.node if n.op_type == "Transpose"
    }
    assert perms["layer0.attn.k.transpose"] == [0, 2, 3, 1]
    assert perms["layer0.attn.q.transpose"] == [0, 2, 1, 3]
    ops = Counter(n.op_type for n in graph.node)
    assert ops["Erf"] == 1 and ops["Softmax"] == 1 and ops["Gather"] == 1
    (out,) = _run(model, random_inputs(model, batch=2, seq=4))
    assert out.shape == (2, 4, 32)


def test_transformer_mask_hides_padding() -> None:
    model = build_transformer_block()
    feed = random_inputs(model, batch=2, seq=8)
    (base,) = _run(model, feed)
    changed = {k: v.copy() for k, v in feed.items()}
    changed["input_ids"][1, -1] = (changed["input_ids"][1, -1] + 1) % 100  # masked position
    changed["input_ids"][0, -1] = (changed["input_ids"][0, -1] + 1) % 100  # attended position
    (out,) = _run(model, changed)
    np.testing.assert_allclose(out[1, :-1], base[1, :-1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[0, :-1], base[0, :-1], atol=1e-3)


def test_transformer_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        build_transformer_block(hidden=30, heads=4)
    with pytest.raises(ValueError):
        build_transformer_block(opset=12)
    with pytest.raises(ValueError):
        build_transformer_block(layers=0)


def test_bundled_demo_files() -> None:
    model_path = DATA_DIR / "demo_cnn.onnx"
    inputs_path = DATA_DIR / "demo_cnn_inputs.npz"
    assert model_path.stat().st_size < 2 * 1024 * 1024
    assert model_path.read_bytes() == build_demo_model(seed=0).SerializeToString()
    model = onnx.load(str(model_path))
    with np.load(inputs_path) as data:
        assert list(data.keys()) == ["input"]
        x = data["input"]
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x, random_inputs(model, batch=4, seed=0)["input"])
    (out,) = _run(model, {"input": x})
    assert out.shape == (4, 10) and np.isfinite(out).all()


def test_make_demo_writes(tmp_path: Path) -> None:
    from models.make_demo import write_demo

    model_path, inputs_path = write_demo(tmp_path)
    assert model_path.read_bytes() == (DATA_DIR / "demo_cnn.onnx").read_bytes()
    with np.load(inputs_path) as fresh, np.load(DATA_DIR / "demo_cnn_inputs.npz") as bundled:
        np.testing.assert_array_equal(fresh["input"], bundled["input"])
