"""Pass ``channels``: options, criteria, bad input, dead channels, property tests on builder models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxprune
from models import build_cnn, build_mlp, random_inputs
from onnxprune.analysis.channels.groups import build_groups
from onnxprune.check import run_model
from onnxprune.errors import CalibrationError, PipelineError
from onnxprune.ir.load import from_proto
from onnxprune.ir.model import Model
from onnxprune.pipeline.base import PassContext
from onnxprune.pipeline.manager import PassManager
from onnxprune.pipeline.spec import parse_pipeline
from onnxprune.summary import count_parameters as count_params
from onnxprune.testing import masked_twin_error


def _run(model: Model, spec: str, calibration: object = None) -> tuple[Model, dict, PassContext]:
    ctx = PassContext(calibration=calibration)
    model, records = PassManager(parse_pipeline(spec)).run(model, ctx)
    return model, records[-1].stats, ctx


def _conv_widths(model: Model) -> dict[str, int]:
    return {n.name: int(model.initializer(n.input[1]).dims[0]) for n in model.graph.node if n.op_type == "Conv"}


@pytest.mark.parametrize("criterion", ["l2", "l1", "bn_scale", "activation"])
@pytest.mark.parametrize("builder", [build_cnn, build_mlp])
def test_channels_prunes_and_runs(builder, criterion: str) -> None:  # noqa: ANN001
    proto = builder()
    calib = [random_inputs(proto, seed=i) for i in range(3)]
    model, stats, _ = _run(from_proto(builder()), f"channels(ratio=0.3,criterion={criterion})", calib)
    assert stats["channels_removed"] > 0
    assert stats["params_after"] < 0.85 * stats["params_before"]
    feeds = random_inputs(proto)
    a, b = run_model(from_proto(proto), feeds), run_model(model, feeds)
    assert all(a[k].shape == b[k].shape for k in a)


def test_layer_ratio_and_round_to_and_min_keep() -> None:
    model, _, _ = _run(from_proto(build_cnn(width=32)), "channels(ratio=0.3,round_to=8)")
    w = _conv_widths(model)
    assert w["stem.conv"] == 24 and w["block1.conv1"] == 24  # 32 - round(9.6) = 22 -> rounded up to 24
    model, _, _ = _run(from_proto(build_cnn(width=32)), "channels(ratio=0.95,min_keep=5)")
    w = _conv_widths(model)
    assert w["stem.conv"] == 5 and w["branch_a.conv"] == 5


def test_global_scope_removes_about_ratio() -> None:
    base = from_proto(build_cnn(width=32))
    groups = [g for g in build_groups(base.copy()) if g.prunable]
    total = sum(g.width for g in groups)
    _, stats, _ = _run(base, "channels(ratio=0.3,scope=global)")
    assert abs(stats["channels_removed"] - 0.3 * total) <= 0.05 * total + len(groups)


def test_include_exclude() -> None:
    model, stats, _ = _run(from_proto(build_cnn()), "channels(ratio=0.5,include='^stem')")
    assert stats["groups_selected"] == 1
    w = _conv_widths(model)
    assert w["stem.conv"] == 8 and w["block1.conv1"] == 16
    _, stats, _ = _run(from_proto(build_cnn()), "channels(ratio=0.5,exclude='branch_|stem')")
    assert stats["groups_selected"] == 3


def test_bad_options() -> None:
    for spec in ("channels(ratio=1.0)", "channels(ratio=-0.1)", "channels(criterion=foo)", "channels(round_to=0)",
                 "channels(include='(')", "channels(bogus=1)"):
        with pytest.raises(PipelineError):
            parse_pipeline(spec)


def test_activation_needs_calibration() -> None:
    with pytest.raises(CalibrationError, match="calibration"):
        _run(from_proto(build_cnn()), "channels(criterion=activation)")


def test_activation_with_batches_object() -> None:
    proto = build_mlp()

    class Calib:
        def batches(self):  # noqa: ANN202
            return iter([random_inputs(proto, seed=i) for i in range(2)])

    _, stats, _ = _run(from_proto(proto), "channels(ratio=0.25,criterion=activation)", Calib())
    assert stats["channels_removed"] > 0


def test_nothing_prunable_warns_and_keeps_model() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 4, 4] x, float[6,3,1,1] w1) => (float[N, 6, 4, 4] y) { y = Conv (x, w1) }"""
    proto = onnx.parser.parse_model(text)
    w = onnx.numpy_helper.from_array(np.ones((6, 3, 1, 1), np.float32), "w1")
    proto.graph.initializer.append(w)
    del proto.graph.input[1:]
    model = from_proto(proto)
    model, records = PassManager(parse_pipeline("channels(ratio=0.3)")).run(model, ctx := PassContext())
    assert records[0].stats["channels_removed"] == 0  # only prepare()'s node naming may have happened
    assert any("nothing to prune" in m and "graph output" in m for m in ctx.warnings)
    assert model.get_array("w1").shape == (6, 3, 1, 1)


