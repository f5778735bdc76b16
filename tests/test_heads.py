"""The ``heads`` pass: options, selection, compensation, and torch exports of real architectures.

The export tests (``slow``) build tiny BERT, GPT-2, ViT and Llama (GQA + SwiGLU + rotary) models
from transformers configs with random weights, export them with the legacy (TorchScript) and the
dynamo exporter, run ``heads(ratio=0.25),ffn(ratio=0.25)`` and check on ONNX Runtime that the
result is valid, keeps its output shapes, and lost exactly the expected number of parameters.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxprune.passes.heads import channel_means

from models import build_transformer_block, random_inputs
from models.attention import build_attention
from onnxprune import load, optimize
from onnxprune.check import run_model
from onnxprune.errors import PipelineError
from onnxprune.ir.model import Model

PER_HEAD = 3 * (64 * 16 + 16) + 16 * 64  # Q/K/V columns + biases, output-projection rows


def test_heads_pass_per_layer() -> None:
    proto = build_transformer_block(layers=2)
    res = optimize(Model(proto), "heads(ratio=0.5)", check=True, check_inputs=random_inputs(proto))
    stats = res.report.passes[0].stats
    assert stats["units_removed"] == 4 and stats["blocks_pruned"] == 2
    assert stats["params_removed"] == 4 * PER_HEAD
    assert stats["params_before"] - stats["params_after"] == 4 * PER_HEAD  # no constants to normalise
    m = res.model
    assert m.get_array("layer1.attn.q.reshape.shape").tolist() == [0, 0, 2, 16]
    assert m.get_array("layer1.attn.context.reshape.shape").tolist() == [0, 0, 32]
    assert res.report.check.outputs[0].shape_a == res.report.check.outputs[0].shape_b


def test_heads_global_scope_and_min_heads() -> None:
    proto = build_transformer_block(layers=2)
    model = Model(proto)
    for name, axis in (("layer0.attn.q.weight", 1), ("layer0.attn.k.weight", 1), ("layer0.attn.v.weight", 1),
                       ("layer0.attn.out.weight", 0)):
        arr = np.array(model.get_array(name))
        idx = [slice(None)] * 2
        idx[axis] = slice(0, 48)
        arr[tuple(idx)] *= 0.01  # heads 0-2 of layer 0 look unimportant (scores are relative per block)
        model.set_array(name, arr)
    res = optimize(model, "heads(ratio=0.5,scope=global,min_heads=1)")
    assert res.report.passes[0].stats["units_removed"] == 4
    assert res.model.get_array("layer0.attn.out.weight").shape[0] == 16  # 3 of 4 heads went
    assert res.model.get_array("layer1.attn.out.weight").shape[0] == 48
    res_layer = optimize(model, "heads(ratio=0.5,scope=layer)")
    assert res_layer.model.get_array("layer0.attn.out.weight").shape[0] == 32
    res_min = optimize(model, "heads(ratio=0.5,scope=global,min_heads=3)")
    assert res_min.model.get_array("layer0.attn.out.weight").shape[0] == 48
    assert res_min.model.get_array("layer1.attn.out.weight").shape[0] == 48


def test_heads_gqa_ratio_counts_kv_groups() -> None:
    proto = build_attention(hq=8, hkv=4, d=4)
    res = optimize(Model(proto), "heads(ratio=0.25)")
    assert res.report.passes[0].stats["units_removed"] == 1  # one KV head and its two query heads
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 8, 32)).astype(np.float32)}
    assert run_model(res.model, feeds)["y"].shape == (3, 8, 32)


def test_bad_options_are_pipeline_errors() -> None:
    model = Model(build_transformer_block())
    with pytest.raises(PipelineError, match="ratio"):
        optimize(model, "heads(ratio=1.0)")
    with pytest.raises(PipelineError, match="criterion"):
        optimize(model, "heads(criterion=taylor)")
    with pytest.raises(PipelineError, match="calibration"):
        optimize(model, "heads(compensate=true)")
    with pytest.raises(PipelineError, match="calibration"):
        optimize(model, "heads(criterion=weighted)")


def test_activation_criterion_and_compensation() -> None:
    proto = build_transformer_block(layers=1)
    calib = [random_inputs(proto, batch=2, seq=8, seed=s) for s in range(6)]
    model = Model(proto)
    out = "layer0.attn.out.add.out"
    dense_mean = channel_means(model, [out], calib)[out][1]
    plain = optimize(model, "heads(ratio=0.5,criterion=activation)", calibration=calib).model
    comp = optimize(model, "heads(ratio=0.5,criterion=activation,compensate=true)", calibration=calib).model
    np.testing.assert_allclose(channel_means(comp, [out], calib)[out][1], dense_mean, atol=1e-4)
    assert np.abs(channel_means(plain, [out], calib)[out][1] - dense_mean).max() > 1e-3
    held = random_inputs(proto, batch=4, seq=8, seed=123)
    ref = run_model(model, held)["last_hidden_state"]
    err = {k: np.abs(run_model(m, held)["last_hidden_state"] - ref).mean() for k, m in (("plain", plain),
                                                                                         ("comp", comp))}
    assert err["comp"] < err["plain"]


def test_compensation_creates_bias_add_when_missing() -> None:
    from models.attention import E, GraphBuilder

    g = GraphBuilder(3)
    q, k, v = (g.linear("x", E, 32) for _ in range(3))
    heads = {}
    for name, t in (("q", q), ("k", k), ("v", v)):
        t = g.n1("Reshape", [t, g.c([0, 0, 4, 8], np.int64)])
        heads[name] = g.n1("Transpose", [t], perm=[0, 2, 1, 3])
    kt = g.n1("Transpose", [heads["k"]], perm=[0, 1, 3, 2])
    probs = g.n1("Softmax", [g.n1("MatMul", [heads["q"], kt])], axis=-1)
    ctx = g.n1("Transpose", [g.n1("MatMul", [probs, heads["v"]])], perm=[0, 2, 1, 3])
    ctx = g.n1("Reshape", [ctx, g.c([0, 0, 32], np.int64)])
    proto = g.model(g.linear(ctx, 32, E, bias=False))
    calib = [{"x": np.random.default_rng(s).standard_normal((2, 8, E)).astype(np.float32) + 1} for s in range(3)]
    res = optimize(Model(proto), "heads(ratio=0.5,compensate=true)", calibration=calib)
    assert any(n.name.endswith(".compensation") for n in res.model.graph.node)
    dense = channel_means(Model(proto), ["y"], calib)["y"][1]
    np.testing.assert_allclose(channel_means(res.model, ["y"], calib)["y"][1], dense, atol=1e-4)


# ---------------------------------------------------------------------- torch exports


def _tiny(arch: str):  # noqa: ANN202 - returns (model, example args, input names, expected drop)
    import torch
    import transformers as tf

    torch.manual_seed(0)
    e, layers = 64, 2
    if arch == "bert":
        m = tf.BertModel(tf.BertConfig(hidden_size=e, num_attention_heads=4, num_hidden_layers=layers,
                                       intermediate_size=128, vocab_size=100, max_position_embeddings=64))
        per_layer = (3 * (e * 16 + 16) + 16 * e) + 32 * (e + 1 + e)
        args, names = (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)), ["input_ids",
                                                                                            "attention_mask"]
    elif arch == "gpt2":
        m = tf.GPT2Model(tf.GPT2Config(n_embd=e, n_head=4, n_layer=layers, vocab_size=100, n_positions=64))
        per_layer = (3 * (e * 16 + 16) + 16 * e) + 64 * (e + 1 + e)
        args, names = (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)), ["input_ids",
                                                                                            "attention_mask"]
    elif arch == "vit":
        m = tf.ViTModel(tf.ViTConfig(hidden_size=e, num_attention_heads=4, num_hidden_layers=layers,
                                     intermediate_size=128, image_size=32, patch_size=8), add_pooling_layer=False)
        per_layer = (3 * (e * 16 + 16) + 16 * e) + 32 * (e + 1 + e)
        args, names = (torch.randn(2, 3, 32, 32),), ["pixel_values"]
    else:  # llama: GQA 8 query heads over 4 KV heads (head_dim 8), SwiGLU, rotary
        m = tf.LlamaModel(tf.LlamaConfig(hidden_size=e, num_attention_heads=8, num_key_value_heads=4,
                                         num_hidden_layers=layers, intermediate_size=128, vocab_size=100,
                                         max_position_embeddings=64))
        per_layer = (2 * 8 * e + 8 * e + 8 * e + 2 * 8 * e) + 32 * 3 * e
        args, names = (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)), ["input_ids",
                                                                                            "attention_mask"]
    with torch.no_grad():
        for p in m.parameters():  # random non-zero biases: no exporter de-duplication of equal tensors
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval(), args, names, layers * per_layer


def _export(arch: str, exporter: str, path: str) -> int:
    import torch

    model, args, names, drop = _tiny(arch)

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, *a):  # noqa: ANN002, ANN202
            kw = dict(zip(names, a))
            if arch in ("gpt2", "llama"):
                kw["use_cache"] = False
            return self.m(**kw).last_hidden_state

    if exporter == "legacy":
        axes = {n: ({0: "batch"} if n == "pixel_values" else {0: "batch", 1: "seq"}) for n in names}
        torch.onnx.export(Wrap(), args, path, input_names=names, output_names=["out"], dynamo=False,
                          opset_version=17, dynamic_axes=axes)
    elif exporter == "dynamo-dynamic":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
        dims = tuple({0: batch} if n == "pixel_values" else {0: batch, 1: seq} for n in names)
        torch.onnx.export(Wrap(), args, path, input_names=names, output_names=["out"], dynamo=True,
                          dynamic_shapes=(dims,))
    elif exporter == "dynamo-23":  # scaled_dot_product_attention becomes ai.onnx Attention (4-D)
        torch.onnx.export(Wrap(), args, path, input_names=names, output_names=["out"], dynamo=True,
                          opset_version=23)
    else:
        torch.onnx.export(Wrap(), args, path, input_names=names, output_names=["out"], dynamo=True)
    return drop


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), [(a, e) for a in ("bert", "gpt2", "vit", "llama")
                                                for e in ("legacy", "dynamo")]
                         + [("gpt2", "dynamo-dynamic"), ("llama", "dynamo-dynamic"), ("bert", "dynamo-23"),
                            ("llama", "dynamo-23")])
def test_torch_exports(arch: str, exporter: str, tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    import warnings

    path = str(tmp_path / f"{arch}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        drop = _export(arch, exporter, path)
    model = load(path)
    feeds = {i.name: np.asarray(v) for i, v in zip(model.graph.input, _tiny(arch)[1])}
    res = optimize(model, "heads(ratio=0.25),ffn(ratio=0.25)", check=True, check_inputs=feeds)
    heads, ffn = (p.stats for p in res.report.passes)
    assert heads["blocks_found"] == 2 and heads["blocks_blocked"] == 0 and heads["units_removed"] == 2
    assert ffn["blocks_found"] == 2 and ffn["blocks_blocked"] == 0
    assert heads["params_removed"] + ffn["params_removed"] == drop
    diff = res.report.check.outputs[0]
    assert diff.shape_a == diff.shape_b and np.isfinite(diff.max_abs)
    onnx.checker.check_model(res.model.materialized())
    if exporter == "dynamo-23":
        assert sum(n.op_type == "Attention" for n in res.model.graph.node) == 2


def test_blocked_block_is_reported_and_left_alone() -> None:
    from onnx import TensorProto, helper

    proto = build_attention()
    probs = next(n for n in proto.graph.node if n.op_type == "Softmax").output[0]
    proto.graph.output.append(helper.make_tensor_value_info(probs, TensorProto.FLOAT, None))
    res = optimize(Model(proto), "heads(ratio=0.5)")
    stats = res.report.passes[0].stats
    assert stats["blocks_blocked"] == 1 and stats["units_removed"] == 0 and stats["params_removed"] == 0
    assert any("heads" in w and probs in w for w in res.report.warnings)
