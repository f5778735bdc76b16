"""Rules for fused attention operators, mixed into the engine (:class:`FusedAttentionRules`).

Handles ``com.microsoft`` ``Attention`` (packed QKV weight, ``num_heads``,
``qkv_hidden_sizes``), ``MultiHeadAttention`` and ``GroupQueryAttention`` (3-D Q/K/V,
``num_heads`` / ``kv_num_heads``), and ai.onnx opset-23 ``Attention``: 3-D inputs with
``q_num_heads`` / ``kv_num_heads`` start a block at the node (:meth:`fused`), 4-D inputs carrying
heads on axis 1 are met by propagation (:meth:`attention23_4d`).

``GroupQueryAttention`` also takes a packed ``[B, S, (Hq + 2 Hkv) D]`` query (key and value
empty: three head-aligned pieces of one projection) and a KV cache: past key/value graph inputs
and present graph outputs ``[B, Hkv, T, D]`` shrink on axis 1 with the KV heads (an I/O rewrite of
the group, :class:`~onnxprune.analysis.removal.IOSlice`); a cache that is not a graph input/output
blocks.

Preconditions: query heads are a multiple of KV heads (query head ``i`` reads KV head
``i // (Hq / Hkv)``), so removing one KV head and its ``Hq / Hkv`` query heads is exact; masks
and attention biases must not vary per head; other ops' past/present key/value state must be
unused.
The methods rely on the engine's helpers (``_need``, ``const``, ``comp``, ``set_ann`` ...).
"""

from __future__ import annotations

from typing import Any

import onnx

from onnxprune.analysis.heads.state import Ann, Blocked
from onnxprune.analysis.kvcache import declared_dims
from onnxprune.ir.graph import attr_dict