def test_ratio_zero_changes_nothing() -> None:
    model, stats, _ = _run(from_proto(build_cnn()), "channels(ratio=0)")
    assert stats["channels_removed"] == 0 and stats["params_after"] == stats["params_before"]


def test_dead_channel_removed_without_output_change() -> None:
    proto = build_cnn()
    model = from_proto(proto)
    # kill channel 3 of block1.conv1: zero its weights and its BN scale and shift
    w = model.get_array("block1.conv1.weight").copy()
    w[3] = 0
    model.set_array("block1.conv1.weight", w)
    for name, value in (("block1.bn1.weight", 0.0), ("block1.bn1.bias", 0.0)):
        arr = model.get_array(name).copy()
        arr[3] = value
        model.set_array(name, arr)
    feeds = random_inputs(proto)
    ref = run_model(model, feeds)
    pruned, stats, _ = _run(model.copy(), "channels(ratio=0.07,criterion=bn_scale,include='block1.conv1')")
    assert stats["channels_removed"] == 1
    assert _conv_widths(pruned)["block1.conv1"] == 15
    out = run_model(pruned, feeds)
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-5)


def test_api_optimize_and_params_stat() -> None:
    model = from_proto(build_cnn())
    before = count_params(model)
    result = onnxprune.optimize(model, "channels(ratio=0.3)")
    assert count_params(result.model) < before
    assert count_params(model) == before  # the input is left alone


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.sampled_from(["cnn", "mlp"]), opset=st.sampled_from([11, 13, 17]))
def test_property_random_channels_match_masked_twin(data, which: str, opset: int) -> None:  # noqa: ANN001
    proto = build_cnn(opset=opset) if which == "cnn" else build_mlp(opset=opset)
    model = from_proto(proto)
    groups = [g for g in build_groups(model.copy()) if g.prunable]
    g = data.draw(st.sampled_from(groups))
    k = data.draw(st.integers(1, g.width - 1))
    ch = np.array(data.draw(st.lists(st.integers(0, g.width - 1), min_size=k, max_size=k, unique=True)))
    err, _, shapes = masked_twin_error(model, g.name, ch, random_inputs(proto, batch=3))
    assert err < 1e-5, (g.name, ch, err)
    assert all(a == b for a, b in shapes.values())


def test_bench_latency_script(tmp_path) -> None:  # noqa: ANN001
    import importlib.util
    from pathlib import Path

    from onnxprune.ir.save import save

    spec = importlib.util.spec_from_file_location("bench_latency", Path(__file__).parents[1] / "scripts" / "bench_latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    dense, pruned = tmp_path / "a.onnx", tmp_path / "b.onnx"
    save(from_proto(build_cnn()), dense)
    model, _, _ = _run(from_proto(build_cnn()), "channels(ratio=0.5)")
    save(model, pruned)
    r = bench.bench(str(dense), str(pruned), threads=1, runs=3, warmup=1, dims={"batch": 1})
    assert r["flops_ratio"] > 1.5 and r["speedup"] > 0
    # the FLOPs count matches a hand count for the stem conv: 2 * 16*16*16 * 3*3*3 per image
    assert bench.flops(str(dense), {"batch": 1}) > 2 * 16 * 16 * 16 * 27
