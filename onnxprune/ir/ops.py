"""Op vocabularies shared by every per-op rule (channel analysis, head/FFN engine, TensorRT checks).

One list per op family, so the two analyses cannot drift apart:

* :data:`UNARY` — per-element ops with one data input (the output keeps the input's layout);
* :data:`BINARY` — broadcasting element-wise ops with two or more data inputs (``Clip`` is not
  here: its bounds are scalars, it has its own rule);
* :data:`ACTIVATIONS` — non-linearities (a subset of :data:`UNARY` plus contrib fusions); the
  head/FFN engine counts them to tell an FFN from a plain projection chain;
* :data:`REDUCE`, :data:`NORMALIZING` (softmax family), :data:`POOLS`;
* :data:`SHAPE_ONLY` — ops that read only a tensor's shape, never its values;
* :data:`FUSED_ATTENTION_MS` — ``com.microsoft`` fused attention operators.
"""

from __future__ import annotations

UNARY: frozenset[str] = frozenset({
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Softsign", "Gelu", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Sign", "Floor", "Ceil",
    "Round", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Mish",
    "ThresholdedRelu", "Shrink", "Not", "IsNaN", "IsInf", "Cast", "CastLike", "Identity", "Dropout",
    "BitwiseNot", "Swish",
})

BINARY: frozenset[str] = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Mean", "PRelu", "Where", "Equal", "Less",
    "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "BitwiseAnd",
    "BitwiseOr", "BitwiseXor",
})

ACTIVATIONS: frozenset[str] = frozenset({
    "Relu", "Erf", "Tanh", "Sigmoid", "Gelu", "Softplus", "LeakyRelu", "Elu", "Selu", "HardSigmoid",
    "HardSwish", "Mish", "Celu", "FastGelu", "BiasGelu", "QuickGelu",
})

REDUCE: frozenset[str] = frozenset({
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
})

NORMALIZING: frozenset[str] = frozenset({"Softmax", "LogSoftmax", "Hardmax"})

POOLS: tuple[str, ...] = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                          "GlobalLpPool")

SHAPE_ONLY: frozenset[str] = frozenset({"Shape", "Size"})

FUSED_ATTENTION_MS: frozenset[str] = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})
