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

Preconditions: static head/channel counts; ``activation`` and ``compensate`` need calibration
data (``--calibration``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis.calibration import channel_stats
from onnxprune.analysis.heads.diagnose import NO_SOFTMAX, why_no_heads
from onnxprune.analysis.heads.groups import find_groups
from onnxprune.analysis.heads.prepare import prepare_model
from onnxprune.analysis.heads.shapes import static_shapes
from onnxprune.analysis.removal import (
    ParamSlice,
    PruneGroup,
    apply_removal,
    check_twin,
    masked_twin,
    plan_problems,
    positions,
    reshare,
)
from onnxprune.criteria.structured import select
from onnxprune.ir.model import Model
from onnxprune.pipeline.base import Pass, PassContext, PassResult
from onnxprune.pipeline.registry import register_pass
from onnxprune.summary import count_parameters

log = logging.getLogger(__name__)

__all__ = ["FfnOptions", "FfnPass", "HeadsOptions", "HeadsPass", "channel_means", "unit_scores"]


@dataclass
class HeadsOptions:
    """Options of ``heads``."""

    ratio: float = field(default=0.25, metadata={"help": "share of heads to remove per block (or overall)",
                                                 "min": 0.0, "max_exclusive": 1.0})
    criterion: str = field(default="l2", metadata={"help": "importance: weight norm, calibration activations, or "
                                                           "activations x output-projection row norms",
                                                   "choices": ("l2", "activation", "weighted")})
    scope: str = field(default="layer", metadata={"help": "rank heads per block or across all blocks",
                                                  "choices": ("layer", "global")})
    min_heads: int = field(default=1, metadata={"help": "heads (KV heads for GQA) every block keeps", "min": 1})
    compensate: bool = field(default=False, metadata={"help": "refit the output projection bias (needs calibration)"})
    verify_twin: bool = field(default=True, metadata={
        "help": "check the pruned model against its masked twin on one random input (models under 50 MB "
                "of weights; a disagreement fails the pass)"})


@dataclass
class FfnOptions:
    """Options of ``ffn``."""

    ratio: float = field(default=0.25, metadata={"help": "share of intermediate neurons to remove per block",
                                                 "min": 0.0, "max_exclusive": 1.0})
    criterion: str = field(default="l2", metadata={"help": "importance: weight norm, calibration activations, or "
                                                           "activations x down-projection row norms",
                                                   "choices": ("l2", "activation", "weighted")})
    round_to: int = field(default=1, metadata={"help": "kept width is a multiple of this", "min": 1})
    compensate: bool = field(default=False, metadata={"help": "refit the down projection bias (needs calibration)"})
    verify_twin: bool = field(default=True, metadata={
        "help": "check the pruned model against its masked twin on one random input (models under 50 MB "
                "of weights; a disagreement fails the pass)"})


# ---------------------------------------------------------------------- importance
def unit_scores(model: Model, group: PruneGroup, roles: tuple[str, ...] = ("out", "in", "param")) -> np.ndarray:
    """L2 norm of every parameter position each unit owns (slices of the given roles): ``[width]``."""
    total = np.zeros(group.width, dtype=np.float64)
    units = np.arange(group.width)
    for s in group.slices:
        if s.role not in roles:
            continue
        arr = np.moveaxis(np.asarray(model.get_array(s.initializer)), s.axis, 0)
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


# ---------------------------------------------------------------------- compensation
def _compensate(model: Model, exits: list[tuple[str, str]], removed: np.ndarray, width: int,
                means: dict[str, tuple[np.ndarray, np.ndarray]], live: list[PruneGroup]) -> int:
    """Fold the removed channels' mean contribution into each exit's bias; returns biases changed.

    A bias created here sits on the exit's output channels; if another group prunes those (a
    chain of FFN blocks), the new bias joins that group's slices so it shrinks with them.
    """
    nodes = {n.name: n for n in model.graph.node}
    done = 0
    for node_name, tensor in exits:
        node = nodes[node_name]
        mean = means[tensor][1]
        block = mean.size // width
        ch = (removed[:, None] * block + np.arange(block)[None, :]).reshape(-1)
        w = np.asarray(model.get_array(node.input[1]), dtype=np.float64)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        trans_b = node.op_type == "Gemm" and bool(attrs.get("transB", 0))
        rows = w[:, ch].T if trans_b else w[ch, :]
        delta = float(attrs.get("alpha", 1.0)) * (mean[ch] @ rows)  # [N]
        created = _add_to_bias(model, node, delta)
        if created:
            out_axis = 0 if trans_b else 1
            for g in live:
                for sl in list(g.slices):
                    if sl.initializer == node.input[1] and sl.role == "out" and sl.axis == out_axis:
                        g.slices.append(ParamSlice(created, 0, "param", sl.offset, sl.block, sl.stride, "bias"))
        done += 1
    return done


def _add_to_bias(model: Model, node: onnx.NodeProto, delta: np.ndarray) -> str | None:
    """Add ``delta`` to the bias after ``node``; returns the name of a newly created bias, if any."""
    graph = model.graph
    out = node.output[0]
    inits = model.initializer_map()
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in inits:
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        c = np.asarray(model.get_array(node.input[2]))
        if beta != 0:
            model.set_array(node.input[2], (np.broadcast_to(c, delta.shape) + delta / beta).astype(c.dtype))
            return None
    users = [n for n in graph.node if out in n.input]
    if len(users) == 1 and users[0].op_type == "Add" and out not in {o.name for o in graph.output}:
        other = [x for x in users[0].input if x != out]
        if len(other) == 1 and other[0] in inits and model.is_constant(other[0]):
            b = np.asarray(model.get_array(other[0]))
            if b.shape == delta.shape and len([n for n in graph.node if other[0] in n.input]) == 1:
                model.set_array(other[0], (b + delta).astype(b.dtype))
                return None
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[node.input[1]].data_type)
    bias_name = _unique(model, f"{node.name}.compensation_bias")
    model.add_initializer(bias_name, delta.astype(dtype))
    pre = _unique(model, f"{out}.pre_compensation")
    for n in graph.node:  # the producer writes `pre`; a new Add writes the old name
        for i, o in enumerate(n.output):
            if o == out:
                n.output[i] = pre
    add = onnx.helper.make_node("Add", [pre, bias_name], [out], name=_unique(model, f"{node.name}.compensation"))
    idx = [i for i, n in enumerate(graph.node) if n.name == node.name][0]
    graph.node.insert(idx + 1, add)
    return bias_name


