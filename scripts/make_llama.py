"""Build decoder-only Llama-style ONNX graphs with random weights, for scale tests.

The graph is written out in standard ``ai.onnx`` ops, as a torch export writes it:

* token embedding ``Gather``; RMSNorm as ``Pow -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal ->
  Mul -> Mul(weight)``;
* rotary tables from ``Range(0, seq)`` (the sequence length read with ``Shape``/``Gather``) times
  the ``inv_freq`` initializer, ``Cos``/``Sin``; rotate-half by ``Slice``/``Neg``/``Concat``;
* grouped-query attention: Q/K/V ``MatMul`` -> ``Reshape [0, 0, h, d]`` -> ``Transpose``; the
  ``num_kv_heads`` K/V heads repeated ``num_heads / num_kv_heads`` times by
  ``Unsqueeze -> Expand -> Reshape`` (``repeat_kv``); a causal mask built from two ``Range``
  ranges (``Less`` -> ``Where``) added to the scaled scores; ``Softmax``; output ``MatMul``;
* SwiGLU FFN ``down(silu(gate(x)) * up(x))`` with ``silu = x * Sigmoid(x)``; ``lm_head``.

Input ``input_ids`` int64 ``[batch, sequence]``, output ``logits`` ``[batch, sequence, vocab]``.
Weights are ``N(0, 1/fan_in)`` from ``numpy.random.default_rng([seed, i])`` for the i-th weight,
so a build is reproducible bit for bit. Every weight of at least 1 KiB goes to one external data
file ``OUT.onnx.data`` written through a ``numpy.memmap`` in chunks of ``CHUNK`` elements (peak
memory: one chunk, never the model), at offsets aligned to 4 KiB.

Presets (``--layers`` / ``--dtype`` override): ``tiny`` (tests, ~1 MB), ``1.5b`` (hidden 2048,
FFN 8192, 22 layers, 32/8 heads, fp32: 1.47 B parameters, 5.5 GiB), ``7b`` (hidden 4096, FFN
11008, 32 layers, 32/8 heads, fp16: 5.9 B parameters, 11 GiB).

Usage: ``python scripts/make_llama.py 1.5b /tmp/llm-models/llama-1.5b.onnx``
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Random numbers are drawn and written this many elements at a time.
CHUNK = 1 << 22

#: External data offsets are multiples of this (page size: lets readers map each tensor).
ALIGN = 4096


@dataclass(frozen=True)
class Config:
    """Shape of a Llama-style decoder."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: str = "float32"
    eps: float = 1e-5
    theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS = {
    "tiny": Config(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=96),
    "1.5b": Config(hidden=2048, ffn=8192, layers=22, heads=32, kv_heads=8, vocab=32000),
    "7b": Config(hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=8, vocab=32000, dtype="float16"),
}


