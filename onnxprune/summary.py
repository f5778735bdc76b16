"""Model summaries: op counts, parameter and non-zero counts, file size.

``parameters`` counts the elements of

* every floating-point initializer of the main graph (integer initializers such as shape
  constants are not parameters),
* every floating-point tensor held by a ``Constant`` node (Paddle2ONNX stores weights so),
* every floating-point initializer or ``Constant`` tensor of an ``If`` branch or ``Loop`` /
  ``Scan`` body, at any depth (Silero VAD keeps all its weights there), counted once per
  place it is stored: the 8 kHz and 16 kHz branches of an ``If`` each count (``in_subgraphs``
  is their share; passes do not prune them), and
* every *quantized weight*: an integer initializer read as the quantized operand of
  ``DequantizeLinear`` (int8/uint8/int4/uint4/int16/uint16/int32), ``MatMulInteger`` /
  ``ConvInteger``, ``QLinearConv`` / ``QLinearMatMul``, or the com.microsoft
  ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` / ``DynamicQuantizeLSTM``; a com.microsoft ``MatMulNBits`` weight
  counts ``K * N`` elements (from its attributes), not its packed bytes.

``nonzero`` counts the parameters that are not exactly zero; a quantized value ``q`` with zero
point ``z`` is zero when ``q == z`` (it dequantizes to 0), so it is compared with its zero point
(per tensor, per axis, or per block), not with 0. ``quantized`` is the quantized share of
``parameters``. ``nonfinite_weights`` names the floating-point initializers holding NaN or +-Inf.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.ir.constants import constant_tensor
from onnxprune.ir.graph import node_subgraphs
from onnxprune.ir.model import Model
from onnxprune.ir.tensors import nbytes, numel

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
    #: Parameters that are quantized weights (included in ``parameters``).
    quantized: int = 0
    #: Parameters held by Constant nodes (included in ``parameters``).
    in_constant_nodes: int = 0
    #: Parameters stored inside If/Loop/Scan bodies (included in ``parameters``; not pruned).
    in_subgraphs: int = 0
    #: Nodes inside If/Loop/Scan bodies, at any depth (not included in ``nodes``).
    subgraph_nodes: int = 0

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

#: Integer element types a quantized weight may have.
QUANT_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
                         onnx.TensorProto.UINT4, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
                         onnx.TensorProto.INT32})

#: (domain, op) -> ((quantized operand slot, zero-point slot, zero-point axis), ...); the axis is
#: counted from the end when negative, None means "the node's ``axis`` attribute" (DequantizeLinear).
QUANT_SLOTS: dict[tuple[str, str], tuple[tuple[int, int, int | None], ...]] = {
    ("", "DequantizeLinear"): ((0, 2, None),),
    ("", "MatMulInteger"): ((0, 2, -2), (1, 3, -1)),
    ("", "ConvInteger"): ((0, 2, 0), (1, 3, 0)),
    ("", "QLinearConv"): ((0, 2, 0), (3, 5, 0)),
    ("", "QLinearMatMul"): ((0, 2, -2), (3, 5, -1)),
    ("com.microsoft", "DynamicQuantizeMatMul"): ((1, 3, -1),),
    ("com.microsoft", "MatMulIntegerToFloat"): ((0, 4, -2), (1, 5, -1)),
    # W [D, I, 4H] / R [D, H, 4H] with zero points [D, 4H]
    ("com.microsoft", "DynamicQuantizeLSTM"): ((1, 9, -1), (2, 11, -1)),
}


@dataclass(frozen=True)
class QuantWeight:
    """A constant integer tensor read as a quantized weight, and how to find its zeros."""

    name: str
    op: str
    zero_point: str | None = None
    axis: int | None = None
    block_size: int = 0
    #: ``MatMulNBits`` only: (K, N, bits, block_size) from the node's attributes.
    nbits: tuple[int, int, int, int] | None = None


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def constant_tensors(model: Model) -> dict[str, onnx.TensorProto]:
    """Output name -> value of every main-graph ``Constant`` node that holds a tensor."""
    out = {}
    for n in model.graph.node:
        t = constant_tensor(n)
        if t is not None:
            out[n.output[0]] = t
    return out


def quantized_weights(model: Model, consts: dict[str, onnx.TensorProto] | None = None) -> dict[str, QuantWeight]:
    """Constant integer tensors (initializers or Constant outputs) that quantized ops read as weights."""
    consts = constant_tensors(model) if consts is None else consts
    inputs = model.graph_input_names() if model.proto.ir_version >= 4 else set()  # IR < 4 lists them all
    types = {t.name: t.data_type for t in model.graph.initializer if t.name not in inputs}
    types.update({k: t.data_type for k, t in consts.items()})
    out: dict[str, QuantWeight] = {}
    for node in model.graph.node:
        key = (_domain(node), node.op_type)
        if key == ("com.microsoft", "MatMulNBits"):
            if len(node.input) > 1 and types.get(node.input[1]) == onnx.TensorProto.UINT8:
                zp = node.input[3] if len(node.input) > 3 and node.input[3] else None
                out.setdefault(node.input[1], QuantWeight(node.input[1], node.op_type, zp, nbits=(
                    _attr_int(node, "K", 0), _attr_int(node, "N", 0), _attr_int(node, "bits", 4),
                    _attr_int(node, "block_size", 0))))
            continue
        for slot, zp_slot, axis in QUANT_SLOTS.get(key, ()):
            if slot >= len(node.input) or types.get(node.input[slot]) not in QUANT_TYPES:
                continue
            if key[1] != "DequantizeLinear" and types[node.input[slot]] == onnx.TensorProto.INT32:
                continue
            zp = node.input[zp_slot] if len(node.input) > zp_slot and node.input[zp_slot] else None
            block = 0
            if axis is None:
                axis, block = _attr_int(node, "axis", 1), _attr_int(node, "block_size", 0)
            out.setdefault(node.input[slot], QuantWeight(node.input[slot], node.op_type, zp, axis, block))
    return out


def _quant_size(t: onnx.TensorProto, q: QuantWeight) -> int:
    return q.nbits[0] * q.nbits[1] if q.nbits else numel(t)


def _bodies(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for n in graph.node:
        for sub in node_subgraphs(n):
            yield sub
            yield from _bodies(sub)


def subgraph_tensors(model: Model) -> Iterator[onnx.TensorProto]:
    """Floating-point initializers and ``Constant`` tensors of every If/Loop/Scan body, any depth."""
    for body in _bodies(model.graph):
        for t in body.initializer:
            if t.data_type in FLOAT_TYPES:
                yield t
        for n in body.node:
            t = constant_tensor(n)
            if t is not None and t.data_type in FLOAT_TYPES:
                yield t


def subgraph_node_count(model: Model) -> int:
    """Nodes of every If/Loop/Scan body, any depth."""
    return sum(len(body.node) for body in _bodies(model.graph))


def _subgraph_counts(model: Model) -> tuple[int, int, int]:
    """(parameters, nonzero, bytes) of :func:`subgraph_tensors`; an external or unreadable one counts as dense."""
    size = nnz = n_bytes = 0
    for t in subgraph_tensors(model):
        n = numel(t)
        size += n
        n_bytes += nbytes(t)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            nnz += n
            continue
        try:
            nnz += count_nonzero(numpy_helper.to_array(t))
        except Exception:  # noqa: BLE001 - a type numpy cannot hold: count as dense
            nnz += n
    return size, nnz, n_bytes


def count_parameters(model: Model) -> int:
    """Parameters (see the module docstring), from shapes and attributes (no weight data read)."""
    consts = constant_tensors(model)
    quant = quantized_weights(model, consts)
    total = sum(numel(t) for t in subgraph_tensors(model))
    for t in [*model.graph.initializer, *consts.values()]:
        if t.data_type in FLOAT_TYPES:
            total += numel(t)
        elif t.name in quant:
            total += _quant_size(t, quant[t.name])
    return total


def count_nonzero(arr: np.ndarray) -> int:
    """Non-zeros of a possibly memory-mapped array, read in chunks."""
    flat = arr.reshape(-1)
    return int(sum(np.count_nonzero(flat[i : i + _CHUNK]) for i in range(0, flat.size, _CHUNK)))


def nonzero_and_finite(arr: np.ndarray) -> tuple[int, bool]:
    """Non-zeros of a (possibly memory-mapped) float array and whether all are finite, in one read.

    One pass over chunks of ``_CHUNK`` elements: a mapped weight is paged in once, not twice.
    float16 is read as its bits (``b & 0x7FFF``: zero for +-0, ``>= 0x7C00`` for Inf/NaN), which
    numpy counts ~7x faster than float16 values; the counts are the same.
    """
    flat = arr.reshape(-1)
    nnz, finite = 0, True
    if flat.dtype == np.float16:
        for i in range(0, flat.size, _CHUNK):
            bits = flat[i : i + _CHUNK].view(np.uint16) & np.uint16(0x7FFF)
            nnz += int(np.count_nonzero(bits))
            finite = finite and not bool((bits >= 0x7C00).any())
        return nnz, finite
    for i in range(0, flat.size, _CHUNK):
        chunk = flat[i : i + _CHUNK]
        nnz += int(np.count_nonzero(chunk))
        if finite:
            try:
                finite = bool(np.isfinite(chunk).all())
            except TypeError:  # a float type numpy cannot test
                pass
    return nnz, finite


def _nbits_values(b: np.ndarray, zp: np.ndarray | None, q: QuantWeight) -> np.ndarray | None:
    """``MatMulNBits``: the [N, K] quantized values minus their zero points; None if unsupported."""
    assert q.nbits is not None
    k, n, bits, block = q.nbits
    if bits not in (4, 8) or n <= 0 or k <= 0 or b.size == 0:
        return None
    b = np.asarray(b, dtype=np.uint8).reshape(n, -1)
    vals = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, -1) if bits == 4 else b
    if zp is None:
        zero = np.full((n, 1), 1 << (bits - 1), dtype=np.int16)
    elif zp.dtype == np.uint8 and block > 0:
        blocks = -(-k // block)
        z = zp.reshape(n, -1)
        z = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1) if bits == 4 else z
        zero = np.repeat(z[:, :blocks].astype(np.int16), block, axis=1)
    else:
        return None
    vals = vals[:, : zero.shape[1]] if zero.shape[1] > 1 else vals
    return vals[:, :k].astype(np.int16) - zero[:, :k]


def quant_nonzero(arr: np.ndarray, q: QuantWeight, zp: np.ndarray | None) -> int:
    """Quantized values that do not dequantize to zero (``q != zero point``)."""
    if q.nbits is not None:
        diff = _nbits_values(arr, zp, q)
        return int(np.prod(q.nbits[:2])) if diff is None else int(np.count_nonzero(diff))
    if zp is None or zp.size == 1:
        z = 0 if zp is None else zp.reshape(()).item()
        return count_nonzero(arr) if z == 0 else int(arr.size - np.count_nonzero(np.asarray(arr) == z))
    if arr.ndim == 0 or q.axis is None:
        return count_nonzero(arr)
    a = q.axis % arr.ndim
    if q.block_size:
        zp = np.repeat(np.asarray(zp), q.block_size, axis=a)
        zp = np.take(zp, np.arange(arr.shape[a]), axis=a)
    elif zp.ndim == arr.ndim - 1 and a == arr.ndim - 1:  # per (direction, output): [D, 4H] for [D, I, 4H]
        zp = np.expand_dims(zp, -2)
    elif zp.ndim <= 1:
        shape = [1] * arr.ndim
        shape[a] = zp.size
        zp = zp.reshape(shape)
    try:
        return int(np.count_nonzero(np.asarray(arr) != zp))
    except ValueError:  # a zero point that does not broadcast: count against 0
        return count_nonzero(arr)


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
    consts = constant_tensors(model)
    quant = quantized_weights(model, consts)
    inits = {t.name for t in model.graph.initializer}

    def value(name: str) -> np.ndarray:
        return model.get_array(name) if name in inits else numpy_helper.to_array(consts[name])

    params = nnz = n_quant = n_const = 0
    rows = []
    nonfinite: list[str] = []
    for t in [*model.graph.initializer, *consts.values()]:
        q = quant.get(t.name)
        if t.data_type not in FLOAT_TYPES and q is None:
            continue
        try:
            arr = value(t.name)
        except Exception:  # noqa: BLE001 - a type numpy cannot hold (e.g. float8): count by shape
            size, nz, dtype = numel(t), numel(t), onnx.TensorProto.DataType.Name(t.data_type).lower()
        else:
            dtype = str(arr.dtype)
            if q is not None:
                zp = value(q.zero_point) if q.zero_point and (q.zero_point in inits or q.zero_point in consts) \
                    else None
                size, nz = _quant_size(t, q), quant_nonzero(arr, q, None if zp is None else np.asarray(zp))
                n_quant += size
            else:
                size, (nz, finite) = int(arr.size), nonzero_and_finite(arr)
                if t.name in inits and arr.size > 1 and not finite:  # a -inf scalar is a mask/identity value
                    nonfinite.append(t.name)
        params += size
        nnz += nz
        if t.name in consts:
            n_const += size
        if per_initializer:
            rows.append({"name": t.name, "shape": list(t.dims), "dtype": dtype, "size": size,
                         "nonzero": nz, "sparsity": round(1 - nz / size, 6) if size else 0.0,
                         **({"quantized": q.op} if q else {}), **({"constant_node": True} if t.name in consts else {})})
    sub_params, sub_nnz, sub_bytes = _subgraph_counts(model)
    params += sub_params
    nnz += sub_nnz
    return ModelSummary(
        nodes=len(model.graph.node), ops=dict(sorted(ops.items())), parameters=params, nonzero=nnz,
        weight_bytes=model.weight_bytes() + sum(nbytes(t) for t in consts.values()) + sub_bytes,
        file_size=file_size(path) if path else None, per_initializer=rows,
        nonfinite_weights=nonfinite, quantized=n_quant, in_constant_nodes=n_const,
        in_subgraphs=sub_params, subgraph_nodes=subgraph_node_count(model),
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
