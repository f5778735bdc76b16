"""Exporter-style names on the builder models: what ``torch.onnx`` makes of a module's names.

``torch.onnx.export`` names nodes after the module path (``/encoder/layer.0/ffn/up/MatMul``) but
the weights of ``MatMul`` after nothing (``onnx::MatMul_368``). :func:`exporter_names` renames a
builder model that way (nodes ``layerL.a.b`` -> ``/encoder/layer.L/a/b/<OpType>``; every MatMul
weight initializer -> ``onnx::MatMul_<n>`` with ``n`` counting from 300 in graph order); graph
inputs, outputs, other initializers and the computation stay as they are, so the renamed model
computes exactly what the original does.
"""

from __future__ import annotations

import re

import onnx

__all__ = ["exporter_names"]


def exporter_names(proto: onnx.ModelProto, first: int = 300) -> onnx.ModelProto:
    """A copy of ``proto`` with torch-exporter node and weight names (module docstring)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    inits = {t.name for t in g.initializer}
    rename: dict[str, str] = {}
    for node in g.node:
        if node.op_type == "MatMul":
            for x in node.input:
                if x in inits and x not in rename:
                    rename[x] = f"onnx::MatMul_{first + len(rename)}"
        mt = re.match(r"layer(\d+)\.(.*)", node.name)
        path = f"/encoder/layer.{mt.group(1)}/{mt.group(2).replace('.', '/')}" if mt else f"/{node.name.replace('.', '/')}"
        node.name = f"{path}/{node.op_type}"
    for t in g.initializer:
        t.name = rename.get(t.name, t.name)
    for node in g.node:
        for i, x in enumerate(node.input):
            if x in rename:
                node.input[i] = rename[x]
    return m
