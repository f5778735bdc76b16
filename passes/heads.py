"""Passes ``heads`` and ``ffn``: remove attention heads and feed-forward neurons.

Groups come from :mod:`onnxprune.analysis.heads.groups` (one per attention block: width = heads,
or KV heads for grouped-query attention, each owning its group of query heads; one per FFN
block: width = intermediate neurons, gate and up projections tied). Removal is
:func:`onnxprune.analysis.removal.apply_removal`: the Q/K/V (or up/gate) output columns and
biases, the output (down) projection's input rows and every shape constant and attribute that
holds the head count or width.

**Importance** of unit ``u`` of a group:

* ``l2``: ``sqrt(sum of squares of every parameter position the unit owns)``;
* ``activation``: ``mean_t |x[t, c]|`` averaged over the unit's channels ``c`` of the tensor the
  output (down) projection reads -- the heads' attention output before the output projection,
  the neurons' activations -- streamed through ONNX Runtime over ``ctx.calibration``
  (accumulating per-channel sums only, so memory does not grow with the data);
* ``weighted``: the ``activation`` score times the L2 norm of the unit's rows of the output
  (down) projection, i.e. how much the unit can move the block's output (the weighting Wanda and
  FLAP use). On all-MiniLM-L6-v2 it keeps the embeddings closer than either alone.

**Selection** is :func:`onnxprune.criteria.structured.select`, shared with ``channels``:
``heads``: the ``round(ratio * width)`` lowest units per block (``scope=layer``), or the lowest
``round(ratio * total)`` over all blocks with scores divided by their block's mean
(``scope=global``); every block keeps at least ``min_heads``. ``ffn``: per block, the kept
width is ``width - round(ratio * width)`` rounded up to a multiple of ``round_to``.

**Compensation** (``compensate=true``, FLAP-style): with ``m_c = mean_t x[t, c]`` over the
calibration data and ``W_out`` the output projection (``y = x W_out + b``), removing channels
``R`` changes the mean output by ``-sum_{c in R} m_c W_out[c, :]``; that vector is added to the
bias ``b`` (a bias ``Add`` is created when there is none), so the mean output over the
calibration data is unchanged.

**Reconstruction** (``reconstruct=true``, FLAP / ZipLM / SliceGPT-style): the output (down)
projection ``y = x W + b`` is re-solved by least squares so that the block's output on the
calibration tokens matches the dense block's, ``min ‖X W + b − X_S W'_S − b'‖²`` over the kept
rows ``S`` and the bias (:mod:`onnxprune.analysis.reconstruction`, solver
:func:`onnxprune.criteria.reconstruct.refit`, ridge ``damp · mean diag``); compensation is the
case with ``W'_S = W_S`` fixed. The re-fit never raises the layer's calibration error.
``criterion=reconstruction`` chooses the units by the error their removal leaves after that
re-fit (greedy Optimal Brain Surgeon on ``G̃ = X̃ᵀX̃``,
:func:`~onnxprune.criteria.structured.reconstruction_order`); with ``scope=global`` the per-block
counts come from the blocks' relative-error curves under one global count
(:func:`~onnxprune.criteria.structured.allocate`: non-uniform, from measured sensitivity).
Heads and FFN neurons never mix, so the projection's error is exactly the block's.

**Application.** The analysis runs on a copy. A block whose selected removal cannot be applied
(:func:`~onnxprune.analysis.removal.plan_problems`) is blocked with the reason
(``blocked_at_apply``) and the others are pruned; a run that removes nothing returns the input
model unchanged (``modified=False``); copies of shared constants that stay identical are merged
back (:func:`~onnxprune.analysis.removal.reshare`). On models under 50 MB of weights the result is
then run against its masked twin on one synthesized feed (``verify_twin``, as in ``channels``;
skipped with ``verify_twin=false`` or ``ctx.options["verify"] = False``); a disagreement fails
the pass naming the blocks. When ``heads`` recognises no block at all,
every Softmax attention candidate it looked at is listed with the reason
(``candidates`` in the stats, and a warning; :mod:`~onnxprune.analysis.heads.diagnose`).

Preconditions: static head/channel counts; ``activation``, ``weighted``, ``reconstruction``,
``compensate`` and ``reconstruct`` need calibration data (``--calibration``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxprune.analysis.calibration import (
    as_calibration,
    channel_stats,
    needs_calibration,
)
from onnxprune.analysis.dead import dead_units
from onnxprune.analysis.heads.diagnose import NO_SOFTMAX, why_no_heads
from onnxprune.analysis.heads.groups import find_groups
from onnxprune.analysis.heads.prepare import prepare_model
from onnxprune.analysis.heads.shapes import static_shapes
from onnxprune.analysis.kvcache import record_kept
from onnxprune.analysis.nbits import logical_array, nbits_weights
from onnxprune.analysis.reconstruction import (
    Consumer,
    consumer_stats,
    find_consumers,
    reconstruct,
    reconstruct_sequential,
    removal_curve,
)
from onnxprune.analysis.removal import (
    PruneGroup,
    apply_removal,
    check_twin,
    io_removed,
    masked_twin,
    plan_problems,
    positions,
    reshare,
)
from onnxprune.criteria.structured import allocate, kept_width, select
from onnxprune.ir.model import Model
from onnxprune.pipeline.base import Pass, PassContext, PassResult
from onnxprune.pipeline.registry import register_pass
from onnxprune.summary import count_parameters

log = logging.getLogger(__name__)

CRITERIA = ("l2", "activation", "weighted", "reconstruction", "dead")
#: Default ridge of the structural re-fit (relative to mean diag of the augmented Gram matrix).
DAMP = 1e-3

__all__ = ["FfnOptions", "FfnPass", "HeadsOptions", "HeadsPass", "channel_means", "unit_scores"]


def _damp() -> Any:
    """The ``damp`` option shared by heads and ffn: the ridge of the least-squares re-fit."""
    return field(default=DAMP, metadata={"help": "ridge of the re-fit, relative to the mean input energy", "min": 0.0})


def _verify_twin() -> Any:
    """The ``verify_twin`` option shared by heads and ffn."""
    return field(default=True, metadata={
        "help": "check the pruned model against its masked twin on one random input (models under 50 MB "
                "of weights; a disagreement fails the pass)"})


def _sequential() -> Any:
    """The ``sequential`` option field of heads and ffn."""
    return field(default=False, metadata={
        "help": "re-fit block by block in graph order on the inputs of the model pruned so far (one calibration "
                "pass per block)"})


def _criterion(projection: str) -> Any:
    """The ``criterion`` option field (the same choices for heads and ffn)."""
    return field(default="l2", metadata={
        "help": f"importance: weight norm, calibration activations, activations x {projection} row norms, "
                "or the output error left after a least-squares re-fit; dead: only the units whose "
                f"{projection} rows are exactly zero (exact; ratio ignored)", "choices": CRITERIA})


@dataclass
class HeadsOptions:
    """Options of ``heads``."""

    ratio: float = field(default=0.25, metadata={"help": "share of heads to remove per block (or overall)",
                                                 "min": 0.0, "max_exclusive": 1.0})
    criterion: str = _criterion("output-projection")
    scope: str = field(default="layer", metadata={"help": "rank heads per block or across all blocks",
                                                  "choices": ("layer", "global")})
    min_heads: int = field(default=1, metadata={"help": "heads (KV heads for GQA) every block keeps", "min": 1})
    compensate: bool = field(default=False, metadata={"help": "refit the output projection bias (needs calibration)"})
    reconstruct: bool = field(default=False, metadata={
        "help": "least-squares re-fit of the output projection (kept rows and bias) on calibration data"})
    damp: float = _damp()
    sequential: bool = _sequential()
    verify_twin: bool = _verify_twin()


@dataclass
class FfnOptions:
    """Options of ``ffn``."""

    ratio: float = field(default=0.25, metadata={"help": "share of intermediate neurons to remove per block",
                                                 "min": 0.0, "max_exclusive": 1.0})
    criterion: str = _criterion("down-projection")
    scope: str = field(default="layer", metadata={"help": "remove the share per block or across all blocks",
                                                  "choices": ("layer", "global")})
    round_to: int = field(default=1, metadata={"help": "kept width is a multiple of this", "min": 1})
    compensate: bool = field(default=False, metadata={"help": "refit the down projection bias (needs calibration)"})
    reconstruct: bool = field(default=False, metadata={
        "help": "least-squares re-fit of the down projection (kept rows and bias) on calibration data"})
    damp: float = _damp()
    sequential: bool = _sequential()
    verify_twin: bool = _verify_twin()


# ---------------------------------------------------------------------- importance
def unit_scores(model: Model, group: PruneGroup, roles: tuple[str, ...] = ("out", "in", "param")) -> np.ndarray:
    """L2 norm of every parameter position each unit owns (slices of the given roles): ``[width]``."""
    total = np.zeros(group.width, dtype=np.float64)
    units = np.arange(group.width)
    packed = nbits_weights(model)  # MatMulNBits weights are scored on their dequantised [N, K] values
    for s in group.slices:
        if s.role not in roles:
            continue
        arr = np.moveaxis(logical_array(model, s.initializer, packed), s.axis, 0)
        idx = positions(s, units).reshape(group.width, s.block)
        part = arr[idx].astype(np.float64)  # [W, block, ...]
        total += (part.reshape(group.width, -1) ** 2).sum(axis=1)
    return np.sqrt(total)


def channel_means(model: Model, tensors: Iterable[str], calibration: Any, who: str = "heads",
                  what: str = "this criterion") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tensor, per last-axis channel: ``(mean |x|, mean x)`` over every other position, float64.

    One pass of :func:`onnxprune.analysis.calibration.channel_stats` (padding tokens excluded).

    Raises:
        CalibrationError: no calibration data, or data that does not fit the model.
    """
    stats = channel_stats(model, calibration, [(t, -1) for t in tensors], who=who, what=what)
    return {t: v for (t, _), v in stats.items()}


