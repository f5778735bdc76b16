"""Passes ``masks`` (unstructured sparsity) and ``nm`` (N:M sparsity along K) on initializers.

Both passes zero entries of constant weights of Conv / ConvTranspose / MatMul / Gemm (found by
:mod:`onnxprune.analysis.weights`) and change nothing else in the graph.

**masks(sparsity, criterion, scope, include, exclude, min_params, min_keep).**

* ``scope=layer``: every targeted weight gets exactly ``floor(sparsity * size)`` zeros (existing
  zeros count; a weight that already has more keeps them), chosen by
  :func:`onnxprune.criteria.registry.prune_weight_kn`.
* ``scope=row``: ``magnitude`` ranked per output (each column of the ``[K, N]`` view loses exactly
  ``floor(sparsity * K)`` weights), the comparison group Wanda uses. On all-MiniLM-L6-v2 at 50% it
  keeps the embeddings closer than per-layer ranking (cosine 0.753 vs 0.721, measured with the
  peer tool's per-row magnitude); ``layer`` stays the default because it is the exact
  per-layer count that ``scope=global`` and OWL generalise.
* ``scope=global``: all targeted weights are ranked together. Scores are normalised per layer so
  that one layer cannot be emptied by scale alone: ``score = |W| / rms(W≠0)`` (the root mean
  square of the layer's non-zero weights; for ``wanda`` the Wanda score divided by its own
  layer RMS). The ``floor(sparsity * total)`` lowest scores over all layers are pruned (ties by
  layer order, then index), then a guard keeps at least ``max(1, ceil(min_keep * size))`` weights
  in every layer (that layer's top scores), so the total can fall slightly short of the target.

**nm(n, m, criterion, include, exclude, min_params).** Keeps the ``n`` largest of every ``m``
consecutive weights along K, for every other index. Weights whose K is not a multiple of ``m``,
whose K axis is untraceable or whose consumers disagree on it are skipped with a reason (stats
and a warning). Grouped convolutions are masked (ONNX Runtime is indifferent) but marked: TensorRT
does not run them on sparse tensor cores.

**Targets.** By default, every weight found by the analysis except those with a ``skip_reason``
(1-D weights, embeddings that are also Gather data) and those smaller than ``min_params``.
``include`` (regex, ``re.search`` on the initializer or consumer node names) restricts the
targets to matches and also admits weights that are excluded by default, including initializers
that are no GEMM weight at all (biases, norm scales, embedding tables; ``masks`` only, since they
have no K axis). ``exclude`` removes matches. An ``include`` that matches nothing is an error.
Weights used inside If/Loop/Scan bodies are never changed (subgraphs are not pruned): initializers
stored in a body, and main-graph initializers a body reads (directly or through a Transpose /
Reshape / ... chain), even when a main-graph Conv/MatMul/Gemm also reads them; they are listed in
``skipped`` with the node whose body uses them.

**Per-layer overrides** come from a recipe: ``ctx.recipe_overrides[pass_name]`` is
``{regex: {option: value}}``; every regex that matches (``re.search``) an initializer name or the
name of a consuming node applies, in order, and the merged options are validated like pass
options. ``skip = true`` leaves the weight alone. A regex that matches no weight is an error
naming it (it would otherwise be silently ignored). In
global scope, a weight with an overridden ``sparsity`` is pruned on its own (layer scope).

**Persistence.** The current zeros of a weight are a keep-mask: they are pruned first and the new
mask is ANDed with it, so a later ``masks`` or ``nm`` never revives a zero.

**MatMulNBits** (com.microsoft 4-bit, as ONNX Runtime GenAI writes them): ``criterion=magnitude``
masks (and N:M along K) are written into the codes (``q = zero point``, so the dequantised value
is exactly 0; :mod:`onnxprune.analysis.nbits`), scored on the dequantised values, per layer
whatever ``scope``; calibration criteria, ``refit`` and float zero points that are no integer code
are refused with the reason (``skipped``). ``include``/``exclude`` match the weight or node name.

**Dtypes.** float16 / bfloat16 weights are masked in their own dtype (scores in float32). An
integer weight behind ``DequantizeLinear`` is scored on its dequantized value
``(q - zero_point) * scale`` and masked by setting ``q = zero_point`` (per-axis zero points along
the quantization axis), so the dequantized value is exactly 0.

**Calibration criteria** (``criterion=wanda|sparsegpt``, both passes) need calibration data
(``--calib``; :class:`~onnxprune.errors.CalibrationError` otherwise). ``mode=parallel`` takes all
statistics from the unpruned model in one ONNX Runtime pass; ``mode=sequential`` prunes stage by
stage (weights grouped by depth, ``stage_group`` stages per pass), each stage's statistics taken
from the model with the earlier stages already pruned. ``blocksize``/``percdamp`` tune SparseGPT;
``mask_input`` names the attention mask whose zeros are padding. Statistics are collected one
block of layers at a time (``max_memory``: bytes for one block's statistics; ``auto`` takes
``--max-memory``, else 25% of RAM), over ``calib_shards`` shards of the batches; ``backend``
(numpy / torch / auto) says where SparseGPT's Hessian products and solves run; ``--executor ray``
makes the shards Ray actors and the per-weight solves Ray tasks (:mod:`onnxprune.executor`).
``masks(allocation=owl)`` gives
each weight its own sparsity from its outlier ratio (OWL, :mod:`onnxprune.criteria.owl`) with the
parameter-weighted mean equal to ``sparsity``.

**Re-fit** (``refit=true``, both passes, every criterion; needs calibration data). After a
weight is masked, its kept entries are re-solved by least squares so that the layer's output on
the calibration tokens matches the dense layer's (:func:`onnxprune.criteria.reconstruct.refit`,
mask fixed, ridge ``refit_damp · mean diag(XᵀX)``; an output whose re-fit would not lower its
error keeps the masked weight). ``mode=auto`` (the default) means ``sequential`` when
re-fitting: stage by stage, each stage's inputs ``X_p`` taken from the model pruned (and
re-fitted) so far and matched to the dense model's ``X_d`` (``C = X_pᵀX_d`` from a second,
unchanged copy of the model streamed in step), so earlier layers' errors are corrected rather
than compounded; ``mode=parallel`` fits every layer to the dense inputs in one pass. The
criterion sees the same statistics (``sumsq = diag G``, ``H = G``). Not re-fitted (listed in
``refit.skipped``, still masked): quantized weights, k×k convolutions (the per-channel
covariance ignores the taps), weights without one traceable K axis. Stats per weight:
``refit`` with the relative calibration error ``‖X_d W − X_p W'‖² / ‖X_d W‖²`` before and after,
the solver and the seconds; totals under ``refit``.

Stats: per weight ``nnz_before``/``nnz_after``/``size``; ``skipped`` (name -> reason); totals.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxprune.analysis.calibration import (
    as_calibration,
    calib_targets,
    calibration_stages,
    collect,
    memory_budget,
    needs_calibration,
)
from onnxprune.analysis.nbits import (
    NBitsWeight,
    mask_refusal,
    nbits_weights,
    prune_codes,
)
from onnxprune.analysis.quant import quant_zero_points
from onnxprune.analysis.weights import (
    WeightInfo,
    find_weights,
    from_kn,
    hoist_constant_weights,
    match_names,
    subgraph_reads,
    subgraph_skip_reason,
    subgraph_weights,
    to_kn,
    weight_label,
    weight_labels,
)
from onnxprune.criteria.backend import BACKENDS
from onnxprune.criteria.backend import resolve as resolve_backend
from onnxprune.criteria.masks import magnitude_scores, topk_mask
from onnxprune.criteria.owl import (
    ALLOCATIONS,
    block_keys,
    outlier_ratio,
    owl_sparsities,
)
from onnxprune.criteria.reconstruct import refit as refit_kn
from onnxprune.criteria.registry import CRITERIA, prune_weight_kn
from onnxprune.criteria.wanda import wanda_scores
from onnxprune.errors import PassError, PipelineError
from onnxprune.executor import InProcessExecutor, make_executor
from onnxprune.ir.model import Model
from onnxprune.pipeline.base import Pass, PassContext, PassResult
from onnxprune.pipeline.options import build_options
from onnxprune.pipeline.registry import register_pass
from onnxprune.progress import progress
from onnxprune.summary import quantized_weights
from onnxprune.tensorrt.eligibility import trt_sparse_reason

log = logging.getLogger(__name__)

CALIB_CRITERIA = ("wanda", "sparsegpt")


def _regex(value: str | None, where: str) -> str | None:
    if value:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{where}: invalid regular expression {value!r}: {exc}") from None
    return value


#: Options that ``masks`` and ``nm`` share: name -> (default, field metadata).
_SHARED_OPTIONS: dict[str, tuple[Any, dict[str, Any]]] = {
    "criterion": ("magnitude", {"help": "importance criterion", "choices": CRITERIA}),
    "exclude": (None, {"help": "regex on initializer/node names to leave alone"}),
    "min_params": (0, {"help": "skip weights with fewer elements", "min": 0}),
    "mode": ("auto", {"help": "calibration statistics: parallel (dense model, one calibration pass), sequential "
                              "(stage by stage, on the model pruned so far) or auto (sequential when refit, else "
                              "parallel)",
                      "choices": ("auto", "parallel", "sequential")}),
    "refit": (False, {"help": "re-solve the kept weights of every masked layer by least squares on calibration data "
                              "(needs --calib)"}),
    "refit_damp": (0.01, {"help": "refit: ridge, share of the mean input energy diag(XᵀX)", "min": 0.0}),
    "stage_group": (1, {"help": "sequential: depth stages per calibration pass", "min": 1}),
    "blocksize": (128, {"help": "sparsegpt: input channels per block", "min": 1}),
    "percdamp": (0.01, {"help": "sparsegpt: dampening, share of the mean Hessian diagonal", "min": 0.0}),
    "mask_input": ("auto", {"help": "calibration: attention-mask input whose zeros are padding ('auto': found by "
                                    "name; 'none')"}),
    "max_memory": ("auto", {"help": "calibration: memory for the statistics of one block of layers (bytes, or 6G, "
                                    "512MiB; auto: --max-memory, else 25% of RAM)"}),
    "backend": ("auto", {"help": "sparsegpt: where the Hessian products and OBS solves run: numpy, torch (CUDA when "
                                 "there is a GPU), torch:cpu, torch:cuda; auto: torch on CUDA if available, else numpy",
                         "choices": BACKENDS}),
    "calib_shards": (1, {"help": "calibration: shards of the batches, each walked by its own runner (Ray actors "
                                 "with --executor ray); the same shards give the same bytes on any executor",
                         "min": 1}),
}


def _shared(name: str) -> Any:
    """A dataclass field for the shared option ``name`` (a fresh field per options class)."""
    default, metadata = _SHARED_OPTIONS[name]
    return field(default=default, metadata=metadata)


@dataclass
class MasksOptions:
    """Options of ``masks``."""

    sparsity: float = field(default=0.5, metadata={"help": "share of weights to zero, in [0, 1)", "min": 0.0,
                                                    "max_exclusive": 1.0})
    criterion: str = _shared("criterion")
    scope: str = field(default="layer", metadata={"help": "layer: each weight to the target; row: each output "
                                                          "row of each weight (magnitude); global: rank all "
                                                          "weights together (scores / layer RMS)",
                                                  "choices": ("layer", "row", "global")})
    include: str | None = field(default=None, metadata={"help": "regex on initializer/node names: only these "
                                                                 "(also admits biases, norms, embeddings)"})
    exclude: str | None = _shared("exclude")
    min_params: int = _shared("min_params")
    min_keep: float = field(default=0.01, metadata={"help": "global scope: share of each layer always kept",
                                                    "min": 0.0, "max": 1.0})
    mode: str = _shared("mode")
    stage_group: int = _shared("stage_group")
    blocksize: int = _shared("blocksize")
    percdamp: float = _shared("percdamp")
    mask_input: str = _shared("mask_input")
    max_memory: str = _shared("max_memory")
    calib_shards: int = _shared("calib_shards")
    backend: str = _shared("backend")
    refit: bool = _shared("refit")
    refit_damp: float = _shared("refit_damp")
    allocation: str = field(default="uniform", metadata={"help": "per-layer sparsity: uniform, or owl (outlier-"
                                                                 "weighted; needs calibration)",
                                                         "choices": ALLOCATIONS})
    owl_lambda: float = field(default=0.08, metadata={"help": "owl: largest deviation of a layer from the target",
                                                      "min": 0.0, "max_exclusive": 1.0})
    owl_m: float = field(default=5.0, metadata={"help": "owl: outlier threshold, multiple of the layer's mean score",
                                                "min_exclusive": 0.0})
    owl_blocks: str | None = field(default=None, metadata={"help": "owl: regex whose capture group names a block of "
                                                                   "weights sharing one sparsity (e.g. 'layer\\.(\\d+)'"
                                                                   "); default: each weight alone"})

    def validate(self) -> None:
        """Cross-field checks."""
        _regex(self.include, "include")
        _regex(self.exclude, "exclude")
        if self.scope == "global" and self.criterion == "sparsegpt":
            raise ValueError("scope=global is not available with criterion=sparsegpt (it updates weights "
                             "per layer); use scope=layer")
        _regex(self.owl_blocks, "owl_blocks")
        if self.scope == "row" and self.criterion != "magnitude":
            raise ValueError("scope=row applies to criterion=magnitude (wanda already ranks per output; sparsegpt "
                             "chooses its mask adaptively)")
        if self.scope == "global" and self.refit:
            raise ValueError("refit=true re-fits layer by layer; use scope=layer or scope=row")
        if self.scope != "layer" and self.allocation != "uniform":
            raise ValueError("allocation=owl sets per-layer sparsities; use it with scope=layer")


@dataclass
class NMOptions:
    """Options of ``nm``."""

    n: int = field(default=2, metadata={"help": "weights kept in every group", "min": 1})
    m: int = field(default=4, metadata={"help": "group length along K", "min": 2})
    criterion: str = _shared("criterion")
    include: str | None = field(default=None, metadata={"help": "regex on initializer/node names: only these"})
    exclude: str | None = _shared("exclude")
    min_params: int = _shared("min_params")
    mode: str = _shared("mode")
    stage_group: int = _shared("stage_group")
    blocksize: int = _shared("blocksize")
    percdamp: float = _shared("percdamp")
    mask_input: str = _shared("mask_input")
    max_memory: str = _shared("max_memory")
    calib_shards: int = _shared("calib_shards")
    backend: str = _shared("backend")
    refit: bool = _shared("refit")
    refit_damp: float = _shared("refit_damp")

    def validate(self) -> None:
        """Cross-field checks."""
        if self.n >= self.m:
            raise ValueError(f"n={self.n} must be less than m={self.m}")
        _regex(self.include, "include")
        _regex(self.exclude, "exclude")


# ---------------------------------------------------------------------- targets
@dataclass
class Target:
    """A weight to prune and the options that apply to it."""

    info: WeightInfo
    options: Any
    extra: bool = False  # included explicitly, not a GEMM weight (no K axis)


def _extra_info(model: Model, name: str) -> WeightInfo:
    t = model.initializer(name)
    assert t is not None
    dims = tuple(int(d) for d in t.dims)
    from onnx.helper import tensor_dtype_to_np_dtype

    users = [n.name or n.op_type for n in model.graph.node if name in n.input]
    return WeightInfo(name=name, nodes=users, op_type="-", shape=dims,
                      dtype=np.dtype(tensor_dtype_to_np_dtype(t.data_type)).name, k_axis=None, n_axis=None)


def _is_float(dtype_name: str) -> bool:
    return dtype_name == "bfloat16" or np.dtype(dtype_name).kind == "f"


def _overrides(ctx: PassContext, pass_name: str) -> dict[str, dict[str, Any]]:
    ov = ctx.recipe_overrides.get(pass_name) or {}
    if not isinstance(ov, dict):
        raise PipelineError(f"{pass_name}: recipe layer overrides must be a table of regex = {{option = value}}")
    for rx in ov:
        _regex_or_pipeline(rx, f"{pass_name}: layer override")
    return ov


def _regex_or_pipeline(rx: str, where: str) -> None:
    try:
        re.compile(rx)
    except re.error as exc:
        raise PipelineError(f"{where}: invalid regular expression {rx!r}: {exc}") from None


def select_targets(model: Model, ctx: PassContext, pass_name: str, options: Any, options_cls: type,
                   *, allow_extra: bool, others_matched: bool = False) -> tuple[list[Target], dict[str, str]]:
    """Pick the weights a mask pass prunes, with per-layer options, and the skipped ones with reasons.

    ``others_matched``: ``include`` matched weights this function does not pick (MatMulNBits).

    Raises:
        PassError: ``include`` matches no initializer (and ``others_matched`` is false).
        PipelineError: a bad per-layer override.
    """
    weights = find_weights(model)
    overrides = _overrides(ctx, pass_name)
    base = dataclasses.asdict(options)
    include, exclude = options.include, options.exclude
    inc_rx = re.compile(include) if include else None
    targets: list[Target] = []
    skipped: dict[str, str] = {}
    matched_include = False
    known = {w.name for w in weights}
    in_bodies = subgraph_reads(model)
    candidates: list[tuple[WeightInfo, bool]] = [(w, False) for w in weights]
    if inc_rx is not None:
        for t in model.graph.initializer:
            if t.name in known or not inc_rx.search(t.name) or not model.is_constant(t.name):
                continue
            info = _extra_info(model, t.name)
            if _is_float(info.dtype):
                candidates.append((info, True))
    unmatched = [rx for rx in overrides if not any(match_names(rx, info) for info, _ in candidates)]
    if unmatched:
        examples = ", ".join(weight_label(info.name, info.nodes[0] if info.nodes else None)
                             for info, _ in candidates[:3])
        raise PassError(f"{pass_name}: recipe layer override {unmatched[0]!r} matches no weight (patterns are "
                        f"searched in initializer and consuming-node names, e.g. {examples or 'none'}; "
                        "`onnxprune inspect MODEL` lists them)")
    for info, extra in candidates:
        explicit = inc_rx is not None and match_names(include, info)
        matched_include |= explicit
        if inc_rx is not None and not explicit:
            continue
        if info.name in in_bodies:  # changing it would change an If/Loop/Scan body: never pruned
            skipped[info.name] = subgraph_skip_reason(in_bodies[info.name])
            continue
        if exclude and match_names(exclude, info):
            skipped[info.name] = f"excluded by pattern {exclude!r}"
            continue
        if info.skip_reason and not explicit:
            skipped[info.name] = info.skip_reason
            continue
        if extra and not allow_extra:
            skipped[info.name] = "no reduction axis (not a Conv/MatMul/Gemm weight)"
            continue
        if not _is_float(info.dtype) and info.quant is None:
            skipped[info.name] = f"{info.dtype} weight without DequantizeLinear"
            continue
        opts = options
        merged: dict[str, Any] = {}
        for rx, values in overrides.items():
            if match_names(rx, info):
                if not isinstance(values, dict):
                    raise PipelineError(f"{pass_name}: layer override {rx!r} must be a table of options")
                merged.update(values)
        if merged.pop("skip", False):
            skipped[info.name] = "skipped by a recipe layer override"
            continue
        if merged:
            opts = build_options(options_cls, {**base, **merged}, f"{pass_name} (layer override for {info.name})")
        if info.size < opts.min_params:
            skipped[info.name] = f"{info.size} elements < min_params={opts.min_params}"
            continue
        targets.append(Target(info, opts, extra))
    for name, label in subgraph_weights(model).items():  # used inside a body only, or stored there
        if inc_rx is not None:
            if not inc_rx.search(name):
                continue
            matched_include = True
        skipped.setdefault(name, subgraph_skip_reason(label))
    if inc_rx is not None and not matched_include and not others_matched:
        raise PassError(f"{pass_name}: include pattern {include!r} matches no weight or initializer")
    return targets, skipped


def _nbits_selected(w: NBitsWeight, options: Any) -> bool:
    """``include`` / ``exclude`` (regex on the weight or node name) admit this MatMulNBits weight."""
    names = (w.weight, w.node)
    if options.include and not any(re.search(options.include, x) for x in names):
        return False
    return not (options.exclude and any(re.search(options.exclude, x) for x in names))


# ---------------------------------------------------------------------- per-weight work
def _dequantized(model: Model, info: WeightInfo, q: np.ndarray) -> np.ndarray:
    assert info.quant is not None
    scale = np.asarray(model.get_array(info.quant.scale), dtype=np.float32)
    if scale.size > 1:
        shape = [1] * len(info.shape)
        shape[info.quant.axis] = scale.size  # type: ignore[index]
        scale = scale.reshape(shape)
    zp = quant_zero_points(model, info)
    return (q.astype(np.float32) - np.asarray(zp, dtype=np.float32)) * scale


def _nonzero_mask(model: Model, info: WeightInfo, arr: np.ndarray) -> np.ndarray:
    if info.quant is not None:
        return arr != quant_zero_points(model, info)
    return arr != 0


def _write(model: Model, info: WeightInfo, arr: np.ndarray, keep: np.ndarray) -> None:
    """Apply the keep-mask to ``arr`` (its own dtype; zero point for quantized weights) and store it."""
    zero: Any = quant_zero_points(model, info) if info.quant is not None else np.zeros((), dtype=arr.dtype)
    model.set_array(info.name, np.where(keep, arr, zero).astype(arr.dtype, copy=False))


def _kn(arr: np.ndarray, info: WeightInfo) -> np.ndarray:
    return to_kn(arr, info) if info.k_axis is not None else arr.reshape(-1, 1)


def _unkn(arr2d: np.ndarray, info: WeightInfo) -> np.ndarray:
    return from_kn(arr2d, info) if info.k_axis is not None else arr2d.reshape(info.shape)


def prune_target(model: Model, target: Target, *, criterion: str, sparsity: float | None,
                 nm: tuple[int, int] | None, stats: Any = None) -> tuple[int, int]:
    """Prune one weight in place; returns ``(nnz_before, nnz_after)``."""
    job = prepare_target(model, target, criterion=criterion, sparsity=sparsity, nm=nm, stats=stats)
    return store_target(model, target, job, prune_weight_kn(**job.call))


@dataclass
class Job:
    """One weight's solve: the keyword arguments of :func:`prune_weight_kn` and what storing the result needs."""

    call: dict[str, Any]
    arr: np.ndarray
    keep_before: np.ndarray
    nnz_before: int


