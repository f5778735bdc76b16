"""Model summaries: op counts, parameter and non-zero counts, file size.

``parameters`` counts the elements of every floating-point initializer of the main graph that
is consumed as data (integer initializers such as shape constants are not parameters);
``nonzero`` counts those elements that are not exactly zero; ``nonfinite_weights`` names the
floating-point initializers that hold NaN or +-Inf.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune.ir.model import Model

_CHUNK = 1 << 24


@dataclass
class ModelSummary:
    """Size and shape of a model at one point of the pipeline."""

    nodes: int
    ops: dict[str, int]
    parameters: int
    nonzero: int
    weight_bytes: int
    file_size: int | None = None
    per_initializer: list[dict[str, Any]] = field(default_factory=list)
    #: Floating-point initializers holding NaN or +-Inf (criteria rank such weights unpredictably).
    nonfinite_weights: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Share of zero parameters."""
        return 1.0 - self.nonzero / self.parameters if self.parameters else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["sparsity"] = round(self.sparsity, 6)
        return d


#: ONNX element types that count as parameters.
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                         onnx.TensorProto.DOUBLE})


def count_parameters(model: Model) -> int:
    """Elements of the main graph's floating-point initializers, from their shapes (no data read)."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer if t.data_type in FLOAT_TYPES)


def count_nonzero(arr: np.ndarray) -> int:
    """Non-zeros of a possibly memory-mapped array, read in chunks."""
    flat = arr.reshape(-1)
    return int(sum(np.count_nonzero(flat[i : i + _CHUNK]) for i in range(0, flat.size, _CHUNK)))


def has_nonfinite(arr: np.ndarray) -> bool:
    """True if a (possibly memory-mapped) float array holds NaN or +-Inf; read in chunks."""
    flat = arr.reshape(-1)
    try:
        return any(not np.isfinite(flat[i : i + _CHUNK]).all() for i in range(0, flat.size, _CHUNK))
    except TypeError:  # a float type numpy cannot test
        return False


def summarize(model: Model, path: str | os.PathLike[str] | None = None, per_initializer: bool = False) -> ModelSummary:
    """Summarise ``model`` (and the size of ``path`` plus its external data, if given)."""
    ops = Counter(
        (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}") for n in model.graph.node
    )
    params = nnz = 0
    rows = []
    nonfinite: list[str] = []
    for t in model.graph.initializer:
        arr = model.get_array(t.name)
        if arr.dtype.kind != "f" and str(arr.dtype) not in ("bfloat16",):
            continue
        size = int(arr.size)
        nz = count_nonzero(arr)
        params += size
        nnz += nz
        if has_nonfinite(arr):
            nonfinite.append(t.name)
        if per_initializer:
            rows.append({"name": t.name, "shape": list(arr.shape), "dtype": str(arr.dtype), "size": size,
                         "nonzero": nz, "sparsity": round(1 - nz / size, 6) if size else 0.0})
    return ModelSummary(
        nodes=len(model.graph.node), ops=dict(sorted(ops.items())), parameters=params, nonzero=nnz,
        weight_bytes=model.weight_bytes(), file_size=file_size(path) if path else None, per_initializer=rows,
        nonfinite_weights=nonfinite,
    )


def file_size(path: str | os.PathLike[str]) -> int:
    """Bytes of an .onnx file plus the external data files its folder holds for it."""
    p = Path(path)
    if not p.exists():
        return 0
    total = p.stat().st_size
    data = p.parent / (p.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return total
