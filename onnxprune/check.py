"""The ONNX Runtime CPU check path: run two models on the same inputs and compare outputs.

For every output present in both models the comparison reports

* ``max_abs``  = max |a - b|
* ``mean_abs`` = mean |a - b|
* ``max_rel``  = max |a - b| / max |a|   (relative to the reference's scale, so near-zero
  reference values do not blow it up)
* ``cosine``   = <a, b> / (|a| |b|) over the flattened tensors (float64)
* ``top1``     = share of rows whose argmax over the last axis agrees, only for *logit-like*
  outputs (:func:`is_logit_like`): a float output whose last axis has more than one element, of
  rank 2 (``[batch, classes]``), or of any rank >= 1 when its name contains ``logit`` (LM and
  token-classification heads ``[B, S, vocab]``); never when its name says it is a hidden state
  or an embedding (``hidden``, ``embed``, ``pool``, ``feature``). So ``[B, S, H]`` hidden states,
  ``[N, C, H, W]`` feature maps and ``[B, H]`` pooled embeddings get no top1: the argmax over
  hidden units means nothing.
* ``pooled_cosine`` (with ``pool="mean"``, for text-embedding outputs ``[B, S, H]``): mean over
  the batch of the cosine between mean-pooled token vectors, padding tokens excluded through the
  feed's attention mask (an input whose name contains ``mask``), i.e. what sentence-embedding
  models compare.

A comparison *fails loudly* (:meth:`CheckResult.problems`, whatever the tolerances) when an
output changed shape, when the candidate has NaN/Inf where the reference is finite, or when the
error itself is not finite (a NaN/Inf where the reference had a finite value, or the reverse).
Positions where both outputs hold the same value (the same Inf, or NaN in both) count as equal.

:func:`verdict` turns a comparison into one word, with the thresholds it used:

* ``kept``: no problem above, and every output meets both gates: its cosine (the mean-pooled
  cosine where ``pool="mean"`` computed one, since that is what sentence-embedding models
  compare) ``>= min_cos`` (default :data:`DEFAULT_MIN_COS` = 0.99) and, where it has a top1,
  ``top1 >= min_top1`` (default :data:`DEFAULT_MIN_TOP1` = 0.99); a gate given as None is off;
* ``broken``: a problem above, or an output below the *broken* floors: cosine
  ``< min(min_cos, BROKEN_COS)`` (0.9: an angle over 25 degrees between the output vectors) or
  top1 ``< min(min_top1, BROKEN_TOP1)`` (0.5: most argmaxes changed);
* ``degraded``: everything else (a gate missed, but not by that much).

0.99 is the default because a pruned model a deployment engineer can ship unseen should keep
its outputs' direction to within ~8 degrees on the check inputs; looser budgets are a choice
(``--min-cos 0.95``), which then shows in the verdict line.

Inputs come from an ``.npz`` file (arrays named after the model inputs), a dict, or are
synthesized from the declared input types and from what the graph says (:func:`input_hints`):

* float inputs standard normal; inputs named like recurrent state (``state``, ``h``, ``c``,
  ``h0``, ``hidden``...) zeros; bool inputs ones;
* integer inputs in ``[0, min(100, rows))`` where ``rows`` is the smallest first-axis size of a
  ``Gather`` table they index (directly or through Cast/Unsqueeze/Reshape/...), ``*mask*``
  inputs all ones, ``*type*`` inputs zeros, scalar sample-rate inputs (``sr``) 16000;
* one value per symbolic dim name (inputs that share ``batch`` get the same batch); a dynamic
  dim that an elementwise op against a constant forces (right-aligned broadcasting with a
  constant dim > 1) gets that size; ``dims`` (name -> value) wins over everything;
* other dynamic dims: 1 for batch axes (axis 0 of rank >= 2 inputs, every dynamic axis of a
  state input); for image inputs (rank 4, 1-4 channels, height or width dynamic) the dynamic
  spatial axes get a multiple of 32, at least 64; every other dynamic axis a length ``L``.

:func:`synthesize_feeds` tries candidates in order (``L`` = 16, 64, 128, 256, 512 and image sizes
64, 128, 256, 512) and keeps the first the reference model runs on; when none runs it raises
:class:`FeedSynthesisError` naming the shapes tried.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxprune.analysis.kvcache import (
    fit_cache,
    fit_cache_feeds,
    is_cache_name,
    kept_map,
    llm_feeds,
)
from onnxprune.errors import CheckError
from onnxprune.ir.model import Model
from onnxprune.ir.save import temporary_file

log = logging.getLogger(__name__)

DEFAULT_BATCH = 1
DEFAULT_DIM = 16
#: Default gates of :func:`verdict` (``--min-cos`` / ``--min-top1``).
DEFAULT_MIN_COS = 0.99
DEFAULT_MIN_TOP1 = 0.99
#: Below min(gate, floor) a missed gate is ``broken`` rather than ``degraded``.
BROKEN_COS = 0.9
BROKEN_TOP1 = 0.5
#: Output-name fragments that mark hidden states / embeddings (never logit-like).
EMBEDDING_WORDS = ("hidden", "embed", "pool", "feature")


def is_logit_like(name: str, shape: Sequence[int], dtype: Any) -> bool:
    """Whether top-1 (argmax over the last axis) agreement means something for this output.

    The rule (module docstring): float, last axis > 1, name not hidden-state/embedding-like, and
    rank 2 or a name containing ``logit``.

    Args:
        name: The output's name.
        shape: Its shape.
        dtype: Its numpy dtype (or anything ``numpy.dtype`` accepts).
    """
    lname = name.lower()
    if np.dtype(dtype).kind != "f" or len(shape) < 1 or shape[-1] <= 1:
        return False
    if any(w in lname for w in EMBEDDING_WORDS):
        return False
    return len(shape) == 2 or "logit" in lname


@dataclass
class OutputDiff:
    """Differences on one output."""

    name: str
    shape_a: list[int]
    shape_b: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    top1: float | None
    pooled_cosine: float | None = None
    nonfinite_a: int = 0
    nonfinite_b: int = 0

    def problem(self) -> str | None:
        """Why this output fails whatever the tolerances: changed shape, new NaN/Inf, non-finite error."""
        if self.shape_a != self.shape_b:
            return f"output {self.name!r} changed shape: {self.shape_a} -> {self.shape_b}"
        if self.nonfinite_b > self.nonfinite_a or (self.nonfinite_b and not self.nonfinite_a):
            return (f"output {self.name!r} has {self.nonfinite_b} NaN/Inf value(s)"
                    + (f" (the reference has {self.nonfinite_a})" if self.nonfinite_a else " (the reference has none)"))
        if not (np.isfinite(self.max_abs) and np.isfinite(self.mean_abs)):
            return f"output {self.name!r}: the error is not finite (max_abs {self.max_abs})"
        return None

    def within(self, atol: float | None, rtol: float | None) -> bool:
        """True if no :meth:`problem` and ``max_abs <= atol`` and ``max_rel <= rtol`` (each only when given)."""
        if self.problem():
            return False
        if atol is not None and not self.max_abs <= atol:
            return False
        return not (rtol is not None and not self.max_rel <= rtol)


@dataclass
class CheckResult:
    """Comparison of two models on the same inputs."""

    outputs: list[OutputDiff]
    inputs: dict[str, list[int]]
    #: True when the inputs were synthesised (random) rather than given: the numbers then say
    #: how the models agree on noise, which is weaker evidence than real data.
    synthesized: bool = False

    def inputs_line(self) -> str:
        """``inputs: random (synthesised from the graph) x [1, 16]`` or ``inputs: given x [...]``."""
        shapes = ", ".join(f"{k} {v}" for k, v in self.inputs.items())
        if self.synthesized:
            return f"inputs: RANDOM (synthesised from the graph; real data is stronger evidence): {shapes}"
        return f"inputs: given: {shapes}"

    def within(self, atol: float | None = None, rtol: float | None = None) -> bool:
        """True if no output has a :meth:`problems` entry and every output is within the tolerances."""
        return all(o.within(atol, rtol) for o in self.outputs)

    def problems(self) -> list[str]:
        """Failures that count whatever the tolerances (see :meth:`OutputDiff.problem`)."""
        return [p for p in (o.problem() for o in self.outputs) if p]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"inputs": self.inputs, "synthesized_inputs": self.synthesized,
                "outputs": [asdict(o) for o in self.outputs], "problems": self.problems()}

    def format(self) -> str:
        """A terminal table, after a first line saying where the inputs came from."""
        head = f"{'output':<28} {'max_abs':>10} {'max_rel':>10} {'mean_abs':>10} {'cosine':>10} {'top1':>7}"
        lines = [self.inputs_line(), head, "-" * len(head)]
        for o in self.outputs:
            top1 = f"{o.top1:.4f}" if o.top1 is not None else "-"
            name = o.name if len(o.name) <= 28 else o.name[:25] + "..."
            lines.append(f"{name:<28} {o.max_abs:>10.3g} {o.max_rel:>10.3g} {o.mean_abs:>10.3g} "
                         f"{o.cosine:>10.6f} {top1:>7}"
                         + (f"  pooled cosine {o.pooled_cosine:.6f}" if o.pooled_cosine is not None else ""))
        lines += [f"FAILED: {p}" for p in self.problems()]
        return "\n".join(lines)


@dataclass
class Verdict:
    """One word on a comparison (see the module docstring), the line that says it, and why.

    Attributes:
        status: ``"kept"``, ``"degraded"`` or ``"broken"``.
        line: ``verdict: kept (cosine >= 0.99, top1 >= 0.99; worst cosine 0.99971 on 'y')``.
        failures: One entry per missed gate or problem, naming the output.
        min_cos: The cosine gate used (None: off).
        min_top1: The top1 gate used (None: off).
    """

    status: str
    line: str
    failures: list[str]
    min_cos: float | None
    min_top1: float | None

    @property
    def kept(self) -> bool:
        """True for ``kept``."""
        return self.status == "kept"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _gates_text(min_cos: float | None, min_top1: float | None) -> str:
    parts = [f"cosine >= {min_cos:g}" if min_cos is not None else "no cosine gate",
             f"top1 >= {min_top1:g} where logit-like" if min_top1 is not None else "no top1 gate"]
    return ", ".join(parts)


def verdict(result: CheckResult, min_cos: float | None = DEFAULT_MIN_COS,
            min_top1: float | None = DEFAULT_MIN_TOP1) -> Verdict:
    """``kept`` / ``degraded`` / ``broken`` for a comparison (rules in the module docstring).

    Args:
        result: The comparison.
        min_cos: Every output's cosine (pooled cosine when computed) must reach this; None: no gate.
        min_top1: Every logit-like output's top1 must reach this; None: no gate.

    Raises:
        CheckError: a gate outside ``[0, 1]``.
    """
    for flag, v in (("min-cos", min_cos), ("min-top1", min_top1)):
        if v is not None and not (0.0 <= v <= 1.0 and np.isfinite(v)):
            raise CheckError(f"--{flag} must lie in [0, 1], got {v}")
    failures = list(result.problems())
    broken = bool(failures)
    worst: tuple[float, str] | None = None
    for o in result.outputs:
        if o.problem():
            continue
        cos, what = (o.pooled_cosine, "pooled cosine") if o.pooled_cosine is not None else (o.cosine, "cosine")
        if worst is None or cos < worst[0]:
            worst = (cos, f"{what} {cos:.5f} on {o.name!r}")
        if min_cos is not None and not cos >= min_cos:
            failures.append(f"output {o.name!r}: {what} {cos:.4f} < {min_cos:g}")
            broken |= not cos >= min(min_cos, BROKEN_COS)
        if min_top1 is not None and o.top1 is not None and not o.top1 >= min_top1:
            failures.append(f"output {o.name!r}: top1 {o.top1:.4f} < {min_top1:g}")
            broken |= not o.top1 >= min(min_top1, BROKEN_TOP1)
    status = "broken" if broken else "degraded" if failures else "kept"
    gates = _gates_text(min_cos, min_top1)
    random_note = "; on RANDOM inputs" if result.synthesized else ""
    if status == "kept":
        line = f"verdict: kept ({gates}{f'; worst {worst[1]}' if worst else ''}{random_note})"
    else:
        line = f"verdict: {status} ({gates}{random_note}): {'; '.join(failures)}"
    return Verdict(status, line, failures, min_cos, min_top1)


def make_session(model: Model | str | os.PathLike[str] | Any, threads: int | None = None, *,
                 optimize: bool = True) -> Any:
    """An ONNX Runtime CPU session for a model object or path.

    Every session has the same options: sequential execution (one inter-op thread), full graph
    optimisation (``ORT_ENABLE_ALL``) unless ``optimize`` is False, ``threads`` intra-op threads.
    :mod:`onnxprune.bench` times sessions built here, so check and bench see the same runtime.

    Args:
        model: A :class:`Model`, an ``onnx.ModelProto`` (self-contained: no external data) or a path.
        threads: Intra-op threads (ONNX Runtime's default when None).
        optimize: False builds the session without graph optimizations and without pre-packed
            weights: a cheap load check, and what calibration runs on (no folded fp32 copies of
            fp16 weights, no packed copies; the same kernels however the graph is cut into segments).

    A model with external (memory-mapped) weights is handed to ONNX Runtime as a small proto whose
    initializers point at the bytes where they already lie; no temporary copy is written.

    Raises:
        CheckError: ONNX Runtime refuses the model.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if not optimize:  # nor weights packed into a second copy at load
        so.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        so.intra_op_num_threads = threads
    if not isinstance(model, (Model, str, os.PathLike)) and hasattr(model, "graph"):
        model = Model(model)  # an onnx.ModelProto
    try:
        if isinstance(model, Model):
            if not model.external and model.proto.ByteSize() < 1_900_000_000:
                return ort.InferenceSession(model.proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
            referenced = referencing_proto(model)
            if referenced is not None:  # weights stay where they are: ONNX Runtime maps them, no copy is written
                data, folder = referenced
                so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
                try:
                    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
                except Exception as exc:  # an ONNX Runtime without that option: the temporary copy below
                    log.debug("session from mapped external data failed (%s); writing a temporary copy", exc)
            with temporary_file(model) as p:
                return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CheckError(f"ONNX Runtime cannot load the model: {' '.join(str(exc).split())[:400]}") from None


#: External initializers up to this size go into the proto that :func:`referencing_proto` builds.
INLINE_BYTES = 64 << 10


def referencing_proto(model: Model) -> tuple[bytes, str] | None:
    """The model serialised with every external initializer pointing at its bytes where they already are.

    Each memory-mapped initializer (external data file, or a byte range of the ``.onnx`` itself)
    becomes an external-data entry relative to the deepest folder holding all those files, which
    ONNX Runtime is then told to read from (it maps the ranges itself). Returns ``(bytes, folder)``,
    or None when the in-proto rest is too large to serialise (> 1.9 GB); the caller then writes a
    temporary copy.
    """
    import onnx

    from onnxprune.ir.graph import copy_without_initializers

    refs = model.external
    folder = os.path.commonpath([str(Path(r.path).resolve().parent) for r in refs.values()])
    shell = copy_without_initializers(model.proto)
    for t in model.graph.initializer:
        ref = refs.get(t.name)
        if ref is None:
            shell.graph.initializer.append(t)
            continue
        if ref.length <= INLINE_BYTES:  # small (shape constants ONNX Runtime reads while loading): inline
            shell.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(model.get_array(t.name)), t.name))
            continue
        stub = shell.graph.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", os.path.relpath(Path(ref.path).resolve(), folder)),
                           ("offset", str(ref.offset)), ("length", str(ref.length))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
    if shell.ByteSize() >= 1_900_000_000:
        return None
    return shell.SerializeToString(), folder


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(int16)": np.int16,
}


