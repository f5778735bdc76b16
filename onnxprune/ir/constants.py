"""``Constant`` nodes: their values, and turning them into initializers.

Some exporters (Paddle2ONNX, older tf2onnx) store every weight as a ``Constant`` node instead of
an initializer. A ``Constant`` node with one ``value`` (tensor), ``value_float(s)`` or
``value_int(s)`` attribute computes exactly its attribute, so replacing the node by an
initializer of the same name, type and bytes changes nothing ONNX Runtime computes.

Preconditions: names are unique (the loader checks). Only main-graph nodes of the default domain
are touched; a Constant whose output is a graph output stays a node (an initializer cannot be one
portably), and so does a ``sparse_value`` or ``value_string(s)`` Constant.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.ir.graph import replace_nodes
from onnxprune.ir.model import Model

_DEFAULT_DOMAINS = ("", "ai.onnx")


def is_constant_node(node: onnx.NodeProto) -> bool:
    """True for a default-domain ``Constant`` node with one output."""
    return node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and len(node.output) == 1


def constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The value of a ``Constant`` node as a tensor (bytes kept as they are), or None.

    None for ``sparse_value``, strings, or anything that is not a ``Constant``.
    """
    if not is_constant_node(node) or len(node.attribute) != 1:
        return None
    a = node.attribute[0]
    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
        if a.t.data_type == onnx.TensorProto.STRING:
            return None
        t = onnx.TensorProto()
        t.CopyFrom(a.t)
        t.name = node.output[0]
        return t
    arr = None
    if a.name == "value_ints":
        arr = np.asarray(list(a.ints), dtype=np.int64)
    elif a.name == "value_int":
        arr = np.asarray(a.i, dtype=np.int64)
    elif a.name == "value_floats":
        arr = np.asarray(list(a.floats), dtype=np.float32)
    elif a.name == "value_float":
        arr = np.asarray(a.f, dtype=np.float32)
    return None if arr is None else numpy_helper.from_array(arr, node.output[0])


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node as an array, or None (see :func:`constant_tensor`)."""
    t = constant_tensor(node)
    return None if t is None else numpy_helper.to_array(t)


def hoist_constants(model: Model, outputs: Collection[str] | None = None) -> list[str]:
    """Replace ``Constant`` nodes by initializers of the same name, in place.

    Args:
        model: The model (main graph only).
        outputs: Only the Constants producing these tensors; None for all.

    Returns:
        The names of the tensors that became initializers, in graph order.
    """
    graph = model.graph
    graph_outputs = {o.name for o in graph.output}
    wanted = None if outputs is None else set(outputs)
    taken = {t.name for t in graph.initializer}
    hoisted: list[str] = []
    keep: list[onnx.NodeProto] = []
    for node in graph.node:
        name = node.output[0] if is_constant_node(node) else None
        if name and name not in graph_outputs and (wanted is None or name in wanted) \
                and name not in taken:
            t = constant_tensor(node)
            if t is not None:
                graph.initializer.append(t)
                hoisted.append(name)
                continue
        keep.append(node)
    if hoisted:
        replace_nodes(graph, keep)
    return hoisted
