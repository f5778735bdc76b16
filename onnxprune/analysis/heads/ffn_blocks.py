"""FFN matcher (engine mixin :class:`FfnStarts`): where a feed-forward neuron stream begins.

An FFN block is up projection -> element-wise activation (optionally times a gate) -> down
projection. Every MatMul/Gemm with a constant 2-D weight starts a candidate stream of ``N``
neurons (its output channels) on the last axis; propagation keeps the neurons whole on the last
axis, and the down projection is the exit. Only candidates that pass an activation become
groups. A com.microsoft ``MatMulNBits`` starts a stream of its ``N`` output rows the same way.
Removing neuron ``u`` equals zeroing row ``u`` of the down projection, since every op on the path
is element-wise per neuron.
"""

from __future__ import annotations

import onnx

from onnxprune.analysis.heads.state import Ann
from onnxprune.analysis.nbits import is_nbits, nbits_of, support_problem
from onnxprune.ir.graph import attr_dict


class FfnStarts:
    """Engine mixin: FFN stream starts."""

    def start_ffn(self, node: onnx.NodeProto) -> None:
        """A MatMul/Gemm with a constant 2-D weight starts an FFN stream on its output."""
        if is_nbits(node):
            self._start_ffn_nbits(node)
            return
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            return
        w = self.const(node.input[1]) if len(node.input) > 1 else None
        if w is None or w.ndim != 2 or self.const(node.input[0]) is not None:
            return
        attrs = attr_dict(node)
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            return
        axis = 0 if node.op_type == "Gemm" and attrs.get("transB", 0) else 1
        out = self.shape(node.output[0])
        if not out:
            return
        n = w.shape[axis]
        if n < 2 or out[-1] != n:
            return
        c = self.new_comp("ffn")
        comp = self.comps[c]
        comp.members.append(f"up {node.name}: {n} neurons")
        comp.params.append((node.input[1], axis, 0, n, "out", "weight"))
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            cb = self.const(node.input[2])
            if cb is None:
                comp.blocked.append(f"Gemm {node.name}: bias is not a constant")
            elif cb.size > 1:
                comp.params.append((node.input[2], cb.ndim - 1, 0, n, "out", "bias"))
        comp.path_nodes.add(node.name)
        self._check_weight_shared(c, node.input[1], node)
        self.set_ann(node.output[0], Ann(len(out) - 1, 1, n, 1, c), node)

    def _start_ffn_nbits(self, node: onnx.NodeProto) -> None:
        """A ``MatMulNBits`` with a constant weight starts a stream of its ``N`` output rows."""
        w = nbits_of(self.model, node)
        out = self.shape(node.output[0])
        if w is None or not out or w.N < 2 or out[-1] != w.N or support_problem(self.model, w):
            return
        c = self.new_comp("ffn")
        comp = self.comps[c]
        comp.members.append(f"up {node.name}: {w.N} neurons ({w.bits}-bit)")
        comp.params.append((w.weight, 0, 0, w.N, "out", "weight"))
        if w.bias:
            comp.params.append((w.bias, 0, 0, w.N, "out", "bias"))
        comp.path_nodes.add(node.name)
        self._check_weight_shared(c, w.weight, node)
        self.set_ann(node.output[0], Ann(len(out) - 1, 1, w.N, 1, c), node)
