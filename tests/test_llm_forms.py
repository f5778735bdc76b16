"""Decoder graphs as ONNX Runtime GenAI / optimum export them: GQA + RoPE + KV cache + MatMulNBits.

Every structural removal is checked against its masked twin on ONNX Runtime, with non-empty past
caches: the pruned graph gets the dense cache without the removed KV heads, and its present
outputs must equal the twin's without them.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.attention import E, GraphBuilder
from models.llm import build_llm_decoder, quantize_nbits
from onnxprune.analysis.channels.groups import build_groups
from onnxprune.analysis.heads.groups import analyze
from onnxprune.analysis.heads.prepare import prepare_model
from onnxprune.analysis.kvcache import kept_map, kv_inputs, llm_feeds
from onnxprune.analysis.nbits import dequantize, nbits_weights
from onnxprune.analysis.removal import apply_removal, io_removed, masked_twin
from onnxprune.api import optimize
from onnxprune.check import run_model
from onnxprune.ir.load import from_proto
from onnxprune.ir.model import Model
from onnxprune.pipeline.manager import verify_model
from onnxprune.testing import masked_twin_error

FORMS = [dict(qkv="packed"), dict(qkv="separate", rotary="ms"), dict(qkv="separate", rotary="onnx", norm="rms")]


def _session(model: Model) -> ort.InferenceSession:
    return ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _drop(arr: np.ndarray, io: dict, name: str) -> np.ndarray:
    if name not in io:
        return arr
    axis, gone = io[name]
    return np.take(arr, np.setdiff1d(np.arange(arr.shape[axis]), gone), axis=axis)


def _generate(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], steps: int) -> list[dict[str, np.ndarray]]:
    """Prompt, then ``steps`` one-token steps, each fed the previous step's present cache."""
    names = [o.name for o in sess.get_outputs()]
    outs = []
    feeds = dict(feeds)
    for _ in range(steps + 1):
        got = dict(zip(names, sess.run(None, feeds)))
        outs.append(got)
        total = feeds["attention_mask"].shape[1] + 1
        feeds = {**{k.replace("present.", "past_key_values."): v for k, v in got.items() if k.startswith("present.")},
                 "input_ids": got["logits"][:, -1:].argmax(-1).astype(np.int64),
                 "attention_mask": np.ones((feeds["input_ids"].shape[0], total), np.int64)}
        if "position_ids" in sess_inputs(sess):
            feeds["position_ids"] = np.full((feeds["input_ids"].shape[0], 1), total - 1, np.int64)
    return outs


def sess_inputs(sess: ort.InferenceSession) -> set[str]:
    return {i.name for i in sess.get_inputs()}


@pytest.mark.parametrize("form", FORMS, ids=lambda f: "-".join(f.values()))
def test_heads_and_ffn_removal_equals_masked_twin_with_a_past_cache(form: dict) -> None:
    model = Model(build_llm_decoder(**form))
    prepare_model(model)
    found = analyze(model)
    assert len(found.heads) == 2 and len(found.ffn) == 2
    assert all(g.prunable for g in found.heads + found.ffn), [g.blocked for g in found.heads + found.ffn]
    assert {g.width for g in found.heads} == {4}  # KV heads, each owning 2 query heads
    assert {g.width for g in found.ffn} == {4}  # 128 neurons in units of one 32-block of down_proj
    removals = [(g, np.array([k + 1])) for k, g in enumerate(found.heads)] + \
               [(g, np.array([2])) for g in found.ffn]  # 25% of each block
    twin = masked_twin(model, removals)
    assert twin is not None
    io = io_removed(removals)
    assert set(io) == {f"{p}.{i}.{kv}" for p in ("past_key_values", "present") for i in (0, 1) for kv in ("key", "value")}
    pruned = model.copy()
    apply_removal(pruned, removals)
    verify_model(pruned, "test")
    for vi in kv_inputs(pruned):
        assert vi.type.tensor_type.shape.dim[1].dim_value == 3
    for w in nbits_weights(pruned).values():  # 4-bit weights stay 4-bit, whole blocks dropped
        assert w.K % w.block_size == 0 or w.K == 64
    s_twin, s_pruned = _session(twin), _session(pruned)
    dense = _session(model)
    for batch, seq, past in ((1, 4, 5), (2, 1, 7), (1, 3, 0)):
        feeds = llm_feeds(model, seed=batch + seq, batch=batch, seq=seq, past=past)
        a = _generate(s_twin, feeds, steps=2)
        b = _generate(s_pruned, {k: _drop(v, io, k) for k, v in feeds.items()}, steps=2)
        ref = _generate(dense, feeds, steps=0)[0]
        for step_a, step_b in zip(a, b):
            for name, value in step_a.items():
                want = _drop(value, io, name)
                assert step_b[name].shape == want.shape, name  # cache shapes stay consistent step after step
                np.testing.assert_allclose(step_b[name], want, atol=2e-5, rtol=1e-4, err_msg=name)
        assert np.abs(ref["logits"] - a[0]["logits"]).max() > 1e-2  # the removal mattered


