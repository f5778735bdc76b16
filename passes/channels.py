"""Pass ``channels``: structured channel removal over dependency groups.

For every prunable group (see :mod:`onnxprune.analysis.channels.groups`) a score per channel is
computed and the lowest-scoring channels are deleted from every slice of the group
(:func:`~onnxprune.analysis.removal.apply_removal`), so the graph really gets narrower.

Criteria (per channel ``c`` of a group with slices ``S``):

* ``l1``: ``sum_{s in S} mean |W_s[c]|``; ``l2``: ``sum_{s in S} sqrt(mean W_s[c]^2)`` -- each
  slice's norm is normalised by its size per channel, so a 3x3 conv and a bias weigh alike;
  only ``"out"`` and ``"in"`` slices (weights, biases) count;
* ``bn_scale``: ``sum |gamma_c|`` over the group's BatchNorm/InstanceNorm scales (groups without
  one fall back to ``l2``);
* ``activation``: mean ``|x_c|`` over calibration data at every tensor where readers see the
  channel (ONNX Runtime with extra outputs, streamed batch by batch).

Selection is :func:`onnxprune.criteria.structured.select`, shared with ``heads``/``ffn``:
``scope=layer`` removes ``round(ratio * width)`` channels of each group (nearest, halves up);
``scope=global`` normalises scores by each group's mean and removes the ``round(ratio * total)``
lowest over all groups, greedily, never leaving a group below ``min_keep``. Then the survivor
count is rounded up to a multiple of ``round_to`` (never above the width).

**Reconstruction** (``reconstruct=true``, needs calibration data): every layer that reads removed
channels is re-fitted by least squares on the calibration data so that its output matches the
dense layer's (:mod:`onnxprune.analysis.reconstruction`): MatMul / Gemm / 1×1 Conv consumers
re-solve their kept input rows and bias; k×k and padded Conv consumers (an im2col re-fit is not
implemented) and consumers with fewer than ``2 (K + 1)`` calibration rows get the bias-only fit
(the removed channels' mean contribution folded into the bias). Grouped Conv consumers are left
as they are (named in ``consumers_not_refitted``).

A group whose selected removal cannot be applied (a shape constant would drop to zero or below,
positions outside a tensor) is blocked with the reason (``blocked_at_apply`` in the stats, one
warning each) and selection runs again without it; the rest of the model is still pruned. The
analysis works on a copy: a run that removes nothing returns the input model unchanged
(``modified=False``), and copies of shared initializers (and cloned shape nodes) that stay
identical are merged back.

**Twin check** (``verify_twin``, default on): on models under 50 MB of weights the pruned model is
run against its masked twin (the prepared model with the removed channels' ``"in"`` slices
zeroed; exact groups, float weights) on one synthesized feed; outputs must agree within
``1e-4 + 1e-3 * max|output|``, else the pass fails naming the groups (a wrong model is never
returned). It is skipped with ``verify_twin=false`` or when ``ctx.options["verify"]`` is False.

Preconditions: ``0 <= ratio < 1``; exact groups only unless ``allow_approximate``.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from onnxprune.analysis.calibration import (
    as_calibration,
    channel_stats,
    needs_calibration,
)
from onnxprune.analysis.channels.groups import build_groups
from onnxprune.analysis.channels.prepare import prepare
from onnxprune.analysis.dead import dead_units
from onnxprune.analysis.nbits import logical_array, nbits_weights
from onnxprune.analysis.reconstruction import (
    consumer_stats,
    find_consumers,
    reconstruct,
    reconstruct_sequential,
)
from onnxprune.analysis.removal import (
    PruneGroup,
    apply_removal,
    check_twin,
    masked_twin,
    plan_problems,
    positions,
    reshare,
)
from onnxprune.criteria.structured import select as select_units
from onnxprune.errors import PipelineError
from onnxprune.ir.model import Model
from onnxprune.pipeline.base import Pass, PassContext, PassResult
from onnxprune.pipeline.registry import register_pass
from onnxprune.summary import count_parameters

log = logging.getLogger(__name__)


@dataclass
class ChannelsOptions:
    """Options of ``channels``."""

    ratio: float = field(default=0.3, metadata={"help": "share of channels to remove per group (layer) or "
                                                        "overall (global)", "min": 0.0, "max_exclusive": 1.0})
    criterion: Literal["l2", "l1", "bn_scale", "activation", "dead"] = field(
        default="l2", metadata={"help": "channel importance; dead: only the channels every consumer reads with "
                                        "exactly zero weights (exact; ratio ignored)"})
    scope: Literal["layer", "global"] = field(default="layer", metadata={"help": "rank channels per group or "
                                                                                 "across groups"})
    round_to: int = field(default=1, metadata={"help": "surviving widths are multiples of this", "min": 1})
    min_keep: int = field(default=1, metadata={"help": "fewest channels a group keeps", "min": 1})
    include: str = field(default="", metadata={"help": "regex: prune only groups whose name or members match"})
    exclude: str = field(default="", metadata={"help": "regex: skip groups whose name or members match"})
    allow_approximate: bool = field(default=False, metadata={
        "help": "also prune through LayerNorm/Softmax/Reduce over channels (outputs change beyond the "
                "removed channels)"})
    verify_twin: bool = field(default=True, metadata={
        "help": "check the pruned model against its masked twin on one random input (models under 50 MB "
                "of weights; a disagreement fails the pass)"})
    reconstruct: bool = field(default=False, metadata={
        "help": "least-squares re-fit of the layers that read removed channels (MatMul, Gemm, 1x1 Conv: kept "
                "inputs and bias; other Conv: bias only) on calibration data"})
    damp: float = field(default=1e-3, metadata={"help": "ridge of the re-fit, relative to the mean input energy",
                                                "min": 0.0})
    sequential: bool = field(default=False, metadata={
        "help": "re-fit layer by layer in graph order on the inputs of the model pruned so far (one calibration "
                "pass per layer)"})

    def validate(self) -> None:
        """Check the regexes."""
        for name in ("include", "exclude"):
            try:
                re.compile(getattr(self, name))
            except re.error as exc:
                raise ValueError(f"option {name}: invalid regex ({exc})") from None




# ---------------------------------------------------------------------- scores
def _per_channel_stat(model: Model, s: Any, width: int, p: int) -> np.ndarray:
    """Mean of ``|w|`` (p=1) or ``w**2`` (p=2) over each channel's positions of slice ``s``."""
    t = model.initializer(s.initializer)
    if t is not None and t.data_type == onnx.TensorProto.UINT8 and s.initializer in (packed := nbits_weights(model)):
        arr = logical_array(model, s.initializer, packed)  # a MatMulNBits weight: its dequantised [N, K]
    else:
        arr = model.get_array(s.initializer)
    if s.step == s.block:  # contiguous: a view, no gather
        idx = [slice(None)] * arr.ndim
        idx[s.axis] = slice(s.offset, s.offset + width * s.block)
        sub = arr[tuple(idx)]
    else:
        sub = np.take(arr, positions(s, np.arange(width)), axis=s.axis)
    if sub.dtype.kind != "f":  # quantised weights seen through DequantizeLinear
        sub = sub.astype(np.float32)
    vals = np.abs(sub) if p == 1 else np.square(sub, dtype=np.float64 if sub.dtype.itemsize < 4 else None)
    other = tuple(i for i in range(vals.ndim) if i != s.axis)
    per_pos = vals.sum(axis=other, dtype=np.float64) if other else vals.astype(np.float64)
    n = vals.size // max(vals.shape[s.axis], 1) * s.block
    return per_pos.reshape(width, s.block).sum(axis=1) / max(n, 1)


