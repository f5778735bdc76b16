"""Masked-twin oracle for every channel rule, on tiny graphs written in ONNX text.

For each graph, every prunable group loses a random third of its channels twice: once by
zeroing the readers' input slices (the masked twin), once by real removal. ONNX Runtime must give
the same outputs (atol 1e-5 on outputs of order 1). Weights named in the graph signature become
random initializers (``int64`` ones take the values given in ``CONSTS``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.analysis.channels.groups import build_groups
from onnxprune.ir.load import from_proto
from onnxprune.ir.model import Model
from onnxprune.testing import masked_twin_error

ATOL = 1e-5


def make(text: str, consts: dict[str, list[int]] | None = None, opset: int = 17, seed: int = 0) -> Model:
    """Parse ``text`` (graph body with weights as inputs) and turn the weights into initializers."""
    consts = consts or {}
    proto = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + text)
    rng = np.random.default_rng(seed)
    g = proto.graph
    keep = []
    for inp in g.input:
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if inp.name == "x" or any(d is None for d in dims):
            keep.append(inp)
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if inp.name in consts:
            arr = np.array(consts[inp.name], dtype=dtype).reshape(dims)
        elif dtype.kind == "f":
            arr = (rng.standard_normal(dims) * 0.5).astype(dtype)
            if inp.name.endswith("var"):
                arr = np.abs(arr) + 0.5
        else:
            arr = rng.integers(-8, 8, size=dims).astype(dtype)
        g.initializer.append(onnx.numpy_helper.from_array(arr, inp.name))
    del g.input[:]
    g.input.extend(keep)
    names = [o.name for o in g.output]
    del g.output[:]
    g.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    done = onnx.shape_inference.infer_shapes(proto).graph
    inferred = {v.name: v for v in list(done.value_info) + list(done.output) if v.type.tensor_type.HasField("shape")}
    for o in g.output:
        if o.name in inferred:
            o.CopyFrom(inferred[o.name])
    onnx.checker.check_model(proto)
    return from_proto(proto)


def feeds_for(model: Model, spatial: int = 8, batch: int = 2) -> dict[str, np.ndarray]:
    """Random input ``x`` (symbolic dims: batch first, then ``spatial``)."""
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else spatial)
            for i, d in enumerate(inp.type.tensor_type.shape.dim)]
    return {"x": np.random.default_rng(1).standard_normal(dims).astype(np.float32)}


def oracle_all(model: Model, min_prunable: int = 1, allow_approximate: bool = False,
               spatial: int = 8) -> list:
    """Run the oracle on every prunable group; return the groups."""
    groups = build_groups(model.copy(), allow_approximate)
    prunable = [g for g in groups if g.prunable]
    assert len(prunable) >= min_prunable, [(g.name, g.blocked) for g in groups]
    feeds = feeds_for(model, spatial)
    for i, g in enumerate(prunable):
        if g.width < 2:
            continue
        ch = np.random.default_rng(i).choice(g.width, size=max(1, g.width // 3), replace=False)
        err, change, shapes = masked_twin_error(model, g.name, ch, feeds, allow_approximate)
        assert err < ATOL, (g.name, err, shapes)
        assert change > 100 * ATOL, (g.name, "removal did not change the outputs; the test proves nothing")
        assert all(a == b for a, b in shapes.values()), shapes
    return groups


SIG = "float[N, 3, H, W] x"

CASES: dict[str, tuple[str, dict[str, list[int]], int]] = {
    "conv_chain": (f"""g ({SIG}, float[6,3,3,3] w1, float[6] b1, float[5,6,3,3] w2) => (float y) {{
        a = Conv <pads=[1,1,1,1]> (x, w1, b1)
        r = Relu (a)
        y = Conv (r, w2)
    }}""", {}, 1),
    "bn_prelu": (f"""g ({SIG}, float[6,3,1,1] w1, float[6] s, float[6] bb, float[6] m, float[6] var,
                   float[6,1,1] slope, float[4,6,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        b = BatchNormalization (a, s, bb, m, var)
        p = PRelu (b, slope)
        y = Conv (p, w2)
    }}""", {}, 1),
    "depthwise": (f"""g ({SIG}, float[6,3,1,1] w1, float[6,1,3,3] dw, float[6] db, float[4,6,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        r = Clip (a)
        d = Conv <group=6, pads=[1,1,1,1]> (r, dw, db)
        h = HardSwish (d)
        y = Conv (h, w2)
    }}""", {}, 1),
    "depthwise_mult2": (f"""g ({SIG}, float[6,3,1,1] w1, float[12,1,3,3] dw, float[4,12,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        d = Conv <group=6> (a, dw)
        s = Sigmoid (d)
        y = Conv (s, w2)
    }}""", {}, 1),
    "conv_transpose": (f"""g ({SIG}, float[6,3,1,1] w1, float[6,5,2,2] wt, float[5] bt, float[4,5,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        t = ConvTranspose <strides=[2,2]> (a, wt, bt)
        r = Relu (t)
        y = Conv (r, w2)
    }}""", {}, 2),
    "conv_transpose_dw": (f"""g ({SIG}, float[6,3,1,1] w1, float[6,1,2,2] wt, float[4,6,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        t = ConvTranspose <strides=[2,2], group=6> (a, wt)
        y = Conv (t, w2)
    }}""", {}, 1),
    "residual_add_sum": (f"""g ({SIG}, float[6,3,1,1] w1, float[6,6,3,3] w2, float[6,6,1,1] w3, float[4,6,1,1] w4) => (float y) {{
        a = Conv (x, w1)
        r = Relu (a)
        b = Conv <pads=[1,1,1,1]> (r, w2)
        s = Add (b, r)
        c = Conv (s, w3)
        t = Sum (c, s, r)
        y = Conv (t, w4)
    }}""", {}, 1),
    "elementwise_mix": (f"""g ({SIG}, float[6,3,1,1] w1, float[6,3,1,1] w2, float[1,6,1,1] k, float[6,1,1] k2,
                          float[4,6,1,1] w4) => (float y) {{
        a = Conv (x, w1)
        b = Conv (x, w2)
        m = Max (a, b)
        n = Min (m, b)
        s = Sub (n, a)
        u = Mul (s, k)
        d = Div (u, k2)
        e = Dropout (d)
        i = Identity (e)
        t = Tanh (i)
        y = Conv (t, w4)
    }}""", {}, 1),
    "concat": (f"""g ({SIG}, float[4,3,1,1] w1, float[5,3,3,3] w2, float[6,9,1,1] w3) => (float y) {{
        a = Conv (x, w1)
        b = Conv <pads=[1,1,1,1]> (x, w2)
        c = Concat <axis=1> (a, b)
        r = Relu (c)
        y = Conv (r, w3)
    }}""", {}, 2),
    "split_cuts_space": (f"""g ({SIG}, float[8,3,1,1] w1, int64[2] sp, float[4,2,1,1] wa, float[4,6,1,1] wb) => (float y) {{
        a = Conv (x, w1)
        p, q = Split <axis=1> (a, sp)
        c = Conv (p, wa)
        d = Conv (q, wb)
        y = Add (c, d)
    }}""", {"sp": [2, 6]}, 2),
    "slice_channels": (f"""g ({SIG}, float[8,3,1,1] w1, int64[1] st, int64[1] en, int64[1] ax, float[4,4,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        s = Slice (a, st, en, ax)
        y = Conv (s, w2)
    }}""", {"st": [2], "en": [6], "ax": [1]}, 1),
    "flatten_gemm": ("""g (float[N, 3, 4, 4] x, float[6,3,3,3] w1, float[6] b1, float[5,96] wg, float[5] bg) => (float y) {
        a = Conv <pads=[1,1,1,1]> (x, w1, b1)
        r = Relu (a)
        f = Flatten (r)
        y = Gemm <transB=1> (f, wg, bg)
    }""", {}, 1),
    "reshape_gemm": ("""g (float[N, 3, 4, 4] x, float[6,3,3,3] w1, int64[2] shp, float[96,5] wg) => (float y) {
        a = Conv <pads=[1,1,1,1]> (x, w1)
        f = Reshape (a, shp)
        y = Gemm (f, wg)
    }""", {"shp": [-1, 96]}, 1),
    "gap_squeeze_matmul": (f"""g ({SIG}, float[6,3,3,3] w1, int64[2] axs, float[6,5] wm, float[5] bm) => (float y) {{
        a = Conv (x, w1)
        p = GlobalAveragePool (a)
        s = Squeeze (p, axs)
        m = MatMul (s, wm)
        y = Add (m, bm)
    }}""", {"axs": [2, 3]}, 1),
    "squeeze_excitation": (f"""g ({SIG}, float[6,3,3,3] w1, float[2,6,1,1] se1, float[2] sb1, float[6,2,1,1] se2,
                             float[6] sb2, float[4,6,1,1] w2) => (float y) {{
        a = Conv <pads=[1,1,1,1]> (x, w1)
        m = ReduceMean <axes=[2,3], keepdims=1> (a)
        e = Conv (m, se1, sb1)
        r = Relu (e)
        f = Conv (r, se2, sb2)
        g = Sigmoid (f)
        z = Mul (a, g)
        y = Conv (z, w2)
    }}""", {}, 2),
    "pool_pad_resize": (f"""g ({SIG}, float[6,3,3,3] w1, int64[8] pads, float[4] sc, float[4,6,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        m = MaxPool <kernel_shape=[2,2], strides=[2,2]> (a)
        p = Pad (m, pads)
        r = Resize <mode="nearest"> (p, , sc)
        v = AveragePool <kernel_shape=[2,2]> (r)
        l = LpPool <kernel_shape=[1,1]> (v)
        g = GlobalMaxPool (l)
        y = Conv (g, w2)
    }}""", {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "sc": [1, 1, 2, 2]}, 1),
    "nhwc_ffn": (f"""g ({SIG}, float[6,3,1,1] w1, float[6,12] u, float[12] ub, float[12,6] d, float[4,6,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        t = Transpose <perm=[0,2,3,1]> (a)
        h = MatMul (t, u)
        hb = Add (h, ub)
        ge = Sigmoid (hb)
        o = MatMul (ge, d)
        b = Transpose <perm=[0,3,1,2]> (o)
        s = Add (a, b)
        y = Conv (s, w2)
    }}""", {}, 2),
    "cumsum_spatial": ("""g (float[N, 3, 4, 4] x, float[6,3,1,1] w1, int64[1] ax, float[4,6,1,1] w2) => (float y) {
        a = Conv (x, w1)
        s = CumSum (a, ax)
        y = Conv (s, w2)
    }""", {"ax": [3]}, 1),
    "softmax_spatial": ("""g (float[N, 3, 4, 4] x, float[6,3,1,1] w1, int64[3] s1, int64[4] s2, float[4,6,1,1] w2) => (float y) {
        a = Conv (x, w1)
        r = Reshape (a, s1)
        m = Softmax <axis=-1> (r)
        b = Reshape (m, s2)
        y = Conv (b, w2)
    }""", {"s1": [0, 6, -1], "s2": [-1, 6, 4, 4]}, 1),
    "instancenorm": (f"""g ({SIG}, float[6,3,3,3] w1, float[6] s, float[6] b, float[4,6,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        n = InstanceNormalization (a, s, b)
        y = Conv (n, w2)
    }}""", {}, 1),
    "expand_shape_edit": (f"""g ({SIG}, float[6,3,1,1] w1, int64[4] shp, float[4,6,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        p = GlobalAveragePool (a)
        e = Expand (p, shp)
        y = Conv (e, w2)
    }}""", {"shp": [1, 6, 8, 8]}, 1),
    "resize_sizes_edit": ("""g (float[2, 3, H, W] x, float[6,3,1,1] w1, int64[4] sz, float[4,6,1,1] w2) => (float y) {
        a = Conv (x, w1)
        r = Resize <mode="nearest"> (a, , , sz)
        y = Conv (r, w2)
    }""", {"sz": [2, 6, 16, 16]}, 1),
    "unsqueeze_expand": ("""g (float[N, 6] x, float[6,8] w1, int64[2] ax, float[8,5] w2) => (float y) {
        a = MatMul (x, w1)
        u = Unsqueeze (a, ax)
        s = Squeeze (u, ax)
        y = MatMul (s, w2)
    }""", {"ax": [1, 2]}, 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_twin(case: str) -> None:
    text, consts, n = CASES[case]
    oracle_all(make(text, consts), min_prunable=n)


def test_upsample_opset9() -> None:
    text = f"""g ({SIG}, float[6,3,1,1] w1, float[4] sc, float[4,6,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        u = Upsample <mode="nearest"> (a, sc)
        y = Conv (u, w2)
    }}"""
    oracle_all(make(text, {"sc": [1, 1, 2, 2]}, opset=9), min_prunable=1)


def test_expand_and_resize_record_shape_edits() -> None:
    for case, target in (("expand_shape_edit", "shp"), ("resize_sizes_edit", "sz")):
        text, consts, _ = CASES[case]
        g = next(g for g in build_groups(make(text, consts)) if g.name == "a")
        assert [(e.target, e.index) for e in g.shape_edits] == [(target, 1)]


def test_dequantize_per_channel_weights() -> None:
    text = f"""g ({SIG}, float[6,3,1,1] w1, int8[5,6,1,1] wq, float[5] sc, int8[5] zp, float[4,5,1,1] w3) => (float y) {{
        a = Conv (x, w1)
        w = DequantizeLinear <axis=0> (wq, sc, zp)
        b = Conv (a, w)
        y = Conv (b, w3)
    }}"""
    model = make(text, {"zp": [0] * 5})
    sc = np.abs(model.get_array("sc")) + 0.1
    model.set_array("sc", sc.astype(np.float32))
    groups = oracle_all(model, min_prunable=2)
    g = next(g for g in groups if g.name == "b")
    assert {(s.initializer, s.axis, s.role) for s in g.slices} >= {("wq", 0, "out"), ("sc", 0, "param"),
                                                                   ("zp", 0, "param"), ("w3", 1, "in")}


def test_grouped_conv_ties_groups() -> None:
    text = f"""g ({SIG}, float[6,3,1,1] w1, float[8,3,3,3] wg, float[8] bg, float[4,8,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        b = Conv <group=2, pads=[1,1,1,1]> (a, wg, bg)
        y = Conv (b, w2)
    }}"""
    model = make(text)
    groups = oracle_all(model, min_prunable=2)
    g = next(g for g in groups if g.name.startswith("b"))
    assert g.width == 4  # one group's worth of output channels; removal takes the same ones from both
    assert sorted(s.offset for s in g.slices if s.initializer == "wg" and s.axis == 0) == [0, 4]


def test_concat_into_grouped_conv() -> None:
    text = f"""g ({SIG}, float[2,3,1,1] w1, float[4,3,1,1] w2, float[6,3,1,1] wg, float[4,6,1,1] w3) => (float y) {{
        a = Conv (x, w1)
        b = Conv (x, w2)
        c = Concat <axis=1> (a, b)
        d = Conv <group=2> (c, wg)
        y = Conv (d, w3)
    }}"""
    oracle_all(make(text), min_prunable=2)


def test_unknown_op_blocks_only_its_groups() -> None:
    text = f"""g ({SIG}, float[8,3,1,1] w1, float[4,2,1,1] w2, float[6,3,1,1] w3, float[4,6,1,1] w4) => (float y, float z) {{
        a = Conv (x, w1)
        d = DepthToSpace <blocksize=2> (a)
        y = Conv (d, w2)
        b = Conv (x, w3)
        r = Relu (b)
        z = Conv (r, w4)
    }}"""
    model = make(text)
    groups = {g.name: g for g in build_groups(model.copy())}
    assert "DepthToSpace" in (groups["a"].blocked or "")
    assert groups["b"].prunable
    oracle_all(model, min_prunable=1)


def test_graph_output_never_changes_shape() -> None:
    text = f"""g ({SIG}, float[6,3,1,1] w1) => (float y) {{
        y = Conv (x, w1)
    }}"""
    (g,) = build_groups(make(text))
    assert g.blocked is not None and "graph output" in g.blocked


def test_layernorm_over_channels_blocked_unless_approximate() -> None:
    text = f"""g ({SIG}, float[6,3,1,1] w1, float[6] gam, float[6] bet, float[4,6,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        t = Transpose <perm=[0,2,3,1]> (a)
        n = LayerNormalization <axis=-1> (t, gam, bet)
        b = Transpose <perm=[0,3,1,2]> (n)
        y = Conv (b, w2)
    }}"""
    model = make(text)
    g = {g.name: g for g in build_groups(model.copy())}["a"]
    assert g.blocked is not None and "LayerNormalization" in g.blocked
    ga = {g.name: g for g in build_groups(model.copy(), allow_approximate=True)}["a"]
    assert ga.prunable and ga.approximate
    assert ("gam", 0, "param") in {(s.initializer, s.axis, s.role) for s in ga.slices}
    from onnxprune.analysis.removal import apply_removal
    from onnxprune.check import run_model
    from onnxprune.pipeline.manager import verify_model

    pruned = model.copy()
    ga = {g.name: g for g in build_groups(pruned, allow_approximate=True)}["a"]
    apply_removal(pruned, [(ga, np.array([0, 3]))])
    verify_model(pruned, "test")
    assert run_model(pruned, feeds_for(model))["y"].shape == (2, 4, 8, 8)


def test_softmax_over_channels_blocked() -> None:
    text = f"""g ({SIG}, float[6,3,1,1] w1, float[4,6,1,1] w2) => (float y) {{
        a = Conv (x, w1)
        s = Softmax <axis=1> (a)
        y = Conv (s, w2)
    }}"""
    (g, *_) = build_groups(make(text))
    assert g.blocked is not None and "Softmax" in g.blocked


def test_shape_edits_recorded() -> None:
    text, consts, _ = CASES["reshape_gemm"]
    g = next(g for g in build_groups(make(text, consts)) if g.name == "a")
    assert g.shape_edits and g.shape_edits[0].target == "shp" and g.shape_edits[0].per_channel == 16
    assert any(s.initializer == "wg" and s.block == 16 for s in g.slices)


def test_cumsum_along_channels_blocks() -> None:
    model = make("""g (float[N, 3, 4, 4] x, float[6,3,1,1] w1, int64[1] ax, float[4,6,1,1] w2) => (float y) {
        a = Conv (x, w1)
        s = CumSum (a, ax)
        y = Conv (s, w2)
    }""", {"ax": [1]})
    groups = build_groups(model.copy())
    blocked = [g for g in groups if not g.prunable]
    assert blocked and any("CumSum" in str(g.blocked) for g in blocked)