def test_pipeline_prunes_a_genai_decoder_and_records_the_kept_heads() -> None:
    model = from_proto(build_llm_decoder(qkv="packed"))
    result = optimize(model, "heads(ratio=0.25),ffn(ratio=0.25)", check=True)
    heads, ffn = (p.stats for p in result.report.passes)
    assert heads["twin_check"] == "ok" and ffn["twin_check"] == "ok"
    assert heads["units_removed"] == 2 and ffn["units_removed"] == 2
    assert heads["io_shapes_changed"]["past_key_values.0.key"] == \
        "[batch_size, 4, past_sequence_length, 16] -> [batch_size, 3, past_sequence_length, 16]"
    assert any("KV-cache graph input" in w for w in result.report.warnings)
    kept = kept_map(result.model)
    assert kept["present.1.value"][1] == heads["kv_heads_kept"]["present.1.value"] and len(kept) == 8
    assert heads["params_after"] < heads["params_before"] and ffn["params_after"] < ffn["params_before"]
    # the check fed the kept heads of the dense cache: layer 0's cache depends on the embeddings only
    diffs = {d.name: d for d in result.report.check.outputs}
    assert diffs["present.0.key"].max_abs == 0 and diffs["present.0.key"].cosine == pytest.approx(1.0)
    sess = _session(result.model)
    for step in _generate(sess, llm_feeds(result.model, batch=1, seq=3, past=2), steps=3):
        assert step["present.0.key"].shape[1] == 3


def test_heads_refused_when_a_kv_group_would_split_a_quantisation_block() -> None:
    model = Model(build_llm_decoder(heads=8, kv_heads=8, block_size=32, layers=1))
    prepare_model(model)
    found = analyze(model)
    (heads,) = found.heads
    assert not heads.prunable
    assert "block_size 32" in heads.blocked and "split quantisation blocks" in heads.blocked
    assert all(g.prunable for g in found.ffn)  # FFN neurons are grouped into whole blocks instead


def test_past_cache_computed_in_the_graph_blocks_the_heads() -> None:
    proto = build_llm_decoder(layers=1, qkv="separate", nbits=False)
    ident = helper.make_node("Identity", ["past_key_values.0.key"], ["pk_copy"], name="copy_past")
    proto.graph.node.insert(0, ident)
    for n in proto.graph.node:
        if n.op_type == "GroupQueryAttention":
            n.input[3] = "pk_copy"
    model = Model(proto)
    prepare_model(model)
    (heads,) = analyze(model).heads
    assert "'pk_copy' is not a graph input" in heads.blocked


