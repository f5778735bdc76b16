"""Deterministic builder of a small BERT-style transformer encoder test model.

The graph follows what ``torch.onnx`` exports for BERT (no position embeddings)::

    input_ids [batch, seq] -> embeddings.gather (Gather)                      -> x [b, s, H]
    attention_mask [batch, seq] -> mask.unsqueeze (axes 1, 2) -> mask.cast
        -> mask.sub (1 - m) -> mask.mul (* -10000)                            -> [b, 1, 1, s]
    per layer L (prefix ``layerL``):
      attention (prefix ``layerL.attn``), for P in q, k, v:
        P (MatMul x @ P.weight[H, H]) -> P.add (+ P.bias)
        -> P.reshape (shape P.reshape.shape = [0, 0, heads, head_dim])
        -> P.transpose (perm [0, 2, 1, 3]; k uses [0, 2, 3, 1])
        scores (MatMul q @ k) -> scores.div (/ scores.div.scale = sqrt(head_dim))
        -> scores.add_mask -> softmax (axis -1) -> context (MatMul probs @ v)
        -> context.transpose (perm [0, 2, 1, 3])
        -> context.reshape (shape context.reshape.shape = [0, 0, H])
        -> out (MatMul) -> out.add -> residual (Add with the layer input) -> ln
      feed-forward (prefix ``layerL.ffn``):
        up (MatMul [H, F]) -> up.add -> gelu (Erf form: gelu.div, gelu.erf, gelu.add, gelu.mul,
        gelu.mul_half) -> down (MatMul [F, H]) -> down.add -> residual -> ln
    -> last_hidden_state [batch, seq, H]

Naming: node names are the prefixes shown above (e.g. ``layer0.attn.q``, ``layer0.attn.q.add``,
``layer0.ffn.gelu.erf``); a node's initializers are ``<node name>.<role>``, except that the
MatMul ``P`` owns ``P.weight`` ([K, N], applied as ``x @ W``) and ``P.bias`` (added by ``P.add``).
LayerNormalization ``...ln`` owns ``.weight`` and ``.bias``. Every node writes one tensor called
``<node name>.out``, except the last, which writes ``last_hidden_state``.

From opset 17 each ``ln`` is one ``LayerNormalization`` node (axis -1, epsilon 1e-5). Below opset 17
it is decomposed into nodes ``ln.mean`` (ReduceMean), ``ln.sub``, ``ln.pow``, ``ln.var``
(ReduceMean), ``ln.add_eps``, ``ln.sqrt``, ``ln.div``, ``ln.mul`` (* ``ln.weight``) and ``ln.add``
(+ ``ln.bias``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_transformer_block"]

IR_VERSION = 8
MIN_OPSET = 13
LN_EPSILON = 1e-5
MASK_VALUE = -10000.0


class _Graph:
    """Accumulates nodes and initializers with unique names.

    Attributes:
        rng: Random generator all weights are drawn from, in build order.
        opset: ``ai.onnx`` opset version the nodes are written for.
        nodes: Nodes in topological order.
        initializers: Initializers in creation order.
    """

    def __init__(self, seed: int, opset: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate name {name!r}")
        self._names.add(name)
        return name

    def init(self, name: str, value: np.ndarray | float | Sequence[int]) -> str:
        """Add an initializer and return its name.

        Python floats and float arrays are stored as float32, int sequences as int64.
        """
        array = np.asarray(value)
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        elif array.dtype.kind in "iu":
            array = array.astype(np.int64)
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
    def linear(self, x: str, name: str, fan_in: int, fan_out: int, gain: float = 1.0) -> str:
        """Add ``name`` (MatMul with ``name.weight`` [fan_in, fan_out]) and ``name.add`` (bias)."""
        weight = self.rng.standard_normal((fan_in, fan_out)) * np.sqrt(gain / fan_in)
        bias = self.rng.standard_normal(fan_out) * 0.02
        y = self.node("MatMul", [x, self.init(f"{name}.weight", weight)], name)
        return self.node("Add", [y, self.init(f"{name}.bias", bias)], f"{name}.add")

    def layer_norm(self, x: str, name: str, hidden: int, output: str | None = None) -> str:
        """Add a LayerNormalization over the last axis (decomposed below opset 17)."""
        weight = self.init(f"{name}.weight", 1.0 + 0.1 * self.rng.standard_normal(hidden))
        bias = self.init(f"{name}.bias", 0.1 * self.rng.standard_normal(hidden))
        if self.opset >= 17:
            return self.node(
                "LayerNormalization",
                [x, weight, bias],
                name,
                output=output,
                axis=-1,
                epsilon=LN_EPSILON,
            )
        mean = self.node("ReduceMean", [x], f"{name}.mean", axes=[-1], keepdims=1)
        centered = self.node("Sub", [x, mean], f"{name}.sub")
        square = self.node("Pow", [centered, self.init(f"{name}.pow.exponent", 2.0)], f"{name}.pow")
        var = self.node("ReduceMean", [square], f"{name}.var", axes=[-1], keepdims=1)
        eps = self.init(f"{name}.add_eps.epsilon", LN_EPSILON)
        var = self.node("Add", [var, eps], f"{name}.add_eps")
        std = self.node("Sqrt", [var], f"{name}.sqrt")
        normed = self.node("Div", [centered, std], f"{name}.div")
        scaled = self.node("Mul", [normed, weight], f"{name}.mul")
        return self.node("Add", [scaled, bias], f"{name}.add", output=output)

    def attention(self, x: str, mask: str, prefix: str, hidden: int, heads: int) -> str:
        """Add decomposed multi-head self-attention and return its output projection."""
        head_dim = hidden // heads
        projected: dict[str, str] = {}
        for part in ("q", "k", "v"):
            name = f"{prefix}.{part}"
            y = self.linear(x, name, hidden, hidden)
            shape = self.init(f"{name}.reshape.shape", [0, 0, heads, head_dim])
            y = self.node("Reshape", [y, shape], f"{name}.reshape")
            perm = [0, 2, 3, 1] if part == "k" else [0, 2, 1, 3]
            projected[part] = self.node("Transpose", [y], f"{name}.transpose", perm=perm)
        scores = self.node("MatMul", [projected["q"], projected["k"]], f"{prefix}.scores")
        scale = self.init(f"{prefix}.scores.div.scale", float(np.sqrt(head_dim)))
        scores = self.node("Div", [scores, scale], f"{prefix}.scores.div")
        scores = self.node("Add", [scores, mask], f"{prefix}.scores.add_mask")
        probs = self.node("Softmax", [scores], f"{prefix}.softmax", axis=-1)
        context = self.node("MatMul", [probs, projected["v"]], f"{prefix}.context")
        context = self.node(
            "Transpose", [context], f"{prefix}.context.transpose", perm=[0, 2, 1, 3]
        )
        shape = self.init(f"{prefix}.context.reshape.shape", [0, 0, hidden])
        context = self.node("Reshape", [context, shape], f"{prefix}.context.reshape")
        return self.linear(context, f"{prefix}.out", hidden, hidden)

    def gelu(self, x: str, prefix: str) -> str:
        """Add the Erf form of GELU, ``x * 0.5 * (1 + erf(x / sqrt(2)))``, as torch exports it."""
        sqrt2 = self.init(f"{prefix}.div.sqrt2", float(np.sqrt(2.0)))
        y = self.node("Div", [x, sqrt2], f"{prefix}.div")
        y = self.node("Erf", [y], f"{prefix}.erf")
        y = self.node("Add", [y, self.init(f"{prefix}.add.one", 1.0)], f"{prefix}.add")
        y = self.node("Mul", [x, y], f"{prefix}.mul")
        half = self.init(f"{prefix}.mul_half.half", 0.5)
        return self.node("Mul", [y, half], f"{prefix}.mul_half")

    def additive_mask(self, attention_mask: str) -> str:
        """Turn an int64 [b, s] 0/1 mask into an additive float [b, 1, 1, s] mask."""
        axes = self.init("mask.unsqueeze.axes", [1, 2])
        m = self.node("Unsqueeze", [attention_mask, axes], "mask.unsqueeze")
        m = self.node("Cast", [m], "mask.cast", to=TensorProto.FLOAT)
        m = self.node("Sub", [self.init("mask.sub.one", 1.0), m], "mask.sub")
        return self.node("Mul", [m, self.init("mask.mul.value", MASK_VALUE)], "mask.mul")


def build_transformer_block(
    seed: int = 0,
    hidden: int = 64,
    heads: int = 4,
    ffn: int = 128,
    vocab: int = 100,
    layers: int = 1,
    opset: int = 17,
) -> onnx.ModelProto:
    """Build a BERT-style encoder with decomposed multi-head attention.

    See the module docstring for the exact node sequence and naming.

    Args:
        seed: Seed of ``numpy.random.default_rng`` that draws the weights.
        hidden: Model width ``H``.
        heads: Attention heads; must divide ``hidden``.
        ffn: Feed-forward inner width ``F``.
        vocab: Rows of the embedding table; ``input_ids`` must lie in ``[0, vocab)``.
        layers: Number of encoder layers.
        opset: ``ai.onnx`` opset version (>= 13); below 17 LayerNormalization is decomposed.

    Returns:
        The model: inputs ``input_ids`` and ``attention_mask`` (int64 [batch, seq]; mask 1 =
        attend, 0 = padding), output ``last_hidden_state`` float32 [batch, seq, hidden].

    Raises:
        ValueError: If ``heads`` does not divide ``hidden``, ``layers`` < 1 or ``opset`` < 13.
    """
    if hidden % heads:
        raise ValueError(f"heads ({heads}) must divide hidden ({hidden})")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    g = _Graph(seed, opset)
    table = g.init("embeddings.word_embeddings.weight", g.rng.standard_normal((vocab, hidden)))
    x = g.node("Gather", [table, "input_ids"], "embeddings.gather", axis=0)
    mask = g.additive_mask("attention_mask")
    for layer in range(layers):
        last = layer == layers - 1
        attn = f"layer{layer}.attn"
        y = g.attention(x, mask, attn, hidden, heads)
        y = g.node("Add", [y, x], f"{attn}.residual")
        x = g.layer_norm(y, f"{attn}.ln", hidden)
        ff = f"layer{layer}.ffn"
        y = g.linear(x, f"{ff}.up", hidden, ffn, gain=2.0)
        y = g.gelu(y, f"{ff}.gelu")
        y = g.linear(y, f"{ff}.down", ffn, hidden)
        y = g.node("Add", [y, x], f"{ff}.residual")
        x = g.layer_norm(y, f"{ff}.ln", hidden, output="last_hidden_state" if last else None)

    graph = helper.make_graph(
        g.nodes,
        "transformer_block",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info(
                "last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden]
            )
        ],
        initializer=g.initializers,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=IR_VERSION,
        producer_name="onnxprune.models",
    )