def norm_scores(model: Model, group: PruneGroup, p: int) -> np.ndarray:
    """Sum over out/in slices of the per-channel L1 (mean abs) or L2 (RMS) norm."""
    score = np.zeros(group.width)
    for s in group.slices:
        if s.role not in ("out", "in"):
            continue
        stat = _per_channel_stat(model, s, group.width, p)
        score += stat if p == 1 else np.sqrt(stat)
    return score


def bn_scores(model: Model, group: PruneGroup) -> np.ndarray | None:
    """Sum of |scale| over the group's BatchNorm/InstanceNorm scales (None if it has none)."""
    found = [s for s in group.slices if s.tag in ("bn_scale", "in_scale")]
    if not found:
        return None
    return sum(_per_channel_stat(model, s, group.width, 1) for s in found)  # type: ignore[return-value]


def activation_scores(model: Model, groups: list[PruneGroup], calibration: Any) -> dict[str, np.ndarray]:
    """Mean |activation| per channel at the tensors the group's readers consume.

    Statistics come from :func:`onnxprune.analysis.calibration.channel_stats` (padding tokens
    excluded where the model has an attention mask); memory does not grow with the number of
    batches.
    """
    probes = sorted({(p[0], p[1]) for g in groups for p in g.probes})
    stats = channel_stats(model, calibration, probes, who="channels", what="criterion=activation")
    out: dict[str, np.ndarray] = {}
    for g in groups:
        score = np.zeros(g.width)
        for tensor, axis, offset, block in g.probes:
            per_pos = stats[(tensor, axis)][0]
            pos = offset + np.arange(g.width)[:, None] * block + np.arange(block)[None, :]
            score += per_pos[pos].mean(axis=1)
        out[g.name] = score
    return out