def test_nm_2_4_on_matmulnbits_is_held_in_the_4bit_codes() -> None:
    model = from_proto(build_llm_decoder(qkv="packed"))
    result = optimize(model, "nm(n=2,m=4)")
    stats = result.report.passes[0].stats
    packed = nbits_weights(result.model)
    assert stats["nbits_weights_masked"] == len(packed) == 11
    for name, w in packed.items():
        W = dequantize(result.model, w)
        assert (W.reshape(w.N, -1, 4) != 0).sum(-1).max() <= 2, name  # 2:4 along K, every output row
        assert stats["weights"][name]["nnz_after"] <= w.N * w.K // 2
    # ONNX Runtime computes exactly the masked dequantised weights
    for name, w in list(packed.items())[:2]:
        x = np.random.default_rng(0).standard_normal((3, w.K)).astype(np.float32)
        node = next(n for n in result.model.graph.node if n.name == w.node)
        sub = helper.make_model(helper.make_graph(
            [helper.make_node("MatMulNBits", ["x", *node.input[1:]], ["y"], domain="com.microsoft",
                              **{a.name: a.i for a in node.attribute})],
            "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, w.K])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            initializer=[result.model.initializer(t) for t in node.input[1:] if t]),
            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        y = run_model(from_proto(sub), {"x": x})["y"]
        np.testing.assert_allclose(y, x @ dequantize(result.model, w).T, atol=1e-4, rtol=1e-4)


def test_nm_refuses_float_zero_points_that_are_no_integer_code() -> None:
    rng = np.random.default_rng(0)
    b, s, _ = quantize_nbits(rng.standard_normal((32, 8)), 16, zero_points=False)
    zp = np.full(s.shape, 7.5, np.float32)
    node = helper.make_node("MatMulNBits", ["x", "B", "s", "zp"], ["y"], name="q4", domain="com.microsoft",
                            K=32, N=8, bits=4, block_size=16)
    proto = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        initializer=[numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "s"),
                     numpy_helper.from_array(zp, "zp")]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    result = optimize(from_proto(proto), "nm(n=2,m=4)")
    stats = result.report.passes[0].stats
    assert not result.report.passes[0].modified
    assert "float zero points that are not integer codes" in stats["skipped"]["B"]
    assert any("left unmasked" in w for w in result.report.warnings)


def _norm_graph(op: str, use_normed: bool) -> onnx.ModelProto:
    """x -> two projections -> (Skip)(Simplified/RMS) norm -> projections -> y."""
    rng = np.random.default_rng(0)
    w = {k: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), k)
         for k, shape in (("w1", (16, 24)), ("w2", (16, 24)), ("w3", (24, 8)), ("w4", (24, 8)), ("g", (24,)))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="p1"),
             helper.make_node("MatMul", ["x", "w2"], ["y2"], name="p2")]
    if op == "SkipSimplifiedLayerNormalization":
        nodes.append(helper.make_node(op, ["y1", "y2", "g"], ["n", "", "", "sum"], name="norm",
                                      domain="com.microsoft", epsilon=1e-5))
        nodes.append(helper.make_node("MatMul", ["sum", "w3"], ["o1"], name="p3"))
    else:
        nodes.append(helper.make_node(op, ["y1", "g"], ["n"], name="norm", axis=-1, epsilon=1e-5))
        nodes.append(helper.make_node("MatMul", ["y2", "w3"], ["o1"], name="p3"))
    if use_normed:
        nodes += [helper.make_node("MatMul", ["n", "w4"], ["o2"], name="p4"),
                  helper.make_node("Add", ["o1", "o2"], ["y"], name="out")]
    else:
        nodes.append(helper.make_node("Identity", ["o1"], ["y"], name="out"))
    opset = 23 if op == "RMSNormalization" else 21
    return helper.make_model(helper.make_graph(
        nodes, "norms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, 8])], initializer=list(w.values())),
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)], ir_version=10)


def _group_of(groups: list, weight: str):
    return next(g for g in groups if any(s.initializer == weight and s.role == "out" for s in g.slices))


@pytest.mark.parametrize("op", ["SimplifiedLayerNormalization", "RMSNormalization",
                                "SkipSimplifiedLayerNormalization"])
def test_rms_norms_block_channels_unless_approximate(op: str) -> None:
    proto = _norm_graph(op, use_normed=True)
    exact = _group_of(build_groups(Model(proto)), "w1")
    assert not exact.prunable and f"{op} node 'norm' normalises over the channel axis" in exact.blocked
    approx = _group_of(build_groups(Model(proto), allow_approximate=True), "w1")
    assert approx.prunable and approx.approximate
    assert any(s.initializer == "g" and s.role == "param" for s in approx.slices)


