"""Latency A/B on ONNX Runtime CPU: time several models on the same inputs, fairly.

:func:`measure` builds one session per model through :func:`onnxprune.check.make_session` (the
same options for every model: ``threads`` intra-op threads, sequential execution, full graph
optimisation; a :class:`~onnxprune.ir.model.Model` with memory-mapped or external weights is
written to a temporary file first, exactly as the check does). Then:

1. **warm-up**: ``warmup`` untimed runs of each model (allocations, kernel selection, caches);
2. **interleaved timed runs**: rounds ``A, B, C, A, B, C, ...`` so that drift in machine load,
   clock frequency or cache state hits every model alike instead of whichever ran last;
   ``runs`` rounds, or fewer when ``max_seconds`` (wall time of the timed part) is reached first,
   but never fewer than :data:`MIN_RUNS` rounds;
3. **statistics** per model over its ``n`` wall-clock samples ``t_i`` (``time.perf_counter``
   around one ``session.run``): the median and the quartiles ``q1``/``q3`` (linear
   interpolation, ``numpy.percentile``); the interquartile range ``q3 - q1`` is the spread.

:func:`speedup` is ``median(a) / median(b)``: above 1 means ``b`` is faster.

:func:`flops` counts multiply-adds as 2 FLOPs for Conv (``2 * prod(out) * C_in/group *
prod(kernel)``), ConvTranspose (``2 * prod(in) * C_out/group * prod(kernel)``), Gemm
(``2 * M * N * K``) and MatMul (``2 * batch * M * N * K``), with shapes from ONNX shape inference
after fixing the graph inputs' dynamic dims (``dims`` by name, else 1 for axis 0 and 224 for
others); other ops count 0. It is a rough proxy: latency is what :func:`measure` reports.

Preconditions: every model accepts the feeds (extra arrays are ignored; a float array is cast
to a model's declared float input type, so an ``fp16(keep_io_types=false)`` model can be timed
against its float32 input); the feeds fit in memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from math import prod
from typing import Any

import numpy as np
import onnx

from onnxprune.check import make_session
from onnxprune.errors import CheckError
from onnxprune.ir.model import Model

#: Fewest timed rounds, even when ``max_seconds`` is reached first.
MIN_RUNS = 3

ModelLike = Model | str | os.PathLike[str] | onnx.ModelProto

_NP_OF_ORT = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


@dataclass
class Timing:
    """Latency of one model: median and quartiles of its timed runs, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    runs: int

    @property
    def iqr_ms(self) -> float:
        """Interquartile range ``q3 - q1`` (the spread)."""
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready dict."""
        return asdict(self)

    def format(self) -> str:
        """``12.3 ms [IQR 12.1-12.8, 15 runs]`` (3 significant digits, at least one decimal)."""
        return f"{_ms(self.median_ms)} ms [IQR {_ms(self.q1_ms)}-{_ms(self.q3_ms)}, {self.runs} runs]"


def _ms(v: float) -> str:
    return f"{v:.1f}" if v >= 100 else f"{v:.3g}"


def speedup(a: Timing, b: Timing) -> float:
    """``a.median_ms / b.median_ms``: how many times faster ``b`` is than ``a`` (inf if b took 0 ms)."""
    if b.median_ms > 0:
        return a.median_ms / b.median_ms
    return float("inf") if a.median_ms > 0 else float("nan")


def timing_of(samples_s: Sequence[float]) -> Timing:
    """Median and quartiles of wall-clock samples given in seconds."""
    if not len(samples_s):
        raise ValueError("no samples")
    q1, med, q3 = np.percentile(np.asarray(samples_s, dtype=np.float64) * 1e3, [25, 50, 75])
    return Timing(float(med), float(q1), float(q3), len(samples_s))


def interleaved(runners: Sequence[Callable[[], object]], *, warmup: int = 3, runs: int = 15,
                max_seconds: float | None = None, clock: Callable[[], float] = time.perf_counter
                ) -> list[list[float]]:
    """Warm up every runner, then time them in interleaved rounds; the timing core of :func:`measure`.

    Args:
        runners: Zero-argument callables (one inference each).
        warmup: Untimed calls of each runner before timing.
        runs: Timed rounds (each round calls every runner once, in order).
        max_seconds: Stop after the round in which the timed part reached this many seconds
            (at least :data:`MIN_RUNS` rounds, at most ``runs``).
        clock: Seconds clock.

    Returns:
        Per runner, its samples in seconds (all lists have the same length).
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        for run in runners:
            run()
    samples: list[list[float]] = [[] for _ in runners]
    start = clock()
    for r in range(runs):
        for run, acc in zip(runners, samples):
            t0 = clock()
            run()
            acc.append(clock() - t0)
        if max_seconds is not None and r + 1 >= MIN_RUNS and clock() - start >= max_seconds:
            break
    return samples


