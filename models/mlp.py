"""Deterministic builder of a small multi-layer perceptron test model.

Graph (``hidden=(64, 48)``)::

    input [batch, in_features]
      -> fc0 (Gemm, transB=1) -> fc0.relu
      -> fc1 (Gemm, transB=1) -> fc1.relu
      -> classifier (Gemm, transB=1) -> logits [batch, out_features]

Naming: the Gemm node ``fcN`` owns ``fcN.weight`` ([out, in], torch ``nn.Linear`` layout) and
``fcN.bias``; its Relu is ``fcN.relu``. Every node writes one tensor called ``<node name>.out``,
except the last one, which writes the graph output ``logits``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_mlp"]

IR_VERSION = 8


def _gemm(
    rng: np.random.Generator,
    x: str,
    name: str,
    fan_in: int,
    fan_out: int,
    gain: float,
    out: str | None = None,
) -> tuple[onnx.NodeProto, list[onnx.TensorProto], str]:
    """Make a ``Gemm(transB=1)`` node with random weight and bias.

    Args:
        rng: Random generator the weights are drawn from.
        x: Name of the input tensor.
        name: Node name; the initializers are ``<name>.weight`` and ``<name>.bias``.
        fan_in: Input features.
        fan_out: Output features.
        gain: Variance gain (2 for He scaling before a Relu, 1 for Xavier-like scaling).
        out: Output tensor name (default ``<name>.out``).

    Returns:
        The node, its initializers and the name of its output tensor.
    """
    weight = rng.standard_normal((fan_out, fan_in)) * np.sqrt(gain / fan_in)
    bias = rng.standard_normal(fan_out) * 0.05
    inits = [
        numpy_helper.from_array(weight.astype(np.float32), f"{name}.weight"),
        numpy_helper.from_array(bias.astype(np.float32), f"{name}.bias"),
    ]
    out = out or f"{name}.out"
    node = helper.make_node(
        "Gemm", [x, f"{name}.weight", f"{name}.bias"], [out], name=name, transB=1
    )
    return node, inits, out


def build_mlp(
    seed: int = 0,
    in_features: int = 32,
    hidden: Sequence[int] = (64, 48),
    out_features: int = 10,
    opset: int = 17,
) -> onnx.ModelProto:
    """Build a Gemm + Relu multi-layer perceptron.

    Args:
        seed: Seed of ``numpy.random.default_rng`` that draws the weights.
        in_features: Width of the input.
        hidden: Widths of the hidden layers (one ``Gemm`` + ``Relu`` each).
        out_features: Width of the output ``logits``.
        opset: ``ai.onnx`` opset version of the model.

    Returns:
        The model: input ``input`` float32 [batch, in_features], output ``logits`` float32
        [batch, out_features].
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x, width = "input", in_features
    for i, h in enumerate(hidden):
        node, tensors, x = _gemm(rng, x, f"fc{i}", width, h, gain=2.0)
        nodes.append(node)
        inits += tensors
        relu = f"fc{i}.relu"
        nodes.append(helper.make_node("Relu", [x], [f"{relu}.out"], name=relu))
        x, width = f"{relu}.out", h
    node, tensors, _ = _gemm(rng, x, "classifier", width, out_features, gain=1.0, out="logits")
    nodes.append(node)
    inits += tensors

    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", out_features])],
        initializer=inits,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=IR_VERSION,
        producer_name="onnxprune.models",
    )