def prepare_target(model: Model, target: Target, *, criterion: str, sparsity: float | None,
                   nm: tuple[int, int] | None, stats: Any = None) -> Job:
    """Read one weight and build its solve (no change to the model)."""
    info = target.info
    arr = np.asarray(model.get_array(info.name))
    keep_before = _nonzero_mask(model, info, arr)
    nnz_before = int(np.count_nonzero(keep_before))
    values = _dequantized(model, info, arr) if info.quant is not None else arr
    keep_kn = _kn(keep_before, info) if nnz_before < arr.size else None  # no zeros yet: no mask to keep
    call = {"W_kn": _kn(values, info), "criterion": criterion, "sparsity": sparsity, "nm": nm,
            "keep_mask_kn": keep_kn, "stats": stats, "options": target.options}
    return Job(call, arr, keep_before, nnz_before)


def store_target(model: Model, target: Target, job: Job, new_kn: np.ndarray) -> tuple[int, int]:
    """Write a solved weight back; returns ``(nnz_before, nnz_after)``."""
    info, arr, keep_before, nnz_before = target.info, job.arr, job.keep_before, job.nnz_before
    criterion = job.call["criterion"]
    new = _unkn(new_kn, info)
    if info.quant is not None:
        keep = (new != 0) & keep_before
        nnz_after = int(np.count_nonzero(keep))
        if nnz_after != nnz_before:
            _write(model, info, arr, keep)
        return nnz_before, nnz_after
    # magnitude / wanda return W * mask (mask ANDed with the current non-zeros); SparseGPT also
    # updates the kept weights. Either way the result is stored as is, in the weight's dtype.
    nnz_after = int(np.count_nonzero(new))
    if criterion == "sparsegpt" or nnz_after != nnz_before:
        model.set_array(info.name, new.astype(arr.dtype, copy=False))
    return nnz_before, nnz_after