# ---------------------------------------------------------------------- selection
def select(groups: list[PruneGroup], scores: dict[str, np.ndarray], opts: ChannelsOptions) -> list[tuple[PruneGroup, np.ndarray]]:
    """Channels to remove per group (:func:`onnxprune.criteria.structured.select`).

    With ``criterion=dead`` the scores are 0 at dead channels and 1 elsewhere, and exactly the
    dead ones are removed (``ratio`` is ignored).
    """
    if opts.criterion == "dead":
        return [(g, c) for g in groups if (c := np.flatnonzero(scores[g.name] == 0).astype(np.int64)).size]
    chosen = select_units([scores[g.name] for g in groups], opts.ratio, scope=opts.scope, min_keep=opts.min_keep,
                          round_to=opts.round_to)
    return [(g, c) for g, c in zip(groups, chosen) if c.size]


def select_applicable(model: Model, groups: list[PruneGroup], scores: dict[str, np.ndarray],
                      opts: ChannelsOptions) -> tuple[list[tuple[PruneGroup, np.ndarray]], dict[str, str]]:
    """:func:`select`, then refuse the groups whose plan cannot be applied and select again.

    Returns the plan and ``{group name: reason}`` for the refused groups (their reasons come from
    :func:`~onnxprune.analysis.removal.plan_problems`); the plan always applies.
    """
    refused: dict[str, str] = {}
    live = list(groups)
    while True:
        plan = select(live, scores, opts)
        bad = plan_problems(model, plan)
        if not bad:
            return plan, refused
        refused.update(bad)
        live = [g for g in live if g.name not in bad]


def _matches(g: PruneGroup, pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(x) for x in [g.name, *g.members])


