"""Dependency analysis: groups on the builder models, prepare(), opsets 9..21, inspect --groups."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from models import build_cnn, build_mlp, build_transformer_block, random_inputs
from onnxprune.analysis.channels.groups import (
    build_groups,
    format_groups,
    inspect_groups,
)
from onnxprune.analysis.channels.prepare import prepare
from onnxprune.ir.load import from_proto
from onnxprune.ir.model import Model
from onnxprune.ir.save import save
from onnxprune.testing import masked_twin_error


def _make(text: str, opset: int, consts: dict[str, list[int]]) -> Model:
    proto = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + text)
    rng = np.random.default_rng(0)
    g = proto.graph
    keep = []
    for inp in g.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        if inp.name == "x":
            keep.append(inp)
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        arr = np.array(consts[inp.name], dtype=dtype).reshape(dims) if inp.name in consts else \
            rng.standard_normal(dims).astype(dtype)
        g.initializer.append(onnx.numpy_helper.from_array(arr, inp.name))
    del g.input[:]
    g.input.extend(keep)
    names = [o.name for o in g.output]
    del g.output[:]
    g.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    done = onnx.shape_inference.infer_shapes(proto).graph
    for o in g.output:
        o.CopyFrom(next(v for v in done.output if v.name == o.name))
    onnx.checker.check_model(proto)
    return from_proto(proto)


def _chain(opset: int) -> tuple[str, dict[str, list[int]]]:
    """Conv -> Split -> Slice -> Unsqueeze/Squeeze -> ReduceMean(SE) -> Conv, in the opset's syntax."""
    split = "p, q = Split <axis=1, split=[4, 4]> (r)" if opset < 13 else "p, q = Split <axis=1> (r, sp)"
    sl = "s = Slice <starts=[1], ends=[4], axes=[1]> (p)" if opset < 10 else "s = Slice (p, st, en, ax)"
    unsq = "u = Unsqueeze <axes=[4]> (s)" if opset < 13 else "u = Unsqueeze (s, ax4)"
    sq = "v = Squeeze <axes=[4]> (u)" if opset < 13 else "v = Squeeze (u, ax4)"
    red = "m = ReduceMean <axes=[2, 3]> (v)" if opset < 18 else "m = ReduceMean (v, ax23)"
    text = f"""g (float[N, 3, H, W] x, float[8,3,3,3] w1, float[8] b1, int64[2] sp, int64[1] st, int64[1] en,
               int64[1] ax, int64[1] ax4, int64[2] ax23, float[3,3,1,1] w2, float[2,4,1,1] w3) => (float y, float z) {{
        a = Conv <pads=[1,1,1,1]> (x, w1, b1)
        r = Relu (a)
        {split}
        {sl}
        {unsq}
        {sq}
        {red}
        g = Sigmoid (m)
        t = Mul (v, g)
        y = Conv (t, w2)
        z = Conv (q, w3)
    }}"""
    return text, {"sp": [4, 4], "st": [1], "en": [4], "ax": [1], "ax4": [4], "ax23": [2, 3]}


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 18, 21])
def test_opsets_and_dynamic_dims(opset: int) -> None:
    model = _make(*_chain(opset)[:1], opset, _chain(opset)[1])
    groups = build_groups(model.copy())
    prunable = [g for g in groups if g.prunable]
    # conv a is cut by the Split into [0:4] and [4:8]; [0:1] and [1:4] by the Slice
    assert {g.name for g in prunable} >= {"a[1:4]", "a[4:8]"}, [(g.name, g.blocked) for g in groups]
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 7)).astype(np.float32)
    for g in prunable:
        if g.width < 2:
            continue
        err, change, shapes = masked_twin_error(model, g.name, np.array([0]), {"x": x})
        assert err < 1e-5 and change > 1e-4, (g.name, err, change, shapes)