def _collect_stats(model: Model, ctx: PassContext, targets: list[Target], criterion: str) -> dict[str, Any]:
    """Calibration statistics per weight name for wanda / sparsegpt (one streaming pass)."""
    if criterion not in CALIB_CRITERIA:
        return {}
    needs_calibration("masks", f"criterion={criterion}", ctx.calibration)
    return collect(model, ctx.calibration, [t.info for t in targets], criterion=criterion)


def _refit_skip(info: WeightInfo) -> str | None:
    """Why ``refit`` leaves this (masked) weight as it is, or None."""
    if info.k_axis is None or info.conflict:
        return info.conflict or "no single K axis"
    if info.quant is not None:
        return "quantized weight (its values are integers behind DequantizeLinear)"
    if not _is_float(info.dtype):
        return f"{info.dtype} weight"
    if info.op_type == "Conv" and math.prod(info.shape[2:]) > 1:
        return "k×k Conv (the per-channel input covariance ignores the kernel taps)"
    return None


def _refit_weight(model: Model, info: WeightInfo, dense: np.ndarray, stats: dict[str, Any],
                  damp: float) -> dict[str, Any]:
    """Re-fit the masked weight ``info`` of ``model`` towards its dense value ``dense``; store it, say what happened."""
    t0 = time.perf_counter()
    arr = np.asarray(model.get_array(info.name))
    W0 = to_kn(arr, info)
    new, res = refit_kn(to_kn(dense, info), W0 != 0, stats["H"], stats.get("C"), stats.get("D"), W0=W0, damp=damp)
    if res.improved:
        model.set_array(info.name, from_kn(new, info).astype(arr.dtype, copy=False))
    out = {"rel_err_before": round(res.rel_before, 6), "rel_err_after": round(res.rel_after, 6),
           "outputs_improved": res.improved, "outputs": res.outputs, "solver": res.method,
           "iterations": res.iterations, "tokens": int(stats.get("tokens", 0)),
           "seconds": round(time.perf_counter() - t0, 3)}
    log.info("refit %s: relative error %.5f -> %.5f (%s, %.2fs)", info.name, res.rel_before, res.rel_after,
             res.method, out["seconds"])
    return out


