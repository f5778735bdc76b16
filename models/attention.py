"""Attention graphs for the head/FFN engine tests: decomposed MHA/GQA (with rotary, fused QKV,
Expand/Tile KV repeats), ``com.microsoft`` MultiHeadAttention / Attention / GroupQueryAttention and
the opset-23 ``Attention`` op, plus :func:`check_masked_twin`, the removal-equals-masked-twin oracle
for one head or FFN group.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models import random_inputs
from onnxprune.analysis.heads.groups import find_ffn_groups, find_head_groups
from onnxprune.analysis.heads.prepare import prepare_model
from onnxprune.analysis.removal import apply_removal, mask_group
from onnxprune.check import run_model
from onnxprune.ir.model import Model

B, S, E = 2, 8, 32


# ---------------------------------------------------------------------- builders
class GraphBuilder:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.k = 0

    def c(self, value: object, dtype: object = None) -> str:
        arr = np.asarray(value, dtype=dtype)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def w(self, *shape: int, scale: float = 1.0) -> str:
        return self.c(self.rng.standard_normal(shape) * scale / np.sqrt(shape[0]))

    def n(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: object) -> list[str]:
        self.k += 1
        outs = [f"t{self.k}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"{op}_{self.k}", domain=domain, **attrs))
        return outs

    def n1(self, op: str, inputs: list[str], **attrs: object) -> str:
        return self.n(op, inputs, **attrs)[0]

    def linear(self, x: str, fan_in: int, fan_out: int, bias: bool = True) -> str:
        y = self.n1("MatMul", [x, self.w(fan_in, fan_out)])
        return self.n1("Add", [y, self.c(self.rng.standard_normal(fan_out) * 0.1)]) if bias else y

    def model(self, out: str, opset: int = 17, ms: bool = False, ir: int = 8,
              extra_inputs: list[onnx.ValueInfoProto] | None = None) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "y"
        for node in self.nodes:
            for i, x in enumerate(node.input):
                if x == out:
                    node.input[i] = "y"
        graph = helper.make_graph(
            self.nodes, "attn",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", S, E])] + (extra_inputs or []),
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", S, E])], initializer=self.inits)
        imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
        m = helper.make_model(graph, opset_imports=imports, ir_version=ir)
        return m


def _rotary(g: GraphBuilder, t: str, d: int) -> str:
    pos = np.arange(S)[:, None] * (1.0 / 10000 ** (np.arange(0, d, 2) / d))[None, :]
    emb = np.concatenate([pos, pos], axis=-1)
    lo = g.n1("Slice", [t, g.c([0], np.int64), g.c([d // 2], np.int64), g.c([-1], np.int64)])
    hi = g.n1("Slice", [t, g.c([d // 2], np.int64), g.c([d], np.int64), g.c([-1], np.int64)])
    rot = g.n1("Concat", [g.n1("Neg", [hi]), lo], axis=-1)
    return g.n1("Add", [g.n1("Mul", [t, g.c(np.cos(emb))]), g.n1("Mul", [rot, g.c(np.sin(emb))])])


def build_attention(hq: int = 4, hkv: int | None = None, d: int = 8, fused: bool | str = False,
                    rotary: bool = False, repeat: str = "expand", seed: int = 0) -> onnx.ModelProto:
    """Decomposed attention ``x [batch, 8, 32] -> y``: separate or fused (Split, or Slice with
    ``fused="slice"``: the last piece's end is INT64_MAX) Q/K/V, optional
    GQA (``hkv < hq``: Unsqueeze -> Expand -> Reshape) and rotary embeddings on Q and K."""
    hkv = hkv or hq
    g = GraphBuilder(seed)
    sizes = [hq * d, hkv * d, hkv * d]
    if fused == "slice":
        qkv = g.linear("x", E, sum(sizes))
        bounds = [(0, sizes[0]), (sizes[0], sizes[0] + sizes[1]), (sizes[0] + sizes[1], np.iinfo(np.int64).max)]
        q, k, v = (g.n1("Slice", [qkv, g.c([a], np.int64), g.c([b], np.int64), g.c([2], np.int64)]) for a, b in bounds)
    elif fused:
        qkv = g.linear("x", E, sum(sizes))
        q, k, v = g.n("Split", [qkv, g.c(sizes, np.int64)], n_out=3, axis=-1)
    else:
        q, k, v = (g.linear("x", E, s) for s in sizes)
    heads = {}
    for name, t, h in (("q", q, hq), ("k", k, hkv), ("v", v, hkv)):
        t = g.n1("Reshape", [t, g.c([0, 0, h, d], np.int64)])
        heads[name] = g.n1("Transpose", [t], perm=[0, 2, 1, 3])
    if rotary:
        heads["q"], heads["k"] = _rotary(g, heads["q"], d), _rotary(g, heads["k"], d)
    if hkv != hq:
        for name in ("k", "v"):
            t = g.n1("Unsqueeze", [heads[name], g.c([2], np.int64)])
            if repeat == "tile":
                t = g.n1("Tile", [t, g.c([1, 1, hq // hkv, 1, 1], np.int64)])
            else:
                t = g.n1("Expand", [t, g.c([1, hkv, hq // hkv, 1, 1], np.int64)])
            heads[name] = g.n1("Reshape", [t, g.c([0, hq, -1, d], np.int64)])
    kt = g.n1("Transpose", [heads["k"]], perm=[0, 1, 3, 2])
    scores = g.n1("Mul", [g.n1("MatMul", [heads["q"], kt]), g.c(1.0 / np.sqrt(d))])
    probs = g.n1("Softmax", [scores], axis=-1)
    ctx = g.n1("Transpose", [g.n1("MatMul", [probs, heads["v"]])], perm=[0, 2, 1, 3])
    ctx = g.n1("Reshape", [ctx, g.c([0, 0, hq * d], np.int64)])
    out = g.linear(ctx, hq * d, E)
    return g.model(out)


def build_ms_mha(h: int = 4, d: int = 8, seed: int = 0, packed_bias: bool = False) -> onnx.ModelProto:
    """``com.microsoft.MultiHeadAttention`` on separate Q/K/V projections, then an output MatMul
    (with ``packed_bias`` the Q/K/V biases are the op's ``bias`` input ``[3*H*D]``)."""
    g = GraphBuilder(seed)
    q, k, v = (g.linear("x", E, h * d, bias=not packed_bias) for _ in range(3))
    extra = [g.c(g.rng.standard_normal(3 * h * d) * 0.1)] if packed_bias else []
    a = g.n1("MultiHeadAttention", [q, k, v] + extra, domain="com.microsoft", num_heads=h)
    return g.model(g.linear(a, h * d, E), ms=True)


def build_ms_attention(h: int = 4, d: int = 8, seed: int = 0) -> onnx.ModelProto:
    """``com.microsoft.Attention`` with packed weights ``[E, 3*H*D]`` and bias, then an output MatMul."""
    g = GraphBuilder(seed)
    w, b = g.w(E, 3 * h * d), g.c(g.rng.standard_normal(3 * h * d) * 0.1)
    a = g.n1("Attention", ["x", w, b], domain="com.microsoft", num_heads=h)
    return g.model(g.linear(a, h * d, E), ms=True)


def build_ms_gqa(hq: int = 4, hkv: int = 2, d: int = 8, seed: int = 0) -> onnx.ModelProto:
    """``com.microsoft.GroupQueryAttention`` (no KV cache), then an output MatMul."""
    g = GraphBuilder(seed)
    q = g.linear("x", E, hq * d)
    k, v = g.linear("x", E, hkv * d), g.linear("x", E, hkv * d)
    seqlens = g.c(np.full(B, S - 1, np.int32))
    total = g.c(np.int32(S))
    a = g.n("GroupQueryAttention", [q, k, v, "", "", seqlens, total], n_out=3, domain="com.microsoft",
            num_heads=hq, kv_num_heads=hkv)[0]
    return g.model(g.linear(a, hq * d, E), ms=True)


def build_onnx_attention(hq: int = 4, hkv: int = 2, d: int = 8, seed: int = 0) -> onnx.ModelProto:
    """ai.onnx opset-23 ``Attention`` with 3-D inputs and q_num_heads/kv_num_heads attributes."""
    g = GraphBuilder(seed)
    q = g.linear("x", E, hq * d)
    k, v = g.linear("x", E, hkv * d), g.linear("x", E, hkv * d)
    a = g.n1("Attention", [q, k, v], q_num_heads=hq, kv_num_heads=hkv)
    return g.model(g.linear(a, hq * d, E), opset=23, ir=10)


def build_onnx_attention_4d(hq: int = 4, hkv: int = 2, d: int = 8, seed: int = 0) -> onnx.ModelProto:
    """ai.onnx opset-23 ``Attention`` on 4-D ``[B, H, S, D]`` inputs (heads from the input shapes)."""
    g = GraphBuilder(seed)
    heads = []
    for h in (hq, hkv, hkv):
        t = g.n1("Reshape", [g.linear("x", E, h * d), g.c([0, 0, h, d], np.int64)])
        heads.append(g.n1("Transpose", [t], perm=[0, 2, 1, 3]))
    a = g.n1("Attention", heads)
    a = g.n1("Reshape", [g.n1("Transpose", [a], perm=[0, 2, 1, 3]), g.c([0, 0, hq * d], np.int64)])
    return g.model(g.linear(a, hq * d, E), opset=23, ir=10)


# ---------------------------------------------------------------------- oracle
def attention_feeds(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    if any(i.name == "input_ids" for i in proto.graph.input):
        return random_inputs(proto, batch=B, seq=S)
    return {"x": np.random.default_rng(1).standard_normal((B, S, E)).astype(np.float32)}


def check_masked_twin(proto: onnx.ModelProto, remove: list[int], expect_width: int, mode: str = "heads") -> None:
    """Removal of ``remove`` equals the masked twin, which differs from the dense model."""
    model = Model(proto)
    prepare_model(model)
    groups = find_head_groups(model) if mode == "heads" else find_ffn_groups(model)
    assert groups, "no group found"
    feeds = attention_feeds(proto)
    dense = run_model(model, feeds)
    for g in groups:
        assert g.prunable, g.blocked
        assert g.width == expect_width
        twin, pruned = model.copy(), model.copy()
        mask_group(twin, g, np.asarray(remove))
        apply_removal(pruned, [(g, np.asarray(remove))])
        onnx.checker.check_model(pruned.proto)
        out_t, out_p = run_model(twin, feeds), run_model(pruned, feeds)
        for name in dense:
            assert out_p[name].shape == dense[name].shape
            np.testing.assert_allclose(out_p[name], out_t[name], atol=1e-5, rtol=1e-5)
            assert np.abs(out_t[name] - dense[name]).max() > 1e-4