def test_cnn_groups() -> None:
    groups = {g.name: g for g in build_groups(from_proto(build_cnn()))}
    res = groups["stem.conv.out"]
    assert res.prunable and res.width == 16
    inits = {s.initializer for s in res.slices}
    # residual: stem and block1.conv2 shrink together, and every reader of the sum
    assert {"stem.conv.weight", "block1.conv2.weight", "block1.conv1.weight", "stem.bn.weight"} <= inits
    # concat: branch_b's channels sit at offset 16 of the depthwise conv and the pointwise conv
    b = groups["branch_b.conv.out"]
    assert any(s.initializer == "pw.conv.weight" and s.axis == 1 and s.offset == 16 for s in b.slices)
    assert any(e.target == "dw.conv" and e.index == "group" for e in b.shape_edits)
    assert not groups["logits"].prunable


def test_mlp_and_ffn_groups() -> None:
    groups = build_groups(from_proto(build_mlp()))
    assert sum(g.prunable for g in groups) == 2
    tgroups = {g.name: g for g in build_groups(from_proto(build_transformer_block()))}
    ffn = tgroups["layer0.ffn.up.out"]
    assert ffn.prunable and ffn.width == 128
    assert {(s.role, s.axis) for s in ffn.slices if s.initializer.endswith("ffn.down.weight")} == {("in", 0)}


def test_build_groups_is_deterministic() -> None:
    a = build_groups(from_proto(build_cnn(seed=3)))
    b = build_groups(from_proto(build_cnn(seed=3)))
    assert [(g.name, g.width, g.slices, g.blocked) for g in a] == [(g.name, g.width, g.slices, g.blocked) for g in b]


def test_prepare_makes_equal_split_explicit_and_keeps_outputs() -> None:
    text = """g (float[N, 3, H, W] x, float[8,3,1,1] w1) => (float p, float q) {
        a = Conv (x, w1)
        p, q = Split <axis=1, num_outputs=2> (a)
    }"""
    model = _make(text, 18, {})
    from onnxprune.check import run_model

    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)}
    before = run_model(model, x)
    assert prepare(model)
    split = next(n for n in model.graph.node if n.op_type == "Split")
    assert len(split.input) == 2 and model.get_array(split.input[1]).tolist() == [4, 4]
    after = run_model(model, x)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_inspect_groups_table_and_cli(tmp_path) -> None:  # noqa: ANN001
    model = from_proto(build_cnn())
    data = inspect_groups(model)
    assert data["total"] == len(data["groups"]) and data["prunable"] >= 4
    text = format_groups(data)
    assert "stem.conv.out" in text and "blocked: reaches graph output 'logits'" in text
    assert len(model.graph.node) == len(build_cnn().graph.node)  # inspect does not change the model
    path = tmp_path / "cnn.onnx"
    save(from_proto(build_cnn()), path)
    out = subprocess.run([sys.executable, "-m", "onnxprune", "inspect", str(path), "--groups", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["groups"]["prunable"] == data["prunable"]


def test_transformer_block_runs_after_ffn_removal() -> None:
    proto = build_transformer_block()
    model = from_proto(proto)
    feeds = random_inputs(proto)
    err, change, _ = masked_twin_error(model, "layer0.ffn.up.out", np.arange(0, 128, 3), feeds)
    assert err < 1e-5 and change > 1e-4


def test_attention_value_head_dim_through_reshape_transpose() -> None:
    """V's [B,S,H*D] -> [B,S,H,D] split is periodic: the same within-head dims go in every head."""
    proto = build_transformer_block()
    groups = {g.name: g for g in build_groups(from_proto(proto))}
    v = groups["layer0.attn.v.out[0:16]"]
    assert v.prunable and v.width == 16
    per: dict[tuple[str, object], int] = {}
    for e in v.shape_edits:
        per[(e.target, e.index)] = per.get((e.target, e.index), 0) + e.per_channel
    # one removed dim shrinks head_dim by 1 and the merged H*D axis by H=4
    assert per == {("layer0.attn.v.reshape.shape", 3): 1, ("layer0.attn.context.reshape.shape", 2): 4}
    q = groups["layer0.attn.q.out[0:16]"]
    assert not q.prunable and "contracted against an activation" in (q.blocked or "")
    err, change, _ = masked_twin_error(from_proto(proto), v.name, np.array([1, 5, 7]), random_inputs(proto))
    assert err < 1e-5 and change > 1e-3