class Builder:
    """Nodes, small initializers inline, large weights planned for the external data file."""

    def __init__(self, cfg: Config, seed: int, data_name: str) -> None:
        self.cfg = cfg
        self.data_name = data_name
        self.seed = seed
        self.np_dtype = np.dtype(cfg.dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.np_dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        #: (tensor, shape, fan_in, weight index) for each external weight, in file order.
        self.planned: list[tuple[onnx.TensorProto, tuple[int, ...], int, int]] = []
        self.offset = 0
        self.k = 0

    def const(self, value: object, name: str | None = None, dtype: object = None) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = name or f"const_{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int | None = None, ones: bool = False) -> str:
        """A random ``N(0, 1/fan_in)`` weight (all ones with ``ones``: norm scales, kept inline)."""
        if ones:
            return self.const(np.ones(shape, self.np_dtype), name)
        t = TensorProto(name=name, data_type=self.elem, dims=list(shape))
        length = int(np.prod(shape)) * self.np_dtype.itemsize
        self.offset += (-self.offset) % ALIGN
        t.data_location = TensorProto.EXTERNAL
        for key, val in (("location", self.data_name), ("offset", str(self.offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = key, val
        self.planned.append((t, shape, fan_in or shape[0], len(self.planned)))
        self.offset += length
        self.inits.append(t)
        return name

    def node(self, op: str, inputs: list[str], name: str | None = None, n_out: int = 1, **attrs: object) -> str:
        self.k += 1
        base = name or f"{op.lower()}_{self.k}"
        outs = [base if n_out == 1 else f"{base}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"/{base}/{op}", **attrs))
        return outs[0]

    # ------------------------------------------------------------------ blocks
    def rms_norm(self, x: str, name: str) -> str:
        c = self.cfg
        sq = self.node("Pow", [x, self.const(np.array(2.0, self.np_dtype))])
        mean = self.node("ReduceMean", [sq], axes=[-1], keepdims=1)
        inv = self.node("Reciprocal", [self.node("Sqrt", [self.node("Add", [mean, self.const(
            np.array(c.eps, self.np_dtype))])])])
        return self.node("Mul", [self.node("Mul", [x, inv]), self.weight(f"{name}.weight", (c.hidden,), ones=True)])

    def rotate(self, t: str, cos: str, sin: str) -> str:
        d = self.cfg.head_dim
        i64 = np.int64
        lo = self.node("Slice", [t, self.const([0], dtype=i64), self.const([d // 2], dtype=i64), self.const([-1], dtype=i64)])
        hi = self.node("Slice", [t, self.const([d // 2], dtype=i64), self.const([d], dtype=i64), self.const([-1], dtype=i64)])
        rot = self.node("Concat", [self.node("Neg", [hi]), lo], axis=-1)
        return self.node("Add", [self.node("Mul", [t, cos]), self.node("Mul", [rot, sin])])

    def attention(self, x: str, i: int, cos: str, sin: str, mask: str) -> str:
        c = self.cfg
        d, hq, hkv = c.head_dim, c.heads, c.kv_heads
        p = f"model.layers.{i}.self_attn"
        heads = {}
        for proj, h in (("q", hq), ("k", hkv), ("v", hkv)):
            y = self.node("MatMul", [x, self.weight(f"{p}.{proj}_proj.weight", (c.hidden, h * d))], f"{p}.{proj}_proj")
            y = self.node("Reshape", [y, self.const([0, 0, h, d], dtype=np.int64)])
            heads[proj] = self.node("Transpose", [y], perm=[0, 2, 1, 3])
        q, k = self.rotate(heads["q"], cos, sin), self.rotate(heads["k"], cos, sin)
        v = heads["v"]
        if hkv != hq:  # repeat_kv: [B, hkv, S, d] -> [B, hkv, rep, S, d] -> [B, hq, S, d]
            rep = self.const([1, hkv, hq // hkv, 1, 1], dtype=np.int64)
            k, v = (self.node("Reshape", [self.node("Expand", [self.node("Unsqueeze", [t, self.const([2], dtype=np.int64)]), rep]),
                                          self.const([0, hq, -1, d], dtype=np.int64)]) for t in (k, v))
        kt = self.node("Transpose", [k], perm=[0, 1, 3, 2])
        scores = self.node("Mul", [self.node("MatMul", [q, kt]), self.const(np.array(1 / np.sqrt(d), self.np_dtype))])
        probs = self.node("Softmax", [self.node("Add", [scores, mask])], axis=-1)
        ctx = self.node("Transpose", [self.node("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        ctx = self.node("Reshape", [ctx, self.const([0, 0, hq * d], dtype=np.int64)])
        return self.node("MatMul", [ctx, self.weight(f"{p}.o_proj.weight", (hq * d, c.hidden))], f"{p}.o_proj")

    def mlp(self, x: str, i: int) -> str:
        c = self.cfg
        p = f"model.layers.{i}.mlp"
        gate = self.node("MatMul", [x, self.weight(f"{p}.gate_proj.weight", (c.hidden, c.ffn))], f"{p}.gate_proj")
        up = self.node("MatMul", [x, self.weight(f"{p}.up_proj.weight", (c.hidden, c.ffn))], f"{p}.up_proj")
        act = self.node("Mul", [gate, self.node("Sigmoid", [gate])])
        return self.node("MatMul", [self.node("Mul", [act, up]), self.weight(f"{p}.down_proj.weight", (c.ffn, c.hidden))],
                         f"{p}.down_proj")

    def tables(self) -> tuple[str, str, str]:
        """Rotary ``cos``/``sin`` ``[1, 1, S, d]`` and the causal mask ``[S, S]`` from ``Range``."""
        c = self.cfg
        d = c.head_dim
        i64 = np.int64
        seq = self.node("Gather", [self.node("Shape", ["input_ids"]), self.const(1, dtype=i64)], axis=0)
        pos = self.node("Range", [self.const(0, dtype=i64), seq, self.const(1, dtype=i64)], "position")
        pos_f = self.node("Unsqueeze", [self.node("Cast", [pos], to=TensorProto.FLOAT), self.const([1], dtype=i64)])
        inv_freq = 1.0 / c.theta ** (np.arange(0, d, 2, dtype=np.float32) / d)
        freqs = self.node("Mul", [pos_f, self.const(inv_freq[None, :].astype(np.float32), "inv_freq")])
        emb = self.node("Concat", [freqs, freqs], axis=-1)
        out = []
        for op in ("Cos", "Sin"):
            t = self.node("Cast", [self.node(op, [emb])], to=self.elem)
            out.append(self.node("Unsqueeze", [t, self.const([0, 1], dtype=i64)], op.lower()))
        rows = self.node("Unsqueeze", [pos, self.const([1], dtype=i64)])
        cols = self.node("Unsqueeze", [pos, self.const([0], dtype=i64)])
        future = self.node("Less", [rows, cols])  # key j > query i
        neg = np.array(np.finfo(self.np_dtype).min, self.np_dtype)
        mask = self.node("Where", [future, self.const(neg), self.const(np.array(0, self.np_dtype))], "causal_mask")
        return out[0], out[1], mask

    def build(self) -> onnx.ModelProto:
        c = self.cfg
        x = self.node("Gather", [self.weight("model.embed_tokens.weight", (c.vocab, c.hidden), fan_in=1), "input_ids"],
                      "embed", axis=0)
        cos, sin, mask = self.tables()
        for i in range(c.layers):
            h = self.rms_norm(x, f"model.layers.{i}.input_layernorm")
            x = self.node("Add", [x, self.attention(h, i, cos, sin, mask)])
            h = self.rms_norm(x, f"model.layers.{i}.post_attention_layernorm")
            x = self.node("Add", [x, self.mlp(h, i)])
        h = self.rms_norm(x, "model.norm")
        self.node("MatMul", [h, self.weight("lm_head.weight", (c.hidden, c.vocab))], "logits")
        graph = helper.make_graph(
            self.nodes, "llama",
            [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
            [helper.make_tensor_value_info("logits", self.elem, ["batch", "sequence", c.vocab])],
            initializer=self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                                 producer_name="onnxprune-make-llama")


def write_weights(b: Builder, data_path: Path) -> None:
    """Fill the external data file through a memmap of one weight at a time, chunk by chunk.

    Each weight's map is flushed and closed before the next, so the dirty pages never add up to
    the model in this process's resident set.
    """
    with open(data_path, "wb") as f:
        f.truncate(max(b.offset, 1))
    for t, shape, fan_in, idx in b.planned:
        offset = int(next(e.value for e in t.external_data if e.key == "offset"))
        n = int(np.prod(shape))
        view = np.memmap(data_path, dtype=b.np_dtype, mode="r+", offset=offset, shape=(n,))
        rng = np.random.default_rng([b.seed, idx])
        scale = np.float32(1.0 / np.sqrt(fan_in))
        for s in range(0, n, CHUNK):
            m = min(CHUNK, n - s)
            view[s : s + m] = rng.standard_normal(m, dtype=np.float32) * scale
        view.flush()
        del view


def make_llama(cfg: Config, out: str | Path, seed: int = 0) -> Path:
    """Write the model to ``out`` (and its weights to ``out.data``); return ``out``."""
    out = Path(out)
    data_name = out.name + ".data"
    b = Builder(cfg, seed, data_name)
    proto = b.build()
    write_weights(b, out.parent / data_name)
    out.write_bytes(proto.SerializeToString())
    return out


def parameters(cfg: Config) -> int:
    """Parameter count of a config (norm scales included)."""
    c = cfg
    d = c.head_dim
    layer = c.hidden * d * (2 * c.heads + 2 * c.kv_heads) + 3 * c.hidden * c.ffn + 2 * c.hidden
    return c.layers * layer + 2 * c.vocab * c.hidden + c.hidden


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("output", help="output .onnx (weights go to OUTPUT.data)")
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument("--dtype", choices=["float32", "float16"], help="override the preset's weight type")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = PRESETS[args.preset]
    if args.layers:
        cfg = replace(cfg, layers=args.layers)
    if args.dtype:
        cfg = replace(cfg, dtype=args.dtype)
    n = parameters(cfg)
    gib = n * np.dtype(cfg.dtype).itemsize / 2**30
    print(f"{args.preset}: {n / 1e9:.3f} B parameters, {cfg.dtype}, ~{gib:.2f} GiB -> {args.output}", file=sys.stderr)
    make_llama(cfg, args.output, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
