"""Deterministic builders of small convolutional test models.

:func:`build_cnn` (defaults: ``width=16``, 3x16x16 input, about 14k parameters)::

    input [batch, 3, S, S]
      stem      : stem.conv (3x3, no bias) -> stem.bn -> stem.relu                  [W,   S]
      block1    : block1.conv1 -> block1.bn1 -> block1.relu1
                  -> block1.conv2 -> block1.bn2 -> block1.add (+ stem.relu) -> block1.relu
      pool1     : MaxPool 2x2/2                                                     [W,   S/2]
      branches  : branch_a.conv (1x1) -> branch_a.relu
                  branch_b.conv (3x3) -> branch_b.relu
                  concat (axis=1) of both branches                                  [2W,  S/2]
      depthwise : dw.conv (3x3, group=2W) -> dw.bn -> dw.relu
      pointwise : pw.conv (1x1) -> pw.bn -> pw.relu
      grouped   : gconv.conv (3x3, group=2) -> gconv.relu
      head      : gap (GlobalAveragePool) -> flatten (Flatten) -> classifier (Gemm) -> logits

:func:`build_demo_model` is the same network with ``width=32`` on a 3x32x32 input plus a second
stage (``pool2`` MaxPool and a ``block2`` residual block at 64 channels); it is the model bundled
as ``onnxprune/data/demo_cnn.onnx``.

Naming: parametric nodes own initializers named ``<node name>.<role>`` -- Conv: ``.weight``
([out, in/group, k, k]) and, for convs not followed by BatchNormalization, ``.bias``;
BatchNormalization: ``.weight`` (scale), ``.bias``, ``.running_mean``, ``.running_var``; Gemm
(``transB=1``): ``.weight`` ([out, in]) and ``.bias``. Every node writes one tensor called
``<node name>.out``, except ``classifier``, which writes the graph output ``logits``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_cnn", "build_demo_model"]

IR_VERSION = 8


class _Graph:
    """Accumulates nodes and initializers with unique names.

    Attributes:
        rng: Random generator all weights are drawn from, in build order.
        nodes: Nodes in topological order.
        initializers: Initializers in creation order.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate name {name!r}")
        self._names.add(name)
        return name

    def init(self, name: str, value: np.ndarray) -> str:
        """Add an initializer (float arrays are stored as float32) and return its name."""
        array = np.asarray(value)
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        self.initializers.append(numpy_helper.from_array(array, self._claim(name)))
        return name

    def node(
        self,
        op: str,
        inputs: Sequence[str],
        name: str,
        output: str | None = None,
        **attrs: object,
    ) -> str:
        """Add a node with one output and return the output's name.

        Args:
            op: Operator type.
            inputs: Input tensor names.
            name: Node name.
            output: Output tensor name (default ``<name>.out``).
            **attrs: Node attributes.
        """
        out = self._claim(output or f"{name}.out")
        node = helper.make_node(op, list(inputs), [out], name=self._claim(name), **attrs)
        self.nodes.append(node)
        return out

    # ------------------------------------------------------------------ layers
    def conv(
        self,
        x: str,
        name: str,
        cin: int,
        cout: int,
        k: int,
        *,
        group: int = 1,
        bias: bool = True,
    ) -> str:
        """Add a same-padded, stride-1 Conv with fan-in scaled (LeCun) weights."""
        fan_in = cin // group * k * k
        weight = self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(1.0 / fan_in)
        inputs = [x, self.init(f"{name}.weight", weight)]
        if bias:
            inputs.append(self.init(f"{name}.bias", self.rng.standard_normal(cout) * 0.05))
        pad = k // 2
        return self.node(
            "Conv",
            inputs,
            name,
            kernel_shape=[k, k],
            pads=[pad, pad, pad, pad],
            strides=[1, 1],
            group=group,
        )

    def bn(self, x: str, name: str, channels: int) -> str:
        """Add an inference-mode BatchNormalization with random statistics."""
        rng = self.rng
        scale = self.init(f"{name}.weight", rng.uniform(0.5, 1.5, channels))
        bias = self.init(f"{name}.bias", rng.standard_normal(channels) * 0.1)
        mean = self.init(f"{name}.running_mean", rng.standard_normal(channels) * 0.1)
        var = self.init(f"{name}.running_var", rng.uniform(0.5, 1.5, channels))
        return self.node("BatchNormalization", [x, scale, bias, mean, var], name, epsilon=1e-5)

    def conv_bn_relu(
        self, x: str, prefix: str, cin: int, cout: int, k: int, *, group: int = 1
    ) -> str:
        """Add ``<prefix>.conv`` (no bias) -> ``<prefix>.bn`` -> ``<prefix>.relu``."""
        y = self.conv(x, f"{prefix}.conv", cin, cout, k, group=group, bias=False)
        y = self.bn(y, f"{prefix}.bn", cout)
        return self.node("Relu", [y], f"{prefix}.relu")

    def residual(self, x: str, prefix: str, channels: int) -> str:
        """Add a ResNet basic block: two 3x3 Conv+BN, Add with the block input, Relu."""
        y = self.conv(x, f"{prefix}.conv1", channels, channels, 3, bias=False)
        y = self.bn(y, f"{prefix}.bn1", channels)
        y = self.node("Relu", [y], f"{prefix}.relu1")
        y = self.conv(y, f"{prefix}.conv2", channels, channels, 3, bias=False)
        y = self.bn(y, f"{prefix}.bn2", channels)
        y = self.node("Add", [y, x], f"{prefix}.add")
        return self.node("Relu", [y], f"{prefix}.relu")

    def maxpool(self, x: str, name: str) -> str:
        """Add a 2x2, stride-2 MaxPool."""
        return self.node("MaxPool", [x], name, kernel_shape=[2, 2], strides=[2, 2])

    def model(
        self,
        graph_name: str,
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
        opset: int,
    ) -> onnx.ModelProto:
        """Wrap the accumulated nodes into an IR-8 model."""
        graph = helper.make_graph(
            self.nodes, graph_name, inputs, outputs, initializer=self.initializers
        )
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            ir_version=IR_VERSION,
            producer_name="onnxprune.models",
        )