def _cast_feeds(session: Any, feeds: Mapping[str, np.ndarray], which: str) -> dict[str, np.ndarray]:
    """The feeds a session takes: its inputs only, float arrays cast to its declared float type."""
    out = {}
    for inp in session.get_inputs():
        if inp.name not in feeds:
            raise CheckError(f"{which}: input {inp.name!r} missing from the given inputs (they have {sorted(feeds)})")
        arr = np.asarray(feeds[inp.name])
        want = _NP_OF_ORT.get(inp.type)
        out[inp.name] = arr.astype(want) if want is not None and arr.dtype.kind == "f" and arr.dtype != want else arr
    return out


def _label(model: ModelLike, i: int) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if isinstance(model, Model) and model.path is not None:
        return str(model.path)
    return f"model {i + 1}"


def measure(models: Sequence[ModelLike], feeds: Mapping[str, np.ndarray], *, threads: int | None = None,
            warmup: int = 3, runs: int = 15, max_seconds: float | None = None) -> list[Timing]:
    """Time each model on ONNX Runtime CPU with the same inputs and session options, interleaved.

    Args:
        models: Models (Model, path or self-contained ``onnx.ModelProto``); the first is usually
            the reference.
        feeds: Input arrays by name (see the module docstring for casting).
        threads: Intra-op threads of every session (ONNX Runtime's default when None).
        warmup: Untimed runs of each model first.
        runs: Timed runs of each model.
        max_seconds: Cap on the timed part's wall time (each model still gets :data:`MIN_RUNS` runs).

    Returns:
        One :class:`Timing` per model, in order.

    Raises:
        CheckError: a model does not load or does not run on the feeds.
    """
    if not models:
        raise CheckError("measure: no models given")
    sessions = [make_session(m, threads) for m in models]
    runners = []
    for i, (m, s) in enumerate(zip(models, sessions)):
        feed = _cast_feeds(s, feeds, _label(m, i))
        try:
            s.run(None, feed)
        except Exception as exc:
            raise CheckError(f"{_label(m, i)}: ONNX Runtime cannot run it on the given inputs: "
                             f"{' '.join(str(exc).split())[:300]}") from None
        runners.append(lambda s=s, feed=feed: s.run(None, feed))
    return [timing_of(t) for t in interleaved(runners, warmup=warmup, runs=runs, max_seconds=max_seconds)]


# ---------------------------------------------------------------------- FLOPs
def _proto_of(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, Model):
        return model.proto
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=False)


#: Initializers with more elements than this are replaced by typed graph inputs for shape inference.
SHAPE_ONLY_ELEMENTS = 4096


def _shape_graph(model: onnx.ModelProto, dims: Mapping[str, int]) -> onnx.ModelProto:
    """A copy for shape inference: dynamic input dims fixed, large weights replaced by typed inputs.

    Small initializers (Reshape targets, Split sizes...) stay, so shapes flow through them.
    """
    m = onnx.ModelProto()
    m.ir_version, m.producer_name = model.ir_version, model.producer_name
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g = model.graph
    m.graph.name = g.name
    m.graph.node.extend(g.node)
    m.graph.output.extend(g.output)
    input_names = {i.name for i in g.input}
    m.graph.input.extend(g.input)
    for t in g.initializer:
        if prod(t.dims) <= SHAPE_ONLY_ELEMENTS and not t.external_data:
            m.graph.initializer.append(t)
        elif t.name not in input_names:
            m.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    init_names = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in init_names:
            continue
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                d.dim_value = int(dims.get(d.dim_param, 1 if i == 0 else 224))
    return m


def flops(model: ModelLike, dims: Mapping[str, int] | None = None) -> int:
    """Multiply-add FLOPs (x2) of Conv/ConvTranspose/Gemm/MatMul for the given input dims (module docstring)."""
    proto = _proto_of(model)
    shapes: dict[str, list[int]] = {t.name: list(t.dims) for t in proto.graph.initializer}
    g = onnx.shape_inference.infer_shapes(_shape_graph(proto, dict(dims or {}))).graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.name not in shapes:
            shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    total = 0
    for n in g.node:
        ins = [shapes.get(x) for x in n.input]
        out = shapes.get(n.output[0]) if n.output else None
        if not out or any(v == 0 for v in out):
            continue
        if n.op_type in ("Conv", "ConvTranspose") and len(ins) > 1 and ins[1]:
            w = ins[1]
            if n.op_type == "Conv":
                total += 2 * prod(out) * w[1] * prod(w[2:])
            else:
                x = ins[0] or []  # every input element meets C_out/group * prod(kernel) weights
                total += 2 * prod(x) * w[1] * prod(w[2:]) if x else 0
        elif n.op_type == "Gemm" and ins[0] and len(ins) > 1 and ins[1]:
            trans_a = next((a.i for a in n.attribute if a.name == "transA"), 0)
            k = ins[0][0] if trans_a else ins[0][1]
            total += 2 * prod(out) * k
        elif n.op_type == "MatMul" and ins[0]:
            total += 2 * prod(out) * ins[0][-1]
    return int(total)


__all__ = ["MIN_RUNS", "Timing", "flops", "interleaved", "measure", "speedup", "timing_of"]