def test_skip_simplified_norm_sum_output_is_an_exact_residual() -> None:
    proto = _norm_graph("SkipSimplifiedLayerNormalization", use_normed=False)
    group = _group_of(build_groups(Model(proto)), "w1")
    assert group.prunable and not group.approximate, group.blocked
    assert {s.initializer for s in group.slices} >= {"w1", "w2", "w3"}  # input + skip tied, read by p3
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)}
    err, change, shapes = masked_twin_error(Model(proto), group.name, np.array([0, 5, 7]), feeds)
    assert err < 1e-5 and change > 1e-2


def test_channels_refuses_to_split_matmulnbits_blocks() -> None:
    result = optimize(from_proto(build_llm_decoder(layers=1)), "channels(ratio=0.25)")
    stats = result.report.passes[0].stats
    assert stats["channels_removed"] == 0 and not result.report.passes[0].modified
    (reason,) = stats["blocked_at_apply"].values()  # the FFN neurons, read by a 4-bit down projection
    assert "splits quantisation blocks of 32" in reason and "down_proj" in reason


def _decomposed_gqa_with_cache(hq: int = 4, hkv: int = 2, d: int = 8) -> onnx.ModelProto:
    """Torch-style attention whose K/V are concatenated to past_key_values.0.* (optimum's plain export)."""
    g = GraphBuilder(0)
    q, k, v = (g.linear("x", E, h * d) for h in (hq, hkv, hkv))
    heads = {}
    for name, t, h in (("q", q, hq), ("k", k, hkv), ("v", v, hkv)):
        t = g.n1("Reshape", [t, g.c([0, 0, h, d], np.int64)])
        heads[name] = g.n1("Transpose", [t], perm=[0, 2, 1, 3])
    for name in ("k", "v"):
        full = g.n1("Concat", [f"past_key_values.0.{'key' if name == 'k' else 'value'}", heads[name]], axis=2)
        g.nodes[-1].output[0] = f"present.0.{'key' if name == 'k' else 'value'}"
        full = g.nodes[-1].output[0]
        t = g.n1("Unsqueeze", [full, g.c([2], np.int64)])
        t = g.n1("Expand", [t, g.c([1, hkv, hq // hkv, 1, 1], np.int64)])
        heads[name] = g.n1("Reshape", [t, g.c([0, hq, -1, d], np.int64)])
    kt = g.n1("Transpose", [heads["k"]], perm=[0, 1, 3, 2])
    probs = g.n1("Softmax", [g.n1("Mul", [g.n1("MatMul", [heads["q"], kt]), g.c(1.0 / np.sqrt(d))])], axis=-1)
    ctx = g.n1("Transpose", [g.n1("MatMul", [probs, heads["v"]])], perm=[0, 2, 1, 3])
    out = g.linear(g.n1("Reshape", [ctx, g.c([0, 0, hq * d], np.int64)]), hq * d, E)
    past = [helper.make_tensor_value_info(f"past_key_values.0.{kv}", TensorProto.FLOAT,
                                          ["batch", hkv, "past_sequence_length", d]) for kv in ("key", "value")]
    proto = g.model(out, extra_inputs=past)
    proto.graph.output.extend(helper.make_tensor_value_info(f"present.0.{kv}", TensorProto.FLOAT,
                                                            ["batch", hkv, "total_sequence_length", d])
                              for kv in ("key", "value"))
    return proto


def test_decomposed_attention_with_a_concatenated_cache() -> None:
    proto = _decomposed_gqa_with_cache()
    result = optimize(from_proto(proto), "heads(ratio=0.5)")
    stats = result.report.passes[0].stats
    assert stats["twin_check"] == "ok" and stats["units_removed"] == 1
    assert stats["io_shapes_changed"]["present.0.value"] == \
        "[batch, 2, total_sequence_length, 8] -> [batch, 1, total_sequence_length, 8]"
    model = Model(proto)
    prepare_model(model)
    (group,) = analyze(model).heads
    removals = [(group, np.array([0]))]
    twin, pruned, io = masked_twin(model, removals), model.copy(), io_removed(removals)
    apply_removal(pruned, removals)
    feeds = llm_feeds(model, past=6)
    a, b = run_model(twin, feeds), run_model(pruned, {k: _drop(v, io, k) for k, v in feeds.items()})
    for name, value in a.items():
        np.testing.assert_allclose(b[name], _drop(value, io, name), atol=1e-5, rtol=1e-5, err_msg=name)
