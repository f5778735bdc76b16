"""Tests of the TensorRT Gemm form (``onnxprune.tensorrt.gemm_form``, ``tensorrt(gemm_form=true)``).

The rewrite must give the MatMul form's outputs to float tolerance on ONNX Runtime, at shapes
other than the export's (dynamic batch and sequence), on BERT-, GPT-2- and Llama-shaped torch
exports (tiny configs built with transformers, random weights), and on hand-built graphs that
cover the bias fold, a shared weight, rank-2 activations and the cases that must stay MatMul.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import optimize
from onnxprune.ir.model import Model
from onnxprune.tensorrt.eligibility import format_tensorrt, inspect_tensorrt
from onnxprune.tensorrt.gemm_form import apply_gemm_form, plan_gemm_form


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _ops(proto: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in proto.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


# ---------------------------------------------------------------------- hand-built graphs
def _graph(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], x_shape: list[int | str],
           outs: dict[str, list[int | str]], opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in outs.items()],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _mlp(opset: int = 17) -> onnx.ModelProto:
    """x [B, S, 16]: q/k share x; w1 shared by two MatMuls and a Gather; bias in both Add orders."""
    rng = np.random.default_rng(0)
    inits = {"wq": rng.standard_normal((16, 8)), "bq": rng.standard_normal(8),
             "wk": rng.standard_normal((16, 8)), "bk": rng.standard_normal((1, 1, 8)),
             "w1": rng.standard_normal((8, 8)), "idx": np.array([1, 2], dtype=np.int64),
             "wm": rng.standard_normal((8, 16))}
    inits = {k: (v.astype(np.float32) if v.dtype != np.int64 else v) for k, v in inits.items()}
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"], name="q"),
        helper.make_node("Add", ["q0", "bq"], ["q"], name="q_bias"),
        helper.make_node("MatMul", ["x", "wk"], ["k0"], name="k"),
        helper.make_node("Add", ["bk", "k0"], ["k"], name="k_bias"),
        helper.make_node("MatMul", ["q", "w1"], ["a"], name="a"),
        helper.make_node("MatMul", ["k", "w1"], ["b"], name="b"),
        helper.make_node("Gather", ["w1", "idx"], ["emb"], name="emb"),
        helper.make_node("Add", ["a", "b"], ["ab"], name="sum"),
        helper.make_node("MatMul", ["ab", "wm"], ["y"], name="m"),
        helper.make_node("Transpose", ["ab"], ["abt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["ab", "abt"], ["scores"], name="act_act"),
    ]
    return _graph(nodes, inits, ["B", "S", 16], {"y": ["B", "S", 16], "emb": [2, 8], "scores": ["B", "S", "S"]},
                  opset)


@pytest.mark.parametrize("opset", [13, 17])
def test_mlp_same_outputs_dynamic_shapes_and_folds(opset: int) -> None:
    proto = _mlp(opset)
    model = Model(proto)
    plan = plan_gemm_form(model)
    assert {c.node for c in plan.candidates} == {"q", "k", "a", "b", "m"}
    assert "act_act" in plan.skipped
    dense = Model(onnx.ModelProto.FromString(proto.SerializeToString()))
    stats = apply_gemm_form(model)
    assert stats["rewritten"] == 5 and stats["bias_folded"] == 2 and stats["reshaped"] == 5
    onnx.checker.check_model(model.proto, full_check=True)
    ops = _ops(model.proto)
    assert ops["Gemm"] == 5 and ops.get("MatMul", 0) == 1  # only the activation x activation MatMul stays
    assert ops["Add"] == 1  # both bias Adds folded, the residual-style Add stays
    assert ops["Reshape"] == 2 * 5 - 1  # q and k share the 2-D view of x
    # w1 is also read by a Gather: it stays [K, N], a transposed copy feeds both Gemms
    np.testing.assert_array_equal(model.get_array("w1"), dense.get_array("w1"))
    assert model.get_array("wq").shape == (8, 16)  # read only by rewritten MatMuls: transposed in place
    for gm in (n for n in model.graph.node if n.op_type == "Gemm"):
        assert [a.i for a in gm.attribute if a.name == "transB"] == [1]
    rng = np.random.default_rng(1)
    for shape in [(2, 5, 16), (1, 1, 16), (3, 7, 16)]:
        x = rng.standard_normal(shape).astype(np.float32)
        for ref, got in zip(_run(dense.proto, {"x": x}), _run(model.proto, {"x": x})):
            assert ref.shape == got.shape
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_rank2_gemm_without_reshape_and_graph_output_not_folded() -> None:
    rng = np.random.default_rng(2)
    inits = {"w": rng.standard_normal((16, 12)).astype(np.float32), "b": rng.standard_normal(12).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["y"], name="bias")]
    proto = _graph(nodes, inits, ["B", 16], {"y": ["B", 12], "h": ["B", 12]})  # h is a graph output: the Add must stay
    model = Model(onnx.ModelProto.FromString(proto.SerializeToString()))
    stats = apply_gemm_form(model)
    assert stats == {"rewritten": 1, "bias_folded": 0, "reshaped": 0, "gemm_transb": 0, "skipped": {}, "by_rank": {"2": 1}}
    assert _ops(model.proto) == {"Gemm": 1, "Add": 1}
    x = rng.standard_normal((5, 16)).astype(np.float32)
    for ref, got in zip(_run(proto, {"x": x}), _run(model.proto, {"x": x})):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_cases_that_stay_matmul() -> None:
    rng = np.random.default_rng(3)
    inits = {"w3": rng.standard_normal((2, 16, 4)).astype(np.float32),
             "wl": rng.standard_normal((4, 16)).astype(np.float32),
             "wi": rng.integers(0, 3, (16, 4)).astype(np.int32)}
    nodes = [helper.make_node("MatMul", ["x", "w3"], ["a"], name="batched_weight"),
             helper.make_node("MatMul", ["wl", "x"], ["b"], name="weight_first"),
             helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT32),
             helper.make_node("MatMul", ["xi", "wi"], ["c"], name="int_weight")]
    proto = _graph(nodes, inits, [2, 16, 16], {"a": [2, 16, 4], "b": [2, 4, 16]})
    proto.graph.output.append(helper.make_tensor_value_info("c", TensorProto.INT32, [2, 16, 4]))
    plan = plan_gemm_form(Model(proto))
    assert not plan.candidates
    assert "3-D" in plan.skipped["batched_weight"]
    assert "W @ x" in plan.skipped["weight_first"]
    assert "INT32" in plan.skipped["int_weight"]
    low = plan_gemm_form(Model(_mlp(10)))  # opset 10: no Gemm with optional C, refused whole
    assert not low.candidates and all("opset 10" in why for why in low.skipped.values())


def test_pass_option_rewrites_and_inspect_reports_forms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import onnxprune.passes.tensorrt as trt_pass

    def no_trt() -> None:
        raise ImportError("no tensorrt here")

    monkeypatch.setattr(trt_pass, "import_tensorrt", no_trt)
    proto = _mlp()
    before = inspect_tensorrt(Model(proto))
    assert before["summary"]["forms"] == {"MatMul": 6}
    assert before["summary"]["gemm_form_candidates"] == 5
    res = optimize(Model(onnx.ModelProto.FromString(proto.SerializeToString())),
                   f"tensorrt(gemm_form=true,emit_trtexec=true,engine={tmp_path / 'a.engine'})")
    rec = res.report.passes[-1]
    assert rec.modified and rec.stats["gemm_form"]["rewritten"] == 5
    assert _ops(onnx.load(rec.stats["trtexec_onnx"]))["Gemm"] == 5  # the file trtexec is told to read
    after = inspect_tensorrt(res.model)
    assert after["summary"]["forms"] == {"Gemm": 5, "MatMul": 1}
    assert after["summary"]["gemm_form_candidates"] == 0
    assert {e["form"] for e in after["layers"]} == {"Gemm", "MatMul"}
    text = format_tensorrt(after)
    assert "form" in text.splitlines()[1] and "Gemm" in text
    # without the option the pass leaves the model alone
    res2 = optimize(Model(proto), f"tensorrt(emit_trtexec=true,engine={tmp_path / 'b.engine'})")
    assert not res2.report.passes[-1].modified


# ---------------------------------------------------------------------- torch exports
def _export(arch: str, path: Path) -> tuple[list[str], tuple[int, int]]:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if arch == "bert":
        m = tf.BertModel(tf.BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                       intermediate_size=64, vocab_size=50, max_position_embeddings=32))
    elif arch == "gpt2":
        m = tf.GPT2Model(tf.GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=50, n_positions=32))
    else:
        m = tf.LlamaModel(tf.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=1, intermediate_size=64, vocab_size=50,
                                         max_position_embeddings=32))
    m.eval()
    names = ["input_ids", "attention_mask"]

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids, mask):  # noqa: ANN001, ANN202
            kw = {"use_cache": False} if arch != "bert" else {}
            return self.m(input_ids=ids, attention_mask=mask, **kw).last_hidden_state

    args = (torch.randint(0, 50, (2, 6)), torch.ones(2, 6, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrap(), args, str(path), input_names=names, output_names=["out"], dynamo=False,
                          opset_version=17, dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
    # per layer: (MatMuls rewritten, Gemms given transB=1); GPT-2's Conv1D exports as Gemm [K, N]
    return names, {"bert": (6, 0), "gpt2": (0, 4), "llama": (7, 0)}[arch]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_torch_exports_same_outputs(arch: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    path = tmp_path / f"{arch}.onnx"
    names, (mm, flipped) = _export(arch, path)
    dense = onnx.load(str(path))
    dense_w = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    res = optimize(Model(onnx.load(str(path))), "cleanup,tensorrt(gemm_form=true,emit_trtexec=true,"
                   f"engine={tmp_path / 'x.engine'})")
    stats = res.report.passes[-1].stats["gemm_form"]
    assert (stats["rewritten"], stats["gemm_transb"]) == (mm, flipped), stats
    gemms = [n for n in res.model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == mm + flipped
    for gm in gemms:  # every constant weight is now [N, K] under transB=1
        assert [a.i for a in gm.attribute if a.name == "transB"] == [1]
        orig = dense_w[gm.input[1]]  # read only by this GEMM: transposed in place, same name
        np.testing.assert_array_equal(res.model.get_array(gm.input[1]), orig.T)
    data = inspect_tensorrt(res.model)
    assert data["summary"]["forms"]["Gemm"] == mm + flipped and data["summary"]["gemm_form_candidates"] == 0
    # the same FLOPs in either form (a Gemm's rows are the reshaped activation's leading dims)
    before = inspect_tensorrt(Model(onnx.load(str(path))))["summary"]["total_flops"]
    assert data["summary"]["total_flops"] == pytest.approx(before, rel=1e-9)
    # only activation x activation MatMuls (attention) are left
    assert all("dynamic_weight" in e["reason_codes"] for e in data["layers"] if e["form"] == "MatMul")
    rng = np.random.default_rng(0)
    for b, s in [(1, 3), (3, 9)]:  # neither is the export's (2, 6)
        mask = np.ones((b, s), dtype=np.int64)
        mask[0, -1] = 0
        feeds = {"input_ids": rng.integers(0, 50, (b, s)).astype(np.int64), "attention_mask": mask}
        ref = _run(dense, feeds)[0]
        got = _run(res.model.proto, feeds)[0]
        assert got.shape == ref.shape == (b, s, 32)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