@register_pass
class ChannelsPass(Pass):
    """Remove the least important channels of every prunable dependency group."""

    name = "channels"
    description = "structured channel removal (conv/linear output channels with dependency propagation)"
    Options = ChannelsOptions

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Score, select and remove channels.

        The analysis runs on a copy (its preparation names nodes and copies shared constants):
        when nothing is removed the input model comes back untouched with ``modified=False``;
        otherwise the pruned copy, with copies that stayed byte-identical merged back
        (:func:`~onnxprune.analysis.removal.reshare`).
        """
        opts: ChannelsOptions = self.options
        if not 0.0 <= opts.ratio < 1.0:
            raise PipelineError(f"channels: option ratio must be in [0, 1), got {opts.ratio}")
        params_before = count_parameters(model)
        original = {t.name for t in model.graph.initializer}
        outputs = {o for n in model.graph.node for o in n.output}
        work = model.copy()
        prepare(work)
        groups = build_groups(work, opts.allow_approximate, prepare_model=False)
        prunable = [g for g in groups if g.prunable]
        cands = [g for g in prunable if (not opts.include or _matches(g, opts.include))
                 and not (opts.exclude and _matches(g, opts.exclude))]
        stats: dict[str, Any] = {"groups_found": len(groups), "groups_prunable": len(prunable),
                                 "groups_blocked": len(groups) - len(prunable), "groups_selected": len(cands),
                                 "approximate_groups": sum(g.approximate for g in cands),
                                 "params_before": params_before}
        unchanged = PassResult(model, False, stats)
        if not cands or (opts.ratio == 0 and opts.criterion != "dead"):
            if not cands:
                reasons = sorted({g.blocked for g in groups if g.blocked})[:3]
                ctx.warn("channels: nothing to prune" + (f" (blocked: {'; '.join(reasons)})" if reasons else ""))
            stats.update(channels_removed=0, params_after=params_before)
            return unchanged
        scores = self._scores(work, cands, ctx, stats)
        plan, refused = select_applicable(work, cands, scores, opts)
        for name, reason in refused.items():
            ctx.warn(f"channels: group {name} blocked: {reason}")
        if refused:
            stats.update(groups_blocked_at_apply=len(refused), blocked_at_apply=refused)
        if not plan:
            stats.update(channels_removed=0, params_after=params_before)
            return unchanged
        if opts.reconstruct:
            stats.update(self._reconstruct(work, cands, plan, ctx))
        twin = masked_twin(work, plan) if opts.verify_twin and ctx.options.get("verify", True) is not False \
            else None
        removal = apply_removal(work, plan)
        reshare(work, original, outputs)
        if twin is not None:
            check_twin("channels", twin, work, [g.name for g, _ in plan], stats)
        stats.update(channels_removed=removal["channels_removed"], groups_pruned=len(plan),
                     shape_edits=removal["shape_edits"], params_after=count_parameters(work))
        log.info("channels: removed %d channels in %d groups", removal["channels_removed"], len(plan))
        return PassResult(work, True, stats)

    def _reconstruct(self, model: Model, groups: list[PruneGroup], plan: list[tuple[PruneGroup, np.ndarray]],
                     ctx: PassContext) -> dict[str, Any]:
        """Re-fit the consumers of the removed channels (:mod:`onnxprune.analysis.reconstruction`)."""
        t0 = time.perf_counter()
        consumers, skipped = find_consumers(model, [g for g, _ in plan])
        needs_calibration("channels", "reconstruct=true", ctx.calibration)
        calib = as_calibration(ctx.calibration, model)
        grams, means = consumer_stats(model, calib, list(consumers.values()), gram=not self.options.sequential)
        if self.options.sequential:
            out = reconstruct_sequential(model, calib, consumers, plan, means, groups, damp=self.options.damp)
        else:
            out = reconstruct(model, consumers, {g.name: c for g, c in plan}, grams, means, groups, order=1,
                              damp=self.options.damp)
        out["reconstruct_s"] = round(time.perf_counter() - t0, 3)
        if skipped:
            out["consumers_not_refitted"] = skipped
        return out

    def _scores(self, model: Model, groups: list[PruneGroup], ctx: PassContext,
                stats: dict[str, Any]) -> dict[str, np.ndarray]:
        crit = self.options.criterion
        if crit == "dead":  # 0 = every consumer reads the channel with exactly zero weights
            out_dead = {}
            for g in groups:
                alive = np.ones(g.width)
                alive[dead_units(model, g, self.options.min_keep)] = 0.0
                out_dead[g.name] = alive
            return out_dead
        if crit == "activation":
            return activation_scores(model, groups, ctx.calibration)
        out: dict[str, np.ndarray] = {}
        fallback = 0
        for g in groups:
            s = bn_scores(model, g) if crit == "bn_scale" else None
            if s is None:
                if crit == "bn_scale":
                    fallback += 1
                s = norm_scores(model, g, 1 if crit == "l1" else 2)
            out[g.name] = s
        if fallback:
            stats["bn_scale_fallback_l2"] = fallback
        return out


__all__ = ["ChannelsOptions", "ChannelsPass", "activation_scores", "bn_scores", "norm_scores",
           "select", "select_applicable"]
