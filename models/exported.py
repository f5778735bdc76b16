"""Exporter-style names on the builder models: what ``torch.onnx`` makes of a module's names.

``torch.onnx.export`` names nodes after the module path of a Hugging Face BERT
(``/encoder/layer.0/intermediate/dense/MatMul``) but the weights of ``MatMul`` after nothing
(``onnx::MatMul_368``). :func:`exporter_names` renames a builder transformer that way: node
``layerL.<part>.<rest>`` becomes ``/encoder/layer.L/<BERT module of part>/<rest>/<OpType>`` (parts
in :data:`BERT_MODULES`: ``attn.q`` -> ``attention/self/query``, ``ffn.up`` ->
``intermediate/dense``, ``ffn.down`` -> ``output/dense``...), other nodes ``/<name with / for .>/<OpType>``;
every MatMul weight initializer becomes ``onnx::MatMul_<n>`` with ``n`` counting from 300 in
graph order. Graph inputs, outputs, other initializers and the computation stay as they are, so
the renamed model computes exactly what the original does.
"""

from __future__ import annotations

import re

import onnx

__all__ = ["BERT_MODULES", "exporter_names"]

#: Builder name part -> the Hugging Face BERT module path torch.onnx names its nodes after.
BERT_MODULES = {
    "attn.q": "attention/self/query", "attn.k": "attention/self/key", "attn.v": "attention/self/value",
    "attn.out": "attention/output/dense", "attn.ln": "attention/output/LayerNorm",
    "attn": "attention/self", "ffn.up": "intermediate/dense", "ffn.gelu": "intermediate/intermediate_act_fn",
    "ffn.down": "output/dense", "ffn.ln": "output/LayerNorm",
}


def _module_path(rest: str) -> str:
    for part in sorted(BERT_MODULES, key=len, reverse=True):
        if rest == part or rest.startswith(part + "."):
            return BERT_MODULES[part] + rest[len(part):].replace(".", "/")
    return rest.replace(".", "/")


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
        path = f"/encoder/layer.{mt.group(1)}/{_module_path(mt.group(2))}" if mt else f"/{node.name.replace('.', '/')}"
        node.name = f"{path}/{node.op_type}"
    for t in g.initializer:
        t.name = rename.get(t.name, t.name)
    for node in g.node:
        for i, x in enumerate(node.input):
            if x in rename:
                node.input[i] = rename[x]
    return m
