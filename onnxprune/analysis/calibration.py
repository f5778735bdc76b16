"""Calibration data and activation statistics collected on ONNX Runtime.

**Data.** :class:`CalibrationData` holds feed dicts for the model's inputs: from an ``.npz`` file
(one array per model input, samples along axis 0, sliced into batches of ``batch_size``), from
an iterable of feed dicts (kept as a list so that several passes over the data are possible), or
from another ``CalibrationData``. Every batch is checked against the model: every non-constant
graph input present, no unknown names, element types equal, ranks equal, static dimensions equal.

**Statistics.** For a set of activation tensors ``X`` (the inputs of the weights to prune),
:func:`collect_input_stats` adds them as extra graph outputs (the caller's model is restored
afterwards), streams every batch through ONNX Runtime CPU and accumulates in float64:

* ``sumsq[k] = Σ_t x[t, k]²`` (Wanda's squared column norms), and
* ``hessian = Σ_t x[t]ᵀ x[t]`` ``[K, K]`` (SparseGPT's ``H = 2XᵀX`` up to the factor 2),

plus the channel sums ``Σ_t x[t, k]`` (means, for bias terms) and the number of tokens ``t``. The token axis is everything except the channel axis: for
MatMul/Gemm inputs ``[..., K]`` the channel axis is the last; for Conv inputs ``[B, C, H, W]`` it
is axis 1 and the tokens are the ``B·H·W`` positions (im2col-free: see :func:`calib_targets`).
Where the model has an attention-mask input ``[B, S]`` (found by name, or named by the caller)
and an activation is shaped ``[B, S, K]``, only tokens whose mask is non-zero count.

Memory is O(Σ K²) for Hessians (or O(Σ K) for sums of squares) plus one batch of activations,
independent of the number of batches (sequential mode additionally caches the tensors that cross
the current stage boundary for every batch; see :class:`SegmentRunner`). When all requested Hessians exceed ``chunk_bytes`` the
tensors are split into chunks and the data is streamed once per chunk.

**One loop.** :func:`stream` is the one streaming loop over the calibration batches: it runs
each batch through one prefix session per requested ``(model, tensors)``;
:func:`collect_input_stats`, :func:`channel_stats` and :func:`cross_stats` are accumulators on
top of it, and :class:`SegmentRunner` is its sequential (stage-by-stage) form.

**Reconstruction statistics.** :func:`cross_stats` streams the same batches through the dense
and the pruned model and accumulates, per tensor, ``G = X_pᵀX_p``, ``C = X_pᵀX_d`` and
``D = X_dᵀX_d`` (float64; ``X_p``/``X_d`` the tensor's rows in the pruned/dense model, padding
excluded in both; the pruned tensor may have fewer channels), the inputs of
:func:`onnxprune.criteria.reconstruct.refit`. :func:`calibration_stages` with ``kind="cross"``
gives the same per stage in sequential mode (two :class:`SegmentRunner` in step; their caches
hold the frontier tensors of both models for every batch). Accumulators cost
``(K² + K·Kd + Kd²)·8`` bytes per tensor, never more with more batches.

**Channel means.** :func:`channel_stats` streams the same data for the structured passes: per
probed ``(tensor, axis)``, the mean of ``|x|`` and of ``x`` at every position of ``axis`` over all
other axes and all batches (float64 sums divided by the row count), with the same padding rule.
It is the one statistics loop of ``channels`` (``criterion=activation``) and ``heads``/``ffn``
(``activation``/``weighted`` criteria and bias compensation).

**Stages.** :func:`calib_targets` maps weights to the activations they multiply;
:func:`calibration_stages` yields statistics for all of them at once (``parallel``: one pass over
the dense model) or stage by stage (``sequential``: weights grouped by depth, each stage's
statistics collected from the model with every earlier stage already pruned).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from onnxprune.analysis.weights import PASS_THROUGH
from onnxprune.check import make_session, referencing_proto
from onnxprune.criteria.backend import Backend, Gram
from onnxprune.errors import CalibrationError
from onnxprune.executor import Executor, InProcessExecutor
from onnxprune.ir.graph import (
    attr,
    copy_without_initializers,
    make_shell,
    node_outer_reads,
)
from onnxprune.ir.io import graph_io
from onnxprune.ir.model import Model
from onnxprune.ir.tensors import ExternalRef
from onnxprune.progress import progress

log = logging.getLogger(__name__)

__all__ = ["CalibTarget", "CalibrationData", "CrossStats", "SegmentRunner", "ShardRunner", "TensorStats",
           "as_calibration", "calib_targets", "calibration_stages", "channel_stats", "chunk_stages", "collect",
           "collect_input_stats", "cross_stats", "find_mask_input", "memory_budget", "model_from_reference", "model_reference",
           "plan_chunks", "stage_bytes", "stream", "sum_shards", "target_stages", "weight_stats"]

DEFAULT_BATCH = 8
#: Default memory budget for the accumulated statistics of one streaming pass.
DEFAULT_CHUNK_BYTES = 1 << 30
#: Rows of activations converted to float64 at a time.
_ROW_CHUNK = 8192
_MASK_NAMES = ("attention_mask", "input_mask", "mask")


# ---------------------------------------------------------------------- data
def _model_inputs(model: Model) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _np_type(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _static_dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    dims = vi.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def _validate_feed(model: Model, feed: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    inputs = _model_inputs(model)
    names = [i.name for i in inputs]
    unknown = sorted(set(feed) - set(names))
    if unknown:
        raise CalibrationError(f"{where}: {unknown} are not inputs of the model (its inputs: {names})")
    missing = [n for n in names if n not in feed]
    if missing:
        raise CalibrationError(f"{where}: model inputs {missing} are missing from the calibration data")
    out: dict[str, np.ndarray] = {}
    for vi in inputs:
        arr = np.asarray(feed[vi.name])
        tt = vi.type.tensor_type
        want = _np_type(tt.elem_type)
        if arr.dtype != want:
            raise CalibrationError(f"{where}: input {vi.name!r} is {arr.dtype}, the model wants {want}")
        if tt.HasField("shape"):
            dims = _static_dims(vi)
            if arr.ndim != len(dims):
                raise CalibrationError(f"{where}: input {vi.name!r} has rank {arr.ndim}, the model wants "
                                       f"rank {len(dims)}")
            for axis, (a, d) in enumerate(zip(arr.shape, dims)):
                if d is not None and a != d:
                    raise CalibrationError(f"{where}: input {vi.name!r} has size {a} on axis {axis}, the model "
                                           f"wants {d}")
        out[vi.name] = arr
    return out


@dataclass
class CalibrationData:
    """Validated calibration batches (feed dicts) for one model.

    Attributes:
        feeds: The batches, in order.
        source: Where the data came from (for messages).
    """

    feeds: list[dict[str, np.ndarray]]
    source: str = "calibration data"

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Iterate over the batches (may be called any number of times)."""
        return iter(self.feeds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Iterate over the batches (same as :meth:`batches`)."""
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    @property
    def num_samples(self) -> int:
        """Total samples (sum of the first dimension of the first input over batches)."""
        return int(sum(next(iter(f.values())).shape[0] if f else 0 for f in self.feeds))

    def head(self, samples: int) -> CalibrationData:
        """The first ``samples`` samples, in the same batches (the last one cut short if needed).

        Raises:
            CalibrationError: ``samples`` < 1 or more than the data holds.
        """
        total = self.num_samples
        if not 1 <= samples <= total:
            raise CalibrationError(f"{self.source}: cannot use the first {samples} sample(s); it holds {total}")
        out, left = [], samples
        for f in self.feeds:
            if left <= 0:
                break
            n = next(iter(f.values())).shape[0] if f else 0
            out.append(f if n <= left else {k: v[:left] for k, v in f.items()})
            left -= n
        return CalibrationData(out, self.source)

    @classmethod
    def from_any(cls, src: Any, model: Model, batch_size: int | None = None) -> CalibrationData:
        """Build from an ``.npz`` path, an iterable of feed dicts, an object with ``batches()``, or a ``CalibrationData``.

        Args:
            src: The data.
            model: The model the data is for (names, types and shapes are checked).
            batch_size: Samples per batch when slicing an ``.npz`` (default 8); ignored for
                feed dicts, which are used as given.

        Raises:
            CalibrationError: unreadable file, empty data, or data that does not fit the model.
        """
        if isinstance(src, CalibrationData):
            for i, f in enumerate(src.feeds):
                _validate_feed(model, f, f"{src.source}, batch {i}")
            return src
        if isinstance(src, (str, os.PathLike)):
            return cls.from_npz(src, model, batch_size)
        if isinstance(src, Mapping):
            return cls.from_feeds([src], model)
        if callable(getattr(src, "batches", None)):  # any object with a batches() iterator
            return cls.from_feeds(src.batches(), model)
        if isinstance(src, Iterable):
            return cls.from_feeds(src, model)
        raise CalibrationError(f"cannot use {type(src).__name__} as calibration data; give an .npz path or "
                               "an iterable of feed dicts")

    @classmethod
    def from_npz(cls, path: str | os.PathLike[str], model: Model, batch_size: int | None = None) -> CalibrationData:
        """Slice an ``.npz`` (arrays named after the model inputs, samples on axis 0) into batches."""
        p = Path(path)
        if not p.is_file():
            raise CalibrationError(f"{p}: calibration file not found")
        try:
            with np.load(p, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:
            raise CalibrationError(f"{p}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
        if not arrays:
            raise CalibrationError(f"{p}: holds no arrays")
        bs = (fixed_batch(model) or DEFAULT_BATCH) if batch_size is None else int(batch_size)
        if bs < 1:
            raise CalibrationError(f"calibration batch size must be >= 1, got {bs}")
        lengths = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
        if None in lengths.values():
            raise CalibrationError(f"{p}: scalar array(s) {[k for k, n in lengths.items() if n is None]}; "
                                   "samples must lie along axis 0")
        if len(set(lengths.values())) != 1:
            raise CalibrationError(f"{p}: arrays disagree on the number of samples (axis 0): {lengths}")
        total = next(iter(lengths.values()))
        if total == 0:
            raise CalibrationError(f"{p}: zero samples")
        feeds = [{k: v[i:i + bs] for k, v in arrays.items()} for i in range(0, total, bs)]
        for i, f in enumerate(feeds):
            feeds[i] = _validate_feed(model, f, f"{p.name}, batch {i}")
        return cls(feeds, str(p))

    @classmethod
    def from_feeds(cls, feeds: Iterable[Mapping[str, Any]], model: Model) -> CalibrationData:
        """Use feed dicts as batches (an iterator is consumed once and kept)."""
        out = []
        for i, f in enumerate(feeds):
            if not isinstance(f, Mapping):
                raise CalibrationError(f"calibration batch {i} is a {type(f).__name__}, expected a dict of arrays")
            out.append(_validate_feed(model, f, f"calibration batch {i}"))
        if not out:
            raise CalibrationError("calibration data holds no batches")
        return cls(out, "calibration feeds")


# ---------------------------------------------------------------------- statistics
def fixed_batch(model: Model) -> int | None:
    """The batch size the model fixes (axis 0 of an input is a number, e.g. ``[1, 128]``), or None.

    An ``.npz`` is then sliced into batches of exactly that size by default.
    """
    sizes = {s.shape[0] for s in graph_io(model.graph)[0] if s.shape and isinstance(s.shape[0], int)}
    return sizes.pop() if len(sizes) == 1 else None


@dataclass
class TensorStats:
    """Accumulated statistics of one activation tensor.

    Attributes:
        name: The tensor.
        channel_axis: Axis of the channels (``-1`` for MatMul/Gemm inputs, ``1`` for Conv).
        tokens: Number of rows (tokens, or B·H·W positions) accumulated.
        sumsq: ``[C]`` float64 sums of squares.
        hessian: ``[C, C]`` float64 ``XᵀX`` (only when requested).
        total: ``[C]`` float64 sums ``Σ_t x[t]`` (``total / tokens`` is the channel mean).
    """

    name: str
    channel_axis: int
    tokens: int = 0
    sumsq: np.ndarray | None = None
    hessian: np.ndarray | None = None
    total: np.ndarray | None = None
    gram: Gram | None = field(default=None, repr=False)

    @property
    def channels(self) -> int:
        """Number of channels C (0 before any data)."""
        return 0 if self.sumsq is None else int(self.sumsq.shape[0])

    def add(self, rows: np.ndarray, hessian: bool, backend: Backend | None = None) -> None:
        """Accumulate a ``[T, C]`` block of rows (the Hessian on ``backend``'s device when it is torch)."""
        c = rows.shape[1]
        if self.sumsq is None:
            self.sumsq = np.zeros(c, dtype=np.float64)
            self.total = np.zeros(c, dtype=np.float64)
            if hessian and backend is not None and backend.kind != "numpy":
                self.gram = Gram(backend, c)
            elif hessian:
                self.hessian = np.zeros((c, c), dtype=np.float64)
        elif c != self.sumsq.shape[0]:
            raise CalibrationError(f"tensor {self.name!r} changed its channel count from {self.sumsq.shape[0]} to "
                                   f"{c} between batches")
        for r0 in range(0, rows.shape[0], _ROW_CHUNK):
            x = rows[r0:r0 + _ROW_CHUNK].astype(np.float64)
            self.sumsq += np.einsum("tc,tc->c", x, x)
            self.total += x.sum(axis=0)
            if self.hessian is not None:
                self.hessian += x.T @ x
        if self.gram is not None:
            self.gram.add(rows)
        self.tokens += int(rows.shape[0])

    def finish(self) -> None:
        """Bring a device-side Hessian back as a numpy array."""
        if self.gram is not None:
            self.hessian, self.gram = self.gram.result(), None


@dataclass
class CrossStats:
    """Accumulated statistics of one activation in the pruned model and its counterpart in the dense model.

    With ``X_p`` ``[T, K]`` the rows of the tensor in the pruned model and ``X_d`` ``[T, Kd]`` the
    rows of the same tokens in the dense model (padding excluded in both), all float64:

    Attributes:
        name: The tensor in the pruned model.
        dense_name: The tensor in the dense model.
        channel_axis: Axis of the channels.
        tokens: ``T``.
        G: ``X_pᵀX_p`` ``[K, K]``.
        C: ``X_pᵀX_d`` ``[K, Kd]``.
        D: ``X_dᵀX_d`` ``[Kd, Kd]``.
        sum_p: ``Σ_t X_p[t]`` ``[K]``.
        sum_d: ``Σ_t X_d[t]`` ``[Kd]``.
    """

    name: str
    dense_name: str
    channel_axis: int
    tokens: int = 0
    G: np.ndarray | None = None
    C: np.ndarray | None = None
    D: np.ndarray | None = None
    sum_p: np.ndarray | None = None
    sum_d: np.ndarray | None = None

    def add(self, rows_p: np.ndarray, rows_d: np.ndarray) -> None:
        """Accumulate the ``[T, K]`` pruned and ``[T, Kd]`` dense rows of the same tokens."""
        if rows_p.shape[0] != rows_d.shape[0]:
            raise CalibrationError(f"tensor {self.name!r}: {rows_p.shape[0]} tokens in the pruned model but "
                                   f"{rows_d.shape[0]} in the dense one ({self.dense_name!r})")
        k, kd = rows_p.shape[1], rows_d.shape[1]
        if self.G is None:
            self.G, self.C, self.D = (np.zeros(s, dtype=np.float64) for s in ((k, k), (k, kd), (kd, kd)))
            self.sum_p, self.sum_d = np.zeros(k, dtype=np.float64), np.zeros(kd, dtype=np.float64)
        elif self.C is not None and self.C.shape != (k, kd):
            raise CalibrationError(f"tensor {self.name!r} changed its channel count between batches")
        assert self.C is not None and self.D is not None and self.sum_p is not None and self.sum_d is not None
        for r0 in range(0, rows_p.shape[0], _ROW_CHUNK):
            xp = rows_p[r0:r0 + _ROW_CHUNK].astype(np.float64)
            xd = rows_d[r0:r0 + _ROW_CHUNK].astype(np.float64)
            self.G += xp.T @ xp
            self.C += xp.T @ xd
            self.D += xd.T @ xd
            self.sum_p += xp.sum(axis=0)
            self.sum_d += xd.sum(axis=0)
        self.tokens += int(rows_p.shape[0])


def find_mask_input(model: Model, option: str | None = "auto") -> str | None:
    """The attention-mask input: ``option`` if it names an input, None if ``option`` is None/"none".

    ``"auto"`` picks the first input named ``attention_mask``, ``input_mask`` or ``mask`` (case
    insensitive), else any 2-D input whose name contains ``mask``; None if there is none.

    Raises:
        CalibrationError: ``option`` names something that is not a model input.
    """
    if option is None or option.lower() == "none" or option == "":
        return None
    inputs = _model_inputs(model)
    names = [i.name for i in inputs]
    if option != "auto":
        if option not in names:
            raise CalibrationError(f"mask input {option!r} is not a model input (inputs: {names})")
        return option
    for want in _MASK_NAMES:
        for n in names:
            if n.lower() == want:
                return n
    for vi in inputs:
        if "mask" in vi.name.lower() and len(vi.type.tensor_type.shape.dim) == 2:
            return vi.name
    return None


def _value_types(model: Model, names: Iterable[str]) -> dict[str, int]:
    """Element types of ``names`` (value_info, graph inputs/outputs, else shape inference)."""
    want = set(names)
    known: dict[str, int] = {}
    g = model.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.name in want and vi.type.tensor_type.elem_type:
            known[vi.name] = vi.type.tensor_type.elem_type
    if want - set(known):
        try:
            inferred = onnx.shape_inference.infer_shapes(make_shell(model.proto))
            for vi in inferred.graph.value_info:
                if vi.name in want and vi.name not in known and vi.type.tensor_type.elem_type:
                    known[vi.name] = vi.type.tensor_type.elem_type
        except Exception as exc:  # pragma: no cover - inference failure just means "assume float"
            log.debug("shape inference for calibration outputs failed: %s", exc)
    return {n: known.get(n, onnx.TensorProto.FLOAT) for n in want}


def plan_chunks(channels: Mapping[str, int], kind: str, chunk_bytes: int) -> list[list[str]]:
    """Split tensors into groups whose accumulators fit ``chunk_bytes`` (one pass per group).

    A tensor whose own accumulator exceeds the budget gets a group of its own.
    """
    per = {n: plan_bytes(c, kind) for n, c in channels.items()}
    groups: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for n in channels:
        if cur and used + per[n] > chunk_bytes:
            groups.append(cur)
            cur, used = [], 0
        cur.append(n)
        used += per[n]
    if cur:
        groups.append(cur)
    return groups


def _rows(x: np.ndarray, axis: int, mask: np.ndarray | None) -> np.ndarray:
    """``[T, C]`` rows of activation ``x`` with channels on ``axis``, padding tokens removed."""
    axis = axis % x.ndim
    if mask is not None and axis == x.ndim - 1 and x.ndim == 3 and x.shape[:2] == mask.shape:
        return x[mask.astype(bool)]
    moved = np.moveaxis(x, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def _channel_counts(model: Model, tensors: Mapping[str, int]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    shapes = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.input)}
    for n, axis in tensors.items():
        vi = shapes.get(n)
        dims = _static_dims(vi) if vi is not None and vi.type.tensor_type.HasField("shape") else []
        out[n] = dims[axis] if dims and -len(dims) <= axis < len(dims) else None
    return out


def _prefix_session(model: Model, outputs: Sequence[str], types: Mapping[str, int]) -> Any:
    """An ONNX Runtime session computing only ``outputs`` (and the nodes they need).

    The model's outputs and nodes are swapped for the truncated graph while the session is built
    and restored afterwards, so weights are never copied; unused initializers are left for ONNX
    Runtime to drop.
    """
    graph = model.graph
    needed = set(outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(x for x in node.input if x)
            needed.update(node_outer_reads(node))
    keep.reverse()
    saved_outputs = [onnx.ValueInfoProto() for _ in graph.output]
    for c, o in zip(saved_outputs, graph.output):
        c.CopyFrom(o)
    saved_nodes = [onnx.NodeProto() for _ in graph.node]
    for c, n in zip(saved_nodes, graph.node):
        c.CopyFrom(n)
    kept = [onnx.NodeProto() for _ in keep]
    for c, n in zip(kept, keep):
        c.CopyFrom(n)
    try:
        del graph.output[:]
        graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in outputs)
        del graph.node[:]
        graph.node.extend(kept)
        try:
            return make_session(model, optimize=False)
        except Exception as exc:
            raise CalibrationError(f"cannot build an ONNX Runtime session for calibration: {exc}") from None
    finally:
        del graph.output[:]
        graph.output.extend(saved_outputs)
        del graph.node[:]
        graph.node.extend(saved_nodes)


def collect_input_stats(
    model: Model,
    calib: CalibrationData,
    tensors: Sequence[str] | Mapping[str, int],
    kind: Literal["sumsq", "hessian"] = "sumsq",
    token_mask_input: str | None = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    channel_counts: Mapping[str, int] | None = None,
) -> dict[str, TensorStats]:
    """Stream the calibration data through ONNX Runtime and accumulate activation statistics.

    Args:
        model: The model. While the session is built its outputs are replaced by ``tensors`` and
            its graph truncated to the nodes they need (so a stage early in the graph costs
            little); both are restored before returning.
        calib: Validated calibration data.
        tensors: Activation tensor names, or name -> channel axis (default ``-1``).
        kind: ``"sumsq"`` (Wanda) or ``"hessian"`` (SparseGPT; ``sumsq`` comes too).
        token_mask_input: Attention-mask input name, ``"auto"`` to find it, or None.
        chunk_bytes: Budget for the accumulators of one pass; above it the tensors are split into
            chunks, one pass over the data each.
        channel_counts: Known channel counts (for chunk planning); read from ``value_info`` else.

    Returns:
        Tensor name -> :class:`TensorStats`.

    Raises:
        CalibrationError: an unknown tensor, a model ONNX Runtime cannot run on the data.
    """
    if kind not in ("sumsq", "hessian"):
        raise CalibrationError(f"unknown statistics kind {kind!r}; expected sumsq or hessian")
    axes = dict(tensors) if isinstance(tensors, Mapping) else {n: -1 for n in tensors}
    if not axes:
        return {}
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    unknown = [n for n in axes if n not in produced]
    if unknown:
        raise CalibrationError(f"activation tensor(s) {unknown[:5]} are not produced by the model")
    mask_name = find_mask_input(model, token_mask_input)
    counts = dict(_channel_counts(model, axes))
    counts.update(channel_counts or {})
    known = {n: (c if c else 1024) for n, c in counts.items()}
    groups = plan_chunks(known, kind, chunk_bytes)
    if len(groups) > 1:
        log.info("calibration: %d tensors in %d chunks (budget %d MB)", len(axes), len(groups), chunk_bytes >> 20)
    stats: dict[str, TensorStats] = {}
    for gi, group in enumerate(groups):
        acc = {n: TensorStats(n, axes[n]) for n in group}
        desc = "calibration" + (f" {gi + 1}/{len(groups)}" if len(groups) > 1 else "")
        for (outs,), feed in stream(calib, [(model, group)], desc=desc):
            mask = None if mask_name is None else np.asarray(feed[mask_name])
            for name in group:
                acc[name].add(_rows(np.asarray(outs[name]), axes[name], mask), kind == "hessian")
        stats.update(acc)
    return stats


def stream(calib: CalibrationData, runs: Sequence[tuple[Model, Sequence[str]]], *, who: str | None = None,
           desc: str = "calibration") -> Iterator[tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]]:
    """THE streaming loop: every calibration batch through one prefix session per ``(model, tensors)``.

    For each ``(model, tensors)`` in ``runs`` an ONNX Runtime session computes just ``tensors``
    (:func:`_prefix_session`; the model is restored afterwards). Every batch is run through all
    sessions in turn and yielded as ``([{tensor: value} per run], feed)``, so statistics that
    compare two models (dense and pruned) see the same tokens. Memory: one batch of the requested
    activations per run; the caller accumulates.

    Raises:
        CalibrationError: a session cannot be built, or ONNX Runtime fails on a batch.
    """
    sessions = []
    for model, names in runs:
        names = list(names)
        session = _prefix_session(model, names, _value_types(model, names))
        sessions.append((session, [i.name for i in session.get_inputs()], names))
    prefix = f"{who}: " if who else ""
    for bi, feed in enumerate(progress(calib.batches(), total=len(calib), desc=desc, unit="batch")):
        outs = []
        for session, in_names, names in sessions:
            try:
                vals = session.run(names, {n: feed[n] for n in in_names if n in feed})
            except Exception as exc:
                raise CalibrationError(f"{prefix}ONNX Runtime failed on calibration batch {bi}: "
                                       f"{' '.join(str(exc).split())[:300]}") from None
            outs.append(dict(zip(names, vals)))
        yield outs, feed


def _pair_specs(pairs: Iterable[str | tuple[str, str] | tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """``(dense tensor, pruned tensor, axis)`` from a name, a ``(dense, pruned)`` pair or a triple."""
    out = []
    for p in pairs:
        if isinstance(p, str):
            out.append((p, p, -1))
        elif len(p) == 2:
            out.append((p[0], p[1], -1))  # type: ignore[misc]
        else:
            out.append((p[0], p[1], int(p[2])))  # type: ignore[misc]
    return list(dict.fromkeys(out))


def cross_stats(
    dense: Model,
    pruned: Model,
    calibration: Any,
    pairs: Iterable[str | tuple[str, str] | tuple[str, str, int]],
    *,
    token_mask_input: str | None = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    who: str = "calibration",
) -> dict[str, CrossStats]:
    """``G = X_pᵀX_p``, ``C = X_pᵀX_d``, ``D = X_dᵀX_d`` per tensor, from the dense and the pruned model.

    The statistics of :func:`onnxprune.criteria.reconstruct.refit`. Both models get the same
    batches (:func:`stream`); padding tokens (attention mask zero, see :func:`_rows`) are left out
    of both. The pruned tensor may have fewer channels than the dense one (after a structural
    removal) but must have the same tokens. Memory: ``(K² + K·Kd + Kd²)`` float64 per pair; pairs
    whose accumulators exceed ``chunk_bytes`` together are split into chunks, one pass each.

    Args:
        dense: The reference model (unchanged).
        pruned: The model pruned so far (same graph inputs).
        calibration: Anything :meth:`CalibrationData.from_any` takes.
        pairs: Tensor names present in both models (channel axis -1), ``(dense name, pruned name)``,
            or ``(dense name, pruned name, channel axis)`` (1 for Conv inputs).
        token_mask_input: Attention-mask input name, ``auto`` or None.
        chunk_bytes: Budget for the accumulators of one pass.
        who: Pass name for error messages.

    Returns:
        Pruned tensor name -> :class:`CrossStats`.

    Raises:
        CalibrationError: no data, data that does not fit the models, unknown tensors, token counts
            that differ between the models, or ONNX Runtime failing.
    """
    needs_calibration(who, "reconstruction", calibration)
    calib = CalibrationData.from_any(calibration, pruned)
    specs = _pair_specs(pairs)
    for m, pos, what in ((dense, 0, "dense"), (pruned, 1, "pruned")):
        produced = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
        unknown = [sp[pos] for sp in specs if sp[pos] not in produced]
        if unknown:
            raise CalibrationError(f"{who}: tensor(s) {unknown[:5]} are not produced by the {what} model")
    mask_name = find_mask_input(pruned, token_mask_input)
    counts = _channel_counts(pruned, {sp[1]: sp[2] for sp in specs})
    groups = plan_chunks({sp[1]: counts.get(sp[1]) or 1024 for sp in specs}, "cross", chunk_bytes)
    by_pruned = {sp[1]: sp for sp in specs}
    out: dict[str, CrossStats] = {}
    for group in groups:
        sp = [by_pruned[n] for n in group]
        acc = {p: CrossStats(p, d, axis) for d, p, axis in sp}
        runs = [(dense, list(dict.fromkeys(d for d, _, _ in sp))), (pruned, list(group))]
        for (outs_d, outs_p), feed in stream(calib, runs, who=who, desc="calibration (dense + pruned)"):
            mask = None if mask_name is None else np.asarray(feed[mask_name])
            for d, p, axis in sp:
                acc[p].add(_rows(np.asarray(outs_p[p]), axis, mask), _rows(np.asarray(outs_d[d]), axis, mask))
        out.update(acc)
    return out


# ---------------------------------------------------------------------- sequential runner
class SegmentRunner:
    """Sequential statistics without re-running the graph prefix for every stage.

    For each stage it runs only the nodes that the stage's activations need and that have not run
    yet (a *segment*), fed from a per-batch cache of earlier tensors, and keeps in the cache only
    tensors that nodes not yet run will read. Over all stages every node runs once, so sequential
    calibration costs about one pass over the data plus one small session per stage.

    Correctness: a node that runs in the segment of stage ``s`` is an ancestor of a stage-``s``
    activation, so it reads no weight of stage ``s`` or later (those weights' ops have greater
    depth); weights of earlier stages were written into the model before the segment's session
    was built. Cached tensors therefore always reflect the model pruned so far.

    Memory: the cache holds the frontier tensors (for a transformer: the residual stream and
    the mask tensors) for every batch — it grows with the calibration set, as in the SparseGPT
    reference code, which caches every layer input.
    """

    def __init__(self, model: Model, calib: CalibrationData, token_mask_input: str | None = "auto") -> None:
        self.model = model
        self.nodes = list(model.graph.node)
        self.reads = [[x for x in n.input if x] + sorted(node_outer_reads(n)) for n in self.nodes]
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.executed: set[int] = set()
        self.cache = [dict(f) for f in calib.batches()]
        mask_name = find_mask_input(model, token_mask_input)
        self.masks = [None if mask_name is None else np.asarray(f[mask_name]) for f in calib.batches()]
        self.inputs = {i.name: i for i in model.graph.input}
        outs = [o for n in self.nodes for o in n.output if o]
        self.types = _value_types(model, outs)
        self.segments = 0

    def _future_reads(self) -> set[str]:
        return {x for i, r in enumerate(self.reads) if i not in self.executed for x in r}

    def _session(self, seg: list[int], feeds: list[str], outputs: list[str]) -> Any:
        sub = copy_without_initializers(self.model.proto)
        g = sub.graph
        del g.node[:]
        g.node.extend(self.nodes[i] for i in seg)
        del g.input[:]
        for x in feeds:
            if x in self.inputs:
                g.input.append(self.inputs[x])
            else:
                g.input.append(onnx.helper.make_tensor_value_info(x, self.types.get(x, onnx.TensorProto.FLOAT), None))
        del g.output[:]
        g.output.extend(onnx.helper.make_tensor_value_info(o, self.types.get(o, onnx.TensorProto.FLOAT), None)
                        for o in outputs)
        del g.value_info[:]
        inits = self.model.initializer_map()
        used = sorted({x for i in seg for x in self.reads[i] if x in inits and x not in feeds})
        g.initializer.extend(inits[x] for x in used)
        sub_model = Model(sub, self.model.path, self.model.base_dir,
                          {k: v for k, v in self.model.external.items() if k in used})
        return make_session(sub_model, optimize=False)

    def batches(self, wanted: Mapping[str, int] | Iterable[str]) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Run the segment ``wanted`` needs; yield ``({tensor: value}, attention mask or None)`` per batch.

        The per-batch cache is updated before each yield, so a consumer that stops early (``zip``
        over two runners) leaves the runner consistent for the next stage.
        """
        wanted = list(wanted)
        cached = set(self.cache[0]) if self.cache else set()
        need: set[int] = set()
        stack = [w for w in wanted if w not in cached]
        seen: set[str] = set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            i = self.producer.get(t)
            if i is None or i in self.executed:
                if t not in cached and t not in self.model.initializer_map():
                    raise CalibrationError(f"sequential calibration: tensor {t!r} is neither cached nor computable")
                continue
            need.add(i)
            stack.extend(x for x in self.reads[i] if x not in cached)
        seg = sorted(need)
        seg_out = {o for i in seg for o in self.nodes[i].output if o}
        feeds = sorted({x for i in seg for x in self.reads[i] if x not in seg_out and x in cached})
        self.executed |= need
        future = self._future_reads()
        outputs = sorted((set(wanted) & seg_out) | (seg_out & future))
        session = self._session(seg, feeds, outputs) if seg else None
        if seg:
            self.segments += 1
        for bi, cache in enumerate(self.cache):
            got: dict[str, np.ndarray] = {}
            if session is not None:
                try:
                    vals = session.run(outputs, {x: cache[x] for x in feeds})
                except Exception as exc:
                    raise CalibrationError(f"ONNX Runtime failed on calibration batch {bi}: "
                                           f"{' '.join(str(exc).split())[:300]}") from None
                got = dict(zip(outputs, vals))
            values = {name: np.asarray(got[name] if name in got else cache[name]) for name in wanted}
            cache.update({k: v for k, v in got.items() if k in future})
            for k in [k for k in cache if k not in future]:
                del cache[k]
            yield values, self.masks[bi]

    def run(self, wanted: Mapping[str, int], kind: Literal["sumsq", "hessian"],
            backend: Backend | None = None) -> dict[str, TensorStats]:
        """Statistics of ``wanted`` (name -> channel axis) on the model as it is now (Hessians on ``backend``)."""
        acc = {n: TensorStats(n, axis) for n, axis in wanted.items()}
        for values, mask in progress(self.batches(wanted), total=len(self.cache), desc="calibration", unit="batch"):
            for name, axis in wanted.items():
                acc[name].add(_rows(values[name], axis, mask), kind == "hessian", backend)
        for st in acc.values():
            st.finish()
        return acc

    def run_cross(self, dense: SegmentRunner, wanted: Mapping[str, int]) -> dict[str, CrossStats]:
        """:class:`CrossStats` of ``wanted``: this runner's model (pruned so far) against ``dense``'s.

        ``dense`` runs over the same batches and stages (its model is never changed), so its
        cache holds the dense model's frontier tensors: two caches, and two segment sessions per
        stage.
        """
        if len(dense.cache) != len(self.cache):
            raise CalibrationError("sequential calibration: the dense and pruned runners hold different data")
        acc = {n: CrossStats(n, n, axis) for n, axis in wanted.items()}
        pairs = zip(dense.batches(wanted), self.batches(wanted))
        for (vd, _), (vp, mask) in progress(pairs, total=len(self.cache), desc="calibration (dense + pruned)",
                                            unit="batch"):
            for name, axis in wanted.items():
                acc[name].add(_rows(vp[name], axis, mask), _rows(vd[name], axis, mask))
        return acc


# ---------------------------------------------------------------------- weights -> activations
@dataclass
class CalibTarget:
    """A weight to prune with a calibration criterion and the activations it multiplies.

    Attributes:
        weight: Initializer name.
        inputs: ``(activation tensor, channel axis)`` for every consumer (stats are summed).
        skip_reason: Why calibration criteria cannot handle this weight, or None.
    """

    weight: str
    inputs: list[tuple[str, int]]
    skip_reason: str | None = None
    channels: int | None = None


def _consumer_map(model: Model) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    return consumers


def _derived(model: Model, init: str, consumers: dict[str, list[onnx.NodeProto]] | None = None) -> set[str]:
    """The initializer and the tensors derived from it through pass-through ops."""
    consumers = _consumer_map(model) if consumers is None else consumers
    seen, stack = {init}, [init]
    while stack:
        t = stack.pop()
        for node in consumers.get(t, []):
            if node.op_type in PASS_THROUGH and node.input[0] == t:
                for o in node.output:
                    if o and o not in seen:
                        seen.add(o)
                        stack.append(o)
    return seen


def calib_targets(model: Model, weights: Sequence[Any]) -> list[CalibTarget]:
    """Map weights (:class:`onnxprune.analysis.weights.WeightInfo`) to the activations they multiply.

    The activation is the consumer's other operand; its channel axis is the one matching the
    weight's K in :func:`~onnxprune.analysis.weights.to_kn` layout:

    * MatMul ``x @ W``: ``x[..., K]``, axis -1; ``W @ x``: ``x[..., K, M]``, axis -2;
    * Gemm ``A @ B``: weight B -> A's axis 1 (0 with ``transA``); weight A -> B's axis 0 (1 with
      ``transB``);
    * Conv ``[B, C, H, W]``: axis 1. ``to_kn`` puts only ``C`` on K (columns are ``(n, kh, kw)``),
      so per-channel statistics map one-to-one onto K: Wanda's ``Σ x_c²`` over all ``B·H·W``
      positions is exactly the im2col column norm up to borders, and SparseGPT uses the channel
      covariance ``H_c`` for every ``(n, tap)`` column (the Kronecker approximation
      ``H ≈ H_c ⊗ I`` that ignores correlation between taps; exact for 1×1 kernels).

    Grouped convolutions and ConvTranspose are skipped with a reason.
    """
    by_label: dict[str, onnx.NodeProto] = {}
    for i, node in enumerate(model.graph.node):
        by_label[node.name or f"{node.op_type}#{i}"] = node
    consumers = _consumer_map(model)
    out = []
    for w in weights:
        chain = _derived(model, w.name, consumers)
        inputs: list[tuple[str, int]] = []
        reason = None
        for label in w.nodes:
            node = by_label.get(label)
            if node is None:
                reason = f"consumer {label!r} not found"
                break
            op = node.op_type
            slot = 1 if len(node.input) > 1 and node.input[1] in chain else 0
            other = node.input[1 - slot] if len(node.input) > 1 else ""
            if op == "Conv":
                if int(attr(node, "group", 1)) != 1:
                    reason = f"grouped Conv {label!r} (group={int(attr(node, 'group', 1))})"
                    break
                inputs.append((node.input[0], 1))
            elif op == "MatMul":
                inputs.append((other, -1 if slot == 1 else -2))
            elif op == "Gemm":
                if slot == 1:
                    inputs.append((other, 0 if int(attr(node, "transA", 0)) else 1))
                else:
                    inputs.append((other, 1 if int(attr(node, "transB", 0)) else 0))
            else:
                reason = f"{op} {label!r} is not supported by calibration criteria"
                break
        if not inputs and reason is None:
            reason = "no consumer"
        out.append(CalibTarget(w.name, inputs, reason, getattr(w, "k", None)))
    return out


def target_stages(model: Model, targets: Sequence[CalibTarget]) -> list[list[CalibTarget]]:
    """Group targets by depth for sequential pruning.

    The depth of a tensor is the largest number of target weight ops (Conv/MatMul/Gemm reading a
    target weight) on any path from the graph inputs to it; a target's stage is the depth of its
    activation(s). Weights in one stage never feed each other's inputs, so one calibration pass
    per stage sees every earlier stage already pruned. For a BERT layer this gives four stages:
    {Q, K, V}, {attention output}, {FFN up}, {FFN down}.
    """
    consumers = _consumer_map(model)
    chain: set[str] = set()
    for t in targets:
        chain |= _derived(model, t.weight, consumers)
    depth: dict[str, int] = {}
    for node in model.graph.node:
        ins = [x for x in node.input if x]
        d = max((depth.get(x, 0) for x in ins), default=0)
        if node.op_type in ("Conv", "MatMul", "Gemm") and any(x in chain for x in ins):
            d += 1
        for o in node.output:
            depth[o] = d
    stages: dict[int, list[CalibTarget]] = {}
    for t in targets:
        st = max((depth.get(a, 0) for a, _ in t.inputs), default=0)
        stages.setdefault(st, []).append(t)
    return [stages[k] for k in sorted(stages)]


def weight_stats(targets: Sequence[CalibTarget],
                 stats: Mapping[str, TensorStats] | Mapping[str, CrossStats]) -> dict[str, dict[str, Any]]:
    """Per-weight statistics ``{"sumsq": [K], "H": [K, K] or None, "tokens": int}``.

    From :class:`CrossStats` (reconstruction) the entries are ``H = G`` (the pruned model's
    ``XᵀX``, what SparseGPT wants in sequential mode), ``sumsq = diag G``, plus ``"C"`` and ``"D"``.
    A weight read by several consumers gets the sums over all of them (its layer-wise loss is the
    sum of the consumers' losses).
    """
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        if t.skip_reason:
            continue
        if any(isinstance(stats[a], CrossStats) for a, _ in t.inputs):
            cparts = [stats[a] for a, _ in t.inputs]
            if any(p.G is None for p in cparts) or len({p.G.shape for p in cparts}) != 1:  # type: ignore[union-attr]
                continue
            G, C, D = (np.sum([getattr(p, k) for p in cparts], axis=0) for k in ("G", "C", "D"))
            out[t.weight] = {"sumsq": np.diag(G).copy(), "H": G, "C": C, "D": D,
                             "tokens": sum(p.tokens for p in cparts)}
            continue
        parts = [stats[a] for a, _ in t.inputs]
        if any(p.sumsq is None for p in parts) or len({p.channels for p in parts}) != 1:
            continue
        sumsq = np.sum([p.sumsq for p in parts], axis=0)
        hs = [p.hessian for p in parts]
        H = None if any(h is None for h in hs) else (hs[0] if len(hs) == 1 else np.sum(hs, axis=0))
        out[t.weight] = {"sumsq": sumsq, "H": H, "tokens": sum(p.tokens for p in parts)}
    return out


#: Share of physical memory that ``max_memory=auto`` gives the statistics of one calibration block.
AUTO_MEMORY_SHARE = 0.25
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def memory_budget(value: str | int | float | None) -> int:
    """Bytes for ``max_memory``: ``auto``/None (25% of physical memory), a number of bytes, or ``6G``/``512MiB``.

    Units are binary (``G`` = 2³⁰ bytes).

    Raises:
        CalibrationError: an unreadable or non-positive size.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        try:
            return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * AUTO_MEMORY_SHARE)
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            return DEFAULT_CHUNK_BYTES
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        text = value.strip().upper().replace(" ", "")
        num = text.rstrip("BKMGTI")
        unit = text[len(num):]
        try:
            n = float(num) * _UNITS[unit]
        except (ValueError, KeyError):
            raise CalibrationError(f"max_memory: cannot read {value!r}; give bytes or a size such as 6G or "
                                   "512MiB, or auto") from None
    if n <= 0:
        raise CalibrationError(f"max_memory must be positive, got {value!r}")
    return int(n)


def stage_bytes(stage: Sequence[CalibTarget], kind: str) -> int:
    """Bytes of the float64 accumulators a stage's statistics hold (distinct activations counted once).

    ``hessian``: ``(K² + 2K)·8`` per activation; ``cross``: ``3·(K² + K)·8``; ``sumsq``: ``2K·8``.
    ``K`` is the weight's reduction length (1024 where unknown).
    """
    seen: dict[str, int] = {}
    for t in stage:
        for a, _ in t.inputs:
            seen.setdefault(a, t.channels or 1024)
    return sum(plan_bytes(c, kind) for c in seen.values())


def plan_bytes(c: int, kind: str) -> int:
    """Accumulator bytes of one activation with ``c`` channels (see :func:`plan_chunks`)."""
    return (c * c + 2 * c) * 8 if kind == "hessian" else 3 * (c * c + c) * 8 if kind == "cross" else 2 * c * 8


def chunk_stages(stages: Sequence[list[CalibTarget]], kind: str, budget: int) -> list[list[CalibTarget]]:
    """Merge consecutive depth stages while their statistics fit ``budget`` bytes.

    A stage over the budget on its own stays one chunk (its weights' statistics must exist together).
    """
    chunks: list[list[CalibTarget]] = []
    cur: list[CalibTarget] = []
    for st in stages:
        if cur and stage_bytes(cur + st, kind) > budget:
            chunks.append(cur)
            cur = []
        cur = cur + st
    if cur:
        chunks.append(cur)
    return chunks


def model_reference(model: Model) -> tuple[bytes, str | None]:
    """The model as ``(proto bytes, folder)`` for another process: memory-mapped weights by path.

    Raises:
        CalibrationError: the in-memory part of the model is too large to serialise.
    """
    if not model.external:
        return model.proto.SerializeToString(), None
    ref = referencing_proto(model)
    if ref is None:
        raise CalibrationError("the model's in-memory weights exceed 1.9 GB; save it and load it again to "
                               "share it with other processes")
    return ref


def model_from_reference(ref: tuple[bytes, str | None] | Model) -> Model:
    """The :class:`Model` a :func:`model_reference` describes (weights mapped from their files)."""
    if isinstance(ref, Model):
        return ref
    data, folder = ref
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    external: dict[str, ExternalRef] = {}
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and folder is not None:
            info = {e.key: e.value for e in t.external_data}
            external[t.name] = ExternalRef(Path(folder) / info["location"], int(info.get("offset", 0)),
                                           int(info.get("length", 0)))
    return Model(proto, None, Path(folder) if folder else None, external)


class ShardRunner:
    """The :class:`SegmentRunner` (or the dense/pruned pair) of one calibration shard.

    In this process it shares the caller's models; as a Ray actor it holds its own copies, built
    from :func:`model_reference`, and gets each stage's pruned weights through :meth:`set_arrays`.
    """

    def __init__(self, model: Any, dense: Any, feeds: list[dict[str, np.ndarray]],
                 token_mask_input: str | None) -> None:
        self.model = model_from_reference(model)
        data = CalibrationData(feeds, "calibration shard")
        self.runner = SegmentRunner(self.model, data, token_mask_input)
        self.dense = None if dense is None else SegmentRunner(model_from_reference(dense), data, token_mask_input)

    def run(self, wanted: Mapping[str, int], kind: Literal["sumsq", "hessian"],
            backend: Backend | None = None) -> dict[str, Any]:
        """This shard's statistics of ``wanted`` (cross statistics when a dense runner is held)."""
        if self.dense is not None:
            return self.runner.run_cross(self.dense, wanted)
        return self.runner.run(wanted, kind, backend)

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Write pruned weights into this runner's model (before the next stage)."""
        for name, value in arrays.items():
            self.model.set_array(name, value)


def sum_shards(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Add the shards' statistics in shard order (one shard: returned as it is)."""
    if len(parts) == 1:
        return dict(parts[0])
    out = dict(parts[0])
    for part in parts[1:]:
        for name, st in part.items():
            acc = out[name]
            acc.tokens += st.tokens
            for f in ("sumsq", "hessian", "total", "G", "C", "D", "sum_p", "sum_d"):
                a, b = getattr(acc, f, None), getattr(st, f, None)
                if a is not None and b is not None:
                    setattr(acc, f, a + b)
    return out


def calibration_stages(
    model: Model,
    targets: Sequence[CalibTarget],
    calib: CalibrationData,
    *,
    kind: Literal["sumsq", "hessian", "cross"],
    mode: Literal["parallel", "sequential"] = "parallel",
    token_mask_input: str | None = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    stage_group: int = 1,
    dense: Model | None = None,
    executor: Executor | None = None,
    shards: int = 1,
    backend: Backend | None = None,
) -> Iterator[tuple[list[CalibTarget], dict[str, dict[str, Any]]]]:
    """Yield ``(targets of a stage, their per-weight statistics)`` for pruning, one block at a time.

    Both modes walk the model with :class:`SegmentRunner` (each node runs once per shard, only the
    nodes a stage needs are in its ONNX Runtime session, so weights are mapped a block at a time),
    and a stage's statistics are dropped when the caller asks for the next stage: memory is the
    statistics of one stage plus the frontier tensors, whatever the model's size.

    ``parallel``: statistics of the model as it is now (dense). Depth stages are merged into chunks
    whose accumulators fit ``chunk_bytes`` (the ``max_memory`` budget); with more than one chunk
    the walk runs on a snapshot taken before the first chunk is pruned, so every chunk still sees
    the dense inputs. ``sequential``: one stage per depth (:func:`target_stages`), ``stage_group``
    of them merged per pass, collected from ``model`` when reached, so the caller must write the
    pruned weights of a stage into ``model`` before asking for the next one.

    ``kind="cross"`` (reconstruction): sequential statistics also carry ``C = X_pᵀX_d`` and
    ``D = X_dᵀX_d`` against ``dense`` (the unpruned model, required; a second runner walks it in
    step); in parallel mode the pruned layer sees the dense inputs, so only ``H`` is collected.

    ``executor`` / ``shards``: the calibration batches are split into ``shards`` contiguous shards,
    each walked by its own :class:`ShardRunner` (Ray actors under
    :class:`~onnxprune.executor.RayExecutor`); the shards' sums are added in shard order, so the
    same ``shards`` gives the same bytes whatever the executor. ``backend``: where the Hessian
    products run (:mod:`onnxprune.criteria.backend`; numpy when None). Targets with a
    ``skip_reason`` are not yielded.
    """
    if mode not in ("parallel", "sequential"):
        raise CalibrationError(f"unknown calibration mode {mode!r}; expected parallel or sequential")
    if kind == "cross" and mode == "sequential" and dense is None:
        raise CalibrationError("sequential reconstruction statistics need the dense model")
    usable = [t for t in targets if not t.skip_reason]
    if not usable:
        return
    if stage_group < 1:
        raise CalibrationError(f"stage_group must be >= 1, got {stage_group}")
    executor = executor or InProcessExecutor()
    plain: Literal["sumsq", "hessian"] = "sumsq" if kind == "sumsq" else "hessian"
    depth_stages = target_stages(model, usable)
    if mode == "parallel":
        order = {t.weight: i for i, t in enumerate(usable)}
        stages = [sorted(c, key=lambda t: order[t.weight]) for c in chunk_stages(depth_stages, plain, chunk_bytes)]
        source = model if len(stages) == 1 else model.copy()  # the dense snapshot the walk reads
        pair = None
    else:
        stages = [[t for st in depth_stages[i:i + stage_group] for t in st]
                  for i in range(0, len(depth_stages), stage_group)]
        source = model
        pair = dense if kind == "cross" else None
    remote = not isinstance(executor, InProcessExecutor)
    feeds = list(calib.batches())
    n = max(1, min(int(shards), len(feeds)))
    bounds = np.linspace(0, len(feeds), n + 1).round().astype(int)
    src = executor.put(model_reference(source)) if remote else source
    dns = None if pair is None else (executor.put(model_reference(pair)) if remote else pair)
    runners = executor.actors(ShardRunner, [(src, dns, feeds[a:b], token_mask_input)
                                            for a, b in zip(bounds[:-1], bounds[1:])])
    for si, stage in enumerate(stages):
        acts: dict[str, int] = {}
        for t in stage:
            for a, axis in t.inputs:
                acts.setdefault(a, axis)
        log.info("calibration stage %d/%d: %d weights, %d activations", si + 1, len(stages), len(stage), len(acts))
        stats = sum_shards(executor.call_all(runners, "run", acts, plain, backend))
        ws = weight_stats(stage, stats)
        del stats
        yield stage, ws
        ws.clear()  # the caller is done with this stage: its Hessians go before the next are made
        if remote and mode == "sequential" and si + 1 < len(stages):
            pruned = executor.put({t.weight: np.asarray(model.get_array(t.weight)) for t in stage})  # once, for all
            executor.call_all(runners, "set_arrays", pruned)


def as_calibration(calib: Any, model: Model) -> CalibrationData:
    """``calib`` as :class:`CalibrationData` (validated against ``model``).

    Raises:
        CalibrationError: ``calib`` is None or does not fit the model.
    """
    if calib is None:
        raise CalibrationError("no calibration data: pass --calib DATA.npz (or calibration=... to "
                               "onnxprune.optimize)")
    return calib if isinstance(calib, CalibrationData) else CalibrationData.from_any(calib, model)


def collect(
    model: Model,
    calib: Any,
    weights: Sequence[Any],
    *,
    criterion: str,
    token_mask_input: str | None = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, dict[str, Any]]:
    """Parallel-mode statistics per weight: ``{name: {"sumsq", "H", "tokens"}}`` (one pass per chunk).

    ``criterion`` ``sparsegpt`` collects Hessians, anything else sums of squares. Weights that
    calibration criteria cannot handle (see :func:`calib_targets`) are absent from the result.
    """
    calib = as_calibration(calib, model)
    targets = [t for t in calib_targets(model, weights) if not t.skip_reason]
    acts: dict[str, int] = {}
    for t in targets:
        for a, axis in t.inputs:
            acts.setdefault(a, axis)
    kind: Literal["sumsq", "hessian"] = "hessian" if criterion == "sparsegpt" else "sumsq"
    stats = collect_input_stats(model, calib, acts, kind=kind, token_mask_input=token_mask_input,
                                chunk_bytes=chunk_bytes)
    return weight_stats(targets, stats)


def needs_calibration(pass_name: str, what: str, calibration: Any) -> None:
    """Raise the one "needs calibration data" error when ``calibration`` is None.

    Raises:
        CalibrationError: ``calibration`` is None.
    """
    if calibration is None:
        raise CalibrationError(f"{pass_name}: {what} needs calibration data (--calib DATA.npz, or "
                               "calibration= in the Python API)")


def channel_stats(model: Model, calibration: Any, probes: Iterable[tuple[str, int]], *, who: str = "calibration",
                  what: str = "this criterion", mask_input: str | None = "auto") -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Mean ``|x|`` and mean ``x`` per position of ``axis`` for every probed ``(tensor, axis)``.

    One ONNX Runtime session computes just the probed tensors (:func:`_prefix_session`, the model
    is restored afterwards) and every calibration batch is streamed through it. Where the model has an
    attention-mask input ``[B, S]`` and a probed tensor starts with ``[B, S]`` (the probed axis
    being a later one), only positions whose mask is non-zero count: padding would bias the means.
    Memory is one batch of activations plus two float64 vectors per probe.

    Args:
        model: The model (its graph outputs are extended temporarily).
        calibration: Anything :meth:`CalibrationData.from_any` takes.
        probes: ``(tensor name, axis)`` pairs; negative axes count from the end.
        who: Pass name for error messages.
        what: The option that needs the data, for the missing-data error.
        mask_input: Attention-mask input name, ``auto`` or None.

    Returns:
        ``(tensor, axis) -> (mean |x|, mean x)``, each of length ``shape[axis]``, float64.

    Raises:
        CalibrationError: no data, data that does not fit the model, or ONNX Runtime failing on it.
    """
    needs_calibration(who, what, calibration)
    calib = CalibrationData.from_any(calibration, model)
    probes = list(dict.fromkeys(probes))
    names = list(dict.fromkeys(t for t, _ in probes))
    mask_name = find_mask_input(model, mask_input)
    cache_key = _stats_key(model, calib, probes, mask_name)
    if cache_key is not None and cache_key in _STATS_CACHE:
        _STATS_CACHE.move_to_end(cache_key)
        return {k: (a.copy(), b.copy()) for k, (a, b) in _STATS_CACHE[cache_key][1].items()}
    sums_abs: dict[tuple[str, int], np.ndarray] = {}
    sums: dict[tuple[str, int], np.ndarray] = {}
    counts: dict[tuple[str, int], int] = dict.fromkeys(probes, 0)
    for (outs,), feed in stream(calib, [(model, names)], who=who):
        mask = np.asarray(feed[mask_name]) if mask_name and mask_name in feed else None
        for tensor, axis in probes:
            x = np.asarray(outs[tensor])
            ax = axis % x.ndim
            if mask is not None and ax >= 2 and x.ndim >= 3 and x.shape[:2] == mask.shape:
                x = x[mask != 0]  # [tokens, ...]: the probed axis moves to ax - 1
                ax -= 1
            rows = np.moveaxis(x, ax, -1).reshape(-1, x.shape[ax]).astype(np.float64)
            key = (tensor, axis)
            sums_abs[key] = sums_abs.get(key, 0.0) + np.abs(rows).sum(axis=0)
            sums[key] = sums.get(key, 0.0) + rows.sum(axis=0)
            counts[key] += rows.shape[0]
    result = {k: (sums_abs[k] / max(counts[k], 1), sums[k] / max(counts[k], 1)) for k in probes}
    if cache_key is not None:
        _STATS_CACHE[cache_key] = (calib, {k: (a.copy(), b.copy()) for k, (a, b) in result.items()})
        while len(_STATS_CACHE) > STATS_CACHE_ENTRIES:
            _STATS_CACHE.popitem(last=False)
    return result


#: :func:`channel_stats` results kept per process (the automatic search prunes one model at many
#: ratios, and every run would otherwise stream the same calibration data through the same graph).
STATS_CACHE_ENTRIES = 8
#: Models with more weight bytes than this are not fingerprinted (hashing would cost too much).
STATS_CACHE_MAX_BYTES = 1 << 30
_STATS_CACHE: OrderedDict[tuple[Any, ...], tuple[CalibrationData, dict[tuple[str, int], tuple[np.ndarray,
                                                                                               np.ndarray]]]] = \
    OrderedDict()


def _stats_key(model: Model, calib: CalibrationData, probes: Sequence[tuple[str, int]],
               mask_name: str | None) -> tuple[Any, ...] | None:
    """Cache key of a :func:`channel_stats` call: the model's content, the calibration object (held
    by the entry, so its id is not reused while cached), the probes and the mask input.

    The content is the SHA-256 of the serialised proto (weights inside it included) plus, for
    memory-mapped weights, where they live (file, offset, length, and the file's size and mtime:
    a replaced weight moves into the proto, so a mapped range is never rewritten in place).
    None (no caching) for models over :data:`STATS_CACHE_MAX_BYTES` of weights.
    """
    if model.weight_bytes() > STATS_CACHE_MAX_BYTES:
        return None
    h = hashlib.sha256(model.proto.SerializeToString())
    for name in sorted(model.external):
        ref = model.external[name]
        st = os.stat(ref.path)
        h.update(f"|{name}|{ref.path}|{ref.offset}|{ref.length}|{ref.inline}|{st.st_size}|{st.st_mtime_ns}".encode())
    return (h.hexdigest(), id(calib), tuple(probes), mask_name)


def clear_stats_cache() -> None:
    """Forget every cached :func:`channel_stats` result."""
    _STATS_CACHE.clear()