def _unique(model: Model, base: str) -> str:
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output} | {
        n.name for n in model.graph.node}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


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
    if not live or opts.ratio == 0:
        stats.update(params_before=params_before, params_after=params_before, params_removed=0,
                     units_removed=0)
        return unchanged
    needs_calib = opts.criterion in ("activation", "weighted") or opts.compensate
    means: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if needs_calib:
        what = f"criterion={opts.criterion}" if opts.criterion != "l2" else "compensate=true"
        means = channel_means(work, [t for g in live for _, t in exits[g.name]], ctx.calibration, label, what)
    if opts.criterion == "activation":
        score_of = {g.name: _activation_scores(g, exits[g.name], means) for g in live}
    elif opts.criterion == "weighted":
        score_of = {g.name: _activation_scores(g, exits[g.name], means) * unit_scores(work, g, ("in",))
                    for g in live}
    else:
        score_of = {g.name: unit_scores(work, g) for g in live}
    refused: dict[str, str] = {}
    while True:  # refuse the blocks whose plan cannot be applied, then select again
        chosen = select([score_of[g.name] for g in live], opts.ratio, scope=getattr(opts, "scope", "layer"),
                        min_keep=opts.min_heads if mode == "heads" else 1, round_to=getattr(opts, "round_to", 1))
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
    if opts.compensate:
        stats["biases_compensated"] = sum(_compensate(work, exits[g.name], c, g.width, means, live)
                                          for g, c in removals)
    want_twin = opts.verify_twin and ctx.options.get("verify", True) is not False
    twin = masked_twin(work, removals) if want_twin else None  # after compensation: it is part of both
    result = apply_removal(work, removals)
    reshare(work, original, outputs)
    if twin is not None:
        check_twin(label, twin, work, [g.name for g, _ in removals], stats)
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
