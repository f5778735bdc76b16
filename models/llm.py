"""Decoder graphs in the forms ONNX Runtime GenAI's model builder (and optimum) export.

:func:`build_llm_decoder` writes a Llama-style decoder with a KV cache::

    input_ids [batch_size, sequence_length], attention_mask [batch_size, total_sequence_length]
    (position_ids [batch_size, sequence_length] when the rotary is not inside the attention op)
    past_key_values.L.key / .value [batch_size, kv_heads, past_sequence_length, head_dim]
      -> embed (Gather)
      -> seqlens_k = Cast<int32>(ReduceSum(attention_mask, 1) - 1), total = Cast<int32>(Shape(mask)[1])
      per layer L:
        input_layernorm: SimplifiedLayerNormalization (layer 0) or SkipSimplifiedLayerNormalization
          (com.microsoft; its 4th output is the residual sum)
        q/k/v: one packed projection [E, (Hq + 2 Hkv) D] (qkv="packed") or three (qkv="separate")
        rotary: inside GroupQueryAttention (do_rotary=1, cos/sin caches; rotary="gqa"), or
          RotaryEmbedding on q and k: com.microsoft (rotary="ms") or ai.onnx opset 23 (rotary="onnx")
        com.microsoft GroupQueryAttention(num_heads=Hq, kv_num_heads=Hkv) with the past cache
          -> present.L.key / .value [batch_size, kv_heads, total_sequence_length, head_dim]
        o_proj -> post_attention_layernorm (SkipSimplifiedLayerNormalization)
        SwiGLU: gate, up -> gate * Sigmoid(gate) * up -> down
      -> final norm -> lm_head -> logits [batch_size, sequence_length, vocab]

Every projection is a com.microsoft ``MatMulNBits`` (4-bit, ``block_size`` along K, uint8 zero
points unless ``zero_points=False``) when ``nbits=True``, a float ``MatMul`` otherwise.
``norm="rms"`` writes ai.onnx opset-23 ``RMSNormalization`` (and ``Add`` for the residual)
instead of the ORT norms. Deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_llm_decoder", "quantize_nbits"]


def _pack4(codes: np.ndarray) -> np.ndarray:
    c = codes.astype(np.uint8)
    if c.shape[-1] % 2:
        c = np.concatenate([c, np.zeros((*c.shape[:-1], 1), np.uint8)], axis=-1)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def quantize_nbits(w: np.ndarray, block_size: int, zero_points: bool = True
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """4-bit block quantisation of ``w [K, N]`` as ``MatMulNBits`` stores it.

    Returns ``B`` uint8 ``[N, n_blocks, block_size / 2]``, scales float32 ``[N * n_blocks]`` and
    the packed uint8 zero points ``[N * ceil(n_blocks / 2)]`` (asymmetric min/max), or None
    (symmetric around the default zero point 8).
    """
    k, n = w.shape
    nb = -(-k // block_size)
    wt = np.zeros((n, nb * block_size), np.float64)
    wt[:, :k] = w.T
    blocks = wt.reshape(n, nb, block_size)
    if zero_points:
        lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
        scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0)
        zp = np.clip(np.round(-lo / scale), 0, 15)
    else:
        scale = np.maximum(np.abs(blocks).max(-1), 1e-8) / 7.0
        zp = np.full((n, nb), 8.0)
    q = np.clip(np.round(blocks / scale[..., None]) + zp[..., None], 0, 15)
    zpacked = _pack4(zp.astype(np.uint8)).reshape(-1) if zero_points else None
    return _pack4(q), scale.astype(np.float32).reshape(-1), zpacked


class _Decoder:
    def __init__(self, seed: int, nbits: bool, block_size: int, zero_points: bool) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.nbits, self.block_size, self.zero_points = nbits, block_size, zero_points

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: list[str] | None = None, domain: str = "",
             **attrs: object) -> list[str]:
        outs = outputs or [f"{name}/output_0"]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def linear(self, x: str, name: str, k: int, n: int) -> str:
        w = self.rng.standard_normal((k, n)) / np.sqrt(k)
        if not self.nbits:
            return self.node("MatMul", [x, self.init(f"{name}.weight", w.astype(np.float32))], name)[0]
        b, s, z = quantize_nbits(w, self.block_size, self.zero_points)
        ins = [x, self.init(f"{name}.weight_Q4", b), self.init(f"{name}.weight_scales", s)]
        if z is not None:
            ins.append(self.init(f"{name}.weight_zp", z))
        return self.node("MatMulNBits", ins, name, domain="com.microsoft", K=k, N=n, bits=4,
                         block_size=self.block_size, accuracy_level=0)[0]

    def norm_weight(self, name: str, e: int) -> str:
        return self.init(name, (1.0 + 0.1 * self.rng.standard_normal(e)).astype(np.float32))

    def norm(self, x: str, name: str, e: int, rms: bool) -> str:
        op = "RMSNormalization" if rms else "SimplifiedLayerNormalization"
        return self.node(op, [x, self.norm_weight(f"{name}.weight", e)], name, axis=-1, epsilon=1e-5)[0]

    def skip_norm(self, x: str, skip: str, name: str, e: int, rms: bool) -> tuple[str, str]:
        """Normalised output and residual sum of ``x + skip``."""
        if rms:
            total = self.node("Add", [x, skip], f"{name}/Add")[0]
            return self.norm(total, name, e, True), total
        outs = [f"{name}/output_0", "", "", f"{name}/output_3"]
        self.node("SkipSimplifiedLayerNormalization", [x, skip, self.norm_weight(f"{name}.weight", e)], name,
                  outputs=outs, domain="com.microsoft", epsilon=1e-5)
        return outs[0], outs[3]


def build_llm_decoder(seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 8, kv_heads: int = 4,
                      head_dim: int = 16, ffn: int = 128, vocab: int = 96, max_seq: int = 64,
                      qkv: str = "packed", rotary: str = "gqa", norm: str = "simplified", nbits: bool = True,
                      block_size: int = 32, zero_points: bool = True) -> onnx.ModelProto:
    """A decoder with a KV cache (see the module docstring for the graph and names).

    Args:
        qkv: ``"packed"`` (one q/k/v projection into GroupQueryAttention's query, key/value empty)
            or ``"separate"``.
        rotary: ``"gqa"`` (do_rotary inside the attention op), ``"ms"`` (com.microsoft
            RotaryEmbedding nodes) or ``"onnx"`` (ai.onnx opset-23 RotaryEmbedding).
        norm: ``"simplified"`` (ORT's (Skip)SimplifiedLayerNormalization) or ``"rms"`` (ai.onnx
            opset-23 RMSNormalization).
        nbits: 4-bit ``MatMulNBits`` projections (else float ``MatMul``).
    """
    if qkv not in ("packed", "separate") or rotary not in ("gqa", "ms", "onnx") or norm not in ("simplified", "rms"):
        raise ValueError("qkv must be packed|separate, rotary gqa|ms|onnx, norm simplified|rms")
    if qkv == "packed" and rotary != "gqa":
        raise ValueError("a packed projection takes the rotary inside GroupQueryAttention (rotary='gqa')")
    rms = norm == "rms"
    opset = 23 if rms or rotary == "onnx" else 21
    g = _Decoder(seed, nbits, block_size, zero_points)
    e, d = hidden, head_dim
    table = g.init("model.embed_tokens.weight", (g.rng.standard_normal((vocab, e)) * 0.5).astype(np.float32))
    x = g.node("Gather", [table, "input_ids"], "/model/embed_tokens/Gather")[0]
    mask_sum = g.node("ReduceSum", ["attention_mask", g.init("/model/attn_mask_reformat/axes", np.array([1]))],
                      "/model/attn_mask_reformat/ReduceSum", keepdims=0)[0]
    sub = g.node("Sub", [mask_sum, g.init("/model/attn_mask_reformat/one", np.array(1, np.int64))],
                 "/model/attn_mask_reformat/Sub")[0]
    seqlens = g.node("Cast", [sub], "/model/attn_mask_reformat/seqlens_k", to=TensorProto.INT32)[0]
    shape = g.node("Shape", ["attention_mask"], "/model/attn_mask_reformat/Shape")[0]
    tot = g.node("Gather", [shape, g.init("/model/attn_mask_reformat/one_idx", np.array(1, np.int64))],
                 "/model/attn_mask_reformat/Gather", axis=0)[0]
    total = g.node("Cast", [tot], "/model/attn_mask_reformat/total_seq_len", to=TensorProto.INT32)[0]
    inv = 1.0 / 10000 ** (np.arange(0, d, 2) / d)
    ang = np.arange(max_seq)[:, None] * inv[None, :]
    cos = g.init("cos_cache", np.cos(ang).astype(np.float32))
    sin = g.init("sin_cache", np.sin(ang).astype(np.float32))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    if rotary != "gqa":
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                    ["batch_size", "sequence_length"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
    residual = x
    prev = None
    for layer in range(layers):
        p = f"/model/layers.{layer}"
        if prev is None:
            h = g.norm(x, f"{p}/input_layernorm/LayerNorm", e, rms)
        else:
            h, residual = g.skip_norm(prev, residual, f"{p}/input_layernorm/SkipLayerNorm", e, rms)
        if qkv == "packed":
            q = g.linear(h, f"{p}/attn/qkv_proj/MatMul", e, (heads + 2 * kv_heads) * d)
            k = v = ""
        else:
            q = g.linear(h, f"{p}/attn/q_proj/MatMul", e, heads * d)
            k = g.linear(h, f"{p}/attn/k_proj/MatMul", e, kv_heads * d)
            v = g.linear(h, f"{p}/attn/v_proj/MatMul", e, kv_heads * d)
        if rotary == "ms":
            q = g.node("RotaryEmbedding", [q, "position_ids", cos, sin], f"{p}/attn/q_rotary/RotaryEmbedding",
                       domain="com.microsoft", num_heads=heads)[0]
            k = g.node("RotaryEmbedding", [k, "position_ids", cos, sin], f"{p}/attn/k_rotary/RotaryEmbedding",
                       domain="com.microsoft")[0]
        elif rotary == "onnx":
            q = g.node("RotaryEmbedding", [q, cos, sin, "position_ids"], f"{p}/attn/q_rotary/RotaryEmbedding",
                       num_heads=heads)[0]
            k = g.node("RotaryEmbedding", [k, cos, sin, "position_ids"], f"{p}/attn/k_rotary/RotaryEmbedding",
                       num_heads=kv_heads)[0]
        past_k, past_v = f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"
        pres_k, pres_v = f"present.{layer}.key", f"present.{layer}.value"
        for name in (past_k, past_v):
            inputs.append(helper.make_tensor_value_info(
                name, TensorProto.FLOAT, ["batch_size", kv_heads, "past_sequence_length", d]))
        for name in (pres_k, pres_v):
            outputs.append(helper.make_tensor_value_info(
                name, TensorProto.FLOAT, ["batch_size", kv_heads, "total_sequence_length", d]))
        gqa_in = [q, k, v, past_k, past_v, seqlens, total] + ([cos, sin] if rotary == "gqa" else [])
        attn = g.node("GroupQueryAttention", gqa_in, f"{p}/attn/GroupQueryAttention",
                      outputs=[f"{p}/attn/GroupQueryAttention/output_0", pres_k, pres_v], domain="com.microsoft",
                      num_heads=heads, kv_num_heads=kv_heads, do_rotary=int(rotary == "gqa"))[0]
        o = g.linear(attn, f"{p}/attn/o_proj/MatMul", heads * d, e)
        h2, residual = g.skip_norm(o, residual, f"{p}/post_attention_layernorm/SkipLayerNorm", e, rms)
        gate = g.linear(h2, f"{p}/mlp/gate_proj/MatMul", e, ffn)
        up = g.linear(h2, f"{p}/mlp/up_proj/MatMul", e, ffn)
        sig = g.node("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")[0]
        act = g.node("Mul", [gate, sig], f"{p}/mlp/act_fn/Mul")[0]
        prod = g.node("Mul", [act, up], f"{p}/mlp/Mul")[0]
        prev = g.linear(prod, f"{p}/mlp/down_proj/MatMul", ffn, e)
    final, _ = g.skip_norm(prev, residual, "/model/layers.final/final_norm_layernorm/SkipLayerNorm", e, rms)
    logits = g.linear(final, "/lm_head/MatMul", e, vocab)
    g.nodes[-1].output[0] = "logits"
    del logits
    graph = helper.make_graph(g.nodes, "llm_decoder", inputs, outputs, initializer=g.inits)
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=imports, ir_version=10, producer_name="onnxprune.models.llm")
