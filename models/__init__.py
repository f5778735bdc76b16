"""Deterministic builders of small ONNX test models (no torch needed).

Every builder takes ``seed`` (for ``numpy.random.default_rng``), size keyword arguments with small
defaults and ``opset`` (default 17), and returns an IR-version-8 ``onnx.ModelProto`` that passes
``onnx.checker.check_model(full_check=True)`` and runs on ONNX Runtime's CPU provider. The same
arguments always give byte-identical models. Graph inputs have a dynamic ``batch`` dimension (and
``seq`` for the transformer).

Builders:
    * :func:`build_mlp` -- Gemm + Relu layers (``input`` -> ``logits``).
    * :func:`build_cnn` -- stem, residual block, concat, depthwise/pointwise, grouped conv,
      pooling, classifier (``input`` -> ``logits``).
    * :func:`build_transformer_block` -- BERT-style encoder as torch.onnx exports it
      (``input_ids``, ``attention_mask`` -> ``last_hidden_state``).
    * :func:`build_demo_model` -- the bundled demo CNN (``onnxprune/data/demo_cnn.onnx``).

:func:`random_inputs` makes a matching feed; :data:`BUILDERS` maps short names to builders.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from models.cnn import build_cnn, build_demo_model
from models.mlp import build_mlp
from models.transformer import build_transformer_block

__all__ = [
    "BUILDERS",
    "build_cnn",
    "build_demo_model",
    "build_mlp",
    "build_transformer_block",
    "random_inputs",
]

#: Short name -> builder, for parametrized tests.
BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "transformer": build_transformer_block,
}


def _vocab_size(model: onnx.ModelProto, ids_name: str) -> int:
    """Return the row count of the embedding table that a Gather looks ``ids_name`` up in."""
    tables = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == ids_name:
            table = tables.get(node.input[0])
            if table is not None:
                return int(table.dims[0])
    raise ValueError(f"integer input {ids_name!r} is not the indices of a Gather on an initializer")


def _shape(value: onnx.ValueInfoProto, batch: int, seq: int) -> tuple[int, ...]:
    """Resolve an input's shape: ``batch``/``seq`` dims from the arguments, fixed dims as given."""
    sizes = {"batch": batch, "seq": seq}
    shape: list[int] = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        elif dim.dim_param in sizes:
            shape.append(sizes[dim.dim_param])
        else:
            raise ValueError(f"input {value.name!r} has an unknown dimension {dim.dim_param!r}")
    return tuple(shape)


def random_inputs(
    model: onnx.ModelProto, batch: int = 2, seq: int = 8, seed: int = 0
) -> dict[str, np.ndarray]:
    """Make a random feed for a model from this package.

    Inputs are filled in graph order from one ``numpy.random.default_rng(seed)``:

    * float inputs: standard normal, float32;
    * int64 inputs whose name contains ``mask``: ones, except that the last position of the
      second sample (when ``batch >= 2``) is zeroed;
    * other int64 inputs (token ids): uniform in ``[0, vocab)``, where ``vocab`` is the row count
      of the embedding table the ids are gathered from.

    Args:
        model: A model built by one of this package's builders.
        batch: Size of the ``batch`` dimension.
        seq: Size of the ``seq`` dimension.
        seed: Seed of the random generator.

    Returns:
        Input name -> array.

    Raises:
        ValueError: If an input has an unsupported type or an unknown symbolic dimension.
    """
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feed: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        shape = _shape(value, batch, seq)
        elem_type = value.type.tensor_type.elem_type
        if elem_type == onnx.TensorProto.FLOAT:
            feed[value.name] = rng.standard_normal(shape).astype(np.float32)
        elif elem_type == onnx.TensorProto.INT64 and "mask" in value.name.lower():
            mask = np.ones(shape, dtype=np.int64)
            if shape and shape[0] >= 2 and len(shape) >= 2:
                mask[1, ..., -1] = 0
            feed[value.name] = mask
        elif elem_type == onnx.TensorProto.INT64:
            vocab = _vocab_size(model, value.name)
            feed[value.name] = rng.integers(0, vocab, size=shape, dtype=np.int64)
        else:
            type_name = onnx.TensorProto.DataType.Name(elem_type)
            raise ValueError(f"input {value.name!r} has unsupported type {type_name}")
    return feed
