"""Tensor helpers shared by the IR modules: dtypes, byte sizes, references into external data.

:class:`ExternalRef` says where the bytes of one initializer live outside the proto (an external
data file, or a byte range of the ``.onnx`` file itself for streamed-parsed models).
``nbytes(t) = prod(dims) * itemsize(data_type)``; it is the size that the memory map covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx


@dataclass(frozen=True)
class ExternalRef:
    """Where an external initializer's bytes live.

    ``inline`` marks bytes that live inside the ``.onnx`` file itself (a large model's raw data,
    memory-mapped at load instead of parsed into the proto); such a model is still saved as one
    file by default.
    """

    path: Path
    offset: int
    length: int
    inline: bool = False
    scratch: bool = False


def np_dtype(data_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))


def numel(tensor: onnx.TensorProto) -> int:
    """Elements of a tensor, from its dims (1 for a scalar)."""
    return int(np.prod(tensor.dims, dtype=np.int64))


def nbytes(tensor: onnx.TensorProto) -> int:
    return numel(tensor) * np_dtype(tensor.data_type).itemsize