class FeedSynthesisError(CheckError):
    """The reference model runs on none of the synthesized candidate inputs."""


#: Ops that carry integer ids unchanged on their first input (ids -> ids) on the way to a Gather.
ID_PASSTHROUGH = frozenset({"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand",
                            "Transpose", "Slice", "Tile", "Concat"})
#: Shape-keeping ops through which a broadcast constraint still reaches the graph input.
SHAPE_KEEPING = frozenset({"Cast", "Identity", "Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Exp", "Log", "Sqrt",
                           "Erf", "Softplus", "LeakyRelu", "Clip", "Add", "Sub", "Mul", "Div", "Pow"})
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min"})
#: Candidate lengths for dynamic axes and sizes for image spatial axes, tried in order.
CANDIDATE_LENGTHS = (DEFAULT_DIM, 64, 128, 256, 512)
CANDIDATE_SPATIAL = (64, 128, 256, 512, 512)
SAMPLE_RATE = 16000
_STATE_NAMES = ("state", "hidden", "h0", "c0", "past", "cache")
_RATE_NAMES = ("sr", "sample_rate", "sampling_rate", "samplerate")


@dataclass
class InputHints:
    """What the graph says about its inputs (see :func:`input_hints`).

    Attributes:
        id_bound: Input -> exclusive upper bound of its integer values (rows of the Gather tables it indexes).
        forced: ``(input, axis)`` -> the size an elementwise op against a constant forces on that axis.
    """

    id_bound: dict[str, int]
    forced: dict[tuple[str, int], int]