def _activation_scores(group: PruneGroup, exits: list[tuple[str, str]],
                       means: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    score = np.zeros(group.width, dtype=np.float64)
    for _, tensor in exits:
        mabs = means[tensor][0]
        score += mabs.reshape(group.width, -1).mean(axis=1)
    return score / max(len(exits), 1)


# ---------------------------------------------------------------------- reconstruction-error selection
def _select(model: Model, live: list[PruneGroup], score_of: dict[str, np.ndarray], curves: dict[str, Any], opts: Any,
            mode: str) -> list[np.ndarray]:
    """Units to remove per group: :func:`select` on the scores, or the greedy re-fit order.

    With ``criterion=dead`` only the units whose consumer rows are exactly zero
    (:func:`~onnxprune.analysis.dead.dead_units`; ``ratio`` is ignored).

    With ``criterion=reconstruction`` every group with a curve removes the first ``n`` units of
    its greedy order: ``n`` is the per-block count of :func:`select` (``scope=layer``), or comes
    from :func:`allocate` over the curves divided by each block's output energy
    (``scope=global``: one global count, the next unit always from the block whose relative error
    grows least). Groups without a curve use their fallback scores.
    """
    min_keep = opts.min_heads if mode == "heads" else 1
    if opts.criterion == "dead":
        return [dead_units(model, g, min_keep) for g in live]
    round_to = getattr(opts, "round_to", 1)
    chosen = select([score_of[g.name] for g in live], opts.ratio, scope=opts.scope, min_keep=min_keep,
                    round_to=round_to)
    if not curves:
        return chosen
    with_curve = [i for i, g in enumerate(live) if curves.get(g.name) is not None]
    if opts.scope == "global":
        total = int(np.floor(opts.ratio * sum(live[i].width for i in with_curve) + 0.5))
        rel = [curves[live[i].name][1] / max(curves[live[i].name][2], 1e-300) for i in with_curve]
        counts = allocate(rel, total, [len(r) for r in rel])
    else:
        counts = [chosen[i].size for i in with_curve]
    for i, n in zip(with_curve, counts):
        w = live[i].width
        n = w - kept_width(w, n, min_keep=min_keep, round_to=round_to)
        chosen[i] = np.sort(curves[live[i].name][0][:n]).astype(np.int64)
    return chosen


def _curve_length(width: int, opts: Any, mode: str) -> int:
    """Units of a block to order: its per-block count, or up to ``min(2·ratio + 0.1, 1)·width`` for global."""
    min_keep = opts.min_heads if mode == "heads" else 1
    if opts.scope == "global":
        n = int(np.ceil(min(2 * opts.ratio + 0.1, 1.0) * width))
    else:
        n = width - kept_width(width, int(np.floor(opts.ratio * width + 0.5)), min_keep=min_keep)
    return max(0, min(n, width - max(min_keep, 1)))


# ---------------------------------------------------------------------- the passes
def _run_structured(model: Model, ctx: PassContext, mode: str, opts: Any) -> PassResult:
    """Find, score, select and remove units on a copy of ``model``.

    The copy is prepared (:func:`prepare_model` copies small shared constants per reader); when
    nothing is removed the input model is returned untouched with ``modified=False``, otherwise
    the pruned copy with byte-identical copies merged back (:func:`reshare`).
    """
    label = "heads" if mode == "heads" else "ffn"
    params_before = count_parameters(model)
    original = {t.name for t in model.graph.initializer}
    outputs = {o for n in model.graph.node for o in n.output}
    work = model.copy()
    prepared = prepare_model(work)
    groups, exits = find_groups(work, mode, static_shapes(work))
    blocked = [g for g in groups if not g.prunable]
    for g in blocked:
        ctx.warn(f"{label}: block {g.name} not pruned: {g.blocked}")
    live = [g for g in groups if g.prunable and g.width > 1]
    stats: dict[str, Any] = {"blocks_found": len(groups), "blocks_blocked": len(blocked),
                             "normalized_constants": prepared}
    unchanged = PassResult(model, False, stats)
    if not groups and mode == "heads":
        found = why_no_heads(work, static_shapes(work))
        stats["candidates"] = found
        ctx.warn("heads: no attention block recognised: " + ("; ".join(
            f"{c['softmax']}: {c['reason']}" for c in found[:5]) if found else NO_SOFTMAX))
    elif not groups:
        ctx.warn("ffn: no FFN block recognised (a MatMul/Gemm -> activation -> MatMul/Gemm chain with constant "
                 "weights and an elementwise activation between them); nothing changed")
    if not live or (opts.ratio == 0 and opts.criterion != "dead"):
        stats.update(params_before=params_before, params_after=params_before, params_removed=0,
                     units_removed=0)
        return unchanged
    recon = opts.reconstruct or opts.criterion == "reconstruction"
    needs_calib = opts.criterion in ("activation", "weighted") or opts.compensate or recon
    means: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    consumers: dict[str, Consumer] = {}
    grams: dict[str, np.ndarray] = {}
    input_means: dict[str, np.ndarray] = {}
    t_stats = time.perf_counter()
    if opts.compensate or recon:
        consumers, skipped = find_consumers(work, live)
        if skipped:
            stats["consumers_not_refitted"] = skipped
    if needs_calib and (opts.criterion in ("activation", "weighted") or not recon):
        what = {"activation": "criterion=activation", "weighted": "criterion=weighted"}.get(
            opts.criterion, "compensate=true")
        means = channel_means(work, [t for g in live for _, t in exits[g.name]] +
                              [c.tensor for c in consumers.values()], ctx.calibration, label, what)
        input_means = {t: m[1] for t, m in means.items()}
    if recon:
        needs_calibration(label, "reconstruct=true" if opts.reconstruct else "criterion=reconstruction",
                          ctx.calibration)
        grams, input_means = consumer_stats(work, as_calibration(ctx.calibration, work), list(consumers.values()))
    if opts.criterion == "activation":
        score_of = {g.name: _activation_scores(g, exits[g.name], means) for g in live}
    elif opts.criterion == "weighted":
        score_of = {g.name: _activation_scores(g, exits[g.name], means) * unit_scores(work, g, ("in",))
                    for g in live}
    elif opts.criterion == "dead":  # _select reads the zero rows itself; no scores needed
        score_of = {}
    else:
        score_of = {g.name: unit_scores(work, g) for g in live}
    curves: dict[str, Any] = {}
    if opts.criterion == "reconstruction":
        curves = {g.name: removal_curve(work, g, consumers, grams, _curve_length(g.width, opts, mode), opts.damp)
                  for g in live}
        stats["fallback_l2_blocks"] = sum(v is None for v in curves.values())
    if needs_calib:
        stats["calibration_s"] = round(time.perf_counter() - t_stats, 3)
    refused: dict[str, str] = {}
    while True:  # refuse the blocks whose plan cannot be applied, then select again
        chosen = _select(work, live, score_of, curves, opts, mode)
        removals = [(g, c) for g, c in zip(live, chosen) if c.size]
        bad = plan_problems(work, removals)
        if not bad:
            break
        refused.update(bad)
        live = [g for g in live if g.name not in bad]
    for name, reason in refused.items():
        ctx.warn(f"{label}: block {name} blocked: {reason}")
    if refused:
        stats.update(blocks_blocked_at_apply=len(refused), blocked_at_apply=refused)
    if not removals:
        stats.update(params_before=params_before, params_after=params_before, params_removed=0,
                     units_removed=0)
        return unchanged
    if opts.compensate or opts.reconstruct:
        t_fit = time.perf_counter()
        if opts.reconstruct and opts.sequential:
            stats.update(reconstruct_sequential(work, as_calibration(ctx.calibration, work), consumers, removals,
                                                input_means, live, damp=opts.damp))
        else:
            stats.update(reconstruct(work, consumers, {g.name: c for g, c in removals}, grams,
                                     input_means, live, order=1 if opts.reconstruct else 0,
                                     damp=opts.damp))
        stats["reconstruct_s"] = round(time.perf_counter() - t_fit, 3)
    want_twin = opts.verify_twin and ctx.options.get("verify", True) is not False
    twin = masked_twin(work, removals) if want_twin else None  # after compensation: it is part of both
    io = io_removed(removals)
    result = apply_removal(work, removals)
    reshare(work, original, outputs)
    if twin is not None:
        check_twin(label, twin, work, [g.name for g, _ in removals], stats, io=io)
    if result["io_shapes"]:
        _report_io(label, work, result["io_shapes"], stats, ctx)
    stats.update(
        params_before=params_before,
        params_after=count_parameters(work),
        params_removed=result["params_removed"],
        units_removed=int(sum(c.size for _, c in removals)),
        units_total=int(sum(g.width for g in live)),
        blocks_pruned=len(removals),
        shape_edits=result["shape_edits"],
    )
    log.info("%s: removed %d of %d units in %d blocks", label, stats["units_removed"], stats["units_total"],
             len(removals))
    return PassResult(work, True, stats)


def _report_io(label: str, model: Model, io_shapes: dict[str, dict[str, Any]], stats: dict[str, Any],
               ctx: PassContext) -> None:
    """Say which graph inputs/outputs changed shape (KV caches) and which of their heads stay.

    The kept heads (relative to the original model, over every pass) also go into the model's
    metadata (:func:`~onnxprune.analysis.kvcache.record_kept`), where ``check`` finds them.
    """
    stats["io_shapes_changed"] = {k: f"{v['before']} -> {v['after']}" for k, v in io_shapes.items()}
    kept = {}
    for name, v in io_shapes.items():
        before = v["before"].strip("[]").split(", ")
        size = before[v["axis"]] if v["axis"] < len(before) else ""
        if size.isdigit():
            gone = set(v["removed"])
            kept[name] = (v["axis"], [i for i in range(int(size)) if i not in gone])
    stats["kv_heads_kept"] = {k: p for k, (_, p) in record_kept(model, kept).items()}
    first = next(iter(io_shapes.items()))
    ctx.warn(f"{label}: removing KV heads changed the declared shapes of {len(io_shapes)} KV-cache graph "
             f"input(s)/output(s), e.g. {first[0]} {first[1]['before']} -> {first[1]['after']}; feed past caches "
             "of the new shape (a dense cache converts by keeping, per tensor, the heads listed in the stats' "
             "kv_heads_kept on axis 1)")


@register_pass
class HeadsPass(Pass):
    """Remove whole attention heads (KV-head groups for GQA)."""

    name = "heads"
    description = "remove attention heads (decomposed, fused-QKV, GQA, fused ORT/opset-23 Attention ops)"
    Options = HeadsOptions

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Prune heads of every attention block of ``model`` in place."""
        return _run_structured(model, ctx, "heads", self.options)


@register_pass
class FfnPass(Pass):
    """Remove intermediate neurons of feed-forward blocks."""

    name = "ffn"
    description = "remove FFN intermediate neurons (GELU/SiLU/ReLU, gated SwiGLU) with their weights"
    Options = FfnOptions

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Prune FFN neurons of every feed-forward block of ``model`` in place."""
        return _run_structured(model, ctx, "ffn", self.options)