def _build(
    graph_name: str,
    seed: int,
    in_ch: int,
    size: int,
    num_classes: int,
    width: int,
    second_stage: bool,
    opset: int,
) -> onnx.ModelProto:
    """Build the network described in the module docstring."""
    g = _Graph(seed)
    x = g.conv_bn_relu("input", "stem", in_ch, width, 3)
    x = g.residual(x, "block1", width)
    x = g.maxpool(x, "pool1")

    a = g.conv(x, "branch_a.conv", width, width, 1)
    a = g.node("Relu", [a], "branch_a.relu")
    b = g.conv(x, "branch_b.conv", width, width, 3)
    b = g.node("Relu", [b], "branch_b.relu")
    x = g.node("Concat", [a, b], "concat", axis=1)
    channels = 2 * width

    x = g.conv_bn_relu(x, "dw", channels, channels, 3, group=channels)
    x = g.conv_bn_relu(x, "pw", channels, channels, 1)
    x = g.conv(x, "gconv.conv", channels, channels, 3, group=2)
    x = g.node("Relu", [x], "gconv.relu")
    if second_stage:
        x = g.maxpool(x, "pool2")
        x = g.residual(x, "block2", channels)

    x = g.node("GlobalAveragePool", [x], "gap")
    x = g.node("Flatten", [x], "flatten", axis=1)
    weight = g.rng.standard_normal((num_classes, channels)) * np.sqrt(1.0 / channels)
    g.node(
        "Gemm",
        [
            x,
            g.init("classifier.weight", weight),
            g.init("classifier.bias", g.rng.standard_normal(num_classes) * 0.05),
        ],
        "classifier",
        output="logits",
        transB=1,
    )
    return g.model(
        graph_name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_ch, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        opset,
    )


def build_cnn(
    seed: int = 0,
    in_ch: int = 3,
    size: int = 16,
    num_classes: int = 10,
    width: int = 16,
    opset: int = 17,
) -> onnx.ModelProto:
    """Build a small CNN covering the structures channel pruning must handle.

    It contains a Conv+BN+Relu stem, a residual block, a channel Concat of two conv branches, a
    depthwise conv (``group == channels``) followed by a pointwise conv, a grouped conv
    (``group=2``), MaxPool, GlobalAveragePool and a Flatten + Gemm classifier.

    Args:
        seed: Seed of ``numpy.random.default_rng`` that draws the weights.
        in_ch: Input channels.
        size: Input height and width (at least 2).
        num_classes: Width of the output ``logits``.
        width: Channels of the stem and of each concat branch (the concat has ``2 * width``).
        opset: ``ai.onnx`` opset version of the model.

    Returns:
        The model: input ``input`` float32 [batch, in_ch, size, size], output ``logits`` float32
        [batch, num_classes].
    """
    return _build("cnn", seed, in_ch, size, num_classes, width, False, opset)


def build_demo_model(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Build the bundled demo CNN (3x32x32 input, channels up to 64, about 130k parameters).

    Same structure as :func:`build_cnn` with ``width=32``, plus a second stage (``pool2``
    MaxPool and a ``block2`` residual block at 64 channels) before the classifier.

    Args:
        seed: Seed of ``numpy.random.default_rng`` that draws the weights.
        opset: ``ai.onnx`` opset version of the model.

    Returns:
        The model: input ``input`` float32 [batch, 3, 32, 32], output ``logits`` float32
        [batch, 10].
    """
    return _build("demo_cnn", seed, 3, 32, 10, 32, True, opset)