def _const_shapes(graph: Any) -> dict[str, list[int]]:
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    shapes[n.output[0]] = list(a.t.dims)
    return shapes


def input_hints(model: Any) -> InputHints:
    """Bounds on integer ids and broadcast-forced dims of a model's graph inputs.

    Args:
        model: A :class:`Model` or ``onnx.ModelProto`` (only the main graph is read).
    """
    graph = model.graph
    consts = _const_shapes(graph)
    init_names = {t.name for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for x in n.input:
            if x:
                consumers.setdefault(x, []).append(n)
    id_bound: dict[str, int] = {}
    forced: dict[tuple[str, int], int] = {}
    for inp in graph.input:
        if inp.name in init_names:
            continue
        # integer ids reaching the indices of a Gather over a constant table
        seen, todo = {inp.name}, [inp.name]
        while todo:
            t = todo.pop()
            for n in consumers.get(t, ()):
                if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == t and n.input[0] in consts:
                    axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                    dims = consts[n.input[0]]
                    if dims and -len(dims) <= axis < len(dims):
                        id_bound[inp.name] = min(id_bound.get(inp.name, dims[axis]), int(dims[axis]))
                elif n.op_type in ID_PASSTHROUGH and n.input[0] == t and n.output and n.output[0] not in seen:
                    seen.add(n.output[0])
                    todo.append(n.output[0])
        # dims forced by elementwise ops against constants (right-aligned broadcasting)
        rank = len(inp.type.tensor_type.shape.dim)
        seen, todo = {inp.name}, [inp.name]
        while todo:
            t = todo.pop()
            for n in consumers.get(t, ()):
                if n.op_type not in SHAPE_KEEPING or not n.output:
                    continue
                if n.op_type in ELEMENTWISE_BINARY:
                    for other in n.input:
                        cdims = consts.get(other)
                        if other == t or cdims is None or len(cdims) > rank:
                            continue
                        for k, size in enumerate(cdims):
                            if size > 1:
                                forced.setdefault((inp.name, rank - len(cdims) + k), int(size))
                if n.output[0] not in seen:
                    seen.add(n.output[0])
                    todo.append(n.output[0])
    return InputHints(id_bound, forced)


def _is_state(name: str) -> bool:
    lname = name.lower()
    return lname in ("h", "c", "hn", "cn") or any(k in lname for k in _STATE_NAMES)


def _is_image(shape: list[Any]) -> tuple[int, int] | None:
    """Spatial axes of an NCHW/NHWC image input with a dynamic height or width, else None.

    One spatial axis may be fixed: a text-line recogniser takes ``[N, 3, 48, W]``, and a width of
    ``L`` = 16 would give it two time steps, a context it never sees in use.
    """
    if len(shape) != 4:
        return None
    fixed = [isinstance(d, int) and d > 0 for d in shape]
    if fixed[1] and 1 <= shape[1] <= 4 and not (fixed[2] and fixed[3]):
        return (2, 3)
    if fixed[3] and 1 <= shape[3] <= 4 and not (fixed[1] and fixed[2]):
        return (1, 2)
    return None


def _feed_shapes(session: Any, dims: Mapping[str, int], hints: InputHints | None,
                 attempt: int) -> dict[str, list[int]]:
    """Shapes of the ``attempt``-th candidate (see the module docstring)."""
    length = CANDIDATE_LENGTHS[min(attempt, len(CANDIDATE_LENGTHS) - 1)]
    spatial = CANDIDATE_SPATIAL[min(attempt, len(CANDIDATE_SPATIAL) - 1)]
    forced = hints.forced if hints else {}
    named: dict[str, int] = dict(dims)
    for inp in session.get_inputs():  # forced sizes name their symbolic dim for every input sharing it
        for axis, d in enumerate(inp.shape):
            if isinstance(d, str) and d and d not in dims and (inp.name, axis) in forced:
                named.setdefault(d, forced[(inp.name, axis)])
    shapes = {}
    for inp in session.get_inputs():
        image = _is_image(list(inp.shape))
        state = _is_state(inp.name)
        shape = []
        for axis, d in enumerate(inp.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
                continue
            if (inp.name, axis) in forced and not (isinstance(d, str) and d in dims):
                value = forced[(inp.name, axis)]
            elif isinstance(d, str) and d in named:
                value = named[d]
            elif state or (axis == 0 and len(inp.shape) >= 2):
                value = DEFAULT_BATCH
            elif image and axis in image:
                value = spatial
            else:
                value = length
            if isinstance(d, str) and d and d != "?":
                named.setdefault(d, value)
            shape.append(value)
        shapes[inp.name] = shape
    return shapes


def random_feeds(session: Any, dims: Mapping[str, int] | None = None, seed: int = 0, *,
                 hints: InputHints | None = None, attempt: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching a session's declared input types and shapes (one candidate).

    Args:
        session: An ONNX Runtime session.
        dims: Values of named dynamic dims (win over every rule).
        seed: Seed of the random values.
        hints: What the graph says (:func:`input_hints`); without it ids lie in ``[0, 100)``.
        attempt: Which candidate size to use (0 = the defaults; see the module docstring).

    Raises:
        CheckError: an input type random inputs do not support.
    """
    rng = np.random.default_rng(seed)
    shapes = _feed_shapes(session, dict(dims or {}), hints, attempt)
    feeds = {}
    for inp in session.get_inputs():
        shape = shapes[inp.name]
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is None:
            raise CheckError(f"input {inp.name!r} has type {inp.type}, which random inputs do not support; "
                             "pass real inputs (--check-inputs DATA.npz, or --inputs DATA.npz for `check`)")
        lname = inp.name.lower()
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = (np.zeros(shape, dtype=dtype) if _is_state(inp.name)
                               else rng.standard_normal(shape).astype(dtype))
        elif dtype is np.bool_:
            feeds[inp.name] = np.ones(shape, dtype=bool)
        elif lname in _RATE_NAMES and int(np.prod(shape)) == 1:
            feeds[inp.name] = np.full(shape, SAMPLE_RATE, dtype=dtype)
        elif "mask" in lname:
            feeds[inp.name] = np.ones(shape, dtype=dtype)
        elif "type" in lname:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
        else:
            high = min(100, (hints.id_bound.get(inp.name, 100) if hints else 100), int(np.iinfo(dtype).max) + 1)
            feeds[inp.name] = rng.integers(0, max(high, 1), size=shape).astype(dtype)
    return feeds


def _quiet_run(session: Any, feeds: Mapping[str, np.ndarray]) -> list[Any]:
    """``session.run`` without ONNX Runtime's own error log lines (the caller reports failures)."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.log_severity_level = 4
    return session.run(None, dict(feeds), ro)


def synthesize_feeds(session: Any, model: Any = None, dims: Mapping[str, int] | None = None,
                     seed: int = 0) -> tuple[dict[str, np.ndarray], list[Any]]:
    """The first candidate inputs (see the module docstring) the session runs on, and its outputs.

    Args:
        session: The reference model's ONNX Runtime session.
        model: The reference :class:`Model` / ``ModelProto`` for :func:`input_hints` (None: no hints).
        dims: Values of named dynamic dims.
        seed: Seed of the random values.

    Raises:
        FeedSynthesisError: no candidate runs; the message lists the shapes tried.
    """
    hints = input_hints(model) if model is not None else None
    tried: list[dict[str, list[int]]] = []
    error = ""
    llm = llm_feeds(model, seed) if model is not None and not dims else None
    if llm is not None:  # a decoder with a KV cache: past + new tokens = mask length, random past
        try:
            return llm, _quiet_run(session, llm)
        except Exception as exc:
            tried.append({k: list(v.shape) for k, v in llm.items()})
            error = " ".join(str(exc).split())[:300]
    for attempt in range(len(CANDIDATE_LENGTHS)):
        feeds = random_feeds(session, dims, seed, hints=hints, attempt=attempt)
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        if shapes in tried:
            continue
        tried.append(shapes)
        try:
            return feeds, _quiet_run(session, feeds)
        except Exception as exc:
            error = " ".join(str(exc).split())[:300]
    listing = "; ".join(", ".join(f"{k} {v}" for k, v in t.items()) for t in tried)
    raise FeedSynthesisError(
        f"the reference model does not run on synthesized inputs (tried {listing}; last error: {error}); "
        "give the dynamic dims with --dim NAME=VALUE, or real inputs with --check-inputs DATA.npz "
        "(--inputs DATA.npz for `onnxprune check`)")


def larger_feeds(session: Any, model: Any, feeds: Mapping[str, np.ndarray], dims: Mapping[str, int] | None = None,
                 seed: int = 0) -> dict[str, np.ndarray] | None:
    """The first later candidate (module docstring) larger than ``feeds`` that the session runs on.

    *Larger*: every input keeps its rank, no axis shrinks, and some axis grows. A budget judged on
    the smallest size a model runs on alone can miss what pruning does at the sizes it is used at
    (a recogniser's context, a voice detector's window), so the search also scores one size up.

    Args:
        session: The reference model's ONNX Runtime session.
        model: The reference :class:`Model` / ``ModelProto`` for :func:`input_hints`.
        feeds: The inputs :func:`synthesize_feeds` returned.
        dims: Values of named dynamic dims (fixed: with all of them given nothing grows).
        seed: Seed of the random values.

    Returns:
        The inputs, or None when no larger candidate runs (or ``feeds`` are a decoder's cache feeds).
    """
    found = larger_batches(session, model, feeds, dims, [seed])
    return found[0] if found else None


def larger_batches(session: Any, model: Any, feeds: Mapping[str, np.ndarray], dims: Mapping[str, int] | None,
                   seeds: Sequence[int]) -> list[dict[str, np.ndarray]] | None:
    """:func:`larger_feeds` for each of ``seeds``; the size is searched once, with ``seeds[0]``.

    The other batches are drawn at the size found; one the session does not run on is replaced
    by the first batch. None when no larger candidate runs.
    """
    if model is not None and not dims and llm_feeds(model, seeds[0]) is not None:
        return None
    hints = input_hints(model) if model is not None else None
    base = {k: list(np.shape(v)) for k, v in feeds.items()}
    seen: list[dict[str, list[int]]] = [base]
    for attempt in range(1, len(CANDIDATE_LENGTHS)):
        cand = random_feeds(session, dims, seeds[0], hints=hints, attempt=attempt)
        shapes = {k: list(v.shape) for k, v in cand.items()}
        if shapes in seen or set(shapes) != set(base) or any(
                len(shapes[k]) != len(base[k]) or any(a < b for a, b in zip(shapes[k], base[k])) for k in base):
            continue
        seen.append(shapes)
        try:
            _quiet_run(session, cand)
        except Exception:  # noqa: BLE001 - a size the model refuses is simply not used
            continue
        out = [cand]
        for s in seeds[1:]:
            more = random_feeds(session, dims, s, hints=hints, attempt=attempt)
            try:
                _quiet_run(session, more)
            except Exception:  # noqa: BLE001 - values this batch drew that the model refuses
                more = cand
            out.append(more)
        return out
    return None


def load_feeds(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read inputs from an ``.npz`` file.

    Raises:
        CheckError: missing or unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckError(f"{p}: inputs file not found")
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise CheckError(f"{p}: not a readable .npz file ({exc})") from None


def _validate_feeds(session: Any, feeds: Mapping[str, np.ndarray], which: str) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise CheckError(f"{which}: inputs {missing} missing from the given data (it has {sorted(feeds)})")
    out = {}
    for inp in session.get_inputs():
        arr = np.asarray(feeds[inp.name])
        want = _ORT_TYPES.get(inp.type)
        if want is not None and arr.dtype != want:
            raise CheckError(f"{which}: input {inp.name!r} is {arr.dtype}, the model wants {np.dtype(want)}")
        if len(arr.shape) != len(inp.shape):
            raise CheckError(f"{which}: input {inp.name!r} has rank {arr.ndim}, the model wants {len(inp.shape)}")
        for a, d in zip(arr.shape, inp.shape):
            if isinstance(d, int) and d > 0 and a != d:
                raise CheckError(f"{which}: input {inp.name!r} has shape {list(arr.shape)}, the model wants {inp.shape}")
        out[inp.name] = arr
    return out


def diff_outputs(name: str, a: np.ndarray, b: np.ndarray) -> OutputDiff:
    """Compare one reference output ``a`` with a candidate ``b``.

    Positions where ``a`` and ``b`` are equal (the same Inf, or NaN in both) add no error; a
    non-finite value on one side only makes the error Inf (or NaN), which :meth:`OutputDiff.problem`
    reports whatever the tolerances.
    """
    if a.shape != b.shape or a.dtype.kind not in "fiub" or b.dtype.kind not in "fiub":
        return OutputDiff(name, list(a.shape), list(b.shape), float("inf"), float("inf"), float("inf"), 0.0, None)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    fa, fb = np.isfinite(a64), np.isfinite(b64)
    same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.where(same, 0.0, np.abs(a64 - b64))
    d[~same & ~(fa & fb)] = np.inf  # a non-finite value on one side only
    max_abs = float(d.max()) if d.size else 0.0
    mean_abs = float(d.mean()) if d.size else 0.0
    finite_a = np.abs(a64[fa])
    scale = float(finite_a.max()) if finite_a.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    both = fa & fb
    ra, rb = a64[both], b64[both]
    na, nb = np.linalg.norm(ra), np.linalg.norm(rb)
    cosine = float(ra @ rb / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    top1 = None
    if is_logit_like(name, a.shape, a.dtype):
        top1 = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    return OutputDiff(name, list(a.shape), list(b.shape), max_abs, mean_abs, max_rel, cosine, top1,
                      nonfinite_a=int((~fa).sum()), nonfinite_b=int((~fb).sum()))


def mean_pooled_cosine(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean over the batch of cos(mean-pool(a_i), mean-pool(b_i)) for ``[B, S, H]`` outputs.

    Args:
        a: Reference token vectors ``[B, S, H]``.
        b: Candidate token vectors, same shape.
        mask: ``[B, S]`` attention mask (1 = real token); all tokens count when None.
    """
    w = np.ones(a.shape[:2]) if mask is None else (np.asarray(mask) > 0).astype(np.float64)
    denom = np.maximum(w.sum(1, keepdims=True), 1.0)
    pa = (a.astype(np.float64) * w[..., None]).sum(1) / denom
    pb = (b.astype(np.float64) * w[..., None]).sum(1) / denom
    na, nb = np.linalg.norm(pa, axis=1), np.linalg.norm(pb, axis=1)
    cos = (pa * pb).sum(1) / np.maximum(na * nb, 1e-30)
    return float(cos.mean())


def sentence_embeddings(session: Any, feeds: Iterable[Mapping[str, np.ndarray]], output: int = 0,
                        mask_input: str = "attention_mask") -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings ``[N, H]`` from a text encoder's ``[B, S, H]`` output.

    Args:
        session: An ONNX Runtime session (see :func:`make_session`).
        feeds: Batches of inputs; padding tokens (``mask_input`` == 0) are left out of the mean.
        output: Index of the ``[B, S, H]`` output.
        mask_input: Name of the attention-mask input.
    """
    outs = []
    for f in feeds:
        h = np.asarray(session.run(None, dict(f))[output], dtype=np.float64)
        m = np.asarray(f[mask_input], dtype=np.float64)[..., None]
        e = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        outs.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30))
    return np.concatenate(outs)


def neighbour_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's ``k`` nearest neighbours (cosine, self excluded) that both agree on.

    Args:
        reference: Normalised embeddings ``[N, H]`` of the reference model.
        candidate: Embeddings of the same N inputs from the candidate model.
        k: Neighbours per row.
    """
    def knn(e: np.ndarray) -> np.ndarray:
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    a, b = knn(reference), knn(candidate)
    hits = (a[:, :, None] == b[:, None, :]).any(-1).sum(1)
    return float(hits.mean() / k)


def compare(
    reference: Model | str | os.PathLike[str],
    candidate: Model | str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    threads: int | None = None,
    pool: str | None = None,
) -> CheckResult:
    """Run both models on ONNX Runtime CPU with the same inputs and compare their outputs.

    Args:
        reference: The model whose outputs count as right (a Model or a path).
        candidate: The model to check.
        feeds: Inputs (dict or .npz path); random inputs of the declared shapes when None.
        dims: Values of dynamic dimensions for random inputs.
        seed: Seed of the random inputs.
        threads: ONNX Runtime intra-op threads.
        pool: ``"mean"`` to also report the mean-pooled cosine of ``[B, S, H]`` outputs.

    Raises:
        CheckError: a model does not load or run, inputs do not match, or no output is shared.
    """
    if pool not in (None, "mean"):
        raise CheckError(f"pool must be 'mean' or None, got {pool!r}")
    sa, sb = make_session(reference, threads), make_session(candidate, threads)
    if feeds is None:
        feed, _ = synthesize_feeds(sa, _graph_of(reference), dims, seed)
    elif isinstance(feeds, (str, os.PathLike)):
        feed = load_feeds(feeds)
    else:
        feed = dict(feeds)
    synthesized = feeds is None
    kept: dict[str, tuple[int, list[int]]] = {}
    if any(is_cache_name(i.name, "input") for i in sb.get_inputs()) and not kept_map(_graph_of(reference)):
        kept = kept_map(_graph_of(candidate))  # heads removed from the cache: feed and compare the kept ones
    fa = _validate_feeds(sa, feed, "reference")
    fb = _validate_feeds(sb, fit_cache_feeds(feed, {i.name: i.shape for i in sb.get_inputs()}, kept), "candidate")
    names_a = [o.name for o in sa.get_outputs()]
    names_b = {o.name for o in sb.get_outputs()}
    shared = [n for n in names_a if n in names_b]
    if not shared:
        raise CheckError("the two models share no output name")
    try:
        out_a = sa.run(shared, fa)
        out_b = sb.run(shared, fb)
    except Exception as exc:
        raise CheckError(f"ONNX Runtime failed to run: {' '.join(str(exc).split())[:400]}") from None
    out_a = [fit_cache(np.asarray(a), *kept[n]) if n in kept else a for n, a in zip(shared, out_a)]
    diffs = [diff_outputs(n, np.asarray(a), np.asarray(b)) for n, a, b in zip(shared, out_a, out_b)]
    if pool == "mean":
        mask_names = [k for k in fa if "mask" in k.lower() and np.asarray(fa[k]).ndim == 2]
        for d, a, b in zip(diffs, out_a, out_b):
            a, b = np.asarray(a), np.asarray(b)
            if a.ndim == 3 and a.shape == b.shape and a.dtype.kind == "f":
                m = fa[mask_names[0]] if mask_names and fa[mask_names[0]].shape == a.shape[:2] else None
                d.pooled_cosine = mean_pooled_cosine(a, b, m)
    return CheckResult(diffs, {k: list(v.shape) for k, v in fa.items()}, synthesized)


@dataclass
class RunSignature:
    """What one run of the input model gave: the feeds, and per output its shape, dtype and finiteness."""

    feeds: dict[str, np.ndarray]
    outputs: dict[str, tuple[tuple[int, ...], np.dtype, bool]]


def run_signature(model: Model, feeds: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None,
                  dims: Mapping[str, int] | None = None, seed: int = 0, session: Any = None) -> RunSignature:
    """Run ``model`` once (on ``feeds``, or on :func:`synthesize_feeds`) and record its outputs' signature.

    Raises:
        CheckError: the model does not load, or does not run on the given feeds;
            :class:`FeedSynthesisError` when it runs on no synthesized candidate.
    """
    s = session or make_session(model)
    if feeds is None:
        feed, outs = synthesize_feeds(s, model, dims, seed)
    else:
        feed = _validate_feeds(s, load_feeds(feeds) if isinstance(feeds, (str, os.PathLike)) else dict(feeds),
                               "the input model")
        try:
            outs = _quiet_run(s, feed)
        except Exception as exc:
            raise CheckError(f"the input model does not run on the check inputs: {' '.join(str(exc).split())[:300]}"
                             ) from None
    names = [o.name for o in s.get_outputs()]
    return RunSignature(feed, {n: _signature(np.asarray(o)) for n, o in zip(names, outs)})


def _signature(a: np.ndarray) -> tuple[tuple[int, ...], np.dtype, bool]:
    finite = bool(np.isfinite(a).all()) if a.dtype.kind in "fc" else True
    return tuple(a.shape), a.dtype, finite


def signature_problems(reference: RunSignature, candidate: Model) -> list[str]:
    """Run ``candidate`` on the reference's feeds; list outputs that are missing, changed shape or
    dtype (a float output may change float precision), or hold NaN/Inf where the reference had none.

    Float feeds are cast to the candidate's declared input type (``fp16(keep_io_types=false)``).

    Raises:
        CheckError: the candidate does not load or does not run.
    """
    s = make_session(candidate)
    feed = {}
    kept = kept_map(candidate)
    ref_feeds = fit_cache_feeds(reference.feeds, {i.name: i.shape for i in s.get_inputs()}, kept)
    for inp in s.get_inputs():
        arr = ref_feeds.get(inp.name)
        if arr is None:
            return [f"input {inp.name!r} is new (the input model has {sorted(reference.feeds)})"]
        want = _ORT_TYPES.get(inp.type)
        feed[inp.name] = arr.astype(want) if want is not None and arr.dtype.kind == "f" and np.dtype(want).kind == "f" \
            else arr
    try:
        outs = _quiet_run(s, feed)
    except Exception as exc:
        raise CheckError(f"ONNX Runtime cannot run the result on inputs the input model runs on "
                         f"({', '.join(f'{k} {list(v.shape)}' for k, v in feed.items())}): "
                         f"{' '.join(str(exc).split())[:300]}") from None
    got = {o.name: _signature(np.asarray(v)) for o, v in zip(s.get_outputs(), outs)}
    problems = []
    for name, (shape, dtype, finite) in reference.outputs.items():
        if name not in got:
            problems.append(f"output {name!r} is missing")
            continue
        gshape, gdtype, gfinite = got[name]
        if name in kept and kept[name][0] < len(shape):  # a KV cache whose heads were removed
            shape = tuple(len(kept[name][1]) if i == kept[name][0] else d for i, d in enumerate(shape))
        if gshape != shape:
            problems.append(f"output {name!r} changed shape: {list(shape)} -> {list(gshape)}")
        if gdtype != dtype and not (gdtype.kind == "f" and dtype.kind == "f"):
            problems.append(f"output {name!r} changed dtype: {dtype} -> {gdtype}")
        if finite and not gfinite:
            problems.append(f"output {name!r} has NaN/Inf values (the input model's has none)")
    return problems


def _graph_of(model: Model | str | os.PathLike[str]) -> Any:
    """The ModelProto of a Model, or of a file (weights not loaded), for :func:`input_hints`."""
    if isinstance(model, Model):
        return model.proto
    import onnx

    try:
        return onnx.load(str(model), load_external_data=False)
    except Exception:  # hints are optional; the session already loaded the file
        return None


def run_model(model: Model | str | os.PathLike[str], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a model on ONNX Runtime CPU; return outputs by name."""
    s = make_session(model)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, dict(feeds))))


__all__ = ["BROKEN_COS", "BROKEN_TOP1", "DEFAULT_MIN_COS", "DEFAULT_MIN_TOP1", "Verdict", "is_logit_like", "verdict",
           "CheckResult", "OutputDiff", "compare", "diff_outputs", "load_feeds", "make_session", "mean_pooled_cosine",
           "neighbour_agreement", "sentence_embeddings", "FeedSynthesisError", "InputHints", "input_hints",
           "random_feeds", "referencing_proto", "run_model", "synthesize_feeds", "RunSignature", "run_signature", "signature_problems"]
