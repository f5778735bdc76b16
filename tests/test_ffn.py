"""FFN-neuron groups and the ``ffn`` pass: GELU (erf and tanh), ReLU (Gemm), SwiGLU.

Oracle: removing neurons equals the masked twin (down-projection rows zeroed) on ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnxprune.passes.heads import channel_means

from models import build_mlp, build_transformer_block, random_inputs
from models.attention import E, GraphBuilder, check_masked_twin
from onnxprune import optimize
from onnxprune.analysis.heads.groups import find_ffn_groups
from onnxprune.analysis.heads.prepare import prepare_model
from onnxprune.check import run_model
from onnxprune.errors import PipelineError
from onnxprune.ir.model import Model

F = 48


def build_swiglu(seed: int = 0) -> onnx.ModelProto:
    """Llama MLP: ``down(silu(gate(x)) * up(x)) + x`` with SiLU as ``g * Sigmoid(g)``."""
    g = GraphBuilder(seed)
    gate = g.linear("x", E, F, bias=False)
    silu = g.n1("Mul", [gate, g.n1("Sigmoid", [gate])])
    up = g.linear("x", E, F, bias=False)
    down = g.linear(g.n1("Mul", [silu, up]), F, E, bias=False)
    return g.model(g.n1("Add", [down, "x"]))


def build_gelu_tanh(seed: int = 0) -> onnx.ModelProto:
    """GPT-2 MLP: ``0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))`` between two linears."""
    g = GraphBuilder(seed)
    h = g.linear("x", E, F)
    cube = g.n1("Mul", [g.n1("Pow", [h, g.c(3.0)]), g.c(0.044715)])
    inner = g.n1("Mul", [g.n1("Add", [h, cube]), g.c(np.sqrt(2 / np.pi))])
    act = g.n1("Mul", [g.n1("Mul", [h, g.c(0.5)]), g.n1("Add", [g.n1("Tanh", [inner]), g.c(1.0)])])
    return g.model(g.linear(act, F, E))


def test_gelu_erf_ffn_from_builder() -> None:
    proto = build_transformer_block(layers=2, ffn=96)
    check_masked_twin(proto, [0, 5, 95], 96, mode="ffn")


def test_swiglu_gate_and_up_are_tied() -> None:
    proto = build_swiglu()
    model = Model(proto)
    prepare_model(model)
    (g,) = find_ffn_groups(model)
    outs = {s.initializer for s in g.slices if s.role == "out"}
    assert len(outs) == 2 and g.width == F  # gate and up columns go together
    check_masked_twin(proto, list(range(0, F, 3)), F, mode="ffn")


def test_gelu_tanh() -> None:
    check_masked_twin(build_gelu_tanh(), [1, 2, 40], F, mode="ffn")


def test_relu_gemm_mlp() -> None:
    proto = build_mlp()
    model = Model(proto)
    prepare_model(model)
    groups = find_ffn_groups(model)
    assert sorted(g.width for g in groups) == [48, 64]
    feeds = {"input": np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)}
    dense = run_model(model, feeds)["logits"]
    out = optimize(model, "ffn(ratio=0.5)", check=False).model
    assert out.get_array("fc0.weight").shape == (32, 32) and out.get_array("fc1.weight").shape == (24, 32)
    assert out.get_array("classifier.weight").shape == (10, 24)
    assert run_model(out, feeds)["logits"].shape == dense.shape


def test_intermediate_read_elsewhere_blocks() -> None:
    proto = build_gelu_tanh()
    act = [n for n in proto.graph.node if n.op_type == "Mul"][-1].output[0]
    proto.graph.output.append(helper.make_tensor_value_info(act, TensorProto.FLOAT, None))
    model = Model(proto)
    prepare_model(model)
    (g,) = find_ffn_groups(model)
    assert not g.prunable and act in g.blocked


@pytest.mark.parametrize(("ratio", "round_to", "kept"), [(0.25, 1, 72), (0.3, 8, 72), (0.3, 1, 67)])  # 0.3*96 = 28.8 -> 29 removed
def test_ffn_pass_widths(ratio: float, round_to: int, kept: int) -> None:
    proto = build_transformer_block(layers=2, ffn=96)
    res = optimize(Model(proto), f"ffn(ratio={ratio},round_to={round_to})")
    for layer in range(2):
        assert res.model.get_array(f"layer{layer}.ffn.up.weight").shape == (64, kept)
        assert res.model.get_array(f"layer{layer}.ffn.down.weight").shape == (kept, 64)
    stats = res.report.passes[0].stats
    assert stats["params_removed"] == stats["params_before"] - stats["params_after"] == 2 * (96 - kept) * (64 + 1 + 64)


def _calib(proto: onnx.ModelProto, n: int = 4) -> list[dict[str, np.ndarray]]:
    return [random_inputs(proto, batch=2, seq=8, seed=10 + i) for i in range(n)]


def test_activation_criterion_removes_dead_neurons_first() -> None:
    proto = build_transformer_block(layers=1, ffn=32)
    model = Model(proto)
    w, b = np.array(model.get_array("layer0.ffn.up.weight")), np.array(model.get_array("layer0.ffn.up.bias"))
    dead = [3, 7, 11, 20, 25, 30, 31, 0]
    w[:, dead] = 0
    b[dead] = 0  # GELU(0) = 0: these neurons never fire
    down = np.array(model.get_array("layer0.ffn.down.weight"))
    down[dead] *= 100  # large weights: l2 would keep them
    model.set_array("layer0.ffn.up.weight", w)
    model.set_array("layer0.ffn.up.bias", b)
    model.set_array("layer0.ffn.down.weight", down)
    res = optimize(model, "ffn(ratio=0.25,criterion=activation)", calibration=_calib(proto))
    kept_w = res.model.get_array("layer0.ffn.up.weight")
    assert kept_w.shape == (64, 24)
    assert np.all(np.abs(kept_w).sum(axis=0) > 0)  # every dead column went
    res_l2 = optimize(model, "ffn(ratio=0.25,criterion=l2)")
    assert (np.abs(res_l2.model.get_array("layer0.ffn.up.weight")).sum(axis=0) == 0).any()


def test_activation_without_calibration_is_a_pipeline_error() -> None:
    with pytest.raises(PipelineError, match="calibration"):
        optimize(Model(build_swiglu()), "ffn(criterion=activation)")


def test_compensation_keeps_mean_output_and_helps() -> None:
    proto = build_transformer_block(layers=1, ffn=64)
    calib = _calib(proto, 6)
    model = Model(proto)
    down_out = "layer0.ffn.down.add.out"
    dense_mean = channel_means(model, [down_out], calib)[down_out][1]
    plain = optimize(model, "ffn(ratio=0.5)", calibration=calib).model
    comp = optimize(model, "ffn(ratio=0.5,compensate=true)", calibration=calib).model
    mean_plain = channel_means(plain, [down_out], calib)[down_out][1]
    mean_comp = channel_means(comp, [down_out], calib)[down_out][1]
    np.testing.assert_allclose(mean_comp, dense_mean, atol=1e-4)
    assert np.abs(mean_plain - dense_mean).max() > 1e-2
    held = random_inputs(proto, batch=4, seq=8, seed=99)
    ref = run_model(model, held)["last_hidden_state"]
    err_plain = np.abs(run_model(plain, held)["last_hidden_state"] - ref).mean()
    err_comp = np.abs(run_model(comp, held)["last_hidden_state"] - ref).mean()
    assert err_comp < err_plain


def test_compensation_through_gemm_trans_b() -> None:
    proto = build_mlp(hidden=(64,))
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((8, 32)).astype(np.float32)} for _ in range(4)]
    model = Model(proto)
    dense = channel_means(model, ["logits"], calib)["logits"][1]
    comp = optimize(model, "ffn(ratio=0.5,compensate=true)", calibration=calib)
    assert comp.report.passes[0].stats["biases_compensated"] == 1
    assert comp.model.get_array("classifier.weight").shape == (10, 32)
    np.testing.assert_allclose(channel_means(comp.model, ["logits"], calib)["logits"][1], dense, atol=1e-4)


def test_weighted_criterion_removes_neurons_with_no_output_weight() -> None:
    proto = build_transformer_block(layers=1, ffn=32)
    model = Model(proto)
    down = np.array(model.get_array("layer0.ffn.down.weight"))
    up = np.array(model.get_array("layer0.ffn.up.weight"))
    silent = [1, 4, 9, 16, 17, 22, 28, 30]
    down[silent] = 0  # these neurons fire (large up columns) but cannot change the output
    up[:, silent] *= 3
    model.set_array("layer0.ffn.down.weight", down)
    model.set_array("layer0.ffn.up.weight", up)
    calib = _calib(proto)
    weighted = optimize(model, "ffn(ratio=0.25,criterion=weighted)", calibration=calib).model
    assert np.all(np.abs(weighted.get_array("layer0.ffn.down.weight")).sum(axis=1) > 0)
    activation = optimize(model, "ffn(ratio=0.25,criterion=activation)", calibration=calib).model
    assert (np.abs(activation.get_array("layer0.ffn.down.weight")).sum(axis=1) == 0).any()


def test_compensation_in_a_chain_of_bias_free_blocks() -> None:
    g = GraphBuilder(5)
    h1 = g.n1("Relu", [g.linear("x", E, 40, bias=False)])
    h2 = g.n1("Relu", [g.linear(h1, 40, 24, bias=False)])
    proto = g.model(g.linear(h2, 24, E, bias=False))
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((2, 8, E)).astype(np.float32)} for _ in range(3)]
    res = optimize(Model(proto), "ffn(ratio=0.5,compensate=true)", calibration=calib)
    stats = res.report.passes[0].stats
    assert stats["units_removed"] == 20 + 12 and stats["biases_compensated"] == 2
    out = run_model(res.model, calib[0])["y"]
    assert out.shape == (2, 8, E) and np.isfinite(out).all()