def _refit_summary(per_weight: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Totals of the per-weight ``refit`` entries (None when nothing was re-fitted)."""
    done = {k: v["refit"] for k, v in per_weight.items() if isinstance(v.get("refit"), dict) and "solver" in v["refit"]}
    skipped = {k: v["refit"] for k, v in per_weight.items() if isinstance(v.get("refit"), str)}
    if not done and not skipped:
        return None
    return {"weights_refit": len(done), "skipped": skipped,
            "mean_rel_err_before": round(float(np.mean([r["rel_err_before"] for r in done.values()])), 6) if done
            else 0.0,
            "mean_rel_err_after": round(float(np.mean([r["rel_err_after"] for r in done.values()])), 6) if done
            else 0.0,
            "seconds": round(sum(r["seconds"] for r in done.values()), 3)}


def _prune_layerwise(model: Model, ctx: PassContext, targets: list[Target], opts: Any,
                     pattern: Any, skipped: dict[str, str]) -> dict[str, dict[str, int]]:
    """Prune ``targets`` one by one; ``pattern(target) -> (sparsity, nm)``.

    wanda / sparsegpt targets get their statistics from
    :func:`onnxprune.analysis.calibration.calibration_stages`: ``mode=parallel`` collects all of
    them on the model before pruning (one pass), ``mode=sequential`` one depth stage at a time on
    the model pruned so far. With ``refit`` every criterion goes that way (``kind=cross``: the
    sequential statistics also hold ``C``/``D`` against an unchanged copy of the model) and each
    weight is re-fitted right after it is masked, before the next stage's statistics are taken.
    """
    per_weight: dict[str, dict[str, int]] = {}
    refit = bool(getattr(opts, "refit", False))
    mode = opts.mode if opts.mode != "auto" else ("sequential" if refit else "parallel")
    refits: dict[str, Any] = {}
    budget = memory_budget(opts.max_memory if opts.max_memory != "auto" else ctx.options.get("max_memory"))
    executor = make_executor(ctx.options.get("executor"))

    def job(t: Target, stats: Any) -> Job:
        sparsity, nm = pattern(t)
        return prepare_target(model, t, criterion=t.options.criterion, sparsity=sparsity, nm=nm,
                              stats=stats if t.options.criterion in CALIB_CRITERIA else None)

    def one(t: Target, stats: Any, solved: tuple[Job, np.ndarray] | None = None) -> None:
        reason = _refit_skip(t.info) if refit else None
        dense = np.array(model.get_array(t.info.name)) if refit and stats is not None and reason is None else None
        if solved is None:
            j = job(t, stats)
            solved = (j, prune_weight_kn(**j.call))
        b, a = store_target(model, t, *solved)
        if refit:
            refits[t.info.name] = (reason or "no calibration statistics" if dense is None
                                   else _refit_weight(model, t.info, dense, stats, opts.refit_damp))
        per_weight[t.info.name] = {"node": t.info.nodes[0] if t.info.nodes else None, "size": t.info.size,
                                   "nnz_before": b, "nnz_after": a}

    plain = [t for t in targets if t.options.criterion not in CALIB_CRITERIA and not refit]
    for t in progress(plain, total=len(plain), desc="pruning", unit="layer"):
        one(t, None)
    dense_model = model.copy() if refit and mode == "sequential" else None
    for crit in CRITERIA if refit else CALIB_CRITERIA:
        group = [t for t in targets if t.options.criterion == crit]
        if not group:
            continue
        needs_calibration("masks", "refit=true" if refit else f"criterion={crit}", ctx.calibration)

        calib = as_calibration(ctx.calibration, model)
        by_name = {t.info.name: t for t in group}
        ctargets = calib_targets(model, [t.info for t in group])
        for ct in ctargets:
            if ct.skip_reason and crit not in CALIB_CRITERIA:  # magnitude needs no statistics: masked, not re-fitted
                one(by_name[ct.weight], None)
                refits[ct.weight] = ct.skip_reason
            elif ct.skip_reason:
                skipped[ct.weight] = f"{crit}: {ct.skip_reason}"
        kind = "cross" if refit else "hessian" if crit == "sparsegpt" else "sumsq"
        stages = calibration_stages(model, ctargets, calib, kind=kind, mode=mode, token_mask_input=opts.mask_input,
                                    stage_group=opts.stage_group, dense=dense_model, chunk_bytes=budget,
                                    executor=executor, shards=opts.calib_shards,
                                    backend=resolve_backend(opts.backend) if crit == "sparsegpt" else None)
        for stage, stats in stages:
            for ct in stage:
                if ct.weight not in stats:
                    skipped[ct.weight] = f"{crit}: consumers of the weight disagree on its input channels"
            ready = [by_name[ct.weight] for ct in stage if ct.weight in stats]
            if isinstance(executor, InProcessExecutor):
                for t in progress(ready, total=len(ready), desc=f"pruning ({crit})", unit="layer"):
                    one(t, stats[t.info.name])
                continue
            # the solves as tasks: weights and statistics by reference, results written here
            jobs = [job(t, stats[t.info.name]) for t in ready]
            calls = [{**j.call, "W_kn": executor.put(j.call["W_kn"]), "stats": executor.put(j.call["stats"])}
                     for j in jobs]
            for t, j, new in zip(ready, jobs, executor.map(prune_weight_kn, calls)):
                one(t, stats[t.info.name], (j, new))
    for name, r in refits.items():
        if name in per_weight:
            per_weight[name]["refit"] = r  # type: ignore[assignment]
    return per_weight


def _result_stats(per_weight: dict[str, dict[str, int]], skipped: dict[str, str]) -> dict[str, Any]:
    total = sum(v["size"] for v in per_weight.values())
    before = sum(v["nnz_before"] for v in per_weight.values())
    after = sum(v["nnz_after"] for v in per_weight.values())
    return {
        "weights_pruned": sum(1 for v in per_weight.values() if v["nnz_after"] != v["nnz_before"]),
        "weights_targeted": len(per_weight), "weights_skipped": len(skipped),
        "params": total, "nnz_before": before, "nnz_after": after,
        "sparsity_after": round(1.0 - after / total, 6) if total else 0.0,
        "weights": per_weight, "skipped": skipped,
    } | ({"refit": r, "refit_weights": r["weights_refit"], "refit_s": r["seconds"],
          "refit_rel_err": f"{r['mean_rel_err_before']:.4f} -> {r['mean_rel_err_after']:.4f}"}
         if (r := _refit_summary(per_weight)) is not None else {})


def _no_weights(model: Model, ctx: PassContext, pass_name: str, skipped: dict[str, str]) -> PassResult:
    stats: dict[str, Any] = {"weights_pruned": 0, "weights_targeted": 0}
    if skipped:  # e.g. weights only used inside If/Loop/Scan bodies
        stats.update(weights_skipped=len(skipped), skipped=skipped)
        listing = ", ".join(list(skipped)[:5]) + (" ..." if len(skipped) > 5 else "")
        ctx.warn(f"{pass_name}: the model has no prunable weight outside If/Loop/Scan bodies; nothing changed "
                 f"(skipped: {listing})")
    elif quant_ops := sorted({q.op for q in quantized_weights(model).values() if q.op != "DequantizeLinear"}):
        stats["quantized_ops"] = quant_ops
        ctx.warn(f"{pass_name}: the model's weights are inputs of quantized ops ({', '.join(quant_ops)}), which "
                 f"{pass_name} does not prune (it prunes float weights and weights behind DequantizeLinear); "
                 "nothing changed")
    else:
        ctx.warn(f"{pass_name}: the model has no prunable weight (no Conv/ConvTranspose/MatMul/Gemm with a "
                 "constant weight); nothing changed")
    return PassResult(model, False, stats)


# ---------------------------------------------------------------------- passes
class _SparsityPass(Pass):
    """What ``masks`` and ``nm`` share: target selection and the no-weight case; ``_prune`` does the rest."""

    preserves = ("weights",)
    layer_overrides = True
    #: Whether ``include`` may admit initializers that are no GEMM weight (they have no K axis).
    allow_extra = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Mask the targeted weights in place.

        Weights held by ``Constant`` nodes (Paddle2ONNX, old tf2onnx) become initializers first
        (exact), so they are pruned like any other weight.
        """
        hoisted = hoist_constant_weights(model)
        if hoisted:
            ctx.invalidate(())
        packed = {k: w for k, w in nbits_weights(model).items() if _nbits_selected(w, self.options)}
        targets, skipped = select_targets(model, ctx, self.name, self.options, self.Options,
                                          allow_extra=self.allow_extra, others_matched=bool(packed))
        if not targets and not find_weights(model) and not self.options.include and not packed:
            result = _no_weights(model, ctx, self.name, skipped)
        else:
            result = self._prune(model, ctx, targets, skipped)
        if packed:
            result = self._prune_nbits(model, ctx, packed, result, skipped)
        if hoisted:
            result.stats["constants_to_initializers"] = len(hoisted)
            result = PassResult(result.model, True, result.stats)
        return result

    def _prune(self, model: Model, ctx: PassContext, targets: list[Target],
               skipped: dict[str, str]) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def _prune_nbits(self, model: Model, ctx: PassContext, packed: dict[str, NBitsWeight], result: PassResult,
                     skipped: dict[str, str]) -> PassResult:
        """Mask ``MatMulNBits`` weights in their codes (:func:`onnxprune.analysis.nbits.prune_codes`)."""
        opts = self.options
        nm = (opts.n, opts.m) if self.name == "nm" else None
        per: dict[str, dict[str, Any]] = {}
        for name, w in packed.items():
            reason = mask_refusal(model, w, opts.criterion, opts.refit, nm)
            if reason is None and w.N * w.K < opts.min_params:
                reason = f"{w.N * w.K} elements < min_params={opts.min_params}"
            if reason:
                skipped[name] = reason
                continue
            before, after = prune_codes(model, w, None if nm else opts.sparsity, nm, opts)
            per[name] = {"node": w.node, "size": w.N * w.K, "nnz_before": before, "nnz_after": after,
                         "format": f"MatMulNBits {w.bits}-bit, block {w.block_size}"}
        stats = dict(result.stats)
        stats.update(_result_stats({**stats.get("weights", {}), **per}, skipped))
        stats["nbits_weights_masked"] = sum(v["nnz_after"] != v["nnz_before"] for v in per.values())
        if per:
            ctx.warn(f"{self.name}: {len(per)} MatMulNBits weight(s) masked in their quantised codes (q = zero point, "
                     "so they dequantise to exactly 0); ONNX Runtime's MatMulNBits kernels do not skip zeros, so this "
                     "saves nothing on ONNX Runtime by itself")
        refused = {k: skipped[k] for k in packed if k in skipped}
        if refused:
            ctx.warn(f"{self.name}: {len(refused)} MatMulNBits weight(s) left unmasked: "
                     + "; ".join(f"{k}: {v}" for k, v in list(refused.items())[:3]))
        return PassResult(result.model, result.modified or stats["nbits_weights_masked"] > 0, stats)


@register_pass
class MasksPass(_SparsityPass):
    """Unstructured sparsity on constant weights."""

    name = "masks"
    description = "unstructured sparsity: zero the least important weights (magnitude, wanda, sparsegpt)"
    Options = MasksOptions
    allow_extra = True

    def _prune(self, model: Model, ctx: PassContext, targets: list[Target], skipped: dict[str, str]) -> PassResult:
        """Mask ``targets`` in place (layer or global scope)."""
        opts: MasksOptions = self.options
        per_weight: dict[str, dict[str, int]] = {}
        calib = [t for t in targets if t.options.criterion in CALIB_CRITERIA]
        for t in calib:
            if t.extra or t.info.k_axis is None or t.info.conflict:
                skipped[t.info.name] = f"{t.options.criterion} needs a Conv/MatMul/Gemm weight with one K axis"
        targets = [t for t in targets if t.info.name not in skipped]
        glob = [t for t in targets if opts.scope == "global" and t.options.sparsity == opts.sparsity
                and t.options.criterion == opts.criterion]
        glob_names = {t.info.name for t in glob}
        stats_by_crit = {c: _collect_stats(model, ctx, [t for t in glob if t.options.criterion == c], c)
                         for c in {t.options.criterion for t in glob}}
        layer = [t for t in targets if t.info.name not in glob_names]
        goal = {t.info.name: t.options.sparsity for t in layer}
        if opts.allocation == "owl" and layer:

            needs_calibration("masks", "allocation=owl", ctx.calibration)
            free = [t for t in layer if t.options.sparsity == opts.sparsity and t.info.k_axis is not None]
            goal.update(owl_for_weights(model, [t.info for t in free], ctx.calibration, opts.sparsity,
                                        lam=opts.owl_lambda, m=opts.owl_m, blocks=opts.owl_blocks,
                                        token_mask_input=opts.mask_input))
        per_weight.update(_prune_layerwise(model, ctx, layer, opts, lambda t: (goal[t.info.name], None), skipped))
        if glob:
            per_weight.update(self._global(model, ctx, glob, opts, stats_by_crit.get(opts.criterion, {})))
        if skipped:
            log.info("masks: skipped %d weight(s) (reasons in the report's stats)", len(skipped))
        stats = _result_stats(per_weight, skipped)
        return PassResult(model, stats["weights_pruned"] > 0, stats)

    def _global(self, model: Model, ctx: PassContext, targets: list[Target], opts: MasksOptions,
                stats: dict[str, Any]) -> dict[str, dict[str, int]]:
        """Rank all ``targets`` together on RMS-normalised scores; guard each layer's minimum."""
        sizes = [t.info.size for t in targets]
        flat = np.empty(sum(sizes), dtype=np.float32)  # one buffer: no concatenated copy
        offset = 0
        for t in progress(targets, total=len(targets), desc="scoring (global)", unit="layer"):
            info = t.info
            arr = np.asarray(model.get_array(info.name))
            keep = _nonzero_mask(model, info, arr)
            values = _dequantized(model, info, arr) if info.quant is not None else arr
            if opts.criterion == "wanda":
                st = stats.get(info.name)
                s = wanda_scores(_kn(values, info), st["sumsq"] if isinstance(st, dict) else st)
                s = _unkn(s.astype(np.float32), info)
            else:
                s = magnitude_scores(values).astype(np.float32, copy=False)
            nz = s[keep]
            rms = float(np.sqrt(np.mean(np.square(nz, dtype=np.float64)))) if nz.size else 1.0
            flat[offset:offset + info.size] = np.where(keep, s / (rms if rms > 0 else 1.0), -np.inf).reshape(-1)
            offset += info.size
        keep_all = topk_mask(flat, opts.sparsity)
        out: dict[str, dict[str, int]] = {}
        offset = 0
        guarded = []
        for t, size in progress(zip(targets, sizes), total=len(targets), desc="pruning (global)", unit="layer"):
            info = t.info
            layer_keep = keep_all[offset:offset + size]
            layer_scores = flat[offset:offset + size]
            offset += size
            arr = np.asarray(model.get_array(info.name))
            keep_before = _nonzero_mask(model, info, arr).reshape(-1)
            nnz_before = int(np.count_nonzero(keep_before))
            min_keep = min(nnz_before, max(1, math.ceil(opts.min_keep * size)))
            if int(np.count_nonzero(layer_keep)) < min_keep:
                layer_keep = topk_mask(layer_scores, 1.0 - min_keep / size)
                guarded.append(info.name)
            layer_keep = layer_keep & keep_before
            nnz_after = int(np.count_nonzero(layer_keep))
            if nnz_after != nnz_before:
                _write(model, info, arr, layer_keep.reshape(info.shape))
            out[info.name] = {"node": info.nodes[0] if info.nodes else None, "size": size,
                              "nnz_before": nnz_before, "nnz_after": nnz_after}
        if guarded:
            ctx.warn(f"masks: global ranking would have left fewer than min_keep={opts.min_keep} of "
                     f"{len(guarded)} layer(s); kept their top weights instead: "
                     f"{', '.join(weight_labels(model, guarded[:5]).values())}")
        return out


@register_pass
class NMPass(_SparsityPass):
    """N:M sparsity along the reduction axis K."""

    name = "nm"
    description = "N:M sparsity along K (e.g. 2:4 for sparse tensor cores): keep n of every m consecutive weights"
    Options = NMOptions

    def _prune(self, model: Model, ctx: PassContext, targets: list[Target], skipped: dict[str, str]) -> PassResult:
        """Apply the N:M pattern to every eligible weight in place."""
        opts: NMOptions = self.options
        eligible = []
        not_trt: dict[str, str] = {}
        for t in targets:
            info, o = t.info, t.options
            if info.k_axis is None:
                skipped[info.name] = info.skip_reason or "K axis not traceable"
            elif info.conflict:
                skipped[info.name] = info.conflict
            elif (info.k or 0) % o.m:
                skipped[info.name] = f"K={info.k} is not a multiple of m={o.m}"
            else:
                eligible.append(t)
                reason = trt_sparse_reason(info)
                if reason is not None:
                    not_trt[info.name] = reason.message
        per_weight = _prune_layerwise(model, ctx, eligible, opts, lambda t: (None, (t.options.n, t.options.m)),
                                      skipped)
        # only what now holds the pattern: a weight the criterion skipped (sparsegpt on a grouped Conv) stays dense
        not_trt = {k: v for k, v in not_trt.items() if k in per_weight and k not in skipped}
        left_dense = {t.info.name: skipped[t.info.name] for t in eligible if t.info.name in skipped}
        unusual = {k: v for k, v in skipped.items() if "multiple of" in v or "K axis" in v or "disagree" in v}
        labels = weight_labels(model, list(unusual)[:5] + list(not_trt)[:5] + list(left_dense)[:5])
        if left_dense:
            ctx.warn(f"nm: {len(left_dense)} weight(s) left dense by the criterion: "
                     + ", ".join(f"{labels[k]}: {v}" for k, v in list(left_dense.items())[:5])
                     + (" ..." if len(left_dense) > 5 else ""))
        if unusual:
            listing = ", ".join(f"{labels[k]}: {v}" for k, v in list(unusual.items())[:5])
            ctx.warn(f"nm: skipped {len(unusual)} weight(s) that cannot hold {opts.n}:{opts.m} along K: {listing}"
                     + (" ..." if len(unusual) > 5 else ""))
        if not_trt:
            ctx.warn(f"nm: {len(not_trt)} masked weight(s) TensorRT will not run sparse: "
                     + ", ".join(f"{labels[k]}: {v}" for k, v in list(not_trt.items())[:5]))
        stats = _result_stats(per_weight, skipped)
        stats["not_tensorrt_sparse"] = not_trt
        return PassResult(model, stats["weights_pruned"] > 0, stats)


__all__ = ["Job", "MasksOptions", "MasksPass", "NMOptions", "NMPass", "Target", "prepare_target", "prune_target",
           "select_targets", "store_target"]


def owl_for_weights(
    model: Any,
    weights: Sequence[Any],
    calib: Any,
    target: float,
    *,
    lam: float = 0.08,
    m: float = 5.0,
    blocks: str | None = None,
    token_mask_input: str | None = "auto",
) -> dict[str, float]:
    """OWL sparsities for ``weights`` (:class:`~onnxprune.analysis.weights.WeightInfo`) of ``model``.

    One sums-of-squares calibration pass on the model as it is; the outlier ratio uses the Wanda
    scores in the ``[K, N]`` layout. With ``blocks`` (a regex, see :func:`block_keys`) the ratio is
    taken over the concatenated scores of each block and every weight of a block gets the
    block's sparsity (the OWL paper's granularity is the transformer block); without it, every
    weight is its own block. Weights without statistics keep ``target``.
    """
    info = {w.name: w for w in weights}
    keys = block_keys(weights, blocks)
    stats = collect(model, calib, weights, criterion="wanda", token_mask_input=token_mask_input)
    scores: dict[str, list[np.ndarray]] = {}
    for n, st in stats.items():
        s = wanda_scores(to_kn(np.asarray(model.get_array(n)), info[n]), st["sumsq"])
        scores.setdefault(keys[n], []).append(s.ravel())
    ratios = {k: outlier_ratio(np.concatenate(v), m) for k, v in scores.items()}
    sizes = {k: int(sum(a.size for a in v)) for k, v in scores.items()}
    per_block = owl_sparsities(ratios, sizes, target, lam)
    out = {w.name: float(target) for w in weights}
    out.update({n: per_block[keys[n]] for n in stats})
    return out