class FusedAttentionRules:
    """Engine mixin: fused attention operators as attention blocks."""

    def attention23_4d(self, node: onnx.NodeProto, annotated: list[tuple[int, Ann]], c: int) -> None:
        by_k = dict(annotated)
        self.comp(c).cores += 1  # an attention block, prunable or not: report it
        if self.mode != "heads" or set(by_k) != {0, 1, 2}:
            raise Blocked("only Q, K and V may carry heads")
        for k, a in by_k.items():
            if len(self.need_shape(node.input[k])) != 4 or a.axis != 1 or a.o != 1:
                raise Blocked("4-D Attention inputs must carry the heads on axis 1")
        self._check_attention23_extras(node)
        if any(o and (self.consumers.get(o) or o in self.outputs) for o in node.output[1:]):
            raise Blocked("present key/value outputs are used")
        q = by_k[0]
        q_len = q.n * q.b
        fine = q
        for a in (by_k[1], by_k[2]):
            kv_len = a.n * a.b
            if q_len % kv_len:  # the op maps query head i to KV head i // (q_len / kv_len)
                raise Blocked("query heads are not a multiple of the KV heads")
            if max(q.n, a.n) % min(q.n, a.n):
                raise Blocked(f"head factors disagree ({q.n} vs {a.n})")
            if a.n > fine.n:
                fine = Ann(1, 1, a.n, a.b * (q_len // kv_len), c)
        self.emit(node, fine, c)

    def _check_attention23_extras(self, node: onnx.NodeProto) -> None:
        """ai.onnx Attention: the mask must not vary per head, and no past key/value state."""
        if len(node.input) > 3 and node.input[3]:
            m = self.need_shape(node.input[3])
            if len(m) == 4 and m[1] != 1:
                raise Blocked("the attention mask varies per head")
        if any(x for x in node.input[4:6]):
            raise Blocked("past key/value inputs carry heads")

    def _gqa_cache(self, node: onnx.NodeProto, hkv: int, c: int) -> None:
        """GroupQueryAttention's past (inputs 3, 4) and present (outputs 1, 2) key/value caches.

        Each must be a graph input / graph output (or absent / unused) declaring ``kv_num_heads``
        on axis 1 (BNSH): then removing KV heads shrinks that axis, recorded as an I/O rewrite.
        Anything else (a cache computed inside the graph, a present read by another node) blocks.
        """
        comp = self.comp(c)
        for slot in (3, 4):
            name = node.input[slot] if len(node.input) > slot else ""
            if not name:
                continue
            if name not in self.graph_inputs or name in self.inits:
                raise Blocked(f"past key/value {name!r} is not a graph input, so it cannot shrink with the heads")
            others = [n for n in self.consumers.get(name, []) if n.name != node.name]
            if others:
                raise Blocked(f"past key/value {name!r} is also read by {others[0].op_type} {others[0].name!r}")
            self._cache_axis(name, hkv, "input")
            comp.io.append((name, 1, hkv, "input"))
        for slot in (1, 2):
            name = node.output[slot] if len(node.output) > slot else ""
            if not name:
                continue
            users = self.consumers.get(name, [])
            if users:
                raise Blocked(f"present key/value {name!r} is read by {users[0].op_type} {users[0].name!r}")
            if name in self.outputs:
                self._cache_axis(name, hkv, "output")
                comp.io.append((name, 1, hkv, "output"))

    def _cache_axis(self, name: str, hkv: int, kind: str) -> None:
        dims = declared_dims(self.model, name)
        if dims is None:
            return  # no declared shape: nothing to rewrite
        if len(dims) != 4 or dims[1] != hkv:
            raise Blocked(f"{kind} {name!r} declares {dims}, not [batch, {hkv} KV heads, sequence, head_size]")

    def fused(self, node: onnx.NodeProto) -> None:
        """Fused attention with packed/3-D inputs: streams come in, heads go out on output 0."""
        dom, op = node.domain, node.op_type
        attrs = attr_dict(node)
        ms = dom == "com.microsoft"
        if not ms and not (dom in ("", "ai.onnx") and op == "Attention"):
            return
        c = self.new_comp("heads")
        comp = self.comps[c]
        comp.path_nodes.add(node.name)
        comp.members.append(f"fused {dom or 'ai.onnx'}.{op} {node.name}")
        comp.cores += 1
        try:
            self._fused(node, attrs, ms, c)
        except Blocked as exc:
            comp.blocked.append(f"{op} {node.name!r}: {exc}")

    def _fused(self, node: onnx.NodeProto, attrs: dict[str, Any], ms: bool, c: int) -> None:
        comp = self.comp(c)
        op = node.op_type
        out = self.need_shape(node.output[0])
        if op != "GroupQueryAttention" and any(o and (self.consumers.get(o) or o in self.outputs)
                                               for o in node.output[1:]):
            raise Blocked("present key/value outputs are used")
        if ms and op == "Attention":
            hq = int(attrs["num_heads"])
            w = self.const(node.input[1])
            if w is None or w.ndim != 2:
                raise Blocked("packed weights are not a constant 2-D initializer")
            sizes = list(attrs.get("qkv_hidden_sizes") or [w.shape[1] // 3] * 3)
            if sum(sizes) != w.shape[1] or any(s % hq for s in sizes):
                raise Blocked("qkv_hidden_sizes do not match the packed weight")
            if len(node.input) > 4 and node.input[4]:
                raise Blocked("past state input carries heads")
            self._check_weight_shared(c, node.input[1], node)
            off = 0
            for s in sizes:
                comp.params.append((node.input[1], 1, off, s, "out", "weight"))
                if len(node.input) > 2 and node.input[2]:
                    if self.const(node.input[2]) is None:
                        raise Blocked("packed bias is not constant")
                    comp.params.append((node.input[2], 0, off, s, "out", "bias"))
                off += s
            comp.attr_edits.append((node.name, "num_heads", hq))
            if "qkv_hidden_sizes" in attrs:
                for k, s in enumerate(sizes):
                    comp.attr_edits.append((node.name, f"qkv_hidden_sizes[{k}]", s))
            comp.ns.add(hq)
            self.set_ann(node.output[0], Ann(len(out) - 1, 1, hq, out[-1] // hq, c), node)
            return
        if op == "MultiHeadAttention":
            hq = hkv = int(attrs["num_heads"])
            q, k, v = (node.input[i] if len(node.input) > i else "" for i in range(3))
            if not k or not v or len(self.need_shape(q)) != 3 or len(self.need_shape(k)) != 3 or len(self.need_shape(v)) != 3:
                raise Blocked("only separate 3-D query/key/value inputs are supported")
            bias = node.input[3] if len(node.input) > 3 else ""
            if bias:
                if self.const(bias) is None:
                    raise Blocked("packed bias is not constant")
                sq, sk = self.need_shape(q)[-1], self.need_shape(k)[-1]
                sv = self.need_shape(v)[-1]
                for off, s in ((0, sq), (sq, sk), (sq + sk, sv)):
                    comp.params.append((bias, 0, off, s, "out", "bias"))
            if len(node.input) > 5 and node.input[5]:
                ab = self.need_shape(node.input[5])
                if len(ab) == 4 and ab[1] != 1:
                    raise Blocked("attention_bias varies per head")
            if any(x for x in node.input[6:8]):
                raise Blocked("past key/value inputs carry heads")
            comp.attr_edits.append((node.name, "num_heads", hq))
        elif op == "GroupQueryAttention":
            hq, hkv = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
            q, k, v = (node.input[i] if len(node.input) > i else "" for i in range(3))
            if bool(k) != bool(v):
                raise Blocked("only one of key and value is given")
            if hkv < 1 or hq % hkv:
                raise Blocked("query heads are not a multiple of the KV heads")
            self._gqa_cache(node, hkv, c)
            if len(node.input) > 10 and node.input[10]:
                raise Blocked("attention_bias input (it may vary per head)")
            if len(node.input) > 11 and node.input[11]:
                raise Blocked("head_sink input (one value per head)")
            if any(x for x in node.input[12:14]):
                raise Blocked("k_scale/v_scale inputs (a quantised KV cache)")
            if len(node.output) > 3 and node.output[3] and (self.consumers.get(node.output[3])
                                                             or node.output[3] in self.outputs):
                raise Blocked("output_qk (per-head scores) is used")
            # with do_rotary, the cos/sin caches are per position and head_dim: shared by all heads
            comp.attr_edits.append((node.name, "num_heads", hq))
            comp.attr_edits.append((node.name, "kv_num_heads", hkv))
            if not k:  # packed [B, S, (Hq + 2 Hkv) D]: one tensor, three head-aligned pieces
                total = self.need_shape(q)[-1]
                if total % (hq + 2 * hkv):
                    raise Blocked(f"packed QKV width {total} is not (num_heads + 2 kv_num_heads) x head_size")
                d = total // (hq + 2 * hkv)
                for off, length in ((0, hq * d), (hq * d, hkv * d), ((hq + hkv) * d, hkv * d)):
                    comp.streams.append((q, off, length, node.name))
                comp.members.append(f"packed QKV {q!r}: {hq}+{hkv}+{hkv} heads x {d}")
                comp.ns |= {hq, hkv}
                self.set_ann(node.output[0], Ann(len(out) - 1, 1, hq, out[-1] // hq, c), node)
                return
        else:  # ai.onnx Attention with 3-D inputs
            q, k, v = node.input[0], node.input[1], node.input[2]
            if len(self.need_shape(q)) != 3:
                return  # 4-D form: handled by propagation (attention23_4d)
            hq, hkv = int(attrs.get("q_num_heads", 0)), int(attrs.get("kv_num_heads", 0))
            if not hq or not hkv:
                raise Blocked("3-D Attention without q_num_heads/kv_num_heads")
            self._check_attention23_extras(node)
            comp.attr_edits.append((node.name, "q_num_heads", hq))
            comp.attr_edits.append((node.name, "kv_num_heads", hkv))
        if hq % hkv:
            raise Blocked("query heads are not a multiple of the KV heads")
        for name, heads in ((q, hq), (k, hkv), (v, hkv)):
            length = self.need_shape(name)[-1]
            if length % heads:
                raise Blocked(f"input {name!r} width {length} is not a multiple of {heads} heads")
            comp.streams.append((name, 0, length, node.name))
        comp.ns |= {hq, hkv}
        self.set_ann(node.output[0], Ann(len(out) - 1, 1, hq, out[-1] // hq, c), node)
