"""Ops that ONNX Runtime registers in the ai.onnx domain although the ONNX standard has no such op.

ONNX Runtime GenAI's model builder writes ``SimplifiedLayerNormalization`` (RMS norm) in the
default domain, where ONNX Runtime implements it; ``onnx.checker`` rejects it there ("No Op
registered"). :func:`checkable` gives the checker a copy in which those nodes sit in
``com.microsoft`` (a domain the checker does not validate), so such models load and verify; the
model itself is never changed.
"""

from __future__ import annotations

import onnx

#: ai.onnx-domain op types that only ONNX Runtime defines.
ORT_ONNX_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def checkable(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` itself, or (when it uses :data:`ORT_ONNX_DOMAIN_OPS`) a copy the checker accepts."""
    if not any(n.op_type in ORT_ONNX_DOMAIN_OPS and n.domain in ("", "ai.onnx") for n in proto.graph.node):
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for n in out.graph.node:
        if n.op_type in ORT_ONNX_DOMAIN_OPS and n.domain in ("", "ai.onnx"):
            n.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return out


__all__ = ["ORT_ONNX_DOMAIN_OPS", "checkable"]
